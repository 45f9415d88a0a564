//! ChatStream: deltas, the final event, and stream integrity.

use llm_gateway::pb::{self, chat_stream_response::Event, content_delta::Delta};
use tonic::Code;

use crate::common::*;

#[tokio::test]
async fn stream_has_start_deltas_and_final_event_with_usage() {
    let (mock, gateway) = openai_pair().await;
    let stream = gateway
        .client()
        .chat_stream(request("openai/gpt-4o-mini", "stream please"))
        .await
        .unwrap()
        .into_inner();
    let (events, status) = collect_stream(stream).await;
    status.unwrap();
    let Event::Start(start) = &events[0] else {
        panic!("first event must be start: {events:?}");
    };
    assert_eq!(
        (start.provider.as_str(), start.model.as_str()),
        ("openai", "gpt-4o-mini")
    );
    assert_eq!(text_of(&events), "Mock reply to: stream please");
    assert!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Delta(_)))
            .count()
            >= 4
    );
    let Some(Event::Finish(finish)) = events.last() else {
        panic!("last event must be finish: {events:?}");
    };
    assert_eq!(finish.finish_reason, pb::FinishReason::Stop as i32);
    let usage = finish.usage.unwrap();
    assert_eq!(usage.source, pb::UsageSource::Provider as i32);
    assert_eq!((usage.input_tokens, usage.output_tokens), (2, 5));
    assert!(finish.cost.unwrap().total_usd > 0.0);
    let route = finish.route.as_ref().unwrap();
    assert_eq!(
        route.attempts[0].outcome,
        pb::AttemptOutcome::Succeeded as i32
    );
    assert!(route.attempts[0].time_to_first_token.is_some());

    let body = mock.stats().last_body().unwrap();
    assert_eq!(body["stream"], true);
    assert_eq!(
        body["stream_options"],
        serde_json::json!({"include_usage": true})
    );
}

#[tokio::test]
async fn streamed_tool_call_arguments_arrive_in_pieces() {
    let (_mock, gateway) = openai_pair().await;
    let mut req = request("openai/gpt-4o+tools+chunks=4", "weather?");
    req.tools = vec![weather_tool()];
    let stream = gateway
        .client()
        .chat_stream(req)
        .await
        .unwrap()
        .into_inner();
    let (events, status) = collect_stream(stream).await;
    status.unwrap();
    let pieces: Vec<&pb::ToolCallDelta> = events
        .iter()
        .filter_map(|e| match e {
            Event::Delta(pb::ContentDelta {
                delta: Some(Delta::ToolCall(d)),
            }) => Some(d),
            _ => None,
        })
        .collect();
    assert!(pieces.len() >= 4, "{pieces:?}");
    assert_eq!(pieces[0].id, "call_mock_1");
    assert_eq!(pieces[0].name, "get_weather");
    let args: String = pieces.iter().map(|p| p.arguments.as_str()).collect();
    assert_eq!(args, r#"{"location":"Paris","unit":"celsius"}"#);
    let Some(Event::Finish(finish)) = events.last() else {
        panic!("no finish: {events:?}");
    };
    assert_eq!(finish.finish_reason, pb::FinishReason::ToolCalls as i32);
}

#[tokio::test]
async fn stream_cut_midway_ends_with_error_not_clean_end() {
    let (_mock, gateway) = openai_pair().await;
    let stream = gateway
        .client()
        .chat_stream(request("openai/gpt-4o-mini+chunks=6+truncate", "hi"))
        .await
        .unwrap()
        .into_inner();
    let (events, status) = collect_stream(stream).await;
    let status = status.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "STREAM_BROKEN");
    assert!(!events.iter().any(|e| matches!(e, Event::Finish(_))));
    assert!(
        !text_of(&events).is_empty(),
        "content before the cut is delivered"
    );
}

#[tokio::test]
async fn malformed_event_ends_with_error() {
    let (_mock, gateway) = openai_pair().await;
    let stream = gateway
        .client()
        .chat_stream(request("openai/gpt-4o-mini+chunks=6+malformed", "hi"))
        .await
        .unwrap()
        .into_inner();
    let (events, status) = collect_stream(stream).await;
    let status = status.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(reason(&status), "STREAM_BROKEN");
    assert!(!events.iter().any(|e| matches!(e, Event::Finish(_))));
}

#[tokio::test]
async fn in_stream_error_event_ends_with_error() {
    let (_mock, gateway) = openai_pair().await;
    let stream = gateway
        .client()
        .chat_stream(request("openai/gpt-4o-mini+chunks=6+stream_error", "hi"))
        .await
        .unwrap()
        .into_inner();
    let (_events, status) = collect_stream(stream).await;
    assert_eq!(status.unwrap_err().code(), Code::Unavailable);
}

#[tokio::test]
async fn stalled_stream_ends_with_error_after_idle_timeout() {
    // The test config sets upstream.stream_idle_timeout = 2s.
    let (_mock, gateway) = openai_pair().await;
    let stream = gateway
        .client()
        .chat_stream(request("openai/gpt-4o-mini+chunks=6+stall", "hi"))
        .await
        .unwrap()
        .into_inner();
    let (_events, status) = collect_stream(stream).await;
    let status = status.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(reason(&status), "TIMEOUT");
}

#[tokio::test]
async fn upstream_error_before_first_chunk_is_a_plain_status() {
    let (_mock, gateway) = openai_pair().await;
    let status = gateway
        .client()
        .chat_stream(request("openai/gpt-4o-mini+status=500", "hi"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(reason(&status), "SERVER_ERROR");
}

#[tokio::test]
async fn builtin_mock_streams() {
    let gateway = Gateway::start("").await;
    let stream = gateway
        .client()
        .chat_stream(request("mock/echo", "ping"))
        .await
        .unwrap()
        .into_inner();
    let (events, status) = collect_stream(stream).await;
    status.unwrap();
    assert!(text_of(&events).ends_with("You said: ping"));
    assert!(matches!(events.last(), Some(Event::Finish(_))));
}
