//! The in-memory backend: every limit of this replica under one lock, keyed by subject
//! name. Used alone on a single node, and as the fallback (`shared.mode = "fail_open"`) and
//! the spend mirror when Redis holds the shared state.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use tokio::time::Instant;

use super::{Ask, BudgetCheck, Decision, Kind, Period, Refusal, Settlement, Subject, periods};
use crate::telemetry::names;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// The level now, refilled at `per_minute` per minute up to `per_minute`.
    fn refill(&mut self, per_minute: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_minute / 60.0).min(per_minute);
        self.at = now;
    }
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

impl Spend {
    fn roll(&mut self, day: i64, month: i64) {
        if self.day != day {
            self.day = day;
            self.day_usd = 0.0;
            self.alerted[0] = 0;
        }
        if self.month != month {
            self.month = month;
            self.month_usd = 0.0;
            self.alerted[1] = 0;
        }
    }
}

/// Everything kept for one subject.
#[derive(Debug, Default)]
struct State {
    rpm: Option<Bucket>,
    tpm: Option<Bucket>,
    streams: u32,
    spend: Spend,
}

/// The in-memory limits.
#[derive(Debug, Default)]
pub(super) struct Local {
    subjects: Mutex<HashMap<String, State>>,
}

/// Whether a bucket of `per_minute` holds `amount` now (a request larger than the whole
/// minute passes only on a full bucket), or how long until it does.
fn fits(bucket: &Bucket, per_minute: f64, amount: f64) -> Result<(), Duration> {
    let needed = amount.min(per_minute);
    if bucket.tokens >= needed {
        Ok(())
    } else {
        Err(Duration::from_secs_f64(
            (needed - bucket.tokens) * 60.0 / per_minute,
        ))
    }
}

fn state<'a>(map: &'a mut HashMap<String, State>, name: &str) -> &'a mut State {
    if !map.contains_key(name) {
        map.insert(name.to_owned(), State::default());
    }
    #[expect(clippy::expect_used, reason = "inserted just above")]
    map.get_mut(name).expect("present")
}

impl Local {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, State>> {
        self.subjects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Checks every limit of `ask` and, when all pass, takes them (nothing is taken on a
    /// refusal).
    pub(super) fn admit(&self, ask: &Ask, now: Instant, now_ms: i64) -> Result<Decision, Refusal> {
        let (day, month) = periods(now_ms);
        let tokens = ask.estimated_tokens as f64;
        let mut map = self.lock();
        let mut budget_spent = false;
        for (i, s) in ask.subjects.iter().enumerate() {
            let l = &s.limits;
            let st = state(&mut map, &l.subject);
            for (per_minute, bucket, amount, kind) in [
                (
                    f64::from(l.requests_per_minute),
                    &mut st.rpm,
                    1.0,
                    Kind::Requests,
                ),
                (
                    l.tokens_per_minute as f64,
                    &mut st.tpm,
                    tokens,
                    Kind::Tokens,
                ),
            ] {
                if per_minute <= 0.0 {
                    continue;
                }
                let b = bucket.get_or_insert(Bucket {
                    tokens: per_minute,
                    at: now,
                });
                b.refill(per_minute, now);
                if let Err(wait) = fits(b, per_minute, amount) {
                    return Err(Refusal::rate(i, kind, wait));
                }
            }
            if ask.stream && l.max_concurrent_streams > 0 && st.streams >= l.max_concurrent_streams
            {
                return Err(Refusal::rate(i, Kind::Streams, Duration::from_secs(1)));
            }
            if ask.budget != BudgetCheck::Skip {
                st.spend.roll(day, month);
                // The month first: when both are spent, the caller must wait for the month.
                for (period, budget, used) in [
                    (Period::Month, l.monthly_budget_usd, st.spend.month_usd),
                    (Period::Day, l.daily_budget_usd, st.spend.day_usd),
                ] {
                    if budget > 0.0
                        && super::over_budget(
                            ask.budget,
                            used,
                            st.spend.reserved_usd,
                            ask.estimated_usd,
                            budget,
                        )
                    {
                        if ask.budget == BudgetCheck::FallbackWhenSpent {
                            budget_spent = true;
                        } else {
                            return Err(Refusal::Budget {
                                subject: i,
                                period,
                                used,
                            });
                        }
                    }
                }
            }
        }
        let reserve = ask.budget != BudgetCheck::Skip && !budget_spent;
        for s in ask.subjects.iter() {
            let l = &s.limits;
            let st = state(&mut map, &l.subject);
            if let Some(b) = st.rpm.as_mut() {
                b.tokens -= 1.0;
            }
            if let Some(b) = st.tpm.as_mut() {
                b.tokens -= tokens;
            }
            if ask.stream {
                st.streams += 1;
            }
            if reserve {
                st.spend.reserved_usd += ask.estimated_usd;
            }
        }
        Ok(Decision {
            budget_spent,
            reserved_usd: if reserve { ask.estimated_usd } else { 0.0 },
        })
    }

    /// Ends a call admitted here: gives back unused estimated tokens (or takes the excess),
    /// replaces the reservation with the real cost, and frees the stream slot.
    pub(super) fn settle(&self, end: &Settlement, now_ms: i64) {
        let (day, month) = periods(now_ms);
        let mut map = self.lock();
        for s in end.subjects.iter() {
            let st = state(&mut map, &s.limits.subject);
            if let (Some(actual), Some(b)) = (end.actual_tokens, st.tpm.as_mut()) {
                b.tokens += end.estimated_tokens as f64 - actual as f64;
            }
            if end.stream {
                st.streams = st.streams.saturating_sub(1);
            }
            st.spend.roll(day, month);
            st.spend.reserved_usd = (st.spend.reserved_usd - end.reserved_usd).max(0.0);
            st.spend.day_usd += end.cost_usd;
            st.spend.month_usd += end.cost_usd;
            alert(s, &mut st.spend);
        }
    }

    /// Ends a call admitted by Redis: its stream slot and reservation were never taken here.
    /// The spend totals Redis reported replace this replica's view (`None`: Redis was not
    /// reached; the cost is added here).
    pub(super) fn mirror(
        &self,
        subject: &Subject,
        totals: Option<(f64, f64)>,
        cost_usd: f64,
        now_ms: i64,
    ) {
        let (day, month) = periods(now_ms);
        let mut map = self.lock();
        let st = state(&mut map, &subject.limits.subject);
        st.spend.roll(day, month);
        match totals {
            Some((day_usd, month_usd)) => {
                st.spend.day_usd = day_usd;
                st.spend.month_usd = month_usd;
            }
            None => {
                st.spend.day_usd += cost_usd;
                st.spend.month_usd += cost_usd;
            }
        }
        alert(subject, &mut st.spend);
    }

    /// Sets a subject's spend for the current day and month (from the ledger at start).
    pub(super) fn seed(&self, subject: &str, now_ms: i64, day_usd: f64, month_usd: f64) {
        let (day, month) = periods(now_ms);
        let mut map = self.lock();
        state(&mut map, subject).spend = Spend {
            day,
            day_usd,
            month,
            month_usd,
            ..Spend::default()
        };
    }

    /// Current (day, month) spend of a subject.
    pub(super) fn spent(&self, subject: &str, now_ms: i64) -> (f64, f64) {
        let (day, month) = periods(now_ms);
        self.lock().get(subject).map_or((0.0, 0.0), |s| {
            (
                if s.spend.day == day {
                    s.spend.day_usd
                } else {
                    0.0
                },
                if s.spend.month == month {
                    s.spend.month_usd
                } else {
                    0.0
                },
            )
        })
    }
}

/// Sets the budget gauges and reports thresholds crossed (50, 80, 100 %), once per period.
fn alert(s: &Subject, spend: &mut Spend) {
    let l = &s.limits;
    for (period, (limit, used, label)) in [
        (l.daily_budget_usd, spend.day_usd, "day"),
        (l.monthly_budget_usd, spend.month_usd, "month"),
    ]
    .into_iter()
    .enumerate()
    {
        if limit <= 0.0 {
            continue;
        }
        let ratio = used / limit;
        metrics::gauge!(names::BUDGET_USED, "subject" => l.subject.clone(), "period" => label)
            .set(ratio);
        for threshold in [50u32, 80, 100] {
            if ratio * 100.0 >= f64::from(threshold) && spend.alerted[period] < threshold {
                spend.alerted[period] = threshold;
                tracing::warn!(
                    subject = %l.subject,
                    period = label,
                    threshold_percent = threshold,
                    spent_usd = used,
                    budget_usd = limit,
                    "budget threshold crossed"
                );
                metrics::counter!(
                    names::BUDGET_ALERTS,
                    "subject" => l.subject.clone(),
                    "period" => label,
                    "threshold" => threshold.to_string()
                )
                .increment(1);
            }
        }
    }
}
