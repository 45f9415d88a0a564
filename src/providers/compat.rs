//! Presets for OpenAI-compatible services: the base URL, the environment variable holding the
//! key, and each server's quirks, so that `kind = "groq"` (etc.) in the config file is all a
//! provider needs. They all use the [`super::openai`] adapter; each preset is its own provider
//! kind in the model registry, so a Groq provider never claims OpenAI's models or prices.

use super::{
    kinds::{KeyRequired, KindInput, KindSpec, ProviderSettings, SettingsIssue},
    openai::{self, MaxTokensField, OpenAiConfig},
};

/// One OpenAI-compatible service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    /// The config `kind`, also the provider kind in the model registry.
    pub kind: &'static str,
    /// The base URL (up to and including `/v1` or its equivalent).
    pub base_url: &'static str,
    /// The environment variable read for the key when the config sets none.
    pub key_env: &'static str,
    /// Whether the service needs a key (hosted services) or usually runs without (local
    /// servers).
    pub key_required: bool,
    /// Which field carries the output limit.
    pub max_tokens_field: MaxTokensField,
    /// Whether the `developer` role is sent as is (otherwise as `system`).
    pub developer_role: bool,
    /// Whether to send `stream_options.include_usage`. Off where the service reports usage in
    /// its last chunk anyway or may reject the option.
    pub stream_usage: bool,
}

/// The built-in presets.
pub const PRESETS: &[Preset] = &[
    Preset {
        kind: "groq",
        base_url: "https://api.groq.com/openai/v1",
        key_env: "GROQ_API_KEY",
        key_required: true,
        max_tokens_field: MaxTokensField::MaxCompletionTokens,
        developer_role: false,
        stream_usage: true,
    },
    Preset {
        kind: "mistral",
        base_url: "https://api.mistral.ai/v1",
        key_env: "MISTRAL_API_KEY",
        key_required: true,
        max_tokens_field: MaxTokensField::MaxTokens,
        developer_role: false,
        stream_usage: false,
    },
    Preset {
        kind: "deepseek",
        base_url: "https://api.deepseek.com",
        key_env: "DEEPSEEK_API_KEY",
        key_required: true,
        max_tokens_field: MaxTokensField::MaxTokens,
        developer_role: false,
        stream_usage: true,
    },
    Preset {
        kind: "together",
        base_url: "https://api.together.xyz/v1",
        key_env: "TOGETHER_API_KEY",
        key_required: true,
        max_tokens_field: MaxTokensField::MaxTokens,
        developer_role: false,
        stream_usage: false,
    },
    Preset {
        kind: "fireworks",
        base_url: "https://api.fireworks.ai/inference/v1",
        key_env: "FIREWORKS_API_KEY",
        key_required: true,
        max_tokens_field: MaxTokensField::MaxTokens,
        developer_role: false,
        stream_usage: false,
    },
    Preset {
        kind: "openrouter",
        base_url: "https://openrouter.ai/api/v1",
        key_env: "OPENROUTER_API_KEY",
        key_required: true,
        max_tokens_field: MaxTokensField::MaxTokens,
        developer_role: false,
        stream_usage: true,
    },
    Preset {
        kind: "vllm",
        base_url: "http://127.0.0.1:8000/v1",
        key_env: "VLLM_API_KEY",
        key_required: false,
        max_tokens_field: MaxTokensField::MaxTokens,
        developer_role: false,
        stream_usage: true,
    },
    Preset {
        kind: "ollama",
        base_url: "http://127.0.0.1:11434/v1",
        key_env: "OLLAMA_API_KEY",
        key_required: false,
        max_tokens_field: MaxTokensField::MaxTokens,
        developer_role: false,
        stream_usage: true,
    },
    Preset {
        kind: "lmstudio",
        base_url: "http://127.0.0.1:1234/v1",
        key_env: "LMSTUDIO_API_KEY",
        key_required: false,
        max_tokens_field: MaxTokensField::MaxTokens,
        developer_role: false,
        stream_usage: true,
    },
];

impl Preset {
    /// The preset as a provider kind.
    pub fn spec(&'static self) -> KindSpec {
        KindSpec {
            name: self.kind,
            default_base_url: Some(self.base_url),
            base_url_hint: "",
            http: true,
            key_env: std::slice::from_ref(&self.key_env),
            key_required: if self.key_required {
                KeyRequired::AtDefaultUrl
            } else {
                KeyRequired::Never
            },
            fields: openai::FIELDS,
            parse: parse_preset,
            discover: None,
        }
    }
}

fn parse_preset(input: &KindInput<'_>) -> Result<ProviderSettings, Vec<SettingsIssue>> {
    let preset = preset(input.kind.name)
        .ok_or_else(|| vec![SettingsIssue::new("kind", "is not a preset")])?;
    let config = OpenAiConfig {
        max_tokens_field: preset.max_tokens_field,
        developer_role: preset.developer_role,
        stream_usage: preset.stream_usage,
        ..OpenAiConfig::new(input.base_url)
    };
    openai::parse_settings(input, preset.kind, config)
}

/// The preset called `kind`.
pub fn preset(kind: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.kind == kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_unique_and_well_formed() {
        for (i, p) in PRESETS.iter().enumerate() {
            assert!(
                PRESETS[..i].iter().all(|q| q.kind != p.kind),
                "duplicate {}",
                p.kind
            );
            assert_eq!(preset(p.kind), Some(p));
            assert!(
                p.base_url.starts_with("https://") || p.base_url.starts_with("http://127.0.0.1"),
                "{}",
                p.base_url
            );
            assert!(!p.base_url.ends_with('/'), "{}", p.base_url);
            assert!(p.key_env.ends_with("_API_KEY"), "{}", p.key_env);
            // Hosted services need keys; local servers do not.
            assert_eq!(p.key_required, p.base_url.starts_with("https://"));
        }
        assert!(preset("openai").is_none(), "openai is its own kind");
        assert!(preset("nope").is_none());
    }
}
