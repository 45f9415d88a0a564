//! Routing: turns the `model` a caller named into a [`Plan`], the ordered list of targets the
//! executor tries, and explains that decision (ExplainRoute).
//!
//! A concrete `provider/model` is a one-target plan. A policy name picks the policy's targets
//! (or a variant's, by request tags), drops those that break its constraints (fail closed:
//! none left is FAILED_PRECONDITION), orders them by the strategy, and sets aside those whose
//! circuit is open or that rest after a rate limit (all set aside is UNAVAILABLE).
//!
//! The table is an immutable snapshot held in a [`Router`]: an admin change builds a new
//! table and swaps it in atomically; calls in flight keep the plan they started with.

pub mod experiment;
pub mod policy;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::time::Instant;

use self::policy::{
    ExecutionSettings, PolicyContext, PolicySpec, StickyKey, StrategyKind, TargetSpec,
    check_constraints, parse_sticky_key,
};
use crate::{
    error::GatewayError,
    health::{Admission, HealthRegistry, TargetHealth},
    models::{ModelInfo, ModelRegistry},
    providers::{Provider, ProviderRegistry},
    telemetry::{PolicyCounters, TargetMetrics},
    types::{ChatRequest, ContentPart, PolicyRevision, RolloutArm},
};

/// One routable target: a provider and a model there.
#[derive(Clone)]
pub struct Target {
    /// The provider.
    pub provider: Arc<dyn Provider>,
    /// The model name at the provider.
    pub model: Arc<str>,
    /// What the registry knows about the model (prices, context window).
    pub info: Option<Arc<ModelInfo>>,
    /// Its health.
    pub health: Arc<TargetHealth>,
    /// Its metric handles (and its names as `Arc<str>`), made with the routing snapshot.
    pub metrics: Arc<TargetMetrics>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.provider.name(), self.model)
    }
}

/// A target set aside by health, recorded in the route as skipped.
#[derive(Debug, Clone)]
pub struct Skipped {
    /// The target.
    pub target: Target,
    /// The reason code, e.g. `CIRCUIT_OPEN`.
    pub reason: &'static str,
    /// It came before every target of the plan: it would have been the primary.
    pub first: bool,
}

/// The ordered targets for one call.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The policy that produced the plan, if any.
    pub policy: Option<Arc<str>>,
    /// Targets in the order to try them: the first is the primary.
    pub targets: Vec<Target>,
    /// Targets set aside by health.
    pub skipped: Vec<Skipped>,
    /// How to run the call.
    pub execution: Arc<ExecutionSettings>,
    /// The policy's hedge, fallback and deadline-skip counters.
    pub counters: Arc<PolicyCounters>,
    /// The experiment arm the call was assigned to, when its policy runs an experiment.
    pub arm: Option<Arc<experiment::ArmChoice>>,
    /// The policy version that made the plan, and its side of a rollout.
    pub revision: Option<PolicyRevision>,
    /// During a rollout: who hears how the call ended.
    pub observer: Option<Arc<dyn RolloutObserver>>,
}

/// Hears how each call of a policy under rollout ended (the rollout module's sequential
/// test implements it).
pub trait RolloutObserver: Send + Sync {
    /// A call on `arm` ended: `failed` for a failure of the version (not of the caller),
    /// after `latency`.
    fn observe(&self, arm: RolloutArm, failed: bool, latency: Duration);
}

impl std::fmt::Debug for dyn RolloutObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RolloutObserver")
    }
}

/// A staged rollout of a policy, as the routing snapshot needs it: the old version and
/// the new version's share of calls (the policy's record is the new version).
#[derive(Clone)]
pub struct RolloutSplit {
    /// The old version.
    pub baseline: PolicyRecord,
    /// The new version's share, in millionths of the calls; the rollout changes it in
    /// place (a step, a rollback) without a new snapshot.
    pub share_ppm: Arc<std::sync::atomic::AtomicU32>,
    /// What picks the version of a call: `user` or `tag:NAME`; none: the request id.
    pub sticky: Option<String>,
    /// Hears each call's outcome.
    pub observer: Arc<dyn RolloutObserver>,
}

struct CompiledSplit {
    baseline: Arc<CompiledPolicy>,
    share_ppm: Arc<std::sync::atomic::AtomicU32>,
    sticky: Option<StickyKey>,
    observer: Arc<dyn RolloutObserver>,
}

/// Where a policy comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicySource {
    /// The config file (read-only through the API).
    Config,
    /// The Admin API (stored).
    Api,
}

/// A policy with its metadata, as stored or configured.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyRecord {
    /// The policy.
    pub spec: PolicySpec,
    /// Version, incremented on every change (the etag is derived from it).
    pub version: u64,
    /// Creation time, Unix milliseconds.
    pub created_ms: i64,
    /// Last change, Unix milliseconds.
    pub updated_ms: i64,
    /// Origin.
    pub source: PolicySource,
}

impl PolicyRecord {
    /// The etag callers send back on update.
    pub fn etag(&self) -> String {
        format!("v{}", self.version)
    }
}

struct CompiledTarget {
    spec: TargetSpec,
    /// `None` when the provider is not configured (any more).
    target: Option<Target>,
}

struct CompiledPolicy {
    name: Arc<str>,
    version: u64,
    spec: PolicySpec,
    sticky: Option<StickyKey>,
    targets: Vec<CompiledTarget>,
    variants: Vec<(BTreeMap<String, String>, Vec<CompiledTarget>)>,
    execution: Arc<ExecutionSettings>,
    counters: Arc<PolicyCounters>,
    experiment: Option<experiment::CompiledExperiment<CompiledTarget>>,
}

#[derive(Clone)]
struct ProviderEntry {
    provider: Arc<dyn Provider>,
    /// When set, only these models are routable.
    allowed_models: Option<Vec<String>>,
}

/// An immutable snapshot of everything routing needs.
#[derive(Clone)]
pub struct RoutingTable {
    providers: BTreeMap<String, ProviderEntry>,
    registry: ModelRegistry,
    infos: HashMap<String, HashMap<String, Arc<ModelInfo>>>,
    health: Arc<HealthRegistry>,
    policies: HashMap<String, Arc<CompiledPolicy>>,
    records: BTreeMap<String, PolicyRecord>,
    default_execution: Arc<ExecutionSettings>,
    /// The configured guardrail profiles' names (policies may name only these).
    guardrails: Arc<std::collections::BTreeSet<String>>,
    /// The counters of plans of concrete models (no policy).
    default_counters: Arc<PolicyCounters>,
    /// Staged rollouts by policy name.
    rollouts: HashMap<String, Arc<CompiledSplit>>,
    /// One-target plan templates of the known concrete models (`provider/model` of every
    /// provider's allowlist, or its kind's registry models and the config's `[[models]]`),
    /// made once per provider set: a call naming one clones its target instead of resolving it.
    concrete: Arc<HashMap<String, ConcreteTarget>>,
}

/// A concrete model's target, resolved once; its health is looked up on first use, so that
/// models nobody calls create no health state.
struct ConcreteTarget {
    provider: Arc<dyn Provider>,
    model: Arc<str>,
    info: Option<Arc<ModelInfo>>,
    health: std::sync::OnceLock<Arc<TargetHealth>>,
    metrics: Arc<TargetMetrics>,
}

/// One candidate of an explained route.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Provider name.
    pub provider: String,
    /// Model.
    pub model: String,
    /// In the plan?
    pub chosen: bool,
    /// Why.
    pub reason: String,
    /// Estimated cost of the request.
    pub estimated_cost_usd: Option<f64>,
    /// Observed median latency.
    pub latency_p50: Option<Duration>,
    /// Observed median time to first token.
    pub ttft_p50: Option<Duration>,
    /// For a chosen target after the first: what the attempt before it leaves free for it
    /// (deadline-aware fallback, for `Chat`; at least `executor.min_attempt_time`).
    pub reserve: Option<Duration>,
}

/// An explained route.
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    /// The policy, if any.
    pub policy: Option<String>,
    /// The variant used.
    pub variant: Option<usize>,
    /// The strategy.
    pub strategy: StrategyKind,
    /// Chosen candidates in order, then excluded ones.
    pub candidates: Vec<Candidate>,
    /// When no target is left: the ErrorInfo reason a call would fail with
    /// (`CONSTRAINT_UNSATISFIED`, `CIRCUIT_OPEN`, `RATE_LIMITED`).
    pub unroutable: Option<&'static str>,
}

/// Estimated (input, output) tokens of a request, for cost ranking.
pub fn estimate_tokens(request: &ChatRequest) -> (u64, u64) {
    let mut chars = 0usize;
    for m in &request.messages {
        chars += 16;
        for part in &m.content {
            chars += match part {
                ContentPart::Text(t) => t.len(),
                ContentPart::ToolCall(c) => c.name.len() + c.arguments.len(),
                ContentPart::ToolResult(r) => r.content.len(),
                // A typical image costs on the order of a thousand tokens.
                ContentPart::Image(_) => 4000,
            };
        }
    }
    let input = (chars / 4).max(1) as u64;
    let output = u64::from(request.params.max_tokens.unwrap_or(256));
    (input, output)
}

/// FNV-1a: a stable hash for sticky assignment (the same across restarts and replicas).
fn stable_hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain(std::iter::once(0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn not_found(model: &str) -> GatewayError {
    GatewayError::NotFound {
        reason: "MODEL_NOT_FOUND",
        message: format!(
            "unknown model or policy `{model}`; name a `provider/model` or a policy (see ListModels)"
        ),
    }
}

impl RoutingTable {
    /// A table over `providers` with `registry` for model facts and `health` for target
    /// health. `allowed_models` gives the allowlist of each provider that has one.
    pub fn new(
        providers: &ProviderRegistry,
        registry: ModelRegistry,
        allowed_models: &dyn Fn(&str) -> Option<Vec<String>>,
        health: Arc<HealthRegistry>,
    ) -> Self {
        let mut table = RoutingTable {
            providers: BTreeMap::new(),
            registry,
            infos: HashMap::new(),
            health,
            policies: HashMap::new(),
            records: BTreeMap::new(),
            default_execution: Arc::new(ExecutionSettings::default()),
            guardrails: Arc::default(),
            default_counters: Arc::new(PolicyCounters::new("")),
            concrete: Arc::default(),
            rollouts: HashMap::new(),
        };
        for provider in providers.iter() {
            let name = provider.name().to_owned();
            let allowed = allowed_models(&name);
            let models: Vec<String> = match &allowed {
                Some(list) => list.clone(),
                None => table
                    .registry
                    .models_of(provider.kind())
                    .iter()
                    .map(|m| m.model.clone())
                    .collect(),
            };
            for model in models {
                if let Some(info) = table.registry.get(provider.kind(), &model) {
                    let info = Arc::new(info.clone());
                    table
                        .infos
                        .entry(name.clone())
                        .or_default()
                        .insert(model, info);
                }
            }
            table.providers.insert(
                name,
                ProviderEntry {
                    provider: provider.clone(),
                    allowed_models: allowed,
                },
            );
        }
        table.build_concrete();
        table
    }

    /// The guardrail profiles policies may name.
    pub fn set_guardrails(&mut self, names: impl IntoIterator<Item = String>) {
        self.guardrails = Arc::new(names.into_iter().collect());
    }

    /// Resolves the one-target templates of every listed concrete model.
    fn build_concrete(&mut self) {
        let mut concrete = HashMap::new();
        for (provider, model, info) in self.models() {
            let Some(entry) = self.providers.get(&provider) else {
                continue;
            };
            let model: Arc<str> = Arc::from(model.as_str());
            concrete.insert(
                format!("{provider}/{model}"),
                ConcreteTarget {
                    provider: entry.provider.clone(),
                    metrics: Arc::new(TargetMetrics::new(&provider, model.clone(), "")),
                    model,
                    info,
                    health: std::sync::OnceLock::new(),
                },
            );
        }
        self.concrete = Arc::new(concrete);
    }

    /// Overrides or adds the registry entry of `model` at provider `name`.
    pub fn set_model_info(&mut self, name: &str, info: ModelInfo) {
        self.infos
            .entry(name.to_owned())
            .or_default()
            .insert(info.model.clone(), Arc::new(info));
        self.build_concrete();
    }

    /// The registry entry of a model at a configured provider.
    pub fn model_info(&self, provider: &str, model: &str) -> Option<Arc<ModelInfo>> {
        if let Some(info) = self.infos.get(provider).and_then(|m| m.get(model)) {
            return Some(info.clone());
        }
        let entry = self.providers.get(provider)?;
        self.registry
            .get(entry.provider.kind(), model)
            .map(|info| Arc::new(info.clone()))
    }

    /// The provider called `name`.
    pub fn provider(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.providers.get(name).map(|e| &e.provider)
    }

    /// Every configured provider.
    pub fn providers(&self) -> impl Iterator<Item = &Arc<dyn Provider>> {
        self.providers.values().map(|e| &e.provider)
    }

    /// The health registry.
    pub fn health(&self) -> &Arc<HealthRegistry> {
        &self.health
    }

    /// Whether `name` is a policy.
    pub fn is_policy(&self, name: &str) -> bool {
        self.policies.contains_key(name)
    }

    /// The policies with their metadata, sorted by name.
    pub fn policies(&self) -> &BTreeMap<String, PolicyRecord> {
        &self.records
    }

    /// Every routable concrete model: `(provider name, model, info)`, sorted. A provider
    /// with an allowlist routes exactly those; one without routes any name, and lists the
    /// registry's models of its kind plus those the config's `[[models]]` add or price.
    pub fn models(&self) -> Vec<(String, String, Option<Arc<ModelInfo>>)> {
        let mut out = Vec::new();
        for (name, entry) in &self.providers {
            let models: Vec<String> = match &entry.allowed_models {
                Some(list) => list.clone(),
                None => self
                    .registry
                    .models_of(entry.provider.kind())
                    .iter()
                    .map(|m| m.model.clone())
                    .chain(
                        self.infos
                            .get(name)
                            .into_iter()
                            .flat_map(|m| m.keys().cloned()),
                    )
                    .collect(),
            };
            for model in models {
                let info = self.model_info(name, &model);
                out.push((name.clone(), model, info));
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        out
    }

    /// The target `provider/model` as routed by `policy` (empty for none).
    fn resolve(&self, provider: &str, model: &str, policy: &str) -> Option<Target> {
        let entry = self.providers.get(provider)?;
        let model: Arc<str> = Arc::from(model);
        Some(Target {
            provider: entry.provider.clone(),
            info: self.model_info(provider, &model),
            health: self.health.get(provider, &model),
            metrics: Arc::new(TargetMetrics::new(provider, model.clone(), policy)),
            model,
        })
    }

    /// A table with the given policies (replacing the current ones). Targets of providers
    /// that are not configured stay in the policy and are excluded at call time.
    pub fn with_policies(&self, records: impl IntoIterator<Item = PolicyRecord>) -> RoutingTable {
        let mut table = self.clone();
        table.policies.clear();
        table.records.clear();
        table.rollouts.clear();
        for record in records {
            let compiled = self.compile(&record);
            table
                .policies
                .insert(record.spec.name.clone(), Arc::new(compiled));
            table.records.insert(record.spec.name.clone(), record);
        }
        table
    }

    /// The table with these staged rollouts (replacing the current ones); a split whose
    /// policy is not in the table is left out.
    pub fn with_rollouts(mut self, splits: impl IntoIterator<Item = RolloutSplit>) -> RoutingTable {
        self.rollouts.clear();
        for split in splits {
            let name = split.baseline.spec.name.clone();
            if !self.policies.contains_key(&name) {
                continue;
            }
            let compiled = CompiledSplit {
                baseline: Arc::new(self.compile(&split.baseline)),
                share_ppm: split.share_ppm,
                sticky: split.sticky.as_deref().and_then(parse_sticky_key),
                observer: split.observer,
            };
            self.rollouts.insert(name, Arc::new(compiled));
        }
        self
    }

    fn compile(&self, record: &PolicyRecord) -> CompiledPolicy {
        let spec = &record.spec;
        let compile = |targets: &[TargetSpec]| -> Vec<CompiledTarget> {
            targets
                .iter()
                .map(|t| CompiledTarget {
                    spec: t.clone(),
                    target: self.resolve(&t.provider, &t.model, &spec.name),
                })
                .collect()
        };
        CompiledPolicy {
            name: Arc::from(spec.name.as_str()),
            version: record.version,
            sticky: spec.sticky_key.as_deref().and_then(parse_sticky_key),
            targets: compile(&spec.targets),
            variants: spec
                .variants
                .iter()
                .map(|v| (v.match_tags.clone(), compile(&v.targets)))
                .collect(),
            execution: Arc::new(spec.execution.resolve()),
            counters: Arc::new(PolicyCounters::new(&spec.name)),
            experiment: spec
                .experiment
                .as_ref()
                .map(|e| experiment::CompiledExperiment::new(e, compile)),
            spec: spec.clone(),
        }
    }

    /// Like [`RoutingTable::plan`] for the call `request_id`: during a staged rollout of
    /// the policy, the call's version is picked by a stable hash of its sticky value (the
    /// rollout's `sticky_key`) or else of `request_id` (random when empty), against the
    /// new version's share. A key below the share stays on the new version as the share
    /// grows.
    pub fn plan_call(&self, request: &ChatRequest, request_id: &str) -> Result<Plan, GatewayError> {
        let model = request.model.as_str();
        let (Some(split), Some(policy)) = (self.rollouts.get(model), self.policies.get(model))
        else {
            return self.plan(request);
        };
        let share = split.share_ppm.load(std::sync::atomic::Ordering::Relaxed);
        let sticky = match &split.sticky {
            Some(StickyKey::User) => request.user.as_deref(),
            Some(StickyKey::Tag(tag)) => request.tags.get(tag).map(String::as_str),
            None => None,
        };
        let point = match sticky.filter(|v| !v.is_empty()).or(Some(request_id)) {
            Some(key) if !key.is_empty() => stable_hash(&["rollout", model, key]) % 1_000_000,
            _ => fastrand::u64(..1_000_000),
        };
        let (compiled, arm) = if point < u64::from(share) {
            (&**policy, RolloutArm::Canary)
        } else {
            (&*split.baseline, RolloutArm::Baseline)
        };
        let (mut plan, _) = self.rank(compiled, request, false)?;
        plan.revision = Some(PolicyRevision {
            version: u32::try_from(compiled.version).unwrap_or(u32::MAX),
            arm,
        });
        plan.observer = Some(split.observer.clone());
        Ok(plan)
    }

    /// Resolves the caller's request into a plan.
    pub fn plan(&self, request: &ChatRequest) -> Result<Plan, GatewayError> {
        let model = request.model.as_str();
        if let Some(policy) = self.policies.get(model) {
            let (ranked, _) = self.rank(policy, request, false)?;
            return Ok(ranked);
        }
        if let Some(t) = self.concrete.get(model) {
            let target = Target {
                provider: t.provider.clone(),
                model: t.model.clone(),
                info: t.info.clone(),
                health: t
                    .health
                    .get_or_init(|| self.health.get(t.provider.name(), &t.model))
                    .clone(),
                metrics: t.metrics.clone(),
            };
            return self.concrete_plan(target);
        }
        let Some((provider_name, model_name)) = model.split_once('/') else {
            return Err(not_found(model));
        };
        let entry = self
            .providers
            .get(provider_name)
            .ok_or_else(|| GatewayError::NotFound {
                reason: "PROVIDER_NOT_FOUND",
                message: format!(
                    "unknown provider `{provider_name}` in model `{model}`; configured providers: {}",
                    self.providers.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            })?;
        if let Some(allowed) = &entry.allowed_models
            && !allowed.iter().any(|m| m == model_name)
        {
            return Err(GatewayError::NotFound {
                reason: "MODEL_NOT_FOUND",
                message: format!(
                    "model `{model_name}` is not enabled for provider `{provider_name}`"
                ),
            });
        }
        let target = self
            .resolve(provider_name, model_name, "")
            .ok_or_else(|| not_found(model))?;
        self.concrete_plan(target)
    }

    /// The one-target plan of a concrete model, unless its target rests.
    fn concrete_plan(&self, target: Target) -> Result<Plan, GatewayError> {
        let mut plan = Plan {
            policy: None,
            targets: Vec::with_capacity(1),
            skipped: Vec::new(),
            execution: self.default_execution.clone(),
            counters: self.default_counters.clone(),
            revision: None,
            observer: None,
            arm: None,
        };
        match target.health.peek(Instant::now()) {
            Admission::Allowed | Admission::Probe => plan.targets.push(target),
            admission => {
                return Err(all_resting(&[(target, admission)]));
            }
        }
        Ok(plan)
    }

    /// Explains how a request would be routed.
    pub fn explain(&self, request: &ChatRequest) -> Result<Explanation, GatewayError> {
        let Some(policy) = self.policies.get(request.model.as_str()) else {
            // A concrete model: one candidate.
            let plan = self.plan(request)?;
            let (input, output) = estimate_tokens(request);
            let candidates = plan
                .targets
                .iter()
                .map(|t| candidate(t, true, "the requested model".to_owned(), input, output))
                .collect();
            return Ok(Explanation {
                policy: None,
                variant: None,
                strategy: StrategyKind::Priority,
                candidates,
                unroutable: None,
            });
        };
        let (_, explanation) = self.rank(policy, request, true)?;
        explanation.ok_or_else(|| GatewayError::Internal("no explanation was built".to_owned()))
    }

    /// Orders a policy's targets for a request. With `explain`, also says why.
    fn rank(
        &self,
        policy: &CompiledPolicy,
        request: &ChatRequest,
        explain: bool,
    ) -> Result<(Plan, Option<Explanation>), GatewayError> {
        let variant = policy
            .variants
            .iter()
            .position(|(tags, _)| tags.iter().all(|(k, v)| request.tags.get(k) == Some(v)));
        let arm = policy.experiment.as_ref().and_then(|e| e.assign(request));
        let targets = match (arm, variant) {
            (Some((_, own)), _) if !own.is_empty() => own,
            (_, Some(i)) => &policy.variants[i].1,
            (_, None) => &policy.targets,
        };
        let arm = arm.map(|(choice, _)| choice.clone());
        let (input_tokens, output_tokens) = estimate_tokens(request);
        let mut excluded: Vec<Candidate> = Vec::new();
        // Constraints: fail closed.
        let mut eligible: Vec<(usize, &CompiledTarget, &Target)> =
            Vec::with_capacity(targets.len());
        let mut broken: Vec<String> = Vec::new();
        for (i, ct) in targets.iter().enumerate() {
            let Some(target) = &ct.target else {
                let reason = format!("provider `{}` is not configured", ct.spec.provider);
                if explain {
                    excluded.push(excluded_candidate(&ct.spec, reason.clone()));
                }
                broken.push(format!("{}/{}: {reason}", ct.spec.provider, ct.spec.model));
                continue;
            };
            let prices = target
                .info
                .as_ref()
                .and_then(|i| i.prices)
                .map(|p| (p.input, p.output));
            match check_constraints(&policy.spec.constraints, &ct.spec, prices) {
                Ok(()) => eligible.push((i, ct, target)),
                Err(reason) => {
                    if explain {
                        excluded.push(candidate(
                            target,
                            false,
                            reason.clone(),
                            input_tokens,
                            output_tokens,
                        ));
                    }
                    broken.push(format!("{}/{}: {reason}", ct.spec.provider, ct.spec.model));
                }
            }
        }
        if eligible.is_empty() {
            if explain {
                // The plan is empty; say why, target by target, rather than fail.
                return Ok((
                    Plan {
                        policy: Some(policy.name.clone()),
                        targets: Vec::new(),
                        skipped: Vec::new(),
                        execution: policy.execution.clone(),
                        counters: policy.counters.clone(),
                        revision: None,
                        observer: None,
                        arm,
                    },
                    Some(Explanation {
                        policy: Some(policy.name.to_string()),
                        variant,
                        strategy: policy.spec.strategy,
                        candidates: excluded,
                        unroutable: Some("CONSTRAINT_UNSATISFIED"),
                    }),
                ));
            }
            return Err(GatewayError::FailedPrecondition {
                reason: "CONSTRAINT_UNSATISFIED",
                message: format!(
                    "no target of policy `{}` meets its constraints: {}",
                    policy.name,
                    broken.join("; ")
                ),
            });
        }

        // Order by strategy.
        let mut reasons: HashMap<usize, String> = HashMap::new();
        match policy.spec.strategy {
            StrategyKind::Priority => {
                eligible.sort_by_key(|(i, ct, _)| (ct.spec.priority, *i));
                if explain {
                    for (i, ct, _) in &eligible {
                        reasons.insert(*i, format!("priority {}", ct.spec.priority));
                    }
                }
            }
            StrategyKind::Weighted => {
                let total: u64 = eligible
                    .iter()
                    .map(|(_, ct, _)| u64::from(ct.spec.weight))
                    .sum();
                eligible.sort_by(|a, b| b.1.spec.weight.cmp(&a.1.spec.weight).then(a.0.cmp(&b.0)));
                if total > 0 {
                    let sticky_value = match &policy.sticky {
                        Some(StickyKey::User) => request.user.as_deref(),
                        Some(StickyKey::Tag(tag)) => request.tags.get(tag).map(String::as_str),
                        None => None,
                    };
                    let point = match sticky_value {
                        Some(v) => stable_hash(&[&policy.name, v]) % total,
                        None => fastrand::u64(..total),
                    };
                    let mut acc = 0u64;
                    // Walk in list order so a sticky point maps to a stable arm.
                    let mut by_list = eligible.clone();
                    by_list.sort_by_key(|(i, _, _)| *i);
                    let pick = by_list.iter().find(|(_, ct, _)| {
                        acc += u64::from(ct.spec.weight);
                        point < acc
                    });
                    if let Some((pick_i, _, _)) = pick {
                        let pos = eligible
                            .iter()
                            .position(|(i, _, _)| i == pick_i)
                            .unwrap_or(0);
                        let picked = eligible.remove(pos);
                        eligible.insert(0, picked);
                    }
                }
                if explain {
                    for (i, ct, _) in &eligible {
                        reasons.insert(*i, format!("weight {} of {total}", ct.spec.weight));
                    }
                }
            }
            StrategyKind::LowestLatency => {
                // Targets without samples first, so they get measured.
                let mut keyed: Vec<_> = eligible
                    .into_iter()
                    .map(|e| (e.2.health.typical_latency(), e))
                    .collect();
                keyed.sort_by(|a, b| match (a.0, b.0) {
                    (None, None) => a.1.0.cmp(&b.1.0),
                    (None, Some(_)) => std::cmp::Ordering::Less,
                    (Some(_), None) => std::cmp::Ordering::Greater,
                    (Some(x), Some(y)) => x.cmp(&y).then(a.1.0.cmp(&b.1.0)),
                });
                if explain {
                    for (lat, (i, _, _)) in &keyed {
                        reasons.insert(
                            *i,
                            match lat {
                                Some(l) => format!("observed latency {}ms", l.as_millis()),
                                None => "no latency samples yet".to_owned(),
                            },
                        );
                    }
                }
                eligible = keyed.into_iter().map(|(_, e)| e).collect();
            }
            StrategyKind::LowestCost => {
                let mut keyed: Vec<_> = eligible
                    .into_iter()
                    .map(|e| (estimated_cost(e.2, input_tokens, output_tokens), e))
                    .collect();
                keyed.sort_by(|a, b| {
                    let x = a.0.unwrap_or(f64::INFINITY);
                    let y = b.0.unwrap_or(f64::INFINITY);
                    x.total_cmp(&y).then(a.1.0.cmp(&b.1.0))
                });
                if explain {
                    for (cost, (i, _, _)) in &keyed {
                        reasons.insert(
                            *i,
                            match cost {
                                Some(c) => format!("estimated cost ${c:.6}"),
                                None => "no known price".to_owned(),
                            },
                        );
                    }
                }
                eligible = keyed.into_iter().map(|(_, e)| e).collect();
            }
            StrategyKind::MostReliable => {
                let mut keyed: Vec<_> = eligible
                    .into_iter()
                    .map(|e| (e.2.health.success_rate(), e))
                    .collect();
                keyed.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.0.cmp(&b.1.0)));
                if explain {
                    for (rate, (i, _, _)) in &keyed {
                        reasons.insert(*i, format!("success rate {:.1}%", rate * 100.0));
                    }
                }
                eligible = keyed.into_iter().map(|(_, e)| e).collect();
            }
        }

        // Health: set aside open circuits and resting targets.
        let now = Instant::now();
        let mut plan = Plan {
            policy: Some(policy.name.clone()),
            targets: Vec::with_capacity(eligible.len()),
            skipped: Vec::new(),
            execution: policy.execution.clone(),
            counters: policy.counters.clone(),
            revision: Some(PolicyRevision {
                version: u32::try_from(policy.version).unwrap_or(u32::MAX),
                arm: RolloutArm::None,
            }),
            observer: None,
            arm,
        };
        let mut resting = Vec::new();
        let mut chosen = Vec::new();
        for (i, _, target) in eligible {
            let admission = target.health.peek(now);
            if admission.is_allowed() {
                if explain {
                    let mut reason = reasons.remove(&i).unwrap_or_default();
                    let mut c = candidate(target, true, String::new(), input_tokens, output_tokens);
                    if !plan.targets.is_empty()
                        && let Some(r) = policy.execution.reserve
                    {
                        let (need, observed) = reserve_for(target, r);
                        c.reserve = Some(need);
                        reason.push_str(&format!(
                            "; the attempt before it ends {}ms before the deadline to leave it time ({})",
                            need.as_millis(),
                            if observed {
                                format!("its observed p{} latency", r.percentile)
                            } else {
                                "the default while it has too few samples".to_owned()
                            }
                        ));
                    }
                    c.reason = reason;
                    chosen.push(c);
                }
                plan.targets.push(target.clone());
            } else {
                let code = match admission {
                    Admission::CoolingDown(_) => "COOLING_DOWN",
                    _ => "CIRCUIT_OPEN",
                };
                if explain {
                    let reason = match admission {
                        Admission::CoolingDown(until) => format!(
                            "resting after a rate limit for {}ms",
                            until.saturating_duration_since(now).as_millis()
                        ),
                        _ => "circuit open".to_owned(),
                    };
                    excluded.push(candidate(
                        target,
                        false,
                        reason,
                        input_tokens,
                        output_tokens,
                    ));
                }
                plan.skipped.push(Skipped {
                    target: target.clone(),
                    reason: code,
                    first: plan.targets.is_empty(),
                });
                resting.push((target.clone(), admission));
            }
        }
        if plan.targets.is_empty() && !explain {
            return Err(all_resting(&resting));
        }
        let explanation = explain.then(|| {
            let unroutable = plan
                .targets
                .is_empty()
                .then(|| match all_resting(&resting) {
                    GatewayError::Unavailable { reason, .. } => reason,
                    _ => "CIRCUIT_OPEN",
                });
            chosen.extend(excluded);
            Explanation {
                policy: Some(policy.name.to_string()),
                variant,
                strategy: policy.spec.strategy,
                candidates: chosen,
                unroutable,
            }
        });
        Ok((plan, explanation))
    }
}

/// UNAVAILABLE when every target is resting; RetryInfo says when the first comes back.
fn all_resting(resting: &[(Target, Admission)]) -> GatewayError {
    let now = Instant::now();
    let retry_after = resting
        .iter()
        .filter_map(|(_, a)| match a {
            Admission::CoolingDown(until) => Some(until.saturating_duration_since(now)),
            _ => None,
        })
        .min();
    let all_cooling = resting
        .iter()
        .all(|(_, a)| matches!(a, Admission::CoolingDown(_)));
    GatewayError::Unavailable {
        reason: if all_cooling {
            "RATE_LIMITED"
        } else {
            "CIRCUIT_OPEN"
        },
        message: format!(
            "every target is unavailable (circuit open or resting after a rate limit): {}",
            resting
                .iter()
                .map(|(t, _)| format!("{t:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        retry_after,
    }
}

fn estimated_cost(target: &Target, input: u64, output: u64) -> Option<f64> {
    let prices = target.info.as_ref()?.prices?;
    Some((input as f64 * prices.input + output as f64 * prices.output) / 1_000_000.0)
}

fn candidate(target: &Target, chosen: bool, reason: String, input: u64, output: u64) -> Candidate {
    let snapshot = target.health.snapshot(Instant::now());
    Candidate {
        provider: target.provider.name().to_owned(),
        model: target.model.to_string(),
        chosen,
        reason,
        estimated_cost_usd: estimated_cost(target, input, output),
        latency_p50: snapshot.latency_p50,
        ttft_p50: snapshot.ttft_p50,
        reserve: None,
    }
}

/// What an attempt leaves free for `target` when it could follow (the executor's rule for
/// `Chat`, before its `min_attempt_time` floor), and whether it comes from observations.
fn reserve_for(target: &Target, reserve: policy::Reserve) -> (Duration, bool) {
    let observed = target
        .health
        .latency_percentile(reserve.percentile, crate::health::MIN_SAMPLES);
    let median = target
        .health
        .latency_percentile(50.0, 1)
        .unwrap_or_default();
    (
        observed.unwrap_or(reserve.default).max(median),
        observed.is_some(),
    )
}

fn excluded_candidate(spec: &TargetSpec, reason: String) -> Candidate {
    Candidate {
        provider: spec.provider.clone(),
        model: spec.model.clone(),
        chosen: false,
        reason,
        estimated_cost_usd: None,
        latency_p50: None,
        ttft_p50: None,
        reserve: None,
    }
}

impl PolicyContext for RoutingTable {
    fn has_provider(&self, provider: &str) -> bool {
        self.providers.contains_key(provider)
    }

    fn has_model(&self, provider: &str, model: &str) -> bool {
        self.providers.get(provider).is_some_and(|e| {
            e.allowed_models
                .as_ref()
                .is_none_or(|list| list.iter().any(|m| m == model))
        })
    }

    fn prices(&self, provider: &str, model: &str) -> Option<(f64, f64)> {
        self.model_info(provider, model)
            .and_then(|i| i.prices)
            .map(|p| (p.input, p.output))
    }

    fn has_guardrails(&self, profile: &str) -> bool {
        self.guardrails.contains(profile)
    }
}

/// Holds the current routing table; swaps are atomic and cheap to read.
pub struct Router {
    table: ArcSwap<RoutingTable>,
}

impl Router {
    /// A router starting with `table`.
    pub fn new(table: RoutingTable) -> Self {
        Self {
            table: ArcSwap::from_pointee(table),
        }
    }

    /// The current table (a snapshot: later swaps do not change it).
    pub fn load(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// The current table for the length of one call, without touching its reference count
    /// (a guard; hold it briefly).
    pub fn current(&self) -> arc_swap::Guard<Arc<RoutingTable>> {
        self.table.load()
    }

    /// Swaps in a new table.
    pub fn store(&self, table: RoutingTable) {
        self.table.store(Arc::new(table));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        health::HealthSettings,
        providers::mock::Mock,
        routing::policy::{ConstraintSpec, ExecutionSpec},
        types::{Message, Role},
    };

    fn table() -> RoutingTable {
        let mut providers = ProviderRegistry::new();
        for name in ["a", "b", "c"] {
            providers.insert(Arc::new(Mock::new(name)));
        }
        RoutingTable::new(
            &providers,
            ModelRegistry::default(),
            &|_| None,
            Arc::new(HealthRegistry::new(HealthSettings::default())),
        )
    }

    /// A listed concrete model plans from its template (the same handles every call); an
    /// unlisted one of a provider without an allowlist still routes, resolved per call.
    #[test]
    fn concrete_models_plan_from_their_templates() {
        let mut providers = ProviderRegistry::new();
        providers.insert(Arc::new(Mock::new("a")));
        let health = Arc::new(HealthRegistry::new(HealthSettings::default()));
        let table = RoutingTable::new(
            &providers,
            ModelRegistry::default(),
            &|_| Some(vec!["m".to_owned()]),
            health.clone(),
        );
        assert!(health.all().is_empty(), "no health state before a call");
        let req = |model: &str| ChatRequest {
            model: model.into(),
            ..request(None)
        };
        let first = table.plan(&req("a/m")).unwrap();
        let second = table.plan(&req("a/m")).unwrap();
        let (t1, t2) = (&first.targets[0], &second.targets[0]);
        assert!(Arc::ptr_eq(&t1.metrics, &t2.metrics));
        assert!(Arc::ptr_eq(&t1.health, &t2.health));
        assert!(Arc::ptr_eq(&t1.health, &health.get("a", "m")));
        assert_eq!((&**t1.metrics.provider(), &*t1.model), ("a", "m"));
        assert!(matches!(
            table.plan(&req("a/other")),
            Err(GatewayError::NotFound { .. })
        ));

        let open = table_with(&providers, health);
        let plan = open.plan(&req("a/anything")).unwrap();
        assert_eq!(&*plan.targets[0].model, "anything");
        assert_eq!(plan.targets[0].metrics.policy(), "");
    }

    fn table_with(providers: &ProviderRegistry, health: Arc<HealthRegistry>) -> RoutingTable {
        RoutingTable::new(providers, ModelRegistry::default(), &|_| None, health)
    }

    fn target(provider: &str, weight: u32, priority: i32, region: Option<&str>) -> TargetSpec {
        TargetSpec {
            provider: provider.into(),
            model: "m".into(),
            weight,
            priority,
            region: region.map(Into::into),
            tags: vec![],
        }
    }

    fn record(spec: PolicySpec) -> PolicyRecord {
        PolicyRecord {
            spec,
            version: 1,
            created_ms: 0,
            updated_ms: 0,
            source: PolicySource::Api,
        }
    }

    fn spec(strategy: StrategyKind, targets: Vec<TargetSpec>) -> PolicySpec {
        PolicySpec {
            name: "p".into(),
            description: String::new(),
            targets,
            strategy,
            sticky_key: None,
            constraints: ConstraintSpec::default(),
            execution: ExecutionSpec::default(),
            variants: vec![],
            guardrails: None,
            shadow: None,
            experiment: None,
            cache: Default::default(),
        }
    }

    fn request(user: Option<&str>) -> ChatRequest {
        ChatRequest {
            model: "p".into(),
            messages: vec![Message::text(Role::User, "hi")],
            user: user.map(Into::into),
            ..ChatRequest::default()
        }
    }

    fn order(plan: &Plan) -> Vec<String> {
        plan.targets
            .iter()
            .map(|t| t.provider.name().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn priority_orders_by_priority_then_list() {
        let t = table().with_policies([record(spec(
            StrategyKind::Priority,
            vec![
                target("a", 0, 2, None),
                target("b", 0, 1, None),
                target("c", 0, 2, None),
            ],
        ))]);
        assert_eq!(order(&t.plan(&request(None)).unwrap()), vec!["b", "a", "c"]);
    }

    #[tokio::test]
    async fn weighted_split_is_proportional_and_sticky() {
        let t = table().with_policies([record(spec(
            StrategyKind::Weighted,
            vec![target("a", 70, 0, None), target("b", 30, 0, None)],
        ))]);
        let n = 20_000;
        let a = (0..n)
            .filter(|_| t.plan(&request(None)).unwrap().targets[0].provider.name() == "a")
            .count();
        // 70% +- 5 standard deviations (sd = sqrt(n p (1-p)) ~ 65).
        assert!((a as i64 - 14_000).abs() < 330, "a got {a} of {n}");

        let mut sticky = spec(
            StrategyKind::Weighted,
            vec![target("a", 50, 0, None), target("b", 50, 0, None)],
        );
        sticky.sticky_key = Some("user".into());
        let t = table().with_policies([record(sticky)]);
        for user in ["alice", "bob", "carol", "dave"] {
            let first = order(&t.plan(&request(Some(user))).unwrap());
            for _ in 0..20 {
                assert_eq!(order(&t.plan(&request(Some(user))).unwrap()), first);
            }
        }
    }

    #[tokio::test]
    async fn constraints_fail_closed() {
        let mut s = spec(
            StrategyKind::Priority,
            vec![target("a", 0, 0, Some("us")), target("b", 0, 0, Some("eu"))],
        );
        s.constraints.allowed_regions = vec!["eu".into()];
        let t = table().with_policies([record(s.clone())]);
        assert_eq!(order(&t.plan(&request(None)).unwrap()), vec!["b"]);
        let explanation = t.explain(&request(None)).unwrap();
        assert_eq!(explanation.candidates.len(), 2);
        assert!(explanation.candidates[1].reason.contains("region us"));

        s.constraints.allowed_regions = vec!["apac".into()];
        let t = table().with_policies([record(s)]);
        let err = t.plan(&request(None)).unwrap_err();
        assert!(
            matches!(err, GatewayError::FailedPrecondition { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("allowed_regions"), "{err}");
        // ExplainRoute still answers: every target excluded, each with its reason.
        let explanation = t.explain(&request(None)).unwrap();
        assert_eq!(explanation.unroutable, Some("CONSTRAINT_UNSATISFIED"));
        assert_eq!(explanation.candidates.len(), 2);
        assert!(explanation.candidates.iter().all(|c| !c.chosen));
        assert!(explanation.candidates[0].reason.contains("region us"));
        assert!(explanation.candidates[1].reason.contains("region eu"));
    }

    #[tokio::test(start_paused = true)]
    async fn explain_shows_every_resting_target_and_the_fallback_reserve() {
        let t = table().with_policies([record(spec(
            StrategyKind::Priority,
            vec![target("a", 0, 0, None), target("b", 0, 1, None)],
        ))]);
        // b is cold: the default reserve; the primary has none.
        let explanation = t.explain(&request(None)).unwrap();
        assert_eq!(explanation.unroutable, None);
        assert_eq!(explanation.candidates[0].reserve, None);
        assert_eq!(
            explanation.candidates[1].reserve,
            Some(policy::DEFAULT_RESERVE)
        );
        assert!(
            explanation.candidates[1]
                .reason
                .contains("ends 500ms before the deadline"),
            "{}",
            explanation.candidates[1].reason
        );
        // Known latency: its high percentile.
        let b = t.health().get("b", "m");
        for _ in 0..crate::health::MIN_SAMPLES {
            b.record(
                crate::health::AttemptResult::Success {
                    latency: Duration::from_millis(80),
                    ttft: None,
                },
                Instant::now(),
            );
        }
        let reserve = t.explain(&request(None)).unwrap().candidates[1].reserve;
        assert!(
            reserve
                .is_some_and(|r| r.abs_diff(Duration::from_millis(80)) < Duration::from_millis(3)),
            "{reserve:?}"
        );
        // Every target resting: a plan with none, each with its reason, not an error.
        for name in ["a", "b"] {
            t.health().get(name, "m").record(
                crate::health::AttemptResult::RateLimited {
                    rest: Duration::from_secs(5),
                },
                Instant::now(),
            );
        }
        assert!(t.plan(&request(None)).is_err());
        let explanation = t.explain(&request(None)).unwrap();
        assert_eq!(explanation.unroutable, Some("RATE_LIMITED"));
        assert_eq!(explanation.candidates.len(), 2);
        assert!(
            explanation
                .candidates
                .iter()
                .all(|c| !c.chosen && c.reason.starts_with("resting after a rate limit"))
        );
    }

    #[tokio::test]
    async fn variants_are_chosen_by_tags() {
        let mut s = spec(StrategyKind::Priority, vec![target("a", 0, 0, None)]);
        s.variants = vec![policy::VariantSpec {
            match_tags: [("region".to_owned(), "eu".to_owned())].into(),
            targets: vec![target("c", 0, 0, None)],
        }];
        let t = table().with_policies([record(s)]);
        assert_eq!(order(&t.plan(&request(None)).unwrap()), vec!["a"]);
        let mut eu = request(None);
        eu.tags.insert("region".into(), "eu".into());
        assert_eq!(order(&t.plan(&eu).unwrap()), vec!["c"]);
    }

    #[test]
    fn stable_hash_is_stable() {
        assert_eq!(stable_hash(&["p", "alice"]), stable_hash(&["p", "alice"]));
        assert_ne!(stable_hash(&["p", "alice"]), stable_hash(&["pa", "lice"]));
    }
}
