//! Model providers behind one trait, built from one kit.
//!
//! A provider API is its wire format ([`wire::WireFormat`]: endpoint, request building,
//! response parsing, a [`wire::StreamDecoder`], and what an error payload says), one file per
//! API with private wire structs and pure functions unit-tested on real sample payloads. One
//! generic adapter, [`http::HttpProvider`], implements [`Provider`] for any wire format with
//! any [`auth::Auth`] (API-key headers here; signing or tokens plug in the same way) and the
//! provider's [`KeyRing`]. Every failure is classified by the one policy in [`error`]. The
//! [`ProviderRegistry`] holds providers as `Arc<dyn Provider>`, so tests can register scripted
//! fakes.

pub mod anthropic;
pub mod auth;
pub mod bedrock;
pub mod compat;
#[cfg(test)]
pub(crate) mod conformance;
pub mod embed;
pub mod error;
pub mod eventstream;
pub mod gemini;
pub mod google_auth;
pub mod http;
pub mod keys;
pub mod kinds;
pub mod lanes;
pub mod mock;
pub mod openai;
pub mod ratelimit;
pub mod sigv4;
pub mod sse;
mod upstream;
pub mod vertex;
pub mod wire;

use std::{collections::BTreeMap, pin::Pin, sync::Arc, time::Duration};

use async_trait::async_trait;
use futures_util::Stream;

pub use self::error::{ErrorClass, ProviderError, UpstreamError};
pub use self::http::{HttpProvider, set_body_logging};
pub use self::keys::KeyRing;
pub use self::kinds::{ProviderConfig, RawProvider};
pub use self::lanes::Upstream;
pub use self::upstream::{RawUpstream, UpstreamSettings};
pub use self::wire::{StreamDecoder, WireFormat};
use crate::types::{ChatRequest, ChatResponse, EmbedRequest, EmbedResponse, StreamEvent};

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

    /// Whether the provider serves [`Provider::embed`]; the executor skips targets that do
    /// not. The default: no embeddings.
    fn supports_embeddings(&self) -> bool {
        false
    }

    /// Embeds `request.inputs` with `model`, one vector per input in input order. The
    /// default answers that this provider kind serves no embeddings.
    async fn embed(
        &self,
        _model: &str,
        _request: &EmbedRequest,
    ) -> Result<EmbedResponse, ProviderError> {
        Err(embed::unsupported(self.kind()))
    }

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
    /// Calls in flight one upstream connection carries over HTTP/2 before calls move to
    /// another connection (see [`lanes`]).
    pub streams_per_connection: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 256,
            streams_per_connection: 100,
        }
    }
}

/// Builds the one shared HTTP client: pooled, TCP no-delay, rustls with the ring provider
/// and the platform's trust store. No overall timeout: the executor bounds every attempt
/// with the call's deadline. Over https it offers HTTP/2 and HTTP/1.1 by ALPN, so providers
/// that speak HTTP/2 multiplex every call of a host on a few connections.
pub fn http_client(settings: &HttpSettings) -> Result<reqwest::Client, reqwest::Error> {
    client_builder(settings).build()
}

/// The client for providers with `http2_prior_knowledge`: HTTP/2 without negotiation (h2c),
/// so concurrent calls share connections instead of holding one each.
pub fn h2c_client(settings: &HttpSettings) -> Result<reqwest::Client, reqwest::Error> {
    client_builder(settings).http2_prior_knowledge().build()
}

fn client_builder(settings: &HttpSettings) -> reqwest::ClientBuilder {
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
}
