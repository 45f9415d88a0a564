//! `providers::openai`: the JSON the adapter writes and reads per call.

use std::hint::black_box;

use criterion::{Criterion, Throughput};
use llm_gateway::providers::{
    WireFormat,
    openai::{ChatCompletions, OpenAiConfig},
};

use crate::fixtures;

pub fn bench(c: &mut Criterion) {
    let wire = ChatCompletions::new(OpenAiConfig::new("http://127.0.0.1:8089/v1"));
    let request = fixtures::request();
    let mut g = c.benchmark_group("openai");
    g.bench_function("build_request", |b| {
        b.iter(|| wire.build_request(black_box("gpt-4o-mini"), black_box(&request), false));
    });
    g.bench_function("build_request_stream", |b| {
        b.iter(|| wire.build_request(black_box("gpt-4o-mini"), black_box(&request), true));
    });
    g.throughput(Throughput::Bytes(fixtures::CHAT_COMPLETION.len() as u64));
    g.bench_function("parse_response", |b| {
        b.iter(|| wire.parse_response(black_box(fixtures::CHAT_COMPLETION), "gpt-4o-mini"));
    });
    g.finish();
}
