//! Anthropic Messages API (`POST {base_url}/v1/messages`, `x-api-key`, `anthropic-version`).
//!
//! System and developer messages go to the top-level `system` field; tool results become
//! `tool_result` blocks in a user message (consecutive results merged into one, as Anthropic
//! requires); images are sent as base64 or URL sources. `max_tokens` is required by
//! Anthropic: when the caller sets none, [`DEFAULT_MAX_TOKENS`] applies. Sampling fields
//! Anthropic does not have (seed, presence and frequency penalties) are not sent; JSON
//! response formats become structured outputs (`output_config.format`, a JSON schema).
//!
//! Usage is normalized: Anthropic's `input_tokens` excludes cache reads and cache writes, the
//! gateway's [`Usage::input_tokens`] includes both. A stream is complete only on
//! `message_stop`; usage from `message_start` and `message_delta` is merged and emitted once,
//! before the finish.

use std::{borrow::Cow, collections::VecDeque, sync::Arc, time::Duration};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::{
    ErrorClass, HttpProvider, Provider, ProviderError, UpstreamError,
    auth::ApiKeyHeader,
    kinds::{
        BuildContext, Discovered, Env, KeyRequired, KindInput, KindSettings, KindSpec,
        ProviderSettings, SettingsIssue, discovered, env_var, no_fields,
    },
    sse::{EventDecoder, Sse, SseEvent},
    wire::{Turn, WireFormat, decode_event, decode_json, parse_url, reply_model, split_system},
};
use crate::types::{
    ChatRequest, ChatResponse, ContentPart, FinishReason, ImageSource, Message, ResponseFormat,
    Role, StreamEvent, ToolCall, ToolCallDelta, ToolChoice, Usage,
};

/// The provider kind.
pub const KIND: &str = "anthropic";

/// The official API's base URL (without `/v1`).
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";

/// The `anthropic-version` header sent with every request.
pub const API_VERSION: &str = "2023-06-01";

/// The output limit sent when the caller sets no `max_tokens` (Anthropic requires one).
pub const DEFAULT_MAX_TOKENS: u32 = 4096;

/// How the adapter speaks to one Anthropic endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnthropicConfig {
    /// Base URL without the trailing `/v1/messages`.
    pub base_url: String,
    /// `max_tokens` when the caller sets none.
    pub default_max_tokens: u32,
}

impl AnthropicConfig {
    /// Settings for `base_url` with the default output limit.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into().trim_end_matches('/').to_owned(),
            default_max_tokens: DEFAULT_MAX_TOKENS,
        }
    }
}

/// The Messages wire format.
#[derive(Debug, Clone)]
pub struct Messages {
    config: AnthropicConfig,
    /// `{base_url}/v1/messages`, parsed once (`None`: the base URL is not a URL).
    url: Option<reqwest::Url>,
}

impl Messages {
    /// The wire format of the endpoint `config` describes.
    pub fn new(config: AnthropicConfig) -> Self {
        let url = parse_url(&format!("{}/v1/messages", config.base_url)).ok();
        Self { config, url }
    }
}

/// The settings of `kind = "anthropic"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnthropicSettings(pub AnthropicConfig);

impl KindSettings for AnthropicSettings {
    fn build(&self, ctx: BuildContext<'_>) -> Arc<dyn Provider> {
        Arc::new(HttpProvider::new(
            ctx.name,
            KIND,
            Messages::new(self.0.clone()),
            Arc::new(ApiKeyHeader::header("x-api-key")),
            ctx.keys,
            ctx.client.clone(),
        ))
    }
}

fn parse(input: &KindInput<'_>) -> Result<ProviderSettings, Vec<SettingsIssue>> {
    no_fields(AnthropicSettings(AnthropicConfig::new(input.base_url)))
}

fn discover(env: Env<'_>) -> Option<Result<Discovered, SettingsIssue>> {
    let key = env_var(env, "ANTHROPIC_API_KEY")?;
    Some(Ok(discovered(
        KIND,
        env_var(env, "ANTHROPIC_BASE_URL"),
        key,
    )))
}

/// `kind = "anthropic"`.
pub const SPEC: KindSpec = KindSpec {
    name: KIND,
    default_base_url: Some(DEFAULT_BASE_URL),
    base_url_hint: "",
    http: true,
    key_env: &["ANTHROPIC_API_KEY"],
    key_required: KeyRequired::AtDefaultUrl,
    fields: &[],
    parse,
    discover: Some(discover),
};

impl WireFormat for Messages {
    type Decoder = Sse<MessageStreamDecoder>;

    fn endpoint(&self, _model: &str, _stream: bool) -> Result<reqwest::Url, ProviderError> {
        self.url.clone().ok_or_else(|| {
            ProviderError::new(
                ErrorClass::InvalidRequest,
                "the base url is not a valid url",
            )
        })
    }

    fn add_headers(&self, headers: &mut http::HeaderMap) {
        headers.insert(
            "anthropic-version",
            http::HeaderValue::from_static(API_VERSION),
        );
    }

    /// Builds the JSON body of a Messages request.
    fn build_request(
        &self,
        model: &str,
        request: &ChatRequest,
        stream: bool,
    ) -> Result<Vec<u8>, ProviderError> {
        let config = &self.config;
        let (system, messages) = split_system(&request.messages, "anthropic", convert_message)?;
        let system: Vec<WireBlock<'_>> = system
            .into_iter()
            .map(|text| WireBlock::Text { text })
            .collect();
        let has_tools = !request.tools.is_empty();
        let tool_choice = if has_tools {
            let disable_parallel_tool_use = request.params.parallel_tool_calls == Some(false);
            match &request.tool_choice {
                None if !disable_parallel_tool_use => None,
                None | Some(ToolChoice::Auto) => Some(WireToolChoice {
                    kind: "auto",
                    name: None,
                    disable_parallel_tool_use,
                }),
                Some(ToolChoice::Required) => Some(WireToolChoice {
                    kind: "any",
                    name: None,
                    disable_parallel_tool_use,
                }),
                Some(ToolChoice::Named(name)) => Some(WireToolChoice {
                    kind: "tool",
                    name: Some(name),
                    disable_parallel_tool_use,
                }),
                Some(ToolChoice::None) => Some(WireToolChoice {
                    kind: "none",
                    name: None,
                    disable_parallel_tool_use: false,
                }),
            }
        } else {
            None
        };
        let wire = WireRequest {
            model,
            max_tokens: request
                .params
                .max_tokens
                .unwrap_or(config.default_max_tokens),
            system: match system.as_slice() {
                [] => None,
                [WireBlock::Text { text }] => Some(WireSystem::Text(text)),
                _ => Some(WireSystem::Blocks(system)),
            },
            messages,
            temperature: request.params.temperature,
            top_p: request.params.top_p,
            stop_sequences: &request.params.stop,
            tools: request
                .tools
                .iter()
                .map(|t| WireTool {
                    name: &t.name,
                    description: t.description.as_deref(),
                    input_schema: &t.parameters,
                })
                .collect(),
            tool_choice,
            metadata: request
                .user
                .as_deref()
                .map(|user_id| WireMetadata { user_id }),
            output_config: output_config(request.response_format.as_ref()),
            stream,
        };
        serde_json::to_vec(&wire).map_err(|e| invalid(format!("could not encode the request: {e}")))
    }

    /// Parses a non-streaming Messages response.
    fn parse_response(
        &self,
        body: &[u8],
        requested_model: &str,
    ) -> Result<ChatResponse, ProviderError> {
        let wire: WireResponse = decode_json(body)?;
        let mut content = Vec::with_capacity(wire.content.len());
        for block in wire.content {
            match block {
                WireResponseBlock::Text { text } if text.is_empty() => {}
                WireResponseBlock::Text { text } => match content.last_mut() {
                    Some(ContentPart::Text(prev)) => prev.push_str(&text),
                    _ => content.push(ContentPart::Text(text)),
                },
                WireResponseBlock::ToolUse { id, name, input } => {
                    let arguments = match input {
                        serde_json::Value::Null => "{}".to_owned(),
                        other => other.to_string(),
                    };
                    content.push(ContentPart::ToolCall(ToolCall {
                        id,
                        name,
                        arguments,
                    }));
                }
                WireResponseBlock::Other => {}
            }
        }
        Ok(ChatResponse {
            model: reply_model(wire.model, requested_model),
            content,
            finish_reason: wire
                .stop_reason
                .as_deref()
                .map_or(FinishReason::Unspecified, finish_reason),
            usage: wire.usage.filter(|u| !u.is_empty()).map(Usage::from),
        })
    }

    fn stream_decoder(&self, _model: &str) -> Self::Decoder {
        Sse::new(MessageStreamDecoder::default())
    }

    fn error_body(&self, status: u16, headers: &http::HeaderMap, body: &[u8]) -> UpstreamError {
        error_body(status, headers, body)
    }
}

// ---------------------------------------------------------------------------------------------
// Request
// ---------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<WireSystem<'a>>,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    stop_sequences: &'a [String],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<WireToolChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<WireMetadata<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_config: Option<WireOutputConfig<'a>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

/// Structured output: `output_config.format = {"type": "json_schema", "schema": ...}`.
#[derive(Serialize)]
struct WireOutputConfig<'a> {
    format: WireOutputFormat<'a>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireOutputFormat<'a> {
    JsonSchema { schema: Cow<'a, serde_json::Value> },
}

/// The structured-output setting for a response format: a JSON schema as given (Anthropic
/// always constrains decoding to it; the name and `strict` have no Anthropic field), and JSON
/// object mode as the schema `{"type": "object"}`.
fn output_config(format: Option<&ResponseFormat>) -> Option<WireOutputConfig<'_>> {
    let schema = match format? {
        ResponseFormat::Text => return None,
        ResponseFormat::JsonObject => Cow::Owned(serde_json::json!({"type": "object"})),
        ResponseFormat::JsonSchema { schema, .. } => Cow::Borrowed(schema),
    };
    Some(WireOutputConfig {
        format: WireOutputFormat::JsonSchema { schema },
    })
}

/// One text block is sent as a plain string, several as text blocks in order.
#[derive(Serialize)]
#[serde(untagged)]
enum WireSystem<'a> {
    Text(&'a str),
    Blocks(Vec<WireBlock<'a>>),
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
#[serde(tag = "type", rename_all = "snake_case")]
enum WireBlock<'a> {
    Text {
        text: &'a str,
    },
    Image {
        source: WireImageSource<'a>,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: serde_json::Value,
    },
    ToolResult {
        tool_use_id: &'a str,
        content: &'a str,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        is_error: bool,
    },
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireImageSource<'a> {
    Base64 {
        media_type: &'a str,
        data: Cow<'a, str>,
    },
    Url {
        url: &'a str,
    },
}

#[derive(Serialize)]
struct WireTool<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    input_schema: &'a serde_json::Value,
}

#[derive(Serialize)]
struct WireToolChoice<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    disable_parallel_tool_use: bool,
}

#[derive(Serialize)]
struct WireMetadata<'a> {
    user_id: &'a str,
}

fn invalid(msg: impl Into<String>) -> ProviderError {
    ProviderError::new(ErrorClass::InvalidRequest, msg)
}

fn convert_message(message: &Message) -> Result<WireMessage<'_>, ProviderError> {
    let role = match message.role {
        Role::Assistant => "assistant",
        _ => "user",
    };
    let mut content = Vec::with_capacity(message.content.len());
    for part in &message.content {
        match part {
            // Anthropic rejects empty text blocks.
            ContentPart::Text(text) if text.is_empty() => {}
            ContentPart::Text(text) => content.push(WireBlock::Text { text }),
            ContentPart::Image(image) => {
                if message.role != Role::User {
                    return Err(invalid("images are only allowed in user messages"));
                }
                content.push(WireBlock::Image {
                    source: image_source(image)?,
                });
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
                content.push(WireBlock::ToolUse {
                    id: &call.id,
                    name: &call.name,
                    input,
                });
            }
            ContentPart::ToolResult(result) => {
                if message.role != Role::Tool {
                    return Err(invalid("tool results belong in tool messages"));
                }
                content.push(WireBlock::ToolResult {
                    tool_use_id: &result.tool_call_id,
                    content: &result.content,
                    is_error: result.is_error,
                });
            }
        }
    }
    // Tool results must come first in their user message.
    content.sort_by_key(|b| !matches!(b, WireBlock::ToolResult { .. }));
    Ok(WireMessage { role, content })
}

fn image_source(image: &crate::types::Image) -> Result<WireImageSource<'_>, ProviderError> {
    match &image.source {
        ImageSource::Data(data) => Ok(WireImageSource::Base64 {
            media_type: image.mime_type.as_deref().unwrap_or("image/png"),
            data: base64::engine::general_purpose::STANDARD
                .encode(data)
                .into(),
        }),
        ImageSource::Url(url) => match parse_data_url(url) {
            Some((media_type, data)) => Ok(WireImageSource::Base64 {
                media_type,
                data: data.into(),
            }),
            None if url.starts_with("data:") => {
                Err(invalid("image data urls must be base64-encoded"))
            }
            None => Ok(WireImageSource::Url { url }),
        },
    }
}

/// Splits `data:<mime>;base64,<data>` into its MIME type and base64 payload.
pub(crate) fn parse_data_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    let mime = meta.strip_suffix(";base64")?;
    (!mime.is_empty()).then_some((mime, data))
}

// ---------------------------------------------------------------------------------------------
// Response
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct WireResponse {
    #[serde(default)]
    model: Option<String>,
    /// Required: a body without it is not a message.
    content: Vec<WireResponseBlock>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireResponseBlock {
    Text {
        #[serde(default)]
        text: String,
    },
    ToolUse {
        #[serde(default)]
        id: String,
        #[serde(default)]
        name: String,
        #[serde(default)]
        input: serde_json::Value,
    },
    /// Thinking, redacted thinking, server tool blocks: not part of the reply.
    #[serde(other)]
    Other,
}

/// Anthropic's usage counts; every field may be missing or `null`.
#[derive(Debug, Deserialize, Default, Clone, Copy)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

impl WireUsage {
    /// Fields set in `later` replace those here (`message_delta` counts are cumulative).
    fn merge(self, later: WireUsage) -> WireUsage {
        WireUsage {
            input_tokens: later.input_tokens.or(self.input_tokens),
            output_tokens: later.output_tokens.or(self.output_tokens),
            cache_creation_input_tokens: later
                .cache_creation_input_tokens
                .or(self.cache_creation_input_tokens),
            cache_read_input_tokens: later
                .cache_read_input_tokens
                .or(self.cache_read_input_tokens),
        }
    }

    fn is_empty(&self) -> bool {
        self.input_tokens.is_none()
            && self.output_tokens.is_none()
            && self.cache_creation_input_tokens.is_none()
            && self.cache_read_input_tokens.is_none()
    }
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        let uncached = u.input_tokens.unwrap_or(0);
        Usage {
            // Anthropic's input_tokens excludes cache reads and writes; ours includes both.
            input_tokens: uncached
                .saturating_add(u.cache_read_input_tokens.unwrap_or(0))
                .saturating_add(u.cache_creation_input_tokens.unwrap_or(0)),
            output_tokens: u.output_tokens.unwrap_or(0),
            cached_input_tokens: u.cache_read_input_tokens,
            cache_write_tokens: u.cache_creation_input_tokens,
            reasoning_tokens: None,
        }
    }
}

fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "end_turn" | "stop_sequence" => FinishReason::Stop,
        "max_tokens" | "model_context_window_exceeded" => FinishReason::Length,
        "tool_use" => FinishReason::ToolCalls,
        "refusal" => FinishReason::ContentFilter,
        _ => FinishReason::Other,
    }
}

// ---------------------------------------------------------------------------------------------
// Stream
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireEvent {
    MessageStart {
        message: WireStartMessage,
    },
    ContentBlockStart {
        index: u32,
        content_block: WireStartBlock,
    },
    ContentBlockDelta {
        index: u32,
        delta: WireDelta,
    },
    MessageDelta {
        #[serde(default)]
        delta: Option<WireMessageDelta>,
        #[serde(default)]
        usage: Option<WireUsage>,
    },
    MessageStop,
    Error {
        error: WireError,
    },
    /// `ping`, `content_block_stop` and event types added later.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct WireStartMessage {
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireStartBlock {
    Text {
        #[serde(default)]
        text: String,
    },
    ToolUse {
        #[serde(default)]
        id: String,
        #[serde(default)]
        name: String,
    },
    Thinking {
        #[serde(default)]
        thinking: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireDelta {
    TextDelta {
        #[serde(default)]
        text: String,
    },
    InputJsonDelta {
        #[serde(default)]
        partial_json: String,
    },
    ThinkingDelta {
        #[serde(default)]
        thinking: String,
    },
    /// `signature_delta`, `citations_delta` and delta types added later.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct WireMessageDelta {
    #[serde(default)]
    stop_reason: Option<String>,
}

/// Decodes the Messages event stream.
#[derive(Debug, Default)]
pub struct MessageStreamDecoder {
    usage: Option<WireUsage>,
    finish: Option<FinishReason>,
    /// Content block index -> tool call index (tool calls count from 0).
    tool_blocks: Vec<(u32, u32)>,
}

impl MessageStreamDecoder {
    fn merge_usage(&mut self, usage: Option<WireUsage>) {
        if let Some(usage) = usage {
            self.usage = Some(self.usage.unwrap_or_default().merge(usage));
        }
    }

    fn tool_index(&self, block: u32) -> Option<u32> {
        self.tool_blocks
            .iter()
            .find(|(b, _)| *b == block)
            .map(|(_, t)| *t)
    }
}

impl EventDecoder for MessageStreamDecoder {
    fn decode(
        &mut self,
        event: &SseEvent,
        out: &mut VecDeque<StreamEvent>,
    ) -> Result<bool, ProviderError> {
        let wire: WireEvent = decode_event(event.data.as_bytes())?;
        match wire {
            WireEvent::MessageStart { message } => self.merge_usage(message.usage),
            WireEvent::ContentBlockStart {
                index,
                content_block,
            } => match content_block {
                WireStartBlock::Text { text } | WireStartBlock::Thinking { thinking: text }
                    if text.is_empty() => {}
                WireStartBlock::Text { text } => out.push_back(StreamEvent::Text(text)),
                WireStartBlock::Thinking { thinking } => {
                    out.push_back(StreamEvent::Reasoning(thinking));
                }
                WireStartBlock::ToolUse { id, name } => {
                    let tool = u32::try_from(self.tool_blocks.len()).unwrap_or(u32::MAX);
                    self.tool_blocks.push((index, tool));
                    out.push_back(StreamEvent::ToolCall(ToolCallDelta {
                        index: tool,
                        id: Some(id).filter(|s| !s.is_empty()),
                        name: Some(name).filter(|s| !s.is_empty()),
                        arguments: String::new(),
                    }));
                }
                WireStartBlock::Other => {}
            },
            WireEvent::ContentBlockDelta { index, delta } => match delta {
                WireDelta::TextDelta { text } if !text.is_empty() => {
                    out.push_back(StreamEvent::Text(text));
                }
                WireDelta::ThinkingDelta { thinking } if !thinking.is_empty() => {
                    out.push_back(StreamEvent::Reasoning(thinking));
                }
                WireDelta::InputJsonDelta { partial_json } => {
                    let tool = self.tool_index(index).ok_or_else(|| {
                        ProviderError::malformed_event("tool input for a block that is not a tool")
                    })?;
                    if !partial_json.is_empty() {
                        out.push_back(StreamEvent::ToolCall(ToolCallDelta {
                            index: tool,
                            id: None,
                            name: None,
                            arguments: partial_json,
                        }));
                    }
                }
                WireDelta::TextDelta { .. }
                | WireDelta::ThinkingDelta { .. }
                | WireDelta::Other => {}
            },
            WireEvent::MessageDelta { delta, usage } => {
                if let Some(reason) = delta.and_then(|d| d.stop_reason) {
                    self.finish = Some(finish_reason(&reason));
                }
                self.merge_usage(usage);
            }
            WireEvent::MessageStop => {
                if let Some(usage) = self.usage.take().filter(|u| !u.is_empty()) {
                    out.push_back(StreamEvent::Usage(usage.into()));
                }
                out.push_back(StreamEvent::Finish(
                    self.finish.take().unwrap_or(FinishReason::Unspecified),
                ));
                return Ok(true);
            }
            WireEvent::Error { error } => return Err(ProviderError::in_stream(error.upstream())),
            WireEvent::Other => {}
        }
        Ok(false)
    }

    fn end_of_body(&mut self, _out: &mut VecDeque<StreamEvent>) -> Result<(), ProviderError> {
        Err(ProviderError::truncated())
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
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

impl WireError {
    fn upstream(self) -> UpstreamError {
        let class = self
            .kind
            .as_deref()
            .and_then(class_from_type)
            .map(|c| refine_invalid(c, self.message.as_deref().unwrap_or_default()));
        UpstreamError {
            class,
            message: self.message,
            retry_after: None,
        }
    }
}

fn class_from_type(kind: &str) -> Option<ErrorClass> {
    Some(match kind {
        "invalid_request_error" | "request_too_large" => ErrorClass::InvalidRequest,
        "authentication_error" => ErrorClass::Authentication,
        "permission_error" | "billing_error" => ErrorClass::Permission,
        "not_found_error" => ErrorClass::ModelNotFound,
        "rate_limit_error" => ErrorClass::RateLimited,
        "api_error" => ErrorClass::ServerError,
        "overloaded_error" => ErrorClass::Overloaded,
        "timeout_error" => ErrorClass::Timeout,
        _ => return None,
    })
}

/// An invalid request that says the prompt does not fit is a context-length error.
fn refine_invalid(class: ErrorClass, message: &str) -> ErrorClass {
    let lower = message.to_ascii_lowercase();
    if class == ErrorClass::InvalidRequest
        && (lower.contains("prompt is too long") || lower.contains("exceed context limit"))
    {
        ErrorClass::ContextLengthExceeded
    } else {
        class
    }
}

/// The `anthropic-ratelimit-*-reset` headers whose wait applies: the latest reset among
/// the exhausted limits (remaining 0), or the earliest when none says it is exhausted.
pub fn ratelimit_reset_delay(
    headers: &http::HeaderMap,
    now: std::time::SystemTime,
) -> Option<Duration> {
    const LIMITS: [&str; 4] = ["requests", "tokens", "input-tokens", "output-tokens"];
    let mut exhausted: Option<Duration> = None;
    let mut earliest: Option<Duration> = None;
    for limit in LIMITS {
        let Some(reset) = headers
            .get(format!("anthropic-ratelimit-{limit}-reset"))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| humantime::parse_rfc3339_weak(v.trim()).ok())
        else {
            continue;
        };
        let wait = reset.duration_since(now).unwrap_or(Duration::ZERO);
        let is_exhausted = headers
            .get(format!("anthropic-ratelimit-{limit}-remaining"))
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() == "0");
        if is_exhausted {
            exhausted = Some(exhausted.map_or(wait, |w| w.max(wait)));
        }
        earliest = Some(earliest.map_or(wait, |w| w.min(wait)));
    }
    exhausted.or(earliest)
}

/// What an Anthropic error body (`{"type": "error", "error": {"type", "message"}}`) says;
/// on a 429 the `anthropic-ratelimit-*-reset` headers give the wait when `retry-after` is
/// missing.
pub fn error_body(status: u16, headers: &http::HeaderMap, body: &[u8]) -> UpstreamError {
    let mut upstream = serde_json::from_slice::<WireErrorBody>(body)
        .map(|b| b.error.upstream())
        .unwrap_or_default();
    if status == 429 {
        upstream.retry_after = ratelimit_reset_delay(headers, std::time::SystemTime::now());
    }
    upstream
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::types::{Image, ImageDetail, SamplingParams, Tool, ToolResult};

    fn config() -> AnthropicConfig {
        AnthropicConfig::new(DEFAULT_BASE_URL)
    }

    fn json(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).unwrap()
    }

    fn tool_result(id: &str, content: &str, is_error: bool) -> ContentPart {
        ContentPart::ToolResult(ToolResult {
            tool_call_id: id.into(),
            name: None,
            content: content.into(),
            is_error,
        })
    }

    #[test]
    fn builds_a_full_request() {
        let request = ChatRequest {
            model: "anthropic/claude-sonnet-4-5".into(),
            messages: vec![
                Message::text(Role::System, "be brief"),
                Message::text(Role::Developer, "dev note"),
                Message {
                    role: Role::User,
                    content: vec![
                        ContentPart::Text("what are these?".into()),
                        ContentPart::Image(Image {
                            source: ImageSource::Data(Bytes::from_static(b"\x89PNG")),
                            mime_type: Some("image/png".into()),
                            detail: ImageDetail::Low,
                        }),
                        ContentPart::Image(Image {
                            source: ImageSource::Url("https://example.com/cat.jpg".into()),
                            mime_type: None,
                            detail: ImageDetail::Default,
                        }),
                        ContentPart::Image(Image {
                            source: ImageSource::Url("data:image/gif;base64,R0lGOD==".into()),
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
                            id: "toolu_1".into(),
                            name: "get_weather".into(),
                            arguments: r#"{"city":"Paris"}"#.into(),
                        }),
                        ContentPart::ToolCall(ToolCall {
                            id: "toolu_2".into(),
                            name: "get_weather".into(),
                            arguments: String::new(),
                        }),
                    ],
                    name: None,
                },
                Message {
                    role: Role::Tool,
                    content: vec![tool_result("toolu_1", "sunny", false)],
                    name: None,
                },
                Message {
                    role: Role::Tool,
                    content: vec![tool_result("toolu_2", "no such city", true)],
                    name: None,
                },
                Message::text(Role::User, "and tomorrow?"),
            ],
            params: SamplingParams {
                temperature: Some(0.5),
                top_p: Some(0.9),
                stop: vec!["END".into()],
                seed: Some(7),
                parallel_tool_calls: Some(false),
                ..Default::default()
            },
            tools: vec![Tool {
                name: "get_weather".into(),
                description: Some("weather".into()),
                parameters: serde_json::json!({"type": "object"}),
                strict: false,
            }],
            tool_choice: Some(ToolChoice::Named("get_weather".into())),
            user: Some("u1".into()),
            ..Default::default()
        };
        let body = json(
            &Messages::new(config())
                .build_request("claude-sonnet-4-5", &request, true)
                .unwrap(),
        );
        assert_eq!(
            body,
            serde_json::json!({
                "model": "claude-sonnet-4-5",
                "max_tokens": 4096,
                "system": [
                    {"type": "text", "text": "be brief"},
                    {"type": "text", "text": "dev note"}
                ],
                "messages": [
                    {"role": "user", "content": [
                        {"type": "text", "text": "what are these?"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw=="}},
                        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/gif", "data": "R0lGOD=="}}
                    ]},
                    {"role": "assistant", "content": [
                        {"type": "text", "text": "checking"},
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                        {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {}}
                    ]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                        {"type": "tool_result", "tool_use_id": "toolu_2", "content": "no such city", "is_error": true},
                        {"type": "text", "text": "and tomorrow?"}
                    ]}
                ],
                "temperature": 0.5,
                "top_p": 0.9,
                "stop_sequences": ["END"],
                "tools": [{"name": "get_weather", "description": "weather", "input_schema": {"type": "object"}}],
                "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true},
                "metadata": {"user_id": "u1"},
                "stream": true
            })
        );
    }

    #[test]
    fn minimal_request_gets_default_max_tokens_and_string_system() {
        let request = ChatRequest {
            messages: vec![
                Message::text(Role::System, "sys"),
                Message::text(Role::User, "hi"),
            ],
            tool_choice: Some(ToolChoice::Required),
            ..Default::default()
        };
        let body = json(
            &Messages::new(config())
                .build_request("m", &request, false)
                .unwrap(),
        );
        assert_eq!(body["max_tokens"], DEFAULT_MAX_TOKENS);
        assert_eq!(body["system"], "sys");
        assert!(body.get("stream").is_none());
        // No tools: no tool_choice either (Anthropic rejects it alone).
        assert!(body.get("tool_choice").is_none());

        let mut with_limit = request.clone();
        with_limit.params.max_tokens = Some(10);
        let body = json(
            &Messages::new(config())
                .build_request("m", &with_limit, false)
                .unwrap(),
        );
        assert_eq!(body["max_tokens"], 10);
    }

    #[test]
    fn tool_choice_modes() {
        let base = ChatRequest {
            messages: vec![Message::text(Role::User, "hi")],
            tools: vec![Tool {
                name: "f".into(),
                description: None,
                parameters: serde_json::json!({"type": "object"}),
                strict: false,
            }],
            ..Default::default()
        };
        for (choice, expected) in [
            (None, serde_json::Value::Null),
            (Some(ToolChoice::Auto), serde_json::json!({"type": "auto"})),
            (
                Some(ToolChoice::Required),
                serde_json::json!({"type": "any"}),
            ),
            (Some(ToolChoice::None), serde_json::json!({"type": "none"})),
        ] {
            let mut request = base.clone();
            request.tool_choice = choice;
            let body = json(
                &Messages::new(config())
                    .build_request("m", &request, false)
                    .unwrap(),
            );
            assert_eq!(body["tool_choice"], expected);
        }
    }

    #[test]
    fn json_formats_are_structured_outputs() {
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": false
        });
        for (format, expected) in [
            (
                ResponseFormat::JsonSchema {
                    name: "place".into(),
                    schema: schema.clone(),
                    strict: true,
                },
                serde_json::json!({"format": {"type": "json_schema", "schema": schema}}),
            ),
            (
                ResponseFormat::JsonObject,
                serde_json::json!({"format": {"type": "json_schema", "schema": {"type": "object"}}}),
            ),
        ] {
            let request = ChatRequest {
                messages: vec![Message::text(Role::User, "where?")],
                response_format: Some(format),
                ..Default::default()
            };
            let body = json(
                &Messages::new(config())
                    .build_request("m", &request, true)
                    .unwrap(),
            );
            assert_eq!(body["output_config"], expected);
        }
        let text = ChatRequest {
            messages: vec![Message::text(Role::User, "hi")],
            response_format: Some(ResponseFormat::Text),
            ..Default::default()
        };
        let body = json(
            &Messages::new(config())
                .build_request("m", &text, false)
                .unwrap(),
        );
        assert!(body.get("output_config").is_none());
    }

    #[test]
    fn unsupported_input_is_an_invalid_request() {
        let bad_args = ChatRequest {
            messages: vec![Message {
                role: Role::Assistant,
                content: vec![ContentPart::ToolCall(ToolCall {
                    id: "t".into(),
                    name: "f".into(),
                    arguments: "[1, 2]".into(),
                })],
                name: None,
            }],
            ..Default::default()
        };
        let image_in_system = ChatRequest {
            messages: vec![Message {
                role: Role::System,
                content: vec![ContentPart::Image(Image {
                    source: ImageSource::Url("https://example.com/x.png".into()),
                    mime_type: None,
                    detail: ImageDetail::Default,
                })],
                name: None,
            }],
            ..Default::default()
        };
        for request in [bad_args, image_in_system] {
            let err = Messages::new(config())
                .build_request("m", &request, false)
                .unwrap_err();
            assert_eq!(err.class, ErrorClass::InvalidRequest, "{err}");
        }
    }

    #[test]
    fn parses_a_documented_response() {
        let body = include_bytes!("../../tests/fixtures/anthropic/message.json");
        let response = Messages::new(config())
            .parse_response(body, "claude-sonnet-4-5")
            .unwrap();
        assert_eq!(response.model, "claude-sonnet-4-5-20250929");
        assert_eq!(response.finish_reason, FinishReason::Stop);
        assert_eq!(
            response.content,
            vec![ContentPart::Text("Hi! My name is Claude.".into())]
        );
        let usage = response.usage.unwrap();
        assert_eq!((usage.input_tokens, usage.output_tokens), (2095, 503));
        assert_eq!(usage.cached_input_tokens, None);
    }

    #[test]
    fn parses_a_tool_use_response() {
        let body = include_bytes!("../../tests/fixtures/anthropic/message_tool_use.json");
        let response = Messages::new(config())
            .parse_response(body, "claude-sonnet-4-5")
            .unwrap();
        assert_eq!(response.finish_reason, FinishReason::ToolCalls);
        assert!(response.usage.is_none());
        assert_eq!(response.content.len(), 2);
        let ContentPart::ToolCall(call) = &response.content[1] else {
            panic!("expected a tool call: {:?}", response.content);
        };
        assert_eq!(call.id, "toolu_01A09q90qw90lq917835lq9");
        assert_eq!(call.name, "get_weather");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&call.arguments).unwrap(),
            serde_json::json!({"location": "San Francisco, CA", "unit": "celsius"})
        );
    }

    #[test]
    fn cache_tokens_are_normalized_into_input() {
        let body = include_bytes!("../../tests/fixtures/anthropic/message_cached.json");
        let response = Messages::new(config()).parse_response(body, "m").unwrap();
        assert_eq!(response.finish_reason, FinishReason::Length);
        // The thinking block is not part of the reply text.
        assert_eq!(
            response.content,
            vec![ContentPart::Text(
                "Pride and Prejudice follows Elizabeth Bennet.".into()
            )]
        );
        let usage = response.usage.unwrap();
        assert_eq!(usage.input_tokens, 21 + 188_086);
        assert_eq!(usage.cached_input_tokens, Some(0));
        assert_eq!(usage.cache_write_tokens, Some(188_086));
        assert_eq!(usage.output_tokens, 393);
    }

    #[test]
    fn stop_reasons() {
        for (wire, ours) in [
            ("end_turn", FinishReason::Stop),
            ("stop_sequence", FinishReason::Stop),
            ("max_tokens", FinishReason::Length),
            ("tool_use", FinishReason::ToolCalls),
            ("refusal", FinishReason::ContentFilter),
            ("pause_turn", FinishReason::Other),
        ] {
            assert_eq!(finish_reason(wire), ours, "{wire}");
        }
    }

    async fn decode_stream(body: &'static [u8]) -> Vec<Result<StreamEvent, ProviderError>> {
        crate::providers::wire::decode_in_pieces(body, 7, Sse::new(MessageStreamDecoder::default()))
            .await
    }

    #[tokio::test]
    async fn decodes_a_documented_stream_with_merged_usage() {
        let events = decode_stream(include_bytes!("../../tests/fixtures/anthropic/stream.txt"))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect::<Vec<_>>();
        assert_eq!(
            events,
            vec![
                StreamEvent::Text("Hello".into()),
                StreamEvent::Text("!".into()),
                StreamEvent::Usage(Usage {
                    input_tokens: 25,
                    output_tokens: 15,
                    ..Usage::default()
                }),
                StreamEvent::Finish(FinishReason::Stop),
            ]
        );
    }

    #[tokio::test]
    async fn decodes_streamed_tool_input() {
        let events = decode_stream(include_bytes!(
            "../../tests/fixtures/anthropic/stream_tool_use.txt"
        ))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect::<Vec<_>>();
        let mut args = String::new();
        let mut first = None;
        for e in &events {
            if let StreamEvent::ToolCall(d) = e {
                // Content block 1 is the first tool call: index 0.
                assert_eq!(d.index, 0);
                if first.is_none() {
                    first = Some(d.clone());
                }
                args.push_str(&d.arguments);
            }
        }
        let first = first.unwrap();
        assert_eq!(first.id.as_deref(), Some("toolu_01T1x1fJ34qAmk2tNTrN7Up6"));
        assert_eq!(first.name.as_deref(), Some("get_weather"));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&args).unwrap(),
            serde_json::json!({"location": "San Francisco, CA", "unit": "fahrenheit"})
        );
        assert!(events.contains(&StreamEvent::Text("Okay".into())));
        assert_eq!(
            &events[events.len() - 2..],
            &[
                StreamEvent::Usage(Usage {
                    input_tokens: 472,
                    output_tokens: 89,
                    ..Usage::default()
                }),
                StreamEvent::Finish(FinishReason::ToolCalls),
            ]
        );
    }

    #[tokio::test]
    async fn thinking_is_reasoning_and_missing_usage_is_not_zeros() {
        let events = decode_stream(include_bytes!(
            "../../tests/fixtures/anthropic/stream_thinking.txt"
        ))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect::<Vec<_>>();
        let reasoning: String = events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::Reasoning(t) => Some(t.as_str()),
                _ => None,
            })
            .collect();
        assert!(reasoning.starts_with("Let me solve this step by step"));
        assert!(events.contains(&StreamEvent::Text("27 * 453 = 12,231".into())));
        assert!(!events.iter().any(|e| matches!(e, StreamEvent::Usage(_))));
        assert_eq!(
            events.last(),
            Some(&StreamEvent::Finish(FinishReason::Stop))
        );
    }

    fn map_error(status: u16, headers: &http::HeaderMap, body: &[u8]) -> ProviderError {
        Messages::new(config()).classify(status, headers, body)
    }

    #[test]
    fn error_types_name_their_class() {
        let none = http::HeaderMap::new();
        for (kind, msg, class) in [
            (
                "billing_error",
                "credit balance too low",
                Some(ErrorClass::Permission),
            ),
            (
                "permission_error",
                "no access",
                Some(ErrorClass::Permission),
            ),
            (
                "request_too_large",
                "too big",
                Some(ErrorClass::InvalidRequest),
            ),
            (
                "invalid_request_error",
                "input length and `max_tokens` exceed context limit: 197626 + 8192 > 200000",
                Some(ErrorClass::ContextLengthExceeded),
            ),
            (
                "overloaded_error",
                "Overloaded",
                Some(ErrorClass::Overloaded),
            ),
            ("timeout_error", "slow", Some(ErrorClass::Timeout)),
            ("something_new", "?", None),
        ] {
            let body =
                format!(r#"{{"type":"error","error":{{"type":"{kind}","message":"{msg}"}}}}"#);
            assert_eq!(
                error_body(400, &none, body.as_bytes()).class,
                class,
                "{kind}"
            );
        }
        let fixture = include_bytes!("../../tests/fixtures/anthropic/error_overloaded.json");
        assert_eq!(map_error(529, &none, fixture).class, ErrorClass::Overloaded);
        assert_eq!(
            map_error(
                402,
                &none,
                br#"{"type":"error","error":{"type":"billing_error","message":"x"}}"#
            )
            .class,
            ErrorClass::Permission
        );
    }

    #[test]
    fn retry_after_from_header_or_reset_headers() {
        let mut headers = http::HeaderMap::new();
        headers.insert("retry-after", http::HeaderValue::from_static("12"));
        let err = map_error(
            429,
            &headers,
            br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
        );
        assert_eq!(err.retry_after, Some(Duration::from_secs(12)));

        let now = humantime::parse_rfc3339("2025-06-01T12:00:00Z").unwrap();
        let mut headers = http::HeaderMap::new();
        for (name, value) in [
            ("anthropic-ratelimit-requests-remaining", "10"),
            ("anthropic-ratelimit-requests-reset", "2025-06-01T12:00:05Z"),
            ("anthropic-ratelimit-tokens-remaining", "0"),
            ("anthropic-ratelimit-tokens-reset", "2025-06-01T12:00:30Z"),
            ("anthropic-ratelimit-output-tokens-reset", "garbage"),
        ] {
            headers.insert(name, http::HeaderValue::from_static(value));
        }
        assert_eq!(
            ratelimit_reset_delay(&headers, now),
            Some(Duration::from_secs(30))
        );
        headers.insert(
            "anthropic-ratelimit-tokens-remaining",
            http::HeaderValue::from_static("5"),
        );
        assert_eq!(
            ratelimit_reset_delay(&headers, now),
            Some(Duration::from_secs(5))
        );
        assert_eq!(ratelimit_reset_delay(&http::HeaderMap::new(), now), None);
        let past = humantime::parse_rfc3339("2025-06-01T13:00:00Z").unwrap();
        assert_eq!(ratelimit_reset_delay(&headers, past), Some(Duration::ZERO));
    }

    #[test]
    fn data_urls() {
        assert_eq!(
            parse_data_url("data:image/png;base64,AAAA"),
            Some(("image/png", "AAAA"))
        );
        assert_eq!(parse_data_url("data:image/png,AAAA"), None);
        assert_eq!(parse_data_url("https://x/y.png"), None);
    }
}
