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
//! - Credit ([`credit`](super::credit), `shared.credit_window`): an admission may also take
//!   a block of requests, tokens and reserved USD for its replica, out of which later calls
//!   are admitted without a round trip until the window ends; what is left goes back
//!   ([`RELEASE`]). A block is taken by one call at a time per subject, in a task of its
//!   own (a caller that goes away does not lose it), and taken again before it runs low.
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
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    Ask, BudgetCheck, Decision, Kind, Period, Refusal, Settlement,
    credit::{self, Left},
    local::Local,
    periods,
};
use crate::shared::{FailMode, Shared, SharedError};

/// Admission for all of a call's subjects; see the module docs.
///
/// KEYS: one hash per subject. ARGV: subjects, estimated tokens, stream (0/1), estimated
/// USD, budget check (0 skip, 1 reserve, 2 fallback when spent), replica id, lease TTL ms,
/// day index, month index, the credit window ms (0: no credit); then 5 per subject: rpm,
/// tpm, max streams, daily budget, monthly budget.
///
/// Returns `{"0", spent (0/1), then per subject the credit taken: requests, tokens, USD}`
/// when admitted, `{"1".."3", subject, wait ms}` for the requests, tokens or streams
/// limit, `{"4"|"5", subject, used}` for the month or day budget (subjects 0-based).
///
/// Credit (see [`credit`](super::credit)): with a window `W`, an admitted call also takes
/// for its replica, per subject, `floor(min(limit x W / 1 min, (level after the call -
/// limit / 2) / 8))` requests and as many tokens by the same rule (none below 1), and of a
/// budget it checked `min(budget / 64, (budget / 2 - spend - reservations - estimate) /
/// 8)` USD as a reservation (none when that is not above zero): credit comes only from
/// the upper half of a bucket or budget, so near a limit every call asks Redis.
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
local win = tonumber(ARGV[10])
local xf, sf, rf = 'x:' .. rep, 's:' .. rep, 'r:' .. rep
local min, max = math.min, math.max
local plan = {}
local spent = 0
for i = 1, n do
  local key, a = KEYS[i], 11 + (i - 1) * 5
  local rpm, tpm, streams = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local daily, monthly = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local budget = daily > 0 or monthly > 0
  local p = {budget = budget, rpmax = rpm, tpmax = tpm, daily = daily, monthly = monthly}
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
      p.d, p.m, p.rall = d, m, r
    end
  end
  plan[i] = p
end
local out = {'0', tostring(spent)}
for i = 1, n do
  local key, p = KEYS[i], plan[i]
  local f, k = {}, 0
  local cr, ct, cu = 0, 0, 0
  if p.rpm then
    if win > 0 then
      cr = math.floor(min(p.rpmax * win / 60000, (p.rpm - 1 - p.rpmax / 2) / 8))
      if cr < 1 then cr = 0 end
    end
    f[k + 1] = 'rt'; f[k + 2] = p.rpm - 1 - cr; f[k + 3] = 'ra'; f[k + 4] = now; k = k + 4
  end
  if p.tpm then
    if win > 0 then
      ct = math.floor(min(p.tpmax * win / 60000, (p.tpm - tokens - p.tpmax / 2) / 8))
      if ct < 1 then ct = 0 end
    end
    f[k + 1] = 'tt'; f[k + 2] = p.tpm - tokens - ct; f[k + 3] = 'ta'; f[k + 4] = now; k = k + 4
  end
  local lease = false
  if p.stream then
    f[k + 1] = sf; f[k + 2] = p.s + 1; k = k + 2; lease = true
  end
  if p.reserve and spent == 0 and win > 0 then
    local room = math.huge
    local used = p.rall + usd
    if p.daily > 0 then room = min(room, p.daily / 64, (p.daily / 2 - p.d - used) / 8) end
    if p.monthly > 0 then room = min(room, p.monthly / 64, (p.monthly / 2 - p.m - used) / 8) end
    if room > 0 and room < math.huge then cu = room end
  end
  if p.reserve and spent == 0 and usd + cu > 0 then
    f[k + 1] = rf; f[k + 2] = p.r + usd + cu; k = k + 2; lease = true
  end
  out[#out + 1] = tostring(cr)
  out[#out + 1] = tostring(ct)
  out[#out + 1] = string.format('%.17g', cu)
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
return out
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
/// Credit given back ([`credit`](super::credit)): KEYS are subject hashes; ARGV[1] the
/// replica id, then 5 per subject: rpm, tpm, requests, tokens, USD. Requests and tokens go
/// back into the buckets (capped at the limit: the same as adding them to the level
/// refilled until now, since the refill is capped when read), the USD out of the replica's
/// reservations.
pub const RELEASE: &str = r"
local rf = 'r:' .. ARGV[1]
for i = 1, #KEYS do
  local a = 2 + (i - 1) * 5
  local rpm, tpm = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local req, tok, usd = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local h = redis.call('HMGET', KEYS[i], 'rt', 'tt', rf)
  local f, k = {}, 0
  if req > 0 and h[1] then f[1] = 'rt'; f[2] = math.min(rpm, tonumber(h[1]) + req); k = 2 end
  if tok > 0 and h[2] then f[k + 1] = 'tt'; f[k + 2] = math.min(tpm, tonumber(h[2]) + tok); k = k + 2 end
  if usd > 0 and h[3] then
    local r = tonumber(h[3]) - usd
    if r < 1e-12 then r = 0 end
    f[k + 1] = rf; f[k + 2] = r; k = k + 2
  end
  if k > 0 then redis.call('HSET', KEYS[i], unpack(f)) end
end
return #KEYS
";

/// The Redis hash of one subject (see the module docs), and this replica's credit there.
#[derive(Debug)]
pub struct Keys {
    name: String,
    credit: credit::Cell,
}

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

/// Credit going back to Redis.
#[derive(Debug)]
struct Release {
    key: String,
    rpm: f64,
    tpm: f64,
    left: Left,
}

/// What the background worker does.
#[derive(Debug)]
enum Work {
    Settle(Job),
    Release(Release),
}

/// Settlements kept while Redis is unreachable.
const MAX_PENDING: usize = 10_000;

/// Most settlements (and give-backs) sent in one round trip.
const PIPELINE: usize = 64;

/// The Redis backend.
pub struct Remote {
    shared: Arc<Shared>,
    admit: Script,
    settle: Script,
    renew: Script,
    seed: Script,
    release: Script,
    /// Per subject hash: this replica's credit there (see [`credit`](super::credit)).
    credits: Mutex<HashMap<String, credit::Cell>>,
    /// Per subject hash: how many of this replica's calls hold a lease there (renewed while
    /// above zero).
    live: Mutex<HashMap<String, u64>>,
    jobs: mpsc::UnboundedSender<Work>,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<Work>>>,
    /// Calls admitted out of credit, and with a round trip (registered once).
    via_credit: metrics::Counter,
    via_redis: metrics::Counter,
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

/// The admission of `ask` (see [`ADMIT`]), asking for a block of credit when `window` is
/// not zero.
fn invocation<'a>(
    script: &'a Script,
    ask: &Ask,
    replica: &str,
    ttl_ms: u64,
    window: Duration,
    now_ms: i64,
) -> redis::ScriptInvocation<'a> {
    let (day, month) = periods(now_ms);
    let check = match ask.budget {
        BudgetCheck::Skip => 0,
        BudgetCheck::Reserve => 1,
        BudgetCheck::FallbackWhenSpent => 2,
    };
    let mut inv = script.prepare_invoke();
    inv.arg(ask.subjects.0.len())
        .arg(ask.estimated_tokens)
        .arg(u8::from(ask.stream))
        .arg(ask.estimated_usd)
        .arg(check)
        .arg(replica)
        .arg(ttl_ms)
        .arg(day)
        .arg(month)
        .arg(u64::try_from(window.as_millis()).unwrap_or(u64::MAX));
    for s in ask.subjects.iter() {
        if let Some(keys) = &s.keys {
            inv.key(&keys.name);
        }
        let l = &s.limits;
        inv.arg(l.requests_per_minute)
            .arg(l.tokens_per_minute)
            .arg(l.max_concurrent_streams)
            .arg(l.daily_budget_usd)
            .arg(l.monthly_budget_usd);
    }
    inv
}

/// An admission that asks for a block of credit, run in a task of its own.
struct Grant {
    shared: Arc<Shared>,
    script: Script,
    ask: Ask,
    replica: String,
    ttl_ms: u64,
    window: Duration,
    now_ms: i64,
    /// Not for a call: what the admission takes for the call becomes credit too.
    topup: bool,
}

impl Grant {
    /// The round trip; the credit it brings is added to the subjects' cells, and the cells
    /// are free for the next grant whatever happens.
    async fn run(self) -> Result<Vec<String>, SharedError> {
        struct Clear<'a>(&'a Ask);
        impl Drop for Clear<'_> {
            fn drop(&mut self) {
                for keys in self.0.subjects.iter().filter_map(|s| s.keys.as_ref()) {
                    credit::lock(&keys.credit).granting = false;
                }
            }
        }
        let _clear = Clear(&self.ask);
        let inv = invocation(
            &self.script,
            &self.ask,
            &self.replica,
            self.ttl_ms,
            self.window,
            self.now_ms,
        );
        let reply: Vec<String> = self
            .shared
            .run("admit", |mut conn| async move {
                Ok(inv.invoke_async(&mut conn).await?)
            })
            .await?;
        if reply.first().is_some_and(|c| c == "0") {
            let spent = reply.get(1).is_some_and(|s| s == "1");
            let until = Instant::now() + self.window;
            for (i, s) in self.ask.subjects.iter().enumerate() {
                let Some(keys) = &s.keys else { continue };
                let at = |j: usize| {
                    reply
                        .get(2 + 3 * i + j)
                        .and_then(|v| v.parse::<f64>().ok())
                        .filter(|v| v.is_finite() && *v > 0.0)
                        .unwrap_or(0.0)
                };
                let block = Left {
                    requests: at(0),
                    tokens: at(1),
                    usd: at(2),
                };
                let (mut requests, mut tokens, mut usd) = (block.requests, block.tokens, block.usd);
                // What the admission took for the call; the budget only when reserved.
                let (share_requests, share_tokens, share_usd) = credit::needs(s, &self.ask);
                let share_usd = share_usd.filter(|_| !spent);
                if self.topup {
                    // Not for a call: its share becomes credit too.
                    requests += share_requests;
                    tokens += share_tokens;
                    usd += share_usd.unwrap_or(0.0);
                }
                let l = &s.limits;
                let mut c = credit::lock(&keys.credit);
                c.rpm = f64::from(l.requests_per_minute);
                c.tpm = l.tokens_per_minute as f64;
                c.requests += requests;
                c.tokens += tokens;
                c.usd += usd;
                if share_usd.is_some() {
                    // Checked just now: below half (a block), or not (none: every call with
                    // a budget check asks Redis until the next block).
                    c.budget_ok = block.usd > 0.0;
                }
                if requests > 0.0 || tokens > 0.0 || usd > 0.0 {
                    c.until = Some(until);
                    c.block = block;
                }
            }
        }
        Ok(reply)
    }
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
            release: Script::new(RELEASE),
            credits: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            jobs,
            receiver: Mutex::new(Some(receiver)),
            via_credit: metrics::counter!(crate::telemetry::names::SHARED_LIMIT_ADMISSIONS, "via" => "credit"),
            via_redis: metrics::counter!(crate::telemetry::names::SHARED_LIMIT_ADMISSIONS, "via" => "redis"),
        }
    }

    /// Connects and loads the scripts (within `shared.connect_timeout`), so that the first
    /// calls do not pay for it; a failure only marks the connection degraded.
    pub(super) async fn prepare(&self) {
        let settings = self.shared.settings();
        let load = async {
            let mut conn = self.shared.connection();
            for script in [
                &self.admit,
                &self.settle,
                &self.renew,
                &self.seed,
                &self.release,
            ] {
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

    /// The hash of `subject`, with this replica's credit there (the same cell for every
    /// `Keys` of one subject, so a reload of the keys keeps it).
    pub fn keys(&self, subject: &str) -> Keys {
        let name = self.shared.key(&format!("{subject}:limits"));
        let credit = self.credits().entry(name.clone()).or_default().clone();
        Keys { name, credit }
    }

    fn credits(&self) -> std::sync::MutexGuard<'_, HashMap<String, credit::Cell>> {
        self.credits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.shared.settings().lease_ttl.as_millis()).unwrap_or(u64::MAX)
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The credit window (zero: no credit).
    fn window(&self) -> Duration {
        self.shared.settings().credit_window
    }

    /// Admitted out of this replica's credit ([`credit`](super::credit)), or one round trip:
    /// admitted (with the lease to settle), refused, or Redis failed.
    pub(super) async fn admit(
        &self,
        ask: &Ask,
    ) -> Result<Result<(Decision, Lease), Refusal>, SharedError> {
        let window = self.window();
        let now = Instant::now();
        if let Some(low) = (!window.is_zero())
            .then(|| credit::take(ask, |s| s.keys.as_ref().map(|k| &k.credit), window, now))
            .flatten()
        {
            if low && self.claim_grant(ask, now) {
                // A new block before this one runs out, off the call path: an admission of
                // the same ask whose own share becomes credit too.
                tokio::spawn(self.grant(ask, window, true).run());
            }
            // The call's estimate is drawn from the reserved block: its settlement takes
            // it out of the reservation, as for a call Redis admitted.
            let reserved = ask.budget != BudgetCheck::Skip && ask.estimated_usd > 0.0;
            self.count(ask.subjects.iter(), ask.stream, reserved, true);
            self.via_credit.increment(1);
            return Ok(Ok((
                Decision {
                    budget_spent: false,
                    reserved_usd: if reserved { ask.estimated_usd } else { 0.0 },
                },
                Lease(()),
            )));
        }
        let now_ms = super::unix_now_ms();
        let reply = if !window.is_zero() && self.claim_grant(ask, now) {
            // Asking for a block: the round trip runs in a task of its own, so that a caller
            // that goes away mid-call does not lose the credit Redis gave (the reservation
            // of a lost block would stand until the lease expired).
            tokio::spawn(self.grant(ask, window, false).run())
                .await
                .map_err(|e| SharedError::Reply(format!("admit: the grant task failed: {e}")))??
        } else {
            let inv = invocation(
                &self.admit,
                ask,
                self.shared.replica_id(),
                self.ttl_ms(),
                Duration::ZERO,
                now_ms,
            );
            self.shared
                .run("admit", |mut conn| async move {
                    Ok(inv.invoke_async(&mut conn).await?)
                })
                .await?
        };
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
        self.via_redis.increment(1);
        Ok(Ok((
            Decision {
                budget_spent,
                reserved_usd: if reserved { ask.estimated_usd } else { 0.0 },
            },
            Lease(()),
        )))
    }

    /// An admission of `ask` that asks for a block (`topup`: for credit, not for a call).
    fn grant(&self, ask: &Ask, window: Duration, topup: bool) -> Grant {
        Grant {
            shared: self.shared.clone(),
            script: self.admit.clone(),
            ask: ask.clone(),
            replica: self.shared.replica_id().to_owned(),
            ttl_ms: self.ttl_ms(),
            window,
            now_ms: super::unix_now_ms(),
            topup,
        }
    }

    /// Before a round trip: sends back what expired credit of the call's subjects left, and
    /// marks them as taking a block unless another call is taking one (true then).
    fn claim_grant(&self, ask: &Ask, now: Instant) -> bool {
        let mut free = true;
        for s in ask.subjects.iter() {
            let Some(keys) = &s.keys else { continue };
            let mut c = credit::lock(&keys.credit);
            if c.expired(now) {
                self.give_back(&keys.name, &mut c);
            }
            free &= !c.granting;
        }
        if free {
            for keys in ask.subjects.iter().filter_map(|s| s.keys.as_ref()) {
                credit::lock(&keys.credit).granting = true;
            }
        }
        free
    }

    /// Empties a subject's credit and queues what was left to go back to Redis.
    fn give_back(&self, key: &str, c: &mut credit::Credit) {
        let left = c.take_left();
        if left.is_empty() {
            return;
        }
        let release = Release {
            key: key.to_owned(),
            rpm: c.rpm,
            tpm: c.tpm,
            left,
        };
        // Without the worker (shutdown), the reservation expires with the lease.
        let _ = self.jobs.send(Work::Release(release));
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
                // Credit admits calls without a round trip: no key copy for a subject
                // already counted.
                match live.get_mut(&keys.name) {
                    Some(n) => *n += 1,
                    None => {
                        live.insert(keys.name.clone(), 1);
                    }
                }
            } else if let Some(n) = live.get_mut(&keys.name) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    live.remove(&keys.name);
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
        if let Err(mpsc::error::SendError(Work::Settle(job))) = self.jobs.send(Work::Settle(job)) {
            // The worker is gone (shutdown): this replica's view keeps the cost.
            if job.lease.is_some() {
                mirror(local, &job, None);
            }
        }
    }

    /// The settlement script call of `job`.
    fn settle_invocation(&self, job: &Job) -> redis::ScriptInvocation<'_> {
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
                inv.key(&keys.name);
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
        inv
    }

    /// The give-back script call of `r`.
    fn release_invocation(&self, r: &Release) -> redis::ScriptInvocation<'_> {
        let mut inv = self.release.key(&r.key);
        inv.arg(self.shared.replica_id())
            .arg(r.rpm)
            .arg(r.tpm)
            .arg(r.left.requests)
            .arg(r.left.tokens)
            .arg(r.left.usd);
        inv
    }

    fn invocation_of(&self, work: &Work) -> redis::ScriptInvocation<'_> {
        match work {
            Work::Settle(job) => self.settle_invocation(job),
            Work::Release(r) => self.release_invocation(r),
        }
    }

    /// Sends `batch` in one round trip (a pipeline of script calls); returns the work Redis
    /// did not take. A script Redis does not know (it restarted) fails alone and is retried
    /// on its own, which loads it.
    async fn try_batch(&self, batch: Vec<Work>, local: &Local) -> Vec<Work> {
        if batch.len() == 1 {
            return match self.try_work(&batch[0], local).await {
                Ok(()) => Vec::new(),
                Err(_) => batch,
            };
        }
        let invocations: Vec<_> = batch.iter().map(|w| self.invocation_of(w)).collect();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for inv in &invocations {
            pipe.invoke_script(inv);
        }
        let replies: Result<Vec<redis::RedisResult<redis::Value>>, SharedError> = self
            .shared
            .run("settle", |mut conn| async move {
                Ok(pipe.query_async(&mut conn).await?)
            })
            .await;
        drop(invocations);
        let Ok(replies) = replies else {
            return batch;
        };
        let mut failed = Vec::new();
        let mut replies = replies.into_iter();
        for work in batch {
            match replies.next() {
                Some(Ok(value)) => {
                    if let Work::Settle(job) = &work {
                        match redis::from_redis_value::<Vec<String>>(value) {
                            Ok(totals) => mirror(local, job, Some(&totals)),
                            Err(_) => mirror(local, job, None),
                        }
                    }
                }
                Some(Err(e))
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    // Not run: once more on its own (which loads the script).
                    if self.try_work(&work, local).await.is_err() {
                        failed.push(work);
                    }
                }
                // Run and failed (a bug or a foreign value under our keys): not retried, so
                // that nothing is charged twice.
                Some(Err(e)) => {
                    let err = SharedError::Reply(format!("a settlement script failed: {e}"));
                    self.shared.failed("settle", &err);
                }
                None => failed.push(work),
            }
        }
        failed
    }

    /// Settles queued calls and gives back expired credit until `stop` (then drains the
    /// queue once and gives back all credit); work Redis could not take is kept and retried
    /// once Redis answers again.
    pub(super) async fn settle_worker(&self, local: &Local, stop: CancellationToken) {
        let Some(mut rx) = self
            .receiver
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        else {
            return;
        };
        let mut pending: VecDeque<Work> = VecDeque::new();
        let mut retry = tokio::time::interval(Duration::from_millis(250));
        loop {
            let work = tokio::select! {
                work = rx.recv() => work,
                _ = retry.tick() => {
                    self.sweep(Some(Instant::now()));
                    while !self.shared.is_degraded() && let Some(work) = pending.pop_front() {
                        if self.try_work(&work, local).await.is_err() {
                            pending.push_front(work);
                            break;
                        }
                    }
                    continue;
                }
                () = stop.cancelled() => None,
            };
            let Some(work) = work else { break };
            // What queued meanwhile goes along, in one round trip.
            let mut batch = vec![work];
            while batch.len() < PIPELINE
                && let Ok(work) = rx.try_recv()
            {
                batch.push(work);
            }
            let failed = if self.shared.is_degraded() {
                batch
            } else {
                self.try_batch(batch, local).await
            };
            for work in failed {
                // Redis did not take it: this replica counts the cost now (a call admitted
                // here already did), Redis later.
                if let Work::Settle(job) = &work
                    && job.lease.is_some()
                {
                    mirror(local, job, None);
                }
                if pending.len() >= MAX_PENDING {
                    pending.pop_front();
                    metrics::counter!(crate::telemetry::names::SHARED_STATE_ERRORS, "op" => "settle_dropped").increment(1);
                }
                pending.push_back(work);
            }
        }
        self.sweep(None);
        rx.close();
        while let Ok(work) = rx.try_recv() {
            if self.try_work(&work, local).await.is_err()
                && let Work::Settle(job) = &work
                && job.lease.is_some()
            {
                mirror(local, job, None);
            }
        }
    }

    /// Gives back the credit that expired by `now` (`None`: all of it), and forgets the
    /// cells of subjects no key has any more.
    fn sweep(&self, now: Option<Instant>) {
        self.credits().retain(|key, cell| {
            let mut c = credit::lock(cell);
            if !c.granting && now.is_none_or(|now| c.expired(now)) {
                self.give_back(key, &mut c);
            }
            c.until.is_some() || c.granting || Arc::strong_count(cell) > 1
        });
    }

    async fn try_work(&self, work: &Work, local: &Local) -> Result<(), SharedError> {
        match work {
            Work::Settle(job) => {
                let inv = self.settle_invocation(job);
                let totals: Vec<String> = self
                    .shared
                    .run("settle", |mut conn| async move {
                        Ok(inv.invoke_async(&mut conn).await?)
                    })
                    .await?;
                mirror(local, job, Some(&totals));
                Ok(())
            }
            Work::Release(r) => {
                let inv = self.release_invocation(r);
                self.shared
                    .run("release", |mut conn| async move {
                        Ok(inv.invoke_async::<i64>(&mut conn).await?)
                    })
                    .await
                    .map(|_| ())
            }
        }
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
            // Live leases, and the blocks of credit that hold a reservation.
            let mut keys: Vec<String> = self.live().keys().cloned().collect();
            keys.extend(
                self.credits()
                    .iter()
                    .filter(|(_, c)| credit::lock(c).usd > 0.0)
                    .map(|(k, _)| k.clone()),
            );
            keys.sort_unstable();
            keys.dedup();
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
        let key = self.keys(subject).name;
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
