//! The account limiter shared by every replica, in Redis (`[shared] redis_url`).
//!
//! One hash per account, `P:pace:PROVIDER:KEY:MODEL` (`P` = `shared.key_prefix`, `KEY` the
//! key's fingerprint in hex, `MODEL` `*` when the provider limits per key): `r`, `ra` (the
//! requests bucket's level and when, Redis ms), `t`, `ta` (the tokens bucket), `lr`, `lt`
//! (limits learned from the provider's headers), `bu` (nothing may start before it, Redis
//! ms). It expires an hour after its last use. Buckets refill as in [`super::limiter`], on
//! Redis's own clock (`TIME`).
//!
//! - **Capacity in chunks.** A replica takes capacity from the shared buckets with one
//!   `EVALSHA` ([`LEASE`]) per chunk, not per call: the call's own request and tokens
//!   (queued in the bucket when it is empty, if that still lets the call start within its
//!   deadline; otherwise refused, and the call goes to its next target) plus up to half a
//!   second of refill that is free now. The rest of the chunk stays in this replica, and the
//!   next calls take from it without a round trip; what is left after 1 s goes back with the
//!   next lease. While a bucket is empty every call is one `EVALSHA`, but such calls wait for
//!   capacity anyway. The call that needs a lease waits for it where the attempt starts
//!   (a [`Pending`] reservation); once a lease was refused, calls that cannot wait until the
//!   bucket refills are refused here at once.
//! - **Learning.** What a provider says about an account ([`Observation`]: limits, what is
//!   left, a 429's retry-after) goes to the hash ([`OBSERVE`], off the call path; for each
//!   account at most every 250 ms unless a limit changed, a window ran out or a rate limit
//!   came), so every replica paces with the limits any one of them learned.
//! - **Redis unreachable** ([`Shared::is_degraded`]): with `shared.mode = fail_open` an
//!   account is paced by this replica's [`LocalLimiter`] alone (it learns from every answer
//!   all along, so it is warm); with `fail_closed` it has no capacity (its calls fail with
//!   UNAVAILABLE). Either way counter `llm_gateway_pacing_shared_fallback_total{mode}` counts
//!   the decisions and a warning says so when it starts.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use redis::Script;
use tokio::time::Instant;

use super::{
    AccountId, AccountLimits, Limiter, LocalLimiter, Observation, Reservation, limiter::Pending,
};
use crate::{
    shared::{FailMode, Shared, SharedError},
    telemetry::names,
};

/// Takes a chunk of an account's capacity; see the module docs.
///
/// KEYS[1]: the account's hash. ARGV: configured rpm, configured tpm (0: learned or none),
/// requests wanted, tokens wanted, the call's tokens, how long the call can wait (ms),
/// requests and tokens given back.
///
/// Returns `{granted (1/0), wait ms, rpm, tpm, requests taken, tokens taken, requests level
/// after / rpm}`; refused (0) takes nothing, and the wait says when capacity comes back.
pub const LEASE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'r', 'ra', 't', 'ta', 'lr', 'lt', 'bu')
local rpm = tonumber(ARGV[1])
if rpm <= 0 then rpm = tonumber(h[5] or '0') end
local tpm = tonumber(ARGV[2])
if tpm <= 0 then tpm = tonumber(h[6] or '0') end
local want_r, want_t = tonumber(ARGV[3]), tonumber(ARGV[4])
local need_t = math.min(tonumber(ARGV[5]), tpm)
local horizon = tonumber(ARGV[6])
local function level(v, at, cap, give)
  local l = cap
  if v then l = tonumber(v) + math.max(0, now - tonumber(at)) * cap / 60000 end
  return math.min(cap, l + give)
end
local r, tk = 0, 0
if rpm > 0 then r = level(h[1], h[2], rpm, tonumber(ARGV[7])) end
if tpm > 0 then tk = level(h[3], h[4], tpm, tonumber(ARGV[8])) end
local wait = math.max(0, tonumber(h[7] or '0') - now)
if rpm > 0 and r < 1 then wait = math.max(wait, math.ceil((1 - r) * 60000 / rpm)) end
if tpm > 0 and tk < need_t then wait = math.max(wait, math.ceil((need_t - tk) * 60000 / tpm)) end
local ok = wait <= horizon
local gr, gt = 0, 0
if ok and rpm > 0 then gr = math.max(1, math.min(want_r, math.floor(r))) end
if ok and tpm > 0 then gt = math.max(need_t, math.min(want_t, math.floor(tk))) end
if rpm > 0 then redis.call('HSET', KEYS[1], 'r', tostring(r - gr), 'ra', now) end
if tpm > 0 then redis.call('HSET', KEYS[1], 't', tostring(tk - gt), 'ta', now) end
if rpm > 0 or tpm > 0 then redis.call('PEXPIRE', KEYS[1], 3600000) end
local frac = 1
if rpm > 0 then frac = (r - gr) / rpm end
local granted = '0'
if ok then granted = '1' end
return {granted, tostring(wait), tostring(rpm), tostring(tpm), tostring(gr), tostring(gt), tostring(frac)}
";

/// Learns from a provider's answer; see the module docs.
///
/// KEYS[1]: the account's hash. ARGV: learned rpm, learned tpm (0: none), requests left,
/// tokens left (-1: not said), configured rpm, configured tpm (0: none), block ms (0: none).
pub const OBSERVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'r', 'ra', 't', 'ta', 'lr', 'lt', 'bu')
local lr, lt = tonumber(ARGV[1]), tonumber(ARGV[2])
if lr > 0 then redis.call('HSET', KEYS[1], 'lr', tostring(lr)) else lr = tonumber(h[5] or '0') end
if lt > 0 then redis.call('HSET', KEYS[1], 'lt', tostring(lt)) else lt = tonumber(h[6] or '0') end
local rpm, tpm = tonumber(ARGV[5]), tonumber(ARGV[6])
if rpm <= 0 then rpm = lr end
if tpm <= 0 then tpm = lt end
local function lower(v, at, cap, left, field, atfield)
  local l = cap
  if v then l = math.min(cap, tonumber(v) + math.max(0, now - tonumber(at)) * cap / 60000) end
  redis.call('HSET', KEYS[1], field, tostring(math.min(l, left)), atfield, now)
end
local left_r, left_t = tonumber(ARGV[3]), tonumber(ARGV[4])
local block = tonumber(ARGV[7])
if block > 0 then
  redis.call('HSET', KEYS[1], 'bu', math.max(tonumber(h[7] or '0'), now + block))
  left_r = 0
end
if rpm > 0 and left_r >= 0 then lower(h[1], h[2], rpm, left_r, 'r', 'ra') end
if tpm > 0 and left_t >= 0 then lower(h[3], h[4], tpm, left_t, 't', 'ta') end
redis.call('PEXPIRE', KEYS[1], 3600000)
return 1
";

/// Capacity left in this replica goes back after this long.
const CHUNK_AGE: Duration = Duration::from_secs(1);

/// The least time between two observations of one account sent to Redis.
const OBSERVE_EVERY: Duration = Duration::from_millis(250);

/// How long "Redis knows no limit for this account" holds before it is asked again.
const UNLIMITED_FOR: Duration = Duration::from_secs(1);

/// How long a `fail_closed` refusal says to wait.
const CLOSED_WAIT: Duration = Duration::from_secs(1);

/// This replica's part of one account.
#[derive(Debug)]
struct Grant {
    /// The account's hash.
    key: String,
    /// Leased requests and tokens not used yet.
    requests: f64,
    tokens: f64,
    /// When the leased capacity may be used, and when it was leased.
    from: Instant,
    leased: Option<Instant>,
    /// The limits Redis last reported (0: none known).
    rpm: f64,
    tpm: f64,
    /// The shared requests bucket's level after the last lease (0 to 1).
    level: f64,
    /// A lease was refused: the bucket has capacity again at this time.
    ready_at: Option<Instant>,
    /// Redis knows no limit: this replica paces locally until then.
    unlimited_until: Option<Instant>,
    /// When an observation was last sent, and the limits it carried.
    observed: Option<Instant>,
    sent_limits: (f64, f64),
}

impl Grant {
    fn new(key: String, now: Instant) -> Self {
        Self {
            key,
            requests: 0.0,
            tokens: 0.0,
            from: now,
            leased: None,
            rpm: 0.0,
            tpm: 0.0,
            level: 1.0,
            ready_at: None,
            unlimited_until: None,
            observed: None,
            sent_limits: (0.0, 0.0),
        }
    }
}

/// What one lease asks Redis.
#[derive(Debug)]
struct Ask {
    key: String,
    limits: AccountLimits,
    want: (f64, f64),
    tokens: f64,
    horizon_ms: u64,
    give: (f64, f64),
}

#[derive(Debug)]
struct Inner {
    shared: OnceLock<Arc<Shared>>,
    local: LocalLimiter,
    lease: Script,
    observe: Script,
    accounts: Mutex<HashMap<AccountId, Grant>>,
    /// Whether the last decision was a fallback (warned once per outage).
    falling_back: AtomicBool,
}

/// Account capacity shared by every replica in Redis; this process's own [`LocalLimiter`]
/// until [`Limiter::share`] gives it the connection, and while Redis is unreachable.
#[derive(Debug, Clone)]
pub struct SharedLimiter {
    inner: Arc<Inner>,
}

impl Default for SharedLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// Half a second of a limit's refill (the spare part of a chunk).
fn spare(per_minute: f64) -> f64 {
    (per_minute / 120.0).floor().clamp(0.0, 63.0)
}

fn configured(limit: Option<u64>) -> f64 {
    limit.map_or(0.0, |n| n as f64)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl SharedLimiter {
    /// A limiter keeping capacity locally until [`Limiter::share`].
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                shared: OnceLock::new(),
                local: LocalLimiter::new(),
                lease: Script::new(LEASE),
                observe: Script::new(OBSERVE),
                accounts: Mutex::new(HashMap::new()),
                falling_back: AtomicBool::new(false),
            }),
        }
    }
}

impl Inner {
    fn accounts(&self) -> std::sync::MutexGuard<'_, HashMap<AccountId, Grant>> {
        self.accounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn grant<'a>(
        accounts: &'a mut HashMap<AccountId, Grant>,
        shared: &Shared,
        account: &AccountId,
        now: Instant,
    ) -> &'a mut Grant {
        accounts.entry(account.clone()).or_insert_with(|| {
            let key = shared.key(&format!(
                "pace:{}:{:016x}:{}",
                account.provider,
                account.key,
                account.model.as_deref().unwrap_or("*")
            ));
            Grant::new(key, now)
        })
    }

    /// Decides from this replica's limits alone (Redis unreachable).
    fn fallback(
        &self,
        shared: &Shared,
        account: &AccountId,
        limits: &AccountLimits,
        tokens: u64,
        now: Instant,
        latest: Instant,
    ) -> Reservation {
        let mode = shared.settings().mode;
        let label = match mode {
            FailMode::FailOpen => "fail_open",
            FailMode::FailClosed => "fail_closed",
        };
        metrics::counter!(names::PACING_SHARED_FALLBACK, "mode" => label).increment(1);
        if !self.falling_back.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                mode = label,
                "pacing: redis is unreachable; provider accounts are paced by this replica's own limits (fail_open) or get no capacity (fail_closed)"
            );
        }
        match mode {
            FailMode::FailOpen => self.local.reserve(account, limits, tokens, now, latest),
            FailMode::FailClosed => Reservation::Refused(now + CLOSED_WAIT),
        }
    }

    async fn call_lease(&self, shared: &Shared, ask: &Ask) -> Result<[f64; 7], SharedError> {
        let mut inv = self.lease.prepare_invoke();
        inv.key(&ask.key)
            .arg(configured(ask.limits.requests_per_minute))
            .arg(configured(ask.limits.tokens_per_minute))
            .arg(ask.want.0)
            .arg(ask.want.1)
            .arg(ask.tokens)
            .arg(ask.horizon_ms)
            .arg(ask.give.0)
            .arg(ask.give.1);
        let reply: Vec<String> = shared
            .run("pace", |mut conn| async move {
                Ok(inv.invoke_async(&mut conn).await?)
            })
            .await?;
        let mut out = [0.0; 7];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = reply
                .get(i)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| SharedError::Reply(format!("pace lease: {reply:?}")))?;
        }
        Ok(out)
    }

    /// Leases the call's capacity and a chunk (the [`Pending`] reservation's work).
    async fn lease(
        self: Arc<Self>,
        shared: Arc<Shared>,
        account: AccountId,
        ask: Ask,
        latest: Instant,
    ) -> Result<Instant, Instant> {
        let reply = self.call_lease(&shared, &ask).await;
        let now = Instant::now();
        let [granted, wait, rpm, tpm, requests, tokens, level] = match reply {
            Ok(reply) => reply,
            Err(err) => {
                if matches!(err, SharedError::Reply(_)) {
                    shared.failed("pace", &err);
                }
                let tokens = ask.tokens as u64;
                return match self.fallback(&shared, &account, &ask.limits, tokens, now, latest) {
                    Reservation::Granted(at) => Ok(at),
                    Reservation::Refused(at) => Err(at),
                    Reservation::Pending(_) => Err(now + CLOSED_WAIT),
                };
            }
        };
        if self.falling_back.swap(false, Ordering::Relaxed) {
            tracing::info!("pacing: redis answers again; provider accounts are shared again");
        }
        let start = now + Duration::from_millis(wait.max(0.0) as u64);
        let mut accounts = self.accounts();
        let g = Self::grant(&mut accounts, &shared, &account, now);
        g.rpm = rpm;
        g.tpm = tpm;
        if granted < 1.0 {
            g.ready_at = Some(start);
            return Err(start);
        }
        g.ready_at = None;
        if rpm <= 0.0 && tpm <= 0.0 {
            g.unlimited_until = Some(now + UNLIMITED_FOR);
            return Ok(start);
        }
        if rpm > 0.0 {
            g.requests += (requests - 1.0).max(0.0);
        }
        if tpm > 0.0 {
            g.tokens += (tokens - ask.tokens).max(0.0);
        }
        g.from = start;
        g.leased = Some(now);
        g.level = level.clamp(-1.0, 1.0);
        Ok(start)
    }
}

impl Limiter for SharedLimiter {
    fn ready_at(
        &self,
        account: &AccountId,
        limits: &AccountLimits,
        tokens: u64,
        now: Instant,
    ) -> Instant {
        let inner = &self.inner;
        let Some(shared) = inner.shared.get().filter(|s| !s.is_degraded()) else {
            return inner.local.ready_at(account, limits, tokens, now);
        };
        let mut accounts = inner.accounts();
        let g = Inner::grant(&mut accounts, shared, account, now);
        if g.unlimited_until.is_some_and(|u| u > now) {
            drop(accounts);
            return inner.local.ready_at(account, limits, tokens, now);
        }
        g.ready_at.filter(|r| *r > now).unwrap_or(now)
    }

    fn reserve(
        &self,
        account: &AccountId,
        limits: &AccountLimits,
        tokens: u64,
        now: Instant,
        latest: Instant,
    ) -> Reservation {
        let inner = &self.inner;
        let Some(shared) = inner.shared.get() else {
            return inner.local.reserve(account, limits, tokens, now, latest);
        };
        if shared.is_degraded() {
            return inner.fallback(shared, account, limits, tokens, now, latest);
        }
        let mut accounts = inner.accounts();
        let g = Inner::grant(&mut accounts, shared, account, now);
        if g.unlimited_until.is_some_and(|u| u > now) {
            drop(accounts);
            return inner.local.reserve(account, limits, tokens, now, latest);
        }
        match g.ready_at {
            Some(ready) if ready > latest => return Reservation::Refused(ready),
            Some(ready) if ready <= now => g.ready_at = None,
            _ => {}
        }
        let rpm = limits.requests_per_minute.map_or(g.rpm, |n| n as f64);
        let tpm = limits.tokens_per_minute.map_or(g.tpm, |n| n as f64);
        let need = if tpm > 0.0 {
            (tokens as f64).min(tpm)
        } else {
            0.0
        };
        let fresh = g
            .leased
            .is_some_and(|at| now.saturating_duration_since(at) < CHUNK_AGE);
        if fresh
            && (rpm > 0.0 || tpm > 0.0)
            && (rpm <= 0.0 || g.requests >= 1.0)
            && (tpm <= 0.0 || g.tokens >= need)
            && g.from <= latest
        {
            if rpm > 0.0 {
                g.requests -= 1.0;
            }
            g.tokens -= need;
            return Reservation::Granted(g.from.max(now));
        }
        // Ask Redis, giving back what is left of the last chunk.
        // Limits this replica learned count even before Redis has them.
        let learned = |n: f64| (n > 0.0).then_some(n as u64);
        let ask = Ask {
            key: g.key.clone(),
            limits: AccountLimits {
                requests_per_minute: limits.requests_per_minute.or(learned(g.sent_limits.0)),
                tokens_per_minute: limits.tokens_per_minute.or(learned(g.sent_limits.1)),
                per_model: limits.per_model,
            },
            want: (1.0 + spare(rpm), need + spare(tpm)),
            tokens: tokens as f64,
            horizon_ms: ms(latest.saturating_duration_since(now)),
            give: (
                std::mem::take(&mut g.requests),
                std::mem::take(&mut g.tokens),
            ),
        };
        drop(accounts);
        let future = inner
            .clone()
            .lease(shared.clone(), account.clone(), ask, latest);
        Reservation::Pending(Pending::new(future))
    }

    fn observe(
        &self,
        account: &AccountId,
        limits: &AccountLimits,
        observation: &Observation,
        now: Instant,
    ) {
        let inner = &self.inner;
        inner.local.observe(account, limits, observation, now);
        let Some(shared) = inner.shared.get().filter(|s| !s.is_degraded()) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let limit = |w: Option<super::Window>| w.and_then(|w| w.limit).filter(|l| *l > 0.0);
        let learned = (
            limit(observation.requests).unwrap_or(0.0),
            limit(observation.tokens).unwrap_or(0.0),
        );
        let mut accounts = inner.accounts();
        let g = Inner::grant(&mut accounts, shared, account, now);
        let exhausted = [observation.requests, observation.tokens]
            .iter()
            .any(|w| w.and_then(|w| w.remaining).is_some_and(|r| r < 1.0));
        let news = observation.retry_after.is_some()
            || exhausted
            || (learned.0 > 0.0 && learned.0 != g.sent_limits.0)
            || (learned.1 > 0.0 && learned.1 != g.sent_limits.1)
            || g.observed
                .is_none_or(|at| now.saturating_duration_since(at) >= OBSERVE_EVERY);
        if !news {
            return;
        }
        g.observed = Some(now);
        if learned.0 > 0.0 || learned.1 > 0.0 {
            // A limit is known now: ask Redis again instead of pacing locally.
            g.unlimited_until = None;
            if learned.0 > 0.0 {
                g.sent_limits.0 = learned.0;
            }
            if learned.1 > 0.0 {
                g.sent_limits.1 = learned.1;
            }
        }
        let known = |configured: Option<u64>, learned: f64, reported: f64| {
            configured.is_some() || learned > 0.0 || reported > 0.0
        };
        // An exhausted window of unknown size blocks until its reset, as locally.
        let mut block = observation.retry_after.unwrap_or_default();
        for (window, known) in [
            (
                observation.requests,
                known(limits.requests_per_minute, learned.0, g.rpm),
            ),
            (
                observation.tokens,
                known(limits.tokens_per_minute, learned.1, g.tpm),
            ),
        ] {
            if let Some(w) = window
                && !known
                && w.remaining.is_some_and(|r| r < 1.0)
                && let Some(reset) = w.reset
            {
                block = block.max(reset);
            }
        }
        if !block.is_zero() {
            g.requests = 0.0;
            g.ready_at = Some(g.ready_at.map_or(now + block, |r| r.max(now + block)));
        }
        let key = g.key.clone();
        drop(accounts);
        let left = |w: Option<super::Window>| w.and_then(|w| w.remaining).unwrap_or(-1.0);
        let (left_r, left_t) = (left(observation.requests), left(observation.tokens));
        let (cfg_r, cfg_t) = (
            configured(limits.requests_per_minute),
            configured(limits.tokens_per_minute),
        );
        let inner = inner.clone();
        let shared = shared.clone();
        runtime.spawn(async move {
            let mut inv = inner.observe.prepare_invoke();
            inv.key(&key)
                .arg(learned.0)
                .arg(learned.1)
                .arg(left_r)
                .arg(left_t)
                .arg(cfg_r)
                .arg(cfg_t)
                .arg(ms(block));
            let _ = shared
                .run("pace_observe", |mut conn| async move {
                    Ok(inv.invoke_async::<i64>(&mut conn).await?)
                })
                .await;
        });
    }

    fn headroom(&self, account: &AccountId, limits: &AccountLimits, now: Instant) -> f64 {
        let inner = &self.inner;
        let Some(shared) = inner.shared.get().filter(|s| !s.is_degraded()) else {
            return inner.local.headroom(account, limits, now);
        };
        let mut accounts = inner.accounts();
        let g = Inner::grant(&mut accounts, shared, account, now);
        if g.unlimited_until.is_some_and(|u| u > now) {
            drop(accounts);
            return inner.local.headroom(account, limits, now);
        }
        if g.ready_at.is_some_and(|r| r > now) {
            return -1.0;
        }
        g.level
    }

    fn share(&self, shared: &Arc<Shared>) {
        let _ = self.inner.shared.set(shared.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn without_redis_it_is_the_local_limiter() {
        let (shared, local) = (SharedLimiter::new(), LocalLimiter::new());
        let a = AccountId {
            provider: "p".into(),
            key: 1,
            model: None,
        };
        let limits = AccountLimits {
            requests_per_minute: Some(1),
            ..AccountLimits::default()
        };
        let now = Instant::now();
        for latest in [now, now] {
            assert_eq!(
                shared.reserve(&a, &limits, 0, now, latest),
                local.reserve(&a, &limits, 0, now, latest)
            );
        }
        assert_eq!(
            shared.ready_at(&a, &limits, 0, now),
            now + Duration::from_secs(60)
        );
    }

    #[test]
    fn a_chunk_is_half_a_second_of_refill() {
        assert_eq!(spare(20.0), 0.0);
        assert_eq!(spare(1200.0), 10.0);
        assert_eq!(spare(1e9), 63.0);
    }
}
