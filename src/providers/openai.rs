//! OpenAI Chat Completions (`POST {base_url}/chat/completions`), also spoken by many
//! OpenAI-compatible servers (vLLM, Ollama, LM Studio, Groq, ...; see [`super::compat`]) and by
//! Azure OpenAI (`{endpoint}/openai/deployments/{deployment}/chat/completions?api-version=...`
//! with an `api-key` header; the caller's model name is the deployment).
//!
//! Non-streaming and SSE streaming with `stream_options.include_usage`, tool calls (streamed
//! argument fragments included), response formats and images. A stream is complete only on
//! `data: [DONE]`, or when the body ends after a chunk that carried a `finish_reason`.

use std::{collections::VecDeque, sync::Arc};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::{
    ErrorClass, HttpProvider, Provider, ProviderError, UpstreamError,
    auth::ApiKeyHeader,
    embed::{EmbedWire, check_count, decode_base64_f32},
    kinds::{
        BuildContext, Discovered, Env, KeyRequired, KindInput, KindSettings, KindSpec,
        ProviderSettings, SettingsIssue, discovered, env_var,
    },
    sse::{EventDecoder, Sse, SseEvent},
    wire::{WireFormat, decode_event, decode_json, is_path_segment, parse_url, reply_model},
};
use crate::types::{
    ChatRequest, ChatResponse, ContentPart, EmbedRequest, EmbedResponse, EmbeddingEncoding,
    FinishReason, ImageDetail, ImageSource, ResponseFormat, Role, StreamEvent, ToolCall,
    ToolCallDelta, ToolChoice, Usage,
};

/// The provider kind.
pub const KIND: &str = "openai";

/// The official API's base URL.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// The provider kind of Azure OpenAI deployments (no built-in prices: deployment names are
/// the operator's choice).
pub const AZURE_KIND: &str = "azure";

/// The Azure OpenAI `api-version` used when none is configured (the latest GA inference
/// version).
pub const AZURE_DEFAULT_API_VERSION: &str = "2024-10-21";

/// How requests carry the API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthStyle {
    /// `Authorization: Bearer <key>` (OpenAI and most compatible servers).
    Bearer,
    /// `api-key: <key>` (Azure OpenAI).
    ApiKeyHeader,
}

/// How the request URL is formed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlStyle {
    /// `{base_url}/chat/completions`.
    Base,
    /// `{base_url}/openai/deployments/{model}/chat/completions?api-version={api_version}`:
    /// Azure OpenAI, where the model the caller names is the deployment.
    AzureDeployment {
        /// The `api-version` query parameter.
        api_version: String,
    },
}

/// Which request field carries the output token limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxTokensField {
    /// `max_tokens` (older, and what most compatible servers accept).
    MaxTokens,
    /// `max_completion_tokens` (what the official API wants today).
    MaxCompletionTokens,
}

/// How the adapter speaks to one OpenAI-compatible endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAiConfig {
    /// Base URL without the trailing `/chat/completions`.
    pub base_url: String,
    /// Name of the output limit field.
    pub max_tokens_field: MaxTokensField,
    /// Whether the endpoint knows the `developer` role (otherwise sent as `system`).
    pub developer_role: bool,
    /// Whether to ask for usage in streams (`stream_options.include_usage`).
    pub stream_usage: bool,
    /// How the API key is sent.
    pub auth: AuthStyle,
    /// How the URL is formed.
    pub url_style: UrlStyle,
}

impl OpenAiConfig {
    /// Settings for `base_url`, with quirks defaulted from whether it is the official API.
    pub fn new(base_url: impl Into<String>) -> Self {
        let base_url = base_url.into().trim_end_matches('/').to_owned();
        let official = base_url.starts_with("https://api.openai.com");
        Self {
            base_url,
            max_tokens_field: if official {
                MaxTokensField::MaxCompletionTokens
            } else {
                MaxTokensField::MaxTokens
            },
            developer_role: official,
            stream_usage: true,
            auth: AuthStyle::Bearer,
            url_style: UrlStyle::Base,
        }
    }

    /// Settings for an Azure OpenAI resource at `endpoint` (e.g.
    /// `https://my-resource.openai.azure.com`).
    pub fn azure(endpoint: impl Into<String>, api_version: impl Into<String>) -> Self {
        Self {
            max_tokens_field: MaxTokensField::MaxCompletionTokens,
            developer_role: false,
            auth: AuthStyle::ApiKeyHeader,
            url_style: UrlStyle::AzureDeployment {
                api_version: api_version.into(),
            },
            ..Self::new(endpoint)
        }
    }

    /// The chat completions URL for `model`.
    pub fn url(&self, model: &str) -> Result<String, ProviderError> {
        self.operation_url(model, "chat/completions")
    }

    /// The URL of `operation` (`chat/completions`, `embeddings`) for `model`.
    pub fn operation_url(&self, model: &str, operation: &str) -> Result<String, ProviderError> {
        match &self.url_style {
            UrlStyle::Base => Ok(format!("{}/{operation}", self.base_url)),
            UrlStyle::AzureDeployment { api_version } => {
                // The deployment is one path segment; refuse what would change the URL.
                if !is_path_segment(model) {
                    return Err(invalid(
                        "the model name is not a valid azure deployment name",
                    ));
                }
                Ok(format!(
                    "{}/openai/deployments/{model}/{operation}?api-version={api_version}",
                    self.base_url
                ))
            }
        }
    }

    /// How requests carry the key.
    pub fn auth(&self) -> ApiKeyHeader {
        match self.auth {
            AuthStyle::Bearer => ApiKeyHeader::bearer(),
            AuthStyle::ApiKeyHeader => ApiKeyHeader::header("api-key"),
        }
    }
}

/// The Chat Completions wire format.
#[derive(Debug, Clone)]
pub struct ChatCompletions {
    config: OpenAiConfig,
    /// The endpoint, parsed once, when it does not depend on the model.
    fixed_url: Option<reqwest::Url>,
}

impl ChatCompletions {
    /// The wire format of the endpoint `config` describes.
    pub fn new(config: OpenAiConfig) -> Self {
        let fixed_url = match config.url_style {
            UrlStyle::Base => config.url("").ok().and_then(|u| parse_url(&u).ok()),
            UrlStyle::AzureDeployment { .. } => None,
        };
        Self { config, fixed_url }
    }

    /// The settings.
    pub fn config(&self) -> &OpenAiConfig {
        &self.config
    }
}

/// The settings of the OpenAI-family kinds (`openai`, `openai-compatible`, `azure`, the
/// presets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAiSettings {
    /// The kind in the model registry (prices): `openai`, `azure` or the preset's.
    pub registry_kind: &'static str,
    /// How to speak to the endpoint.
    pub config: OpenAiConfig,
}

impl KindSettings for OpenAiSettings {
    fn build(&self, ctx: BuildContext<'_>) -> Arc<dyn Provider> {
        Arc::new(HttpProvider::new(
            ctx.name,
            self.registry_kind,
            ChatCompletions::new(self.config.clone()),
            Arc::new(self.config.auth()),
            ctx.keys,
            ctx.client.clone(),
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    max_tokens_field: Option<String>,
    developer_role: Option<bool>,
    stream_usage: Option<bool>,
    api_version: Option<String>,
}

/// The fields of the OpenAI-compatible kinds.
pub const FIELDS: &[&str] = &["max_tokens_field", "developer_role", "stream_usage"];

const AZURE_FIELDS: &[&str] = &[
    "max_tokens_field",
    "developer_role",
    "stream_usage",
    "api_version",
];

/// Applies the configured quirks to `config`, the kind's defaults.
pub fn parse_settings(
    input: &KindInput<'_>,
    registry_kind: &'static str,
    mut config: OpenAiConfig,
) -> Result<ProviderSettings, Vec<SettingsIssue>> {
    let raw: RawSettings = input.fields()?;
    match raw.max_tokens_field.as_deref() {
        None => {}
        Some("max_tokens") => config.max_tokens_field = MaxTokensField::MaxTokens,
        Some("max_completion_tokens") => {
            config.max_tokens_field = MaxTokensField::MaxCompletionTokens;
        }
        Some(other) => {
            return Err(vec![SettingsIssue::new(
                "max_tokens_field",
                format!("`{other}` is not one of: max_tokens, max_completion_tokens"),
            )]);
        }
    }
    config.developer_role = raw.developer_role.unwrap_or(config.developer_role);
    config.stream_usage = raw.stream_usage.unwrap_or(config.stream_usage);
    if let (UrlStyle::AzureDeployment { api_version }, Some(v)) = (
        &mut config.url_style,
        raw.api_version.filter(|v| !v.is_empty()),
    ) {
        *api_version = v;
    }
    Ok(ProviderSettings::new(OpenAiSettings {
        registry_kind,
        config,
    }))
}

fn parse_openai(input: &KindInput<'_>) -> Result<ProviderSettings, Vec<SettingsIssue>> {
    parse_settings(input, KIND, OpenAiConfig::new(input.base_url))
}

fn parse_azure(input: &KindInput<'_>) -> Result<ProviderSettings, Vec<SettingsIssue>> {
    parse_settings(
        input,
        AZURE_KIND,
        OpenAiConfig::azure(input.base_url, AZURE_DEFAULT_API_VERSION),
    )
}

fn discover_openai(env: Env<'_>) -> Option<Result<Discovered, SettingsIssue>> {
    let key = env_var(env, "OPENAI_API_KEY")?;
    Some(Ok(discovered(KIND, env_var(env, "OPENAI_BASE_URL"), key)))
}

fn discover_azure(env: Env<'_>) -> Option<Result<Discovered, SettingsIssue>> {
    let key = env_var(env, "AZURE_OPENAI_API_KEY")?;
    let Some(endpoint) = env_var(env, "AZURE_OPENAI_ENDPOINT") else {
        return Some(Err(SettingsIssue::new(
            "AZURE_OPENAI_ENDPOINT",
            "must be set when AZURE_OPENAI_API_KEY is, e.g. https://NAME.openai.azure.com",
        )));
    };
    let mut found = discovered(AZURE_KIND, Some(endpoint), key);
    if let Some(version) = env_var(env, "AZURE_OPENAI_API_VERSION") {
        found
            .raw
            .extra
            .insert("api_version".to_owned(), version.into());
    }
    Some(Ok(found))
}

/// `kind = "openai"`: the official API (or a compatible server at `base_url`).
pub const SPEC: KindSpec = KindSpec {
    name: KIND,
    default_base_url: Some(DEFAULT_BASE_URL),
    base_url_hint: "",
    http: true,
    key_env: &[],
    key_required: KeyRequired::Never,
    fields: FIELDS,
    parse: parse_openai,
    discover: Some(discover_openai),
};

/// `kind = "openai-compatible"`: any server speaking Chat Completions at `base_url`.
pub const COMPATIBLE_SPEC: KindSpec = KindSpec {
    name: "openai-compatible",
    default_base_url: None,
    base_url_hint: "is required for this kind",
    discover: None,
    ..SPEC
};

/// `kind = "azure"`: Azure OpenAI deployments.
pub const AZURE_SPEC: KindSpec = KindSpec {
    name: AZURE_KIND,
    default_base_url: None,
    base_url_hint: "is required for kind `azure`: the resource endpoint, e.g. https://NAME.openai.azure.com",
    http: true,
    key_env: &["AZURE_OPENAI_API_KEY"],
    key_required: KeyRequired::Always,
    fields: AZURE_FIELDS,
    parse: parse_azure,
    discover: Some(discover_azure),
};

impl WireFormat for ChatCompletions {
    type Decoder = Sse<ChunkDecoder>;

    fn endpoint(&self, model: &str, _stream: bool) -> Result<reqwest::Url, ProviderError> {
        match &self.fixed_url {
            Some(url) => Ok(url.clone()),
            None => parse_url(&self.config.url(model)?),
        }
    }

    /// Builds the JSON body of a Chat Completions request.
    fn build_request(
        &self,
        model: &str,
        request: &ChatRequest,
        stream: bool,
    ) -> Result<Vec<u8>, ProviderError> {
        let config = &self.config;
        let mut messages = Vec::with_capacity(request.messages.len());
        for message in &request.messages {
            convert_message(config, message, &mut messages)?;
        }
        let (max_tokens, max_completion_tokens) = match config.max_tokens_field {
            MaxTokensField::MaxTokens => (request.params.max_tokens, None),
            MaxTokensField::MaxCompletionTokens => (None, request.params.max_tokens),
        };
        let wire = WireRequest {
            model,
            messages,
            temperature: request.params.temperature,
            top_p: request.params.top_p,
            max_tokens,
            max_completion_tokens,
            stop: &request.params.stop,
            seed: request.params.seed,
            presence_penalty: request.params.presence_penalty,
            frequency_penalty: request.params.frequency_penalty,
            tools: request
                .tools
                .iter()
                .map(|t| WireTool {
                    kind: "function",
                    function: WireFunction {
                        name: &t.name,
                        description: t.description.as_deref(),
                        parameters: &t.parameters,
                        strict: t.strict,
                    },
                })
                .collect(),
            tool_choice: request.tool_choice.as_ref().map(|choice| match choice {
                ToolChoice::Auto => "auto".into(),
                ToolChoice::None => "none".into(),
                ToolChoice::Required => "required".into(),
                ToolChoice::Named(name) => {
                    serde_json::json!({"type": "function", "function": {"name": name}})
                }
            }),
            parallel_tool_calls: request.params.parallel_tool_calls,
            response_format: request.response_format.as_ref().map(|format| match format {
                ResponseFormat::Text => serde_json::json!({"type": "text"}),
                ResponseFormat::JsonObject => serde_json::json!({"type": "json_object"}),
                ResponseFormat::JsonSchema {
                    name,
                    schema,
                    strict,
                } => serde_json::json!({
                    "type": "json_schema",
                    "json_schema": {"name": name, "schema": schema, "strict": strict}
                }),
            }),
            user: request.user.as_deref(),
            stream,
            stream_options: (stream && config.stream_usage).then_some(StreamOptions {
                include_usage: true,
            }),
        };
        serde_json::to_vec(&wire).map_err(|e| invalid(format!("could not encode the request: {e}")))
    }

    /// Parses a non-streaming Chat Completions response.
    fn parse_response(
        &self,
        body: &[u8],
        requested_model: &str,
    ) -> Result<ChatResponse, ProviderError> {
        let wire: WireResponse = decode_json(body)?;
        let choice = wire.choices.into_iter().next().ok_or_else(|| {
            ProviderError::new(
                ErrorClass::InvalidResponse,
                "the provider's response has no choices",
            )
        })?;
        let mut content = Vec::with_capacity(1 + choice.message.tool_calls.len());
        if let Some(text) = choice.message.content.filter(|t| !t.is_empty()) {
            content.push(ContentPart::Text(text));
        } else if let Some(refusal) = choice.message.refusal.filter(|t| !t.is_empty()) {
            content.push(ContentPart::Text(refusal));
        }
        for call in choice.message.tool_calls {
            content.push(ContentPart::ToolCall(ToolCall {
                id: call.id,
                name: call.function.name,
                arguments: call.function.arguments,
            }));
        }
        Ok(ChatResponse {
            model: reply_model(wire.model, requested_model),
            content,
            finish_reason: choice
                .finish_reason
                .as_deref()
                .map_or(FinishReason::Unspecified, finish_reason),
            usage: wire.usage.map(Usage::from),
        })
    }

    fn stream_decoder(&self, _model: &str) -> Self::Decoder {
        Sse::new(ChunkDecoder::default())
    }

    fn error_body(&self, _status: u16, _headers: &http::HeaderMap, body: &[u8]) -> UpstreamError {
        error_body(body)
    }

    fn embeddings(&self) -> Option<&dyn EmbedWire> {
        Some(self)
    }
}

// ---------------------------------------------------------------------------------------------
// Embeddings (`POST {base_url}/embeddings`, Azure: `.../deployments/{model}/embeddings`)
// ---------------------------------------------------------------------------------------------

/// The most inputs one OpenAI embeddings request may carry.
pub const MAX_EMBED_INPUTS: usize = 2048;

#[derive(Serialize)]
struct WireEmbedRequest<'a> {
    model: &'a str,
    input: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding_format: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
}

#[derive(Deserialize)]
struct WireEmbedResponse {
    data: Vec<WireEmbedding>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<WireEmbedUsage>,
}

#[derive(Deserialize)]
struct WireEmbedding {
    #[serde(default)]
    index: Option<usize>,
    embedding: WireVector,
}

/// A vector as floats, or as base64 little-endian float32 bytes (`encoding_format: base64`).
#[derive(Deserialize)]
#[serde(untagged)]
enum WireVector {
    Floats(Vec<f32>),
    Base64(String),
}

#[derive(Deserialize)]
struct WireEmbedUsage {
    #[serde(default)]
    prompt_tokens: u64,
}

impl EmbedWire for ChatCompletions {
    fn max_batch(&self, _model: &str) -> usize {
        MAX_EMBED_INPUTS
    }

    fn embed_endpoint(&self, model: &str) -> Result<reqwest::Url, ProviderError> {
        parse_url(&self.config.operation_url(model, "embeddings")?)
    }

    /// The caller's encoding goes upstream as is (float is the API's default and not sent,
    /// so servers without base64 support are not asked for it).
    fn build_embed(
        &self,
        model: &str,
        request: &EmbedRequest,
        inputs: &[String],
    ) -> Result<Vec<u8>, ProviderError> {
        let wire = WireEmbedRequest {
            model,
            input: inputs,
            encoding_format: match request.encoding {
                EmbeddingEncoding::Float => None,
                EmbeddingEncoding::Base64 => Some("base64"),
            },
            dimensions: request.dimensions,
            user: request.user.as_deref(),
        };
        serde_json::to_vec(&wire).map_err(|e| invalid(format!("could not encode the request: {e}")))
    }

    /// Vectors in `index` order (the API sends them so, but says so only by `index`).
    fn parse_embed(
        &self,
        body: &[u8],
        requested_model: &str,
        count: usize,
    ) -> Result<EmbedResponse, ProviderError> {
        let wire: WireEmbedResponse = decode_json(body)?;
        check_count(wire.data.len(), count)?;
        let mut slots: Vec<Option<Vec<f32>>> = vec![None; count];
        for (position, item) in wire.data.into_iter().enumerate() {
            let index = item.index.unwrap_or(position);
            let vector = match item.embedding {
                WireVector::Floats(values) => values,
                WireVector::Base64(text) => decode_base64_f32(&text)?,
            };
            match slots.get_mut(index) {
                Some(slot @ None) => *slot = Some(vector),
                _ => {
                    return Err(ProviderError::new(
                        ErrorClass::InvalidResponse,
                        "the provider's embedding indexes are not 0 to n-1",
                    ));
                }
            }
        }
        Ok(EmbedResponse {
            model: reply_model(wire.model, requested_model),
            embeddings: slots.into_iter().flatten().collect(),
            usage: wire.usage.map(|u| Usage {
                input_tokens: u.prompt_tokens,
                ..Usage::default()
            }),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Request
// ---------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<WireContent<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<WireToolCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum WireContent<'a> {
    Text(&'a str),
    Owned(String),
    Parts(Vec<WirePart<'a>>),
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WirePart<'a> {
    Text { text: &'a str },
    ImageUrl { image_url: WireImageUrl<'a> },
}

#[derive(Serialize)]
struct WireImageUrl<'a> {
    url: std::borrow::Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'static str>,
}

#[derive(Serialize)]
struct WireToolCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireFunctionCall<'a>,
}

#[derive(Serialize)]
struct WireFunctionCall<'a> {
    name: &'a str,
    arguments: &'a str,
}

#[derive(Serialize)]
struct WireTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireFunction<'a>,
}

#[derive(Serialize)]
struct WireFunction<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    parameters: &'a serde_json::Value,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    strict: bool,
}

fn invalid(msg: impl Into<String>) -> ProviderError {
    ProviderError::new(ErrorClass::InvalidRequest, msg)
}

fn convert_message<'a>(
    config: &OpenAiConfig,
    message: &'a crate::types::Message,
    out: &mut Vec<WireMessage<'a>>,
) -> Result<(), ProviderError> {
    let name = message.name.as_deref().filter(|n| !n.is_empty());
    match message.role {
        Role::Tool => {
            // One OpenAI tool message per result.
            for part in &message.content {
                match part {
                    ContentPart::ToolResult(result) => out.push(WireMessage {
                        role: "tool",
                        content: Some(WireContent::Text(&result.content)),
                        name: None,
                        tool_calls: Vec::new(),
                        tool_call_id: Some(&result.tool_call_id),
                    }),
                    ContentPart::Text(_) => {}
                    _ => return Err(invalid("a tool message may only hold tool results")),
                }
            }
            Ok(())
        }
        Role::Assistant => {
            let mut text: Option<WireContent<'a>> = None;
            let mut tool_calls = Vec::new();
            for part in &message.content {
                match part {
                    ContentPart::Text(t) => {
                        text = Some(match text {
                            None => WireContent::Text(t),
                            Some(WireContent::Text(prev)) => {
                                WireContent::Owned(format!("{prev}{t}"))
                            }
                            Some(WireContent::Owned(mut prev)) => {
                                prev.push_str(t);
                                WireContent::Owned(prev)
                            }
                            Some(parts) => parts,
                        });
                    }
                    ContentPart::ToolCall(call) => tool_calls.push(WireToolCall {
                        id: &call.id,
                        kind: "function",
                        function: WireFunctionCall {
                            name: &call.name,
                            arguments: if call.arguments.is_empty() {
                                "{}"
                            } else {
                                &call.arguments
                            },
                        },
                    }),
                    ContentPart::Image(_) => {
                        return Err(invalid("an assistant message cannot hold images"));
                    }
                    ContentPart::ToolResult(_) => {
                        return Err(invalid("tool results belong in a tool message"));
                    }
                }
            }
            out.push(WireMessage {
                role: "assistant",
                content: text,
                name,
                tool_calls,
                tool_call_id: None,
            });
            Ok(())
        }
        Role::System | Role::Developer | Role::User => {
            let role = match message.role {
                Role::User => "user",
                Role::Developer if config.developer_role => "developer",
                _ => "system",
            };
            let content = match message.content.as_slice() {
                [ContentPart::Text(t)] => WireContent::Text(t),
                parts => {
                    let mut wire = Vec::with_capacity(parts.len());
                    for part in parts {
                        match part {
                            ContentPart::Text(text) => wire.push(WirePart::Text { text }),
                            ContentPart::Image(image) => wire.push(WirePart::ImageUrl {
                                image_url: WireImageUrl {
                                    url: match &image.source {
                                        ImageSource::Url(url) => url.as_str().into(),
                                        ImageSource::Data(data) => format!(
                                            "data:{};base64,{}",
                                            image.mime_type.as_deref().unwrap_or("image/png"),
                                            base64::engine::general_purpose::STANDARD.encode(data)
                                        )
                                        .into(),
                                    },
                                    detail: match image.detail {
                                        ImageDetail::Default => None,
                                        ImageDetail::Auto => Some("auto"),
                                        ImageDetail::Low => Some("low"),
                                        ImageDetail::High => Some("high"),
                                    },
                                },
                            }),
                            ContentPart::ToolCall(_) | ContentPart::ToolResult(_) => {
                                return Err(invalid(
                                    "tool calls and results belong in assistant and tool messages",
                                ));
                            }
                        }
                    }
                    WireContent::Parts(wire)
                }
            };
            out.push(WireMessage {
                role,
                content: Some(content),
                name,
                tool_calls: Vec::new(),
                tool_call_id: None,
            });
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Response
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct WireResponse {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireChoice {
    message: WireResponseMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireResponseMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Vec<WireResponseToolCall>,
}

#[derive(Deserialize)]
struct WireResponseToolCall {
    #[serde(default)]
    id: String,
    function: WireResponseFunction,
}

#[derive(Deserialize)]
struct WireResponseFunction {
    #[serde(default)]
    name: String,
    #[serde(default)]
    arguments: String,
}

#[derive(Deserialize, Default)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Deserialize, Default)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize, Default)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        Usage {
            input_tokens: u.prompt_tokens,
            output_tokens: u.completion_tokens,
            cached_input_tokens: u.prompt_tokens_details.and_then(|d| d.cached_tokens),
            cache_write_tokens: None,
            reasoning_tokens: u.completion_tokens_details.and_then(|d| d.reasoning_tokens),
        }
    }
}

fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "stop" => FinishReason::Stop,
        "length" => FinishReason::Length,
        "tool_calls" | "function_call" => FinishReason::ToolCalls,
        "content_filter" => FinishReason::ContentFilter,
        _ => FinishReason::Other,
    }
}

// ---------------------------------------------------------------------------------------------
// Stream
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct WireChunk<'a> {
    #[serde(default, borrow)]
    choices: Choices<'a>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<WireError>,
}

#[derive(Deserialize)]
struct WireChunkChoice<'a> {
    #[serde(default)]
    delta: Option<WireDelta>,
    /// Borrowed from the event (it never has escapes).
    #[serde(default, borrow)]
    finish_reason: Option<std::borrow::Cow<'a, str>>,
}

/// A chunk's `choices`: nearly always one, kept inline (no allocation per chunk); any
/// further ones in a `Vec`.
#[derive(Default)]
struct Choices<'a> {
    first: Option<WireChunkChoice<'a>>,
    rest: Vec<WireChunkChoice<'a>>,
}

impl<'a> IntoIterator for Choices<'a> {
    type Item = WireChunkChoice<'a>;
    type IntoIter = std::iter::Chain<
        std::option::IntoIter<WireChunkChoice<'a>>,
        std::vec::IntoIter<WireChunkChoice<'a>>,
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.first.into_iter().chain(self.rest)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Choices<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Seq<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Seq<'a> {
            type Value = Choices<'a>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of choices")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Choices<'a>, A::Error> {
                let first = seq.next_element()?;
                let mut rest = Vec::new();
                if first.is_some() {
                    while let Some(choice) = seq.next_element()? {
                        rest.push(choice);
                    }
                }
                Ok(Choices { first, rest })
            }
        }
        deserializer.deserialize_seq(Seq(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct WireDelta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Vec<WireToolCallDelta>,
}

#[derive(Deserialize)]
struct WireToolCallDelta {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<WireFunctionDelta>,
}

#[derive(Deserialize)]
struct WireFunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

/// Decodes Chat Completions chunks.
#[derive(Debug, Default)]
pub struct ChunkDecoder {
    finish: Option<FinishReason>,
}

impl ChunkDecoder {
    fn finish(&mut self, out: &mut VecDeque<StreamEvent>) -> bool {
        match self.finish.take() {
            Some(reason) => {
                out.push_back(StreamEvent::Finish(reason));
                true
            }
            None => false,
        }
    }
}

impl EventDecoder for ChunkDecoder {
    fn decode(
        &mut self,
        event: &SseEvent,
        out: &mut VecDeque<StreamEvent>,
    ) -> Result<bool, ProviderError> {
        let data = event.data.trim();
        if data == "[DONE]" {
            if self.finish(out) {
                return Ok(true);
            }
            return Err(ProviderError::new(
                ErrorClass::StreamBroken,
                "the provider ended the stream without a finish reason",
            ));
        }
        let chunk: WireChunk = decode_event(data.as_bytes())?;
        if let Some(error) = chunk.error {
            return Err(ProviderError::in_stream(error.upstream()));
        }
        for choice in chunk.choices {
            if let Some(delta) = choice.delta {
                if let Some(text) = delta.reasoning_content.filter(|t| !t.is_empty()) {
                    out.push_back(StreamEvent::Reasoning(text));
                }
                if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
                    out.push_back(StreamEvent::Text(text));
                }
                if let Some(text) = delta.refusal.filter(|t| !t.is_empty()) {
                    out.push_back(StreamEvent::Text(text));
                }
                for call in delta.tool_calls {
                    let (name, arguments) = match call.function {
                        Some(f) => (f.name, f.arguments.unwrap_or_default()),
                        None => (None, String::new()),
                    };
                    out.push_back(StreamEvent::ToolCall(ToolCallDelta {
                        index: call.index,
                        id: call.id.filter(|s| !s.is_empty()),
                        name: name.filter(|s| !s.is_empty()),
                        arguments,
                    }));
                }
            }
            if let Some(reason) = choice.finish_reason.filter(|r| !r.is_empty()) {
                self.finish = Some(finish_reason(&reason));
            }
        }
        if let Some(usage) = chunk.usage {
            out.push_back(StreamEvent::Usage(usage.into()));
        }
        Ok(false)
    }

    fn end_of_body(&mut self, out: &mut VecDeque<StreamEvent>) -> Result<(), ProviderError> {
        if self.finish(out) {
            Ok(())
        } else {
            Err(ProviderError::truncated())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct WireErrorBody {
    error: WireError,
}

#[derive(Deserialize)]
struct WireError {
    #[serde(default)]
    message: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    code: Option<serde_json::Value>,
}

impl WireError {
    fn code_str(&self) -> Option<&str> {
        self.code
            .as_ref()
            .and_then(|c| c.as_str())
            .or(self.kind.as_deref())
    }

    fn upstream(self) -> UpstreamError {
        UpstreamError {
            class: self.code_str().and_then(class_from_code),
            message: self.message,
            retry_after: None,
        }
    }
}

fn class_from_code(code: &str) -> Option<ErrorClass> {
    Some(match code {
        "context_length_exceeded" | "string_above_max_length" => ErrorClass::ContextLengthExceeded,
        "content_filter" | "content_policy_violation" => ErrorClass::ContentFiltered,
        "model_not_found" => ErrorClass::ModelNotFound,
        "rate_limit_exceeded" | "insufficient_quota" | "rate_limit_error" => {
            ErrorClass::RateLimited
        }
        "invalid_api_key" | "authentication_error" => ErrorClass::Authentication,
        "server_error" => ErrorClass::ServerError,
        _ => return None,
    })
}

/// What an OpenAI error body (`{"error": {"message", "type", "code"}}`) says.
pub fn error_body(body: &[u8]) -> UpstreamError {
    serde_json::from_slice::<WireErrorBody>(body)
        .map(|b| b.error.upstream())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::types::{Image, Message, Tool, ToolResult};

    fn config() -> OpenAiConfig {
        OpenAiConfig::new(DEFAULT_BASE_URL)
    }

    fn json(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn builds_a_full_request() {
        let request = ChatRequest {
            model: "openai/gpt-4o-mini".into(),
            messages: vec![
                Message::text(Role::System, "be brief"),
                Message::text(Role::Developer, "dev note"),
                Message {
                    role: Role::User,
                    content: vec![
                        ContentPart::Text("what is this?".into()),
                        ContentPart::Image(Image {
                            source: ImageSource::Data(Bytes::from_static(b"\x89PNG")),
                            mime_type: Some("image/png".into()),
                            detail: ImageDetail::Low,
                        }),
                    ],
                    name: None,
                },
                Message {
                    role: Role::Assistant,
                    content: vec![ContentPart::ToolCall(ToolCall {
                        id: "call_1".into(),
                        name: "get_weather".into(),
                        arguments: r#"{"city":"Paris"}"#.into(),
                    })],
                    name: None,
                },
                Message {
                    role: Role::Tool,
                    content: vec![ContentPart::ToolResult(ToolResult {
                        tool_call_id: "call_1".into(),
                        name: None,
                        content: "sunny".into(),
                        is_error: false,
                    })],
                    name: None,
                },
            ],
            params: crate::types::SamplingParams {
                temperature: Some(0.5),
                max_tokens: Some(100),
                stop: vec!["END".into()],
                ..Default::default()
            },
            tools: vec![Tool {
                name: "get_weather".into(),
                description: Some("weather".into()),
                parameters: serde_json::json!({"type": "object"}),
                strict: false,
            }],
            tool_choice: Some(ToolChoice::Named("get_weather".into())),
            response_format: Some(ResponseFormat::JsonObject),
            user: Some("u1".into()),
            ..Default::default()
        };
        let body = json(
            &ChatCompletions::new(config())
                .build_request("gpt-4o-mini", &request, true)
                .unwrap(),
        );
        assert_eq!(
            body,
            serde_json::json!({
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "developer", "content": "dev note"},
                    {"role": "user", "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw==", "detail": "low"}}
                    ]},
                    {"role": "assistant", "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
                    ]},
                    {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
                ],
                "temperature": 0.5,
                "max_completion_tokens": 100,
                "stop": ["END"],
                "tools": [{"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": {"type": "object"}}}],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                "response_format": {"type": "json_object"},
                "user": "u1",
                "stream": true,
                "stream_options": {"include_usage": true}
            })
        );
    }

    #[test]
    fn compatible_servers_get_max_tokens_and_system() {
        let config = OpenAiConfig::new("http://127.0.0.1:8000/v1/");
        let request = ChatRequest {
            messages: vec![Message::text(Role::Developer, "x")],
            params: crate::types::SamplingParams {
                max_tokens: Some(5),
                ..Default::default()
            },
            ..Default::default()
        };
        let body = json(
            &ChatCompletions::new(config.clone())
                .build_request("m", &request, false)
                .unwrap(),
        );
        assert_eq!(body["max_tokens"], 5);
        assert_eq!(body["messages"][0]["role"], "system");
        assert!(body.get("stream").is_none());
        assert_eq!(config.base_url, "http://127.0.0.1:8000/v1");
    }

    #[test]
    fn azure_uses_deployment_urls() {
        let azure = OpenAiConfig::azure(
            "https://my-resource.openai.azure.com/",
            AZURE_DEFAULT_API_VERSION,
        );
        assert_eq!(azure.auth, AuthStyle::ApiKeyHeader);
        assert_eq!(
            azure.url("gpt-4o-prod").unwrap(),
            "https://my-resource.openai.azure.com/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21"
        );
        for bad in ["", "a/b", "x?y", "a b", "a&b"] {
            assert_eq!(
                azure.url(bad).unwrap_err().class,
                ErrorClass::InvalidRequest,
                "{bad}"
            );
        }
        let request = ChatRequest {
            messages: vec![Message::text(Role::Developer, "x")],
            params: crate::types::SamplingParams {
                max_tokens: Some(5),
                ..Default::default()
            },
            ..Default::default()
        };
        let body = json(
            &ChatCompletions::new(azure.clone())
                .build_request("gpt-4o-prod", &request, false)
                .unwrap(),
        );
        assert_eq!(body["max_completion_tokens"], 5);
        assert_eq!(body["messages"][0]["role"], "system");
        // Every other server keeps the base URL.
        assert_eq!(
            config().url("any/thing").unwrap(),
            "https://api.openai.com/v1/chat/completions"
        );
    }

    #[test]
    fn parses_a_documented_response() {
        let body = include_bytes!("../../tests/fixtures/openai/chat_completion.json");
        let response = ChatCompletions::new(config())
            .parse_response(body, "gpt-4o-mini")
            .unwrap();
        assert_eq!(response.model, "gpt-4o-mini-2024-07-18");
        assert_eq!(response.finish_reason, FinishReason::Stop);
        assert_eq!(
            response.content,
            vec![ContentPart::Text(
                "Hello there, how may I assist you today?".into()
            )]
        );
        let usage = response.usage.unwrap();
        assert_eq!((usage.input_tokens, usage.output_tokens), (9, 12));
        assert_eq!(usage.cached_input_tokens, Some(0));
        assert_eq!(usage.reasoning_tokens, Some(0));
    }

    #[test]
    fn parses_a_tool_call_response() {
        let body = include_bytes!("../../tests/fixtures/openai/chat_completion_tool_call.json");
        let response = ChatCompletions::new(config())
            .parse_response(body, "gpt-4o")
            .unwrap();
        assert_eq!(response.finish_reason, FinishReason::ToolCalls);
        assert_eq!(
            response.content,
            vec![ContentPart::ToolCall(ToolCall {
                id: "call_abc123".into(),
                name: "get_current_weather".into(),
                arguments: "{\n\"location\": \"Boston, MA\"\n}".into(),
            })]
        );
    }

    async fn decode_stream(body: &'static [u8]) -> Vec<Result<StreamEvent, ProviderError>> {
        crate::providers::wire::decode_in_pieces(body, 7, Sse::new(ChunkDecoder::default())).await
    }

    #[tokio::test]
    async fn decodes_a_documented_stream_with_usage() {
        let events = decode_stream(include_bytes!("../../tests/fixtures/openai/stream.txt")).await;
        let events: Vec<StreamEvent> = events.into_iter().map(Result::unwrap).collect();
        let text: String = events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(text, "Hello! How can I help?");
        assert!(matches!(
            events.last(),
            Some(StreamEvent::Finish(FinishReason::Stop))
        ));
        assert!(events.iter().any(
            |e| matches!(e, StreamEvent::Usage(u) if u.input_tokens == 19 && u.output_tokens == 7)
        ));
    }

    #[tokio::test]
    async fn decodes_streamed_tool_call_arguments() {
        let events = decode_stream(include_bytes!(
            "../../tests/fixtures/openai/stream_tool_call.txt"
        ))
        .await;
        let events: Vec<StreamEvent> = events.into_iter().map(Result::unwrap).collect();
        let mut args = String::new();
        let mut name = None;
        for e in &events {
            if let StreamEvent::ToolCall(d) = e {
                assert_eq!(d.index, 0);
                args.push_str(&d.arguments);
                if d.name.is_some() {
                    name.clone_from(&d.name);
                }
            }
        }
        assert_eq!(name.as_deref(), Some("get_current_weather"));
        assert_eq!(args, r#"{"location":"Boston, MA"}"#);
        assert!(matches!(
            events.last(),
            Some(StreamEvent::Finish(FinishReason::ToolCalls))
        ));
    }

    #[tokio::test]
    async fn finish_without_done_is_complete() {
        let events = decode_stream(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":\"length\"}]}\n\n",
        )
        .await;
        assert!(matches!(
            events.last(),
            Some(Ok(StreamEvent::Finish(FinishReason::Length)))
        ));
    }

    #[test]
    fn builds_and_parses_documented_embeddings() {
        let wire = ChatCompletions::new(config());
        assert_eq!(
            wire.embed_endpoint("text-embedding-3-small")
                .unwrap()
                .as_str(),
            "https://api.openai.com/v1/embeddings"
        );
        let azure = ChatCompletions::new(OpenAiConfig::azure(
            "https://r.openai.azure.com",
            AZURE_DEFAULT_API_VERSION,
        ));
        assert_eq!(
            azure.embed_endpoint("emb-prod").unwrap().as_str(),
            "https://r.openai.azure.com/openai/deployments/emb-prod/embeddings?api-version=2024-10-21"
        );
        assert!(azure.embed_endpoint("a/b").is_err());
        let request = EmbedRequest {
            inputs: vec!["The food was delicious".into(), "and the waiter".into()],
            dimensions: Some(256),
            encoding: EmbeddingEncoding::Base64,
            user: Some("u-1".into()),
            ..EmbedRequest::default()
        };
        let body = json(
            &wire
                .build_embed("text-embedding-3-small", &request, &request.inputs)
                .unwrap(),
        );
        assert_eq!(
            body,
            serde_json::json!({
                "model": "text-embedding-3-small",
                "input": ["The food was delicious", "and the waiter"],
                "encoding_format": "base64",
                "dimensions": 256,
                "user": "u-1",
            })
        );
        // The API reference's example answer (vectors shortened), indexes out of order.
        let documented = br#"{
          "object": "list",
          "data": [
            {"object": "embedding", "embedding": [0.5, -0.25], "index": 1},
            {"object": "embedding", "embedding": [0.0023064255, -0.009327292], "index": 0}
          ],
          "model": "text-embedding-3-small",
          "usage": {"prompt_tokens": 8, "total_tokens": 8}
        }"#;
        let answer = wire
            .parse_embed(documented, "text-embedding-3-small", 2)
            .unwrap();
        assert_eq!(
            answer.embeddings,
            [vec![0.0023064255, -0.009327292], vec![0.5, -0.25]]
        );
        assert_eq!(answer.usage.unwrap().input_tokens, 8);
        // base64: little-endian float32 bytes.
        let packed = br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":"AAAAPwAAgL8="}],"model":"m"}"#;
        let answer = wire.parse_embed(packed, "m", 1).unwrap();
        assert_eq!(answer.embeddings, [vec![0.5, -1.0]]);
        assert_eq!(answer.usage, None);
        for (bad, count) in [
            (&documented[..], 3),
            (
                &br#"{"data":[{"index":0,"embedding":[1]},{"index":0,"embedding":[2]}]}"#[..],
                2,
            ),
            (&br#"{"data":[{"index":5,"embedding":[1]}]}"#[..], 1),
            (&br#"{"data":[{"index":0,"embedding":"%%"}]}"#[..], 1),
            (&br#"{"data": [}"#[..], 1),
        ] {
            assert_eq!(
                wire.parse_embed(bad, "m", count).unwrap_err().class,
                ErrorClass::InvalidResponse,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
