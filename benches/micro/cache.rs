//! The response cache's own cost: an exact hit (key digest, store lookup, the answer's
//! clone) and a semantic lookup (nearest prompt) in an index of `SEMANTIC_ENTRIES` prompts.

use std::{hint::black_box, sync::Arc, time::Duration};

use criterion::Criterion;
use llm_gateway::{
    cache::{
        CacheControl, CacheMode, CacheSettings, ResponseCache, SemanticIndex, Vector, namespace,
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
    rt.block_on(async {
        let mut call = cache.begin(&ns, &req, None, CacheControl::default());
        call.lookup().await;
        call.store(&answer, "mock", None);
    });
    c.bench_function("cache/exact_hit", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut call = cache.begin(&ns, black_box(&req), None, CacheControl::default());
                let entry = call.lookup().await.expect("a hit");
                black_box(entry.response.clone())
            })
        })
    });

    let dims = 384;
    let index = SemanticIndex::new(usize::MAX);
    let expires = Instant::now() + Duration::from_secs(3600);
    let key = llm_gateway::cache::CacheKey {
        namespace: ns.clone(),
        digest: [0; 32],
    };
    for n in 0..semantic_entries() {
        index.insert([1; 32], vector(n as u64, dims), key.clone(), expires);
    }
    let query = vector(7, dims);
    c.bench_function("cache/semantic_nearest", |b| {
        b.iter(|| black_box(index.nearest(&[1; 32], black_box(&query), Instant::now())))
    });
}
