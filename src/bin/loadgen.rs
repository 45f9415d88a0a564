//! `llm-gateway-load`: a load generator for the `llmgateway.v1.LlmGateway` API, using the
//! generated tonic client.
//!
//! - **Closed loop** (`--concurrency N`, the default): N callers, each sending its next call as
//!   soon as the previous one ended; measures the maximum throughput.
//! - **Open loop** (`--rate R`): calls are sent on a fixed schedule whatever the answers do.
//!   Latency is measured from each call's *intended* send time, so a stalled server shows up
//!   in the percentiles instead of silently slowing the load (coordinated omission).
//!
//! Unary (`--rpc chat`) and streaming (`--rpc stream`) calls. For streams it records the time
//! to the first content (TTFT) and the total time, and counts a stream that did not end with
//! exactly one `finish` event as an error (`NoFinish`, `EventAfterFinish`).
//!
//! With `--pid`, it reads that process's CPU time (utime + stime from `/proc/PID/stat`)
//! before and after the measured calls, and samples its RSS while they run.
//!
//! It prints a human summary, then one JSON line (the last line) for scripts.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use llm_gateway::pb::{self, chat_stream_response::Event, llm_gateway_client::LlmGatewayClient};
use serde_json::{Value, json};
use tokio::{sync::Semaphore, task::JoinSet, time::Instant};
use tonic::transport::{Channel, Endpoint};

/// Which RPC to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Rpc {
    /// Unary `Chat`.
    Chat,
    /// Server-streaming `ChatStream`.
    Stream,
}

/// A load generator for the llm-gateway gRPC API (closed or open loop, unary or streaming).
#[derive(Debug, Parser)]
#[command(name = "llm-gateway-load", version, about)]
struct Args {
    /// The gateway (or baseline) URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// The RPC to call.
    #[arg(long, value_enum, default_value_t = Rpc::Chat)]
    rpc: Rpc,
    /// The `model` of every request.
    #[arg(long, default_value = "openai/gpt-4o-mini")]
    model: String,
    /// The user message of every request.
    #[arg(long, default_value = "hello")]
    prompt: String,
    /// Closed loop: the number of concurrent callers.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Open loop: calls per second, sent on a fixed schedule (overrides --concurrency).
    #[arg(long)]
    rate: Option<f64>,
    /// How long to send calls (the measured phase).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// How many calls to send (the measured phase); with --duration, whichever ends first.
    #[arg(long)]
    requests: Option<u64>,
    /// Unrecorded load of the same shape before the measured phase.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    warmup: Duration,
    /// Closed loop: spread the callers' first calls over this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    ramp: Option<Duration>,
    /// The number of HTTP/2 connections; callers are spread over them.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Per-call deadline (sent as `grpc-timeout`; the caller gives up 1 s after it).
    #[arg(long, value_parser = humantime::parse_duration)]
    deadline: Option<Duration>,
    /// Open loop: the most calls in flight; past it, sending waits (and the wait counts as
    /// latency).
    #[arg(long, default_value_t = 20_000)]
    max_inflight: usize,
    /// After the last call is sent, wait this long for the calls in flight, then abort them
    /// (counted as `Unfinished` errors).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    drain: Duration,
    /// A process to measure: CPU time over the measured calls, RSS sampled while they run.
    #[arg(long)]
    pid: Option<u32>,
    /// A label copied into the JSON line.
    #[arg(long, default_value = "")]
    label: String,
    /// Send each unary request as tonic does (the message, then an empty END_STREAM frame)
    /// instead of ending the stream with the message.
    #[arg(long)]
    tonic_framing: bool,
    /// Runtime worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

/// Largest recorded latency: one hour, in microseconds.
const MAX_US: u64 = 3_600_000_000;

#[expect(
    clippy::expect_used,
    reason = "constant bounds within hdrhistogram's documented range cannot fail"
)]
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Why a call failed: a label (the gRPC code name, or `NoFinish`, `EventAfterFinish`,
/// `LocalTimeout`, ...) and a message for diagnosis.
struct Failure {
    label: String,
    detail: String,
}

impl Failure {
    fn new(label: &str, detail: &str) -> Self {
        Self {
            label: label.to_owned(),
            detail: detail.to_owned(),
        }
    }

    fn status(status: &tonic::Status) -> Self {
        // Transport failures say little in the message: the cause chain says what broke.
        let mut detail = status.message().to_owned();
        let mut source = std::error::Error::source(status);
        while let Some(cause) = source {
            let _ = write!(detail, ": {cause}");
            source = cause.source();
        }
        Self {
            label: format!("{:?}", status.code()),
            detail,
        }
    }
}

/// What one call produced.
struct Outcome {
    result: Result<(), Failure>,
    /// When the call was sent (in the open loop, at or after its intended time: tokio's
    /// timer has a 1 ms tick, and the generator shares the machine's cores).
    sent: Instant,
    /// When the first content (or the finish of an empty reply) arrived (streams only).
    first: Option<Instant>,
    /// When the call ended.
    done: Instant,
}

/// Results of a set of calls.
struct Stats {
    latency: Histogram<u64>,
    /// Latency of failed calls (e.g. how fast an overloaded server refuses).
    error_latency: Histogram<u64>,
    /// Latency of failed calls from when each was sent (the server's share: without the
    /// open loop's lag between a call's intended time and its send).
    error_service: Histogram<u64>,
    /// The open loop's lag between a call's intended time and its send.
    send_lag: Histogram<u64>,
    ttft: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    /// The first message seen for each error label.
    examples: BTreeMap<String, String>,
    /// The largest `latency - deadline` of any call, in microseconds.
    max_overrun_us: Option<i64>,
}

impl Stats {
    fn new() -> Self {
        Self {
            latency: histogram(),
            error_latency: histogram(),
            error_service: histogram(),
            send_lag: histogram(),
            ttft: histogram(),
            ok: 0,
            errors: BTreeMap::new(),
            examples: BTreeMap::new(),
            max_overrun_us: None,
        }
    }

    fn record(&mut self, start: Instant, outcome: Outcome, deadline: Option<Duration>) {
        let latency = outcome.done.saturating_duration_since(start);
        self.send_lag
            .saturating_record(micros(outcome.sent.saturating_duration_since(start)));
        if let Some(d) = deadline {
            let overrun = i64::try_from(micros(latency)).unwrap_or(i64::MAX)
                - i64::try_from(micros(d)).unwrap_or(i64::MAX);
            self.max_overrun_us = Some(self.max_overrun_us.map_or(overrun, |m| m.max(overrun)));
        }
        match outcome.result {
            Ok(()) => {
                self.ok += 1;
                self.latency.saturating_record(micros(latency));
                if let Some(first) = outcome.first {
                    self.ttft
                        .saturating_record(micros(first.saturating_duration_since(start)));
                }
            }
            Err(failure) => {
                self.error_latency.saturating_record(micros(latency));
                self.error_service.saturating_record(micros(
                    outcome.done.saturating_duration_since(outcome.sent),
                ));
                *self.errors.entry(failure.label.clone()).or_default() += 1;
                self.examples.entry(failure.label).or_insert(failure.detail);
            }
        }
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

fn percentiles(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    json!({
        "p50": h.value_at_quantile(0.50),
        "p90": h.value_at_quantile(0.90),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
        "mean": (h.mean() * 10.0).round() / 10.0,
    })
}

// ---------------------------------------------------------------------------------------------
// The measured process
// ---------------------------------------------------------------------------------------------

/// Clock ticks per second of `/proc/PID/stat` times (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: fields start after the last
    // `)`. There, field 3 (state) comes first, so utime (14) and stime (15) are at 11 and 12.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SEC)
}

/// A `Vm...:` line of `/proc/PID/status`, in KiB.
fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Samples a process's RSS until stopped: the highest value (every 200 ms) and a timeline
/// (every second).
struct RssSampler {
    max_kib: Arc<AtomicU64>,
    timeline: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let max_kib = Arc::new(AtomicU64::new(0));
        let timeline = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let max_kib = max_kib.clone();
            let timeline = timeline.clone();
            let stop = stop.clone();
            async move {
                let mut tick = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if let Some(rss) = status_kib(pid, "VmRSS") {
                        max_kib.fetch_max(rss, Ordering::Relaxed);
                        if tick.is_multiple_of(5)
                            && let Ok(mut t) = timeline.lock()
                        {
                            t.push(rss);
                        }
                    }
                    tick += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        });
        Self {
            max_kib,
            timeline,
            stop,
            task,
        }
    }

    /// The highest sample and the timeline.
    async fn finish(self) -> (u64, Vec<u64>) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let timeline = self
            .timeline
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        (self.max_kib.load(Ordering::Relaxed), timeline)
    }
}

// ---------------------------------------------------------------------------------------------
// Calls
// ---------------------------------------------------------------------------------------------

/// Shared by every call.
struct Ctx {
    rpc: Rpc,
    request: pb::ChatRequest,
    deadline: Option<Duration>,
    inflight: AtomicUsize,
    peak_inflight: AtomicUsize,
}

async fn call(ctx: &Ctx, mut client: Client) -> Outcome {
    let sent = Instant::now();
    let n = ctx.inflight.fetch_add(1, Ordering::Relaxed) + 1;
    ctx.peak_inflight.fetch_max(n, Ordering::Relaxed);
    let mut request = tonic::Request::new(ctx.request.clone());
    if let Some(d) = ctx.deadline {
        request.set_timeout(d);
    }
    let work = async {
        match ctx.rpc {
            Rpc::Chat => unary(&mut client, request).await.map(|()| None),
            Rpc::Stream => stream(&mut client, request).await.map(Some),
        }
    };
    let result = match ctx.deadline {
        Some(d) => tokio::time::timeout(d + Duration::from_secs(1), work)
            .await
            .unwrap_or_else(|_| {
                Err(Failure::new(
                    "LocalTimeout",
                    "no answer 1 s past the deadline",
                ))
            }),
        None => work.await,
    };
    let done = Instant::now();
    ctx.inflight.fetch_sub(1, Ordering::Relaxed);
    match result {
        Ok(first) => Outcome {
            result: Ok(()),
            sent,
            first,
            done,
        },
        Err(failure) => Outcome {
            result: Err(failure),
            sent,
            first: None,
            done,
        },
    }
}

async fn unary(
    client: &mut Client,
    request: tonic::Request<pb::ChatRequest>,
) -> Result<(), Failure> {
    let response = client
        .chat(request)
        .await
        .map_err(|s| Failure::status(&s))?;
    if response.get_ref().message.is_none() {
        return Err(Failure::new("NoMessage", "the response has no message"));
    }
    Ok(())
}

/// Reads a stream to its end; returns when its first content (or finish) arrived.
async fn stream(
    client: &mut Client,
    request: tonic::Request<pb::ChatRequest>,
) -> Result<Instant, Failure> {
    let mut events = client
        .chat_stream(request)
        .await
        .map_err(|s| Failure::status(&s))?
        .into_inner();
    let mut first = None;
    let mut finished = false;
    while let Some(message) = events.message().await.map_err(|s| Failure::status(&s))? {
        if finished {
            return Err(Failure::new(
                "EventAfterFinish",
                "an event arrived after the finish event",
            ));
        }
        match message.event {
            Some(Event::Delta(_)) => {
                first.get_or_insert_with(Instant::now);
            }
            Some(Event::Finish(_)) => {
                first.get_or_insert_with(Instant::now);
                finished = true;
            }
            Some(Event::Start(_)) | None => {}
        }
    }
    match (finished, first) {
        (true, Some(first)) => Ok(first),
        _ => Err(Failure::new(
            "NoFinish",
            "the stream ended without a finish event",
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Load shapes
// ---------------------------------------------------------------------------------------------

/// When a phase stops sending.
#[derive(Clone, Copy)]
struct Limits {
    duration: Option<Duration>,
    requests: Option<u64>,
}

/// Calls left to send in a closed-loop phase.
struct Budget {
    end: Option<Instant>,
    remaining: Option<AtomicU64>,
}

impl Budget {
    fn take(&self) -> bool {
        if self.end.is_some_and(|end| Instant::now() >= end) {
            return false;
        }
        match &self.remaining {
            Some(r) => r
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok(),
            None => true,
        }
    }
}

/// Waits for the tasks until `until`, then aborts the rest. Returns the finished tasks'
/// outputs, and how many tasks failed and were aborted.
async fn drain<T: 'static>(tasks: &mut JoinSet<T>, until: Instant) -> (Vec<T>, u64, u64) {
    let mut done = Vec::new();
    let mut failed = 0;
    loop {
        match tokio::time::timeout_at(until, tasks.join_next()).await {
            Ok(Some(Ok(out))) => done.push(out),
            Ok(Some(Err(_))) => failed += 1,
            Ok(None) => return (done, failed, 0),
            Err(_) => {
                let left = tasks.len() as u64;
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                return (done, failed, left);
            }
        }
    }
}

fn count_lost(stats: &mut Stats, failed: u64, unfinished: u64) {
    if failed > 0 {
        *stats.errors.entry("TaskFailed".to_owned()).or_default() += failed;
    }
    if unfinished > 0 {
        *stats.errors.entry("Unfinished".to_owned()).or_default() += unfinished;
    }
}

async fn closed_loop(
    ctx: &Arc<Ctx>,
    clients: &[Client],
    concurrency: usize,
    ramp: Option<Duration>,
    limits: Limits,
    drain_for: Duration,
) -> (Stats, Instant) {
    let start = Instant::now();
    let budget = Arc::new(Budget {
        end: limits.duration.map(|d| start + d),
        remaining: limits.requests.map(AtomicU64::new),
    });
    let mut tasks = JoinSet::new();
    let concurrency = concurrency.max(1);
    // One set of statistics for all callers: a histogram pair per caller would cost ~1 MB
    // each (20,000 callers: 20 GB of address space) and a long merge.
    let shared = Arc::new(Mutex::new(Stats::new()));
    for i in 0..concurrency {
        let client = clients[i % clients.len()].clone();
        let ctx = ctx.clone();
        let budget = budget.clone();
        let shared = shared.clone();
        let delay = ramp.map_or(Duration::ZERO, |r| r.mul_f64(i as f64 / concurrency as f64));
        tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            while budget.take() {
                let sent = Instant::now();
                let outcome = call(&ctx, client.clone()).await;
                if let Ok(mut stats) = shared.lock() {
                    stats.record(sent, outcome, ctx.deadline);
                }
            }
        });
    }
    // Callers stop taking new calls at the end of the duration; give the last ones `drain`.
    let drain_until = limits.duration.map_or_else(
        || start + Duration::from_secs(365 * 24 * 3600),
        |d| start + d + ramp.unwrap_or_default() + drain_for,
    );
    let (_, failed, unfinished) = drain(&mut tasks, drain_until).await;
    let mut stats = shared
        .lock()
        .map(|mut s| std::mem::replace(&mut *s, Stats::new()))
        .unwrap_or_else(|_| Stats::new());
    // An aborted caller was in the middle of one call.
    count_lost(&mut stats, failed, unfinished);
    (stats, start)
}

async fn open_loop(
    ctx: &Arc<Ctx>,
    clients: &[Client],
    rate: f64,
    max_inflight: usize,
    limits: Limits,
    drain_for: Duration,
) -> (Stats, Instant) {
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let total = match (limits.requests, limits.duration) {
        (Some(n), Some(d)) => n.min((d.as_secs_f64() * rate).ceil() as u64),
        (Some(n), None) => n,
        (None, Some(d)) => (d.as_secs_f64() * rate).ceil() as u64,
        (None, None) => 0,
    };
    let stats = Arc::new(Mutex::new(Stats::new()));
    let permits = Arc::new(Semaphore::new(max_inflight.max(1)));
    let start = Instant::now();
    // The schedule is kept by a thread of its own with the OS's sleep (about 50-100 us late),
    // not tokio's timer, whose 1 ms tick would make every call up to 1 ms late: that lag is
    // counted as latency (from the intended time), and would hide a sub-millisecond answer.
    let handle = tokio::runtime::Handle::current();
    let clients = clients.to_vec();
    let (ctx, stats_) = (ctx.clone(), stats.clone());
    let pacer = std::thread::spawn(move || {
        let mut tasks = JoinSet::new();
        let mut failed_early = 0;
        for i in 0..total {
            let intended = start + interval.mul_f64(i as f64);
            let wait = intended.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            // Waiting for a permit delays the send, not the intended time: the wait is latency.
            let Ok(permit) = handle.block_on(permits.clone().acquire_owned()) else {
                break;
            };
            let client = clients[usize::try_from(i).unwrap_or(0) % clients.len()].clone();
            let ctx = ctx.clone();
            let stats = stats_.clone();
            tasks.spawn_on(
                async move {
                    let outcome = call(&ctx, client).await;
                    drop(permit);
                    if let Ok(mut s) = stats.lock() {
                        s.record(intended, outcome, ctx.deadline);
                    }
                },
                &handle,
            );
            while let Some(joined) = tasks.try_join_next() {
                failed_early += u64::from(joined.is_err());
            }
        }
        (tasks, failed_early)
    });
    let (mut tasks, failed_early) = tokio::task::spawn_blocking(move || pacer.join())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_else(|| (JoinSet::new(), 0));
    let (_, failed, unfinished) = drain(&mut tasks, Instant::now() + drain_for).await;
    let failed = failed + failed_early;
    let mut stats = stats
        .lock()
        .map(|mut s| std::mem::replace(&mut *s, Stats::new()))
        .unwrap_or_else(|_| Stats::new());
    count_lost(&mut stats, failed, unfinished);
    (stats, start)
}

// ---------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------

/// The generated client over a channel whose requests end with their last message.
type Client = LlmGatewayClient<EndWithMessage<Channel>>;

/// Sends each request's last DATA frame with END_STREAM set, as grpc-go and grpcio do.
///
/// tonic's request body does not know it has ended until it is polled once more, so hyper
/// sends the message in one DATA frame and END_STREAM in a second, empty one. h2 servers
/// (0.4.20+) charge every small DATA frame that is not the last against a per-connection
/// budget (half the connection window) until the application reads it; with thousands of
/// calls arriving on one connection faster than the server reads them, the budget runs out
/// and the server closes the connection with ENHANCE_YOUR_CALM (`too_many_data_frames`),
/// failing every call on it. A unary request whose DATA frame is also the last is not
/// charged. `--tonic-framing` turns this off, to load a server the way plain tonic clients do.
#[derive(Debug, Clone)]
struct EndWithMessage<S>(S, bool);

impl<S> tower::Service<http::Request<tonic::body::Body>> for EndWithMessage<S>
where
    S: tower::Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if !self.1 {
            return self.0.call(request);
        }
        self.0.call(request.map(|body| {
            tonic::body::Body::new(PeekEnd {
                inner: body,
                next: None,
                ended: false,
            })
        }))
    }
}

/// A body that looks one frame ahead, so `is_end_stream` is true with the last frame.
struct PeekEnd {
    inner: tonic::body::Body,
    next: Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>,
    ended: bool,
}

impl http_body::Body for PeekEnd {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        use std::task::Poll;
        let this = &mut *self;
        let frame = match this.next.take() {
            Some(frame) => frame,
            None if this.ended => return Poll::Ready(None),
            None => match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(frame)) => frame,
                Poll::Ready(None) => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            },
        };
        // Look ahead without waiting: a unary request's body ends right after its message.
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(next)) => this.next = Some(next),
            Poll::Ready(None) => this.ended = true,
            Poll::Pending => {}
        }
        Poll::Ready(Some(frame))
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.next.is_none()
    }
}

async fn connect(
    target: &str,
    connections: usize,
    tonic_framing: bool,
) -> Result<Vec<Client>, String> {
    let endpoint = Endpoint::from_shared(target.to_owned())
        .map_err(|e| format!("bad --target {target}: {e}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5));
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections.max(1) {
        // Each `connect` opens its own HTTP/2 connection.
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {target}: {e}"))?;
        clients.push(
            LlmGatewayClient::new(EndWithMessage(channel, !tonic_framing))
                .max_decoding_message_size(64 * 1024 * 1024)
                .max_encoding_message_size(64 * 1024 * 1024),
        );
    }
    Ok(clients)
}

fn request(args: &Args) -> pb::ChatRequest {
    pb::ChatRequest {
        model: args.model.clone(),
        messages: vec![pb::Message {
            role: pb::Role::User as i32,
            content: vec![pb::ContentPart {
                part: Some(pb::content_part::Part::Text(args.prompt.clone())),
            }],
            name: String::new(),
        }],
        ..pb::ChatRequest::default()
    }
}

async fn run_phase(
    args: &Args,
    ctx: &Arc<Ctx>,
    clients: &[Client],
    limits: Limits,
) -> (Stats, Instant) {
    match args.rate {
        Some(rate) => open_loop(ctx, clients, rate, args.max_inflight, limits, args.drain).await,
        None => {
            closed_loop(
                ctx,
                clients,
                args.concurrency,
                args.ramp,
                limits,
                args.drain,
            )
            .await
        }
    }
}

fn summary_line(out: &mut String, name: &str, h: &Histogram<u64>) {
    if !h.is_empty() {
        let _ = writeln!(
            out,
            "  {name:<8} us  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.9),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max()
        );
    }
}

async fn run(args: Args) -> Result<bool, String> {
    if args.duration.is_none() && args.requests.is_none() {
        return Err("give --duration, --requests or both".to_owned());
    }
    let clients = connect(&args.target, args.connections, args.tonic_framing).await?;
    let ctx = Arc::new(Ctx {
        rpc: args.rpc,
        request: request(&args),
        deadline: args.deadline,
        inflight: AtomicUsize::new(0),
        peak_inflight: AtomicUsize::new(0),
    });

    if !args.warmup.is_zero() {
        let limits = Limits {
            duration: Some(args.warmup),
            requests: None,
        };
        let _ = run_phase(&args, &ctx, &clients, limits).await;
        ctx.peak_inflight.store(0, Ordering::Relaxed);
    }

    let rss_start = args.pid.and_then(|p| status_kib(p, "VmRSS"));
    let sampler = args.pid.map(RssSampler::start);
    let cpu_before = args.pid.and_then(cpu_seconds);
    let limits = Limits {
        duration: args.duration,
        requests: args.requests,
    };
    let (stats, start) = run_phase(&args, &ctx, &clients, limits).await;
    let elapsed = start.elapsed().as_secs_f64();
    let cpu_after = args.pid.and_then(cpu_seconds);
    let (rss_max, rss_timeline) = match sampler {
        Some(s) => {
            let (max, timeline) = s.finish().await;
            (Some(max), timeline)
        }
        None => (None, Vec::new()),
    };
    let rss_end = args.pid.and_then(|p| status_kib(p, "VmRSS"));
    let hwm = args.pid.and_then(|p| status_kib(p, "VmHWM"));

    let errors = stats.error_count();
    let calls = stats.ok + errors;
    let rps = stats.ok as f64 / elapsed.max(1e-9);
    let cpu = match (cpu_before, cpu_after) {
        (Some(b), Some(a)) if calls > 0 => Some(json!({
            "seconds": ((a - b) * 1000.0).round() / 1000.0,
            "us_per_call": (((a - b) * 1e6 / calls as f64) * 10.0).round() / 10.0,
        })),
        _ => None,
    };
    let mut out = String::new();
    let mode = if args.rate.is_some() {
        "open"
    } else {
        "closed"
    };
    let rpc = match args.rpc {
        Rpc::Chat => "chat",
        Rpc::Stream => "stream",
    };

    let _ = writeln!(
        out,
        "{} {rpc} {mode}-loop against {} ({} connection(s)){}",
        if args.label.is_empty() {
            "load"
        } else {
            &args.label
        },
        args.target,
        args.connections,
        match args.rate {
            Some(r) => format!(", {r} calls/s"),
            None => format!(", concurrency {}", args.concurrency),
        }
    );
    let _ = writeln!(
        out,
        "  calls {calls}  ok {}  errors {errors}  elapsed {elapsed:.2}s  {rps:.0} ok calls/s  peak in flight {}",
        stats.ok,
        ctx.peak_inflight.load(Ordering::Relaxed)
    );
    summary_line(&mut out, "latency", &stats.latency);
    if args.rpc == Rpc::Stream {
        summary_line(&mut out, "ttft", &stats.ttft);
    }
    for (code, n) in &stats.errors {
        let example = stats.examples.get(code).map_or("", String::as_str);
        let _ = writeln!(out, "  error {code}: {n}  (first: {example:?})");
    }
    if let Some(cpu) = &cpu {
        let _ = writeln!(out, "  target process cpu: {cpu}");
    }
    if let Some(max) = rss_max {
        let _ = writeln!(
            out,
            "  target process rss KiB: start {} end {} max sampled {max} peak (VmHWM) {}",
            rss_start.unwrap_or(0),
            rss_end.unwrap_or(0),
            hwm.unwrap_or(0)
        );
    }

    let line = json!({
        "label": args.label,
        "rpc": rpc,
        "mode": mode,
        "concurrency": args.rate.is_none().then_some(args.concurrency),
        "rate": args.rate,
        "connections": args.connections,
        "calls": calls,
        "ok": stats.ok,
        "errors": stats.errors,
        "error_examples": stats.examples,
        "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
        "rps": rps.round(),
        "latency_us": percentiles(&stats.latency),
        "error_latency_us": percentiles(&stats.error_latency),
        "error_service_us": percentiles(&stats.error_service),
        "send_lag_us": percentiles(&stats.send_lag),
        "ttft_us": if args.rpc == Rpc::Stream { percentiles(&stats.ttft) } else { Value::Null },
        "peak_inflight": ctx.peak_inflight.load(Ordering::Relaxed),
        "deadline_ms": args.deadline.map(|d| d.as_millis()),
        "max_overrun_us": stats.max_overrun_us,
        "cpu": cpu,
        "rss_kib": args.pid.map(|_| json!({
            "start": rss_start,
            "end": rss_end,
            "max": rss_max,
            "hwm": hwm,
        })),
        "rss_timeline_kib": rss_timeline,
    });
    let _ = writeln!(out, "{line}");
    // Ignore a closed stdout (e.g. piped into `head`).
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
    Ok(errors == 0)
}

#[expect(
    clippy::print_stderr,
    reason = "reports usage problems to the terminal"
)]
fn main() -> ExitCode {
    let args = Args::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = args.threads {
        builder.worker_threads(n.max(1));
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("llm-gateway-load: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        // Errors are in the report; the exit status says there were some.
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("llm-gateway-load: {e}");
            ExitCode::from(2)
        }
    }
}
