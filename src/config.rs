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
    providers::{RawProvider, RawUpstream, UpstreamSettings, kinds},
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
    pacing: crate::pacing::RawPacing,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    ledger: RawLedger,
    #[serde(default)]
    cache: crate::cache::RawCache,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    teams: BTreeMap<String, RawTeam>,
    tls: Option<RawTls>,
    #[serde(default)]
    connections: crate::server::settings::ConnSettings,
    #[serde(default)]
    admission: crate::server::settings::AdmissionSettings,
    #[serde(default)]
    http: RawHttpFront,
    #[serde(default)]
    guardrails: BTreeMap<String, crate::guard::RawProfile>,
    #[serde(default)]
    shared: crate::shared::RawShared,
    #[serde(default)]
    batch: crate::batch::RawBatch,
    #[serde(default)]
    audit: crate::audit::RawAudit,
}

// -------------------------------------------------------------------------------------------
// Validated configuration
// -------------------------------------------------------------------------------------------

pub use crate::providers::{ProviderConfig, kinds::valid_provider_name};

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
    /// `[pacing]`: outbound smoothing.
    pub pacing: crate::pacing::PacingSettings,
    /// `[metrics]`.
    pub metrics: MetricsSettings,
    /// `[ledger]`.
    pub ledger: LedgerSettings,
    /// `[cache]`: the response cache.
    pub cache: crate::cache::CacheSettings,
    /// `[auth]`.
    pub auth: AuthSettings,
    /// `[teams.*]`: limits and budgets per team (a key's owner).
    pub teams: HashMap<String, TeamLimits>,
    /// `[tls]`; `None` for plain TCP.
    pub tls: Option<TlsConfig>,
    /// `[connections]`: the front door's connection limits.
    pub connections: crate::server::settings::ConnSettings,
    /// `[admission]`: the bound on chat calls in flight at the front.
    pub admission: crate::server::settings::AdmissionSettings,
    /// `[http]`: the OpenAI- and Anthropic-compatible front.
    pub http: HttpFrontSettings,
    /// `[guardrails.*]`: guardrail profiles.
    pub guardrails: crate::guard::GuardSettings,
    /// `[shared]`: state shared by replicas, in Redis.
    pub shared: crate::shared::SharedSettings,
    /// `[batch]`: batch jobs.
    pub batch: crate::batch::BatchSettings,
    /// `[audit]`: the audit log of admin changes.
    pub audit: crate::audit::AuditSettings,
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
    let mut store = StoreSettings::from_raw(raw.store, &mut issues);
    if let Some(dir) = &overrides.data_dir {
        store.path = dir.join("llm-gateway.db");
    }
    let admin = AdminSettings::from_raw(raw.admin, &mut issues);
    let health = HealthSettings::from_raw(raw.health, &mut issues);
    let mut executor = ExecutorSettings::from_raw(raw.executor, &mut issues);
    executor.stream_idle_timeout = upstream.stream_idle_timeout;
    let pacing = crate::pacing::PacingSettings::from_raw(raw.pacing, &mut issues);
    let metrics = MetricsSettings::from_raw(raw.metrics, &mut issues);
    let ledger = LedgerSettings::from_raw(raw.ledger, &mut issues);
    let cache = crate::cache::CacheSettings::from_raw(raw.cache, &mut issues);
    let mut auth = AuthSettings::from_raw(raw.auth);
    // Keys are required whenever the data plane is reachable from other machines.
    auth.require_keys |= !server.listen.ip().is_loopback();
    let http = HttpFrontSettings::from_raw(raw.http, &mut issues);
    auth.require_keys |= http.listen.is_some_and(|a| !a.ip().is_loopback());
    let teams = crate::limits::teams_from_raw(raw.teams, &mut issues);
    let tls = raw.tls.and_then(|t| TlsConfig::from_raw(t, &mut issues));
    let connections = crate::server::settings::ConnSettings::checked(raw.connections, &mut issues);
    let guardrails = crate::guard::GuardSettings::from_raw(
        raw.guardrails,
        &|name| {
            let p = providers.iter().find(|p| p.name == name)?;
            Some((p.base_url.clone(), p.api_key().map(str::to_owned)))
        },
        &mut issues,
    );
    let admission = raw.admission.checked(&mut issues);
    let shared = crate::shared::SharedSettings::from_raw(raw.shared, &mut issues);
    let batch = crate::batch::BatchSettings::from_raw(raw.batch, &mut issues);
    let audit = crate::audit::AuditSettings::from_raw(raw.audit, &mut issues);

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
        pacing,
        metrics,
        ledger,
        cache,
        auth,
        teams,
        tls,
        connections,
        admission,
        http,
        guardrails,
        shared,
        batch,
        audit,
    })
}

/// Validates `[providers.*]` (or, when the file has none, the providers found in the
/// environment); the built-in mock when there are none at all.
fn providers(
    raw_providers: BTreeMap<String, RawProvider>,
    env: &dyn Fn(&str) -> Option<String>,
    issues: &mut Issues,
) -> Vec<ProviderConfig> {
    let raw_providers = if raw_providers.is_empty() {
        let mut found = Vec::new();
        let discovered = kinds::discover(env, &mut found);
        for issue in found {
            issues.push(issue.field, issue.message);
        }
        discovered
    } else {
        raw_providers
    };
    let mut providers = Vec::new();
    for (name, p) in raw_providers {
        let mut found = Vec::new();
        let provider = kinds::validate(&name, p, env, &mut found);
        for issue in found {
            match issue.field.as_str() {
                "" => issues.push(format!("providers.{name}"), issue.message),
                field => issues.push(format!("providers.{name}.{field}"), issue.message),
            }
        }
        providers.extend(provider);
    }
    if providers.is_empty() {
        providers.push(ProviderConfig::mock());
    }
    providers
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        providers::openai::{self, MaxTokensField, OpenAiConfig, OpenAiSettings},
        server::settings::DEFAULT_LISTEN,
    };

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

    fn openai_config(p: &ProviderConfig) -> &OpenAiConfig {
        &p.settings.get::<OpenAiSettings>().unwrap().config
    }

    #[test]
    fn zero_config_is_the_mock_on_loopback() {
        let config = load("", &[]).unwrap();
        assert_eq!(config.server.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.providers.len(), 1);
        assert_eq!(config.providers[0].kind, "mock");
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
        let openai = openai_config(p);
        assert_eq!(openai.max_tokens_field, MaxTokensField::MaxTokens);
        assert!(!openai.developer_role);
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
        assert_eq!(anthropic.kind, "anthropic");
        assert_eq!(anthropic.base_url, "http://127.0.0.1:9");
        assert_eq!(anthropic.api_key(), Some("sk-ant-1"));
        let gemini = by_name("gemini");
        assert_eq!(gemini.kind, "gemini");
        assert_eq!(gemini.base_url, crate::providers::gemini::DEFAULT_BASE_URL);
        assert_eq!(gemini.api_key(), Some("g-1"));
        let azure = by_name("azure");
        assert_eq!(azure.kind, "azure");
        assert_eq!(
            openai_config(azure).url("d").unwrap(),
            format!(
                "https://res.openai.azure.com/openai/deployments/d/chat/completions?api-version={}",
                openai::AZURE_DEFAULT_API_VERSION
            )
        );
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
        assert!(
            openai_config(&config.providers[0])
                .url("d")
                .unwrap()
                .ends_with("api-version=2025-04-01-preview")
        );

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
        assert_eq!(groq.kind, "groq");
        // Several accounts of one kind side by side, each with its own key.
        assert_eq!(by_name("groq-team-b").api_key(), Some("gsk-b"));
        let local = by_name("local");
        assert_eq!(local.base_url, "http://127.0.0.1:11434/v1");
        assert_eq!(local.api_key(), None);
        let mistral = by_name("mistral").settings.get::<OpenAiSettings>().unwrap();
        assert_eq!(mistral.registry_kind, "mistral");
        assert_eq!(
            mistral.config.max_tokens_field,
            MaxTokensField::MaxCompletionTokens
        );
        assert!(!mistral.config.stream_usage);
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
            streams_per_connection = 64
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
                up.http.pool_max_idle_per_host,
                up.http.streams_per_connection
            ),
            (s(3), s(80), 17, 64)
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
