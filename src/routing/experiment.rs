//! A policy's `shadow` and `experiment` blocks: what they say, their validation, and how an
//! experiment's arm changes a call (its targets in routing, its parameters and tags on the
//! request). The runtime (the shadow pool, the reports) is [`crate::experiments`].

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use super::policy::{PolicyContext, PolicySpec, StickyKey, TargetSpec, parse_sticky_key};
use crate::{
    error::FieldViolation,
    types::{ArmRef, ChatRequest},
};

/// Most shadow candidates per policy.
pub const MAX_SHADOW_TARGETS: usize = 4;
/// Most arms per experiment.
pub const MAX_ARMS: usize = 16;
/// Default shadow calls running at once.
pub const DEFAULT_SHADOW_CONCURRENCY: u32 = 4;
/// Default shadow calls waiting for a slot.
pub const DEFAULT_SHADOW_QUEUE: u32 = 16;
/// Default shadow calls started per second.
pub const DEFAULT_SHADOW_RATE: f64 = 10.0;
/// Default deadline of one shadow call.
pub const DEFAULT_SHADOW_TIMEOUT: Duration = Duration::from_secs(30);

/// A policy's `shadow` block: mirror a share of its calls to candidate targets.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowSpec {
    /// The candidates each sampled call is mirrored to.
    pub targets: Vec<ShadowTarget>,
    /// The share of calls mirrored, in (0, 1].
    pub sample: f64,
    /// Shadow calls running at once (default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// Shadow calls waiting for a slot (default 16); past it shadows are dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queue: Option<u32>,
    /// Shadow calls started per second (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_second: Option<f64>,
    /// Shadow spend per UTC day in US dollars (unset: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_usd_per_day: Option<f64>,
    /// The deadline of one shadow call (default 30 s).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
}

/// One shadow candidate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowTarget {
    /// A configured provider.
    pub provider: String,
    /// The model there.
    pub model: String,
}

/// A policy's `experiment` block.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSpec {
    /// The experiment's name (GetExperiment reports by it).
    pub name: String,
    /// The arms; the first is the control.
    pub arms: Vec<ArmSpec>,
    /// `user` or `tag:NAME`: what keeps a caller in one arm (unset: random per call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_by: Option<String>,
}

/// One arm of an experiment.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmSpec {
    /// The arm's name.
    pub name: String,
    /// Relative weight.
    #[serde(default)]
    pub weight: u32,
    /// Targets used instead of the policy's (empty: the policy's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<TargetSpec>,
    /// Temperature forced on the arm's calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Maximum output tokens forced on the arm's calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Tags set on the arm's calls (over the caller's), e.g. `prompt_version`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// The arm a call was assigned to, and what it changes on the request.
#[derive(Debug, Clone, PartialEq)]
pub struct ArmChoice {
    /// The experiment and arm names.
    pub arm: Arc<ArmRef>,
    /// Temperature forced on the call.
    pub temperature: Option<f64>,
    /// Maximum output tokens forced on the call.
    pub max_tokens: Option<u32>,
    /// Tags set on the call.
    pub tags: BTreeMap<String, String>,
}

impl ArmChoice {
    fn new(experiment: &str, arm: &ArmSpec) -> Self {
        Self {
            arm: Arc::new(ArmRef {
                experiment: experiment.to_owned(),
                arm: arm.name.clone(),
            }),
            temperature: arm.temperature,
            max_tokens: arm.max_tokens,
            tags: arm.tags.clone(),
        }
    }

    /// Applies the arm's parameters and tags to the request.
    pub fn apply(&self, request: &mut ChatRequest) {
        if let Some(t) = self.temperature {
            request.params.temperature = Some(t);
        }
        if let Some(m) = self.max_tokens {
            request.params.max_tokens = Some(m);
        }
        for (k, v) in &self.tags {
            request.tags.insert(k.clone(), v.clone());
        }
    }
}

/// An experiment compiled with its policy: the arms with their resolved targets.
pub(super) struct CompiledExperiment<T> {
    name: String,
    sticky: Option<StickyKey>,
    weights: Vec<u32>,
    /// Each arm's choice and its own targets (empty: the policy's).
    pub(super) arms: Vec<(Arc<ArmChoice>, Vec<T>)>,
}

impl<T> CompiledExperiment<T> {
    /// Compiles `spec`, resolving each arm's targets with `compile`.
    pub(super) fn new(spec: &ExperimentSpec, compile: impl Fn(&[TargetSpec]) -> Vec<T>) -> Self {
        Self {
            name: spec.name.clone(),
            sticky: spec.sticky_by.as_deref().and_then(parse_sticky_key),
            weights: spec.arms.iter().map(|a| a.weight).collect(),
            arms: spec
                .arms
                .iter()
                .map(|a| (Arc::new(ArmChoice::new(&spec.name, a)), compile(&a.targets)))
                .collect(),
        }
    }

    /// The arm of a request (deterministic by its sticky value).
    pub(super) fn assign(&self, request: &ChatRequest) -> Option<&(Arc<ArmChoice>, Vec<T>)> {
        let key = match &self.sticky {
            Some(StickyKey::User) => request.user.as_deref(),
            Some(StickyKey::Tag(tag)) => request.tags.get(tag).map(String::as_str),
            None => None,
        };
        crate::experiments::assign::assign(&self.name, key, &self.weights)
            .and_then(|i| self.arms.get(i))
    }
}

impl super::RoutingTable {
    /// The `shadow` block of a policy, if it has one.
    pub fn shadow_spec(&self, policy: &str) -> Option<&ShadowSpec> {
        self.records.get(policy)?.spec.shadow.as_ref()
    }

    /// The experiment arm a request to a policy is assigned to (without planning it).
    pub fn assigned_arm(&self, request: &ChatRequest) -> Option<Arc<ArmRef>> {
        let policy = self.policies.get(request.model.as_str())?;
        let (choice, _) = policy.experiment.as_ref()?.assign(request)?;
        Some(choice.arm.clone())
    }

    /// The experiment named `name` in a current policy: its arm names, control first.
    pub fn experiment_arms(&self, name: &str) -> Option<Vec<String>> {
        self.records
            .values()
            .filter_map(|r| r.spec.experiment.as_ref())
            .find(|e| e.name == name)
            .map(|e| e.arms.iter().map(|a| a.name.clone()).collect())
    }
}

/// Whether `name` is a valid experiment or arm name (the policy name rules).
fn valid_name(name: &str) -> bool {
    super::policy::valid_policy_name(name)
}

/// Checks one `provider/model` pair of a block.
fn check_target(
    ctx: &dyn PolicyContext,
    provider: &str,
    model: &str,
    field: &str,
    v: &mut Vec<FieldViolation>,
) {
    if !ctx.has_provider(provider) {
        v.push(FieldViolation::new(
            format!("{field}.provider"),
            format!("`{provider}` is not a configured provider"),
        ));
    } else if model.is_empty() {
        v.push(FieldViolation::new(
            format!("{field}.model"),
            "must not be empty",
        ));
    } else if !ctx.has_model(provider, model) {
        v.push(FieldViolation::new(
            format!("{field}.model"),
            format!("`{model}` is not enabled for provider `{provider}`"),
        ));
    }
}

/// Problems with a policy's `shadow` and `experiment` blocks, under `prefix`.
pub fn validate(spec: &PolicySpec, ctx: &dyn PolicyContext, prefix: &str) -> Vec<FieldViolation> {
    let mut v = Vec::new();
    if let Some(s) = &spec.shadow {
        let f = format!("{prefix}.shadow");
        if s.targets.is_empty() || s.targets.len() > MAX_SHADOW_TARGETS {
            v.push(FieldViolation::new(
                format!("{f}.targets"),
                format!("must hold 1 to {MAX_SHADOW_TARGETS} targets"),
            ));
        }
        for (i, t) in s.targets.iter().enumerate() {
            check_target(
                ctx,
                &t.provider,
                &t.model,
                &format!("{f}.targets[{i}]"),
                &mut v,
            );
        }
        if !(s.sample > 0.0 && s.sample <= 1.0) {
            v.push(FieldViolation::new(
                format!("{f}.sample"),
                "must be greater than 0 and at most 1",
            ));
        }
        if s.max_concurrency.is_some_and(|n| !(1..=256).contains(&n)) {
            v.push(FieldViolation::new(
                format!("{f}.max_concurrency"),
                "must be 1 to 256",
            ));
        }
        if s.max_queue.is_some_and(|n| n > 4096) {
            v.push(FieldViolation::new(
                format!("{f}.max_queue"),
                "must be at most 4096",
            ));
        }
        if s.rate_per_second
            .is_some_and(|r| !(r.is_finite() && r > 0.0))
        {
            v.push(FieldViolation::new(
                format!("{f}.rate_per_second"),
                "must be greater than 0",
            ));
        }
        if s.max_usd_per_day
            .is_some_and(|d| !(d.is_finite() && d > 0.0))
        {
            v.push(FieldViolation::new(
                format!("{f}.max_usd_per_day"),
                "must be greater than 0",
            ));
        }
        if s.timeout.is_some_and(|t| t.is_zero()) {
            v.push(FieldViolation::new(
                format!("{f}.timeout"),
                "must be greater than zero",
            ));
        }
    }
    if let Some(e) = &spec.experiment {
        let f = format!("{prefix}.experiment");
        if !valid_name(&e.name) {
            v.push(FieldViolation::new(
                format!("{f}.name"),
                "must be 1 to 63 lowercase letters, digits, `.`, `_` or `-`, starting with a letter",
            ));
        }
        if e.arms.len() < 2 || e.arms.len() > MAX_ARMS {
            v.push(FieldViolation::new(
                format!("{f}.arms"),
                format!("must hold 2 to {MAX_ARMS} arms"),
            ));
        }
        if !e.arms.is_empty() && e.arms.iter().all(|a| a.weight == 0) {
            v.push(FieldViolation::new(
                format!("{f}.arms"),
                "at least one arm needs a weight above 0",
            ));
        }
        if let Some(key) = &e.sticky_by
            && parse_sticky_key(key).is_none()
        {
            v.push(FieldViolation::new(
                format!("{f}.sticky_by"),
                format!("`{key}` is not `user` or `tag:NAME`"),
            ));
        }
        for (i, arm) in e.arms.iter().enumerate() {
            let af = format!("{f}.arms[{i}]");
            if !valid_name(&arm.name) {
                v.push(FieldViolation::new(
                    format!("{af}.name"),
                    "must be 1 to 63 lowercase letters, digits, `.`, `_` or `-`, starting with a letter",
                ));
            } else if e.arms[..i].iter().any(|o| o.name == arm.name) {
                v.push(FieldViolation::new(
                    format!("{af}.name"),
                    format!("duplicate arm `{}`", arm.name),
                ));
            }
            if arm.targets.len() > super::policy::MAX_TARGETS {
                v.push(FieldViolation::new(
                    format!("{af}.targets"),
                    format!("at most {} targets are allowed", super::policy::MAX_TARGETS),
                ));
            }
            for (j, t) in arm.targets.iter().enumerate() {
                check_target(
                    ctx,
                    &t.provider,
                    &t.model,
                    &format!("{af}.targets[{j}]"),
                    &mut v,
                );
            }
            if arm.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
                v.push(FieldViolation::new(
                    format!("{af}.temperature"),
                    "must be between 0 and 2",
                ));
            }
            if arm.max_tokens == Some(0) {
                v.push(FieldViolation::new(
                    format!("{af}.max_tokens"),
                    "must be greater than 0",
                ));
            }
            if arm.tags.len() > 16
                || arm
                    .tags
                    .iter()
                    .any(|(k, val)| k.is_empty() || k.len() > 64 || val.len() > 256)
            {
                v.push(FieldViolation::new(
                    format!("{af}.tags"),
                    "at most 16 tags, names of 1 to 64 bytes, values of at most 256",
                ));
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ctx;
    impl PolicyContext for Ctx {
        fn has_provider(&self, p: &str) -> bool {
            p == "mock"
        }
        fn has_model(&self, _p: &str, _m: &str) -> bool {
            true
        }
        fn prices(&self, _p: &str, _m: &str) -> Option<(f64, f64)> {
            None
        }
    }

    fn spec() -> PolicySpec {
        PolicySpec {
            name: "p".into(),
            description: String::new(),
            targets: Vec::new(),
            strategy: Default::default(),
            sticky_key: None,
            constraints: Default::default(),
            execution: Default::default(),
            variants: Vec::new(),
            guardrails: None,
            cache: Default::default(),
            shadow: None,
            experiment: None,
        }
    }

    fn fields(spec: &PolicySpec) -> Vec<String> {
        validate(spec, &Ctx, "policy")
            .into_iter()
            .map(|v| v.field)
            .collect()
    }

    #[test]
    fn bad_blocks_name_their_fields() {
        let spec = PolicySpec {
            shadow: Some(ShadowSpec {
                targets: vec![ShadowTarget {
                    provider: "nope".into(),
                    model: "m".into(),
                }],
                sample: 1.5,
                max_concurrency: Some(0),
                ..ShadowSpec::default()
            }),
            experiment: Some(ExperimentSpec {
                name: "Bad Name".into(),
                arms: vec![
                    ArmSpec {
                        name: "a".into(),
                        ..ArmSpec::default()
                    },
                    ArmSpec {
                        name: "a".into(),
                        temperature: Some(3.0),
                        ..ArmSpec::default()
                    },
                ],
                sticky_by: Some("device".into()),
            }),
            ..spec()
        };
        assert_eq!(
            fields(&spec),
            [
                "policy.shadow.targets[0].provider",
                "policy.shadow.sample",
                "policy.shadow.max_concurrency",
                "policy.experiment.name",
                "policy.experiment.arms",
                "policy.experiment.sticky_by",
                "policy.experiment.arms[1].name",
                "policy.experiment.arms[1].temperature",
            ]
        );
    }

    #[test]
    fn an_arm_sets_parameters_and_tags() {
        let arm = ArmSpec {
            name: "b".into(),
            weight: 1,
            temperature: Some(0.2),
            max_tokens: Some(64),
            tags: BTreeMap::from([("prompt_version".into(), "v2".into())]),
            ..ArmSpec::default()
        };
        let choice = ArmChoice::new("exp", &arm);
        let mut req = ChatRequest {
            model: "p".into(),
            messages: Vec::new(),
            params: Default::default(),
            tools: Vec::new(),
            tool_choice: None,
            response_format: None,
            tags: BTreeMap::from([("prompt_version".into(), "v1".into())]),
            user: None,
        };
        choice.apply(&mut req);
        assert_eq!(req.params.temperature, Some(0.2));
        assert_eq!(req.params.max_tokens, Some(64));
        assert_eq!(req.tags["prompt_version"], "v2");
        assert_eq!(choice.arm.experiment, "exp");
    }
}
