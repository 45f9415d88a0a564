//! The response cache's own cost: an exact hit (key digest, store lookup, the answer's
//! clone) and a semantic lookup (nearest prompt) in an index of `SEMANTIC_ENTRIES` prompts.

use std::{hint::black_box, sync::Arc, time::Duration};

use criterion::Criterion;
use llm_gateway::{
    cache::{
        Attribution, CacheControl, CacheMode, CacheSettings, ResponseCache, SemanticIndex, Vector,
        namespace,
    },
    types::{ChatRequest, ChatResponse, ContentPart, FinishReason, Message, Role},
};
use tokio::time::Instant;

/// Prompts in the semantic index (`LLMGW_BENCH_SEMANTIC_ENTRIES`, default 10,000; the goal is for 100,000).
fn semantic_entries() -> usize {
    std::env::var("LLMGW_BENCH_SEMANTIC_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

fn request() -> ChatRequest {
    ChatRequest {
        model: "mock/echo".into(),
        messages: vec![
            Message::text(Role::System, "You are a helpful assistant. Answer briefly."),
            Message::text(
                Role::User,
                "What is the capital of France, and why is it famous?",
            ),
        ],
        ..ChatRequest::default()
    }
}

fn vector(seed: u64, dims: usize) -> Vector {
    let mut rng = fastrand::Rng::with_seed(seed);
    let v: Vec<f32> = (0..dims).map(|_| rng.f32() - 0.5).collect();
    Vector::unit(&v).expect("a random vector is not zero")
}

#[expect(
    clippy::print_stderr,
    reason = "the index build time and the lookup tail go to stderr beside criterion's report"
)]
pub fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let cache = Arc::new(ResponseCache::new(CacheSettings {
        models: CacheMode::Exact,
        ..CacheSettings::default()
    }));
    let ns = namespace(Some("search"), Some("search-prod"));
    let req = request();
    let answer = ChatResponse {
        model: "echo".into(),
        content: vec![ContentPart::Text(
            "Paris; for its history, art and food. ".repeat(8),
        )],
        finish_reason: FinishReason::Stop,
        usage: None,
    };
    let tags = std::collections::BTreeMap::new();
    let who = Attribution {
        request_id: "bench",
        key: "search-prod",
        tags: &tags,
    };
    rt.block_on(async {
        let mut call = cache.begin(&ns, &req, None, CacheControl::default());
        call.lookup(who).await;
        call.store(&answer, "mock", None).await;
    });
    c.bench_function("cache/exact_hit", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut call = cache.begin(&ns, black_box(&req), None, CacheControl::default());
                let entry = call.lookup(who).await.expect("a hit");
                black_box(entry.response.clone())
            })
        })
    });

    let dims = 384;
    let entries = semantic_entries();
    // One graph of every prompt (built once, when the last is inserted).
    let index = SemanticIndex::new(usize::MAX).rebuild_at(entries);
    let expires = Instant::now() + Duration::from_secs(3600);
    let key = llm_gateway::cache::CacheKey {
        namespace: ns.clone(),
        digest: [0; 32],
    };
    let built = std::time::Instant::now();
    for n in 0..entries {
        index.insert([1; 32], vector(n as u64, dims), key.clone(), expires);
    }
    eprintln!(
        "cache/semantic_nearest: {entries} prompts of {dims} dims indexed in {:.1} s",
        built.elapsed().as_secs_f64()
    );
    let query = vector(7, dims);
    c.bench_function("cache/semantic_nearest", |b| {
        b.iter(|| black_box(index.nearest(&[1; 32], black_box(&query), Instant::now())))
    });
    // The tail criterion does not report: 5,000 lookups of random queries, one by one.
    let mut latencies = hdrhistogram::Histogram::<u64>::new(3).expect("a histogram");
    for n in 0..5_000u64 {
        let query = vector(1_000_000 + n, dims);
        let started = std::time::Instant::now();
        black_box(index.nearest(&[1; 32], &query, Instant::now()));
        let _ = latencies.record(started.elapsed().as_nanos() as u64);
    }
    eprintln!(
        "cache/semantic_nearest over {entries} prompts: p50 {:.1} us, p99 {:.1} us, max {:.1} us (5,000 random queries)",
        latencies.value_at_quantile(0.5) as f64 / 1e3,
        latencies.value_at_quantile(0.99) as f64 / 1e3,
        latencies.max() as f64 / 1e3
    );
}
