//! Conversion between the generated protobuf types and the domain types, with request
//! validation. This is the only module that knows both sides. Validation collects every
//! problem (not just the first) as a field violation naming the field path.

use std::collections::{BTreeMap, HashMap};

use crate::{
    error::{FieldViolation, GatewayError},
    executor::{Answer, CallEvent},
    models::Cost,
    pb,
    types::{
        self, AttemptKind, AttemptOutcome, CacheOutcome, ContentPart, FinishReason, ImageDetail,
        ImageSource, ResponseFormat, Role, RolloutArm, Route, ToolChoice, Usage,
    },
};

/// MIME types accepted for images.
pub const IMAGE_MIME_TYPES: &[&str] = &["image/png", "image/jpeg", "image/gif", "image/webp"];

const MAX_MODEL_LEN: usize = 256;
const MAX_STOP: usize = 4;
const MAX_TAGS: usize = 32;
const MAX_TAG_KEY: usize = 64;
const MAX_TAG_VALUE: usize = 256;
const MAX_USER: usize = 256;

struct Violations(Vec<FieldViolation>);

impl Violations {
    fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    fn range(&mut self, field: &str, value: Option<f64>, min: f64, max: f64, min_open: bool) {
        if let Some(v) = value {
            let below = if min_open { v <= min } else { v < min };
            if v.is_nan() || below || v > max {
                let lower = if min_open { "greater than" } else { "at least" };
                self.add(
                    field,
                    format!("must be {lower} {min} and at most {max}, got {v}"),
                );
            }
        }
    }
}

/// Whether `name` is a valid tool name: 1 to 64 letters, digits, `_` or `-`.
pub fn valid_tool_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The checks every surface shares, over domain values, naming fields the way both the gRPC
/// API and the OpenAI-compatible API call them (`model`, `temperature`, `stop[1]`, ...).
pub fn check_common(
    model: &str,
    has_messages: bool,
    params: &types::SamplingParams,
    tags: &BTreeMap<String, String>,
    user: &str,
) -> Vec<FieldViolation> {
    let mut v = Violations(Vec::new());
    if model.trim().is_empty() {
        v.add(
            "model",
            "must not be empty; name a `provider/model` or a policy",
        );
    } else if model.len() > MAX_MODEL_LEN {
        v.add("model", format!("must be at most {MAX_MODEL_LEN} bytes"));
    }
    if !has_messages {
        v.add("messages", "must hold at least one message");
    }

    v.range("temperature", params.temperature, 0.0, 2.0, false);
    v.range("top_p", params.top_p, 0.0, 1.0, true);
    v.range(
        "presence_penalty",
        params.presence_penalty,
        -2.0,
        2.0,
        false,
    );
    v.range(
        "frequency_penalty",
        params.frequency_penalty,
        -2.0,
        2.0,
        false,
    );
    if params.max_tokens == Some(0) {
        v.add("max_tokens", "must be greater than 0 when set");
    }
    if params.stop.len() > MAX_STOP {
        v.add(
            "stop",
            format!("at most {MAX_STOP} stop sequences are allowed"),
        );
    }
    for (i, s) in params.stop.iter().enumerate() {
        if s.is_empty() {
            v.add(format!("stop[{i}]"), "must not be empty");
        }
    }
    if tags.len() > MAX_TAGS {
        v.add("tags", format!("at most {MAX_TAGS} tags are allowed"));
    }
    for (key, value) in tags {
        if key.is_empty() || key.len() > MAX_TAG_KEY {
            v.add(
                format!("tags[{key}]"),
                format!("keys must be 1 to {MAX_TAG_KEY} bytes"),
            );
        }
        if value.len() > MAX_TAG_VALUE {
            v.add(
                format!("tags[{key}]"),
                format!("values must be at most {MAX_TAG_VALUE} bytes"),
            );
        }
    }
    if user.len() > MAX_USER {
        v.add("user", format!("must be at most {MAX_USER} bytes"));
    }
    v.0
}

/// Validates and converts a request. Every problem is reported.
pub fn chat_request(mut req: pb::ChatRequest) -> Result<types::ChatRequest, GatewayError> {
    let mut v = Violations(Vec::new());
    let params = types::SamplingParams {
        temperature: req.temperature,
        top_p: req.top_p,
        max_tokens: req.max_tokens,
        stop: std::mem::take(&mut req.stop),
        seed: req.seed,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        parallel_tool_calls: req.parallel_tool_calls,
    };
    let tags: BTreeMap<String, String> = std::mem::take(&mut req.tags).into_iter().collect();
    v.0.extend(check_common(
        &req.model,
        !req.messages.is_empty(),
        &params,
        &tags,
        &req.user,
    ));

    // Tools.
    let mut tools = Vec::with_capacity(req.tools.len());
    for (i, tool) in req.tools.into_iter().enumerate() {
        if !valid_tool_name(&tool.name) {
            v.add(
                format!("tools[{i}].name"),
                "must be 1 to 64 letters, digits, `_` or `-`",
            );
        } else if tools.iter().any(|t: &types::Tool| t.name == tool.name) {
            v.add(
                format!("tools[{i}].name"),
                format!("duplicate tool name `{}`", tool.name),
            );
        }
        let parameters = match tool.parameters {
            Some(s) => struct_to_json(s),
            None => serde_json::json!({"type": "object", "properties": {}}),
        };
        tools.push(types::Tool {
            name: tool.name,
            description: Some(tool.description).filter(|d| !d.is_empty()),
            parameters,
            strict: tool.strict,
        });
    }
    let tool_choice = match req.tool_choice {
        None => None,
        Some(choice) => match pb::ToolChoiceMode::try_from(choice.mode) {
            Ok(pb::ToolChoiceMode::Unspecified) => None,
            Ok(pb::ToolChoiceMode::Auto) => Some(ToolChoice::Auto),
            Ok(pb::ToolChoiceMode::None) => Some(ToolChoice::None),
            Ok(pb::ToolChoiceMode::Required) => {
                if tools.is_empty() {
                    v.add(
                        "tool_choice.mode",
                        "REQUIRED needs at least one tool in `tools`",
                    );
                }
                Some(ToolChoice::Required)
            }
            Ok(pb::ToolChoiceMode::Named) => {
                if !tools.iter().any(|t| t.name == choice.tool_name) {
                    v.add(
                        "tool_choice.tool_name",
                        format!("`{}` is not one of the request's tools", choice.tool_name),
                    );
                }
                Some(ToolChoice::Named(choice.tool_name))
            }
            Err(_) => {
                v.add("tool_choice.mode", format!("unknown mode {}", choice.mode));
                None
            }
        },
    };
    let response_format = match req.response_format {
        None => None,
        Some(format) => match pb::ResponseFormatType::try_from(format.r#type) {
            Ok(pb::ResponseFormatType::Unspecified | pb::ResponseFormatType::Text) => {
                Some(ResponseFormat::Text).filter(|_| format.r#type != 0)
            }
            Ok(pb::ResponseFormatType::JsonObject) => Some(ResponseFormat::JsonObject),
            Ok(pb::ResponseFormatType::JsonSchema) => match format.schema {
                Some(schema) => Some(ResponseFormat::JsonSchema {
                    name: if format.schema_name.is_empty() {
                        "response".to_owned()
                    } else {
                        format.schema_name
                    },
                    schema: struct_to_json(schema),
                    strict: format.strict,
                }),
                None => {
                    v.add("response_format.schema", "is required with JSON_SCHEMA");
                    None
                }
            },
            Err(_) => {
                v.add(
                    "response_format.type",
                    format!("unknown type {}", format.r#type),
                );
                None
            }
        },
    };

    // Messages.
    let mut messages = Vec::with_capacity(req.messages.len());
    let mut call_names: HashMap<String, String> = HashMap::new();
    for (i, message) in req.messages.into_iter().enumerate() {
        let role = match pb::Role::try_from(message.role) {
            Ok(pb::Role::System) => Role::System,
            Ok(pb::Role::Developer) => Role::Developer,
            Ok(pb::Role::User) => Role::User,
            Ok(pb::Role::Assistant) => Role::Assistant,
            Ok(pb::Role::Tool) => Role::Tool,
            Ok(pb::Role::Unspecified) | Err(_) => {
                v.add(
                    format!("messages[{i}].role"),
                    "must be one of SYSTEM, DEVELOPER, USER, ASSISTANT, TOOL",
                );
                Role::User
            }
        };
        if message.content.is_empty() {
            v.add(
                format!("messages[{i}].content"),
                "must hold at least one part",
            );
        }
        let mut content = Vec::with_capacity(message.content.len());
        let mut has_tool_result = false;
        for (j, part) in message.content.into_iter().enumerate() {
            let field = format!("messages[{i}].content[{j}]");
            match part.part {
                None => v.add(field, "must set one of text, image, tool_call, tool_result"),
                Some(pb::content_part::Part::Text(text)) => {
                    content.push(ContentPart::Text(text));
                }
                Some(pb::content_part::Part::Image(image)) => {
                    if !matches!(role, Role::User | Role::System | Role::Developer) {
                        v.add(
                            &field,
                            "images are only allowed in user and system messages",
                        );
                    }
                    if let Some(image) = convert_image(image, &field, &mut v) {
                        content.push(ContentPart::Image(image));
                    }
                }
                Some(pb::content_part::Part::ToolCall(call)) => {
                    if role != Role::Assistant {
                        v.add(&field, "tool calls are only allowed in assistant messages");
                    }
                    if call.id.is_empty() {
                        v.add(format!("{field}.tool_call.id"), "must not be empty");
                    }
                    if call.name.is_empty() {
                        v.add(format!("{field}.tool_call.name"), "must not be empty");
                    }
                    call_names.insert(call.id.clone(), call.name.clone());
                    content.push(ContentPart::ToolCall(types::ToolCall {
                        id: call.id,
                        name: call.name,
                        arguments: call.arguments,
                    }));
                }
                Some(pb::content_part::Part::ToolResult(result)) => {
                    has_tool_result = true;
                    if role != Role::Tool {
                        v.add(&field, "tool results are only allowed in tool messages");
                    }
                    if result.tool_call_id.is_empty() {
                        v.add(
                            format!("{field}.tool_result.tool_call_id"),
                            "must name the tool call this result answers",
                        );
                    }
                    let name = if result.name.is_empty() {
                        call_names.get(&result.tool_call_id).cloned()
                    } else {
                        Some(result.name)
                    };
                    content.push(ContentPart::ToolResult(types::ToolResult {
                        tool_call_id: result.tool_call_id,
                        name,
                        content: result.content,
                        is_error: result.is_error,
                    }));
                }
            }
        }
        if role == Role::Tool && !has_tool_result {
            v.add(
                format!("messages[{i}].content"),
                "a tool message must hold tool_result parts, each with a tool_call_id",
            );
        }
        messages.push(types::Message {
            role,
            content,
            name: Some(message.name).filter(|n| !n.is_empty()),
        });
    }

    if !v.0.is_empty() {
        return Err(GatewayError::InvalidArgument(v.0));
    }
    Ok(types::ChatRequest {
        model: req.model,
        messages,
        params,
        tools,
        tool_choice,
        response_format,
        tags,
        user: Some(req.user).filter(|u| !u.is_empty()),
    })
}

fn convert_image(image: pb::Image, field: &str, v: &mut Violations) -> Option<types::Image> {
    let mime = Some(image.mime_type).filter(|m| !m.is_empty());
    if let Some(m) = &mime
        && !IMAGE_MIME_TYPES.contains(&m.as_str())
    {
        v.add(
            format!("{field}.image.mime_type"),
            format!(
                "`{m}` is not supported; use one of {}",
                IMAGE_MIME_TYPES.join(", ")
            ),
        );
    }
    let detail = match pb::ImageDetail::try_from(image.detail) {
        Ok(pb::ImageDetail::Unspecified) => ImageDetail::Default,
        Ok(pb::ImageDetail::Auto) => ImageDetail::Auto,
        Ok(pb::ImageDetail::Low) => ImageDetail::Low,
        Ok(pb::ImageDetail::High) => ImageDetail::High,
        Err(_) => {
            v.add(format!("{field}.image.detail"), "unknown detail level");
            ImageDetail::Default
        }
    };
    let source = match image.source {
        None => {
            v.add(format!("{field}.image"), "must set url or data");
            return None;
        }
        Some(pb::image::Source::Url(url)) => {
            if !(url.starts_with("https://")
                || url.starts_with("http://")
                || url.starts_with("data:"))
            {
                v.add(
                    format!("{field}.image.url"),
                    "must be an http(s):// or data: URL",
                );
            }
            ImageSource::Url(url)
        }
        Some(pb::image::Source::Data(data)) => {
            if data.is_empty() {
                v.add(format!("{field}.image.data"), "must not be empty");
            }
            if mime.is_none() {
                v.add(
                    format!("{field}.image.mime_type"),
                    "is required with inline data",
                );
            }
            ImageSource::Data(data)
        }
    };
    Some(types::Image {
        source,
        mime_type: mime,
        detail,
    })
}

/// Converts a `google.protobuf.Struct` to JSON.
pub fn struct_to_json(s: prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .into_iter()
            .map(|(k, v)| (k, value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(b),
        Some(Kind::NumberValue(n)) => {
            // Whole numbers stay integers, so schemas keep `"minimum": 1` rather than `1.0`.
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                serde_json::Value::from(n as i64)
            } else {
                serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, Into::into)
            }
        }
        Some(Kind::StringValue(s)) => serde_json::Value::String(s),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.into_iter().map(value_to_json).collect())
        }
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

fn finish_reason(reason: FinishReason) -> i32 {
    (match reason {
        FinishReason::Unspecified => pb::FinishReason::Unspecified,
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::ToolCalls => pb::FinishReason::ToolCalls,
        FinishReason::ContentFilter => pb::FinishReason::ContentFilter,
        FinishReason::Other => pb::FinishReason::Other,
    }) as i32
}

/// Converts usage (`None`: not reported).
pub fn usage(usage: Option<&Usage>) -> pb::Usage {
    match usage {
        Some(u) => pb::Usage {
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            total_tokens: u.total_tokens(),
            cached_input_tokens: u.cached_input_tokens,
            cache_write_tokens: u.cache_write_tokens,
            reasoning_tokens: u.reasoning_tokens,
            source: pb::UsageSource::Provider as i32,
        },
        None => pb::Usage {
            source: pb::UsageSource::NotReported as i32,
            ..pb::Usage::default()
        },
    }
}

/// Converts a cost.
pub fn cost(cost: Option<Cost>) -> Option<pb::Cost> {
    cost.map(|c| pb::Cost {
        total_usd: c.total_usd(),
        input_usd: c.input_usd,
        output_usd: c.output_usd,
    })
}

fn duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Converts an external guardrail verdict.
fn verdict(v: crate::types::GuardVerdict) -> pb::GuardrailVerdict {
    use crate::types::{GuardCheck, GuardDecision};
    pb::GuardrailVerdict {
        profile: v.profile,
        check: (match v.check {
            GuardCheck::Hook => pb::GuardrailCheck::Hook,
            GuardCheck::Moderation => pb::GuardrailCheck::Moderation,
        }) as i32,
        phase: (if v.request {
            pb::GuardrailPhase::Request
        } else {
            pb::GuardrailPhase::Response
        }) as i32,
        decision: (match v.decision {
            GuardDecision::Allow => pb::GuardrailDecision::Allow,
            GuardDecision::Block => pb::GuardrailDecision::Block,
            GuardDecision::Rewrite => pb::GuardrailDecision::Rewrite,
            GuardDecision::FailedOpen => pb::GuardrailDecision::FailedOpen,
            GuardDecision::FailedClosed => pb::GuardrailDecision::FailedClosed,
        }) as i32,
        latency_us: u64::try_from(v.latency.as_micros()).unwrap_or(u64::MAX),
        detail: v.detail,
    }
}

/// Converts a route with the call's external guardrail verdicts.
pub fn route_with(call_route: Route, guardrails: crate::types::GuardVerdicts) -> pb::Route {
    let mut r = route(call_route);
    r.guardrails = guardrails.into_vec().into_iter().map(verdict).collect();
    r
}

/// Converts a route.
pub fn route(route: Route) -> pb::Route {
    let (cache, cache_similarity) = match route.cache {
        CacheOutcome::Off => (pb::CacheOutcome::Unspecified, 0.0),
        CacheOutcome::Hit { similarity } => (pb::CacheOutcome::Hit, similarity.unwrap_or(0.0)),
        CacheOutcome::Miss => (pb::CacheOutcome::Miss, 0.0),
        CacheOutcome::Stored => (pb::CacheOutcome::Stored, 0.0),
        CacheOutcome::Bypass => (pb::CacheOutcome::Bypass, 0.0),
    };
    pb::Route {
        cache: cache as i32,
        cache_similarity,
        policy_revision: route.revision.map(|r| pb::PolicyRevision {
            version: u64::from(r.version),
            arm: (match r.arm {
                RolloutArm::None => pb::RolloutArm::Unspecified,
                RolloutArm::Baseline => pb::RolloutArm::Baseline,
                RolloutArm::Canary => pb::RolloutArm::Canary,
            }) as i32,
        }),
        policy: route.policy.as_deref().unwrap_or_default().to_owned(),
        experiment: route
            .arm
            .as_ref()
            .map(|a| a.experiment.clone())
            .unwrap_or_default(),
        arm: route.arm.map(|a| a.arm.clone()).unwrap_or_default(),
        guardrails: Vec::new(),
        attempts: route
            .attempts
            .into_iter()
            .map(|a| {
                let (outcome, reason) = match a.outcome {
                    AttemptOutcome::Succeeded => (pb::AttemptOutcome::Succeeded, ""),
                    AttemptOutcome::Failed(r) => (pb::AttemptOutcome::Failed, r),
                    AttemptOutcome::Cancelled => (pb::AttemptOutcome::Cancelled, ""),
                    AttemptOutcome::Skipped(r) => (pb::AttemptOutcome::Skipped, r),
                };
                pb::Attempt {
                    provider: a.provider,
                    model: a.model,
                    kind: (match a.kind {
                        AttemptKind::Primary => pb::AttemptKind::Primary,
                        AttemptKind::Fallback => pb::AttemptKind::Fallback,
                        AttemptKind::Hedge => pb::AttemptKind::Hedge,
                        AttemptKind::Retry => pb::AttemptKind::Retry,
                    }) as i32,
                    outcome: outcome as i32,
                    reason: reason.to_owned(),
                    start_offset: Some(duration(a.start_offset)),
                    latency: Some(duration(a.latency)),
                    time_to_first_token: a.time_to_first_token.map(duration),
                }
            })
            .collect(),
    }
}

/// Converts a unary answer.
pub fn chat_response(id: String, answer: Answer) -> pb::ChatResponse {
    let Answer {
        response,
        provider,
        cost: call_cost,
        route: call_route,
        guardrails,
        ..
    } = answer;
    let content = response
        .content
        .into_iter()
        .filter_map(|part| {
            let part = match part {
                ContentPart::Text(t) => pb::content_part::Part::Text(t),
                ContentPart::ToolCall(c) => pb::content_part::Part::ToolCall(pb::ToolCall {
                    id: c.id,
                    name: c.name,
                    arguments: c.arguments,
                }),
                // Providers answer with text and tool calls only.
                ContentPart::Image(_) | ContentPart::ToolResult(_) => return None,
            };
            Some(pb::ContentPart { part: Some(part) })
        })
        .collect();
    pb::ChatResponse {
        id,
        provider,
        model: response.model,
        message: Some(pb::Message {
            role: pb::Role::Assistant as i32,
            content,
            name: String::new(),
        }),
        finish_reason: finish_reason(response.finish_reason),
        usage: Some(usage(response.usage.as_ref())),
        cost: cost(call_cost),
        route: Some(route_with(call_route, guardrails)),
    }
}

/// Converts one stream event.
pub fn stream_event(id: &str, event: CallEvent) -> pb::ChatStreamResponse {
    use pb::chat_stream_response::Event;
    use pb::content_delta::Delta;
    let event = match event {
        CallEvent::Start { provider, model } => Event::Start(pb::StreamStart {
            id: id.to_owned(),
            provider,
            model,
        }),
        CallEvent::Text(t) => Event::Delta(pb::ContentDelta {
            delta: Some(Delta::Text(t)),
        }),
        CallEvent::Reasoning(t) => Event::Delta(pb::ContentDelta {
            delta: Some(Delta::Reasoning(t)),
        }),
        CallEvent::ToolCall(c) => Event::Delta(pb::ContentDelta {
            delta: Some(Delta::ToolCall(pb::ToolCallDelta {
                index: c.index,
                id: c.id.unwrap_or_default(),
                name: c.name.unwrap_or_default(),
                arguments: c.arguments,
            })),
        }),
        CallEvent::Finish {
            reason,
            usage: call_usage,
            cost: call_cost,
            route: call_route,
            guardrails,
        } => Event::Finish(pb::StreamFinish {
            finish_reason: finish_reason(reason),
            usage: Some(usage(call_usage.as_ref())),
            cost: cost(call_cost),
            route: Some(route_with(call_route, guardrails)),
        }),
    };
    pb::ChatStreamResponse { event: Some(event) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(role: pb::Role, text: &str) -> pb::Message {
        pb::Message {
            role: role as i32,
            content: vec![pb::ContentPart {
                part: Some(pb::content_part::Part::Text(text.into())),
            }],
            name: String::new(),
        }
    }

    fn fields(err: GatewayError) -> Vec<String> {
        match err {
            GatewayError::InvalidArgument(v) => v.into_iter().map(|v| v.field).collect(),
            other => panic!("expected invalid argument, got {other:?}"),
        }
    }

    #[test]
    fn valid_request_converts() {
        let req = chat_request(pb::ChatRequest {
            model: "mock/echo".into(),
            messages: vec![text(pb::Role::User, "hi")],
            temperature: Some(0.2),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(req.messages[0].joined_text(), "hi");
        assert_eq!(req.params.temperature, Some(0.2));
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let err = chat_request(pb::ChatRequest {
            model: String::new(),
            messages: vec![
                pb::Message {
                    role: pb::Role::Tool as i32,
                    content: vec![pb::ContentPart {
                        part: Some(pb::content_part::Part::ToolResult(pb::ToolResult {
                            tool_call_id: String::new(),
                            content: "x".into(),
                            ..Default::default()
                        })),
                    }],
                    name: String::new(),
                },
                pb::Message {
                    role: pb::Role::User as i32,
                    content: vec![pb::ContentPart {
                        part: Some(pb::content_part::Part::Image(pb::Image {
                            source: Some(pb::image::Source::Data(vec![1u8, 2].into())),
                            mime_type: "image/tiff".into(),
                            detail: 0,
                        })),
                    }],
                    name: String::new(),
                },
            ],
            temperature: Some(3.0),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(
            fields(err),
            vec![
                "model",
                "temperature",
                "messages[0].content[0].tool_result.tool_call_id",
                "messages[1].content[0].image.mime_type",
            ]
        );
    }

    #[test]
    fn empty_messages_and_tool_message_without_results() {
        let err = chat_request(pb::ChatRequest {
            model: "m/x".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(fields(err), vec!["messages"]);
        let err = chat_request(pb::ChatRequest {
            model: "m/x".into(),
            messages: vec![text(pb::Role::Tool, "result without id")],
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(fields(err), vec!["messages[0].content"]);
    }

    #[test]
    fn tool_result_name_is_filled_from_the_call() {
        let req = chat_request(pb::ChatRequest {
            model: "m/x".into(),
            messages: vec![
                pb::Message {
                    role: pb::Role::Assistant as i32,
                    content: vec![pb::ContentPart {
                        part: Some(pb::content_part::Part::ToolCall(pb::ToolCall {
                            id: "c1".into(),
                            name: "lookup".into(),
                            arguments: "{}".into(),
                        })),
                    }],
                    name: String::new(),
                },
                pb::Message {
                    role: pb::Role::Tool as i32,
                    content: vec![pb::ContentPart {
                        part: Some(pb::content_part::Part::ToolResult(pb::ToolResult {
                            tool_call_id: "c1".into(),
                            content: "42".into(),
                            ..Default::default()
                        })),
                    }],
                    name: String::new(),
                },
            ],
            ..Default::default()
        })
        .unwrap();
        match &req.messages[1].content[0] {
            ContentPart::ToolResult(r) => assert_eq!(r.name.as_deref(), Some("lookup")),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn struct_numbers_keep_integers() {
        let mut s = prost_types::Struct::default();
        s.fields.insert(
            "min".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(1.0)),
            },
        );
        s.fields.insert(
            "half".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(0.5)),
            },
        );
        assert_eq!(
            struct_to_json(s),
            serde_json::json!({"min": 1, "half": 0.5})
        );
    }
}
