//! The HTTP front: OpenAI- and Anthropic-compatible endpoints on their own listener
//! (`http.listen`), running every call on the same [`Engine`] as the gRPC service.
//!
//! - `POST /v1/chat/completions`, `GET /v1/models`: OpenAI's wire format ([`openai`]);
//!   `POST /v1/embeddings` ([`embeddings`]).
//! - `POST /v1/messages`: Anthropic's wire format ([`anthropic`]).
//!
//! What each request goes through here, before the engine takes over: the request id
//! (`x-request-id`, or a fresh one, returned as a header), the caller's budget from
//! `request-timeout` or `x-stainless-timeout` (seconds, as the official SDKs send it; like
//! `grpc-timeout` it is capped by `server.max_call_duration`), the gateway key from
//! `Authorization: Bearer` (or `x-api-key`), the body (at most `http.max_body_bytes`, strict
//! JSON, unknown fields ignored, every error naming its field). Errors leave in the surface's
//! own JSON shape with the HTTP status its SDKs expect ([`status_of`]).

pub mod anthropic;
pub mod embeddings;
pub mod openai;

use std::{future::Future, sync::Arc, time::Duration};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::Response,
    routing::{get, post},
};
use tokio::net::TcpListener;
use tonic::Code;
use tonic_types::StatusExt;

use super::{
    admission::Admission,
    deadline::deadline_within,
    engine::{Call, Credential, Engine, Events, trace_context},
    request_id,
    settings::HttpFrontSettings,
};
use crate::{error::GatewayError, executor::CallEvent};

/// Shared by the handlers.
#[derive(Clone)]
struct Front {
    engine: Engine,
    max_body_bytes: usize,
    admission: Arc<Admission>,
}

/// One wire format on the shared call path: its request, its answers, stream events and
/// errors. [`call`] is the one handler body both surfaces run.
trait Surface {
    /// The request body.
    type Request: serde::de::DeserializeOwned + Send + 'static;
    /// Per-stream state that turns call events into wire events.
    type Writer: Send + 'static;
    /// The `rpc` label of unary calls.
    const RPC: &'static str;
    /// The `rpc` label of streaming calls.
    const RPC_STREAM: &'static str;
    /// Checks the surface's own headers.
    fn check_headers(_headers: &HeaderMap) -> Result<(), GatewayError> {
        Ok(())
    }
    /// Whether the request asks for a stream, and the stream's writer.
    fn stream(request: &Self::Request, id: &str) -> Option<Self::Writer>;
    /// Converts and validates the request.
    fn convert(request: Self::Request) -> Result<crate::types::ChatRequest, GatewayError>;
    /// The JSON body of a unary answer.
    fn answer(id: &str, answer: &crate::executor::Answer) -> serde_json::Value;
    /// The wire events of one call event.
    fn event(writer: &mut Self::Writer, event: CallEvent) -> Vec<Bytes>;
    /// The JSON error body.
    fn error_body(err: &HttpError) -> serde_json::Value;
    /// The event that ends a stream that broke after it began.
    fn stream_error(err: &HttpError) -> Bytes;
}

fn error_response<S: Surface>(err: GatewayError, request_id: &str) -> Response {
    let err = HttpError::from(err);
    err.respond(request_id, &S::error_body(&err))
}

/// The handler of a chat call on surface `S`.
async fn call<S: Surface>(front: Front, headers: HeaderMap, body: Body) -> Response {
    let head = Head::read(&headers);
    let id = head.request_id.clone();
    if let Err(err) = S::check_headers(&headers) {
        return error_response::<S>(err, &id);
    }
    // The in-flight bound, before the body is read; held until the answer is sent.
    let key = match front.engine.access().chat_caller_secret(head.credential) {
        Ok(caller) => caller.map(|c| c.name().to_owned()),
        Err(_) => None,
    };
    let permit = match front.admission.admit(key.as_deref()).await {
        Ok(permit) => permit,
        Err(err) => {
            err.log("call refused");
            return error_response::<S>(err, &id);
        }
    };
    let request: S::Request = match read_json(body, front.max_body_bytes).await {
        Ok(r) => r,
        Err(err) => return error_response::<S>(err, &id),
    };
    let writer = S::stream(&request, &id);
    let rpc = if writer.is_some() {
        S::RPC_STREAM
    } else {
        S::RPC
    };
    let call = match head.call(&front.engine, rpc) {
        Ok(c) => c,
        Err(err) => return error_response::<S>(err, &id),
    };
    let Some(mut writer) = writer else {
        return match front.engine.chat(call, move || S::convert(request)).await {
            Ok(answer) => json_response(StatusCode::OK, &id, &S::answer(&id, &answer)),
            Err(err) => error_response::<S>(err, &id),
        };
    };
    let events = match front
        .engine
        .chat_stream(call, move || S::convert(request))
        .await
    {
        Ok(events) => events,
        Err(err) => return error_response::<S>(err, &id),
    };
    let body = framed(events, move |item| {
        let _held = &permit;
        match item {
            Some(Ok(event)) => {
                let finished = matches!(event, CallEvent::Finish { .. });
                (S::event(&mut writer, event), finished)
            }
            Some(Err(err)) => (vec![S::stream_error(&HttpError::from(err))], true),
            None => (vec![S::stream_error(&HttpError::from(ended_early()))], true),
        }
    });
    sse_response(&id, body)
}

/// The routes of the HTTP front.
fn router(engine: Engine, settings: &HttpFrontSettings, admission: Arc<Admission>) -> Router {
    Router::new()
        .route(
            "/v1/chat/completions",
            post(|State(front), headers, body| call::<openai::OpenAi>(front, headers, body)),
        )
        .route("/v1/models", get(openai::list_models))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route(
            "/v1/messages",
            post(|State(front), headers, body| call::<anthropic::Anthropic>(front, headers, body)),
        )
        .fallback(openai::not_found)
        .with_state(Front {
            engine,
            max_body_bytes: settings.max_body_bytes,
            admission,
        })
}

/// Serves the HTTP front on `listener` until `shutdown` resolves, then lets in-flight
/// requests finish (the caller bounds that with the shutdown grace).
pub async fn serve(
    listener: TcpListener,
    engine: Engine,
    settings: &HttpFrontSettings,
    admission: Arc<Admission>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(engine, settings, admission))
        .with_graceful_shutdown(shutdown)
        .await
}

/// What the surfaces read from the request head.
struct Head<'a> {
    request_id: String,
    /// The caller's timeout, or the name of the header that held an unreadable one.
    timeout: Result<Option<Duration>, &'static str>,
    credential: Option<&'a str>,
    headers: &'a HeaderMap,
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok()
}

/// A timeout header: seconds (`2.5`, as the SDKs send `x-stainless-timeout`) or a duration
/// with a unit (`250ms`, `2s`).
fn parse_timeout(value: &str) -> Option<Duration> {
    let value = value.trim();
    match value.parse::<f64>() {
        Ok(secs) if (0.0..1e9).contains(&secs) => Some(Duration::from_secs_f64(secs)),
        Ok(_) => None,
        Err(_) => humantime::parse_duration(value).ok(),
    }
}

impl<'a> Head<'a> {
    fn read(headers: &'a HeaderMap) -> Self {
        let request_id = headers
            .get(request_id::HEADER)
            .filter(|v| request_id::acceptable(v))
            .cloned()
            .unwrap_or_else(request_id::generate)
            .to_str()
            .unwrap_or("")
            .to_owned();
        // Ours is checked; the SDKs' is informational (they send `None` for no timeout), so
        // an unreadable one is no timeout.
        let timeout = match headers.get("request-timeout") {
            Some(value) => value
                .to_str()
                .ok()
                .and_then(parse_timeout)
                .map(Some)
                .ok_or("request-timeout"),
            None => Ok(header_str(headers, "x-stainless-timeout").and_then(parse_timeout)),
        };
        let credential = header_str(headers, "authorization")
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .or_else(|| header_str(headers, "x-api-key").map(str::trim))
            .filter(|s| !s.is_empty());
        Head {
            request_id,
            timeout,
            credential,
            headers,
        }
    }

    /// The engine's view of this call.
    fn call(&self, engine: &Engine, rpc: &'static str) -> Result<Call<'a>, GatewayError> {
        let timeout = self.timeout.map_err(|name| {
            GatewayError::invalid(
                name,
                "must be a timeout in seconds (e.g. `30` or `2.5`) or with a unit (`250ms`)",
            )
        })?;
        Ok(Call {
            rpc,
            request_id: self.request_id.clone(),
            deadline: deadline_within(timeout, engine.limits()),
            trace: trace_context(
                header_str(self.headers, "traceparent"),
                header_str(self.headers, "tracestate"),
            ),
            credential: Credential::Bearer(self.credential),
            cache_control: crate::cache::CacheControl::parse(header_str(
                self.headers,
                "cache-control",
            )),
        })
    }
}

/// Reads a JSON body of at most `limit` bytes into `T`; errors name the field.
async fn read_json<T: serde::de::DeserializeOwned>(
    body: Body,
    limit: usize,
) -> Result<T, GatewayError> {
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        GatewayError::invalid(
            "body",
            format!("must be at most {limit} bytes and arrive completely"),
        )
    })?;
    parse_json(&bytes)
}

/// Parses strict JSON into `T`, ignoring unknown fields; the error names the field.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, GatewayError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        field_error(&path, &err.into_inner())
    })?;
    // Trailing characters after the value.
    de.end().map_err(|e| field_error(".", &e))?;
    Ok(value)
}

fn field_error(path: &str, inner: &serde_json::Error) -> GatewayError {
    let syntax = inner.is_syntax() || inner.is_eof();
    let message = if syntax {
        format!("is not valid JSON: {inner}")
    } else {
        // serde's message without its position suffix.
        let text = inner.to_string();
        match text.rfind(" at line ") {
            Some(i) => text[..i].to_owned(),
            None => text,
        }
    };
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|m| m.strip_suffix('`'));
    let field = match (missing, path) {
        _ if syntax => "body".to_owned(),
        (Some(name), ".") => name.to_owned(),
        (Some(name), _) => format!("{path}.{name}"),
        (None, ".") => "body".to_owned(),
        (None, _) => path.to_owned(),
    };
    GatewayError::invalid(field, message)
}

/// What an error looks like on the HTTP surfaces: the status, the taxonomy reason, the
/// first invalid field, and when to retry.
struct HttpError {
    status: StatusCode,
    reason: String,
    param: Option<String>,
    retry_after: Option<Duration>,
    message: String,
}

/// The HTTP status for a gateway status code, the way OpenAI's and Anthropic's SDKs read
/// them: 400, 401, 403, 404, 409 and 429 are the caller's, 429/5xx are retried by the SDKs.
pub fn status_of(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
    }
}

impl From<GatewayError> for HttpError {
    fn from(err: GatewayError) -> Self {
        // The gRPC status with its rich details is the one mapping; read it back.
        let status = err.into_status();
        let details = status.get_error_details();
        HttpError {
            status: status_of(status.code()),
            reason: details
                .error_info()
                .map_or_else(|| "CANCELLED".to_owned(), |i| i.reason.clone()),
            param: details
                .bad_request()
                .and_then(|b| b.field_violations.first())
                .map(|v| v.field.clone()),
            retry_after: details.retry_info().and_then(|r| r.retry_delay),
            message: status.message().to_owned(),
        }
    }
}

impl HttpError {
    /// A JSON response with this error's status, `retry-after` and `body`.
    fn respond(&self, request_id: &str, body: &serde_json::Value) -> Response {
        let mut response = json_response(self.status, request_id, body);
        if let Some(delay) = self.retry_after {
            let secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            if let Ok(ms) = HeaderValue::from_str(&delay.as_millis().to_string()) {
                response.headers_mut().insert("retry-after-ms", ms);
            }
        }
        response
    }
}

fn with_request_id(mut response: Response, request_id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(request_id::HEADER, v);
    }
    response
}

fn json_response(status: StatusCode, request_id: &str, body: &serde_json::Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    with_request_id(response, request_id)
}

/// A server-sent event stream response.
fn sse_response(
    request_id: &str,
    events: impl futures_util::Stream<Item = Bytes> + Send + 'static,
) -> Response {
    use futures_util::StreamExt as _;
    let body = Body::from_stream(events.map(Ok::<_, std::convert::Infallible>));
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    with_request_id(response, request_id)
}

/// Frames a committed stream for the wire: `frame` turns each event (`None` when the
/// stream ended) into bytes and says whether that was the last frame. A stream that ends
/// without its terminal event gets the surface's error frame from `frame(None)`.
fn framed(
    events: Events,
    frame: impl FnMut(Option<Result<CallEvent, GatewayError>>) -> (Vec<Bytes>, bool) + Send + 'static,
) -> impl futures_util::Stream<Item = Bytes> + Send + 'static {
    use futures_util::StreamExt as _;
    futures_util::stream::unfold(Some((events, frame)), |state| async move {
        let (mut events, mut frame) = state?;
        let item = events.next().await;
        let (parts, last) = frame(item);
        let bytes = if parts.len() == 1 {
            parts.into_iter().next().unwrap_or_default()
        } else {
            Bytes::from(parts.concat())
        };
        Some((bytes, (!last).then_some((events, frame))))
    })
}

/// The error of a stream that ended without its terminal event.
fn ended_early() -> GatewayError {
    GatewayError::Unavailable {
        reason: "STREAM_BROKEN",
        message: "the stream ended before the reply was complete".to_owned(),
        retry_after: None,
    }
}

/// Unix seconds now.
fn unix_now() -> u64 {
    u64::try_from(super::access::now_ms() / 1000).unwrap_or(0)
}

/// Parses a tool call's argument text as the JSON object Anthropic-style surfaces carry;
/// text that is not JSON stays a string, so nothing is lost.
fn arguments_json(arguments: &str) -> serde_json::Value {
    if arguments.trim().is_empty() {
        return serde_json::json!({});
    }
    serde_json::from_str(arguments).unwrap_or_else(|_| serde_json::Value::String(arguments.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_default_and_off() {
        use crate::{server::settings::RawHttpFront, settings::Issues};
        let mut issues = Issues::new();
        let s = HttpFrontSettings::from_raw(RawHttpFront::default(), &mut issues);
        assert_eq!(s, HttpFrontSettings::default());
        let off = HttpFrontSettings::from_raw(
            RawHttpFront {
                listen: Some("off".into()),
                max_body_bytes: None,
            },
            &mut issues,
        );
        assert_eq!(off.listen, None);
        assert!(issues.is_empty());
        HttpFrontSettings::from_raw(
            RawHttpFront {
                listen: Some("nowhere".into()),
                max_body_bytes: Some(10),
            },
            &mut issues,
        );
        let fields: Vec<String> = issues.into_vec().into_iter().map(|i| i.field).collect();
        assert_eq!(fields, ["http.listen", "http.max_body_bytes"]);
    }

    #[test]
    fn timeouts_in_seconds_or_with_units() {
        assert_eq!(parse_timeout("600"), Some(Duration::from_secs(600)));
        assert_eq!(parse_timeout("2.5"), Some(Duration::from_millis(2500)));
        assert_eq!(parse_timeout("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("-1"), None);
        assert_eq!(parse_timeout("soon"), None);
    }

    #[test]
    fn codes_map_to_the_statuses_sdks_expect() {
        assert_eq!(status_of(Code::InvalidArgument), StatusCode::BAD_REQUEST);
        assert_eq!(status_of(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(status_of(Code::PermissionDenied), StatusCode::FORBIDDEN);
        assert_eq!(status_of(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(status_of(Code::Aborted), StatusCode::CONFLICT);
        assert_eq!(
            status_of(Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(status_of(Code::Internal), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            status_of(Code::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status_of(Code::DeadlineExceeded),
            StatusCode::GATEWAY_TIMEOUT
        );
    }

    #[test]
    fn json_errors_name_the_field() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Inner {
            n: u32,
        }
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Outer {
            items: Vec<Inner>,
        }
        let fields = |r: Result<Outer, GatewayError>| match r.unwrap_err() {
            GatewayError::InvalidArgument(v) => v[0].field.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            fields(parse_json(br#"{"items":[{"n":1},{"n":"x"}]}"#)),
            "items[1].n"
        );
        assert_eq!(fields(parse_json(br#"{"items":[}"#)), "body");
        assert_eq!(fields(parse_json(br#"{"items":[{}]}"#)), "items[0].n");
        assert_eq!(fields(parse_json(br#"{}"#)), "items");
        assert_eq!(fields(parse_json(br#"{"items":[]} x"#)), "body");
        // Unknown fields are ignored, as the real APIs do.
        assert!(parse_json::<Outer>(br#"{"items":[],"extra":true}"#).is_ok());
    }
}
