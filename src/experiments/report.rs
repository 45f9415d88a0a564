//! GetExperiment: per-arm results and each arm's differences from the control arm, with 95%
//! confidence intervals.
//!
//! The database does the work: one aggregate query per report over the usage records of the
//! experiment (the `usage_experiment` index), one for the shadow records, and per arm one
//! window query that reads only the order statistics the quantiles need; nothing loads the
//! records themselves. The same SQL runs on SQLite and PostgreSQL ([`Query`] is the one
//! thing a store provides).
//!
//! # Methods (z = 1.96)
//! - Error rate: each arm's Wilson score interval, and for the difference (arm − control)
//!   Newcombe's hybrid score interval (method 10 of Newcombe 1998): with rates p₁ (control)
//!   and p₂, Wilson bounds (l₁, u₁) and (l₂, u₂), the difference d = p₂ − p₁ has the bounds
//!   d − √((p₂−l₂)² + (u₁−p₁)²) and d + √((u₂−p₂)² + (p₁−l₁)²). Good at small counts and
//!   rates near 0 or 1.
//! - Latency and TTFT p50/p95: the sample quantile is the order statistic at rank ⌈np⌉; its
//!   distribution-free 95% interval is the order statistics at ranks ⌊np − z√(np(1−p))⌋ and
//!   ⌈np + z√(np(1−p))⌉ (the normal approximation of the binomial count below the true
//!   quantile). Each arm's standard error is that interval's width / 2z, and the difference
//!   gets d ± z√(se₁² + se₂²) (method `order-statistics`).
//! - Tokens per call (successful calls): the difference of means with Welch's standard
//!   error √(s₁²/n₁ + s₂²/n₂) and the normal quantile (method `welch`).
//! - Cost per 1K tokens: a ratio estimator R = Σcost / Σtokens per arm; its variance by the
//!   delta method, Var(R) ≈ Σ(cᵢ − R·tᵢ)² / ((n−1)·n·t̄²), then d ± z√(Var₁ + Var₂)
//!   (method `delta`).
//!
//! A difference is significant when its interval excludes 0. An arm with too few calls for
//! a method (fewer than 2, or no spread) gets no interval for that metric.

use std::collections::BTreeMap;

use crate::ledger::{Dialect, SHADOW_RPC, SqlParam};

/// The normal quantile of a two-sided 95% interval.
pub const Z: f64 = 1.959_963_984_540_054;

/// The kind of a result column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// BIGINT / INTEGER.
    Int,
    /// DOUBLE PRECISION / REAL.
    Real,
    /// TEXT.
    Text,
}

/// One value of a result row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// An integer.
    Int(i64),
    /// A float.
    Real(f64),
    /// A text.
    Text(String),
}

impl Value {
    fn int(&self) -> i64 {
        match self {
            Value::Int(v) => *v,
            Value::Real(v) => *v as i64,
            Value::Null | Value::Text(_) => 0,
        }
    }

    fn real(&self) -> Option<f64> {
        match self {
            Value::Int(v) => Some(*v as f64),
            Value::Real(v) => Some(*v),
            Value::Null | Value::Text(_) => None,
        }
    }

    fn text(&self) -> String {
        match self {
            Value::Text(v) => v.clone(),
            _ => String::new(),
        }
    }

    fn count(&self) -> u64 {
        u64::try_from(self.int()).unwrap_or(0)
    }
}

/// What a store provides: run a query, get its rows with the given column kinds.
#[async_trait::async_trait]
pub trait Query: Send + Sync {
    /// The store's dialect.
    fn dialect(&self) -> Dialect;
    /// Runs `sql` with `params`; each row has one value per entry of `kinds`.
    async fn rows(
        &self,
        sql: String,
        params: Vec<SqlParam>,
        kinds: Vec<Kind>,
    ) -> Result<Vec<Vec<Value>>, String>;
}

/// A quantile and its interval.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Quantile {
    /// The estimate.
    pub value: Option<f64>,
    /// The 95% interval's ends.
    pub interval: Option<(f64, f64)>,
}

/// The p50 and p95 of one arm's latency (or TTFT).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Quantiles {
    /// Observations.
    pub n: u64,
    /// The median.
    pub p50: Option<f64>,
    /// The 95th percentile.
    pub p95: Option<f64>,
    /// The median's interval.
    pub p50_ci: Option<(f64, f64)>,
    /// The 95th percentile's interval.
    pub p95_ci: Option<(f64, f64)>,
}

/// Shadow results of one arm's calls.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ShadowSums {
    /// Shadow calls.
    pub calls: u64,
    /// Of those, not OK.
    pub errors: u64,
    /// Shadow calls compared with their primary.
    pub compared: u64,
    /// Of those, equal.
    pub exact: u64,
    /// Comparisons with a length ratio.
    pub ratios: u64,
    /// Their sum.
    pub ratio_sum: f64,
    /// JSON-mode comparisons.
    pub json: u64,
    /// Of those, agreeing.
    pub json_agree: u64,
}

impl ShadowSums {
    /// Share of compared shadow replies equal to their primary's.
    pub fn exact_match_rate(&self) -> Option<f64> {
        (self.compared > 0).then(|| self.exact as f64 / self.compared as f64)
    }

    /// Mean shadow/primary length ratio.
    pub fn mean_length_ratio(&self) -> Option<f64> {
        (self.ratios > 0).then(|| self.ratio_sum / self.ratios as f64)
    }

    /// Share of JSON-mode shadow replies agreeing with their primary's.
    pub fn json_agree_rate(&self) -> Option<f64> {
        (self.json > 0).then(|| self.json_agree as f64 / self.json as f64)
    }
}

/// The sums of one arm's calls, as the aggregate query returns them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ArmSums {
    /// The arm.
    pub arm: String,
    /// Calls.
    pub calls: u64,
    /// Calls not OK.
    pub errors: u64,
    /// Input tokens (all calls).
    pub input_tokens: u64,
    /// Output tokens (all calls).
    pub output_tokens: u64,
    /// Cost (all calls).
    pub cost_usd: f64,
    /// Σ tokens² over successful calls.
    pub tokens_sq: f64,
    /// Σ cost² over successful calls.
    pub cost_sq: f64,
    /// Σ cost·tokens over successful calls.
    pub cost_tokens: f64,
    /// Calls with a time to first token.
    pub ttft_calls: u64,
    /// Σ tokens over successful calls.
    pub ok_tokens: f64,
    /// Σ cost over successful calls.
    pub ok_cost: f64,
}

impl ArmSums {
    fn ok_calls(&self) -> u64 {
        self.calls.saturating_sub(self.errors)
    }
}

/// One arm's report.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ArmReport {
    /// The arm.
    pub name: String,
    /// Calls.
    pub calls: u64,
    /// Calls not OK.
    pub errors: u64,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Cost.
    pub cost_usd: f64,
    /// Call latency, ms.
    pub latency: Quantiles,
    /// Time to first token, ms.
    pub ttft: Quantiles,
    /// Shadow results.
    pub shadow: ShadowSums,
    /// Differences from the control (empty for the control).
    pub diffs: Vec<Diff>,
    sums: ArmSums,
}

impl ArmReport {
    /// errors / calls (0 without calls).
    pub fn error_rate(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            self.errors as f64 / self.calls as f64
        }
    }

    /// Cost per 1,000 tokens, when any tokens were used.
    pub fn cost_per_1k_tokens(&self) -> Option<f64> {
        let tokens = (self.input_tokens + self.output_tokens) as f64;
        (tokens > 0.0).then(|| self.cost_usd / tokens * 1000.0)
    }
}

/// A difference from the control for one metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Diff {
    /// The metric's name.
    pub metric: &'static str,
    /// Arm minus control.
    pub difference: f64,
    /// The interval's lower end.
    pub lower: f64,
    /// The interval's upper end.
    pub upper: f64,
    /// How the interval was computed.
    pub method: &'static str,
}

impl Diff {
    /// The interval excludes 0.
    pub fn significant(&self) -> bool {
        self.lower > 0.0 || self.upper < 0.0
    }
}

/// A whole report.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExperimentReport {
    /// The experiment.
    pub name: String,
    /// The control arm.
    pub control: String,
    /// The arms, control first.
    pub arms: Vec<ArmReport>,
}

/// The Wilson score interval of `x` successes in `n`.
pub fn wilson(x: u64, n: u64) -> Option<(f64, f64)> {
    if n == 0 {
        return None;
    }
    let (x, n) = (x as f64, n as f64);
    let p = x / n;
    let z2 = Z * Z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    Some(((centre - half).max(0.0), (centre + half).min(1.0)))
}

/// Newcombe's hybrid score interval of `p₂ − p₁` (arm `(x2, n2)` minus control `(x1, n1)`).
pub fn newcombe(x1: u64, n1: u64, x2: u64, n2: u64) -> Option<Diff> {
    let (l1, u1) = wilson(x1, n1)?;
    let (l2, u2) = wilson(x2, n2)?;
    let p1 = x1 as f64 / n1 as f64;
    let p2 = x2 as f64 / n2 as f64;
    let d = p2 - p1;
    Some(Diff {
        metric: "error_rate",
        difference: d,
        lower: d - ((p2 - l2).powi(2) + (u1 - p1).powi(2)).sqrt(),
        upper: d + ((u2 - p2).powi(2) + (p1 - l1).powi(2)).sqrt(),
        method: "newcombe",
    })
}

/// The 1-based ranks of a quantile of `n` observations: (estimate, lower, upper).
pub fn quantile_ranks(n: u64, p: f64) -> Option<(u64, u64, u64)> {
    if n == 0 {
        return None;
    }
    let nf = n as f64;
    let clamp = |r: f64| (r.max(1.0) as u64).min(n);
    let spread = Z * (nf * p * (1.0 - p)).sqrt();
    Some((
        clamp((nf * p).ceil()),
        clamp((nf * p - spread).floor()),
        clamp((nf * p + spread).ceil()),
    ))
}

/// The difference of two quantiles with the order-statistics interval (see the module docs).
fn quantile_diff(
    metric: &'static str,
    control: (Option<f64>, Option<(f64, f64)>),
    arm: (Option<f64>, Option<(f64, f64)>),
) -> Option<Diff> {
    let (c, (cl, cu)) = (control.0?, control.1?);
    let (a, (al, au)) = (arm.0?, arm.1?);
    let se = |l: f64, u: f64| (u - l) / (2.0 * Z);
    let half = Z * (se(cl, cu).powi(2) + se(al, au).powi(2)).sqrt();
    let d = a - c;
    Some(Diff {
        metric,
        difference: d,
        lower: d - half,
        upper: d + half,
        method: "order-statistics",
    })
}

/// Mean and sample variance of successful calls' tokens.
fn tokens_moments(s: &ArmSums) -> Option<(f64, f64, f64)> {
    let n = s.ok_calls() as f64;
    if n < 2.0 {
        return None;
    }
    let mean = s.ok_tokens / n;
    let var = ((s.tokens_sq - n * mean * mean) / (n - 1.0)).max(0.0);
    Some((n, mean, var))
}

fn welch_tokens(control: &ArmSums, arm: &ArmSums) -> Option<Diff> {
    let (n1, m1, v1) = tokens_moments(control)?;
    let (n2, m2, v2) = tokens_moments(arm)?;
    let se = (v1 / n1 + v2 / n2).sqrt();
    let d = m2 - m1;
    Some(Diff {
        metric: "tokens_per_call",
        difference: d,
        lower: d - Z * se,
        upper: d + Z * se,
        method: "welch",
    })
}

/// Cost per 1K tokens of successful calls and the delta-method variance of it.
fn cost_ratio(s: &ArmSums) -> Option<(f64, f64)> {
    let n = s.ok_calls() as f64;
    if n < 2.0 || s.ok_tokens <= 0.0 {
        return None;
    }
    let r = s.ok_cost / s.ok_tokens;
    let mean_t = s.ok_tokens / n;
    let resid = (s.cost_sq - 2.0 * r * s.cost_tokens + r * r * s.tokens_sq).max(0.0);
    let var = resid / ((n - 1.0) * n * mean_t * mean_t);
    Some((r * 1000.0, var * 1e6))
}

fn delta_cost(control: &ArmSums, arm: &ArmSums) -> Option<Diff> {
    let (r1, v1) = cost_ratio(control)?;
    let (r2, v2) = cost_ratio(arm)?;
    let d = r2 - r1;
    let half = Z * (v1 + v2).sqrt();
    Some(Diff {
        metric: "cost_per_1k_tokens",
        difference: d,
        lower: d - half,
        upper: d + half,
        method: "delta",
    })
}

fn diffs(control: &ArmReport, arm: &ArmReport) -> Vec<Diff> {
    let mut out = Vec::new();
    out.extend(newcombe(
        control.errors,
        control.calls,
        arm.errors,
        arm.calls,
    ));
    for (metric, pick) in [
        (
            "latency_p50_ms",
            (|r: &ArmReport| (r.latency.p50, r.latency.p50_ci)) as fn(&ArmReport) -> _,
        ),
        ("latency_p95_ms", |r: &ArmReport| {
            (r.latency.p95, r.latency.p95_ci)
        }),
        ("ttft_p50_ms", |r: &ArmReport| (r.ttft.p50, r.ttft.p50_ci)),
        ("ttft_p95_ms", |r: &ArmReport| (r.ttft.p95, r.ttft.p95_ci)),
    ] {
        out.extend(quantile_diff(metric, pick(control), pick(arm)));
    }
    out.extend(welch_tokens(&control.sums, &arm.sums));
    out.extend(delta_cost(&control.sums, &arm.sums));
    out
}

struct Sql {
    dialect: Dialect,
    params: Vec<SqlParam>,
}

impl Sql {
    fn new(dialect: Dialect) -> Self {
        Self {
            dialect,
            params: Vec::new(),
        }
    }

    fn param(&mut self, p: SqlParam) -> String {
        self.params.push(p);
        match self.dialect {
            Dialect::Sqlite => format!("?{}", self.params.len()),
            Dialect::Postgres => format!("${}", self.params.len()),
        }
    }

    fn real(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "REAL",
            Dialect::Postgres => "DOUBLE PRECISION",
        }
    }

    /// The filter of an experiment's records in `[from_ms, to_ms)`, shadows or not.
    fn filter(&mut self, name: &str, from_ms: i64, to_ms: i64, shadow: bool) -> String {
        let name = self.param(SqlParam::Text(name.to_owned()));
        let from = self.param(SqlParam::Int(from_ms));
        let to = self.param(SqlParam::Int(to_ms));
        let rpc = self.param(SqlParam::Text(SHADOW_RPC.to_owned()));
        let op = if shadow { "=" } else { "<>" };
        format!(
            "experiment = {name} AND experiment <> '' AND time_ms >= {from} AND time_ms < {to} AND rpc {op} {rpc}"
        )
    }
}

/// The aggregate query over an experiment's calls: one row per arm, columns as [`ArmSums`].
pub fn arm_sql(dialect: Dialect, name: &str, from_ms: i64, to_ms: i64) -> (String, Vec<SqlParam>) {
    let mut sql = Sql::new(dialect);
    let filter = sql.filter(name, from_ms, to_ms, false);
    let real = sql.real();
    let ok = |e: &str| {
        format!("CAST(COALESCE(SUM(CASE WHEN code = 'OK' THEN {e} ELSE 0 END), 0) AS {real})")
    };
    let int = |e: &str| format!("CAST(COALESCE(SUM({e}), 0) AS BIGINT)");
    let tokens = format!("CAST(input_tokens + output_tokens AS {real})");
    let cost = format!("CAST(COALESCE(cost_usd, 0) AS {real})");
    let columns = [
        "arm".to_owned(),
        "CAST(COUNT(*) AS BIGINT)".to_owned(),
        int("CASE WHEN code <> 'OK' THEN 1 ELSE 0 END"),
        int("input_tokens"),
        int("output_tokens"),
        format!("CAST(COALESCE(SUM({cost}), 0) AS {real})"),
        ok(&format!("{tokens} * {tokens}")),
        ok(&format!("{cost} * {cost}")),
        ok(&format!("{cost} * {tokens}")),
        "CAST(COUNT(ttft_ms) AS BIGINT)".to_owned(),
        ok(&tokens),
        ok(&cost),
    ];
    (
        format!(
            "SELECT {} FROM usage WHERE {filter} GROUP BY arm",
            columns.join(", ")
        ),
        sql.params,
    )
}

/// The column kinds of [`arm_sql`].
pub const ARM_KINDS: [Kind; 12] = [
    Kind::Text,
    Kind::Int,
    Kind::Int,
    Kind::Int,
    Kind::Int,
    Kind::Real,
    Kind::Real,
    Kind::Real,
    Kind::Real,
    Kind::Int,
    Kind::Real,
    Kind::Real,
];

/// The aggregate query over an experiment's shadow calls: one row per arm, columns as
/// [`ShadowSums`] after the arm.
pub fn shadow_sql(
    dialect: Dialect,
    name: &str,
    from_ms: i64,
    to_ms: i64,
) -> (String, Vec<SqlParam>) {
    let mut sql = Sql::new(dialect);
    let filter = sql.filter(name, from_ms, to_ms, true);
    let real = sql.real();
    let count = |cond: &str| {
        format!("CAST(COALESCE(SUM(CASE WHEN {cond} THEN 1 ELSE 0 END), 0) AS BIGINT)")
    };
    let columns = [
        "arm".to_owned(),
        "CAST(COUNT(*) AS BIGINT)".to_owned(),
        count("code <> 'OK'"),
        "CAST(COUNT(shadow_exact_match) AS BIGINT)".to_owned(),
        count("shadow_exact_match"),
        "CAST(COUNT(shadow_length_ratio) AS BIGINT)".to_owned(),
        format!("CAST(COALESCE(SUM(shadow_length_ratio), 0) AS {real})"),
        "CAST(COUNT(shadow_json_agree) AS BIGINT)".to_owned(),
        count("shadow_json_agree"),
    ];
    (
        format!(
            "SELECT {} FROM usage WHERE {filter} GROUP BY arm",
            columns.join(", ")
        ),
        sql.params,
    )
}

/// The column kinds of [`shadow_sql`].
pub const SHADOW_KINDS: [Kind; 9] = [
    Kind::Text,
    Kind::Int,
    Kind::Int,
    Kind::Int,
    Kind::Int,
    Kind::Int,
    Kind::Real,
    Kind::Int,
    Kind::Int,
];

/// The values of `column` (`latency_ms` or `ttft_ms`) at the 1-based `ranks` of one arm's
/// calls in ascending order: rows of (rank, value).
pub fn ranks_sql(
    dialect: Dialect,
    name: &str,
    arm: &str,
    column: &str,
    from_ms: i64,
    to_ms: i64,
    ranks: &[u64],
) -> (String, Vec<SqlParam>) {
    let mut sql = Sql::new(dialect);
    let filter = sql.filter(name, from_ms, to_ms, false);
    let arm = sql.param(SqlParam::Text(arm.to_owned()));
    let column = if column == "ttft_ms" {
        "ttft_ms"
    } else {
        "latency_ms"
    };
    let real = sql.real();
    let list: Vec<String> = ranks
        .iter()
        .map(|r| sql.param(SqlParam::Int(i64::try_from(*r).unwrap_or(i64::MAX))))
        .collect();
    (
        format!(
            "SELECT rn, v FROM (SELECT CAST(ROW_NUMBER() OVER (ORDER BY {column}) AS BIGINT) AS rn,
             CAST({column} AS {real}) AS v FROM usage WHERE {filter} AND arm = {arm}
             AND {column} IS NOT NULL) ranked WHERE rn IN ({})",
            list.join(", ")
        ),
        sql.params,
    )
}

async fn quantiles(
    q: &dyn Query,
    name: &str,
    arm: &str,
    column: &str,
    n: u64,
    range: (i64, i64),
) -> Result<Quantiles, String> {
    let (Some(r50), Some(r95)) = (quantile_ranks(n, 0.5), quantile_ranks(n, 0.95)) else {
        return Ok(Quantiles::default());
    };
    let mut ranks = vec![r50.0, r50.1, r50.2, r95.0, r95.1, r95.2];
    ranks.sort_unstable();
    ranks.dedup();
    let (sql, params) = ranks_sql(q.dialect(), name, arm, column, range.0, range.1, &ranks);
    let rows = q.rows(sql, params, vec![Kind::Int, Kind::Real]).await?;
    let at: BTreeMap<u64, f64> = rows
        .iter()
        .filter_map(|r| Some((r.first()?.count(), r.get(1)?.real()?)))
        .collect();
    let get = |rank: u64| at.get(&rank).copied();
    let interval = |(_, l, u): (u64, u64, u64)| Some((get(l)?, get(u)?)).filter(|_| n >= 2);
    Ok(Quantiles {
        n,
        p50: get(r50.0),
        p95: get(r95.0),
        p50_ci: interval(r50),
        p95_ci: interval(r95),
    })
}

/// Builds the report of experiment `name` over `[from_ms, to_ms)`. `defined` are the arms
/// of the policy that runs the experiment now (control first), if any; without them the arm
/// with the most calls is the control. `None` when no arm is defined or seen.
pub async fn run(
    q: &dyn Query,
    name: &str,
    from_ms: i64,
    to_ms: i64,
    defined: Option<Vec<String>>,
) -> Result<Option<ExperimentReport>, String> {
    let dialect = q.dialect();
    let (sql, params) = arm_sql(dialect, name, from_ms, to_ms);
    let rows = q.rows(sql, params, ARM_KINDS.to_vec()).await?;
    let mut sums: BTreeMap<String, ArmSums> = BTreeMap::new();
    for r in rows {
        let v = |i: usize| r.get(i).cloned().unwrap_or(Value::Null);
        let s = ArmSums {
            arm: v(0).text(),
            calls: v(1).count(),
            errors: v(2).count(),
            input_tokens: v(3).count(),
            output_tokens: v(4).count(),
            cost_usd: v(5).real().unwrap_or(0.0),
            tokens_sq: v(6).real().unwrap_or(0.0),
            cost_sq: v(7).real().unwrap_or(0.0),
            cost_tokens: v(8).real().unwrap_or(0.0),
            ttft_calls: v(9).count(),
            ok_tokens: v(10).real().unwrap_or(0.0),
            ok_cost: v(11).real().unwrap_or(0.0),
        };
        sums.insert(s.arm.clone(), s);
    }
    let (sql, params) = shadow_sql(dialect, name, from_ms, to_ms);
    let rows = q.rows(sql, params, SHADOW_KINDS.to_vec()).await?;
    let mut shadows: BTreeMap<String, ShadowSums> = BTreeMap::new();
    for r in rows {
        let v = |i: usize| r.get(i).cloned().unwrap_or(Value::Null);
        shadows.insert(
            v(0).text(),
            ShadowSums {
                calls: v(1).count(),
                errors: v(2).count(),
                compared: v(3).count(),
                exact: v(4).count(),
                ratios: v(5).count(),
                ratio_sum: v(6).real().unwrap_or(0.0),
                json: v(7).count(),
                json_agree: v(8).count(),
            },
        );
    }
    // The arms: the defined ones in order, then any others seen, by name.
    let mut order: Vec<String> = defined.clone().unwrap_or_default();
    for arm in sums.keys().chain(shadows.keys()) {
        if !order.contains(arm) {
            order.push(arm.clone());
        }
    }
    if order.is_empty() {
        return Ok(None);
    }
    let control = match &defined {
        Some(arms) if !arms.is_empty() => arms[0].clone(),
        _ => sums
            .values()
            .max_by(|a, b| a.calls.cmp(&b.calls).then(b.arm.cmp(&a.arm)))
            .map_or_else(|| order[0].clone(), |s| s.arm.clone()),
    };
    if let Some(i) = order.iter().position(|a| *a == control) {
        let c = order.remove(i);
        order.insert(0, c);
    }
    let mut arms = Vec::with_capacity(order.len());
    for arm in order {
        let s = sums.remove(&arm).unwrap_or_default();
        let latency = quantiles(q, name, &arm, "latency_ms", s.calls, (from_ms, to_ms)).await?;
        let ttft = quantiles(q, name, &arm, "ttft_ms", s.ttft_calls, (from_ms, to_ms)).await?;
        arms.push(ArmReport {
            name: arm.clone(),
            calls: s.calls,
            errors: s.errors,
            input_tokens: s.input_tokens,
            output_tokens: s.output_tokens,
            cost_usd: s.cost_usd,
            latency,
            ttft,
            shadow: shadows.remove(&arm).unwrap_or_default(),
            diffs: Vec::new(),
            sums: s,
        });
    }
    if let Some((control_arm, rest)) = arms.split_first_mut() {
        for arm in rest {
            arm.diffs = diffs(control_arm, arm);
        }
    }
    Ok(Some(ExperimentReport {
        name: name.to_owned(),
        control,
        arms,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_the_textbook() {
        // Newcombe (1998), example: 81/263 -> (0.2553, 0.3662).
        let (l, u) = wilson(81, 263).unwrap();
        assert!(
            (l - 0.2553).abs() < 1e-3 && (u - 0.3662).abs() < 1e-3,
            "{l} {u}"
        );
        let (l, u) = wilson(0, 10).unwrap();
        assert_eq!(l, 0.0);
        assert!((u - 0.2775).abs() < 1e-3, "{u}");
    }

    #[test]
    fn newcombe_matches_the_textbook() {
        // Newcombe (1998) table II, 56/70 vs 48/80: difference 0.2, interval (0.0524, 0.3339).
        let d = newcombe(48, 80, 56, 70).unwrap();
        assert!((d.difference - 0.2).abs() < 1e-9);
        assert!((d.lower - 0.0524).abs() < 1e-3, "{}", d.lower);
        assert!((d.upper - 0.3339).abs() < 1e-3, "{}", d.upper);
        assert!(d.significant());
        let same = newcombe(5, 100, 6, 100).unwrap();
        assert!(!same.significant());
    }

    #[test]
    fn quantile_ranks_bracket_the_estimate() {
        assert_eq!(quantile_ranks(0, 0.5), None);
        assert_eq!(quantile_ranks(1, 0.5), Some((1, 1, 1)));
        let (est, lo, hi) = quantile_ranks(100, 0.5).unwrap();
        assert_eq!((est, lo, hi), (50, 40, 60));
        let (est, lo, hi) = quantile_ranks(1000, 0.95).unwrap();
        assert!(lo < est && est < hi && hi <= 1000, "{lo} {est} {hi}");
    }

    #[test]
    fn welch_and_delta_intervals() {
        // Arm tokens: 10 calls of 100 tokens ± 10; control: 10 calls of 200 ± 10.
        let sums = |mean: f64, cost_per_token: f64| {
            let values: Vec<f64> = (0..10)
                .map(|i| mean + if i % 2 == 0 { 10.0 } else { -10.0 })
                .collect();
            ArmSums {
                calls: 10,
                ok_tokens: values.iter().sum(),
                tokens_sq: values.iter().map(|v| v * v).sum(),
                ok_cost: values.iter().map(|v| v * cost_per_token).sum(),
                cost_sq: values.iter().map(|v| (v * cost_per_token).powi(2)).sum(),
                cost_tokens: values.iter().map(|v| v * v * cost_per_token).sum(),
                ..ArmSums::default()
            }
        };
        let d = welch_tokens(&sums(200.0, 1e-6), &sums(100.0, 1e-6)).unwrap();
        assert!((d.difference + 100.0).abs() < 1e-9);
        assert!(d.significant() && d.upper < 0.0);
        // Same price per token: no difference, and an exact ratio has no spread.
        let c = delta_cost(&sums(200.0, 1e-6), &sums(100.0, 1e-6)).unwrap();
        assert!(c.difference.abs() < 1e-12 && !c.significant());
        let c = delta_cost(&sums(200.0, 1e-6), &sums(100.0, 2e-6)).unwrap();
        assert!((c.difference - 1e-3).abs() < 1e-9, "{}", c.difference);
        assert_eq!(c.method, "delta");
    }
}
