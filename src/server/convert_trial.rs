//! Conversion of the policy `shadow` and `experiment` blocks, shadow comparisons and
//! GetExperiment reports between protobuf and the domain model.

use crate::{
    error::FieldViolation,
    experiments::report::{ArmReport, Diff, ExperimentReport},
    ledger::Comparison,
    pb,
    routing::experiment::{ArmSpec, ExperimentSpec, ShadowSpec, ShadowTarget},
};

use super::convert_admin::{duration_in, duration_out, target_in, target_out};

/// A policy's `shadow` block from the API (unset: off).
pub fn shadow_in(
    s: Option<pb::PolicyShadow>,
    field: &str,
    v: &mut Vec<FieldViolation>,
) -> Option<ShadowSpec> {
    let s = s?;
    let positive = |n: u32| (n != 0).then_some(n);
    let positive_f = |n: f64| (n != 0.0).then_some(n);
    Some(ShadowSpec {
        targets: s
            .targets
            .into_iter()
            .map(|t| ShadowTarget {
                provider: t.provider,
                model: t.model,
            })
            .collect(),
        sample: s.sample,
        max_concurrency: positive(s.max_concurrency),
        max_queue: positive(s.max_queue),
        rate_per_second: positive_f(s.rate_per_second),
        max_usd_per_day: positive_f(s.max_usd_per_day),
        timeout: duration_in(s.timeout, &format!("{field}.timeout"), v),
    })
}

/// A policy's `shadow` block for output.
pub fn shadow_out(s: &ShadowSpec) -> pb::PolicyShadow {
    pb::PolicyShadow {
        targets: s
            .targets
            .iter()
            .map(|t| pb::ShadowTarget {
                provider: t.provider.clone(),
                model: t.model.clone(),
            })
            .collect(),
        sample: s.sample,
        max_concurrency: s.max_concurrency.unwrap_or(0),
        max_queue: s.max_queue.unwrap_or(0),
        rate_per_second: s.rate_per_second.unwrap_or(0.0),
        max_usd_per_day: s.max_usd_per_day.unwrap_or(0.0),
        timeout: s.timeout.map(duration_out),
    }
}

/// A policy's `experiment` block from the API.
pub fn experiment_in(e: pb::PolicyExperiment) -> ExperimentSpec {
    ExperimentSpec {
        name: e.name,
        arms: e
            .arms
            .into_iter()
            .map(|a| ArmSpec {
                name: a.name,
                weight: a.weight,
                targets: a.targets.into_iter().map(target_in).collect(),
                temperature: a.temperature,
                max_tokens: a.max_tokens,
                tags: a.tags.into_iter().collect(),
            })
            .collect(),
        sticky_by: Some(e.sticky_by).filter(|s| !s.is_empty()),
    }
}

/// A policy's `experiment` block for output.
pub fn experiment_out(e: &ExperimentSpec) -> pb::PolicyExperiment {
    pb::PolicyExperiment {
        name: e.name.clone(),
        arms: e
            .arms
            .iter()
            .map(|a| pb::ExperimentArm {
                name: a.name.clone(),
                weight: a.weight,
                targets: a.targets.iter().map(target_out).collect(),
                temperature: a.temperature,
                max_tokens: a.max_tokens,
                tags: a.tags.clone().into_iter().collect(),
            })
            .collect(),
        sticky_by: e.sticky_by.clone().unwrap_or_default(),
    }
}

/// A shadow comparison for output.
pub fn comparison_out(c: &Comparison) -> pb::ShadowComparison {
    pb::ShadowComparison {
        length_ratio: c.length_ratio,
        exact_match: c.exact_match,
        json_agree: c.json_agree,
        finish_reason: c.finish_reason.clone(),
    }
}

fn diff_out(d: &Diff) -> pb::MetricDiff {
    pb::MetricDiff {
        metric: d.metric.to_owned(),
        difference: d.difference,
        lower: d.lower,
        upper: d.upper,
        significant: d.significant(),
        method: d.method.to_owned(),
    }
}

fn arm_out(a: &ArmReport) -> pb::ArmReport {
    pb::ArmReport {
        name: a.name.clone(),
        calls: a.calls,
        errors: a.errors,
        error_rate: a.error_rate(),
        latency_p50_ms: a.latency.p50,
        latency_p95_ms: a.latency.p95,
        ttft_p50_ms: a.ttft.p50,
        ttft_p95_ms: a.ttft.p95,
        input_tokens: a.input_tokens,
        output_tokens: a.output_tokens,
        cost_usd: a.cost_usd,
        cost_per_1k_tokens: a.cost_per_1k_tokens(),
        shadow_calls: a.shadow.calls,
        shadow_errors: a.shadow.errors,
        shadow_exact_match_rate: a.shadow.exact_match_rate(),
        shadow_length_ratio: a.shadow.mean_length_ratio(),
        shadow_json_agree_rate: a.shadow.json_agree_rate(),
        diffs: a.diffs.iter().map(diff_out).collect(),
    }
}

/// A GetExperiment report for output.
pub fn report_out(r: &ExperimentReport) -> pb::GetExperimentResponse {
    pb::GetExperimentResponse {
        name: r.name.clone(),
        control: r.control.clone(),
        arms: r.arms.iter().map(arm_out).collect(),
    }
}
