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
//! State is in memory, behind [`Limits`]; spend is seeded from the usage ledger at start, so
//! a restart does not reset budgets. The interface takes and returns plain numbers so a
//! shared store (several replicas enforcing one budget) can back it later.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use crate::{error::GatewayError, settings::Issues, telemetry::names};

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
) -> HashMap<String, TeamLimits> {
    let mut teams = HashMap::new();
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

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug, Default)]
struct Spend {
    day: i64,
    day_usd: f64,
    month: i64,
    month_usd: f64,
    reserved_usd: f64,
    /// Highest threshold (in percent) already reported, per period.
    alerted: [u32; 2],
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

/// The in-memory state of all limits.
#[derive(Debug, Default)]
pub struct Limits {
    buckets: Mutex<HashMap<String, Bucket>>,
    streams: Mutex<HashMap<String, u32>>,
    spend: Mutex<HashMap<String, Spend>>,
}

fn exhausted(
    subject: &str,
    what: String,
    retry_after: Duration,
    reason: &'static str,
) -> GatewayError {
    GatewayError::ResourceExhausted {
        reason,
        subject: subject.to_owned(),
        message: format!("{subject}: {what}"),
        retry_after: Some(retry_after),
    }
}

/// What a call holds while it runs; settled (or released) when it ends.
#[derive(Debug)]
pub struct Permit {
    limits: Arc<Limits>,
    subjects: Vec<SubjectLimits>,
    estimated_tokens: u64,
    reserved_usd: f64,
    stream: bool,
    settled: bool,
}

impl Limits {
    /// Empty state.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Seeds a subject's spend for the current day and month (from the ledger at start).
    pub fn seed_spend(&self, subject: &str, now_ms: i64, day_usd: f64, month_usd: f64) {
        let (day, month) = periods(now_ms);
        let mut spend = self
            .spend
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let s = spend.entry(subject.to_owned()).or_default();
        *s = Spend {
            day,
            day_usd,
            month,
            month_usd,
            ..Spend::default()
        };
    }

    /// Current (day, month) spend of a subject.
    pub fn spent(&self, subject: &str, now_ms: i64) -> (f64, f64) {
        let (day, month) = periods(now_ms);
        let spend = self
            .spend
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        spend.get(subject).map_or((0.0, 0.0), |s| {
            (
                if s.day == day { s.day_usd } else { 0.0 },
                if s.month == month { s.month_usd } else { 0.0 },
            )
        })
    }

    /// Takes `amount` from a bucket of `per_minute` capacity, or says when to come back.
    fn take(&self, name: &str, per_minute: f64, amount: f64, now: Instant) -> Result<(), Duration> {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bucket = buckets.entry(name.to_owned()).or_insert(Bucket {
            tokens: per_minute,
            at: now,
        });
        let rate = per_minute / 60.0;
        let elapsed = now.duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(per_minute);
        bucket.at = now;
        // A single request larger than the whole minute passes only on a full bucket.
        let needed = amount.min(per_minute);
        if bucket.tokens >= needed {
            bucket.tokens -= amount;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((needed - bucket.tokens) / rate))
        }
    }

    fn give(&self, name: &str, amount: f64) {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(bucket) = buckets.get_mut(name) {
            bucket.tokens += amount;
        }
    }

    /// Admits a call: request and token rates, and (for streams) a stream slot. Budgets are
    /// checked with [`Permit::reserve`] once the plan is known.
    pub fn admit(
        self: &Arc<Self>,
        subjects: Vec<SubjectLimits>,
        estimated_tokens: u64,
        stream: bool,
    ) -> Result<Permit, GatewayError> {
        let now = Instant::now();
        let mut taken: Vec<(String, f64)> = Vec::new();
        let undo = |taken: &[(String, f64)]| {
            for (name, amount) in taken {
                self.give(name, *amount);
            }
        };
        for s in &subjects {
            if s.requests_per_minute > 0 {
                let name = format!("rpm:{}", s.subject);
                match self.take(&name, f64::from(s.requests_per_minute), 1.0, now) {
                    Ok(()) => taken.push((name, 1.0)),
                    Err(wait) => {
                        undo(&taken);
                        return Err(exhausted(
                            &s.subject,
                            format!(
                                "the limit of {} requests per minute is reached",
                                s.requests_per_minute
                            ),
                            wait,
                            "RATE_LIMIT_REQUESTS",
                        ));
                    }
                }
            }
            if s.tokens_per_minute > 0 {
                let name = format!("tpm:{}", s.subject);
                let amount = estimated_tokens as f64;
                match self.take(&name, s.tokens_per_minute as f64, amount, now) {
                    Ok(()) => taken.push((name, amount)),
                    Err(wait) => {
                        undo(&taken);
                        return Err(exhausted(
                            &s.subject,
                            format!(
                                "the limit of {} tokens per minute is reached",
                                s.tokens_per_minute
                            ),
                            wait,
                            "RATE_LIMIT_TOKENS",
                        ));
                    }
                }
            }
        }
        if stream {
            let mut streams = self
                .streams
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(s) = subjects.iter().find(|s| {
                s.max_concurrent_streams > 0
                    && streams.get(&s.subject).copied().unwrap_or(0) >= s.max_concurrent_streams
            }) {
                let subject = s.subject.clone();
                let max = s.max_concurrent_streams;
                drop(streams);
                undo(&taken);
                return Err(exhausted(
                    &subject,
                    format!("the limit of {max} concurrent streams is reached"),
                    Duration::from_secs(1),
                    "RATE_LIMIT_STREAMS",
                ));
            }
            for s in &subjects {
                *streams.entry(s.subject.clone()).or_default() += 1;
            }
        }
        Ok(Permit {
            limits: self.clone(),
            subjects,
            estimated_tokens,
            reserved_usd: 0.0,
            stream,
            settled: false,
        })
    }

    /// Whether a subject's budget is spent (for routing to a fallback policy).
    pub fn budget_spent(&self, s: &SubjectLimits, now_ms: i64) -> bool {
        let (day_usd, month_usd) = self.spent(&s.subject, now_ms);
        let reserved = self.reserved(&s.subject);
        (s.daily_budget_usd > 0.0 && day_usd + reserved >= s.daily_budget_usd)
            || (s.monthly_budget_usd > 0.0 && month_usd + reserved >= s.monthly_budget_usd)
    }

    fn reserved(&self, subject: &str) -> f64 {
        let spend = self
            .spend
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        spend.get(subject).map_or(0.0, |s| s.reserved_usd)
    }
}

impl Permit {
    /// Reserves the estimated cost of the call against every budget; refuses the call when
    /// that would pass one.
    pub fn reserve(&mut self, estimated_usd: f64, now_ms: i64) -> Result<(), GatewayError> {
        let (day, month) = periods(now_ms);
        let mut spend = self
            .limits
            .spend
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for s in &self.subjects {
            let entry = spend.entry(s.subject.clone()).or_default();
            roll(entry, day, month);
            let committed = entry.reserved_usd + estimated_usd;
            // The month first: when both are spent, the caller must wait for the month.
            for (period, budget, used) in [
                (Period::Month, s.monthly_budget_usd, entry.month_usd),
                (Period::Day, s.daily_budget_usd, entry.day_usd),
            ] {
                if budget > 0.0 && used + committed > budget {
                    return Err(exhausted(
                        &s.subject,
                        format!(
                            "the {} budget of ${budget} is spent (${used:.6} used); it resets at {}",
                            period.name(),
                            period.reset_at(now_ms)
                        ),
                        period.until_reset(now_ms),
                        "BUDGET_EXCEEDED",
                    ));
                }
            }
        }
        for s in &self.subjects {
            spend.entry(s.subject.clone()).or_default().reserved_usd += estimated_usd;
        }
        self.reserved_usd = estimated_usd;
        Ok(())
    }

    /// Ends the call: reconciles tokens with real usage and replaces the cost reservation by
    /// the real cost. Without usage (failed or cancelled calls), the token estimate stays
    /// taken and nothing is charged.
    pub fn settle(&mut self, actual_tokens: Option<u64>, actual_usd: Option<f64>, now_ms: i64) {
        if self.settled {
            return;
        }
        self.settled = true;
        if let Some(actual) = actual_tokens {
            for s in &self.subjects {
                if s.tokens_per_minute > 0 {
                    self.limits.give(
                        &format!("tpm:{}", s.subject),
                        self.estimated_tokens as f64 - actual as f64,
                    );
                }
            }
        }
        let (day, month) = periods(now_ms);
        let cost = actual_usd.unwrap_or(0.0);
        let mut spend = self
            .limits
            .spend
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for s in &self.subjects {
            let entry = spend.entry(s.subject.clone()).or_default();
            roll(entry, day, month);
            entry.reserved_usd = (entry.reserved_usd - self.reserved_usd).max(0.0);
            entry.day_usd += cost;
            entry.month_usd += cost;
            for (period, (limit, used, label)) in [
                (s.daily_budget_usd, entry.day_usd, "day"),
                (s.monthly_budget_usd, entry.month_usd, "month"),
            ]
            .into_iter()
            .enumerate()
            {
                if limit <= 0.0 {
                    continue;
                }
                let ratio = used / limit;
                metrics::gauge!(names::BUDGET_USED, "subject" => s.subject.clone(), "period" => label)
                    .set(ratio);
                for threshold in [50u32, 80, 100] {
                    if ratio * 100.0 >= f64::from(threshold) && entry.alerted[period] < threshold {
                        entry.alerted[period] = threshold;
                        tracing::warn!(
                            subject = %s.subject,
                            period = label,
                            threshold_percent = threshold,
                            spent_usd = used,
                            budget_usd = limit,
                            "budget threshold crossed"
                        );
                        metrics::counter!(
                            names::BUDGET_ALERTS,
                            "subject" => s.subject.clone(),
                            "period" => label,
                            "threshold" => threshold.to_string()
                        )
                        .increment(1);
                    }
                }
            }
        }
    }
}

fn roll(entry: &mut Spend, day: i64, month: i64) {
    if entry.day != day {
        entry.day = day;
        entry.day_usd = 0.0;
        entry.alerted[0] = 0;
    }
    if entry.month != month {
        entry.month = month;
        entry.month_usd = 0.0;
        entry.alerted[1] = 0;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.settled {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            self.settle(None, None, now_ms);
        }
        if self.stream {
            let mut streams = self
                .limits
                .streams
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for s in &self.subjects {
                if let Some(n) = streams.get_mut(&s.subject) {
                    *n = n.saturating_sub(1);
                }
            }
        }
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

    fn budget_refusal(daily: f64, monthly: f64, now: i64) -> (String, Option<Duration>) {
        let limits = Limits::new();
        let mut s = subject(0, 0, 0, daily);
        s.monthly_budget_usd = monthly;
        let mut permit = limits.admit(vec![s], 1, false).unwrap();
        match permit.reserve(5.0, now).unwrap_err() {
            GatewayError::ResourceExhausted {
                reason: "BUDGET_EXCEEDED",
                message,
                retry_after,
                ..
            } => (message, retry_after),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_refusal_says_when_the_refusing_budget_resets() {
        // 2026-12-15T06:00:00Z.
        let now = 1_797_314_400_000;
        let (message, retry) = budget_refusal(0.0, 1.0, now);
        assert!(message.contains("monthly budget of $1"), "{message}");
        assert!(
            message.contains("resets at 2027-01-01T00:00:00Z"),
            "{message}"
        );
        assert_eq!(retry, Some(Period::Month.until_reset(now)));
        let (message, retry) = budget_refusal(1.0, 0.0, now);
        assert!(message.contains("daily budget of $1"), "{message}");
        assert!(
            message.contains("resets at 2026-12-16T00:00:00Z"),
            "{message}"
        );
        assert_eq!(retry, Some(Duration::from_secs(18 * 3600)));
        // Both spent: tomorrow would not help.
        let (message, retry) = budget_refusal(1.0, 2.0, now);
        assert!(message.contains("monthly"), "{message}");
        assert_eq!(retry, Some(Period::Month.until_reset(now)));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_per_minute_exceed_and_recover() {
        let limits = Limits::new();
        for _ in 0..3 {
            limits
                .admit(vec![subject(3, 0, 0, 0.0)], 10, false)
                .unwrap();
        }
        let err = limits
            .admit(vec![subject(3, 0, 0, 0.0)], 10, false)
            .unwrap_err();
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
        limits
            .admit(vec![subject(3, 0, 0, 0.0)], 10, false)
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_per_minute_are_reconciled() {
        let limits = Limits::new();
        // Estimated 600 of 1000: a second estimate of 600 does not fit...
        let mut p = limits
            .admit(vec![subject(0, 1000, 0, 0.0)], 600, false)
            .unwrap();
        assert!(
            limits
                .admit(vec![subject(0, 1000, 0, 0.0)], 600, false)
                .is_err()
        );
        // ...until the first call reports it used only 100.
        p.settle(Some(100), None, 0);
        limits
            .admit(vec![subject(0, 1000, 0, 0.0)], 600, false)
            .unwrap();
    }

    #[tokio::test]
    async fn concurrent_streams_are_capped() {
        let limits = Limits::new();
        let a = limits.admit(vec![subject(0, 0, 1, 0.0)], 1, true).unwrap();
        assert!(limits.admit(vec![subject(0, 0, 1, 0.0)], 1, true).is_err());
        drop(a);
        limits.admit(vec![subject(0, 0, 1, 0.0)], 1, true).unwrap();
    }

    #[tokio::test]
    async fn budget_reservations_bound_the_overspend() {
        let limits = Limits::new();
        let now = 1_709_208_000_000;
        let mut first = limits.admit(vec![subject(0, 0, 0, 1.0)], 1, false).unwrap();
        first.reserve(0.6, now).unwrap();
        let mut second = limits.admit(vec![subject(0, 0, 0, 1.0)], 1, false).unwrap();
        // 0.6 reserved + 0.6 would pass $1: refused while the first is in flight.
        assert!(second.reserve(0.6, now).is_err());
        first.settle(Some(10), Some(0.7), now);
        assert_eq!(limits.spent("key:k", now), (0.7, 0.7));
        let mut third = limits.admit(vec![subject(0, 0, 0, 1.0)], 1, false).unwrap();
        third.reserve(0.2, now).unwrap();
        third.settle(Some(10), Some(0.25), now);
        assert!(limits.budget_spent(&subject(0, 0, 0, 0.9), now));
        let mut fourth = limits.admit(vec![subject(0, 0, 0, 1.0)], 1, false).unwrap();
        let err = fourth.reserve(0.1, now).unwrap_err();
        assert!(matches!(
            err,
            GatewayError::ResourceExhausted {
                reason: "BUDGET_EXCEEDED",
                ..
            }
        ));
        // The next UTC day starts afresh.
        let tomorrow = now + 86_400_000;
        fourth.reserve(0.1, tomorrow).unwrap();
    }
}
