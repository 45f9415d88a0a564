//! Routing: turns the `model` a caller named into a [`Plan`], the ordered list of targets the
//! executor tries. A concrete `provider/model` is a one-target plan; policy names are resolved
//! from the routing table. The table is an immutable snapshot: a change swaps in a new one, and
//! calls in flight keep the plan they started with.

use std::sync::Arc;

use crate::{
    error::GatewayError,
    models::{ModelInfo, ModelRegistry},
    providers::{Provider, ProviderRegistry},
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
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.provider.name(), self.model)
    }
}

/// The ordered targets for one call.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The policy that produced the plan, if any.
    pub policy: Option<Arc<str>>,
    /// Targets in the order to try them: the first is the primary.
    pub targets: Vec<Target>,
}

/// Per-provider routing facts.
#[derive(Clone)]
struct ProviderEntry {
    provider: Arc<dyn Provider>,
    /// When set, only these models are routable.
    allowed_models: Option<Vec<String>>,
}

/// An immutable snapshot of everything routing needs.
#[derive(Clone, Default)]
pub struct RoutingTable {
    providers: std::collections::BTreeMap<String, ProviderEntry>,
    registry: ModelRegistry,
    /// Registry entries resolved per (provider name, model), shared by plans.
    infos: std::collections::HashMap<String, std::collections::HashMap<String, Arc<ModelInfo>>>,
}

impl RoutingTable {
    /// A table over `providers`, with `registry` for model facts. `allowed_models` gives the
    /// allowlist of each provider that has one.
    pub fn new(
        providers: &ProviderRegistry,
        registry: ModelRegistry,
        allowed_models: &dyn Fn(&str) -> Option<Vec<String>>,
    ) -> Self {
        let mut table = RoutingTable {
            registry,
            ..RoutingTable::default()
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
        table
    }

    /// Overrides or adds the registry entry of `model` at provider `name`.
    pub fn set_model_info(&mut self, name: &str, info: ModelInfo) {
        self.infos
            .entry(name.to_owned())
            .or_default()
            .insert(info.model.clone(), Arc::new(info));
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

    /// Every routable concrete model: `(provider name, model, info)`, sorted.
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

    /// Resolves the caller's `model` into a plan.
    pub fn plan(&self, model: &str) -> Result<Plan, GatewayError> {
        let Some((provider_name, model_name)) = model.split_once('/') else {
            return Err(GatewayError::NotFound {
                reason: "MODEL_NOT_FOUND",
                message: format!(
                    "unknown model or policy `{model}`; name a `provider/model` or a policy (see ListModels)"
                ),
            });
        };
        let entry = self.providers.get(provider_name).ok_or_else(|| GatewayError::NotFound {
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
        Ok(Plan {
            policy: None,
            targets: vec![Target {
                provider: entry.provider.clone(),
                model: Arc::from(model_name),
                info: self.model_info(provider_name, model_name),
            }],
        })
    }
}
