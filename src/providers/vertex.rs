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

use std::{collections::VecDeque, sync::Arc};

use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;

use super::{
    ErrorClass, HttpProvider, Provider, ProviderError, StreamDecoder, UpstreamError, anthropic,
    auth::{Auth, parsed_state, sensitive_header},
    gemini,
    google_auth::{ServiceAccountKey, TokenSource},
    keys::ProviderKey,
    kinds::{
        BuildContext, Discovered, Env, KeyRequired, KindInput, KindSettings, KindSpec,
        ProviderSettings, SettingsIssue, base_url_or, env_var,
    },
    sse::Sse,
    wire::{WireFormat, is_path_segment, parse_url},
};
use crate::types::{ChatRequest, ChatResponse, StreamEvent};

/// The provider kind.
pub const KIND: &str = "vertex";

/// The region used when none is configured.
pub const DEFAULT_REGION: &str = "us-central1";

/// The `anthropic_version` Vertex wants in Claude request bodies.
pub const ANTHROPIC_VERSION: &str = "vertex-2023-10-16";

/// The project segment of URLs whose project comes from the key (the auth fills it in).
const KEY_PROJECT: &str = "-";

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

/// Whether `s` is a Google Cloud project id or region name.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
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
    if !is_name(project) || !is_name(region) {
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

/// The Vertex wire format: Gemini's or Anthropic's by model, under Vertex's URLs.
#[derive(Debug, Clone)]
pub struct VertexWire {
    base_url: String,
    /// `None`: each key's own project.
    project: Option<String>,
    region: String,
    gemini: gemini::GenerateContent,
    claude: anthropic::Messages,
}

impl VertexWire {
    /// The wire format for `project` (or each key's) in `region` under `base_url`.
    pub fn new(base_url: &str, project: Option<String>, region: &str) -> Self {
        Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            project,
            region: region.to_owned(),
            gemini: gemini::GenerateContent::new(base_url),
            claude: anthropic::Messages::new(anthropic::AnthropicConfig::new(base_url)),
        }
    }
}

/// The stream decoder of a model's family.
pub enum VertexStreamDecoder {
    /// `streamGenerateContent?alt=sse` chunks.
    Gemini(Sse<gemini::ChunkDecoder>),
    /// `streamRawPredict` Messages events.
    Anthropic(Sse<anthropic::MessageStreamDecoder>),
}

impl StreamDecoder for VertexStreamDecoder {
    fn feed(
        &mut self,
        bytes: &[u8],
        out: &mut VecDeque<StreamEvent>,
    ) -> Result<bool, ProviderError> {
        match self {
            VertexStreamDecoder::Gemini(d) => d.feed(bytes, out),
            VertexStreamDecoder::Anthropic(d) => d.feed(bytes, out),
        }
    }

    fn end_of_body(&mut self, out: &mut VecDeque<StreamEvent>) -> Result<(), ProviderError> {
        match self {
            VertexStreamDecoder::Gemini(d) => d.end_of_body(out),
            VertexStreamDecoder::Anthropic(d) => d.end_of_body(out),
        }
    }
}

impl WireFormat for VertexWire {
    type Decoder = VertexStreamDecoder;

    fn endpoint(&self, model: &str, stream: bool) -> Result<reqwest::Url, ProviderError> {
        let project = self.project.as_deref().unwrap_or(KEY_PROJECT);
        parse_url(&endpoint_url(
            &self.base_url,
            project,
            &self.region,
            model,
            stream,
        )?)
    }

    /// Gemini's body, or Anthropic's without `model` and with Vertex's `anthropic_version`.
    fn build_request(
        &self,
        model: &str,
        request: &ChatRequest,
        stream: bool,
    ) -> Result<Vec<u8>, ProviderError> {
        match Family::of(model) {
            Family::Gemini => self.gemini.build_request(model, request, stream),
            Family::Anthropic => {
                let body = self.claude.build_request(model, request, stream)?;
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

    fn parse_response(&self, body: &[u8], model: &str) -> Result<ChatResponse, ProviderError> {
        match Family::of(model) {
            Family::Gemini => self.gemini.parse_response(body, model),
            Family::Anthropic => self.claude.parse_response(body, model),
        }
    }

    fn stream_decoder(&self, model: &str) -> Self::Decoder {
        match Family::of(model) {
            Family::Gemini => VertexStreamDecoder::Gemini(self.gemini.stream_decoder(model)),
            Family::Anthropic => VertexStreamDecoder::Anthropic(self.claude.stream_decoder(model)),
        }
    }

    /// Claude's own errors come in Anthropic's shape; everything else (authentication,
    /// quotas, Vertex itself) in Google's.
    fn error_body(&self, status: u16, headers: &http::HeaderMap, body: &[u8]) -> UpstreamError {
        let anthropic_shape = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .is_some_and(|v| v["type"] == "error" && v["error"]["type"].is_string());
        if anthropic_shape {
            anthropic::error_body(status, headers, body)
        } else {
            gemini::error_body(body)
        }
    }
}

/// OAuth2 bearer tokens from each key's service account; fills in the key's project where
/// the URL leaves it to the key.
pub struct ServiceAccountAuth {
    client: reqwest::Client,
}

impl ServiceAccountAuth {
    /// Tokens fetched with `client`.
    pub fn new(client: reqwest::Client) -> Self {
        Self { client }
    }
}

fn key_source(key: &ProviderKey) -> Result<&TokenSource, ProviderError> {
    parsed_state(key, |secret| {
        ServiceAccountKey::from_json(secret).map(TokenSource::new)
    })
}

#[async_trait]
impl Auth for ServiceAccountAuth {
    async fn authorize(
        &self,
        key: Option<&ProviderKey>,
        request: &mut reqwest::Request,
        _body: &Bytes,
    ) -> Result<(), ProviderError> {
        let key = key.ok_or_else(|| {
            ProviderError::new(
                ErrorClass::Authentication,
                "no vertex service-account key is configured",
            )
        })?;
        let source = key_source(key)?;
        let marker = format!("/projects/{KEY_PROJECT}/");
        if request.url().path().contains(&marker) {
            let project = source
                .key()
                .project_id
                .as_deref()
                .filter(|p| is_name(p))
                .ok_or_else(|| {
                    invalid("no vertex project: set `project`, or use a key file with a project_id")
                })?;
            let path = request
                .url()
                .path()
                .replacen(&marker, &format!("/projects/{project}/"), 1);
            request.url_mut().set_path(&path);
        }
        let token = source.token(&self.client).await?;
        let value = sensitive_header(&format!("Bearer {token}")).ok_or_else(|| {
            ProviderError::new(
                ErrorClass::InvalidResponse,
                "the oauth token endpoint sent a token that is not a valid header value",
            )
        })?;
        request
            .headers_mut()
            .insert(http::header::AUTHORIZATION, value);
        Ok(())
    }

    async fn refused(&self, key: &ProviderKey, request: &reqwest::Request) -> bool {
        let Ok(source) = key_source(key) else {
            return false;
        };
        let Some(token) = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        source.invalidate(token).await;
        true
    }
}

/// The settings of `kind = "vertex"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VertexSettings {
    /// The base URL (without `/v1`).
    pub base_url: String,
    /// The project; `None`: each key file's `project_id`.
    pub project: Option<String>,
    /// The region (location).
    pub region: String,
}

/// The kind's own fields in `[providers.NAME]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVertex {
    #[serde(default)]
    project: Option<String>,
    #[serde(default)]
    region: Option<String>,
}

impl KindSettings for VertexSettings {
    fn build(&self, ctx: BuildContext<'_>) -> Arc<dyn Provider> {
        Arc::new(HttpProvider::new(
            ctx.name,
            KIND,
            VertexWire::new(&self.base_url, self.project.clone(), &self.region),
            Arc::new(ServiceAccountAuth::new(ctx.client.primary())),
            ctx.keys,
            ctx.client.clone(),
        ))
    }
}

fn parse(input: &KindInput<'_>) -> Result<ProviderSettings, Vec<SettingsIssue>> {
    let raw: RawVertex = input.fields()?;
    let mut issues = Vec::new();
    let region = raw.region.unwrap_or_else(|| DEFAULT_REGION.to_owned());
    if !is_name(&region) {
        issues.push(SettingsIssue::new(
            "region",
            format!("`{region}` is not a vertex region, e.g. us-central1, europe-west1 or global"),
        ));
    }
    if let Some(project) = raw.project.as_deref().filter(|p| !is_name(p)) {
        issues.push(SettingsIssue::new(
            "project",
            format!("`{project}` is not a google cloud project id"),
        ));
    }
    let base_url = base_url_or(input, || default_base_url(&region))
        .map_err(|issue| issues.push(issue))
        .unwrap_or_default();
    if !issues.is_empty() {
        return Err(issues);
    }
    Ok(ProviderSettings::new(VertexSettings {
        base_url,
        project: raw.project,
        region,
    }))
}

/// Zero-config: `GOOGLE_APPLICATION_CREDENTIALS` naming a service-account key file
/// registers `vertex` in `GOOGLE_CLOUD_REGION` (or `CLOUD_ML_REGION`, else
/// [`DEFAULT_REGION`]) with `GOOGLE_CLOUD_PROJECT` or the key's project.
fn discover(env: Env<'_>) -> Option<Result<Discovered, SettingsIssue>> {
    let path = env_var(env, "GOOGLE_APPLICATION_CREDENTIALS")?;
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            return Some(Err(SettingsIssue::new(
                "GOOGLE_APPLICATION_CREDENTIALS",
                format!("cannot read `{path}`: {e}"),
            )));
        }
    };
    // Only service-account keys; user credentials from `gcloud auth` are not supported.
    if ServiceAccountKey::from_json(&text).is_err() {
        return None;
    }
    let mut found = super::kinds::discovered(KIND, None, text);
    if let Some(region) =
        env_var(env, "GOOGLE_CLOUD_REGION").or_else(|| env_var(env, "CLOUD_ML_REGION"))
    {
        found
            .raw
            .extra
            .insert("region".to_owned(), toml::Value::String(region));
    }
    if let Some(project) = env_var(env, "GOOGLE_CLOUD_PROJECT") {
        found
            .raw
            .extra
            .insert("project".to_owned(), toml::Value::String(project));
    }
    Some(Ok(found))
}

/// `kind = "vertex"`.
pub const SPEC: KindSpec = KindSpec {
    name: KIND,
    // The default base URL depends on the region: `parse` derives it.
    default_base_url: None,
    base_url_hint: "",
    http: false,
    key_env: &[],
    key_required: KeyRequired::Always,
    fields: &["project", "region"],
    parse,
    discover: Some(discover),
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        providers::wire::decode_in_pieces,
        types::{FinishReason, Message, Role},
    };

    fn wire() -> VertexWire {
        VertexWire::new(&default_base_url("us-central1"), None, "us-central1")
    }

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
        for bad in ["", "a/b", "a?b", "a b", "a%2F", "a#b"] {
            assert!(endpoint_url(&base, "p", "r", bad, false).is_err(), "{bad}");
        }
        assert!(endpoint_url(&base, "p/../x", "r", "m", false).is_err());
    }

    fn settings(toml: &str) -> Result<VertexSettings, Vec<String>> {
        let raw: crate::providers::RawProvider = toml::from_str(toml).unwrap();
        let mut issues = Vec::new();
        let config = crate::providers::kinds::validate("vertex", raw, &|_| None, &mut issues);
        match config {
            Some(c) if issues.is_empty() => Ok(c.settings.get::<VertexSettings>().unwrap().clone()),
            _ => Err(issues.into_iter().map(|i| i.field).collect()),
        }
    }

    #[test]
    fn settings_default_the_endpoint_from_the_region() {
        let s = settings("api_key = \"{}\"\nregion = \"europe-west4\"").unwrap();
        assert_eq!(s.base_url, "https://europe-west4-aiplatform.googleapis.com");
        assert_eq!(s.project, None);
        let s = settings("api_key = \"{}\"\nproject = \"my-proj\"").unwrap();
        assert_eq!(
            (s.region.as_str(), s.project.as_deref()),
            (DEFAULT_REGION, Some("my-proj"))
        );
        assert_eq!(
            settings("api_key = \"{}\"\nregion = \"Europe/West\"").unwrap_err(),
            ["region"]
        );
        assert_eq!(
            settings("api_key = \"{}\"\nproject = \"a/b\"").unwrap_err(),
            ["project"]
        );
        assert_eq!(
            settings("region = \"us-central1\"").unwrap_err(),
            ["api_key"]
        );
    }

    /// The README's Bedrock and Vertex example loads as documented.
    #[test]
    fn the_readme_example_loads() {
        let readme = include_str!("../../README.md");
        let section = &readme[readme
            .find("**AWS Bedrock and Google Vertex AI.**")
            .unwrap()..];
        let start = section.find("```toml\n").unwrap() + "```toml\n".len();
        let example = &section[start..start + section[start..].find("```").unwrap()];
        let key =
            crate::providers::google_auth::tests::test_key_json("https://oauth2.example/token");
        let env = |name: &str| match name {
            "AWS_ACCESS_KEY_ID" => Some("AKIDEXAMPLE".to_owned()),
            "AWS_SECRET_ACCESS_KEY" => Some("secret".to_owned()),
            "VERTEX_SERVICE_ACCOUNT_JSON" => Some(key.clone()),
            _ => None,
        };
        let config = crate::config::Config::from_toml(
            example,
            std::path::Path::new("README.md"),
            &crate::config::Overrides::default(),
            &env,
        )
        .unwrap();
        let provider = |name: &str| config.providers.iter().find(|p| p.name == name).unwrap();
        let bedrock = provider("bedrock");
        assert_eq!(bedrock.api_keys, ["AKIDEXAMPLE:secret"]);
        let settings = bedrock
            .settings
            .get::<crate::providers::bedrock::BedrockSettings>()
            .unwrap();
        assert_eq!(
            settings.endpoint,
            "https://bedrock-runtime.eu-central-1.amazonaws.com"
        );
        let vertex = provider("vertex");
        assert_eq!(vertex.api_keys, std::slice::from_ref(&key));
        let settings = vertex.settings.get::<VertexSettings>().unwrap();
        assert_eq!(
            settings.base_url,
            "https://europe-west1-aiplatform.googleapis.com"
        );
    }

    #[test]
    fn claude_bodies_are_vertex_shaped() {
        let request = ChatRequest {
            messages: vec![Message::text(Role::User, "hi")],
            ..ChatRequest::default()
        };
        let body: serde_json::Value = serde_json::from_slice(
            &wire()
                .build_request("claude-haiku-4-5@20251001", &request, true)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(body["anthropic_version"], ANTHROPIC_VERSION);
        assert!(body.get("model").is_none());
        assert_eq!(body["stream"], true);
        assert_eq!(body["max_tokens"], anthropic::DEFAULT_MAX_TOKENS);
        assert_eq!(body["messages"][0]["content"][0]["text"], "hi");
        let body: serde_json::Value = serde_json::from_slice(
            &wire()
                .build_request("gemini-2.5-flash", &request, true)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(body["contents"][0]["parts"][0]["text"], "hi");
        assert!(body.get("anthropic_version").is_none());
    }

    #[test]
    fn errors_are_read_in_either_shape() {
        let google =
            br#"{"error":{"code":429,"message":"Quota exceeded","status":"RESOURCE_EXHAUSTED"}}"#;
        assert_eq!(
            wire().classify(429, &http::HeaderMap::new(), google).class,
            ErrorClass::RateLimited
        );
        let claude =
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert_eq!(
            wire().classify(529, &http::HeaderMap::new(), claude).class,
            ErrorClass::Overloaded
        );
        let unauth = br#"{"error":{"code":401,"message":"Request had invalid authentication credentials.","status":"UNAUTHENTICATED"}}"#;
        assert_eq!(
            wire().classify(401, &http::HeaderMap::new(), unauth).class,
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
            7,
            wire().stream_decoder("claude-3-7-sonnet@20250219"),
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
