//! `[upstream]`: how the gateway talks to providers — the shared HTTP client, the stream
//! idle timeout and how long a rejected key rests.

use std::time::Duration;

use super::HttpSettings;
use crate::settings::Issues;

/// `[upstream]` as written in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// `upstream.connect_timeout`.
    pub connect_timeout: Option<String>,
    /// `upstream.pool_idle_timeout`.
    pub pool_idle_timeout: Option<String>,
    /// `upstream.pool_max_idle_per_host`.
    pub pool_max_idle_per_host: Option<usize>,
    /// `upstream.streams_per_connection`.
    pub streams_per_connection: Option<usize>,
    /// `upstream.stream_idle_timeout`.
    pub stream_idle_timeout: Option<String>,
    /// `upstream.key_auth_rest`.
    pub key_auth_rest: Option<String>,
}

/// The validated `[upstream]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    /// Shared HTTP client settings.
    pub http: HttpSettings,
    /// A stream that sends nothing for this long is broken.
    pub stream_idle_timeout: Duration,
    /// How long a provider key rests after a 401 or 403 (when the provider has others).
    pub key_auth_rest: Duration,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        Self {
            http: HttpSettings::default(),
            stream_idle_timeout: Duration::from_secs(60),
            key_auth_rest: super::keys::DEFAULT_AUTH_REST,
        }
    }
}

impl UpstreamSettings {
    /// Validates `[upstream]`; unset fields keep their defaults.
    pub fn from_raw(raw: RawUpstream, issues: &mut Issues) -> Self {
        let d = UpstreamSettings::default();
        Self {
            http: HttpSettings {
                connect_timeout: issues.duration(
                    "upstream.connect_timeout",
                    raw.connect_timeout.as_deref(),
                    d.http.connect_timeout,
                ),
                pool_idle_timeout: issues.duration(
                    "upstream.pool_idle_timeout",
                    raw.pool_idle_timeout.as_deref(),
                    d.http.pool_idle_timeout,
                ),
                pool_max_idle_per_host: raw
                    .pool_max_idle_per_host
                    .unwrap_or(d.http.pool_max_idle_per_host),
                streams_per_connection: match raw.streams_per_connection {
                    None => d.http.streams_per_connection,
                    Some(n @ 1..=100_000) => n,
                    Some(n) => {
                        issues.push(
                            "upstream.streams_per_connection",
                            format!("must be 1 to 100000, got {n}"),
                        );
                        d.http.streams_per_connection
                    }
                },
            },
            stream_idle_timeout: issues.duration(
                "upstream.stream_idle_timeout",
                raw.stream_idle_timeout.as_deref(),
                d.stream_idle_timeout,
            ),
            key_auth_rest: issues.duration(
                "upstream.key_auth_rest",
                raw.key_auth_rest.as_deref(),
                d.key_auth_rest,
            ),
        }
    }
}
