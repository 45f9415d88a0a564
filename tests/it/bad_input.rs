//! No bad input gets INTERNAL: undecodable protobuf, invalid UTF-8, nesting past the
//! decoder's limit and broken gRPC framing are INVALID_ARGUMENT; a message over the size
//! limit is RESOURCE_EXHAUSTED with the limit in the message. Sent as raw bytes through a
//! tonic client, and as raw HTTP/2 frames where a tonic client cannot be made to misbehave.

use bytes::Bytes;
use llm_gateway::{pb, server::MAX_REQUEST_BYTES};
use prost::Message as _;
use tonic::Code;

use crate::common::*;

const CHAT: &str = "/llmgateway.v1.LlmGateway/Chat";

fn assert_invalid(status: &tonic::Status, what: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    assert_eq!(reason(status), "INVALID_ARGUMENT", "{what}");
}

/// A tool schema nested `depth` structs deep.
fn nested_schema(depth: usize) -> prost_types::Struct {
    let mut inner = prost_types::Struct::default();
    for _ in 0..depth {
        let mut outer = prost_types::Struct::default();
        outer.fields.insert(
            "x".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StructValue(inner)),
            },
        );
        inner = outer;
    }
    inner
}

#[tokio::test]
async fn undecodable_messages_are_invalid_argument() {
    let gateway = Gateway::start("").await;
    let cases: Vec<(&str, Bytes)> = vec![
        (
            "a wire type that does not exist",
            Bytes::from_static(&[0x0f]),
        ),
        (
            "a length past the end",
            Bytes::from_static(&[0x0a, 0x7f, b'm']),
        ),
        (
            "invalid UTF-8 in `model`",
            Bytes::from_static(&[0x0a, 0x02, 0xff, 0xfe]),
        ),
        ("a truncated varint", Bytes::from_static(&[0x08, 0xff])),
    ];
    for (what, payload) in cases {
        for (path, bearer) in [
            (CHAT, None),
            ("/llmgateway.v1.LlmGateway/ChatStream", None),
            (
                "/llmgateway.v1.LlmGatewayAdmin/CreatePolicy",
                Some(ADMIN_TOKEN),
            ),
        ] {
            let status = raw_call(&gateway.channel, path, payload.clone(), bearer)
                .await
                .unwrap_err();
            assert_invalid(&status, &format!("{what} to {path}"));
        }
    }
    let status = raw_call(
        &gateway.channel,
        CHAT,
        Bytes::from_static(&[0x0a, 0x02, 0xff, 0xfe]),
        None,
    )
    .await
    .unwrap_err();
    assert!(status.message().contains("UTF-8"), "{}", status.message());
}

#[tokio::test]
async fn nesting_past_the_decoder_limit_is_invalid_argument() {
    let gateway = Gateway::start("").await;
    let mut request = request("mock/echo", "hi");
    request.tools.push(pb::Tool {
        name: "deep".into(),
        parameters: Some(nested_schema(120)),
        ..Default::default()
    });
    let status = raw_call(
        &gateway.channel,
        CHAT,
        Bytes::from(request.encode_to_vec()),
        None,
    )
    .await
    .unwrap_err();
    assert_invalid(&status, "nesting");
    assert!(
        status.message().contains("recursion limit"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn oversized_messages_are_resource_exhausted_with_the_limit() {
    let gateway = Gateway::start("").await;
    let payload = Bytes::from(vec![0u8; MAX_REQUEST_BYTES + 1]);
    let status = raw_call(&gateway.channel, CHAT, payload, None)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "MESSAGE_TOO_LARGE");
    assert!(
        status
            .message()
            .contains(&format!("at most {MAX_REQUEST_BYTES} bytes")),
        "{}",
        status.message()
    );
    // Health and reflection keep tonic's 4 MiB, refused the same way.
    let payload = Bytes::from(vec![0u8; 4 * 1024 * 1024 + 1]);
    let status = raw_call(
        &gateway.channel,
        "/grpc.health.v1.Health/Check",
        payload,
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("at most 4194304 bytes"));
    // Exactly at the limit is decoded (and then judged on its content).
    let mut fits = request("mock/echo", "");
    fits.messages[0].name = "n".repeat(MAX_REQUEST_BYTES - 64);
    let mut bytes = fits.encode_to_vec();
    bytes.resize(MAX_REQUEST_BYTES, 0);
    let status = raw_call(&gateway.channel, CHAT, Bytes::from(bytes), None)
        .await
        .unwrap_err();
    assert_ne!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_ne!(status.code(), Code::Internal, "{status:?}");
}

/// Sends `body` as the whole HTTP/2 request body of a gRPC call to `path`; the status.
async fn h2_call(gateway: &Gateway, path: &str, body: &[u8]) -> (Code, String) {
    let addr = gateway.addr;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(request, false).unwrap();
    send.send_data(Bytes::copy_from_slice(body), true).unwrap();
    let response = response.await.unwrap();
    let (head, mut body) = response.into_parts();
    let mut headers = head.headers;
    if !headers.contains_key("grpc-status") {
        while let Some(chunk) = body.data().await {
            chunk.unwrap();
        }
        headers = body.trailers().await.unwrap().unwrap_or_default();
    }
    driver.abort();
    let status = tonic::Status::from_header_map(&headers).expect("a grpc status");
    (status.code(), status.message().to_owned())
}

fn grpc_frame(flag: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![flag];
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(payload);
    out
}

#[tokio::test]
async fn broken_framing_is_invalid_argument() {
    let gateway = Gateway::start("").await;
    let good = request("mock/echo", "hi").encode_to_vec();
    // A well-framed call works over the same raw path.
    let (code, _) = h2_call(&gateway, CHAT, &grpc_frame(0, &good)).await;
    assert_eq!(code, Code::Ok);
    let truncated = grpc_frame(0, &good);
    for (what, body) in [
        ("no message at all", Vec::new()),
        ("half a frame header", vec![0, 0, 0]),
        (
            "a body shorter than its frame",
            truncated[..truncated.len() - 2].to_vec(),
        ),
        ("an unknown compressed flag", grpc_frame(7, &good)),
        ("compressed without grpc-encoding", grpc_frame(1, &good)),
    ] {
        for path in [CHAT, "/grpc.health.v1.Health/Check"] {
            let (code, message) = h2_call(&gateway, path, &body).await;
            assert_eq!(code, Code::InvalidArgument, "{what} to {path}: {message}");
        }
    }
    let (code, message) = h2_call(&gateway, CHAT, &[0, 0x7f, 0xff, 0xff, 0xff]).await;
    assert_eq!(code, Code::ResourceExhausted, "{message}");
}
