//! The Redis backend: the limits of every replica in one place.
//!
//! Keys per subject (`P` = `shared.key_prefix`, `S` = `key:NAME` or `team:NAME`), built once
//! per key:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:S:rpm`, `P:S:tpm` | hash `t`, `at` | a token bucket: level and when (Redis ms); expires 2 min after its last use (it is full by then) |
//! | `P:S:streams` | sorted set | stream leases: member = lease id, score = expiry (Redis ms) |
//! | `P:S:spend` | hash `day`, `d`, `month`, `m`, `r` | spend of the UTC day and month (index, USD), and the sum of live reservations |
//! | `P:S:resv`, `P:S:resvx` | hash, sorted set | each live reservation's amount, and its expiry |
//!
//! - Admission ([`ADMIT`]) is one `EVALSHA` for all of a call's subjects: it sweeps expired
//!   leases and reservations, checks every limit, and takes all of them or none. Redis's own
//!   clock (`TIME`) times buckets and leases, so replicas' clocks do not matter there; the
//!   budget period (UTC day and month) comes from the replica.
//! - A stream slot and a budget reservation are leases: their expiry is `shared.lease_ttl`
//!   ahead, and the replica renews every live lease each third of that ([`RENEW`], one
//!   call for all). A replica that dies (`kill -9`) stops renewing; the next admission
//!   after the TTL sweeps its leases away.
//! - Settlement ([`SETTLE`]) runs off the call path, in a background worker: it gives back
//!   unused estimated tokens, removes the reservation, adds the real cost to the day and
//!   month, frees the stream slot, and reports the totals, which become this replica's view
//!   of the subject's spend. When Redis cannot be reached, the settlement is kept (up to
//!   10,000) and sent once it answers again; the reservation expires with its lease.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use redis::Script;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Ask, BudgetCheck, Decision, Kind, Period, Refusal, Settlement, local::Local, periods};
use crate::shared::{FailMode, Shared, SharedError};

/// Admission for all of a call's subjects; see the module docs.
///
/// KEYS: 6 per subject (rpm, tpm, streams, spend, resv, resvx). ARGV: subjects, estimated
/// tokens, stream (0/1), estimated USD, budget check (0 skip, 1 reserve, 2 fallback when
/// spent), lease id, lease TTL ms, day index, month index; then 5 per subject: rpm, tpm,
/// max streams, daily budget, monthly budget.
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
local id = ARGV[6]
local ttl = tonumber(ARGV[7])
local day, month = ARGV[8], ARGV[9]
local function level(key, cap)
  local h = redis.call('HMGET', key, 't', 'at')
  if not h[1] then return cap end
  local elapsed = math.max(0, now - tonumber(h[2]))
  return math.min(cap, tonumber(h[1]) + elapsed * cap / 60000)
end
local function wait(cap, have, amount)
  local needed = math.min(amount, cap)
  if have >= needed then return nil end
  return math.ceil((needed - have) * 60000 / cap)
end
local plan = {}
local spent = 0
for i = 0, n - 1 do
  local k, a = i * 6, 10 + i * 5
  local rpm, tpm, streams = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local daily, monthly = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local p = {}
  if rpm > 0 then
    p.rpm = level(KEYS[k + 1], rpm)
    local w = wait(rpm, p.rpm, 1)
    if w then return {'1', tostring(i), tostring(w)} end
  end
  if tpm > 0 then
    p.tpm = level(KEYS[k + 2], tpm)
    local w = wait(tpm, p.tpm, tokens)
    if w then return {'2', tostring(i), tostring(w)} end
  end
  if stream and streams > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 3], '-inf', now)
    if redis.call('ZCARD', KEYS[k + 3]) >= streams then return {'3', tostring(i), '1000'} end
    p.stream = true
  end
  if check > 0 and (daily > 0 or monthly > 0) then
    local h = redis.call('HMGET', KEYS[k + 4], 'day', 'd', 'month', 'm', 'r')
    local d = (h[1] == day) and tonumber(h[2]) or 0
    local m = (h[3] == month) and tonumber(h[4]) or 0
    local r = tonumber(h[5] or '0')
    local dead = redis.call('ZRANGEBYSCORE', KEYS[k + 6], '-inf', now, 'LIMIT', 0, 200)
    if #dead > 0 then
      local amounts = redis.call('HMGET', KEYS[k + 5], unpack(dead))
      for j = 1, #dead do r = r - (tonumber(amounts[j]) or 0) end
      if r < 1e-12 then r = 0 end
      redis.call('HDEL', KEYS[k + 5], unpack(dead))
      redis.call('ZREM', KEYS[k + 6], unpack(dead))
      redis.call('HSET', KEYS[k + 4], 'r', tostring(r))
    end
    for _, b in ipairs({{monthly, m, '4'}, {daily, d, '5'}}) do
      local budget, used = b[1], b[2]
      if budget > 0 and (used + r + usd > budget or (check == 2 and used + r >= budget)) then
        if check == 2 then spent = 1 else return {b[3], tostring(i), tostring(used)} end
      end
    end
    p.reserve = true
  end
  plan[i] = p
end
for i = 0, n - 1 do
  local k, p = i * 6, plan[i]
  if p.rpm then
    redis.call('HSET', KEYS[k + 1], 't', tostring(p.rpm - 1), 'at', now)
    redis.call('PEXPIRE', KEYS[k + 1], 120000)
  end
  if p.tpm then
    redis.call('HSET', KEYS[k + 2], 't', tostring(p.tpm - tokens), 'at', now)
    redis.call('PEXPIRE', KEYS[k + 2], 120000)
  end
  if p.stream then
    redis.call('ZADD', KEYS[k + 3], now + ttl, id)
    redis.call('PEXPIRE', KEYS[k + 3], 2 * ttl)
  end
  if p.reserve and spent == 0 and usd > 0 then
    redis.call('HINCRBYFLOAT', KEYS[k + 4], 'r', tostring(usd))
    redis.call('HSET', KEYS[k + 5], id, tostring(usd))
    redis.call('ZADD', KEYS[k + 6], now + ttl, id)
    for j = 4, 6 do redis.call('PEXPIRE', KEYS[k + j], 3024000000) end
  end
end
return {'0', tostring(spent)}
";

/// Settlement; see the module docs.
///
/// KEYS: 6 per subject, as for [`ADMIT`]. ARGV: subjects, lease id (empty: none), tokens to
/// give back (estimate - actual; empty: no usage), cost USD, day index, month index, stream
/// (0/1); then 2 per subject: tpm, max streams.
///
/// Returns the day and month spend of each subject after the settlement, as strings.
pub const SETTLE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[1])
local id = ARGV[2]
local give = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local day, month = ARGV[5], ARGV[6]
local stream = ARGV[7] == '1'
local out = {}
for i = 0, n - 1 do
  local k, a = i * 6, 8 + i * 2
  local tpm, streams = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  if give and give ~= 0 and tpm > 0 then
    local h = redis.call('HMGET', KEYS[k + 2], 't', 'at')
    if h[1] then
      local elapsed = math.max(0, now - tonumber(h[2]))
      local level = math.min(tpm, tonumber(h[1]) + elapsed * tpm / 60000) + give
      redis.call('HSET', KEYS[k + 2], 't', tostring(level), 'at', now)
      redis.call('PEXPIRE', KEYS[k + 2], 120000)
    end
  end
  if id ~= '' and stream and streams > 0 then redis.call('ZREM', KEYS[k + 3], id) end
  local h = redis.call('HMGET', KEYS[k + 4], 'day', 'd', 'month', 'm')
  local d = (h[1] == day) and tonumber(h[2]) or 0
  local m = (h[3] == month) and tonumber(h[4]) or 0
  if id ~= '' then
    local amount = redis.call('HGET', KEYS[k + 5], id)
    if amount then
      redis.call('HDEL', KEYS[k + 5], id)
      redis.call('ZREM', KEYS[k + 6], id)
      local r = redis.call('HINCRBYFLOAT', KEYS[k + 4], 'r', tostring(-tonumber(amount)))
      if tonumber(r) < 1e-12 then redis.call('HSET', KEYS[k + 4], 'r', '0') end
    end
  end
  if cost > 0 or h[1] ~= day or h[3] ~= month then
    d, m = d + cost, m + cost
    redis.call('HSET', KEYS[k + 4], 'day', day, 'd', tostring(d), 'month', month, 'm', tostring(m))
    redis.call('PEXPIRE', KEYS[k + 4], 3024000000)
  end
  out[#out + 1] = tostring(d)
  out[#out + 1] = tostring(m)
end
return out
";

/// Lease renewal: KEYS are sorted sets, ARGV[1] the TTL in ms, ARGV[i + 1] the member of
/// KEYS[i]. Members already gone (settled, swept) stay gone.
pub const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  if redis.call('ZADD', KEYS[i], 'XX', 'CH', now + ttl, ARGV[i + 1]) > 0 then
    redis.call('PEXPIRE', KEYS[i], 2 * ttl)
  end
end
return #KEYS
";

/// Seeding from the ledger: a period the spend hash does not hold yet is set to the seed.
/// KEYS[1] spend; ARGV day index, day USD, month index, month USD. Returns the day and
/// month totals after.
pub const SEED: &str = r"
local h = redis.call('HMGET', KEYS[1], 'day', 'd', 'month', 'm')
local d, m = tonumber(h[2]) or 0, tonumber(h[4]) or 0
if h[1] ~= ARGV[1] then d = tonumber(ARGV[2]); redis.call('HSET', KEYS[1], 'day', ARGV[1], 'd', ARGV[2]) end
if h[3] ~= ARGV[3] then m = tonumber(ARGV[4]); redis.call('HSET', KEYS[1], 'month', ARGV[3], 'm', ARGV[4]) end
redis.call('PEXPIRE', KEYS[1], 3024000000)
return {tostring(d), tostring(m)}
";

/// The Redis keys of one subject (see the module docs).
#[derive(Debug)]
pub struct Keys([String; 6]);

/// A call's lease: the member of its stream slot and reservation.
#[derive(Debug)]
pub struct Lease {
    no: u64,
    id: String,
}

/// What is renewed for a live lease.
#[derive(Debug)]
struct Live {
    id: String,
    /// The sorted sets holding the lease (stream slots, reservations).
    sets: Vec<String>,
}

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
    next: AtomicU64,
    live: Mutex<HashMap<u64, Live>>,
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
            next: AtomicU64::new(1),
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

    /// The keys of `subject`.
    pub fn keys(&self, subject: &str) -> Keys {
        let key = |what: &str| self.shared.key(&format!("{subject}:{what}"));
        Keys([
            key("rpm"),
            key("tpm"),
            key("streams"),
            key("spend"),
            key("resv"),
            key("resvx"),
        ])
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.shared.settings().lease_ttl.as_millis()).unwrap_or(u64::MAX)
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Live>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One round trip: admitted (with the lease to settle), refused, or Redis failed.
    pub(super) async fn admit(
        &self,
        ask: &Ask,
    ) -> Result<Result<(Decision, Lease), Refusal>, SharedError> {
        let no = self.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}:{no}", self.shared.replica_id());
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
            .arg(&id)
            .arg(self.ttl_ms())
            .arg(day)
            .arg(month);
        for s in ask.subjects.iter() {
            for key in s.keys.iter().flat_map(|k| k.0.iter()) {
                inv.key(key);
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
        let mut sets = Vec::new();
        for s in ask.subjects.iter() {
            let (Some(keys), l) = (&s.keys, &s.limits) else {
                continue;
            };
            if ask.stream && l.max_concurrent_streams > 0 {
                sets.push(keys.0[2].clone());
            }
            if reserved && (l.daily_budget_usd > 0.0 || l.monthly_budget_usd > 0.0) {
                sets.push(keys.0[5].clone());
            }
        }
        if !sets.is_empty() {
            self.live().insert(
                no,
                Live {
                    id: id.clone(),
                    sets,
                },
            );
        }
        Ok(Ok((
            Decision {
                budget_spent,
                reserved_usd: if reserved { ask.estimated_usd } else { 0.0 },
            },
            Lease { no, id },
        )))
    }

    /// Queues a settlement (the lease stops being renewed now).
    pub(super) fn settle(&self, lease: Option<Lease>, end: Settlement, local: &Local, now_ms: i64) {
        if let Some(lease) = &lease {
            self.live().remove(&lease.no);
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
        let mut inv = self.settle.prepare_invoke();
        inv.arg(end.subjects.0.len())
            .arg(job.lease.as_ref().map_or("", |l| l.id.as_str()))
            .arg(give)
            .arg(end.cost_usd)
            .arg(day)
            .arg(month)
            .arg(u8::from(end.stream && job.lease.is_some()));
        for s in end.subjects.iter() {
            for key in s.keys.iter().flat_map(|k| k.0.iter()) {
                inv.key(key);
            }
            inv.arg(s.limits.tokens_per_minute)
                .arg(s.limits.max_concurrent_streams);
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
            let leases: Vec<(String, String)> = self
                .live()
                .values()
                .flat_map(|l| l.sets.iter().map(|s| (s.clone(), l.id.clone())))
                .collect();
            for chunk in leases.chunks(500) {
                let mut inv = self.renew.prepare_invoke();
                inv.arg(self.ttl_ms());
                for (set, id) in chunk {
                    inv.key(set).arg(id);
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
        let key = self.keys(subject).0[3].clone();
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
