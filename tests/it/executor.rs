//! Fallback and hedging end to end: the real server, policies from the config file, and the
//! mock upstream scripted to hang or be slow.

use std::time::Duration;

use llm_gateway::{
    mock_upstream::{MockSettings, MockUpstream},
    pb::{self, chat_stream_response::Event},
};
use tonic::Request;

use crate::common::*;

async fn gateway_with(policies: &str) -> (MockUpstream, Gateway) {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let url = mock.openai_base_url();
    let gateway = Gateway::start(&format!(
        r#"
[server]
deadline_margin = "250ms"
[upstream]
stream_idle_timeout = "5s"
[providers.a]
kind = "openai-compatible"
base_url = "{url}"
[providers.b]
kind = "openai-compatible"
base_url = "{url}"
{policies}
"#
    ))
    .await;
    (mock, gateway)
}

fn with_deadline(req: pb::ChatRequest, deadline: Duration) -> Request<pb::ChatRequest> {
    let mut req = Request::new(req);
    req.set_timeout(deadline);
    req
}

#[tokio::test]
async fn hanging_primary_falls_back_and_every_call_makes_its_deadline() {
    let (mock, gateway) = gateway_with(
        r#"
[policies.failover]
targets = [
  { provider = "a", model = "m+hang" },
  { provider = "b", model = "m" },
]
execution = { attempt_timeout = "300ms", max_attempts = 2 }
"#,
    )
    .await;
    for _ in 0..5 {
        let answer = gateway
            .client()
            .chat(with_deadline(
                request("failover", "hi"),
                Duration::from_secs(2),
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.provider, "b");
        let route = answer.route.unwrap();
        assert_eq!(route.attempts[0].reason, "TIMEOUT");
        assert_eq!(route.attempts[1].kind, pb::AttemptKind::Fallback as i32);
    }
    // Every hung attempt was abandoned: its upstream request was dropped.
    tokio::time::timeout(Duration::from_secs(5), mock.stats().wait_cancelled(5))
        .await
        .expect("hung attempts were cancelled upstream");
}

#[tokio::test]
async fn slow_primary_is_hedged_and_its_connection_closed() {
    let (mock, gateway) = gateway_with(
        r#"
[policies.hedged]
targets = [
  { provider = "a", model = "m+latency=3000" },
  { provider = "b", model = "m" },
]
execution = { hedging = { mode = "fixed", delay = "100ms" } }
"#,
    )
    .await;
    let answer = gateway
        .client()
        .chat(with_deadline(
            request("hedged", "hi"),
            Duration::from_secs(10),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.provider, "b");
    let route = answer.route.unwrap();
    let kinds: Vec<(i32, i32)> = route.attempts.iter().map(|a| (a.kind, a.outcome)).collect();
    assert_eq!(
        kinds,
        vec![
            (
                pb::AttemptKind::Primary as i32,
                pb::AttemptOutcome::Cancelled as i32
            ),
            (
                pb::AttemptKind::Hedge as i32,
                pb::AttemptOutcome::Succeeded as i32
            ),
        ]
    );
    tokio::time::timeout(Duration::from_secs(5), mock.stats().wait_cancelled(1))
        .await
        .expect("the losing primary's upstream request was dropped");
}

#[tokio::test]
async fn streaming_hedge_commits_to_the_first_stream_with_a_chunk() {
    let (mock, gateway) = gateway_with(
        r#"
[policies.hedged-stream]
targets = [
  { provider = "a", model = "m+latency=3000" },
  { provider = "b", model = "m" },
]
execution = { hedging = { mode = "fixed", delay = "100ms" } }
"#,
    )
    .await;
    let stream = gateway
        .client()
        .chat_stream(request("hedged-stream", "hi"))
        .await
        .unwrap()
        .into_inner();
    let (events, status) = collect_stream(stream).await;
    status.unwrap();
    let Event::Start(start) = &events[0] else {
        panic!("no start: {events:?}");
    };
    assert_eq!(start.provider, "b");
    let Some(Event::Finish(finish)) = events.last() else {
        panic!("no finish: {events:?}");
    };
    let route = finish.route.as_ref().unwrap();
    assert_eq!(
        route.attempts[0].outcome,
        pb::AttemptOutcome::Cancelled as i32
    );
    assert_eq!(route.attempts[1].kind, pb::AttemptKind::Hedge as i32);
    tokio::time::timeout(Duration::from_secs(5), mock.stats().wait_cancelled(1))
        .await
        .expect("the other stream's upstream request was dropped");
}

#[tokio::test]
async fn deadline_too_short_for_any_answer_is_deadline_exceeded() {
    let (_mock, gateway) = gateway_with(
        r#"
[policies.slow]
targets = [{ provider = "a", model = "m+latency=3000" }]
"#,
    )
    .await;
    let status = gateway
        .client()
        .chat(with_deadline(
            request("slow", "hi"),
            Duration::from_millis(1000),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
}
