//! The routing policy model: what is stored (as JSON), read from the config file (as TOML)
//! and exchanged through the Admin API, and its validation.
//!
//! Durations are written as strings such as `250ms` or `2s`.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use crate::error::FieldViolation;

/// Most targets per policy (and per variant).
pub const MAX_TARGETS: usize = 64;
/// Most variants per policy.
pub const MAX_VARIANTS: usize = 16;
/// Most attempts per call a policy may allow.
pub const MAX_ATTEMPTS: u32 = 10;
/// Largest encoded policy document.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;

/// `[policies.NAME]` tables: the policies by name (`name` may be left out or must equal
/// the table name). Their targets are validated once the providers exist.
pub fn policies_from_raw(
    raw: BTreeMap<String, PolicySpec>,
    issues: &mut crate::settings::Issues,
) -> Vec<PolicySpec> {
    let mut policies = Vec::new();
    for (name, mut spec) in raw {
        if !spec.name.is_empty() && spec.name != name {
            issues.push(
                format!("policies.{name}.name"),
                "must be left out or equal the table name",
            );
        }
        spec.name = name;
        policies.push(spec);
    }
    policies
}

/// A routing policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// The name callers use (set from the table key in the config file).
    #[serde(default)]
    pub name: String,
    /// What it is for.
    #[serde(default)]
    pub description: String,
    /// Targets.
    #[serde(default)]
    pub targets: Vec<TargetSpec>,
    /// How candidates are ordered.
    #[serde(default)]
    pub strategy: StrategyKind,
    /// Stickiness for the weighted strategy: `user` or `tag:NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_key: Option<String>,
    /// Constraints; they fail closed.
    #[serde(default)]
    pub constraints: ConstraintSpec,
    /// Execution settings.
    #[serde(default)]
    pub execution: ExecutionSpec,
    /// Variants chosen by request tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<VariantSpec>,
    /// The guardrail profile (`[guardrails.NAME]`) applied to calls of this policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guardrails: Option<String>,
    /// The response cache for calls of this policy (off unless set).
    #[serde(default, skip_serializing_if = "crate::cache::CacheSpec::is_default")]
    pub cache: crate::cache::CacheSpec,
    /// Shadow traffic: mirror a share of the calls to candidate targets (off unless set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<super::experiment::ShadowSpec>,
    /// An experiment assigning callers to arms (none unless set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<super::experiment::ExperimentSpec>,
}

/// One target of a policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    /// Configured provider name.
    pub provider: String,
    /// Model at the provider.
    pub model: String,
    /// Relative weight (weighted strategy).
    #[serde(default)]
    pub weight: u32,
    /// Order (priority strategy), lower first.
    #[serde(default)]
    pub priority: i32,
    /// Region, e.g. `eu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Labels such as `zero_data_retention`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// How candidates are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrategyKind {
    /// By priority, then list order.
    #[default]
    Priority,
    /// Weighted random (optionally sticky) primary.
    Weighted,
    /// Lowest observed latency first.
    LowestLatency,
    /// Lowest estimated cost first.
    LowestCost,
    /// Highest recent success rate first.
    MostReliable,
}

/// Constraints on targets.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConstraintSpec {
    /// Allowed regions (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_regions: Vec<String>,
    /// Tags every target must carry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_tags: Vec<String>,
    /// Input price cap, USD per million tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_input_price_per_mtok: Option<f64>,
    /// Output price cap, USD per million tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_price_per_mtok: Option<f64>,
}

/// Execution settings of a policy.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutionSpec {
    /// Most attempts per call, hedges included (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Timeout of one attempt.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub attempt_timeout: Option<Duration>,
    /// Time-to-first-token timeout for streams.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub first_token_timeout: Option<Duration>,
    /// Cap on a call's total time.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub total_timeout: Option<Duration>,
    /// Hedging.
    #[serde(default)]
    pub hedging: HedgingSpec,
    /// Retry backoff.
    #[serde(default)]
    pub retry_backoff: BackoffSpec,
    /// Let context-length errors fall back to a larger-context target.
    #[serde(default)]
    pub context_length_fallback: bool,
    /// Deadline-aware fallback: the percentile (0-100 exclusive; 0 turns it off) of the next
    /// target's observed latency that an attempt leaves free for it (default 99).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserve_percentile: Option<f64>,
    /// What an attempt leaves free for the next target while that one has too few
    /// observations (default 500 ms).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub reserve_default: Option<Duration>,
}

/// Hedging settings.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HedgingSpec {
    /// Off, fixed or percentile.
    #[serde(default)]
    pub mode: HedgingMode,
    /// Fixed delay (and the percentile mode's delay before enough samples exist).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub delay: Option<Duration>,
    /// Percentile of observed latency, 0-100 exclusive (default 98).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentile: Option<f64>,
    /// Most hedges per call (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_extra_attempts: Option<u32>,
}

/// When hedges start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HedgingMode {
    /// No hedging.
    #[default]
    Off,
    /// After a fixed delay.
    Fixed,
    /// After a percentile of observed latency.
    Percentile,
}

/// Exponential backoff with jitter.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffSpec {
    /// First delay (default 100 ms).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub initial: Option<Duration>,
    /// Largest delay (default 2 s).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub max: Option<Duration>,
    /// Growth factor (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<f64>,
}

/// A target list chosen by request tags.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantSpec {
    /// Tags the request must carry.
    pub match_tags: BTreeMap<String, String>,
    /// Targets used instead of the policy's.
    pub targets: Vec<TargetSpec>,
}

/// The execution settings with defaults applied, as the executor uses them.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutionSettings {
    /// Most attempts per call.
    pub max_attempts: u32,
    /// Timeout of one attempt.
    pub attempt_timeout: Option<Duration>,
    /// Time-to-first-token timeout for streams.
    pub first_token_timeout: Option<Duration>,
    /// Cap on a call's total time.
    pub total_timeout: Option<Duration>,
    /// Hedging.
    pub hedging: Hedging,
    /// Backoff: initial, max, multiplier.
    pub backoff: (Duration, Duration, f64),
    /// Context-length fallback allowed.
    pub context_length_fallback: bool,
    /// The time an attempt leaves free for the next target; `None` when off.
    pub reserve: Option<Reserve>,
}

/// Deadline-aware fallback: while a later target of the plan could still be tried, an attempt
/// ends early enough to leave that target the time it is expected to need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reserve {
    /// The percentile of the next target's observed latency (time to first token for
    /// streams) to leave free.
    pub percentile: f64,
    /// What to leave free while the next target has too few observations.
    pub default: Duration,
}

/// The default percentile of hedging: a hedge for about the slowest 2% of calls (where
/// hedging pays most), well within the default hedge budget.
pub const DEFAULT_HEDGE_PERCENTILE: f64 = 98.0;

/// The default percentile of the next target's latency an attempt leaves free.
pub const DEFAULT_RESERVE_PERCENTILE: f64 = 99.0;
/// The default time left free for a target without enough observations.
pub const DEFAULT_RESERVE: Duration = Duration::from_millis(500);

/// Resolved hedging settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Hedging {
    /// No hedging.
    Off,
    /// Hedge after `delay`.
    Fixed {
        /// The delay.
        delay: Duration,
        /// Most hedges per call.
        max_extra: u32,
    },
    /// Hedge after the percentile of the primary's latency (or `fallback_delay`).
    Percentile {
        /// The percentile.
        percentile: f64,
        /// Delay before enough samples exist.
        fallback_delay: Duration,
        /// Most hedges per call.
        max_extra: u32,
    },
}

impl Default for ExecutionSettings {
    fn default() -> Self {
        ExecutionSpec::default().resolve()
    }
}

impl ExecutionSpec {
    /// Applies defaults.
    pub fn resolve(&self) -> ExecutionSettings {
        let max_extra = self.hedging.max_extra_attempts.unwrap_or(1);
        ExecutionSettings {
            max_attempts: self.max_attempts.unwrap_or(3).clamp(1, MAX_ATTEMPTS),
            attempt_timeout: self.attempt_timeout,
            first_token_timeout: self.first_token_timeout,
            total_timeout: self.total_timeout,
            hedging: match self.hedging.mode {
                HedgingMode::Off => Hedging::Off,
                HedgingMode::Fixed => Hedging::Fixed {
                    delay: self.hedging.delay.unwrap_or(Duration::from_millis(500)),
                    max_extra,
                },
                HedgingMode::Percentile => Hedging::Percentile {
                    percentile: self.hedging.percentile.unwrap_or(DEFAULT_HEDGE_PERCENTILE),
                    fallback_delay: self.hedging.delay.unwrap_or(Duration::from_secs(1)),
                    max_extra,
                },
            },
            backoff: (
                self.retry_backoff
                    .initial
                    .unwrap_or(Duration::from_millis(100)),
                self.retry_backoff.max.unwrap_or(Duration::from_secs(2)),
                self.retry_backoff.multiplier.unwrap_or(2.0),
            ),
            context_length_fallback: self.context_length_fallback,
            reserve: match self
                .reserve_percentile
                .unwrap_or(DEFAULT_RESERVE_PERCENTILE)
            {
                p if p <= 0.0 => None,
                percentile => Some(Reserve {
                    percentile,
                    default: self.reserve_default.unwrap_or(DEFAULT_RESERVE),
                }),
            },
        }
    }
}

/// The sticky key of a weighted policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StickyKey {
    /// `ChatRequest.user`.
    User,
    /// The value of a request tag.
    Tag(String),
}

/// Parses a `sticky_key` value.
pub fn parse_sticky_key(s: &str) -> Option<StickyKey> {
    match s {
        "user" => Some(StickyKey::User),
        _ => s
            .strip_prefix("tag:")
            .filter(|t| !t.is_empty())
            .map(|t| StickyKey::Tag(t.to_owned())),
    }
}

/// Whether `name` is a valid policy name.
pub fn valid_policy_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && name.len() <= 63
        && chars.all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '_' || c == '-'
        })
}

/// A preset: strategy and execution settings a policy can start from.
pub fn preset(name: &str) -> Option<(StrategyKind, ExecutionSpec)> {
    let hedge = |percentile: f64, delay_ms: u64| HedgingSpec {
        mode: HedgingMode::Percentile,
        delay: Some(Duration::from_millis(delay_ms)),
        percentile: Some(percentile),
        max_extra_attempts: Some(1),
    };
    match name {
        "cheapest" => Some((
            StrategyKind::LowestCost,
            ExecutionSpec {
                max_attempts: Some(2),
                ..ExecutionSpec::default()
            },
        )),
        "fastest" => Some((
            StrategyKind::LowestLatency,
            ExecutionSpec {
                max_attempts: Some(3),
                hedging: hedge(90.0, 1000),
                ..ExecutionSpec::default()
            },
        )),
        "reliable" => Some((
            StrategyKind::MostReliable,
            ExecutionSpec {
                max_attempts: Some(5),
                hedging: hedge(95.0, 2000),
                ..ExecutionSpec::default()
            },
        )),
        _ => None,
    }
}

/// The names of the presets.
pub const PRESETS: &[&str] = &["cheapest", "fastest", "reliable"];

/// What validation knows about the gateway: providers, their allowlists, model prices.
pub trait PolicyContext {
    /// Whether a provider is configured.
    fn has_provider(&self, provider: &str) -> bool;
    /// Whether the provider routes this model (false only when an allowlist excludes it).
    fn has_model(&self, provider: &str, model: &str) -> bool;
    /// The (input, output) prices of a model, when known.
    fn prices(&self, provider: &str, model: &str) -> Option<(f64, f64)>;
    /// Whether a guardrail profile of this name is configured.
    fn has_guardrails(&self, _profile: &str) -> bool {
        true
    }
}

/// Whether a target meets the constraints; `Err` names the first one it breaks.
pub fn check_constraints(
    c: &ConstraintSpec,
    target: &TargetSpec,
    prices: Option<(f64, f64)>,
) -> Result<(), String> {
    if !c.allowed_regions.is_empty() {
        match &target.region {
            Some(r) if c.allowed_regions.contains(r) => {}
            Some(r) => {
                return Err(format!(
                    "region {r} not in allowed_regions [{}]",
                    c.allowed_regions.join(", ")
                ));
            }
            None => {
                return Err(format!(
                    "no region, and allowed_regions is [{}]",
                    c.allowed_regions.join(", ")
                ));
            }
        }
    }
    for tag in &c.required_tags {
        if !target.tags.contains(tag) {
            return Err(format!("missing required tag {tag}"));
        }
    }
    if c.max_input_price_per_mtok.is_some() || c.max_output_price_per_mtok.is_some() {
        let Some((input, output)) = prices else {
            return Err("no known price, and a price limit is set".to_owned());
        };
        if let Some(max) = c.max_input_price_per_mtok
            && input > max
        {
            return Err(format!(
                "input price {input} over max_input_price_per_mtok {max}"
            ));
        }
        if let Some(max) = c.max_output_price_per_mtok
            && output > max
        {
            return Err(format!(
                "output price {output} over max_output_price_per_mtok {max}"
            ));
        }
    }
    Ok(())
}

/// Validates a policy; returns every problem with its field path under `prefix`
/// (e.g. `policy`).
pub fn validate(spec: &PolicySpec, ctx: &dyn PolicyContext, prefix: &str) -> Vec<FieldViolation> {
    let mut v = Vec::new();
    let mut add = |field: String, msg: String| v.push(FieldViolation::new(field, msg));
    if !valid_policy_name(&spec.name) {
        add(
            format!("{prefix}.name"),
            "must be 1 to 63 lowercase letters, digits, `.`, `_` or `-`, starting with a letter"
                .to_owned(),
        );
    }
    if let Some(profile) = &spec.guardrails
        && !ctx.has_guardrails(profile)
    {
        add(
            format!("{prefix}.guardrails"),
            format!("`{profile}` is not a configured guardrail profile"),
        );
    }
    if spec.description.len() > 1024 {
        add(
            format!("{prefix}.description"),
            "must be at most 1024 bytes".to_owned(),
        );
    }
    let check_targets =
        |targets: &[TargetSpec], field: &str, add: &mut dyn FnMut(String, String)| {
            if targets.is_empty() {
                add(field.to_owned(), "must hold at least one target".to_owned());
            }
            if targets.len() > MAX_TARGETS {
                add(
                    field.to_owned(),
                    format!("at most {MAX_TARGETS} targets are allowed"),
                );
            }
            for (i, t) in targets.iter().enumerate() {
                let tf = format!("{field}[{i}]");
                if !ctx.has_provider(&t.provider) {
                    add(
                        format!("{tf}.provider"),
                        format!("`{}` is not a configured provider", t.provider),
                    );
                } else if t.model.is_empty() {
                    add(format!("{tf}.model"), "must not be empty".to_owned());
                } else if !ctx.has_model(&t.provider, &t.model) {
                    add(
                        format!("{tf}.model"),
                        format!("`{}` is not enabled for provider `{}`", t.model, t.provider),
                    );
                }
                if targets[..i]
                    .iter()
                    .any(|o| o.provider == t.provider && o.model == t.model && o.region == t.region)
                {
                    add(
                        tf.clone(),
                        format!("duplicate target {}/{}", t.provider, t.model),
                    );
                }
            }
            if spec.strategy == StrategyKind::Weighted
                && !targets.is_empty()
                && targets.iter().all(|t| t.weight == 0)
            {
                add(
                    field.to_owned(),
                    "a weighted policy needs at least one target with a weight above 0".to_owned(),
                );
            }
        };
    check_targets(&spec.targets, &format!("{prefix}.targets"), &mut add);
    if spec.variants.len() > MAX_VARIANTS {
        add(
            format!("{prefix}.variants"),
            format!("at most {MAX_VARIANTS} variants are allowed"),
        );
    }
    for (i, variant) in spec.variants.iter().enumerate() {
        if variant.match_tags.is_empty() {
            add(
                format!("{prefix}.variants[{i}].match_tags"),
                "must not be empty".to_owned(),
            );
        }
        check_targets(
            &variant.targets,
            &format!("{prefix}.variants[{i}].targets"),
            &mut add,
        );
    }
    if let Some(key) = &spec.sticky_key {
        if parse_sticky_key(key).is_none() {
            add(
                format!("{prefix}.sticky_key"),
                format!("`{key}` is not `user` or `tag:NAME`"),
            );
        } else if spec.strategy != StrategyKind::Weighted {
            add(
                format!("{prefix}.sticky_key"),
                "only applies to the weighted strategy".to_owned(),
            );
        }
    }

    // Constraints that no target can ever meet fail at creation, not at call time.
    let c = &spec.constraints;
    for (name, price) in [
        ("max_input_price_per_mtok", c.max_input_price_per_mtok),
        ("max_output_price_per_mtok", c.max_output_price_per_mtok),
    ] {
        if price.is_some_and(|p| !p.is_finite() || p < 0.0) {
            add(
                format!("{prefix}.constraints.{name}"),
                "must be zero or more".to_owned(),
            );
        }
    }
    let all_targets: Vec<&TargetSpec> = spec
        .targets
        .iter()
        .chain(spec.variants.iter().flat_map(|v| v.targets.iter()))
        .collect();
    if !all_targets.is_empty() {
        let unmet = |check: &dyn Fn(&TargetSpec) -> bool| all_targets.iter().all(|t| !check(t));
        if !c.allowed_regions.is_empty()
            && unmet(&|t| {
                t.region
                    .as_ref()
                    .is_some_and(|r| c.allowed_regions.contains(r))
            })
        {
            add(
                format!("{prefix}.constraints.allowed_regions"),
                "no target is in any of these regions".to_owned(),
            );
        }
        if !c.required_tags.is_empty()
            && unmet(&|t| c.required_tags.iter().all(|tag| t.tags.contains(tag)))
        {
            add(
                format!("{prefix}.constraints.required_tags"),
                "no target carries all of these tags".to_owned(),
            );
        }
        let price_ok = |t: &TargetSpec| {
            let only_prices = ConstraintSpec {
                max_input_price_per_mtok: c.max_input_price_per_mtok,
                max_output_price_per_mtok: c.max_output_price_per_mtok,
                ..ConstraintSpec::default()
            };
            check_constraints(&only_prices, t, ctx.prices(&t.provider, &t.model)).is_ok()
        };
        if (c.max_input_price_per_mtok.is_some() || c.max_output_price_per_mtok.is_some())
            && unmet(&price_ok)
        {
            add(
                format!("{prefix}.constraints"),
                "no target has a known price within the price limits".to_owned(),
            );
        }
    }

    let e = &spec.execution;
    if let Some(n) = e.max_attempts
        && !(1..=MAX_ATTEMPTS).contains(&n)
    {
        add(
            format!("{prefix}.execution.max_attempts"),
            format!("must be 1 to {MAX_ATTEMPTS}"),
        );
    }
    for (name, d) in [
        ("attempt_timeout", e.attempt_timeout),
        ("first_token_timeout", e.first_token_timeout),
        ("total_timeout", e.total_timeout),
        ("hedging.delay", e.hedging.delay),
        ("retry_backoff.initial", e.retry_backoff.initial),
        ("retry_backoff.max", e.retry_backoff.max),
        ("reserve_default", e.reserve_default),
    ] {
        if d.is_some_and(|d| d.is_zero()) {
            add(
                format!("{prefix}.execution.{name}"),
                "must be greater than zero".to_owned(),
            );
        }
    }
    match e.hedging.mode {
        HedgingMode::Off => {}
        HedgingMode::Fixed => {
            if e.hedging.delay.is_none() {
                add(
                    format!("{prefix}.execution.hedging.delay"),
                    "is required with fixed hedging".to_owned(),
                );
            }
        }
        HedgingMode::Percentile => {
            if e.hedging
                .percentile
                .is_some_and(|p| !(p > 0.0 && p < 100.0))
            {
                add(
                    format!("{prefix}.execution.hedging.percentile"),
                    "must be between 0 and 100 (exclusive)".to_owned(),
                );
            }
        }
    }
    if e.reserve_percentile
        .is_some_and(|p| !(0.0..100.0).contains(&p))
    {
        add(
            format!("{prefix}.execution.reserve_percentile"),
            "must be 0 (off) or between 0 and 100 (exclusive)".to_owned(),
        );
    }
    if e.hedging
        .max_extra_attempts
        .is_some_and(|n| n > MAX_ATTEMPTS - 1)
    {
        add(
            format!("{prefix}.execution.hedging.max_extra_attempts"),
            format!("must be at most {}", MAX_ATTEMPTS - 1),
        );
    }
    if e.retry_backoff
        .multiplier
        .is_some_and(|m| !(1.0..=10.0).contains(&m))
    {
        add(
            format!("{prefix}.execution.retry_backoff.multiplier"),
            "must be between 1 and 10".to_owned(),
        );
    }
    v.extend(spec.cache.validate(&format!("{prefix}.cache")));
    v.extend(super::experiment::validate(spec, ctx, prefix));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ctx;
    impl PolicyContext for Ctx {
        fn has_provider(&self, p: &str) -> bool {
            p == "openai" || p == "mock"
        }
        fn has_model(&self, p: &str, m: &str) -> bool {
            p != "mock" || m == "echo"
        }
        fn prices(&self, _p: &str, m: &str) -> Option<(f64, f64)> {
            (m == "gpt-4o-mini").then_some((0.15, 0.6))
        }
    }

    fn target(provider: &str, model: &str) -> TargetSpec {
        TargetSpec {
            provider: provider.into(),
            model: model.into(),
            weight: 0,
            priority: 0,
            region: None,
            tags: vec![],
        }
    }

    fn fields(spec: &PolicySpec) -> Vec<String> {
        validate(spec, &Ctx, "policy")
            .into_iter()
            .map(|v| v.field)
            .collect()
    }

    #[test]
    fn valid_policy_has_no_violations() {
        let spec = PolicySpec {
            name: "chat-default".into(),
            description: String::new(),
            targets: vec![target("openai", "gpt-4o-mini"), target("mock", "echo")],
            strategy: StrategyKind::Priority,
            sticky_key: None,
            constraints: ConstraintSpec::default(),
            execution: ExecutionSpec::default(),
            variants: vec![],
            guardrails: None,
            cache: Default::default(),
            shadow: None,
            experiment: None,
        };
        assert!(fields(&spec).is_empty());
    }

    #[test]
    fn every_problem_is_named() {
        let mut spec = PolicySpec {
            name: "Bad/Name".into(),
            description: String::new(),
            targets: vec![
                target("nope", "x"),
                target("mock", "other"),
                target("openai", "gpt-4o-mini"),
                target("openai", "gpt-4o-mini"),
            ],
            strategy: StrategyKind::Weighted,
            sticky_key: Some("session".into()),
            constraints: ConstraintSpec {
                allowed_regions: vec!["eu".into()],
                ..ConstraintSpec::default()
            },
            execution: ExecutionSpec {
                max_attempts: Some(0),
                ..ExecutionSpec::default()
            },
            variants: vec![],
            guardrails: None,
            cache: Default::default(),
            shadow: None,
            experiment: None,
        };
        spec.execution.hedging.mode = HedgingMode::Fixed;
        assert_eq!(
            fields(&spec),
            vec![
                "policy.name",
                "policy.targets[0].provider",
                "policy.targets[1].model",
                "policy.targets[3]",
                "policy.targets",
                "policy.sticky_key",
                "policy.constraints.allowed_regions",
                "policy.execution.max_attempts",
                "policy.execution.hedging.delay",
            ]
        );
    }

    #[test]
    fn empty_targets_and_impossible_price() {
        let spec = PolicySpec {
            name: "p".into(),
            description: String::new(),
            targets: vec![],
            strategy: StrategyKind::Priority,
            sticky_key: None,
            constraints: ConstraintSpec::default(),
            execution: ExecutionSpec::default(),
            variants: vec![],
            guardrails: None,
            cache: Default::default(),
            shadow: None,
            experiment: None,
        };
        assert_eq!(fields(&spec), vec!["policy.targets"]);
        let spec = PolicySpec {
            targets: vec![target("openai", "gpt-4o-mini")],
            constraints: ConstraintSpec {
                max_output_price_per_mtok: Some(0.1),
                ..ConstraintSpec::default()
            },
            ..spec
        };
        assert_eq!(fields(&spec), vec!["policy.constraints"]);
    }

    #[test]
    fn toml_and_json_round_trip() {
        let spec: PolicySpec = toml::from_str(
            r#"
            targets = [{ provider = "openai", model = "gpt-4o-mini", region = "eu" }]
            strategy = "lowest_latency"
            [execution]
            attempt_timeout = "2s"
            hedging = { mode = "fixed", delay = "150ms" }
            "#,
        )
        .unwrap();
        assert_eq!(spec.execution.attempt_timeout, Some(Duration::from_secs(2)));
        let resolved = spec.execution.resolve();
        assert_eq!(
            resolved.hedging,
            Hedging::Fixed {
                delay: Duration::from_millis(150),
                max_extra: 1
            }
        );
        let json = serde_json::to_string(&spec).unwrap();
        let back: PolicySpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec);
    }
}
