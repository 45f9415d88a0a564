//! Server behaviour: health, reflection, cancellation, graceful shutdown.

use std::time::Duration;

use llm_gateway::pb::chat_stream_response::Event;
use tokio_stream::StreamExt;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use crate::common::*;

#[tokio::test]
async fn health_is_serving() {
    let gateway = Gateway::start("").await;
    let mut health = HealthClient::new(gateway.channel.clone());
    for service in ["", "llmgateway.v1.LlmGateway"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
}

#[tokio::test]
async fn reflection_lists_the_services() {
    let gateway = Gateway::start("").await;
    let mut client = ServerReflectionClient::new(gateway.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "llmgateway.v1.LlmGateway",
        "llmgateway.v1.LlmGatewayAdmin",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }

    // The descriptor of the gateway's file is served with its documentation.
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "llmgateway.v1.LlmGateway".into(),
        )),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    assert!(matches!(
        response.message_response,
        Some(MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()
    ));
}

#[tokio::test]
async fn client_cancel_closes_the_upstream_connection() {
    let (mock, gateway) = openai_pair().await;
    // Unary: the upstream hangs; the client gives up by dropping the call.
    let mut client = gateway.client();
    let call = tokio::spawn(async move { client.chat(request("openai/gpt-4o+hang", "hi")).await });
    wait_for_requests(&mock, 1).await;
    call.abort();
    tokio::time::timeout(Duration::from_secs(5), mock.stats().wait_cancelled(1))
        .await
        .expect("upstream saw the unary request dropped");

    // Streaming: the client drops the stream after the first event.
    let mut stream = gateway
        .client()
        .chat_stream(request("openai/gpt-4o+chunks=50+chunk_delay=100", "hi"))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        stream.message().await.unwrap().unwrap().event,
        Some(Event::Start(_))
    ));
    drop(stream);
    tokio::time::timeout(Duration::from_secs(5), mock.stats().wait_cancelled(2))
        .await
        .expect("upstream saw the stream dropped");
}

async fn wait_for_requests(mock: &llm_gateway::mock_upstream::MockUpstream, n: u64) {
    for _ in 0..500 {
        if mock.stats().requests() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("mock never saw {n} requests");
}

#[tokio::test]
async fn graceful_shutdown_lets_an_inflight_stream_finish() {
    let (_mock, mut gateway) = openai_pair().await;
    let mut health = HealthClient::new(gateway.channel.clone());
    let stream = gateway
        .client()
        .chat_stream(request(
            "openai/gpt-4o-mini+chunks=10+chunk_delay=50",
            "drain me",
        ))
        .await
        .unwrap()
        .into_inner();
    let collector = tokio::spawn(collect_stream(stream));
    gateway.signal_shutdown();
    // Health flips to NOT_SERVING while the stream drains.
    let mut saw_not_serving = false;
    for _ in 0..100 {
        match health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
        {
            Ok(r) if r.get_ref().status == ServingStatus::NotServing as i32 => {
                saw_not_serving = true;
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(_) => break,
        }
    }
    let (events, status) = collector.await.unwrap();
    status.expect("the in-flight stream completes");
    assert!(matches!(events.last(), Some(Event::Finish(_))));
    gateway.take_handle().await.unwrap().unwrap();
    assert!(
        saw_not_serving,
        "health never reported NOT_SERVING during the drain"
    );
}
