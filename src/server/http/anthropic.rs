//! Anthropic Messages on the gateway: the JSON wire types, their conversion to and from the
//! domain types, and the handler (`POST /v1/messages`).
//!
//! Streams follow Anthropic's event sequence: `message_start`, per content block
//! `content_block_start` / `_delta` / `_stop`, `message_delta` (stop reason, usage),
//! `message_stop`. A stream that breaks after it began ends with an `error` event and no
//! `message_stop`. The key comes as `x-api-key` (or `Authorization: Bearer`); an
//! `anthropic-version` header, when sent, must be a date (`2023-06-01`).

use std::collections::HashMap;

use axum::{body::Bytes, http::HeaderMap};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{HttpError, Surface, arguments_json};
use crate::{
    error::{FieldViolation, GatewayError},
    executor::{Answer, CallEvent},
    server::convert::{IMAGE_MIME_TYPES, check_common, valid_tool_name},
    types::{self, ContentPart, FinishReason, ImageDetail, ImageSource, Role, ToolChoice, Usage},
};

/// The `rpc` label of unary calls on this surface.
pub const RPC: &str = "Anthropic.Messages";
/// The `rpc` label of streaming calls on this surface.
pub const RPC_STREAM: &str = "Anthropic.MessagesStream";

// ---------------------------------------------------------------------------------------------
// Wire types (requests)
// ---------------------------------------------------------------------------------------------

/// A Messages request. Unknown fields are ignored, as the real API does.
#[derive(Debug, Deserialize)]
pub struct MessagesRequest {
    model: String,
    max_tokens: u32,
    messages: Vec<WireMessage>,
    #[serde(default)]
    system: Option<WireContent>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    tools: Option<Vec<WireTool>>,
    #[serde(default)]
    tool_choice: Option<WireToolChoice>,
    #[serde(default)]
    metadata: Option<WireMetadata>,
}

#[derive(Debug, Deserialize)]
struct WireMetadata {
    #[serde(default)]
    user_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum WireRole {
    User,
    Assistant,
}

#[derive(Debug, Deserialize)]
struct WireMessage {
    role: WireRole,
    content: WireContent,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum WireContent {
    Text(String),
    Blocks(Vec<WireBlock>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireBlock {
    Text {
        text: String,
    },
    Image {
        source: WireImageSource,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        #[serde(default)]
        content: Option<WireContent>,
        #[serde(default)]
        is_error: Option<bool>,
    },
    /// Earlier reasoning, sent back by SDKs; the gateway does not forward it.
    Thinking {},
    /// Earlier redacted reasoning; not forwarded.
    RedactedThinking {},
    #[serde(other)]
    Unsupported,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireImageSource {
    Base64 { media_type: String, data: String },
    Url { url: String },
}

#[derive(Debug, Deserialize)]
struct WireTool {
    name: String,
    #[serde(default)]
    description: Option<String>,
    input_schema: Value,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireToolChoice {
    Auto {
        #[serde(default)]
        disable_parallel_tool_use: Option<bool>,
    },
    Any {
        #[serde(default)]
        disable_parallel_tool_use: Option<bool>,
    },
    Tool {
        name: String,
        #[serde(default)]
        disable_parallel_tool_use: Option<bool>,
    },
    None,
}

// ---------------------------------------------------------------------------------------------
// Request conversion
// ---------------------------------------------------------------------------------------------

fn image(source: WireImageSource, at: &str, v: &mut Vec<FieldViolation>) -> types::Image {
    let (source, mime_type) = match source {
        WireImageSource::Base64 { media_type, data } => {
            use base64::Engine as _;
            if !IMAGE_MIME_TYPES.contains(&media_type.as_str()) {
                v.push(FieldViolation::new(
                    format!("{at}.source.media_type"),
                    format!(
                        "`{media_type}` is not supported; use one of {}",
                        IMAGE_MIME_TYPES.join(", ")
                    ),
                ));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data.as_bytes())
                .unwrap_or_else(|_| {
                    v.push(FieldViolation::new(
                        format!("{at}.source.data"),
                        "must be base64",
                    ));
                    Vec::new()
                });
            (ImageSource::Data(bytes.into()), Some(media_type))
        }
        WireImageSource::Url { url } => {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                v.push(FieldViolation::new(
                    format!("{at}.source.url"),
                    "must be an http(s):// URL",
                ));
            }
            (ImageSource::Url(url), None)
        }
    };
    types::Image {
        source,
        mime_type,
        detail: ImageDetail::Default,
    }
}

fn joined_text(content: Option<WireContent>, field: &str, v: &mut Vec<FieldViolation>) -> String {
    match content {
        None => String::new(),
        Some(WireContent::Text(t)) => t,
        Some(WireContent::Blocks(blocks)) => {
            let mut out = String::new();
            for (k, block) in blocks.into_iter().enumerate() {
                match block {
                    WireBlock::Text { text } => out.push_str(&text),
                    _ => v.push(FieldViolation::new(
                        format!("{field}[{k}].type"),
                        "only `text` blocks are supported here",
                    )),
                }
            }
            out
        }
    }
}

/// Converts and validates a request; every problem is reported with its field. A user turn
/// holding tool results becomes a tool message (the results) and, if it also holds text or
/// images, a user message after it.
pub fn chat_request(req: MessagesRequest) -> Result<types::ChatRequest, GatewayError> {
    let mut v = Vec::new();
    let params = types::SamplingParams {
        temperature: req.temperature,
        top_p: req.top_p,
        max_tokens: Some(req.max_tokens),
        stop: req.stop_sequences.unwrap_or_default(),
        parallel_tool_calls: req.tool_choice.as_ref().and_then(|c| match c {
            WireToolChoice::Auto {
                disable_parallel_tool_use,
            }
            | WireToolChoice::Any {
                disable_parallel_tool_use,
            }
            | WireToolChoice::Tool {
                disable_parallel_tool_use,
                ..
            } => disable_parallel_tool_use.map(|d| !d),
            WireToolChoice::None => None,
        }),
        ..types::SamplingParams::default()
    };
    let user = req.metadata.and_then(|m| m.user_id).unwrap_or_default();
    let tags = std::collections::BTreeMap::new();
    for mut violation in check_common(&req.model, !req.messages.is_empty(), &params, &tags, &user) {
        let renamed = match violation.field.as_str() {
            "user" => Some("metadata.user_id".to_owned()),
            f if f.starts_with("stop") => Some(f.replacen("stop", "stop_sequences", 1)),
            _ => None,
        };
        if let Some(name) = renamed {
            violation.field = name;
        }
        v.push(violation);
    }
    if req.top_k.is_some() {
        v.push(FieldViolation::new("top_k", "is not supported"));
    }

    let mut tools: Vec<types::Tool> = Vec::new();
    for (i, tool) in req.tools.unwrap_or_default().into_iter().enumerate() {
        if !valid_tool_name(&tool.name) {
            v.push(FieldViolation::new(
                format!("tools[{i}].name"),
                "must be 1 to 64 letters, digits, `_` or `-`",
            ));
        } else if tools.iter().any(|t| t.name == tool.name) {
            v.push(FieldViolation::new(
                format!("tools[{i}].name"),
                format!("duplicate tool name `{}`", tool.name),
            ));
        }
        if !tool.input_schema.is_object() {
            v.push(FieldViolation::new(
                format!("tools[{i}].input_schema"),
                "must be a JSON Schema object",
            ));
        }
        tools.push(types::Tool {
            name: tool.name,
            description: tool.description.filter(|d| !d.is_empty()),
            parameters: tool.input_schema,
            strict: false,
        });
    }
    let tool_choice = req.tool_choice.map(|c| match c {
        WireToolChoice::Auto { .. } => ToolChoice::Auto,
        WireToolChoice::None => ToolChoice::None,
        WireToolChoice::Any { .. } => {
            if tools.is_empty() {
                v.push(FieldViolation::new(
                    "tool_choice.type",
                    "`any` needs at least one tool in `tools`",
                ));
            }
            ToolChoice::Required
        }
        WireToolChoice::Tool { name, .. } => {
            if !tools.iter().any(|t| t.name == name) {
                v.push(FieldViolation::new(
                    "tool_choice.name",
                    format!("`{name}` is not one of the request's tools"),
                ));
            }
            ToolChoice::Named(name)
        }
    });

    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    if let Some(system) = req.system {
        let text = joined_text(Some(system), "system", &mut v);
        messages.push(types::Message::text(Role::System, text));
    }
    let mut call_names: HashMap<String, String> = HashMap::new();
    for (i, message) in req.messages.into_iter().enumerate() {
        let field = format!("messages[{i}].content");
        let is_user = matches!(message.role, WireRole::User);
        let blocks = match message.content {
            WireContent::Text(t) => vec![WireBlock::Text { text: t }],
            WireContent::Blocks(b) => b,
        };
        let mut content = Vec::with_capacity(blocks.len());
        let mut results = Vec::new();
        for (j, block) in blocks.into_iter().enumerate() {
            let at = format!("{field}[{j}]");
            match block {
                WireBlock::Text { text } => content.push(ContentPart::Text(text)),
                WireBlock::Image { source } if is_user => {
                    content.push(ContentPart::Image(image(source, &at, &mut v)));
                }
                WireBlock::ToolUse { id, name, input } if !is_user => {
                    call_names.insert(id.clone(), name.clone());
                    let arguments = if input.is_null() {
                        "{}".to_owned()
                    } else {
                        input.to_string()
                    };
                    content.push(ContentPart::ToolCall(types::ToolCall {
                        id,
                        name,
                        arguments,
                    }));
                }
                WireBlock::ToolResult {
                    tool_use_id,
                    content: result,
                    is_error,
                } if is_user => {
                    let text = joined_text(result, &format!("{at}.content"), &mut v);
                    results.push(ContentPart::ToolResult(types::ToolResult {
                        name: call_names.get(&tool_use_id).cloned(),
                        tool_call_id: tool_use_id,
                        content: text,
                        is_error: is_error.unwrap_or(false),
                    }));
                }
                WireBlock::Thinking {} | WireBlock::RedactedThinking {} => {}
                WireBlock::Image { .. } => v.push(FieldViolation::new(
                    at,
                    "images are only allowed in user messages",
                )),
                WireBlock::ToolUse { .. } => v.push(FieldViolation::new(
                    at,
                    "tool_use blocks are only allowed in assistant messages",
                )),
                WireBlock::ToolResult { .. } => v.push(FieldViolation::new(
                    at,
                    "tool_result blocks are only allowed in user messages",
                )),
                WireBlock::Unsupported => v.push(FieldViolation::new(
                    format!("{at}.type"),
                    "is not supported; use text, image, tool_use or tool_result",
                )),
            }
        }
        if !results.is_empty() {
            messages.push(types::Message {
                role: Role::Tool,
                content: results,
                name: None,
            });
            if content.is_empty() {
                continue;
            }
        } else if content.is_empty() {
            v.push(FieldViolation::new(field, "must hold at least one block"));
        }
        messages.push(types::Message {
            role: if is_user { Role::User } else { Role::Assistant },
            content,
            name: None,
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
        response_format: None,
        tags,
        user: Some(user).filter(|u| !u.is_empty()),
    })
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

fn stop_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "max_tokens",
        FinishReason::ToolCalls => "tool_use",
        FinishReason::ContentFilter => "refusal",
        FinishReason::Stop | FinishReason::Unspecified | FinishReason::Other => "end_turn",
    }
}

fn usage_json(usage: Option<&Usage>) -> Value {
    let u = usage.copied().unwrap_or_default();
    let cached = u.cached_input_tokens.unwrap_or(0);
    let written = u.cache_write_tokens.unwrap_or(0);
    json!({
        // Anthropic counts cache reads and writes apart from `input_tokens`.
        "input_tokens": u.input_tokens.saturating_sub(cached).saturating_sub(written),
        "output_tokens": u.output_tokens,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": written,
    })
}

/// The message object for a unary answer.
pub fn message(id: &str, answer: &Answer) -> Value {
    let content: Vec<Value> = answer
        .response
        .content
        .iter()
        .filter_map(|part| match part {
            ContentPart::Text(t) => Some(json!({"type": "text", "text": t})),
            ContentPart::ToolCall(c) => Some(json!({
                "type": "tool_use",
                "id": c.id,
                "name": c.name,
                "input": arguments_json(&c.arguments),
            })),
            ContentPart::Image(_) | ContentPart::ToolResult(_) => None,
        })
        .collect();
    json!({
        "id": format!("msg_{id}"),
        "type": "message",
        "role": "assistant",
        "model": answer.response.model,
        "content": content,
        "stop_reason": stop_reason(answer.response.finish_reason),
        "stop_sequence": null,
        "usage": usage_json(answer.response.usage.as_ref()),
    })
}

/// The kind of the content block being streamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Text,
    Thinking,
    Tool(u32),
}

/// Turns call events into Anthropic's stream events.
pub struct EventWriter {
    id: String,
    open: Option<Block>,
    next_index: u32,
}

fn event(name: &str, data: &Value) -> Bytes {
    let mut out = format!("event: {name}\ndata: ").into_bytes();
    // A `Value` always serializes.
    let _ = serde_json::to_writer(&mut out, data);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

impl EventWriter {
    /// A writer for the stream of call `id`.
    pub fn new(id: &str) -> Self {
        Self {
            id: format!("msg_{id}"),
            open: None,
            next_index: 0,
        }
    }

    fn close(&mut self, out: &mut Vec<Bytes>) {
        if self.open.take().is_some() {
            let index = self.next_index - 1;
            out.push(event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    /// Opens `block` unless it is the one open; returns its index.
    fn ensure(&mut self, block: Block, start: Value, out: &mut Vec<Bytes>) -> u32 {
        if self.open != Some(block) {
            self.close(out);
            self.open = Some(block);
            self.next_index += 1;
            out.push(event(
                "content_block_start",
                &json!({"type": "content_block_start", "index": self.next_index - 1, "content_block": start}),
            ));
        }
        self.next_index - 1
    }

    /// A `content_block_delta` frame whose delta is `{"type": kind, field: text}`, written
    /// straight to its buffer (the per-chunk path: no JSON tree).
    fn delta(index: u32, kind: &str, field: &str, text: &str) -> Bytes {
        use std::io::Write as _;
        let mut out = Vec::with_capacity(text.len() + 112);
        // Writes to a Vec and serializing a string cannot fail.
        let _ = write!(
            out,
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":{index},\"delta\":{{\"type\":\"{kind}\",\"{field}\":"
        );
        let _ = serde_json::to_writer(&mut out, text);
        out.extend_from_slice(b"}}\n\n");
        Bytes::from(out)
    }

    /// The events for one call event.
    pub fn event(&mut self, call_event: CallEvent) -> Vec<Bytes> {
        let mut out = Vec::new();
        match call_event {
            CallEvent::Start { model, .. } => out.push(event(
                "message_start",
                &json!({"type": "message_start", "message": {
                    "id": self.id, "type": "message", "role": "assistant", "model": model,
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": 0, "output_tokens": 0},
                }}),
            )),
            CallEvent::Text(t) => {
                let i = self.ensure(Block::Text, json!({"type": "text", "text": ""}), &mut out);
                out.push(Self::delta(i, "text_delta", "text", &t));
            }
            CallEvent::Reasoning(t) => {
                let i = self.ensure(
                    Block::Thinking,
                    json!({"type": "thinking", "thinking": ""}),
                    &mut out,
                );
                out.push(Self::delta(i, "thinking_delta", "thinking", &t));
            }
            CallEvent::ToolCall(c) => {
                let start = json!({
                    "type": "tool_use",
                    "id": c.id.unwrap_or_default(),
                    "name": c.name.unwrap_or_default(),
                    "input": {},
                });
                let i = self.ensure(Block::Tool(c.index), start, &mut out);
                if !c.arguments.is_empty() {
                    out.push(Self::delta(
                        i,
                        "input_json_delta",
                        "partial_json",
                        &c.arguments,
                    ));
                }
            }
            CallEvent::Finish { reason, usage, .. } => {
                self.close(&mut out);
                out.push(event(
                    "message_delta",
                    &json!({
                        "type": "message_delta",
                        "delta": {"stop_reason": stop_reason(reason), "stop_sequence": null},
                        "usage": usage_json(usage.as_ref()),
                    }),
                ));
                out.push(event("message_stop", &json!({"type": "message_stop"})));
            }
        }
        out
    }
}

/// Anthropic's error object for `err`.
fn error_body(err: &HttpError) -> Value {
    let kind = match err.status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        504 => "timeout_error",
        _ => "api_error",
    };
    json!({"type": "error", "error": {"type": kind, "message": err.message}})
}

fn valid_version(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

/// The Anthropic Messages surface.
pub(super) struct Anthropic;

impl Surface for Anthropic {
    type Request = MessagesRequest;
    type Writer = EventWriter;
    const RPC: &'static str = RPC;
    const RPC_STREAM: &'static str = RPC_STREAM;

    fn check_headers(headers: &HeaderMap) -> Result<(), GatewayError> {
        match headers.get("anthropic-version") {
            Some(version) if !version.to_str().is_ok_and(valid_version) => Err(
                GatewayError::invalid("anthropic-version", "must be a date such as `2023-06-01`"),
            ),
            _ => Ok(()),
        }
    }

    fn stream(request: &MessagesRequest, id: &str) -> Option<EventWriter> {
        request
            .stream
            .unwrap_or(false)
            .then(|| EventWriter::new(id))
    }

    fn convert(request: MessagesRequest) -> Result<types::ChatRequest, GatewayError> {
        chat_request(request)
    }

    fn answer(id: &str, answer: &Answer) -> Value {
        message(id, answer)
    }

    fn event(writer: &mut EventWriter, call_event: CallEvent) -> Vec<Bytes> {
        writer.event(call_event)
    }

    fn error_body(err: &HttpError) -> Value {
        error_body(err)
    }

    fn stream_error(err: &HttpError) -> Bytes {
        event("error", &error_body(err))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn parse(body: Value) -> Result<types::ChatRequest, GatewayError> {
        let req: MessagesRequest = serde_json::from_value(body).unwrap();
        chat_request(req)
    }

    /// A request using most of the surface (`props::http` damages it too).
    pub(crate) fn full_request() -> Value {
        json!({
            "model": "mock/echo",
            "max_tokens": 64,
            "system": [{"type": "text", "text": "be brief"}],
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "checking"},
                    {"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Oslo"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "text", "text": "and tomorrow?"}
                ]}
            ],
            "tools": [{"name": "weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "metadata": {"user_id": "u1"}
        })
    }

    #[test]
    fn tool_results_become_a_tool_message() {
        let req = parse(full_request()).unwrap();
        let roles: Vec<Role> = req.messages.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [
                Role::System,
                Role::User,
                Role::Assistant,
                Role::Tool,
                Role::User
            ]
        );
        match &req.messages[2].content[1] {
            ContentPart::ToolCall(c) => assert_eq!(c.arguments, r#"{"city":"Oslo"}"#),
            other => panic!("{other:?}"),
        }
        match &req.messages[3].content[0] {
            ContentPart::ToolResult(r) => {
                assert_eq!(r.name.as_deref(), Some("weather"));
                assert_eq!(r.content, "sunny");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(req.tool_choice, Some(ToolChoice::Required));
        assert_eq!(req.params.parallel_tool_calls, Some(false));
        assert_eq!(req.params.max_tokens, Some(64));
        assert_eq!(req.user.as_deref(), Some("u1"));
    }

    #[test]
    fn problems_name_their_fields() {
        let err = parse(json!({
            "model": "m/x",
            "max_tokens": 0,
            "messages": [{"role": "assistant", "content": [
                {"type": "tool_result", "tool_use_id": "x"},
                {"type": "document", "source": {}}
            ]}],
            "top_k": 5,
            "stop_sequences": [""]
        }))
        .unwrap_err();
        let GatewayError::InvalidArgument(v) = err else {
            panic!("{err:?}")
        };
        let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "max_tokens",
                "stop_sequences[0]",
                "top_k",
                "messages[0].content[0]",
                "messages[0].content[1].type",
                "messages[0].content",
            ]
        );
    }

    #[test]
    fn a_stream_opens_and_closes_blocks() {
        let mut w = EventWriter::new("r1");
        let mut all = Vec::new();
        for e in [
            CallEvent::Start {
                provider: "mock".into(),
                model: "echo".into(),
            },
            CallEvent::Text("hi".into()),
            CallEvent::Text(" th\"ere\n".into()),
            CallEvent::ToolCall(types::ToolCallDelta {
                index: 0,
                id: Some("t1".into()),
                name: Some("f".into()),
                arguments: "{}".into(),
            }),
            CallEvent::Finish {
                reason: FinishReason::ToolCalls,
                usage: None,
                cost: None,
                route: types::Route::default(),
                guardrails: Default::default(),
            },
        ] {
            all.extend(w.event(e));
        }
        let names: Vec<String> = all
            .iter()
            .map(|b| {
                let s = std::str::from_utf8(b).unwrap();
                s.lines()
                    .next()
                    .unwrap()
                    .trim_start_matches("event: ")
                    .to_owned()
            })
            .collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        let data = |i: usize| -> Value {
            let s = std::str::from_utf8(&all[i]).unwrap();
            serde_json::from_str(s.lines().nth(1).unwrap().trim_start_matches("data: ")).unwrap()
        };
        assert_eq!(
            data(3),
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "text_delta", "text": " th\"ere\n"}})
        );
        assert_eq!(
            data(6),
            json!({"type": "content_block_delta", "index": 1,
                   "delta": {"type": "input_json_delta", "partial_json": "{}"}})
        );
        let last_delta = std::str::from_utf8(&all[8]).unwrap();
        assert!(last_delta.contains(r#""stop_reason":"tool_use""#));
    }

    #[test]
    fn versions_are_dates() {
        assert!(valid_version("2023-06-01"));
        assert!(!valid_version("latest"));
    }
}
