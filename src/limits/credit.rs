//! Credit: shared limits admitted on this replica without a round trip.
//!
//! An admission that goes to Redis may also take a block of credit for its replica (see
//! [`ADMIT`](super::remote::ADMIT) for the sizes): requests and tokens out of the shared
//! buckets, and USD as a reservation against a budget. Until the block expires
//! (`shared.credit_window` after it was taken), later calls of the same subjects are
//! admitted out of it in this process, and only their settlement (off the call path) goes
//! to Redis. What is left when the block expires goes back (requests and tokens to the
//! buckets, the USD reservation released).
//!
//! Why the limits stay exact: credit is taken from the shared bucket or budget atomically,
//! like any admission, so the replicas together never admit more than the limit, and a
//! budget's overspend bound is the one without credit (a credit call reserves its estimate
//! just the same; the block is a reservation every replica sees). What credit costs is the
//! other way round: a block held on one replica is not there for the others until it is
//! used or expires. It is small by construction (taken only from the upper half of a bucket
//! or budget, an eighth of the distance to the half at most, at most one window of a rate or
//! 1/64 of a budget), so near a limit every call asks Redis, as without credit.
//!
//! Stream slots are not credited (a stream that asks for a slot still goes to Redis).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::time::Instant;

use super::{Ask, BudgetCheck, Subject};

/// A replica's credit for one subject (key or team), shared by every [`Subject`] built for
/// it (a reload of the keys keeps it).
#[derive(Debug, Default)]
pub(super) struct Credit {
    /// Requests left.
    pub requests: f64,
    /// Tokens left.
    pub tokens: f64,
    /// USD left of the reserved block.
    pub usd: f64,
    /// Whether the budget was checked (below half) when the USD block was taken: only then
    /// may a call with a budget check be admitted out of credit.
    pub budget_ok: bool,
    /// When the credit expires (`None`: there is none).
    pub until: Option<Instant>,
    /// A call is taking a block for this subject now (the others do not ask for one too).
    pub granting: bool,
    /// The subject's requests per minute when the credit was taken (the cap of what goes
    /// back).
    pub rpm: f64,
    /// Its tokens per minute, likewise.
    pub tpm: f64,
    /// The last block taken (requests, tokens, USD): credit below a quarter of it is low.
    pub block: Left,
}

/// What a block gives back when it expires.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(super) struct Left {
    pub requests: f64,
    pub tokens: f64,
    pub usd: f64,
}

impl Left {
    pub fn is_empty(&self) -> bool {
        self.requests <= 0.0 && self.tokens <= 0.0 && self.usd <= 0.0
    }
}

impl Credit {
    /// Empties the credit, returning what was left.
    pub fn take_left(&mut self) -> Left {
        let left = Left {
            requests: self.requests,
            tokens: self.tokens,
            usd: self.usd,
        };
        self.requests = 0.0;
        self.tokens = 0.0;
        self.usd = 0.0;
        self.budget_ok = false;
        self.until = None;
        left
    }

    /// Whether the credit expired with something left.
    pub fn expired(&self, now: Instant) -> bool {
        self.until.is_some_and(|t| t <= now)
    }
}

/// One subject's credit cell.
pub(super) type Cell = Arc<Mutex<Credit>>;

pub(super) fn lock(cell: &Cell) -> MutexGuard<'_, Credit> {
    cell.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a call needs of one subject's credit (what an admission takes for it): requests,
/// tokens, and USD when the budget is checked.
pub(super) fn needs(s: &Subject, ask: &Ask) -> (f64, f64, Option<f64>) {
    let l = &s.limits;
    let budget = l.daily_budget_usd > 0.0 || l.monthly_budget_usd > 0.0;
    (
        if l.requests_per_minute > 0 { 1.0 } else { 0.0 },
        if l.tokens_per_minute > 0 {
            ask.estimated_tokens as f64
        } else {
            0.0
        },
        (budget && ask.budget != BudgetCheck::Skip).then_some(ask.estimated_usd.max(0.0)),
    )
}

/// Admits `ask` out of the credit of its subjects, all or none: `Some` when admitted (the
/// credit is taken), with whether the credit runs low (then a new block is worth taking
/// before it runs out: under a quarter of the last block left, or the last third of the
/// `window` the blocks are taken for).
/// Calls that need a stream slot, or with more than two subjects (a key and its team), are
/// never admitted here.
pub(super) fn take<'a>(
    ask: &'a Ask,
    cell_of: impl Fn(&'a Subject) -> Option<&'a Cell>,
    window: std::time::Duration,
    now: Instant,
) -> Option<bool> {
    if ask.stream
        && ask
            .subjects
            .iter()
            .any(|s| s.limits.max_concurrent_streams > 0)
    {
        return None;
    }
    let mut guards: [Option<MutexGuard<'a, Credit>>; 2] = [None, None];
    for (i, s) in ask.subjects.iter().enumerate() {
        let (requests, tokens, usd) = needs(s, ask);
        if requests == 0.0 && tokens == 0.0 && usd.is_none() {
            continue;
        }
        let (Some(slot), Some(cell)) = (guards.get_mut(i), cell_of(s)) else {
            return None;
        };
        let c = lock(cell);
        let fits = c.until.is_some_and(|t| t > now)
            && c.requests >= requests
            && c.tokens >= tokens
            && usd.is_none_or(|u| c.budget_ok && c.usd >= u);
        if !fits {
            return None;
        }
        *slot = Some(c);
    }
    let mut low = false;
    for (s, guard) in ask.subjects.iter().zip(guards.iter_mut()) {
        if let Some(c) = guard {
            let (requests, tokens, usd) = needs(s, ask);
            c.requests -= requests;
            c.tokens -= tokens;
            c.usd -= usd.unwrap_or(0.0);
            low |= (requests > 0.0 && c.requests < c.block.requests / 4.0)
                || (tokens > 0.0 && c.tokens < c.block.tokens / 4.0)
                || (usd.is_some() && c.usd < c.block.usd / 4.0)
                || c.until.is_some_and(|t| t.duration_since(now) < window / 3);
        }
    }
    Some(low)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::limits::{Limits, SubjectLimits};

    fn ask(limits: &Limits, budget: BudgetCheck) -> Ask {
        Ask {
            subjects: limits.subjects(vec![SubjectLimits {
                subject: "key:k".into(),
                requests_per_minute: 100,
                tokens_per_minute: 0,
                max_concurrent_streams: 1,
                daily_budget_usd: 1.0,
                monthly_budget_usd: 0.0,
            }]),
            estimated_tokens: 10,
            stream: false,
            estimated_usd: 0.25,
            budget,
        }
    }

    /// The window the test blocks were taken for (the credit below lasts 100 ms, more than a third).
    const W: Duration = Duration::from_millis(240);

    #[test]
    fn credit_admits_all_or_nothing_and_only_while_it_lasts() {
        let limits = Limits::default();
        let a = ask(&limits, BudgetCheck::Reserve);
        let cell: Cell = Arc::default();
        let now = Instant::now();
        {
            let mut c = lock(&cell);
            c.requests = 3.0;
            c.usd = 0.5;
            c.budget_ok = true;
            c.until = Some(now + Duration::from_millis(100));
        }
        assert_eq!(take(&a, |_| Some(&cell), W, now), Some(false));
        assert!(take(&a, |_| Some(&cell), W, now).is_some());
        // The USD is gone (two of 0.25): nothing is taken, not even the request.
        assert!(take(&a, |_| Some(&cell), W, now).is_none());
        assert_eq!(lock(&cell).requests, 1.0);
        // A call routed past its budget does not need USD.
        assert!(take(&ask(&limits, BudgetCheck::Skip), |_| Some(&cell), W, now).is_some());
        // Expired credit admits nothing; a stream that needs a slot never uses credit.
        lock(&cell).requests = 5.0;
        let skip = ask(&limits, BudgetCheck::Skip);
        assert!(take(&skip, |_| Some(&cell), W, now + Duration::from_millis(100)).is_none());
        let mut stream = skip.clone();
        stream.stream = true;
        assert!(take(&stream, |_| Some(&cell), W, now).is_none());
        // A budget not checked below half when the block was taken admits nothing.
        lock(&cell).budget_ok = false;
        lock(&cell).usd = 1.0;
        assert!(take(&a, |_| Some(&cell), W, now).is_none());
        // Under a quarter of the last block left: low (worth a new block before it runs out).
        {
            let mut c = lock(&cell);
            c.budget_ok = true;
            c.block.requests = 24.0;
        }
        assert_eq!(take(&a, |_| Some(&cell), W, now), Some(true));
        assert_eq!(lock(&cell).take_left().requests, 4.0);
        assert!(lock(&cell).take_left().is_empty());
    }
}
