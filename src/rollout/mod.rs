//! Canary rollouts: a staged `UpdatePolicy` gives the new version of a policy a growing
//! share of calls (steps such as 1, 5, 25, 100 percent) and rolls itself back when the
//! sequential test of [`stats`] finds the new version worse than the old one.
//!
//! What lives where:
//! - The rollout document ([`RolloutRecord`]: spec, old version, state, step, history,
//!   reason) is stored with the policies (one row per policy, its latest rollout), written
//!   in the same transaction as the policy change it goes with, so with a shared store
//!   every replica reads the same rollout and follows it through the change feed.
//! - The outcome counts and the sequential test are per replica ([`Live`]): each replica
//!   tests the calls it served, and the first to find harm rolls back for all.
//! - The routing snapshot holds both versions and the new version's share as an atomic
//!   ([`crate::routing::RolloutSplit`]): a step or a rollback changes the share in place,
//!   at once.
//!
//! Transitions (advance, complete, rollback, pause, resume, abort) are compare-and-set
//! writes of the document: when two replicas race, one wins and the other re-reads.

pub mod stats;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    sync::{Notify, mpsc},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use self::stats::{Counts, Observation, Sequential};
use crate::{
    audit::Auditor,
    error::{FieldViolation, GatewayError},
    routing::{PolicyRecord, PolicySource, RolloutObserver, RolloutSplit, policy::PolicySpec},
    store::{Change, RolloutRow, Store, StoreError},
    types::RolloutArm,
};

/// The default steps, in percent.
pub const DEFAULT_STEPS: [f64; 4] = [1.0, 5.0, 25.0, 100.0];
/// The default step duration.
pub const DEFAULT_STEP_DURATION: Duration = Duration::from_secs(600);
/// Most steps.
pub const MAX_STEPS: usize = 20;

/// How a staged update rolls out (defaults filled in).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// The new version's share at each step, percent, increasing, ending at 100.
    pub steps: Vec<f64>,
    /// Least time per step.
    #[serde(with = "humantime_serde")]
    pub step_duration: Duration,
    /// Allowed error-rate increase (fraction).
    pub error_rate_margin: f64,
    /// Allowed slowdown at the old version's p95 (fraction; a call counts as slower only
    /// when it is also at least [`stats::LATENCY_SLACK`] slower).
    pub latency_margin: f64,
    /// New-version calls a step needs before it may end.
    pub min_calls_per_step: u64,
    /// Confidence of a rollback decision.
    pub confidence: f64,
    /// `user` or `tag:NAME`; none: the request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_key: Option<String>,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            steps: DEFAULT_STEPS.to_vec(),
            step_duration: DEFAULT_STEP_DURATION,
            error_rate_margin: 0.02,
            latency_margin: 0.2,
            min_calls_per_step: 20,
            confidence: 0.95,
            sticky_key: None,
        }
    }
}

impl RolloutSpec {
    /// Every problem, with its field path under `field`.
    pub fn validate(&self, field: &str) -> Vec<FieldViolation> {
        let mut out = Vec::new();
        let mut bad = |name: &str, why: String| {
            out.push(FieldViolation::new(format!("{field}.{name}"), why));
        };
        if self.steps.len() > MAX_STEPS {
            bad(
                "steps",
                format!(
                    "has {} steps; at most {MAX_STEPS} are allowed",
                    self.steps.len()
                ),
            );
        }
        let mut last = 0.0;
        for (i, &step) in self.steps.iter().enumerate() {
            if !(step > 0.0 && step <= 100.0) {
                bad(
                    "steps",
                    format!("step {i} is {step}; each step must be in (0, 100] percent"),
                );
            } else if step <= last {
                bad(
                    "steps",
                    format!("step {i} ({step}%) must be larger than the one before it ({last}%)"),
                );
            }
            last = step;
        }
        if self.steps.last() != Some(&100.0) {
            bad("steps", "the last step must be 100".to_owned());
        }
        if !(0.0..=1.0).contains(&self.error_rate_margin) {
            bad(
                "error_rate_margin",
                format!("is {}; must be 0 to 1 (a fraction)", self.error_rate_margin),
            );
        }
        if !(0.0..=10.0).contains(&self.latency_margin) {
            bad(
                "latency_margin",
                format!("is {}; must be 0 to 10 (a fraction)", self.latency_margin),
            );
        }
        if !(0.5..=0.9999).contains(&self.confidence) {
            bad(
                "confidence",
                format!("is {}; must be 0.5 to 0.9999", self.confidence),
            );
        }
        if let Some(key) = &self.sticky_key
            && crate::routing::policy::parse_sticky_key(key).is_none()
        {
            bad(
                "sticky_key",
                format!("`{key}` is neither `user` nor `tag:NAME`"),
            );
        }
        out
    }
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// The new version serves the step's share.
    Running,
    /// Held at its step.
    Paused,
    /// The new version serves everything.
    Completed,
    /// The test found harm; the old version serves everything.
    RolledBack,
    /// Aborted by an admin; the old version serves everything.
    Aborted,
}

impl State {
    /// Running or paused.
    pub fn is_active(self) -> bool {
        matches!(self, State::Running | State::Paused)
    }
}

/// One step of a rollout, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepRecord {
    /// The step index.
    pub step: u32,
    /// The new version's share, percent.
    pub percent: f64,
    /// Start, Unix ms.
    pub started_ms: i64,
    /// End, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<i64>,
    /// `advanced`, `completed`, `rolled_back`, `aborted`, `paused`; empty while running.
    #[serde(default)]
    pub outcome: String,
    /// New-version calls in the step (seen by the replica that ended it).
    #[serde(default)]
    pub canary_calls: u64,
    /// Failed ones.
    #[serde(default)]
    pub canary_errors: u64,
}

/// A rollout, as stored (the store keeps it as a JSON document per policy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutRecord {
    /// The policy.
    pub policy: String,
    /// How it rolls out.
    pub spec: RolloutSpec,
    /// The old version's spec; dropped once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<PolicySpec>,
    /// The old version.
    pub baseline_version: u64,
    /// The new version.
    pub canary_version: u64,
    /// State.
    pub state: State,
    /// Current step.
    pub step: u32,
    /// Start, Unix ms.
    pub started_ms: i64,
    /// End, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<i64>,
    /// The steps so far.
    pub history: Vec<StepRecord>,
    /// Why it was rolled back or aborted.
    #[serde(default)]
    pub reason: String,
}

impl RolloutRecord {
    /// The new version's share now, percent.
    pub fn percent(&self) -> f64 {
        match self.state {
            State::Running | State::Paused => self
                .spec
                .steps
                .get(self.step as usize)
                .copied()
                .unwrap_or(100.0),
            State::Completed => 100.0,
            State::RolledBack | State::Aborted => 0.0,
        }
    }

    fn share_ppm(&self) -> u32 {
        (self.percent() * 10_000.0).round().clamp(0.0, 1_000_000.0) as u32
    }

    fn step_started_ms(&self) -> i64 {
        self.history
            .last()
            .map_or(self.started_ms, |s| s.started_ms)
    }

    /// Ends the current history entry.
    fn end_step(&mut self, outcome: &str, counts: Counts, now_ms: i64) {
        if let Some(last) = self.history.last_mut()
            && last.ended_ms.is_none()
        {
            last.ended_ms = Some(now_ms);
            outcome.clone_into(&mut last.outcome);
            last.canary_calls = counts.calls;
            last.canary_errors = counts.errors;
        }
    }

    fn start_step(&mut self, now_ms: i64) {
        let percent = self.percent();
        self.history.push(StepRecord {
            step: self.step,
            percent,
            started_ms: now_ms,
            ended_ms: None,
            outcome: String::new(),
            canary_calls: 0,
            canary_errors: 0,
        });
    }

    fn decode(row: &RolloutRow) -> Result<Self, StoreError> {
        serde_json::from_str(&row.doc)
            .map_err(|e| StoreError::Backend(format!("stored rollout is unreadable: {e}")))
    }

    fn encode(&self) -> Result<String, StoreError> {
        serde_json::to_string(self).map_err(|e| StoreError::Backend(e.to_string()))
    }
}

/// What one replica saw of one version.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ArmStats {
    /// The version.
    pub version: u64,
    /// Calls and errors.
    pub counts: Counts,
    /// Recent p95.
    pub p95: Option<Duration>,
}

/// A rollout with this replica's view of it (GetRollout).
#[derive(Debug, Clone)]
pub struct RolloutView {
    /// The stored document.
    pub record: RolloutRecord,
    /// The old version's outcomes here.
    pub baseline: ArmStats,
    /// The new version's outcomes here.
    pub canary: ArmStats,
    /// The error-rate test's evidence.
    pub error_evidence: f64,
    /// The latency test's evidence.
    pub latency_evidence: f64,
}

/// A transition decided by the test, the clock or an admin.
enum Action {
    Advance,
    Rollback(String),
}

struct Inner {
    record: RolloutRecord,
    /// The stored row's version (for compare-and-set).
    row_version: u64,
    test: Sequential,
    step_counts: Counts,
    step_deadline: Instant,
    /// Harm found; the share is 0 here already; the write is pending.
    pending_rollback: Option<String>,
}

/// One replica's live state of a rollout.
pub struct Live {
    share: Arc<AtomicU32>,
    inner: Mutex<Inner>,
    wake: Arc<Notify>,
}

impl Live {
    fn new(record: RolloutRecord, row_version: u64, wake: Arc<Notify>) -> Self {
        let elapsed_ms = (now_ms() - record.step_started_ms()).max(0);
        let remaining = record
            .spec
            .step_duration
            .saturating_sub(Duration::from_millis(
                u64::try_from(elapsed_ms).unwrap_or(0),
            ));
        let test = Sequential::new(
            record.spec.confidence,
            record.spec.error_rate_margin,
            record.spec.latency_margin,
        );
        Self {
            share: Arc::new(AtomicU32::new(record.share_ppm())),
            inner: Mutex::new(Inner {
                record,
                row_version,
                test,
                step_counts: Counts::default(),
                step_deadline: Instant::now() + remaining,
                pending_rollback: None,
            }),
            wake,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the counts inconsistent in a way
        // that matters more than losing them: keep going with what is there.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The next transition due, if any.
    fn due(&self, now: Instant) -> Option<Action> {
        let inner = self.lock();
        if let Some(reason) = &inner.pending_rollback {
            return Some(Action::Rollback(reason.clone()));
        }
        (inner.record.state == State::Running
            && now >= inner.step_deadline
            && inner.step_counts.calls >= inner.record.spec.min_calls_per_step)
            .then_some(Action::Advance)
    }

    fn view(&self) -> RolloutView {
        let inner = self.lock();
        RolloutView {
            record: inner.record.clone(),
            baseline: ArmStats {
                version: inner.record.baseline_version,
                counts: inner.test.baseline,
                p95: inner.test.baseline_p95(),
            },
            canary: ArmStats {
                version: inner.record.canary_version,
                counts: inner.test.canary,
                p95: inner.test.canary_p95(),
            },
            error_evidence: inner.test.error_evidence(),
            latency_evidence: inner.test.latency_evidence(),
        }
    }
}

impl RolloutObserver for Live {
    fn observe(&self, arm: RolloutArm, failed: bool, latency: Duration) {
        let mut inner = self.lock();
        if !inner.record.state.is_active() || inner.pending_rollback.is_some() {
            return;
        }
        let obs = Observation { failed, latency };
        match arm {
            RolloutArm::Baseline => inner.test.baseline(obs),
            RolloutArm::Canary => {
                inner.test.canary(obs);
                inner.step_counts.calls += 1;
                inner.step_counts.errors += u64::from(failed);
            }
            RolloutArm::None => return,
        }
        if let Some(harm) = inner.test.harm() {
            // Roll back here at once; the driver stores it for every replica.
            self.share.store(0, Ordering::Relaxed);
            let spec = &inner.record.spec;
            let reason = inner
                .test
                .explain(harm, spec.error_rate_margin, spec.confidence);
            tracing::warn!(policy = %inner.record.policy, %reason, "rollout: the new version is worse; rolling back");
            inner.pending_rollback = Some(reason);
            self.wake.notify_one();
        } else if inner.record.state == State::Running
            && inner.step_counts.calls == inner.record.spec.min_calls_per_step
            && Instant::now() >= inner.step_deadline
        {
            self.wake.notify_one();
        }
    }
}

/// Why a rollout admin call failed.
fn precondition(message: String) -> GatewayError {
    GatewayError::FailedPrecondition {
        reason: "ROLLOUT_STATE",
        message,
    }
}

fn not_found(policy: &str) -> GatewayError {
    GatewayError::NotFound {
        reason: "ROLLOUT_NOT_FOUND",
        message: format!("policy `{policy}` has no rollout"),
    }
}

fn store_failed(err: StoreError) -> GatewayError {
    match err {
        StoreError::Conflict { name, .. } => GatewayError::Aborted(format!(
            "the rollout of policy `{name}` was changed concurrently; retry"
        )),
        StoreError::NotFound(name) => GatewayError::NotFound {
            reason: "POLICY_NOT_FOUND",
            message: format!("no policy named `{name}`"),
        },
        other => {
            tracing::error!(error = %other, "rollout store failure");
            GatewayError::Unavailable {
                reason: "STORE_UNAVAILABLE",
                message: "the policy store failed; retry".to_owned(),
                retry_after: None,
            }
        }
    }
}

/// Unix milliseconds now.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Every rollout this replica follows, and the driver that moves them on.
pub struct Rollouts {
    store: Arc<dyn Store>,
    live: Mutex<HashMap<String, Arc<Live>>>,
    wake: Arc<Notify>,
    /// Where a finished transition asks for a new routing snapshot.
    changed: Mutex<Option<mpsc::Sender<Change>>>,
    /// Where the driver records its steps and rollbacks.
    auditor: Option<Auditor>,
}

impl Rollouts {
    /// Rollouts kept in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            live: Mutex::new(HashMap::new()),
            wake: Arc::new(Notify::new()),
            changed: Mutex::new(None),
            auditor: None,
        }
    }

    /// Records the driver's transitions (steps, completion, rollbacks) in `auditor`, as
    /// actor `rollout:POLICY`.
    pub fn with_auditor(mut self, auditor: Auditor) -> Self {
        self.auditor = Some(auditor);
        self
    }

    /// A transition that changes the snapshot (a rollback, a completion) sends
    /// [`Change::Rollout`] to `changes` (the admin service's change handler).
    pub fn notify_to(&self, changes: mpsc::Sender<Change>) {
        *self
            .changed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(changes);
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Live>>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, policy: &str) -> Option<Arc<Live>> {
        self.map().get(policy).cloned()
    }

    /// Reads every stored rollout and returns the splits of the running and paused ones
    /// whose policy is at the rollout's new version in `policies`.
    pub async fn sync(
        &self,
        policies: &std::collections::BTreeMap<String, PolicyRecord>,
    ) -> Result<Vec<RolloutSplit>, StoreError> {
        let rows = self.store.list_rollouts().await?;
        let mut splits = Vec::new();
        let mut map = self.map();
        let mut seen = std::collections::HashSet::new();
        for row in rows {
            let record = match RolloutRecord::decode(&row) {
                Ok(record) => record,
                Err(e) => {
                    tracing::error!(policy = %row.policy, error = %e, "skipping a rollout");
                    continue;
                }
            };
            seen.insert(row.policy.clone());
            let live = match map.get(&row.policy) {
                Some(live) => {
                    let mut inner = live.lock();
                    if row.version > inner.row_version {
                        let fresh = inner.record.canary_version != record.canary_version;
                        if fresh {
                            drop(inner);
                            let live = Arc::new(Live::new(record, row.version, self.wake.clone()));
                            map.insert(row.policy.clone(), live.clone());
                            live
                        } else {
                            // Another replica moved it on: follow.
                            if inner.record.step != record.step
                                || inner.record.state != record.state
                            {
                                inner.step_counts = Counts::default();
                                let elapsed = Duration::from_millis(
                                    u64::try_from((now_ms() - record.step_started_ms()).max(0))
                                        .unwrap_or(0),
                                );
                                inner.step_deadline = Instant::now()
                                    + record.spec.step_duration.saturating_sub(elapsed);
                            }
                            if inner.pending_rollback.is_none() {
                                live.share.store(record.share_ppm(), Ordering::Relaxed);
                            }
                            inner.record = record;
                            inner.row_version = row.version;
                            drop(inner);
                            live.clone()
                        }
                    } else {
                        drop(inner);
                        live.clone()
                    }
                }
                None => {
                    let live = Arc::new(Live::new(record, row.version, self.wake.clone()));
                    map.insert(row.policy.clone(), live.clone());
                    live
                }
            };
            let inner = live.lock();
            let current = policies
                .get(&row.policy)
                .filter(|p| p.source == PolicySource::Api)
                .map(|p| p.version);
            if inner.record.state.is_active()
                && current == Some(inner.record.canary_version)
                && let Some(baseline) = &inner.record.baseline
            {
                splits.push(RolloutSplit {
                    baseline: PolicyRecord {
                        spec: baseline.clone(),
                        version: inner.record.baseline_version,
                        created_ms: inner.record.started_ms,
                        updated_ms: inner.record.started_ms,
                        source: PolicySource::Api,
                    },
                    share_ppm: live.share.clone(),
                    sticky: inner.record.spec.sticky_key.clone(),
                    observer: live.clone(),
                });
            }
        }
        map.retain(|name, _| seen.contains(name));
        drop(map);
        self.wake.notify_one();
        Ok(splits)
    }

    /// Whether `policy` has a running or paused rollout (as stored).
    pub async fn active(&self, policy: &str) -> Result<Option<RolloutRecord>, StoreError> {
        let Some(row) = self.store.get_rollout(policy).await? else {
            return Ok(None);
        };
        let record = RolloutRecord::decode(&row)?;
        Ok(record.state.is_active().then_some(record))
    }

    /// The state of `policy`'s latest rollout that this replica knows.
    pub fn state_of(&self, policy: &str) -> Option<State> {
        self.get(policy).map(|l| l.lock().record.state)
    }

    /// The running or paused rollout spec of `policy`.
    pub fn active_spec(&self, policy: &str) -> Option<RolloutSpec> {
        self.get(policy).and_then(|l| {
            let inner = l.lock();
            inner
                .record
                .state
                .is_active()
                .then(|| inner.record.spec.clone())
        })
    }

    /// Stages `spec` as the new version of a policy now at `current`: stores the new
    /// version and the rollout in one transaction. The caller reloads the snapshot.
    pub async fn stage(
        &self,
        current: &PolicyRecord,
        spec: PolicySpec,
        rollout: RolloutSpec,
    ) -> Result<PolicyRecord, GatewayError> {
        let name = spec.name.clone();
        let previous = self.store.get_rollout(&name).await.map_err(store_failed)?;
        if let Some(row) = &previous {
            let record = RolloutRecord::decode(row).map_err(store_failed)?;
            if record.state.is_active() {
                return Err(in_progress(&record));
            }
        }
        let now = now_ms();
        let mut record = RolloutRecord {
            policy: name.clone(),
            spec: rollout,
            baseline: Some(current.spec.clone()),
            baseline_version: current.version,
            canary_version: current.version + 1,
            state: State::Running,
            step: 0,
            started_ms: now,
            ended_ms: None,
            history: Vec::new(),
            reason: String::new(),
        };
        record.start_step(now);
        let doc = record.encode().map_err(store_failed)?;
        let (_, policy) = self
            .store
            .put_rollout(
                &name,
                doc,
                previous.map_or(0, |r| r.version),
                Some((spec, current.version)),
            )
            .await
            .map_err(|e| match e {
                StoreError::Conflict { name, current } if current != record.baseline_version => {
                    GatewayError::Aborted(format!(
                        "policy `{name}` was changed concurrently; its current etag is v{current}: get it and retry"
                    ))
                }
                other => store_failed(other),
            })?;
        tracing::info!(policy = %name, steps = ?record.spec.steps, "rollout started");
        policy
            .ok_or_else(|| GatewayError::Internal("the staged policy was not returned".to_owned()))
    }

    /// GetRollout: the stored document with this replica's counts.
    pub async fn view(&self, policy: &str) -> Result<RolloutView, GatewayError> {
        let row = self
            .store
            .get_rollout(policy)
            .await
            .map_err(store_failed)?
            .ok_or_else(|| not_found(policy))?;
        let record = RolloutRecord::decode(&row).map_err(store_failed)?;
        if let Some(live) = self.get(policy) {
            let mut view = live.view();
            if view.record.canary_version == record.canary_version {
                view.record = record;
                return Ok(view);
            }
        }
        let (baseline_version, canary_version) = (record.baseline_version, record.canary_version);
        let empty = |version| ArmStats {
            version,
            counts: Counts::default(),
            p95: None,
        };
        Ok(RolloutView {
            record,
            baseline: empty(baseline_version),
            canary: empty(canary_version),
            error_evidence: 1.0,
            latency_evidence: 1.0,
        })
    }

    /// PauseRollout.
    pub async fn pause(&self, policy: &str) -> Result<RolloutView, GatewayError> {
        self.admin(policy, |record, counts, now| {
            if record.state != State::Running {
                return Err(precondition(format!(
                    "the rollout of policy `{policy}` is {}, not running",
                    state_name(record.state)
                )));
            }
            record.state = State::Paused;
            record.end_step("paused", counts, now);
            Ok(false)
        })
        .await
    }

    /// ResumeRollout: the current step starts again.
    pub async fn resume(&self, policy: &str) -> Result<RolloutView, GatewayError> {
        self.admin(policy, |record, _, now| {
            if record.state != State::Paused {
                return Err(precondition(format!(
                    "the rollout of policy `{policy}` is {}, not paused",
                    state_name(record.state)
                )));
            }
            record.state = State::Running;
            record.start_step(now);
            Ok(false)
        })
        .await
    }

    /// AbortRollout: like a rollback, with the admin's reason.
    pub async fn abort(&self, policy: &str, reason: &str) -> Result<RolloutView, GatewayError> {
        let reason = if reason.is_empty() {
            "aborted by an admin".to_owned()
        } else {
            format!("aborted by an admin: {reason}")
        };
        self.admin(policy, |record, counts, now| {
            if !record.state.is_active() {
                return Err(precondition(format!(
                    "the rollout of policy `{policy}` is {}, not running or paused",
                    state_name(record.state)
                )));
            }
            record.state = State::Aborted;
            record.end_step("aborted", counts, now);
            record.ended_ms = Some(now);
            record.reason.clone_from(&reason);
            Ok(true)
        })
        .await
    }

    /// An admin transition: `change` edits the document (returns whether the old version
    /// is restored as the policy); stored with compare-and-set.
    async fn admin(
        &self,
        policy: &str,
        change: impl FnOnce(&mut RolloutRecord, Counts, i64) -> Result<bool, GatewayError>,
    ) -> Result<RolloutView, GatewayError> {
        let row = self
            .store
            .get_rollout(policy)
            .await
            .map_err(store_failed)?
            .ok_or_else(|| not_found(policy))?;
        let mut record = RolloutRecord::decode(&row).map_err(store_failed)?;
        let live = self.get(policy);
        let counts = live
            .as_ref()
            .map_or(Counts::default(), |l| l.lock().step_counts);
        let restore = change(&mut record, counts, now_ms())?;
        if restore && let Some(l) = &live {
            l.share.store(0, Ordering::Relaxed);
        }
        self.write(&record, row.version, restore)
            .await
            .map_err(store_failed)?;
        self.changed(policy).await;
        self.view(policy).await
    }

    /// Stores `record` over row version `expected`; with `restore`, the old version becomes
    /// the policy again in the same transaction. Updates the live state on success.
    async fn write(
        &self,
        record: &RolloutRecord,
        expected: u64,
        restore: bool,
    ) -> Result<(), StoreError> {
        let replace = match (&record.baseline, restore) {
            (Some(baseline), true) => Some((baseline.clone(), record.canary_version)),
            _ => None,
        };
        let (version, _) = self
            .store
            .put_rollout(&record.policy, record.encode()?, expected, replace)
            .await?;
        if let Some(live) = self.get(&record.policy) {
            let mut inner = live.lock();
            if inner.record.canary_version == record.canary_version {
                if inner.record.step != record.step || record.state == State::Running {
                    inner.step_counts = Counts::default();
                    inner.step_deadline = Instant::now() + record.spec.step_duration;
                }
                inner.record = record.clone();
                inner.row_version = version;
                if !record.state.is_active() {
                    inner.pending_rollback = None;
                }
                if inner.pending_rollback.is_none() {
                    live.share.store(record.share_ppm(), Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    async fn changed(&self, policy: &str) {
        let tx = self
            .changed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(tx) = tx {
            let _ = tx
                .send(Change::Rollout {
                    policy: policy.to_owned(),
                })
                .await;
        }
    }

    /// Runs what is due now: stores rollbacks the test decided, advances steps whose time
    /// is up and that have their calls. Returns when it has nothing left to do.
    pub async fn tick(&self) {
        let lives: Vec<(String, Arc<Live>)> = self
            .map()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let now = Instant::now();
        for (policy, live) in lives {
            let Some(action) = live.due(now) else {
                continue;
            };
            let (mut record, row_version, counts) = {
                let inner = live.lock();
                (inner.record.clone(), inner.row_version, inner.step_counts)
            };
            let now_ms = now_ms();
            let restore = match action {
                Action::Rollback(reason) => {
                    record.state = State::RolledBack;
                    record.end_step("rolled_back", counts, now_ms);
                    record.ended_ms = Some(now_ms);
                    record.reason = reason;
                    true
                }
                Action::Advance => {
                    if record.step as usize + 1 >= record.spec.steps.len() {
                        record.end_step("completed", counts, now_ms);
                        record.state = State::Completed;
                        record.ended_ms = Some(now_ms);
                        record.baseline = None;
                    } else {
                        record.end_step("advanced", counts, now_ms);
                        record.step += 1;
                        record.start_step(now_ms);
                    }
                    false
                }
            };
            match self.write(&record, row_version, restore).await {
                Ok(()) => {
                    tracing::info!(policy = %policy, state = state_name(record.state), step = record.step, percent = record.percent(), "rollout moved on");
                    self.audit(&record, counts).await;
                    if !record.state.is_active() {
                        self.changed(&policy).await;
                    }
                }
                Err(StoreError::Conflict { .. }) => {
                    // Another replica moved it first: follow the store.
                    self.changed(&policy).await;
                }
                Err(e) => {
                    tracing::warn!(policy = %policy, error = %e, "rollout: cannot store a transition; retrying");
                }
            }
        }
    }

    /// Records a transition the driver made.
    async fn audit(&self, record: &RolloutRecord, counts: Counts) {
        let Some(auditor) = &self.auditor else {
            return;
        };
        let canary = format!("v{}", record.canary_version);
        let (action, before, after, detail) = match record.state {
            State::RolledBack => (
                "RolloutRollback",
                canary,
                format!("v{}", record.canary_version + 1),
                format!(
                    "rolled back to the content of v{}: {}",
                    record.baseline_version, record.reason
                ),
            ),
            State::Completed => (
                "RolloutComplete",
                canary.clone(),
                canary,
                format!(
                    "v{} serves every call; v{} dropped; last step: {} new-version calls, {} errors",
                    record.canary_version, record.baseline_version, counts.calls, counts.errors
                ),
            ),
            _ => (
                "RolloutStep",
                canary.clone(),
                canary,
                format!(
                    "step {} -> {} ({}%); the step before: {} new-version calls, {} errors",
                    record.step.saturating_sub(1),
                    record.step,
                    record.percent(),
                    counts.calls,
                    counts.errors
                ),
            ),
        };
        let entry = crate::audit::Entry::new(
            format!("rollout:{}", record.policy),
            action,
            "policy",
            &record.policy,
        )
        .with_etags(before, after)
        .with_detail(detail);
        let _ = auditor.record(entry).await;
    }

    /// The earliest step end among running rollouts.
    /// A step whose time is up but that still lacks calls is woken by its calls instead.
    fn next_deadline(&self) -> Option<Instant> {
        let now = Instant::now();
        self.map()
            .values()
            .filter_map(|l| {
                let inner = l.lock();
                (inner.record.state == State::Running && inner.step_deadline > now)
                    .then_some(inner.step_deadline)
            })
            .min()
    }

    /// Moves rollouts on until `stop`: wakes at step ends, on harm, and on changes.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let deadline = self.next_deadline();
            // A failed store write is retried a second later.
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.max(Instant::now())).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.wake.notified() => {}
                () = sleep => {}
            }
            self.tick().await;
            if self.map().values().any(|l| l.due(Instant::now()).is_some()) {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

fn in_progress(record: &RolloutRecord) -> GatewayError {
    precondition(format!(
        "policy `{}` has a rollout in progress ({}, step {} of {} at {}%); wait for it to end or call AbortRollout",
        record.policy,
        state_name(record.state),
        record.step + 1,
        record.spec.steps.len(),
        record.percent()
    ))
}

/// Refuses a plain update or delete of a policy whose rollout is running or paused.
pub async fn refuse_during_rollout(rollouts: &Rollouts, policy: &str) -> Result<(), GatewayError> {
    match rollouts.active(policy).await.map_err(store_failed)? {
        Some(record) => Err(in_progress(&record)),
        None => Ok(()),
    }
}

/// The lowercase name of a state.
pub fn state_name(state: State) -> &'static str {
    match state {
        State::Running => "running",
        State::Paused => "paused",
        State::Completed => "completed",
        State::RolledBack => "rolled back",
        State::Aborted => "aborted",
    }
}
