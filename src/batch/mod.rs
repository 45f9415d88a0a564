//! Batch jobs: many chat requests submitted as one durable job, run by the gateway's own
//! runner through the same call path as `Chat`, each answered exactly once.
//!
//! - [`runner::Batches`]: accepts jobs, runs them (concurrency bounded per job and
//!   globally, retries with backoff within the job's deadline, cancel), resumes unfinished
//!   jobs at start, and serves their progress and results.
//! - [`BatchStore`]: what the runner needs of durable storage; [`sqlite::SqliteBatchStore`]
//!   keeps its own tables in the gateway's SQLite file, [`postgres::PgBatchStore`] in the
//!   shared PostgreSQL database (`store.url`), with claims as leases so replicas share jobs.
//! - [`native`]: clients of the providers' native batch APIs (OpenAI Batch, Anthropic
//!   Message Batches), one outcome per custom id; [`offload`] runs a job's requests
//!   through them (a job's [`BatchMode`]), with the provider batch ids stored so a restart
//!   polls the same batches, and a fallback to the runner's real-time path.
//! - [`Execute`]: how one request runs. The server implements it over its call engine, so
//!   this module never sees gRPC types: requests and results are opaque bytes to it.
//!
//! Exactly once: a request is claimed by moving it from pending to running in one
//! transaction, and its result is inserted in the same transaction that marks it done (a
//! second result for the same request is refused by a unique index). At start, requests
//! left running by a stopped gateway go back to pending and run again; a result is never
//! written twice. `[batch]` holds the settings ([`BatchSettings`]).

pub mod native;
pub mod offload;
pub mod postgres;
pub mod runner;
pub mod sqlite;

use std::{collections::BTreeMap, time::Duration};

use async_trait::async_trait;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::settings::Issues;

pub use runner::Batches;

/// `batch.lease` when unset.
const LEASE_DEFAULT: Duration = Duration::from_secs(30);
/// The shortest `batch.lease`: the heartbeat (a third of it) must outrun a busy database.
const LEASE_MIN: Duration = Duration::from_secs(1);

/// `[batch]` as written in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatch {
    /// `batch.max_concurrency`: batch requests running at once, over all jobs.
    pub max_concurrency: Option<usize>,
    /// `batch.job_concurrency`: requests of one job running at once.
    pub job_concurrency: Option<usize>,
    /// `batch.max_requests`: requests one job may hold.
    pub max_requests: Option<usize>,
    /// `batch.max_runs`: how often one request may run (1 + retries).
    pub max_runs: Option<u32>,
    /// `batch.retry_backoff`: the first retry's delay; it doubles per retry.
    pub retry_backoff: Option<String>,
    /// `batch.max_retry_backoff`: the longest retry delay.
    pub max_retry_backoff: Option<String>,
    /// `batch.default_timeout`: a job's time when the caller sets none.
    pub default_timeout: Option<String>,
    /// `batch.max_timeout`: the longest time a job may ask for.
    pub max_timeout: Option<String>,
    /// `batch.request_timeout`: the budget of one run of one request.
    pub request_timeout: Option<String>,
    /// `batch.native_poll_interval`: how often a native provider batch is polled.
    pub native_poll_interval: Option<String>,
    /// `batch.lease`: how long a replica's claim on a request holds without a renewal
    /// (with `store.url`; renewed every third of it).
    pub lease: Option<String>,
}

/// The validated `[batch]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSettings {
    /// Batch requests running at once, over all jobs.
    pub max_concurrency: usize,
    /// Requests of one job running at once.
    pub job_concurrency: usize,
    /// Requests one job may hold.
    pub max_requests: usize,
    /// How often one request may run (1 + retries).
    pub max_runs: u32,
    /// The first retry's delay (doubling per retry, with jitter).
    pub retry_backoff: Duration,
    /// The longest retry delay.
    pub max_retry_backoff: Duration,
    /// A job's time when the caller sets none.
    pub default_timeout: Duration,
    /// The longest time a job may ask for.
    pub max_timeout: Duration,
    /// The budget of one run of one request (the job's deadline cuts it shorter).
    pub request_timeout: Duration,
    /// How often a native provider batch is polled.
    pub native_poll_interval: Duration,
    /// How long a replica's claim on a request holds without a renewal (PostgreSQL store
    /// only; the heartbeat renews every third of it). A killed replica's requests run
    /// elsewhere within about this long.
    pub lease: Duration,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self::from_raw(RawBatch::default(), &mut Issues::new())
    }
}

impl BatchSettings {
    /// Validates `[batch]`.
    pub fn from_raw(raw: RawBatch, issues: &mut Issues) -> Self {
        let mut positive = |field: &str, value: Option<usize>, default: usize| match value {
            Some(0) => {
                issues.push(format!("batch.{field}"), "must be greater than 0");
                default
            }
            Some(n) => n,
            None => default,
        };
        let max_concurrency = positive("max_concurrency", raw.max_concurrency, 256);
        let job_concurrency = positive("job_concurrency", raw.job_concurrency, 64);
        let max_requests = positive("max_requests", raw.max_requests, 50_000);
        let max_runs = positive(
            "max_runs",
            raw.max_runs
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            5,
        );
        let settings = Self {
            max_concurrency,
            job_concurrency,
            max_requests,
            max_runs: u32::try_from(max_runs).unwrap_or(u32::MAX),
            retry_backoff: issues.duration(
                "batch.retry_backoff",
                raw.retry_backoff.as_deref(),
                Duration::from_secs(1),
            ),
            max_retry_backoff: issues.duration(
                "batch.max_retry_backoff",
                raw.max_retry_backoff.as_deref(),
                Duration::from_secs(60),
            ),
            default_timeout: issues.duration(
                "batch.default_timeout",
                raw.default_timeout.as_deref(),
                Duration::from_secs(24 * 3600),
            ),
            max_timeout: issues.duration(
                "batch.max_timeout",
                raw.max_timeout.as_deref(),
                Duration::from_secs(7 * 24 * 3600),
            ),
            request_timeout: issues.duration(
                "batch.request_timeout",
                raw.request_timeout.as_deref(),
                Duration::from_secs(300),
            ),
            native_poll_interval: issues.duration(
                "batch.native_poll_interval",
                raw.native_poll_interval.as_deref(),
                Duration::from_secs(30),
            ),
            lease: issues.duration("batch.lease", raw.lease.as_deref(), LEASE_DEFAULT),
        };
        if settings.lease < LEASE_MIN {
            issues.push("batch.lease", "must be at least 1s");
        }
        if settings.default_timeout > settings.max_timeout {
            issues.push(
                "batch.default_timeout",
                "must not be longer than batch.max_timeout",
            );
        }
        settings
    }
}

/// Where a job is in its life (the numbers are stored; never renumber).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Requests are being run.
    Running = 1,
    /// Cancelled: nothing new starts, running requests finish.
    Cancelling = 2,
    /// Every request has its result.
    Completed = 3,
    /// Cancelled, and every request has its result.
    Cancelled = 4,
    /// The deadline passed before every request started.
    Expired = 5,
}

impl JobState {
    /// The state stored as `n`.
    pub fn from_i64(n: i64) -> Option<JobState> {
        Some(match n {
            1 => JobState::Running,
            2 => JobState::Cancelling,
            3 => JobState::Completed,
            4 => JobState::Cancelled,
            5 => JobState::Expired,
            _ => return None,
        })
    }

    /// Whether the job has ended (every request has its result).
    pub fn ended(self) -> bool {
        match self {
            JobState::Running | JobState::Cancelling => false,
            JobState::Completed | JobState::Cancelled | JobState::Expired => true,
        }
    }
}

/// How a job runs (stored; never renumber).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BatchMode {
    /// Every request in real time through the call engine.
    #[default]
    Realtime = 1,
    /// Requests whose target has a native batch API through it (see [`offload`]); the
    /// others, and those it could not answer, in real time.
    Native = 2,
    /// Asked for at creation only: native when the job's timeout leaves room for the
    /// provider's completion window and every request can go native, else real time.
    Auto = 3,
}

impl BatchMode {
    /// The mode stored as `n` (an unknown one runs in real time).
    pub fn from_i64(n: i64) -> BatchMode {
        match n {
            2 => BatchMode::Native,
            3 => BatchMode::Auto,
            _ => BatchMode::Realtime,
        }
    }
}

/// How a request's bytes are encoded (stored; never renumber). The batch module does not
/// read them; [`Execute`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFormat {
    /// A protobuf `llmgateway.v1.ChatRequest`.
    Proto = 1,
    /// An OpenAI Chat Completions request body (JSON).
    OpenAiJson = 2,
}

impl RequestFormat {
    /// The format stored as `n`.
    pub fn from_i64(n: i64) -> Option<RequestFormat> {
        match n {
            1 => Some(RequestFormat::Proto),
            2 => Some(RequestFormat::OpenAiJson),
            _ => None,
        }
    }
}

/// One request of a new job.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRequest {
    /// The caller's id, unique within the job.
    pub custom_id: String,
    /// How `body` is encoded.
    pub format: RequestFormat,
    /// The request.
    pub body: Vec<u8>,
}

/// A job as submitted.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// Who owns it: the submitting key's id, or empty without a key.
    pub owner: String,
    /// Tags added to every request.
    pub tags: BTreeMap<String, String>,
    /// How long it may run.
    pub timeout: Duration,
    /// How to run it ([`BatchMode::Auto`] is resolved before it is stored).
    pub mode: BatchMode,
    /// The requests, in submission order.
    pub requests: Vec<NewRequest>,
}

/// Requests of a job by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Requests in the job.
    pub total: u32,
    /// Not started, or waiting for a retry.
    pub pending: u32,
    /// Running now.
    pub running: u32,
    /// Ended with a reply.
    pub succeeded: u32,
    /// Ended with another error.
    pub failed: u32,
    /// Ended with CANCELLED.
    pub cancelled: u32,
    /// Ended with DEADLINE_EXCEEDED.
    pub deadline_exceeded: u32,
}

/// A cost in US dollars, split as [`crate::models::Cost`] is.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CostSum {
    /// Total.
    pub total: f64,
    /// Input tokens.
    pub input: f64,
    /// Output tokens.
    pub output: f64,
}

/// A stored job with its progress.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// The job id.
    pub id: String,
    /// The owner (key id, or empty).
    pub owner: String,
    /// Its state.
    pub state: JobState,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
    /// Created, Unix milliseconds.
    pub created_ms: i64,
    /// Deadline, Unix milliseconds.
    pub deadline_ms: i64,
    /// Ended, Unix milliseconds.
    pub ended_ms: Option<i64>,
    /// Requests by state.
    pub counts: Counts,
    /// The cost of the results so far, when any has one.
    pub cost: Option<CostSum>,
    /// How it runs: [`BatchMode::Realtime`] or [`BatchMode::Native`].
    pub mode: BatchMode,
    /// Its native batches: a document [`offload`] reads and writes (empty until the
    /// native part starts).
    pub native: String,
}

/// A request claimed to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    /// Its position in the job.
    pub index: u32,
    /// The caller's id.
    pub custom_id: String,
    /// How `body` is encoded.
    pub format: RequestFormat,
    /// The request.
    pub body: Vec<u8>,
    /// Runs so far, this one included.
    pub runs: u32,
}

/// A request's result, as [`Execute`] encodes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRecord {
    /// The gRPC code it ended with (0 = OK).
    pub code: i32,
    /// Its cost, when known.
    pub cost: Option<CostSum>,
    /// The encoded result (opaque here).
    pub payload: Vec<u8>,
}

/// A stored result.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResult {
    /// Its position among the job's results, from 0.
    pub offset: u64,
    /// How often the request ran.
    pub runs: u32,
    /// When it was recorded, Unix milliseconds.
    pub time_ms: i64,
    /// The encoded result.
    pub payload: Vec<u8>,
}

/// What the runner needs to know to schedule a job's next request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Queue {
    /// Requests pending (including those waiting for a retry).
    pub pending: u32,
    /// Requests running.
    pub running: u32,
    /// The earliest time a pending request may start, Unix milliseconds.
    pub next_ms: Option<i64>,
}

/// Makes the result of a request that never ran from its custom id.
pub type ResultFor = Box<dyn for<'a> Fn(&'a str) -> ResultRecord + Send>;

/// Why a batch storage operation failed: the backend's description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("batch store: {0}")]
pub struct BatchStoreError(pub String);

/// Durable storage of jobs, requests and results.
#[async_trait]
pub trait BatchStore: Send + Sync + 'static {
    /// Stores a new job, state [`JobState::Running`], all requests pending.
    async fn create_job(
        &self,
        id: &str,
        job: NewJob,
        created_ms: i64,
        deadline_ms: i64,
    ) -> Result<(), BatchStoreError>;

    /// One job with its progress.
    async fn job(&self, id: &str) -> Result<Option<JobRecord>, BatchStoreError>;

    /// A job's state alone (what [`BatchStore::job`] says, without counting).
    async fn job_state(&self, id: &str) -> Result<Option<JobState>, BatchStoreError> {
        Ok(self.job(id).await?.map(|job| job.state))
    }

    /// An owner's jobs, newest first, `limit` of them after the cursor `after` (from a
    /// previous page); returns the cursor of the last one.
    async fn list_jobs(
        &self,
        owner: &str,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, JobRecord)>, BatchStoreError>;

    /// The ids of jobs that have not ended.
    async fn unfinished_jobs(&self) -> Result<Vec<String>, BatchStoreError>;

    /// Puts a job's running requests back to pending (after a restart).
    async fn release_running(&self, job_id: &str) -> Result<u64, BatchStoreError>;

    /// Claims the next pending request that may start at `now_ms` (running, runs + 1).
    async fn claim(&self, job_id: &str, now_ms: i64) -> Result<Option<Claimed>, BatchStoreError>;

    /// Counts pending and running requests, and when the next may start.
    async fn queue(&self, job_id: &str) -> Result<Queue, BatchStoreError>;

    /// Records a running request's result and marks it done, in one transaction. Returns
    /// false (and changes nothing) when the request already has a result.
    async fn complete(
        &self,
        job_id: &str,
        index: u32,
        result: ResultRecord,
        now_ms: i64,
    ) -> Result<bool, BatchStoreError>;

    /// Puts a running request back to pending, to start no earlier than `not_before_ms`.
    async fn retry_later(
        &self,
        job_id: &str,
        index: u32,
        not_before_ms: i64,
    ) -> Result<(), BatchStoreError>;

    /// Gives every pending request its result from `result(custom_id)`, in one
    /// transaction; returns how many.
    async fn finish_pending(
        &self,
        job_id: &str,
        result: ResultFor,
        now_ms: i64,
    ) -> Result<u64, BatchStoreError>;

    /// Moves a job from one of `from` to `to` (with `ended_ms` for end states); returns the
    /// state after the call.
    async fn set_state(
        &self,
        job_id: &str,
        from: &[JobState],
        to: JobState,
        ended_ms: Option<i64>,
    ) -> Result<Option<JobState>, BatchStoreError>;

    /// Bumped when another replica may have recorded results or changed a job's state
    /// (results streams wake on it); `None` for a store only this process writes.
    fn remote_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// A job's results from `offset`, at most `limit`, in completion order.
    async fn results(
        &self,
        job_id: &str,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<StoredResult>, BatchStoreError>;

    /// Every request of a job in the native state (being run by a provider's native
    /// batch); with `take_pending`, first moves every pending request to it (runs + 1).
    /// Requests in the native state are neither claimed nor released by a restart; they
    /// leave it by [`BatchStore::complete`] or [`BatchStore::native_release`].
    async fn native_requests(
        &self,
        job_id: &str,
        take_pending: bool,
    ) -> Result<Vec<Claimed>, BatchStoreError>;

    /// Puts requests of the native state back to pending (to run in real time). `sent`:
    /// a provider batch had them (their native run counts); otherwise the run
    /// [`BatchStore::native_requests`] counted is taken back.
    async fn native_release(
        &self,
        job_id: &str,
        indexes: &[u32],
        sent: bool,
    ) -> Result<(), BatchStoreError>;

    /// Replaces the job's native batches document ([`JobRecord::native`]).
    async fn set_native(&self, job_id: &str, document: String) -> Result<(), BatchStoreError>;
}

/// Why a request ends without running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unstarted {
    /// The job was cancelled.
    Cancelled,
    /// The job's deadline passed.
    Expired,
}

/// How one run of a request ended.
#[derive(Debug)]
pub enum RunOutcome {
    /// Its final result: a reply, or an error retrying cannot fix.
    Done(ResultRecord),
    /// A retryable failure; `result` is final if no retry is left. `after` is the
    /// provider's or limiter's retry delay, when it said one.
    Retry {
        /// The shortest wait before the retry.
        after: Option<Duration>,
        /// The result to record if it is not retried.
        result: ResultRecord,
    },
    /// Stopped by the gateway's shutdown: the request goes back to pending.
    Interrupted,
}

/// Runs one request of a job; the server implements it over its call engine.
#[async_trait]
pub trait Execute: Send + Sync + 'static {
    /// Runs `request` of `job` once, with the call budget ending at `deadline`; ends with
    /// [`RunOutcome::Interrupted`] soon after `stop` is cancelled.
    async fn run(
        &self,
        job: &JobRecord,
        request: &Claimed,
        deadline: Instant,
        stop: &CancellationToken,
    ) -> RunOutcome;

    /// The result of a request that never started.
    fn unstarted(&self, custom_id: &str, why: Unstarted) -> ResultRecord;

    /// How a request of `owner` would go in a provider's native batch: `None` when its
    /// target has no native batch API (or the request cannot go in one). The default:
    /// never.
    fn native_request(
        &self,
        _owner: &str,
        _format: RequestFormat,
        _body: &[u8],
    ) -> Option<NativeRequest> {
        None
    }

    /// The native batch client of `account` (a [`NativeRequest::account`]).
    fn native_client(&self, _account: &str) -> Option<native::NativeBatch> {
        None
    }

    /// The result of `request` of `job` as the native batch of `account` answered it.
    async fn native_result(
        &self,
        job: &JobRecord,
        request: &Claimed,
        account: &str,
        outcome: native::NativeOutcome,
    ) -> NativeDone {
        let _ = (job, account, outcome);
        NativeDone::Realtime(self.unstarted(&request.custom_id, Unstarted::Expired))
    }
}

/// A request as a native batch sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct NativeRequest {
    /// Which provider account's batch API takes it (the configured provider's name).
    pub account: String,
    /// The request in the provider's format (a batch line's `body` / `params`).
    pub body: serde_json::Value,
}

/// What becomes of a request a native batch answered.
#[derive(Debug)]
pub enum NativeDone {
    /// Its final result.
    Done(ResultRecord),
    /// The native batch could not answer it (expired, failed retryably): it runs in real
    /// time while the job's deadline allows, else ends with this result.
    Realtime(ResultRecord),
}

/// The gRPC code numbers the runner counts by.
pub mod codes {
    /// OK.
    pub const OK: i32 = 0;
    /// CANCELLED.
    pub const CANCELLED: i32 = 1;
    /// DEADLINE_EXCEEDED.
    pub const DEADLINE_EXCEEDED: i32 = 4;
}

/// How both batch stores record a request's state (a column value: never renumber).
pub(crate) mod request_state {
    /// Waiting to run.
    pub const PENDING: i64 = 0;
    /// Claimed and running.
    pub const RUNNING: i64 = 1;
    /// Answered.
    pub const DONE: i64 = 2;
    /// Inside a provider's native batch.
    pub const NATIVE: i64 = 3;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml: &str) -> Result<BatchSettings, Vec<String>> {
        crate::settings::from_toml(toml, BatchSettings::from_raw)
    }

    #[test]
    fn lease_defaults_to_30s_and_takes_a_duration() {
        assert_eq!(settings("").unwrap().lease, Duration::from_secs(30));
        assert_eq!(
            settings("lease = \"1s\"").unwrap().lease,
            Duration::from_secs(1)
        );
        assert_eq!(
            settings("lease = \"2m\"").unwrap().lease,
            Duration::from_secs(120)
        );
    }

    #[test]
    fn a_lease_under_1s_or_not_a_duration_is_a_config_error() {
        for (toml, message) in [
            ("lease = \"999ms\"", "batch.lease: must be at least 1s"),
            ("lease = \"0s\"", "batch.lease: must be greater than zero"),
            ("lease = \"soon\"", "batch.lease: `soon` is not a duration"),
        ] {
            let errors = settings(toml).unwrap_err();
            assert_eq!(errors.len(), 1, "{toml}: {errors:?}");
            assert!(errors[0].starts_with(message), "{toml}: {errors:?}");
        }
    }
}
