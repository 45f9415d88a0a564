//! External guardrails: an HTTP hook and a provider's moderation endpoint, configured per
//! profile (`[guardrails.NAME.hook]`, `[guardrails.NAME.moderation]`), so they apply
//! wherever the profile does (its policies, and keys that force it).
//!
//! Each check has a timeout, the phases it runs in (`request`, `response`) and what a
//! failure means (`on_error = "fail_open" | "fail_closed"`). A check runs only when the call
//! has at least its timeout left: one that cannot finish in time does not start, and counts
//! as a failure (fail open: the text passes; fail closed: DEADLINE_EXCEEDED). Every check
//! leaves a [`GuardVerdict`] (decision and latency) in the call's route, is counted in the
//! call's [`super::Tally`] (`direction:hook:allow=1`, `request:moderation:block=1`, ...) and
//! in metrics.
//!
//! # The hook's contract
//! The gateway POSTs JSON (`content-type: application/json`) and never sends secrets:
//! ```json
//! {"version": 1, "phase": "request", "profile": "strict", "request_id": "...",
//!  "policy": "support", "model": "support", "key": "search-prod", "tenant": "search",
//!  "texts": [{"role": "user", "kind": "text", "text": "..."}]}
//! ```
//! `phase` is `request` or `response`; `policy`, `key` and `tenant` (the key's owning team)
//! are `null` when unknown; `texts` are the request's text parts, tool-call arguments and
//! tool results after the profile's own detectors ran (so redacted values never reach the
//! hook), or the reply's texts (`role: "assistant"`). The hook answers 200 with
//! `{"action": "allow"}`, `{"action": "block", "reason": "..."}` (the reason, at most 200
//! characters, goes to the caller in the GUARDRAIL_BLOCKED message) or
//! `{"action": "rewrite", "texts": ["...", ...]}` (one text per text sent, in order). Any
//! other answer (status, body, a rewrite of a stream's reply, which has gone out already)
//! is a failure of the check.
//!
//! # Moderation
//! `POST {base_url}/moderations` of a configured provider (OpenAI's API, or one speaking
//! it), with its first API key: `{"model": ..., "input": ["...", ...]}`; the answer's
//! `results[].flagged`, `categories` and `category_scores`. With `thresholds` (category ->
//! score), a category blocks when its score reaches its threshold; without, `flagged`
//! blocks, naming the flagged categories.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::{
    error::GatewayError,
    types::{GuardCheck, GuardDecision, GuardVerdict},
};

/// `[guardrails.NAME.hook]` as written.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHook {
    /// Where to POST (http or https).
    pub url: String,
    /// The longest wait for an answer, in milliseconds (default 1000).
    pub timeout_ms: Option<u64>,
    /// When it runs: `request`, `response` (default `["request"]`).
    pub phases: Option<Vec<String>>,
    /// `fail_open` or `fail_closed` (default).
    pub on_error: Option<String>,
}

/// `[guardrails.NAME.moderation]` as written.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModeration {
    /// The configured provider (`[providers.NAME]`) whose base URL and first key are used.
    pub provider: String,
    /// The moderation model (default `omni-moderation-latest`).
    pub model: Option<String>,
    /// The longest wait for an answer, in milliseconds (default 1000).
    pub timeout_ms: Option<u64>,
    /// When it runs: `request`, `response` (default `["request"]`).
    pub phases: Option<Vec<String>>,
    /// `fail_open` or `fail_closed` (default).
    pub on_error: Option<String>,
    /// Category -> score from which it blocks (unset: the answer's `flagged` decides).
    #[serde(default)]
    pub thresholds: BTreeMap<String, f64>,
}

/// An API key, never shown by `Debug`.
#[derive(Clone, PartialEq)]
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Hook {
        url: String,
    },
    Moderation {
        url: String,
        key: Option<Secret>,
        model: String,
        thresholds: BTreeMap<String, f64>,
    },
}

/// One compiled external check.
#[derive(Debug, Clone, PartialEq)]
pub struct External {
    kind: Kind,
    timeout: Duration,
    request: bool,
    response: bool,
    fail_open: bool,
}

/// What a provider lookup gives a moderation check: the base URL and the first API key.
pub type ProviderLookup<'a> = &'a dyn Fn(&str) -> Option<(String, Option<String>)>;

struct Common {
    timeout: Duration,
    request: bool,
    response: bool,
    fail_open: bool,
}

fn common(
    at: &str,
    timeout_ms: Option<u64>,
    phases: Option<&[String]>,
    on_error: Option<&str>,
    problems: &mut Vec<(String, String)>,
) -> Common {
    let timeout_ms = timeout_ms.unwrap_or(1000);
    if !(1..=60_000).contains(&timeout_ms) {
        problems.push((
            format!("{at}.timeout_ms"),
            "must be 1 to 60000 milliseconds".to_owned(),
        ));
    }
    let (mut request, mut response) = (phases.is_none(), false);
    for phase in phases.unwrap_or_default() {
        match phase.as_str() {
            "request" => request = true,
            "response" => response = true,
            other => problems.push((
                format!("{at}.phases"),
                format!("`{other}` is not one of request, response"),
            )),
        }
    }
    if !request && !response && phases.is_some_and(<[String]>::is_empty) {
        problems.push((
            format!("{at}.phases"),
            "names no phase (request, response)".to_owned(),
        ));
    }
    let fail_open = match on_error.unwrap_or("fail_closed") {
        "fail_open" => true,
        "fail_closed" => false,
        other => {
            problems.push((
                format!("{at}.on_error"),
                format!("`{other}` is not one of fail_open, fail_closed"),
            ));
            false
        }
    };
    Common {
        timeout: Duration::from_millis(timeout_ms),
        request,
        response,
        fail_open,
    }
}

fn http_url(url: &str) -> bool {
    reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
}

impl External {
    /// Compiles `[guardrails.NAME.hook]` (`at` is its field path).
    pub fn hook(at: &str, raw: &RawHook, problems: &mut Vec<(String, String)>) -> Option<Self> {
        let c = common(
            at,
            raw.timeout_ms,
            raw.phases.as_deref(),
            raw.on_error.as_deref(),
            problems,
        );
        if !http_url(&raw.url) {
            problems.push((
                format!("{at}.url"),
                "must be an http:// or https:// URL".to_owned(),
            ));
            return None;
        }
        Some(Self {
            kind: Kind::Hook {
                url: raw.url.clone(),
            },
            timeout: c.timeout,
            request: c.request,
            response: c.response,
            fail_open: c.fail_open,
        })
    }

    /// Compiles `[guardrails.NAME.moderation]` with the named provider's base URL and key.
    pub fn moderation(
        at: &str,
        raw: &RawModeration,
        providers: ProviderLookup<'_>,
        problems: &mut Vec<(String, String)>,
    ) -> Option<Self> {
        let c = common(
            at,
            raw.timeout_ms,
            raw.phases.as_deref(),
            raw.on_error.as_deref(),
            problems,
        );
        for (category, score) in &raw.thresholds {
            if !(0.0..=1.0).contains(score) {
                problems.push((
                    format!("{at}.thresholds.{category}"),
                    "must be a score from 0 to 1".to_owned(),
                ));
            }
        }
        let Some((base_url, key)) = providers(&raw.provider) else {
            problems.push((
                format!("{at}.provider"),
                format!("`{}` is not a configured provider", raw.provider),
            ));
            return None;
        };
        if !http_url(&base_url) {
            problems.push((
                format!("{at}.provider"),
                format!("provider `{}` has no http(s) base URL", raw.provider),
            ));
            return None;
        }
        Some(Self {
            kind: Kind::Moderation {
                url: format!("{}/moderations", base_url.trim_end_matches('/')),
                key: key.map(Secret),
                model: raw
                    .model
                    .clone()
                    .unwrap_or_else(|| "omni-moderation-latest".to_owned()),
                thresholds: raw.thresholds.clone(),
            },
            timeout: c.timeout,
            request: c.request,
            response: c.response,
            fail_open: c.fail_open,
        })
    }

    /// Whether it runs in this phase (`true`: the request).
    pub fn runs(&self, request: bool) -> bool {
        if request { self.request } else { self.response }
    }

    fn check(&self) -> GuardCheck {
        match self.kind {
            Kind::Hook { .. } => GuardCheck::Hook,
            Kind::Moderation { .. } => GuardCheck::Moderation,
        }
    }
}

/// Who the call is for (what a hook learns about it besides the texts).
#[derive(Debug, Clone, Default)]
pub struct CallInfo {
    /// The request id.
    pub request_id: String,
    /// The policy, if any.
    pub policy: Option<Arc<str>>,
    /// The requested model or policy.
    pub model: String,
    /// The key's name.
    pub key: Option<String>,
    /// The key's owning team.
    pub tenant: Option<String>,
}

/// One text a check sees.
#[derive(Debug, Clone, Serialize)]
pub struct Text<'a> {
    /// `system`, `user`, `assistant`, `tool`, ...
    pub role: &'static str,
    /// `text`, `tool_call` (arguments), `tool_result` or `reasoning`.
    pub kind: &'static str,
    /// The text.
    pub text: &'a str,
}

#[derive(Serialize)]
struct HookRequest<'a> {
    version: u32,
    phase: &'static str,
    profile: &'a str,
    request_id: &'a str,
    policy: Option<&'a str>,
    model: &'a str,
    key: Option<&'a str>,
    tenant: Option<&'a str>,
    texts: &'a [Text<'a>],
}

#[derive(Deserialize)]
struct HookAnswer {
    action: String,
    #[serde(default)]
    reason: String,
    texts: Option<Vec<String>>,
}

#[derive(Serialize)]
struct ModerationRequest<'a> {
    model: &'a str,
    input: Vec<&'a str>,
}

#[derive(Deserialize)]
struct ModerationAnswer {
    results: Vec<ModerationResult>,
}

#[derive(Deserialize)]
struct ModerationResult {
    #[serde(default)]
    flagged: bool,
    #[serde(default)]
    categories: BTreeMap<String, Option<bool>>,
    #[serde(default)]
    category_scores: BTreeMap<String, Option<f64>>,
}

/// What a check decided, for the caller to apply.
#[derive(Debug)]
pub enum Outcome {
    /// Pass as is.
    Pass,
    /// Replace the texts (one per text sent).
    Rewrite(Vec<String>),
    /// Refuse the call.
    Refuse(GatewayError),
}

const MAX_REASON: usize = 200;

/// The hook's reason as it may go to the caller: at most [`MAX_REASON`] characters, no
/// control characters.
fn clean_reason(reason: &str) -> String {
    reason
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_REASON)
        .collect()
}

/// The categories of `answer` that block: over their thresholds, or flagged.
pub fn blocked_categories(
    answer: &[u8],
    thresholds: &BTreeMap<String, f64>,
) -> Option<Vec<String>> {
    let answer: ModerationAnswer = serde_json::from_slice(answer).ok()?;
    let mut out = std::collections::BTreeSet::new();
    for r in &answer.results {
        if thresholds.is_empty() {
            if r.flagged {
                out.extend(
                    r.categories
                        .iter()
                        .filter(|(_, on)| **on == Some(true))
                        .map(|(c, _)| c.clone()),
                );
                if r.categories.values().all(|on| *on != Some(true)) {
                    out.insert("flagged".to_owned());
                }
            }
        } else {
            for (category, threshold) in thresholds {
                if r.category_scores
                    .get(category)
                    .copied()
                    .flatten()
                    .is_some_and(|s| s >= *threshold)
                {
                    out.insert(category.clone());
                }
            }
        }
    }
    Some(out.into_iter().collect())
}

/// A failure of a check: what failed (for the verdict and logs).
struct Failure(String);

/// Runs one check over `texts`. `streamed`: the reply went out already (a rewrite cannot
/// apply). Returns the outcome and the verdict.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site; the parts of a check's context"
)]
pub async fn run(
    ext: &External,
    profile: &str,
    request: bool,
    streamed: bool,
    texts: &[Text<'_>],
    info: &CallInfo,
    client: &reqwest::Client,
    deadline: Instant,
) -> (Outcome, GuardVerdict) {
    let mut verdict = GuardVerdict {
        profile: profile.to_owned(),
        check: ext.check(),
        request,
        decision: GuardDecision::Allow,
        latency: Duration::ZERO,
        detail: String::new(),
    };
    let blocked = |entities: Vec<String>| GatewayError::GuardrailBlocked {
        profiles: vec![profile.to_owned()],
        entities,
        reply: !request,
    };
    let started = Instant::now();
    if deadline.saturating_duration_since(started) < ext.timeout {
        // It could not finish in the call's time: not started.
        return fail(
            ext,
            profile,
            verdict,
            Failure("no time left".to_owned()),
            true,
        );
    }
    let result = tokio::time::timeout(
        ext.timeout,
        call(ext, profile, request, texts, info, client),
    )
    .await
    .unwrap_or_else(|_| Err(Failure("timeout".to_owned())));
    verdict.latency = started.elapsed();
    metrics::histogram!(
        crate::telemetry::names::GUARDRAIL_CHECK_SECONDS,
        "check" => ext.check().name(),
        "phase" => if request { "request" } else { "response" },
    )
    .record(verdict.latency.as_secs_f64());
    let answer = match result {
        Ok(answer) => answer,
        Err(failure) => return fail(ext, profile, verdict, failure, false),
    };
    match (&ext.kind, answer) {
        (Kind::Moderation { thresholds, .. }, body) => {
            match blocked_categories(&body, thresholds) {
                None => fail(
                    ext,
                    profile,
                    verdict,
                    Failure("the answer is not a moderation result".to_owned()),
                    false,
                ),
                Some(categories) if categories.is_empty() => (Outcome::Pass, verdict),
                Some(categories) => {
                    verdict.decision = GuardDecision::Block;
                    verdict.detail = categories.join(",");
                    let entities = categories
                        .into_iter()
                        .map(|c| format!("moderation:{c}"))
                        .collect();
                    (Outcome::Refuse(blocked(entities)), verdict)
                }
            }
        }
        (Kind::Hook { .. }, body) => {
            let Ok(answer) = serde_json::from_slice::<HookAnswer>(&body) else {
                return fail(
                    ext,
                    profile,
                    verdict,
                    Failure("the answer is not a hook verdict".to_owned()),
                    false,
                );
            };
            match (answer.action.as_str(), answer.texts) {
                ("allow", _) => (Outcome::Pass, verdict),
                ("block", _) => {
                    let reason = clean_reason(&answer.reason);
                    verdict.decision = GuardDecision::Block;
                    verdict.detail.clone_from(&reason);
                    let entity = if reason.is_empty() {
                        "hook".to_owned()
                    } else {
                        format!("hook ({reason})")
                    };
                    (Outcome::Refuse(blocked(vec![entity])), verdict)
                }
                ("rewrite", Some(new)) if new.len() == texts.len() && !streamed => {
                    verdict.decision = GuardDecision::Rewrite;
                    (Outcome::Rewrite(new), verdict)
                }
                ("rewrite", _) => fail(
                    ext,
                    profile,
                    verdict,
                    Failure(if streamed {
                        "a rewrite of a streamed reply".to_owned()
                    } else {
                        "a rewrite without one text per text sent".to_owned()
                    }),
                    false,
                ),
                _ => fail(
                    ext,
                    profile,
                    verdict,
                    Failure("the answer's action is not allow, block or rewrite".to_owned()),
                    false,
                ),
            }
        }
    }
}

/// A failed check: its profile decides.
fn fail(
    ext: &External,
    profile: &str,
    mut verdict: GuardVerdict,
    failure: Failure,
    out_of_time: bool,
) -> (Outcome, GuardVerdict) {
    tracing::warn!(profile, check = ext.check().name(), failure = %failure.0, fail_open = ext.fail_open, "guardrail check failed");
    verdict.detail = failure.0;
    if ext.fail_open {
        verdict.decision = GuardDecision::FailedOpen;
        return (Outcome::Pass, verdict);
    }
    verdict.decision = GuardDecision::FailedClosed;
    let err = if out_of_time {
        GatewayError::DeadlineExceeded {
            route: crate::types::Route::default(),
        }
    } else {
        GatewayError::Unavailable {
            reason: "GUARDRAIL_UNAVAILABLE",
            message: format!(
                "the {} of guardrail profile `{profile}` failed ({}) and the profile fails closed",
                ext.check().name(),
                verdict.detail
            ),
            retry_after: None,
        }
    };
    (Outcome::Refuse(err), verdict)
}

/// The HTTP exchange: the answer's body on a 2xx.
async fn call(
    ext: &External,
    profile: &str,
    request: bool,
    texts: &[Text<'_>],
    info: &CallInfo,
    client: &reqwest::Client,
) -> Result<Vec<u8>, Failure> {
    let (url, body, key) = match &ext.kind {
        Kind::Hook { url } => (
            url,
            serde_json::to_vec(&HookRequest {
                version: 1,
                phase: if request { "request" } else { "response" },
                profile,
                request_id: &info.request_id,
                policy: info.policy.as_deref(),
                model: &info.model,
                key: info.key.as_deref(),
                tenant: info.tenant.as_deref(),
                texts,
            }),
            None,
        ),
        Kind::Moderation {
            url, key, model, ..
        } => (
            url,
            serde_json::to_vec(&ModerationRequest {
                model,
                input: texts.iter().map(|t| t.text).collect(),
            }),
            key.as_ref(),
        ),
    };
    let body = body.map_err(|e| Failure(format!("cannot encode the request: {e}")))?;
    let mut req = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body);
    if let Some(key) = key {
        req = req.bearer_auth(&key.0);
    }
    let resp = req.send().await.map_err(|e| {
        Failure(if e.is_connect() {
            "cannot connect".to_owned()
        } else {
            "the request failed".to_owned()
        })
    })?;
    let status = resp.status();
    if !status.is_success() {
        return Err(Failure(format!("status {}", status.as_u16())));
    }
    let body = resp
        .bytes()
        .await
        .map_err(|_| Failure("the answer broke off".to_owned()))?;
    Ok(body.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moderation_answers_block_by_flag_or_threshold() {
        // The shape of OpenAI's answer (`results[].flagged/categories/category_scores`).
        let answer =
            br#"{"id":"modr-1","model":"omni-moderation-latest","results":[{"flagged":true,
            "categories":{"harassment":false,"violence":true,"violence/graphic":null},
            "category_scores":{"harassment":0.31,"violence":0.92,"violence/graphic":0.01},
            "category_applied_input_types":{"violence":["text"]}}]}"#;
        let none = BTreeMap::new();
        assert_eq!(
            blocked_categories(answer, &none).unwrap(),
            vec!["violence".to_owned()]
        );
        let low = BTreeMap::from([("harassment".to_owned(), 0.3)]);
        assert_eq!(
            blocked_categories(answer, &low).unwrap(),
            vec!["harassment".to_owned()]
        );
        let high = BTreeMap::from([("violence".to_owned(), 0.95)]);
        assert!(blocked_categories(answer, &high).unwrap().is_empty());
        assert!(blocked_categories(b"{}", &none).is_none());
    }

    #[test]
    fn settings_name_their_fields() {
        let mut problems = Vec::new();
        let raw = RawHook {
            url: "ftp://x".into(),
            timeout_ms: Some(0),
            phases: Some(vec!["both".into()]),
            on_error: Some("ignore".into()),
        };
        assert!(External::hook("guardrails.p.hook", &raw, &mut problems).is_none());
        let fields: Vec<&str> = problems.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "guardrails.p.hook.timeout_ms",
                "guardrails.p.hook.phases",
                "guardrails.p.hook.on_error",
                "guardrails.p.hook.url"
            ]
        );
        let mut problems = Vec::new();
        let raw = RawModeration {
            provider: "nope".into(),
            ..RawModeration::default()
        };
        assert!(External::moderation("m", &raw, &|_| None, &mut problems).is_none());
        assert_eq!(problems[0].0, "m.provider");
        assert_eq!(clean_reason("a\nb"), "ab");
    }
}
