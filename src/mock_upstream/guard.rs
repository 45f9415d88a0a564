//! The mock's external guardrail endpoints: OpenAI's moderation endpoint
//! (`POST /v1/moderations`, its real wire format) and a guardrail hook speaking the gateway's
//! hook contract (`POST /guard/hook`, see `crate::guard::external`).
//!
//! Moderation: an input containing `flag:CATEGORY` (e.g. `flag:violence`) is flagged in that
//! category with score 0.9; every other category scores 0.01. The model's directives apply
//! (`omni-moderation-latest+hang`, `+status=500`, `+latency=MS`).
//!
//! Hook: `?mode=allow|block|rewrite|hang|garbage|status=N` sets the answer for every
//! request; without it the texts decide: `hook:block` blocks (reason `mock policy`),
//! `hook:rewrite` rewrites each text with `hook:rewrite` replaced by `[REWRITTEN]`,
//! `hook:hang` never answers; anything else is allowed. Both endpoints record the request
//! in the stats like every other route.

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, Uri},
    response::{IntoResponse, Response},
    routing::post,
};
use serde_json::{Value, json};

use super::{MockState, ResponseGuard, Scenario, json_error, query_param};

/// OpenAI's moderation categories (omni-moderation).
const CATEGORIES: [&str; 13] = [
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
];

pub(super) fn routes() -> Router<MockState> {
    Router::new()
        .route("/v1/moderations", post(moderations))
        .route("/guard/hook", post(hook))
}

/// `POST /v1/moderations`: `{model, input}` (a string or an array of strings) ->
/// `{id, model, results: [{flagged, categories, category_scores,
/// category_applied_input_types}]}`.
async fn moderations(State(state): State<MockState>, headers: HeaderMap, body: Bytes) -> Response {
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    state.stats.record(&headers, parsed.clone());
    let guard = ResponseGuard::new(state.stats.clone());
    if state.refuses(&headers) {
        guard.complete();
        return super::openai::error_response(401, None);
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
        return super::openai::error_response(400, None);
    };
    let scenario = Scenario::parse(body["model"].as_str().unwrap_or_default(), &state.settings);
    scenario.wait().await;
    if let Some(status) = scenario.status {
        guard.complete();
        return super::openai::error_response(status, scenario.retry_after);
    }
    let results: Vec<Value> = inputs
        .iter()
        .map(|text| {
            let mut categories = serde_json::Map::new();
            let mut scores = serde_json::Map::new();
            let mut types = serde_json::Map::new();
            let mut flagged = false;
            for c in CATEGORIES {
                let on = text.contains(&format!("flag:{c}"));
                flagged |= on;
                categories.insert(c.to_owned(), json!(on));
                scores.insert(c.to_owned(), json!(if on { 0.9 } else { 0.01 }));
                types.insert(c.to_owned(), json!(["text"]));
            }
            json!({
                "flagged": flagged,
                "categories": categories,
                "category_scores": scores,
                "category_applied_input_types": types,
            })
        })
        .collect();
    guard.complete();
    axum::Json(json!({
        "id": "modr-mock",
        "model": scenario.model,
        "results": results,
    }))
    .into_response()
}

/// `POST /guard/hook`: the gateway's hook contract.
async fn hook(
    State(state): State<MockState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    state.stats.record(&headers, parsed.clone());
    let guard = ResponseGuard::new(state.stats.clone());
    let texts: Vec<String> = parsed
        .as_ref()
        .and_then(|b| b["texts"].as_array())
        .map(|t| {
            t.iter()
                .map(|t| t["text"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default();
    let any = |d: &str| texts.iter().any(|t| t.contains(d));
    let mode = match query_param(&uri, "mode") {
        Some(m) => m.to_owned(),
        None if any("hook:hang") => "hang".to_owned(),
        None if any("hook:block") => "block".to_owned(),
        None if any("hook:rewrite") => "rewrite".to_owned(),
        None => "allow".to_owned(),
    };
    let answer = match mode.as_str() {
        "hang" => std::future::pending().await,
        "block" => json!({"action": "block", "reason": "mock policy"}),
        "rewrite" => json!({
            "action": "rewrite",
            "texts": texts.iter().map(|t| t.replace("hook:rewrite", "[REWRITTEN]")).collect::<Vec<_>>(),
        }),
        "garbage" => json!({"verdict": "maybe"}),
        m => match m
            .strip_prefix("status=")
            .and_then(|s| s.parse::<u16>().ok())
        {
            Some(status) => {
                guard.complete();
                return json_error(status, json!({"error": "mock hook failure"}), None);
            }
            None => json!({"action": "allow"}),
        },
    };
    guard.complete();
    axum::Json(answer).into_response()
}
