//! Per-call accounting: metrics and the usage ledger record, written once when a call ends
//! (successfully, with an error, or because the caller went away).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::time::Instant;
use tonic::Code;

use crate::{
    error::GatewayError,
    ledger::{Ledger, UsageRecord},
    limits::Permit,
    models::Cost,
    telemetry::names,
    types::{AttemptOutcome, Route, Usage},
};

/// What the meter needs from the gateway, shared by all calls.
#[derive(Debug, Clone)]
pub struct MeterConfig {
    /// Where records go.
    pub ledger: Ledger,
    /// Request tags that become metric labels.
    pub tag_labels: Arc<[String]>,
}

/// How a call ended.
pub struct Outcome<'a> {
    /// The status code.
    pub code: Code,
    /// The error class (ErrorInfo reason), for failures.
    pub error_class: &'a str,
    /// The route, when routing happened.
    pub route: Option<&'a Route>,
    /// Usage, when reported.
    pub usage: Option<Usage>,
    /// Cost, when known.
    pub cost: Option<Cost>,
    /// Time to first content, for streams.
    pub ttft: Option<Duration>,
}

impl<'a> Outcome<'a> {
    /// The outcome of a failed call.
    pub fn failed(err: &'a GatewayError, code: Code) -> Self {
        let route = match err {
            GatewayError::Upstream { route, .. } | GatewayError::DeadlineExceeded { route } => {
                Some(route)
            }
            _ => None,
        };
        let error_class = match err {
            GatewayError::Upstream { error, .. } => error.class.reason(),
            other => match other.label() {
                "deadline_exceeded" => "DEADLINE_EXCEEDED",
                "cancelled" => "CANCELLED",
                "invalid_argument" => "INVALID_ARGUMENT",
                "not_found" => "NOT_FOUND",
                "failed_precondition" => "FAILED_PRECONDITION",
                "unavailable" => "UNAVAILABLE",
                "resource_exhausted" => "RESOURCE_EXHAUSTED",
                _ => "INTERNAL",
            },
        };
        Outcome {
            code,
            error_class,
            route,
            usage: None,
            cost: None,
            ttft: None,
        }
    }
}

/// Accounts for one call; see the module docs.
pub struct CallMeter {
    config: MeterConfig,
    rpc: &'static str,
    request_id: String,
    started: Instant,
    policy: String,
    tags: BTreeMap<String, String>,
    done: bool,
    stream: bool,
    key: String,
    permit: Option<Permit>,
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl CallMeter {
    /// Starts accounting for a call.
    pub fn start(config: &MeterConfig, rpc: &'static str, request_id: String) -> Self {
        metrics::gauge!(names::INFLIGHT, "rpc" => rpc).increment(1.0);
        Self {
            config: config.clone(),
            rpc,
            request_id,
            started: Instant::now(),
            policy: String::new(),
            tags: BTreeMap::new(),
            done: false,
            stream: false,
            key: String::new(),
            permit: None,
        }
    }

    /// The request's tags (for the ledger and tag labels).
    pub fn set_tags(&mut self, tags: &BTreeMap<String, String>) {
        self.tags.clone_from(tags);
    }

    /// The gateway key that made the call (for attribution).
    pub fn set_key(&mut self, name: &str) {
        name.clone_into(&mut self.key);
    }

    /// The call's limits permit, settled with the real usage and cost when the call ends.
    pub fn set_permit(&mut self, permit: Permit) {
        self.permit = Some(permit);
    }

    /// The stream is open (counted in `llm_gateway_open_streams` until the meter ends).
    pub fn stream_opened(&mut self) {
        self.stream = true;
        metrics::gauge!(names::OPEN_STREAMS).increment(1.0);
    }

    /// Records the call's end. Later calls do nothing.
    pub fn finish(&mut self, outcome: Outcome<'_>) {
        if self.done {
            return;
        }
        self.done = true;
        let elapsed = self.started.elapsed();
        let route = outcome.route;
        if let Some(policy) = route.and_then(|r| r.policy.as_deref()) {
            policy.clone_into(&mut self.policy);
        }
        // The answering attempt, or the last one tried.
        let last = route.and_then(|r| {
            r.attempts
                .iter()
                .rev()
                .find(|a| a.outcome == AttemptOutcome::Succeeded)
                .or_else(|| {
                    r.attempts
                        .iter()
                        .rev()
                        .find(|a| !matches!(a.outcome, AttemptOutcome::Skipped(_)))
                })
        });
        let provider = last.map_or("", |a| a.provider.as_str()).to_owned();
        let model = last.map_or("", |a| a.model.as_str()).to_owned();
        let attempts = route.map_or(0, |r| {
            r.attempts
                .iter()
                .filter(|a| !matches!(a.outcome, AttemptOutcome::Skipped(_)))
                .count()
        });
        let code = code_name(outcome.code);

        let mut labels: Vec<(&'static str, String)> = vec![
            ("rpc", self.rpc.to_owned()),
            ("policy", self.policy.clone()),
            ("provider", provider.clone()),
            ("model", model.clone()),
            ("code", code.to_owned()),
        ];
        let mut tag_labels: Vec<(String, String)> = Vec::new();
        for tag in self.config.tag_labels.iter() {
            tag_labels.push((
                format!("tag_{tag}"),
                self.tags.get(tag).cloned().unwrap_or_default(),
            ));
        }
        let all: Vec<metrics::Label> = labels
            .drain(..)
            .map(|(k, v)| metrics::Label::new(k, v))
            .chain(
                tag_labels
                    .iter()
                    .map(|(k, v)| metrics::Label::new(k.clone(), v.clone())),
            )
            .collect();
        metrics::counter!(names::CALLS, all.clone()).increment(1);
        metrics::histogram!(names::CALL_DURATION, all).record(elapsed.as_secs_f64());

        let target_labels = |extra: Option<(&'static str, &'static str)>| {
            let mut l = vec![
                metrics::Label::new("policy", self.policy.clone()),
                metrics::Label::new("provider", provider.clone()),
                metrics::Label::new("model", model.clone()),
            ];
            for (k, v) in &tag_labels {
                l.push(metrics::Label::new(k.clone(), v.clone()));
            }
            if let Some((k, v)) = extra {
                l.push(metrics::Label::new(k, v));
            }
            l
        };
        if let Some(ttft) = outcome.ttft {
            metrics::histogram!(names::TIME_TO_FIRST_TOKEN, target_labels(None))
                .record(ttft.as_secs_f64());
        }
        if let Some(u) = &outcome.usage {
            metrics::counter!(names::TOKENS, target_labels(Some(("type", "input"))))
                .increment(u.input_tokens);
            metrics::counter!(names::TOKENS, target_labels(Some(("type", "output"))))
                .increment(u.output_tokens);
            if let Some(cached) = u.cached_input_tokens {
                metrics::counter!(names::TOKENS, target_labels(Some(("type", "cached_input"))))
                    .increment(cached);
            }
        }
        if let Some(cost) = &outcome.cost {
            metrics::histogram!(names::COST, target_labels(None)).record(cost.total_usd());
        }

        if let Some(permit) = self.permit.as_mut() {
            permit.settle(
                outcome.usage.map(|u| u.total_tokens()),
                outcome.cost.map(|c| c.total_usd()),
                super::access::now_ms(),
            );
        }
        let usage = outcome.usage.unwrap_or_default();
        self.config.ledger.record(UsageRecord {
            time_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            request_id: std::mem::take(&mut self.request_id),
            rpc: self.rpc.to_owned(),
            key: std::mem::take(&mut self.key),
            tags: std::mem::take(&mut self.tags),
            policy: std::mem::take(&mut self.policy),
            provider,
            model,
            attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
            cached_input_tokens: usage.cached_input_tokens.unwrap_or(0),
            usage_reported: outcome.usage.is_some(),
            cost_usd: outcome.cost.map(|c| c.total_usd()),
            latency_ms: elapsed.as_secs_f64() * 1000.0,
            ttft_ms: outcome.ttft.map(|t| t.as_secs_f64() * 1000.0),
            code: code.to_owned(),
            error_class: outcome.error_class.to_owned(),
        });
    }
}

impl Drop for CallMeter {
    fn drop(&mut self) {
        // Ended without an outcome: the caller went away (or the call was cut off).
        self.finish(Outcome {
            code: Code::Cancelled,
            error_class: "CANCELLED",
            route: None,
            usage: None,
            cost: None,
            ttft: None,
        });
        metrics::gauge!(names::INFLIGHT, "rpc" => self.rpc).decrement(1.0);
        if self.stream {
            metrics::gauge!(names::OPEN_STREAMS).decrement(1.0);
        }
    }
}
