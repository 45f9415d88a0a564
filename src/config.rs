//! Configuration: a TOML file (optional), `${ENV_VAR}` interpolation in its strings,
//! environment and command-line overrides for the common settings, and the zero-config
//! defaults. Raw serde structs (`deny_unknown_fields`) are validated into [`Config`]; every
//! problem names its field.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    executor::ExecutorSettings,
    health::HealthSettings,
    models::RawModel,
    providers::{HttpSettings, RawProvider, kinds},
    routing::policy::PolicySpec,
};

/// The default gRPC listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// A configuration problem, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigIssue {
    /// Dotted path of the field, e.g. `providers.openai.base_url`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    require_keys: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTeam {
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u64>,
    daily_budget_usd: Option<f64>,
    monthly_budget_usd: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<String>,
    key: Option<String>,
    client_ca: Option<String>,
    reload_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
    tag_labels: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLedger {
    enabled: Option<bool>,
    queue_capacity: Option<usize>,
    retention: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExecutor {
    min_attempt_time: Option<String>,
    hedge_budget_ratio: Option<f64>,
    hedge_budget_burst: Option<f64>,
    hedge_pause_error_rate: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    token: Option<String>,
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    failure_threshold: Option<u32>,
    error_rate_threshold: Option<f64>,
    min_samples: Option<usize>,
    open_duration: Option<String>,
    half_open_probes: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    max_call_duration: Option<String>,
    default_call_timeout: Option<String>,
    deadline_margin: Option<String>,
    shutdown_grace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    connect_timeout: Option<String>,
    pool_idle_timeout: Option<String>,
    pool_max_idle_per_host: Option<usize>,
    stream_idle_timeout: Option<String>,
    key_auth_rest: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<String>,
    bodies: Option<bool>,
    body_max_bytes: Option<usize>,
    otlp_endpoint: Option<String>,
    service_name: Option<String>,
}

// -------------------------------------------------------------------------------------------
// Validated configuration
// -------------------------------------------------------------------------------------------

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable text.
    Text,
    /// JSON lines, for log pipelines.
    Json,
    /// No log lines (traces may still be exported over OTLP).
    None,
}

/// Log output settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A `tracing_subscriber::EnvFilter` directive, e.g. `info` or `llm_gateway=debug`.
    pub filter: String,
    /// How log lines are written to stderr.
    pub format: LogFormat,
    /// Log upstream request and error bodies (redacted, truncated to this many bytes).
    pub bodies: Option<usize>,
    /// Export traces over OTLP/gRPC to this endpoint (e.g. `http://127.0.0.1:4317`).
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of exported traces.
    pub service_name: String,
}

pub use crate::providers::{ProviderConfig, kinds::valid_provider_name};

/// The validated configuration. Its `Debug` output never shows the admin token (provider
/// keys are redacted by [`ProviderConfig`]'s own `Debug`).
#[derive(Clone)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// The longest any call may run, whatever the caller's deadline.
    pub max_call_duration: Duration,
    /// The budget of a call whose caller set no deadline.
    pub default_call_timeout: Duration,
    /// How much before the caller's deadline the gateway ends a call.
    pub deadline_margin: Duration,
    /// How long in-flight calls may finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Shared HTTP client settings.
    pub http: HttpSettings,
    /// A stream that sends nothing for this long is broken.
    pub stream_idle_timeout: Duration,
    /// Logging.
    pub log: LogConfig,
    /// Providers, in name order.
    pub providers: Vec<ProviderConfig>,
    /// Extra registry entries and price overrides (`provider` is a configured name).
    pub models: Vec<RawModel>,
    /// Policies from the config file (read-only through the API), by name.
    pub policies: Vec<PolicySpec>,
    /// The store file (`:memory:` for none).
    pub store_path: PathBuf,
    /// The admin bearer token; `None` means one is generated in the data directory.
    pub admin_token: Option<String>,
    /// A separate listen address for the admin service.
    pub admin_listen: Option<SocketAddr>,
    /// Circuit breaker settings.
    pub health: HealthSettings,
    /// Fallback and hedging settings.
    pub executor: ExecutorSettings,
    /// The Prometheus endpoint's address; `None` when off.
    pub metrics_listen: Option<SocketAddr>,
    /// Request tags that become metric labels (`tag_<name>`).
    pub metric_tag_labels: Vec<String>,
    /// The usage ledger: queue capacity, or `None` when off.
    pub ledger_capacity: Option<usize>,
    /// How long usage records are kept.
    pub ledger_retention: Duration,
    /// Whether data-plane calls need a gateway key (also when the listen address is not
    /// loopback).
    pub require_keys: bool,
    /// Limits and budgets per team (a key's owner).
    pub teams: std::collections::HashMap<String, crate::limits::TeamLimits>,
    /// How long a provider key rests after a 401 or 403 (when the provider has others).
    pub key_auth_rest: Duration,
    /// TLS for the gRPC listeners; `None` for plain TCP.
    pub tls: Option<TlsConfig>,
}

/// TLS settings of the gRPC listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The certificate chain (PEM).
    pub cert: PathBuf,
    /// The private key (PEM).
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs (PEM).
    pub client_ca: Option<PathBuf>,
    /// How often the files are checked for changes.
    pub reload_interval: Duration,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("max_call_duration", &self.max_call_duration)
            .field("default_call_timeout", &self.default_call_timeout)
            .field("deadline_margin", &self.deadline_margin)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("http", &self.http)
            .field("stream_idle_timeout", &self.stream_idle_timeout)
            .field("log", &self.log)
            .field("providers", &self.providers)
            .field("models", &self.models)
            .field("policies", &self.policies)
            .field("store_path", &self.store_path)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field("admin_listen", &self.admin_listen)
            .field("health", &self.health)
            .field("executor", &self.executor)
            .field("metrics_listen", &self.metrics_listen)
            .field("metric_tag_labels", &self.metric_tag_labels)
            .field("ledger_capacity", &self.ledger_capacity)
            .field("ledger_retention", &self.ledger_retention)
            .field("require_keys", &self.require_keys)
            .field("teams", &self.teams)
            .field("key_auth_rest", &self.key_auth_rest)
            .field("tls", &self.tls)
            .finish()
    }
}

/// The default metrics address.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// The default store file, relative to the working directory.
pub const DEFAULT_STORE_PATH: &str = ".llm-gateway/llm-gateway.db";

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

/// Parses a duration such as `250ms`, `30s`, `2m` or `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration ({e}); use e.g. `250ms`, `30s`, `2m`"))
}

struct Issues(Vec<ConfigIssue>);

impl Issues {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigIssue {
            field: field.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, field: &str, value: Option<&str>, default: Duration) -> Duration {
        match value.map(parse_duration) {
            None => default,
            Some(Ok(d)) if d > Duration::ZERO => d,
            Some(Ok(_)) => {
                self.push(field, "must be greater than zero");
                default
            }
            Some(Err(e)) => {
                self.push(field, e);
                default
            }
        }
    }
}

fn validate(
    raw: RawConfig,
    overrides: &Overrides,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let mut issues = Issues(Vec::new());

    let (listen_field, listen_text) = match &overrides.listen {
        Some(l) => ("--listen / LLM_GATEWAY_LISTEN", l.clone()),
        None => (
            "server.listen",
            raw.server
                .listen
                .unwrap_or_else(|| DEFAULT_LISTEN.to_owned()),
        ),
    };
    let listen = listen_text.parse().unwrap_or_else(|_| {
        issues.push(
            listen_field,
            format!("`{listen_text}` is not a socket address like 127.0.0.1:50051"),
        );
        SocketAddr::from(([127, 0, 0, 1], 50051))
    });

    let max_call_duration = issues.duration(
        "server.max_call_duration",
        raw.server.max_call_duration.as_deref(),
        Duration::from_secs(600),
    );
    let default_call_timeout = issues.duration(
        "server.default_call_timeout",
        raw.server.default_call_timeout.as_deref(),
        Duration::from_secs(300).min(max_call_duration),
    );
    if default_call_timeout > max_call_duration {
        issues.push(
            "server.default_call_timeout",
            "must not be longer than server.max_call_duration",
        );
    }
    let deadline_margin = match raw.server.deadline_margin.as_deref().map(parse_duration) {
        None => Duration::from_millis(5),
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            issues.push("server.deadline_margin", e);
            Duration::ZERO
        }
    };
    let shutdown_grace = issues.duration(
        "server.shutdown_grace",
        raw.server.shutdown_grace.as_deref(),
        Duration::from_secs(30),
    );

    let defaults = HttpSettings::default();
    let http = HttpSettings {
        connect_timeout: issues.duration(
            "upstream.connect_timeout",
            raw.upstream.connect_timeout.as_deref(),
            defaults.connect_timeout,
        ),
        pool_idle_timeout: issues.duration(
            "upstream.pool_idle_timeout",
            raw.upstream.pool_idle_timeout.as_deref(),
            defaults.pool_idle_timeout,
        ),
        pool_max_idle_per_host: raw
            .upstream
            .pool_max_idle_per_host
            .unwrap_or(defaults.pool_max_idle_per_host),
    };
    let stream_idle_timeout = issues.duration(
        "upstream.stream_idle_timeout",
        raw.upstream.stream_idle_timeout.as_deref(),
        Duration::from_secs(60),
    );

    let log_format = overrides
        .log_format
        .clone()
        .or(raw.log.format)
        .unwrap_or_else(|| "text".to_owned());
    let format = match log_format.as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        "none" => LogFormat::None,
        other => {
            issues.push(
                "log.format",
                format!("`{other}` is not one of: text, json, none"),
            );
            LogFormat::Text
        }
    };
    let filter = overrides
        .log_level
        .clone()
        .or(raw.log.level)
        .unwrap_or_else(|| "info".to_owned());
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&filter) {
        issues.push(
            "log.level",
            format!("`{filter}` is not a valid filter: {e}"),
        );
    }

    let mut providers = Vec::new();
    let raw_providers = if raw.providers.is_empty() {
        let mut found = Vec::new();
        let discovered = kinds::discover(env, &mut found);
        for issue in found {
            issues.push(issue.field, issue.message);
        }
        discovered
    } else {
        raw.providers
    };
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
    for (i, m) in raw.models.iter().enumerate() {
        if !providers.iter().any(|p| p.name == m.provider) {
            issues.push(
                format!("models[{i}].provider"),
                format!("`{}` is not a configured provider", m.provider),
            );
        }
        for (name, price) in [
            ("input", m.input),
            ("output", m.output),
            ("cached_input", m.cached_input),
            ("cache_write", m.cache_write),
        ] {
            if price.is_some_and(|p| !p.is_finite() || p < 0.0) {
                issues.push(format!("models[{i}].{name}"), "must be zero or more");
            }
        }
    }

    let mut policies = Vec::new();
    for (name, mut spec) in raw.policies {
        if !spec.name.is_empty() && spec.name != name {
            issues.push(
                format!("policies.{name}.name"),
                "must be left out or equal the table name",
            );
        }
        spec.name = name;
        policies.push(spec);
    }

    let store_path = match (&overrides.data_dir, raw.store.path) {
        (Some(dir), _) => dir.join("llm-gateway.db"),
        (None, Some(path)) => PathBuf::from(path),
        (None, None) => PathBuf::from(DEFAULT_STORE_PATH),
    };
    let admin_token = overrides
        .admin_token
        .clone()
        .or(raw.admin.token)
        .filter(|t| !t.is_empty());
    if admin_token.as_ref().is_some_and(|t| t.len() < 16) {
        issues.push("admin.token", "must be at least 16 characters");
    }
    let admin_listen = raw.admin.listen.and_then(|l| match l.parse() {
        Ok(addr) => Some(addr),
        Err(_) => {
            issues.push("admin.listen", format!("`{l}` is not a socket address"));
            None
        }
    });
    let hd = HealthSettings::default();
    let health = HealthSettings {
        failure_threshold: raw
            .health
            .failure_threshold
            .unwrap_or(hd.failure_threshold)
            .max(1),
        error_rate_threshold: match raw.health.error_rate_threshold {
            Some(r) if !(r > 0.0 && r <= 1.0) => {
                issues.push(
                    "health.error_rate_threshold",
                    "must be above 0 and at most 1",
                );
                hd.error_rate_threshold
            }
            Some(r) => r,
            None => hd.error_rate_threshold,
        },
        min_samples: raw.health.min_samples.unwrap_or(hd.min_samples),
        open_duration: issues.duration(
            "health.open_duration",
            raw.health.open_duration.as_deref(),
            hd.open_duration,
        ),
        half_open_probes: raw
            .health
            .half_open_probes
            .unwrap_or(hd.half_open_probes)
            .max(1),
        ..hd
    };

    let ed = ExecutorSettings::default();
    let mut share = |field: &str, value: Option<f64>, default: f64, max: f64| match value {
        Some(v) if !(0.0..=max).contains(&v) => {
            issues.push(field, format!("must be between 0 and {max}"));
            default
        }
        Some(v) => v,
        None => default,
    };
    let hedge_budget_ratio = share(
        "executor.hedge_budget_ratio",
        raw.executor.hedge_budget_ratio,
        ed.hedge_budget_ratio,
        1.0,
    );
    let hedge_budget_burst = share(
        "executor.hedge_budget_burst",
        raw.executor.hedge_budget_burst,
        ed.hedge_budget_burst,
        10_000.0,
    );
    let hedge_pause_error_rate = share(
        "executor.hedge_pause_error_rate",
        raw.executor.hedge_pause_error_rate,
        ed.hedge_pause_error_rate,
        1.0,
    );
    let executor = ExecutorSettings {
        stream_idle_timeout,
        min_attempt_time: match raw.executor.min_attempt_time.as_deref().map(parse_duration) {
            None => ed.min_attempt_time,
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                issues.push("executor.min_attempt_time", e);
                ed.min_attempt_time
            }
        },
        hedge_budget_ratio,
        hedge_budget_burst,
        hedge_pause_error_rate,
    };

    let metrics_listen = match overrides
        .metrics_listen
        .as_deref()
        .or(raw.metrics.listen.as_deref())
    {
        None => DEFAULT_METRICS_LISTEN.parse().ok(),
        Some("" | "off") => None,
        Some(l) => match l.parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                issues.push(
                    "metrics.listen",
                    format!("`{l}` is not a socket address (or `off`)"),
                );
                None
            }
        },
    };
    let metric_tag_labels = raw.metrics.tag_labels.unwrap_or_default();
    for (i, tag) in metric_tag_labels.iter().enumerate() {
        if tag.is_empty() || !tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            issues.push(
                format!("metrics.tag_labels[{i}]"),
                "tag label names use letters, digits and `_`",
            );
        }
    }
    if metric_tag_labels.len() > 8 {
        issues.push(
            "metrics.tag_labels",
            "at most 8 tags may become labels (cardinality)",
        );
    }
    let ledger_capacity = raw
        .ledger
        .enabled
        .unwrap_or(true)
        .then_some(raw.ledger.queue_capacity.unwrap_or(10_000).max(1));
    let ledger_retention = issues.duration(
        "ledger.retention",
        raw.ledger.retention.as_deref(),
        Duration::from_secs(30 * 24 * 3600),
    );

    let otlp_endpoint = match raw.log.otlp_endpoint.filter(|e| !e.is_empty()) {
        Some(e) if !(e.starts_with("http://") || e.starts_with("https://")) => {
            issues.push(
                "log.otlp_endpoint",
                format!("`{e}` must start with http:// or https://"),
            );
            None
        }
        other => other,
    };
    // Keys are required whenever the data plane is reachable from other machines.
    let require_keys = raw.auth.require_keys.unwrap_or(false) || !listen.ip().is_loopback();
    let mut teams = std::collections::HashMap::new();
    for (name, t) in raw.teams {
        for (field, value) in [
            ("daily_budget_usd", t.daily_budget_usd),
            ("monthly_budget_usd", t.monthly_budget_usd),
        ] {
            if value.is_some_and(|v| !v.is_finite() || v < 0.0) {
                issues.push(format!("teams.{name}.{field}"), "must be zero or more");
            }
        }
        teams.insert(
            name,
            crate::limits::TeamLimits {
                requests_per_minute: t.requests_per_minute.unwrap_or(0),
                tokens_per_minute: t.tokens_per_minute.unwrap_or(0),
                daily_budget_usd: t.daily_budget_usd.unwrap_or(0.0),
                monthly_budget_usd: t.monthly_budget_usd.unwrap_or(0.0),
            },
        );
    }
    let key_auth_rest = issues.duration(
        "upstream.key_auth_rest",
        raw.upstream.key_auth_rest.as_deref(),
        crate::providers::keys::DEFAULT_AUTH_REST,
    );
    let tls = raw.tls.and_then(|t| tls_config(t, &mut issues));

    if !issues.0.is_empty() {
        return Err(ConfigError::Invalid(issues.0));
    }
    Ok(Config {
        require_keys,
        teams,
        key_auth_rest,
        tls,
        metrics_listen,
        metric_tag_labels,
        ledger_capacity,
        ledger_retention,
        executor,
        policies,
        store_path,
        admin_token,
        admin_listen,
        health,
        listen,
        max_call_duration,
        default_call_timeout,
        deadline_margin,
        shutdown_grace,
        http,
        stream_idle_timeout,
        log: LogConfig {
            filter,
            format,
            bodies: raw
                .log
                .bodies
                .unwrap_or(false)
                .then_some(raw.log.body_max_bytes.unwrap_or(4096)),
            otlp_endpoint,
            service_name: raw
                .log
                .service_name
                .unwrap_or_else(|| "llm-gateway".to_owned()),
        },
        providers,
        models: raw.models,
    })
}

/// Validates `[tls]`: `cert` and `key` are required together; the files are read when the
/// server starts (and on every reload), so that a problem there names the file.
fn tls_config(raw: RawTls, issues: &mut Issues) -> Option<TlsConfig> {
    let reload_interval = issues.duration(
        "tls.reload_interval",
        raw.reload_interval.as_deref(),
        Duration::from_secs(5),
    );
    let path = |field: &str, value: Option<String>, issues: &mut Issues| match value {
        Some(v) if !v.trim().is_empty() => Some(PathBuf::from(v)),
        Some(_) => {
            issues.push(field, "must not be empty");
            None
        }
        None => {
            issues.push(field, "is required in [tls]");
            None
        }
    };
    let cert = path("tls.cert", raw.cert, issues);
    let key = path("tls.key", raw.key, issues);
    let client_ca = match raw.client_ca {
        Some(ca) => Some(path("tls.client_ca", Some(ca), issues)?),
        None => None,
    };
    Some(TlsConfig {
        cert: cert?,
        key: key?,
        client_ca,
        reload_interval,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::openai::{self, MaxTokensField, OpenAiConfig, OpenAiSettings};

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
    }

    fn openai_config(p: &ProviderConfig) -> &OpenAiConfig {
        &p.settings.get::<OpenAiSettings>().unwrap().config
    }

    #[test]
    fn zero_config_is_the_mock_on_loopback() {
        let config = load("", &[]).unwrap();
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
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
        assert_eq!(config.listen.port(), 7000);
        assert_eq!(config.max_call_duration, Duration::from_secs(120));
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
        assert_eq!(config.key_auth_rest, Duration::from_secs(60));
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
