//! Native batch APIs in their real wire formats, processed in-process by the mock's own
//! chat handlers after [`super::MockSettings::batch_delay`]:
//!
//! - OpenAI: `POST /v1/files` (multipart, `purpose=batch`, `file` = JSONL of
//!   `{custom_id, method, url, body}`), `POST /v1/batches` (`input_file_id`, `endpoint`
//!   `/v1/chat/completions`, `completion_window` `24h`), `GET /v1/batches/{id}` (status
//!   `validating` -> `in_progress` -> `completed` or `expired`, `request_counts`,
//!   `output_file_id`, `error_file_id`), `GET /v1/files/{id}/content` (output lines
//!   `{id, custom_id, response: {status_code, request_id, body}, error}`).
//! - Anthropic: `POST /v1/messages/batches` (`requests: [{custom_id, params}]`),
//!   `GET /v1/messages/batches/{id}` (`processing_status` `in_progress` -> `ended`,
//!   `request_counts`, `results_url`), `GET /v1/messages/batches/{id}/results` (lines
//!   `{custom_id, result: {type: succeeded|errored|expired|canceled, ...}}`).
//!
//! Cancel: `POST /v1/batches/{id}/cancel` (`cancelling`, then `cancelled`; the requests not
//! processed have no line) and `POST /v1/messages/batches/{id}/cancel` (`canceling`, then
//! `ended` with those requests `canceled`). A cancel ends the batch's wait at once.
//! [`NativeCounts`] counts batches created and cancel calls.
//!
//! A request whose model carries the directive `+batch_expire` is not processed: it ends
//! expired (OpenAI: an error-file line with code `batch_expired`, and the batch `expired`;
//! Anthropic: result type `expired`). Other directives work as for the chat endpoints
//! (`+status=500` gives that item an error answer).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use tokio_util::sync::CancellationToken;

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::HeaderMap,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};

use super::{MockState, json_error};

/// The directive that makes a batch item expire instead of being processed.
const EXPIRE: &str = "+batch_expire";

/// Files, and batches of both providers.
#[derive(Debug, Default)]
pub(crate) struct BatchStore {
    inner: Mutex<Store>,
}

#[derive(Debug, Default)]
struct Store {
    /// The mock's address (for `results_url`).
    addr: String,
    next: u64,
    files: HashMap<String, Vec<u8>>,
    openai: HashMap<String, Value>,
    anthropic: HashMap<String, (Value, Vec<Value>)>,
    /// Each batch's cancel, which ends its wait.
    cancels: HashMap<String, CancellationToken>,
    /// Ends every batch's wait (they are processed at once): [`BatchStore::finish_all`].
    finish: CancellationToken,
    counts: NativeCounts,
}

/// What the native batch endpoints were asked, over both providers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NativeCounts {
    /// Batches created.
    pub created: u64,
    /// Cancel calls.
    pub cancelled: u64,
}

impl BatchStore {
    /// An empty store of the mock at `addr`.
    pub(crate) fn new(addr: std::net::SocketAddr) -> Self {
        Self {
            inner: Mutex::new(Store {
                addr: addr.to_string(),
                ..Store::default()
            }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let mut store = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut store)
    }

    /// What the endpoints were asked so far.
    pub(crate) fn counts(&self) -> NativeCounts {
        self.with(|s| s.counts)
    }

    /// Processes every batch now, without waiting out `batch_delay` (those created later
    /// too).
    pub(crate) fn finish_all(&self) {
        self.with(|s| s.finish.cancel());
    }

    /// Waits out `batch_delay`, or until the batch is cancelled or [`Self::finish_all`].
    async fn wait(&self, delay: std::time::Duration, cancel: &CancellationToken) {
        let finish = self.with(|s| s.finish.clone());
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => {}
            () = finish.cancelled() => {}
        }
    }

    /// Registers a new batch `id`: its cancel token.
    fn created(&self, id: &str) -> CancellationToken {
        let token = CancellationToken::new();
        self.with(|s| {
            s.counts.created += 1;
            s.cancels.insert(id.to_owned(), token.clone());
        });
        token
    }

    /// Cancels batch `id`; whether it exists.
    fn cancel(&self, id: &str) -> bool {
        self.with(|s| {
            s.counts.cancelled += 1;
            s.cancels.get(id).map(CancellationToken::cancel).is_some()
        })
    }

    fn id(&self, prefix: &str) -> String {
        self.with(|s| {
            s.next += 1;
            format!("{prefix}{:024x}", s.next)
        })
    }
}

pub(super) fn routes() -> Router<MockState> {
    Router::new()
        .route("/v1/files", post(upload))
        .route("/v1/files/{id}/content", get(file_content))
        .route("/v1/batches", post(create_openai))
        .route("/v1/batches/{id}", get(get_openai))
        .route("/v1/batches/{id}/cancel", post(cancel_openai))
        .route("/v1/messages/batches", post(create_anthropic))
        .route("/v1/messages/batches/{id}", get(get_anthropic))
        .route("/v1/messages/batches/{id}/cancel", post(cancel_anthropic))
        .route("/v1/messages/batches/{id}/results", get(anthropic_results))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn rfc3339_now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn openai_error(status: u16, message: &str) -> Response {
    json_error(
        status,
        json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}}),
        None,
    )
}

fn anthropic_error(status: u16, message: &str) -> Response {
    json_error(
        status,
        json!({"type": "error", "error": {"type": if status == 404 { "not_found_error" } else { "invalid_request_error" }, "message": message}}),
        None,
    )
}

/// The parts of a `multipart/form-data` body: (name, content).
fn multipart_parts(headers: &HeaderMap, body: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let content_type = headers.get("content-type")?.to_str().ok()?;
    let boundary = content_type.split("boundary=").nth(1)?.trim_matches('"');
    let delimiter = format!("--{boundary}");
    let text = body;
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(start) = find(rest, delimiter.as_bytes()) {
        rest = &rest[start + delimiter.len()..];
        if rest.starts_with(b"--") {
            break;
        }
        let head_end = find(rest, b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&rest[..head_end]).into_owned();
        let content = &rest[head_end + 4..];
        let end = find(content, delimiter.as_bytes())?;
        let content = content[..end]
            .strip_suffix(b"\r\n")
            .unwrap_or(&content[..end]);
        let name = head
            .split("name=\"")
            .nth(1)
            .and_then(|n| n.split('"').next())
            .unwrap_or_default()
            .to_owned();
        parts.push((name, content.to_vec()));
        rest = &rest[head_end + 4 + end..];
    }
    Some(parts)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn upload(State(state): State<MockState>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(parts) = multipart_parts(&headers, &body) else {
        return openai_error(400, "expected a multipart/form-data body");
    };
    let field = |name: &str| {
        parts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.clone())
    };
    if field("purpose").as_deref() != Some(b"batch".as_slice()) {
        return openai_error(400, "purpose must be `batch`");
    }
    let Some(file) = field("file") else {
        return openai_error(400, "missing `file`");
    };
    let id = state.batches.id("file-");
    let bytes = file.len();
    state.batches.with(|s| s.files.insert(id.clone(), file));
    axum::Json(json!({
        "id": id, "object": "file", "bytes": bytes, "created_at": unix_now(),
        "filename": "batch.jsonl", "purpose": "batch"
    }))
    .into_response()
}

async fn file_content(State(state): State<MockState>, Path(id): Path<String>) -> Response {
    match state.batches.with(|s| s.files.get(&id).cloned()) {
        Some(bytes) => ([("content-type", "application/jsonl")], bytes).into_response(),
        None => openai_error(404, &format!("no such file: {id}")),
    }
}

/// Runs one chat body through the mock's own handler: (HTTP status, JSON body).
async fn answer(state: &MockState, anthropic: bool, body: &Value) -> (u16, Value) {
    let bytes = Bytes::from(body.to_string());
    let response = if anthropic {
        super::anthropic::messages(State(state.clone()), HeaderMap::new(), bytes).await
    } else {
        super::openai::chat_completions(State(state.clone()), HeaderMap::new(), bytes).await
    };
    let status = response.status().as_u16();
    let body = axum::body::to_bytes(response.into_body(), 16 * 1024 * 1024)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    (status, body)
}

fn expires(body: &Value) -> bool {
    body["model"].as_str().is_some_and(|m| m.contains(EXPIRE))
}

async fn create_openai(State(state): State<MockState>, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return openai_error(400, "the body is not JSON");
    };
    if req["endpoint"] != "/v1/chat/completions" {
        return openai_error(400, "endpoint must be /v1/chat/completions");
    }
    if req["completion_window"] != "24h" {
        return openai_error(400, "completion_window must be 24h");
    }
    let input = req["input_file_id"].as_str().unwrap_or_default().to_owned();
    let Some(file) = state.batches.with(|s| s.files.get(&input).cloned()) else {
        return openai_error(400, &format!("no such file: {input}"));
    };
    let mut lines = Vec::new();
    for (n, line) in String::from_utf8_lossy(&file).lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(v) if v["custom_id"].is_string() && v["body"].is_object() => lines.push(v),
            _ => return openai_error(400, &format!("line {} is not a batch request", n + 1)),
        }
    }
    let id = state.batches.id("batch_");
    let now = unix_now();
    let batch = json!({
        "id": id, "object": "batch", "endpoint": "/v1/chat/completions", "errors": null,
        "input_file_id": input, "completion_window": "24h", "status": "validating",
        "output_file_id": null, "error_file_id": null, "created_at": now,
        "in_progress_at": null, "expires_at": now + 86_400, "completed_at": null,
        "expired_at": null, "request_counts": {"total": lines.len(), "completed": 0, "failed": 0},
        "metadata": req["metadata"].clone(),
    });
    state
        .batches
        .with(|s| s.openai.insert(id.clone(), batch.clone()));
    let cancel = state.batches.created(&id);
    tokio::spawn(process_openai(state.clone(), id, lines, cancel));
    axum::Json(batch).into_response()
}

async fn process_openai(
    state: MockState,
    id: String,
    lines: Vec<Value>,
    cancel: CancellationToken,
) {
    state.batches.with(|s| {
        if let Some(b) = s.openai.get_mut(&id) {
            b["status"] = "in_progress".into();
            b["in_progress_at"] = unix_now().into();
        }
    });
    state
        .batches
        .wait(state.settings.batch_delay, &cancel)
        .await;
    let (mut output, mut errors) = (String::new(), String::new());
    let (mut completed, mut failed, mut expired) = (0u64, 0u64, 0u64);
    // A cancelled batch processes nothing more: those requests get no line.
    let lines = if cancel.is_cancelled() {
        &[][..]
    } else {
        &lines[..]
    };
    for (n, line) in lines.iter().enumerate() {
        let custom_id = &line["custom_id"];
        let line_id = format!("batch_req_{n:06}");
        if expires(&line["body"]) {
            expired += 1;
            let out = json!({"id": line_id, "custom_id": custom_id, "response": null,
                "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}});
            errors.push_str(&format!("{out}\n"));
            continue;
        }
        let (status, body) = answer(&state, false, &line["body"]).await;
        let out = json!({"id": line_id, "custom_id": custom_id, "error": null,
            "response": {"status_code": status, "request_id": format!("req_{n:06}"), "body": body}});
        if status == 200 {
            completed += 1;
            output.push_str(&format!("{out}\n"));
        } else {
            failed += 1;
            errors.push_str(&format!("{out}\n"));
        }
    }
    let file = |text: String| -> Option<String> {
        if text.is_empty() {
            return None;
        }
        let fid = state.batches.id("file-");
        state
            .batches
            .with(|s| s.files.insert(fid.clone(), text.into_bytes()));
        Some(fid)
    };
    let (output_id, error_id) = (file(output), file(errors));
    state.batches.with(|s| {
        if let Some(b) = s.openai.get_mut(&id) {
            let now = unix_now();
            b["output_file_id"] = output_id.into();
            b["error_file_id"] = error_id.into();
            b["request_counts"]["completed"] = completed.into();
            b["request_counts"]["failed"] = (failed + expired).into();
            if cancel.is_cancelled() {
                b["status"] = "cancelled".into();
                b["cancelled_at"] = now.into();
            } else if expired > 0 {
                b["status"] = "expired".into();
                b["expired_at"] = now.into();
            } else {
                b["status"] = "completed".into();
                b["completed_at"] = now.into();
            }
        }
    });
}

async fn cancel_openai(State(state): State<MockState>, Path(id): Path<String>) -> Response {
    if !state.batches.cancel(&id) {
        return openai_error(404, &format!("no such batch: {id}"));
    }
    let batch = state.batches.with(|s| {
        let b = s.openai.get_mut(&id)?;
        if b["status"] == "validating" || b["status"] == "in_progress" {
            b["status"] = "cancelling".into();
            b["cancelling_at"] = unix_now().into();
        }
        Some(b.clone())
    });
    match batch {
        Some(batch) => axum::Json(batch).into_response(),
        None => openai_error(404, &format!("no such batch: {id}")),
    }
}

async fn cancel_anthropic(State(state): State<MockState>, Path(id): Path<String>) -> Response {
    if !state.batches.cancel(&id) {
        return anthropic_error(404, &format!("no such message batch: {id}"));
    }
    let batch = state.batches.with(|s| {
        let (b, _) = s.anthropic.get_mut(&id)?;
        if b["processing_status"] == "in_progress" {
            b["processing_status"] = "canceling".into();
            b["cancel_initiated_at"] = rfc3339_now().into();
        }
        Some(b.clone())
    });
    match batch {
        Some(batch) => axum::Json(batch).into_response(),
        None => anthropic_error(404, &format!("no such message batch: {id}")),
    }
}

async fn get_openai(State(state): State<MockState>, Path(id): Path<String>) -> Response {
    match state.batches.with(|s| s.openai.get(&id).cloned()) {
        Some(batch) => axum::Json(batch).into_response(),
        None => openai_error(404, &format!("no such batch: {id}")),
    }
}

async fn create_anthropic(State(state): State<MockState>, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return anthropic_error(400, "the body is not JSON");
    };
    let Some(requests) = req["requests"].as_array().filter(|r| !r.is_empty()) else {
        return anthropic_error(400, "requests: at least one request is required");
    };
    for (i, r) in requests.iter().enumerate() {
        if !r["custom_id"].is_string() || !r["params"].is_object() {
            return anthropic_error(400, &format!("requests.{i}: needs custom_id and params"));
        }
    }
    let id = state.batches.id("msgbatch_");
    let batch = json!({
        "id": id, "type": "message_batch", "processing_status": "in_progress",
        "request_counts": {"processing": requests.len(), "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0},
        "ended_at": null, "created_at": rfc3339_now(),
        "expires_at": humantime::format_rfc3339_millis(SystemTime::now() + std::time::Duration::from_secs(86_400)).to_string(),
        "archived_at": null, "cancel_initiated_at": null, "results_url": null,
    });
    state
        .batches
        .with(|s| s.anthropic.insert(id.clone(), (batch.clone(), Vec::new())));
    let cancel = state.batches.created(&id);
    tokio::spawn(process_anthropic(
        state.clone(),
        id,
        requests.clone(),
        cancel,
    ));
    axum::Json(batch).into_response()
}

async fn process_anthropic(
    state: MockState,
    id: String,
    requests: Vec<Value>,
    cancel: CancellationToken,
) {
    state
        .batches
        .wait(state.settings.batch_delay, &cancel)
        .await;
    let mut results = Vec::new();
    let mut counts: HashMap<&str, u64> = HashMap::new();
    for r in &requests {
        let result = if cancel.is_cancelled() {
            json!({"type": "canceled"})
        } else if expires(&r["params"]) {
            json!({"type": "expired"})
        } else {
            match answer(&state, true, &r["params"]).await {
                (200, message) => json!({"type": "succeeded", "message": message}),
                (_, error) => json!({"type": "errored", "error": error}),
            }
        };
        let kind = match result["type"].as_str() {
            Some("succeeded") => "succeeded",
            Some("expired") => "expired",
            Some("canceled") => "canceled",
            _ => "errored",
        };
        *counts.entry(kind).or_default() += 1;
        results.push(json!({"custom_id": r["custom_id"], "result": result}));
    }
    let results_url = format!(
        "http://{}/v1/messages/batches/{id}/results",
        state.batches.addr()
    );
    state.batches.with(|s| {
        if let Some((b, stored)) = s.anthropic.get_mut(&id) {
            for kind in ["succeeded", "errored", "expired", "canceled"] {
                b["request_counts"][kind] = counts.get(kind).copied().unwrap_or(0).into();
            }
            b["request_counts"]["processing"] = 0.into();
            b["processing_status"] = "ended".into();
            b["ended_at"] = rfc3339_now().into();
            b["results_url"] = results_url.into();
            *stored = results;
        }
    });
}

async fn get_anthropic(State(state): State<MockState>, Path(id): Path<String>) -> Response {
    match state
        .batches
        .with(|s| s.anthropic.get(&id).map(|(b, _)| b.clone()))
    {
        Some(batch) => axum::Json(batch).into_response(),
        None => anthropic_error(404, &format!("no such message batch: {id}")),
    }
}

async fn anthropic_results(State(state): State<MockState>, Path(id): Path<String>) -> Response {
    let found = state.batches.with(|s| {
        s.anthropic
            .get(&id)
            .map(|(b, results)| (b["processing_status"] == "ended", results.clone()))
    });
    match found {
        None => anthropic_error(404, &format!("no such message batch: {id}")),
        Some((false, _)) => anthropic_error(400, "the message batch has not ended yet"),
        Some((true, results)) => {
            let text: String = results.iter().map(|r| format!("{r}\n")).collect();
            ([("content-type", "application/x-jsonl")], text).into_response()
        }
    }
}

impl BatchStore {
    fn addr(&self) -> String {
        self.with(|s| s.addr.clone())
    }
}
