//! What providers say about their rate limits, read into a [`crate::pacing::Observation`]
//! for outbound pacing. Pure functions over headers and bodies.
//!
//! - OpenAI-style (OpenAI, Azure, Groq and most compatible APIs): `x-ratelimit-limit-requests`,
//!   `x-ratelimit-remaining-requests`, `x-ratelimit-reset-requests` and the same for
//!   `-tokens`; resets are Go durations (`20ms`, `1s`, `6m0s`, `1h2m3.5s`).
//! - Anthropic: `anthropic-ratelimit-requests-limit`, `-remaining`, `-reset` (RFC 3339) and
//!   the same for `tokens` (or, when absent, `input-tokens`).
//! - Gemini and Vertex: no headers; a 429 `RESOURCE_EXHAUSTED` body's `QuotaFailure`
//!   violation names the quota (`quotaId` such as `GenerateRequestsPerMinutePerProjectPerModel`)
//!   and its `quotaValue`, the per-minute limit.
//!
//! A 429's wait (`retry-after`, Gemini's `RetryInfo`) is the classified error's
//! `retry_after`, added by the HTTP adapter.

use std::time::{Duration, SystemTime};

use http::HeaderName;

use crate::pacing::{Observation, Window};

fn header<'a>(headers: &'a http::HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

fn number(value: Option<&str>) -> Option<f64> {
    value?
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
}

/// Parses a Go duration (`300ms`, `1s`, `1.5s`, `6m0s`, `1h2m3s`, `250us`).
pub fn parse_go_duration(value: &str) -> Option<Duration> {
    let mut rest = value.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0f64;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(digits);
        let n: f64 = num.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += n * scale;
        rest = tail;
    }
    (total.is_finite() && total <= 86_400.0 * 366.0).then(|| Duration::from_secs_f64(total))
}

/// The three headers of one window: limit, remaining, reset.
type WindowHeaders = [HeaderName; 3];

static OPENAI_REQUESTS: WindowHeaders = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
];
static OPENAI_TOKENS: WindowHeaders = [
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];
static ANTHROPIC_REQUESTS: WindowHeaders = [
    HeaderName::from_static("anthropic-ratelimit-requests-limit"),
    HeaderName::from_static("anthropic-ratelimit-requests-remaining"),
    HeaderName::from_static("anthropic-ratelimit-requests-reset"),
];
static ANTHROPIC_TOKENS: WindowHeaders = [
    HeaderName::from_static("anthropic-ratelimit-tokens-limit"),
    HeaderName::from_static("anthropic-ratelimit-tokens-remaining"),
    HeaderName::from_static("anthropic-ratelimit-tokens-reset"),
];
static ANTHROPIC_INPUT_TOKENS: WindowHeaders = [
    HeaderName::from_static("anthropic-ratelimit-input-tokens-limit"),
    HeaderName::from_static("anthropic-ratelimit-input-tokens-remaining"),
    HeaderName::from_static("anthropic-ratelimit-input-tokens-reset"),
];

fn openai_window(headers: &http::HeaderMap, names: &WindowHeaders) -> Option<Window> {
    let [limit, remaining, reset] = names;
    let window = Window {
        limit: number(header(headers, limit)),
        remaining: number(header(headers, remaining)),
        reset: header(headers, reset).and_then(parse_go_duration),
    };
    (window != Window::default()).then_some(window)
}

fn anthropic_window(
    headers: &http::HeaderMap,
    names: &WindowHeaders,
    now: SystemTime,
) -> Option<Window> {
    let [limit, remaining, reset] = names;
    let window = Window {
        limit: number(header(headers, limit)),
        remaining: number(header(headers, remaining)),
        reset: header(headers, reset)
            .and_then(|v| humantime::parse_rfc3339_weak(v).ok())
            .map(|at| at.duration_since(now).unwrap_or(Duration::ZERO)),
    };
    (window != Window::default()).then_some(window)
}

/// What an answer's headers say about the account's windows (at wall-clock `now`, for
/// Anthropic's absolute resets). Answers without rate-limit headers (most, off the big
/// providers) cost one pass over their few header names.
pub fn from_headers(headers: &http::HeaderMap, now: SystemTime) -> Observation {
    let (mut openai, mut anthropic) = (false, false);
    for name in headers.keys() {
        let name = name.as_str();
        openai |= name.starts_with("x-ratelimit-");
        anthropic |= name.starts_with("anthropic-ratelimit-");
    }
    let openai_window =
        |names: &'static WindowHeaders| openai.then(|| openai_window(headers, names)).flatten();
    let anthropic_window = |names: &'static WindowHeaders| {
        anthropic
            .then(|| anthropic_window(headers, names, now))
            .flatten()
    };
    Observation {
        requests: openai_window(&OPENAI_REQUESTS).or_else(|| anthropic_window(&ANTHROPIC_REQUESTS)),
        tokens: openai_window(&OPENAI_TOKENS)
            .or_else(|| anthropic_window(&ANTHROPIC_TOKENS))
            .or_else(|| anthropic_window(&ANTHROPIC_INPUT_TOKENS)),
        retry_after: None,
    }
}

#[derive(serde::Deserialize)]
struct GoogleBody {
    error: GoogleError,
}

#[derive(serde::Deserialize)]
struct GoogleError {
    #[serde(default)]
    details: Vec<GoogleDetail>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct GoogleDetail {
    #[serde(default, rename = "@type")]
    kind: String,
    #[serde(default)]
    violations: Vec<GoogleViolation>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct GoogleViolation {
    #[serde(default)]
    quota_id: Option<String>,
    #[serde(default)]
    quota_metric: Option<String>,
    #[serde(default)]
    quota_value: Option<String>,
}

/// The per-minute limits a Google `RESOURCE_EXHAUSTED` body's `QuotaFailure` names, as
/// exhausted windows (remaining 0).
pub fn from_google_quota(body: &[u8]) -> Observation {
    let mut out = Observation::default();
    let Ok(parsed) = serde_json::from_slice::<GoogleBody>(body) else {
        return out;
    };
    for violation in parsed
        .error
        .details
        .iter()
        .filter(|d| d.kind.ends_with("google.rpc.QuotaFailure"))
        .flat_map(|d| &d.violations)
    {
        let name = format!(
            "{} {}",
            violation.quota_id.as_deref().unwrap_or_default(),
            violation.quota_metric.as_deref().unwrap_or_default()
        )
        .to_ascii_lowercase();
        let per_minute = name.contains("perminute") || !name.contains("perday");
        let Some(limit) = number(violation.quota_value.as_deref()).filter(|_| per_minute) else {
            continue;
        };
        let window = Some(Window {
            limit: Some(limit),
            remaining: Some(0.0),
            reset: None,
        });
        if name.contains("token") {
            out.tokens = window;
        } else if name.contains("request") {
            out.requests = window;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    http::HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_go_duration("12ms"), Some(Duration::from_millis(12)));
        assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(
            parse_go_duration("1h2m3.5s"),
            Some(Duration::from_millis(3_723_500))
        );
        assert_eq!(parse_go_duration("soon"), None);
        assert_eq!(parse_go_duration(""), None);
        assert_eq!(parse_go_duration("5"), None);
    }

    #[test]
    fn openai_headers() {
        let h = headers(&[
            ("x-ratelimit-limit-requests", "5000"),
            ("x-ratelimit-remaining-requests", "4999"),
            ("x-ratelimit-reset-requests", "12ms"),
            ("x-ratelimit-limit-tokens", "160000"),
            ("x-ratelimit-remaining-tokens", "159976"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]);
        let o = from_headers(&h, SystemTime::now());
        assert_eq!(
            o.requests,
            Some(Window {
                limit: Some(5000.0),
                remaining: Some(4999.0),
                reset: Some(Duration::from_millis(12)),
            })
        );
        assert_eq!(o.tokens.unwrap().reset, Some(Duration::from_secs(360)));
        assert!(from_headers(&http::HeaderMap::new(), SystemTime::now()).is_empty());
    }

    #[test]
    fn anthropic_headers() {
        let now = humantime::parse_rfc3339("2025-06-01T12:00:00Z").unwrap();
        let h = headers(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "2025-06-01T12:00:05Z"),
            ("anthropic-ratelimit-input-tokens-limit", "40000"),
            ("anthropic-ratelimit-input-tokens-remaining", "39000"),
        ]);
        let o = from_headers(&h, now);
        let r = o.requests.unwrap();
        assert_eq!(
            (r.limit, r.remaining, r.reset),
            (Some(50.0), Some(0.0), Some(Duration::from_secs(5)))
        );
        assert_eq!(o.tokens.unwrap().remaining, Some(39000.0));
    }

    #[test]
    fn google_quota_failures() {
        let body = br#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[
            {"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[
              {"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests",
               "quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier","quotaValue":"10"},
              {"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_input_token_count",
               "quotaId":"GenerateContentInputTokensPerModelPerMinute-FreeTier","quotaValue":"250000"},
              {"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier","quotaValue":"250"}]},
            {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"7s"}]}}"#;
        let o = from_google_quota(body);
        assert_eq!(o.requests.unwrap().limit, Some(10.0));
        assert_eq!(o.tokens.unwrap().limit, Some(250_000.0));
        assert!(from_google_quota(b"not json").is_empty());
    }
}
