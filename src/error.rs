//! The gateway's error type and its one mapping to gRPC statuses.
//!
//! Every failure a caller can see is a [`GatewayError`]. [`GatewayError::into_status`] is the
//! single place that picks the gRPC code (an exhaustive match, no catch-all arm) and attaches
//! google.rpc rich details: `ErrorInfo` (domain `llmgateway`, reason from the taxonomy, the
//! attempt trail as metadata), `BadRequest` field violations, `RetryInfo`.
//! Messages are lowercase, say what is wrong, and never carry secrets or raw upstream bodies.

use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    providers::{ErrorClass, ProviderError},
    types::{AttemptOutcome, Route},
};

/// The `ErrorInfo.domain` of every gateway error.
pub const ERROR_DOMAIN: &str = "llmgateway";

/// One invalid field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The field path, e.g. `messages[0].content[1].image.mime_type`.
    pub field: String,
    /// What is wrong with it.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// What an error means; see [`GatewayError::classify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classification {
    /// The `google.rpc.ErrorInfo` reason, e.g. `RATE_LIMIT_REQUESTS`.
    pub reason: &'static str,
    /// The gRPC code.
    pub code: Code,
    /// The level failures of this kind are logged at.
    pub level: tracing::Level,
}

/// A failure of a call, as callers see it.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The request is invalid.
    #[error("invalid request: {}", describe_violations(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// The model, policy or resource does not exist.
    #[error("{message}")]
    NotFound {
        /// ErrorInfo reason, e.g. `MODEL_NOT_FOUND`.
        reason: &'static str,
        /// What was not found.
        message: String,
    },
    /// No or bad credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// The credentials lack a scope.
    #[error("{0}")]
    PermissionDenied(String),
    /// The gateway's own limit or budget is spent.
    #[error("{message}")]
    ResourceExhausted {
        /// ErrorInfo reason.
        reason: &'static str,
        /// What the limit applies to, e.g. `key:search-prod` (QuotaFailure subject).
        subject: String,
        /// What ran out.
        message: String,
        /// When to come back.
        retry_after: Option<Duration>,
    },
    /// A routing constraint cannot be met.
    #[error("{message}")]
    FailedPrecondition {
        /// ErrorInfo reason.
        reason: &'static str,
        /// Which constraint.
        message: String,
    },
    /// The upstream attempts failed; the class of the deciding error picks the code.
    #[error("{error}")]
    Upstream {
        /// The deciding error (the last one, or the non-retryable one).
        error: ProviderError,
        /// Whether every failed attempt was rate limited.
        all_rate_limited: bool,
        /// The route taken.
        route: Route,
    },
    /// The caller's deadline (or the gateway's maximum) ran out.
    #[error("the deadline expired before the call completed")]
    DeadlineExceeded {
        /// The route taken.
        route: Route,
    },
    /// The caller cancelled.
    #[error("the call was cancelled")]
    Cancelled,
    /// The gateway cannot serve now (e.g. shutting down, every target's breaker open).
    #[error("{message}")]
    Unavailable {
        /// ErrorInfo reason.
        reason: &'static str,
        /// Why.
        message: String,
        /// When to come back.
        retry_after: Option<Duration>,
    },
    /// A concurrent change won (stale etag).
    #[error("{0}")]
    Aborted(String),
    /// The resource to create exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// A guardrail profile found entity types whose action is `block`.
    #[error(
        "blocked by guardrail profile {}: the {} contains {}",
        quoted(.profiles), if *.reply { "reply" } else { "request" }, .entities.join(", ")
    )]
    GuardrailBlocked {
        /// The profiles that applied.
        profiles: Vec<String>,
        /// The blocked entity types (never the matched text), sorted.
        entities: Vec<String>,
        /// Whether the reply (not the request) held them.
        reply: bool,
    },
    /// A bug.
    #[error("internal error: {0}")]
    Internal(String),
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(" and ")
}

fn describe_violations(violations: &[FieldViolation]) -> String {
    let mut out = String::new();
    for (i, v) in violations.iter().enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        out.push_str(&v.field);
        out.push_str(": ");
        out.push_str(&v.description);
    }
    out
}

impl GatewayError {
    /// A single invalid field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    /// What this error means, decided once per variant: its ErrorInfo reason, gRPC code and
    /// log level. The status, the metric label, the usage ledger's `error_class` and the log
    /// line all come from here.
    pub fn classify(&self) -> Classification {
        use tracing::Level;
        let (reason, code, level) = match self {
            GatewayError::InvalidArgument(_) => {
                ("INVALID_ARGUMENT", Code::InvalidArgument, Level::DEBUG)
            }
            GatewayError::NotFound { reason, .. } => (*reason, Code::NotFound, Level::DEBUG),
            GatewayError::Unauthenticated(_) => {
                ("UNAUTHENTICATED", Code::Unauthenticated, Level::INFO)
            }
            GatewayError::PermissionDenied(_) => {
                ("PERMISSION_DENIED", Code::PermissionDenied, Level::INFO)
            }
            GatewayError::ResourceExhausted { reason, .. } => {
                (*reason, Code::ResourceExhausted, Level::INFO)
            }
            GatewayError::FailedPrecondition { reason, .. } => {
                (*reason, Code::FailedPrecondition, Level::INFO)
            }
            GatewayError::Upstream {
                error,
                all_rate_limited,
                ..
            } => (
                error.class.reason(),
                upstream_code(error.class, *all_rate_limited),
                Level::INFO,
            ),
            GatewayError::DeadlineExceeded { .. } => {
                ("DEADLINE_EXCEEDED", Code::DeadlineExceeded, Level::INFO)
            }
            GatewayError::Cancelled => ("CANCELLED", Code::Cancelled, Level::INFO),
            GatewayError::Unavailable { reason, .. } => (*reason, Code::Unavailable, Level::INFO),
            GatewayError::Aborted(_) => ("ABORTED", Code::Aborted, Level::INFO),
            GatewayError::AlreadyExists(_) => ("ALREADY_EXISTS", Code::AlreadyExists, Level::INFO),
            GatewayError::GuardrailBlocked { .. } => {
                ("GUARDRAIL_BLOCKED", Code::FailedPrecondition, Level::INFO)
            }
            GatewayError::Internal(_) => ("INTERNAL", Code::Internal, Level::ERROR),
        };
        Classification {
            reason,
            code,
            level,
        }
    }

    /// The route taken, for errors that happened after routing.
    pub fn route(&self) -> Option<&Route> {
        match self {
            GatewayError::Upstream { route, .. } | GatewayError::DeadlineExceeded { route } => {
                Some(route)
            }
            GatewayError::InvalidArgument(_)
            | GatewayError::NotFound { .. }
            | GatewayError::Unauthenticated(_)
            | GatewayError::PermissionDenied(_)
            | GatewayError::ResourceExhausted { .. }
            | GatewayError::FailedPrecondition { .. }
            | GatewayError::Cancelled
            | GatewayError::Unavailable { .. }
            | GatewayError::Aborted(_)
            | GatewayError::AlreadyExists(_)
            | GatewayError::GuardrailBlocked { .. }
            | GatewayError::Internal(_) => None,
        }
    }

    /// The ErrorInfo reason (also the usage ledger's `error_class`), e.g. `BUDGET_EXCEEDED`.
    pub fn reason(&self) -> &'static str {
        self.classify().reason
    }

    /// The low-cardinality label for metrics and logs: the reason.
    pub fn label(&self) -> &'static str {
        self.classify().reason
    }

    /// The gRPC code: the one mapping from errors to codes.
    pub fn code(&self) -> Code {
        self.classify().code
    }

    /// Logs the error at its level, with its reason as `class`.
    pub fn log(&self, message: &str) {
        use tracing::Level;
        let class = self.reason();
        match self.classify().level {
            Level::ERROR => tracing::error!(error = %self, class, "{message}"),
            Level::WARN => tracing::warn!(error = %self, class, "{message}"),
            Level::INFO => tracing::info!(error = %self, class, "{message}"),
            Level::DEBUG => tracing::debug!(error = %self, class, "{message}"),
            Level::TRACE => tracing::trace!(error = %self, class, "{message}"),
        }
    }

    /// The gRPC status, with rich details.
    pub fn into_status(self) -> Status {
        let message = self.to_string();
        let Classification { reason, code, .. } = self.classify();
        let mut details = ErrorDetails::new();
        let mut metadata = HashMap::new();
        match self {
            GatewayError::InvalidArgument(violations) => {
                for v in violations {
                    details.add_bad_request_violation(v.field, v.description);
                }
            }
            GatewayError::ResourceExhausted {
                subject,
                retry_after,
                ..
            } => {
                details.add_quota_failure_violation(subject, message.clone());
                if let Some(delay) = retry_after {
                    details.set_retry_info(Some(delay));
                }
            }
            GatewayError::Upstream { error, route, .. } => {
                metadata = route_metadata(&route);
                if let Some(delay) = error.retry_after {
                    details.set_retry_info(Some(delay));
                }
            }
            GatewayError::DeadlineExceeded { route } => metadata = route_metadata(&route),
            GatewayError::GuardrailBlocked {
                profiles, entities, ..
            } => {
                metadata.insert("entities".to_owned(), entities.join(","));
                metadata.insert("profiles".to_owned(), profiles.join(","));
            }
            GatewayError::Unavailable { retry_after, .. } => {
                if let Some(delay) = retry_after {
                    details.set_retry_info(Some(delay));
                }
            }
            GatewayError::NotFound { .. }
            | GatewayError::Unauthenticated(_)
            | GatewayError::PermissionDenied(_)
            | GatewayError::FailedPrecondition { .. }
            | GatewayError::Cancelled
            | GatewayError::Aborted(_)
            | GatewayError::AlreadyExists(_)
            | GatewayError::Internal(_) => {}
        }
        details.set_error_info(reason, ERROR_DOMAIN, metadata);
        Status::with_error_details(code, message, details)
    }
}

/// The gRPC code for an upstream error class.
pub fn upstream_code(class: ErrorClass, all_rate_limited: bool) -> Code {
    match class {
        ErrorClass::RateLimited if all_rate_limited => Code::ResourceExhausted,
        ErrorClass::RateLimited
        | ErrorClass::Overloaded
        | ErrorClass::ServerError
        | ErrorClass::Timeout
        | ErrorClass::Connect
        | ErrorClass::StreamBroken
        | ErrorClass::InvalidResponse
        // The gateway itself is short of resources: another instance may serve the call.
        | ErrorClass::LocalResource => Code::Unavailable,
        // The gateway's own provider credentials were refused: callers cannot fix that, and
        // retrying does not help until an operator does.
        ErrorClass::Authentication | ErrorClass::Permission => Code::FailedPrecondition,
        ErrorClass::InvalidRequest
        | ErrorClass::ContextLengthExceeded
        | ErrorClass::ContentFiltered => Code::InvalidArgument,
        ErrorClass::ModelNotFound => Code::NotFound,
    }
}

/// The attempt trail as ErrorInfo metadata: `attempts` = count, `attempt.N` = one line each.
fn route_metadata(route: &Route) -> HashMap<String, String> {
    let mut meta = HashMap::with_capacity(route.attempts.len() + 2);
    if let Some(policy) = &route.policy {
        meta.insert("policy".to_owned(), policy.to_string());
    }
    meta.insert("attempts".to_owned(), route.attempts.len().to_string());
    for (i, a) in route.attempts.iter().enumerate() {
        let outcome = match &a.outcome {
            AttemptOutcome::Succeeded => "succeeded".to_owned(),
            AttemptOutcome::Failed(reason) => format!("failed {reason}"),
            AttemptOutcome::Cancelled => "cancelled".to_owned(),
            AttemptOutcome::Skipped(reason) => format!("skipped {reason}"),
        };
        meta.insert(
            format!("attempt.{}", i + 1),
            format!(
                "{}/{} {} {} after {}ms",
                a.provider,
                a.model,
                a.kind.label(),
                outcome,
                a.latency.as_millis()
            ),
        );
    }
    meta
}

/// The ledger and metric name of a gRPC code, e.g. `OK`, `UNAVAILABLE`.
pub fn code_name(code: Code) -> &'static str {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{AttemptKind, AttemptRecord};

    #[test]
    fn invalid_argument_carries_field_violations() {
        let status = GatewayError::InvalidArgument(vec![
            FieldViolation::new("model", "must not be empty"),
            FieldViolation::new("temperature", "must be between 0 and 2"),
        ])
        .into_status();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("model: must not be empty"));
        let details = status.get_error_details();
        let bad = details.bad_request().unwrap();
        assert_eq!(bad.field_violations.len(), 2);
        assert_eq!(bad.field_violations[1].field, "temperature");
    }

    #[test]
    fn upstream_errors_map_by_class() {
        let route = Route {
            policy: None,
            attempts: vec![AttemptRecord {
                provider: "openai".into(),
                model: "gpt-4o".into(),
                kind: AttemptKind::Primary,
                outcome: AttemptOutcome::Failed("RATE_LIMITED"),
                start_offset: Duration::ZERO,
                latency: Duration::from_millis(12),
                time_to_first_token: None,
            }],
            ..Route::default()
        };
        let err = ProviderError::new(ErrorClass::RateLimited, "the provider answered http 429")
            .with_retry_after(Some(Duration::from_secs(2)));
        let status = GatewayError::Upstream {
            error: err,
            all_rate_limited: true,
            route,
        }
        .into_status();
        assert_eq!(status.code(), Code::ResourceExhausted);
        let details = status.get_error_details();
        let info = details.error_info().unwrap();
        assert_eq!(info.reason, "RATE_LIMITED");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(info.metadata["attempts"], "1");
        assert!(info.metadata["attempt.1"].contains("openai/gpt-4o primary failed RATE_LIMITED"));
        assert_eq!(
            details.retry_info().unwrap().retry_delay,
            Some(Duration::from_secs(2))
        );
        for class in ErrorClass::ALL {
            let code = upstream_code(class, false);
            assert_eq!(
                class.is_retryable(),
                code == Code::Unavailable,
                "{class} -> {code:?}"
            );
        }
    }
}
