//! Reloading without a restart, on SIGHUP and on the Admin `ReloadConfig` RPC: the config
//! file and the environment are read again (key files included), and what can change in
//! place changes:
//!
//! - each provider's API keys (and `upstream.key_auth_rest`): swapped atomically in its
//!   [`KeyRing`](crate::providers::KeyRing); calls in flight finish on the key they hold;
//! - the TLS certificate, key and client CA (re-read from the same paths).
//!
//! Everything else (listen addresses, providers added or removed or with a new kind or URL,
//! policies in the file, ...) needs a restart: the report lists it, the running gateway keeps
//! its settings. A reload is all or nothing: an invalid config or unusable certificate
//! changes nothing.

use std::sync::Arc;

use tokio::sync::Mutex;

use crate::{
    config::{Config, ConfigError, ProviderConfig},
    executor::ExecutorSettings,
    providers::{ProviderRegistry, UpstreamSettings},
    server::settings::ServerSettings,
    tls::{TlsError, TlsState},
};

/// Produces the configuration afresh (reads the file and the environment).
pub type ConfigSource = Arc<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Settings that changed and now apply, e.g. `providers.openai.api_keys`, `tls`.
    pub reloaded: Vec<String>,
    /// Settings that changed in the file but apply only after a restart, e.g.
    /// `providers.groq (added)`, `server.listen`.
    pub restart_needed: Vec<String>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The gateway was started without a config source (e.g. an embedded test server).
    #[error("this gateway has no config source to reload from")]
    NoSource,
    /// The new configuration is invalid.
    #[error("{}", config_summary(.0))]
    Config(#[from] ConfigError),
    /// The new certificate or key is unusable; the old ones stay.
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// The reload task failed (a bug).
    #[error("the reload task failed")]
    Task,
}

impl From<ReloadError> for crate::error::GatewayError {
    fn from(err: ReloadError) -> Self {
        use crate::error::GatewayError;
        let reason = match &err {
            ReloadError::NoSource => "NO_CONFIG_SOURCE",
            ReloadError::Config(_) => "CONFIG_INVALID",
            ReloadError::Tls(_) => "TLS_INVALID",
            ReloadError::Task => return GatewayError::Internal("the reload failed".to_owned()),
        };
        GatewayError::FailedPrecondition {
            reason,
            message: format!("nothing was reloaded: {err}"),
        }
    }
}

/// A config error without the parser's excerpt of the file (the offending line may hold a
/// key): the position is enough to find it.
fn config_summary(err: &ConfigError) -> String {
    match err {
        ConfigError::Parse { path, message } => format!(
            "config file {} is not valid toml: {}",
            path.display(),
            message.lines().next().unwrap_or("parse error")
        ),
        other => other.to_string(),
    }
}

/// Applies reloads to a running gateway.
pub struct Reloader {
    source: Option<ConfigSource>,
    /// The configuration the gateway started with (what needs a restart is compared to it).
    running: Config,
    providers: ProviderRegistry,
    tls: Option<Arc<TlsState>>,
    serial: Mutex<()>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("has_source", &self.source.is_some())
            .field("providers", &self.providers)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// A reloader for the gateway started with `running`.
    pub fn new(
        source: Option<ConfigSource>,
        running: Config,
        providers: ProviderRegistry,
        tls: Option<Arc<TlsState>>,
    ) -> Self {
        Self {
            source,
            running,
            providers,
            tls,
            serial: Mutex::new(()),
        }
    }

    /// Reads the configuration again and applies what can change in place. Reloads are
    /// serialized.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let _serial = self.serial.lock().await;
        let source = self.source.clone().ok_or(ReloadError::NoSource)?;
        let tls = self.tls.clone();
        // File reads block: run them off the runtime's workers.
        let (new, tls_config) = tokio::task::spawn_blocking(move || {
            let new = source()?;
            let tls_config = match (&tls, &new.tls) {
                (Some(state), Some(paths)) if state.paths() == paths => {
                    Some(crate::tls::server_config(paths)?)
                }
                _ => None,
            };
            Ok::<_, ReloadError>((new, tls_config))
        })
        .await
        .map_err(|_| ReloadError::Task)??;
        let report = self.apply(&new, tls_config.is_some());
        if let (Some(state), Some(_)) = (&self.tls, tls_config) {
            // Validated above; reading again keeps the recorded file stamps current.
            state.reload()?;
        }
        tracing::info!(
            reloaded = ?report.reloaded,
            restart_needed = ?report.restart_needed,
            "configuration reloaded"
        );
        Ok(report)
    }

    /// Swaps key sets and lists what changed, section by section. The destructure is
    /// exhaustive: a new section of [`Config`] does not compile until it is decided here
    /// whether it reloads in place or needs a restart.
    fn apply(&self, new: &Config, tls_reloaded: bool) -> ReloadReport {
        let Config {
            server,
            upstream,
            log,
            providers,
            models,
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
        } = &self.running;
        let mut report = ReloadReport::default();
        self.apply_providers(providers, new, &mut report);
        match (tls, &new.tls) {
            (Some(_), Some(_)) if tls_reloaded => report.reloaded.push("tls".to_owned()),
            (None, None) => {}
            _ => report.restart_needed.push("tls".to_owned()),
        }
        let mut restart = |name: &str, differs: bool| {
            if differs {
                report.restart_needed.push(name.to_owned());
            }
        };
        restart("server.listen", server.listen != new.server.listen);
        restart("connections", connections != &new.connections);
        restart("admission", admission != &new.admission);
        let server_rest = ServerSettings {
            listen: new.server.listen,
            ..server.clone()
        };
        restart("server", server_rest != new.server);
        // `upstream.key_auth_rest` applies in place, with the keys.
        let upstream_rest = UpstreamSettings {
            key_auth_rest: new.upstream.key_auth_rest,
            ..upstream.clone()
        };
        restart("upstream", upstream_rest != new.upstream);
        restart("log", *log != new.log);
        restart("models", *models != new.models);
        restart("policies", *policies != new.policies);
        restart("store", *store != new.store);
        restart("admin", *admin != new.admin);
        restart("health", *health != new.health);
        // `executor.stream_idle_timeout` is `upstream.stream_idle_timeout`, reported there.
        let executor_rest = ExecutorSettings {
            stream_idle_timeout: new.executor.stream_idle_timeout,
            ..executor.clone()
        };
        restart("executor", executor_rest != new.executor);
        restart("pacing", *pacing != new.pacing);
        restart("metrics", *metrics != new.metrics);
        restart("ledger", *ledger != new.ledger);
        restart("cache", *cache != new.cache);
        restart("auth", *auth != new.auth);
        restart("batch", *batch != new.batch);
        restart("teams", *teams != new.teams);
        restart("http", *http != new.http);
        restart("guardrails", *guardrails != new.guardrails);
        restart("shared", *shared != new.shared);
        restart("audit", *audit != new.audit);
        report
    }

    /// Swaps each provider's keys (and the key rest time); a provider added, removed or
    /// with a new kind, URL or model list needs a restart.
    fn apply_providers(&self, running: &[ProviderConfig], new: &Config, report: &mut ReloadReport) {
        for old in running {
            let name = &old.name;
            let Some(fresh) = new.providers.iter().find(|p| &p.name == name) else {
                report
                    .restart_needed
                    .push(format!("providers.{name} (removed)"));
                continue;
            };
            if fresh.kind != old.kind
                || fresh.settings != old.settings
                || fresh.base_url != old.base_url
                || fresh.models != old.models
                || fresh.pacing != old.pacing
                || fresh.http2_prior_knowledge != old.http2_prior_knowledge
            {
                report.restart_needed.push(format!("providers.{name}"));
            }
            let Some(ring) = self.providers.get(name).and_then(|p| p.keys()) else {
                if !fresh.api_keys.is_empty() {
                    report
                        .restart_needed
                        .push(format!("providers.{name}.api_keys"));
                }
                continue;
            };
            let auth_rest = new.upstream.key_auth_rest;
            if !ring.same_keys(&fresh.api_keys) || ring.auth_rest() != auth_rest {
                ring.replace(fresh.api_keys.clone(), auth_rest);
                report.reloaded.push(format!("providers.{name}.api_keys"));
            }
        }
        for fresh in &new.providers {
            if !running.iter().any(|p| p.name == fresh.name) {
                report
                    .restart_needed
                    .push(format!("providers.{} (added)", fresh.name));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{config::Overrides, server::providers_from_config};

    fn config(text: &str) -> Config {
        Config::from_toml(text, Path::new("t.toml"), &Overrides::default(), &|_| None).unwrap()
    }

    const BASE: &str = r#"
[providers.a]
kind = "openai-compatible"
base_url = "http://127.0.0.1:9/v1"
api_keys = ["k1", "k2"]
[providers.b]
kind = "openai-compatible"
base_url = "http://127.0.0.1:9/v1"
"#;

    fn reloader(next: &str) -> Reloader {
        let running = config(BASE);
        let providers = providers_from_config(&running).unwrap();
        let next = next.to_owned();
        let source: ConfigSource = Arc::new(move || {
            Config::from_toml(&next, Path::new("t.toml"), &Overrides::default(), &|_| None)
        });
        Reloader::new(Some(source), running, providers, None)
    }

    #[tokio::test]
    async fn keys_swap_and_the_rest_is_reported() {
        let r = reloader(
            r#"
[server]
listen = "127.0.0.1:1"
[providers.a]
kind = "openai-compatible"
base_url = "http://127.0.0.1:9/v1"
api_keys = ["k2", "k3"]
[providers.c]
kind = "mock"
"#,
        );
        let report = r.reload().await.unwrap();
        assert_eq!(report.reloaded, ["providers.a.api_keys"]);
        assert_eq!(
            report.restart_needed,
            [
                "providers.b (removed)",
                "providers.c (added)",
                "server.listen"
            ]
        );
        let ring = r.providers.get("a").unwrap().keys().unwrap();
        assert!(ring.same_keys(&["k2".to_owned(), "k3".to_owned()]));
        // A second reload of the same file changes no key.
        assert!(r.reload().await.unwrap().reloaded.is_empty());
    }

    #[tokio::test]
    async fn sections_are_compared_by_value() {
        // The same file again: nothing to report.
        let same = reloader(BASE).reload().await.unwrap();
        assert_eq!(same, ReloadReport::default());

        let r = reloader(&format!(
            r#"{BASE}
[server]
deadline_margin = "20ms"
[upstream]
key_auth_rest = "1m"
stream_idle_timeout = "30s"
[health]
failure_threshold = 3
[auth]
require_keys = true
[teams.search]
requests_per_minute = 10
"#
        ));
        let report = r.reload().await.unwrap();
        // The key rest applies in place (same keys, new rest, for each key ring); the other
        // sections wait for a restart.
        assert_eq!(
            report.reloaded,
            ["providers.a.api_keys", "providers.b.api_keys"]
        );
        assert_eq!(
            report.restart_needed,
            ["server", "upstream", "health", "auth", "teams"]
        );
        let ring = r.providers.get("a").unwrap().keys().unwrap();
        assert_eq!(ring.auth_rest(), std::time::Duration::from_secs(60));
    }

    #[tokio::test]
    async fn an_invalid_config_changes_nothing() {
        let r = reloader("[providers.a]\nkind = \"bogus\"\n");
        assert!(matches!(r.reload().await, Err(ReloadError::Config(_))));
        let ring = r.providers.get("a").unwrap().keys().unwrap();
        assert!(ring.same_keys(&["k1".to_owned(), "k2".to_owned()]));
        let none = Reloader::new(None, config(BASE), ProviderRegistry::new(), None);
        assert!(matches!(none.reload().await, Err(ReloadError::NoSource)));
    }
}
