//! Rate limits and budgets, per key and per team (a key's owner).
//!
//! - Requests per minute and tokens per minute are token buckets (capacity = the per-minute
//!   limit, refilled continuously). Tokens are estimated before a call from the request size
//!   and reconciled with the reported usage after it.
//! - Concurrent streams are counted while a stream is open.
//! - Budgets in US dollars per UTC day and month. Before a call, the estimated cost on the
//!   plan's primary target is reserved; the call is refused when spend + reservations + the
//!   estimate would pass the budget. After the call the reservation is replaced by the real
//!   cost. The overspend is therefore bounded by how far real costs exceed their estimates
//!   for the calls in flight (the output estimate is `max_tokens`, or 256 when unset).
//!   Crossing 50%, 80% and 100% of a budget is logged and counted in metrics.
//!
//! One call asks once ([`Limits::admit`]: rates, stream slot and budget together, so with
//! Redis it is at most one round trip, and none while the replica holds credit: see
//! [`credit`]) and is settled once ([`Permit::settle`], or on drop).
//!
//! Two backends behind [`Limits`]:
//! - `local` (always there): this replica's memory, under one lock. Alone on a single node;
//!   with Redis, the fallback in `fail_open` mode and this replica's view of spend (seeded
//!   from the ledger at start, updated from what Redis reports).
//! - `remote` (with `shared.redis_url`): the same limits in Redis for every replica at
//!   once: one Lua script per admission for all of the call's subjects, stream slots as
//!   leases that expire when a replica stops renewing them, budgets reserved atomically and
//!   reconciled after the call (see [`remote`]).
//!
//! The state of a subject lives under names built once per key ([`Limits::subjects`]),
//! never per call.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use crate::{
    error::GatewayError,
    settings::Issues,
    shared::{FailMode, Shared},
};

mod credit;
mod local;
pub mod remote;

/// A `[teams.NAME]` table as written in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTeam {
    /// `requests_per_minute`.
    pub requests_per_minute: Option<u32>,
    /// `tokens_per_minute`.
    pub tokens_per_minute: Option<u64>,
    /// `daily_budget_usd`.
    pub daily_budget_usd: Option<f64>,
    /// `monthly_budget_usd`.
    pub monthly_budget_usd: Option<f64>,
}

/// Validates `[teams]`: the limits of each team, by name.
pub fn teams_from_raw(
    raw: std::collections::BTreeMap<String, RawTeam>,
    issues: &mut Issues,
) -> std::collections::HashMap<String, TeamLimits> {
    let mut teams = std::collections::HashMap::new();
    for (name, t) in raw {
        for (field, value) in [
            ("daily_budget_usd", t.daily_budget_usd),
            ("monthly_budget_usd", t.monthly_budget_usd),
        ] {
            if value.is_some_and(|v| !v.is_finite() || v < 0.0) {
                issues.push(format!("teams.{name}.{field}"), "must be zero or more");
            }
        }
        teams.insert(
            name,
            TeamLimits {
                requests_per_minute: t.requests_per_minute.unwrap_or(0),
                tokens_per_minute: t.tokens_per_minute.unwrap_or(0),
                daily_budget_usd: t.daily_budget_usd.unwrap_or(0.0),
                monthly_budget_usd: t.monthly_budget_usd.unwrap_or(0.0),
            },
        );
    }
    teams
}

/// Limits of a team, from the config file.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TeamLimits {
    /// Requests per minute (0: unlimited).
    pub requests_per_minute: u32,
    /// Tokens per minute (0: unlimited).
    pub tokens_per_minute: u64,
    /// Daily budget in USD (0: none).
    pub daily_budget_usd: f64,
    /// Monthly budget in USD (0: none).
    pub monthly_budget_usd: f64,
}

/// The limits that apply to one subject (a key or a team).
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectLimits {
    /// `key:NAME` or `team:NAME`.
    pub subject: String,
    /// Requests per minute.
    pub requests_per_minute: u32,
    /// Tokens per minute.
    pub tokens_per_minute: u64,
    /// Concurrent streams.
    pub max_concurrent_streams: u32,
    /// Daily budget.
    pub daily_budget_usd: f64,
    /// Monthly budget.
    pub monthly_budget_usd: f64,
}

const DAY_MS: i64 = 86_400_000;

/// The civil date (year, month 1..=12, day 1..=31) of a day count since 1970-01-01 (Howard
/// Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// The day count since 1970-01-01 of a civil date (the inverse of [`civil_from_days`]).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = year - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// UTC day index and month index (year * 12 + month) of a Unix ms time.
pub fn periods(now_ms: i64) -> (i64, i64) {
    let days = now_ms.div_euclid(DAY_MS);
    let (year, month, _) = civil_from_days(days);
    (days, year * 12 + (month - 1))
}

/// A budget period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// The UTC day.
    Day,
    /// The UTC calendar month.
    Month,
}

impl Period {
    /// When the period after the one holding `now_ms` starts, in Unix ms (the next UTC
    /// midnight, or the first of the next UTC month).
    pub fn next_start_ms(self, now_ms: i64) -> i64 {
        match self {
            Period::Day => (now_ms.div_euclid(DAY_MS) + 1) * DAY_MS,
            Period::Month => {
                let (_, month) = periods(now_ms);
                let next = month + 1;
                days_from_civil(next.div_euclid(12), next.rem_euclid(12) + 1, 1) * DAY_MS
            }
        }
    }

    /// How long until the budget of this period resets.
    pub fn until_reset(self, now_ms: i64) -> Duration {
        Duration::from_millis(u64::try_from(self.next_start_ms(now_ms) - now_ms).unwrap_or(0))
    }

    /// The reset time as RFC 3339, e.g. `2026-01-01T00:00:00Z`.
    pub fn reset_at(self, now_ms: i64) -> String {
        let (y, m, d) = civil_from_days(self.next_start_ms(now_ms).div_euclid(DAY_MS));
        format!("{y:04}-{m:02}-{d:02}T00:00:00Z")
    }

    fn name(self) -> &'static str {
        match self {
            Period::Day => "daily",
            Period::Month => "monthly",
        }
    }
}

/// One subject's limits with the names its state is kept under, built once per key
/// ([`Limits::subjects`]), never per call.
#[derive(Debug)]
pub struct Subject {
    /// The limits.
    pub limits: SubjectLimits,
    /// Its Redis keys, when Redis holds the shared state.
    keys: Option<remote::Keys>,
}

/// The subjects of one caller (its key, then its team), cheap to clone.
#[derive(Debug, Clone)]
pub struct Subjects(Arc<[Subject]>);

impl Subjects {
    /// The subjects, key first.
    pub fn iter(&self) -> std::slice::Iter<'_, Subject> {
        self.0.iter()
    }

    /// Whether any subject has a budget (then the call's cost is worth estimating).
    pub fn any_budget(&self) -> bool {
        self.iter()
            .any(|s| s.limits.daily_budget_usd > 0.0 || s.limits.monthly_budget_usd > 0.0)
    }
}

/// How a call's budget is checked at admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetCheck {
    /// Not at all (the call was routed to a budget fallback policy).
    Skip,
    /// Reserve the estimate; refuse the call when it would pass a budget.
    Reserve,
    /// Reserve the estimate; when the budget is spent (or the estimate would pass it),
    /// admit the call without a reservation and say so ([`Permit::budget_spent`]), for a
    /// key with a budget fallback policy.
    FallbackWhenSpent,
}

/// What one call asks of the limits.
#[derive(Debug, Clone)]
pub struct Ask {
    /// Whose limits apply.
    pub subjects: Subjects,
    /// Estimated input + output tokens.
    pub estimated_tokens: u64,
    /// Whether the call is a stream (takes a stream slot).
    pub stream: bool,
    /// The estimated cost on the plan's primary target, reserved against budgets.
    pub estimated_usd: f64,
    /// How the budget is checked.
    pub budget: BudgetCheck,
}

/// What an admission decided besides "yes".
#[derive(Debug, Clone, Copy)]
struct Decision {
    budget_spent: bool,
    reserved_usd: f64,
}

/// Which rate limit refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Requests,
    Tokens,
    Streams,
}

/// Why an admission said no (the subject by index into the call's subjects).
#[derive(Debug, Clone, Copy)]
enum Refusal {
    Rate {
        subject: usize,
        kind: Kind,
        wait: Duration,
    },
    Budget {
        subject: usize,
        period: Period,
        used: f64,
    },
}

impl Refusal {
    fn rate(subject: usize, kind: Kind, wait: Duration) -> Self {
        Refusal::Rate {
            subject,
            kind,
            wait,
        }
    }

    fn error(self, subjects: &Subjects, now_ms: i64) -> GatewayError {
        let index = match self {
            Refusal::Rate { subject, .. } | Refusal::Budget { subject, .. } => subject,
        };
        let Some(s) = subjects.0.get(index) else {
            return GatewayError::Internal(format!("limits refused subject #{index} of a call"));
        };
        let l = &s.limits;
        let (what, retry_after, reason) = match self {
            Refusal::Rate { kind, wait, .. } => match kind {
                Kind::Requests => (
                    format!(
                        "the limit of {} requests per minute is reached",
                        l.requests_per_minute
                    ),
                    wait,
                    "RATE_LIMIT_REQUESTS",
                ),
                Kind::Tokens => (
                    format!(
                        "the limit of {} tokens per minute is reached",
                        l.tokens_per_minute
                    ),
                    wait,
                    "RATE_LIMIT_TOKENS",
                ),
                Kind::Streams => (
                    format!(
                        "the limit of {} concurrent streams is reached",
                        l.max_concurrent_streams
                    ),
                    wait,
                    "RATE_LIMIT_STREAMS",
                ),
            },
            Refusal::Budget { period, used, .. } => {
                let budget = match period {
                    Period::Day => l.daily_budget_usd,
                    Period::Month => l.monthly_budget_usd,
                };
                (
                    format!(
                        "the {} budget of ${budget} is spent (${used:.6} used); it resets at {}",
                        period.name(),
                        period.reset_at(now_ms)
                    ),
                    period.until_reset(now_ms),
                    "BUDGET_EXCEEDED",
                )
            }
        };
        GatewayError::ResourceExhausted {
            reason,
            subject: l.subject.clone(),
            message: format!("{}: {what}", l.subject),
            retry_after: Some(retry_after),
        }
    }
}

/// Whether a call's estimate passes a budget: spend + reservations + the estimate above it,
/// or (for a key with a fallback policy) the budget already used up by spend and
/// reservations.
fn over_budget(check: BudgetCheck, used: f64, reserved: f64, estimate: f64, budget: f64) -> bool {
    used + reserved + estimate > budget
        || (check == BudgetCheck::FallbackWhenSpent && used + reserved >= budget)
}

/// How a call ended, for its settlement.
#[derive(Debug, Clone)]
struct Settlement {
    subjects: Subjects,
    estimated_tokens: u64,
    /// Reported tokens (`None`: no usage; the estimate stays taken).
    actual_tokens: Option<u64>,
    reserved_usd: f64,
    cost_usd: f64,
    stream: bool,
}

/// The state of every limit: this replica's memory, and Redis when configured.
#[derive(Debug, Default)]
pub struct Limits {
    local: local::Local,
    remote: Option<remote::Remote>,
}

/// Unix milliseconds now.
fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Limits {
    /// Limits in this replica's memory only.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Limits in Redis when `shared` is given (the background tasks of
    /// [`Limits::background`] must run then), else in memory.
    pub fn with_shared(shared: Option<Arc<Shared>>) -> Arc<Self> {
        Arc::new(Self {
            local: local::Local::default(),
            remote: shared.map(remote::Remote::new),
        })
    }

    /// A caller's subjects, with the names of their state built once.
    pub fn subjects(&self, list: Vec<SubjectLimits>) -> Subjects {
        Subjects(
            list.into_iter()
                .map(|limits| Subject {
                    keys: self.remote.as_ref().map(|r| r.keys(&limits.subject)),
                    limits,
                })
                .collect(),
        )
    }

    /// Admits a call: request and token rates, a stream slot for streams, and the budget,
    /// all or nothing. With Redis this is one round trip; when Redis is unreachable, the
    /// call is admitted by this replica's memory (`fail_open`) or refused with UNAVAILABLE
    /// (`fail_closed`).
    pub async fn admit(self: &Arc<Self>, ask: Ask, now_ms: i64) -> Result<Permit, GatewayError> {
        let mut lease = None;
        let decision = match &self.remote {
            Some(remote) => match remote.admit(&ask).await {
                Ok(Ok((decision, admitted))) => {
                    lease = Some(admitted);
                    Ok(decision)
                }
                Ok(Err(refusal)) => Err(refusal),
                Err(_) if remote.mode() == FailMode::FailClosed => {
                    return Err(GatewayError::Unavailable {
                        reason: "SHARED_STATE_UNAVAILABLE",
                        message: "the shared rate limit and budget store (redis) is unreachable and `shared.mode` is `fail_closed`; retry shortly".to_owned(),
                        retry_after: Some(Duration::from_secs(1)),
                    });
                }
                // fail_open: this replica's memory decides (the error is counted and logged).
                Err(_) => self.local.admit(&ask, Instant::now(), now_ms),
            },
            None => self.local.admit(&ask, Instant::now(), now_ms),
        };
        let decision = decision.map_err(|r| r.error(&ask.subjects, now_ms))?;
        Ok(Permit {
            limits: self.clone(),
            subjects: ask.subjects,
            estimated_tokens: ask.estimated_tokens,
            reserved_usd: decision.reserved_usd,
            stream: ask.stream,
            budget_spent: decision.budget_spent,
            lease,
            settled: false,
        })
    }

    /// Seeds a subject's spend for the current day and month (from the ledger at start).
    /// With Redis, only a period Redis holds nothing for is seeded: the first replica to
    /// start after Redis lost its data (or ever) sets it, later ones find the shared total.
    pub async fn seed_spend(&self, subject: &str, now_ms: i64, day_usd: f64, month_usd: f64) {
        match &self.remote {
            Some(remote) => {
                if let Ok(totals) = remote.seed(subject, now_ms, day_usd, month_usd).await {
                    self.local.seed(subject, now_ms, totals.0, totals.1);
                    return;
                }
                self.local.seed(subject, now_ms, day_usd, month_usd);
            }
            None => self.local.seed(subject, now_ms, day_usd, month_usd),
        }
    }

    /// Current (day, month) spend of a subject, as this replica knows it (with Redis: the
    /// shared totals of its last settlement for the subject).
    pub fn spent(&self, subject: &str, now_ms: i64) -> (f64, f64) {
        self.local.spent(subject, now_ms)
    }

    /// With Redis: connects and loads the scripts before the first call (bounded by
    /// `shared.connect_timeout`; Redis being down is not an error here).
    pub async fn prepare(&self) {
        if let Some(remote) = &self.remote {
            remote.prepare().await;
        }
    }

    /// Runs the background work of the Redis backend until `stop` (nothing without Redis):
    /// the connection probe, lease renewal, and settlements (drained at stop).
    pub fn background(
        self: &Arc<Self>,
        tracker: &tokio_util::task::TaskTracker,
        stop: &tokio_util::sync::CancellationToken,
    ) {
        let Some(remote) = &self.remote else {
            return;
        };
        tracker.spawn(remote.shared().clone().watch(stop.clone()));
        let (limits, token) = (self.clone(), stop.clone());
        tracker.spawn(async move {
            if let Some(remote) = &limits.remote {
                remote.renew(token).await;
            }
        });
        let (limits, token) = (self.clone(), stop.clone());
        tracker.spawn(async move {
            if let Some(remote) = &limits.remote {
                remote.settle_worker(&limits.local, token).await;
            }
        });
    }

    fn settle(&self, end: Settlement, lease: Option<remote::Lease>, now_ms: i64) {
        match (&self.remote, lease) {
            (Some(remote), Some(lease)) => remote.settle(Some(lease), end, &self.local, now_ms),
            (Some(remote), None) => {
                // Admitted by this replica's memory while Redis was unreachable: settled here,
                // and the cost charged to the shared budget once Redis answers.
                self.local.settle(&end, now_ms);
                if end.cost_usd > 0.0 {
                    remote.settle(None, end, &self.local, now_ms);
                }
            }
            (None, _) => self.local.settle(&end, now_ms),
        }
    }
}

/// What a call holds while it runs; settled (or released) when it ends.
#[derive(Debug)]
pub struct Permit {
    limits: Arc<Limits>,
    subjects: Subjects,
    estimated_tokens: u64,
    reserved_usd: f64,
    stream: bool,
    budget_spent: bool,
    /// The Redis lease (stream slot and reservation), when Redis admitted the call.
    lease: Option<remote::Lease>,
    settled: bool,
}

impl Permit {
    /// Whether a budget of the caller is spent (asked with
    /// [`BudgetCheck::FallbackWhenSpent`]): route to the fallback policy.
    pub fn budget_spent(&self) -> bool {
        self.budget_spent
    }

    /// Ends the call: reconciles tokens with real usage, replaces the cost reservation by
    /// the real cost, and frees the stream slot. Without usage (failed or cancelled calls),
    /// the token estimate stays taken and nothing is charged. Later calls do nothing.
    pub fn settle(&mut self, actual_tokens: Option<u64>, actual_usd: Option<f64>, now_ms: i64) {
        if self.settled {
            return;
        }
        self.settled = true;
        let end = Settlement {
            subjects: self.subjects.clone(),
            estimated_tokens: self.estimated_tokens,
            actual_tokens,
            reserved_usd: self.reserved_usd,
            cost_usd: actual_usd.unwrap_or(0.0),
            stream: self.stream,
        };
        self.limits.settle(end, self.lease.take(), now_ms);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.settle(None, None, unix_now_ms());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(rpm: u32, tpm: u64, streams: u32, daily: f64) -> SubjectLimits {
        SubjectLimits {
            subject: "key:k".into(),
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            max_concurrent_streams: streams,
            daily_budget_usd: daily,
            monthly_budget_usd: 0.0,
        }
    }

    #[test]
    fn periods_are_utc_days_and_months() {
        // 2024-02-29T12:00:00Z
        let (day, month) = periods(1_709_208_000_000);
        assert_eq!(day, 19_782);
        assert_eq!(month, 2024 * 12 + 1);
        assert_eq!(periods(0).1, 1970 * 12);
    }

    #[test]
    fn civil_dates_round_trip() {
        for days in -800_000..800_000 {
            let (y, m, d) = civil_from_days(days);
            assert!((1..=12).contains(&m) && (1..=31).contains(&d));
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn periods_reset_at_the_next_utc_midnight_and_first_of_month() {
        // 2024-02-29T12:00:00Z, a leap day.
        let now = 1_709_208_000_000;
        assert_eq!(Period::Day.reset_at(now), "2024-03-01T00:00:00Z");
        assert_eq!(Period::Month.reset_at(now), "2024-03-01T00:00:00Z");
        assert_eq!(Period::Day.until_reset(now), Duration::from_secs(12 * 3600));
        // 2026-12-15T06:00:00Z: the next month is in the next year.
        let now = 1_797_314_400_000;
        assert_eq!(Period::Day.reset_at(now), "2026-12-16T00:00:00Z");
        assert_eq!(Period::Month.reset_at(now), "2027-01-01T00:00:00Z");
        assert_eq!(
            Period::Month.until_reset(now),
            Duration::from_secs((16 * 24 + 18) * 3600)
        );
        // The last millisecond of a month.
        let last = Period::Month.next_start_ms(now) - 1;
        assert_eq!(Period::Month.until_reset(last), Duration::from_millis(1));
    }

    fn ask(s: SubjectLimits, tokens: u64, stream: bool, usd: f64) -> Ask {
        Ask {
            subjects: Limits::new().subjects(vec![s]),
            estimated_tokens: tokens,
            stream,
            estimated_usd: usd,
            budget: BudgetCheck::Reserve,
        }
    }

    const NOW: i64 = 1_709_208_000_000;

    async fn budget_refusal(daily: f64, monthly: f64, now: i64) -> (String, Option<Duration>) {
        let limits = Limits::new();
        let mut s = subject(0, 0, 0, daily);
        s.monthly_budget_usd = monthly;
        match limits.admit(ask(s, 1, false, 5.0), now).await.unwrap_err() {
            GatewayError::ResourceExhausted {
                reason: "BUDGET_EXCEEDED",
                message,
                retry_after,
                ..
            } => (message, retry_after),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_refusal_says_when_the_refusing_budget_resets() {
        // 2026-12-15T06:00:00Z.
        let now = 1_797_314_400_000;
        let (message, retry) = budget_refusal(0.0, 1.0, now).await;
        assert!(message.contains("monthly budget of $1"), "{message}");
        assert!(
            message.contains("resets at 2027-01-01T00:00:00Z"),
            "{message}"
        );
        assert_eq!(retry, Some(Period::Month.until_reset(now)));
        let (message, retry) = budget_refusal(1.0, 0.0, now).await;
        assert!(message.contains("daily budget of $1"), "{message}");
        assert!(
            message.contains("resets at 2026-12-16T00:00:00Z"),
            "{message}"
        );
        assert_eq!(retry, Some(Duration::from_secs(18 * 3600)));
        // Both spent: tomorrow would not help.
        let (message, retry) = budget_refusal(1.0, 2.0, now).await;
        assert!(message.contains("monthly"), "{message}");
        assert_eq!(retry, Some(Period::Month.until_reset(now)));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_per_minute_exceed_and_recover() {
        let limits = Limits::new();
        let a = ask(subject(3, 0, 0, 0.0), 10, false, 0.0);
        for _ in 0..3 {
            limits.admit(a.clone(), NOW).await.unwrap();
        }
        let err = limits.admit(a.clone(), NOW).await.unwrap_err();
        let GatewayError::ResourceExhausted {
            reason,
            retry_after,
            ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert_eq!(*reason, "RATE_LIMIT_REQUESTS");
        assert_eq!(*retry_after, Some(Duration::from_secs(20)));
        tokio::time::advance(Duration::from_secs(20)).await;
        limits.admit(a, NOW).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_per_minute_are_reconciled() {
        let limits = Limits::new();
        let a = ask(subject(0, 1000, 0, 0.0), 600, false, 0.0);
        // Estimated 600 of 1000: a second estimate of 600 does not fit...
        let mut p = limits.admit(a.clone(), NOW).await.unwrap();
        assert!(limits.admit(a.clone(), NOW).await.is_err());
        // ...until the first call reports it used only 100.
        p.settle(Some(100), None, NOW);
        limits.admit(a, NOW).await.unwrap();
    }

    #[tokio::test]
    async fn concurrent_streams_are_capped() {
        let limits = Limits::new();
        let a = ask(subject(0, 0, 1, 0.0), 1, true, 0.0);
        let first = limits.admit(a.clone(), NOW).await.unwrap();
        assert!(limits.admit(a.clone(), NOW).await.is_err());
        drop(first);
        limits.admit(a, NOW).await.unwrap();
    }

    #[tokio::test]
    async fn a_refused_call_takes_nothing() {
        let limits = Limits::new();
        // Two requests per minute, and a budget the second call's estimate passes.
        let mut s = subject(2, 0, 0, 1.0);
        s.monthly_budget_usd = 0.0;
        let first = limits
            .admit(ask(s.clone(), 1, false, 0.6), NOW)
            .await
            .unwrap();
        assert!(
            limits
                .admit(ask(s.clone(), 1, false, 0.6), NOW)
                .await
                .is_err()
        );
        drop(first);
        // The refused call took no request: one is left.
        limits.admit(ask(s, 1, false, 0.1), NOW).await.unwrap();
    }

    #[tokio::test]
    async fn budget_reservations_bound_the_overspend() {
        let limits = Limits::new();
        let now = NOW;
        let mut first = limits
            .admit(ask(subject(0, 0, 0, 1.0), 1, false, 0.6), now)
            .await
            .unwrap();
        // 0.6 reserved + 0.6 would pass $1: refused while the first is in flight.
        assert!(
            limits
                .admit(ask(subject(0, 0, 0, 1.0), 1, false, 0.6), now)
                .await
                .is_err()
        );
        first.settle(Some(10), Some(0.7), now);
        assert_eq!(limits.spent("key:k", now), (0.7, 0.7));
        let mut third = limits
            .admit(ask(subject(0, 0, 0, 1.0), 1, false, 0.2), now)
            .await
            .unwrap();
        third.settle(Some(10), Some(0.25), now);
        // Spent (0.95 of 0.9): a key with a fallback policy is routed there.
        let mut spent = ask(subject(0, 0, 0, 0.9), 1, false, 0.0);
        spent.budget = BudgetCheck::FallbackWhenSpent;
        // (Held: a permit dropped settles at the real time, a later day than `now`.)
        let spent = limits.admit(spent, now).await.unwrap();
        assert!(spent.budget_spent());
        let err = limits
            .admit(ask(subject(0, 0, 0, 1.0), 1, false, 0.1), now)
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            GatewayError::ResourceExhausted {
                reason: "BUDGET_EXCEEDED",
                ..
            }
        ));
        // The next UTC day starts afresh.
        let tomorrow = now + 86_400_000;
        limits
            .admit(ask(subject(0, 0, 0, 1.0), 1, false, 0.1), tomorrow)
            .await
            .unwrap();
    }

    /// A Redis URL nothing listens on.
    fn unreachable(mode: FailMode) -> Arc<Limits> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let settings = crate::shared::SharedSettings {
            redis_url: Some(format!("redis://127.0.0.1:{port}")),
            mode,
            ..crate::shared::SharedSettings::default()
        };
        Limits::with_shared(Shared::connect(&settings).unwrap())
    }

    #[tokio::test]
    async fn redis_down_fails_open_to_local_limits() {
        let limits = unreachable(FailMode::FailOpen);
        let a = ask(subject(2, 0, 0, 0.0), 1, false, 0.0);
        let a = Ask {
            subjects: limits.subjects(a.subjects.iter().map(|s| s.limits.clone()).collect()),
            ..a
        };
        let _one = limits.admit(a.clone(), NOW).await.unwrap();
        let _two = limits.admit(a.clone(), NOW).await.unwrap();
        // This replica's own limit still holds.
        let err = limits.admit(a, NOW).await.unwrap_err();
        assert!(matches!(
            err,
            GatewayError::ResourceExhausted {
                reason: "RATE_LIMIT_REQUESTS",
                ..
            }
        ));
    }

    #[tokio::test]
    async fn redis_down_fails_closed_with_unavailable() {
        let limits = unreachable(FailMode::FailClosed);
        let subjects = limits.subjects(vec![subject(2, 0, 0, 0.0)]);
        let a = Ask {
            subjects,
            ..ask(subject(2, 0, 0, 0.0), 1, false, 0.0)
        };
        let err = limits.admit(a, NOW).await.unwrap_err();
        let GatewayError::Unavailable {
            reason, message, ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert_eq!(*reason, "SHARED_STATE_UNAVAILABLE");
        assert!(message.contains("(redis) is unreachable"), "{message}");
    }
}
