//! The response cache's own cost: an exact hit (key digest, store lookup, the answer's
//! clone) and a semantic lookup (nearest prompt) in an index of `SEMANTIC_ENTRIES` prompts,
//! with its recall against an exact scan.

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
    let index = SemanticIndex::new(usize::MAX);
    let expires = Instant::now() + Duration::from_secs(3600);
    let key = |n: usize| llm_gateway::cache::CacheKey {
        namespace: ns.clone(),
        digest: {
            let mut d = [0u8; 32];
            d[..8].copy_from_slice(&(n as u64).to_le_bytes());
            d
        },
    };
    let prompt_of = |k: &llm_gateway::cache::CacheKey| {
        u64::from_le_bytes(k.digest[..8].try_into().expect("8 bytes")) as usize
    };
    let vectors: Vec<Vector> = (0..entries).map(|n| vector(n as u64, dims)).collect();
    let built = std::time::Instant::now();
    for (n, v) in vectors.iter().enumerate() {
        index.insert([1; 32], v.clone(), key(n), expires);
    }
    eprintln!(
        "cache/semantic_nearest: {entries} prompts of {dims} dims indexed one by one in {:.1} s",
        built.elapsed().as_secs_f64()
    );
    let query = vector(7, dims);
    c.bench_function("cache/semantic_nearest", |b| {
        b.iter(|| black_box(index.nearest(&[1; 32], black_box(&query), Instant::now())))
    });
    // The tail criterion does not report: 5,000 lookups, one by one, of random queries
    // (nothing near them: the worst case for a graph) and of paraphrase-like ones (a
    // stored prompt plus noise, cosine ~0.95: what a hit looks like).
    let near = |n: u64| {
        let mut rng = fastrand::Rng::with_seed(2_000_000 + n);
        let base = &vectors[rng.usize(..entries)];
        let noisy: Vec<f32> = base
            .as_slice()
            .iter()
            .map(|x| x + (rng.f32() - 0.5) * 0.045)
            .collect();
        Vector::unit(&noisy).expect("not zero")
    };
    for (kind, make) in [
        (
            "random",
            &(|n: u64| vector(1_000_000 + n, dims)) as &dyn Fn(u64) -> Vector,
        ),
        ("near", &near),
    ] {
        let mut latencies = hdrhistogram::Histogram::<u64>::new(3).expect("a histogram");
        for n in 0..5_000u64 {
            let query = make(n);
            let started = std::time::Instant::now();
            black_box(index.nearest(&[1; 32], &query, Instant::now()));
            let _ = latencies.record(started.elapsed().as_nanos() as u64);
        }
        // Recall@1 against an exact scan of every prompt, on 200 of the queries; and for
        // the near ones, whether a hit at the default threshold (0.95) is decided alike.
        let (mut same, mut hits_exact, mut hits_same) = (0, 0, 0);
        let checked = 200u64;
        for n in 0..checked {
            let query = make(n);
            let (exact, exact_sim) = vectors
                .iter()
                .enumerate()
                .map(|(i, v)| (i, v.similarity(&query)))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .expect("prompts");
            let found = index.nearest(&[1; 32], &query, Instant::now());
            if found.as_ref().is_some_and(|(k, _)| prompt_of(k) == exact) {
                same += 1;
            }
            if exact_sim >= 0.95 {
                hits_exact += 1;
                if found.is_some_and(|(_, sim)| sim >= 0.95) {
                    hits_same += 1;
                }
            }
        }
        eprintln!(
            "cache/semantic_nearest over {entries} prompts, {kind} queries: p50 {:.1} us, p99 {:.1} us, max {:.1} us (5,000 queries); recall@1 {same}/{checked}, hits at 0.95 {hits_same}/{hits_exact} of the exact scan's",
            latencies.value_at_quantile(0.5) as f64 / 1e3,
            latencies.value_at_quantile(0.99) as f64 / 1e3,
            latencies.max() as f64 / 1e3
        );
    }
}
