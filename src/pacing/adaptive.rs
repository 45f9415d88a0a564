//! The adaptive concurrency limit of one target (provider/model): AIMD.
//!
//! - Additive increase: every success that came back without a latency rise adds
//!   `1 / limit` (one per window's worth of calls), while the limit was in use (at least half
//!   of it in flight), up to `max`.
//! - Multiplicative decrease: a 429 or overload halves the limit; a latency rise (the recent
//!   average above `latency_factor` times the baseline) takes 10 % off. At most one decrease
//!   per `cooldown`, so one burst of 429s counts once. Never below `min`.
//!
//! The baseline is a slow average of latencies that showed no rise, so an overload does not
//! become the new normal.
//!
//! With `initial` 0 (the default) a target has no limit until the provider itself signals
//! overload (429, 503, 529): a burst to a healthy provider is never refused for a limit nobody
//! set; that first signal sets the limit from the calls then in flight and halves it. A
//! latency rise alone never engages the limit (the rise may be the gateway's own load, and on a
//! one-target plan a refusal helps no one); it only tightens a limit already in force.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use super::AdaptiveSettings;

/// Successes before the latency signal is trusted.
const WARMUP: u32 = 20;

#[derive(Debug)]
struct State {
    limit: f64,
    /// Whether the limit applies (from the start with a configured `initial`, else from the
    /// first decrease).
    engaged: bool,
    in_flight: usize,
    last_decrease: Option<Instant>,
    /// Slow average latency (seconds) of calls without a rise.
    baseline: Option<f64>,
    /// Fast average latency (seconds).
    recent: Option<f64>,
    samples: u32,
}

/// One target's limit and the calls it has in flight.
#[derive(Debug)]
pub struct Adaptive {
    settings: AdaptiveSettings,
    state: Mutex<State>,
}

/// What an attempt's answer says about the target's load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Signal {
    /// It answered (status 2xx) after this long (to the response head).
    Answered(Duration),
    /// It said it was rate limited or overloaded (429, 503, 529).
    Overloaded,
}

/// A slot in flight; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    adaptive: Arc<Adaptive>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.adaptive.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
    }
}

impl Adaptive {
    /// A target's limit, starting at `settings.initial`.
    pub fn new(settings: AdaptiveSettings) -> Self {
        Self {
            state: Mutex::new(State {
                limit: f64::from(settings.initial.max(1)),
                engaged: settings.initial > 0,
                in_flight: 0,
                last_decrease: None,
                baseline: None,
                recent: None,
                samples: 0,
            }),
            settings,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current limit (`max` while none applies yet).
    pub fn limit(&self) -> usize {
        let s = self.lock();
        match s.engaged {
            true => s.limit.floor() as usize,
            false => self.settings.max as usize,
        }
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// Takes a slot when fewer than the limit are in flight.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let mut s = self.lock();
        if s.engaged && s.in_flight as f64 >= s.limit.floor().max(1.0) {
            return None;
        }
        s.in_flight += 1;
        Some(Slot {
            adaptive: self.clone(),
        })
    }

    /// Adjusts the limit after an answer.
    pub fn observe(&self, signal: Signal, now: Instant) {
        let (min, max) = (
            f64::from(self.settings.min),
            f64::from(self.settings.max.max(self.settings.min)),
        );
        let mut s = self.lock();
        let may_decrease = s
            .last_decrease
            .is_none_or(|at| now.saturating_duration_since(at) >= self.settings.cooldown);
        // The first decrease of an unlimited target starts from what it carries now.
        let engage = |s: &mut State| {
            if !s.engaged {
                s.engaged = true;
                s.limit = (s.in_flight as f64).clamp(min, max);
            }
        };
        match signal {
            Signal::Overloaded => {
                if may_decrease {
                    engage(&mut s);
                    s.limit = (s.limit * 0.5).max(min);
                    s.last_decrease = Some(now);
                }
            }
            Signal::Answered(latency) => {
                let latency = latency.as_secs_f64();
                s.samples = s.samples.saturating_add(1);
                let recent = s.recent.map_or(latency, |r| r * 0.8 + latency * 0.2);
                s.recent = Some(recent);
                let rose = s.samples > WARMUP
                    && s.baseline
                        .is_some_and(|b| recent > b * self.settings.latency_factor);
                if rose {
                    // A latency rise alone never engages a limit: it may be the gateway's
                    // own load (a burst on these cores), and refusing then helps no one. It
                    // only tightens a limit a provider's own signal (429, 503/529) set.
                    if may_decrease && s.engaged {
                        s.limit = (s.limit * 0.9).max(min);
                        s.last_decrease = Some(now);
                    }
                } else {
                    s.baseline = Some(s.baseline.map_or(latency, |b| b * 0.99 + latency * 0.01));
                    if s.engaged && s.in_flight as f64 * 2.0 >= s.limit {
                        s.limit = (s.limit + 1.0 / s.limit.max(1.0)).min(max);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AdaptiveSettings {
        AdaptiveSettings {
            initial: 8,
            min: 1,
            max: 16,
            latency_factor: 2.0,
            cooldown: Duration::from_secs(1),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn halves_on_overload_once_per_cooldown_and_grows_back_while_used() {
        let a = Arc::new(Adaptive::new(settings()));
        let slots: Vec<Slot> = (0..8).filter_map(|_| a.try_acquire()).collect();
        assert_eq!(slots.len(), 8);
        assert!(a.try_acquire().is_none());
        let now = Instant::now();
        a.observe(Signal::Overloaded, now);
        a.observe(Signal::Overloaded, now);
        assert_eq!(a.limit(), 4);
        tokio::time::advance(Duration::from_secs(1)).await;
        a.observe(Signal::Overloaded, Instant::now());
        assert_eq!(a.limit(), 2);
        drop(slots);
        assert_eq!(a.in_flight(), 0);
        // Successes while the limit is in use add one per limit's worth.
        let _held: Vec<Slot> = (0..2).filter_map(|_| a.try_acquire()).collect();
        for _ in 0..5 {
            a.observe(Signal::Answered(Duration::from_millis(10)), Instant::now());
        }
        assert!(a.limit() >= 3, "{}", a.limit());
    }

    #[tokio::test(start_paused = true)]
    async fn a_latency_rise_takes_a_tenth_off() {
        let a = Arc::new(Adaptive::new(settings()));
        for _ in 0..30 {
            a.observe(Signal::Answered(Duration::from_millis(10)), Instant::now());
        }
        let before = a.limit();
        for _ in 0..10 {
            a.observe(Signal::Answered(Duration::from_millis(100)), Instant::now());
        }
        assert!(a.limit() < before, "{} {before}", a.limit());
        assert!(a.limit() >= 1);
    }

    #[tokio::test(start_paused = true)]
    async fn without_an_initial_limit_a_burst_passes_until_the_first_overload() {
        let a = Arc::new(Adaptive::new(AdaptiveSettings {
            initial: 0,
            max: 4096,
            ..settings()
        }));
        let slots: Vec<Slot> = (0..5_000).filter_map(|_| a.try_acquire()).collect();
        assert_eq!(slots.len(), 5_000, "no limit applies before a signal");
        assert_eq!(a.limit(), 4096);
        // The first overload starts the limit from the calls in flight (within max), halved.
        a.observe(Signal::Overloaded, Instant::now());
        assert_eq!(a.limit(), 2048);
        assert!(a.try_acquire().is_none());
        drop(slots);
        assert!(a.try_acquire().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_latency_rise_alone_never_engages_a_limit_nobody_set() {
        let a = Arc::new(Adaptive::new(AdaptiveSettings {
            initial: 0,
            max: 4096,
            ..settings()
        }));
        let slots: Vec<Slot> = (0..300).filter_map(|_| a.try_acquire()).collect();
        for _ in 0..30 {
            a.observe(Signal::Answered(Duration::from_millis(10)), Instant::now());
        }
        // The gateway's own burst makes every answer 10x slower: no limit follows.
        for _ in 0..50 {
            tokio::time::advance(Duration::from_secs(1)).await;
            a.observe(Signal::Answered(Duration::from_millis(100)), Instant::now());
        }
        assert_eq!(a.limit(), 4096);
        assert!(a.try_acquire().is_some(), "nothing is refused");
        // Once the provider itself says it is overloaded, the limit applies, and a latency
        // rise then tightens it.
        a.observe(Signal::Overloaded, Instant::now());
        let engaged = a.limit();
        assert!(engaged < 301, "{engaged}");
        tokio::time::advance(Duration::from_secs(1)).await;
        a.observe(Signal::Answered(Duration::from_millis(100)), Instant::now());
        assert!(a.limit() < engaged, "{} {engaged}", a.limit());
        drop(slots);
    }
}
