//! `providers::openai`: the JSON the adapter writes and reads per call.

use std::hint::black_box;

use criterion::{Criterion, Throughput};
use llm_gateway::providers::openai::{OpenAiConfig, build_request, parse_response};

use crate::fixtures;

pub fn bench(c: &mut Criterion) {
    let config = OpenAiConfig::new("http://127.0.0.1:8089/v1");
    let request = fixtures::request();
    let mut g = c.benchmark_group("openai");
    g.bench_function("build_request", |b| {
        b.iter(|| {
            build_request(
                &config,
                black_box("gpt-4o-mini"),
                black_box(&request),
                false,
            )
        });
    });
    g.bench_function("build_request_stream", |b| {
        b.iter(|| build_request(&config, black_box("gpt-4o-mini"), black_box(&request), true));
    });
    g.throughput(Throughput::Bytes(fixtures::CHAT_COMPLETION.len() as u64));
    g.bench_function("parse_response", |b| {
        b.iter(|| parse_response(black_box(fixtures::CHAT_COMPLETION), "gpt-4o-mini"));
    });
    g.finish();
}
