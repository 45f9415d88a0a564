//! The HTTP front's stream writers (`server::http::openai::ChunkWriter`,
//! `server::http::anthropic::EventWriter`) on a 200-chunk text stream, next to the way the
//! OpenAI writer built each chunk before (a `serde_json::Value` tree per chunk, then
//! serialized), measured side by side in one run.

use std::hint::black_box;

use criterion::{Criterion, Throughput};
use llm_gateway::{
    executor::CallEvent,
    server::http::{anthropic::EventWriter, openai::ChunkWriter},
    types::{FinishReason, Route},
};
use serde_json::{Value, json};

const CHUNKS: usize = 200;

fn events() -> Vec<CallEvent> {
    let mut events = vec![CallEvent::Start {
        provider: "openai".into(),
        model: "gpt-4o-mini-2024-07-18".into(),
    }];
    events.extend((0..CHUNKS).map(|i| CallEvent::Text(format!(" token{i}"))));
    events.push(CallEvent::Finish {
        reason: FinishReason::Stop,
        usage: None,
        cost: None,
        route: Route::default(),
        guardrails: Default::default(),
    });
    events
}

/// The reference: one JSON tree per chunk (the writer's previous construction).
fn json_tree_chunk(id: &str, created: u64, model: &str, text: &str) -> bytes::Bytes {
    let value = json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": json!({"content": text}), "finish_reason": Value::Null, "logprobs": null}],
    });
    let mut out = b"data: ".to_vec();
    serde_json::to_writer(&mut out, &value).expect("a Value serializes");
    out.extend_from_slice(b"\n\n");
    bytes::Bytes::from(out)
}

pub fn bench(c: &mut Criterion) {
    let input = events();
    let mut g = c.benchmark_group("front");
    g.throughput(Throughput::Elements(CHUNKS as u64));
    g.bench_function("openai_200_chunks", |b| {
        b.iter_batched(
            || input.clone(),
            |events| {
                let mut w = ChunkWriter::new("req-0123456789", false);
                let mut bytes = 0;
                for e in events {
                    bytes += w.event(e).iter().map(|f| f.len()).sum::<usize>();
                }
                black_box(bytes)
            },
            criterion::BatchSize::SmallInput,
        );
    });
    g.bench_function("openai_200_chunks_json_tree_reference", |b| {
        b.iter_batched(
            || input.clone(),
            |events| {
                let id = "chatcmpl-req-0123456789".to_owned();
                let mut model = String::new();
                let mut bytes = 0;
                for e in events {
                    match e {
                        CallEvent::Start { model: m, .. } => model = m,
                        CallEvent::Text(t) => {
                            bytes += json_tree_chunk(&id, 1_700_000_000, &model, &t).len();
                        }
                        _ => {}
                    }
                }
                black_box(bytes)
            },
            criterion::BatchSize::SmallInput,
        );
    });
    g.bench_function("anthropic_200_chunks", |b| {
        b.iter_batched(
            || input.clone(),
            |events| {
                let mut w = EventWriter::new("req-0123456789");
                let mut bytes = 0;
                for e in events {
                    bytes += w.event(e).iter().map(|f| f.len()).sum::<usize>();
                }
                black_box(bytes)
            },
            criterion::BatchSize::SmallInput,
        );
    });
    g.finish();
}
