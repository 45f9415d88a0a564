//! Google Vertex AI: Gemini models (`publishers/google`, the Gemini wire format) and Claude
//! models (`publishers/anthropic`, the Anthropic Messages format), authenticated with OAuth2
//! access tokens from a service-account key ([`google_auth`](super::google_auth)).
//!
//! Endpoints, with `{base}` = `https://{region}-aiplatform.googleapis.com` (the region
//! `global` uses `https://aiplatform.googleapis.com`):
//! - Gemini: `{base}/v1/projects/{project}/locations/{region}/publishers/google/models/{model}:generateContent`
//!   and `:streamGenerateContent?alt=sse`;
//! - Claude: `.../publishers/anthropic/models/{model}:rawPredict` and `:streamRawPredict`; the
//!   body is an Anthropic Messages request without `model` and with
//!   `"anthropic_version": "vertex-2023-10-16"`.
//!
//! A model whose name starts with `claude` is a Claude model; every other model is Gemini's.
//! The project is the configured one, else the service-account key's `project_id`. Each
//! configured key is a service-account key file's JSON; its tokens are cached per key and
//! refreshed before they expire. A 401 from the API drops the token and the request goes out
//! once more with a fresh one (a token revoked early).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use async_trait::async_trait;

use super::{
    EventStream, KeyRing, Provider, ProviderError, anthropic, gemini,
    google_auth::{ServiceAccountKey, TokenSource},
    keys::Pick,
    read_body, send_json,
    sse::{EventDecoder, SseEvent, SseStream},
};
use crate::{
    providers::ErrorClass,
    types::{ChatRequest, ChatResponse, StreamEvent},
};

/// The provider kind.
pub const KIND: &str = "vertex";

/// The region used when none is configured.
pub const DEFAULT_REGION: &str = "us-central1";

/// The `anthropic_version` Vertex wants in Claude request bodies.
pub const ANTHROPIC_VERSION: &str = "vertex-2023-10-16";

/// The public endpoint of `region`.
pub fn default_base_url(region: &str) -> String {
    if region == "global" {
        "https://aiplatform.googleapis.com".to_owned()
    } else {
        format!("https://{region}-aiplatform.googleapis.com")
    }
}

/// Which publisher's wire format a model speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Google's Gemini models (`generateContent`).
    Gemini,
    /// Anthropic's Claude models (`rawPredict`).
    Anthropic,
}

impl Family {
    /// The family of `model`: `claude*` is Anthropic's, the rest Gemini.
    pub fn of(model: &str) -> Family {
        if model.starts_with("claude") {
            Family::Anthropic
        } else {
            Family::Gemini
        }
    }
}

fn invalid(msg: impl Into<String>) -> ProviderError {
    ProviderError::new(ErrorClass::InvalidRequest, msg)
}

/// Whether `s` can stand in a URL path segment as it is.
fn is_path_segment(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | '~'))
}

/// The method URL of `model` for `project` in `region` under `base_url`.
pub fn endpoint_url(
    base_url: &str,
    project: &str,
    region: &str,
    model: &str,
    stream: bool,
) -> Result<String, ProviderError> {
    if !is_path_segment(model) {
        return Err(invalid("the model name is not valid for vertex"));
    }
    if !is_path_segment(project) || !is_path_segment(region) {
        return Err(invalid("the vertex project or region is not a valid name"));
    }
    let base = base_url.trim_end_matches('/');
    let prefix = format!("{base}/v1/projects/{project}/locations/{region}/publishers");
    Ok(match (Family::of(model), stream) {
        (Family::Gemini, false) => format!("{prefix}/google/models/{model}:generateContent"),
        (Family::Gemini, true) => {
            format!("{prefix}/google/models/{model}:streamGenerateContent?alt=sse")
        }
        (Family::Anthropic, false) => format!("{prefix}/anthropic/models/{model}:rawPredict"),
        (Family::Anthropic, true) => {
            format!("{prefix}/anthropic/models/{model}:streamRawPredict")
        }
    })
}

/// Builds the request body for `model`: Gemini's, or Anthropic's without `model` and with
/// Vertex's `anthropic_version`.
pub fn build_request(
    model: &str,
    request: &ChatRequest,
    stream: bool,
) -> Result<Vec<u8>, ProviderError> {
    match Family::of(model) {
        Family::Gemini => gemini::build_request(request),
        Family::Anthropic => {
            let config = anthropic::AnthropicConfig::new(KIND, "", None);
            let body = anthropic::build_request(&config, model, request, stream)?;
            let mut value: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| invalid(format!("could not encode the request: {e}")))?;
            if let Some(object) = value.as_object_mut() {
                object.remove("model");
                object.insert("anthropic_version".to_owned(), ANTHROPIC_VERSION.into());
            }
            serde_json::to_vec(&value)
                .map_err(|e| invalid(format!("could not encode the request: {e}")))
        }
    }
}

/// Parses a non-streaming response of `model`'s family.
pub fn parse_response(body: &[u8], model: &str) -> Result<ChatResponse, ProviderError> {
    match Family::of(model) {
        Family::Gemini => gemini::parse_response(body, model),
        Family::Anthropic => anthropic::parse_response(body, model),
    }
}

/// Maps an HTTP error answer: Claude's own errors come in Anthropic's shape, everything else
/// (authentication, quotas, Vertex itself) in Google's.
pub fn map_error(status: u16, headers: &http::HeaderMap, body: &[u8]) -> ProviderError {
    let anthropic_shape = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .is_some_and(|v| v["type"] == "error" && v["error"]["type"].is_string());
    if anthropic_shape {
        anthropic::map_error(status, headers, body)
    } else {
        gemini::map_error(status, headers, body)
    }
}

/// The stream decoder of a model's family.
#[derive(Debug)]
pub enum VertexStreamDecoder {
    /// `streamGenerateContent?alt=sse` chunks.
    Gemini(gemini::ChunkDecoder),
    /// `streamRawPredict` Messages events.
    Anthropic(anthropic::MessageStreamDecoder),
}

impl VertexStreamDecoder {
    /// The decoder for `model`.
    pub fn for_model(model: &str) -> Self {
        match Family::of(model) {
            Family::Gemini => VertexStreamDecoder::Gemini(gemini::ChunkDecoder::default()),
            Family::Anthropic => {
                VertexStreamDecoder::Anthropic(anthropic::MessageStreamDecoder::default())
            }
        }
    }
}

impl EventDecoder for VertexStreamDecoder {
    fn decode(
        &mut self,
        event: SseEvent,
        out: &mut VecDeque<StreamEvent>,
    ) -> Result<bool, ProviderError> {
        match self {
            VertexStreamDecoder::Gemini(d) => d.decode(event, out),
            VertexStreamDecoder::Anthropic(d) => d.decode(event, out),
        }
    }

    fn end_of_body(&mut self, out: &mut VecDeque<StreamEvent>) -> Result<(), ProviderError> {
        match self {
            VertexStreamDecoder::Gemini(d) => d.end_of_body(out),
            VertexStreamDecoder::Anthropic(d) => d.end_of_body(out),
        }
    }
}

/// How the adapter speaks to Vertex AI.
#[derive(Debug, Clone)]
pub struct VertexConfig {
    /// Configured name, e.g. `vertex`.
    pub name: String,
    /// The Google Cloud project; `None`: the service-account key's `project_id`.
    pub project: Option<String>,
    /// The region (location), e.g. `us-central1`, `europe-west1` or `global`.
    pub region: String,
    /// The API base URL (without `/v1`).
    pub base_url: String,
}

impl VertexConfig {
    /// Settings for `region` at its public endpoint.
    pub fn new(
        name: impl Into<String>,
        project: Option<String>,
        region: impl Into<String>,
    ) -> Self {
        let region = region.into();
        Self {
            name: name.into(),
            project,
            base_url: default_base_url(&region),
            region,
        }
    }

    /// Uses another base URL (a private endpoint, a proxy, the mock upstream).
    pub fn with_base_url(mut self, base_url: impl Into<String>) -> Self {
        self.base_url = base_url.into().trim_end_matches('/').to_owned();
        self
    }
}

/// The Vertex AI provider.
pub struct Vertex {
    config: VertexConfig,
    client: reqwest::Client,
    /// Service-account key files (JSON), one per key.
    keys: Arc<KeyRing>,
    /// Token sources by key file text.
    sources: Mutex<HashMap<String, Arc<TokenSource>>>,
}

impl Vertex {
    /// A provider using the shared `client` and the service-account keys in `keys`.
    pub fn new(config: VertexConfig, client: reqwest::Client, keys: Arc<KeyRing>) -> Self {
        Self {
            config,
            client,
            keys,
            sources: Mutex::new(HashMap::new()),
        }
    }

    /// The token source of a key (parsed once per key).
    fn source(&self, key: &str) -> Result<Arc<TokenSource>, ProviderError> {
        let mut sources = self.sources.lock().map_err(|_| {
            ProviderError::new(ErrorClass::Authentication, "the vertex token cache failed")
        })?;
        if let Some(source) = sources.get(key) {
            return Ok(source.clone());
        }
        let source = Arc::new(TokenSource::new(ServiceAccountKey::from_json(key)?));
        sources.insert(key.to_owned(), source.clone());
        Ok(source)
    }

    /// Sends one request with `key`'s token; a 401 drops the token and tries once more.
    async fn send_with(
        &self,
        key: &str,
        model: &str,
        stream: bool,
        body: &[u8],
    ) -> Result<reqwest::Response, ProviderError> {
        let source = self.source(key)?;
        let project = self
            .config
            .project
            .as_deref()
            .or(source.key().project_id.as_deref())
            .ok_or_else(|| {
                ProviderError::new(
                    ErrorClass::InvalidRequest,
                    "no vertex project: set `project`, or use a key file with a project_id",
                )
            })?;
        let url = endpoint_url(
            &self.config.base_url,
            project,
            &self.config.region,
            model,
            stream,
        )?;
        let mut retried = false;
        loop {
            let token = source.token(&self.client).await?;
            let request = self.client.post(&url).header(
                http::header::AUTHORIZATION,
                super::key_header(&format!("Bearer {token}"))?,
            );
            match send_json(request, body.to_vec().into(), map_error).await {
                Err(e) if e.http_status == Some(401) && !retried => {
                    source.invalidate(&token).await;
                    retried = true;
                }
                result => return result,
            }
        }
    }

    /// Sends with the keys in turn (as [`super::send_with_keys`]).
    async fn send(
        &self,
        model: &str,
        request: &ChatRequest,
        stream: bool,
    ) -> Result<reqwest::Response, ProviderError> {
        let body = build_request(model, request, stream)?;
        let mut tried = Vec::new();
        let mut last_error = None;
        loop {
            let (key, index) = match self.keys.pick(&tried) {
                Pick::NoKey => {
                    return Err(ProviderError::new(
                        ErrorClass::Authentication,
                        "no vertex service-account key is configured",
                    ));
                }
                Pick::Key(key, index) => (key, index),
                Pick::AllResting(err) => return Err(last_error.unwrap_or(err)),
                Pick::Exhausted => {
                    return Err(last_error.unwrap_or_else(|| {
                        ProviderError::new(ErrorClass::Authentication, "no usable vertex key")
                    }));
                }
            };
            match self.send_with(key.secret(), model, stream, &body).await {
                Err(err) if KeyRing::is_key_failure(&err) => {
                    self.keys.rest(&key, index, &err);
                    tried.push(key);
                    last_error = Some(err);
                }
                result => return result,
            }
        }
    }
}

#[async_trait]
impl Provider for Vertex {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn kind(&self) -> &'static str {
        KIND
    }

    fn keys(&self) -> Option<&Arc<KeyRing>> {
        Some(&self.keys)
    }

    async fn chat(
        &self,
        model: &str,
        request: &ChatRequest,
    ) -> Result<ChatResponse, ProviderError> {
        let response = self.send(model, request, false).await?;
        let bytes = read_body(response).await?;
        parse_response(&bytes, model)
    }

    async fn chat_stream(
        &self,
        model: &str,
        request: &ChatRequest,
    ) -> Result<EventStream, ProviderError> {
        let response = self.send(model, request, true).await?;
        Ok(Box::pin(SseStream::new(
            response,
            VertexStreamDecoder::for_model(model),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        providers::sse::decode_in_pieces,
        types::{FinishReason, Message, Role},
    };

    #[test]
    fn endpoints_carry_project_region_and_publisher() {
        let base = default_base_url("europe-west1");
        assert_eq!(base, "https://europe-west1-aiplatform.googleapis.com");
        assert_eq!(
            endpoint_url(&base, "p-1", "europe-west1", "gemini-2.5-flash", true).unwrap(),
            "https://europe-west1-aiplatform.googleapis.com/v1/projects/p-1/locations/europe-west1/publishers/google/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
        );
        assert_eq!(
            endpoint_url(
                &base,
                "p-1",
                "europe-west1",
                "claude-sonnet-4-5@20250929",
                false
            )
            .unwrap(),
            "https://europe-west1-aiplatform.googleapis.com/v1/projects/p-1/locations/europe-west1/publishers/anthropic/models/claude-sonnet-4-5@20250929:rawPredict"
        );
        assert!(
            endpoint_url(&base, "p-1", "r", "claude-x", true)
                .unwrap()
                .ends_with(":streamRawPredict")
        );
        assert_eq!(
            default_base_url("global"),
            "https://aiplatform.googleapis.com"
        );
        for bad in ["", "a/b", "a?b", "a b", "a%2F"] {
            assert!(endpoint_url(&base, "p", "r", bad, false).is_err(), "{bad}");
        }
        assert!(endpoint_url(&base, "p/../x", "r", "m", false).is_err());
    }

    #[test]
    fn claude_bodies_are_vertex_shaped() {
        let request = ChatRequest {
            messages: vec![Message::text(Role::User, "hi")],
            ..ChatRequest::default()
        };
        let body: serde_json::Value = serde_json::from_slice(
            &build_request("claude-haiku-4-5@20251001", &request, true).unwrap(),
        )
        .unwrap();
        assert_eq!(body["anthropic_version"], ANTHROPIC_VERSION);
        assert!(body.get("model").is_none());
        assert_eq!(body["stream"], true);
        assert_eq!(body["max_tokens"], anthropic::DEFAULT_MAX_TOKENS);
        assert_eq!(body["messages"][0]["content"][0]["text"], "hi");
        let body: serde_json::Value =
            serde_json::from_slice(&build_request("gemini-2.5-flash", &request, true).unwrap())
                .unwrap();
        assert_eq!(body["contents"][0]["parts"][0]["text"], "hi");
        assert!(body.get("anthropic_version").is_none());
    }

    #[test]
    fn errors_are_read_in_either_shape() {
        let google =
            br#"{"error":{"code":429,"message":"Quota exceeded","status":"RESOURCE_EXHAUSTED"}}"#;
        assert_eq!(
            map_error(429, &http::HeaderMap::new(), google).class,
            ErrorClass::RateLimited
        );
        let claude =
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert_eq!(
            map_error(529, &http::HeaderMap::new(), claude).class,
            ErrorClass::Overloaded
        );
        let unauth = br#"{"error":{"code":401,"message":"Request had invalid authentication credentials.","status":"UNAUTHENTICATED"}}"#;
        assert_eq!(
            map_error(401, &http::HeaderMap::new(), unauth).class,
            ErrorClass::Authentication
        );
    }

    /// Vertex's Claude stream (a recorded `streamRawPredict` body) decodes as Anthropic's.
    #[tokio::test]
    async fn decodes_a_vertex_claude_stream() {
        let body = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-3-7-sonnet-20250219\",\"id\":\"msg_vrtx_01\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":16,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":5}}  }\n\n",
            "event: ping\ndata: {\"type\": \"ping\"}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"} }\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Olá!\"}      }\n\n",
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0        }\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":7} }\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"          }\n\n",
        );
        let events: Vec<_> = decode_in_pieces(
            body.as_bytes(),
            VertexStreamDecoder::for_model("claude-3-7-sonnet@20250219"),
        )
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
        assert_eq!(events[0], StreamEvent::Text("Olá!".into()));
        assert!(
            matches!(events[1], StreamEvent::Usage(u) if u.input_tokens == 16 && u.output_tokens == 7)
        );
        assert_eq!(events[2], StreamEvent::Finish(FinishReason::Stop));
    }
}
