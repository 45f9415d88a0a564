//! The job runner: one task per unfinished job claims its requests one at a time while it
//! holds a slot of the job's and of the global concurrency bound, runs each through
//! [`Execute`], and records the result (or schedules a retry with backoff).
//!
//! A job's task ends when every request has its result: [`JobState::Completed`]; after a
//! cancel, the requests never started get CANCELLED results ([`JobState::Cancelled`]); at
//! the deadline, those never started get DEADLINE_EXCEEDED ([`JobState::Expired`]). In
//! both cases the requests already running finish first. At shutdown the tasks stop
//! claiming, running requests get the grace period, then are interrupted and go back to
//! pending for the next start.
//!
//! A job in [`BatchMode::Native`] first runs its native part ([`super::offload`]); what
//! that leaves pending then runs here in real time.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_util::Stream;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, watch},
    task::JoinSet,
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    BatchMode, BatchSettings, BatchStore, BatchStoreError, Claimed, Execute, JobRecord, JobState,
    NewJob, RunOutcome, StoredResult, Unstarted, native::COMPLETION_WINDOW, offload,
};
use crate::error::{FieldViolation, GatewayError};

/// The longest `custom_id`, in bytes.
pub const MAX_CUSTOM_ID_BYTES: usize = 256;

/// Results read from the store at a time by a results stream.
const RESULT_PAGE: usize = 256;

/// Unix milliseconds now.
pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The monotonic instant of the Unix time `ms` (now, when it has passed).
fn instant_at(ms: i64) -> Instant {
    let ahead = u64::try_from(ms.saturating_sub(now_ms())).unwrap_or(0);
    Instant::now() + Duration::from_millis(ahead)
}

fn store_failure(err: &BatchStoreError) -> GatewayError {
    tracing::error!(error = %err, "batch store failure");
    GatewayError::Unavailable {
        reason: "STORE_UNAVAILABLE",
        message: "the batch store failed; retry".to_owned(),
        retry_after: None,
    }
}

fn not_found(id: &str) -> GatewayError {
    GatewayError::NotFound {
        reason: "BATCH_NOT_FOUND",
        message: format!("no batch job `{id}`"),
    }
}

/// Checks a job's custom ids: each present, at most [`MAX_CUSTOM_ID_BYTES`], unique. Each
/// item is `(field, custom_id)`, `field` naming the request in problems.
pub fn check_custom_ids<'a>(
    items: impl IntoIterator<Item = (String, &'a str)>,
) -> Vec<FieldViolation> {
    let mut seen: HashMap<&str, String> = HashMap::new();
    let mut problems = Vec::new();
    for (field, id) in items {
        if id.is_empty() {
            problems.push(FieldViolation::new(field, "is required"));
        } else if id.len() > MAX_CUSTOM_ID_BYTES {
            problems.push(FieldViolation::new(
                field,
                format!("must be at most {MAX_CUSTOM_ID_BYTES} bytes"),
            ));
        } else if let Some(first) = seen.get(id) {
            problems.push(FieldViolation::new(
                field,
                format!("`{id}` is used twice (also at {first})"),
            ));
        } else {
            seen.insert(id, field);
        }
    }
    problems
}

/// A running job's controls.
#[derive(Clone)]
struct JobHandle {
    cancel: CancellationToken,
}

pub(super) struct Inner {
    pub(super) store: Arc<dyn BatchStore>,
    pub(super) exec: Arc<dyn Execute>,
    pub(super) settings: BatchSettings,
    global: Arc<Semaphore>,
    jobs: Mutex<HashMap<String, JobHandle>>,
    /// Bumped on every result and state change; result streams wait on it.
    pub(super) changed: watch::Sender<u64>,
    tasks: TaskTracker,
    /// Set at shutdown: no job claims another request.
    pub(super) stop_claiming: CancellationToken,
    /// Set when the shutdown grace ends: running requests stop and go back to pending.
    interrupt: CancellationToken,
}

/// The batch service: jobs in, results out. Cheap to clone.
#[derive(Clone)]
pub struct Batches {
    inner: Arc<Inner>,
}

impl Batches {
    /// A runner over `store`, running requests with `exec`. Call [`Batches::resume`] to
    /// pick up the jobs an earlier run left unfinished.
    pub fn new(
        store: Arc<dyn BatchStore>,
        exec: Arc<dyn Execute>,
        settings: BatchSettings,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                exec,
                global: Arc::new(Semaphore::new(settings.max_concurrency)),
                settings,
                jobs: Mutex::new(HashMap::new()),
                changed: watch::Sender::new(0),
                tasks: TaskTracker::new(),
                stop_claiming: CancellationToken::new(),
                interrupt: CancellationToken::new(),
            }),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &BatchSettings {
        &self.inner.settings
    }

    /// Starts the jobs that have not ended (their requests left running go back to
    /// pending); returns how many.
    pub async fn resume(&self) -> Result<usize, BatchStoreError> {
        let ids = self.inner.store.unfinished_jobs().await?;
        for id in &ids {
            let released = self.inner.store.release_running(id).await?;
            tracing::info!(batch_job = %id, released, "resuming batch job");
            self.spawn(id.clone());
        }
        Ok(ids.len())
    }

    /// Every `interval` until `stop`, starts the unfinished jobs no task of this runner
    /// runs: with a store shared by replicas, jobs created on another replica or left by
    /// one that went away go on here without a restart (claims keep any request from
    /// running twice).
    pub async fn adopt(self, interval: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.inner.stop_claiming.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            let ids = match self.inner.store.unfinished_jobs().await {
                Ok(ids) => ids,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot list unfinished batch jobs");
                    continue;
                }
            };
            for id in ids {
                let here = self
                    .inner
                    .jobs
                    .lock()
                    .is_ok_and(|jobs| jobs.contains_key(&id));
                if !here && !self.inner.stop_claiming.is_cancelled() {
                    tracing::info!(batch_job = %id, "running a batch job of the shared store here too");
                    self.spawn(id);
                }
            }
        }
    }

    /// Stores a job and starts it. The requests must be valid already (the caller checks
    /// them with [`check_custom_ids`] and its own conversion); here the count and timeout
    /// are checked, and [`BatchMode::Auto`] is resolved.
    pub async fn create(&self, mut job: NewJob) -> Result<JobRecord, GatewayError> {
        let settings = &self.inner.settings;
        let mut problems = Vec::new();
        if job.requests.is_empty() {
            problems.push(FieldViolation::new(
                "requests",
                "a batch needs at least one request (in `requests` or `jsonl`)",
            ));
        } else if job.requests.len() > settings.max_requests {
            problems.push(FieldViolation::new(
                "requests",
                format!(
                    "{} requests is more than the {} one batch may hold",
                    job.requests.len(),
                    settings.max_requests
                ),
            ));
        }
        if job.timeout.is_zero() {
            problems.push(FieldViolation::new("timeout", "must be greater than 0"));
        } else if job.timeout > settings.max_timeout {
            problems.push(FieldViolation::new(
                "timeout",
                format!(
                    "must be at most {}",
                    humantime::format_duration(settings.max_timeout)
                ),
            ));
        }
        if !problems.is_empty() {
            return Err(GatewayError::InvalidArgument(problems));
        }
        if job.mode == BatchMode::Auto {
            job.mode = self.auto_mode(&job);
        }
        let id = new_job_id()?;
        let created_ms = now_ms();
        let deadline_ms =
            created_ms.saturating_add(i64::try_from(job.timeout.as_millis()).unwrap_or(i64::MAX));
        let total = job.requests.len();
        let mode = job.mode;
        self.inner
            .store
            .create_job(&id, job, created_ms, deadline_ms)
            .await
            .map_err(|e| store_failure(&e))?;
        tracing::info!(batch_job = %id, requests = total, mode = ?mode, "batch job created");
        self.spawn(id.clone());
        self.inner
            .store
            .job(&id)
            .await
            .map_err(|e| store_failure(&e))?
            .ok_or_else(|| not_found(&id))
    }

    /// [`BatchMode::Auto`]: native when the job's timeout leaves room for the providers'
    /// completion window and every request can go in a native batch, else real time.
    fn auto_mode(&self, job: &NewJob) -> BatchMode {
        let exec = &self.inner.exec;
        if job.timeout >= COMPLETION_WINDOW
            && job
                .requests
                .iter()
                .all(|r| exec.native_request(&job.owner, r.format, &r.body).is_some())
        {
            BatchMode::Native
        } else {
            BatchMode::Realtime
        }
    }

    /// The job `id`, when `owner` owns it (NOT_FOUND otherwise, so that ids of other keys'
    /// jobs reveal nothing).
    pub async fn get(&self, owner: &str, id: &str) -> Result<JobRecord, GatewayError> {
        match self.inner.store.job(id).await {
            Ok(Some(job)) if job.owner == owner => Ok(job),
            Ok(_) => Err(not_found(id)),
            Err(e) => Err(store_failure(&e)),
        }
    }

    /// Cancels the job: nothing new starts; the job ends once its running requests have.
    pub async fn cancel(&self, owner: &str, id: &str) -> Result<JobRecord, GatewayError> {
        self.get(owner, id).await?;
        self.inner
            .store
            .set_state(id, &[JobState::Running], JobState::Cancelling, None)
            .await
            .map_err(|e| store_failure(&e))?;
        let handle = self.inner.jobs.lock().ok().and_then(|j| j.get(id).cloned());
        if let Some(handle) = handle {
            handle.cancel.cancel();
        }
        self.inner.changed.send_modify(|n| *n += 1);
        self.get(owner, id).await
    }

    /// The owner's jobs, newest first: a page of `limit` after the cursor `after`, and the
    /// cursor for the next page when there may be one.
    pub async fn list(
        &self,
        owner: &str,
        after: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<JobRecord>, Option<i64>), GatewayError> {
        let mut page = self
            .inner
            .store
            .list_jobs(owner, after, limit + 1)
            .await
            .map_err(|e| store_failure(&e))?;
        let next = if page.len() > limit {
            page.truncate(limit);
            page.last().map(|(cursor, _)| *cursor)
        } else {
            None
        };
        Ok((page.into_iter().map(|(_, job)| job).collect(), next))
    }

    /// The job's results from `offset` on, in completion order: those recorded, then each
    /// as it is recorded; the stream ends once the job has ended and all were sent. The
    /// caller checks ownership with [`Batches::get`] first.
    pub fn results(
        &self,
        id: String,
        offset: u64,
    ) -> impl Stream<Item = Result<StoredResult, GatewayError>> + Send + use<> {
        struct State {
            inner: Arc<Inner>,
            id: String,
            offset: u64,
            buffer: VecDeque<StoredResult>,
            changes: watch::Receiver<u64>,
            /// Changes made by other replicas (a shared store).
            remote: Option<watch::Receiver<u64>>,
            done: bool,
        }
        let state = State {
            changes: self.inner.changed.subscribe(),
            remote: self.inner.store.remote_changes(),
            inner: self.inner.clone(),
            id,
            offset,
            buffer: VecDeque::new(),
            done: false,
        };
        futures_util::stream::unfold(state, |mut st| async move {
            loop {
                if let Some(result) = st.buffer.pop_front() {
                    return Some((Ok(result), st));
                }
                if st.done {
                    return None;
                }
                st.changes.borrow_and_update();
                if let Some(remote) = &mut st.remote {
                    remote.borrow_and_update();
                }
                // The state first: a job ends only after its last result is written, so an
                // ended job's results are all readable below.
                let ended = match st.inner.store.job(&st.id).await {
                    Ok(Some(job)) => job.state.ended(),
                    Ok(None) => {
                        st.done = true;
                        return Some((Err(not_found(&st.id)), st));
                    }
                    Err(e) => {
                        st.done = true;
                        return Some((Err(store_failure(&e)), st));
                    }
                };
                match st.inner.store.results(&st.id, st.offset, RESULT_PAGE).await {
                    Ok(page) if !page.is_empty() => {
                        st.offset += page.len() as u64;
                        st.buffer.extend(page);
                    }
                    Ok(_) if ended => return None,
                    Ok(_) => {
                        // A missed wake-up costs at most this long.
                        let (changes, remote) = (&mut st.changes, &mut st.remote);
                        let remote = async move {
                            if let Some(remote) = remote
                                && remote.changed().await.is_ok()
                            {
                                return;
                            }
                            std::future::pending::<()>().await;
                        };
                        let wait = tokio::time::timeout(Duration::from_secs(5), async move {
                            tokio::select! {
                                _ = changes.changed() => {}
                                () = remote => {}
                            }
                        });
                        tokio::select! {
                            _ = wait => {}
                            () = st.inner.stop_claiming.cancelled() => {
                                st.done = true;
                                return Some((Err(GatewayError::Unavailable {
                                    reason: "SHUTTING_DOWN",
                                    message: "the gateway is shutting down; reconnect with `offset` = the number of results received".to_owned(),
                                    retry_after: None,
                                }), st));
                            }
                        }
                    }
                    Err(e) => {
                        st.done = true;
                        return Some((Err(store_failure(&e)), st));
                    }
                }
            }
        })
    }

    /// Starts the shutdown: no job claims another request, and results streams end with
    /// UNAVAILABLE (readers reconnect with their offset).
    pub fn stop_claiming(&self) {
        self.inner.stop_claiming.cancel();
    }

    /// Stops the runner: no job claims another request; running requests get `grace` to
    /// finish, then are interrupted (back to pending, for the next start).
    pub async fn shutdown(&self, grace: Duration) {
        let inner = &self.inner;
        inner.stop_claiming.cancel();
        inner.tasks.close();
        if tokio::time::timeout(grace, inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "batch requests still running after the grace period; interrupting them"
            );
            inner.interrupt.cancel();
            inner.tasks.wait().await;
        }
    }

    fn spawn(&self, id: String) {
        let handle = JobHandle {
            cancel: CancellationToken::new(),
        };
        if let Ok(mut jobs) = self.inner.jobs.lock() {
            jobs.insert(id.clone(), handle.clone());
        }
        let inner = self.inner.clone();
        self.inner.tasks.spawn(async move {
            if let Err(err) = drive(&inner, &id, &handle).await {
                tracing::error!(batch_job = %id, error = %err, "batch job stopped on a store failure; it resumes at the next start");
            }
            if let Ok(mut jobs) = inner.jobs.lock() {
                jobs.remove(&id);
            }
            inner.changed.send_modify(|n| *n += 1);
        });
    }
}

fn new_job_id() -> Result<String, GatewayError> {
    let mut bytes = [0u8; 12];
    crate::auth::secure_random(&mut bytes)?;
    Ok(format!("batch_{}", crate::auth::hex(&bytes)))
}

/// Runs one job to its end (or until shutdown).
async fn drive(inner: &Arc<Inner>, id: &str, handle: &JobHandle) -> Result<(), BatchStoreError> {
    let store = &inner.store;
    let Some(job) = store.job(id).await? else {
        return Ok(());
    };
    if job.state == JobState::Cancelling {
        handle.cancel.cancel();
    }
    let job = Arc::new(job);
    let deadline = instant_at(job.deadline_ms);
    if job.mode == BatchMode::Native && !offload::run(inner, &job, &handle.cancel, deadline).await?
    {
        return Ok(());
    }
    let per_job = Arc::new(Semaphore::new(inner.settings.job_concurrency));
    let mut running: JoinSet<()> = JoinSet::new();
    loop {
        while running.try_join_next().is_some() {}
        if inner.stop_claiming.is_cancelled() {
            while running.join_next().await.is_some() {}
            return Ok(());
        }
        let cancelled = handle.cancel.is_cancelled();
        let expired = Instant::now() >= deadline;
        if cancelled || expired {
            let why = if cancelled {
                Unstarted::Cancelled
            } else {
                Unstarted::Expired
            };
            let exec = inner.exec.clone();
            let finished = store
                .finish_pending(
                    id,
                    Box::new(move |custom_id| exec.unstarted(custom_id, why)),
                    now_ms(),
                )
                .await?;
            inner.changed.send_modify(|n| *n += 1);
            while running.join_next().await.is_some() {}
            if inner.stop_claiming.is_cancelled() {
                return Ok(());
            }
            let end = match why {
                Unstarted::Cancelled => JobState::Cancelled,
                Unstarted::Expired if finished > 0 => JobState::Expired,
                Unstarted::Expired => JobState::Completed,
            };
            store
                .set_state(
                    id,
                    &[JobState::Running, JobState::Cancelling],
                    end,
                    Some(now_ms()),
                )
                .await?;
            tracing::info!(batch_job = %id, state = ?end, "batch job ended");
            return Ok(());
        }
        // A slot of the job's bound, then of the global one.
        let permits = tokio::select! {
            permits = acquire(&per_job, &inner.global) => permits,
            () = handle.cancel.cancelled() => continue,
            () = inner.stop_claiming.cancelled() => continue,
            () = tokio::time::sleep_until(deadline) => continue,
        };
        let Some(permits) = permits else {
            return Ok(());
        };
        if let Some(claimed) = store.claim(id, now_ms()).await? {
            let inner = inner.clone();
            let job = job.clone();
            running.spawn(async move {
                run_one(&inner, &job, claimed).await;
                drop(permits);
            });
            continue;
        }
        drop(permits);
        // With a shared store, another replica may have cancelled or ended the job.
        if !handle.cancel.is_cancelled() && store.job_state(id).await? != Some(JobState::Running) {
            handle.cancel.cancel();
            continue;
        }
        let queue = store.queue(id).await?;
        if running.is_empty() && queue.running > 0 {
            // Marked running but not running here (a store write failed): pending again.
            store.release_running(id).await?;
            continue;
        }
        if queue.pending == 0 && queue.running == 0 && running.is_empty() {
            store
                .set_state(
                    id,
                    &[JobState::Running],
                    JobState::Completed,
                    Some(now_ms()),
                )
                .await?;
            tracing::info!(batch_job = %id, "batch job completed");
            return Ok(());
        }
        let wake = queue
            .next_ms
            .map_or(deadline, |ms| instant_at(ms).min(deadline))
            .max(Instant::now() + Duration::from_millis(10));
        tokio::select! {
            Some(_) = running.join_next(), if !running.is_empty() => {}
            () = tokio::time::sleep_until(wake) => {}
            () = handle.cancel.cancelled() => {}
            () = inner.stop_claiming.cancelled() => {}
        }
    }
}

async fn acquire(
    per_job: &Arc<Semaphore>,
    global: &Arc<Semaphore>,
) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
    let job = per_job.clone().acquire_owned().await.ok()?;
    let global = global.clone().acquire_owned().await.ok()?;
    Some((job, global))
}

/// The delay before retry number `runs` (1 for the first): the backoff doubling per run,
/// capped, with up to 20% jitter either way.
fn backoff(settings: &BatchSettings, runs: u32) -> Duration {
    let doubling = 2u32.saturating_pow(runs.saturating_sub(1).min(20));
    let base = settings
        .retry_backoff
        .saturating_mul(doubling)
        .min(settings.max_retry_backoff);
    base.mul_f64(0.8 + 0.4 * fastrand::f64())
}

/// Runs one claimed request and records what came of it.
async fn run_one(inner: &Arc<Inner>, job: &Arc<JobRecord>, claimed: Claimed) {
    let store = &inner.store;
    let deadline =
        (Instant::now() + inner.settings.request_timeout).min(instant_at(job.deadline_ms));
    let outcome = inner
        .exec
        .run(job, &claimed, deadline, &inner.interrupt)
        .await;
    let written = match outcome {
        RunOutcome::Done(result) => store
            .complete(&job.id, claimed.index, result, now_ms())
            .await
            .map(drop),
        RunOutcome::Retry { after, result } => {
            let delay = backoff(&inner.settings, claimed.runs).max(after.unwrap_or_default());
            let at = now_ms().saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
            if claimed.runs >= inner.settings.max_runs || at >= job.deadline_ms {
                store
                    .complete(&job.id, claimed.index, result, now_ms())
                    .await
                    .map(drop)
            } else {
                tracing::debug!(batch_job = %job.id, index = claimed.index, runs = claimed.runs, delay = ?delay, "batch request failed retryably; retrying later");
                store.retry_later(&job.id, claimed.index, at).await
            }
        }
        RunOutcome::Interrupted => store.retry_later(&job.id, claimed.index, 0).await,
    };
    if let Err(err) = written {
        tracing::error!(batch_job = %job.id, index = claimed.index, error = %err, "cannot record a batch result; the request runs again");
    }
    inner.changed.send_modify(|n| *n += 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_ids_must_be_present_short_and_unique() {
        let long = "x".repeat(MAX_CUSTOM_ID_BYTES + 1);
        let problems = check_custom_ids([
            ("requests[0].custom_id".to_owned(), "a"),
            ("requests[1].custom_id".to_owned(), ""),
            ("requests[2].custom_id".to_owned(), long.as_str()),
            ("requests[3].custom_id".to_owned(), "a"),
        ]);
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "requests[1].custom_id",
                "requests[2].custom_id",
                "requests[3].custom_id"
            ]
        );
        assert!(problems[2].description.contains("requests[0].custom_id"));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let settings = BatchSettings::default();
        for runs in 1..10 {
            let d = backoff(&settings, runs);
            let nominal = Duration::from_secs(1u64 << (runs - 1)).min(Duration::from_secs(60));
            assert!(
                d >= nominal.mul_f64(0.8) && d <= nominal.mul_f64(1.2),
                "{runs}: {d:?}"
            );
        }
    }
}
