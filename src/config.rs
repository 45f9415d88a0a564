//! Configuration loading: a TOML file (optional), `${ENV_VAR}` interpolation in its strings,
//! environment and command-line overrides for the common settings, and the zero-config
//! defaults.
//!
//! Each section of the file belongs to the module it configures, which owns its raw serde
//! struct (`deny_unknown_fields`), its defaults and its validation (every problem names its
//! field); see [`crate::settings`]. This module only reads the file, interpolates, applies
//! the overrides, assembles the sections into [`Config`], checks the rules that span
//! sections, and discovers zero-config providers from the environment.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use serde::Deserialize;

pub use crate::settings::{ConfigIssue, parse_duration};
use crate::{
    auth::{AuthSettings, RawAuth},
    executor::{ExecutorSettings, RawExecutor},
    health::{HealthSettings, RawHealth},
    ledger::{LedgerSettings, RawLedger},
    limits::{RawTeam, TeamLimits},
    models::RawModel,
    providers::{
        RawUpstream, UpstreamSettings, anthropic, compat, gemini,
        openai::{self, MaxTokensField},
    },
    routing::policy::PolicySpec,
    server::settings::{
        AdminSettings, HttpFrontSettings, RawAdmin, RawHttpFront, RawServer, ServerSettings,
    },
    settings::Issues,
    store::{RawStore, StoreSettings},
    telemetry::{LogConfig, MetricsSettings, RawLog, RawMetrics},
    tls::{RawTls, TlsConfig},
};

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path} is not valid toml: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Parser message with line and column.
        message: String,
    },
    /// Fields are invalid.
    #[error("invalid configuration:\n{}", .0.iter().map(|i| format!("  - {i}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigIssue>),
}

// -------------------------------------------------------------------------------------------
// Raw file format
// -------------------------------------------------------------------------------------------

/// The file: one field per section, each the owning module's raw struct.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    models: Vec<RawModel>,
    #[serde(default)]
    policies: BTreeMap<String, PolicySpec>,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    executor: RawExecutor,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    ledger: RawLedger,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    teams: BTreeMap<String, RawTeam>,
    tls: Option<RawTls>,
    #[serde(default)]
    http: RawHttpFront,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    kind: Option<String>,
    base_url: Option<String>,
    api_key: Option<String>,
    api_keys: Option<Vec<String>>,
    api_key_file: Option<String>,
    api_key_files: Option<Vec<String>>,
    models: Option<Vec<String>>,
    max_tokens_field: Option<String>,
    developer_role: Option<bool>,
    stream_usage: Option<bool>,
    api_version: Option<String>,
}

// -------------------------------------------------------------------------------------------
// Validated configuration
// -------------------------------------------------------------------------------------------

/// The kind of a configured provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderKind {
    /// OpenAI, an OpenAI-compatible server (plain or a preset such as Groq), or Azure OpenAI.
    OpenAi {
        /// The registry kind: `openai` (also for `openai-compatible`), `azure`, or the preset.
        flavor: &'static str,
        /// Output limit field.
        max_tokens_field: MaxTokensField,
        /// Whether `developer` is sent as is.
        developer_role: bool,
        /// Whether streams ask for usage.
        stream_usage: bool,
        /// Azure OpenAI's `api-version`; set exactly for Azure (deployment URLs, `api-key`).
        azure_api_version: Option<String>,
    },
    /// The Anthropic Messages API.
    Anthropic,
    /// The Google Gemini API.
    Gemini,
    /// The built-in offline mock.
    Mock,
}

impl ProviderKind {
    /// The kind's name (the registry key for prices).
    pub fn name(&self) -> &'static str {
        match self {
            ProviderKind::OpenAi { flavor, .. } => flavor,
            ProviderKind::Anthropic => anthropic::KIND,
            ProviderKind::Gemini => gemini::KIND,
            ProviderKind::Mock => crate::providers::mock::KIND,
        }
    }
}

/// The kinds the config file accepts, for error messages.
fn known_kinds() -> String {
    let mut kinds = vec![
        "openai",
        "openai-compatible",
        "azure",
        "anthropic",
        "gemini",
        "mock",
    ];
    kinds.extend(compat::PRESETS.iter().map(|p| p.kind));
    kinds.join(", ")
}

/// A configured provider.
#[derive(Clone, PartialEq, Eq)]
pub struct ProviderConfig {
    /// Name callers use before the `/`.
    pub name: String,
    /// Kind and kind-specific settings.
    pub kind: ProviderKind,
    /// Base URL of the API.
    pub base_url: String,
    /// API keys, used in turn (never logged: `Debug` shows only how many). Empty when the
    /// provider needs none.
    pub api_keys: Vec<String>,
    /// When set, only these models may be called through this provider.
    pub models: Option<Vec<String>>,
}

impl ProviderConfig {
    /// The first API key, if any.
    pub fn api_key(&self) -> Option<&str> {
        self.api_keys.first().map(String::as_str)
    }
}

impl std::fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("base_url", &self.base_url)
            .field(
                "api_keys",
                &format_args!("<{} redacted>", self.api_keys.len()),
            )
            .field("models", &self.models)
            .finish()
    }
}

/// The validated configuration: one field per section, each the owning module's settings
/// type. Its `Debug` output never shows a secret (the admin token and provider keys are
/// redacted by their own types).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `[server]`: gRPC listener, call time limits, shutdown.
    pub server: ServerSettings,
    /// `[upstream]`: the shared HTTP client, stream idle timeout, key rest.
    pub upstream: UpstreamSettings,
    /// `[log]`.
    pub log: LogConfig,
    /// `[providers.*]`, in name order.
    pub providers: Vec<ProviderConfig>,
    /// `[[models]]`: extra registry entries and price overrides (`provider` is a configured
    /// name).
    pub models: Vec<RawModel>,
    /// `[policies.*]` (read-only through the API), in name order.
    pub policies: Vec<PolicySpec>,
    /// `[store]`.
    pub store: StoreSettings,
    /// `[admin]`.
    pub admin: AdminSettings,
    /// `[health]`: circuit breakers.
    pub health: HealthSettings,
    /// `[executor]`: fallback and hedging.
    pub executor: ExecutorSettings,
    /// `[metrics]`.
    pub metrics: MetricsSettings,
    /// `[ledger]`.
    pub ledger: LedgerSettings,
    /// `[auth]`.
    pub auth: AuthSettings,
    /// `[teams.*]`: limits and budgets per team (a key's owner).
    pub teams: HashMap<String, TeamLimits>,
    /// `[tls]`; `None` for plain TCP.
    pub tls: Option<TlsConfig>,
    /// `[http]`: the OpenAI- and Anthropic-compatible front.
    pub http: HttpFrontSettings,
}

/// Settings given on the command line or in the environment; they win over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen` / `LLM_GATEWAY_LISTEN`.
    pub listen: Option<String>,
    /// `--log-level` / `LLM_GATEWAY_LOG`.
    pub log_level: Option<String>,
    /// `--log-format` / `LLM_GATEWAY_LOG_FORMAT`.
    pub log_format: Option<String>,
    /// `--data-dir` / `LLM_GATEWAY_DATA_DIR`: the store goes to `DIR/llm-gateway.db`.
    pub data_dir: Option<PathBuf>,
    /// `--admin-token` / `LLM_GATEWAY_ADMIN_TOKEN`.
    pub admin_token: Option<String>,
    /// `--metrics-listen` / `LLM_GATEWAY_METRICS_LISTEN` (`off` disables).
    pub metrics_listen: Option<String>,
}

impl Config {
    /// Loads `path` (if any), applies overrides, auto-registers providers from the
    /// environment when the file configures none, and validates.
    pub fn load(
        path: Option<&Path>,
        overrides: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?,
            None => String::new(),
        };
        Self::from_toml(&text, path.unwrap_or(Path::new("<none>")), overrides, env)
    }

    /// Like [`Config::load`], from TOML text.
    pub fn from_toml(
        text: &str,
        path: &Path,
        overrides: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut value: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let mut issues = Vec::new();
        interpolate_table(&mut value, "", env, &mut issues);
        if !issues.is_empty() {
            return Err(ConfigError::Invalid(issues));
        }
        let raw: RawConfig =
            serde_path_to_error::deserialize(toml::Value::Table(value)).map_err(|e| {
                let field = e.path().to_string();
                ConfigError::Invalid(vec![ConfigIssue {
                    field: if field == "." { "<root>".into() } else { field },
                    message: e.into_inner().message().trim().to_owned(),
                }])
            })?;
        validate(raw, overrides, env)
    }
}

/// Replaces `${NAME}` and `${NAME:-default}` in every string of the table.
fn interpolate_table(
    table: &mut toml::Table,
    prefix: &str,
    env: &dyn Fn(&str) -> Option<String>,
    issues: &mut Vec<ConfigIssue>,
) {
    for (key, value) in table.iter_mut() {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        interpolate_value(value, &path, env, issues);
    }
}

fn interpolate_value(
    value: &mut toml::Value,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    issues: &mut Vec<ConfigIssue>,
) {
    match value {
        toml::Value::String(s) => match interpolate(s, env) {
            Ok(Some(new)) => *s = new,
            Ok(None) => {}
            Err(message) => issues.push(ConfigIssue {
                field: path.to_owned(),
                message,
            }),
        },
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate_value(item, &format!("{path}[{i}]"), env, issues);
            }
        }
        toml::Value::Table(table) => interpolate_table(table, path, env, issues),
        _ => {}
    }
}

/// Interpolates one string. `Ok(None)` when it has no `${`.
pub fn interpolate(
    s: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<String>, String> {
    if !s.contains("${") {
        return Ok(None);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated `${` in value".to_owned())?;
        let expr = &after[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (expr, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "`${{{expr}}}` is not a valid environment variable reference"
            ));
        }
        match (env(name).filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!("environment variable {name} is not set"));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(Some(out))
}

/// Whether `name` is a valid provider name (lowercase letters, digits, `-`, `_`; 1 to 64).
pub fn valid_provider_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

fn validate(
    mut raw: RawConfig,
    overrides: &Overrides,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let mut issues = Issues::new();

    // Overrides win over the file; each is validated with its section.
    let listen_field = match &overrides.listen {
        Some(listen) => {
            raw.server.listen = Some(listen.clone());
            "--listen / LLM_GATEWAY_LISTEN"
        }
        None => "server.listen",
    };
    raw.log.level = overrides.log_level.clone().or(raw.log.level);
    raw.log.format = overrides.log_format.clone().or(raw.log.format);
    raw.admin.token = overrides.admin_token.clone().or(raw.admin.token);
    raw.metrics.listen = overrides.metrics_listen.clone().or(raw.metrics.listen);

    let server = ServerSettings::from_raw(raw.server, listen_field, &mut issues);
    let upstream = UpstreamSettings::from_raw(raw.upstream, &mut issues);
    let log = LogConfig::from_raw(raw.log, &mut issues);
    let providers = providers(raw.providers, env, &mut issues);
    for (i, m) in raw.models.iter().enumerate() {
        if !providers.iter().any(|p| p.name == m.provider) {
            issues.push(
                format!("models[{i}].provider"),
                format!("`{}` is not a configured provider", m.provider),
            );
        }
        m.check_prices(i, &mut issues);
    }
    let policies = crate::routing::policy::policies_from_raw(raw.policies, &mut issues);
    let mut store = StoreSettings::from_raw(raw.store);
    if let Some(dir) = &overrides.data_dir {
        store.path = dir.join("llm-gateway.db");
    }
    let admin = AdminSettings::from_raw(raw.admin, &mut issues);
    let health = HealthSettings::from_raw(raw.health, &mut issues);
    let mut executor = ExecutorSettings::from_raw(raw.executor, &mut issues);
    executor.stream_idle_timeout = upstream.stream_idle_timeout;
    let metrics = MetricsSettings::from_raw(raw.metrics, &mut issues);
    let ledger = LedgerSettings::from_raw(raw.ledger, &mut issues);
    let mut auth = AuthSettings::from_raw(raw.auth);
    // Keys are required whenever the data plane is reachable from other machines.
    auth.require_keys |= !server.listen.ip().is_loopback();
    let http = HttpFrontSettings::from_raw(raw.http, &mut issues);
    auth.require_keys |= http.listen.is_some_and(|a| !a.ip().is_loopback());
    let teams = crate::limits::teams_from_raw(raw.teams, &mut issues);
    let tls = raw.tls.and_then(|t| TlsConfig::from_raw(t, &mut issues));

    if !issues.is_empty() {
        return Err(ConfigError::Invalid(issues.into_vec()));
    }
    Ok(Config {
        server,
        upstream,
        log,
        providers,
        models: raw.models,
        policies,
        store,
        admin,
        health,
        executor,
        metrics,
        ledger,
        auth,
        teams,
        tls,
        http,
    })
}

/// Validates `[providers.*]` (or, when the file has none, the providers found in the
/// environment); the built-in mock when there are none at all.
fn providers(
    raw_providers: BTreeMap<String, RawProvider>,
    env: &dyn Fn(&str) -> Option<String>,
    issues: &mut Issues,
) -> Vec<ProviderConfig> {
    let mut providers = Vec::new();
    let raw_providers = if raw_providers.is_empty() {
        providers_from_env(env, issues)
    } else {
        raw_providers
    };
    for (name, p) in raw_providers {
        let field = format!("providers.{name}");
        if !valid_provider_name(&name) {
            issues.push(
                &field,
                "provider names use lowercase letters, digits, `-` and `_` (at most 64)",
            );
            continue;
        }
        let kind_name = p.kind.clone().unwrap_or_else(|| name.clone());
        let preset = compat::preset(&kind_name);
        // The kind's default base URL and the environment variables read for its key.
        let (default_base_url, key_env): (Option<&str>, &[&str]) = match kind_name.as_str() {
            "openai" => (Some(openai::DEFAULT_BASE_URL), &[]),
            "anthropic" => (Some(anthropic::DEFAULT_BASE_URL), &["ANTHROPIC_API_KEY"]),
            "gemini" => (
                Some(gemini::DEFAULT_BASE_URL),
                &["GEMINI_API_KEY", "GOOGLE_API_KEY"],
            ),
            "azure" => (None, &["AZURE_OPENAI_API_KEY"]),
            _ => match preset {
                Some(preset) => (Some(preset.base_url), std::slice::from_ref(&preset.key_env)),
                None => (None, &[]),
            },
        };
        let mut max_tokens_field = |default: MaxTokensField| match p.max_tokens_field.as_deref() {
            None => default,
            Some("max_tokens") => MaxTokensField::MaxTokens,
            Some("max_completion_tokens") => MaxTokensField::MaxCompletionTokens,
            Some(other) => {
                issues.push(
                    format!("{field}.max_tokens_field"),
                    format!("`{other}` is not one of: max_tokens, max_completion_tokens"),
                );
                default
            }
        };
        let kind = match kind_name.as_str() {
            "openai" | "openai-compatible" => {
                let official = p
                    .base_url
                    .as_deref()
                    .is_none_or(|u| u.starts_with("https://api.openai.com"));
                ProviderKind::OpenAi {
                    flavor: openai::KIND,
                    max_tokens_field: max_tokens_field(if official {
                        MaxTokensField::MaxCompletionTokens
                    } else {
                        MaxTokensField::MaxTokens
                    }),
                    developer_role: p.developer_role.unwrap_or(official),
                    stream_usage: p.stream_usage.unwrap_or(true),
                    azure_api_version: None,
                }
            }
            "azure" => ProviderKind::OpenAi {
                flavor: openai::AZURE_KIND,
                max_tokens_field: max_tokens_field(MaxTokensField::MaxCompletionTokens),
                developer_role: p.developer_role.unwrap_or(false),
                stream_usage: p.stream_usage.unwrap_or(true),
                azure_api_version: Some(
                    p.api_version
                        .clone()
                        .filter(|v| !v.is_empty())
                        .unwrap_or_else(|| openai::AZURE_DEFAULT_API_VERSION.to_owned()),
                ),
            },
            "anthropic" => ProviderKind::Anthropic,
            "gemini" => ProviderKind::Gemini,
            "mock" => ProviderKind::Mock,
            other => match preset {
                Some(preset) => ProviderKind::OpenAi {
                    flavor: preset.kind,
                    max_tokens_field: max_tokens_field(preset.max_tokens_field),
                    developer_role: p.developer_role.unwrap_or(preset.developer_role),
                    stream_usage: p.stream_usage.unwrap_or(preset.stream_usage),
                    azure_api_version: None,
                },
                None => {
                    issues.push(
                        format!("{field}.kind"),
                        format!(
                            "unknown provider kind `{other}`; known kinds: {}",
                            known_kinds()
                        ),
                    );
                    continue;
                }
            },
        };
        if p.api_version.is_some() && kind_name != "azure" {
            issues.push(
                format!("{field}.api_version"),
                "only applies to kind `azure`",
            );
        }
        if matches!(kind, ProviderKind::Anthropic | ProviderKind::Gemini) {
            for (set, name) in [
                (p.max_tokens_field.is_some(), "max_tokens_field"),
                (p.developer_role.is_some(), "developer_role"),
                (p.stream_usage.is_some(), "stream_usage"),
            ] {
                if set {
                    issues.push(
                        format!("{field}.{name}"),
                        "only applies to OpenAI-compatible kinds",
                    );
                }
            }
        }
        let base_url = match (p.base_url.clone(), default_base_url) {
            (Some(url), _) => url.trim_end_matches('/').to_owned(),
            (None, Some(default)) => default.to_owned(),
            (None, None) if kind == ProviderKind::Mock => String::new(),
            (None, None) if kind_name == "azure" => {
                issues.push(
                    format!("{field}.base_url"),
                    "is required for kind `azure`: the resource endpoint, e.g. https://NAME.openai.azure.com",
                );
                continue;
            }
            (None, None) => {
                issues.push(format!("{field}.base_url"), "is required for this kind");
                continue;
            }
        };
        let mut api_keys = provider_keys(&field, &p, issues);
        if api_keys.is_empty()
            && let Some(key) = key_env
                .iter()
                .find_map(|var| env(var).filter(|k| !k.is_empty()))
        {
            api_keys.push(key);
        }
        // Hosted services need a key at their own endpoint; a proxy may add its own. Azure
        // endpoints are always the customer's own, and the adapter only speaks `api-key`.
        let hosted = matches!(kind_name.as_str(), "anthropic" | "gemini")
            || preset.is_some_and(|p| p.key_required);
        let at_default = default_base_url == Some(base_url.as_str());
        let key_required = kind_name == "azure" || (hosted && at_default);
        if api_keys.is_empty() && key_required {
            issues.push(
                format!("{field}.api_key"),
                format!(
                    "is required for kind `{kind_name}`; set it, or {}",
                    key_env.join(" or ")
                ),
            );
        }
        let http_url = base_url.starts_with("http://") || base_url.starts_with("https://");
        if !http_url && kind != ProviderKind::Mock {
            issues.push(
                format!("{field}.base_url"),
                format!("`{base_url}` must start with http:// or https://"),
            );
        }
        if let Some(models) = &p.models {
            for (i, m) in models.iter().enumerate() {
                if m.trim().is_empty() {
                    issues.push(format!("{field}.models[{i}]"), "must not be empty");
                }
            }
        }
        providers.push(ProviderConfig {
            name,
            kind,
            base_url,
            api_keys,
            models: p.models,
        });
    }
    if providers.is_empty() {
        providers.push(ProviderConfig {
            name: crate::providers::mock::KIND.to_owned(),
            kind: ProviderKind::Mock,
            base_url: String::new(),
            api_keys: Vec::new(),
            models: None,
        });
    }
    providers
}

/// A provider's keys from `api_key`, `api_keys`, `api_key_file` and `api_key_files`, in that
/// order, without empties and duplicates. A key file holds one key, or one per line (blank
/// lines and lines starting with `#` are skipped); keys are trimmed.
fn provider_keys(field: &str, p: &RawProvider, issues: &mut Issues) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    let mut add = |key: &str| {
        let key = key.trim();
        if !key.is_empty() && !keys.iter().any(|k| k == key) {
            keys.push(key.to_owned());
        }
    };
    for key in p.api_key.iter().chain(p.api_keys.iter().flatten()) {
        add(key);
    }
    let files = p
        .api_key_file
        .iter()
        .map(|f| (format!("{field}.api_key_file"), f))
        .chain(
            p.api_key_files
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, f)| (format!("{field}.api_key_files[{i}]"), f)),
        );
    for (file_field, path) in files {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let mut found = false;
                for line in text.lines() {
                    let line = line.trim();
                    if !line.is_empty() && !line.starts_with('#') {
                        found = true;
                        add(line);
                    }
                }
                if !found {
                    issues.push(file_field, format!("`{path}` holds no key"));
                }
            }
            Err(e) => issues.push(file_field, format!("cannot read `{path}`: {e}")),
        }
    }
    keys
}

/// The providers the zero-config start registers from the environment: `openai`,
/// `anthropic`, `gemini` and `azure`, each when its key is set.
fn providers_from_env(
    env: &dyn Fn(&str) -> Option<String>,
    issues: &mut Issues,
) -> BTreeMap<String, RawProvider> {
    let var = |name: &str| env(name).filter(|v| !v.is_empty());
    let mut out = BTreeMap::new();
    let mut add = |name: &str, base_url: Option<String>, api_key: String| {
        out.insert(
            name.to_owned(),
            RawProvider {
                kind: Some(name.to_owned()),
                base_url,
                api_key: Some(api_key),
                ..RawProvider::default()
            },
        );
    };
    if let Some(key) = var("OPENAI_API_KEY") {
        add("openai", var("OPENAI_BASE_URL"), key);
    }
    if let Some(key) = var("ANTHROPIC_API_KEY") {
        add("anthropic", var("ANTHROPIC_BASE_URL"), key);
    }
    if let Some(key) = var("GEMINI_API_KEY").or_else(|| var("GOOGLE_API_KEY")) {
        add("gemini", None, key);
    }
    if let Some(key) = var("AZURE_OPENAI_API_KEY") {
        match var("AZURE_OPENAI_ENDPOINT") {
            Some(endpoint) => {
                add("azure", Some(endpoint), key);
                if let Some(azure) = out.get_mut("azure") {
                    azure.api_version = var("AZURE_OPENAI_API_VERSION");
                }
            }
            None => issues.push(
                "AZURE_OPENAI_ENDPOINT",
                "must be set when AZURE_OPENAI_API_KEY is, e.g. https://NAME.openai.azure.com",
            ),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::server::settings::DEFAULT_LISTEN;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn load(
        text: &str,
        env: &'static [(&'static str, &'static str)],
    ) -> Result<Config, ConfigError> {
        Config::from_toml(
            text,
            Path::new("test.toml"),
            &Overrides::default(),
            &env_of(env),
        )
    }

    fn issues(err: ConfigError) -> Vec<ConfigIssue> {
        match err {
            ConfigError::Invalid(issues) => issues,
            other => panic!("expected field issues, got {other}"),
        }
    }

    #[test]
    fn debug_output_hides_the_admin_token() {
        let config = load("[admin]\ntoken = \"super-secret-admin-token\"\n", &[]).unwrap();
        assert!(!format!("{config:?}").contains("super-secret"));
        // Nor any provider key, in the whole config's Debug.
        let config = load(
            "[admin]\ntoken = \"super-secret-admin-token\"\n[providers.o]\nkind = \"openai\"\napi_key = \"sk-super-secret\"\n",
            &[],
        )
        .unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("super-secret"), "{debug}");
    }

    #[test]
    fn zero_config_is_the_mock_on_loopback() {
        let config = load("", &[]).unwrap();
        assert_eq!(config.server.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.providers.len(), 1);
        assert_eq!(config.providers[0].kind, ProviderKind::Mock);
    }

    #[test]
    fn openai_from_env_with_base_url() {
        let config = load(
            "",
            &[
                ("OPENAI_API_KEY", "sk-1"),
                ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/"),
            ],
        )
        .unwrap();
        assert_eq!(config.providers.len(), 1);
        let p = &config.providers[0];
        assert_eq!(p.name, "openai");
        assert_eq!(p.base_url, "http://127.0.0.1:9/v1");
        assert_eq!(p.api_key(), Some("sk-1"));
        assert!(matches!(
            p.kind,
            ProviderKind::OpenAi {
                max_tokens_field: MaxTokensField::MaxTokens,
                developer_role: false,
                ..
            }
        ));
        assert!(!format!("{p:?}").contains("sk-1"));
    }

    #[test]
    fn every_provider_key_in_the_env_registers_its_provider() {
        let config = load(
            "",
            &[
                ("OPENAI_API_KEY", "sk-1"),
                ("ANTHROPIC_API_KEY", "sk-ant-1"),
                ("ANTHROPIC_BASE_URL", "http://127.0.0.1:9/"),
                ("GOOGLE_API_KEY", "g-1"),
                ("AZURE_OPENAI_API_KEY", "az-1"),
                ("AZURE_OPENAI_ENDPOINT", "https://res.openai.azure.com"),
            ],
        )
        .unwrap();
        let by_name = |name: &str| config.providers.iter().find(|p| p.name == name).unwrap();
        assert_eq!(config.providers.len(), 4);
        let anthropic = by_name("anthropic");
        assert_eq!(anthropic.kind, ProviderKind::Anthropic);
        assert_eq!(anthropic.base_url, "http://127.0.0.1:9");
        assert_eq!(anthropic.api_key(), Some("sk-ant-1"));
        let gemini = by_name("gemini");
        assert_eq!(gemini.kind, ProviderKind::Gemini);
        assert_eq!(gemini.base_url, gemini::DEFAULT_BASE_URL);
        assert_eq!(gemini.api_key(), Some("g-1"));
        let azure = by_name("azure");
        assert_eq!(azure.kind.name(), "azure");
        assert!(matches!(
            &azure.kind,
            ProviderKind::OpenAi { azure_api_version: Some(v), .. } if v == openai::AZURE_DEFAULT_API_VERSION
        ));
        assert_eq!(azure.base_url, "https://res.openai.azure.com");

        // GEMINI_API_KEY wins over GOOGLE_API_KEY; the Azure version is configurable.
        let config = load(
            "",
            &[
                ("GEMINI_API_KEY", "g-2"),
                ("GOOGLE_API_KEY", "g-1"),
                ("AZURE_OPENAI_API_KEY", "az-1"),
                ("AZURE_OPENAI_ENDPOINT", "https://res.openai.azure.com"),
                ("AZURE_OPENAI_API_VERSION", "2025-04-01-preview"),
            ],
        )
        .unwrap();
        assert_eq!(config.providers[1].name, "gemini");
        assert_eq!(config.providers[1].api_key(), Some("g-2"));
        assert!(matches!(
            &config.providers[0].kind,
            ProviderKind::OpenAi { azure_api_version: Some(v), .. } if v == "2025-04-01-preview"
        ));

        // An Azure key without its endpoint is a mistake worth saying.
        let err = issues(load("", &[("AZURE_OPENAI_API_KEY", "az-1")]).unwrap_err());
        assert_eq!(err[0].field, "AZURE_OPENAI_ENDPOINT");
    }

    #[test]
    fn presets_by_kind_or_by_name_with_keys_from_env() {
        let config = load(
            r#"
            [providers.groq]
            [providers.groq-team-b]
            kind = "groq"
            api_key = "gsk-b"
            [providers.local]
            kind = "ollama"
            [providers.mistral]
            max_tokens_field = "max_completion_tokens"
            "#,
            &[("GROQ_API_KEY", "gsk-a"), ("MISTRAL_API_KEY", "m-1")],
        )
        .unwrap();
        let by_name = |name: &str| config.providers.iter().find(|p| p.name == name).unwrap();
        let groq = by_name("groq");
        assert_eq!(groq.base_url, "https://api.groq.com/openai/v1");
        assert_eq!(groq.api_key(), Some("gsk-a"));
        assert_eq!(groq.kind.name(), "groq");
        // Several accounts of one kind side by side, each with its own key.
        assert_eq!(by_name("groq-team-b").api_key(), Some("gsk-b"));
        let local = by_name("local");
        assert_eq!(local.base_url, "http://127.0.0.1:11434/v1");
        assert_eq!(local.api_key(), None);
        assert!(matches!(
            by_name("mistral").kind,
            ProviderKind::OpenAi {
                flavor: "mistral",
                max_tokens_field: MaxTokensField::MaxCompletionTokens,
                stream_usage: false,
                ..
            }
        ));
    }

    #[test]
    fn provider_kind_problems_name_the_field() {
        // A hosted preset at its own endpoint needs a key; behind a proxy it may not.
        let err = issues(load("[providers.fast]\nkind = \"groq\"\n", &[]).unwrap_err());
        assert_eq!(err[0].field, "providers.fast.api_key");
        assert!(err[0].message.contains("GROQ_API_KEY"), "{err:?}");
        load(
            "[providers.fast]\nkind = \"groq\"\nbase_url = \"http://127.0.0.1:9/v1\"\n",
            &[],
        )
        .unwrap();
        let err = issues(load("[providers.claude]\nkind = \"anthropic\"\n", &[]).unwrap_err());
        assert_eq!(err[0].field, "providers.claude.api_key");

        let err =
            issues(load("[providers.az]\nkind = \"azure\"\napi_key = \"k\"\n", &[]).unwrap_err());
        assert_eq!(err[0].field, "providers.az.base_url");
        let err = issues(
            load(
                "[providers.o]\nkind = \"openai\"\napi_version = \"2024-10-21\"\n",
                &[],
            )
            .unwrap_err(),
        );
        assert_eq!(err[0].field, "providers.o.api_version");
        let err = issues(
            load(
                "[providers.g]\nkind = \"gemini\"\napi_key = \"k\"\nstream_usage = false\n",
                &[],
            )
            .unwrap_err(),
        );
        assert_eq!(err[0].field, "providers.g.stream_usage");
        let err = issues(load("[providers.x]\nkind = \"bogus\"\n", &[]).unwrap_err());
        assert!(err[0].message.contains("anthropic"), "{err:?}");
        assert!(err[0].message.contains("lmstudio"), "{err:?}");
    }

    #[test]
    fn file_with_interpolation() {
        let config = load(
            r#"
            [server]
            listen = "127.0.0.1:7000"
            max_call_duration = "2m"
            [providers.vllm]
            kind = "openai-compatible"
            base_url = "${VLLM_URL:-http://127.0.0.1:8000/v1}"
            api_key = "${VLLM_KEY}"
            models = ["llama"]
            "#,
            &[("VLLM_KEY", "k")],
        )
        .unwrap();
        assert_eq!(config.server.listen.port(), 7000);
        assert_eq!(config.server.max_call_duration, Duration::from_secs(120));
        assert_eq!(config.providers[0].base_url, "http://127.0.0.1:8000/v1");
        assert_eq!(config.providers[0].api_key(), Some("k"));
    }

    #[test]
    fn errors_name_the_field() {
        let err = issues(
            load(
                "[server]\nlisten = \"nope\"\nshutdown_grace = \"soon\"\n",
                &[],
            )
            .unwrap_err(),
        );
        let fields: Vec<_> = err.iter().map(|i| i.field.as_str()).collect();
        assert_eq!(fields, vec!["server.listen", "server.shutdown_grace"]);

        let err = issues(load("[server]\nlisen = \"x\"\n", &[]).unwrap_err());
        assert_eq!(err[0].field, "server.lisen");
        assert!(err[0].message.contains("unknown field"), "{err:?}");

        let err = issues(load("[providers.x]\napi_key = \"${MISSING}\"\n", &[]).unwrap_err());
        assert_eq!(err[0].field, "providers.x.api_key");
        assert!(err[0].message.contains("MISSING"));

        let err = issues(load("[providers.x]\nkind = \"bogus\"\n", &[]).unwrap_err());
        assert_eq!(err[0].field, "providers.x.kind");

        let err =
            issues(load("[providers.local]\nkind = \"openai-compatible\"\n", &[]).unwrap_err());
        assert_eq!(err[0].field, "providers.local.base_url");

        let err = issues(load("[providers.\"Bad/Name\"]\nkind = \"mock\"\n", &[]).unwrap_err());
        assert_eq!(err[0].field, "providers.Bad/Name");
    }

    #[test]
    fn provider_key_lists_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let one = dir.path().join("one");
        std::fs::write(&one, "  sk-file-1\n").unwrap();
        let many = dir.path().join("many");
        std::fs::write(&many, "# rotated monthly\nsk-file-2\n\n sk-file-3 \nsk-a\n").unwrap();
        let text = format!(
            r#"
            [upstream]
            key_auth_rest = "1m"
            [providers.o]
            kind = "openai"
            api_key = "sk-a"
            api_keys = ["sk-b", "${{EXTRA}}"]
            api_key_file = "{}"
            api_key_files = ["{}"]
            "#,
            one.display(),
            many.display()
        );
        let config = Config::from_toml(
            &text,
            Path::new("t.toml"),
            &Overrides::default(),
            &env_of(&[("EXTRA", "sk-c")]),
        )
        .unwrap();
        assert_eq!(
            config.providers[0].api_keys,
            [
                "sk-a",
                "sk-b",
                "sk-c",
                "sk-file-1",
                "sk-file-2",
                "sk-file-3"
            ]
        );
        assert_eq!(config.upstream.key_auth_rest, Duration::from_secs(60));
        let debug = format!("{:?}", config.providers[0]);
        assert!(!debug.contains("sk-"), "{debug}");

        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n# nothing\n").unwrap();
        let text = format!(
            "[providers.o]\nkind = \"openai\"\napi_key_file = \"{}\"\napi_key_files = [\"{}\"]\n",
            empty.display(),
            dir.path().join("missing").display()
        );
        let err = issues(
            Config::from_toml(&text, Path::new("t.toml"), &Overrides::default(), &|_| None)
                .unwrap_err(),
        );
        let fields: Vec<_> = err.iter().map(|i| i.field.as_str()).collect();
        assert_eq!(
            fields,
            ["providers.o.api_key_file", "providers.o.api_key_files[0]"]
        );
        assert!(err[1].message.contains("cannot read"), "{err:?}");
    }

    #[test]
    fn every_field_of_every_section_lands_in_its_section() {
        let config = load(
            r#"
            [server]
            listen = "127.0.0.1:7001"
            max_call_duration = "9m"
            default_call_timeout = "4m"
            deadline_margin = "7ms"
            shutdown_grace = "11s"
            [upstream]
            connect_timeout = "3s"
            pool_idle_timeout = "80s"
            pool_max_idle_per_host = 17
            stream_idle_timeout = "45s"
            key_auth_rest = "2m"
            [log]
            level = "debug"
            format = "json"
            bodies = true
            body_max_bytes = 100
            otlp_endpoint = "http://127.0.0.1:4317"
            service_name = "gw"
            [auth]
            require_keys = true
            [teams.search]
            requests_per_minute = 600
            tokens_per_minute = 1000000
            daily_budget_usd = 50.0
            monthly_budget_usd = 1000.0
            [metrics]
            listen = "127.0.0.1:9999"
            tag_labels = ["team"]
            [ledger]
            enabled = true
            queue_capacity = 77
            retention = "2d"
            [executor]
            min_attempt_time = "40ms"
            hedge_budget_ratio = 0.2
            hedge_budget_burst = 12
            hedge_pause_error_rate = 0.4
            [store]
            path = "/tmp/x.db"
            [admin]
            token = "0123456789abcdef"
            listen = "127.0.0.1:7002"
            [health]
            failure_threshold = 6
            error_rate_threshold = 0.6
            min_samples = 21
            open_duration = "31s"
            half_open_probes = 3
            [tls]
            cert = "c.pem"
            key = "k.pem"
            reload_interval = "6s"
            "#,
            &[],
        )
        .unwrap();
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        let server = &config.server;
        assert_eq!(server.listen.port(), 7001);
        assert_eq!(
            (
                server.max_call_duration,
                server.default_call_timeout,
                server.deadline_margin,
                server.shutdown_grace
            ),
            (s(540), s(240), ms(7), s(11))
        );
        let up = &config.upstream;
        assert_eq!(
            (
                up.http.connect_timeout,
                up.http.pool_idle_timeout,
                up.http.pool_max_idle_per_host
            ),
            (s(3), s(80), 17)
        );
        assert_eq!((up.stream_idle_timeout, up.key_auth_rest), (s(45), s(120)));
        assert_eq!(config.executor.stream_idle_timeout, s(45));
        let log = &config.log;
        assert_eq!(
            (log.filter.as_str(), log.format, log.bodies),
            ("debug", crate::telemetry::LogFormat::Json, Some(100))
        );
        assert_eq!(log.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4317"));
        assert_eq!(log.service_name, "gw");
        assert!(config.auth.require_keys);
        let team = &config.teams["search"];
        assert_eq!(
            (
                team.requests_per_minute,
                team.tokens_per_minute,
                team.daily_budget_usd,
                team.monthly_budget_usd
            ),
            (600, 1_000_000, 50.0, 1000.0)
        );
        assert_eq!(config.metrics.listen.map(|a| a.port()), Some(9999));
        assert_eq!(config.metrics.tag_labels, ["team"]);
        assert_eq!(config.ledger.capacity, Some(77));
        assert_eq!(config.ledger.retention, s(2 * 86_400));
        let ex = &config.executor;
        assert_eq!(
            (
                ex.min_attempt_time,
                ex.hedge_budget_ratio,
                ex.hedge_budget_burst,
                ex.hedge_pause_error_rate
            ),
            (ms(40), 0.2, 12.0, 0.4)
        );
        assert_eq!(config.store.path, PathBuf::from("/tmp/x.db"));
        assert_eq!(config.admin.token.as_deref(), Some("0123456789abcdef"));
        assert_eq!(config.admin.listen.map(|a| a.port()), Some(7002));
        let h = &config.health;
        assert_eq!(
            (
                h.failure_threshold,
                h.error_rate_threshold,
                h.min_samples,
                h.open_duration,
                h.half_open_probes
            ),
            (6, 0.6, 21, s(31), 3)
        );
        let tls = config.tls.as_ref().unwrap();
        assert_eq!(
            (tls.cert.as_path(), tls.key.as_path(), tls.reload_interval),
            (Path::new("c.pem"), Path::new("k.pem"), s(6))
        );

        // The overrides win, and problems in them name the override or the field.
        let overrides = Overrides {
            listen: Some("0.0.0.0:7003".into()),
            log_level: Some("warn".into()),
            log_format: Some("text".into()),
            data_dir: Some("/data".into()),
            admin_token: Some("fedcba9876543210".into()),
            metrics_listen: Some("off".into()),
        };
        let config = Config::from_toml(
            "[log]\nformat = \"json\"\n",
            Path::new("t.toml"),
            &overrides,
            &|_| None,
        )
        .unwrap();
        assert_eq!(config.server.listen.port(), 7003);
        // Off loopback, keys are required.
        assert!(config.auth.require_keys);
        assert_eq!(config.log.filter, "warn");
        assert_eq!(config.log.format, crate::telemetry::LogFormat::Text);
        assert_eq!(config.store.path, PathBuf::from("/data/llm-gateway.db"));
        assert_eq!(config.admin.token.as_deref(), Some("fedcba9876543210"));
        assert_eq!(config.metrics.listen, None);
        let bad = Overrides {
            listen: Some("nope".into()),
            log_format: Some("xml".into()),
            ..Overrides::default()
        };
        let err = issues(Config::from_toml("", Path::new("t.toml"), &bad, &|_| None).unwrap_err());
        let fields: Vec<_> = err.iter().map(|i| i.field.as_str()).collect();
        assert_eq!(fields, ["--listen / LLM_GATEWAY_LISTEN", "log.format"]);
    }

    #[test]
    fn the_readme_example_loads() {
        let readme = include_str!("../README.md");
        let section = &readme[readme.find("## Configuration").unwrap()..];
        let start = section.find("```toml\n").unwrap() + "```toml\n".len();
        let example = &section[start..start + section[start..].find("```").unwrap()];
        let config = Config::from_toml(
            example,
            Path::new("README.md"),
            &Overrides::default(),
            &env_of(&[
                ("OPENAI_API_KEY", "sk-1"),
                ("ANTHROPIC_API_KEY", "sk-ant-1"),
                ("GEMINI_API_KEY", "g-1"),
                ("AZURE_OPENAI_API_KEY", "az-1"),
                ("GROQ_API_KEY", "gsk-1"),
                ("GROQ_BATCH_KEY", "gsk-2"),
                ("LLM_GATEWAY_ADMIN_TOKEN", "0123456789abcdef"),
            ]),
        )
        .unwrap();
        assert_eq!(config.providers.len(), 7);
        assert_eq!(config.policies[0].name, "chat-default");
        assert_eq!(config.teams["search"].requests_per_minute, 600);
        assert_eq!(config.models[0].provider, "local-vllm");
    }

    #[test]
    fn tls_section() {
        let config = load(
            "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nclient_ca = \"ca.pem\"\n",
            &[],
        )
        .unwrap();
        let tls = config.tls.unwrap();
        assert_eq!(tls.cert, PathBuf::from("c.pem"));
        assert_eq!(tls.client_ca, Some(PathBuf::from("ca.pem")));
        assert_eq!(tls.reload_interval, Duration::from_secs(5));
        assert!(load("", &[]).unwrap().tls.is_none());
        let err = issues(load("[tls]\ncert = \"c.pem\"\n", &[]).unwrap_err());
        assert_eq!(err[0].field, "tls.key");
    }

    #[test]
    fn interpolation_rules() {
        let env = env_of(&[("A", "1")]);
        assert_eq!(interpolate("x${A}y", &env).unwrap().unwrap(), "x1y");
        assert_eq!(interpolate("${B:-d}", &env).unwrap().unwrap(), "d");
        assert_eq!(interpolate("plain", &env).unwrap(), None);
        assert!(interpolate("${A", &env).is_err());
        assert!(interpolate("${}", &env).is_err());
    }
}
