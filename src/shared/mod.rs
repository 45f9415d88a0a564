//! State shared by several gateway replicas, in Redis (`[shared]`): the client every
//! shared feature uses, its settings, and what happens when Redis is unreachable.
//!
//! - [`SharedSettings`]: `shared.redis_url` (unset: every replica keeps its state in its own
//!   memory, the single-node default), `shared.mode` (`fail_open` or `fail_closed`), the
//!   per-operation timeout, the connect timeout, the lease TTL and the key prefix.
//! - [`Shared`]: one multiplexed connection ([`redis::aio::ConnectionManager`], pipelined,
//!   reconnecting by itself) with a health flag. The first failed operation marks the
//!   connection degraded (gauge `llm_gateway_shared_state_degraded` = 1, counter
//!   `llm_gateway_shared_state_errors_total{op}`, one warning at most every 10 s); while it is
//!   degraded, callers do not wait on Redis at all ([`Shared::is_degraded`]) and a background
//!   probe ([`Shared::watch`]) pings it every 250 ms until it answers again.
//!
//! - [`rests`]: provider rest state (a target resting after a rate limit or Retry-After, a
//!   provider API key resting after a refusal or a rate limit) published to every replica.
//!
//! What uses it: rate limits, stream leases and budgets ([`crate::limits`]), target rests
//! ([`crate::health`]) and key rests ([`crate::providers::keys`]). Circuit breakers and hedge
//! budgets stay per replica.

pub mod rests;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;

use crate::{settings::Issues, telemetry::names};

/// What a replica does while Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailMode {
    /// Enforce limits and budgets from this replica's memory only (each replica then admits
    /// up to the full limit); calls keep flowing.
    #[default]
    FailOpen,
    /// Refuse calls that need shared limits with UNAVAILABLE.
    FailClosed,
}

/// `[shared]` as written in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShared {
    /// `shared.redis_url`, e.g. `redis://127.0.0.1:6379/0`.
    pub redis_url: Option<String>,
    /// `shared.mode`: `fail_open` (default) or `fail_closed`.
    pub mode: Option<String>,
    /// `shared.timeout`: the longest a call waits on one Redis operation (default 100ms).
    pub timeout: Option<String>,
    /// `shared.connect_timeout`: the longest one connection attempt takes (default 1s).
    pub connect_timeout: Option<String>,
    /// `shared.lease_ttl`: how long a stream lease or budget reservation of a replica that
    /// stopped renewing it lives on (default 15s; renewed every third of it).
    pub lease_ttl: Option<String>,
    /// `shared.key_prefix`: the prefix of every Redis key and channel (default `llmgw`).
    pub key_prefix: Option<String>,
    /// `shared.credit_window`: how long a replica may hold a block of credit taken from the
    /// shared limits, admitting calls without a round trip (default 500ms; `0s`: none,
    /// every call asks Redis).
    pub credit_window: Option<String>,
}

/// The validated `[shared]` section.
#[derive(Clone, PartialEq)]
pub struct SharedSettings {
    /// The Redis URL; `None`: state stays in this replica's memory.
    pub redis_url: Option<String>,
    /// What happens while Redis is unreachable.
    pub mode: FailMode,
    /// Per-operation timeout.
    pub timeout: Duration,
    /// Connection attempt timeout.
    pub connect_timeout: Duration,
    /// Lease lifetime without renewal.
    pub lease_ttl: Duration,
    /// Key and channel prefix.
    pub key_prefix: String,
    /// How long a block of credit lives (zero: no credit).
    pub credit_window: Duration,
}

impl Default for SharedSettings {
    fn default() -> Self {
        Self {
            redis_url: None,
            mode: FailMode::FailOpen,
            timeout: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(15),
            key_prefix: "llmgw".to_owned(),
            credit_window: Duration::from_millis(500),
        }
    }
}

impl std::fmt::Debug for SharedSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedSettings")
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("mode", &self.mode)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("lease_ttl", &self.lease_ttl)
            .field("key_prefix", &self.key_prefix)
            .field("credit_window", &self.credit_window)
            .finish()
    }
}

/// The URL without its password (`redis://user:***@host`).
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl SharedSettings {
    /// Validates `[shared]`; unset fields keep their defaults.
    pub fn from_raw(raw: RawShared, issues: &mut Issues) -> Self {
        let d = SharedSettings::default();
        let redis_url = raw.redis_url.filter(|u| !u.is_empty());
        if let Some(url) = &redis_url
            && let Err(e) = redis::Client::open(url.as_str())
        {
            issues.push(
                "shared.redis_url",
                format!(
                    "is not a redis url (redis://[user:password@]host[:port][/db]): {}",
                    e
                ),
            );
        }
        let mode = match raw.mode.as_deref() {
            None | Some("fail_open") => FailMode::FailOpen,
            Some("fail_closed") => FailMode::FailClosed,
            Some(other) => {
                issues.push(
                    "shared.mode",
                    format!("`{other}` is not a mode: use `fail_open` or `fail_closed`"),
                );
                d.mode
            }
        };
        let key_prefix = match raw.key_prefix {
            Some(p) if p.is_empty() || p.contains(char::is_whitespace) => {
                issues.push("shared.key_prefix", "must be non-empty, without spaces");
                d.key_prefix.clone()
            }
            Some(p) => p,
            None => d.key_prefix.clone(),
        };
        let lease_ttl = issues.duration("shared.lease_ttl", raw.lease_ttl.as_deref(), d.lease_ttl);
        if lease_ttl < Duration::from_millis(300) {
            issues.push("shared.lease_ttl", "must be at least 300ms");
        }
        let credit_window = issues.duration_or_zero(
            "shared.credit_window",
            raw.credit_window.as_deref(),
            d.credit_window,
        );
        if credit_window > Duration::from_secs(60) {
            // A block is at most one window of a rate: a minute's worth is the whole limit.
            issues.push("shared.credit_window", "must be at most 1m (0s: no credit)");
        }
        Self {
            redis_url,
            mode,
            timeout: issues.duration("shared.timeout", raw.timeout.as_deref(), d.timeout),
            connect_timeout: issues.duration(
                "shared.connect_timeout",
                raw.connect_timeout.as_deref(),
                d.connect_timeout,
            ),
            lease_ttl,
            key_prefix,
            credit_window,
        }
    }
}

/// Why a shared operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// Redis answered with an error, or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer within `shared.timeout`.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// The connection is known to be down; not tried.
    #[error("redis is unreachable")]
    Degraded,
    /// A script answered something this version does not understand (a bug or a foreign
    /// script under our keys).
    #[error("unexpected reply from redis: {0}")]
    Reply(String),
}

/// How often a degraded connection is probed.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// The least time between two "shared state degraded" warnings.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// The Redis connection shared by every shared feature of one replica.
pub struct Shared {
    settings: SharedSettings,
    client: redis::Client,
    conn: ConnectionManager,
    degraded: AtomicBool,
    last_warning: Mutex<Option<tokio::time::Instant>>,
    /// Distinguishes this replica's leases and messages from the others'.
    replica_id: String,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("settings", &self.settings)
            .field("degraded", &self.is_degraded())
            .field("replica_id", &self.replica_id)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// A client for `settings.redis_url` (`None` when unset). It connects lazily: a Redis
    /// that is down at start is a degraded connection, not a failed start.
    pub fn connect(settings: &SharedSettings) -> Result<Option<Arc<Shared>>, SharedError> {
        let Some(url) = &settings.redis_url else {
            return Ok(None);
        };
        let client = redis::Client::open(url.as_str())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500))
            .set_pipeline_buffer_size(1024);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        Ok(Some(Arc::new(Shared {
            settings: settings.clone(),
            client,
            conn,
            degraded: AtomicBool::new(false),
            last_warning: Mutex::new(None),
            replica_id: format!("{:016x}", fastrand::u64(..)),
        })))
    }

    /// The settings.
    pub fn settings(&self) -> &SharedSettings {
        &self.settings
    }

    /// This replica's random id (for lease members and messages).
    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    /// `prefix:rest` (built once per subject or target, never per call).
    pub fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.settings.key_prefix)
    }

    /// Whether the last operation failed and the probe has not seen Redis answer since.
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// The client, for connections of their own (pub/sub).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// A handle on the connection (cheap: a clone of the multiplexed connection).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Runs `op` on the connection within `shared.timeout`; a failure marks the connection
    /// degraded (see the module docs). `what` labels the error metric.
    pub async fn run<T, F, Fut>(&self, what: &'static str, op: F) -> Result<T, SharedError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, SharedError>>,
    {
        if self.is_degraded() {
            return Err(SharedError::Degraded);
        }
        let result = match tokio::time::timeout(self.settings.timeout, op(self.conn.clone())).await
        {
            Ok(result) => result,
            Err(_) => Err(SharedError::Timeout(self.settings.timeout)),
        };
        if let Err(err) = &result {
            self.failed(what, err);
        }
        result
    }

    /// Counts a failed operation and marks the connection degraded (logged at most every
    /// 10 s).
    pub fn failed(&self, what: &'static str, err: &SharedError) {
        metrics::counter!(names::SHARED_STATE_ERRORS, "op" => what).increment(1);
        if matches!(err, SharedError::Reply(_)) {
            tracing::error!(op = what, error = %err, "shared state: unexpected redis reply");
            return;
        }
        if !self.degraded.swap(true, Ordering::Relaxed) {
            metrics::gauge!(names::SHARED_STATE_DEGRADED).set(1.0);
        }
        let now = tokio::time::Instant::now();
        let mut last = self
            .last_warning
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_none_or(|at| now.duration_since(at) >= WARN_INTERVAL) {
            *last = Some(now);
            let mode = match self.settings.mode {
                FailMode::FailOpen => "fail_open: limits and budgets are enforced per replica",
                FailMode::FailClosed => "fail_closed: calls are refused",
            };
            tracing::warn!(op = what, error = %err, mode, "shared state degraded: redis is unreachable");
        }
    }

    /// Probes a degraded connection until `stop`: a PING every 250 ms, and the flag cleared
    /// when Redis answers again.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        metrics::gauge!(names::SHARED_STATE_DEGRADED).set(0.0);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(PROBE_INTERVAL) => {}
            }
            if !self.is_degraded() {
                continue;
            }
            let mut conn = self.conn.clone();
            let ping = tokio::time::timeout(
                self.settings.connect_timeout.max(self.settings.timeout),
                redis::cmd("PING").query_async::<String>(&mut conn),
            )
            .await;
            if let Ok(Ok(_)) = ping {
                self.degraded.store(false, Ordering::Relaxed);
                metrics::gauge!(names::SHARED_STATE_DEGRADED).set(0.0);
                tracing::info!("shared state recovered: redis answers again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml: &str) -> Result<SharedSettings, Vec<String>> {
        crate::settings::from_toml(toml, SharedSettings::from_raw)
    }

    #[test]
    fn defaults_and_fields() {
        let s = settings("").unwrap();
        assert_eq!(s, SharedSettings::default());
        let s = settings(
            "redis_url = \"redis://127.0.0.1:6380/2\"\nmode = \"fail_closed\"\ntimeout = \"20ms\"\nlease_ttl = \"3s\"\nkey_prefix = \"gw\"\ncredit_window = \"0s\"",
        )
        .unwrap();
        assert_eq!(s.mode, FailMode::FailClosed);
        assert_eq!(s.timeout, Duration::from_millis(20));
        assert_eq!(s.lease_ttl, Duration::from_secs(3));
        assert_eq!(s.key_prefix, "gw");
        assert_eq!(s.credit_window, Duration::ZERO);
    }

    #[test]
    fn bad_fields_are_named() {
        let errors = settings(
            "redis_url = \"http://x\"\nmode = \"open\"\nlease_ttl = \"10ms\"\nkey_prefix = \"a b\"\ncredit_window = \"2m\"",
        )
        .unwrap_err();
        for field in [
            "shared.redis_url",
            "shared.mode",
            "shared.lease_ttl",
            "shared.key_prefix",
            "shared.credit_window",
        ] {
            assert!(errors.iter().any(|e| e.starts_with(field)), "{errors:?}");
        }
    }

    #[test]
    fn debug_hides_the_password() {
        let s = settings("redis_url = \"redis://user:hunter2@127.0.0.1:6379\"").unwrap();
        let text = format!("{s:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("redis://user:***@127.0.0.1:6379"), "{text}");
    }
}
