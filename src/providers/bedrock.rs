//! AWS Bedrock through the Converse API (`POST {endpoint}/model/{modelId}/converse`) and
//! ConverseStream (`/converse-stream`, an `application/vnd.amazon.eventstream` body), signed
//! with AWS Signature Version 4 (service `bedrock`).
//!
//! One wire format serves every model family Bedrock hosts (Claude, Llama, Mistral, Nova...).
//! System and developer text goes to `system`; tool results become `toolResult` blocks in a
//! user message (same-role runs merged: Converse wants alternating turns); images must be
//! inline (`bytes`; Converse fetches no URLs). Sampling fields Converse does not have (seed,
//! penalties) are not sent; JSON response formats are refused; `tool_choice = none` sends no
//! tools. The model id goes into the path percent-encoded (`anthropic.claude-...-v1%3A0`);
//! inference-profile ids (`us.anthropic...`) and ARNs work the same way.
//!
//! Usage is normalized: Converse's `inputTokens` excludes cache reads and writes, the
//! gateway's [`Usage::input_tokens`] includes both. A stream ends with `messageStop` and then
//! `metadata` (usage); a body that ends after `messageStop` without `metadata` still counts as
//! complete, one that ends before `messageStop` is truncated. In-stream exceptions
//! (`:message-type: exception`) map through the same classification as HTTP errors.

use std::{collections::VecDeque, sync::Arc};

use aws_smithy_types::event_stream::Message as EventMessage;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::{
    ErrorClass, HttpProvider, Provider, ProviderError, UpstreamError,
    embed::{EmbedWire, check_count},
    eventstream::{EventStream, MessageDecoder, header_str},
    kinds::{
        BuildContext, Discovered, Env, KeyRequired, KindInput, KindSettings, KindSpec,
        ProviderSettings, SettingsIssue, base_url_or, discovered, env_var,
    },
    sigv4::{AwsCredentials, SigV4, uri_encode},
    wire::{Turn, WireFormat, decode_event, decode_json, parse_url, split_system},
};
use crate::types::{
    ChatRequest, ChatResponse, ContentPart, EmbedRequest, EmbedResponse, FinishReason, ImageSource,
    Message, ResponseFormat, Role, StreamEvent, ToolCall, ToolCallDelta, ToolChoice, Usage,
};

/// The provider kind.
pub const KIND: &str = "bedrock";

/// The SigV4 service name of the Bedrock runtime.
pub const SIGNING_SERVICE: &str = "bedrock";

/// The region used when none is configured or in `AWS_REGION` / `AWS_DEFAULT_REGION`.
pub const DEFAULT_REGION: &str = "us-east-1";

/// The Bedrock runtime endpoint of `region`.
pub fn default_endpoint(region: &str) -> String {
    format!("https://bedrock-runtime.{region}.amazonaws.com")
}

/// The Converse (or ConverseStream) URL of `model` under `endpoint`.
pub fn endpoint_url(endpoint: &str, model: &str, stream: bool) -> String {
    format!(
        "{}/model/{}/{}",
        endpoint.trim_end_matches('/'),
        uri_encode(model, false),
        if stream {
            "converse-stream"
        } else {
            "converse"
        }
    )
}

/// The Converse wire format.
#[derive(Debug, Clone)]
pub struct Converse {
    /// The runtime endpoint, e.g. `https://bedrock-runtime.us-east-1.amazonaws.com`.
    endpoint: String,
}

impl Converse {
    /// The wire format of the runtime at `endpoint`.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into().trim_end_matches('/').to_owned(),
        }
    }
}

impl WireFormat for Converse {
    type Decoder = EventStream<ConverseStreamDecoder>;

    fn endpoint(&self, model: &str, stream: bool) -> Result<reqwest::Url, ProviderError> {
        if model.is_empty() {
            return Err(invalid("the model name is empty"));
        }
        parse_url(&endpoint_url(&self.endpoint, model, stream))
    }

    fn build_request(
        &self,
        _model: &str,
        request: &ChatRequest,
        _stream: bool,
    ) -> Result<Vec<u8>, ProviderError> {
        build_request(request)
    }

    fn parse_response(&self, body: &[u8], model: &str) -> Result<ChatResponse, ProviderError> {
        parse_response(body, model)
    }

    fn stream_decoder(&self, _model: &str) -> Self::Decoder {
        EventStream::new(ConverseStreamDecoder::default())
    }

    fn error_body(&self, _status: u16, headers: &http::HeaderMap, body: &[u8]) -> UpstreamError {
        error_body(headers, body)
    }

    fn embeddings(&self) -> Option<&dyn EmbedWire> {
        Some(self)
    }
}

// ---------------------------------------------------------------------------------------------
// Embeddings (InvokeModel: `POST {endpoint}/model/{modelId}/invoke`)
// ---------------------------------------------------------------------------------------------

/// The most texts one Cohere Embed request on Bedrock may carry.
pub const COHERE_MAX_TEXTS: usize = 96;

/// The embedding model families InvokeModel bodies differ by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EmbedFamily {
    /// Amazon Titan Text Embeddings (`amazon.titan-embed-*`): one text per request.
    Titan,
    /// Cohere Embed (`cohere.embed-*`): up to 96 texts per request.
    Cohere,
}

/// The family of `model`, also behind a cross-region profile (`us.cohere.embed-...`).
fn embed_family(model: &str) -> EmbedFamily {
    if model.contains("cohere.embed") {
        EmbedFamily::Cohere
    } else {
        EmbedFamily::Titan
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireTitanRequest<'a> {
    input_text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireTitanResponse {
    embedding: Vec<f32>,
    #[serde(default)]
    input_text_token_count: Option<u64>,
}

#[derive(Serialize)]
struct WireCohereRequest<'a> {
    texts: &'a [String],
    input_type: &'static str,
}

#[derive(Deserialize)]
struct WireCohereResponse {
    embeddings: Vec<Vec<f32>>,
}

impl EmbedWire for Converse {
    fn max_batch(&self, model: &str) -> usize {
        match embed_family(model) {
            EmbedFamily::Titan => 1,
            EmbedFamily::Cohere => COHERE_MAX_TEXTS,
        }
    }

    fn embed_endpoint(&self, model: &str) -> Result<reqwest::Url, ProviderError> {
        if model.is_empty() {
            return Err(invalid("the model name is empty"));
        }
        parse_url(&format!(
            "{}/model/{}/invoke",
            self.endpoint,
            uri_encode(model, false)
        ))
    }

    /// Titan: `{"inputText", "dimensions"}` (v2 takes 256, 512 or 1024; vectors come
    /// normalized by default). Cohere: `{"texts", "input_type": "search_document"}`; Cohere
    /// v3 has no `dimensions`, so one set is refused here rather than ignored.
    fn build_embed(
        &self,
        model: &str,
        request: &EmbedRequest,
        inputs: &[String],
    ) -> Result<Vec<u8>, ProviderError> {
        let body = match embed_family(model) {
            EmbedFamily::Titan => {
                let [text] = inputs else {
                    return Err(invalid("titan embeds one text per request"));
                };
                serde_json::to_vec(&WireTitanRequest {
                    input_text: text,
                    dimensions: request.dimensions,
                })
            }
            EmbedFamily::Cohere => {
                if request.dimensions.is_some() {
                    return Err(invalid(
                        "cohere embed models on bedrock have a fixed number of dimensions",
                    ));
                }
                serde_json::to_vec(&WireCohereRequest {
                    texts: inputs,
                    input_type: "search_document",
                })
            }
        };
        body.map_err(|e| invalid(format!("could not encode the request: {e}")))
    }

    /// Titan reports `inputTextTokenCount`; Cohere's body has no usage.
    fn parse_embed(
        &self,
        body: &[u8],
        model: &str,
        count: usize,
    ) -> Result<EmbedResponse, ProviderError> {
        let (embeddings, usage) = match embed_family(model) {
            EmbedFamily::Titan => {
                let wire: WireTitanResponse = decode_json(body)?;
                (
                    vec![wire.embedding],
                    wire.input_text_token_count.map(|tokens| Usage {
                        input_tokens: tokens,
                        ..Usage::default()
                    }),
                )
            }
            EmbedFamily::Cohere => {
                let wire: WireCohereResponse = decode_json(body)?;
                (wire.embeddings, None)
            }
        };
        check_count(embeddings.len(), count)?;
        Ok(EmbedResponse {
            model: model.to_owned(),
            embeddings,
            usage,
        })
    }
}

/// The settings of `kind = "bedrock"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BedrockSettings {
    /// The AWS region (part of every signature).
    pub region: String,
    /// The runtime endpoint.
    pub endpoint: String,
}

/// The kind's own fields in `[providers.NAME]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBedrock {
    #[serde(default)]
    region: Option<String>,
}

impl KindSettings for BedrockSettings {
    fn build(&self, ctx: BuildContext<'_>) -> Arc<dyn Provider> {
        Arc::new(HttpProvider::new(
            ctx.name,
            KIND,
            Converse::new(&self.endpoint),
            Arc::new(SigV4::new(&self.region, SIGNING_SERVICE)),
            ctx.keys,
            ctx.client.clone(),
        ))
    }
}

/// Whether `region` looks like an AWS region name (`us-east-1`, `eu-central-2`...).
fn valid_region(region: &str) -> bool {
    !region.is_empty()
        && region.len() <= 32
        && region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn parse(input: &KindInput<'_>) -> Result<ProviderSettings, Vec<SettingsIssue>> {
    let raw: RawBedrock = input.fields()?;
    let region = raw.region.unwrap_or_else(|| DEFAULT_REGION.to_owned());
    if !valid_region(&region) {
        return Err(vec![SettingsIssue::new(
            "region",
            format!("`{region}` is not an aws region name, e.g. us-east-1"),
        )]);
    }
    let endpoint = base_url_or(input, || default_endpoint(&region)).map_err(|i| vec![i])?;
    Ok(ProviderSettings::new(BedrockSettings { region, endpoint }))
}

/// Zero-config: `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`)
/// register `bedrock` in `AWS_REGION` (or `AWS_DEFAULT_REGION`, else [`DEFAULT_REGION`]).
fn discover(env: Env<'_>) -> Option<Result<Discovered, SettingsIssue>> {
    let id = env_var(env, "AWS_ACCESS_KEY_ID")?;
    let Some(secret) = env_var(env, "AWS_SECRET_ACCESS_KEY") else {
        return Some(Err(SettingsIssue::new(
            "AWS_SECRET_ACCESS_KEY",
            "is required with AWS_ACCESS_KEY_ID",
        )));
    };
    let token = env_var(env, "AWS_SESSION_TOKEN");
    let Some(credentials) = AwsCredentials::new(&id, &secret, token.as_deref()) else {
        return Some(Err(SettingsIssue::new(
            "AWS_ACCESS_KEY_ID",
            "the aws credentials in the environment are malformed",
        )));
    };
    let mut found = discovered(KIND, None, credentials.to_key());
    if let Some(region) = env_var(env, "AWS_REGION").or_else(|| env_var(env, "AWS_DEFAULT_REGION"))
    {
        found
            .raw
            .extra
            .insert("region".to_owned(), toml::Value::String(region));
    }
    Some(Ok(found))
}

/// `kind = "bedrock"`.
pub const SPEC: KindSpec = KindSpec {
    name: KIND,
    // The default endpoint depends on the region: `parse` derives it.
    default_base_url: None,
    base_url_hint: "",
    http: false,
    key_env: &[],
    key_required: KeyRequired::Always,
    fields: &["region"],
    parse,
    discover: Some(discover),
};

// ---------------------------------------------------------------------------------------------
// Request
// ---------------------------------------------------------------------------------------------

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireRequest<'a> {
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    system: Vec<WireSystem<'a>>,
    #[serde(skip_serializing_if = "WireInferenceConfig::is_empty")]
    inference_config: WireInferenceConfig<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_config: Option<WireToolConfig<'a>>,
}

#[derive(Serialize)]
struct WireSystem<'a> {
    text: &'a str,
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    content: Vec<WireBlock<'a>>,
}

impl<'a> Turn for WireMessage<'a> {
    type Part = WireBlock<'a>;

    fn role(&self) -> &str {
        self.role
    }

    fn parts(&mut self) -> &mut Vec<WireBlock<'a>> {
        &mut self.content
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
enum WireBlock<'a> {
    Text(&'a str),
    Image(WireImage),
    ToolUse(WireToolUse<'a>),
    ToolResult(WireToolResult<'a>),
}

#[derive(Serialize)]
struct WireImage {
    format: &'static str,
    source: WireImageSource,
}

#[derive(Serialize)]
struct WireImageSource {
    bytes: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireToolUse<'a> {
    tool_use_id: &'a str,
    name: &'a str,
    input: serde_json::Value,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireToolResult<'a> {
    tool_use_id: &'a str,
    content: [WireToolResultText<'a>; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'static str>,
}

#[derive(Serialize)]
struct WireToolResultText<'a> {
    text: &'a str,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct WireInferenceConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    stop_sequences: &'a [String],
}

impl WireInferenceConfig<'_> {
    fn is_empty(&self) -> bool {
        self.max_tokens.is_none()
            && self.temperature.is_none()
            && self.top_p.is_none()
            && self.stop_sequences.is_empty()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireToolConfig<'a> {
    tools: Vec<WireTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<serde_json::Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireTool<'a> {
    tool_spec: WireToolSpec<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireToolSpec<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    input_schema: WireSchema<'a>,
}

#[derive(Serialize)]
struct WireSchema<'a> {
    json: &'a serde_json::Value,
}

fn invalid(msg: impl Into<String>) -> ProviderError {
    ProviderError::new(ErrorClass::InvalidRequest, msg)
}

/// Builds the JSON body of a Converse (or ConverseStream: the same body) request.
pub fn build_request(request: &ChatRequest) -> Result<Vec<u8>, ProviderError> {
    match &request.response_format {
        None | Some(ResponseFormat::Text) => {}
        Some(ResponseFormat::JsonObject | ResponseFormat::JsonSchema { .. }) => {
            return Err(invalid(
                "bedrock models do not support json response formats through this gateway",
            ));
        }
    }
    let (system, messages) = split_system(&request.messages, "bedrock", convert_message)?;
    let system = system.into_iter().map(|text| WireSystem { text }).collect();
    let tool_config = match (&request.tool_choice, request.tools.is_empty()) {
        (_, true) | (Some(ToolChoice::None), false) => None,
        (choice, false) => Some(WireToolConfig {
            tools: request
                .tools
                .iter()
                .map(|t| WireTool {
                    tool_spec: WireToolSpec {
                        name: &t.name,
                        description: t.description.as_deref(),
                        input_schema: WireSchema {
                            json: &t.parameters,
                        },
                    },
                })
                .collect(),
            tool_choice: match choice {
                None | Some(ToolChoice::None) => None,
                Some(ToolChoice::Auto) => Some(serde_json::json!({"auto": {}})),
                Some(ToolChoice::Required) => Some(serde_json::json!({"any": {}})),
                Some(ToolChoice::Named(name)) => Some(serde_json::json!({"tool": {"name": name}})),
            },
        }),
    };
    let wire = WireRequest {
        messages,
        system,
        inference_config: WireInferenceConfig {
            max_tokens: request.params.max_tokens,
            temperature: request.params.temperature,
            top_p: request.params.top_p,
            stop_sequences: &request.params.stop,
        },
        tool_config,
    };
    serde_json::to_vec(&wire).map_err(|e| invalid(format!("could not encode the request: {e}")))
}

fn convert_message(message: &Message) -> Result<WireMessage<'_>, ProviderError> {
    let role = match message.role {
        Role::Assistant => "assistant",
        _ => "user",
    };
    let mut content = Vec::with_capacity(message.content.len());
    for part in &message.content {
        match part {
            // Converse rejects empty text blocks.
            ContentPart::Text(text) if text.is_empty() => {}
            ContentPart::Text(text) => content.push(WireBlock::Text(text)),
            ContentPart::Image(image) => {
                if message.role != Role::User {
                    return Err(invalid("images are only allowed in user messages"));
                }
                content.push(WireBlock::Image(image_block(image)?));
            }
            ContentPart::ToolCall(call) => {
                if message.role != Role::Assistant {
                    return Err(invalid("tool calls belong in assistant messages"));
                }
                let input = if call.arguments.trim().is_empty() {
                    serde_json::Value::Object(serde_json::Map::new())
                } else {
                    serde_json::from_str::<serde_json::Value>(&call.arguments)
                        .ok()
                        .filter(serde_json::Value::is_object)
                        .ok_or_else(|| {
                            invalid(format!(
                                "the arguments of tool call `{}` are not a json object",
                                call.id
                            ))
                        })?
                };
                content.push(WireBlock::ToolUse(WireToolUse {
                    tool_use_id: &call.id,
                    name: &call.name,
                    input,
                }));
            }
            ContentPart::ToolResult(result) => {
                if message.role != Role::Tool {
                    return Err(invalid("tool results belong in tool messages"));
                }
                content.push(WireBlock::ToolResult(WireToolResult {
                    tool_use_id: &result.tool_call_id,
                    content: [WireToolResultText {
                        text: &result.content,
                    }],
                    status: result.is_error.then_some("error"),
                }));
            }
        }
    }
    // Tool results come first in their user message.
    content.sort_by_key(|b| !matches!(b, WireBlock::ToolResult(_)));
    Ok(WireMessage { role, content })
}

/// The Converse image format of a MIME type.
fn image_format(mime: &str) -> Option<&'static str> {
    Some(match mime {
        "image/png" => "png",
        "image/jpeg" | "image/jpg" => "jpeg",
        "image/gif" => "gif",
        "image/webp" => "webp",
        _ => return None,
    })
}

fn image_block(image: &crate::types::Image) -> Result<WireImage, ProviderError> {
    let unsupported = |mime: &str| {
        invalid(format!(
            "bedrock accepts png, jpeg, gif and webp images, not `{mime}`"
        ))
    };
    let (mime, bytes) = match &image.source {
        ImageSource::Data(data) => (
            image.mime_type.as_deref().unwrap_or("image/png"),
            base64::engine::general_purpose::STANDARD.encode(data),
        ),
        ImageSource::Url(url) => match super::anthropic::parse_data_url(url) {
            Some((mime, data)) => (mime, data.to_owned()),
            None => {
                return Err(invalid(
                    "bedrock accepts images only as inline data (bytes or base64 data urls)",
                ));
            }
        },
    };
    Ok(WireImage {
        format: image_format(mime).ok_or_else(|| unsupported(mime))?,
        source: WireImageSource { bytes },
    })
}

// ---------------------------------------------------------------------------------------------
// Response
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireResponse {
    /// Required: a body without it is not a Converse response.
    output: WireOutput,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireOutput {
    message: WireResponseMessage,
}

#[derive(Deserialize)]
struct WireResponseMessage {
    #[serde(default)]
    content: Vec<WireResponseBlock>,
}

/// One content block: exactly one member is set (`text`, `toolUse`, `reasoningContent`...).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireResponseBlock {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    tool_use: Option<WireResponseToolUse>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireResponseToolUse {
    #[serde(default)]
    tool_use_id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    input: serde_json::Value,
}

/// Converse's usage counts.
#[derive(Debug, Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "camelCase")]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_write_input_tokens: Option<u64>,
}

impl WireUsage {
    fn is_empty(&self) -> bool {
        self.input_tokens.is_none()
            && self.output_tokens.is_none()
            && self.cache_read_input_tokens.is_none()
            && self.cache_write_input_tokens.is_none()
    }
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        Usage {
            // Converse's inputTokens excludes cache reads and writes; ours includes both.
            input_tokens: u
                .input_tokens
                .unwrap_or(0)
                .saturating_add(u.cache_read_input_tokens.unwrap_or(0))
                .saturating_add(u.cache_write_input_tokens.unwrap_or(0)),
            output_tokens: u.output_tokens.unwrap_or(0),
            cached_input_tokens: u.cache_read_input_tokens,
            cache_write_tokens: u.cache_write_input_tokens,
            reasoning_tokens: None,
        }
    }
}

fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "end_turn" | "stop_sequence" => FinishReason::Stop,
        "max_tokens" | "model_context_window_exceeded" => FinishReason::Length,
        "tool_use" => FinishReason::ToolCalls,
        "guardrail_intervened" | "content_filtered" => FinishReason::ContentFilter,
        _ => FinishReason::Other,
    }
}

fn tool_arguments(input: serde_json::Value) -> String {
    match input {
        serde_json::Value::Null => "{}".to_owned(),
        other => other.to_string(),
    }
}

/// Parses a Converse response. Converse names no model; the requested one is reported.
pub fn parse_response(body: &[u8], requested_model: &str) -> Result<ChatResponse, ProviderError> {
    let wire: WireResponse = decode_json(body)?;
    let blocks = wire.output.message.content;
    let mut content = Vec::with_capacity(blocks.len());
    for block in blocks {
        if let Some(text) = block.text.filter(|t| !t.is_empty()) {
            match content.last_mut() {
                Some(ContentPart::Text(prev)) => prev.push_str(&text),
                _ => content.push(ContentPart::Text(text)),
            }
        } else if let Some(call) = block.tool_use {
            content.push(ContentPart::ToolCall(ToolCall {
                id: call.tool_use_id,
                name: call.name,
                arguments: tool_arguments(call.input),
            }));
        }
        // Reasoning, citations, guardrail and other blocks are not part of the reply.
    }
    Ok(ChatResponse {
        model: requested_model.to_owned(),
        content,
        finish_reason: wire
            .stop_reason
            .as_deref()
            .map_or(FinishReason::Unspecified, finish_reason),
        usage: wire.usage.filter(|u| !u.is_empty()).map(Usage::from),
    })
}

// ---------------------------------------------------------------------------------------------
// Stream
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireBlockStart {
    #[serde(default)]
    content_block_index: u32,
    #[serde(default)]
    start: Option<WireStart>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireStart {
    #[serde(default)]
    tool_use: Option<WireStartToolUse>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireStartToolUse {
    #[serde(default)]
    tool_use_id: String,
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireBlockDelta {
    #[serde(default)]
    content_block_index: u32,
    #[serde(default)]
    delta: Option<WireDelta>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireDelta {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    tool_use: Option<WireDeltaToolUse>,
    #[serde(default)]
    reasoning_content: Option<WireDeltaReasoning>,
}

#[derive(Deserialize)]
struct WireDeltaToolUse {
    #[serde(default)]
    input: String,
}

#[derive(Deserialize)]
struct WireDeltaReasoning {
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireMessageStop {
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireMetadata {
    #[serde(default)]
    usage: Option<WireUsage>,
}

/// An error body or exception payload: `message` (or `Message`), and `__type` in some.
#[derive(Deserialize, Default)]
struct WireErrorBody {
    #[serde(default, alias = "Message")]
    message: Option<String>,
    #[serde(default, rename = "__type")]
    kind: Option<String>,
}

fn payload<'a, T: Deserialize<'a>>(message: &'a EventMessage) -> Result<T, ProviderError> {
    decode_event(message.payload())
}

/// Decodes the ConverseStream event stream.
#[derive(Debug, Default)]
pub struct ConverseStreamDecoder {
    finish: Option<FinishReason>,
    /// Content block index -> tool call index (tool calls count from 0).
    tool_blocks: Vec<(u32, u32)>,
}

impl MessageDecoder for ConverseStreamDecoder {
    fn decode(
        &mut self,
        message: &EventMessage,
        out: &mut VecDeque<StreamEvent>,
    ) -> Result<bool, ProviderError> {
        match header_str(message, ":message-type") {
            Some("event") => {}
            Some("exception") => {
                let kind = header_str(message, ":exception-type");
                let body: WireErrorBody =
                    serde_json::from_slice(message.payload()).unwrap_or_default();
                return Err(ProviderError::in_stream(upstream(kind, body.message)));
            }
            Some("error") => {
                let code = header_str(message, ":error-code");
                let text = header_str(message, ":error-message").map(str::to_owned);
                return Err(ProviderError::in_stream(upstream(code, text)));
            }
            _ => {
                return Err(ProviderError::malformed_event(
                    "an event-stream message without a known :message-type",
                ));
            }
        }
        match header_str(message, ":event-type").unwrap_or_default() {
            "contentBlockStart" => {
                let start: WireBlockStart = payload(message)?;
                if let Some(tool) = start.start.and_then(|s| s.tool_use) {
                    let index = u32::try_from(self.tool_blocks.len()).unwrap_or(u32::MAX);
                    self.tool_blocks.push((start.content_block_index, index));
                    out.push_back(StreamEvent::ToolCall(ToolCallDelta {
                        index,
                        id: Some(tool.tool_use_id).filter(|s| !s.is_empty()),
                        name: Some(tool.name).filter(|s| !s.is_empty()),
                        arguments: String::new(),
                    }));
                }
            }
            "contentBlockDelta" => {
                let delta: WireBlockDelta = payload(message)?;
                let Some(d) = delta.delta else {
                    return Ok(false);
                };
                if let Some(text) = d.text.filter(|t| !t.is_empty()) {
                    out.push_back(StreamEvent::Text(text));
                } else if let Some(tool) = d.tool_use {
                    let index = self
                        .tool_blocks
                        .iter()
                        .find(|(b, _)| *b == delta.content_block_index)
                        .map(|(_, t)| *t)
                        .ok_or_else(|| {
                            ProviderError::malformed_event(
                                "tool input for a block that is not a tool",
                            )
                        })?;
                    if !tool.input.is_empty() {
                        out.push_back(StreamEvent::ToolCall(ToolCallDelta {
                            index,
                            id: None,
                            name: None,
                            arguments: tool.input,
                        }));
                    }
                } else if let Some(text) = d
                    .reasoning_content
                    .and_then(|r| r.text)
                    .filter(|t| !t.is_empty())
                {
                    out.push_back(StreamEvent::Reasoning(text));
                }
            }
            "messageStop" => {
                let stop: WireMessageStop = payload(message)?;
                self.finish = Some(
                    stop.stop_reason
                        .as_deref()
                        .map_or(FinishReason::Unspecified, finish_reason),
                );
            }
            "metadata" => {
                let meta: WireMetadata = payload(message)?;
                let Some(finish) = self.finish.take() else {
                    return Err(ProviderError::malformed_event(
                        "stream metadata before the message stopped",
                    ));
                };
                if let Some(usage) = meta.usage.filter(|u| !u.is_empty()) {
                    out.push_back(StreamEvent::Usage(usage.into()));
                }
                out.push_back(StreamEvent::Finish(finish));
                return Ok(true);
            }
            // messageStart, contentBlockStop and event types added later.
            _ => {}
        }
        Ok(false)
    }

    fn end_of_body(&mut self, out: &mut VecDeque<StreamEvent>) -> Result<(), ProviderError> {
        match self.finish.take() {
            Some(finish) => {
                out.push_back(StreamEvent::Finish(finish));
                Ok(())
            }
            None => Err(ProviderError::truncated()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// The class of a Bedrock error type (`x-amzn-ErrorType`, `:exception-type`, `__type`), in
/// either spelling (`ThrottlingException`, `throttlingException`).
fn class_from_type(kind: &str) -> Option<ErrorClass> {
    // `ValidationException:http://internal.amazon.com/...` and `com.amazon...#Name` forms.
    let kind = kind.split(':').next().unwrap_or_default();
    let kind = kind.rsplit('#').next().unwrap_or_default();
    Some(match kind.to_ascii_lowercase().as_str() {
        "throttlingexception" | "servicequotaexceededexception" => ErrorClass::RateLimited,
        "serviceunavailableexception" | "modelnotreadyexception" => ErrorClass::Overloaded,
        "modeltimeoutexception" => ErrorClass::Timeout,
        "internalserverexception" | "modelerrorexception" => ErrorClass::ServerError,
        "modelstreamerrorexception" => ErrorClass::StreamBroken,
        "validationexception" => ErrorClass::InvalidRequest,
        "accessdeniedexception" => ErrorClass::Permission,
        "unrecognizedclientexception"
        | "invalidsignatureexception"
        | "incompletesignatureexception"
        | "expiredtokenexception"
        | "missingauthenticationtokenexception" => ErrorClass::Authentication,
        "resourcenotfoundexception" => ErrorClass::ModelNotFound,
        _ => return None,
    })
}

/// Whether an error message says the prompt does not fit the model's context.
fn says_context_length(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    lower.contains("too long")
        || lower.contains("too many input tokens")
        || lower.contains("context length")
        || lower.contains("context window")
}

/// What a Bedrock error type and message say.
fn upstream(kind: Option<&str>, message: Option<String>) -> UpstreamError {
    let class = kind.and_then(class_from_type);
    // A validation error (or an untyped one) that says the prompt does not fit.
    let class = match class {
        Some(ErrorClass::InvalidRequest) | None
            if says_context_length(message.as_deref().unwrap_or_default()) =>
        {
            Some(ErrorClass::ContextLengthExceeded)
        }
        other => other,
    };
    UpstreamError {
        class,
        message,
        retry_after: None,
    }
}

/// What an HTTP error answer says: the type from `x-amzn-ErrorType` (or the body's
/// `__type`), the body's `message`.
pub fn error_body(headers: &http::HeaderMap, body: &[u8]) -> UpstreamError {
    let wire: WireErrorBody = serde_json::from_slice(body).unwrap_or_default();
    let kind = headers
        .get("x-amzn-errortype")
        .and_then(|v| v.to_str().ok())
        .filter(|k| class_from_type(k).is_some())
        .or(wire.kind.as_deref());
    upstream(kind, wire.message.clone())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::{
        providers::{eventstream::encode_message, wire::decode_in_pieces},
        types::{Image, ImageDetail, SamplingParams, Tool, ToolResult},
    };

    fn json(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn builds_a_full_request() {
        let request = ChatRequest {
            model: "bedrock/anthropic.claude-3-haiku-20240307-v1:0".into(),
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
                            detail: ImageDetail::Default,
                        }),
                        ContentPart::Image(Image {
                            source: ImageSource::Url("data:image/jpeg;base64,/9j/".into()),
                            mime_type: None,
                            detail: ImageDetail::Default,
                        }),
                    ],
                    name: None,
                },
                Message {
                    role: Role::Assistant,
                    content: vec![
                        ContentPart::Text("checking".into()),
                        ContentPart::ToolCall(ToolCall {
                            id: "tooluse_1".into(),
                            name: "get_weather".into(),
                            arguments: r#"{"city":"Paris"}"#.into(),
                        }),
                    ],
                    name: None,
                },
                Message {
                    role: Role::Tool,
                    content: vec![ContentPart::ToolResult(ToolResult {
                        tool_call_id: "tooluse_1".into(),
                        name: None,
                        content: "no such city".into(),
                        is_error: true,
                    })],
                    name: None,
                },
                Message::text(Role::User, "and tomorrow?"),
            ],
            params: SamplingParams {
                temperature: Some(0.5),
                top_p: Some(0.9),
                max_tokens: Some(100),
                stop: vec!["END".into()],
                seed: Some(7),
                ..SamplingParams::default()
            },
            tools: vec![Tool {
                name: "get_weather".into(),
                description: Some("weather".into()),
                parameters: serde_json::json!({"type": "object"}),
                strict: false,
            }],
            tool_choice: Some(ToolChoice::Named("get_weather".into())),
            ..ChatRequest::default()
        };
        let body = json(&build_request(&request).unwrap());
        assert_eq!(
            body,
            serde_json::json!({
                "messages": [
                    {"role": "user", "content": [
                        {"text": "what is this?"},
                        {"image": {"format": "png", "source": {"bytes": "iVBORw=="}}},
                        {"image": {"format": "jpeg", "source": {"bytes": "/9j/"}}}
                    ]},
                    {"role": "assistant", "content": [
                        {"text": "checking"},
                        {"toolUse": {"toolUseId": "tooluse_1", "name": "get_weather", "input": {"city": "Paris"}}}
                    ]},
                    {"role": "user", "content": [
                        {"toolResult": {"toolUseId": "tooluse_1", "content": [{"text": "no such city"}], "status": "error"}},
                        {"text": "and tomorrow?"}
                    ]}
                ],
                "system": [{"text": "be brief"}, {"text": "dev note"}],
                "inferenceConfig": {"maxTokens": 100, "temperature": 0.5, "topP": 0.9, "stopSequences": ["END"]},
                "toolConfig": {
                    "tools": [{"toolSpec": {"name": "get_weather", "description": "weather", "inputSchema": {"json": {"type": "object"}}}}],
                    "toolChoice": {"tool": {"name": "get_weather"}}
                }
            })
        );
    }

    #[test]
    fn refuses_what_converse_cannot_carry() {
        let mut request = ChatRequest {
            messages: vec![Message {
                role: Role::User,
                content: vec![ContentPart::Image(Image {
                    source: ImageSource::Url("https://example.com/cat.png".into()),
                    mime_type: None,
                    detail: ImageDetail::Default,
                })],
                name: None,
            }],
            ..ChatRequest::default()
        };
        let err = build_request(&request).unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidRequest);
        assert!(err.message.contains("inline data"), "{}", err.message);
        request.messages = vec![Message::text(Role::User, "hi")];
        request.response_format = Some(ResponseFormat::JsonObject);
        assert!(build_request(&request).is_err());
        // tool_choice none sends no tools; a minimal request has no inferenceConfig.
        request.response_format = None;
        request.tools = vec![Tool {
            name: "t".into(),
            description: None,
            parameters: serde_json::json!({"type": "object"}),
            strict: false,
        }];
        request.tool_choice = Some(ToolChoice::None);
        assert_eq!(
            json(&build_request(&request).unwrap()),
            serde_json::json!({"messages": [{"role": "user", "content": [{"text": "hi"}]}]})
        );
    }

    #[test]
    fn model_ids_are_encoded_in_the_path() {
        assert_eq!(
            endpoint_url(
                "https://bedrock-runtime.us-east-1.amazonaws.com/",
                "anthropic.claude-3-haiku-20240307-v1:0",
                true
            ),
            "https://bedrock-runtime.us-east-1.amazonaws.com/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse-stream"
        );
    }

    /// The response sample of the Converse API reference, with a tool call and cache usage.
    #[test]
    fn parses_a_converse_response() {
        let body = br#"{
            "output": {"message": {"role": "assistant", "content": [
                {"text": "Let me check. "},
                {"reasoningContent": {"reasoningText": {"text": "hmm", "signature": "x"}}},
                {"toolUse": {"toolUseId": "tooluse_abc", "name": "get_weather", "input": {"city": "Paris"}}}
            ]}},
            "stopReason": "tool_use",
            "usage": {"inputTokens": 30, "outputTokens": 12, "totalTokens": 142, "cacheReadInputTokens": 100, "cacheWriteInputTokens": 0},
            "metrics": {"latencyMs": 512}
        }"#;
        let r = parse_response(body, "anthropic.claude-3-haiku-20240307-v1:0").unwrap();
        assert_eq!(r.model, "anthropic.claude-3-haiku-20240307-v1:0");
        assert_eq!(r.finish_reason, FinishReason::ToolCalls);
        assert_eq!(
            r.content,
            vec![
                ContentPart::Text("Let me check. ".into()),
                ContentPart::ToolCall(ToolCall {
                    id: "tooluse_abc".into(),
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into(),
                })
            ]
        );
        let usage = r.usage.unwrap();
        assert_eq!(usage.input_tokens, 130);
        assert_eq!(usage.output_tokens, 12);
        assert_eq!(usage.cached_input_tokens, Some(100));
        assert_eq!(usage.cache_write_tokens, Some(0));
        assert!(parse_response(b"{not json", "m").is_err());
    }

    fn event(kind: &str, payload: &str) -> Vec<u8> {
        encode_message(
            &[
                (":event-type", kind),
                (":content-type", "application/json"),
                (":message-type", "event"),
            ],
            payload.to_owned(),
        )
    }

    fn sample_stream() -> Vec<Vec<u8>> {
        vec![
            event("messageStart", r#"{"p":"abcd","role":"assistant"}"#),
            event(
                "contentBlockDelta",
                r#"{"contentBlockIndex":0,"delta":{"text":"Hel"},"p":"ab"}"#,
            ),
            event(
                "contentBlockDelta",
                r#"{"contentBlockIndex":0,"delta":{"text":"lo"},"p":"ab"}"#,
            ),
            event("contentBlockStop", r#"{"contentBlockIndex":0}"#),
            event(
                "contentBlockStart",
                r#"{"contentBlockIndex":1,"start":{"toolUse":{"toolUseId":"tooluse_1","name":"get_weather"}}}"#,
            ),
            event(
                "contentBlockDelta",
                r#"{"contentBlockIndex":1,"delta":{"toolUse":{"input":"{\"city\":"}}}"#,
            ),
            event(
                "contentBlockDelta",
                r#"{"contentBlockIndex":1,"delta":{"toolUse":{"input":"\"Paris\"}"}}}"#,
            ),
            event("contentBlockStop", r#"{"contentBlockIndex":1}"#),
            event("messageStop", r#"{"stopReason":"tool_use"}"#),
            event(
                "metadata",
                r#"{"usage":{"inputTokens":10,"outputTokens":5,"totalTokens":15},"metrics":{"latencyMs":100}}"#,
            ),
        ]
    }

    #[tokio::test]
    async fn decodes_a_converse_stream() {
        let body = sample_stream().concat();
        let events: Vec<_> =
            decode_in_pieces(&body, 7, EventStream::new(ConverseStreamDecoder::default()))
                .await
                .into_iter()
                .map(Result::unwrap)
                .collect();
        assert_eq!(
            events,
            vec![
                StreamEvent::Text("Hel".into()),
                StreamEvent::Text("lo".into()),
                StreamEvent::ToolCall(ToolCallDelta {
                    index: 0,
                    id: Some("tooluse_1".into()),
                    name: Some("get_weather".into()),
                    arguments: String::new(),
                }),
                StreamEvent::ToolCall(ToolCallDelta {
                    index: 0,
                    id: None,
                    name: None,
                    arguments: r#"{"city":"#.into(),
                }),
                StreamEvent::ToolCall(ToolCallDelta {
                    index: 0,
                    id: None,
                    name: None,
                    arguments: r#""Paris"}"#.into(),
                }),
                StreamEvent::Usage(Usage {
                    input_tokens: 10,
                    output_tokens: 5,
                    ..Usage::default()
                }),
                StreamEvent::Finish(FinishReason::ToolCalls),
            ]
        );
    }

    #[tokio::test]
    async fn broken_streams_are_errors() {
        // Cut before messageStop: truncated.
        let frames = sample_stream();
        let body = frames[..5].concat();
        let items =
            decode_in_pieces(&body, 7, EventStream::new(ConverseStreamDecoder::default())).await;
        let err = items.last().unwrap().as_ref().unwrap_err();
        assert_eq!(err.class, ErrorClass::StreamBroken);
        // Cut inside a frame: truncated.
        let all = frames.concat();
        let items = decode_in_pieces(
            &all[..all.len() - 3],
            7,
            EventStream::new(ConverseStreamDecoder::default()),
        )
        .await;
        assert!(items.last().unwrap().is_err());
        // Ending after messageStop without metadata is complete.
        let body = frames[..9].concat();
        let items =
            decode_in_pieces(&body, 7, EventStream::new(ConverseStreamDecoder::default())).await;
        assert_eq!(
            items.last().unwrap().as_ref().unwrap(),
            &StreamEvent::Finish(FinishReason::ToolCalls)
        );
        // A garbled frame fails its checksum.
        let mut garbled = frames.concat();
        garbled[30] ^= 0x20;
        let items = decode_in_pieces(
            &garbled,
            7,
            EventStream::new(ConverseStreamDecoder::default()),
        )
        .await;
        assert!(items.iter().any(Result::is_err));
        // An in-stream exception keeps its class.
        let mut body = frames[..2].concat();
        body.extend(encode_message(
            &[
                (":exception-type", "throttlingException"),
                (":content-type", "application/json"),
                (":message-type", "exception"),
            ],
            r#"{"message":"Too many requests"}"#,
        ));
        let items =
            decode_in_pieces(&body, 7, EventStream::new(ConverseStreamDecoder::default())).await;
        let err = items.last().unwrap().as_ref().unwrap_err();
        assert_eq!(err.class, ErrorClass::StreamBroken, "{err:?}");
        let mut body = frames[..2].concat();
        body.extend(encode_message(
            &[
                (":exception-type", "validationException"),
                (":message-type", "exception"),
            ],
            r#"{"message":"Input is too long for requested model."}"#,
        ));
        let items =
            decode_in_pieces(&body, 7, EventStream::new(ConverseStreamDecoder::default())).await;
        let err = items.last().unwrap().as_ref().unwrap_err();
        assert_eq!(err.class, ErrorClass::ContextLengthExceeded, "{err:?}");
        let mut body = frames[..2].concat();
        body.extend(encode_message(
            &[
                (":exception-type", "serviceUnavailableException"),
                (":message-type", "exception"),
            ],
            r#"{"message":"busy"}"#,
        ));
        let items =
            decode_in_pieces(&body, 7, EventStream::new(ConverseStreamDecoder::default())).await;
        let err = items.last().unwrap().as_ref().unwrap_err();
        assert_eq!(err.class, ErrorClass::Overloaded, "{err:?}");
    }

    fn settings(toml: &str) -> Result<BedrockSettings, Vec<SettingsIssue>> {
        let raw: crate::providers::RawProvider = toml::from_str(toml).unwrap();
        let mut issues = Vec::new();
        let config = crate::providers::kinds::validate("bedrock", raw, &|_| None, &mut issues);
        match config {
            Some(c) if issues.is_empty() => {
                Ok(c.settings.get::<BedrockSettings>().unwrap().clone())
            }
            _ => Err(issues),
        }
    }

    #[test]
    fn settings_default_the_endpoint_from_the_region() {
        let s = settings("api_key = \"AKID:secret\"\nregion = \"eu-central-1\"").unwrap();
        assert_eq!(
            s.endpoint,
            "https://bedrock-runtime.eu-central-1.amazonaws.com"
        );
        let s = settings("api_key = \"AKID:secret\"").unwrap();
        assert_eq!(s.region, DEFAULT_REGION);
        let s = settings("api_key = \"AKID:secret\"\nbase_url = \"http://127.0.0.1:9/\"").unwrap();
        assert_eq!(s.endpoint, "http://127.0.0.1:9");
        let fields = |r: Result<BedrockSettings, Vec<SettingsIssue>>| {
            r.unwrap_err()
                .into_iter()
                .map(|i| i.field)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            fields(settings("api_key = \"AKID:secret\"\nregion = \"EU WEST\"")),
            ["region"]
        );
        assert_eq!(fields(settings("region = \"us-east-1\"")), ["api_key"]);
        assert_eq!(
            fields(settings("api_key = \"k\"\nbase_url = \"ftp://x\"")),
            ["base_url"]
        );
        assert_eq!(
            fields(settings("api_key = \"k\"\nproject = \"p\"")),
            ["project"]
        );
    }

    #[test]
    fn discovery_composes_the_aws_environment() {
        let env = |name: &str| {
            match name {
                "AWS_ACCESS_KEY_ID" => Some("AKIDX"),
                "AWS_SECRET_ACCESS_KEY" => Some("sec"),
                "AWS_SESSION_TOKEN" => Some("tok"),
                "AWS_REGION" => Some("ap-south-1"),
                _ => None,
            }
            .map(str::to_owned)
        };
        let found = discover(&env).unwrap().unwrap();
        assert_eq!(found.name, "bedrock");
        assert_eq!(found.raw.api_key.as_deref(), Some("AKIDX:sec:tok"));
        assert_eq!(found.raw.extra["region"].as_str(), Some("ap-south-1"));
        let only_id = |name: &str| (name == "AWS_ACCESS_KEY_ID").then(|| "AKIDX".to_owned());
        assert_eq!(
            discover(&only_id).unwrap().unwrap_err().field,
            "AWS_SECRET_ACCESS_KEY"
        );
        assert!(discover(&|_| None).is_none());
    }

    #[test]
    fn maps_bedrock_errors() {
        let mut headers = http::HeaderMap::new();
        let mut with_type = |kind: &str| {
            headers.insert(
                "x-amzn-errortype",
                http::HeaderValue::from_str(kind).unwrap(),
            );
            headers.clone()
        };
        let cases = [
            (
                429,
                "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/",
                ErrorClass::RateLimited,
            ),
            (503, "ServiceUnavailableException", ErrorClass::Overloaded),
            (403, "InvalidSignatureException", ErrorClass::Authentication),
            (
                403,
                "UnrecognizedClientException",
                ErrorClass::Authentication,
            ),
            (403, "AccessDeniedException", ErrorClass::Permission),
            (404, "ResourceNotFoundException", ErrorClass::ModelNotFound),
            (408, "ModelTimeoutException", ErrorClass::Timeout),
            // The shared policy: a body never turns a permanent status transient.
            (424, "ModelErrorException", ErrorClass::InvalidRequest),
            (500, "InternalServerException", ErrorClass::ServerError),
            (400, "ValidationException", ErrorClass::InvalidRequest),
            // A permanent type does not overrule a transient status.
            (503, "ValidationException", ErrorClass::Overloaded),
        ];
        for (status, kind, class) in cases {
            let err =
                Converse::new("http://x").classify(status, &with_type(kind), br#"{"message":"m"}"#);
            assert_eq!(err.class, class, "{status} {kind}");
        }
        let wire = Converse::new("http://x");
        let err = wire.classify(
            400,
            &with_type("ValidationException"),
            br#"{"message":"Input is too long for requested model."}"#,
        );
        assert_eq!(err.class, ErrorClass::ContextLengthExceeded);
        assert!(err.message.contains("too long"));
        // Without the header, the body's __type or the status decides.
        let err = wire.classify(
            400,
            &http::HeaderMap::new(),
            br#"{"__type":"com.amazon.coral.service#ExpiredTokenException","message":"expired"}"#,
        );
        assert_eq!(err.class, ErrorClass::Authentication);
        let err = wire.classify(502, &http::HeaderMap::new(), b"<html>");
        assert_eq!(err.class, ErrorClass::ServerError);
        assert!(!err.message.contains("html"));
    }

    #[test]
    fn builds_and_parses_documented_titan_and_cohere_embeddings() {
        let wire = Converse::new("https://bedrock-runtime.us-east-1.amazonaws.com");
        assert_eq!(
            wire.embed_endpoint("amazon.titan-embed-text-v2:0")
                .unwrap()
                .as_str(),
            "https://bedrock-runtime.us-east-1.amazonaws.com/model/amazon.titan-embed-text-v2%3A0/invoke"
        );
        assert_eq!(wire.max_batch("amazon.titan-embed-text-v2:0"), 1);
        assert_eq!(wire.max_batch("cohere.embed-english-v3"), 96);
        let request = EmbedRequest {
            inputs: vec!["hello".into()],
            dimensions: Some(512),
            ..EmbedRequest::default()
        };
        let body: serde_json::Value = serde_json::from_slice(
            &wire
                .build_embed("amazon.titan-embed-text-v2:0", &request, &request.inputs)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({"inputText": "hello", "dimensions": 512})
        );
        // The documented V2 response (vector shortened).
        let titan = br#"{"embedding": [0.25, -0.5], "inputTextTokenCount": 3, "embeddingsByType": {"float": [0.25, -0.5]}}"#;
        let answer = wire
            .parse_embed(titan, "amazon.titan-embed-text-v2:0", 1)
            .unwrap();
        assert_eq!(answer.embeddings, [vec![0.25, -0.5]]);
        assert_eq!(answer.usage.unwrap().input_tokens, 3);

        let cohere = EmbedRequest {
            inputs: vec!["a".into(), "b".into()],
            ..EmbedRequest::default()
        };
        let body: serde_json::Value = serde_json::from_slice(
            &wire
                .build_embed("cohere.embed-english-v3", &cohere, &cohere.inputs)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({"texts": ["a", "b"], "input_type": "search_document"})
        );
        let documented = br#"{"embeddings": [[0.1], [0.2]], "id": "e-1", "response_type": "embeddings_floats", "texts": ["a", "b"]}"#;
        let answer = wire
            .parse_embed(documented, "cohere.embed-english-v3", 2)
            .unwrap();
        assert_eq!(answer.embeddings, [vec![0.1], vec![0.2]]);
        assert_eq!(answer.usage, None);
        assert_eq!(
            wire.parse_embed(documented, "cohere.embed-english-v3", 3)
                .unwrap_err()
                .class,
            ErrorClass::InvalidResponse
        );
        let err = wire
            .build_embed("cohere.embed-english-v3", &request, &request.inputs)
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidRequest);
    }
}
