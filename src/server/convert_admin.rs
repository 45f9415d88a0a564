//! Conversion between the admin protobuf messages and the policy model.

use std::time::Duration;

use crate::{
    cache::{CacheMode, CacheSpec},
    error::FieldViolation,
    health::{CircuitState, HealthSnapshot},
    pb,
    rollout::{ArmStats, RolloutSpec, RolloutView, State},
    routing::{
        Candidate, Explanation, PolicyRecord, PolicySource,
        policy::{
            BackoffSpec, ConstraintSpec, ExecutionSpec, HedgingMode, HedgingSpec, PolicySpec,
            StrategyKind, TargetSpec, VariantSpec, preset,
        },
    },
};

pub(super) fn duration_in(
    d: Option<prost_types::Duration>,
    field: &str,
    v: &mut Vec<FieldViolation>,
) -> Option<Duration> {
    let d = d?;
    match Duration::try_from(d) {
        Ok(d) => Some(d),
        Err(_) => {
            v.push(FieldViolation::new(field, "must not be negative"));
            None
        }
    }
}

/// Converts a duration for output.
pub fn duration_out(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

pub(super) fn target_in(t: pb::PolicyTarget) -> TargetSpec {
    TargetSpec {
        provider: t.provider,
        model: t.model,
        weight: t.weight,
        priority: t.priority,
        region: Some(t.region).filter(|r| !r.is_empty()),
        tags: t.tags,
    }
}

pub(super) fn target_out(t: &TargetSpec) -> pb::PolicyTarget {
    pb::PolicyTarget {
        provider: t.provider.clone(),
        model: t.model.clone(),
        weight: t.weight,
        priority: t.priority,
        region: t.region.clone().unwrap_or_default(),
        tags: t.tags.clone(),
    }
}

/// Converts a policy from the API. Problems with the message itself (unknown enum values,
/// negative durations, unknown presets) are returned as violations under `prefix`.
pub fn policy_in(p: pb::Policy, prefix: &str) -> (PolicySpec, Vec<FieldViolation>) {
    let mut v = Vec::new();
    let preset_defaults = if p.preset.is_empty() {
        None
    } else {
        match preset(&p.preset) {
            Some(defaults) => Some(defaults),
            None => {
                v.push(FieldViolation::new(
                    format!("{prefix}.preset"),
                    format!(
                        "unknown preset `{}`; use cheapest, fastest or reliable",
                        p.preset
                    ),
                ));
                None
            }
        }
    };
    let strategy = match pb::Strategy::try_from(p.strategy) {
        Ok(pb::Strategy::Unspecified) => preset_defaults
            .as_ref()
            .map_or(StrategyKind::Priority, |(s, _)| *s),
        Ok(pb::Strategy::Priority) => StrategyKind::Priority,
        Ok(pb::Strategy::Weighted) => StrategyKind::Weighted,
        Ok(pb::Strategy::LowestLatency) => StrategyKind::LowestLatency,
        Ok(pb::Strategy::LowestCost) => StrategyKind::LowestCost,
        Ok(pb::Strategy::MostReliable) => StrategyKind::MostReliable,
        Err(_) => {
            v.push(FieldViolation::new(
                format!("{prefix}.strategy"),
                format!("unknown strategy {}", p.strategy),
            ));
            StrategyKind::Priority
        }
    };
    let constraints = p
        .constraints
        .map_or_else(ConstraintSpec::default, |c| ConstraintSpec {
            allowed_regions: c.allowed_regions,
            required_tags: c.required_tags,
            max_input_price_per_mtok: c.max_input_price_per_mtok,
            max_output_price_per_mtok: c.max_output_price_per_mtok,
        });
    let execution = match p.execution {
        None => preset_defaults.map(|(_, e)| e).unwrap_or_default(),
        Some(e) => {
            let ef = format!("{prefix}.execution");
            let base = preset_defaults.map(|(_, e)| e).unwrap_or_default();
            let hedging = match e.hedging {
                None => base.hedging.clone(),
                Some(h) => HedgingSpec {
                    mode: match pb::HedgingMode::try_from(h.mode) {
                        Ok(pb::HedgingMode::Unspecified) => base.hedging.mode,
                        Ok(pb::HedgingMode::Off) => HedgingMode::Off,
                        Ok(pb::HedgingMode::Fixed) => HedgingMode::Fixed,
                        Ok(pb::HedgingMode::Percentile) => HedgingMode::Percentile,
                        Err(_) => {
                            v.push(FieldViolation::new(
                                format!("{ef}.hedging.mode"),
                                format!("unknown hedging mode {}", h.mode),
                            ));
                            HedgingMode::Off
                        }
                    },
                    delay: duration_in(h.delay, &format!("{ef}.hedging.delay"), &mut v)
                        .or(base.hedging.delay),
                    percentile: (h.percentile != 0.0)
                        .then_some(h.percentile)
                        .or(base.hedging.percentile),
                    max_extra_attempts: (h.max_extra_attempts != 0)
                        .then_some(h.max_extra_attempts)
                        .or(base.hedging.max_extra_attempts),
                },
            };
            let retry_backoff = match e.retry_backoff {
                None => base.retry_backoff.clone(),
                Some(b) => BackoffSpec {
                    initial: duration_in(b.initial, &format!("{ef}.retry_backoff.initial"), &mut v),
                    max: duration_in(b.max, &format!("{ef}.retry_backoff.max"), &mut v),
                    multiplier: (b.multiplier != 0.0).then_some(b.multiplier),
                },
            };
            ExecutionSpec {
                max_attempts: e.max_attempts.or(base.max_attempts),
                attempt_timeout: duration_in(
                    e.attempt_timeout,
                    &format!("{ef}.attempt_timeout"),
                    &mut v,
                )
                .or(base.attempt_timeout),
                first_token_timeout: duration_in(
                    e.first_token_timeout,
                    &format!("{ef}.first_token_timeout"),
                    &mut v,
                )
                .or(base.first_token_timeout),
                total_timeout: duration_in(e.total_timeout, &format!("{ef}.total_timeout"), &mut v)
                    .or(base.total_timeout),
                hedging,
                retry_backoff,
                context_length_fallback: e.context_length_fallback || base.context_length_fallback,
                reserve_percentile: e.reserve_percentile.or(base.reserve_percentile),
                reserve_default: duration_in(
                    e.reserve_default,
                    &format!("{ef}.reserve_default"),
                    &mut v,
                )
                .or(base.reserve_default),
            }
        }
    };
    let spec = PolicySpec {
        name: p.name,
        description: p.description,
        targets: p.targets.into_iter().map(target_in).collect(),
        strategy,
        sticky_key: Some(p.sticky_key).filter(|k| !k.is_empty()),
        constraints,
        execution,
        variants: p
            .variants
            .into_iter()
            .map(|var| VariantSpec {
                match_tags: var.match_tags.into_iter().collect(),
                targets: var.targets.into_iter().map(target_in).collect(),
            })
            .collect(),
        guardrails: Some(p.guardrails).filter(|g| !g.is_empty()),
        cache: cache_in(p.cache, &format!("{prefix}.cache"), &mut v),
        shadow: super::convert_trial::shadow_in(p.shadow, &format!("{prefix}.shadow"), &mut v),
        experiment: p.experiment.map(super::convert_trial::experiment_in),
    };
    (spec, v)
}

fn cache_in(c: Option<pb::PolicyCache>, field: &str, v: &mut Vec<FieldViolation>) -> CacheSpec {
    let Some(c) = c else {
        return CacheSpec::default();
    };
    let mode = match pb::CacheMode::try_from(c.mode) {
        Ok(pb::CacheMode::Unspecified | pb::CacheMode::Off) => CacheMode::Off,
        Ok(pb::CacheMode::Exact) => CacheMode::Exact,
        Ok(pb::CacheMode::Semantic) => CacheMode::Semantic,
        Err(_) => {
            v.push(FieldViolation::new(
                format!("{field}.mode"),
                format!("unknown cache mode {}", c.mode),
            ));
            CacheMode::Off
        }
    };
    CacheSpec {
        mode,
        ttl: duration_in(c.ttl, &format!("{field}.ttl"), v),
        max_temperature: c.max_temperature,
        allow_tools: c.allow_tools,
        similarity_threshold: c.similarity_threshold,
    }
}

fn cache_out(c: &CacheSpec) -> Option<pb::PolicyCache> {
    (!c.is_default()).then(|| pb::PolicyCache {
        mode: (match c.mode {
            CacheMode::Off => pb::CacheMode::Off,
            CacheMode::Exact => pb::CacheMode::Exact,
            CacheMode::Semantic => pb::CacheMode::Semantic,
        }) as i32,
        ttl: c.ttl.map(duration_out),
        max_temperature: c.max_temperature,
        allow_tools: c.allow_tools,
        similarity_threshold: c.similarity_threshold,
    })
}

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

fn strategy_out(s: StrategyKind) -> i32 {
    (match s {
        StrategyKind::Priority => pb::Strategy::Priority,
        StrategyKind::Weighted => pb::Strategy::Weighted,
        StrategyKind::LowestLatency => pb::Strategy::LowestLatency,
        StrategyKind::LowestCost => pb::Strategy::LowestCost,
        StrategyKind::MostReliable => pb::Strategy::MostReliable,
    }) as i32
}

/// Converts a stored or configured policy for output.
pub fn policy_out(r: &PolicyRecord) -> pb::Policy {
    let s = &r.spec;
    let e = &s.execution;
    pb::Policy {
        name: s.name.clone(),
        description: s.description.clone(),
        targets: s.targets.iter().map(target_out).collect(),
        strategy: strategy_out(s.strategy),
        sticky_key: s.sticky_key.clone().unwrap_or_default(),
        constraints: Some(pb::Constraints {
            allowed_regions: s.constraints.allowed_regions.clone(),
            required_tags: s.constraints.required_tags.clone(),
            max_input_price_per_mtok: s.constraints.max_input_price_per_mtok,
            max_output_price_per_mtok: s.constraints.max_output_price_per_mtok,
        }),
        execution: Some(pb::ExecutionSettings {
            max_attempts: e.max_attempts,
            attempt_timeout: e.attempt_timeout.map(duration_out),
            first_token_timeout: e.first_token_timeout.map(duration_out),
            total_timeout: e.total_timeout.map(duration_out),
            hedging: Some(pb::Hedging {
                mode: (match e.hedging.mode {
                    HedgingMode::Off => pb::HedgingMode::Off,
                    HedgingMode::Fixed => pb::HedgingMode::Fixed,
                    HedgingMode::Percentile => pb::HedgingMode::Percentile,
                }) as i32,
                delay: e.hedging.delay.map(duration_out),
                percentile: e.hedging.percentile.unwrap_or(0.0),
                max_extra_attempts: e.hedging.max_extra_attempts.unwrap_or(0),
            }),
            retry_backoff: Some(pb::Backoff {
                initial: e.retry_backoff.initial.map(duration_out),
                max: e.retry_backoff.max.map(duration_out),
                multiplier: e.retry_backoff.multiplier.unwrap_or(0.0),
            }),
            context_length_fallback: e.context_length_fallback,
            reserve_percentile: e.reserve_percentile,
            reserve_default: e.reserve_default.map(duration_out),
        }),
        variants: s
            .variants
            .iter()
            .map(|v| pb::PolicyVariant {
                match_tags: v.match_tags.clone().into_iter().collect(),
                targets: v.targets.iter().map(target_out).collect(),
            })
            .collect(),
        etag: r.etag(),
        source: (match r.source {
            PolicySource::Api => pb::PolicySource::Api,
            PolicySource::Config => pb::PolicySource::Config,
        }) as i32,
        create_time: Some(timestamp(r.created_ms)),
        update_time: Some(timestamp(r.updated_ms)),
        preset: String::new(),
        guardrails: s.guardrails.clone().unwrap_or_default(),
        cache: cache_out(&s.cache),
        rollout: None,
        rollout_state: 0,
        shadow: s.shadow.as_ref().map(super::convert_trial::shadow_out),
        experiment: s
            .experiment
            .as_ref()
            .map(super::convert_trial::experiment_out),
    }
}

/// Converts a route explanation.
pub fn explanation_out(e: Explanation) -> pb::ExplainRouteResponse {
    let mut rank = 0u32;
    pb::ExplainRouteResponse {
        policy: e.policy.unwrap_or_default(),
        variant: e.variant.and_then(|v| u32::try_from(v).ok()),
        strategy: strategy_out(e.strategy),
        candidates: e
            .candidates
            .into_iter()
            .map(|c: Candidate| {
                if c.chosen {
                    rank += 1;
                }
                pb::RouteCandidate {
                    rank: if c.chosen { rank } else { 0 },
                    provider: c.provider,
                    model: c.model,
                    chosen: c.chosen,
                    reason: c.reason,
                    estimated_cost_usd: c.estimated_cost_usd,
                    latency_p50: c.latency_p50.map(duration_out),
                    time_to_first_token_p50: c.ttft_p50.map(duration_out),
                    reserve: c.reserve.map(duration_out),
                }
            })
            .collect(),
        unroutable_reason: e.unroutable.unwrap_or_default().to_owned(),
    }
}

/// Converts a target's health.
pub fn health_out(provider: String, model: String, h: HealthSnapshot) -> pb::TargetHealth {
    pb::TargetHealth {
        provider,
        model,
        circuit: (match h.circuit {
            CircuitState::Closed => pb::CircuitState::Closed,
            CircuitState::Open => pb::CircuitState::Open,
            CircuitState::HalfOpen => pb::CircuitState::HalfOpen,
        }) as i32,
        latency_p50: h.latency_p50.map(duration_out),
        latency_p95: h.latency_p95.map(duration_out),
        time_to_first_token_p50: h.ttft_p50.map(duration_out),
        error_rate: h.error_rate,
        samples: h.samples as u64,
        cooldown_remaining: h.cooldown_remaining.map(duration_out),
    }
}

fn ms_duration(ms: f64) -> prost_types::Duration {
    duration_out(Duration::from_secs_f64(ms.max(0.0) / 1000.0))
}

/// Converts usage totals.
pub fn totals_out(t: &crate::ledger::Totals) -> pb::UsageTotals {
    pb::UsageTotals {
        calls: t.calls,
        errors: t.errors,
        error_rate: if t.calls == 0 {
            0.0
        } else {
            t.errors as f64 / t.calls as f64
        },
        input_tokens: t.input_tokens,
        output_tokens: t.output_tokens,
        cached_input_tokens: t.cached_input_tokens,
        cost_usd: t.cost_usd,
        calls_without_usage: t.calls_without_usage,
        latency_p50: t.latency_ms[0].map(ms_duration),
        latency_p95: t.latency_ms[1].map(ms_duration),
        latency_p99: t.latency_ms[2].map(ms_duration),
        time_to_first_token_p50: t.ttft_ms[0].map(ms_duration),
        time_to_first_token_p95: t.ttft_ms[1].map(ms_duration),
        guardrail_decisions: t.guardrail_decisions,
    }
}

/// Converts a usage record.
pub fn record_out(r: &crate::ledger::UsageRecord) -> pb::UsageRecord {
    pb::UsageRecord {
        time: Some(timestamp(r.time_ms)),
        request_id: r.request_id.clone(),
        rpc: r.rpc.clone(),
        key: r.key.clone(),
        tags: r.tags.clone().into_iter().collect(),
        policy: r.policy.clone(),
        provider: r.provider.clone(),
        model: r.model.clone(),
        attempts: r.attempts,
        input_tokens: r.input_tokens,
        output_tokens: r.output_tokens,
        cached_input_tokens: r.cached_input_tokens,
        usage_reported: r.usage_reported,
        cost_usd: r.cost_usd,
        latency: Some(ms_duration(r.latency_ms)),
        time_to_first_token: r.ttft_ms.map(ms_duration),
        code: r.code.clone(),
        error_class: r.error_class.clone(),
        cache: r.cache.clone(),
        cost_saved_usd: r.cost_saved_usd,
        guardrails: r.guardrails.clone(),
        policy_version: r.policy_version,
        rollout_arm: r.rollout_arm.clone(),
        shadow_of: r.trial.shadow_of.clone(),
        experiment: r.trial.experiment.clone(),
        arm: r.trial.arm.clone(),
        shadow: r
            .trial
            .comparison
            .as_ref()
            .map(super::convert_trial::comparison_out),
    }
}

/// Converts and validates a key from the API.
pub fn key_in(
    k: pb::Key,
    prefix: &str,
) -> Result<crate::auth::KeySpec, crate::error::GatewayError> {
    let mut violations = Vec::new();
    let mut scopes = Vec::new();
    for (i, s) in k.scopes.iter().enumerate() {
        match crate::auth::Scope::parse(s) {
            Some(scope) if !scopes.contains(&scope) => scopes.push(scope),
            Some(_) => {}
            None => violations.push(FieldViolation::new(
                format!("{prefix}.scopes[{i}]"),
                format!("`{s}` is not one of chat, admin, usage-read"),
            )),
        }
    }
    let spec = crate::auth::KeySpec {
        name: k.name,
        owner: k.owner,
        scopes,
        allowed_policies: k.allowed_policies,
        allowed_models: k.allowed_models,
        forced_tags: k.forced_tags.into_iter().collect(),
        expires_ms: k
            .expire_time
            .map(|t| t.seconds.saturating_mul(1000) + i64::from(t.nanos) / 1_000_000),
        requests_per_minute: k.requests_per_minute,
        tokens_per_minute: k.tokens_per_minute,
        max_concurrent_streams: k.max_concurrent_streams,
        daily_budget_usd: k.daily_budget_usd,
        monthly_budget_usd: k.monthly_budget_usd,
        budget_fallback_policy: k.budget_fallback_policy,
        guardrails: k.guardrails,
        keep_content: k.keep_content,
        content_retention_ms: duration_in(
            k.content_retention,
            &format!("{prefix}.content_retention"),
            &mut violations,
        )
        .map_or(0, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
        }),
    };
    violations.extend(crate::auth::validate(&spec, prefix));
    if violations.is_empty() {
        Ok(spec)
    } else {
        Err(crate::error::GatewayError::InvalidArgument(violations))
    }
}

/// Converts a key for output (never its secret).
pub fn key_out(r: &crate::auth::KeyRecord, spent_today: f64, spent_month: f64) -> pb::Key {
    let s = &r.spec;
    pb::Key {
        id: r.id.clone(),
        name: s.name.clone(),
        owner: s.owner.clone(),
        scopes: s.scopes.iter().map(|s| s.name().to_owned()).collect(),
        allowed_policies: s.allowed_policies.clone(),
        allowed_models: s.allowed_models.clone(),
        forced_tags: s.forced_tags.clone().into_iter().collect(),
        expire_time: s.expires_ms.map(timestamp),
        requests_per_minute: s.requests_per_minute,
        tokens_per_minute: s.tokens_per_minute,
        max_concurrent_streams: s.max_concurrent_streams,
        daily_budget_usd: s.daily_budget_usd,
        monthly_budget_usd: s.monthly_budget_usd,
        budget_fallback_policy: s.budget_fallback_policy.clone(),
        revoked: r.revoked,
        spent_today_usd: spent_today,
        spent_this_month_usd: spent_month,
        etag: r.etag(),
        create_time: Some(timestamp(r.created_ms)),
        guardrails: s.guardrails.clone(),
        keep_content: s.keep_content,
        content_retention: s.content_retention().map(duration_out),
    }
}

/// Kept content as the Admin API shows it.
pub fn content_out(c: &crate::ledger::StoredContent) -> pb::UsageContent {
    pb::UsageContent {
        request_id: c.request_id.clone(),
        time: Some(timestamp(c.time_ms)),
        key: c.key.clone(),
        tenant: c.content.tenant.clone(),
        prompt: c.content.prompt.clone(),
        reply: c.content.reply.clone(),
        expire_time: Some(timestamp(c.content.expires_ms)),
    }
}

/// An audit log entry as the Admin API shows it.
pub fn audit_out(r: &crate::audit::Record) -> pb::AuditEntry {
    let e = &r.entry;
    pb::AuditEntry {
        time: Some(timestamp(r.time_ms)),
        actor: e.actor.clone(),
        action: e.action.clone(),
        resource_kind: e.resource_kind.clone(),
        resource: e.resource.clone(),
        before_etag: e.before_etag.clone(),
        after_etag: e.after_etag.clone(),
        detail: e.detail.clone(),
    }
}

/// A staged update's rollout spec from the API, defaults filled in, and its problems.
pub fn rollout_spec_in(p: pb::RolloutSpec, field: &str) -> (RolloutSpec, Vec<FieldViolation>) {
    let mut v = Vec::new();
    let defaults = RolloutSpec::default();
    let spec = RolloutSpec {
        steps: if p.steps.is_empty() {
            defaults.steps
        } else {
            p.steps
        },
        step_duration: duration_in(p.step_duration, &format!("{field}.step_duration"), &mut v)
            .unwrap_or(defaults.step_duration),
        error_rate_margin: if p.error_rate_margin == 0.0 {
            defaults.error_rate_margin
        } else {
            p.error_rate_margin
        },
        latency_margin: if p.latency_margin == 0.0 {
            defaults.latency_margin
        } else {
            p.latency_margin
        },
        min_calls_per_step: if p.min_calls_per_step == 0 {
            defaults.min_calls_per_step
        } else {
            p.min_calls_per_step
        },
        confidence: if p.confidence == 0.0 {
            defaults.confidence
        } else {
            p.confidence
        },
        sticky_key: (!p.sticky_key.is_empty()).then_some(p.sticky_key),
    };
    v.extend(spec.validate(field));
    (spec, v)
}

/// A rollout spec for the API.
pub fn rollout_spec_out(s: &RolloutSpec) -> pb::RolloutSpec {
    pb::RolloutSpec {
        steps: s.steps.clone(),
        step_duration: Some(duration_out(s.step_duration)),
        error_rate_margin: s.error_rate_margin,
        latency_margin: s.latency_margin,
        min_calls_per_step: s.min_calls_per_step,
        confidence: s.confidence,
        sticky_key: s.sticky_key.clone().unwrap_or_default(),
    }
}

/// A rollout state for the API.
pub fn rollout_state_out(s: State) -> i32 {
    (match s {
        State::Running => pb::RolloutState::Running,
        State::Paused => pb::RolloutState::Paused,
        State::Completed => pb::RolloutState::Completed,
        State::RolledBack => pb::RolloutState::RolledBack,
        State::Aborted => pb::RolloutState::Aborted,
    }) as i32
}

fn arm_out(a: &ArmStats) -> pb::RolloutArmStats {
    pb::RolloutArmStats {
        version: a.version,
        calls: a.counts.calls,
        errors: a.counts.errors,
        latency_p95: a.p95.map(duration_out),
    }
}

/// A rollout with this replica's counts, for the API.
pub fn rollout_out(v: &RolloutView) -> pb::Rollout {
    let r = &v.record;
    pb::Rollout {
        policy: r.policy.clone(),
        state: rollout_state_out(r.state),
        spec: Some(rollout_spec_out(&r.spec)),
        baseline_version: r.baseline_version,
        canary_version: r.canary_version,
        step: r.step,
        canary_percent: r.percent(),
        start_time: Some(timestamp(r.started_ms)),
        end_time: r.ended_ms.map(timestamp),
        history: r
            .history
            .iter()
            .map(|h| pb::RolloutStep {
                step: h.step,
                percent: h.percent,
                start_time: Some(timestamp(h.started_ms)),
                end_time: h.ended_ms.map(timestamp),
                outcome: h.outcome.clone(),
                canary_calls: h.canary_calls,
                canary_errors: h.canary_errors,
            })
            .collect(),
        reason: r.reason.clone(),
        baseline: Some(arm_out(&v.baseline)),
        canary: Some(arm_out(&v.canary)),
        error_rate_evidence: v.error_evidence,
        latency_evidence: v.latency_evidence,
    }
}
