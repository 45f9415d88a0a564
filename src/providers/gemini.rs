//! Google Gemini API (`POST {base_url}/v1beta/models/{model}:generateContent` and
//! `:streamGenerateContent?alt=sse`, `x-goog-api-key`).
//!
//! System and developer messages go to `systemInstruction`; the conversation to `contents`
//! with roles `user` and `model`; images as `inlineData` (bytes, `data:` URLs) or `fileData`
//! (http URLs); tools as `functionDeclarations` with their JSON Schema in
//! `parametersJsonSchema`, and JSON response schemas in `responseJsonSchema`. Tool results
//! become `functionResponse` parts named after the tool (the server fills the name from the
//! matching tool call); a result that is not a JSON object is wrapped as `{"content": ...}`
//! (`{"error": ...}` when the tool failed).
//!
//! Gemini function calls have no ids: the adapter numbers them `call_0`, `call_1`, ... in
//! reply order. Output tokens include thinking tokens. A stream is complete only when a chunk
//! carried a `finishReason` and the body then ended; each SSE `data:` is a whole
//! `GenerateContentResponse`.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::{
    ErrorClass, HttpProvider, Provider, ProviderError, UpstreamError,
    anthropic::parse_data_url,
    auth::ApiKeyHeader,
    embed::{EmbedWire, check_count},
    kinds::{
        BuildContext, Discovered, Env, KeyRequired, KindInput, KindSettings, KindSpec,
        ProviderSettings, SettingsIssue, discovered, env_var, no_fields,
    },
    sse::{EventDecoder, Sse, SseEvent},
    wire::{
        Turn, WireFormat, decode_event, decode_json, is_path_segment, parse_url, reply_model,
        split_system,
    },
};
use crate::types::{
    ChatRequest, ChatResponse, ContentPart, EmbedRequest, EmbedResponse, FinishReason, ImageSource,
    Message, ResponseFormat, Role, StreamEvent, ToolCall, ToolCallDelta, ToolChoice, Usage,
};

/// The provider kind.
pub const KIND: &str = "gemini";

/// The official API's base URL (without `/v1beta`).
pub const DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com";

/// The Gemini `generateContent` wire format.
#[derive(Debug, Clone)]
pub struct GenerateContent {
    /// Base URL without the trailing `/v1beta`.
    base_url: String,
}

impl GenerateContent {
    /// The wire format of the API at `base_url`.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into().trim_end_matches('/').to_owned(),
        }
    }
}

/// The settings of `kind = "gemini"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeminiSettings {
    /// Base URL without the trailing `/v1beta`.
    pub base_url: String,
}

impl KindSettings for GeminiSettings {
    fn build(&self, ctx: BuildContext<'_>) -> Arc<dyn Provider> {
        Arc::new(HttpProvider::new(
            ctx.name,
            KIND,
            GenerateContent::new(&self.base_url),
            Arc::new(ApiKeyHeader::header("x-goog-api-key")),
            ctx.keys,
            ctx.client.clone(),
        ))
    }
}

fn parse(input: &KindInput<'_>) -> Result<ProviderSettings, Vec<SettingsIssue>> {
    no_fields(GeminiSettings {
        base_url: input.base_url.to_owned(),
    })
}

fn discover(env: Env<'_>) -> Option<Result<Discovered, SettingsIssue>> {
    let key = env_var(env, "GEMINI_API_KEY").or_else(|| env_var(env, "GOOGLE_API_KEY"))?;
    Some(Ok(discovered(KIND, None, key)))
}

/// `kind = "gemini"`.
pub const SPEC: KindSpec = KindSpec {
    name: KIND,
    default_base_url: Some(DEFAULT_BASE_URL),
    base_url_hint: "",
    http: true,
    key_env: &["GEMINI_API_KEY", "GOOGLE_API_KEY"],
    key_required: KeyRequired::AtDefaultUrl,
    fields: &[],
    parse,
    discover: Some(discover),
};

/// The URL of `model`'s `generateContent` (or streaming) method.
pub fn endpoint_url(base_url: &str, model: &str, stream: bool) -> Result<String, ProviderError> {
    let model = model.strip_prefix("models/").unwrap_or(model);
    // Model names are one path segment; refuse what would change the URL's meaning.
    if !is_path_segment(model) {
        return Err(invalid("the model name is not valid for gemini"));
    }
    Ok(if stream {
        format!("{base_url}/v1beta/models/{model}:streamGenerateContent?alt=sse")
    } else {
        format!("{base_url}/v1beta/models/{model}:generateContent")
    })
}

impl WireFormat for GenerateContent {
    type Decoder = Sse<ChunkDecoder>;

    fn endpoint(&self, model: &str, stream: bool) -> Result<reqwest::Url, ProviderError> {
        parse_url(&endpoint_url(&self.base_url, model, stream)?)
    }

    /// Builds the JSON body of a `generateContent` request (the model is in the URL).
    fn build_request(
        &self,
        _model: &str,
        request: &ChatRequest,
        _stream: bool,
    ) -> Result<Vec<u8>, ProviderError> {
        let (system, contents) = split_system(&request.messages, "gemini", convert_message)?;
        let system: Vec<WirePart<'_>> = system.into_iter().map(WirePart::Text).collect();
        let has_tools = !request.tools.is_empty();
        let tool_config = match (&request.tool_choice, has_tools) {
            (Some(choice), true) => {
                let (mode, allowed_function_names) = match choice {
                    ToolChoice::Auto => ("AUTO", Vec::new()),
                    ToolChoice::None => ("NONE", Vec::new()),
                    ToolChoice::Required => ("ANY", Vec::new()),
                    ToolChoice::Named(name) => ("ANY", vec![name.as_str()]),
                };
                Some(WireToolConfig {
                    function_calling_config: WireFunctionCallingConfig {
                        mode,
                        allowed_function_names,
                    },
                })
            }
            _ => None,
        };
        let (response_mime_type, response_json_schema) = match &request.response_format {
            None => (None, None),
            Some(ResponseFormat::Text) => (Some("text/plain"), None),
            Some(ResponseFormat::JsonObject) => (Some("application/json"), None),
            Some(ResponseFormat::JsonSchema { schema, .. }) => {
                (Some("application/json"), Some(schema))
            }
        };
        let seed = match request.params.seed {
            None => None,
            Some(seed) => {
                Some(i32::try_from(seed).map_err(|_| invalid("gemini seeds must fit in 32 bits"))?)
            }
        };
        let wire = WireRequest {
            contents,
            system_instruction: (!system.is_empty()).then_some(WireSystem { parts: system }),
            tools: if has_tools {
                vec![WireTools {
                    function_declarations: request
                        .tools
                        .iter()
                        .map(|t| WireFunctionDeclaration {
                            name: &t.name,
                            description: t.description.as_deref(),
                            parameters_json_schema: &t.parameters,
                        })
                        .collect(),
                }]
            } else {
                Vec::new()
            },
            tool_config,
            generation_config: WireGenerationConfig {
                temperature: request.params.temperature,
                top_p: request.params.top_p,
                max_output_tokens: request.params.max_tokens,
                stop_sequences: &request.params.stop,
                seed,
                presence_penalty: request.params.presence_penalty,
                frequency_penalty: request.params.frequency_penalty,
                response_mime_type,
                response_json_schema,
            },
        };
        serde_json::to_vec(&wire).map_err(|e| invalid(format!("could not encode the request: {e}")))
    }

    /// Parses a non-streaming `generateContent` response.
    fn parse_response(
        &self,
        body: &[u8],
        requested_model: &str,
    ) -> Result<ChatResponse, ProviderError> {
        let wire: WireResponse = decode_json(body)?;
        if let Some(err) = blocked(wire.prompt_feedback.as_ref()) {
            return Err(err);
        }
        let candidate = wire.candidates.into_iter().next().ok_or_else(|| {
            ProviderError::new(
                ErrorClass::InvalidResponse,
                "the provider's response has no candidates",
            )
        })?;
        let mut content = Vec::new();
        let mut calls = 0usize;
        for part in candidate.content.map(|c| c.parts).unwrap_or_default() {
            if let Some(call) = part.function_call {
                content.push(ContentPart::ToolCall(ToolCall {
                    id: format!("call_{calls}"),
                    name: call.name.clone(),
                    arguments: call.arguments(),
                }));
                calls += 1;
                continue;
            }
            if part.thought == Some(true) {
                continue;
            }
            match (part.text, content.last_mut()) {
                (Some(text), _) if text.is_empty() => {}
                (Some(text), Some(ContentPart::Text(prev))) => prev.push_str(&text),
                (Some(text), _) => content.push(ContentPart::Text(text)),
                (None, _) => {}
            }
        }
        let reason = candidate
            .finish_reason
            .as_deref()
            .map_or(FinishReason::Unspecified, finish_reason);
        Ok(ChatResponse {
            model: reply_model(wire.model_version, requested_model),
            content,
            finish_reason: finish_with_calls(reason, calls > 0),
            usage: wire.usage_metadata.map(Usage::from),
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
// Embeddings (`POST {base_url}/v1beta/models/{model}:batchEmbedContents`)
// ---------------------------------------------------------------------------------------------

/// The most texts one `batchEmbedContents` request may carry.
pub const MAX_EMBED_INPUTS: usize = 100;

#[derive(Serialize)]
struct WireBatchEmbed<'a> {
    requests: Vec<WireEmbedContent<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireEmbedContent<'a> {
    model: &'a str,
    content: WireEmbedText<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_dimensionality: Option<u32>,
}

#[derive(Serialize)]
struct WireEmbedText<'a> {
    parts: [WirePart<'a>; 1],
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireBatchEmbedResponse {
    #[serde(default)]
    embeddings: Vec<WireContentEmbedding>,
    #[serde(default)]
    usage_metadata: Option<WireEmbedUsage>,
}

#[derive(Deserialize)]
struct WireContentEmbedding {
    #[serde(default)]
    values: Vec<f32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireEmbedUsage {
    #[serde(default)]
    prompt_token_count: u64,
}

impl EmbedWire for GenerateContent {
    fn max_batch(&self, _model: &str) -> usize {
        MAX_EMBED_INPUTS
    }

    fn embed_endpoint(&self, model: &str) -> Result<reqwest::Url, ProviderError> {
        let model = model.strip_prefix("models/").unwrap_or(model);
        if !is_path_segment(model) {
            return Err(invalid("the model name is not valid for gemini"));
        }
        parse_url(&format!(
            "{}/v1beta/models/{model}:batchEmbedContents",
            self.base_url
        ))
    }

    /// One `EmbedContentRequest` per text, each naming the model (`models/{model}`) as the
    /// API requires; `dimensions` is `outputDimensionality`.
    fn build_embed(
        &self,
        model: &str,
        request: &EmbedRequest,
        inputs: &[String],
    ) -> Result<Vec<u8>, ProviderError> {
        let name = format!("models/{}", model.strip_prefix("models/").unwrap_or(model));
        let wire = WireBatchEmbed {
            requests: inputs
                .iter()
                .map(|text| WireEmbedContent {
                    model: &name,
                    content: WireEmbedText {
                        parts: [WirePart::Text(text)],
                    },
                    output_dimensionality: request.dimensions,
                })
                .collect(),
        };
        serde_json::to_vec(&wire).map_err(|e| invalid(format!("could not encode the request: {e}")))
    }

    /// The vectors come in request order. The Gemini API reports no usage for embeddings;
    /// `usageMetadata.promptTokenCount` is read when present.
    fn parse_embed(
        &self,
        body: &[u8],
        model: &str,
        count: usize,
    ) -> Result<EmbedResponse, ProviderError> {
        let wire: WireBatchEmbedResponse = decode_json(body)?;
        check_count(wire.embeddings.len(), count)?;
        Ok(EmbedResponse {
            model: model.strip_prefix("models/").unwrap_or(model).to_owned(),
            embeddings: wire.embeddings.into_iter().map(|e| e.values).collect(),
            usage: wire.usage_metadata.map(|u| Usage {
                input_tokens: u.prompt_token_count,
                ..Usage::default()
            }),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Request
// ---------------------------------------------------------------------------------------------

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireRequest<'a> {
    contents: Vec<WireContent<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<WireSystem<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTools<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_config: Option<WireToolConfig<'a>>,
    #[serde(skip_serializing_if = "WireGenerationConfig::is_empty")]
    generation_config: WireGenerationConfig<'a>,
}

#[derive(Serialize)]
struct WireSystem<'a> {
    parts: Vec<WirePart<'a>>,
}

#[derive(Serialize)]
struct WireContent<'a> {
    role: &'static str,
    parts: Vec<WirePart<'a>>,
}

impl<'a> Turn for WireContent<'a> {
    type Part = WirePart<'a>;

    fn role(&self) -> &str {
        self.role
    }

    fn parts(&mut self) -> &mut Vec<WirePart<'a>> {
        &mut self.parts
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
enum WirePart<'a> {
    Text(&'a str),
    InlineData(WireBlob<'a>),
    FileData(WireFileData<'a>),
    FunctionCall(WireFunctionCall<'a>),
    FunctionResponse(WireFunctionResponse<'a>),
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireBlob<'a> {
    mime_type: &'a str,
    data: std::borrow::Cow<'a, str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireFileData<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    mime_type: Option<&'a str>,
    file_uri: &'a str,
}

#[derive(Serialize)]
struct WireFunctionCall<'a> {
    name: &'a str,
    args: serde_json::Value,
}

#[derive(Serialize)]
struct WireFunctionResponse<'a> {
    name: &'a str,
    response: serde_json::Value,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireTools<'a> {
    function_declarations: Vec<WireFunctionDeclaration<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireFunctionDeclaration<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    parameters_json_schema: &'a serde_json::Value,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireToolConfig<'a> {
    function_calling_config: WireFunctionCallingConfig<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireFunctionCallingConfig<'a> {
    mode: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    allowed_function_names: Vec<&'a str>,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct WireGenerationConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<u32>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    stop_sequences: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_mime_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_json_schema: Option<&'a serde_json::Value>,
}

impl WireGenerationConfig<'_> {
    fn is_empty(&self) -> bool {
        self.temperature.is_none()
            && self.top_p.is_none()
            && self.max_output_tokens.is_none()
            && self.stop_sequences.is_empty()
            && self.seed.is_none()
            && self.presence_penalty.is_none()
            && self.frequency_penalty.is_none()
            && self.response_mime_type.is_none()
            && self.response_json_schema.is_none()
    }
}

fn invalid(msg: impl Into<String>) -> ProviderError {
    ProviderError::new(ErrorClass::InvalidRequest, msg)
}

fn convert_message(message: &Message) -> Result<WireContent<'_>, ProviderError> {
    let role = match message.role {
        Role::Assistant => "model",
        _ => "user",
    };
    let mut parts = Vec::with_capacity(message.content.len());
    for part in &message.content {
        match part {
            ContentPart::Text(text) if text.is_empty() => {}
            ContentPart::Text(text) => parts.push(WirePart::Text(text)),
            ContentPart::Image(image) => {
                if message.role != Role::User {
                    return Err(invalid("images are only allowed in user messages"));
                }
                parts.push(match &image.source {
                    ImageSource::Data(data) => WirePart::InlineData(WireBlob {
                        mime_type: image.mime_type.as_deref().unwrap_or("image/png"),
                        data: base64::engine::general_purpose::STANDARD
                            .encode(data)
                            .into(),
                    }),
                    ImageSource::Url(url) => match parse_data_url(url) {
                        Some((mime_type, data)) => WirePart::InlineData(WireBlob {
                            mime_type,
                            data: data.into(),
                        }),
                        None if url.starts_with("data:") => {
                            return Err(invalid("image data urls must be base64-encoded"));
                        }
                        None => WirePart::FileData(WireFileData {
                            mime_type: image.mime_type.as_deref(),
                            file_uri: url,
                        }),
                    },
                });
            }
            ContentPart::ToolCall(call) => {
                if message.role != Role::Assistant {
                    return Err(invalid("tool calls belong in assistant messages"));
                }
                let args = if call.arguments.trim().is_empty() {
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
                parts.push(WirePart::FunctionCall(WireFunctionCall {
                    name: &call.name,
                    args,
                }));
            }
            ContentPart::ToolResult(result) => {
                if message.role != Role::Tool {
                    return Err(invalid("tool results belong in tool messages"));
                }
                let name = result.name.as_deref().filter(|n| !n.is_empty()).ok_or_else(|| {
                    invalid(format!(
                        "gemini needs the tool name of result `{}`: set tool_result.name or send the tool call it answers",
                        result.tool_call_id
                    ))
                })?;
                parts.push(WirePart::FunctionResponse(WireFunctionResponse {
                    name,
                    response: function_response(&result.content, result.is_error),
                }));
            }
        }
    }
    Ok(WireContent { role, parts })
}

/// A tool result as the JSON object Gemini wants: objects as they are, anything else wrapped.
fn function_response(content: &str, is_error: bool) -> serde_json::Value {
    let parsed = serde_json::from_str::<serde_json::Value>(content).ok();
    match (parsed, is_error) {
        (Some(object @ serde_json::Value::Object(_)), false) => object,
        (Some(object @ serde_json::Value::Object(_)), true) => {
            serde_json::json!({ "error": object })
        }
        (_, false) => serde_json::json!({ "content": content }),
        (_, true) => serde_json::json!({ "error": content }),
    }
}

// ---------------------------------------------------------------------------------------------
// Response
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireResponse {
    #[serde(default)]
    candidates: Vec<WireCandidate>,
    #[serde(default)]
    prompt_feedback: Option<WirePromptFeedback>,
    #[serde(default)]
    usage_metadata: Option<WireUsage>,
    #[serde(default)]
    model_version: Option<String>,
    #[serde(default)]
    error: Option<WireError>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireCandidate {
    #[serde(default)]
    content: Option<WireResponseContent>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireResponseContent {
    #[serde(default)]
    parts: Vec<WireResponsePart>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireResponsePart {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thought: Option<bool>,
    #[serde(default)]
    function_call: Option<WireResponseFunctionCall>,
}

#[derive(Deserialize)]
struct WireResponseFunctionCall {
    #[serde(default)]
    name: String,
    #[serde(default)]
    args: Option<serde_json::Value>,
}

impl WireResponseFunctionCall {
    fn arguments(self) -> String {
        match self.args {
            None | Some(serde_json::Value::Null) => "{}".to_owned(),
            Some(args) => args.to_string(),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WirePromptFeedback {
    #[serde(default)]
    block_reason: Option<String>,
}

#[derive(Debug, Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "camelCase")]
struct WireUsage {
    #[serde(default)]
    prompt_token_count: Option<u64>,
    #[serde(default)]
    candidates_token_count: Option<u64>,
    #[serde(default)]
    cached_content_token_count: Option<u64>,
    #[serde(default)]
    thoughts_token_count: Option<u64>,
    #[serde(default)]
    tool_use_prompt_token_count: Option<u64>,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        Usage {
            // promptTokenCount includes cached content; tool-use prompts are billed as input.
            input_tokens: u
                .prompt_token_count
                .unwrap_or(0)
                .saturating_add(u.tool_use_prompt_token_count.unwrap_or(0)),
            // Thinking tokens are billed as output.
            output_tokens: u
                .candidates_token_count
                .unwrap_or(0)
                .saturating_add(u.thoughts_token_count.unwrap_or(0)),
            cached_input_tokens: u.cached_content_token_count,
            cache_write_tokens: None,
            reasoning_tokens: u.thoughts_token_count,
        }
    }
}

fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "STOP" => FinishReason::Stop,
        "MAX_TOKENS" => FinishReason::Length,
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            FinishReason::ContentFilter
        }
        "FINISH_REASON_UNSPECIFIED" => FinishReason::Unspecified,
        // MALFORMED_FUNCTION_CALL, LANGUAGE, OTHER, and reasons added later.
        _ => FinishReason::Other,
    }
}

/// A calling model's natural stop is a tool-call finish.
fn finish_with_calls(reason: FinishReason, saw_call: bool) -> FinishReason {
    match reason {
        FinishReason::Stop | FinishReason::Unspecified if saw_call => FinishReason::ToolCalls,
        other => other,
    }
}

/// A blocked prompt (`promptFeedback.blockReason`), as an error.
fn blocked(feedback: Option<&WirePromptFeedback>) -> Option<ProviderError> {
    let reason = feedback?.block_reason.as_deref()?;
    // The reason is an enum; quote it only when it looks like one.
    let reason = if !reason.is_empty()
        && reason.len() <= 40
        && reason.chars().all(|c| c.is_ascii_uppercase() || c == '_')
    {
        reason.to_ascii_lowercase()
    } else {
        "unspecified".to_owned()
    };
    Some(ProviderError::new(
        ErrorClass::ContentFiltered,
        format!("the provider blocked the prompt (reason: {reason})"),
    ))
}

// ---------------------------------------------------------------------------------------------
// Stream
// ---------------------------------------------------------------------------------------------

/// Decodes `streamGenerateContent?alt=sse` chunks.
#[derive(Debug, Default)]
pub struct ChunkDecoder {
    finish: Option<FinishReason>,
    usage: Option<WireUsage>,
    calls: u32,
}

impl EventDecoder for ChunkDecoder {
    fn decode(
        &mut self,
        event: &SseEvent,
        out: &mut VecDeque<StreamEvent>,
    ) -> Result<bool, ProviderError> {
        let chunk: WireResponse = decode_event(event.data.as_bytes())?;
        if let Some(error) = chunk.error {
            return Err(ProviderError::in_stream(error.upstream()));
        }
        if let Some(err) = blocked(chunk.prompt_feedback.as_ref()) {
            return Err(err);
        }
        if let Some(candidate) = chunk.candidates.into_iter().next() {
            for part in candidate.content.map(|c| c.parts).unwrap_or_default() {
                if let Some(call) = part.function_call {
                    // Gemini sends each call whole, in one part.
                    out.push_back(StreamEvent::ToolCall(ToolCallDelta {
                        index: self.calls,
                        id: Some(format!("call_{}", self.calls)),
                        name: Some(call.name.clone()).filter(|n| !n.is_empty()),
                        arguments: call.arguments(),
                    }));
                    self.calls = self.calls.saturating_add(1);
                } else if let Some(text) = part.text.filter(|t| !t.is_empty()) {
                    out.push_back(if part.thought == Some(true) {
                        StreamEvent::Reasoning(text)
                    } else {
                        StreamEvent::Text(text)
                    });
                }
            }
            if let Some(reason) = candidate.finish_reason.filter(|r| !r.is_empty()) {
                self.finish = Some(finish_reason(&reason));
            }
        }
        // Every chunk carries the usage so far; the last one counts.
        if let Some(usage) = chunk.usage_metadata {
            self.usage = Some(usage);
        }
        Ok(false)
    }

    fn end_of_body(&mut self, out: &mut VecDeque<StreamEvent>) -> Result<(), ProviderError> {
        let Some(reason) = self.finish.take() else {
            return Err(ProviderError::truncated());
        };
        if let Some(usage) = self.usage.take() {
            out.push_back(StreamEvent::Usage(usage.into()));
        }
        out.push_back(StreamEvent::Finish(finish_with_calls(
            reason,
            self.calls > 0,
        )));
        Ok(())
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
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    details: Vec<WireErrorDetail>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireErrorDetail {
    #[serde(default, rename = "@type")]
    kind: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    retry_delay: Option<String>,
}

impl WireError {
    fn upstream(self) -> UpstreamError {
        UpstreamError {
            class: classify(&self),
            retry_after: self.retry_delay(),
            message: self.message,
        }
    }

    fn has_reason(&self, reason: &str) -> bool {
        self.details.iter().any(|d| {
            d.kind.ends_with("google.rpc.ErrorInfo") && d.reason.as_deref() == Some(reason)
        })
    }

    /// `RetryInfo.retryDelay`, a protobuf JSON duration such as `"7s"` or `"0.5s"`.
    fn retry_delay(&self) -> Option<Duration> {
        self.details
            .iter()
            .filter(|d| d.kind.ends_with("google.rpc.RetryInfo"))
            .find_map(|d| d.retry_delay.as_deref())
            .and_then(|v| v.trim().strip_suffix('s'))
            .and_then(super::error::parse_retry_after_secs)
    }
}

/// The class a Google API error names: credentials, then the canonical status (refined by
/// the message for context-length errors).
fn classify(error: &WireError) -> Option<ErrorClass> {
    if error.has_reason("API_KEY_INVALID") || error.has_reason("API_KEY_EXPIRED") {
        return Some(ErrorClass::Authentication);
    }
    let class = match error.status.as_deref()? {
        "INVALID_ARGUMENT" | "OUT_OF_RANGE" => ErrorClass::InvalidRequest,
        "FAILED_PRECONDITION" | "PERMISSION_DENIED" => ErrorClass::Permission,
        "UNAUTHENTICATED" => ErrorClass::Authentication,
        "NOT_FOUND" => ErrorClass::ModelNotFound,
        "RESOURCE_EXHAUSTED" => ErrorClass::RateLimited,
        "UNAVAILABLE" => ErrorClass::Overloaded,
        "INTERNAL" | "UNKNOWN" | "DATA_LOSS" => ErrorClass::ServerError,
        "DEADLINE_EXCEEDED" => ErrorClass::Timeout,
        _ => return None,
    };
    let lower = error
        .message
        .as_deref()
        .unwrap_or_default()
        .to_ascii_lowercase();
    Some(
        if class == ErrorClass::InvalidRequest
            && lower.contains("input token count")
            && lower.contains("exceeds the maximum")
        {
            ErrorClass::ContextLengthExceeded
        } else {
            class
        },
    )
}

fn parse_error_body(body: &[u8]) -> Option<WireError> {
    // The streaming method may wrap the error in a one-element array.
    serde_json::from_slice::<WireErrorBody>(body)
        .or_else(|_| {
            serde_json::from_slice::<Vec<WireErrorBody>>(body)
                .map_err(|_| ())
                .and_then(|v| v.into_iter().next().ok_or(()))
        })
        .ok()
        .map(|b| b.error)
}

/// What a Google API error body (`{"error": {"code", "message", "status", "details"}}`,
/// possibly inside a one-element array) says.
pub fn error_body(body: &[u8]) -> UpstreamError {
    parse_error_body(body)
        .map(WireError::upstream)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::types::{Image, ImageDetail, SamplingParams, Tool, ToolResult};

    fn wire() -> GenerateContent {
        GenerateContent::new(DEFAULT_BASE_URL)
    }

    fn json(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).unwrap()
    }

    fn tool_result(id: &str, name: Option<&str>, content: &str, is_error: bool) -> ContentPart {
        ContentPart::ToolResult(ToolResult {
            tool_call_id: id.into(),
            name: name.map(Into::into),
            content: content.into(),
            is_error,
        })
    }

    #[test]
    fn builds_a_full_request() {
        let request = ChatRequest {
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
                            detail: ImageDetail::High,
                        }),
                        ContentPart::Image(Image {
                            source: ImageSource::Url("https://example.com/cat.jpg".into()),
                            mime_type: Some("image/jpeg".into()),
                            detail: ImageDetail::Default,
                        }),
                        ContentPart::Image(Image {
                            source: ImageSource::Url("data:image/webp;base64,UklGR==".into()),
                            mime_type: None,
                            detail: ImageDetail::Default,
                        }),
                    ],
                    name: None,
                },
                Message {
                    role: Role::Assistant,
                    content: vec![
                        ContentPart::ToolCall(ToolCall {
                            id: "call_0".into(),
                            name: "get_weather".into(),
                            arguments: r#"{"city":"Paris"}"#.into(),
                        }),
                        ContentPart::ToolCall(ToolCall {
                            id: "call_1".into(),
                            name: "get_time".into(),
                            arguments: String::new(),
                        }),
                    ],
                    name: None,
                },
                Message {
                    role: Role::Tool,
                    content: vec![tool_result("call_0", Some("get_weather"), "sunny", false)],
                    name: None,
                },
                Message {
                    role: Role::Tool,
                    content: vec![tool_result(
                        "call_1",
                        Some("get_time"),
                        r#"{"time":"10:00"}"#,
                        false,
                    )],
                    name: None,
                },
            ],
            params: SamplingParams {
                temperature: Some(0.5),
                top_p: Some(0.9),
                max_tokens: Some(100),
                stop: vec!["END".into()],
                seed: Some(7),
                presence_penalty: Some(0.1),
                frequency_penalty: Some(0.2),
                parallel_tool_calls: None,
            },
            tools: vec![Tool {
                name: "get_weather".into(),
                description: Some("weather".into()),
                parameters: serde_json::json!({"type": "object", "additionalProperties": false}),
                strict: false,
            }],
            tool_choice: Some(ToolChoice::Named("get_weather".into())),
            response_format: Some(ResponseFormat::JsonSchema {
                name: "answer".into(),
                schema: serde_json::json!({"type": "object"}),
                strict: true,
            }),
            user: Some("u1".into()),
            ..Default::default()
        };
        let body = json(&wire().build_request("m", &request, false).unwrap());
        assert_eq!(
            body,
            serde_json::json!({
                "contents": [
                    {"role": "user", "parts": [
                        {"text": "what are these?"},
                        {"inlineData": {"mimeType": "image/png", "data": "iVBORw=="}},
                        {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/cat.jpg"}},
                        {"inlineData": {"mimeType": "image/webp", "data": "UklGR=="}}
                    ]},
                    {"role": "model", "parts": [
                        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                        {"functionCall": {"name": "get_time", "args": {}}}
                    ]},
                    {"role": "user", "parts": [
                        {"functionResponse": {"name": "get_weather", "response": {"content": "sunny"}}},
                        {"functionResponse": {"name": "get_time", "response": {"time": "10:00"}}}
                    ]}
                ],
                "systemInstruction": {"parts": [{"text": "be brief"}, {"text": "dev note"}]},
                "tools": [{"functionDeclarations": [{
                    "name": "get_weather",
                    "description": "weather",
                    "parametersJsonSchema": {"type": "object", "additionalProperties": false}
                }]}],
                "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}},
                "generationConfig": {
                    "temperature": 0.5,
                    "topP": 0.9,
                    "maxOutputTokens": 100,
                    "stopSequences": ["END"],
                    "seed": 7,
                    "presencePenalty": 0.1,
                    "frequencyPenalty": 0.2,
                    "responseMimeType": "application/json",
                    "responseJsonSchema": {"type": "object"}
                }
            })
        );
    }

    #[test]
    fn minimal_request_has_only_contents() {
        let request = ChatRequest {
            messages: vec![Message::text(Role::User, "hi")],
            tool_choice: Some(ToolChoice::Required),
            ..Default::default()
        };
        assert_eq!(
            json(&wire().build_request("m", &request, false).unwrap()),
            serde_json::json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
        );
    }

    #[test]
    fn tool_choice_modes_and_json_mode() {
        let base = ChatRequest {
            messages: vec![Message::text(Role::User, "hi")],
            tools: vec![Tool {
                name: "f".into(),
                description: None,
                parameters: serde_json::json!({"type": "object"}),
                strict: false,
            }],
            response_format: Some(ResponseFormat::JsonObject),
            ..Default::default()
        };
        for (choice, mode) in [
            (ToolChoice::Auto, "AUTO"),
            (ToolChoice::Required, "ANY"),
            (ToolChoice::None, "NONE"),
        ] {
            let mut request = base.clone();
            request.tool_choice = Some(choice);
            let body = json(&wire().build_request("m", &request, false).unwrap());
            assert_eq!(
                body["toolConfig"],
                serde_json::json!({"functionCallingConfig": {"mode": mode}})
            );
            assert_eq!(
                body["generationConfig"],
                serde_json::json!({"responseMimeType": "application/json"})
            );
        }
    }

    #[test]
    fn tool_results_are_wrapped_as_objects() {
        assert_eq!(
            function_response("42", false),
            serde_json::json!({"content": "42"})
        );
        assert_eq!(
            function_response(r#"{"a":1}"#, false),
            serde_json::json!({"a": 1})
        );
        assert_eq!(
            function_response("boom", true),
            serde_json::json!({"error": "boom"})
        );
    }

    #[test]
    fn unsupported_input_is_an_invalid_request() {
        let nameless_result = ChatRequest {
            messages: vec![Message {
                role: Role::Tool,
                content: vec![tool_result("call_9", None, "x", false)],
                name: None,
            }],
            ..Default::default()
        };
        let huge_seed = ChatRequest {
            messages: vec![Message::text(Role::User, "hi")],
            params: SamplingParams {
                seed: Some(i64::MAX),
                ..Default::default()
            },
            ..Default::default()
        };
        for request in [nameless_result, huge_seed] {
            let err = wire().build_request("m", &request, false).unwrap_err();
            assert_eq!(err.class, ErrorClass::InvalidRequest, "{err}");
        }
    }

    #[test]
    fn urls() {
        assert_eq!(
            endpoint_url(DEFAULT_BASE_URL, "gemini-2.5-flash", false).unwrap(),
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent"
        );
        assert_eq!(
            endpoint_url("http://127.0.0.1:9", "models/gemini-2.5-pro", true).unwrap(),
            "http://127.0.0.1:9/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse"
        );
        for bad in ["", "a/b", "x?key=1", "a b", "x#y"] {
            assert!(endpoint_url(DEFAULT_BASE_URL, bad, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_a_documented_response() {
        let body = include_bytes!("../../tests/fixtures/gemini/generate_content.json");
        let response = wire().parse_response(body, "gemini-2.5-flash").unwrap();
        assert_eq!(response.model, "gemini-2.5-flash");
        assert_eq!(response.finish_reason, FinishReason::Stop);
        assert_eq!(
            response.content,
            vec![ContentPart::Text(
                "AI learns patterns from data to make predictions or decisions.".into()
            )]
        );
        let usage = response.usage.unwrap();
        assert_eq!(usage.input_tokens, 8);
        // Thinking tokens are output tokens.
        assert_eq!(usage.output_tokens, 12 + 1042);
        assert_eq!(usage.reasoning_tokens, Some(1042));
        assert_eq!(usage.cached_input_tokens, None);
    }

    #[test]
    fn function_calls_get_stable_ids_and_tool_calls_finish() {
        let body =
            include_bytes!("../../tests/fixtures/gemini/generate_content_function_call.json");
        let response = wire().parse_response(body, "m").unwrap();
        assert_eq!(response.finish_reason, FinishReason::ToolCalls);
        let calls: Vec<&ToolCall> = response
            .content
            .iter()
            .filter_map(|p| match p {
                ContentPart::ToolCall(c) => Some(c),
                _ => None,
            })
            .collect();
        assert_eq!(calls.len(), 2);
        assert_eq!(
            (calls[0].id.as_str(), calls[0].name.as_str()),
            ("call_0", "schedule_meeting")
        );
        assert_eq!(
            (calls[1].id.as_str(), calls[1].name.as_str()),
            ("call_1", "set_light_values")
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&calls[1].arguments).unwrap(),
            serde_json::json!({"brightness": 25, "color_temp": "warm"})
        );
        let usage = response.usage.unwrap();
        assert_eq!(usage.input_tokens, 105);
        assert_eq!(usage.cached_input_tokens, Some(64));
        assert_eq!(usage.output_tokens, 38 + 77);
    }

    #[test]
    fn blocked_prompt_is_content_filtered() {
        let body = include_bytes!("../../tests/fixtures/gemini/blocked_prompt.json");
        let err = wire().parse_response(body, "m").unwrap_err();
        assert_eq!(err.class, ErrorClass::ContentFiltered);
        assert!(err.message.contains("safety"), "{}", err.message);
    }

    #[test]
    fn finish_reasons() {
        for (wire, ours) in [
            ("STOP", FinishReason::Stop),
            ("MAX_TOKENS", FinishReason::Length),
            ("SAFETY", FinishReason::ContentFilter),
            ("RECITATION", FinishReason::ContentFilter),
            ("BLOCKLIST", FinishReason::ContentFilter),
            ("PROHIBITED_CONTENT", FinishReason::ContentFilter),
            ("SPII", FinishReason::ContentFilter),
            ("MALFORMED_FUNCTION_CALL", FinishReason::Other),
            ("OTHER", FinishReason::Other),
        ] {
            assert_eq!(finish_reason(wire), ours, "{wire}");
        }
        assert_eq!(
            finish_with_calls(FinishReason::Length, true),
            FinishReason::Length
        );
    }

    async fn decode_stream(body: &'static [u8]) -> Vec<Result<StreamEvent, ProviderError>> {
        crate::providers::wire::decode_in_pieces(body, 7, Sse::new(ChunkDecoder::default())).await
    }

    #[tokio::test]
    async fn decodes_a_documented_stream_with_usage_last() {
        let events = decode_stream(include_bytes!("../../tests/fixtures/gemini/stream.txt"))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect::<Vec<_>>();
        assert_eq!(
            events,
            vec![
                StreamEvent::Text("The quick brown fox".into()),
                StreamEvent::Text(" jumps over the lazy".into()),
                StreamEvent::Text(" dog.".into()),
                StreamEvent::Usage(Usage {
                    input_tokens: 9,
                    output_tokens: 14 + 28,
                    reasoning_tokens: Some(28),
                    ..Usage::default()
                }),
                StreamEvent::Finish(FinishReason::Stop),
            ]
        );
    }

    #[tokio::test]
    async fn decodes_a_streamed_function_call() {
        let events = decode_stream(include_bytes!(
            "../../tests/fixtures/gemini/stream_function_call.txt"
        ))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect::<Vec<_>>();
        assert_eq!(
            events[0],
            StreamEvent::ToolCall(ToolCallDelta {
                index: 0,
                id: Some("call_0".into()),
                name: Some("get_current_weather".into()),
                arguments: r#"{"location":"Boston, MA"}"#.into(),
            })
        );
        assert_eq!(
            events.last(),
            Some(&StreamEvent::Finish(FinishReason::ToolCalls))
        );
    }

    fn map_error(status: u16, headers: &http::HeaderMap, body: &[u8]) -> ProviderError {
        wire().classify(status, headers, body)
    }

    #[test]
    fn google_statuses_and_reasons_name_their_class() {
        let none = http::HeaderMap::new();
        let fixture = include_bytes!("../../tests/fixtures/gemini/error_api_key_invalid.json");
        assert_eq!(
            map_error(400, &none, fixture).class,
            ErrorClass::Authentication
        );
        let located = br#"{"error":{"code":400,"message":"User location is not supported for the API use.","status":"FAILED_PRECONDITION"}}"#;
        assert_eq!(map_error(400, &none, located).class, ErrorClass::Permission);
        // The streaming method wraps errors in a one-element array.
        let wrapped =
            br#"[{"error":{"code":404,"message":"models/x is not found","status":"NOT_FOUND"}}]"#;
        assert_eq!(
            map_error(404, &none, wrapped).class,
            ErrorClass::ModelNotFound
        );
        let blocked = decode_stream(
            b"data: {\"promptFeedback\": {\"blockReason\": \"PROHIBITED_CONTENT\"}}\r\n\r\n",
        );
        let events = futures_util::FutureExt::now_or_never(blocked).unwrap();
        assert_eq!(
            events[0].as_ref().unwrap_err().class,
            ErrorClass::ContentFiltered
        );
    }

    #[test]
    fn retry_delay_from_retry_info_or_header() {
        let none = http::HeaderMap::new();
        let fixture = include_bytes!("../../tests/fixtures/gemini/error_rate_limited.json");
        assert_eq!(
            map_error(429, &none, fixture).retry_after,
            Some(Duration::from_secs(7))
        );
        let fractional = br#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"1.5s"}]}}"#;
        assert_eq!(
            map_error(429, &none, fractional).retry_after,
            Some(Duration::from_millis(1500))
        );
        let mut headers = http::HeaderMap::new();
        headers.insert("retry-after", http::HeaderValue::from_static("3"));
        let plain = br#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED"}}"#;
        assert_eq!(
            map_error(429, &headers, plain).retry_after,
            Some(Duration::from_secs(3))
        );
    }

    #[test]
    fn builds_and_parses_documented_batch_embeddings() {
        let wire = GenerateContent::new("https://generativelanguage.googleapis.com");
        assert_eq!(
            wire.embed_endpoint("models/gemini-embedding-001")
                .unwrap()
                .as_str(),
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-embedding-001:batchEmbedContents"
        );
        assert!(wire.embed_endpoint("a/b").is_err());
        let request = EmbedRequest {
            inputs: vec![
                "What is the meaning of life?".into(),
                "How much wood?".into(),
            ],
            dimensions: Some(768),
            ..EmbedRequest::default()
        };
        let body: serde_json::Value = serde_json::from_slice(
            &wire
                .build_embed("gemini-embedding-001", &request, &request.inputs)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({"requests": [
                {"model": "models/gemini-embedding-001",
                 "content": {"parts": [{"text": "What is the meaning of life?"}]},
                 "outputDimensionality": 768},
                {"model": "models/gemini-embedding-001",
                 "content": {"parts": [{"text": "How much wood?"}]},
                 "outputDimensionality": 768},
            ]})
        );
        // The documented response shape (vectors shortened): no usage.
        let documented = br#"{"embeddings": [{"values": [0.1, -0.2]}, {"values": [0.3, 0.4]}]}"#;
        let answer = wire
            .parse_embed(documented, "gemini-embedding-001", 2)
            .unwrap();
        assert_eq!(answer.embeddings, [vec![0.1, -0.2], vec![0.3, 0.4]]);
        assert_eq!(answer.usage, None);
        assert_eq!(answer.model, "gemini-embedding-001");
        let with_usage =
            br#"{"embeddings": [{"values": [1.0]}], "usageMetadata": {"promptTokenCount": 7}}"#;
        assert_eq!(
            wire.parse_embed(with_usage, "m", 1)
                .unwrap()
                .usage
                .unwrap()
                .input_tokens,
            7
        );
        assert_eq!(
            wire.parse_embed(documented, "m", 3).unwrap_err().class,
            ErrorClass::InvalidResponse
        );
    }
}
