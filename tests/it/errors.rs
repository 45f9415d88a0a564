//! Invalid input and upstream failures map to the documented statuses and details.

use std::time::Duration;

use llm_gateway::pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::*;

async fn invalid(req: pb::ChatRequest) -> Vec<String> {
    let (_mock, gateway) = openai_pair().await;
    let status = gateway.client().chat(req).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    violated_fields(&status)
}

#[tokio::test]
async fn empty_model_is_invalid() {
    assert_eq!(invalid(request("", "hi")).await, vec!["model"]);
}

#[tokio::test]
async fn empty_messages_are_invalid() {
    let mut req = request("openai/gpt-4o", "hi");
    req.messages.clear();
    assert_eq!(invalid(req).await, vec!["messages"]);
}

#[tokio::test]
async fn tool_message_without_tool_call_id_is_invalid() {
    let mut req = request("openai/gpt-4o", "hi");
    req.messages.push(pb::Message {
        role: pb::Role::Tool as i32,
        content: vec![pb::ContentPart {
            part: Some(pb::content_part::Part::ToolResult(pb::ToolResult {
                tool_call_id: String::new(),
                content: "42".into(),
                ..Default::default()
            })),
        }],
        name: String::new(),
    });
    assert_eq!(
        invalid(req).await,
        vec!["messages[1].content[0].tool_result.tool_call_id"]
    );
}

#[tokio::test]
async fn temperature_out_of_range_is_invalid() {
    let mut req = request("openai/gpt-4o", "hi");
    req.temperature = Some(2.5);
    assert_eq!(invalid(req).await, vec!["temperature"]);
}

#[tokio::test]
async fn unsupported_image_mime_type_is_invalid() {
    let mut req = request("openai/gpt-4o", "hi");
    req.messages[0].content.push(pb::ContentPart {
        part: Some(pb::content_part::Part::Image(pb::Image {
            source: Some(pb::image::Source::Data(vec![1, 2, 3].into())),
            mime_type: "image/bmp".into(),
            detail: 0,
        })),
    });
    assert_eq!(
        invalid(req).await,
        vec!["messages[0].content[1].image.mime_type"]
    );
}

#[tokio::test]
async fn unknown_provider_and_model_are_not_found() {
    let (_mock, gateway) = openai_pair().await;
    let status = gateway
        .client()
        .chat(request("nosuch/model", "hi"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("nosuch"), "{}", status.message());
    let status = gateway
        .client()
        .chat(request("no-slash-policy", "hi"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    // A model the upstream does not know: its 404 becomes NOT_FOUND too.
    let status = gateway
        .client()
        .chat(request("openai/gpt-9+status=404", "hi"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(reason(&status), "MODEL_NOT_FOUND");
}

#[tokio::test]
async fn upstream_500_is_unavailable_with_the_trail() {
    let (_mock, gateway) = openai_pair().await;
    let status = gateway
        .client()
        .chat(request("openai/gpt-4o+status=500", "hi"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let details = status.get_error_details();
    let info = details.error_info().unwrap();
    assert_eq!(info.reason, "SERVER_ERROR");
    assert_eq!(info.domain, "llmgateway");
    // A concrete model is retried (3 attempts by default) with backoff before giving up.
    assert_eq!(info.metadata["attempts"], "3");
    assert!(
        info.metadata["attempt.1"]
            .starts_with("openai/gpt-4o+status=500 primary failed SERVER_ERROR")
    );
    assert!(
        info.metadata["attempt.3"]
            .starts_with("openai/gpt-4o+status=500 retry failed SERVER_ERROR")
    );
    assert!(
        !status.message().contains("mock"),
        "no upstream body in messages: {}",
        status.message()
    );
}

#[tokio::test]
async fn upstream_400_is_invalid_argument() {
    let (_mock, gateway) = openai_pair().await;
    let status = gateway
        .client()
        .chat(request("openai/gpt-4o+status=400", "hi"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(reason(&status), "INVALID_REQUEST");
}

#[tokio::test]
async fn upstream_401_does_not_leak_the_key() {
    let (_mock, gateway) = openai_pair().await;
    let status = gateway
        .client()
        .chat(request("openai/gpt-4o+status=401", "hi"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "AUTHENTICATION");
    assert!(!status.message().contains("sk-"), "{}", status.message());
}

#[tokio::test]
async fn rate_limit_carries_retry_info() {
    let (_mock, gateway) = openai_pair().await;
    let status = gateway
        .client()
        .chat(request("openai/gpt-4o+status=429+retry_after=7", "hi"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "RATE_LIMITED");
    let retry = status.get_error_details().retry_info().unwrap().retry_delay;
    assert_eq!(retry, Some(Duration::from_secs(7)));
}

#[tokio::test]
async fn malformed_upstream_json_is_unavailable_not_a_crash() {
    let (_mock, gateway) = openai_pair().await;
    let status = gateway
        .client()
        .chat(request("openai/gpt-4o+malformed", "hi"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(reason(&status), "INVALID_RESPONSE");
}

#[tokio::test]
async fn deadline_exceeded_drops_the_upstream_request() {
    let (mock, gateway) = openai_pair().await;
    let mut req = tonic::Request::new(request("openai/gpt-4o+latency=5000", "hi"));
    req.set_timeout(Duration::from_millis(1000));
    let status = gateway.client().chat(req).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    tokio::time::timeout(Duration::from_secs(5), mock.stats().wait_cancelled(1))
        .await
        .expect("the upstream saw its request dropped");
}
