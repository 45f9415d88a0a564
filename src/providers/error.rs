//! The provider error taxonomy: every provider's statuses, error bodies and transport failures
//! map onto one small set of classes. The class is the `ErrorInfo.reason` callers see (in
//! UPPER_SNAKE_CASE) and the `error_class` label metrics use (in lower_snake_case).

use std::{fmt, time::Duration};

/// The class of an upstream failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The provider rate-limited us (HTTP 429); may carry a retry-after.
    RateLimited,
    /// The provider is overloaded (HTTP 503, Anthropic 529).
    Overloaded,
    /// The provider failed (HTTP 5xx).
    ServerError,
    /// The attempt timed out (connect, first byte, or a stalled stream).
    Timeout,
    /// The connection to the provider could not be made or broke before an answer.
    Connect,
    /// A stream broke after it started: cut off, an in-stream error, or a malformed event.
    StreamBroken,
    /// The provider sent a response the gateway could not understand.
    InvalidResponse,
    /// The provider rejected the gateway's credentials (HTTP 401).
    Authentication,
    /// The credentials lack permission (HTTP 403).
    Permission,
    /// The provider rejected the request as invalid (HTTP 400, 422).
    InvalidRequest,
    /// The conversation is longer than the model's context window.
    ContextLengthExceeded,
    /// The provider's content filter refused the request or reply.
    ContentFiltered,
    /// The provider does not know the model (HTTP 404).
    ModelNotFound,
    /// The gateway itself ran short (file descriptors, memory for buffers, its own
    /// capacity): says nothing about the target, never counts against its health.
    LocalResource,
}

/// One row of [`ErrorClass`]'s policy table.
struct ClassRow {
    label: &'static str,
    reason: &'static str,
    retryable: bool,
    shows_message: bool,
}

impl ErrorClass {
    /// Every class, for tables and docs.
    pub const ALL: [ErrorClass; 14] = [
        ErrorClass::RateLimited,
        ErrorClass::Overloaded,
        ErrorClass::ServerError,
        ErrorClass::Timeout,
        ErrorClass::Connect,
        ErrorClass::StreamBroken,
        ErrorClass::InvalidResponse,
        ErrorClass::Authentication,
        ErrorClass::Permission,
        ErrorClass::InvalidRequest,
        ErrorClass::ContextLengthExceeded,
        ErrorClass::ContentFiltered,
        ErrorClass::ModelNotFound,
        ErrorClass::LocalResource,
    ];

    /// The policy of each class, in one exhaustive table: its label (metrics, logs), its
    /// `ErrorInfo` reason, whether another attempt may succeed, and whether the caller may see
    /// the provider's own message. Only the request's own faults show it (the caller fixes the
    /// request by reading it); credentials, permissions and transient failures say only the
    /// class and HTTP status, since their messages name accounts, keys and internals.
    const fn row(self) -> ClassRow {
        const fn row(
            label: &'static str,
            reason: &'static str,
            retryable: bool,
            shows_message: bool,
        ) -> ClassRow {
            ClassRow {
                label,
                reason,
                retryable,
                shows_message,
            }
        }
        match self {
            ErrorClass::RateLimited => row("rate_limited", "RATE_LIMITED", true, false),
            ErrorClass::Overloaded => row("overloaded", "OVERLOADED", true, false),
            ErrorClass::ServerError => row("server_error", "SERVER_ERROR", true, false),
            ErrorClass::Timeout => row("timeout", "TIMEOUT", true, false),
            ErrorClass::Connect => row("connect", "CONNECT", true, false),
            ErrorClass::StreamBroken => row("stream_broken", "STREAM_BROKEN", true, false),
            ErrorClass::InvalidResponse => row("invalid_response", "INVALID_RESPONSE", true, false),
            ErrorClass::Authentication => row("authentication", "AUTHENTICATION", false, false),
            ErrorClass::Permission => row("permission", "PERMISSION", false, false),
            ErrorClass::InvalidRequest => row("invalid_request", "INVALID_REQUEST", false, true),
            ErrorClass::ContextLengthExceeded => row(
                "context_length_exceeded",
                "CONTEXT_LENGTH_EXCEEDED",
                false,
                true,
            ),
            ErrorClass::ContentFiltered => row("content_filtered", "CONTENT_FILTERED", false, true),
            ErrorClass::ModelNotFound => row("model_not_found", "MODEL_NOT_FOUND", false, true),
            ErrorClass::LocalResource => row("local_resource", "LOCAL_RESOURCE", true, false),
        }
    }

    /// Whether another attempt (on this or another target) may succeed.
    pub fn is_retryable(self) -> bool {
        self.row().retryable
    }

    /// Whether a caller may see the provider's own error message for this class (redacted
    /// like logs and cut short).
    pub fn shows_upstream_message(self) -> bool {
        self.row().shows_message
    }

    /// The low-cardinality label for metrics and logs, e.g. `rate_limited`.
    pub fn label(self) -> &'static str {
        self.row().label
    }

    /// The `google.rpc.ErrorInfo` reason, e.g. `RATE_LIMITED`.
    pub fn reason(self) -> &'static str {
        self.row().reason
    }

    /// The class for an HTTP status that carried no more specific signal.
    pub fn from_http_status(status: u16) -> ErrorClass {
        match status {
            400 | 413 | 422 => ErrorClass::InvalidRequest,
            401 => ErrorClass::Authentication,
            403 => ErrorClass::Permission,
            404 => ErrorClass::ModelNotFound,
            408 => ErrorClass::Timeout,
            429 => ErrorClass::RateLimited,
            503 | 529 => ErrorClass::Overloaded,
            504 => ErrorClass::Timeout,
            500..=599 => ErrorClass::ServerError,
            // Other 4xx (e.g. 409) are the request's fault; 1xx-3xx are not expected here.
            _ => ErrorClass::InvalidRequest,
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// An upstream failure, classified.
///
/// `message` is safe to show callers: lowercase, no secrets, no raw upstream bodies. For
/// caller-fixable classes it may include the provider's own short error message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{class}: {message}")]
pub struct ProviderError {
    /// The class.
    pub class: ErrorClass,
    /// A safe description.
    pub message: String,
    /// How long the provider asked us to wait, when it said.
    pub retry_after: Option<Duration>,
    /// The HTTP status, when there was one.
    pub http_status: Option<u16>,
}

impl ProviderError {
    /// An error of `class` with a message.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
            retry_after: None,
            http_status: None,
        }
    }

    /// Attaches a retry-after.
    pub fn with_retry_after(mut self, retry_after: Option<Duration>) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// Attaches the HTTP status.
    pub fn with_status(mut self, status: u16) -> Self {
        self.http_status = Some(status);
        self
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        self.class.is_retryable()
    }

    /// Classifies a transport error from reqwest.
    pub fn from_transport(err: &reqwest::Error) -> Self {
        if let Some(fault) = local_fault(err) {
            return ProviderError::new(
                ErrorClass::LocalResource,
                format!("the gateway is out of {}; retry shortly", fault.what()),
            )
            .with_retry_after(Some(LOCAL_RETRY_AFTER));
        }
        if err.is_timeout() {
            ProviderError::new(ErrorClass::Timeout, "the provider did not answer in time")
        } else if err.is_connect() {
            ProviderError::new(ErrorClass::Connect, "could not connect to the provider")
        } else if err.is_body() || err.is_decode() {
            ProviderError::new(
                ErrorClass::StreamBroken,
                "the provider's response was cut off",
            )
        } else {
            ProviderError::new(ErrorClass::Connect, "the connection to the provider failed")
        }
    }

    /// A stream that ended before its terminal event.
    pub fn truncated() -> Self {
        ProviderError::new(
            ErrorClass::StreamBroken,
            "the provider's stream ended before its final event",
        )
    }

    /// An error the provider reported inside a stream (the in-stream policy, the same for
    /// every wire format): overloads keep their class; other transient failures are a broken
    /// stream; the request's own faults keep their class, with the provider's message when
    /// [`ErrorClass::shows_upstream_message`] allows it (redacted and cut short).
    pub fn in_stream(upstream: UpstreamError) -> Self {
        let class = upstream.class.unwrap_or(ErrorClass::StreamBroken);
        match class {
            ErrorClass::Overloaded => ProviderError::new(
                ErrorClass::Overloaded,
                "the provider reported it is overloaded mid-stream",
            ),
            c if c.is_retryable() => ProviderError::new(
                ErrorClass::StreamBroken,
                "the provider sent an error event mid-stream",
            ),
            c => ProviderError::new(
                c,
                match upstream.visible_message(c) {
                    Some(msg) => format!("the provider sent an error in the stream: {msg}"),
                    None => "the provider sent an error in the stream".to_owned(),
                },
            ),
        }
    }

    /// A malformed stream event.
    pub fn malformed_event(detail: &str) -> Self {
        ProviderError::new(
            ErrorClass::StreamBroken,
            format!("the provider sent a malformed stream event: {detail}"),
        )
    }
}

/// How long callers are asked to wait after a [`ErrorClass::LocalResource`] failure.
pub const LOCAL_RETRY_AFTER: Duration = Duration::from_secs(1);

/// A resource the gateway itself ran out of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalFault {
    /// EMFILE, ENFILE.
    FileDescriptors,
    /// ENOMEM, ENOBUFS, or an allocation failure.
    Memory,
}

impl LocalFault {
    /// The low-cardinality label, e.g. `fd_limit`.
    pub fn label(self) -> &'static str {
        match self {
            LocalFault::FileDescriptors => "fd_limit",
            LocalFault::Memory => "memory",
        }
    }

    fn what(self) -> &'static str {
        match self {
            LocalFault::FileDescriptors => "file descriptors",
            LocalFault::Memory => "memory",
        }
    }
}

/// What the gateway itself ran out of, when an I/O error says so.
pub fn local_io_fault(err: &std::io::Error) -> Option<LocalFault> {
    #[cfg(target_os = "linux")]
    const ENOBUFS: i32 = 105;
    #[cfg(not(target_os = "linux"))]
    const ENOBUFS: i32 = 55;
    match err.raw_os_error() {
        // EMFILE and ENFILE are 24 and 23 on Linux and the BSDs alike; ENOMEM is 12.
        Some(24 | 23) => Some(LocalFault::FileDescriptors),
        Some(12) => Some(LocalFault::Memory),
        Some(n) if n == ENOBUFS => Some(LocalFault::Memory),
        _ if err.kind() == std::io::ErrorKind::OutOfMemory => Some(LocalFault::Memory),
        _ => None,
    }
}

/// [`local_io_fault`] of the first I/O error in `err`'s source chain.
fn local_fault(err: &(dyn std::error::Error + 'static)) -> Option<LocalFault> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(what) = local_io_fault(io)
        {
            return Some(what);
        }
        next = e.source();
    }
    None
}

/// Parses an HTTP `Retry-After` value given in seconds (fractions allowed). HTTP dates are
/// not used by LLM providers and are ignored.
pub fn parse_retry_after_secs(value: &str) -> Option<Duration> {
    let secs: f64 = value.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
}

/// What a provider's error payload says, as its wire format parsed it: the raw material of
/// the one error policy ([`classify_http`], [`ProviderError::in_stream`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpstreamError {
    /// The class the payload's own code, type or status names (already refined, e.g. an
    /// invalid request whose message says the prompt is too long is
    /// [`ErrorClass::ContextLengthExceeded`]); `None` when the payload names nothing known.
    pub class: Option<ErrorClass>,
    /// The provider's own message, unfiltered (the policy decides whether callers see it).
    pub message: Option<String>,
    /// A wait the payload (or a provider-specific header) asks for.
    pub retry_after: Option<Duration>,
}

impl UpstreamError {
    /// The message a caller may see for `class`: redacted, cut short, only for the classes
    /// [`ErrorClass::shows_upstream_message`] allows.
    pub fn visible_message(&self, class: ErrorClass) -> Option<String> {
        let msg = self
            .message
            .as_deref()
            .map(str::trim)
            .filter(|m| !m.is_empty())?;
        class
            .shows_upstream_message()
            .then(|| short_message(&crate::telemetry::redact(msg)))
    }
}

/// The arbitration rule between an HTTP status and what the body says, the same for every
/// provider: the status decides whether the failure is transient. A transient status (408,
/// 429, 5xx, 529) decides the class on its own, so the same status always means the same
/// class (a 503 is OVERLOADED whatever the body says); for any other status a body class that
/// is not transient either refines it (a 400 saying `context_length_exceeded`, a 400 saying
/// the API key is invalid), and anything else leaves the status class.
pub fn arbitrate(status: u16, body_class: Option<ErrorClass>) -> ErrorClass {
    let status_class = ErrorClass::from_http_status(status);
    match body_class {
        Some(body) if !status_class.is_retryable() && !body.is_retryable() => body,
        Some(_) | None => status_class,
    }
}

/// The one error policy for an HTTP error answer: the class by [`arbitrate`], the provider's
/// message only where [`ErrorClass::shows_upstream_message`] allows (redacted), and a
/// retry-after for retryable classes (the `retry-after-ms` / `Retry-After` headers first, then
/// what the payload says).
pub fn classify_http(
    status: u16,
    headers: &http::HeaderMap,
    upstream: UpstreamError,
) -> ProviderError {
    let class = arbitrate(status, upstream.class);
    let message = match upstream.visible_message(class) {
        Some(msg) => format!("the provider rejected the request: {msg}"),
        None => format!("the provider answered http {status}"),
    };
    let retry_after = class
        .is_retryable()
        .then(|| retry_after_header(headers).or(upstream.retry_after))
        .flatten();
    ProviderError::new(class, message)
        .with_retry_after(retry_after)
        .with_status(status)
}

/// The `retry-after-ms` or `Retry-After` (seconds) header, whichever is present.
pub fn retry_after_header(headers: &http::HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
    {
        return Some(Duration::from_secs_f64(ms.min(86_400_000.0) / 1000.0));
    }
    headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after_secs)
}

/// Cuts an upstream error message to a length safe to show to callers.
pub fn short_message(msg: &str) -> String {
    const MAX: usize = 300;
    let msg = msg.trim();
    if msg.len() <= MAX {
        return msg.to_owned();
    }
    let mut end = MAX;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &msg[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table() {
        let table = [
            (400, ErrorClass::InvalidRequest, false),
            (401, ErrorClass::Authentication, false),
            (403, ErrorClass::Permission, false),
            (404, ErrorClass::ModelNotFound, false),
            (408, ErrorClass::Timeout, true),
            (422, ErrorClass::InvalidRequest, false),
            (429, ErrorClass::RateLimited, true),
            (500, ErrorClass::ServerError, true),
            (502, ErrorClass::ServerError, true),
            (503, ErrorClass::Overloaded, true),
            (504, ErrorClass::Timeout, true),
            (529, ErrorClass::Overloaded, true),
        ];
        for (status, class, retryable) in table {
            let got = ErrorClass::from_http_status(status);
            assert_eq!(got, class, "status {status}");
            assert_eq!(got.is_retryable(), retryable, "status {status}");
        }
    }

    #[test]
    fn arbitration_lets_the_status_decide_transience() {
        use ErrorClass::*;
        for (status, body, class) in [
            (503, Some(ServerError), Overloaded),
            (500, Some(Overloaded), ServerError),
            (429, Some(InvalidRequest), RateLimited),
            (400, Some(ContextLengthExceeded), ContextLengthExceeded),
            (400, Some(Authentication), Authentication),
            (400, Some(RateLimited), InvalidRequest),
            (401, None, Authentication),
        ] {
            assert_eq!(arbitrate(status, body), class, "{status} {body:?}");
        }
    }

    #[test]
    fn visible_messages_are_redacted_and_only_for_caller_faults() {
        let upstream = UpstreamError {
            class: Some(ErrorClass::InvalidRequest),
            message: Some("bad key sk-live-0123456789abcdef in Bearer abcdefgh12345678".into()),
            retry_after: None,
        };
        let shown = upstream
            .visible_message(ErrorClass::InvalidRequest)
            .unwrap();
        assert!(!shown.contains("0123456789abcdef") && !shown.contains("abcdefgh12345678"));
        for class in ErrorClass::ALL {
            assert_eq!(
                upstream.visible_message(class).is_some(),
                class.shows_upstream_message()
            );
            let err = ProviderError::in_stream(UpstreamError {
                class: Some(class),
                ..upstream.clone()
            });
            assert!(!err.message.contains("0123456789abcdef"), "{class}");
        }
    }

    #[test]
    fn labels_and_reasons_agree() {
        for class in ErrorClass::ALL {
            assert_eq!(class.label().to_uppercase(), class.reason());
        }
    }

    #[test]
    fn local_resource_faults_are_recognised_through_the_chain() {
        let emfile = std::io::Error::from_raw_os_error(24);
        assert_eq!(local_io_fault(&emfile), Some(LocalFault::FileDescriptors));
        let oom = std::io::Error::from(std::io::ErrorKind::OutOfMemory);
        assert_eq!(local_io_fault(&oom), Some(LocalFault::Memory));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(local_io_fault(&refused), None);
        #[derive(Debug, thiserror::Error)]
        #[error("connect failed")]
        struct Wrapper(#[source] std::io::Error);
        let wrapped = Wrapper(std::io::Error::from_raw_os_error(23));
        assert_eq!(local_fault(&wrapped), Some(LocalFault::FileDescriptors));
        assert!(ErrorClass::LocalResource.is_retryable());
    }

    #[test]
    fn retry_after_parsing() {
        assert_eq!(parse_retry_after_secs("2"), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after_secs(" 0.5 "),
            Some(Duration::from_millis(500))
        );
        assert_eq!(parse_retry_after_secs("-1"), None);
        assert_eq!(
            parse_retry_after_secs("Wed, 21 Oct 2015 07:28:00 GMT"),
            None
        );
    }

    #[test]
    fn short_message_cuts_on_char_boundary() {
        let long = "é".repeat(400);
        let cut = short_message(&long);
        assert!(cut.len() <= 303 + 3);
        assert!(cut.ends_with("..."));
    }
}
