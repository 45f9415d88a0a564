//! Overload protection at the front: past the bound on calls in flight, a call is refused
//! at once with RESOURCE_EXHAUSTED and RetryInfo (a status, never a transport error), on the
//! gRPC and the HTTP front alike; calls already admitted carry on.

use std::time::Duration;

use llm_gateway::mock_upstream::{MockSettings, MockUpstream};
use serde_json::json;
use tonic_types::StatusExt;

use crate::common::*;

/// Waits until the mock has received `n` requests.
async fn received(mock: &MockUpstream, n: u64) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while mock.stats().requests() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the held calls reached the mock");
}

const BOUND: &str = r#"
[admission]
max_in_flight = 2
queue = 0
retry_after = "250ms"
[http]
listen = "127.0.0.1:0"
"#;

#[tokio::test]
async fn past_the_in_flight_bound_calls_get_resource_exhausted_with_retry_info() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let (gateway, http) = Gateway::start_http(&openai_toml(&mock, BOUND)).await;
    // Two calls that never end hold both slots.
    let held: Vec<_> = (0..2)
        .map(|_| {
            let mut client = gateway.client();
            tokio::spawn(async move { client.chat(request("openai/m+hang", "hold")).await })
        })
        .collect();
    received(&mock, 2).await;

    let status = gateway
        .client()
        .chat(request("openai/m", "one too many"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "IN_FLIGHT_LIMIT");
    let details = status.get_error_details();
    assert_eq!(
        details.retry_info().and_then(|r| r.retry_delay),
        Some(Duration::from_millis(250))
    );
    let quota = details
        .quota_failure()
        .expect("a QuotaFailure names the bound");
    assert_eq!(quota.violations[0].subject, "gateway");
    // Streams are bounded the same way.
    let status = gateway
        .client()
        .chat_stream(request("openai/m", "stream"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    // The HTTP front shares the bound: 429 with retry-after.
    let resp = llm_gateway::providers::http_client(&Default::default())
        .unwrap()
        .post(format!("{http}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(
            json!({"model": "openai/m", "messages": [{"role": "user", "content": "hi"}]})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    // The refused calls never reached the mock; ListModels is not bounded.
    assert_eq!(mock.stats().requests(), 2);
    list_models(&gateway).await;

    // Once the held calls end, calls are admitted again.
    for h in held {
        h.abort();
    }
    mock.stats().wait_cancelled(2).await;
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match gateway.client().chat(request("openai/m", "again")).await {
                Ok(answer) => return answer.into_inner(),
                // The slots free as the aborted calls' streams are reset.
                Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    })
    .await
    .expect("a slot frees once the held calls end");
    assert_eq!(answer.provider, "openai");
}
