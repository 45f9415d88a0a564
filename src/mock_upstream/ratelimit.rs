//! The mock's per-key requests-per-minute limit, answered the way each provider does.
//!
//! Every API key (as [`super::api_key`] reads it; requests without one share a bucket) has a
//! token bucket holding one minute's requests, refilled continuously (`limit / 60` per
//! second), as OpenAI and Anthropic describe their limits. A request takes one; with none
//! left it gets the provider's own 429 without running. Every answer of a limited key, 2xx
//! or 429, carries the provider's rate-limit headers:
//!
//! - OpenAI (and Azure): `x-ratelimit-limit-requests`, `x-ratelimit-remaining-requests`,
//!   `x-ratelimit-reset-requests` (the time until the bucket is full again, as a Go duration:
//!   `120ms`, `1s`, `6m0s`), and on a 429 `retry-after` (whole seconds until one request
//!   is free).
//! - Anthropic: `anthropic-ratelimit-requests-limit`, `-remaining` and `-reset` (RFC 3339,
//!   when the bucket is full again), and on a 429 `retry-after`.
//! - Gemini sends no rate-limit headers: a 429 is `RESOURCE_EXHAUSTED` with a `RetryInfo`
//!   detail.
//!
//! Bedrock and Vertex are not limited.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::Response,
};
use http::{HeaderMap, HeaderValue};
use tokio::time::Instant;

use super::{MockState, ResponseGuard, anthropic, gemini, openai};

/// The wire format a path belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    OpenAi,
    Anthropic,
    Gemini,
}

impl Flavor {
    fn of(path: &str) -> Option<Flavor> {
        if path == "/v1/chat/completions"
            || (path.starts_with("/openai/deployments/") && path.ends_with("/chat/completions"))
        {
            Some(Flavor::OpenAi)
        } else if path == "/v1/messages" {
            Some(Flavor::Anthropic)
        } else if path.starts_with("/v1beta/models/") {
            Some(Flavor::Gemini)
        } else {
            None
        }
    }

    fn too_many_requests(self, retry_after_secs: u64) -> Response {
        match self {
            Flavor::OpenAi => openai::error_response(429, Some(retry_after_secs)),
            Flavor::Anthropic => anthropic::error_response(429, Some(retry_after_secs)),
            Flavor::Gemini => gemini::error_response(429, Some(retry_after_secs)),
        }
    }
}

/// One key's bucket.
#[derive(Debug)]
struct Bucket {
    limit: u32,
    level: f64,
    updated: Instant,
}

impl Bucket {
    fn rate_per_sec(&self) -> f64 {
        f64::from(self.limit) / 60.0
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * self.rate_per_sec()).min(f64::from(self.limit));
        self.updated = now;
    }

    fn secs_until(&self, level: f64) -> f64 {
        ((level - self.level) / self.rate_per_sec()).max(0.0)
    }
}

/// What the bucket said about one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Whether the request may run.
    pub allowed: bool,
    /// The key's limit per minute.
    pub limit: u32,
    /// Requests left after this one.
    pub remaining: u32,
    /// Until the bucket is full again.
    pub reset: Duration,
    /// Until one request is free (zero when one is).
    pub retry_after: Duration,
}

impl Decision {
    fn headers(&self, flavor: Flavor, headers: &mut HeaderMap) {
        let mut set = |name: &'static str, value: String| {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(name, v);
            }
        };
        match flavor {
            Flavor::OpenAi => {
                set("x-ratelimit-limit-requests", self.limit.to_string());
                set("x-ratelimit-remaining-requests", self.remaining.to_string());
                set("x-ratelimit-reset-requests", go_duration(self.reset));
            }
            Flavor::Anthropic => {
                set("anthropic-ratelimit-requests-limit", self.limit.to_string());
                set(
                    "anthropic-ratelimit-requests-remaining",
                    self.remaining.to_string(),
                );
                let at = SystemTime::now() + self.reset;
                set(
                    "anthropic-ratelimit-requests-reset",
                    humantime::format_rfc3339_seconds(at).to_string(),
                );
            }
            Flavor::Gemini => {}
        }
    }

    /// `Retry-After` in whole seconds, rounded up (at least 1).
    fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

/// A duration the way Go prints one (OpenAI's reset headers): `120ms`, `1s`, `1.5s`,
/// `6m0s`.
pub fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let minutes = ms / 60_000;
    let rest_ms = ms % 60_000;
    let secs = if rest_ms.is_multiple_of(1000) {
        format!("{}", rest_ms / 1000)
    } else {
        let text = format!("{:.3}", rest_ms as f64 / 1000.0);
        text.trim_end_matches('0').to_owned()
    };
    if minutes > 0 {
        format!("{minutes}m{secs}s")
    } else {
        format!("{secs}s")
    }
}

/// The per-key limits of one mock and their buckets.
#[derive(Debug, Default)]
pub struct RateLimits {
    /// The limit of keys without their own.
    default: Option<u32>,
    per_key: Mutex<HashMap<String, u32>>,
    buckets: Mutex<HashMap<String, Bucket>>,
    limited: AtomicU64,
}

impl RateLimits {
    /// Limits with `default` requests per minute for every key (`None`: unlimited).
    pub fn new(default: Option<u32>) -> Self {
        Self {
            default: default.filter(|n| *n > 0),
            ..Self::default()
        }
    }

    /// Sets `key`'s own limit (`None`: back to the default).
    pub fn set(&self, key: &str, limit: Option<u32>) {
        if let Ok(mut per_key) = self.per_key.lock() {
            match limit.filter(|n| *n > 0) {
                Some(n) => per_key.insert(key.to_owned(), n),
                None => per_key.remove(key),
            };
        }
        if let Ok(mut buckets) = self.buckets.lock() {
            buckets.remove(key);
        }
    }

    /// Requests answered 429 by the limit.
    pub fn limited(&self) -> u64 {
        self.limited.load(Ordering::SeqCst)
    }

    /// Takes one request for `key` at `now`; `None` when the key is not limited.
    pub fn take(&self, key: &str, now: Instant) -> Option<Decision> {
        let limit = self
            .per_key
            .lock()
            .ok()
            .and_then(|m| m.get(key).copied())
            .or(self.default)?;
        let mut buckets = self.buckets.lock().ok()?;
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            limit,
            level: f64::from(limit),
            updated: now,
        });
        bucket.refill(now);
        let allowed = bucket.level >= 1.0;
        if allowed {
            bucket.level -= 1.0;
        } else {
            self.limited.fetch_add(1, Ordering::SeqCst);
        }
        Some(Decision {
            allowed,
            limit,
            remaining: bucket.level.max(0.0).floor() as u32,
            reset: Duration::from_secs_f64(bucket.secs_until(f64::from(limit))),
            retry_after: Duration::from_secs_f64(bucket.secs_until(1.0)),
        })
    }
}

/// The middleware in front of the chat routes: answers a limited key's request past its
/// limit with the provider's 429, and adds the rate-limit headers to every answer.
pub(super) async fn enforce(State(state): State<MockState>, req: Request, next: Next) -> Response {
    let Some(flavor) = Flavor::of(req.uri().path()) else {
        return next.run(req).await;
    };
    // A refused key gets its 401 from the handler.
    if state.refuses(req.headers()) {
        return next.run(req).await;
    }
    let key = super::api_key(req.headers()).unwrap_or("").to_owned();
    let Some(decision) = state.rates.take(&key, Instant::now()) else {
        return next.run(req).await;
    };
    if !decision.allowed {
        state.stats.record(req.headers(), None);
        ResponseGuard::new(state.stats.clone()).complete();
        let mut response = flavor.too_many_requests(decision.retry_after_secs());
        decision.headers(flavor, response.headers_mut());
        return response;
    }
    let mut response = next.run(req).await;
    decision.headers(flavor, response.headers_mut());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(Duration::from_millis(120)), "120ms");
        assert_eq!(go_duration(Duration::from_secs(1)), "1s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(go_duration(Duration::from_millis(61_250)), "1m1.25s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_gets_its_minute_then_one_request_per_share_of_it() {
        let limits = RateLimits::new(Some(60));
        limits.set("small", Some(2));
        let now = Instant::now();
        for i in 0..2 {
            let d = limits.take("small", now).unwrap();
            assert!(d.allowed);
            assert_eq!(d.remaining, 1 - i);
        }
        let refused = limits.take("small", now).unwrap();
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Duration::from_secs(30));
        assert_eq!(refused.reset, Duration::from_secs(60));
        assert_eq!(refused.retry_after_secs(), 30);
        assert_eq!(limits.limited(), 1);
        // Half a minute later one request is back.
        let later = now + Duration::from_secs(30);
        assert!(limits.take("small", later).unwrap().allowed);
        // Other keys have the default, and unlimited mocks say nothing.
        assert_eq!(limits.take("other", now).unwrap().limit, 60);
        assert_eq!(RateLimits::new(None).take("k", now), None);
    }

    #[test]
    fn headers_per_provider() {
        let d = Decision {
            allowed: true,
            limit: 60,
            remaining: 59,
            reset: Duration::from_secs(1),
            retry_after: Duration::ZERO,
        };
        let mut h = HeaderMap::new();
        d.headers(Flavor::OpenAi, &mut h);
        assert_eq!(h["x-ratelimit-limit-requests"], "60");
        assert_eq!(h["x-ratelimit-remaining-requests"], "59");
        assert_eq!(h["x-ratelimit-reset-requests"], "1s");
        let mut h = HeaderMap::new();
        d.headers(Flavor::Anthropic, &mut h);
        assert_eq!(h["anthropic-ratelimit-requests-remaining"], "59");
        let reset = h["anthropic-ratelimit-requests-reset"].to_str().unwrap();
        assert!(humantime::parse_rfc3339(reset).is_ok(), "{reset}");
        assert_eq!(
            Flavor::of("/v1beta/models/gemini:generateContent"),
            Some(Flavor::Gemini)
        );
        assert_eq!(Flavor::of("/token"), None);
    }
}
