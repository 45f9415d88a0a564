//! Model providers behind one trait.
//!
//! Each provider lives in its own file: an id constant, a struct with a constructor, private
//! wire structs, pure request-building and response/stream-parsing functions (unit-tested on
//! real sample payloads without HTTP), and the mapping from HTTP status and error body to
//! [`ProviderError`]. The [`ProviderRegistry`] holds them as `Arc<dyn Provider>`, so tests can
//! register scripted fakes.

pub mod anthropic;
pub mod bedrock;
pub mod compat;
pub mod error;
pub mod eventstream;
pub mod gemini;
pub mod google_auth;
pub mod keys;
pub mod mock;
pub mod openai;
pub mod sigv4;
pub mod sse;
mod upstream;
pub mod vertex;

use std::{collections::BTreeMap, pin::Pin, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};

pub use self::error::{ErrorClass, ProviderError};
pub use self::keys::KeyRing;
pub use self::upstream::{RawUpstream, UpstreamSettings};
use crate::types::{ChatRequest, ChatResponse, StreamEvent};

/// A stream of events from one provider. It ends after a `StreamEvent::Finish`, or with an
/// error; ending without either is a bug the executor also guards against.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, ProviderError>> + Send>>;

/// A model provider.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// The configured name, e.g. `openai` or `openai-eu` (the part before `/` in a model id).
    fn name(&self) -> &str;

    /// The provider kind, e.g. `openai`, `anthropic`, `mock` (for prices and docs).
    fn kind(&self) -> &'static str;

    /// Completes a conversation.
    async fn chat(&self, model: &str, request: &ChatRequest)
    -> Result<ChatResponse, ProviderError>;

    /// Streams a completion. Resolves once the provider accepted the request (HTTP 2xx).
    async fn chat_stream(
        &self,
        model: &str,
        request: &ChatRequest,
    ) -> Result<EventStream, ProviderError>;

    /// The provider's API keys, for a reload to swap; `None` when it uses none.
    fn keys(&self) -> Option<&Arc<KeyRing>> {
        None
    }
}

/// The configured providers, by name.
#[derive(Clone, Default)]
pub struct ProviderRegistry {
    providers: BTreeMap<String, Arc<dyn Provider>>,
}

impl ProviderRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a provider under its name.
    pub fn insert(&mut self, provider: Arc<dyn Provider>) {
        self.providers.insert(provider.name().to_owned(), provider);
    }

    /// The provider called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.providers.get(name)
    }

    /// All providers, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Provider>> {
        self.providers.values()
    }

    /// Whether no provider is configured.
    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }
}

impl std::fmt::Debug for ProviderRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.providers.keys()).finish()
    }
}

/// Settings of the shared HTTP client.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpSettings {
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// How long idle pooled connections are kept.
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per host.
    pub pool_max_idle_per_host: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 256,
        }
    }
}

/// Builds the one shared HTTP client: pooled, TCP no-delay, rustls with the ring provider
/// and the platform's trust store. No overall timeout: the executor bounds every attempt
/// with the call's deadline.
pub fn http_client(settings: &HttpSettings) -> Result<reqwest::Client, reqwest::Error> {
    // Installing the process-wide crypto provider fails only when one is already installed,
    // which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .connect_timeout(settings.connect_timeout)
        .pool_idle_timeout(settings.pool_idle_timeout)
        .pool_max_idle_per_host(settings.pool_max_idle_per_host)
        .user_agent(concat!("llm-gateway/", env!("CARGO_PKG_VERSION")))
        // Provider APIs do not redirect; following one could send a key elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

static BODY_LOGGING: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();

/// Turns on logging of upstream request and error bodies (redacted, truncated to `max`
/// bytes). Off by default: bodies carry prompts. Set once per process.
pub fn set_body_logging(max: Option<usize>) {
    let _ = BODY_LOGGING.set(max);
}

fn body_logging() -> Option<usize> {
    BODY_LOGGING.get().copied().flatten()
}

/// The most of an error body the gateway reads.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Sends a request with a JSON body. On a 2xx answer returns the response; otherwise reads
/// (a bounded part of) the error body and lets `map_error` classify it.
pub async fn send_json(
    request: reqwest::RequestBuilder,
    body: Bytes,
    map_error: fn(u16, &http::HeaderMap, &[u8]) -> ProviderError,
) -> Result<reqwest::Response, ProviderError> {
    let mut request = request.header(http::header::CONTENT_TYPE, "application/json");
    if let Some(ctx) = crate::telemetry::trace_headers() {
        request = request.header("traceparent", ctx.traceparent);
        if let Some(state) = ctx.tracestate {
            request = request.header("tracestate", state);
        }
    }
    if let Some(max) = body_logging() {
        tracing::info!(
            target: "llm_gateway::bodies",
            body = %crate::telemetry::truncate(&crate::telemetry::redact(&String::from_utf8_lossy(&body)), max),
            "upstream request body"
        );
    }
    let response = request
        .body(body)
        .send()
        .await
        .map_err(|e| ProviderError::from_transport(&e))?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let headers = response.headers().clone();
    let body = read_bounded(response).await;
    if let Some(max) = body_logging() {
        tracing::info!(
            target: "llm_gateway::bodies",
            http_status = status.as_u16(),
            body = %crate::telemetry::truncate(&crate::telemetry::redact(&String::from_utf8_lossy(&body)), max),
            "upstream error body"
        );
    }
    let err = map_error(status.as_u16(), &headers, &body).with_status(status.as_u16());
    tracing::debug!(
        http_status = status.as_u16(),
        error_class = err.class.label(),
        "provider returned an error"
    );
    Err(err)
}

/// Sends a request with the provider's keys in turn ([`send_json`] for each): a key that is
/// refused (401/403) or rate limited (429) rests, and the request goes out again with the next
/// key of the current set, each key at most once. `build` makes the request for a key (`None`
/// when the provider has none). When every key rests, fails with the class of the rest
/// (RATE_LIMITED or AUTHENTICATION) without calling the provider.
pub async fn send_with_keys(
    keys: &KeyRing,
    body: Bytes,
    build: impl Fn(Option<&str>) -> Result<reqwest::RequestBuilder, ProviderError>,
    map_error: fn(u16, &http::HeaderMap, &[u8]) -> ProviderError,
) -> Result<reqwest::Response, ProviderError> {
    let mut tried = Vec::new();
    let mut last_error = None;
    loop {
        let (key, index) = match keys.pick(&tried) {
            keys::Pick::NoKey => return send_json(build(None)?, body, map_error).await,
            keys::Pick::Key(key, index) => (key, index),
            keys::Pick::AllResting(err) => return Err(last_error.unwrap_or(err)),
            keys::Pick::Exhausted => {
                return Err(last_error.unwrap_or_else(|| {
                    ProviderError::new(ErrorClass::Authentication, "no usable api key")
                }));
            }
        };
        match send_json(build(Some(key.secret()))?, body.clone(), map_error).await {
            Err(err) if KeyRing::is_key_failure(&err) => {
                keys.rest(&key, index, &err);
                tried.push(key);
                last_error = Some(err);
            }
            result => return result,
        }
    }
}

/// A header value carrying a key, marked sensitive (never printed by `http`'s `Debug`).
pub fn key_header(key: &str) -> Result<http::HeaderValue, ProviderError> {
    let mut value = http::HeaderValue::from_str(key).map_err(|_| {
        ProviderError::new(
            ErrorClass::Authentication,
            "the configured api key is not a valid header value",
        )
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// Reads a full (2xx) body, classifying transport failures.
pub async fn read_body(response: reqwest::Response) -> Result<Bytes, ProviderError> {
    response.bytes().await.map_err(|e| {
        let err = ProviderError::from_transport(&e);
        if err.class == ErrorClass::Timeout {
            err
        } else {
            ProviderError::new(
                ErrorClass::InvalidResponse,
                "the provider's response was cut off",
            )
        }
    })
}

async fn read_bounded(response: reqwest::Response) -> Vec<u8> {
    let mut out = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(Ok(chunk)) = body.next().await {
        let room = MAX_ERROR_BODY.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    out
}

/// The `Retry-After` (seconds) or `retry-after-ms` header, whichever is present.
pub fn retry_after_header(headers: &http::HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
    {
        return Some(Duration::from_secs_f64(ms.min(86_400_000.0) / 1000.0));
    }
    headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(error::parse_retry_after_secs)
}

/// Decodes a JSON body, mapping failures to [`ErrorClass::InvalidResponse`].
pub fn decode_json<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, ProviderError> {
    serde_json::from_slice(body).map_err(|e| {
        ProviderError::new(
            ErrorClass::InvalidResponse,
            format!(
                "the provider's response is not valid: {}",
                json_error_kind(&e)
            ),
        )
    })
}

/// A description of a JSON error that never quotes the input.
pub fn json_error_kind(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Io => {
            format!("malformed json at line {} column {}", e.line(), e.column())
        }
        Category::Eof => "json ended early".to_owned(),
        // Data errors can quote values from the body; say only where.
        Category::Data => format!(
            "unexpected value at line {} column {}",
            e.line(),
            e.column()
        ),
    }
}
