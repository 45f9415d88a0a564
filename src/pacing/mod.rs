//! Outbound smoothing: the gateway paces what it sends to each provider account so that a
//! burst is spread inside the account's limits instead of earning 429s.
//!
//! - **Accounts.** A provider account is one provider key, and the model too where the
//!   provider limits per model (`per_model`, on by default: OpenAI, Anthropic and Gemini all
//!   do). Each has a bucket of requests and one of tokens per minute ([`limiter`]): the
//!   limits come from the provider's config (`[providers.NAME] pacing = { ... }`,
//!   [`AccountLimits`]) or are learned from the provider's own answers ([`Observation`]:
//!   `x-ratelimit-*` and `anthropic-ratelimit-*` headers on every response, a 429's
//!   `retry-after`, Gemini's `RESOURCE_EXHAUSTED` quota details). What is left and when it
//!   resets is learned from every response either way.
//! - **Admission.** Before an attempt the executor asks [`Pacer::admit`] with the latest time
//!   the attempt may start and still finish within the call's deadline. The account that
//!   can start soonest is chosen (ties: the one with the most left, so load spreads over the
//!   keys); its capacity is taken, and the attempt waits until then. When no account can
//!   start in time, the target is skipped at once (`NO_CAPACITY` in the route) and the call
//!   moves to its next target.
//! - **Adaptive concurrency** per target (provider/model, [`adaptive`]): AIMD on 429s and
//!   latency keeps the gateway under limits nobody told it. A target at its limit is
//!   skipped (`CONCURRENCY_LIMIT`).
//!
//! Capacity lives behind the [`Limiter`] trait: [`LocalLimiter`] keeps it in this process;
//! with `[shared] redis_url`, [`SharedLimiter`] keeps it in Redis for every replica
//! ([`shared`]: capacity leased in chunks, learned limits shared, local limits while Redis
//! is unreachable).

pub mod adaptive;
pub mod limiter;
pub mod shared;

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

pub use self::adaptive::{Adaptive, Signal, Slot};
pub use self::limiter::{AccountId, Limiter, LocalLimiter, Pending, Reservation};
pub use self::shared::SharedLimiter;
use crate::settings::Issues;

/// One rate-limit window as a provider reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Window {
    /// The limit (per minute).
    pub limit: Option<f64>,
    /// What is left.
    pub remaining: Option<f64>,
    /// Until the window is full again.
    pub reset: Option<Duration>,
}

/// What one provider answer said about its account's limits.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Observation {
    /// The requests window.
    pub requests: Option<Window>,
    /// The tokens window.
    pub tokens: Option<Window>,
    /// A rate limit's wait: nothing may start before it passes.
    pub retry_after: Option<Duration>,
}

impl Observation {
    /// Whether it says anything.
    pub fn is_empty(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none() && self.retry_after.is_none()
    }
}

/// The limits of each account of one provider (`[providers.NAME] pacing = { ... }`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountLimits {
    /// Requests per minute per account; `None`: learned from the provider's headers.
    pub requests_per_minute: Option<u64>,
    /// Tokens (input + expected output) per minute per account; `None`: learned.
    pub tokens_per_minute: Option<u64>,
    /// Whether an account is a key and a model (the provider limits per model) rather than a
    /// key alone.
    pub per_model: bool,
}

impl Default for AccountLimits {
    fn default() -> Self {
        Self {
            requests_per_minute: None,
            tokens_per_minute: None,
            per_model: true,
        }
    }
}

/// `[providers.NAME] pacing = { ... }` as written.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccountLimits {
    /// `pacing.requests_per_minute`.
    pub requests_per_minute: Option<u64>,
    /// `pacing.tokens_per_minute`.
    pub tokens_per_minute: Option<u64>,
    /// `pacing.per_model`.
    pub per_model: Option<bool>,
}

impl AccountLimits {
    /// Validates a provider's `pacing` table: each problem as (field under `pacing`, message).
    pub fn from_raw(raw: Option<RawAccountLimits>) -> Result<Self, Vec<(String, String)>> {
        let raw = raw.unwrap_or_default();
        let mut problems = Vec::new();
        for (field, value) in [
            ("requests_per_minute", raw.requests_per_minute),
            ("tokens_per_minute", raw.tokens_per_minute),
        ] {
            if value == Some(0) {
                problems.push((format!("pacing.{field}"), "must be above 0".to_owned()));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Self {
            requests_per_minute: raw.requests_per_minute,
            tokens_per_minute: raw.tokens_per_minute,
            per_model: raw.per_model.unwrap_or(true),
        })
    }
}

/// The adaptive concurrency limit's settings (`[pacing]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveSettings {
    /// The limit a target starts with; 0: none until the target first signals overload (a
    /// 429 or 503/529; a latency rise alone does not), when the limit starts from the calls it
    /// then has in flight.
    pub initial: u32,
    /// The least it goes down to.
    pub min: u32,
    /// The most it grows to.
    pub max: u32,
    /// A recent average latency above this many times the baseline is a rise (0: latency is
    /// not a signal).
    pub latency_factor: f64,
    /// At most one decrease per this long.
    pub cooldown: Duration,
}

/// Settings of outbound smoothing (`[pacing]`).
#[derive(Debug, Clone, PartialEq)]
pub struct PacingSettings {
    /// Whether the gateway paces at all (limits, learning and adaptive concurrency).
    pub enabled: bool,
    /// The adaptive concurrency limit per target; `None` when off.
    pub adaptive: Option<AdaptiveSettings>,
}

impl Default for PacingSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            adaptive: Some(AdaptiveSettings {
                initial: 0,
                min: 4,
                max: 4096,
                latency_factor: 5.0,
                cooldown: Duration::from_secs(1),
            }),
        }
    }
}

/// `[pacing]` as written.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPacing {
    /// `pacing.enabled`.
    pub enabled: Option<bool>,
    /// `pacing.adaptive_concurrency`.
    pub adaptive_concurrency: Option<bool>,
    /// `pacing.initial_concurrency`.
    pub initial_concurrency: Option<u32>,
    /// `pacing.min_concurrency`.
    pub min_concurrency: Option<u32>,
    /// `pacing.max_concurrency`.
    pub max_concurrency: Option<u32>,
    /// `pacing.latency_factor`.
    pub latency_factor: Option<f64>,
    /// `pacing.decrease_cooldown`.
    pub decrease_cooldown: Option<String>,
}

impl PacingSettings {
    /// Validates `[pacing]`; unset fields keep their defaults.
    pub fn from_raw(raw: RawPacing, issues: &mut Issues) -> Self {
        let d = PacingSettings::default();
        let Some(da) = d.adaptive else {
            return d;
        };
        let mut count = |field: &str, value: Option<u32>, default: u32| match value {
            Some(0) => {
                issues.push(format!("pacing.{field}"), "must be above 0");
                default
            }
            Some(n) => n,
            None => default,
        };
        let min = count("min_concurrency", raw.min_concurrency, da.min);
        let max = count("max_concurrency", raw.max_concurrency, da.max);
        // 0 is allowed here: no limit until the first overload signal.
        let initial = raw.initial_concurrency.unwrap_or(da.initial);
        if min > max || (initial != 0 && !(min..=max).contains(&initial)) {
            issues.push(
                "pacing.initial_concurrency",
                "must be 0 (no limit until the first overload) or between min_concurrency and max_concurrency",
            );
        }
        let latency_factor = match raw.latency_factor {
            Some(f) if f != 0.0 && !(f > 1.0 && f.is_finite()) => {
                issues.push("pacing.latency_factor", "must be 0 (off) or above 1");
                da.latency_factor
            }
            Some(f) => f,
            None => da.latency_factor,
        };
        let adaptive = AdaptiveSettings {
            initial,
            min,
            max,
            latency_factor: if latency_factor == 0.0 {
                f64::INFINITY
            } else {
                latency_factor
            },
            cooldown: issues.duration(
                "pacing.decrease_cooldown",
                raw.decrease_cooldown.as_deref(),
                da.cooldown,
            ),
        };
        PacingSettings {
            enabled: raw.enabled.unwrap_or(d.enabled),
            adaptive: raw.adaptive_concurrency.unwrap_or(true).then_some(adaptive),
        }
    }
}

/// The pacing of one provider: its accounts' limits and each target's concurrency.
#[derive(Debug)]
pub struct Pacer {
    provider: String,
    limits: AccountLimits,
    adaptive: Option<AdaptiveSettings>,
    limiter: Arc<dyn Limiter>,
    targets: Mutex<HashMap<String, Arc<Adaptive>>>,
}

/// What [`Pacer::admit`] decided.
#[derive(Debug)]
pub enum Admit {
    /// Go: the attempt starts at the lease's time, with its account.
    Go(Lease),
    /// Skip the target.
    Skip {
        /// The route's reason (`NO_CAPACITY`, `CONCURRENCY_LIMIT`).
        reason: &'static str,
        /// When capacity comes back, when known.
        ready_at: Option<Instant>,
    },
}

/// An admitted attempt's place: when it starts, the account key it must use, and its
/// concurrency slot (freed when the lease is dropped).
#[derive(Debug)]
pub struct Lease {
    /// When the attempt may start.
    pub start_at: Instant,
    /// The fingerprint of the key whose capacity was taken (`None`: any key).
    pub key: Option<u64>,
    /// A reservation the shared limiter completes before the attempt starts ([`run`]).
    pending: Option<Pending>,
    _slot: Option<Slot>,
}

impl Pacer {
    /// The pacer of provider `provider`, with its accounts' limits, keeping capacity in
    /// `limiter`.
    pub fn new(
        provider: impl Into<String>,
        limits: AccountLimits,
        settings: &PacingSettings,
        limiter: Arc<dyn Limiter>,
    ) -> Self {
        Self {
            provider: provider.into(),
            limits,
            adaptive: settings.adaptive,
            limiter,
            targets: Mutex::default(),
        }
    }

    /// Where the accounts' capacity is kept.
    pub fn limiter(&self) -> &Arc<dyn Limiter> {
        &self.limiter
    }

    /// The account of `key` and `model`.
    pub fn account(&self, key: u64, model: &str) -> AccountId {
        AccountId {
            provider: self.provider.clone(),
            key,
            model: self.limits.per_model.then(|| model.to_owned()),
        }
    }

    fn target(&self, model: &str) -> Option<Arc<Adaptive>> {
        let settings = self.adaptive?;
        let mut targets = self
            .targets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(t) = targets.get(model) {
            return Some(t.clone());
        }
        let t = Arc::new(Adaptive::new(settings));
        targets.insert(model.to_owned(), t.clone());
        Some(t)
    }

    /// Admits an attempt on `model` of `tokens` (input plus expected output) that must
    /// start by `latest`, over the accounts of `keys` (fingerprints of the keys not resting;
    /// empty for a provider without keys).
    pub fn admit(
        &self,
        keys: &[u64],
        model: &str,
        tokens: u64,
        now: Instant,
        latest: Instant,
    ) -> Admit {
        let slot = match self.target(model) {
            Some(t) => match t.try_acquire() {
                Some(slot) => Some(slot),
                None => {
                    return Admit::Skip {
                        reason: "CONCURRENCY_LIMIT",
                        ready_at: None,
                    };
                }
            },
            None => None,
        };
        let keys: &[u64] = if keys.is_empty() { &[0] } else { keys };
        // The account that can start soonest; ties go to the one with the most left. With
        // one account (one key, the common case) there is nothing to compare.
        let mut best: Option<(Instant, f64, u64)> = match keys {
            [only] => Some((now, 0.0, *only)),
            _ => None,
        };
        for &key in keys.iter().filter(|_| keys.len() > 1) {
            let account = self.account(key, model);
            let ready = self.limiter.ready_at(&account, &self.limits, tokens, now);
            let room = self.limiter.headroom(&account, &self.limits, now);
            let better = match best {
                None => true,
                Some((r, h, _)) => ready < r || (ready == r && room > h),
            };
            if better {
                best = Some((ready, room, key));
            }
        }
        let Some((_, _, key)) = best else {
            return Admit::Skip {
                reason: "NO_CAPACITY",
                ready_at: None,
            };
        };
        let account = self.account(key, model);
        match self
            .limiter
            .reserve(&account, &self.limits, tokens, now, latest)
        {
            Reservation::Granted(start_at) => Admit::Go(Lease {
                start_at,
                key: (key != 0).then_some(key),
                pending: None,
                _slot: slot,
            }),
            Reservation::Pending(pending) => Admit::Go(Lease {
                start_at: now,
                key: (key != 0).then_some(key),
                pending: Some(pending),
                _slot: slot,
            }),
            Reservation::Refused(ready_at) => Admit::Skip {
                reason: "NO_CAPACITY",
                ready_at: Some(ready_at),
            },
        }
    }

    /// Learns from an answer on `key` (fingerprint; 0 without keys) and `model`.
    pub fn observe(&self, key: u64, model: &str, observation: &Observation, now: Instant) {
        if !observation.is_empty() {
            let account = self.account(key, model);
            self.limiter
                .observe(&account, &self.limits, observation, now);
        }
    }

    /// Feeds the target's adaptive concurrency limit.
    pub fn signal(&self, model: &str, signal: Signal, now: Instant) {
        if let Some(t) = self.target(model) {
            t.observe(signal, now);
        }
    }

    /// The target's adaptive concurrency limit and calls in flight, when adaptive.
    pub fn concurrency(&self, model: &str) -> Option<(usize, usize)> {
        self.target(model).map(|t| (t.limit(), t.in_flight()))
    }
}

tokio::task_local! {
    static LEASE: Arc<Lease>;
}

/// Runs an attempt under its lease: waits until the lease's start, then runs `attempt` with
/// the lease visible to the provider ([`current`]: which key to use). A lease the shared
/// limiter could not complete in time ends as `refused(when capacity comes back)` without
/// running `attempt`.
pub async fn run<T, E, F: Future<Output = Result<T, E>>>(
    lease: Option<Lease>,
    attempt: F,
    refused: impl FnOnce(Instant) -> E,
) -> Result<T, E> {
    match lease {
        None => attempt.await,
        Some(mut lease) => {
            if let Some(pending) = lease.pending.take() {
                match pending.wait().await {
                    Ok(start_at) => lease.start_at = start_at,
                    Err(ready_at) => return Err(refused(ready_at)),
                }
            }
            if lease.start_at > Instant::now() {
                tokio::time::sleep_until(lease.start_at).await;
            }
            LEASE.scope(Arc::new(lease), attempt).await
        }
    }
}

/// The lease of the attempt running now, if any (a stream keeps it to hold its slot).
pub fn current() -> Option<Arc<Lease>> {
    LEASE.try_with(Arc::clone).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pacer(limits: AccountLimits, adaptive: Option<AdaptiveSettings>) -> Pacer {
        Pacer::new(
            "p",
            limits,
            &PacingSettings {
                enabled: true,
                adaptive,
            },
            Arc::new(LocalLimiter::new()),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn load_spreads_over_keys_with_capacity_then_waits_or_skips() {
        let p = pacer(
            AccountLimits {
                requests_per_minute: Some(2),
                ..AccountLimits::default()
            },
            None,
        );
        let now = Instant::now();
        let soon = now + Duration::from_secs(1);
        let mut used = Vec::new();
        for _ in 0..4 {
            match p.admit(&[1, 2], "m", 0, now, soon) {
                Admit::Go(lease) => {
                    assert_eq!(lease.start_at, now);
                    used.push(lease.key.unwrap());
                }
                other => panic!("{other:?}"),
            }
        }
        used.sort_unstable();
        assert_eq!(used, [1, 1, 2, 2]);
        // Both accounts empty: the next request on either is 30 s away.
        match p.admit(&[1, 2], "m", 0, now, soon) {
            Admit::Skip { reason, ready_at } => {
                assert_eq!(reason, "NO_CAPACITY");
                assert_eq!(ready_at, Some(now + Duration::from_secs(30)));
            }
            other => panic!("{other:?}"),
        }
        // A caller who can wait 30 s gets a lease starting then.
        match p.admit(&[1, 2], "m", 0, now, now + Duration::from_secs(60)) {
            Admit::Go(lease) => assert_eq!(lease.start_at, now + Duration::from_secs(30)),
            other => panic!("{other:?}"),
        }
        // Per model: another model has its own accounts.
        assert!(matches!(p.admit(&[1], "other", 0, now, now), Admit::Go(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_target_at_its_concurrency_limit_is_skipped() {
        let p = pacer(
            AccountLimits::default(),
            Some(AdaptiveSettings {
                initial: 1,
                min: 1,
                max: 4,
                latency_factor: 3.0,
                cooldown: Duration::from_secs(1),
            }),
        );
        let now = Instant::now();
        let Admit::Go(first) = p.admit(&[], "m", 0, now, now) else {
            panic!("the first attempt is admitted");
        };
        assert!(first.key.is_none());
        assert!(matches!(
            p.admit(&[], "m", 0, now, now),
            Admit::Skip {
                reason: "CONCURRENCY_LIMIT",
                ..
            }
        ));
        drop(first);
        assert!(matches!(p.admit(&[], "m", 0, now, now), Admit::Go(_)));
        assert_eq!(p.concurrency("m"), Some((1, 0)));
    }

    #[tokio::test(start_paused = true)]
    async fn run_waits_for_the_start_and_shows_the_lease() {
        let start = Instant::now() + Duration::from_millis(300);
        let lease = Lease {
            start_at: start,
            key: Some(7),
            pending: None,
            _slot: None,
        };
        let never = |_| -> () { unreachable!() };
        let key = run(
            Some(lease),
            async {
                assert!(Instant::now() >= start);
                Ok(current().and_then(|l| l.key))
            },
            never,
        )
        .await;
        assert_eq!(key, Ok(Some(7)));
        assert!(current().is_none());
        assert_eq!(run(None, async { Ok(1) }, never).await, Ok(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pending_lease_starts_when_it_completes_or_fails_without_running() {
        let now = Instant::now();
        let later = now + Duration::from_millis(200);
        let lease = |result: Result<Instant, Instant>| Lease {
            start_at: now,
            key: None,
            pending: Some(Pending::new(async move { result })),
            _slot: None,
        };
        let started = run(Some(lease(Ok(later))), async { Ok(Instant::now()) }, |at| {
            at
        })
        .await;
        assert_eq!(started, Ok(later));
        // Refused: the attempt does not run.
        let refused = run(Some(lease(Err(later))), async { Ok(true) }, |at| at).await;
        assert_eq!(refused, Err(later));
    }

    #[test]
    fn the_readme_examples_load() {
        let readme = include_str!("../../README.md");
        for heading in ["**Outbound smoothing.**", "**Overload protection.**"] {
            let section = &readme[readme.find(heading).unwrap()..];
            let start = section.find("```toml\n").unwrap() + "```toml\n".len();
            let example = &section[start..start + section[start..].find("```").unwrap()];
            let config = crate::config::Config::from_toml(
                example,
                std::path::Path::new("README.md"),
                &crate::config::Overrides::default(),
                &|name| name.starts_with("OPENAI_KEY").then(|| format!("sk-{name}")),
            )
            .unwrap_or_else(|e| panic!("{heading}: {e}"));
            assert_eq!(config.pacing, PacingSettings::default());
            assert_eq!(
                config.admission,
                crate::server::settings::AdmissionSettings::default()
            );
            if let Some(openai) = config.providers.iter().find(|p| p.name == "openai") {
                assert_eq!(openai.pacing.requests_per_minute, Some(500));
                assert_eq!(openai.api_keys.len(), 2);
            }
        }
    }

    #[test]
    fn settings_validate_and_name_fields() {
        let mut issues = Issues::new();
        let s = PacingSettings::from_raw(
            RawPacing {
                min_concurrency: Some(0),
                latency_factor: Some(0.5),
                ..RawPacing::default()
            },
            &mut issues,
        );
        let fields: Vec<String> = issues.into_vec().into_iter().map(|i| i.field).collect();
        assert_eq!(fields, ["pacing.min_concurrency", "pacing.latency_factor"]);
        assert!(s.enabled);
        let limits = AccountLimits::from_raw(Some(RawAccountLimits {
            requests_per_minute: Some(0),
            ..RawAccountLimits::default()
        }));
        assert_eq!(
            limits.unwrap_err()[0].0,
            "pacing.requests_per_minute".to_owned()
        );
        assert!(AccountLimits::from_raw(None).unwrap().per_model);
    }
}
