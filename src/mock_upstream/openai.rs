//! The mock's OpenAI Chat Completions endpoint: `POST /v1/chat/completions`, and the same
//! behind Azure OpenAI's deployment URL
//! (`POST /openai/deployments/{deployment}/chat/completions?api-version=...`); and the
//! embeddings endpoint, `POST /v1/embeddings` (Azure: `.../deployments/{deployment}/embeddings`).

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, Uri},
    response::{IntoResponse, Response},
    routing::post,
};
use base64::Engine as _;
use serde_json::{Value, json};

use super::{
    MockState, ResponseGuard, Scenario, TOOL_ARGUMENTS, broken_json, count_tokens, inject_faults,
    json_error, query_param, reply_for, split_chunks, sse_response,
};
use crate::providers::{
    embed::to_le_bytes,
    mock::{EMBEDDING_DIMENSIONS, text_embedding},
};

pub(super) fn routes() -> Router<MockState> {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route(
            "/openai/deployments/{deployment}/chat/completions",
            post(azure_chat_completions),
        )
        .route("/v1/embeddings", post(embeddings))
        .route(
            "/openai/deployments/{deployment}/embeddings",
            post(azure_embeddings),
        )
}

/// Azure OpenAI embeddings: the deployment in the path is the model.
async fn azure_embeddings(
    state: State<MockState>,
    Path(deployment): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match azure_body(&state, deployment, &uri, &headers, &body) {
        Ok(body) => embeddings(state, headers, body).await,
        Err(response) => *response,
    }
}

/// `POST /v1/embeddings`: [`text_embedding`] of each input (`dimensions`, else 256), as
/// floats or, with `encoding_format: base64`, as base64 little-endian float32 bytes; usage is
/// one token per word. `status=`, `latency=`, `hang`, `malformed` and `no_usage` apply.
async fn embeddings(State(state): State<MockState>, headers: HeaderMap, body: Bytes) -> Response {
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    state.stats.record(&headers, parsed.clone());
    let guard = ResponseGuard::new(state.stats.clone());
    if state.refuses(&headers) {
        guard.complete();
        return error_response(401, None);
    }
    let inputs: Option<Vec<String>> = parsed.as_ref().and_then(|b| match &b["input"] {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned))
            .collect(),
        _ => None,
    });
    let (Some(body), Some(inputs)) = (parsed, inputs) else {
        guard.complete();
        return error_response(400, None);
    };
    let scenario = Scenario::parse(body["model"].as_str().unwrap_or_default(), &state.settings);
    scenario.wait().await;
    if let Some(status) = scenario.status {
        guard.complete();
        return error_response(status, scenario.retry_after);
    }
    if scenario.malformed {
        guard.complete();
        return broken_json("{\"object\": \"list\", \"data\": [");
    }
    let dimensions = body["dimensions"]
        .as_u64()
        .and_then(|d| usize::try_from(d).ok())
        .unwrap_or(EMBEDDING_DIMENSIONS);
    let base64 = body["encoding_format"] == "base64";
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let vector = text_embedding(text, dimensions);
            let embedding = if base64 {
                json!(base64::engine::general_purpose::STANDARD.encode(to_le_bytes(&vector)))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let tokens: u64 = inputs.iter().map(|t| count_tokens(t)).sum();
    let mut response = json!({"object": "list", "data": data, "model": scenario.model});
    if !scenario.no_usage {
        response["usage"] = json!({"prompt_tokens": tokens, "total_tokens": tokens});
    }
    guard.complete();
    axum::Json(response).into_response()
}

/// The body of an Azure call with the deployment as its model, or Azure's 404 when the
/// `api-version` is missing.
fn azure_body(
    state: &MockState,
    deployment: String,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Bytes, Box<Response>> {
    if query_param(uri, "api-version").is_none_or(str::is_empty) {
        state.stats.record(headers, None);
        ResponseGuard::new(state.stats.clone()).complete();
        return Err(Box::new(json_error(
            404,
            json!({"error": {"code": "404", "message": "Resource not found"}}),
            None,
        )));
    }
    let mut parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if let Some(obj) = parsed.as_object_mut() {
        obj.insert("model".into(), Value::String(deployment));
    }
    Ok(Bytes::from(serde_json::to_vec(&parsed).unwrap_or_default()))
}

/// Azure OpenAI: the deployment in the path is the model; `api-version` is required.
async fn azure_chat_completions(
    state: State<MockState>,
    Path(deployment): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match azure_body(&state, deployment, &uri, &headers, &body) {
        Ok(body) => chat_completions(state, headers, body).await,
        Err(response) => *response,
    }
}

fn last_user_text(body: &Value) -> String {
    let Some(messages) = body["messages"].as_array() else {
        return String::new();
    };
    messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .map(|m| match &m["content"] {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join(" "),
            _ => String::new(),
        })
        .unwrap_or_default()
}

fn input_tokens(body: &Value) -> u64 {
    body["messages"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| match &m["content"] {
                    Value::String(s) => count_tokens(s),
                    Value::Array(parts) => parts
                        .iter()
                        .filter_map(|p| p["text"].as_str())
                        .map(count_tokens)
                        .sum(),
                    _ => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

pub(super) fn error_response(status: u16, retry_after: Option<u64>) -> Response {
    let (kind, code, message) = match status {
        400 => (
            "invalid_request_error",
            Value::Null,
            "Invalid request (mock)",
        ),
        401 => (
            "invalid_request_error",
            json!("invalid_api_key"),
            "Incorrect API key provided: sk-mock***",
        ),
        404 => (
            "invalid_request_error",
            json!("model_not_found"),
            "The model does not exist (mock)",
        ),
        429 => (
            "requests",
            json!("rate_limit_exceeded"),
            "Rate limit reached (mock)",
        ),
        _ => (
            "server_error",
            Value::Null,
            "The server had an error (mock)",
        ),
    };
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    json_error(status, body, retry_after)
}

fn tool_call(body: &Value) -> Option<(String, String)> {
    let name = body["tools"][0]["function"]["name"].as_str()?;
    Some((name.to_owned(), TOOL_ARGUMENTS.to_owned()))
}

pub(super) async fn chat_completions(
    State(state): State<MockState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    state.stats.record(&headers, parsed.clone());
    let guard = ResponseGuard::new(state.stats.clone());
    if state.refuses(&headers) {
        guard.complete();
        return error_response(401, None);
    }
    let Some(body) = parsed else {
        guard.complete();
        return error_response(400, None);
    };
    let model = body["model"].as_str().unwrap_or_default();
    let scenario = Scenario::parse(model, &state.settings);
    scenario.wait().await;
    if scenario.echo_key {
        guard.complete();
        let message = super::echoed_credentials(&headers);
        return json_error(
            400,
            json!({"error": {"message": message, "type": "invalid_request_error", "param": "temperature", "code": null}}),
            None,
        );
    }
    if let Some(status) = scenario.status {
        guard.complete();
        return error_response(status, scenario.retry_after);
    }
    let reply = scenario
        .reply
        .clone()
        .unwrap_or_else(|| reply_for(&last_user_text(&body)));
    let input = input_tokens(&body);
    let usage = json!({
        "prompt_tokens": input,
        "completion_tokens": count_tokens(&reply),
        "total_tokens": input + count_tokens(&reply),
        "prompt_tokens_details": {"cached_tokens": scenario.cached.unwrap_or(0).min(input)},
        "completion_tokens_details": {"reasoning_tokens": 0}
    });
    let tool = if scenario.tools {
        tool_call(&body)
    } else {
        None
    };
    if body["stream"] == true {
        return stream_response(scenario, reply, tool, usage, guard);
    }
    if scenario.malformed {
        guard.complete();
        return broken_json("{\"id\": \"chatcmpl-mock\", \"choices\": [");
    }
    let message = match &tool {
        Some((name, args)) => json!({
            "role": "assistant",
            "content": null,
            "tool_calls": [{"id": "call_mock_1", "type": "function", "function": {"name": name, "arguments": args}}]
        }),
        None => json!({"role": "assistant", "content": reply, "refusal": null}),
    };
    let mut response = json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": scenario.model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": if tool.is_some() { "tool_calls" } else { "stop" }
        }],
    });
    if !scenario.no_usage {
        response["usage"] = usage;
    }
    guard.complete();
    axum::Json(response).into_response()
}

fn chunk(model: &str, delta: Value, finish: Option<&str>) -> String {
    let chunk = json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
    });
    format!("data: {chunk}\n\n")
}

/// The events of a streamed reply, each sent after `chunk_delay`.
fn stream_events(
    scenario: &Scenario,
    reply: &str,
    tool: Option<(String, String)>,
    usage: Value,
) -> Vec<String> {
    let model = scenario.model.as_str();
    let mut events = vec![chunk(
        model,
        json!({"role": "assistant", "content": ""}),
        None,
    )];
    let finish = match tool {
        Some((name, args)) => {
            events.push(chunk(
                model,
                json!({"tool_calls": [{"index": 0, "id": "call_mock_1", "type": "function", "function": {"name": name, "arguments": ""}}]}),
                None,
            ));
            for piece in split_chunks(&args, scenario.chunks) {
                events.push(chunk(
                    model,
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}),
                    None,
                ));
            }
            "tool_calls"
        }
        None => {
            for piece in split_chunks(reply, scenario.chunks) {
                events.push(chunk(model, json!({"content": piece}), None));
            }
            "stop"
        }
    };
    events.push(chunk(model, json!({}), Some(finish)));
    if !scenario.no_usage {
        let usage_chunk = json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": model,
            "choices": [],
            "usage": usage,
        });
        events.push(format!("data: {usage_chunk}\n\n"));
    }
    events.push("data: [DONE]\n\n".to_owned());
    events
}

fn stream_response(
    scenario: Scenario,
    reply: String,
    tool: Option<(String, String)>,
    usage: Value,
    guard: ResponseGuard,
) -> Response {
    let mut events = stream_events(&scenario, &reply, tool, usage);
    inject_faults(
        &mut events,
        &scenario,
        "data: {\"choices\": [{\"delta\": {\"content\": \"x\"\n\n",
        Some("data: [DONE]\n\n"),
        "data: {\"error\": {\"message\": \"The server had an error (mock)\", \"type\": \"server_error\"}}\n\n",
    );
    // Event 0 is the role chunk; content starts at 1.
    sse_response(events, 1, &scenario, guard)
}
