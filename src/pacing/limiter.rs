//! The account limiter: a token bucket of requests and one of tokens per provider account,
//! behind the [`Limiter`] trait, with the process-local [`LocalLimiter`].
//!
//! A bucket holds one minute's allowance and refills continuously (`limit / 60` per second),
//! the way OpenAI and Anthropic describe their limits. Reserving takes from it at once, also
//! below zero: a reservation made while the bucket is empty starts when the refill has paid
//! for it, so waiting calls queue in order instead of racing for the next token.

use std::{collections::HashMap, future::Future, pin::Pin, sync::Mutex, time::Duration};

use tokio::time::Instant;

use super::{AccountLimits, Observation, Window};

/// One provider account: a provider key (by fingerprint; 0 for a provider without keys),
/// and the model when the provider limits per model.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AccountId {
    /// The provider's configured name.
    pub provider: String,
    /// The key's fingerprint ([`crate::providers::keys::ProviderKey::fingerprint`]).
    pub key: u64,
    /// The model, when limits are per model.
    pub model: Option<String>,
}

/// What a reservation found.
#[derive(Debug, PartialEq, Eq)]
pub enum Reservation {
    /// Taken: the attempt may start at this time (now, or later when it waits for capacity).
    Granted(Instant),
    /// Not taken: capacity comes back only at this time, later than the caller can wait.
    Refused(Instant),
    /// Not known here yet: the shared limiter asks Redis before the attempt starts
    /// ([`Pending`]).
    Pending(Pending),
}

/// A reservation the shared limiter completes with one Redis call, awaited where the attempt
/// starts: the start time (`Ok`), or when capacity comes back (`Err`: later than the caller
/// can wait).
/// (In a mutex only so that a lease holding it may be shared: it is awaited once, by value.)
pub struct Pending(Mutex<PendingFuture>);

/// The future of a [`Pending`] reservation.
pub type PendingFuture = Pin<Box<dyn Future<Output = Result<Instant, Instant>> + Send>>;

impl Pending {
    /// A pending reservation completed by `future`.
    pub fn new(future: impl Future<Output = Result<Instant, Instant>> + Send + 'static) -> Self {
        Self(Mutex::new(Box::pin(future)))
    }

    /// Completes it: the start time, or (`Err`) when capacity comes back.
    pub async fn wait(self) -> Result<Instant, Instant> {
        let future = self
            .0
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        future.await
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pending")
    }
}

impl PartialEq for Pending {
    /// Two pending reservations are never known to be equal.
    fn eq(&self, _: &Self) -> bool {
        false
    }
}

impl Eq for Pending {}

/// Where account capacity is kept: in this process ([`LocalLimiter`]), or shared by every
/// replica ([`super::shared::SharedLimiter`], in Redis).
pub trait Limiter: Send + Sync + std::fmt::Debug {
    /// When `account` could start a request of `tokens`, without taking anything.
    fn ready_at(
        &self,
        account: &AccountId,
        limits: &AccountLimits,
        tokens: u64,
        now: Instant,
    ) -> Instant;

    /// Takes one request and `tokens` from `account` when it can start no later than
    /// `latest`.
    fn reserve(
        &self,
        account: &AccountId,
        limits: &AccountLimits,
        tokens: u64,
        now: Instant,
        latest: Instant,
    ) -> Reservation;

    /// Learns from what the provider said about `account` (headers, a 429).
    fn observe(
        &self,
        account: &AccountId,
        limits: &AccountLimits,
        observation: &Observation,
        now: Instant,
    );

    /// How full `account`'s request bucket is (0 to 1; 1 when unlimited), to spread load.
    fn headroom(&self, account: &AccountId, limits: &AccountLimits, now: Instant) -> f64;

    /// Keeps capacity in Redis from now on (the shared limiter; others ignore it).
    fn share(&self, _shared: &std::sync::Arc<crate::shared::Shared>) {}
}

/// A continuously refilled bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    updated: Instant,
}

impl Bucket {
    fn level(&self, per_minute: f64, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        (self.level + elapsed * per_minute / 60.0).min(per_minute)
    }

    fn refill(&mut self, per_minute: f64, now: Instant) {
        self.level = self.level(per_minute, now);
        self.updated = now;
    }

    /// When the level reaches `need`.
    fn ready_at(&self, per_minute: f64, need: f64, now: Instant) -> Instant {
        let level = self.level(per_minute, now);
        if level >= need || per_minute <= 0.0 {
            return now;
        }
        now + Duration::from_secs_f64(((need - level) * 60.0 / per_minute).min(86_400.0))
    }
}

/// One account's state.
#[derive(Debug, Default)]
struct Account {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    /// Limits the provider announced (`*-limit-*` headers, quota errors).
    learned_requests: Option<f64>,
    learned_tokens: Option<f64>,
    /// Nothing may start before this (a 429's retry-after, an exhausted window's reset).
    blocked_until: Option<Instant>,
}

impl Account {
    fn requests_limit(&self, limits: &AccountLimits) -> Option<f64> {
        limits
            .requests_per_minute
            .map(|n| n as f64)
            .or(self.learned_requests)
    }

    fn tokens_limit(&self, limits: &AccountLimits) -> Option<f64> {
        limits
            .tokens_per_minute
            .map(|n| n as f64)
            .or(self.learned_tokens)
    }

    fn bucket(slot: &mut Option<Bucket>, limit: f64, now: Instant) -> &mut Bucket {
        slot.get_or_insert(Bucket {
            level: limit,
            updated: now,
        })
    }

    fn ready_at(&mut self, limits: &AccountLimits, tokens: u64, now: Instant) -> Instant {
        let mut ready = self.blocked_until.filter(|b| *b > now).unwrap_or(now);
        if let Some(limit) = self.requests_limit(limits) {
            ready =
                ready.max(Self::bucket(&mut self.requests, limit, now).ready_at(limit, 1.0, now));
        }
        if let Some(limit) = self.tokens_limit(limits) {
            // A request larger than a whole minute's tokens waits for a full bucket only.
            let need = (tokens as f64).min(limit);
            ready =
                ready.max(Self::bucket(&mut self.tokens, limit, now).ready_at(limit, need, now));
        }
        ready
    }

    fn take(&mut self, limits: &AccountLimits, tokens: u64, now: Instant) {
        if let Some(limit) = self.requests_limit(limits) {
            let b = Self::bucket(&mut self.requests, limit, now);
            b.refill(limit, now);
            b.level -= 1.0;
        }
        if let Some(limit) = self.tokens_limit(limits) {
            let b = Self::bucket(&mut self.tokens, limit, now);
            b.refill(limit, now);
            b.level -= (tokens as f64).min(limit);
        }
    }

    /// Lowers a bucket to what the provider says is left, and blocks the account until the
    /// window's reset when nothing is left and the limit is unknown.
    fn learn(
        slot: &mut Option<Bucket>,
        learned: &mut Option<f64>,
        configured: Option<u64>,
        blocked: &mut Option<Instant>,
        window: &Window,
        now: Instant,
    ) {
        if let Some(limit) = window.limit.filter(|l| *l > 0.0) {
            *learned = Some(limit);
        }
        let limit = configured.map(|n| n as f64).or(*learned);
        if let Some(remaining) = window.remaining {
            match limit {
                Some(limit) => {
                    let b = Self::bucket(slot, limit, now);
                    b.refill(limit, now);
                    b.level = b.level.min(remaining);
                }
                None if remaining < 1.0 => {
                    if let Some(reset) = window.reset {
                        let until = now + reset;
                        *blocked = Some(blocked.map_or(until, |b| b.max(until)));
                    }
                }
                None => {}
            }
        }
    }
}

/// Account capacity kept in this process.
#[derive(Debug, Default)]
pub struct LocalLimiter {
    accounts: Mutex<HashMap<AccountId, Account>>,
}

impl LocalLimiter {
    /// An empty limiter.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, account: &AccountId, f: impl FnOnce(&mut Account) -> T) -> T {
        let mut accounts = self
            .accounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match accounts.get_mut(account) {
            Some(state) => f(state),
            None => f(accounts.entry(account.clone()).or_default()),
        }
    }
}

impl Limiter for LocalLimiter {
    fn ready_at(
        &self,
        account: &AccountId,
        limits: &AccountLimits,
        tokens: u64,
        now: Instant,
    ) -> Instant {
        self.with(account, |a| a.ready_at(limits, tokens, now))
    }

    fn reserve(
        &self,
        account: &AccountId,
        limits: &AccountLimits,
        tokens: u64,
        now: Instant,
        latest: Instant,
    ) -> Reservation {
        self.with(account, |a| {
            let ready = a.ready_at(limits, tokens, now);
            if ready > latest {
                return Reservation::Refused(ready);
            }
            a.take(limits, tokens, now);
            Reservation::Granted(ready)
        })
    }

    fn observe(
        &self,
        account: &AccountId,
        limits: &AccountLimits,
        observation: &Observation,
        now: Instant,
    ) {
        self.with(account, |a| {
            if let Some(w) = &observation.requests {
                Account::learn(
                    &mut a.requests,
                    &mut a.learned_requests,
                    limits.requests_per_minute,
                    &mut a.blocked_until,
                    w,
                    now,
                );
            }
            if let Some(w) = &observation.tokens {
                Account::learn(
                    &mut a.tokens,
                    &mut a.learned_tokens,
                    limits.tokens_per_minute,
                    &mut a.blocked_until,
                    w,
                    now,
                );
            }
            if let Some(wait) = observation.retry_after {
                let until = now + wait;
                a.blocked_until = Some(a.blocked_until.map_or(until, |b| b.max(until)));
                if let Some(b) = a.requests.as_mut() {
                    b.level = b.level.min(0.0);
                }
            }
        });
    }

    fn headroom(&self, account: &AccountId, limits: &AccountLimits, now: Instant) -> f64 {
        self.with(account, |a| match a.requests_limit(limits) {
            Some(limit) => {
                let level = a.requests.map_or(limit, |b| b.level(limit, now));
                (level / limit).clamp(-1.0, 1.0)
            }
            None => 1.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(key: u64) -> AccountId {
        AccountId {
            provider: "p".into(),
            key,
            model: Some("m".into()),
        }
    }

    fn rpm(n: u64) -> AccountLimits {
        AccountLimits {
            requests_per_minute: Some(n),
            ..AccountLimits::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_minute_of_requests_then_reservations_queue_behind_the_refill() {
        let l = LocalLimiter::new();
        let (a, limits) = (account(1), rpm(60));
        let now = Instant::now();
        let far = now + Duration::from_secs(3600);
        for _ in 0..60 {
            assert_eq!(
                l.reserve(&a, &limits, 0, now, far),
                Reservation::Granted(now)
            );
        }
        // Empty: the next starts in 1 s, the one after in 2 s.
        assert_eq!(
            l.reserve(&a, &limits, 0, now, far),
            Reservation::Granted(now + Duration::from_secs(1))
        );
        assert_eq!(
            l.ready_at(&a, &limits, 0, now),
            now + Duration::from_secs(2)
        );
        // A caller that cannot wait that long is refused and takes nothing.
        assert_eq!(
            l.reserve(&a, &limits, 0, now, now + Duration::from_millis(500)),
            Reservation::Refused(now + Duration::from_secs(2))
        );
        assert_eq!(
            l.ready_at(&a, &limits, 0, now),
            now + Duration::from_secs(2)
        );
        // Another account is untouched.
        assert_eq!(l.ready_at(&account(2), &limits, 0, now), now);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(l.ready_at(&a, &limits, 0, Instant::now()), Instant::now());
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_per_minute_bound_large_requests() {
        let l = LocalLimiter::new();
        let a = account(1);
        let limits = AccountLimits {
            tokens_per_minute: Some(6000),
            ..AccountLimits::default()
        };
        let now = Instant::now();
        let far = now + Duration::from_secs(3600);
        assert_eq!(
            l.reserve(&a, &limits, 5000, now, far),
            Reservation::Granted(now)
        );
        // 1000 left; 3000 more arrive in 20 s (100 per second).
        assert_eq!(
            l.ready_at(&a, &limits, 3000, now),
            now + Duration::from_secs(20)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn headers_teach_limits_and_what_is_left_and_429s_block() {
        let l = LocalLimiter::new();
        let (a, none) = (account(1), AccountLimits::default());
        let now = Instant::now();
        // Nothing known: no pacing.
        assert_eq!(l.ready_at(&a, &none, 10, now), now);
        l.observe(
            &a,
            &none,
            &Observation {
                requests: Some(Window {
                    limit: Some(120.0),
                    remaining: Some(0.0),
                    reset: Some(Duration::from_secs(60)),
                }),
                ..Observation::default()
            },
            now,
        );
        // 120 per minute, none left: one every 0.5 s.
        assert_eq!(
            l.ready_at(&a, &none, 0, now),
            now + Duration::from_millis(500)
        );
        // An exhausted window of unknown size blocks until its reset.
        let b = account(2);
        l.observe(
            &b,
            &none,
            &Observation {
                tokens: Some(Window {
                    limit: None,
                    remaining: Some(0.0),
                    reset: Some(Duration::from_secs(7)),
                }),
                ..Observation::default()
            },
            now,
        );
        assert_eq!(l.ready_at(&b, &none, 0, now), now + Duration::from_secs(7));
        // A 429's retry-after blocks too.
        let c = account(3);
        l.observe(
            &c,
            &none,
            &Observation {
                retry_after: Some(Duration::from_secs(3)),
                ..Observation::default()
            },
            now,
        );
        assert_eq!(l.ready_at(&c, &none, 0, now), now + Duration::from_secs(3));
        assert!(l.headroom(&a, &none, now) <= 0.0);
        assert_eq!(l.headroom(&c, &none, now), 1.0);
    }
}
