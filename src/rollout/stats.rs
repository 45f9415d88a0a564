//! The sequential test that decides a rollback: pure arithmetic, no clock, no I/O.
//!
//! Each call of a rollout is an observation of one version: failed or not, and its
//! latency. Observations of the new version (canary) are paired with observations of the
//! old version (baseline) in arrival order (two FIFO queues; a pair forms as soon as both
//! have one). Within a version the observations are independent and identically
//! distributed, so the pairs are too, whatever the traffic split is at the time.
//!
//! Two tests run on the pairs, each by *betting* (testing by betting, Shafer 2021;
//! Waudby-Smith and Ramdas 2023): a test of `H0: E[D] <= margin` for a difference `D` in
//! `[-1, 1]` keeps the wealth `W_n = prod(1 + lambda_i (D_i - margin))` with a bet
//! `lambda_i` in `[0, 0.75 / (1 + margin)]` chosen from the earlier pairs only (aGRAPA:
//! running mean over running second moment). Under `H0` the wealth is a nonnegative
//! supermartingale, so by Ville's inequality it ever reaches `1 / a` with probability at
//! most `a`: the test may be checked after every pair (it is always valid, not a fixed
//! window) and stops as soon as the evidence is there.
//!
//! - Error rate: `D = failed(canary) - failed(baseline)`, `E[D]` is the difference of the
//!   error rates; the margin is the error-rate margin.
//! - Latency: `D = [canary latency > (1 + m) T] - [baseline latency > T]` where `T` is the
//!   baseline's p95 estimated from the baseline calls *before* the paired one (so `T` is
//!   fixed before the pair is seen) and `m` the latency margin. When the canary is no
//!   slower than `(1 + m)` times the baseline at that point, `E[D] <= 0` for any such
//!   `T`; a canary whose p95 is beyond `(1 + m)` times the baseline's exceeds the
//!   threshold more often than 5 %, and the wealth grows.
//!
//! Each test gets half of `alpha = 1 - confidence`, so a canary within both margins is
//! rolled back with probability at most `alpha` over the whole rollout.

use std::{collections::VecDeque, time::Duration};

/// The largest bet, as a fraction of the most that keeps the wealth positive.
const MAX_BET: f64 = 0.75;
/// Unpaired observations kept per version; older ones are dropped (by arrival only, so the
/// pairs stay independent of the values).
const QUEUE: usize = 256;
/// Latencies kept per version for the p95 estimates.
const WINDOW: usize = 512;
/// Baseline latencies needed before the latency test starts.
const MIN_BASELINE_SAMPLES: usize = 20;

/// One call's outcome.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// The call failed (for a reason of the version, not the caller).
    pub failed: bool,
    /// The call's latency.
    pub latency: Duration,
}

/// A test of `H0: E[D] <= margin` by betting; see the module docs.
#[derive(Debug, Clone)]
pub struct Betting {
    margin: f64,
    log_wealth: f64,
    n: u64,
    sum: f64,
    sum_sq: f64,
}

impl Betting {
    /// A test with wealth 1.
    pub fn new(margin: f64) -> Self {
        Self {
            margin,
            log_wealth: 0.0,
            n: 0,
            sum: 0.0,
            sum_sq: 0.0,
        }
    }

    /// The bet for the next pair, from the earlier ones only.
    fn bet(&self) -> f64 {
        let n = self.n as f64;
        // Shrunk towards "no effect" while there are few pairs.
        let mean = self.sum / (n + 1.0);
        let second = (self.sum_sq + 0.25) / (n + 1.0);
        (mean / second).clamp(0.0, MAX_BET / (1.0 + self.margin))
    }

    /// Adds one difference `d` in `[-1, 1]`.
    pub fn push(&mut self, d: f64) {
        let z = d.clamp(-1.0, 1.0) - self.margin;
        let bet = self.bet();
        self.log_wealth += (1.0 + bet * z).ln();
        self.n += 1;
        self.sum += z;
        self.sum_sq += z * z;
    }

    /// The wealth (an e-value against `H0`).
    pub fn evidence(&self) -> f64 {
        self.log_wealth.exp()
    }

    /// Whether the wealth reached `1 / alpha`.
    pub fn rejects(&self, alpha: f64) -> bool {
        self.log_wealth >= (1.0 / alpha).ln()
    }

    /// Pairs seen.
    pub fn pairs(&self) -> u64 {
        self.n
    }
}

/// The most recent latencies of one version, for its p95.
#[derive(Debug, Clone, Default)]
pub struct Window {
    values: VecDeque<Duration>,
}

impl Window {
    /// Adds a latency (dropping the oldest beyond the window).
    pub fn push(&mut self, latency: Duration) {
        if self.values.len() == WINDOW {
            self.values.pop_front();
        }
        self.values.push_back(latency);
    }

    /// Latencies held.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The `q` quantile (0-1) of the window (nearest rank), `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.values.is_empty() {
            return None;
        }
        let mut values: Vec<Duration> = self.values.iter().copied().collect();
        let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
        let (_, nth, _) = values.select_nth_unstable(rank - 1);
        Some(*nth)
    }
}

/// Which test found harm, with its evidence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Harm {
    /// The error rate is worse than the margin allows.
    ErrorRate,
    /// The latency at the baseline's p95 is worse than the margin allows.
    Latency,
}

/// Counts of one version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Observed calls.
    pub calls: u64,
    /// Failed ones.
    pub errors: u64,
}

impl Counts {
    /// The error rate (0 without calls).
    pub fn rate(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            self.errors as f64 / self.calls as f64
        }
    }
}

/// How much slower than the old version's p95 a new-version call must be, besides the
/// relative margin, to count as slow: a fraction of a sub-millisecond p95 is scheduling
/// noise (a cache hit or a local mock answers in microseconds), not a slower version.
/// Negligible beside a model call's hundreds of milliseconds.
pub const LATENCY_SLACK: Duration = Duration::from_millis(2);

/// The rollback test of one rollout: both arms' observations, pairs, and both tests.
#[derive(Debug, Clone)]
pub struct Sequential {
    alpha: f64,
    latency_margin: f64,
    errors: Betting,
    latency: Betting,
    canary_queue: VecDeque<Observation>,
    /// Baseline observations with the threshold `T` in force when each arrived.
    baseline_queue: VecDeque<(Observation, Option<Duration>)>,
    /// The baseline's p95 from the calls before the next one (recomputed every 64 calls).
    threshold: Option<Duration>,
    /// Baseline and canary counts and latency windows.
    pub baseline: Counts,
    /// Canary counts.
    pub canary: Counts,
    baseline_window: Window,
    canary_window: Window,
}

impl Sequential {
    /// A test deciding with `confidence` (0-1) on the given margins (fractions).
    pub fn new(confidence: f64, error_margin: f64, latency_margin: f64) -> Self {
        Self {
            alpha: (1.0 - confidence).clamp(1e-9, 0.5),
            latency_margin,
            errors: Betting::new(error_margin),
            latency: Betting::new(0.0),
            canary_queue: VecDeque::new(),
            baseline_queue: VecDeque::new(),
            threshold: None,
            baseline: Counts::default(),
            canary: Counts::default(),
            baseline_window: Window::default(),
            canary_window: Window::default(),
        }
    }

    /// Adds a baseline call.
    pub fn baseline(&mut self, obs: Observation) {
        self.baseline.calls += 1;
        self.baseline.errors += u64::from(obs.failed);
        if self.baseline_queue.len() == QUEUE {
            self.baseline_queue.pop_front();
        }
        self.baseline_queue.push_back((obs, self.threshold));
        self.baseline_window.push(obs.latency);
        if self.baseline_window.len() >= MIN_BASELINE_SAMPLES
            && (self.threshold.is_none() || self.baseline.calls.is_multiple_of(64))
        {
            self.threshold = self.baseline_window.quantile(0.95);
        }
        self.pair();
    }

    /// Adds a canary call.
    pub fn canary(&mut self, obs: Observation) {
        self.canary.calls += 1;
        self.canary.errors += u64::from(obs.failed);
        if self.canary_queue.len() == QUEUE {
            self.canary_queue.pop_front();
        }
        self.canary_queue.push_back(obs);
        self.canary_window.push(obs.latency);
        self.pair();
    }

    fn pair(&mut self) {
        while !self.canary_queue.is_empty() && !self.baseline_queue.is_empty() {
            let (Some(canary), Some((baseline, threshold))) = (
                self.canary_queue.pop_front(),
                self.baseline_queue.pop_front(),
            ) else {
                return;
            };
            self.errors
                .push(f64::from(u8::from(canary.failed)) - f64::from(u8::from(baseline.failed)));
            if let Some(t) = threshold {
                let slow_canary = canary.latency.as_secs_f64()
                    > t.as_secs_f64() * (1.0 + self.latency_margin)
                    && canary.latency > t + LATENCY_SLACK;
                let slow_baseline = baseline.latency > t;
                self.latency
                    .push(f64::from(u8::from(slow_canary)) - f64::from(u8::from(slow_baseline)));
            }
        }
    }

    /// The harm found so far, if any (each test at `alpha / 2`).
    pub fn harm(&self) -> Option<Harm> {
        if self.errors.rejects(self.alpha / 2.0) {
            Some(Harm::ErrorRate)
        } else if self.latency.rejects(self.alpha / 2.0) {
            Some(Harm::Latency)
        } else {
            None
        }
    }

    /// The error-rate test's evidence.
    pub fn error_evidence(&self) -> f64 {
        self.errors.evidence()
    }

    /// The latency test's evidence.
    pub fn latency_evidence(&self) -> f64 {
        self.latency.evidence()
    }

    /// The evidence a test needs to roll back.
    pub fn threshold_evidence(&self) -> f64 {
        2.0 / self.alpha
    }

    /// The baseline's recent p95.
    pub fn baseline_p95(&self) -> Option<Duration> {
        self.baseline_window.quantile(0.95)
    }

    /// The canary's recent p95.
    pub fn canary_p95(&self) -> Option<Duration> {
        self.canary_window.quantile(0.95)
    }

    /// Pairs compared.
    pub fn pairs(&self) -> u64 {
        self.errors.pairs()
    }

    /// A sentence naming the metric and the numbers, for a rollback reason.
    pub fn explain(&self, harm: Harm, error_margin: f64, confidence: f64) -> String {
        let ms =
            |d: Option<Duration>| d.map_or("n/a".to_owned(), |d| format!("{}ms", d.as_millis()));
        match harm {
            Harm::ErrorRate => format!(
                "error rate: new version {:.1}% ({} of {} calls) vs old version {:.1}% ({} of {} calls), margin {:.1} points; sequential test evidence {:.1} >= {:.1} (confidence {:.1}%, {} pairs)",
                self.canary.rate() * 100.0,
                self.canary.errors,
                self.canary.calls,
                self.baseline.rate() * 100.0,
                self.baseline.errors,
                self.baseline.calls,
                error_margin * 100.0,
                self.error_evidence(),
                self.threshold_evidence(),
                confidence * 100.0,
                self.pairs(),
            ),
            Harm::Latency => format!(
                "p95 latency: new version {} vs old version {} ({} vs {} calls), margin {:.0}%; sequential test evidence {:.1} >= {:.1} (confidence {:.1}%, {} pairs)",
                ms(self.canary_p95()),
                ms(self.baseline_p95()),
                self.canary.calls,
                self.baseline.calls,
                self.latency_margin * 100.0,
                self.latency_evidence(),
                self.threshold_evidence(),
                confidence * 100.0,
                self.latency.pairs(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small seeded generator (xorshift64*), so trials are reproducible.
    struct Rng(u64);

    impl Rng {
        fn unit(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn obs(rng: &mut Rng, error_rate: f64, latency_ms: f64) -> Observation {
        // Latency: exponential-ish tail around the given median.
        let u = rng.unit().max(1e-12);
        Observation {
            failed: rng.unit() < error_rate,
            latency: Duration::from_secs_f64(latency_ms * (1.0 - u.ln()) / 1000.0),
        }
    }

    /// Feeds `calls` calls with `share` of them to the canary; returns the call at which
    /// the test found harm.
    fn run(
        seed: u64,
        calls: usize,
        share: f64,
        canary: (f64, f64),
        baseline: (f64, f64),
    ) -> Option<(usize, Harm)> {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut test = Sequential::new(0.95, 0.02, 0.2);
        for i in 0..calls {
            if rng.unit() < share {
                let o = obs(&mut rng, canary.0, canary.1);
                test.canary(o);
            } else {
                let o = obs(&mut rng, baseline.0, baseline.1);
                test.baseline(o);
            }
            if let Some(h) = test.harm() {
                return Some((i, h));
            }
        }
        None
    }

    #[test]
    fn a_canary_failing_20_percent_is_caught() {
        for seed in 0..50 {
            let found = run(seed, 2_000, 0.25, (0.2, 100.0), (0.0, 100.0));
            let (at, harm) = found.unwrap_or_else(|| panic!("seed {seed}: not caught"));
            assert_eq!(harm, Harm::ErrorRate, "seed {seed}");
            // About 50-100 canary calls at a quarter of the traffic.
            assert!(at < 1_000, "seed {seed}: caught only at call {at}");
        }
    }

    #[test]
    fn a_slow_canary_is_caught_on_latency() {
        for seed in 0..20 {
            let found = run(seed, 3_000, 0.5, (0.0, 200.0), (0.0, 100.0));
            let (_, harm) = found.unwrap_or_else(|| panic!("seed {seed}: not caught"));
            assert_eq!(harm, Harm::Latency, "seed {seed}");
        }
    }

    #[test]
    fn identical_versions_are_rarely_rolled_back() {
        // 200 seeded trials of identical versions (3 % errors each), 1,500 calls each: the
        // false-rollback rate stays under alpha = 5 %.
        let trials: u32 = 200;
        let mut rolled_back = 0u32;
        for seed in 0..trials {
            if run(
                u64::from(seed) + 1_000,
                3_000,
                0.3,
                (0.03, 100.0),
                (0.03, 100.0),
            )
            .is_some()
            {
                rolled_back += 1;
            }
        }
        let rate = f64::from(rolled_back) / f64::from(trials);
        assert!(rate < 0.05, "false rollbacks: {rolled_back} of {trials}");
    }

    #[test]
    fn a_canary_within_the_margin_is_kept() {
        // One point worse with a margin of two: not harm.
        let mut kept = 0;
        for seed in 0..50 {
            if run(seed + 5_000, 1_500, 0.5, (0.04, 100.0), (0.03, 100.0)).is_none() {
                kept += 1;
            }
        }
        assert!(kept >= 48, "kept {kept} of 50");
    }

    #[test]
    fn betting_wealth_never_goes_negative() {
        let mut b = Betting::new(0.02);
        for i in 0..1000 {
            b.push(if i % 3 == 0 { -1.0 } else { 1.0 });
            assert!(b.evidence() > 0.0);
        }
        assert!(b.rejects(0.05));
    }

    #[test]
    fn quantile_is_nearest_rank() {
        let mut w = Window::default();
        assert_eq!(w.quantile(0.95), None);
        for ms in 1..=100 {
            w.push(Duration::from_millis(ms));
        }
        assert_eq!(w.quantile(0.95), Some(Duration::from_millis(95)));
        assert_eq!(w.quantile(0.0), Some(Duration::from_millis(1)));
    }

    #[test]
    fn the_reason_names_the_metric_and_the_numbers() {
        let mut t = Sequential::new(0.95, 0.02, 0.2);
        for i in 0..200 {
            t.baseline(Observation {
                failed: false,
                latency: Duration::from_millis(10),
            });
            t.canary(Observation {
                failed: i % 5 == 0,
                latency: Duration::from_millis(10),
            });
        }
        assert_eq!(t.harm(), Some(Harm::ErrorRate));
        let reason = t.explain(Harm::ErrorRate, 0.02, 0.95);
        assert!(reason.starts_with("error rate: new version 20.0% (40 of 200 calls) vs old version 0.0% (0 of 200 calls)"), "{reason}");
    }
}
