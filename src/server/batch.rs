//! Batch jobs on the gRPC surface: the `CreateBatch`, `GetBatch`, `StreamBatchResults`,
//! `CancelBatch` and `ListBatches` handlers' work (called from [`super::gateway`]), the
//! conversion of jobs and results to protobuf, and [`EngineExec`], which runs each request
//! of a job through the shared call [`Engine`] (rpc label `Batch`), exactly as `Chat` does.

use std::{collections::BTreeMap, time::Duration};

use futures_util::{Stream, StreamExt};
use prost::Message as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    access::now_ms,
    convert,
    engine::{Call, Credential, Engine},
    http::{openai, parse_json},
};
use crate::{
    auth::{Caller, Scope},
    batch::{
        Batches, Claimed, CostSum, Execute, JobRecord, JobState, NewJob, NewRequest, RequestFormat,
        ResultRecord, RunOutcome, StoredResult, Unstarted, runner,
    },
    error::{FieldViolation, GatewayError},
    pb,
    types::ChatRequest,
};

/// The `rpc` label (metrics, usage ledger) of the calls a batch job makes.
pub const RPC: &str = "Batch";

/// The tag every call of a job carries in the usage ledger: the job id.
pub const JOB_TAG: &str = "batch_job";

/// Most problems one CreateBatch error lists.
const MAX_VIOLATIONS: usize = 50;

/// Runs requests of batch jobs through the call engine.
pub struct EngineExec {
    engine: Engine,
}

impl EngineExec {
    /// Runs requests on `engine`.
    pub fn new(engine: Engine) -> Self {
        Self { engine }
    }
}

/// Decodes and validates a stored request of a job.
fn decode(format: RequestFormat, body: &[u8]) -> Result<ChatRequest, GatewayError> {
    match format {
        RequestFormat::Proto => {
            let req = pb::ChatRequest::decode(body).map_err(|e| {
                GatewayError::invalid("request", format!("is not a valid ChatRequest: {e}"))
            })?;
            convert::chat_request(req)
        }
        RequestFormat::OpenAiJson => openai::chat_request(parse_json(body)?),
    }
}

/// The job's tags under the request's own, and `batch_job`.
fn with_job_tags(req: &mut ChatRequest, job: &JobRecord) {
    for (k, v) in &job.tags {
        req.tags.entry(k.clone()).or_insert_with(|| v.clone());
    }
    req.tags.insert(JOB_TAG.to_owned(), job.id.clone());
}

/// The caller a job runs as: its owner key, still valid and with the `chat` scope.
fn job_caller(engine: &Engine, owner: &str) -> Result<Option<Caller>, GatewayError> {
    if owner.is_empty() {
        return Ok(None);
    }
    let gone = || {
        GatewayError::Unauthenticated(
            "the api key that created this batch job no longer exists".to_owned(),
        )
    };
    let key = engine.access().keys.get(owner).ok_or_else(gone)?;
    if key.revoked {
        return Err(GatewayError::Unauthenticated(
            "the api key that created this batch job was revoked".to_owned(),
        ));
    }
    if key.spec.expires_ms.is_some_and(|e| e <= now_ms()) {
        return Err(GatewayError::Unauthenticated(
            "the api key that created this batch job has expired".to_owned(),
        ));
    }
    let caller = Caller { key };
    caller.require(Scope::Chat)?;
    Ok(Some(caller))
}

/// Whether the runner should try a failed request again, and no earlier than when.
fn retry_hint(err: &GatewayError) -> Option<Option<Duration>> {
    match err {
        GatewayError::ResourceExhausted { retry_after, .. }
        | GatewayError::Unavailable { retry_after, .. } => Some(*retry_after),
        GatewayError::Upstream { error, .. } => error.is_retryable().then_some(error.retry_after),
        // A run cut off by `batch.request_timeout` may succeed again; the runner never
        // retries past the job's deadline.
        GatewayError::DeadlineExceeded { .. } => Some(None),
        GatewayError::InvalidArgument(_)
        | GatewayError::NotFound { .. }
        | GatewayError::Unauthenticated(_)
        | GatewayError::PermissionDenied(_)
        | GatewayError::FailedPrecondition { .. }
        | GatewayError::Cancelled
        | GatewayError::Aborted(_)
        | GatewayError::AlreadyExists(_)
        | GatewayError::GuardrailBlocked { .. }
        | GatewayError::Internal(_) => None,
    }
}

fn cost_sum(cost: Option<&pb::Cost>) -> Option<CostSum> {
    cost.map(|c| CostSum {
        total: c.total_usd,
        input: c.input_usd,
        output: c.output_usd,
    })
}

fn error_result(custom_id: &str, err: &GatewayError) -> ResultRecord {
    let class = err.classify();
    let result = pb::BatchResult {
        custom_id: custom_id.to_owned(),
        outcome: Some(pb::batch_result::Outcome::Error(pb::BatchError {
            code: class.code as i32,
            reason: class.reason.to_owned(),
            message: err.to_string(),
        })),
        route: err.route().cloned().map(convert::route),
        ..pb::BatchResult::default()
    };
    ResultRecord {
        code: class.code as i32,
        cost: None,
        payload: result.encode_to_vec(),
    }
}

#[async_trait::async_trait]
impl Execute for EngineExec {
    async fn run(
        &self,
        job: &JobRecord,
        request: &Claimed,
        deadline: Instant,
        stop: &CancellationToken,
    ) -> RunOutcome {
        let caller = match job_caller(&self.engine, &job.owner) {
            Ok(caller) => caller,
            Err(err) => return RunOutcome::Done(error_result(&request.custom_id, &err)),
        };
        let request_id = format!("{}.{}.{}", job.id, request.index, request.runs);
        let call = Call {
            rpc: RPC,
            request_id: request_id.clone(),
            deadline,
            trace: None,
            credential: Credential::Verified(caller),
            // A batch request is a normal call: the policy's cache applies.
            cache_control: crate::cache::CacheControl::default(),
        };
        let body = &request.body;
        let format = request.format;
        let answer = tokio::select! {
            answer = self.engine.chat(call, move || {
                let mut req = decode(format, body)?;
                with_job_tags(&mut req, job);
                Ok(req)
            }) => answer,
            () = stop.cancelled() => return RunOutcome::Interrupted,
        };
        match answer {
            Ok(answer) => {
                let response = convert::chat_response(request_id, answer);
                let result = pb::BatchResult {
                    custom_id: request.custom_id.clone(),
                    usage: response.usage,
                    cost: response.cost,
                    route: response.route.clone(),
                    outcome: Some(pb::batch_result::Outcome::Response(response)),
                    ..pb::BatchResult::default()
                };
                RunOutcome::Done(ResultRecord {
                    code: 0,
                    cost: cost_sum(result.cost.as_ref()),
                    payload: result.encode_to_vec(),
                })
            }
            Err(err) if err.reason() == "SHUTTING_DOWN" => RunOutcome::Interrupted,
            Err(err) => {
                let result = error_result(&request.custom_id, &err);
                match retry_hint(&err) {
                    Some(after) => RunOutcome::Retry { after, result },
                    None => RunOutcome::Done(result),
                }
            }
        }
    }

    fn unstarted(&self, custom_id: &str, why: Unstarted) -> ResultRecord {
        let (code, reason, message) = match why {
            Unstarted::Cancelled => (
                tonic::Code::Cancelled,
                "CANCELLED",
                "the batch job was cancelled before this request started",
            ),
            Unstarted::Expired => (
                tonic::Code::DeadlineExceeded,
                "DEADLINE_EXCEEDED",
                "the batch job's deadline passed before this request started",
            ),
        };
        let result = pb::BatchResult {
            custom_id: custom_id.to_owned(),
            outcome: Some(pb::batch_result::Outcome::Error(pb::BatchError {
                code: code as i32,
                reason: reason.to_owned(),
                message: message.to_owned(),
            })),
            ..pb::BatchResult::default()
        };
        ResultRecord {
            code: code as i32,
            cost: None,
            payload: result.encode_to_vec(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Requests in
// ---------------------------------------------------------------------------------------------

/// One line of an OpenAI Batch input file.
#[derive(serde::Deserialize)]
struct BatchLine {
    custom_id: String,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    url: Option<String>,
    body: serde_json::Value,
}

/// Prefixes each violation of a request with where it is.
fn prefixed(err: GatewayError, prefix: &str, out: &mut Vec<FieldViolation>) {
    match err {
        GatewayError::InvalidArgument(violations) => {
            out.extend(
                violations
                    .into_iter()
                    .map(|v| FieldViolation::new(format!("{prefix}.{}", v.field), v.description)),
            );
        }
        other => out.push(FieldViolation::new(prefix, other.to_string())),
    }
}

/// The requests of `requests`, each validated.
fn from_items(
    items: Vec<pb::BatchRequestItem>,
    problems: &mut Vec<FieldViolation>,
) -> Vec<(String, NewRequest)> {
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let Some(request) = item.request else {
            problems.push(FieldViolation::new(
                format!("requests[{i}].request"),
                "is required",
            ));
            continue;
        };
        let body = request.encode_to_vec();
        if let Err(err) = convert::chat_request(request) {
            prefixed(err, &format!("requests[{i}].request"), problems);
        }
        out.push((
            format!("requests[{i}].custom_id"),
            NewRequest {
                custom_id: item.custom_id,
                format: RequestFormat::Proto,
                body,
            },
        ));
    }
    out
}

/// The requests of a JSON lines file, each validated; problems name the line (from 1).
fn from_jsonl(jsonl: &[u8], problems: &mut Vec<FieldViolation>) -> Vec<(String, NewRequest)> {
    let mut out = Vec::new();
    for (n, line) in jsonl.split(|b| *b == b'\n').enumerate() {
        let at = format!("jsonl line {}", n + 1);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed: BatchLine = match parse_json(line) {
            Ok(parsed) => parsed,
            Err(GatewayError::InvalidArgument(violations)) => {
                // `body` is parse_json's name for the whole text: here, the line.
                problems.extend(violations.into_iter().map(|v| match v.field.as_str() {
                    "body" if v.description.starts_with("is not valid JSON") => {
                        FieldViolation::new(at.clone(), v.description)
                    }
                    field => FieldViolation::new(format!("{at}.{field}"), v.description),
                }));
                continue;
            }
            Err(err) => {
                prefixed(err, &at, problems);
                continue;
            }
        };
        if parsed.method.as_deref().is_some_and(|m| m != "POST") {
            problems.push(FieldViolation::new(
                format!("{at}.method"),
                "must be `POST`",
            ));
        }
        if parsed
            .url
            .as_deref()
            .is_some_and(|u| u != "/v1/chat/completions")
        {
            problems.push(FieldViolation::new(
                format!("{at}.url"),
                "must be `/v1/chat/completions` (the only endpoint batches run)",
            ));
        }
        let body = match serde_json::to_vec(&parsed.body) {
            Ok(body) => body,
            Err(e) => {
                problems.push(FieldViolation::new(format!("{at}.body"), e.to_string()));
                continue;
            }
        };
        if let Err(err) = decode(RequestFormat::OpenAiJson, &body) {
            prefixed(err, &format!("{at}.body"), problems);
        }
        out.push((
            format!("{at}.custom_id"),
            NewRequest {
                custom_id: parsed.custom_id,
                format: RequestFormat::OpenAiJson,
                body,
            },
        ));
    }
    out
}

fn duration_in(d: &prost_types::Duration, field: &str) -> Result<Duration, GatewayError> {
    let (Ok(secs), Ok(nanos)) = (u64::try_from(d.seconds), u32::try_from(d.nanos)) else {
        return Err(GatewayError::invalid(field, "must not be negative"));
    };
    if nanos >= 1_000_000_000 {
        return Err(GatewayError::invalid(
            field,
            "nanos must be below 1000000000",
        ));
    }
    Ok(Duration::new(secs, nanos))
}

/// Validates a CreateBatch request into a job owned by `owner`.
pub fn new_job(
    req: pb::CreateBatchRequest,
    owner: String,
    batches: &Batches,
) -> Result<NewJob, GatewayError> {
    let settings = batches.settings();
    let mut problems = Vec::new();
    if !req.requests.is_empty() && !req.jsonl.is_empty() {
        return Err(GatewayError::invalid(
            "jsonl",
            "set either `requests` or `jsonl`, not both",
        ));
    }
    // Refuse an oversized job before converting every request of it.
    let count = if req.jsonl.is_empty() {
        req.requests.len()
    } else {
        req.jsonl
            .split(|b| *b == b'\n')
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .count()
    };
    if count > settings.max_requests {
        return Err(GatewayError::invalid(
            if req.jsonl.is_empty() {
                "requests"
            } else {
                "jsonl"
            },
            format!(
                "{count} requests is more than the {} one batch may hold",
                settings.max_requests
            ),
        ));
    }
    let tags: BTreeMap<String, String> = req.tags.into_iter().collect();
    problems.extend(
        convert::check_common("batch", true, &Default::default(), &tags, "")
            .into_iter()
            .filter(|v| v.field.starts_with("tags")),
    );
    if tags.contains_key(JOB_TAG) {
        problems.push(FieldViolation::new(
            format!("tags[{JOB_TAG}]"),
            "is set by the gateway (the job id)",
        ));
    }
    let timeout = match &req.timeout {
        Some(d) => duration_in(d, "timeout")?,
        None => settings.default_timeout,
    };
    let requests = if req.jsonl.is_empty() {
        from_items(req.requests, &mut problems)
    } else {
        from_jsonl(&req.jsonl, &mut problems)
    };
    problems.extend(runner::check_custom_ids(
        requests
            .iter()
            .map(|(field, r)| (field.clone(), r.custom_id.as_str())),
    ));
    if !problems.is_empty() {
        problems.truncate(MAX_VIOLATIONS);
        return Err(GatewayError::InvalidArgument(problems));
    }
    Ok(NewJob {
        owner,
        tags,
        timeout,
        requests: requests.into_iter().map(|(_, r)| r).collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// Jobs and results out
// ---------------------------------------------------------------------------------------------

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

fn state_out(state: JobState) -> pb::BatchState {
    match state {
        JobState::Running => pb::BatchState::Running,
        JobState::Cancelling => pb::BatchState::Cancelling,
        JobState::Completed => pb::BatchState::Completed,
        JobState::Cancelled => pb::BatchState::Cancelled,
        JobState::Expired => pb::BatchState::Expired,
    }
}

/// A job as the API shows it.
pub fn batch_out(job: JobRecord) -> pb::Batch {
    let c = job.counts;
    pb::Batch {
        id: job.id,
        state: state_out(job.state) as i32,
        mode: pb::BatchMode::Gateway as i32,
        counts: Some(pb::BatchCounts {
            total: c.total,
            pending: c.pending,
            running: c.running,
            succeeded: c.succeeded,
            failed: c.failed,
            cancelled: c.cancelled,
            deadline_exceeded: c.deadline_exceeded,
        }),
        cost: job.cost.map(|c| pb::Cost {
            total_usd: c.total,
            input_usd: c.input,
            output_usd: c.output,
        }),
        create_time: Some(timestamp(job.created_ms)),
        deadline: Some(timestamp(job.deadline_ms)),
        end_time: job.ended_ms.map(timestamp),
        tags: job.tags.into_iter().collect(),
    }
}

/// A stored result as the API shows it.
pub fn result_out(stored: StoredResult) -> Result<pb::BatchResult, GatewayError> {
    let mut result = pb::BatchResult::decode(stored.payload.as_slice())
        .map_err(|e| GatewayError::Internal(format!("a stored batch result is unreadable: {e}")))?;
    result.offset = stored.offset;
    result.runs = stored.runs;
    result.complete_time = Some(timestamp(stored.time_ms));
    Ok(result)
}

/// The results stream of a job the caller owns.
pub async fn results(
    batches: &Batches,
    owner: &str,
    req: pb::StreamBatchResultsRequest,
) -> Result<
    impl Stream<Item = Result<pb::StreamBatchResultsResponse, GatewayError>> + use<>,
    GatewayError,
> {
    batches.get(owner, &req.batch_id).await?;
    Ok(batches.results(req.batch_id, req.offset).map(|stored| {
        stored
            .and_then(result_out)
            .map(|result| pb::StreamBatchResultsResponse {
                result: Some(result),
            })
    }))
}

/// A page of the caller's jobs.
pub async fn list(
    batches: &Batches,
    owner: &str,
    req: pb::ListBatchesRequest,
) -> Result<pb::ListBatchesResponse, GatewayError> {
    let size = match req.page_size {
        0 => 50,
        n => usize::try_from(n).unwrap_or(1000).min(1000),
    };
    let after = if req.page_token.is_empty() {
        None
    } else {
        Some(req.page_token.parse::<i64>().map_err(|_| {
            GatewayError::invalid("page_token", "is not a token from a previous page")
        })?)
    };
    let (jobs, next) = batches.list(owner, after, size).await?;
    Ok(pb::ListBatchesResponse {
        batches: jobs.into_iter().map(batch_out).collect(),
        next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
    })
}

/// The owner of the jobs a caller creates and sees: its key's id, or empty without a key.
pub fn owner(caller: Option<&Caller>) -> String {
    caller.map(|c| c.key.id.clone()).unwrap_or_default()
}
