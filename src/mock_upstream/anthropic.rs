//! The mock's Anthropic Messages endpoint: `POST /v1/messages`, JSON and SSE with the real
//! event sequence (`message_start`, `content_block_start`, `ping`, `content_block_delta`...,
//! `content_block_stop`, `message_delta`, `message_stop`), Anthropic's error bodies and
//! `retry-after`.

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::HeaderMap,
    response::{IntoResponse, Response},
    routing::post,
};
use serde_json::{Value, json};

use super::{
    MockState, ResponseGuard, Scenario, TOOL_ARGUMENTS, broken_json, count_tokens, inject_faults,
    json_error, reply_for, split_chunks, sse_response,
};

pub(super) fn routes() -> Router<MockState> {
    Router::new().route("/v1/messages", post(messages))
}

/// The text of a `content` that is a string or an array of blocks.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter(|b| b["type"] == "text")
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn last_user_text(body: &Value) -> String {
    body["messages"]
        .as_array()
        .and_then(|ms| {
            ms.iter()
                .rev()
                .filter(|m| m["role"] == "user")
                .map(|m| content_text(&m["content"]))
                .find(|t| !t.is_empty())
        })
        .unwrap_or_default()
}

fn input_tokens(body: &Value) -> u64 {
    let system = count_tokens(&content_text(&body["system"]));
    let messages: u64 = body["messages"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| count_tokens(&content_text(&m["content"])))
                .sum()
        })
        .unwrap_or(0);
    system + messages
}

pub(super) fn error_response(status: u16, retry_after: Option<u64>) -> Response {
    let (kind, message) = match status {
        400 => ("invalid_request_error", "Invalid request (mock)"),
        401 => ("authentication_error", "invalid x-api-key"),
        403 => (
            "permission_error",
            "Your API key does not have permission (mock)",
        ),
        404 => ("not_found_error", "model: not found (mock)"),
        413 => (
            "request_too_large",
            "Request exceeds the maximum size (mock)",
        ),
        429 => (
            "rate_limit_error",
            "Number of requests has exceeded your rate limit (mock)",
        ),
        529 => ("overloaded_error", "Overloaded"),
        _ => ("api_error", "Internal server error (mock)"),
    };
    json_error(
        status,
        json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_mock"}),
        retry_after,
    )
}

/// Usage as Anthropic reports it: `input_tokens` excludes the cache reads.
fn usage(scenario: &Scenario, input: u64, output: u64) -> Value {
    let cached = scenario.cached.unwrap_or(0).min(input);
    json!({
        "input_tokens": input - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": output,
    })
}

pub(super) async fn messages(
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
    let scenario = Scenario::parse(body["model"].as_str().unwrap_or_default(), &state.settings);
    scenario.wait().await;
    if scenario.echo_key {
        guard.complete();
        let message = super::echoed_credentials(&headers);
        return json_error(
            400,
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": message}, "request_id": "req_mock"}),
            None,
        );
    }
    if let Some(status) = scenario.status {
        guard.complete();
        return error_response(status, scenario.retry_after);
    }
    if body["max_tokens"].as_u64().is_none() {
        guard.complete();
        return json_error(
            400,
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}}),
            None,
        );
    }
    let reply = reply_for(&last_user_text(&body));
    let input = input_tokens(&body);
    let tool = if scenario.tools {
        body["tools"][0]["name"].as_str().map(str::to_owned)
    } else {
        None
    };
    if body["stream"] == true {
        return stream_response(&scenario, &reply, tool.as_deref(), input, guard);
    }
    if scenario.malformed {
        guard.complete();
        return broken_json("{\"id\": \"msg_mock\", \"type\": \"message\", \"content\": [");
    }
    let (content, stop_reason) = match &tool {
        Some(name) => (
            json!([{
                "type": "tool_use",
                "id": "toolu_mock_1",
                "name": name,
                "input": serde_json::from_str::<Value>(TOOL_ARGUMENTS).unwrap_or_default()
            }]),
            "tool_use",
        ),
        None => (json!([{"type": "text", "text": reply}]), "end_turn"),
    };
    let mut response = json!({
        "id": "msg_mock",
        "type": "message",
        "role": "assistant",
        "model": scenario.model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": null,
    });
    if !scenario.no_usage {
        response["usage"] = usage(&scenario, input, count_tokens(&reply));
    }
    guard.complete();
    axum::Json(response).into_response()
}

fn event(name: &str, data: &Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// The events of a streamed reply.
fn stream_events(scenario: &Scenario, reply: &str, tool: Option<&str>, input: u64) -> Vec<String> {
    let mut start = json!({
        "id": "msg_mock",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": scenario.model,
        "stop_reason": null,
        "stop_sequence": null,
    });
    if !scenario.no_usage {
        start["usage"] = usage(scenario, input, 1);
    }
    let mut events = vec![event(
        "message_start",
        &json!({"type": "message_start", "message": start}),
    )];
    let stop_reason = match tool {
        Some(name) => {
            events.push(event(
                "content_block_start",
                &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "toolu_mock_1", "name": name, "input": {}}}),
            ));
            events.push(event("ping", &json!({"type": "ping"})));
            for piece in split_chunks(TOOL_ARGUMENTS, scenario.chunks) {
                events.push(event(
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": piece}}),
                ));
            }
            "tool_use"
        }
        None => {
            events.push(event(
                "content_block_start",
                &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ));
            events.push(event("ping", &json!({"type": "ping"})));
            for piece in split_chunks(reply, scenario.chunks) {
                events.push(event(
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}),
                ));
            }
            "end_turn"
        }
    };
    events.push(event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    let mut delta = json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null}});
    if !scenario.no_usage {
        delta["usage"] = json!({"output_tokens": count_tokens(reply)});
    }
    events.push(event("message_delta", &delta));
    events.push(event("message_stop", &json!({"type": "message_stop"})));
    events
}

fn stream_response(
    scenario: &Scenario,
    reply: &str,
    tool: Option<&str>,
    input: u64,
    guard: ResponseGuard,
) -> Response {
    let mut events = stream_events(scenario, reply, tool, input);
    inject_faults(
        &mut events,
        scenario,
        "event: content_block_delta\ndata: {\"type\": \"content_block_delta\", \"index\": 0, \"delta\": {\"type\": \"text_delta\", \"text\": \"x\"\n\n",
        Some("event: message_stop\ndata: {\"type\": \"message_stop\"}\n\n"),
        "event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n",
    );
    // message_start, content_block_start, ping, then the first delta.
    sse_response(events, 3, scenario, guard)
}
