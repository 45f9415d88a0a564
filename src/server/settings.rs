//! The server's own sections: `[server]` (the gRPC listener, the time limits of a call,
//! shutdown), `[admin]` (the admin listener and token), `[http]` (the OpenAI- and
//! Anthropic-compatible front) and `[connections]` (the front door's connection limits,
//! enforced by [`super::conn`]).
//!
//! The one part of `server` below [`crate::config`]: the server runs a whole
//! [`Config`](crate::config::Config), so its own settings sit in this leaf, which uses
//! nothing of the server (the module-graph test holds it to that).

use std::{net::SocketAddr, time::Duration};

use crate::settings::Issues;

/// The default gRPC listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// `[server]` as written in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// `server.listen`.
    pub listen: Option<String>,
    /// `server.max_call_duration`.
    pub max_call_duration: Option<String>,
    /// `server.default_call_timeout`.
    pub default_call_timeout: Option<String>,
    /// `server.deadline_margin`.
    pub deadline_margin: Option<String>,
    /// `server.shutdown_grace`.
    pub shutdown_grace: Option<String>,
}

/// The validated `[server]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
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
}

impl ServerSettings {
    /// Validates `[server]`. `listen_field` names where the listen address came from (the
    /// file, or a command-line/environment override).
    pub fn from_raw(raw: RawServer, listen_field: &str, issues: &mut Issues) -> Self {
        let listen_text = raw.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen = listen_text.parse().unwrap_or_else(|_| {
            issues.push(
                listen_field,
                format!("`{listen_text}` is not a socket address like 127.0.0.1:50051"),
            );
            SocketAddr::from(([127, 0, 0, 1], 50051))
        });
        let max_call_duration = issues.duration(
            "server.max_call_duration",
            raw.max_call_duration.as_deref(),
            Duration::from_secs(600),
        );
        let default_call_timeout = issues.duration(
            "server.default_call_timeout",
            raw.default_call_timeout.as_deref(),
            Duration::from_secs(300).min(max_call_duration),
        );
        if default_call_timeout > max_call_duration {
            issues.push(
                "server.default_call_timeout",
                "must not be longer than server.max_call_duration",
            );
        }
        let deadline_margin = issues.duration_or_zero(
            "server.deadline_margin",
            raw.deadline_margin.as_deref(),
            Duration::from_millis(5),
        );
        let shutdown_grace = issues.duration(
            "server.shutdown_grace",
            raw.shutdown_grace.as_deref(),
            Duration::from_secs(30),
        );
        Self {
            listen,
            max_call_duration,
            default_call_timeout,
            deadline_margin,
            shutdown_grace,
        }
    }
}

/// `[admin]` as written in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// `admin.token`.
    pub token: Option<String>,
    /// `admin.listen`.
    pub listen: Option<String>,
    /// `admin.console`.
    pub console: Option<bool>,
}

/// The validated `[admin]` section. `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminSettings {
    /// The admin bearer token; `None` means one is generated in the data directory.
    pub token: Option<String>,
    /// A separate listen address for the admin service.
    pub listen: Option<SocketAddr>,
    /// Whether the listener that carries the Admin API also serves the console and the JSON
    /// mapping of the API to HTTP/1.1 clients (default on).
    pub console: bool,
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            token: None,
            listen: None,
            console: true,
        }
    }
}

impl std::fmt::Debug for AdminSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminSettings")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("listen", &self.listen)
            .field("console", &self.console)
            .finish()
    }
}

impl AdminSettings {
    /// Validates `[admin]`.
    pub fn from_raw(raw: RawAdmin, issues: &mut Issues) -> Self {
        let token = raw.token.filter(|t| !t.is_empty());
        if token.as_ref().is_some_and(|t| t.len() < 16) {
            issues.push("admin.token", "must be at least 16 characters");
        }
        let listen = raw.listen.and_then(|l| match l.parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                issues.push("admin.listen", format!("`{l}` is not a socket address"));
                None
            }
        });
        Self {
            token,
            listen,
            console: raw.console.unwrap_or(true),
        }
    }
}

/// The default listen address of the HTTP front.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8080";

/// The default body limit of the HTTP front (inline images make requests large).
pub const DEFAULT_HTTP_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// `[http]` as written in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpFront {
    /// `http.listen`: an address, or `off`.
    pub listen: Option<String>,
    /// `http.max_body_bytes`.
    pub max_body_bytes: Option<usize>,
}

/// The validated `[http]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpFrontSettings {
    /// Where the HTTP front listens; `None` when off.
    pub listen: Option<SocketAddr>,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
}

impl Default for HttpFrontSettings {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            max_body_bytes: DEFAULT_HTTP_MAX_BODY_BYTES,
        }
    }
}

impl HttpFrontSettings {
    /// Validates `[http]`.
    pub fn from_raw(raw: RawHttpFront, issues: &mut Issues) -> Self {
        let defaults = Self::default();
        let listen = match raw.listen.as_deref().map(str::trim) {
            None => defaults.listen,
            Some("" | "off") => None,
            Some(l) => l.parse().map(Some).unwrap_or_else(|_| {
                issues.push(
                    "http.listen",
                    format!("`{l}` is not a socket address (or `off`)"),
                );
                defaults.listen
            }),
        };
        let max_body_bytes = raw.max_body_bytes.unwrap_or(defaults.max_body_bytes);
        if max_body_bytes < 1024 {
            issues.push("http.max_body_bytes", "must be at least 1024");
        }
        Self {
            listen,
            max_body_bytes,
        }
    }
}

/// Front-door connection settings (`[connections]` in the config file).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnSettings {
    /// TLS handshake plus HTTP/2 preface and first SETTINGS frame must arrive within this.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A connection without open streams for this long is closed (`0s`: never).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Open connections per listener at most; further ones are closed at once.
    pub max_connections: usize,
    /// HTTP/2 PING interval (`0s`: no keepalive pings).
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// A PING not answered within this closes the connection.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// After this a connection gets a GOAWAY so the client reconnects (unset: never).
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Option<Duration>,
    /// How long streams may finish after the age's GOAWAY before the connection is closed.
    #[serde(with = "humantime_serde")]
    pub max_connection_age_grace: Duration,
    /// HTTP/2 connection receive window, in bytes. h2 closes a connection (ENHANCE_YOUR_CALM)
    /// once small DATA frames that are not a stream's last, not yet read, hold more than
    /// half of it: raise it for clients that burst thousands of calls on one connection.
    pub connection_window_bytes: u32,
}

impl Default for ConnSettings {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            max_connections: 4096,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            max_connection_age: None,
            max_connection_age_grace: Duration::from_secs(60),
            connection_window_bytes: 1024 * 1024,
        }
    }
}

impl ConnSettings {
    /// The problems, as `(field, message)` with fields relative to the section.
    pub fn validate(&self) -> Vec<(&'static str, &'static str)> {
        let mut issues = Vec::new();
        if self.handshake_timeout.is_zero() {
            issues.push(("handshake_timeout", "must be greater than zero"));
        }
        if self.max_connections == 0 {
            issues.push(("max_connections", "must be at least 1"));
        }
        if !self.keepalive_interval.is_zero() && self.keepalive_timeout.is_zero() {
            issues.push((
                "keepalive_timeout",
                "must be greater than zero when keepalive_interval is set",
            ));
        }
        if self
            .max_connection_age
            .is_some_and(|a| a < Duration::from_secs(1))
        {
            issues.push(("max_connection_age", "must be at least 1s"));
        }
        // From the protocol's default window to its maximum (2^31 - 1).
        if !(65_535..=2_147_483_647).contains(&self.connection_window_bytes) {
            issues.push((
                "connection_window_bytes",
                "must be between 65535 and 2147483647",
            ));
        }
        issues
    }

    /// The settings as parsed, with their problems pushed to `issues` (fields as
    /// `connections.<name>`).
    pub fn checked(self, issues: &mut Issues) -> Self {
        for (field, message) in self.validate() {
            issues.push(format!("connections.{field}"), message);
        }
        self
    }
}

/// Overload protection at the front (`[admission]`; see [`super::admission`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionSettings {
    /// Chat calls in flight at most (gRPC and HTTP fronts together); `0`: unbounded.
    pub max_in_flight: usize,
    /// Chat calls in flight at most per gateway key; `0`: unbounded.
    pub max_in_flight_per_key: usize,
    /// Calls that may wait for a free slot when all are taken; more are refused at once.
    pub queue: usize,
    /// The longest a call waits in that queue before it is refused.
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// HTTP/2 streams per connection at most (the SETTINGS the gRPC listeners announce).
    pub max_concurrent_streams: u32,
    /// The `RetryInfo` delay a refused call is given.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
}

impl Default for AdmissionSettings {
    fn default() -> Self {
        Self {
            max_in_flight: 2048,
            max_in_flight_per_key: 0,
            queue: 256,
            queue_timeout: Duration::from_millis(20),
            max_concurrent_streams: 1024,
            retry_after: Duration::from_secs(1),
        }
    }
}

impl AdmissionSettings {
    /// The settings as parsed, with their problems pushed to `issues` (fields as
    /// `admission.<name>`).
    pub fn checked(self, issues: &mut Issues) -> Self {
        if self.max_concurrent_streams == 0 {
            issues.push("admission.max_concurrent_streams", "must be at least 1");
        }
        if self.queue > 0 && self.queue_timeout.is_zero() {
            issues.push(
                "admission.queue_timeout",
                "must be greater than zero when queue is set",
            );
        }
        self
    }
}
