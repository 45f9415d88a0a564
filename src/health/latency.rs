//! The latency distribution of one target over a sliding window, as a log-linear histogram
//! that also holds censored observations.
//!
//! An attempt that was cancelled (a hedge won, the call ended) or cut off by its timeout did
//! not show its latency, only that it was at least the time it ran: a right-censored
//! observation. Dropping those biases every percentile low (the slow attempts are exactly the
//! ones that get cancelled); recording them as if they had finished does too, less. Quantiles
//! here are read from the Kaplan-Meier estimate of the distribution, which uses both kinds
//! without bias when the censoring time does not depend on the attempt's own latency (true for
//! a hedge: when it wins depends on the hedge's latency). A quantile beyond the last exact
//! observation cannot be estimated (only censored ones are left above it): it lies between
//! that observation and the largest censored time, and is read by spreading the unseen mass
//! evenly over that span. So a hedge delay climbs quickly towards a percentile far beyond
//! what it sees finish, and settles just above a cluster of fast answers when only rare
//! outliers (all hedged) lie beyond it.
//!
//! Samples enter and leave in O(1) (a counter per bucket, and one per group of 32 buckets);
//! a quantile is one pass over the 32 groups that steps into the occupied ones only. Buckets are 1/32 of an octave wide, from 1 us to about 19 hours; a quantile
//! reads as its bucket's upper edge (at most about 3% above the truth, never below).

use std::{collections::VecDeque, time::Duration};

use tokio::time::Instant;

/// Sub-buckets per octave, as a power of two.
const SUB_BITS: u32 = 5;
const SUB: usize = 1 << SUB_BITS;
/// Highest octave (most significant bit of the value in microseconds).
const MAX_BIT: u32 = 35;
const BUCKETS: usize = (MAX_BIT as usize - SUB_BITS as usize + 2) * SUB;
/// Buckets per occupancy group.
const GROUP: usize = 32;
const GROUPS: usize = BUCKETS.div_ceil(GROUP);

/// The bucket of a value in microseconds.
fn bucket_of(micros: u64) -> usize {
    let v = micros.min((1u64 << (MAX_BIT + 1)) - 1);
    if v < SUB as u64 {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let mantissa = (v >> (msb - SUB_BITS)) as usize;
    (msb - SUB_BITS + 1) as usize * SUB + mantissa - SUB
}

/// The value a bucket stands for: its upper edge, so that a quantile is never read below the
/// values it covers (a hedge delay at the p95 of tightly clustered latencies must not fire
/// inside the cluster).
fn value_of(bucket: usize) -> Duration {
    if bucket < SUB {
        return Duration::from_micros(bucket as u64);
    }
    let octave = (bucket / SUB) as u32; // >= 1
    let mantissa = (bucket % SUB + SUB) as u64;
    let shift = octave - 1;
    let low = mantissa << shift;
    let width = 1u64 << shift;
    Duration::from_micros(low + width - 1)
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    at: Instant,
    bucket: u16,
    censored: bool,
}

/// A sliding window of latency observations, exact and censored.
#[derive(Debug)]
pub(super) struct LatencyWindow {
    entries: VecDeque<Entry>,
    exact: Box<[u32]>,
    censored: Box<[u32]>,
    /// Observations (exact and censored) per group of [`GROUP`] buckets.
    groups: Box<[u32]>,
    /// Exact observations in the window.
    exact_count: usize,
}

impl Default for LatencyWindow {
    fn default() -> Self {
        Self {
            entries: VecDeque::new(),
            exact: vec![0; BUCKETS].into_boxed_slice(),
            censored: vec![0; BUCKETS].into_boxed_slice(),
            groups: vec![0; GROUPS].into_boxed_slice(),
            exact_count: 0,
        }
    }
}

impl LatencyWindow {
    /// Adds an observation (`censored`: the latency was at least `value`), then drops what
    /// falls out of the window (more than `size` entries, or older than `age`).
    pub(super) fn push(
        &mut self,
        value: Duration,
        censored: bool,
        now: Instant,
        size: usize,
        age: Duration,
    ) {
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        let bucket = bucket_of(micros);
        self.counts(censored)[bucket] += 1;
        self.groups[bucket / GROUP] += 1;
        self.exact_count += usize::from(!censored);
        self.entries.push_back(Entry {
            at: now,
            bucket: u16::try_from(bucket).unwrap_or(u16::MAX),
            censored,
        });
        while self.entries.len() > size.max(1)
            || self
                .entries
                .front()
                .is_some_and(|e| now.duration_since(e.at) > age)
        {
            if let Some(old) = self.entries.pop_front() {
                let bucket = usize::from(old.bucket);
                let counts = self.counts(old.censored);
                let slot = &mut counts[bucket];
                *slot = slot.saturating_sub(1);
                let group = &mut self.groups[bucket / GROUP];
                *group = group.saturating_sub(1);
                if !old.censored {
                    self.exact_count = self.exact_count.saturating_sub(1);
                }
            }
        }
    }

    fn counts(&mut self, censored: bool) -> &mut [u32] {
        if censored {
            &mut self.censored
        } else {
            &mut self.exact
        }
    }

    /// Observations in the window, exact and censored.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Exact observations in the window.
    pub(super) fn exact_len(&self) -> usize {
        self.exact_count
    }

    /// The `p`th percentile (0-100) of the latency (Kaplan-Meier, see the module docs), when
    /// the window has at least one observation.
    pub(super) fn quantile(&self, p: f64) -> Option<Duration> {
        if self.entries.is_empty() {
            return None;
        }
        let q = (p / 100.0).clamp(0.0, 1.0);
        let mut at_risk = self.entries.len() as f64;
        let mut survival = 1.0f64;
        let mut last_seen = None;
        let mut last_exact = None;
        // Empty buckets change nothing: skip the empty groups whole.
        let occupied = self
            .groups
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .flat_map(|(g, _)| g * GROUP..((g + 1) * GROUP).min(BUCKETS));
        for bucket in occupied {
            let (d, c) = (self.exact[bucket], self.censored[bucket]);
            if d == 0 && c == 0 {
                continue;
            }
            last_seen = Some(bucket);
            if d > 0 {
                last_exact = Some(bucket);
            }
            if d > 0 && at_risk > 0.0 {
                survival *= 1.0 - f64::from(d) / at_risk;
                // A small tolerance, so that e.g. the 50th percentile of 1..=100 is 50 and not
                // 51 through rounding.
                if 1.0 - survival >= q - 1e-9 {
                    return Some(value_of(bucket));
                }
            }
            at_risk -= f64::from(d) + f64::from(c);
            if at_risk <= 0.0 {
                break;
            }
        }
        // Beyond the last exact observation only censored ones are left: the quantile lies
        // between it and the largest censored time; assume the unseen mass spread evenly
        // over that span.
        let (Some(exact), Some(seen)) = (last_exact, last_seen) else {
            return last_seen.map(value_of);
        };
        let (low, high) = (value_of(exact), value_of(seen));
        let missing = 1.0 - survival;
        if high <= low || survival <= 0.0 {
            return Some(low);
        }
        let share = ((q - missing) / survival).clamp(0.0, 1.0);
        Some(low + (high - low).mul_f64(share))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: usize = 100_000;
    const AGE: Duration = Duration::from_secs(3600);

    fn ms(v: f64) -> Duration {
        Duration::from_secs_f64(v / 1000.0)
    }

    fn close(a: Duration, b: Duration) -> bool {
        let (a, b) = (a.as_secs_f64(), b.as_secs_f64());
        (a - b).abs() <= 0.035 * b.max(1e-6)
    }

    #[test]
    fn buckets_read_at_most_three_percent_high_never_low() {
        for micros in [
            0u64, 1, 31, 32, 33, 63, 64, 100, 1_000, 12_345, 987_654, 60_000_000,
        ] {
            let v = value_of(bucket_of(micros)).as_micros() as u64;
            assert!(v >= micros, "{micros} -> {v}");
            assert!(
                (v - micros) as f64 <= micros as f64 / 32.0,
                "{micros} -> {v}"
            );
        }
        // Monotone: a larger value never lands in a smaller bucket.
        let mut last = 0;
        for micros in (0..5_000_000u64).step_by(997) {
            let b = bucket_of(micros);
            assert!(b >= last);
            last = b;
        }
        assert!(bucket_of(u64::MAX) < BUCKETS);
    }

    #[tokio::test(start_paused = true)]
    async fn exact_samples_give_the_plain_percentile() {
        let mut w = LatencyWindow::default();
        let now = Instant::now();
        for i in 1..=100 {
            w.push(ms(f64::from(i)), false, now, SIZE, AGE);
        }
        assert!(close(w.quantile(50.0).unwrap(), ms(50.0)));
        assert!(close(w.quantile(95.0).unwrap(), ms(95.0)));
        assert!(close(w.quantile(100.0).unwrap(), ms(100.0)));
        assert_eq!(w.len(), 100);
    }

    /// The case hedging creates: an attempt slower than the hedge delay is cancelled once the
    /// hedge wins, so only its lower bound is seen. Dropping those samples reads every
    /// percentile low; the estimate here finds the real ones as far as anything finished.
    #[tokio::test(start_paused = true)]
    async fn censored_samples_do_not_bias_the_percentile_low() {
        let mut w = LatencyWindow::default();
        let now = Instant::now();
        // Latencies 1..=1000 ms, uniform; attempts over 300 ms are cancelled between 350 and
        // 450 ms (when the hedge answered), or finish first when faster than that.
        for i in 1..=1000u32 {
            let latency = f64::from(i);
            let censor_at = 350.0 + f64::from(i % 100);
            if latency > 300.0 && latency > censor_at {
                w.push(ms(censor_at), true, now, SIZE, AGE);
            } else {
                w.push(ms(latency), false, now, SIZE, AGE);
            }
        }
        // Below the censoring times the estimate is exact.
        assert!(close(w.quantile(30.0).unwrap(), ms(300.0)));
        // Among them too: the real p35 is 350 ms (the finished samples alone say 140 ms).
        assert!(close(w.quantile(35.0).unwrap(), ms(350.0)));
        // Beyond the last finished attempt (399 ms) it cannot see: the estimate lies between
        // that and the largest censored time (449 ms), near the latter for a far percentile.
        let p95 = w.quantile(95.0).unwrap();
        assert!(p95 >= ms(430.0) && p95 <= ms(455.0), "{p95:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn censored_samples_between_events_are_accounted_for() {
        let mut w = LatencyWindow::default();
        let now = Instant::now();
        // Half the attempts take 100 ms, half 1000 ms; a fifth of the slow ones are cancelled
        // at 500 ms. The real median is between the two; p75 is 1000 ms.
        for i in 0..100 {
            w.push(ms(100.0), false, now, SIZE, AGE);
            if i % 5 == 0 {
                w.push(ms(500.0), true, now, SIZE, AGE);
            } else {
                w.push(ms(1000.0), false, now, SIZE, AGE);
            }
        }
        assert!(close(w.quantile(75.0).unwrap(), ms(1000.0)));
        assert!(close(w.quantile(40.0).unwrap(), ms(100.0)));
        // Censored samples at their lower bound would have put p55 at 500 ms.
        assert!(close(w.quantile(55.0).unwrap(), ms(1000.0)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_forgets_by_size_and_age() {
        let mut w = LatencyWindow::default();
        let t0 = Instant::now();
        for _ in 0..10 {
            w.push(ms(500.0), false, t0, 10, Duration::from_secs(60));
        }
        for _ in 0..10 {
            w.push(ms(5.0), false, t0, 10, Duration::from_secs(60));
        }
        assert_eq!(w.len(), 10);
        assert!(close(w.quantile(99.0).unwrap(), ms(5.0)));
        w.push(
            ms(50.0),
            true,
            t0 + Duration::from_secs(61),
            10,
            Duration::from_secs(60),
        );
        assert_eq!((w.len(), w.exact_len()), (1, 0));
        assert!(close(w.quantile(50.0).unwrap(), ms(50.0)));
    }

    #[test]
    fn group_counts_and_exact_count_follow_the_window() {
        let mut w = LatencyWindow::default();
        let t0 = Instant::now();
        for i in 0..5_000u64 {
            // Spread over many octaves, a third censored, the window holding 300.
            let value = Duration::from_micros((i * 7_919) % 3_000_000 + 1);
            w.push(value, i % 3 == 0, t0, 300, AGE);
            if i % 97 == 0 {
                for (g, &n) in w.groups.iter().enumerate() {
                    let range = g * GROUP..((g + 1) * GROUP).min(BUCKETS);
                    let sum: u32 = range.map(|b| w.exact[b] + w.censored[b]).sum();
                    assert_eq!(n, sum, "group {g} after {i}");
                }
                let exact = w.entries.iter().filter(|e| !e.censored).count();
                assert_eq!(w.exact_len(), exact);
            }
        }
    }
}
