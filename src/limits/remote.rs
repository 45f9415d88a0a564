//! The Redis backend: the limits of every replica in one place.
//!
//! One hash per subject (`P` = `shared.key_prefix`, `S` = `key:NAME` or `team:NAME`), its
//! name built once per key: `P:S:limits`, with the fields
//!
//! | field | holds |
//! |---|---|
//! | `rt`, `ra` | the requests bucket: level, and when (Redis ms) |
//! | `tt`, `ta` | the tokens bucket: level, and when |
//! | `day`, `d`, `month`, `m` | spend of the UTC day and month (index, USD) |
//! | `x:R`, `s:R`, `r:R` | replica `R`'s lease: when it expires (Redis ms), its open streams, the sum of its live budget reservations (USD) |
//! | `e` | when the hash expires (Redis ms), so that `PEXPIRE` runs about once per half of it, not per call |
//!
//! The hash expires 35 days after its last write for a subject with a budget (the month's
//! spend must outlive the month), else 2 minutes (a bucket is full by then).
//!
//! - Admission ([`ADMIT`]) is one `EVALSHA` for all of a call's subjects: it reads each
//!   subject's hash once (`HMGET` of the buckets, or `HGETALL` when a stream slot or a
//!   budget is checked, to sum the live leases of every replica), checks every limit, and
//!   takes all of them or none with one `HSET` per subject. Redis's own clock (`TIME`) times
//!   buckets and leases, so replicas' clocks do not matter there; the budget period (UTC day
//!   and month) comes from the replica.
//! - Stream slots and budget reservations are leased per replica and subject: `s:R` and
//!   `r:R` count while `x:R` is ahead of Redis's clock. The replica renews `x:R` every
//!   third of `shared.lease_ttl` for each subject it holds something of ([`RENEW`], one call
//!   for all). A replica that dies (`kill -9`) stops renewing; the first admission after the
//!   TTL that reads the hash deletes the dead replica's fields, freeing its slots and
//!   reservations. (A replica cut off from Redis for longer than the TTL loses its leases the
//!   same way; its calls then settle against nothing, so the reservation count never goes
//!   below zero.)
//! - Settlement ([`SETTLE`]) runs off the call path, in a background worker: one `HMGET` and
//!   one `HSET` per subject give back unused estimated tokens, take back the reservation, add
//!   the real cost to the day and month, free the stream slot, and report the totals, which
//!   become this replica's view of the subject's spend. When Redis cannot be reached, the
//!   settlement is kept (up to 10,000) and sent once it answers again; the reservation
//!   expires with the lease.
//!
//! Commands per call inside the scripts, for a key and its team with rates and budgets: 5
//! in the admission (`TIME`, 2 `HGETALL`, 2 `HSET`), 4 in the settlement (2 `HMGET`, 2
//! `HSET`; `TIME` only when more tokens were used than estimated, or the expiry is due),
//! plus a `PEXPIRE` per subject about once per half expiry. Each command inside a script
//! costs Redis a few microseconds (more with more fields), so the scripts read and write
//! every field of a subject at once, pass numbers to `HSET` as numbers (formatted by Redis,
//! `%.17g`, not by Lua's `tostring`), and skip the clock where it is not needed: unused
//! tokens given back are added to the stored level (the same as adding them to the level
//! refilled until now, since the refill is capped when read).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use redis::Script;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Ask, BudgetCheck, Decision, Kind, Period, Refusal, Settlement, local::Local, periods};
use crate::shared::{FailMode, Shared, SharedError};

/// Admission for all of a call's subjects; see the module docs.
///
/// KEYS: one hash per subject. ARGV: subjects, estimated tokens, stream (0/1), estimated
/// USD, budget check (0 skip, 1 reserve, 2 fallback when spent), replica id, lease TTL ms,
/// day index, month index; then 5 per subject: rpm, tpm, max streams, daily budget, monthly
/// budget.
///
/// Returns `{"0", spent (0/1)}` when admitted, `{"1".."3", subject, wait ms}` for the
/// requests, tokens or streams limit, `{"4"|"5", subject, used}` for the month or day
/// budget (subjects 0-based).
pub const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[1])
local tokens = tonumber(ARGV[2])
local stream = ARGV[3] == '1'
local usd = tonumber(ARGV[4])
local check = tonumber(ARGV[5])
local rep = ARGV[6]
local ttl = tonumber(ARGV[7])
local day, month = ARGV[8], ARGV[9]
local xf, sf, rf = 'x:' .. rep, 's:' .. rep, 'r:' .. rep
local min, max = math.min, math.max
local plan = {}
local spent = 0
for i = 1, n do
  local key, a = KEYS[i], 10 + (i - 1) * 5
  local rpm, tpm, streams = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local daily, monthly = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local budget = daily > 0 or monthly > 0
  local p = {budget = budget}
  local h
  -- With leases: every field once (HGETALL), the other replicas' expiries collected on
  -- the way (a field `x:R` is the only one starting with `x`).
  local leases = (stream and streams > 0) or (check > 0 and budget)
  local others
  if leases then
    local all = redis.call('HGETALL', key)
    h = {}
    for j = 1, #all, 2 do
      local f = all[j]
      h[f] = all[j + 1]
      if string.byte(f, 1) == 120 and f ~= xf then
        if not others then others = {} end
        others[#others + 1] = f
      end
    end
  elseif rpm > 0 or tpm > 0 then
    local v = redis.call('HMGET', key, 'rt', 'ra', 'tt', 'ta', 'e')
    h = {rt = v[1], ra = v[2], tt = v[3], ta = v[4], e = v[5]}
  else
    h = {}
  end
  p.e = h.e
  if rpm > 0 then
    local v = h.rt
    local level = rpm
    if v then level = min(rpm, tonumber(v) + max(0, now - tonumber(h.ra)) * rpm / 60000) end
    if level < 1 then return {'1', tostring(i - 1), tostring(math.ceil((1 - level) * 60000 / rpm))} end
    p.rpm = level
  end
  if tpm > 0 then
    local v = h.tt
    local level = tpm
    if v then level = min(tpm, tonumber(v) + max(0, now - tonumber(h.ta)) * tpm / 60000) end
    local needed = min(tokens, tpm)
    if level < needed then return {'2', tostring(i - 1), tostring(math.ceil((needed - level) * 60000 / tpm))} end
    p.tpm = level
  end
  if leases then
    local s = tonumber(h[sf]) or 0
    local r = tonumber(h[rf]) or 0
    p.s, p.r, p.x = s, r, h[xf]
    if others then
      local dead
      for _, f in ipairs(others) do
        local who = string.sub(f, 3)
        if tonumber(h[f]) < now then
          dead = dead or {}
          dead[#dead + 1] = f
          dead[#dead + 1] = 's:' .. who
          dead[#dead + 1] = 'r:' .. who
        else
          s = s + (tonumber(h['s:' .. who]) or 0)
          r = r + (tonumber(h['r:' .. who]) or 0)
        end
      end
      if dead then redis.call('HDEL', key, unpack(dead)) end
    end
    if stream and streams > 0 then
      if s >= streams then return {'3', tostring(i - 1), '1000'} end
      p.stream = true
    end
    if check > 0 and budget then
      local d = (h.day == day) and tonumber(h.d) or 0
      local m = (h.month == month) and tonumber(h.m) or 0
      if monthly > 0 and (m + r + usd > monthly or (check == 2 and m + r >= monthly)) then
        if check == 2 then spent = 1 else return {'4', tostring(i - 1), tostring(m)} end
      end
      if daily > 0 and (d + r + usd > daily or (check == 2 and d + r >= daily)) then
        if check == 2 then spent = 1 else return {'5', tostring(i - 1), tostring(d)} end
      end
      p.reserve = true
    end
  end
  plan[i] = p
end
for i = 1, n do
  local key, p = KEYS[i], plan[i]
  local f, k = {}, 0
  if p.rpm then
    f[k + 1] = 'rt'; f[k + 2] = p.rpm - 1; f[k + 3] = 'ra'; f[k + 4] = now; k = k + 4
  end
  if p.tpm then
    f[k + 1] = 'tt'; f[k + 2] = p.tpm - tokens; f[k + 3] = 'ta'; f[k + 4] = now; k = k + 4
  end
  local lease = false
  if p.stream then
    f[k + 1] = sf; f[k + 2] = p.s + 1; k = k + 2; lease = true
  end
  if p.reserve and spent == 0 and usd > 0 then
    f[k + 1] = rf; f[k + 2] = p.r + usd; k = k + 2; lease = true
  end
  -- The lease's expiry, unless it is far enough ahead for the renewal to come first.
  if lease and (not p.x or tonumber(p.x) < now + ttl * 2 / 3) then
    f[k + 1] = xf; f[k + 2] = now + ttl; k = k + 2
  end
  if k > 0 then
    local keep = p.budget and 3024000000 or max(120000, 2 * ttl)
    if not p.e or tonumber(p.e) < now + keep / 2 then
      f[k + 1] = 'e'; f[k + 2] = now + keep
      redis.call('PEXPIRE', key, keep)
    end
    redis.call('HSET', key, unpack(f))
  end
end
return {'0', tostring(spent)}
";

/// Settlement; see the module docs.
///
/// KEYS: one hash per subject. ARGV: subjects, replica id, tokens to give back (estimate -
/// actual; empty: no usage), cost USD, day index, month index, the replica's clock (Unix
/// ms, only to decide whether to refresh the expiry); then 4 per subject: tpm, stream slot
/// held (0/1), USD reserved, budget (0/1).
///
/// Returns the day and month spend of each subject after the settlement, as strings.
pub const SETTLE: &str = r"
local n = tonumber(ARGV[1])
local rep = ARGV[2]
local give = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local day, month = ARGV[5], ARGV[6]
local clock = tonumber(ARGV[7])
local sf, rf = 's:' .. rep, 'r:' .. rep
local now
local out = {}
for i = 1, n do
  local key, a = KEYS[i], 8 + (i - 1) * 4
  local tpm, held, resv = tonumber(ARGV[a]), ARGV[a + 1] == '1', tonumber(ARGV[a + 2])
  local budget = ARGV[a + 3] == '1'
  local h = redis.call('HMGET', key, 'tt', 'ta', 'day', 'd', 'month', 'm', sf, rf, 'e')
  local f, k = {}, 0
  if give and give ~= 0 and tpm > 0 and h[1] then
    if give > 0 then
      -- Tokens given back: adding them to the stored level is the same as adding them to
      -- the level refilled until now (the refill is capped when read).
      f[1] = 'tt'; f[2] = tonumber(h[1]) + give; k = 2
    else
      if not now then
        local t = redis.call('TIME')
        now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      end
      local level = math.min(tpm, tonumber(h[1]) + math.max(0, now - tonumber(h[2])) * tpm / 60000) + give
      f[1] = 'tt'; f[2] = level; f[3] = 'ta'; f[4] = now; k = 4
    end
  end
  if held and h[7] then
    f[k + 1] = sf; f[k + 2] = math.max(0, tonumber(h[7]) - 1); k = k + 2
  end
  if resv > 0 and h[8] then
    local r = tonumber(h[8]) - resv
    if r < 1e-12 then r = 0 end
    f[k + 1] = rf; f[k + 2] = r; k = k + 2
  end
  local d = (h[3] == day) and tonumber(h[4]) or 0
  local m = (h[5] == month) and tonumber(h[6]) or 0
  if cost > 0 or h[3] ~= day or h[5] ~= month then
    d, m = d + cost, m + cost
    if h[3] ~= day then f[k + 1] = 'day'; f[k + 2] = day; k = k + 2 end
    if h[5] ~= month then f[k + 1] = 'month'; f[k + 2] = month; k = k + 2 end
    f[k + 1] = 'd'; f[k + 2] = d; f[k + 3] = 'm'; f[k + 4] = m; k = k + 4
  end
  if k > 0 then
    -- Admissions refresh the expiry; here only when the hash is new or its expiry looks
    -- near on this replica's clock (then set on Redis's clock, as everywhere).
    local keep = budget and 3024000000 or 120000
    if not h[9] or tonumber(h[9]) < clock + keep / 2 then
      if not now then
        local t = redis.call('TIME')
        now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      end
      f[k + 1] = 'e'; f[k + 2] = now + keep
      redis.call('PEXPIRE', key, keep)
    end
    redis.call('HSET', key, unpack(f))
  end
  out[#out + 1] = tostring(d)
  out[#out + 1] = tostring(m)
end
return out
";

/// Lease renewal: KEYS are subject hashes, ARGV[1] the TTL in ms, ARGV[2] the replica id,
/// ARGV[3] the least expiry (ms) a hash with a live lease keeps. A lease already swept (by
/// another replica after the TTL) stays gone.
///
/// The hash's own expiry is pushed out too when it is nearer than that: a stream that runs
/// longer than the hash's expiry (2 minutes for a subject without a budget) with no other
/// admission on its subject would otherwise lose its slot with the hash, and the subject
/// could then open one stream too many.
pub const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local xf = 'x:' .. ARGV[2]
local keep = tonumber(ARGV[3])
for i = 1, #KEYS do
  if redis.call('HEXISTS', KEYS[i], xf) == 1 then
    if redis.call('PTTL', KEYS[i]) < keep then
      redis.call('PEXPIRE', KEYS[i], keep)
      redis.call('HSET', KEYS[i], xf, now + tonumber(ARGV[1]), 'e', now + keep)
    else
      redis.call('HSET', KEYS[i], xf, now + tonumber(ARGV[1]))
    end
  end
end
return #KEYS
";

/// Seeding from the ledger: a period the hash does not hold yet is set to the seed.
/// KEYS[1] the subject's hash; ARGV day index, day USD, month index, month USD. Returns the
/// day and month totals after.
pub const SEED: &str = r"
local h = redis.call('HMGET', KEYS[1], 'day', 'd', 'month', 'm')
local d, m = tonumber(h[2]) or 0, tonumber(h[4]) or 0
if h[1] ~= ARGV[1] then d = tonumber(ARGV[2]); redis.call('HSET', KEYS[1], 'day', ARGV[1], 'd', ARGV[2]) end
if h[3] ~= ARGV[3] then m = tonumber(ARGV[4]); redis.call('HSET', KEYS[1], 'month', ARGV[3], 'm', ARGV[4]) end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'e', tonumber(t[1]) * 1000 + 3024000000)
redis.call('PEXPIRE', KEYS[1], 3024000000)
return {tostring(d), tostring(m)}
";
/// The Redis hash of one subject (see the module docs).
#[derive(Debug)]
pub struct Keys(String);

/// A call admitted by Redis (what it holds follows from its settlement: a stream slot when
/// it is a stream, a reservation when it reserved).
#[derive(Debug)]
pub struct Lease(());

/// A settlement waiting for the worker.
#[derive(Debug)]
struct Job {
    lease: Option<Lease>,
    end: Settlement,
    now_ms: i64,
}

/// Settlements kept while Redis is unreachable.
const MAX_PENDING: usize = 10_000;

/// The Redis backend.
pub struct Remote {
    shared: Arc<Shared>,
    admit: Script,
    settle: Script,
    renew: Script,
    seed: Script,
    /// Per subject hash: how many of this replica's calls hold a lease there (renewed while
    /// above zero).
    live: Mutex<HashMap<String, u64>>,
    jobs: mpsc::UnboundedSender<Job>,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<Job>>>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

fn parse_f64(v: Option<&String>) -> Result<f64, SharedError> {
    v.and_then(|s| s.parse().ok())
        .ok_or_else(|| SharedError::Reply(format!("expected a number, got {v:?}")))
}

/// Which of a call's subjects it holds a lease of: a stream slot, a reservation.
fn leased(s: &super::Subject, stream: bool, reserved: bool) -> (bool, bool) {
    let l = &s.limits;
    (
        stream && l.max_concurrent_streams > 0,
        reserved && (l.daily_budget_usd > 0.0 || l.monthly_budget_usd > 0.0),
    )
}

impl Remote {
    /// A backend on `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        let (jobs, receiver) = mpsc::unbounded_channel();
        Self {
            shared,
            admit: Script::new(ADMIT),
            settle: Script::new(SETTLE),
            renew: Script::new(RENEW),
            seed: Script::new(SEED),
            live: Mutex::new(HashMap::new()),
            jobs,
            receiver: Mutex::new(Some(receiver)),
        }
    }

    /// Connects and loads the scripts (within `shared.connect_timeout`), so that the first
    /// calls do not pay for it; a failure only marks the connection degraded.
    pub(super) async fn prepare(&self) {
        let settings = self.shared.settings();
        let load = async {
            let mut conn = self.shared.connection();
            for script in [&self.admit, &self.settle, &self.renew, &self.seed] {
                script.load_async(&mut conn).await?;
            }
            Ok::<_, SharedError>(())
        };
        let result = match tokio::time::timeout(settings.connect_timeout, load).await {
            Ok(result) => result,
            Err(_) => Err(SharedError::Timeout(settings.connect_timeout)),
        };
        if let Err(err) = result {
            self.shared.failed("connect", &err);
        }
    }

    /// The connection.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// What happens while Redis is unreachable.
    pub fn mode(&self) -> FailMode {
        self.shared.settings().mode
    }

    /// The hash of `subject`.
    pub fn keys(&self, subject: &str) -> Keys {
        Keys(self.shared.key(&format!("{subject}:limits")))
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.shared.settings().lease_ttl.as_millis()).unwrap_or(u64::MAX)
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One round trip: admitted (with the lease to settle), refused, or Redis failed.
    pub(super) async fn admit(
        &self,
        ask: &Ask,
    ) -> Result<Result<(Decision, Lease), Refusal>, SharedError> {
        let now_ms = super::unix_now_ms();
        let (day, month) = periods(now_ms);
        let check = match ask.budget {
            BudgetCheck::Skip => 0,
            BudgetCheck::Reserve => 1,
            BudgetCheck::FallbackWhenSpent => 2,
        };
        let mut inv = self.admit.prepare_invoke();
        inv.arg(ask.subjects.0.len())
            .arg(ask.estimated_tokens)
            .arg(u8::from(ask.stream))
            .arg(ask.estimated_usd)
            .arg(check)
            .arg(self.shared.replica_id())
            .arg(self.ttl_ms())
            .arg(day)
            .arg(month);
        for s in ask.subjects.iter() {
            if let Some(keys) = &s.keys {
                inv.key(&keys.0);
            }
            let l = &s.limits;
            inv.arg(l.requests_per_minute)
                .arg(l.tokens_per_minute)
                .arg(l.max_concurrent_streams)
                .arg(l.daily_budget_usd)
                .arg(l.monthly_budget_usd);
        }
        let reply: Vec<String> = self
            .shared
            .run("admit", |mut conn| async move {
                Ok(inv.invoke_async(&mut conn).await?)
            })
            .await?;
        let field = |i: usize| reply.get(i);
        let index = || -> Result<usize, SharedError> {
            field(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| SharedError::Reply(format!("admit: {reply:?}")))
        };
        let wait = || parse_f64(field(2)).map(|ms| Duration::from_millis(ms.max(0.0) as u64));
        let refusal = match field(0).map(String::as_str) {
            Some("0") => None,
            Some("1") => Some(Refusal::rate(index()?, Kind::Requests, wait()?)),
            Some("2") => Some(Refusal::rate(index()?, Kind::Tokens, wait()?)),
            Some("3") => Some(Refusal::rate(index()?, Kind::Streams, wait()?)),
            Some(code @ ("4" | "5")) => Some(Refusal::Budget {
                subject: index()?,
                period: if code == "4" {
                    Period::Month
                } else {
                    Period::Day
                },
                used: parse_f64(field(2))?,
            }),
            _ => return Err(SharedError::Reply(format!("admit: {reply:?}"))),
        };
        if let Some(refusal) = refusal {
            return Ok(Err(refusal));
        }
        let budget_spent = field(1).is_some_and(|s| s == "1");
        let reserved = !budget_spent && ask.budget != BudgetCheck::Skip && ask.estimated_usd > 0.0;
        self.count(ask.subjects.iter(), ask.stream, reserved, true);
        Ok(Ok((
            Decision {
                budget_spent,
                reserved_usd: if reserved { ask.estimated_usd } else { 0.0 },
            },
            Lease(()),
        )))
    }

    /// Counts this replica's leases of `subjects` up (admitted) or down (settled).
    fn count<'a>(
        &self,
        subjects: impl Iterator<Item = &'a super::Subject>,
        stream: bool,
        reserved: bool,
        up: bool,
    ) {
        let mut live = None;
        for s in subjects {
            let (Some(keys), (slot, resv)) = (&s.keys, leased(s, stream, reserved)) else {
                continue;
            };
            if !slot && !resv {
                continue;
            }
            let live = live.get_or_insert_with(|| self.live());
            if up {
                *live.entry(keys.0.clone()).or_insert(0) += 1;
            } else if let Some(n) = live.get_mut(&keys.0) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    live.remove(&keys.0);
                }
            }
        }
    }

    /// Queues a settlement (the lease stops being renewed now).
    pub(super) fn settle(&self, lease: Option<Lease>, end: Settlement, local: &Local, now_ms: i64) {
        if lease.is_some() {
            self.count(
                end.subjects.iter(),
                end.stream,
                end.reserved_usd > 0.0,
                false,
            );
        }
        let job = Job { lease, end, now_ms };
        if let Err(mpsc::error::SendError(job)) = self.jobs.send(job) {
            // The worker is gone (shutdown): this replica's view keeps the cost.
            if job.lease.is_some() {
                mirror(local, &job, None);
            }
        }
    }

    async fn run_settle(&self, job: &Job) -> Result<Vec<String>, SharedError> {
        let end = &job.end;
        let (day, month) = periods(job.now_ms);
        let give = end
            .actual_tokens
            .map(|actual| (end.estimated_tokens as f64 - actual as f64).to_string())
            .unwrap_or_default();
        let held = job.lease.is_some();
        let mut inv = self.settle.prepare_invoke();
        inv.arg(end.subjects.0.len())
            .arg(self.shared.replica_id())
            .arg(give)
            .arg(end.cost_usd)
            .arg(day)
            .arg(month)
            .arg(job.now_ms);
        for s in end.subjects.iter() {
            if let Some(keys) = &s.keys {
                inv.key(&keys.0);
            }
            let (slot, resv) = leased(s, end.stream && held, held && end.reserved_usd > 0.0);
            let l = &s.limits;
            inv.arg(l.tokens_per_minute)
                .arg(u8::from(slot))
                .arg(if resv { end.reserved_usd } else { 0.0 })
                .arg(u8::from(
                    l.daily_budget_usd > 0.0 || l.monthly_budget_usd > 0.0,
                ));
        }
        self.shared
            .run("settle", |mut conn| async move {
                Ok(inv.invoke_async(&mut conn).await?)
            })
            .await
    }

    /// Settles queued calls until `stop` (then drains the queue once); a settlement Redis
    /// could not take is kept and retried once Redis answers again.
    pub(super) async fn settle_worker(&self, local: &Local, stop: CancellationToken) {
        let Some(mut rx) = self
            .receiver
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        else {
            return;
        };
        let mut pending: VecDeque<Job> = VecDeque::new();
        let mut retry = tokio::time::interval(Duration::from_millis(250));
        loop {
            let job = tokio::select! {
                job = rx.recv() => job,
                _ = retry.tick() => {
                    while !self.shared.is_degraded() && let Some(job) = pending.pop_front() {
                        if self.try_settle(&job, local).await.is_err() {
                            pending.push_front(job);
                            break;
                        }
                    }
                    continue;
                }
                () = stop.cancelled() => None,
            };
            let Some(job) = job else { break };
            if self.shared.is_degraded() || self.try_settle(&job, local).await.is_err() {
                // Redis did not take it: this replica counts the cost now (a call admitted
                // here already did), Redis later.
                if job.lease.is_some() {
                    mirror(local, &job, None);
                }
                if pending.len() >= MAX_PENDING {
                    pending.pop_front();
                    metrics::counter!(crate::telemetry::names::SHARED_STATE_ERRORS, "op" => "settle_dropped").increment(1);
                }
                pending.push_back(job);
            }
        }
        rx.close();
        while let Ok(job) = rx.try_recv() {
            if self.try_settle(&job, local).await.is_err() && job.lease.is_some() {
                mirror(local, &job, None);
            }
        }
    }

    async fn try_settle(&self, job: &Job, local: &Local) -> Result<(), SharedError> {
        let totals = self.run_settle(job).await?;
        mirror(local, job, Some(&totals));
        Ok(())
    }

    /// Renews this replica's live leases every third of the lease TTL until `stop`.
    pub(super) async fn renew(&self, stop: CancellationToken) {
        let period = self.shared.settings().lease_ttl / 3;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(period) => {}
            }
            if self.shared.is_degraded() {
                continue;
            }
            let keys: Vec<String> = self.live().keys().cloned().collect();
            for chunk in keys.chunks(500) {
                let mut inv = self.renew.prepare_invoke();
                // As the admission keeps a hash without a budget: 2 minutes, or 2 TTLs.
                let keep = self.ttl_ms().max(60_000) * 2;
                inv.arg(self.ttl_ms())
                    .arg(self.shared.replica_id())
                    .arg(keep);
                for key in chunk {
                    inv.key(key);
                }
                let renewed = self
                    .shared
                    .run("renew", |mut conn| async move {
                        Ok(inv.invoke_async::<i64>(&mut conn).await?)
                    })
                    .await;
                if renewed.is_err() {
                    break;
                }
            }
        }
    }

    /// Seeds a subject's spend where Redis holds nothing for the period; returns the
    /// shared totals.
    pub(super) async fn seed(
        &self,
        subject: &str,
        now_ms: i64,
        day_usd: f64,
        month_usd: f64,
    ) -> Result<(f64, f64), SharedError> {
        let (day, month) = periods(now_ms);
        let key = self.keys(subject).0;
        let reply: Vec<String> = self
            .shared
            .run("seed", |mut conn| async move {
                Ok(self
                    .seed
                    .key(key)
                    .arg(day)
                    .arg(day_usd)
                    .arg(month)
                    .arg(month_usd)
                    .invoke_async(&mut conn)
                    .await?)
            })
            .await?;
        Ok((parse_f64(reply.first())?, parse_f64(reply.get(1))?))
    }
}

/// Updates this replica's view of spend after a settlement: the totals Redis reported, or
/// (`None`) the cost added locally.
fn mirror(local: &Local, job: &Job, totals: Option<&[String]>) {
    for (i, s) in job.end.subjects.iter().enumerate() {
        let pair = totals.and_then(|t| {
            Some((
                t.get(2 * i)?.parse::<f64>().ok()?,
                t.get(2 * i + 1)?.parse::<f64>().ok()?,
            ))
        });
        local.mirror(s, pair, job.end.cost_usd, job.now_ms);
    }
}
