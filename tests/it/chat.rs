//! Unary Chat through the gateway against the OpenAI-format mock upstream.

use llm_gateway::pb;

use crate::common::*;

#[tokio::test]
async fn unary_chat_returns_reply_usage_cost_and_route() {
    let (mock, gateway) = openai_pair().await;
    let mut req = request("openai/gpt-4o-mini", "hello gateway");
    req.temperature = Some(0.3);
    req.max_tokens = Some(50);
    req.tags.insert("team".into(), "search".into());
    let response = gateway.client().chat(req).await.unwrap();
    let request_id = response
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let response = response.into_inner();

    assert_eq!(reply_text(&response), "Mock reply to: hello gateway");
    assert_eq!(response.id, request_id);
    assert_eq!(response.provider, "openai");
    assert_eq!(response.model, "gpt-4o-mini");
    assert_eq!(response.finish_reason, pb::FinishReason::Stop as i32);
    let usage = response.usage.unwrap();
    assert_eq!(
        (usage.input_tokens, usage.output_tokens, usage.total_tokens),
        (2, 5, 7)
    );
    assert_eq!(usage.source, pb::UsageSource::Provider as i32);
    // gpt-4o-mini: $0.15 / $0.60 per million tokens.
    let cost = response.cost.unwrap();
    let expected = 2.0 * 0.15 / 1e6 + 5.0 * 0.60 / 1e6;
    assert!((cost.total_usd - expected).abs() < 1e-12, "{cost:?}");
    let route = response.route.unwrap();
    assert_eq!(route.attempts.len(), 1);
    assert_eq!(route.attempts[0].kind, pb::AttemptKind::Primary as i32);
    assert_eq!(
        route.attempts[0].outcome,
        pb::AttemptOutcome::Succeeded as i32
    );

    // What went upstream: the OpenAI wire format, with the key, without tags.
    let body = mock.stats().last_body().unwrap();
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["temperature"], 0.3);
    assert_eq!(
        body["messages"][0],
        serde_json::json!({"role": "user", "content": "hello gateway"})
    );
    assert!(body.get("tags").is_none());
    let headers = mock.stats().last_headers().unwrap();
    assert_eq!(headers["authorization"], "Bearer sk-test-secret");
}

#[tokio::test]
async fn request_id_from_caller_is_echoed() {
    let (_mock, gateway) = openai_pair().await;
    let mut req = tonic::Request::new(request("openai/gpt-4o-mini", "hi"));
    req.metadata_mut()
        .insert("x-request-id", "caller-id-42".parse().unwrap());
    let response = gateway.client().chat(req).await.unwrap();
    assert_eq!(
        response.metadata().get("x-request-id").unwrap(),
        "caller-id-42"
    );
    assert_eq!(response.into_inner().id, "caller-id-42");
}

#[tokio::test]
async fn unary_tool_call() {
    let (mock, gateway) = openai_pair().await;
    let mut req = request("openai/gpt-4o+tools", "weather in Paris?");
    req.tools = vec![weather_tool()];
    req.tool_choice = Some(pb::ToolChoice {
        mode: pb::ToolChoiceMode::Named as i32,
        tool_name: "get_weather".into(),
    });
    let response = gateway.client().chat(req).await.unwrap().into_inner();
    assert_eq!(response.finish_reason, pb::FinishReason::ToolCalls as i32);
    let message = response.message.unwrap();
    let Some(pb::content_part::Part::ToolCall(call)) = &message.content[0].part else {
        panic!("expected a tool call, got {message:?}");
    };
    assert_eq!(call.id, "call_mock_1");
    assert_eq!(call.name, "get_weather");
    let args: serde_json::Value = serde_json::from_str(&call.arguments).unwrap();
    assert_eq!(args["location"], "Paris");

    let body = mock.stats().last_body().unwrap();
    assert_eq!(body["tools"][0]["function"]["name"], "get_weather");
    assert_eq!(
        body["tools"][0]["function"]["parameters"],
        serde_json::json!({"type": "object"})
    );
    assert_eq!(
        body["tool_choice"],
        serde_json::json!({"type": "function", "function": {"name": "get_weather"}})
    );
}

#[tokio::test]
async fn tool_result_round_trip_reaches_upstream() {
    let (mock, gateway) = openai_pair().await;
    let mut req = request("openai/gpt-4o", "weather?");
    req.messages.push(pb::Message {
        role: pb::Role::Assistant as i32,
        content: vec![pb::ContentPart {
            part: Some(pb::content_part::Part::ToolCall(pb::ToolCall {
                id: "call_1".into(),
                name: "get_weather".into(),
                arguments: "{\"location\":\"Paris\"}".into(),
            })),
        }],
        name: String::new(),
    });
    req.messages.push(pb::Message {
        role: pb::Role::Tool as i32,
        content: vec![pb::ContentPart {
            part: Some(pb::content_part::Part::ToolResult(pb::ToolResult {
                tool_call_id: "call_1".into(),
                content: "sunny, 21C".into(),
                ..Default::default()
            })),
        }],
        name: String::new(),
    });
    req.tools = vec![weather_tool()];
    gateway.client().chat(req).await.unwrap();
    let body = mock.stats().last_body().unwrap();
    assert_eq!(body["messages"][1]["tool_calls"][0]["id"], "call_1");
    assert_eq!(
        body["messages"][2],
        serde_json::json!({"role": "tool", "content": "sunny, 21C", "tool_call_id": "call_1"})
    );
}

#[tokio::test]
async fn image_is_sent_as_data_url() {
    let (mock, gateway) = openai_pair().await;
    let mut req = request("openai/gpt-4o", "what is this?");
    req.messages[0].content.push(pb::ContentPart {
        part: Some(pb::content_part::Part::Image(pb::Image {
            source: Some(pb::image::Source::Data(vec![0x89, b'P', b'N', b'G'].into())),
            mime_type: "image/png".into(),
            detail: pb::ImageDetail::High as i32,
        })),
    });
    gateway.client().chat(req).await.unwrap();
    let body = mock.stats().last_body().unwrap();
    assert_eq!(
        body["messages"][0]["content"][1],
        serde_json::json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw==", "detail": "high"}})
    );
}

#[tokio::test]
async fn missing_usage_is_reported_as_such() {
    let (_mock, gateway) = openai_pair().await;
    let response = gateway
        .client()
        .chat(request("openai/gpt-4o-mini+no_usage", "hi"))
        .await
        .unwrap()
        .into_inner();
    let usage = response.usage.unwrap();
    assert_eq!(usage.source, pb::UsageSource::NotReported as i32);
    assert!(response.cost.is_none());
}

#[tokio::test]
async fn builtin_mock_answers_without_config() {
    let gateway = Gateway::start("").await;
    let response = gateway
        .client()
        .chat(request("mock/echo", "ping"))
        .await
        .unwrap()
        .into_inner();
    assert!(reply_text(&response).contains("mock"), "{response:?}");
    assert!(reply_text(&response).ends_with("You said: ping"));
    let models = gateway
        .client()
        .list_models(pb::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(models.models.len(), 1);
    assert_eq!(models.models[0].id, "mock/echo");
}

#[tokio::test]
async fn list_models_reports_registry_facts() {
    let (_mock, gateway) = openai_pair().await;
    let models = gateway
        .client()
        .list_models(pb::ListModelsRequest {
            provider: "openai".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mini = models
        .models
        .iter()
        .find(|m| m.id == "openai/gpt-4o-mini")
        .unwrap();
    assert_eq!(mini.kind, pb::ModelKind::Model as i32);
    assert_eq!(mini.input_price_per_mtok, Some(0.15));
    assert_eq!(mini.context_window, Some(128_000));
    assert!(mini.supports_tools);
}
