//! Batch jobs on the gRPC surface: the `CreateBatch`, `GetBatch`, `StreamBatchResults`,
//! `CancelBatch` and `ListBatches` handlers' work (called from [`super::gateway`]), the
//! conversion of jobs and results to protobuf, and [`EngineExec`], which runs each request
//! of a job through the shared call [`Engine`] (rpc label `Batch`), exactly as `Chat` does.
//!
//! Native mode: [`NativeAccounts`] are the configured `openai` and `anthropic` providers,
//! whose native batch APIs take a job's requests in their own wire format (the same
//! `build_request` as a real-time call). A request goes native when its plan's first target
//! is such an account, its key may call the model, and neither the key nor the policy has
//! guardrails (their scans run in the call path, which a native batch bypasses; so do the
//! response cache and the key's rate limits). An answered request is priced at
//! [`NATIVE_PRICE_FACTOR`] of the target's prices, in its result and in the usage ledger
//! (rpc `Batch`, tags `batch_job` and `batch_mode = native`).

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use futures_util::{Stream, StreamExt};
use prost::Message as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    access::now_ms,
    convert,
    engine::{Call, Credential, Engine},
    http::{openai, parse_json},
    meter::{CallMeter, MeterConfig, Outcome},
};
use crate::{
    auth::{Caller, Scope},
    batch::{
        BatchMode, Batches, Claimed, CostSum, Execute, JobRecord, JobState, NativeDone,
        NativeRequest, NewJob, NewRequest, RequestFormat, ResultRecord, RunOutcome, StoredResult,
        Unstarted,
        native::{NATIVE_PRICE_FACTOR, NativeBatch, NativeKind, NativeOutcome},
        offload, runner,
    },
    config::Config,
    error::{FieldViolation, GatewayError},
    executor::{Answer, cost_of},
    models::Cost,
    pb,
    providers::{
        self, ErrorClass, ProviderError,
        anthropic::{self as anthropic_wire, AnthropicSettings},
        openai::{self as openai_wire, OpenAiSettings},
        wire::WireFormat,
    },
    routing::Target,
    types::{AttemptKind, AttemptOutcome, AttemptRecord, ChatRequest, ChatResponse, Route},
};

/// The `rpc` label (metrics, usage ledger) of the calls a batch job makes.
pub const RPC: &str = "Batch";

/// The tag every call of a job carries in the usage ledger: the job id.
pub const JOB_TAG: &str = "batch_job";

/// Most problems one CreateBatch error lists.
const MAX_VIOLATIONS: usize = 50;

/// The tag a natively answered request carries in the usage ledger (`native`).
pub const MODE_TAG: &str = "batch_mode";

/// Runs requests of batch jobs through the call engine, or natively.
pub struct EngineExec {
    engine: Engine,
    native: NativeAccounts,
    meter: Option<MeterConfig>,
}

impl EngineExec {
    /// Runs requests on `engine` (no native batches).
    pub fn new(engine: Engine) -> Self {
        Self {
            engine,
            native: NativeAccounts::default(),
            meter: None,
        }
    }

    /// Sends requests of native jobs to `accounts`, recording their answers with `meter`.
    pub fn with_native(mut self, accounts: NativeAccounts, meter: MeterConfig) -> Self {
        self.native = accounts;
        self.meter = Some(meter);
        self
    }
}

/// How one account's wire format reads and writes native batch lines.
#[derive(Debug, Clone)]
enum NativeWire {
    OpenAi(openai_wire::ChatCompletions),
    Anthropic(anthropic_wire::Messages),
}

impl NativeWire {
    fn build(&self, model: &str, req: &ChatRequest) -> Option<serde_json::Value> {
        let bytes = match self {
            NativeWire::OpenAi(w) => w.build_request(model, req, false),
            NativeWire::Anthropic(w) => w.build_request(model, req, false),
        }
        .ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn parse(&self, body: &serde_json::Value, model: &str) -> Result<ChatResponse, ProviderError> {
        let bytes = body.to_string();
        match self {
            NativeWire::OpenAi(w) => w.parse_response(bytes.as_bytes(), model),
            NativeWire::Anthropic(w) => w.parse_response(bytes.as_bytes(), model),
        }
    }
}

#[derive(Debug, Clone)]
struct NativeAccount {
    client: NativeBatch,
    wire: NativeWire,
}

/// The provider accounts with a native batch API, by configured provider name: kinds
/// `openai` and `anthropic` with an API key (their first key).
#[derive(Debug, Clone, Default)]
pub struct NativeAccounts(HashMap<String, NativeAccount>);

impl NativeAccounts {
    /// The accounts of `config`'s providers.
    pub fn from_config(config: &Config) -> Result<Self, reqwest::Error> {
        let client = providers::http_client(&config.upstream.http)?;
        let mut accounts = HashMap::new();
        for p in &config.providers {
            let Some(key) = p.api_key() else { continue };
            let (kind, wire) = if p.kind == openai_wire::KIND
                && let Some(s) = p.settings.get::<OpenAiSettings>()
            {
                (
                    NativeKind::OpenAi,
                    NativeWire::OpenAi(openai_wire::ChatCompletions::new(s.config.clone())),
                )
            } else if p.kind == anthropic_wire::KIND
                && let Some(s) = p.settings.get::<AnthropicSettings>()
            {
                (
                    NativeKind::Anthropic,
                    NativeWire::Anthropic(anthropic_wire::Messages::new(s.0.clone())),
                )
            } else {
                continue;
            };
            let base_url = match &wire {
                NativeWire::OpenAi(w) => w.config().base_url.clone(),
                NativeWire::Anthropic(_) => p.base_url.clone(),
            };
            accounts.insert(
                p.name.clone(),
                NativeAccount {
                    client: NativeBatch::new(kind, base_url, key, client.clone()),
                    wire,
                },
            );
        }
        Ok(Self(accounts))
    }
}

/// The provider error class of a native batch item's HTTP status.
fn native_class(status: Option<u16>) -> ErrorClass {
    match status {
        Some(400 | 422) => ErrorClass::InvalidRequest,
        Some(401) => ErrorClass::Authentication,
        Some(403) => ErrorClass::Permission,
        Some(404) => ErrorClass::ModelNotFound,
        Some(408) => ErrorClass::Timeout,
        Some(429) => ErrorClass::RateLimited,
        Some(503 | 529) => ErrorClass::Overloaded,
        _ => ErrorClass::ServerError,
    }
}

/// A route of one native attempt at `provider`/`model`.
fn native_route(
    policy: Option<std::sync::Arc<str>>,
    provider: &str,
    model: &str,
    outcome: AttemptOutcome,
) -> Route {
    Route {
        policy,
        attempts: vec![AttemptRecord {
            provider: provider.to_owned(),
            model: model.to_owned(),
            kind: AttemptKind::Primary,
            outcome,
            start_offset: Duration::ZERO,
            latency: Duration::ZERO,
            time_to_first_token: None,
        }],
        ..Route::default()
    }
}

impl EngineExec {
    /// The request's caller, the request with the job's tags, and its plan's target at
    /// `account` (the first one for a new request).
    fn native_target(
        &self,
        owner: &str,
        format: RequestFormat,
        body: &[u8],
        account: Option<&str>,
    ) -> Option<(Option<Caller>, ChatRequest, crate::routing::Plan, Target)> {
        let caller = job_caller(&self.engine, owner).ok()?;
        let req = decode(format, body).ok()?;
        let table = self.engine.table();
        if let Some(caller) = &caller {
            caller
                .may_call(&req.model, table.is_policy(&req.model))
                .ok()?;
            if !caller.key.spec.guardrails.is_empty() {
                return None;
            }
        }
        let plan = table.plan(&req).ok()?;
        if plan.arm.is_some()
            || plan.policy.as_ref().is_some_and(|p| {
                table
                    .policies()
                    .get(&**p)
                    .is_some_and(|r| r.spec.guardrails.is_some())
            })
        {
            return None;
        }
        let target = match account {
            None => plan.targets.first()?.clone(),
            Some(account) => plan
                .targets
                .iter()
                .chain(plan.skipped.iter().map(|s| &s.target))
                .find(|t| t.provider.name() == account)?
                .clone(),
        };
        Some((caller, req, plan, target))
    }

    /// Records a native answer in the usage ledger.
    fn record_native(
        &self,
        job: &JobRecord,
        request: &Claimed,
        caller: Option<&Caller>,
        tags: &BTreeMap<String, String>,
        outcome: Outcome<'_>,
    ) {
        let Some(meter) = &self.meter else { return };
        let request_id = format!("{}.{}.{}", job.id, request.index, request.runs);
        let mut meter = CallMeter::start(meter, RPC, request_id);
        if let Some(caller) = caller {
            meter.set_key(caller.name());
        }
        meter.set_tags(tags);
        meter.finish(outcome);
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

/// The result of a request answered in `mode`.
fn answer_result(
    custom_id: &str,
    request_id: String,
    answer: Answer,
    mode: pb::BatchMode,
) -> ResultRecord {
    let response = convert::chat_response(request_id, answer);
    let result = pb::BatchResult {
        custom_id: custom_id.to_owned(),
        usage: response.usage,
        cost: response.cost,
        route: response.route.clone(),
        outcome: Some(pb::batch_result::Outcome::Response(response)),
        mode: mode as i32,
        ..pb::BatchResult::default()
    };
    ResultRecord {
        code: 0,
        cost: cost_sum(result.cost.as_ref()),
        payload: result.encode_to_vec(),
    }
}

fn error_result(custom_id: &str, err: &GatewayError) -> ResultRecord {
    error_result_in(custom_id, err, pb::BatchMode::Gateway)
}

fn error_result_in(custom_id: &str, err: &GatewayError, mode: pb::BatchMode) -> ResultRecord {
    let class = err.classify();
    let result = pb::BatchResult {
        custom_id: custom_id.to_owned(),
        outcome: Some(pb::batch_result::Outcome::Error(pb::BatchError {
            code: class.code as i32,
            reason: class.reason.to_owned(),
            message: err.to_string(),
        })),
        route: err.route().cloned().map(convert::route),
        mode: mode as i32,
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
            Ok(answer) => RunOutcome::Done(answer_result(
                &request.custom_id,
                request_id,
                answer,
                pb::BatchMode::Gateway,
            )),
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

    fn native_request(
        &self,
        owner: &str,
        format: RequestFormat,
        body: &[u8],
    ) -> Option<NativeRequest> {
        let (_, req, _, target) = self.native_target(owner, format, body, None)?;
        let account = self.native.0.get(target.provider.name())?;
        Some(NativeRequest {
            account: target.provider.name().to_owned(),
            body: account.wire.build(&target.model, &req)?,
        })
    }

    fn native_client(&self, account: &str) -> Option<NativeBatch> {
        self.native.0.get(account).map(|a| a.client.clone())
    }

    async fn native_result(
        &self,
        job: &JobRecord,
        request: &Claimed,
        account: &str,
        outcome: NativeOutcome,
    ) -> NativeDone {
        let native = pb::BatchMode::Native;
        let found = self.native_target(&job.owner, request.format, &request.body, Some(account));
        let (Some(wire), Some((caller, mut req, plan, target))) =
            (self.native.0.get(account).map(|a| &a.wire), found)
        else {
            // The account or the request's route changed since submission.
            let err = GatewayError::Unavailable {
                reason: "NATIVE_BATCH_UNAVAILABLE",
                message: format!(
                    "the native batch of `{account}` can no longer be read for this request"
                ),
                retry_after: None,
            };
            return NativeDone::Realtime(error_result_in(&request.custom_id, &err, native));
        };
        with_job_tags(&mut req, job);
        if let Some(caller) = &caller {
            caller.force_tags(&mut req.tags);
        }
        req.tags.insert(MODE_TAG.to_owned(), "native".to_owned());
        let failed = |class: ErrorClass, message: String, status: Option<u16>| {
            let mut error = ProviderError::new(class, message);
            if let Some(status) = status {
                error = error.with_status(status);
            }
            GatewayError::Upstream {
                route: native_route(
                    plan.policy.clone(),
                    account,
                    &target.model,
                    AttemptOutcome::Failed(class.reason()),
                ),
                error,
                all_rate_limited: class == ErrorClass::RateLimited,
            }
        };
        let body = match outcome {
            NativeOutcome::Succeeded(body) => body,
            NativeOutcome::Failed {
                status,
                code,
                message,
            } => {
                let retryable = NativeOutcome::Failed {
                    status,
                    code: String::new(),
                    message: String::new(),
                }
                .is_retryable();
                let err = failed(
                    native_class(status),
                    format!("the native batch answered `{code}`: {message}"),
                    status,
                );
                let result = error_result_in(&request.custom_id, &err, native);
                if retryable {
                    return NativeDone::Realtime(result);
                }
                self.record_native(
                    job,
                    request,
                    caller.as_ref(),
                    &req.tags,
                    Outcome::failed(&err),
                );
                return NativeDone::Done(result);
            }
            NativeOutcome::Expired | NativeOutcome::Canceled | NativeOutcome::Missing => {
                let err = failed(
                    ErrorClass::ServerError,
                    "the native batch ended without running this request".to_owned(),
                    None,
                );
                return NativeDone::Realtime(error_result_in(&request.custom_id, &err, native));
            }
        };
        let response = match wire.parse(&body, &target.model) {
            Ok(response) => response,
            Err(error) => {
                let err = failed(error.class, error.to_string(), None);
                self.record_native(
                    job,
                    request,
                    caller.as_ref(),
                    &req.tags,
                    Outcome::failed(&err),
                );
                return NativeDone::Done(error_result_in(&request.custom_id, &err, native));
            }
        };
        let cost = cost_of(&target, response.usage.as_ref()).map(|c| Cost {
            input_usd: c.input_usd * NATIVE_PRICE_FACTOR,
            output_usd: c.output_usd * NATIVE_PRICE_FACTOR,
        });
        let mut route = native_route(
            plan.policy.clone(),
            account,
            &target.model,
            AttemptOutcome::Succeeded,
        );
        route.revision = plan.revision;
        self.record_native(
            job,
            request,
            caller.as_ref(),
            &req.tags,
            Outcome {
                code: tonic::Code::Ok,
                error_class: "",
                route: Some(&route),
                usage: response.usage,
                cost,
                ttft: None,
            },
        );
        let request_id = format!("{}.{}.{}", job.id, request.index, request.runs);
        let answer = Answer {
            response,
            provider: account.to_owned(),
            cost,
            route,
            metrics: Some(target.metrics.clone()),
        };
        NativeDone::Done(answer_result(
            &request.custom_id,
            request_id,
            answer,
            native,
        ))
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
    let mode = match pb::BatchMode::try_from(req.mode) {
        Ok(pb::BatchMode::Unspecified | pb::BatchMode::Gateway) => BatchMode::Realtime,
        Ok(pb::BatchMode::Native) => BatchMode::Native,
        Ok(pb::BatchMode::Auto) => BatchMode::Auto,
        Err(_) => {
            return Err(GatewayError::invalid(
                "mode",
                format!(
                    "{} is not a BatchMode (BATCH_MODE_GATEWAY, BATCH_MODE_NATIVE or BATCH_MODE_AUTO)",
                    req.mode
                ),
            ));
        }
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
        mode,
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
    let native_batches = offload::submissions(&job.native)
        .unwrap_or_default()
        .unwrap_or_default()
        .into_iter()
        .map(|s| pb::NativeBatch {
            provider: s.account,
            id: s.id.unwrap_or_default(),
            requests: u32::try_from(s.indexes.len()).unwrap_or(u32::MAX),
            done: s.done,
        })
        .collect();
    pb::Batch {
        id: job.id,
        state: state_out(job.state) as i32,
        mode: match job.mode {
            BatchMode::Native => pb::BatchMode::Native,
            BatchMode::Realtime | BatchMode::Auto => pb::BatchMode::Gateway,
        } as i32,
        native_batches,
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
