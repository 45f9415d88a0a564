//! A mock LLM provider over HTTP, speaking the providers' real wire formats, with scripted
//! latency and faults. Tests spawn one per test on `127.0.0.1:0`; benchmarks and users run it
//! as the `llm-gateway-mock` binary.
//!
//! # Wire formats
//! - OpenAI Chat Completions: `POST /v1/chat/completions`, and Azure OpenAI's
//!   `POST /openai/deployments/{deployment}/chat/completions?api-version=...`; embeddings at
//!   `POST /v1/embeddings` and `.../deployments/{deployment}/embeddings` (floats, or base64
//!   with `encoding_format: base64`; `dimensions`).
//! - Anthropic Messages: `POST /v1/messages` (JSON, and SSE with the real event sequence).
//! - Google Gemini: `POST /v1beta/models/{model}:generateContent` and
//!   `:streamGenerateContent` (`?alt=sse` for SSE, a JSON array without); embeddings at
//!   `:batchEmbedContents` (`outputDimensionality`).
//! - AWS Bedrock Converse: `POST /model/{modelId}/converse` and `/converse-stream` (binary
//!   event-stream frames), and InvokeModel of Titan and Cohere embedding models
//!   (`/model/{modelId}/invoke`), with every request's SigV4 signature checked (see `bedrock`).
//! - Native batches: OpenAI's Files and Batch API (`/v1/files`, `/v1/batches`) and
//!   Anthropic's Message Batches (`/v1/messages/batches`), processed after
//!   [`MockSettings::batch_delay`] (see `batches`).
//! - Google Vertex AI: an OAuth2 token endpoint (`POST /token`) checking service-account JWT
//!   assertions, and `POST /v1/projects/{p}/locations/{r}/publishers/{google|anthropic}/models/...`
//!   for Gemini and Claude, requiring its tokens (see `vertex`).
//!
//! # Behaviour
//! Instance-wide defaults come from [`MockSettings`]. A request can script its own behaviour
//! through `+`-separated directives appended to the model name, e.g.
//! `gpt-4o-mini+status=429+retry_after=2`:
//!
//! | directive | effect |
//! |---|---|
//! | `status=N` | answer with HTTP status N and the provider's error body |
//! | `retry_after=S` | add `Retry-After: S` to an error answer |
//! | `latency=MS` | wait MS milliseconds before answering |
//! | `chunk_delay=MS` | wait MS milliseconds between stream chunks |
//! | `chunks=N` | split the reply into N stream chunks |
//! | `hang` | never answer (headers are never sent) |
//! | `stall` | stream the first chunk, then send nothing more |
//! | `truncate` | stream half the chunks, then close without the terminal event |
//! | `malformed` | send an event that is not valid JSON mid-stream (or a broken body) |
//! | `stream_error` | send an in-stream error event mid-stream |
//! | `tools` | answer with a call of the request's first tool |
//! | `no_usage` | report no usage |
//! | `cached=N` | report N of the input tokens as read from the provider's prompt cache |
//! | `echo_key` | answer 400 with a message quoting the request's API key and a bearer token |
//! | `reply=TEXT` | answer with TEXT instead of the usual reply (OpenAI routes; TEXT has no `+`) |
//!
//! # Embeddings
//! Every embeddings endpoint answers with [`text_embedding`] of each input text (the same
//! function the in-process `mock` provider uses): a deterministic, L2-normalised, signed
//! feature-hashing vector of the text's words and their character trigrams, 256 dimensions
//! unless the request asks for others. The same text always gets the same vector, and texts
//! sharing words have a higher cosine similarity than unrelated ones, so semantic-cache tests
//! can rely on it. Usage is one token per word.
//!
//! [`MockStats`] counts requests, completions and cancellations (a request whose response
//! was dropped before it completed, i.e. the client closed the connection), counts requests
//! per API key, and keeps the last request's body and headers for assertions.
//!
//! [`MockSettings::requests_per_minute`] (and [`MockUpstream::limit_key`] per key) limits
//! each key's requests per minute; past it the answer is the provider's 429 with its real
//! rate-limit headers, which every answer of a limited key carries (see `ratelimit`).
//!
//! By default any API key is accepted; [`MockUpstream::accept_keys`] restricts them (others
//! get the provider's 401), to test key rotation and refused keys.

mod anthropic;
mod batches;
mod bedrock;

pub use crate::providers::mock::{EMBEDDING_DIMENSIONS, text_embedding};
pub use bedrock::{MOCK_AWS_ACCESS_KEY_ID, MOCK_AWS_SECRET_ACCESS_KEY};
pub use vertex::{
    TEST_CLIENT_EMAIL as MOCK_VERTEX_CLIENT_EMAIL, TEST_PROJECT as MOCK_VERTEX_PROJECT,
};
mod gemini;
mod openai;
mod ratelimit;
mod vertex;

pub use ratelimit::go_duration;

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Instance-wide behaviour.
#[derive(Debug, Clone)]
pub struct MockSettings {
    /// Latency before answering (median).
    pub latency: Duration,
    /// When above 0, latencies are lognormal around `latency` (the median) with this sigma of
    /// the log (e.g. 1.586 puts the 99th percentile at 40x the median).
    pub latency_sigma: f64,
    /// Share of requests (0..=1) that take `tail_latency` instead.
    pub tail_ratio: f64,
    /// The slow-tail latency.
    pub tail_latency: Duration,
    /// Stream chunks per reply.
    pub chunks: usize,
    /// Delay between stream chunks.
    pub chunk_delay: Duration,
    /// Share of requests (0..=1) answered with `error_status`.
    pub error_rate: f64,
    /// Status used for random errors.
    pub error_status: u16,
    /// Requests per minute each API key may send (OpenAI, Azure, Anthropic and Gemini
    /// routes); past it the provider's 429 with its rate-limit headers (see `ratelimit`).
    /// `None`: unlimited. [`MockUpstream::limit_key`] sets a key's own limit.
    pub requests_per_minute: Option<u32>,
    /// How long a native batch (OpenAI Batch, Anthropic Message Batches) takes before its
    /// requests are processed and it ends (see `batches`).
    pub batch_delay: Duration,
}

impl Default for MockSettings {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            latency_sigma: 0.0,
            tail_ratio: 0.0,
            tail_latency: Duration::ZERO,
            chunks: 4,
            chunk_delay: Duration::ZERO,
            error_rate: 0.0,
            error_status: 500,
            requests_per_minute: None,
            batch_delay: Duration::ZERO,
        }
    }
}

/// What one request asked for (instance defaults overlaid with model directives).
#[derive(Debug, Clone, Default)]
pub struct Scenario {
    /// The model name without directives.
    pub model: String,
    /// Error status to answer with.
    pub status: Option<u16>,
    /// Retry-After seconds for errors.
    pub retry_after: Option<u64>,
    /// Latency before answering.
    pub latency: Duration,
    /// Delay between chunks.
    pub chunk_delay: Duration,
    /// Number of chunks.
    pub chunks: usize,
    /// Never answer.
    pub hang: bool,
    /// Stall after the first chunk.
    pub stall: bool,
    /// Close mid-stream.
    pub truncate: bool,
    /// Send a malformed event.
    pub malformed: bool,
    /// Send an in-stream error.
    pub stream_error: bool,
    /// Answer with a tool call.
    pub tools: bool,
    /// Omit usage.
    pub no_usage: bool,
    /// Input tokens to report as cache reads.
    pub cached: Option<u64>,
    /// Answer 400 with a message echoing the credential the request carried and a bearer
    /// token (as some providers do), see [`echoed_credentials`].
    pub echo_key: bool,
    /// Answer with this text instead of [`reply_for`] (OpenAI routes; `reply=TEXT`).
    pub reply: Option<String>,
}

impl Scenario {
    /// Parses `model+directive+...` over the instance settings.
    pub fn parse(model: &str, settings: &MockSettings) -> Scenario {
        let mut parts = model.split('+');
        let mut s = Scenario {
            model: parts.next().unwrap_or_default().to_owned(),
            latency: if settings.tail_ratio > 0.0 && fastrand::f64() < settings.tail_ratio {
                settings.tail_latency
            } else if settings.latency_sigma > 0.0 {
                lognormal(settings.latency, settings.latency_sigma)
            } else {
                settings.latency
            },
            chunk_delay: settings.chunk_delay,
            chunks: settings.chunks.max(1),
            status: (settings.error_rate > 0.0 && fastrand::f64() < settings.error_rate)
                .then_some(settings.error_status),
            ..Scenario::default()
        };
        for directive in parts {
            let (key, value) = directive.split_once('=').unwrap_or((directive, ""));
            let num = value.parse::<u64>().ok();
            match key {
                "status" => s.status = num.and_then(|n| u16::try_from(n).ok()),
                "retry_after" => s.retry_after = num,
                "latency" => s.latency = Duration::from_millis(num.unwrap_or(0)),
                "chunk_delay" => s.chunk_delay = Duration::from_millis(num.unwrap_or(0)),
                "chunks" => s.chunks = num.map_or(1, |n| usize::try_from(n).unwrap_or(1)).max(1),
                "hang" => s.hang = true,
                "stall" => s.stall = true,
                "truncate" => s.truncate = true,
                "malformed" => s.malformed = true,
                "stream_error" => s.stream_error = true,
                "tools" => s.tools = true,
                "no_usage" => s.no_usage = true,
                "cached" => s.cached = num,
                "echo_key" => s.echo_key = true,
                "reply" => s.reply = Some(value.to_owned()),
                _ => {}
            }
        }
        s
    }

    /// Waits for the scripted latency (forever with `hang`).
    pub async fn wait(&self) {
        if self.hang {
            std::future::pending::<()>().await;
        }
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }
}

/// A lognormal sample with the given median and sigma of the log (Box-Muller).
fn lognormal(median: Duration, sigma: f64) -> Duration {
    let u1 = fastrand::f64().max(f64::MIN_POSITIVE);
    let u2 = fastrand::f64();
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    Duration::from_secs_f64((median.as_secs_f64() * (sigma * z).exp()).min(3600.0))
}

/// Counters and the last request, shared with tests.
#[derive(Debug, Default)]
pub struct MockStats {
    requests: AtomicU64,
    completed: AtomicU64,
    cancelled: AtomicU64,
    connections: AtomicU64,
    changed: Notify,
    last_body: Mutex<Option<serde_json::Value>>,
    last_headers: Mutex<Option<http::HeaderMap>>,
    by_key: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl MockStats {
    /// Requests received.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Responses fully sent.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::SeqCst)
    }

    /// Responses dropped before completion (the client went away).
    pub fn cancelled(&self) -> u64 {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// TCP connections accepted (HTTP/2 callers multiplex many requests on one).
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// The last request body.
    pub fn last_body(&self) -> Option<serde_json::Value> {
        self.last_body.lock().ok().and_then(|b| b.clone())
    }

    /// The last request headers.
    pub fn last_headers(&self) -> Option<http::HeaderMap> {
        self.last_headers.lock().ok().and_then(|h| h.clone())
    }

    /// Requests that carried `key` (as `Authorization: Bearer`, `api-key`, `x-api-key`,
    /// `x-goog-api-key`, or the access key id of a SigV4 signature).
    pub fn requests_with_key(&self, key: &str) -> u64 {
        self.by_key
            .lock()
            .ok()
            .and_then(|m| m.get(key).copied())
            .unwrap_or(0)
    }

    /// Waits until at least `n` responses were cancelled.
    pub async fn wait_cancelled(&self, n: u64) {
        loop {
            let notified = self.changed.notified();
            if self.cancelled() >= n {
                return;
            }
            notified.await;
        }
    }

    fn record(&self, headers: &http::HeaderMap, body: Option<serde_json::Value>) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut b) = self.last_body.lock() {
            *b = body;
        }
        if let Ok(mut h) = self.last_headers.lock() {
            *h = Some(headers.clone());
        }
        if let (Some(key), Ok(mut by_key)) = (api_key(headers), self.by_key.lock()) {
            *by_key.entry(key.to_owned()).or_default() += 1;
        }
        self.changed.notify_waiters();
    }

    fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests(),
            "completed": self.completed(),
            "cancelled": self.cancelled(),
            "connections": self.connections(),
        })
    }
}

/// Marks a response complete, or cancelled when dropped before that.
pub struct ResponseGuard {
    stats: Arc<MockStats>,
    done: bool,
}

impl ResponseGuard {
    fn new(stats: Arc<MockStats>) -> Self {
        Self { stats, done: false }
    }

    /// The response was fully produced.
    pub fn complete(mut self) {
        self.done = true;
        self.stats.completed.fetch_add(1, Ordering::SeqCst);
        self.stats.changed.notify_waiters();
    }
}

impl Drop for ResponseGuard {
    fn drop(&mut self) {
        if !self.done {
            self.stats.cancelled.fetch_add(1, Ordering::SeqCst);
            self.stats.changed.notify_waiters();
        }
    }
}

/// The API key a request carries, in any provider's header.
fn api_key(headers: &http::HeaderMap) -> Option<&str> {
    let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    value("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| value("api-key"))
        .or_else(|| value("x-api-key"))
        .or_else(|| value("x-goog-api-key"))
        .or_else(|| value("authorization").and_then(bedrock::access_key_id))
}

/// The accepted API keys; `None` accepts any.
type AcceptedKeys = Arc<Mutex<Option<Vec<String>>>>;

/// Shared state of the mock server.
#[derive(Clone)]
pub(crate) struct MockState {
    pub settings: Arc<MockSettings>,
    pub stats: Arc<MockStats>,
    accepted: AcceptedKeys,
    aws: Arc<bedrock::AwsCredentialStore>,
    vertex: Arc<vertex::VertexAuth>,
    rates: Arc<ratelimit::RateLimits>,
    batches: Arc<batches::BatchStore>,
}

impl MockState {
    /// Whether the request's key is refused (only when keys are restricted).
    pub fn refuses(&self, headers: &http::HeaderMap) -> bool {
        let Ok(accepted) = self.accepted.lock() else {
            return false;
        };
        accepted
            .as_ref()
            .is_some_and(|keys| api_key(headers).is_none_or(|k| !keys.iter().any(|a| a == k)))
    }
}

/// A running mock upstream.
pub struct MockUpstream {
    addr: SocketAddr,
    stats: Arc<MockStats>,
    accepted: AcceptedKeys,
    aws: Arc<bedrock::AwsCredentialStore>,
    vertex: Arc<vertex::VertexAuth>,
    rates: Arc<ratelimit::RateLimits>,
    batches: Arc<batches::BatchStore>,
    stop: CancellationToken,
}

pub use batches::NativeCounts;

impl MockUpstream {
    /// Starts a mock on `127.0.0.1:0`.
    pub async fn start(settings: MockSettings) -> std::io::Result<MockUpstream> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        Self::start_on(listener, settings)
    }

    /// Starts a mock on a bound listener.
    pub fn start_on(
        listener: tokio::net::TcpListener,
        settings: MockSettings,
    ) -> std::io::Result<MockUpstream> {
        let addr = listener.local_addr()?;
        let stats = Arc::new(MockStats::default());
        let stop = CancellationToken::new();
        let accepted = AcceptedKeys::default();
        let aws = Arc::new(bedrock::AwsCredentialStore::default());
        let vertex = Arc::new(vertex::VertexAuth::default());
        let rates = Arc::new(ratelimit::RateLimits::new(settings.requests_per_minute));
        let native = Arc::new(batches::BatchStore::new(addr));
        let app = router(MockState {
            settings: Arc::new(settings),
            stats: stats.clone(),
            accepted: accepted.clone(),
            aws: aws.clone(),
            vertex: vertex.clone(),
            rates: rates.clone(),
            batches: native.clone(),
        });
        let signal = stop.clone().cancelled_owned();
        let counted = stats.clone();
        tokio::spawn(async move {
            // No Nagle: small SSE writes must leave at once.
            let listener = axum::serve::ListenerExt::tap_io(listener, move |tcp| {
                let _ = tcp.set_nodelay(true);
                counted.connections.fetch_add(1, Ordering::SeqCst);
            });
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(signal)
                .await;
        });
        Ok(MockUpstream {
            addr,
            stats,
            accepted,
            aws,
            vertex,
            rates,
            batches: native,
            stop,
        })
    }

    /// What the native batch endpoints were asked (batches created, cancels).
    pub fn native_batches(&self) -> NativeCounts {
        self.batches.counts()
    }

    /// Ends the wait of every native batch, now and later: they are processed at once.
    pub fn finish_native_batches(&self) {
        self.batches.finish_all();
    }

    /// The listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The OpenAI-style base URL, e.g. `http://127.0.0.1:1234/v1`.
    pub fn openai_base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The Anthropic base URL (the adapter appends `/v1/messages`), e.g.
    /// `http://127.0.0.1:1234`.
    pub fn anthropic_base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The Gemini base URL (the adapter appends `/v1beta/models/...`), e.g.
    /// `http://127.0.0.1:1234`.
    pub fn gemini_base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The Azure OpenAI endpoint (the adapter appends `/openai/deployments/...`), e.g.
    /// `http://127.0.0.1:1234`.
    pub fn azure_endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The Bedrock runtime endpoint (the adapter appends `/model/...`), e.g.
    /// `http://127.0.0.1:1234`.
    pub fn bedrock_endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Lets the Bedrock endpoint accept SigV4 signatures made with this credential set
    /// (besides [`MOCK_AWS_ACCESS_KEY_ID`], known from the start).
    pub fn add_aws_credentials(
        &self,
        access_key_id: &str,
        secret: &str,
        session_token: Option<&str>,
    ) {
        self.aws.add(access_key_id, secret, session_token);
    }

    /// The Vertex AI base URL (the adapter appends `/v1/projects/...`), e.g.
    /// `http://127.0.0.1:1234`.
    pub fn vertex_base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A service-account key file (JSON) for the test account the Vertex endpoints trust,
    /// with this mock's token endpoint as `token_uri`. Test-only credentials.
    pub fn vertex_service_account_json(&self) -> String {
        vertex::service_account_json(&format!("http://{}/token", self.addr))
    }

    /// Token requests the Vertex token endpoint received (accepted or refused).
    pub fn vertex_token_requests(&self) -> u64 {
        self.vertex.token_requests()
    }

    /// Sets the lifetime (`expires_in`) of Vertex tokens issued from now on (default 1 h).
    pub fn set_vertex_token_lifetime(&self, lifetime: Duration) {
        self.vertex.set_lifetime(lifetime);
    }

    /// Revokes every Vertex token issued so far: requests carrying one get a 401.
    pub fn revoke_vertex_tokens(&self) {
        self.vertex.revoke_all();
    }

    /// Counters and the last request.
    pub fn stats(&self) -> &Arc<MockStats> {
        &self.stats
    }

    /// Gives `key` its own requests-per-minute limit (`None`: back to
    /// [`MockSettings::requests_per_minute`]); its bucket starts full.
    pub fn limit_key(&self, key: &str, requests_per_minute: Option<u32>) {
        self.rates.set(key, requests_per_minute);
    }

    /// Requests answered 429 because their key was past its requests-per-minute limit.
    pub fn rate_limited(&self) -> u64 {
        self.rates.limited()
    }

    /// Accepts only these API keys from now on (others get the provider's 401); `None`
    /// accepts any (the default).
    pub fn accept_keys(&self, keys: Option<&[&str]>) {
        if let Ok(mut accepted) = self.accepted.lock() {
            *accepted = keys.map(|k| k.iter().map(|s| (*s).to_owned()).collect());
        }
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The mock's HTTP routes.
pub(crate) fn router(state: MockState) -> Router {
    Router::new()
        .route("/mock/stats", get(stats_handler))
        .merge(openai::routes())
        .merge(anthropic::routes())
        .merge(batches::routes())
        .merge(bedrock::routes())
        .merge(vertex::routes())
        .merge(gemini::routes())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            ratelimit::enforce,
        ))
        .with_state(state)
}

async fn stats_handler(
    axum::extract::State(state): axum::extract::State<MockState>,
) -> axum::Json<serde_json::Value> {
    axum::Json(state.stats.snapshot())
}

/// Splits `text` into `n` roughly equal chunks on char boundaries.
pub fn split_chunks(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let n = n.clamp(1, chars.len().max(1));
    let size = chars.len().div_ceil(n);
    chars
        .chunks(size.max(1))
        .map(|c| c.iter().collect())
        .collect()
}

/// The mock's reply text for the last user message.
pub fn reply_for(last_user_text: &str) -> String {
    format!("Mock reply to: {last_user_text}")
}

/// A rough token count (words), used for mock usage.
pub fn count_tokens(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// The tool-call arguments every mock answers with.
pub const TOOL_ARGUMENTS: &str = r#"{"location":"Paris","unit":"celsius"}"#;

/// Applies the scripted stream faults to a stream's events: `truncate` keeps the first half
/// and closes; `malformed` replaces the second half with `malformed` followed by `terminal`
/// (so only the garbled event is wrong); `stream_error` replaces it with `error`.
pub fn inject_faults(
    events: &mut Vec<String>,
    scenario: &Scenario,
    malformed: &str,
    terminal: Option<&str>,
    error: &str,
) {
    inject_faults_in(
        events,
        scenario,
        malformed.to_owned(),
        terminal.map(str::to_owned),
        error.to_owned(),
    );
}

/// [`inject_faults`] for events of any encoding (e.g. binary event-stream frames).
pub fn inject_faults_in<T>(
    events: &mut Vec<T>,
    scenario: &Scenario,
    malformed: T,
    terminal: Option<T>,
    error: T,
) {
    let half = (events.len() / 2).max(2);
    if scenario.truncate {
        events.truncate(half);
    } else if scenario.malformed {
        events.truncate(half);
        events.push(malformed);
        events.extend(terminal);
    } else if scenario.stream_error {
        events.truncate(half);
        events.push(error);
    }
}

/// A `text/event-stream` response sending `events` with the scenario's pacing (`chunk_delay`)
/// and stall (after the event at `first_content`, the first that carries reply content);
/// `guard` completes when the last event was sent.
pub fn sse_response(
    events: Vec<String>,
    first_content: usize,
    scenario: &Scenario,
    guard: ResponseGuard,
) -> Response {
    paced_response(
        events.into_iter().map(Bytes::from).collect(),
        "text/event-stream",
        first_content,
        scenario,
        guard,
    )
}

/// [`sse_response`] for events of any encoding, sent as `content_type`.
pub fn paced_response(
    events: Vec<Bytes>,
    content_type: &'static str,
    first_content: usize,
    scenario: &Scenario,
    guard: ResponseGuard,
) -> Response {
    let stall_after = scenario.stall.then_some(first_content + 1);
    let delay = scenario.chunk_delay;
    let state = (events.into_iter().enumerate(), Some(guard));
    let body = futures_util::stream::unfold(state, move |(mut events, mut guard)| async move {
        match events.next() {
            Some((i, event)) => {
                if stall_after.is_some_and(|n| i >= n) {
                    std::future::pending::<()>().await;
                }
                if i > 0 && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Some((Ok::<_, std::convert::Infallible>(event), (events, guard)))
            }
            None => {
                if let Some(g) = guard.take() {
                    g.complete();
                }
                None
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The message of an `echo_key` answer: it quotes the key the request carried (from
/// `authorization`, `x-api-key`, `x-goog-api-key` or `api-key`) and a bearer token.
pub fn echoed_credentials(headers: &http::HeaderMap) -> String {
    let key = ["authorization", "x-api-key", "x-goog-api-key", "api-key"]
        .iter()
        .find_map(|h| headers.get(*h))
        .and_then(|v| v.to_str().ok())
        .map_or("none", |v| v.trim_start_matches("Bearer "));
    format!(
        "Invalid value for 'temperature' (mock). The request carried the key {key}; \
         for the console use Authorization: Bearer ya29.mock-oauth-token-0123456789"
    )
}

/// A JSON error answer with `status`, and `Retry-After` when given.
pub fn json_error(status: u16, body: serde_json::Value, retry_after: Option<u64>) -> Response {
    let mut response = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(body),
    )
        .into_response();
    if let Some(secs) = retry_after
        && let Ok(v) = secs.to_string().parse()
    {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}

/// The value of query parameter `name` (not percent-decoded; the mock's parameters need none).
pub fn query_param<'a>(uri: &'a http::Uri, name: &str) -> Option<&'a str> {
    uri.query()?
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A 200 answer whose JSON body is cut off (the `malformed` directive on unary calls).
pub fn broken_json(prefix: &'static str) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], prefix).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_parse() {
        let s = Scenario::parse(
            "gpt-4o+status=429+retry_after=2+latency=5+chunks=3+truncate+cached=4",
            &MockSettings::default(),
        );
        assert_eq!(s.cached, Some(4));
        assert_eq!(s.model, "gpt-4o");
        assert_eq!(s.status, Some(429));
        assert_eq!(s.retry_after, Some(2));
        assert_eq!(s.latency, Duration::from_millis(5));
        assert_eq!(s.chunks, 3);
        assert!(s.truncate && !s.hang);
    }

    #[test]
    fn chunks_cover_the_text() {
        let chunks = split_chunks("hello world", 4);
        assert_eq!(chunks.len(), 4);
        assert_eq!(chunks.concat(), "hello world");
        assert!(split_chunks("", 3).is_empty());
    }

    #[test]
    fn query_params() {
        let uri: http::Uri = "/x?alt=sse&api-version=2024-10-21&flag".parse().unwrap();
        assert_eq!(query_param(&uri, "alt"), Some("sse"));
        assert_eq!(query_param(&uri, "api-version"), Some("2024-10-21"));
        assert_eq!(query_param(&uri, "flag"), Some(""));
        assert_eq!(query_param(&uri, "nope"), None);
    }
}
