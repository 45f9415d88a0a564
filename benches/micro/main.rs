//! criterion micro-benchmarks of the gateway's per-call work, without the network:
//!
//! - `convert`: gRPC request validation and conversion, response and stream-event conversion
//!   (`server::convert`).
//! - `openai`: Chat Completions request building and response parsing
//!   (`providers::openai::ChatCompletions` build_request, parse_response).
//! - `sse`: SSE decoding plus OpenAI chunk decoding of a realistic 200-chunk stream.
//! - `front`: the HTTP front's OpenAI and Anthropic stream writers on a 200-chunk stream,
//!   beside the OpenAI writer's former JSON-tree-per-chunk construction.
//! - `guard`: guardrail scanning per KiB of prompt with every detector, and the stream
//!   scanner per chunk (`guard`, `guard::stream`).
//! - `executor`: routing plus the executor around a scripted instant fake provider, unary
//!   and streaming (the gateway's own cost per call below the gRPC server).
//! - `cache`: an exact response-cache hit, and a semantic nearest-prompt lookup in an index
//!   of 10,000 prompts (`LLMGW_BENCH_SEMANTIC_ENTRIES=100000` for the goal's size; building
//!   it takes a while).
//!
//! - `admission`: an overload refusal past the in-flight bound, to its HTTP response.
//!
//! Run with `cargo bench --bench micro` (optionally a filter: `cargo bench --bench micro --
//! sse`). The load scenarios (the gateway under gRPC load against the bare baseline) are in
//! `bench/run.sh`.

#![expect(
    clippy::expect_used,
    reason = "benchmark setup on fixed inputs; a failure means the benchmark itself is broken"
)]

mod admission;
mod cache;
mod convert;
mod executor;
mod fixtures;
mod front;
mod guard;
mod openai;
mod sse;

use criterion::Criterion;

fn main() {
    let mut c = Criterion::default().configure_from_args();
    convert::bench(&mut c);
    openai::bench(&mut c);
    sse::bench(&mut c);
    front::bench(&mut c);
    executor::bench(&mut c);
    cache::bench(&mut c);
    guard::bench(&mut c);
    admission::bench(&mut c);
    c.final_summary();
}
