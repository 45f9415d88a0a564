//! The shadow pool: mirrors sampled calls of a policy with a `shadow` block to its candidate
//! targets, off the caller's path.
//!
//! - Sampling happens when the call is planned ([`ShadowPool::sample`]); only a sampled call
//!   copies its request. The mirror is submitted once the primary reply is complete (a
//!   stream: assembled from its events), so the caller never waits for it.
//! - Each policy has its own lane: at most `max_concurrency` shadow calls run and
//!   `max_queue` wait (a semaphore and a bounded count); a shadow finding the lane full, the
//!   lane's rate (`rate_per_second`, a token bucket) spent, or the lane's spend for the UTC
//!   day at `max_usd_per_day` is dropped and counted in `llm_gateway_shadow_dropped_total`
//!   by reason (`full`, `rate`, `budget`).
//! - A shadow runs on a task of the pool with its own deadline (`timeout`), one attempt per
//!   candidate (side by side; no retries, no hedges), and never touches the caller's key limits or
//!   budgets (its record names no key). Its result goes to the ledger with rpc [`SHADOW_RPC`], linked to the primary
//!   by `shadow_of`, with the primary's experiment arm and a [`compare`] of the replies.
//! - At shutdown [`ShadowPool::close`] cancels what is queued or runs and waits for the tasks.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use tokio::{sync::Semaphore, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    error::code_name,
    executor::Executor,
    experiments::compare::{compare, reply_text},
    ledger::{Ledger, SHADOW_RPC, Trial, UsageRecord},
    routing::{
        Plan, RoutingTable,
        experiment::{
            DEFAULT_SHADOW_CONCURRENCY, DEFAULT_SHADOW_QUEUE, DEFAULT_SHADOW_RATE,
            DEFAULT_SHADOW_TIMEOUT, ShadowSpec,
        },
        policy::Hedging,
    },
    telemetry::names,
    types::{ChatRequest, ChatResponse, ResponseFormat},
};

/// The shadow pool; cheap to clone.
#[derive(Clone)]
pub struct ShadowPool {
    inner: Arc<Inner>,
}

struct Inner {
    executor: Executor,
    ledger: Ledger,
    lanes: Mutex<HashMap<String, Arc<Lane>>>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

/// One policy's bounded pool and budget.
struct Lane {
    spec: ShadowSpec,
    policy: String,
    running: Semaphore,
    /// Shadows queued or running.
    pending: AtomicUsize,
    /// Most shadows queued or running.
    cap: usize,
    /// Tokens and when they were last refilled.
    bucket: Mutex<(f64, Instant)>,
    /// The UTC day and the spend on it, in micro-dollars.
    day: Mutex<i64>,
    spent_micros: AtomicU64,
    dropped: AtomicU64,
}

/// Why a shadow was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// The lane's queue was full.
    Full,
    /// The lane's rate per second was spent.
    Rate,
    /// The lane's dollars for the day were spent.
    Budget,
}

impl Dropped {
    fn label(self) -> &'static str {
        match self {
            Dropped::Full => "full",
            Dropped::Rate => "rate",
            Dropped::Budget => "budget",
        }
    }
}

impl Lane {
    fn new(policy: &str, spec: &ShadowSpec) -> Self {
        let concurrency = spec
            .max_concurrency
            .unwrap_or(DEFAULT_SHADOW_CONCURRENCY)
            .max(1);
        let queue = spec.max_queue.unwrap_or(DEFAULT_SHADOW_QUEUE);
        let rate = spec.rate_per_second.unwrap_or(DEFAULT_SHADOW_RATE);
        Self {
            spec: spec.clone(),
            policy: policy.to_owned(),
            running: Semaphore::new(concurrency as usize),
            pending: AtomicUsize::new(0),
            cap: concurrency as usize + queue as usize,
            bucket: Mutex::new((rate.max(1.0), Instant::now())),
            day: Mutex::new(0),
            spent_micros: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Takes a place in the lane, or says why there is none.
    fn admit(&self, day: i64) -> Result<(), Dropped> {
        if let Some(max) = self.spec.max_usd_per_day {
            let mut current = self.day.lock().unwrap_or_else(|e| e.into_inner());
            if *current != day {
                *current = day;
                self.spent_micros.store(0, Ordering::Relaxed);
            }
            if self.spent_micros.load(Ordering::Relaxed) as f64 / 1e6 >= max {
                return Err(Dropped::Budget);
            }
        }
        {
            let rate = self.spec.rate_per_second.unwrap_or(DEFAULT_SHADOW_RATE);
            let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let refill = now.saturating_duration_since(bucket.1).as_secs_f64() * rate;
            *bucket = ((bucket.0 + refill).min(rate.max(1.0)), now);
            if bucket.0 < 1.0 {
                return Err(Dropped::Rate);
            }
            bucket.0 -= 1.0;
        }
        let taken = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.cap).then_some(n + 1)
            });
        taken.map(|_| ()).map_err(|_| Dropped::Full)
    }

    fn drop_one(&self, why: Dropped) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(names::SHADOW_DROPPED, "policy" => self.policy.clone(), "reason" => why.label())
            .increment(1);
    }

    fn spend(&self, usd: f64) {
        let micros = (usd * 1e6).round();
        if micros.is_finite() && micros > 0.0 {
            self.spent_micros
                .fetch_add(micros as u64, Ordering::Relaxed);
        }
    }
}

/// Gives the lane's place back when a shadow task ends (however it ends).
struct Place(Arc<Lane>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A sampled call: what to mirror once the primary reply is complete.
pub struct Mirror {
    pool: Arc<Inner>,
    lane: Arc<Lane>,
    table: Arc<RoutingTable>,
    request: ChatRequest,
    policy: String,
    trial: Trial,
}

/// The primary call, as a mirror needs it.
pub struct Primary<'a> {
    /// The primary's request id.
    pub request_id: &'a str,
    /// Its reply, when it succeeded.
    pub reply: Option<&'a ChatResponse>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl ShadowPool {
    /// A pool running shadows on `executor` and recording them in `ledger`.
    pub fn new(executor: Executor, ledger: Ledger) -> Self {
        Self {
            inner: Arc::new(Inner {
                executor,
                ledger,
                lanes: Mutex::new(HashMap::new()),
                tasks: TaskTracker::new(),
                stop: CancellationToken::new(),
            }),
        }
    }

    /// Whether to mirror a call planned by `plan`: `Some` (with a copy of the request) for
    /// a sampled call of a policy with a `shadow` block.
    pub fn sample(
        &self,
        table: &Arc<RoutingTable>,
        plan: &Plan,
        request: &ChatRequest,
    ) -> Option<Mirror> {
        let policy = plan.policy.as_deref()?;
        let spec = table.shadow_spec(policy)?;
        if fastrand::f64() >= spec.sample {
            return None;
        }
        let lane = {
            let mut lanes = self.inner.lanes.lock().unwrap_or_else(|e| e.into_inner());
            match lanes.get(policy) {
                Some(lane) if lane.spec == *spec => lane.clone(),
                _ => {
                    let lane = Arc::new(Lane::new(policy, spec));
                    lanes.insert(policy.to_owned(), lane.clone());
                    lane
                }
            }
        };
        let arm = plan.arm.as_ref().map(|a| a.arm.clone()).unwrap_or_default();
        let arm = std::sync::Arc::unwrap_or_clone(arm);
        Some(Mirror {
            pool: self.inner.clone(),
            lane,
            table: table.clone(),
            request: request.clone(),
            policy: policy.to_owned(),
            trial: Trial {
                experiment: arm.experiment,
                arm: arm.arm,
                ..Trial::default()
            },
        })
    }

    /// Shadows dropped by the lane of `policy` so far (0 for a policy without one).
    pub fn dropped(&self, policy: &str) -> u64 {
        let lanes = self.inner.lanes.lock().unwrap_or_else(|e| e.into_inner());
        lanes
            .get(policy)
            .map_or(0, |l| l.dropped.load(Ordering::Relaxed))
    }

    /// Cancels the queued and running shadows (a cancelled shadow writes no record) and
    /// waits for their tasks.
    pub async fn close(&self) {
        self.inner.stop.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

impl Mirror {
    /// Starts the shadow calls on the pool (or drops them, counted); returns at once.
    pub fn submit(mut self, primary: Primary<'_>) {
        let lane = self.lane.clone();
        if self.pool.stop.is_cancelled() {
            return;
        }
        if let Err(why) = lane.admit(now_ms().div_euclid(86_400_000)) {
            lane.drop_one(why);
            return;
        }
        let place = Place(lane.clone());
        self.trial.shadow_of = primary.request_id.to_owned();
        let primary_text = primary.reply.map(reply_text);
        let pool = self.pool.clone();
        pool.tasks.spawn(async move {
            let _place = place;
            let stop = self.pool.stop.clone();
            let Ok(_slot) = (tokio::select! {
                slot = lane.running.acquire() => slot,
                () = stop.cancelled() => return,
            }) else {
                return;
            };
            let timeout = lane.spec.timeout.unwrap_or(DEFAULT_SHADOW_TIMEOUT);
            // The candidates side by side, each with the shadow's deadline.
            let calls = lane.spec.targets.iter().map(|target| {
                self.run(&target.provider, &target.model, timeout, primary_text.as_deref())
            });
            let records = tokio::select! {
                records = futures_util::future::join_all(calls) => records,
                () = stop.cancelled() => return,
            };
            for (i, mut record) in records.into_iter().enumerate() {
                record.request_id = format!("{}~shadow{}", self.trial.shadow_of, i + 1);
                lane.spend(record.cost_usd.unwrap_or(0.0));
                metrics::counter!(names::SHADOW_CALLS, "policy" => self.policy.clone(), "code" => record.code.clone())
                    .increment(1);
                self.pool.ledger.record(record);
            }
        });
    }

    /// One shadow call to `provider/model`, as its ledger record.
    async fn run(
        &self,
        provider: &str,
        model: &str,
        timeout: std::time::Duration,
        primary: Option<&str>,
    ) -> UsageRecord {
        let started = Instant::now();
        let mut request = self.request.clone();
        request.model = format!("{provider}/{model}");
        let result = match self.table.plan(&request) {
            Ok(mut plan) => {
                // One attempt: a shadow never retries or hedges.
                let mut execution = (*plan.execution).clone();
                execution.max_attempts = 1;
                execution.hedging = Hedging::Off;
                plan.execution = Arc::new(execution);
                self.pool
                    .executor
                    .chat(&plan, &request, started + timeout, None)
                    .await
            }
            Err(e) => Err(e),
        };
        let json = matches!(
            request.response_format,
            Some(ResponseFormat::JsonObject | ResponseFormat::JsonSchema { .. })
        );
        let mut record = UsageRecord {
            time_ms: now_ms(),
            rpc: SHADOW_RPC.to_owned(),
            tags: request.tags.clone(),
            policy: self.policy.clone(),
            provider: provider.to_owned(),
            model: model.to_owned(),
            attempts: 1,
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            trial: self.trial.clone(),
            ..UsageRecord::default()
        };
        match result {
            Ok(answer) => {
                let usage = answer.response.usage;
                record.code = "OK".to_owned();
                record.usage_reported = usage.is_some();
                let usage = usage.unwrap_or_default();
                record.input_tokens = usage.input_tokens;
                record.output_tokens = usage.output_tokens;
                record.cached_input_tokens = usage.cached_input_tokens.unwrap_or(0);
                record.cost_usd = answer.cost.map(|c| c.total_usd());
                record.trial.comparison = primary.map(|p| {
                    compare(
                        p,
                        &reply_text(&answer.response),
                        json,
                        answer.response.finish_reason,
                    )
                });
            }
            Err(err) => {
                let class = err.classify();
                record.code = code_name(class.code).to_owned();
                record.error_class = class.reason.to_owned();
            }
        }
        record
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::experiment::ShadowTarget;

    fn spec(concurrency: u32, queue: u32, rate: f64, usd: Option<f64>) -> ShadowSpec {
        ShadowSpec {
            targets: vec![ShadowTarget {
                provider: "mock".into(),
                model: "m".into(),
            }],
            sample: 1.0,
            max_concurrency: Some(concurrency),
            max_queue: Some(queue),
            rate_per_second: Some(rate),
            max_usd_per_day: usd,
            timeout: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_lane_holds_its_bound_rate_and_budget() {
        let lane = Lane::new("p", &spec(1, 1, 100.0, None));
        assert_eq!(lane.admit(0), Ok(()));
        assert_eq!(lane.admit(0), Ok(()));
        assert_eq!(lane.admit(0), Err(Dropped::Full));
        lane.pending.fetch_sub(1, Ordering::AcqRel);
        assert_eq!(lane.admit(0), Ok(()));

        let slow = Lane::new("p", &spec(8, 8, 1.0, None));
        assert_eq!(slow.admit(0), Ok(()));
        assert_eq!(slow.admit(0), Err(Dropped::Rate));
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        assert_eq!(slow.admit(0), Ok(()));

        let budget = Lane::new("p", &spec(8, 8, 100.0, Some(0.01)));
        assert_eq!(budget.admit(0), Ok(()));
        budget.spend(0.02);
        assert_eq!(budget.admit(0), Err(Dropped::Budget));
        // A new UTC day starts with nothing spent.
        assert_eq!(budget.admit(1), Ok(()));
    }
}
