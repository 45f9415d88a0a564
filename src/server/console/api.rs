//! The JSON mapping of the gRPC API over HTTP/1.1: `POST /<package>.<Service>/<Method>` with
//! the request message as JSON (the proto3 JSON mapping, the Connect protocol's unary shape)
//! answers the response message as JSON; a server-streaming method answers one JSON message
//! per line (`application/x-ndjson`), and an error that ends a stream is its last line.
//!
//! Every call goes through the same in-process gRPC stack as a gRPC client's (request id,
//! [`crate::server::authz`], framing, the handler), so authorization, limits, metering and
//! error mapping are the API's own; this module only converts JSON to protobuf and back with
//! the served descriptor set.

use std::{convert::Infallible, sync::LazyLock};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::BodyExt;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor, SerializeOptions};
use tonic::Code;
use tonic_types::StatusExt;
use tower::{ServiceExt, util::BoxCloneSyncService};

/// The in-process gRPC services the mapping calls (with their layers).
pub type Grpc = BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    Infallible,
>;

/// The services the mapping exposes.
pub const SERVICES: [&str; 2] = ["llmgateway.v1.LlmGatewayAdmin", "llmgateway.v1.LlmGateway"];

/// The descriptor set the server serves, decoded once.
static POOL: LazyLock<Result<DescriptorPool, String>> = LazyLock::new(|| {
    DescriptorPool::decode(crate::pb::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string())
});

/// The descriptor of `service`/`method`, when the mapping exposes it.
pub fn method(service: &str, method: &str) -> Option<MethodDescriptor> {
    if !SERVICES.contains(&service) {
        return None;
    }
    let pool = POOL.as_ref().ok()?;
    pool.get_service_by_name(service)?
        .methods()
        .find(|m| m.name() == method)
}

/// An error answered as JSON: `{"code": "invalid_argument", "message": ..., "details": ...}`
/// with the HTTP status of the gRPC code (the Connect protocol's and grpc-gateway's table).
pub fn error_response(status: &tonic::Status) -> http::Response<axum::body::Body> {
    let body = serde_json::to_vec(&error_json(status)).unwrap_or_default();
    let mut response = http::Response::new(axum::body::Body::from(body));
    *response.status_mut() = http_status(status.code());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The JSON form of a gRPC error, with the details a caller acts on.
pub fn error_json(status: &tonic::Status) -> serde_json::Value {
    let mut out = serde_json::json!({
        "code": code_name(status.code()),
        "message": status.message(),
    });
    let details = status.get_error_details();
    let mut list = Vec::new();
    if let Some(info) = details.error_info() {
        list.push(serde_json::json!({
            "type": "google.rpc.ErrorInfo",
            "reason": info.reason,
            "domain": info.domain,
            "metadata": info.metadata,
        }));
    }
    if let Some(bad) = details.bad_request() {
        let violations: Vec<_> = bad
            .field_violations
            .iter()
            .map(|v| serde_json::json!({"field": v.field, "description": v.description}))
            .collect();
        list.push(serde_json::json!({
            "type": "google.rpc.BadRequest",
            "fieldViolations": violations,
        }));
    }
    if let Some(retry) = details.retry_info()
        && let Some(delay) = retry.retry_delay
    {
        list.push(serde_json::json!({
            "type": "google.rpc.RetryInfo",
            "retryDelay": format!("{:.3}s", delay.as_secs_f64()),
        }));
    }
    if !list.is_empty() {
        out["details"] = serde_json::Value::Array(list);
    }
    out
}

/// The lower-case name of a code, as the Connect protocol writes it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "canceled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The HTTP status of a gRPC code.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Converts a JSON request body to the method's input message, encoded.
fn encode_request(method: &MethodDescriptor, body: &[u8]) -> Result<Bytes, tonic::Status> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let message = DynamicMessage::deserialize(method.input(), &mut de)
        .and_then(|m| de.end().map(|()| m))
        .map_err(|e| {
            tonic::Status::invalid_argument(format!(
                "the request body is not a JSON {}: {e}",
                method.input().full_name()
            ))
        })?;
    let payload = message.encode_to_vec();
    let mut framed = BytesMut::with_capacity(payload.len() + 5);
    framed.put_u8(0);
    framed.put_u32(u32::try_from(payload.len()).map_err(|_| {
        tonic::Status::resource_exhausted("the request message is larger than 4 GiB")
    })?);
    framed.put_slice(&payload);
    Ok(framed.freeze())
}

/// One response message as a JSON line (or object).
fn message_json(method: &MethodDescriptor, payload: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    let message = DynamicMessage::decode(method.output(), payload).map_err(|e| {
        tonic::Status::internal(format!("the gateway answered an undecodable message: {e}"))
    })?;
    let mut out = Vec::with_capacity(payload.len() * 2);
    let mut ser = serde_json::Serializer::new(&mut out);
    message
        .serialize_with_options(
            &mut ser,
            &SerializeOptions::new().skip_default_fields(false),
        )
        .map_err(|e| tonic::Status::internal(format!("cannot write JSON: {e}")))?;
    Ok(out)
}

/// Takes the complete gRPC messages off the front of `buf`.
fn take_messages(buf: &mut BytesMut) -> Vec<Bytes> {
    let mut out = Vec::new();
    while buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if buf.len() < 5 + len {
            break;
        }
        buf.advance(5);
        out.push(buf.split_to(len).freeze());
    }
    out
}

/// Calls `path` on `grpc` with the JSON `body`, with `authorization` (a bearer credential)
/// and the caller's request id, and answers JSON (or NDJSON for server streams).
pub async fn call(
    grpc: Grpc,
    method: MethodDescriptor,
    authorization: Option<HeaderValue>,
    headers: &HeaderMap,
    body: Bytes,
) -> http::Response<axum::body::Body> {
    let framed = match encode_request(&method, &body) {
        Ok(f) => f,
        Err(status) => return error_response(&status),
    };
    if method.is_client_streaming() {
        return error_response(&tonic::Status::unimplemented(format!(
            "{} takes a stream of requests; call it over gRPC",
            method.full_name()
        )));
    }
    let path = format!("/{}/{}", method.parent_service().full_name(), method.name());
    let mut request = http::Request::new(tonic::body::Body::new(http_body_util::Full::new(framed)));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = match http::Uri::try_from(path) {
        Ok(uri) => uri,
        Err(e) => return error_response(&tonic::Status::invalid_argument(e.to_string())),
    };
    let h = request.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(http::header::TE, HeaderValue::from_static("trailers"));
    if let Some(auth) = authorization {
        h.insert(http::header::AUTHORIZATION, auth);
    }
    for name in ["x-request-id", "grpc-timeout", "traceparent", "tracestate"] {
        if let Some(v) = headers.get(name) {
            h.insert(name, v.clone());
        }
    }
    let Ok(response) = grpc.oneshot(request).await;
    let (parts, mut body) = response.into_parts();
    // A trailers-only answer (an error before any message) has its status in the headers.
    if let Some(status) = tonic::Status::from_header_map(&parts.headers)
        && status.code() != Code::Ok
    {
        return error_response(&status);
    }
    if method.is_server_streaming() {
        let stream = async_stream_lines(method, body);
        let mut response = http::Response::new(axum::body::Body::from_stream(stream));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        );
        return response;
    }
    let mut buf = BytesMut::new();
    let mut messages = Vec::new();
    let mut status = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => {
                    buf.extend_from_slice(&data);
                    messages.extend(take_messages(&mut buf));
                }
                Err(frame) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        status = tonic::Status::from_header_map(trailers);
                    }
                }
            },
            Err(status) => return error_response(&status),
        }
    }
    match status {
        Some(s) if s.code() != Code::Ok => error_response(&s),
        _ => match messages.first() {
            Some(payload) => match message_json(&method, payload) {
                Ok(json) => {
                    let mut response = http::Response::new(axum::body::Body::from(json));
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    response
                }
                Err(s) => error_response(&s),
            },
            None => error_response(&tonic::Status::unknown("the call ended without an answer")),
        },
    }
}

/// The NDJSON lines of a server stream: each message, then `{"error": ...}` when the stream
/// ended with an error.
fn async_stream_lines(
    method: MethodDescriptor,
    body: tonic::body::Body,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send {
    futures_util::stream::unfold(
        (body, BytesMut::new(), method, false),
        |(mut body, mut buf, method, done)| async move {
            if done {
                return None;
            }
            loop {
                match body.frame().await {
                    None => return None,
                    Some(Err(status)) => {
                        return Some((Ok(error_line(&status)), (body, buf, method, true)));
                    }
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            buf.extend_from_slice(&data);
                            let mut out = Vec::new();
                            for payload in take_messages(&mut buf) {
                                match message_json(&method, &payload) {
                                    Ok(json) => {
                                        out.extend_from_slice(&json);
                                        out.push(b'\n');
                                    }
                                    Err(status) => out.extend_from_slice(&error_line(&status)),
                                }
                            }
                            if !out.is_empty() {
                                return Some((Ok(Bytes::from(out)), (body, buf, method, false)));
                            }
                        }
                        Err(frame) => {
                            let status = frame
                                .trailers_ref()
                                .and_then(tonic::Status::from_header_map)
                                .filter(|s| s.code() != Code::Ok);
                            return status.map(|s| (Ok(error_line(&s)), (body, buf, method, true)));
                        }
                    },
                }
            }
        },
    )
}

fn error_line(status: &tonic::Status) -> Bytes {
    let mut line =
        serde_json::to_vec(&serde_json::json!({ "error": error_json(status) })).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_exposed_method_is_in_the_descriptor_set() {
        assert!(POOL.is_ok(), "{:?}", POOL.as_ref().err());
        for m in ["CreatePolicy", "GetUsage", "ExportUsage", "ListKeys"] {
            assert!(method("llmgateway.v1.LlmGatewayAdmin", m).is_some(), "{m}");
        }
        assert!(method("llmgateway.v1.LlmGateway", "ChatStream").is_some());
        assert!(method("grpc.health.v1.Health", "Check").is_none());
        assert!(method("llmgateway.v1.LlmGatewayAdmin", "Nope").is_none());
    }

    #[test]
    fn requests_convert_from_the_proto3_json_mapping() {
        let m = method("llmgateway.v1.LlmGatewayAdmin", "GetUsage").unwrap();
        let framed = encode_request(&m, br#"{"groupBy": ["provider"]}"#).unwrap();
        assert_eq!(framed[0], 0);
        let msg = crate::pb::GetUsageRequest::decode(&framed[5..]).unwrap();
        assert_eq!(msg.group_by, ["provider"]);
        // Empty means the default message.
        assert!(encode_request(&m, b"").is_ok());
        let err = encode_request(&m, br#"{"groupBy": 3}"#).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().contains("GetUsageRequest"),
            "{}",
            err.message()
        );
        let err = encode_request(&m, br#"{"nope": 1}"#).unwrap_err();
        assert!(err.message().contains("nope"), "{}", err.message());
    }

    #[test]
    fn messages_are_cut_at_frame_boundaries() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[0, 0, 0, 0, 2, b'a', b'b', 0, 0, 0, 0, 3, b'c']);
        let got = take_messages(&mut buf);
        assert_eq!(got, [Bytes::from_static(b"ab")]);
        assert_eq!(buf.len(), 6);
        buf.extend_from_slice(b"de");
        assert_eq!(take_messages(&mut buf), [Bytes::from_static(b"cde")]);
    }

    #[test]
    fn codes_map_to_http_statuses() {
        assert_eq!(http_status(Code::InvalidArgument), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(Code::Aborted), StatusCode::CONFLICT);
        assert_eq!(http_status(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(
            http_status(Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(code_name(Code::FailedPrecondition), "failed_precondition");
    }
}
