//! The model registry: what each provider kind offers and what it costs.
//!
//! The built-in data lives in `data/models.toml` (embedded at build time); configured models
//! and price overrides are layered on top per configured provider. Costs are computed here,
//! from a model's prices and a call's usage.

use std::collections::HashMap;

use serde::Deserialize;

use crate::types::Usage;

const BUILTIN: &str = include_str!("../data/models.toml");

/// Prices in US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    /// Uncached input tokens.
    pub input: f64,
    /// Output tokens.
    pub output: f64,
    /// Input tokens read from the cache (defaults to `input`).
    #[serde(default)]
    pub cached_input: Option<f64>,
    /// Input tokens written to the cache (defaults to `input`).
    #[serde(default)]
    pub cache_write: Option<f64>,
}

/// What the registry knows about one model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// Provider kind, e.g. `openai`.
    pub provider_kind: String,
    /// Model name at the provider.
    pub model: String,
    /// Context window in tokens.
    pub context_window: Option<u32>,
    /// Maximum output tokens.
    pub max_output_tokens: Option<u32>,
    /// Prices, when known.
    pub prices: Option<Prices>,
    /// Accepts tools.
    pub supports_tools: bool,
    /// Accepts images.
    pub supports_images: bool,
}

/// The cost of one call in US dollars.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Cost {
    /// Input side, cached tokens at the cached price.
    pub input_usd: f64,
    /// Output side.
    pub output_usd: f64,
}

impl Cost {
    /// Input plus output.
    pub fn total_usd(&self) -> f64 {
        self.input_usd + self.output_usd
    }
}

impl Prices {
    /// The cost of `usage` at these prices.
    pub fn cost(&self, usage: &Usage) -> Cost {
        let cached = usage.cached_input_tokens.unwrap_or(0);
        let written = usage.cache_write_tokens.unwrap_or(0);
        let plain = usage
            .input_tokens
            .saturating_sub(cached)
            .saturating_sub(written);
        let per = |tokens: u64, price: f64| tokens as f64 * price / 1_000_000.0;
        Cost {
            input_usd: per(plain, self.input)
                + per(cached, self.cached_input.unwrap_or(self.input))
                + per(written, self.cache_write.unwrap_or(self.input)),
            output_usd: per(usage.output_tokens, self.output),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    #[allow(dead_code, reason = "documents the data version; not used at run time")]
    version: String,
    models: Vec<RawModel>,
}

/// One model entry, as in `data/models.toml` and the config file's `[[models]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// Provider kind (in the data file) or configured provider name (in the config file).
    pub provider: String,
    /// Model name.
    pub model: String,
    /// Context window.
    #[serde(default)]
    pub context_window: Option<u32>,
    /// Output limit.
    #[serde(default)]
    pub max_output_tokens: Option<u32>,
    /// Input price per million tokens.
    #[serde(default)]
    pub input: Option<f64>,
    /// Output price per million tokens.
    #[serde(default)]
    pub output: Option<f64>,
    /// Cached input price per million tokens.
    #[serde(default)]
    pub cached_input: Option<f64>,
    /// Cache write price per million tokens.
    #[serde(default)]
    pub cache_write: Option<f64>,
    /// Accepts tools.
    #[serde(default)]
    pub tools: Option<bool>,
    /// Accepts images.
    #[serde(default)]
    pub images: Option<bool>,
    /// When the prices were read from the provider's page.
    #[serde(default)]
    pub prices_read: Option<String>,
}

impl RawModel {
    /// Checks the prices of `[[models]]` entry `i` (that `provider` is configured is the
    /// config loader's cross-section check).
    pub fn check_prices(&self, i: usize, issues: &mut crate::settings::Issues) {
        for (name, price) in [
            ("input", self.input),
            ("output", self.output),
            ("cached_input", self.cached_input),
            ("cache_write", self.cache_write),
        ] {
            if price.is_some_and(|p| !p.is_finite() || p < 0.0) {
                issues.push(format!("models[{i}].{name}"), "must be zero or more");
            }
        }
    }

    fn into_info(self, provider_kind: String) -> ModelInfo {
        ModelInfo {
            provider_kind,
            prices: match (self.input, self.output) {
                (Some(input), Some(output)) => Some(Prices {
                    input,
                    output,
                    cached_input: self.cached_input,
                    cache_write: self.cache_write,
                }),
                _ => None,
            },
            model: self.model,
            context_window: self.context_window,
            max_output_tokens: self.max_output_tokens,
            supports_tools: self.tools.unwrap_or(true),
            supports_images: self.images.unwrap_or(false),
        }
    }

    /// Layers this entry's set fields over `base`.
    pub fn overlay(self, base: &ModelInfo) -> ModelInfo {
        let mut info = base.clone();
        if let Some(v) = self.context_window {
            info.context_window = Some(v);
        }
        if let Some(v) = self.max_output_tokens {
            info.max_output_tokens = Some(v);
        }
        if let Some(v) = self.tools {
            info.supports_tools = v;
        }
        if let Some(v) = self.images {
            info.supports_images = v;
        }
        if self.input.is_some() || self.output.is_some() {
            let mut prices = info.prices.unwrap_or_default();
            if let Some(v) = self.input {
                prices.input = v;
            }
            if let Some(v) = self.output {
                prices.output = v;
            }
            if self.cached_input.is_some() {
                prices.cached_input = self.cached_input;
            }
            if self.cache_write.is_some() {
                prices.cache_write = self.cache_write;
            }
            info.prices = Some(prices);
        }
        info
    }
}

/// Known models by provider kind.
#[derive(Debug, Clone, Default)]
pub struct ModelRegistry {
    by_kind: HashMap<String, Vec<ModelInfo>>,
}

impl ModelRegistry {
    /// The registry built into the binary.
    pub fn builtin() -> Result<Self, toml::de::Error> {
        let raw: RawRegistry = toml::from_str(BUILTIN)?;
        let mut registry = Self::default();
        for model in raw.models {
            let kind = model.provider.clone();
            registry.insert(model.into_info(kind));
        }
        Ok(registry)
    }

    /// Adds or replaces a model.
    pub fn insert(&mut self, info: ModelInfo) {
        let models = self.by_kind.entry(info.provider_kind.clone()).or_default();
        match models.iter_mut().find(|m| m.model == info.model) {
            Some(existing) => *existing = info,
            None => models.push(info),
        }
    }

    /// The known models of a provider kind, in file order.
    pub fn models_of(&self, kind: &str) -> &[ModelInfo] {
        self.by_kind.get(kind).map_or(&[], Vec::as_slice)
    }

    /// Looks a model up. Dated snapshots (`gpt-4o-mini-2024-07-18`) fall back to their base
    /// name when the snapshot itself is not listed.
    pub fn get(&self, kind: &str, model: &str) -> Option<&ModelInfo> {
        let models = self.by_kind.get(kind)?;
        models.iter().find(|m| m.model == model).or_else(|| {
            models
                .iter()
                .filter(|m| {
                    model.len() > m.model.len()
                        && model.starts_with(&m.model)
                        && model.as_bytes()[m.model.len()] == b'-'
                        && model[m.model.len() + 1..].starts_with(|c: char| c.is_ascii_digit())
                })
                .max_by_key(|m| m.model.len())
        })
    }

    /// Builds a model entry from a config `[[models]]` row for a provider of `kind`.
    pub fn from_raw(raw: RawModel, kind: &str) -> ModelInfo {
        raw.into_info(kind.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_registry_loads_and_prices_calls() {
        let registry = ModelRegistry::builtin().unwrap();
        let info = registry.get("openai", "gpt-4o-mini").unwrap();
        let cost = info.prices.unwrap().cost(&Usage {
            input_tokens: 1_000_000,
            output_tokens: 1_000_000,
            cached_input_tokens: Some(500_000),
            ..Usage::default()
        });
        assert!((cost.input_usd - (0.075 + 0.0375)).abs() < 1e-9, "{cost:?}");
        assert!((cost.output_usd - 0.60).abs() < 1e-9);
        assert_eq!(
            registry
                .get("openai", "gpt-4o-mini-2024-07-18")
                .unwrap()
                .model,
            "gpt-4o-mini"
        );
        assert!(registry.get("openai", "gpt-4o-minix").is_none());
        assert!(registry.get("mock", "echo").is_some());
    }
}
