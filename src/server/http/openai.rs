//! OpenAI Chat Completions on the gateway: the JSON wire types, their conversion to and from
//! the domain types, and the handlers (`POST /v1/chat/completions`, `GET /v1/models`).
//!
//! Streams are server-sent events: chunks, then (with `stream_options.include_usage`) a
//! usage chunk, then `data: [DONE]`. A stream that breaks after it began ends with
//! `data: {"error": {...}}` and no `[DONE]`, which the SDKs raise as an error.
//! Reasoning text, which Chat Completions has no field for, streams as `reasoning_content`.

use std::collections::{BTreeMap, HashMap};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::Response,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Front, Head, HttpError, Surface, json_response, unix_now};
use crate::{
    error::{FieldViolation, GatewayError},
    executor::{Answer, CallEvent},
    server::convert::{check_common, valid_tool_name},
    types::{self, ContentPart, FinishReason, ImageDetail, ImageSource, Role, ToolChoice, Usage},
};

/// The `rpc` label of unary calls on this surface.
pub const RPC: &str = "OpenAI.ChatCompletions";
/// The `rpc` label of streaming calls on this surface.
pub const RPC_STREAM: &str = "OpenAI.ChatCompletionsStream";

// ---------------------------------------------------------------------------------------------
// Wire types (requests)
// ---------------------------------------------------------------------------------------------

/// A Chat Completions request. Unknown fields are ignored, as the real API does.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    model: String,
    messages: Vec<WireMessage>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    presence_penalty: Option<f64>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    tools: Option<Vec<WireTool>>,
    #[serde(default)]
    tool_choice: Option<WireToolChoice>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(default)]
    response_format: Option<WireResponseFormat>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
enum WireMessage {
    System {
        content: WireContent,
        #[serde(default)]
        name: Option<String>,
    },
    Developer {
        content: WireContent,
        #[serde(default)]
        name: Option<String>,
    },
    User {
        content: WireContent,
        #[serde(default)]
        name: Option<String>,
    },
    Assistant {
        #[serde(default)]
        content: Option<WireContent>,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        tool_calls: Option<Vec<WireToolCall>>,
    },
    Tool {
        content: WireContent,
        tool_call_id: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum WireContent {
    Text(String),
    Parts(Vec<WirePart>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WirePart {
    Text {
        text: String,
    },
    ImageUrl {
        image_url: WireImageUrl,
    },
    Refusal {
        refusal: String,
    },
    #[serde(other)]
    Unsupported,
}

#[derive(Debug, Deserialize)]
struct WireImageUrl {
    url: String,
    #[serde(default)]
    detail: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireToolCall {
    id: String,
    function: WireFunctionCall,
}

#[derive(Debug, Deserialize)]
struct WireFunctionCall {
    name: String,
    #[serde(default)]
    arguments: String,
}

#[derive(Debug, Deserialize)]
struct WireTool {
    function: WireFunction,
}

#[derive(Debug, Deserialize)]
struct WireFunction {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Value>,
    #[serde(default)]
    strict: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum WireToolChoice {
    Mode(String),
    Named { function: WireNamed },
}

#[derive(Debug, Deserialize)]
struct WireNamed {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: WireJsonSchema },
}

#[derive(Debug, Deserialize)]
struct WireJsonSchema {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    schema: Option<Value>,
    #[serde(default)]
    strict: Option<bool>,
}

// ---------------------------------------------------------------------------------------------
// Request conversion
// ---------------------------------------------------------------------------------------------

fn text_of(content: WireContent, field: &str, v: &mut Vec<FieldViolation>) -> String {
    match content {
        WireContent::Text(t) => t,
        WireContent::Parts(parts) => {
            let mut out = String::new();
            for (j, part) in parts.into_iter().enumerate() {
                match part {
                    WirePart::Text { text } => out.push_str(&text),
                    _ => v.push(FieldViolation::new(
                        format!("{field}[{j}].type"),
                        "only `text` parts are allowed here",
                    )),
                }
            }
            out
        }
    }
}

fn parts_of(
    content: WireContent,
    field: &str,
    images: bool,
    v: &mut Vec<FieldViolation>,
) -> Vec<ContentPart> {
    let parts = match content {
        WireContent::Text(t) => return vec![ContentPart::Text(t)],
        WireContent::Parts(parts) => parts,
    };
    let mut out = Vec::with_capacity(parts.len());
    for (j, part) in parts.into_iter().enumerate() {
        let at = format!("{field}[{j}]");
        match part {
            WirePart::Text { text } => out.push(ContentPart::Text(text)),
            WirePart::Refusal { refusal } => out.push(ContentPart::Text(refusal)),
            WirePart::ImageUrl { image_url } if images => {
                let url = image_url.url;
                if !(url.starts_with("https://")
                    || url.starts_with("http://")
                    || url.starts_with("data:"))
                {
                    v.push(FieldViolation::new(
                        format!("{at}.image_url.url"),
                        "must be an http(s):// or data: URL",
                    ));
                }
                let detail = match image_url.detail.as_deref() {
                    None => ImageDetail::Default,
                    Some("auto") => ImageDetail::Auto,
                    Some("low") => ImageDetail::Low,
                    Some("high") => ImageDetail::High,
                    Some(other) => {
                        v.push(FieldViolation::new(
                            format!("{at}.image_url.detail"),
                            format!("`{other}` is not one of auto, low, high"),
                        ));
                        ImageDetail::Default
                    }
                };
                out.push(ContentPart::Image(types::Image {
                    source: ImageSource::Url(url),
                    mime_type: None,
                    detail,
                }));
            }
            WirePart::ImageUrl { .. } => v.push(FieldViolation::new(
                at,
                "images are only allowed in user and system messages",
            )),
            WirePart::Unsupported => v.push(FieldViolation::new(
                format!("{at}.type"),
                "is not supported; use `text` or `image_url`",
            )),
        }
    }
    out
}

/// Converts and validates a request; every problem is reported with its field.
pub fn chat_request(req: ChatCompletionRequest) -> Result<types::ChatRequest, GatewayError> {
    let mut v = Vec::new();
    let params = types::SamplingParams {
        temperature: req.temperature,
        top_p: req.top_p,
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        stop: match req.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(s)) => s,
        },
        seed: req.seed,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        parallel_tool_calls: req.parallel_tool_calls,
    };
    let tags = req.metadata.unwrap_or_default();
    let user = req.user.unwrap_or_default();
    for mut violation in check_common(&req.model, !req.messages.is_empty(), &params, &tags, &user) {
        if let Some(rest) = violation.field.strip_prefix("tags") {
            violation.field = format!("metadata{rest}");
        }
        if violation.field == "max_tokens" && req.max_completion_tokens.is_some() {
            "max_completion_tokens".clone_into(&mut violation.field);
        }
        v.push(violation);
    }
    if req.n.is_some_and(|n| n != 1) {
        v.push(FieldViolation::new("n", "only 1 choice is supported"));
    }
    if req.logprobs == Some(true) {
        v.push(FieldViolation::new("logprobs", "is not supported"));
    }

    let mut tools: Vec<types::Tool> = Vec::new();
    for (i, tool) in req.tools.unwrap_or_default().into_iter().enumerate() {
        let f = tool.function;
        if !valid_tool_name(&f.name) {
            v.push(FieldViolation::new(
                format!("tools[{i}].function.name"),
                "must be 1 to 64 letters, digits, `_` or `-`",
            ));
        } else if tools.iter().any(|t| t.name == f.name) {
            v.push(FieldViolation::new(
                format!("tools[{i}].function.name"),
                format!("duplicate tool name `{}`", f.name),
            ));
        }
        let parameters = match f.parameters {
            Some(p @ Value::Object(_)) => p,
            None => json!({"type": "object", "properties": {}}),
            Some(_) => {
                v.push(FieldViolation::new(
                    format!("tools[{i}].function.parameters"),
                    "must be a JSON Schema object",
                ));
                Value::Null
            }
        };
        tools.push(types::Tool {
            name: f.name,
            description: f.description.filter(|d| !d.is_empty()),
            parameters,
            strict: f.strict.unwrap_or(false),
        });
    }
    let tool_choice = match req.tool_choice {
        None => None,
        Some(WireToolChoice::Mode(mode)) => match mode.as_str() {
            "auto" => Some(ToolChoice::Auto),
            "none" => Some(ToolChoice::None),
            "required" => {
                if tools.is_empty() {
                    v.push(FieldViolation::new(
                        "tool_choice",
                        "`required` needs at least one tool in `tools`",
                    ));
                }
                Some(ToolChoice::Required)
            }
            other => {
                v.push(FieldViolation::new(
                    "tool_choice",
                    format!("`{other}` is not one of none, auto, required or a named function"),
                ));
                None
            }
        },
        Some(WireToolChoice::Named { function }) => {
            if !tools.iter().any(|t| t.name == function.name) {
                v.push(FieldViolation::new(
                    "tool_choice.function.name",
                    format!("`{}` is not one of the request's tools", function.name),
                ));
            }
            Some(ToolChoice::Named(function.name))
        }
    };
    let response_format = match req.response_format {
        None | Some(WireResponseFormat::Text) => None,
        Some(WireResponseFormat::JsonObject) => Some(types::ResponseFormat::JsonObject),
        Some(WireResponseFormat::JsonSchema { json_schema }) => match json_schema.schema {
            Some(schema @ Value::Object(_)) => Some(types::ResponseFormat::JsonSchema {
                name: json_schema
                    .name
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| "response".to_owned()),
                schema,
                strict: json_schema.strict.unwrap_or(false),
            }),
            _ => {
                v.push(FieldViolation::new(
                    "response_format.json_schema.schema",
                    "must be a JSON Schema object",
                ));
                None
            }
        },
    };

    let mut messages = Vec::with_capacity(req.messages.len());
    let mut call_names: HashMap<String, String> = HashMap::new();
    for (i, message) in req.messages.into_iter().enumerate() {
        let field = format!("messages[{i}].content");
        let (role, content, name) = match message {
            WireMessage::System { content, name } => {
                (Role::System, parts_of(content, &field, true, &mut v), name)
            }
            WireMessage::Developer { content, name } => (
                Role::Developer,
                parts_of(content, &field, true, &mut v),
                name,
            ),
            WireMessage::User { content, name } => {
                (Role::User, parts_of(content, &field, true, &mut v), name)
            }
            WireMessage::Assistant {
                content,
                name,
                tool_calls,
            } => {
                let mut parts = content
                    .map(|c| parts_of(c, &field, false, &mut v))
                    .unwrap_or_default();
                for (j, call) in tool_calls.unwrap_or_default().into_iter().enumerate() {
                    if call.id.is_empty() {
                        v.push(FieldViolation::new(
                            format!("messages[{i}].tool_calls[{j}].id"),
                            "must not be empty",
                        ));
                    }
                    call_names.insert(call.id.clone(), call.function.name.clone());
                    parts.push(ContentPart::ToolCall(types::ToolCall {
                        id: call.id,
                        name: call.function.name,
                        arguments: call.function.arguments,
                    }));
                }
                (Role::Assistant, parts, name)
            }
            WireMessage::Tool {
                content,
                tool_call_id,
            } => {
                if tool_call_id.is_empty() {
                    v.push(FieldViolation::new(
                        format!("messages[{i}].tool_call_id"),
                        "must name the tool call this result answers",
                    ));
                }
                let text = text_of(content, &field, &mut v);
                let result = types::ToolResult {
                    name: call_names.get(&tool_call_id).cloned(),
                    tool_call_id,
                    content: text,
                    is_error: false,
                };
                (Role::Tool, vec![ContentPart::ToolResult(result)], None)
            }
        };
        if content.is_empty() {
            v.push(FieldViolation::new(
                field,
                "must hold content or tool calls",
            ));
        }
        messages.push(types::Message {
            role,
            content,
            name: name.filter(|n| !n.is_empty()),
        });
    }
    if !v.is_empty() {
        return Err(GatewayError::InvalidArgument(v));
    }
    Ok(types::ChatRequest {
        model: req.model,
        messages,
        params,
        tools,
        tool_choice,
        response_format,
        tags,
        user: Some(user).filter(|u| !u.is_empty()),
    })
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::ContentFilter => "content_filter",
        FinishReason::Stop | FinishReason::Unspecified | FinishReason::Other => "stop",
    }
}

fn usage_json(usage: Option<&Usage>) -> Value {
    let u = usage.copied().unwrap_or_default();
    json!({
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.total_tokens(),
        "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens.unwrap_or(0)},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens.unwrap_or(0)},
    })
}

/// The completion object for a unary answer.
pub fn completion(id: &str, answer: &Answer) -> Value {
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for part in &answer.response.content {
        match part {
            ContentPart::Text(t) => text.push_str(t),
            ContentPart::ToolCall(c) => tool_calls.push(json!({
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            })),
            // Providers answer with text and tool calls only.
            ContentPart::Image(_) | ContentPart::ToolResult(_) => {}
        }
    }
    let mut message = json!({
        "role": "assistant",
        "content": if text.is_empty() && !tool_calls.is_empty() { Value::Null } else { Value::String(text) },
        "refusal": null,
    });
    if !tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(tool_calls);
    }
    json!({
        "id": format!("chatcmpl-{id}"),
        "object": "chat.completion",
        "created": unix_now(),
        "model": answer.response.model,
        "choices": [{
            "index": 0,
            "message": message,
            "finish_reason": finish_reason(answer.response.finish_reason),
            "logprobs": null,
        }],
        "usage": usage_json(answer.response.usage.as_ref()),
    })
}

/// Turns call events into Chat Completions chunks, written straight to their SSE frames.
///
/// Every chunk of a stream shares its head (`id`, `object`, `created`, `model`), so the head is
/// serialized once (when the model is known) and each delta costs one buffer: no JSON tree, no
/// copies of the id or the model per chunk.
pub struct ChunkWriter {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    /// `data: {"id":..,"object":..,"created":..,"model":..,"choices":[` for this stream.
    head: Vec<u8>,
}

/// A chunk's delta for text (or reasoning text): `{"content": ..}`.
#[derive(serde::Serialize)]
struct TextDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
}

/// A streamed tool call fragment.
#[derive(serde::Serialize)]
struct ToolCallDeltaOut<'a> {
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: FunctionDeltaOut<'a>,
}

#[derive(serde::Serialize)]
struct FunctionDeltaOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: &'a str,
}

#[derive(serde::Serialize)]
struct ToolCallsDelta<'a> {
    tool_calls: [ToolCallDeltaOut<'a>; 1],
}

impl ChunkWriter {
    /// A writer for the stream of call `id`.
    pub fn new(id: &str, include_usage: bool) -> Self {
        let mut writer = Self {
            id: format!("chatcmpl-{id}"),
            created: unix_now(),
            model: String::new(),
            include_usage,
            head: Vec::new(),
        };
        writer.set_head();
        writer
    }

    fn set_head(&mut self) {
        #[derive(serde::Serialize)]
        struct Head<'a> {
            id: &'a str,
            object: &'static str,
            created: u64,
            model: &'a str,
        }
        let mut head = b"data: ".to_vec();
        // Plain strings and numbers always serialize.
        let _ = serde_json::to_writer(
            &mut head,
            &Head {
                id: &self.id,
                object: "chat.completion.chunk",
                created: self.created,
                model: &self.model,
            },
        );
        // Reopen the object: `{...}` -> `{...,"choices":[`.
        head.pop();
        head.extend_from_slice(b",\"choices\":[");
        self.head = head;
    }

    /// One chunk's frame: the head, one choice with `delta`, and the finish reason.
    fn chunk<D: serde::Serialize>(&self, delta: &D, finish: Option<&str>) -> Bytes {
        let mut out = Vec::with_capacity(self.head.len() + 96);
        out.extend_from_slice(&self.head);
        out.extend_from_slice(b"{\"index\":0,\"delta\":");
        // Plain strings and numbers always serialize.
        let _ = serde_json::to_writer(&mut out, delta);
        out.extend_from_slice(b",\"finish_reason\":");
        let _ = serde_json::to_writer(&mut out, &finish);
        out.extend_from_slice(b",\"logprobs\":null}]}\n\n");
        Bytes::from(out)
    }

    /// The SSE frames for one event (the last event's frames end with `data: [DONE]`).
    pub fn event(&mut self, event: CallEvent) -> Vec<Bytes> {
        match event {
            CallEvent::Start { model, .. } => {
                self.model = model;
                self.set_head();
                vec![self.chunk(&json!({"role": "assistant", "content": ""}), None)]
            }
            CallEvent::Text(t) => vec![self.chunk(
                &TextDelta {
                    content: Some(&t),
                    reasoning_content: None,
                },
                None,
            )],
            CallEvent::Reasoning(t) => vec![self.chunk(
                &TextDelta {
                    content: None,
                    reasoning_content: Some(&t),
                },
                None,
            )],
            CallEvent::ToolCall(c) => {
                let call = ToolCallDeltaOut {
                    index: c.index,
                    id: c.id.as_deref(),
                    kind: c.id.as_ref().map(|_| "function"),
                    function: FunctionDeltaOut {
                        name: c.name.as_deref(),
                        arguments: &c.arguments,
                    },
                };
                vec![self.chunk(&ToolCallsDelta { tool_calls: [call] }, None)]
            }
            CallEvent::Finish { reason, usage, .. } => {
                let mut out = vec![self.chunk(&json!({}), Some(finish_reason(reason)))];
                if self.include_usage {
                    out.push(sse_data(&json!({
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": usage_json(usage.as_ref()),
                    })));
                }
                out.push(Bytes::from_static(b"data: [DONE]\n\n"));
                out
            }
        }
    }
}

/// OpenAI's error object for `err`.
fn error_body(err: &HttpError) -> Value {
    let kind = match err.status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        409 => "conflict_error",
        429 => "rate_limit_error",
        503 => "service_unavailable_error",
        504 => "timeout_error",
        _ => "server_error",
    };
    json!({"error": {
        "message": err.message,
        "type": kind,
        "param": err.param,
        "code": err.reason.to_ascii_lowercase(),
    }})
}

fn sse_data(value: &Value) -> Bytes {
    let mut out = b"data: ".to_vec();
    // A `Value` always serializes.
    let _ = serde_json::to_writer(&mut out, value);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// The OpenAI Chat Completions surface.
pub(super) struct OpenAi;

impl Surface for OpenAi {
    type Request = ChatCompletionRequest;
    type Writer = ChunkWriter;
    const RPC: &'static str = RPC;
    const RPC_STREAM: &'static str = RPC_STREAM;

    fn stream(request: &ChatCompletionRequest, id: &str) -> Option<ChunkWriter> {
        let include_usage = request
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        request
            .stream
            .unwrap_or(false)
            .then(|| ChunkWriter::new(id, include_usage))
    }

    fn convert(request: ChatCompletionRequest) -> Result<types::ChatRequest, GatewayError> {
        chat_request(request)
    }

    fn answer(id: &str, answer: &Answer) -> Value {
        completion(id, answer)
    }

    fn event(writer: &mut ChunkWriter, event: CallEvent) -> Vec<Bytes> {
        writer.event(event)
    }

    fn error_body(err: &HttpError) -> Value {
        error_body(err)
    }

    fn stream_error(err: &HttpError) -> Bytes {
        sse_data(&error_body(err))
    }
}

fn error_response(err: GatewayError, request_id: &str) -> Response {
    super::error_response::<OpenAi>(err, request_id)
}

/// `GET /v1/models`: the concrete models and the policies, as OpenAI's model list.
pub(super) async fn list_models(State(front): State<Front>, headers: HeaderMap) -> Response {
    let head = Head::read(&headers);
    if let Err(err) = front.engine.access().chat_caller_secret(head.credential) {
        return error_response(err, &head.request_id);
    }
    let table = front.engine.table();
    let mut data: Vec<Value> = table
        .models()
        .into_iter()
        .map(|(provider, model, _)| {
            json!({"id": format!("{provider}/{model}"), "object": "model", "created": 0, "owned_by": provider})
        })
        .collect();
    data.extend(table.policies().values().map(
        |p| json!({"id": p.spec.name, "object": "model", "created": 0, "owned_by": "llm-gateway"}),
    ));
    data.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    json_response(
        StatusCode::OK,
        &head.request_id,
        &json!({"object": "list", "data": data}),
    )
}

/// Any other path: OpenAI's 404.
pub(super) async fn not_found(headers: HeaderMap) -> Response {
    let head = Head::read(&headers);
    error_response(
        GatewayError::NotFound {
            reason: "NOT_FOUND",
            message: "no such endpoint; this gateway serves POST /v1/chat/completions, POST /v1/embeddings, GET /v1/models and POST /v1/messages".to_owned(),
        },
        &head.request_id,
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn parse(body: Value) -> Result<types::ChatRequest, GatewayError> {
        let req: ChatCompletionRequest = serde_json::from_value(body).unwrap();
        chat_request(req)
    }

    fn fields(err: GatewayError) -> Vec<String> {
        match err {
            GatewayError::InvalidArgument(v) => v.into_iter().map(|v| v.field).collect(),
            other => panic!("expected invalid argument, got {other:?}"),
        }
    }

    /// A request using most of the surface (`props::http` damages it too).
    pub(crate) fn full_request() -> Value {
        json!({
            "model": "mock/echo",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "https://x.test/a.png", "detail": "low"}}
                ]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\":1}"}}
                ]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}
            ],
            "temperature": 0.5, "max_completion_tokens": 100, "stop": "END", "seed": 7,
            "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
            "tool_choice": {"type": "function", "function": {"name": "lookup"}},
            "parallel_tool_calls": false,
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}, "strict": true}},
            "user": "u-1", "metadata": {"team": "search"},
            "some_future_field": {"ignored": true}
        })
    }

    #[test]
    fn a_full_request_converts() {
        let req = parse(full_request()).unwrap();
        assert_eq!(req.messages.len(), 4);
        assert_eq!(req.messages[0].role, Role::System);
        assert!(matches!(
            &req.messages[1].content[1],
            ContentPart::Image(types::Image {
                detail: ImageDetail::Low,
                ..
            })
        ));
        match &req.messages[3].content[0] {
            ContentPart::ToolResult(r) => assert_eq!(r.name.as_deref(), Some("lookup")),
            other => panic!("{other:?}"),
        }
        assert_eq!(req.params.max_tokens, Some(100));
        assert_eq!(req.params.stop, vec!["END"]);
        assert_eq!(req.params.parallel_tool_calls, Some(false));
        assert_eq!(req.tool_choice, Some(ToolChoice::Named("lookup".into())));
        assert!(matches!(
            req.response_format,
            Some(types::ResponseFormat::JsonSchema { strict: true, .. })
        ));
        assert_eq!(req.tags["team"], "search");
        assert_eq!(req.user.as_deref(), Some("u-1"));
    }

    #[test]
    fn every_problem_names_its_field() {
        let err = parse(json!({
            "model": "",
            "messages": [
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
                {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "https://x"}}]}
            ],
            "temperature": 3,
            "n": 2,
            "metadata": {"": "x"},
            "tools": [{"type": "function", "function": {"name": "bad name"}}],
            "tool_choice": "required",
            "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}
        }))
        .unwrap_err();
        assert_eq!(
            fields(err),
            [
                "model",
                "temperature",
                "metadata[]",
                "n",
                "tools[0].function.name",
                "response_format.json_schema.schema",
                "messages[0].content[0].type",
                "messages[0].content",
                "messages[1].content[0]",
                "messages[1].content",
            ]
        );
    }

    /// The JSON payloads of SSE frames (`[DONE]` as a string).
    fn payloads(frames: Vec<Bytes>) -> Vec<Value> {
        frames
            .iter()
            .map(|f| {
                let s = std::str::from_utf8(f).unwrap();
                let data = s
                    .strip_prefix("data: ")
                    .unwrap()
                    .strip_suffix("\n\n")
                    .unwrap();
                serde_json::from_str(data).unwrap_or_else(|_| Value::String(data.to_owned()))
            })
            .collect()
    }

    #[test]
    fn text_chunks_are_whole_json_with_escapes() {
        let mut w = ChunkWriter::new("r\"1", false);
        let mut all = w.event(CallEvent::Start {
            provider: "mock".into(),
            model: "m\"x".into(),
        });
        all.extend(w.event(CallEvent::Text("a \"quote\"\n\u{1F600}".into())));
        all.extend(w.event(CallEvent::Reasoning("why".into())));
        all.extend(w.event(CallEvent::Finish {
            reason: FinishReason::Stop,
            usage: None,
            cost: None,
            route: types::Route::default(),
            guardrails: Default::default(),
        }));
        let p = payloads(all);
        assert_eq!(p.len(), 5);
        for chunk in &p[..4] {
            assert_eq!(chunk["id"], "chatcmpl-r\"1");
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["model"], "m\"x");
            assert!(chunk["created"].as_u64().unwrap() > 0);
            assert_eq!(chunk["choices"][0]["index"], 0);
            assert_eq!(chunk["choices"][0]["logprobs"], Value::Null);
        }
        assert_eq!(
            p[1]["choices"][0]["delta"],
            json!({"content": "a \"quote\"\n\u{1F600}"})
        );
        assert_eq!(p[1]["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(
            p[2]["choices"][0]["delta"],
            json!({"reasoning_content": "why"})
        );
        assert_eq!(p[3]["choices"][0]["finish_reason"], "stop");
        assert_eq!(p[4], "[DONE]");
    }

    #[test]
    fn a_stream_is_chunks_then_usage() {
        let mut w = ChunkWriter::new("r1", true);
        let start = payloads(w.event(CallEvent::Start {
            provider: "mock".into(),
            model: "echo".into(),
        }));
        assert_eq!(start[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(start[0]["model"], "echo");
        let call = payloads(w.event(CallEvent::ToolCall(types::ToolCallDelta {
            index: 1,
            id: Some("c1".into()),
            name: Some("lookup".into()),
            arguments: "{".into(),
        })));
        let tc = &call[0]["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(tc["index"], 1);
        assert_eq!(tc["id"], "c1");
        assert_eq!(tc["type"], "function");
        assert_eq!(tc["function"]["name"], "lookup");
        assert_eq!(tc["function"]["arguments"], "{");
        let more = payloads(w.event(CallEvent::ToolCall(types::ToolCallDelta {
            index: 1,
            id: None,
            name: None,
            arguments: "}".into(),
        })));
        assert_eq!(
            more[0]["choices"][0]["delta"]["tool_calls"][0],
            json!({"index": 1, "function": {"arguments": "}"}})
        );
        let end = payloads(w.event(CallEvent::Finish {
            reason: FinishReason::ToolCalls,
            usage: Some(Usage {
                input_tokens: 3,
                output_tokens: 2,
                ..Usage::default()
            }),
            cost: None,
            route: types::Route::default(),
            guardrails: Default::default(),
        }));
        assert_eq!(end[0]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(end[1]["choices"], json!([]));
        assert_eq!(end[1]["usage"]["total_tokens"], 5);
        assert_eq!(end[2], "[DONE]");
    }
}
