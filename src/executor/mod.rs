//! The executor runs a [`Plan`] within the call's deadline: deadline-aware fallback, hedged
//! requests, retries with backoff, and for streams the commit point (the first content chunk)
//! after which the call is bound to one upstream.
//!
//! # How a call runs
//! - The budget is the smallest of the caller's deadline, the policy's `total_timeout` and the
//!   server's maximum. Every attempt gets at most what remains (and at most the policy's
//!   `attempt_timeout`). When the budget runs out the call ends with DEADLINE_EXCEEDED at once.
//! - Attempts go down the plan's targets in order; once every target had a turn, further
//!   attempts (up to `max_attempts`) retry them, after an exponential backoff with jitter.
//!   Only retryable errors lead to another attempt; a `CONTEXT_LENGTH_EXCEEDED` moves on to a
//!   target with a larger context window when the policy allows it.
//! - Deadline-aware fallback (policy `reserve_percentile`, default 99, and `reserve_default`,
//!   default 500 ms): while a later target of the plan's first round could still be tried,
//!   an attempt ends early enough to leave the next such target (admitted by health) the
//!   time it is expected to need: that percentile of its observed latency (time to first
//!   token for streams), `reserve_default` while it has fewer than 20 observations, never
//!   less than its median or `min_attempt_time`. When the budget cannot hold both that and
//!   `min_attempt_time` for the attempt, nothing is reserved. An attempt cut off this way
//!   fails with TIMEOUT and counts against its target's health, so a hanging target's
//!   circuit opens.
//! - Before a fallback or hedge starts, the time left is compared with what the target
//!   typically needs (its observed median latency, or time to first token for streams, and at
//!   least `min_attempt_time`): a target that cannot answer in time is skipped, and the skip
//!   is recorded in the route (a target an earlier attempt left time for is not).
//! - Attempt kinds in the route: the plan's first target is the primary (also when skipped),
//!   the rest of the first round are fallbacks, later rounds retries, parallel ones hedges.
//! - Latency statistics: an attempt cancelled (a hedge won, the call ended) or timed out is
//!   recorded as a censored observation, its latency at least the time it ran (see
//!   `health`), so percentile hedge delays and reserves are not biased low.
//! - A target resting after a rate limit (its Retry-After) or with an open circuit is
//!   skipped; other targets carry on.
//! - Pacing ([`crate::pacing`]): an admitted target's provider account gives the attempt
//!   its capacity (requests, the request's estimated tokens, a concurrency slot). When the
//!   capacity arrives later, the attempt waits for it only if it can still start by the
//!   deadline less what the target typically needs (as for a fallback); otherwise the
//!   target is skipped at once (`NO_CAPACITY`, `CONCURRENCY_LIMIT`) and the next one tried.
//! - Hedging: when the newest attempt has not answered after the hedge delay (fixed, or a
//!   percentile of the target's observed latency), the next target starts in parallel. The
//!   first success wins and the others are dropped at once, which closes their HTTP requests.
//!   A global token bucket bounds hedges to a share of upstream requests, and hedging pauses
//!   while upstream failures are high, so it never amplifies an overload.
//!
//! Dropping the future of a call (the caller cancelled) drops every attempt.

mod embed;
mod stream;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::{FutureExt, StreamExt, future::BoxFuture, stream::FuturesUnordered};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use self::embed::{EmbedAnswer, embedding_plan};
pub use self::stream::{CallEvent, CallStream};
use crate::{
    error::GatewayError,
    health::{Admission, AttemptGuard, AttemptResult},
    models::Cost,
    providers::{ErrorClass, EventStream, ProviderError},
    routing::{Plan, Target, policy::Hedging},
    settings::Issues,
    telemetry::{TRACE_CONTEXT, TargetMetrics, TraceContext, names},
    types::{
        AttemptKind, AttemptOutcome, AttemptRecord, ChatRequest, ChatResponse, Route, StreamEvent,
        Usage,
    },
};

/// Settings of the executor (`[executor]`, and `upstream.stream_idle_timeout`).
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutorSettings {
    /// A stream that sends nothing for this long is broken.
    pub stream_idle_timeout: Duration,
    /// The least time a fallback or hedge must have left to start.
    pub min_attempt_time: Duration,
    /// Hedges may add at most this share of upstream requests (token bucket refill per
    /// non-hedge attempt).
    pub hedge_budget_ratio: f64,
    /// Hedge tokens that can be saved up.
    pub hedge_budget_burst: f64,
    /// Hedging pauses while the recent upstream failure rate is above this.
    pub hedge_pause_error_rate: f64,
}

impl Default for ExecutorSettings {
    fn default() -> Self {
        Self {
            stream_idle_timeout: Duration::from_secs(60),
            min_attempt_time: Duration::from_millis(50),
            hedge_budget_ratio: 0.1,
            hedge_budget_burst: 10.0,
            hedge_pause_error_rate: 0.5,
        }
    }
}

/// `[executor]` as written in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExecutor {
    /// `executor.min_attempt_time`.
    pub min_attempt_time: Option<String>,
    /// `executor.hedge_budget_ratio`.
    pub hedge_budget_ratio: Option<f64>,
    /// `executor.hedge_budget_burst`.
    pub hedge_budget_burst: Option<f64>,
    /// `executor.hedge_pause_error_rate`.
    pub hedge_pause_error_rate: Option<f64>,
}

impl ExecutorSettings {
    /// Validates `[executor]`; unset fields keep their defaults. The stream idle timeout is
    /// `upstream.stream_idle_timeout`, set by the config loader.
    pub fn from_raw(raw: RawExecutor, issues: &mut Issues) -> Self {
        let ed = ExecutorSettings::default();
        let mut share = |field: &str, value: Option<f64>, default: f64, max: f64| match value {
            Some(v) if !(0.0..=max).contains(&v) => {
                issues.push(field, format!("must be between 0 and {max}"));
                default
            }
            Some(v) => v,
            None => default,
        };
        let hedge_budget_ratio = share(
            "executor.hedge_budget_ratio",
            raw.hedge_budget_ratio,
            ed.hedge_budget_ratio,
            1.0,
        );
        let hedge_budget_burst = share(
            "executor.hedge_budget_burst",
            raw.hedge_budget_burst,
            ed.hedge_budget_burst,
            10_000.0,
        );
        let hedge_pause_error_rate = share(
            "executor.hedge_pause_error_rate",
            raw.hedge_pause_error_rate,
            ed.hedge_pause_error_rate,
            1.0,
        );
        ExecutorSettings {
            min_attempt_time: issues.duration_or_zero(
                "executor.min_attempt_time",
                raw.min_attempt_time.as_deref(),
                ed.min_attempt_time,
            ),
            hedge_budget_ratio,
            hedge_budget_burst,
            hedge_pause_error_rate,
            ..ed
        }
    }
}

/// Samples needed before an adaptive hedge delay or a reserve is trusted.
const HEDGE_MIN_SAMPLES: usize = crate::health::MIN_SAMPLES;

/// The global hedging budget: a token bucket filled by ordinary attempts and drained by
/// hedges, plus a failure-rate brake. Lock-free: both values are `f64`s in atomics, updated
/// with compare-and-swap.
#[derive(Debug)]
pub struct HedgeBudget {
    ratio: f64,
    burst: f64,
    pause_error_rate: f64,
    tokens: AtomicF64,
    failure_rate: AtomicF64,
}

/// An `f64` in an `AtomicU64`.
#[derive(Debug)]
struct AtomicF64(AtomicU64);

impl AtomicF64 {
    fn new(v: f64) -> Self {
        Self(AtomicU64::new(v.to_bits()))
    }

    fn load(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }

    /// Applies `f` atomically; `f` returning `None` leaves the value. Returns whether it
    /// changed.
    fn update(&self, mut f: impl FnMut(f64) -> Option<f64>) -> bool {
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                f(f64::from_bits(bits)).map(f64::to_bits)
            })
            .is_ok()
    }
}

impl HedgeBudget {
    /// A budget from the settings; it starts full.
    pub fn new(settings: &ExecutorSettings) -> Self {
        Self {
            ratio: settings.hedge_budget_ratio.max(0.0),
            burst: settings.hedge_budget_burst.max(1.0),
            pause_error_rate: settings.hedge_pause_error_rate,
            tokens: AtomicF64::new(settings.hedge_budget_burst.max(1.0)),
            failure_rate: AtomicF64::new(0.0),
        }
    }

    /// An ordinary (non-hedge) attempt started.
    fn deposit(&self) {
        // A full bucket stays as it is without a write.
        self.tokens
            .update(|t| (t < self.burst).then(|| (t + self.ratio).min(self.burst)));
    }

    /// Takes a token for a hedge, if the budget and the failure rate allow.
    fn try_withdraw(&self) -> bool {
        if self.failure_rate.load() > self.pause_error_rate {
            return false;
        }
        self.tokens.update(|t| (t >= 1.0).then_some(t - 1.0))
    }

    /// An attempt ended: tracks the recent failure rate (an exponential moving average).
    fn observe(&self, failed: bool) {
        // Without failures the average decays towards zero; once it is negligible, it is
        // left alone (no write to the shared cache line on every success).
        self.failure_rate.update(|r| {
            let next = r * 0.9 + if failed { 0.1 } else { 0.0 };
            (failed || r > 1e-6).then_some(if failed || next > 1e-6 { next } else { 0.0 })
        });
    }
}

/// Runs plans.
#[derive(Debug, Clone)]
pub struct Executor {
    settings: ExecutorSettings,
    budget: Arc<HedgeBudget>,
    /// Cancelled when the shutdown grace period is over: calls still running end with
    /// UNAVAILABLE.
    hard_stop: CancellationToken,
}

/// A successful unary call.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The provider's answer.
    pub response: ChatResponse,
    /// The configured provider that answered.
    pub provider: String,
    /// The cost, when the model has prices.
    pub cost: Option<Cost>,
    /// The route taken.
    pub route: Route,
    /// The metric handles of the target that answered (`None` when no target did, e.g. an
    /// answer from a cache).
    pub metrics: Option<Arc<TargetMetrics>>,
    /// The external guardrail checks of the call (set by the server's guard stage).
    pub guardrails: crate::types::GuardVerdicts,
}

/// The cost of `usage` on `target`, when both are known.
pub fn cost_of(target: &Target, usage: Option<&Usage>) -> Option<Cost> {
    let prices = target.info.as_ref()?.prices?;
    Some(prices.cost(usage?))
}

fn shutting_down() -> GatewayError {
    GatewayError::Unavailable {
        reason: "SHUTTING_DOWN",
        message: "the gateway is shutting down; retry on another instance".to_owned(),
        retry_after: None,
    }
}

/// What an upstream error says about the target's health.
fn health_result(err: &ProviderError, latency: Duration) -> AttemptResult {
    match err.class {
        ErrorClass::RateLimited | ErrorClass::Overloaded => AttemptResult::RateLimited {
            rest: err.retry_after.unwrap_or(DEFAULT_REST),
        },
        ErrorClass::ServerError
        | ErrorClass::Timeout
        | ErrorClass::Connect
        | ErrorClass::StreamBroken
        | ErrorClass::InvalidResponse
        | ErrorClass::Authentication
        | ErrorClass::Permission => AttemptResult::Failure { latency },
        // The request's own fault: says nothing about the target.
        ErrorClass::InvalidRequest
        | ErrorClass::ContextLengthExceeded
        | ErrorClass::ContentFiltered
        | ErrorClass::ModelNotFound => AttemptResult::Neutral,
        // The gateway's own shortage (e.g. out of descriptors): not the target's fault.
        ErrorClass::LocalResource => AttemptResult::Neutral,
    }
}

/// How long a target rests after a rate limit or overload that named no Retry-After.
const DEFAULT_REST: Duration = Duration::from_secs(1);

/// The route's reason code for a target health did not admit.
fn skip_reason(admission: Admission) -> &'static str {
    match admission {
        Admission::CoolingDown(_) => "COOLING_DOWN",
        Admission::Allowed | Admission::Probe | Admission::CircuitOpen => "CIRCUIT_OPEN",
    }
}

/// Whether an attempt answers a unary call or opens a stream (for timing statistics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Unary,
    Stream,
}

/// The winner of a race.
struct Won<T> {
    value: T,
    target: Target,
    kind: AttemptKind,
    guard: AttemptGuard,
    started: Instant,
    /// Index of the winner's record in `route.attempts`.
    slot: usize,
    route: Route,
    call_started: Instant,
}

type AttemptFuture<'a, T> = BoxFuture<'a, (usize, Result<T, ProviderError>)>;

struct Running {
    target: Target,
    kind: AttemptKind,
    started: Instant,
    guard: Option<AttemptGuard>,
    slot: usize,
}

/// The state of one call's attempts.
struct Race<'p> {
    plan: &'p Plan,
    mode: Mode,
    call_started: Instant,
    deadline: Instant,
    route: Route,
    /// Next index into the attempt sequence (targets, then retry rounds).
    next: usize,
    started: u32,
    hedges: u32,
    running: Vec<Option<Running>>,
    last_error: Option<ProviderError>,
    all_rate_limited: bool,
    /// After a context-length error: only targets with a larger window qualify.
    min_context: Option<u32>,
    /// A target was skipped because the deadline was too close.
    deadline_skipped: bool,
    /// The plan's first target was tried or skipped: later ones are fallbacks.
    primary_taken: bool,
    /// Index (into the attempt sequence) of the target the running attempts left time for.
    reserved_for: Option<usize>,
    /// The request's estimated tokens (input and output), for pacing.
    tokens: u64,
    /// The pacing lease of the target `pick` just returned.
    lease: Option<crate::pacing::Lease>,
    /// The earliest time a target skipped by pacing has capacity again.
    paced_until: Option<Instant>,
}

impl<'p> Race<'p> {
    fn new(plan: &'p Plan, mode: Mode, deadline: Instant) -> Self {
        let call_started = Instant::now();
        let deadline = match plan.execution.total_timeout {
            Some(total) => deadline.min(call_started + total),
            None => deadline,
        };
        let mut race = Race {
            plan,
            mode,
            call_started,
            deadline,
            route: Route {
                policy: plan.policy.clone(),
                attempts: Vec::with_capacity(plan.targets.len() + plan.skipped.len()),
                revision: plan.revision,
                arm: plan.arm.as_ref().map(|a| a.arm.clone()),
                ..Route::default()
            },
            next: 0,
            started: 0,
            hedges: 0,
            running: Vec::new(),
            last_error: None,
            all_rate_limited: true,
            min_context: None,
            deadline_skipped: false,
            primary_taken: false,
            reserved_for: None,
            tokens: 0,
            lease: None,
            paced_until: None,
        };
        for skipped in &plan.skipped {
            // A target set aside ahead of every target in the plan was the primary.
            let kind = if skipped.first && !race.primary_taken {
                AttemptKind::Primary
            } else {
                AttemptKind::Fallback
            };
            race.primary_taken |= skipped.first;
            race.skip(&skipped.target, kind, skipped.reason);
        }
        race
    }

    fn skip(&mut self, target: &Target, kind: AttemptKind, reason: &'static str) {
        if reason == "DEADLINE" {
            self.plan.counters.deadline_skips().increment(1);
        }
        self.route.attempts.push(AttemptRecord {
            provider: target.provider.name().to_owned(),
            model: target.model.to_string(),
            kind,
            outcome: AttemptOutcome::Skipped(reason),
            start_offset: self.call_started.elapsed(),
            latency: Duration::ZERO,
            time_to_first_token: None,
        });
    }

    /// What a target typically needs to answer (or to send its first token).
    fn needs(&self, target: &Target, floor: Duration) -> Duration {
        let typical = match self.mode {
            Mode::Stream => target.health.typical_latency(),
            Mode::Unary => target.health.latency_percentile(50.0, 1),
        };
        typical.map_or(floor, |t| t.max(floor))
    }

    /// Whether a context-length error ruled `target` out.
    fn too_small(&self, target: &Target) -> bool {
        self.min_context.is_some_and(|min| {
            target
                .info
                .as_ref()
                .and_then(|i| i.context_window)
                .is_none_or(|w| w <= min)
        })
    }

    /// Picks the next target to start (a hedge, or the next of the attempt sequence), with
    /// the kind of its attempt, recording skips. `None` when no attempt is left.
    fn pick(
        &mut self,
        hedge: bool,
        floor: Duration,
    ) -> Option<(Target, AttemptGuard, AttemptKind)> {
        let targets = &self.plan.targets;
        if targets.is_empty() {
            return None;
        }
        let max = self.plan.execution.max_attempts;
        // Each index is considered once; a full round of skips ends the search.
        let mut considered = 0;
        while self.started < max && considered < targets.len() * 2 {
            let index = self.next;
            let target = targets[index % targets.len()].clone();
            self.next += 1;
            considered += 1;
            if self.too_small(&target) {
                continue;
            }
            let kind = if hedge {
                AttemptKind::Hedge
            } else if index >= targets.len() {
                AttemptKind::Retry
            } else if !self.primary_taken {
                AttemptKind::Primary
            } else {
                AttemptKind::Fallback
            };
            self.primary_taken = true;
            let now = Instant::now();
            let remaining = self.deadline.saturating_duration_since(now);
            // The first attempt always starts; a later one only with time to answer, unless
            // an earlier attempt ended early to leave it that time.
            if self.started > 0
                && self.reserved_for != Some(index)
                && remaining < self.needs(&target, floor)
            {
                self.skip(&target, kind, "DEADLINE");
                self.deadline_skipped = true;
                continue;
            }
            match AttemptGuard::admit(&target.health, now) {
                Ok(guard) => match self.pace(&target, now, floor) {
                    Ok(()) => return Some((target, guard, kind)),
                    Err(reason) => {
                        guard.finish(AttemptResult::Neutral);
                        self.skip(&target, kind, reason);
                    }
                },
                Err(admission) => self.skip(&target, kind, skip_reason(admission)),
            }
        }
        None
    }

    /// Takes pacing capacity for an attempt on `target` (into `self.lease`): it may wait for
    /// it only as long as it can still start by the deadline less what the target needs.
    fn pace(&mut self, target: &Target, now: Instant, floor: Duration) -> Result<(), &'static str> {
        self.lease = None;
        let Some(ring) = target.provider.keys() else {
            return Ok(());
        };
        let latest = self
            .deadline
            .checked_sub(self.needs(target, floor))
            .unwrap_or(now)
            .max(now);
        match ring.pace(&target.model, self.tokens, now, latest) {
            None => Ok(()),
            Some(crate::pacing::Admit::Go(lease)) => {
                self.lease = Some(lease);
                Ok(())
            }
            Some(crate::pacing::Admit::Skip { reason, ready_at }) => {
                let ready = ready_at.unwrap_or(now + DEFAULT_REST);
                self.paced_until = Some(self.paced_until.map_or(ready, |p| p.min(ready)));
                Err(reason)
            }
        }
    }

    /// The time the attempt about to start must leave free before the deadline, for the next
    /// target of the plan's first round that could be tried after it (deadline-aware
    /// fallback; see the module docs). `None` when it is the last such attempt, or the rule
    /// is off.
    fn reserve(&mut self, floor: Duration) -> Option<Duration> {
        self.reserved_for = None;
        let reserve = self.plan.execution.reserve?;
        let targets = &self.plan.targets;
        if self.started + 1 >= self.plan.execution.max_attempts || self.next >= targets.len() {
            return None;
        }
        let now = Instant::now();
        let (index, target) = targets
            .iter()
            .enumerate()
            .skip(self.next)
            .find(|(_, t)| !self.too_small(t) && t.health.peek(now).is_allowed())?;
        let observed = match self.mode {
            Mode::Unary => target
                .health
                .latency_percentile(reserve.percentile, HEDGE_MIN_SAMPLES),
            Mode::Stream => target
                .health
                .ttft_percentile(reserve.percentile, HEDGE_MIN_SAMPLES),
        };
        // Never less than what `pick` asks of it, so that it is not skipped for lack of time.
        let need = observed
            .unwrap_or(reserve.default)
            .max(self.needs(target, floor));
        self.reserved_for = Some(index);
        Some(need)
    }

    /// Whether the next pick would be a retry of a target already tried.
    fn is_retry_round(&self) -> bool {
        self.next >= self.plan.targets.len()
    }

    fn begin(&mut self, target: Target, guard: AttemptGuard, kind: AttemptKind) -> usize {
        let started = Instant::now();
        self.started += 1;
        match kind {
            AttemptKind::Hedge => {
                self.hedges += 1;
                self.plan.counters.hedges_started().increment(1);
            }
            AttemptKind::Fallback => {
                self.plan.counters.fallbacks().increment(1);
            }
            AttemptKind::Primary | AttemptKind::Retry => {}
        }
        let slot = self.route.attempts.len();
        self.route.attempts.push(AttemptRecord {
            provider: target.provider.name().to_owned(),
            model: target.model.to_string(),
            kind,
            outcome: AttemptOutcome::Cancelled,
            start_offset: started.duration_since(self.call_started),
            latency: Duration::ZERO,
            time_to_first_token: None,
        });
        let id = self.running.len();
        self.running.push(Some(Running {
            target,
            kind,
            started,
            guard: Some(guard),
            slot,
        }));
        id
    }

    /// Closes an attempt's record.
    fn close(&mut self, id: usize, outcome: AttemptOutcome) -> Option<Running> {
        let running = self.running.get_mut(id)?.take()?;
        let latency = running.started.elapsed();
        if let Some(record) = self.route.attempts.get_mut(running.slot) {
            record.outcome = outcome;
            record.latency = latency;
            let committed_stream =
                self.mode == Mode::Stream && record.outcome == AttemptOutcome::Succeeded;
            if committed_stream {
                record.time_to_first_token = Some(latency);
            } else {
                // A committed stream is counted when it ends.
                observe_attempt(record, &running.target.metrics);
            }
        }
        Some(running)
    }

    /// Marks every still-running attempt cancelled (their futures are dropped by the caller).
    /// Each ran for a while without an answer: a censored latency observation.
    fn cancel_all(&mut self) {
        let now = Instant::now();
        let stream = self.mode == Mode::Stream;
        for mut running in self.running.iter_mut().filter_map(Option::take) {
            if let Some(guard) = running.guard.take() {
                guard.censor(now.duration_since(running.started), stream);
            }
            if let Some(record) = self.route.attempts.get_mut(running.slot) {
                record.outcome = AttemptOutcome::Cancelled;
                record.latency = now.duration_since(running.started);
                observe_attempt(record, &running.target.metrics);
            }
        }
    }

    fn running_count(&self) -> usize {
        self.running.iter().filter(|r| r.is_some()).count()
    }

    fn exhausted(mut self) -> GatewayError {
        self.cancel_all();
        match self.last_error {
            Some(error) => GatewayError::Upstream {
                error,
                all_rate_limited: self.all_rate_limited,
                route: self.route,
            },
            None if self.paced_until.is_some() => GatewayError::Unavailable {
                reason: "RATE_LIMITED",
                message: "no upstream target has rate-limit capacity within the deadline"
                    .to_owned(),
                retry_after: self
                    .paced_until
                    .map(|at| at.saturating_duration_since(Instant::now())),
            },
            None => GatewayError::Unavailable {
                reason: "NO_TARGET",
                message: "no upstream target could be tried within the deadline and limits"
                    .to_owned(),
                retry_after: None,
            },
        }
    }

    fn deadline_exceeded(mut self) -> GatewayError {
        self.cancel_all();
        GatewayError::DeadlineExceeded { route: self.route }
    }
}

/// Counts a finished upstream attempt of the target with `metrics`.
pub(crate) fn observe_attempt(record: &AttemptRecord, metrics: &TargetMetrics) {
    let (outcome, error_class) = match &record.outcome {
        AttemptOutcome::Succeeded => ("succeeded", ""),
        AttemptOutcome::Failed(reason) => ("failed", *reason),
        AttemptOutcome::Cancelled => ("cancelled", ""),
        AttemptOutcome::Skipped(reason) => ("skipped", *reason),
    };
    if error_class.is_empty()
        && let Some((attempts, duration)) = metrics.attempt(record.kind, outcome)
    {
        attempts.increment(1);
        duration.record(record.latency.as_secs_f64());
        return;
    }
    static HANDLES: std::sync::LazyLock<
        crate::telemetry::HandleCache<(metrics::Counter, metrics::Histogram)>,
    > = std::sync::LazyLock::new(Default::default);
    let (outcome, error_class) = match &record.outcome {
        AttemptOutcome::Succeeded => ("succeeded", ""),
        AttemptOutcome::Failed(reason) => ("failed", *reason),
        AttemptOutcome::Cancelled => ("cancelled", ""),
        AttemptOutcome::Skipped(reason) => ("skipped", *reason),
    };
    let key = format!(
        "{}\u{1f}{}\u{1f}{}\u{1f}{outcome}\u{1f}{error_class}",
        record.provider,
        record.model,
        record.kind.label()
    );
    let (attempts, duration) = HANDLES.get(&key, || {
        (
            metrics::counter!(
                names::ATTEMPTS,
                "provider" => record.provider.clone(),
                "model" => record.model.clone(),
                "kind" => record.kind.label(),
                "outcome" => outcome,
                "error_class" => error_class
            ),
            metrics::histogram!(
                names::ATTEMPT_DURATION,
                "provider" => record.provider.clone(),
                "model" => record.model.clone(),
                "outcome" => outcome
            ),
        )
    });
    attempts.increment(1);
    duration.record(record.latency.as_secs_f64());
}

/// Exponential backoff with full jitter for retry round `round` (1 = first retry).
fn backoff(round: usize, (initial, max, multiplier): (Duration, Duration, f64)) -> Duration {
    let exp = multiplier.powi(i32::try_from(round.saturating_sub(1)).unwrap_or(i32::MAX));
    let ceiling = (initial.as_secs_f64() * exp).min(max.as_secs_f64());
    Duration::from_secs_f64(ceiling * (0.5 + fastrand::f64() * 0.5))
}

impl Executor {
    /// An executor.
    pub fn new(settings: ExecutorSettings, hard_stop: CancellationToken) -> Self {
        Self {
            budget: Arc::new(HedgeBudget::new(&settings)),
            settings,
            hard_stop,
        }
    }

    /// The hedge delay for the attempt `target` just started, if another hedge may follow.
    fn hedge_delay(&self, race: &Race<'_>, target: &Target) -> Option<Duration> {
        // The cheap checks first: a one-target plan (every concrete model) never hedges,
        // and reading a percentile is a pass over the target's histogram.
        if race.plan.targets.len() < 2 {
            return None;
        }
        match race.plan.execution.hedging {
            Hedging::Off => None,
            Hedging::Fixed { delay, max_extra } => (race.hedges < max_extra).then_some(delay),
            Hedging::Percentile {
                percentile,
                fallback_delay,
                max_extra,
            } => {
                if race.hedges >= max_extra {
                    return None;
                }
                let observed = match race.mode {
                    Mode::Unary => target
                        .health
                        .latency_percentile(percentile, HEDGE_MIN_SAMPLES),
                    Mode::Stream => target.health.ttft_percentile(percentile, HEDGE_MIN_SAMPLES),
                };
                Some(observed.unwrap_or(fallback_delay))
            }
        }
    }

    /// Runs the race: returns the first success, or the call's error.
    async fn race<'a, T, F, Fut>(
        &self,
        plan: &'a Plan,
        mode: Mode,
        deadline: Instant,
        trace: Option<&TraceContext>,
        tokens: u64,
        attempt: &F,
    ) -> Result<Won<T>, GatewayError>
    where
        T: Send + 'a,
        F: Fn(Target, Instant) -> Fut + Sync,
        Fut: std::future::Future<Output = Result<T, ProviderError>> + Send + 'a,
    {
        let mut race = Race::new(plan, mode, deadline);
        race.tokens = tokens;
        let deadline = race.deadline;
        let floor = self.settings.min_attempt_time;
        let attempt_timeout = plan.execution.attempt_timeout;
        let mut in_flight: FuturesUnordered<AttemptFuture<'a, T>> = FuturesUnordered::new();
        // One timer, re-armed for every hedge; idle (far in the future) while unarmed.
        let hedge_sleep = tokio::time::sleep_until(deadline);
        tokio::pin!(hedge_sleep);
        let mut hedge_armed = false;
        let start = |race: &mut Race<'_>,
                     in_flight: &mut FuturesUnordered<AttemptFuture<'a, T>>,
                     target: Target,
                     guard: AttemptGuard,
                     kind: AttemptKind| {
            let now = Instant::now();
            let mut attempt_deadline = match attempt_timeout {
                Some(t) => deadline.min(now + t),
                None => deadline,
            };
            // Leave the next target its time, when that leaves this one its minimum.
            let mut early = false;
            match race.reserve(floor) {
                Some(reserve)
                    if deadline
                        .checked_sub(reserve)
                        .is_some_and(|end| end >= now + floor) =>
                {
                    let end = deadline - reserve;
                    early = end < attempt_deadline;
                    attempt_deadline = attempt_deadline.min(end);
                }
                Some(_) => race.reserved_for = None,
                None => {}
            }
            let lease = race.lease.take();
            let id = race.begin(target.clone(), guard, kind);
            // An attempt that waits for pacing capacity starts its clock when it goes out.
            if let Some((lease, Some(running))) = lease.as_ref().zip(race.running.get_mut(id)) {
                running.started = running.started.max(lease.start_at);
            }
            let span = tracing::info_span!(
                "attempt",
                provider = target.provider.name(),
                model = &*target.model,
                kind = kind.label(),
                policy = race.plan.policy.as_deref().unwrap_or(""),
            );
            let fut = crate::pacing::run(lease, attempt(target, attempt_deadline), |_| {
                ProviderError::new(
                    ErrorClass::LocalResource,
                    "no shared rate-limit capacity for this account within the deadline",
                )
            });
            let trace = trace.cloned();
            // One boxed future and one timer per attempt.
            in_flight.push(
                async move {
                    let timed = tokio::time::timeout_at(attempt_deadline, fut);
                    let result = match trace {
                        Some(ctx) => TRACE_CONTEXT.scope(ctx, timed).await,
                        None => timed.await,
                    };
                    let result = match result {
                        Ok(r) => r,
                        Err(_) if early => Err(ProviderError::new(
                            ErrorClass::Timeout,
                            "the attempt ended early to leave the next target time before the deadline",
                        )),
                        Err(_) => Err(ProviderError::new(
                            ErrorClass::Timeout,
                            "the attempt reached its timeout",
                        )),
                    };
                    (id, result)
                }
                .instrument(span)
                .boxed(),
            );
        };

        let deadline_sleep = tokio::time::sleep_until(deadline);
        tokio::pin!(deadline_sleep);
        loop {
            // Keep an attempt running: the primary, a fallback, or a retry after backoff.
            if in_flight.is_empty() {
                if race.started > 0 && race.is_retry_round() {
                    let round = race.next / plan.targets.len().max(1);
                    let pause = backoff(round, plan.execution.backoff);
                    if Instant::now() + pause >= deadline {
                        return Err(race.exhausted());
                    }
                    tokio::select! {
                        biased;
                        () = self.hard_stop.cancelled() => return Err(shutting_down()),
                        () = tokio::time::sleep(pause) => {}
                    }
                }
                let Some((target, guard, kind)) = race.pick(false, floor) else {
                    // Out of targets. When one was left out for lack of time, the deadline is
                    // what ended the call: say so now rather than wait for it.
                    return Err(if race.deadline_skipped {
                        race.deadline_exceeded()
                    } else {
                        race.exhausted()
                    });
                };
                if kind != AttemptKind::Hedge {
                    self.budget.deposit();
                }
                match self.hedge_delay(&race, &target) {
                    Some(d) => {
                        hedge_sleep.as_mut().reset(Instant::now() + d);
                        hedge_armed = true;
                    }
                    None => hedge_armed = false,
                }
                start(&mut race, &mut in_flight, target, guard, kind);
            }

            tokio::select! {
                biased;
                () = self.hard_stop.cancelled() => return Err(shutting_down()),
                () = &mut deadline_sleep => return Err(race.deadline_exceeded()),
                Some((id, result)) = in_flight.next() => match result {
                    Ok(value) => {
                        self.budget.observe(false);
                        let Some(mut running) = race.close(id, AttemptOutcome::Succeeded) else {
                            continue;
                        };
                        race.cancel_all();
                        if running.kind == AttemptKind::Hedge {
                            race.plan.counters.hedges_won().increment(1);
                        }
                        let guard = running.guard.take().ok_or_else(|| {
                            GatewayError::Internal("an attempt finished twice".to_owned())
                        })?;
                        return Ok(Won {
                            value,
                            target: running.target,
                            kind: running.kind,
                            guard,
                            started: running.started,
                            slot: running.slot,
                            route: race.route,
                            call_started: race.call_started,
                        });
                    }
                    Err(err) => {
                        let Some(mut running) = race.close(id, AttemptOutcome::Failed(err.class.reason())) else {
                            continue;
                        };
                        let latency = running.started.elapsed();
                        if let Some(guard) = running.guard.take() {
                            if err.class == ErrorClass::Timeout {
                                // It did not answer in time: its latency is at least that.
                                guard.censor(latency, race.mode == Mode::Stream);
                            }
                            guard.finish(health_result(&err, latency));
                        }
                        self.budget.observe(err.is_retryable());
                        tracing::info!(
                            provider = running.target.provider.name(),
                            model = &*running.target.model,
                            attempt = running.kind.label(),
                            error_class = err.class.label(),
                            http_status = err.http_status,
                            "upstream attempt failed"
                        );
                        race.all_rate_limited &= err.class == ErrorClass::RateLimited;
                        let context_fallback = err.class == ErrorClass::ContextLengthExceeded
                            && plan.execution.context_length_fallback;
                        if context_fallback {
                            race.min_context = Some(
                                running
                                    .target
                                    .info
                                    .as_ref()
                                    .and_then(|i| i.context_window)
                                    .unwrap_or(0),
                            );
                        } else if !err.is_retryable() {
                            race.last_error = Some(err);
                            return Err(race.exhausted());
                        }
                        race.last_error = Some(err);
                        // With other attempts still running, start a fallback beside them
                        // right away (hedging allows concurrency); otherwise the loop does.
                        if !in_flight.is_empty()
                            && !race.is_retry_round()
                            && let Some((target, guard, kind)) = race.pick(false, floor)
                        {
                            self.budget.deposit();
                            start(&mut race, &mut in_flight, target, guard, kind);
                        }
                    }
                },
                () = &mut hedge_sleep, if hedge_armed => {
                    hedge_armed = false;
                    let cap = 1 + match plan.execution.hedging {
                        Hedging::Off => 0,
                        Hedging::Fixed { max_extra, .. } | Hedging::Percentile { max_extra, .. } => max_extra,
                    };
                    if race.running_count() < cap as usize
                        && !race.is_retry_round()
                        && self.budget.try_withdraw()
                        && let Some((target, guard, _)) = race.pick(true, floor)
                    {
                        tracing::debug!(provider = target.provider.name(), model = &*target.model, "starting a hedge");
                        start(&mut race, &mut in_flight, target.clone(), guard, AttemptKind::Hedge);
                        if let Some(d) = self.hedge_delay(&race, &target) {
                            hedge_sleep.as_mut().reset(Instant::now() + d);
                            hedge_armed = true;
                        }
                    }
                }
            }
        }
    }

    /// Runs a unary call.
    pub async fn chat(
        &self,
        plan: &Plan,
        request: &ChatRequest,
        deadline: Instant,
        trace: Option<&TraceContext>,
    ) -> Result<Answer, GatewayError> {
        let attempt = |target: Target, _deadline: Instant| async move {
            target.provider.chat(&target.model, request).await
        };
        let won = self
            .race(
                plan,
                Mode::Unary,
                deadline,
                trace,
                tokens(request),
                &attempt,
            )
            .await?;
        won.guard.finish(AttemptResult::Success {
            latency: won.started.elapsed(),
            ttft: None,
        });
        Ok(Answer {
            cost: cost_of(&won.target, won.value.usage.as_ref()),
            provider: won.target.provider.name().to_owned(),
            response: won.value,
            route: won.route,
            metrics: Some(won.target.metrics),
            guardrails: Default::default(),
        })
    }

    /// Starts a streaming call. Resolves once one upstream stream produced its first content
    /// (the commit point); until then, failures fall back and slow starts are hedged.
    pub async fn chat_stream(
        &self,
        plan: &Plan,
        request: &ChatRequest,
        deadline: Instant,
        trace: Option<&TraceContext>,
    ) -> Result<CallStream, GatewayError> {
        let first_token_timeout = plan
            .execution
            .first_token_timeout
            .unwrap_or(self.settings.stream_idle_timeout);
        let idle = self.settings.stream_idle_timeout;
        let attempt = |target: Target, _deadline: Instant| async move {
            open_until_first_content(&target, request, first_token_timeout, idle).await
        };
        let won = self
            .race(
                plan,
                Mode::Stream,
                deadline,
                trace,
                tokens(request),
                &attempt,
            )
            .await?;
        let (upstream, buffered) = won.value;
        Ok(CallStream::new(stream::Committed {
            time_to_first_token: won.started.elapsed(),
            target: won.target,
            guard: Some(won.guard),
            kind: won.kind,
            upstream,
            buffered,
            call_started: won.call_started,
            attempt_started: won.started,
            slot: won.slot,
            route: won.route,
            deadline: plan
                .execution
                .total_timeout
                .map_or(deadline, |t| deadline.min(won.call_started + t)),
            idle_timeout: idle,
            hard_stop: self.hard_stop.clone(),
        }))
    }
}

/// The request's estimated tokens (input and expected output), for pacing.
fn tokens(request: &ChatRequest) -> u64 {
    let (input, output) = crate::routing::estimate_tokens(request);
    input + output
}

/// Opens a stream and reads it up to and including the first content event (or the finish
/// of an empty reply).
async fn open_until_first_content(
    target: &Target,
    request: &ChatRequest,
    first_token_timeout: Duration,
    idle_timeout: Duration,
) -> Result<(EventStream, Vec<StreamEvent>), ProviderError> {
    let no_first_token = || {
        ProviderError::new(
            ErrorClass::Timeout,
            "the provider sent no first token within the first-token timeout",
        )
    };
    let first_deadline = Instant::now() + first_token_timeout;
    // One timer, re-armed for each event before the first content.
    let timer = tokio::time::sleep_until(first_deadline);
    tokio::pin!(timer);
    let mut upstream = tokio::select! {
        biased;
        opened = target.provider.chat_stream(&target.model, request) => opened?,
        () = &mut timer => return Err(no_first_token()),
    };
    let mut buffered = Vec::new();
    loop {
        timer
            .as_mut()
            .reset(first_deadline.min(Instant::now() + idle_timeout));
        let next = tokio::select! {
            biased;
            next = upstream.next() => next,
            () = &mut timer => return Err(no_first_token()),
        };
        match next {
            None => return Err(ProviderError::truncated()),
            Some(Err(err)) => return Err(err),
            Some(Ok(event)) => {
                let commit = event.is_content() || matches!(event, StreamEvent::Finish(_));
                buffered.push(event);
                if commit {
                    return Ok((upstream, buffered));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
