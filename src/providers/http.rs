//! The transport half of the provider kit: one generic adapter, [`HttpProvider`], that
//! implements [`Provider`] for any [`WireFormat`] with any [`Auth`]. It owns what every HTTP
//! provider shares: the pooled client, the key ring (rotation and rests), trace headers,
//! redacted body logging, bounded error bodies, and turning a 2xx stream into events. It
//! also feeds outbound pacing ([`crate::pacing`]): the key whose capacity the attempt's
//! lease took goes first, and every answer's rate-limit headers, 429s and latency are
//! reported to the provider's pacer.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};

use super::{
    ErrorClass, EventStream, KeyRing, Provider, ProviderError,
    auth::Auth,
    embed::{self, EmbedWire},
    keys::{Pick, ProviderKey},
    wire::{DecodedStream, WireFormat},
};
use crate::types::{ChatRequest, ChatResponse, EmbedRequest, EmbedResponse};

/// A 2xx answer and the lane place its body holds.
struct Sent {
    response: reqwest::Response,
    /// Held while the body is read (dropped with the answer).
    lane: super::lanes::LaneGuard,
}

/// The most of an error body the gateway reads.
const MAX_ERROR_BODY: usize = 64 * 1024;

static BODY_LOGGING: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();

/// Turns on logging of upstream request and error bodies (redacted, truncated to `max`
/// bytes). Off by default: bodies carry prompts. Set once per process.
pub fn set_body_logging(max: Option<usize>) {
    let _ = BODY_LOGGING.set(max);
}

fn log_body(what: &'static str, status: Option<u16>, body: &[u8]) {
    if let Some(max) = BODY_LOGGING.get().copied().flatten() {
        tracing::info!(
            target: "llm_gateway::bodies",
            http_status = status,
            body = %crate::telemetry::truncate(&crate::telemetry::redact(&String::from_utf8_lossy(body)), max),
            "upstream {what} body"
        );
    }
}

/// A provider speaking wire format `W` over HTTP.
pub struct HttpProvider<W> {
    name: String,
    kind: &'static str,
    wire: W,
    auth: Arc<dyn Auth>,
    keys: Arc<KeyRing>,
    client: super::Upstream,
}

impl<W: WireFormat> HttpProvider<W> {
    /// A provider called `name` of registry kind `kind`, speaking `wire`, authorizing with
    /// `auth` and the keys of `keys`, over the shared `client`.
    pub fn new(
        name: impl Into<String>,
        kind: &'static str,
        wire: W,
        auth: Arc<dyn Auth>,
        keys: Arc<KeyRing>,
        client: super::Upstream,
    ) -> Self {
        Self {
            name: name.into(),
            kind,
            wire,
            auth,
            keys,
            client,
        }
    }

    /// The wire format.
    pub fn wire(&self) -> &W {
        &self.wire
    }

    /// Sends `body` to `model`'s endpoint with the provider's keys in turn: a key that is
    /// refused (401/403) or rate limited (429), by the provider or by the auth, rests, and the
    /// request goes out again with the next key of the current set, each key at most once.
    /// When every key rests, fails with the class of the rest (RATE_LIMITED or
    /// AUTHENTICATION) without calling the provider. The answer holds its place in an
    /// upstream lane until it is dropped.
    async fn send(&self, model: &str, stream: bool, body: Vec<u8>) -> Result<Sent, ProviderError> {
        let url = self.wire.endpoint(model, stream)?;
        self.send_to(model, &url, body).await
    }

    /// [`HttpProvider::send`] to `url`.
    async fn send_to(
        &self,
        model: &str,
        url: &reqwest::Url,
        body: Vec<u8>,
    ) -> Result<Sent, ProviderError> {
        let lane = self.client.lane();
        let client = lane.client();
        let response = self.send_with(client, model, url, body).await?;
        Ok(Sent { response, lane })
    }

    /// [`HttpProvider::send_to`] over `client`.
    async fn send_with(
        &self,
        client: &reqwest::Client,
        model: &str,
        url: &reqwest::Url,
        body: Vec<u8>,
    ) -> Result<reqwest::Response, ProviderError> {
        let body = Bytes::from(body);
        log_body("request", None, &body);
        let mut tried = Vec::new();
        let mut last_error = None;
        let preferred = crate::pacing::current().and_then(|lease| lease.key);
        loop {
            let (key, index) = match self.keys.pick_preferred(&tried, preferred) {
                Pick::NoKey => return self.attempt(client, model, url, None, &body).await,
                Pick::Key(key, index) => (key, index),
                Pick::AllResting(err) => return Err(last_error.unwrap_or(err)),
                Pick::Exhausted => {
                    return Err(last_error.unwrap_or_else(|| {
                        ProviderError::new(ErrorClass::Authentication, "no usable api key")
                    }));
                }
            };
            match self.attempt(client, model, url, Some(&key), &body).await {
                Err(err) if KeyRing::is_key_failure(&err) => {
                    self.keys.rest(&key, index, &err);
                    tried.push(key);
                    last_error = Some(err);
                }
                result => return result,
            }
        }
    }

    /// One request with one key. On a 2xx answer returns the response; otherwise reads (a
    /// bounded part of) the error body and classifies it.
    async fn attempt(
        &self,
        client: &reqwest::Client,
        model: &str,
        url: &reqwest::Url,
        key: Option<&ProviderKey>,
        body: &Bytes,
    ) -> Result<reqwest::Response, ProviderError> {
        let mut request = reqwest::Request::new(http::Method::POST, url.clone());
        let headers = request.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        if let Some(ctx) = crate::telemetry::trace_headers() {
            if let Ok(v) = http::HeaderValue::from_str(&ctx.traceparent) {
                headers.insert("traceparent", v);
            }
            if let Some(v) = ctx
                .tracestate
                .and_then(|s| http::HeaderValue::from_str(&s).ok())
            {
                headers.insert("tracestate", v);
            }
        }
        self.wire.add_headers(headers);
        *request.body_mut() = Some(body.clone().into());
        let unsigned = request.try_clone();
        self.auth.authorize(key, &mut request, body).await?;
        let retry = key.zip(request.try_clone()).zip(unsigned);
        let sent = tokio::time::Instant::now();
        let mut response = client
            .execute(request)
            .await
            .map_err(|e| ProviderError::from_transport(&e))?;
        // Credentials refused before their time (a revoked token): once more, fresh ones.
        if response.status() == http::StatusCode::UNAUTHORIZED
            && let Some(((key, sent), mut again)) = retry
            && self.auth.refused(key, &sent).await
        {
            self.auth.authorize(Some(key), &mut again, body).await?;
            response = client
                .execute(again)
                .await
                .map_err(|e| ProviderError::from_transport(&e))?;
        }
        let status = response.status();
        self.learn(
            model,
            key,
            status.as_u16(),
            response.headers(),
            sent.elapsed(),
        );
        if status.is_success() {
            return Ok(response);
        }
        let headers = response.headers().clone();
        let mut body = read_bounded(response).await;
        if let Some(key) = key {
            // A provider may quote the key it got; it never travels further.
            scrub(&mut body, key.secret().as_bytes());
        }
        log_body("error", Some(status.as_u16()), &body);
        let err = self.wire.classify(status.as_u16(), &headers, &body);
        if err.class == ErrorClass::RateLimited
            && let Some(pacer) = self.keys.pacer()
        {
            let mut observation = super::ratelimit::from_google_quota(&body);
            observation.retry_after = Some(
                err.retry_after
                    .unwrap_or(super::keys::DEFAULT_RATE_LIMIT_REST),
            );
            let fingerprint = key.map_or(0, ProviderKey::fingerprint);
            pacer.observe(
                fingerprint,
                model,
                &observation,
                tokio::time::Instant::now(),
            );
        }
        tracing::debug!(
            http_status = status.as_u16(),
            error_class = err.class.label(),
            "provider returned an error"
        );
        Err(err)
    }

    /// Reports an answer's rate-limit headers and its latency (or overload) to the pacer.
    fn learn(
        &self,
        model: &str,
        key: Option<&ProviderKey>,
        status: u16,
        headers: &http::HeaderMap,
        latency: std::time::Duration,
    ) {
        let Some(pacer) = self.keys.pacer() else {
            return;
        };
        let now = tokio::time::Instant::now();
        let observation = super::ratelimit::from_headers(headers, std::time::SystemTime::now());
        pacer.observe(
            key.map_or(0, ProviderKey::fingerprint),
            model,
            &observation,
            now,
        );
        match status {
            200..=299 => pacer.signal(model, crate::pacing::Signal::Answered(latency), now),
            429 | 503 | 529 => pacer.signal(model, crate::pacing::Signal::Overloaded, now),
            _ => {}
        }
    }
}

impl<W: WireFormat> HttpProvider<W> {
    /// One embedding request of `inputs` (a piece of `request.inputs`).
    async fn embed_part(
        &self,
        wire: &dyn EmbedWire,
        url: &reqwest::Url,
        model: &str,
        request: &EmbedRequest,
        inputs: &[String],
    ) -> Result<EmbedResponse, ProviderError> {
        let body = wire.build_embed(model, request, inputs)?;
        let sent = self.send_to(model, url, body).await?;
        let bytes = read_body(sent.response).await?;
        wire.parse_embed(&bytes, model, inputs.len())
    }
}

#[async_trait]
impl<W: WireFormat> Provider for HttpProvider<W> {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        self.kind
    }

    fn keys(&self) -> Option<&Arc<KeyRing>> {
        Some(&self.keys)
    }

    async fn chat(
        &self,
        model: &str,
        request: &ChatRequest,
    ) -> Result<ChatResponse, ProviderError> {
        let body = self.wire.build_request(model, request, false)?;
        let sent = self.send(model, false, body).await?;
        let bytes = read_body(sent.response).await?;
        self.wire.parse_response(&bytes, model)
    }

    async fn chat_stream(
        &self,
        model: &str,
        request: &ChatRequest,
    ) -> Result<EventStream, ProviderError> {
        let body = self.wire.build_request(model, request, true)?;
        let Sent { response, lane } = self.send(model, true, body).await?;
        let stream = DecodedStream::new(response, self.wire.stream_decoder(model));
        // The stream holds the attempt's pacing lease (its concurrency slot) and its place
        // in the upstream lane while it runs.
        let lease = crate::pacing::current();
        Ok(Box::pin(stream.map(move |event| {
            let _held = (&lease, &lane);
            event
        })))
    }

    fn supports_embeddings(&self) -> bool {
        self.wire.embeddings().is_some()
    }

    /// One request per [`EmbedWire::max_batch`] inputs, a few at a time, joined in order.
    async fn embed(
        &self,
        model: &str,
        request: &EmbedRequest,
    ) -> Result<EmbedResponse, ProviderError> {
        let Some(wire) = self.wire.embeddings() else {
            return Err(embed::unsupported(self.kind));
        };
        let url = wire.embed_endpoint(model)?;
        let mut calls = Vec::new();
        for inputs in request.inputs.chunks(wire.max_batch(model).max(1)) {
            calls.push(self.embed_part(wire, &url, model, request, inputs));
        }
        let parts: Vec<EmbedResponse> = futures_util::stream::iter(calls)
            .buffered(embed::MAX_PARALLEL_REQUESTS)
            .try_collect()
            .await?;
        Ok(embed::join(parts, model))
    }
}

/// Reads a full (2xx) body, classifying transport failures.
async fn read_body(response: reqwest::Response) -> Result<Bytes, ProviderError> {
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

/// Replaces every occurrence of `secret` (8 bytes or longer: shorter ones are test keys and
/// would mangle the body) in `body` with `[REDACTED]`.
fn scrub(body: &mut Vec<u8>, secret: &[u8]) {
    if secret.len() < 8 || body.len() < secret.len() {
        return;
    }
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    let mut found = false;
    while i < body.len() {
        if body[i..].starts_with(secret) {
            out.extend_from_slice(b"[REDACTED]");
            i += secret.len();
            found = true;
        } else {
            out.push(body[i]);
            i += 1;
        }
    }
    if found {
        *body = out;
    }
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

#[cfg(test)]
mod tests {
    use super::scrub;

    #[test]
    fn scrub_replaces_every_copy_of_the_key() {
        let mut body = b"key gemini-test-secret twice gemini-test-secret.".to_vec();
        scrub(&mut body, b"gemini-test-secret");
        assert_eq!(body, b"key [REDACTED] twice [REDACTED].");
        let mut short = b"a k b".to_vec();
        scrub(&mut short, b"k");
        assert_eq!(short, b"a k b");
    }
}
