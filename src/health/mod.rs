//! Health of targets: a circuit breaker, a rate-limit cooldown and latency statistics over a
//! sliding window, per provider/model.
//!
//! The executor records every attempt here; routing reads it (open breakers and cooling
//! targets are skipped; `lowest_latency` and `most_reliable` order by it), and so do adaptive
//! hedging, ExplainRoute and ListProviders.
//!
//! Breaker rule: a target opens after `failure_threshold` consecutive retryable failures, or
//! when at least `min_samples` attempts in the window failed at `error_rate_threshold` or
//! more. It stays open for `open_duration`, then lets `half_open_probes` probe calls through
//! (one at a time); that many successes close it, a failure opens it again.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, OnceLock, RwLock},
    time::Duration,
};

use tokio::time::Instant;

use self::latency::LatencyWindow;
use crate::settings::Issues;

mod latency;

/// Observations of a target before its latency percentiles are trusted (for adaptive hedge
/// delays and deadline reserves).
pub const MIN_SAMPLES: usize = 20;

/// Told when a target starts (or extends) a rest after a rate limit: provider, model, how
/// long. The server publishes it to the other replicas (see `crate::shared::rests`).
#[derive(Clone)]
pub struct RestHook(pub Arc<RestFn>);

/// What a [`RestHook`] calls.
pub type RestFn = dyn Fn(&str, &str, Duration) + Send + Sync;

impl std::fmt::Debug for RestHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RestHook")
    }
}

/// Breaker and window settings (`[health]`).
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSettings {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// Error rate over the window that opens the breaker.
    pub error_rate_threshold: f64,
    /// Attempts in the window before the error rate counts.
    pub min_samples: usize,
    /// How long the breaker stays open.
    pub open_duration: Duration,
    /// Probe successes needed to close a half-open breaker.
    pub half_open_probes: u32,
    /// Samples kept per target.
    pub window_size: usize,
    /// Samples older than this are dropped.
    pub window_age: Duration,
    /// Latency observations kept per target (for percentiles: hedge delays, reserves); more
    /// than the breaker's window, so that a high percentile reads with less noise.
    pub latency_window_size: usize,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            error_rate_threshold: 0.5,
            min_samples: 20,
            open_duration: Duration::from_secs(30),
            half_open_probes: 2,
            window_size: 256,
            window_age: Duration::from_secs(300),
            latency_window_size: 1024,
        }
    }
}

/// `[health]` as written in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// `health.failure_threshold`.
    pub failure_threshold: Option<u32>,
    /// `health.error_rate_threshold`.
    pub error_rate_threshold: Option<f64>,
    /// `health.min_samples`.
    pub min_samples: Option<usize>,
    /// `health.open_duration`.
    pub open_duration: Option<String>,
    /// `health.half_open_probes`.
    pub half_open_probes: Option<u32>,
}

impl HealthSettings {
    /// Validates `[health]`; unset fields keep their defaults.
    pub fn from_raw(raw: RawHealth, issues: &mut Issues) -> Self {
        let hd = HealthSettings::default();
        HealthSettings {
            failure_threshold: raw.failure_threshold.unwrap_or(hd.failure_threshold).max(1),
            error_rate_threshold: match raw.error_rate_threshold {
                Some(r) if !(r > 0.0 && r <= 1.0) => {
                    issues.push(
                        "health.error_rate_threshold",
                        "must be above 0 and at most 1",
                    );
                    hd.error_rate_threshold
                }
                Some(r) => r,
                None => hd.error_rate_threshold,
            },
            min_samples: raw.min_samples.unwrap_or(hd.min_samples),
            open_duration: issues.duration(
                "health.open_duration",
                raw.open_duration.as_deref(),
                hd.open_duration,
            ),
            half_open_probes: raw.half_open_probes.unwrap_or(hd.half_open_probes).max(1),
            ..hd
        }
    }
}

/// The breaker state, as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls flow.
    Closed,
    /// Calls are not sent.
    Open,
    /// Probe calls are let through.
    HalfOpen,
}

impl CircuitState {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

/// Whether a target may be tried now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Yes.
    Allowed,
    /// Yes, as a half-open probe.
    Probe,
    /// No, its breaker is open.
    CircuitOpen,
    /// No, it is resting after a rate limit until the given time.
    CoolingDown(Instant),
}

impl Admission {
    /// Whether the target may be tried.
    pub fn is_allowed(self) -> bool {
        matches!(self, Admission::Allowed | Admission::Probe)
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    ok: bool,
}

#[derive(Debug)]
enum Breaker {
    Closed { consecutive_failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool, successes: u32 },
}

#[derive(Debug)]
struct State {
    /// Outcomes, for the breaker's error rate.
    window: VecDeque<Sample>,
    /// Latency of unary attempts and whole streams (censored: cancelled or timed out).
    latency: LatencyWindow,
    /// Time to first token of streams (censored: cancelled or timed out before it).
    ttft: LatencyWindow,
    breaker: Breaker,
    cooldown_until: Option<Instant>,
}

/// A snapshot of one target's health.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSnapshot {
    /// Breaker state.
    pub circuit: CircuitState,
    /// Median latency.
    pub latency_p50: Option<Duration>,
    /// 95th percentile latency.
    pub latency_p95: Option<Duration>,
    /// Median time to first token.
    pub ttft_p50: Option<Duration>,
    /// Failed share of the window.
    pub error_rate: f64,
    /// Samples in the window.
    pub samples: usize,
    /// Rest remaining after a rate limit.
    pub cooldown_remaining: Option<Duration>,
}

/// The health of one provider/model.
#[derive(Debug)]
pub struct TargetHealth {
    settings: Arc<HealthSettings>,
    state: Mutex<State>,
    /// Provider and model, for metric labels.
    labels: (String, String),
    /// The registry's rest hook, once set.
    rest_hook: Arc<OnceLock<RestHook>>,
}

/// What one attempt did, for the statistics.
#[derive(Debug, Clone, Copy)]
pub enum AttemptResult {
    /// It succeeded.
    Success {
        /// Total latency.
        latency: Duration,
        /// Time to first token, for streams.
        ttft: Option<Duration>,
    },
    /// It failed with a retryable (target health) error.
    Failure {
        /// Time until it failed.
        latency: Duration,
    },
    /// It was rate limited or overloaded; rest for this long (no breaker change).
    RateLimited {
        /// How long to rest.
        rest: Duration,
    },
    /// It was cancelled or failed for a reason that says nothing about the target's health
    /// (e.g. an invalid request, or the gateway's own shortage of descriptors or memory); only a
    /// half-open probe slot is released.
    Neutral,
}

impl TargetHealth {
    /// A healthy target.
    pub fn new(settings: Arc<HealthSettings>) -> Self {
        Self::named(settings, "", "")
    }

    /// A healthy target with the provider and model its metrics are labelled with.
    pub fn named(settings: Arc<HealthSettings>, provider: &str, model: &str) -> Self {
        Self::hooked(settings, provider, model, Arc::default())
    }

    fn hooked(
        settings: Arc<HealthSettings>,
        provider: &str,
        model: &str,
        rest_hook: Arc<OnceLock<RestHook>>,
    ) -> Self {
        Self {
            rest_hook,
            labels: (provider.to_owned(), model.to_owned()),
            settings,
            state: Mutex::new(State {
                window: VecDeque::new(),
                latency: LatencyWindow::default(),
                ttft: LatencyWindow::default(),
                breaker: Breaker::Closed {
                    consecutive_failures: 0,
                },
                cooldown_until: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-update of plain counters;
        // the data is still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the target may be tried now, without taking a probe slot.
    pub fn peek(&self, now: Instant) -> Admission {
        let state = self.lock();
        Self::admission(&state, now)
    }

    fn admission(state: &State, now: Instant) -> Admission {
        if let Some(until) = state.cooldown_until
            && until > now
        {
            return Admission::CoolingDown(until);
        }
        match state.breaker {
            Breaker::Closed { .. } => Admission::Allowed,
            Breaker::Open { until } if until > now => Admission::CircuitOpen,
            Breaker::Open { .. } => Admission::Probe,
            Breaker::HalfOpen { probing: true, .. } => Admission::CircuitOpen,
            Breaker::HalfOpen { probing: false, .. } => Admission::Probe,
        }
    }

    /// Asks to start an attempt now; a half-open breaker hands out one probe at a time.
    pub fn admit(&self, now: Instant) -> Admission {
        let mut state = self.lock();
        let admission = Self::admission(&state, now);
        if admission == Admission::Probe {
            let successes = match state.breaker {
                Breaker::HalfOpen { successes, .. } => successes,
                _ => 0,
            };
            state.breaker = Breaker::HalfOpen {
                probing: true,
                successes,
            };
        }
        admission
    }

    /// Records an attempt. Returns the new breaker state when it changed.
    pub fn record(&self, result: AttemptResult, now: Instant) -> Option<CircuitState> {
        let settings = &self.settings;
        let mut state = self.lock();
        let before = Self::circuit(&state.breaker);
        let mut rested = None;
        let sample = match result {
            AttemptResult::Success { latency, ttft } => {
                let (size, age) = (settings.latency_window_size, settings.window_age);
                state.latency.push(latency, false, now, size, age);
                if let Some(ttft) = ttft {
                    state.ttft.push(ttft, false, now, size, age);
                }
                Some(Sample { at: now, ok: true })
            }
            AttemptResult::Failure { .. } => Some(Sample { at: now, ok: false }),
            AttemptResult::RateLimited { rest } => {
                let until = now + rest;
                if state.cooldown_until.is_none_or(|u| u < until) {
                    state.cooldown_until = Some(until);
                    rested = Some(rest);
                }
                None
            }
            AttemptResult::Neutral => None,
        };
        if let Some(sample) = sample {
            state.window.push_back(sample);
            while state.window.len() > settings.window_size
                || state
                    .window
                    .front()
                    .is_some_and(|s| now.duration_since(s.at) > settings.window_age)
            {
                state.window.pop_front();
            }
        }
        state.breaker = match (&state.breaker, result) {
            (Breaker::HalfOpen { successes, .. }, AttemptResult::Success { .. }) => {
                if successes + 1 >= settings.half_open_probes {
                    // Start afresh: the failures that opened the breaker are history.
                    state.window.retain(|s| s.ok);
                    Breaker::Closed {
                        consecutive_failures: 0,
                    }
                } else {
                    Breaker::HalfOpen {
                        probing: false,
                        successes: successes + 1,
                    }
                }
            }
            (Breaker::HalfOpen { .. }, AttemptResult::Failure { .. }) => Breaker::Open {
                until: now + settings.open_duration,
            },
            (Breaker::HalfOpen { successes, .. }, _) => Breaker::HalfOpen {
                probing: false,
                successes: *successes,
            },
            (Breaker::Closed { .. }, AttemptResult::Success { .. }) => Breaker::Closed {
                consecutive_failures: 0,
            },
            (
                Breaker::Closed {
                    consecutive_failures,
                },
                AttemptResult::Failure { .. },
            ) => {
                let failures = consecutive_failures + 1;
                let total = state.window.len();
                let failed = state.window.iter().filter(|s| !s.ok).count();
                let rate_trips = total >= settings.min_samples
                    && failed as f64 / total as f64 >= settings.error_rate_threshold;
                if failures >= settings.failure_threshold || rate_trips {
                    Breaker::Open {
                        until: now + settings.open_duration,
                    }
                } else {
                    Breaker::Closed {
                        consecutive_failures: failures,
                    }
                }
            }
            (
                Breaker::Closed {
                    consecutive_failures,
                },
                _,
            ) => Breaker::Closed {
                consecutive_failures: *consecutive_failures,
            },
            (Breaker::Open { until }, _) => Breaker::Open { until: *until },
        };
        let after = Self::circuit(&state.breaker);
        drop(state);
        if let (Some(rest), Some(hook)) = (rested, self.rest_hook.get()) {
            (hook.0)(&self.labels.0, &self.labels.1, rest);
        }
        if before == after {
            return None;
        }
        let (provider, model) = (self.labels.0.clone(), self.labels.1.clone());
        tracing::warn!(provider = %provider, model = %model, state = after.label(), "circuit breaker changed state");
        metrics::counter!(
            crate::telemetry::names::CIRCUIT_TRANSITIONS,
            "provider" => provider.clone(),
            "model" => model.clone(),
            "state" => after.label()
        )
        .increment(1);
        metrics::gauge!(crate::telemetry::names::CIRCUIT_STATE, "provider" => provider, "model" => model)
            .set(match after {
                CircuitState::Closed => 0.0,
                CircuitState::HalfOpen => 1.0,
                CircuitState::Open => 2.0,
            });
        Some(after)
    }

    fn circuit(breaker: &Breaker) -> CircuitState {
        match breaker {
            Breaker::Closed { .. } => CircuitState::Closed,
            Breaker::Open { .. } => CircuitState::Open,
            Breaker::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// Rests the target for `rest` from `now` because another replica saw it rate limited
    /// (the rest hook is not told: the news came from there).
    pub fn rest_from_peer(&self, rest: Duration, now: Instant) {
        let until = now + rest;
        let mut state = self.lock();
        state.cooldown_until = Some(state.cooldown_until.map_or(until, |u| u.max(until)));
    }

    /// Records an attempt that ended without showing its latency (it was cancelled, or cut
    /// off by its timeout) after running for `elapsed`: its latency (time to first token for
    /// a stream) was at least that. Used by the percentiles, not by the breaker.
    pub fn record_censored(&self, elapsed: Duration, stream: bool, now: Instant) {
        let (size, age) = (self.settings.latency_window_size, self.settings.window_age);
        let mut state = self.lock();
        let window = if stream {
            &mut state.ttft
        } else {
            &mut state.latency
        };
        window.push(elapsed, true, now, size, age);
    }

    /// The `p`th percentile (0-100) of attempts' latency, when at least `min_samples`
    /// observations (finished or censored) exist. Censored observations count as what they
    /// are, lower bounds (see [`latency`]).
    pub fn latency_percentile(&self, p: f64, min_samples: usize) -> Option<Duration> {
        let state = self.lock();
        if state.latency.len() < min_samples.max(1) {
            return None;
        }
        state.latency.quantile(p)
    }

    /// The `p`th percentile (0-100) of time to first token of streams, when at least
    /// `min_samples` observations exist.
    pub fn ttft_percentile(&self, p: f64, min_samples: usize) -> Option<Duration> {
        let state = self.lock();
        if state.ttft.len() < min_samples.max(1) {
            return None;
        }
        state.ttft.quantile(p)
    }

    /// Median time to first token (streams), falling back to median latency.
    pub fn typical_latency(&self) -> Option<Duration> {
        let state = self.lock();
        if state.ttft.exact_len() > 0 {
            return state.ttft.quantile(50.0);
        }
        if state.latency.exact_len() > 0 {
            return state.latency.quantile(50.0);
        }
        None
    }

    /// Success rate with a weak prior (1 success in 2 attempts), so new targets rank in the
    /// middle.
    pub fn success_rate(&self) -> f64 {
        let state = self.lock();
        let ok = state.window.iter().filter(|s| s.ok).count();
        (ok as f64 + 1.0) / (state.window.len() as f64 + 2.0)
    }

    /// A snapshot for reporting.
    pub fn snapshot(&self, now: Instant) -> HealthSnapshot {
        let state = self.lock();
        let failed = state.window.iter().filter(|s| !s.ok).count();
        let circuit = match (&state.breaker, Self::admission(&state, now)) {
            (Breaker::Open { .. }, Admission::Probe) => CircuitState::HalfOpen,
            (b, _) => Self::circuit(b),
        };
        HealthSnapshot {
            circuit,
            latency_p50: state.latency.quantile(50.0),
            latency_p95: state.latency.quantile(95.0),
            ttft_p50: state.ttft.quantile(50.0),
            error_rate: if state.window.is_empty() {
                0.0
            } else {
                failed as f64 / state.window.len() as f64
            },
            samples: state.window.len(),
            cooldown_remaining: state
                .cooldown_until
                .filter(|u| *u > now)
                .map(|u| u.duration_since(now)),
        }
    }
}

/// An admitted attempt. Dropping it unfinished (the attempt was abandoned: cancelled, lost a
/// race, ran out of time) records a neutral result, which frees a half-open probe slot.
#[derive(Debug)]
pub struct AttemptGuard {
    health: Arc<TargetHealth>,
    done: bool,
}

impl AttemptGuard {
    /// Admits an attempt now, or says why not.
    pub fn admit(health: &Arc<TargetHealth>, now: Instant) -> Result<AttemptGuard, Admission> {
        let admission = health.admit(now);
        if admission.is_allowed() {
            Ok(AttemptGuard {
                health: health.clone(),
                done: false,
            })
        } else {
            Err(admission)
        }
    }

    /// Records that the attempt ran `elapsed` without showing its latency (time to first
    /// token for a stream): it is being cancelled or timed out.
    pub fn censor(&self, elapsed: Duration, stream: bool) {
        self.health.record_censored(elapsed, stream, Instant::now());
    }

    /// Records the attempt's result; returns the new breaker state when it changed.
    pub fn finish(mut self, result: AttemptResult) -> Option<CircuitState> {
        self.done = true;
        self.health.record(result, Instant::now())
    }
}

impl Drop for AttemptGuard {
    fn drop(&mut self) {
        if !self.done {
            self.health.record(AttemptResult::Neutral, Instant::now());
        }
    }
}

/// Health of every target, created on first use.
#[derive(Debug, Default)]
pub struct HealthRegistry {
    settings: Arc<HealthSettings>,
    targets: RwLock<HashMap<String, HashMap<String, Arc<TargetHealth>>>>,
    rest_hook: Arc<OnceLock<RestHook>>,
}

impl HealthRegistry {
    /// An empty registry.
    pub fn new(settings: HealthSettings) -> Self {
        Self {
            settings: Arc::new(settings),
            targets: RwLock::default(),
            rest_hook: Arc::default(),
        }
    }

    /// Sets the hook told of every rest after a rate limit (once; later calls are ignored).
    pub fn on_rest(&self, hook: RestHook) {
        let _ = self.rest_hook.set(hook);
    }

    /// The health of `provider/model`, created when new.
    pub fn get(&self, provider: &str, model: &str) -> Arc<TargetHealth> {
        if let Ok(map) = self.targets.read()
            && let Some(h) = map.get(provider).and_then(|m| m.get(model))
        {
            return h.clone();
        }
        let mut map = self
            .targets
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.entry(provider.to_owned())
            .or_default()
            .entry(model.to_owned())
            .or_insert_with(|| {
                Arc::new(TargetHealth::hooked(
                    self.settings.clone(),
                    provider,
                    model,
                    self.rest_hook.clone(),
                ))
            })
            .clone()
    }

    /// Every known target, sorted.
    pub fn all(&self) -> Vec<(String, String, Arc<TargetHealth>)> {
        let map = self
            .targets
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out: Vec<_> = map
            .iter()
            .flat_map(|(p, models)| {
                models
                    .iter()
                    .map(move |(m, h)| (p.clone(), m.clone(), h.clone()))
            })
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(threshold: u32) -> TargetHealth {
        TargetHealth::new(Arc::new(HealthSettings {
            failure_threshold: threshold,
            open_duration: Duration::from_secs(10),
            half_open_probes: 2,
            ..HealthSettings::default()
        }))
    }

    const FAIL: AttemptResult = AttemptResult::Failure {
        latency: Duration::from_millis(5),
    };
    const OK: AttemptResult = AttemptResult::Success {
        latency: Duration::from_millis(5),
        ttft: None,
    };

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_half_opens_and_closes() {
        let h = health(3);
        let t0 = Instant::now();
        assert_eq!(h.record(FAIL, t0), None);
        assert_eq!(h.record(FAIL, t0), None);
        assert_eq!(h.record(FAIL, t0), Some(CircuitState::Open));
        assert_eq!(h.admit(t0), Admission::CircuitOpen);
        let later = t0 + Duration::from_secs(11);
        assert_eq!(h.peek(later), Admission::Probe);
        assert_eq!(h.admit(later), Admission::Probe);
        // One probe at a time.
        assert_eq!(h.admit(later), Admission::CircuitOpen);
        assert_eq!(h.record(OK, later), None);
        assert_eq!(h.admit(later), Admission::Probe);
        assert_eq!(h.record(OK, later), Some(CircuitState::Closed));
        assert_eq!(h.admit(later), Admission::Allowed);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens() {
        let h = health(1);
        let t0 = Instant::now();
        h.record(FAIL, t0);
        let later = t0 + Duration::from_secs(11);
        assert_eq!(h.admit(later), Admission::Probe);
        assert_eq!(h.record(FAIL, later), Some(CircuitState::Open));
        assert_eq!(h.admit(later), Admission::CircuitOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn error_rate_opens_the_breaker() {
        let h = TargetHealth::new(Arc::new(HealthSettings {
            failure_threshold: 100,
            min_samples: 10,
            error_rate_threshold: 0.5,
            ..HealthSettings::default()
        }));
        let t0 = Instant::now();
        let mut opened = false;
        for _ in 0..10 {
            h.record(OK, t0);
            opened |= h.record(FAIL, t0) == Some(CircuitState::Open);
        }
        assert!(opened);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_cooldown() {
        let h = health(3);
        let t0 = Instant::now();
        h.record(
            AttemptResult::RateLimited {
                rest: Duration::from_secs(2),
            },
            t0,
        );
        assert!(matches!(h.admit(t0), Admission::CoolingDown(_)));
        assert_eq!(h.admit(t0 + Duration::from_secs(3)), Admission::Allowed);
        assert_eq!(h.snapshot(t0).circuit, CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn the_rest_hook_hears_each_new_or_longer_rest_and_peers_do_not_echo() {
        let registry = HealthRegistry::new(HealthSettings::default());
        let heard = Arc::new(Mutex::new(Vec::new()));
        let sink = heard.clone();
        registry.on_rest(RestHook(Arc::new(move |p, m, rest| {
            sink.lock()
                .unwrap()
                .push((p.to_owned(), m.to_owned(), rest));
        })));
        let h = registry.get("openai", "gpt");
        let t0 = Instant::now();
        let limited = |secs| AttemptResult::RateLimited {
            rest: Duration::from_secs(secs),
        };
        h.record(limited(10), t0);
        // Within the rest already taken: nothing new to tell.
        h.record(limited(5), t0);
        h.record(limited(20), t0);
        // A peer's rest is applied, not told back.
        h.rest_from_peer(Duration::from_secs(60), t0);
        assert!(matches!(
            h.admit(t0 + Duration::from_secs(30)),
            Admission::CoolingDown(_)
        ));
        let heard = heard.lock().unwrap().clone();
        let secs: Vec<u64> = heard.iter().map(|(_, _, r)| r.as_secs()).collect();
        assert_eq!(secs, [10, 20]);
        assert_eq!(heard[0].0, "openai");
        assert_eq!(heard[0].1, "gpt");
    }

    #[tokio::test(start_paused = true)]
    async fn percentiles_over_the_window() {
        let h = health(3);
        let t0 = Instant::now();
        for ms in 1..=100 {
            h.record(
                AttemptResult::Success {
                    latency: Duration::from_millis(ms),
                    ttft: None,
                },
                t0,
            );
        }
        // Histogram buckets: within 3.5% of the exact value.
        let within = |d: Option<Duration>, ms: f64| {
            d.is_some_and(|d| (d.as_secs_f64() * 1000.0 - ms).abs() <= ms * 0.035)
        };
        assert!(within(h.latency_percentile(50.0, 10), 50.0));
        assert!(within(h.latency_percentile(95.0, 10), 95.0));
        assert_eq!(h.latency_percentile(95.0, 1000), None);
        // Censored observations count towards the samples and the estimate: with 100 more
        // attempts that ran 400 ms unanswered, the median is beyond 100 ms, and p40 is 80 ms.
        for _ in 0..100 {
            h.record_censored(Duration::from_millis(400), false, t0);
        }
        assert!(within(h.latency_percentile(40.0, 150), 80.0));
        let p75 = h.latency_percentile(75.0, 150).unwrap();
        assert!(p75 > Duration::from_millis(200) && p75 <= Duration::from_millis(410));
        assert!(h.success_rate() > 0.98);
    }
}
