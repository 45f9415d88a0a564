//! Providers' native batch APIs, for their lower price (both bill batch requests at half the
//! price of the same calls made one by one: [`NATIVE_PRICE_FACTOR`]).
//!
//! - OpenAI Batch: the requests are uploaded as one JSONL file (`POST {base}/files`,
//!   multipart, `purpose=batch`; a line per request, `{custom_id, method: "POST", url:
//!   "/v1/chat/completions", body}`), the batch is created (`POST {base}/batches`,
//!   `completion_window = "24h"`) and polled (`GET {base}/batches/{id}`) until it is
//!   `completed`, `expired`, `failed` or `cancelled`; then its output and error files
//!   (`GET {base}/files/{id}/content`) hold one line per request.
//! - Anthropic Message Batches: `POST {base}/v1/messages/batches` with `requests: [{custom_id,
//!   params}]`, polled (`GET .../{id}`) until `processing_status = "ended"`, results from
//!   `results_url` (a line per request: `succeeded` with the message, `errored`, `expired`,
//!   `canceled`).
//!
//! A batch is cancelled with `POST {base}/batches/{id}/cancel` (OpenAI: `cancelling`, then
//! `cancelled`) or `POST {base}/v1/messages/batches/{id}/cancel` (Anthropic: `canceling`,
//! then `ended` with the unprocessed requests `canceled`).
//!
//! [`NativeBatch`] does those calls and reads every line into a [`NativeOutcome`] per custom
//! id; a request a batch left without a line is reported as [`NativeOutcome::Missing`], so
//! every request gets exactly one outcome. Request bodies are the provider's own format
//! (the caller builds them).

use std::time::Duration;

use serde_json::{Value, json};

/// What a native batch costs relative to the same calls made one by one.
pub const NATIVE_PRICE_FACTOR: f64 = 0.5;

/// How long both providers may take to end a batch (OpenAI's `completion_window = "24h"`,
/// Anthropic's 24-hour expiry).
pub const COMPLETION_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Which native API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NativeKind {
    /// OpenAI Batch (`/v1/files` + `/v1/batches`).
    OpenAi,
    /// Anthropic Message Batches (`/v1/messages/batches`).
    Anthropic,
}

/// How one request of a native batch ended.
#[derive(Debug, Clone, PartialEq)]
pub enum NativeOutcome {
    /// Answered: the provider's response body (a Chat Completion, or an Anthropic Message).
    Succeeded(Value),
    /// The provider answered with an error: its HTTP status when said, and its message.
    Failed {
        /// The HTTP status of the item's answer, when the provider said one.
        status: Option<u16>,
        /// The provider's error type or code, e.g. `invalid_request_error`.
        code: String,
        /// The provider's message.
        message: String,
    },
    /// The batch's window ended before the request ran.
    Expired,
    /// The batch was cancelled before the request ran.
    Canceled,
    /// The batch ended without a line for the request.
    Missing,
}

impl NativeOutcome {
    /// Whether running the request again (natively or in real time) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            NativeOutcome::Succeeded(_) => false,
            NativeOutcome::Failed { status, .. } => {
                status.is_none_or(|s| s == 408 || s == 409 || s == 429 || s >= 500)
            }
            NativeOutcome::Expired | NativeOutcome::Canceled | NativeOutcome::Missing => true,
        }
    }
}

/// Where a native batch stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeStatus {
    /// The provider's status word (`in_progress`, `completed`, `ended`, ...).
    pub status: String,
    /// Whether it has ended (its results can be read).
    pub ended: bool,
}

/// Why a native batch call failed.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    /// The HTTP call failed.
    #[error("native batch: {0}")]
    Http(#[from] reqwest::Error),
    /// The provider answered with an error status.
    #[error("native batch: {what} answered HTTP {status}")]
    Status {
        /// The call.
        what: &'static str,
        /// The HTTP status.
        status: u16,
    },
    /// The provider's answer is not what its API documents.
    #[error("native batch: unexpected answer to {0}")]
    Decode(&'static str),
}

/// A client of one provider account's native batch API.
#[derive(Debug, Clone)]
pub struct NativeBatch {
    kind: NativeKind,
    /// OpenAI: the API base including `/v1`; Anthropic: the host (`/v1/...` is appended).
    base_url: String,
    api_key: String,
    client: reqwest::Client,
}

impl NativeBatch {
    /// A client of `kind` at `base_url` (as configured for the provider) with `api_key`.
    pub fn new(
        kind: NativeKind,
        base_url: impl Into<String>,
        api_key: impl Into<String>,
        client: reqwest::Client,
    ) -> Self {
        Self {
            kind,
            base_url: base_url.into().trim_end_matches('/').to_owned(),
            api_key: api_key.into(),
            client,
        }
    }

    /// Which API.
    pub fn kind(&self) -> NativeKind {
        self.kind
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let req = self.client.request(method, url);
        match self.kind {
            NativeKind::OpenAi => req.bearer_auth(&self.api_key),
            NativeKind::Anthropic => req
                .header("x-api-key", &self.api_key)
                .header("anthropic-version", "2023-06-01"),
        }
    }

    async fn json(req: reqwest::RequestBuilder, what: &'static str) -> Result<Value, NativeError> {
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(NativeError::Status { what, status });
        }
        let bytes = resp.bytes().await?;
        serde_json::from_slice(&bytes).map_err(|_| NativeError::Decode(what))
    }

    async fn text(req: reqwest::RequestBuilder, what: &'static str) -> Result<String, NativeError> {
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(NativeError::Status { what, status });
        }
        Ok(resp.text().await?)
    }

    /// Submits `requests` (custom id, provider request body); returns the batch id.
    pub async fn submit(&self, requests: &[(String, Value)]) -> Result<String, NativeError> {
        match self.kind {
            NativeKind::OpenAi => {
                let mut jsonl = String::new();
                for (custom_id, body) in requests {
                    let line = json!({"custom_id": custom_id, "method": "POST",
                        "url": "/v1/chat/completions", "body": body});
                    jsonl.push_str(&line.to_string());
                    jsonl.push('\n');
                }
                let boundary = format!("llmgw{:016x}", fastrand::u64(..));
                let mut body = Vec::new();
                body.extend_from_slice(
                    format!("--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n").as_bytes(),
                );
                body.extend_from_slice(
                    format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"batch.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n").as_bytes(),
                );
                body.extend_from_slice(jsonl.as_bytes());
                body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
                let upload = self
                    .request(reqwest::Method::POST, &format!("{}/files", self.base_url))
                    .header(
                        "content-type",
                        format!("multipart/form-data; boundary={boundary}"),
                    )
                    .body(body);
                let file = Self::json(upload, "file upload").await?;
                let file_id = file["id"]
                    .as_str()
                    .ok_or(NativeError::Decode("file upload"))?;
                let create = self
                    .request(reqwest::Method::POST, &format!("{}/batches", self.base_url))
                    .header("content-type", "application/json")
                    .body(
                        json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                        "completion_window": "24h"})
                        .to_string(),
                    );
                let batch = Self::json(create, "batch create").await?;
                batch["id"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or(NativeError::Decode("batch create"))
            }
            NativeKind::Anthropic => {
                let items: Vec<Value> = requests
                    .iter()
                    .map(|(custom_id, params)| json!({"custom_id": custom_id, "params": params}))
                    .collect();
                let create = self
                    .request(
                        reqwest::Method::POST,
                        &format!("{}/v1/messages/batches", self.base_url),
                    )
                    .header("content-type", "application/json")
                    .body(json!({"requests": items}).to_string());
                let batch = Self::json(create, "message batch create").await?;
                batch["id"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or(NativeError::Decode("message batch create"))
            }
        }
    }

    /// Asks the provider to cancel batch `id`; it ends soon after (poll it), with the
    /// requests it had not run reported canceled.
    pub async fn cancel(&self, id: &str) -> Result<(), NativeError> {
        let url = match self.kind {
            NativeKind::OpenAi => format!("{}/batches/{id}/cancel", self.base_url),
            NativeKind::Anthropic => format!("{}/v1/messages/batches/{id}/cancel", self.base_url),
        };
        Self::json(self.request(reqwest::Method::POST, &url), "batch cancel")
            .await
            .map(drop)
    }

    async fn get(&self, id: &str) -> Result<Value, NativeError> {
        let url = match self.kind {
            NativeKind::OpenAi => format!("{}/batches/{id}", self.base_url),
            NativeKind::Anthropic => format!("{}/v1/messages/batches/{id}", self.base_url),
        };
        Self::json(self.request(reqwest::Method::GET, &url), "batch status").await
    }

    /// Where batch `id` stands.
    pub async fn status(&self, id: &str) -> Result<NativeStatus, NativeError> {
        let batch = self.get(id).await?;
        let field = match self.kind {
            NativeKind::OpenAi => "status",
            NativeKind::Anthropic => "processing_status",
        };
        let status = batch[field]
            .as_str()
            .ok_or(NativeError::Decode("batch status"))?
            .to_owned();
        let ended = match self.kind {
            NativeKind::OpenAi => {
                matches!(
                    status.as_str(),
                    "completed" | "expired" | "failed" | "cancelled"
                )
            }
            NativeKind::Anthropic => status == "ended",
        };
        Ok(NativeStatus { status, ended })
    }

    /// Polls batch `id` every `interval` until it has ended, then reads its results: one
    /// outcome for each custom id of `custom_ids`, in that order.
    pub async fn wait(
        &self,
        id: &str,
        custom_ids: &[String],
        interval: Duration,
    ) -> Result<Vec<(String, NativeOutcome)>, NativeError> {
        while !self.status(id).await?.ended {
            tokio::time::sleep(interval).await;
        }
        self.results(id, custom_ids).await
    }

    /// The results of ended batch `id`: one outcome for each of `custom_ids`, in order.
    pub async fn results(
        &self,
        id: &str,
        custom_ids: &[String],
    ) -> Result<Vec<(String, NativeOutcome)>, NativeError> {
        let batch = self.get(id).await?;
        let mut lines = Vec::new();
        match self.kind {
            NativeKind::OpenAi => {
                for field in ["output_file_id", "error_file_id"] {
                    if let Some(file) = batch[field].as_str() {
                        let url = format!("{}/files/{file}/content", self.base_url);
                        lines.push(
                            Self::text(self.request(reqwest::Method::GET, &url), "file content")
                                .await?,
                        );
                    }
                }
            }
            NativeKind::Anthropic => {
                let url = batch["results_url"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| {
                        format!("{}/v1/messages/batches/{id}/results", self.base_url)
                    });
                lines.push(
                    Self::text(self.request(reqwest::Method::GET, &url), "batch results").await?,
                );
            }
        }
        let mut found: std::collections::HashMap<String, NativeOutcome> =
            std::collections::HashMap::new();
        for line in lines.iter().flat_map(|t| t.lines()) {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value =
                serde_json::from_str(line).map_err(|_| NativeError::Decode("a result line"))?;
            let Some(custom_id) = v["custom_id"].as_str() else {
                return Err(NativeError::Decode("a result line"));
            };
            let outcome = match self.kind {
                NativeKind::OpenAi => openai_outcome(&v),
                NativeKind::Anthropic => anthropic_outcome(&v["result"]),
            };
            found.insert(custom_id.to_owned(), outcome);
        }
        Ok(custom_ids
            .iter()
            .map(|c| {
                let outcome = found.remove(c).unwrap_or(NativeOutcome::Missing);
                (c.clone(), outcome)
            })
            .collect())
    }
}

/// One line of an OpenAI batch output or error file.
fn openai_outcome(line: &Value) -> NativeOutcome {
    let response = &line["response"];
    let status = response["status_code"]
        .as_u64()
        .and_then(|s| u16::try_from(s).ok());
    if status == Some(200) {
        return NativeOutcome::Succeeded(response["body"].clone());
    }
    let error = &line["error"];
    if error["code"] == "batch_expired" {
        return NativeOutcome::Expired;
    }
    if error["code"] == "batch_cancelled" {
        return NativeOutcome::Canceled;
    }
    let body_error = &response["body"]["error"];
    let pick = |a: &Value, b: &Value| {
        a.as_str()
            .or_else(|| b.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    NativeOutcome::Failed {
        status,
        code: pick(&error["code"], &body_error["type"]),
        message: pick(&error["message"], &body_error["message"]),
    }
}

/// The `result` of one line of Anthropic batch results.
fn anthropic_outcome(result: &Value) -> NativeOutcome {
    match result["type"].as_str() {
        Some("succeeded") => NativeOutcome::Succeeded(result["message"].clone()),
        Some("expired") => NativeOutcome::Expired,
        Some("canceled") => NativeOutcome::Canceled,
        _ => {
            let error = &result["error"]["error"];
            NativeOutcome::Failed {
                status: None,
                code: error["type"].as_str().unwrap_or("errored").to_owned(),
                message: error["message"].as_str().unwrap_or_default().to_owned(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_of_both_apis() {
        let ok = json!({"id": "batch_req_1", "custom_id": "a", "error": null,
            "response": {"status_code": 200, "request_id": "r", "body": {"id": "chatcmpl-1"}}});
        assert_eq!(
            openai_outcome(&ok),
            NativeOutcome::Succeeded(json!({"id": "chatcmpl-1"}))
        );
        let expired = json!({"custom_id": "b", "response": null,
            "error": {"code": "batch_expired", "message": "window ended"}});
        assert_eq!(openai_outcome(&expired), NativeOutcome::Expired);
        let failed = json!({"custom_id": "c", "error": null, "response": {"status_code": 400,
            "body": {"error": {"type": "invalid_request_error", "message": "bad"}}}});
        let outcome = openai_outcome(&failed);
        assert!(!outcome.is_retryable());
        assert_eq!(
            outcome,
            NativeOutcome::Failed {
                status: Some(400),
                code: "invalid_request_error".into(),
                message: "bad".into()
            }
        );
        assert_eq!(
            anthropic_outcome(&json!({"type": "succeeded", "message": {"id": "msg_1"}})),
            NativeOutcome::Succeeded(json!({"id": "msg_1"}))
        );
        assert_eq!(
            anthropic_outcome(&json!({"type": "expired"})),
            NativeOutcome::Expired
        );
        let errored = anthropic_outcome(&json!({"type": "errored", "error": {"type": "error",
            "error": {"type": "overloaded_error", "message": "busy"}}}));
        assert!(errored.is_retryable());
    }
}
