//! The mock's Gemini endpoint: `POST /v1beta/models/{model}:generateContent` and
//! `:streamGenerateContent` (SSE with `?alt=sse`, otherwise a JSON array of chunks), Google's
//! error bodies, and `RESOURCE_EXHAUSTED` with a `RetryInfo` detail for rate limits; and
//! `:batchEmbedContents` (deterministic vectors, see `text_embedding`).

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, Uri},
    response::{IntoResponse, Response},
    routing::post,
};
use serde_json::{Value, json};

use super::{
    MockState, ResponseGuard, Scenario, TOOL_ARGUMENTS, broken_json, count_tokens, inject_faults,
    json_error, query_param, reply_for, split_chunks, sse_response,
};
use crate::providers::mock::{EMBEDDING_DIMENSIONS, text_embedding};

pub(super) fn routes() -> Router<MockState> {
    // The colon is inside one path segment (`gemini-2.5-flash:generateContent`): capture the
    // whole segment and split it.
    Router::new().route("/v1beta/models/{model_and_action}", post(models))
}

fn parts_text(content: &Value) -> String {
    content["parts"]
        .as_array()
        .map(|parts| {
            parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn last_user_text(body: &Value) -> String {
    body["contents"]
        .as_array()
        .and_then(|cs| {
            cs.iter()
                .rev()
                .filter(|c| c["role"] == "user" || c["role"].is_null())
                .map(parts_text)
                .find(|t| !t.is_empty())
        })
        .unwrap_or_default()
}

fn input_tokens(body: &Value) -> u64 {
    let system = count_tokens(&parts_text(&body["systemInstruction"]));
    let contents: u64 = body["contents"]
        .as_array()
        .map(|cs| cs.iter().map(|c| count_tokens(&parts_text(c))).sum())
        .unwrap_or(0);
    system + contents
}

pub(super) fn error_response(status: u16, retry_after: Option<u64>) -> Response {
    let (code, message) = match status {
        400 => ("INVALID_ARGUMENT", "Invalid JSON payload received (mock)."),
        401 => (
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials (mock).",
        ),
        403 => (
            "PERMISSION_DENIED",
            "The caller does not have permission (mock).",
        ),
        404 => (
            "NOT_FOUND",
            "models/mock is not found for API version v1beta (mock).",
        ),
        429 => (
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota (mock).",
        ),
        503 => (
            "UNAVAILABLE",
            "The model is overloaded. Please try again later (mock).",
        ),
        504 => ("DEADLINE_EXCEEDED", "Deadline expired (mock)."),
        _ => ("INTERNAL", "An internal error has occurred (mock)."),
    };
    let mut error = json!({"code": status, "message": message, "status": code});
    // Gemini says how long to wait in a RetryInfo detail, not in a header.
    if let Some(secs) = retry_after {
        error["details"] = json!([
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_requests", "quotaValue": "10"}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": format!("{secs}s")}
        ]);
    }
    json_error(status, json!({ "error": error }), None)
}

/// `usageMetadata`; `output` is `None` before the model has produced anything.
fn usage(scenario: &Scenario, input: u64, output: Option<u64>) -> Value {
    let mut usage = json!({
        "promptTokenCount": input,
        "totalTokenCount": input + output.unwrap_or(0),
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": input}],
    });
    if let Some(output) = output {
        usage["candidatesTokenCount"] = json!(output);
    }
    if let Some(cached) = scenario.cached {
        usage["cachedContentTokenCount"] = json!(cached.min(input));
    }
    usage
}

fn chunk(scenario: &Scenario, parts: Value, finish: Option<&str>, usage: Option<Value>) -> Value {
    let mut candidate = json!({"content": {"parts": parts, "role": "model"}, "index": 0});
    if let Some(finish) = finish {
        candidate["finishReason"] = json!(finish);
    }
    let mut chunk = json!({
        "candidates": [candidate],
        "modelVersion": scenario.model,
        "responseId": "mock-response-id",
    });
    if let Some(usage) = usage.filter(|_| !scenario.no_usage) {
        chunk["usageMetadata"] = usage;
    }
    chunk
}

pub(super) async fn models(
    State(state): State<MockState>,
    Path(model_and_action): Path<String>,
    uri: Uri,
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
    let (model, stream) = match model_and_action.rsplit_once(':') {
        Some((model, "generateContent")) => (model, false),
        Some((model, "streamGenerateContent")) => (model, true),
        Some((model, "batchEmbedContents")) => {
            return batch_embed(&state, model, parsed.as_ref(), guard).await;
        }
        _ => {
            guard.complete();
            return error_response(404, None);
        }
    };
    let Some(body) = parsed else {
        guard.complete();
        return error_response(400, None);
    };
    let scenario = Scenario::parse(model, &state.settings);
    scenario.wait().await;
    if scenario.echo_key {
        guard.complete();
        let message = super::echoed_credentials(&headers);
        return json_error(
            400,
            json!({"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}}),
            None,
        );
    }
    if let Some(status) = scenario.status {
        guard.complete();
        return error_response(status, scenario.retry_after);
    }
    let reply = reply_for(&last_user_text(&body));
    let input = input_tokens(&body);
    let tool = if scenario.tools {
        body["tools"][0]["functionDeclarations"][0]["name"]
            .as_str()
            .map(str::to_owned)
    } else {
        None
    };
    let chunks = stream_chunks(&scenario, &reply, tool.as_deref(), input);
    if stream {
        if query_param(&uri, "alt") == Some("sse") {
            let mut events: Vec<String> = chunks
                .iter()
                .map(|c| format!("data: {c}\r\n\r\n"))
                .collect();
            if scenario.truncate {
                // Never keep the chunk with the finish reason.
                let keep = (events.len() / 2).min(events.len().saturating_sub(1));
                events.truncate(keep);
            } else {
                let terminal = events.last().cloned();
                inject_faults(
                    &mut events,
                    &scenario,
                    "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"x\"\r\n\r\n",
                    terminal.as_deref(),
                    "data: {\"error\": {\"code\": 500, \"message\": \"An internal error has occurred (mock).\", \"status\": \"INTERNAL\"}}\r\n\r\n",
                );
            }
            return sse_response(events, 0, &scenario, guard);
        }
        guard.complete();
        return axum::Json(Value::Array(chunks)).into_response();
    }
    if scenario.malformed {
        guard.complete();
        return broken_json("{\"candidates\": [{\"content\": {\"parts\": [");
    }
    let parts = match &tool {
        Some(name) => function_call(name),
        None => json!([{ "text": reply }]),
    };
    let response = chunk(
        &scenario,
        parts,
        Some("STOP"),
        Some(usage(&scenario, input, Some(count_tokens(&reply)))),
    );
    guard.complete();
    axum::Json(response).into_response()
}

/// `:batchEmbedContents`: [`text_embedding`] of each request's text (`outputDimensionality`,
/// else 256), in request order, without usage (as the Gemini API answers). Every request
/// must name `models/{model}` of the URL, as the API requires.
async fn batch_embed(
    state: &MockState,
    model: &str,
    body: Option<&Value>,
    guard: ResponseGuard,
) -> Response {
    let requests = body.and_then(|b| b["requests"].as_array());
    let texts: Option<Vec<(String, Option<u64>)>> = requests.and_then(|rs| {
        rs.iter()
            .map(|r| {
                (r["model"].as_str() == Some(&format!("models/{model}"))).then(|| {
                    (
                        parts_text(&r["content"]),
                        r["outputDimensionality"].as_u64(),
                    )
                })
            })
            .collect()
    });
    let Some(texts) = texts.filter(|t| !t.is_empty()) else {
        guard.complete();
        return error_response(400, None);
    };
    let scenario = Scenario::parse(model, &state.settings);
    scenario.wait().await;
    if let Some(status) = scenario.status {
        guard.complete();
        return error_response(status, scenario.retry_after);
    }
    if scenario.malformed {
        guard.complete();
        return broken_json("{\"embeddings\": [");
    }
    let embeddings: Vec<Value> = texts
        .iter()
        .map(|(text, dimensions)| {
            let dimensions = dimensions
                .and_then(|d| usize::try_from(d).ok())
                .unwrap_or(EMBEDDING_DIMENSIONS);
            json!({"values": text_embedding(text, dimensions)})
        })
        .collect();
    guard.complete();
    axum::Json(json!({"embeddings": embeddings})).into_response()
}

fn function_call(name: &str) -> Value {
    json!([{"functionCall": {
        "name": name,
        "args": serde_json::from_str::<Value>(TOOL_ARGUMENTS).unwrap_or_default()
    }}])
}

/// The chunks of a streamed reply; every chunk carries the usage so far, the last one the
/// finish reason.
fn stream_chunks(scenario: &Scenario, reply: &str, tool: Option<&str>, input: u64) -> Vec<Value> {
    if let Some(name) = tool {
        // Gemini sends a function call whole, in one chunk.
        return vec![chunk(
            scenario,
            function_call(name),
            Some("STOP"),
            Some(usage(scenario, input, Some(count_tokens(reply)))),
        )];
    }
    let pieces = split_chunks(reply, scenario.chunks);
    let last = pieces.len().saturating_sub(1);
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, piece)| {
            let done = i == last;
            chunk(
                scenario,
                json!([{ "text": piece }]),
                done.then_some("STOP"),
                Some(usage(scenario, input, done.then(|| count_tokens(reply)))),
            )
        })
        .collect()
}
