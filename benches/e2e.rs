//! The whole gateway in-process, as deployed: the Prometheus recorder installed, the usage
//! ledger on (SQLite in a temp dir), an info-level log subscriber (to a sink), the real gRPC
//! server on 127.0.0.1:0 in front of the mock upstream, called through the generated client.
//!
//! - `e2e/chat`, `e2e/chat_stream_4_chunks` (criterion): one call each, client and mock
//!   included (they run on other runtimes; the time is the round trip on loopback).
//!   `e2e/chat_cache_hit`: a unary call answered from the exact response cache (policy
//!   `cached`; no upstream call after the first).
//! - Allocations (`tracking-allocator`, counting only on the gateway's own runtime threads,
//!   workers and blocking pool, so not the client's or the mock's): per unary call,
//!   per stream, and per stream chunk (the difference between 4- and 44-chunk streams over
//!   the 40 extra content chunks). Printed, and written as JSON to the path in
//!   `LLMGW_ALLOC_OUT` when set (`bench/run.sh` reads it).
//!
//! `cargo bench --bench e2e` (criterion flags after `--`; `-- --alloc-only` skips criterion).

#![expect(
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "benchmark setup on fixed inputs; the report goes to stdout"
)]
use std::{
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use criterion::Criterion;
use futures_util::StreamExt;
use llm_gateway::{
    config::{Config, Overrides},
    mock_upstream::{MockSettings, MockUpstream},
    pb::{self, llm_gateway_client::LlmGatewayClient},
    server,
};
use tonic::transport::Channel;
use tracking_allocator::{
    AllocationGroupId, AllocationGroupToken, AllocationRegistry, AllocationTracker, Allocator,
};

#[global_allocator]
static GLOBAL: Allocator<std::alloc::System> = Allocator::system();

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

/// Counts allocations of every group but the root: only the gateway's threads enter one.
struct Counter;

impl AllocationTracker for Counter {
    fn allocated(&self, _addr: usize, size: usize, _wrapped: usize, group: AllocationGroupId) {
        if group != AllocationGroupId::ROOT {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(size as u64, Ordering::Relaxed);
        }
    }

    fn deallocated(
        &self,
        _addr: usize,
        _size: usize,
        _wrapped: usize,
        _source: AllocationGroupId,
        _current: AllocationGroupId,
    ) {
    }
}

/// Puts the current thread (a gateway runtime thread) in an allocation group for good.
fn count_this_thread() {
    if let Some(token) = AllocationGroupToken::register() {
        std::mem::forget(Box::leak(Box::new(token)).enter());
    }
}

fn snapshot() -> (u64, u64) {
    (ALLOCS.load(Ordering::SeqCst), BYTES.load(Ordering::SeqCst))
}

const PROMPT: &str = "Write a haiku about the sea, please";

fn request(model: &str) -> pb::ChatRequest {
    pb::ChatRequest {
        model: model.to_owned(),
        messages: vec![pb::Message {
            role: pb::Role::User as i32,
            content: vec![pb::ContentPart {
                part: Some(pb::content_part::Part::Text(PROMPT.to_owned())),
            }],
            ..pb::Message::default()
        }],
        ..pb::ChatRequest::default()
    }
}

async fn chat(client: &mut LlmGatewayClient<Channel>) {
    client
        .chat(request("openai/gpt-4o-mini"))
        .await
        .expect("the call succeeds");
}

/// One stream of `chunks` chunks; returns the content events received.
async fn stream(client: &mut LlmGatewayClient<Channel>, chunks: usize) -> usize {
    let mut events = client
        .chat_stream(request(&format!("openai/gpt-4o-mini+chunks={chunks}")))
        .await
        .expect("the stream opens")
        .into_inner();
    let mut content = 0;
    while let Some(event) = events.next().await {
        let event = event.expect("the stream does not fail");
        if matches!(event.event, Some(pb::chat_stream_response::Event::Delta(_))) {
            content += 1;
        }
    }
    content
}

/// Allocations (count, bytes) per call of `f`, over `n` calls after `n / 4` warm-up calls.
fn per_call<F, Fut>(rt: &tokio::runtime::Runtime, n: u64, mut f: F) -> (f64, f64, usize)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    rt.block_on(async {
        for _ in 0..n / 4 {
            f().await;
        }
        // Let the ledger's batch of the warm-up calls go out first.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let before = snapshot();
        let mut units = 0;
        for _ in 0..n {
            units = f().await;
        }
        // The ledger writes in 100 ms batches: include the write of these calls.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let after = snapshot();
        (
            (after.0 - before.0) as f64 / n as f64,
            (after.1 - before.1) as f64 / n as f64,
            units,
        )
    })
}

fn main() {
    if AllocationRegistry::set_global_tracker(Counter).is_err() {
        panic_free_exit("another allocation tracker is installed");
    }
    AllocationRegistry::enable_tracking();
    let store = tempfile::tempdir().expect("a temp dir");
    // The mock upstream: its own runtime, not counted.
    let mock_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime starts");
    let mock = mock_rt
        .block_on(MockUpstream::start(MockSettings::default()))
        .expect("the mock starts");

    // The gateway: one worker thread (and the blocking pool), counted.
    let gateway_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .on_thread_start(count_this_thread)
        .enable_all()
        .build()
        .expect("a runtime starts");
    let _ = tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_writer(std::io::sink)
            .finish(),
    );
    llm_gateway::telemetry::metrics_handle().expect("the recorder installs");
    let toml = format!(
        r#"
[store]
path = "{}"

[providers.openai]
kind = "openai"
api_key = "bench-not-a-key"
base_url = "{}"

# `e2e/chat_cache_hit`: exact cache, every call after the first a hit.
[policies.cached]
targets = [{{ provider = "openai", model = "gpt-4o-mini" }}]
cache = {{ mode = "exact" }}
"#,
        store.path().join("gateway.db").display(),
        mock.openai_base_url()
    );
    let mut config = Config::from_toml(
        &toml,
        Path::new("bench.toml"),
        &Overrides::default(),
        &|_| None,
    )
    .expect("a valid config");
    config.metrics.listen = None;
    config.http.listen = None;
    config.admin.token = Some("bench-admin-token-0123456789".to_owned());
    let listener = gateway_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("a port");
    let addr = listener.local_addr().expect("an address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = gateway_rt.spawn(server::run(config, listener, async {
        let _ = stopped.await;
    }));

    // The client: this thread, not counted.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime starts");
    let channel = rt.block_on(async {
        for _ in 0..100 {
            if let Ok(ch) = Channel::from_shared(format!("http://{addr}"))
                .expect("a valid uri")
                .connect()
                .await
            {
                return ch;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic_free_exit("the gateway did not start")
    });
    let client = LlmGatewayClient::new(channel);

    let (unary, unary_bytes, _) = per_call(&rt, 2000, || {
        let mut c = client.clone();
        async move {
            chat(&mut c).await;
            1
        }
    });
    let (short, short_bytes, short_chunks) = per_call(&rt, 1000, || {
        let mut c = client.clone();
        async move { stream(&mut c, 4).await }
    });
    let (long, long_bytes, long_chunks) = per_call(&rt, 1000, || {
        let mut c = client.clone();
        async move { stream(&mut c, 44).await }
    });
    let extra = (long_chunks.saturating_sub(short_chunks)).max(1) as f64;
    let per_chunk = (long - short) / extra;
    let per_chunk_bytes = (long_bytes - short_bytes) / extra;
    println!(
        "allocations in the gateway: unary call {unary:.1} ({unary_bytes:.0} bytes); \
         stream of {short_chunks} chunks {short:.1} ({short_bytes:.0} bytes); \
         per extra stream chunk {per_chunk:.2} ({per_chunk_bytes:.0} bytes; {short_chunks} vs {long_chunks} chunks)"
    );
    if let Ok(path) = std::env::var("LLMGW_ALLOC_OUT") {
        let json = format!(
            "{{\"unary_allocs\":{unary:.2},\"unary_bytes\":{unary_bytes:.0},\"stream_allocs\":{short:.2},\"stream_bytes\":{short_bytes:.0},\"stream_chunks\":{short_chunks},\"chunk_allocs\":{per_chunk:.3},\"chunk_bytes\":{per_chunk_bytes:.0}}}\n"
        );
        std::fs::write(path, json).expect("the report is written");
    }

    if !std::env::args().any(|a| a == "--alloc-only") {
        let mut c = Criterion::default().configure_from_args();
        let mut g = c.benchmark_group("e2e");
        g.bench_function("chat", |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut c = client.clone();
                    chat(&mut c).await;
                });
            });
        });
        g.bench_function("chat_cache_hit", |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut c = client.clone();
                    c.chat(request("cached")).await.expect("the call succeeds");
                });
            });
        });
        g.bench_function("chat_stream_4_chunks", |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut c = client.clone();
                    stream(&mut c, 4).await
                })
            });
        });
        g.finish();
        c.final_summary();
    }

    let _ = stop.send(());
    let _ = gateway_rt.block_on(server);
    drop(mock);
}

fn panic_free_exit(message: &str) -> ! {
    eprintln!("e2e bench: {message}");
    std::process::exit(1)
}
