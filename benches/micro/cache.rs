//! The response cache's own cost: an exact hit (key digest, store lookup, the answer's
//! clone) and a semantic lookup (nearest prompt) in an index of `SEMANTIC_ENTRIES` prompts,
//! with its recall against an exact scan, on two data sets: uniform random vectors
//! (`cache/semantic_nearest`) and clustered ones (`cache/semantic_nearest_clustered`).
//! `LLMGW_BENCH_SEMANTIC_FIRST_EF` sets the lookups' first pass (default
//! `cache::FIRST_EF`; below 48 a miss far from every prompt stops after it).

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
    let first_ef = std::env::var("LLMGW_BENCH_SEMANTIC_FIRST_EF")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(llm_gateway::cache::FIRST_EF);
    for data in [Data::Random, Data::Clustered] {
        semantic(c, &ns, data, dims, entries, first_ef);
    }
}

/// The semantic index's test data.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Data {
    /// Uniform random unit vectors: no structure at all, the hardest case for a graph.
    Random,
    /// [`CLUSTERS`] random centres, each prompt a centre plus noise (cosine ~0.7 to its
    /// centre, ~0.5 to the prompts of its cluster): closer to real sentence embeddings.
    Clustered,
}

/// Cluster centres of [`Data::Clustered`].
const CLUSTERS: u64 = 1_000;

/// Uniform noise per component for a point of a cluster: about the spread of a unit
/// 384-dim vector's components, so a point is at cosine ~0.7 from its centre.
const CLUSTER_NOISE: f32 = 0.177;

/// Noise per component of a near query (cosine ~0.97 to the stored prompt).
const NEAR_NOISE: f32 = 0.045;

fn plus_noise(rng: &mut fastrand::Rng, base: &Vector, amount: f32) -> Vector {
    let noisy: Vec<f32> = base
        .as_slice()
        .iter()
        .map(|x| x + (rng.f32() - 0.5) * amount)
        .collect();
    Vector::unit(&noisy).expect("not zero")
}

#[expect(
    clippy::print_stderr,
    reason = "the index build time and the lookup tail go to stderr beside criterion's report"
)]
fn semantic(c: &mut Criterion, ns: &str, data: Data, dims: usize, entries: usize, first_ef: usize) {
    let label = match data {
        Data::Random => "random",
        Data::Clustered => "clustered",
    };
    let index = SemanticIndex::new(usize::MAX).first_ef(first_ef);
    let expires = Instant::now() + Duration::from_secs(3600);
    let key = |n: usize| llm_gateway::cache::CacheKey {
        namespace: ns.into(),
        digest: {
            let mut d = [0u8; 32];
            d[..8].copy_from_slice(&(n as u64).to_le_bytes());
            d
        },
    };
    let prompt_of = |k: &llm_gateway::cache::CacheKey| {
        u64::from_le_bytes(k.digest[..8].try_into().expect("8 bytes")) as usize
    };
    let centre = |n: u64| vector(3_000_000 + n, dims);
    // A point of cluster `n`, made from `seed`.
    let clustered = |n: u64, seed: u64| {
        plus_noise(
            &mut fastrand::Rng::with_seed(seed),
            &centre(n),
            CLUSTER_NOISE,
        )
    };
    let vectors: Vec<Vector> = (0..entries as u64)
        .map(|n| match data {
            Data::Random => vector(n, dims),
            Data::Clustered => clustered(n % CLUSTERS, n),
        })
        .collect();
    let built = std::time::Instant::now();
    for (n, v) in vectors.iter().enumerate() {
        index.insert([1; 32], v.clone(), key(n), expires);
    }
    eprintln!(
        "cache/semantic_nearest ({label}): {entries} prompts of {dims} dims indexed one by one in {:.1} s",
        built.elapsed().as_secs_f64()
    );
    let query = vector(7, dims);
    let name = match data {
        Data::Random => "cache/semantic_nearest".to_string(),
        Data::Clustered => "cache/semantic_nearest_clustered".to_string(),
    };
    c.bench_function(&name, |b| {
        b.iter(|| black_box(index.nearest(&[1; 32], black_box(&query), Instant::now())))
    });
    // The tail criterion does not report: 5,000 lookups at the default threshold (0.95),
    // one by one, of miss queries (random: a random vector; clustered: a point of a new
    // cluster; nothing near them) and of near ones (a stored prompt plus noise, cosine
    // ~0.97: what a hit looks like).
    let near = |n: u64| {
        let mut rng = fastrand::Rng::with_seed(2_000_000 + n);
        let base = &vectors[rng.usize(..entries)];
        plus_noise(&mut rng, base, NEAR_NOISE)
    };
    let miss = |n: u64| match data {
        Data::Random => vector(1_000_000 + n, dims),
        Data::Clustered => clustered(CLUSTERS + n, 1_000_000 + n),
    };
    let threshold = 0.95;
    for (kind, make) in [("miss", &miss as &dyn Fn(u64) -> Vector), ("near", &near)] {
        let mut latencies = hdrhistogram::Histogram::<u64>::new(3).expect("a histogram");
        let mut visits = hdrhistogram::Histogram::<u64>::new(3).expect("a histogram");
        let mut widened = 0;
        for n in 0..5_000u64 {
            let query = make(n);
            let started = std::time::Instant::now();
            let found = black_box(index.lookup(&[1; 32], &query, threshold, Instant::now()));
            let _ = latencies.record(started.elapsed().as_nanos() as u64);
            let _ = visits.record(found.visits as u64);
            widened += usize::from(found.widened);
        }
        // Recall@1 against an exact scan of every prompt, on 200 of the queries; and
        // whether a hit at the threshold is decided alike (never a false one: the
        // threshold is checked on the exact vector).
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
            let found = index
                .lookup(&[1; 32], &query, threshold, Instant::now())
                .best;
            if found.as_ref().is_some_and(|(k, _)| prompt_of(k) == exact) {
                same += 1;
            }
            if exact_sim >= threshold {
                hits_exact += 1;
                if found.is_some_and(|(_, sim)| sim >= threshold) {
                    hits_same += 1;
                }
            }
        }
        eprintln!(
            "cache/semantic_nearest ({label}) over {entries} prompts, {kind} queries (first pass ef {first_ef}): p50 {:.1} us, p99 {:.1} us, max {:.1} us (5,000 queries); distances p50 {}, p99 {}, max {}; widened {widened}; recall@1 {same}/{checked}, hits at {threshold} {hits_same}/{hits_exact} of the exact scan's",
            latencies.value_at_quantile(0.5) as f64 / 1e3,
            latencies.value_at_quantile(0.99) as f64 / 1e3,
            latencies.max() as f64 / 1e3,
            visits.value_at_quantile(0.5),
            visits.value_at_quantile(0.99),
            visits.max(),
        );
    }
}
