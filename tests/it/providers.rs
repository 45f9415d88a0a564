//! Provider adapters end to end: the same gRPC calls answered through the OpenAI, Anthropic,
//! Gemini and Azure OpenAI wire formats by the mock upstream, with usage, cost, tool calls,
//! images, rate limits and broken streams.

use std::time::Duration;

use llm_gateway::{
    mock_upstream::{MockSettings, MockUpstream, TOOL_ARGUMENTS},
    pb::{self, chat_stream_response::Event, content_part::Part},
};
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::*;

/// One model per wire format, each known to the built-in registry.
const MODELS: [&str; 3] = [
    "openai/gpt-4o-mini",
    "anthropic/claude-haiku-4-5",
    "gemini/gemini-2.5-flash",
];

/// The request every provider gets in the "same request, three providers" checks.
fn shared_request(model: &str) -> pb::ChatRequest {
    pb::ChatRequest {
        model: model.to_owned(),
        messages: vec![system("be brief"), user("hello there gateway")],
        temperature: Some(0.2),
        max_tokens: Some(64),
        ..Default::default()
    }
}

#[tokio::test]
async fn same_request_three_providers_same_shape_usage_and_cost() {
    let (mock, gateway) = all_providers_pair().await;
    // "be brief" + "hello there gateway"; the reply is "Mock reply to: hello there gateway".
    let (input, output) = (5, 6);
    let mut shapes = Vec::new();
    for model in MODELS {
        let response = gateway
            .client()
            .chat(shared_request(model))
            .await
            .unwrap_or_else(|s| panic!("{model}: {s:?}"))
            .into_inner();
        let (provider, name) = model.split_once('/').unwrap();
        assert_eq!(
            (response.provider.as_str(), response.model.as_str()),
            (provider, name)
        );
        assert_eq!(
            reply_text(&response),
            "Mock reply to: hello there gateway",
            "{model}"
        );
        assert_eq!(
            response.finish_reason,
            pb::FinishReason::Stop as i32,
            "{model}"
        );
        let usage = response.usage.unwrap();
        assert_eq!(usage.source, pb::UsageSource::Provider as i32, "{model}");
        assert_eq!(
            (usage.input_tokens, usage.output_tokens, usage.total_tokens),
            (input, output, input + output),
            "{model}"
        );
        let cost = response.cost.unwrap_or_else(|| panic!("{model}: no cost"));
        let expected = registry_cost(model, input, output);
        assert!(expected > 0.0);
        assert!(
            (cost.total_usd - expected).abs() < 1e-12,
            "{model}: {cost:?} vs {expected}"
        );
        let message = response.message.unwrap();
        shapes.push((
            message.role,
            message.content.len(),
            response.route.unwrap().attempts.len(),
        ));

        // Each went upstream in its own wire format.
        let body = mock.stats().last_body().unwrap();
        let headers = mock.stats().last_headers().unwrap();
        match provider {
            "openai" => {
                assert_eq!(
                    body["messages"][0],
                    serde_json::json!({"role": "system", "content": "be brief"})
                );
                // Not api.openai.com: the classic field.
                assert_eq!(body["max_tokens"], 64);
                assert_eq!(headers["authorization"], "Bearer sk-test-secret");
            }
            "anthropic" => {
                assert_eq!(body["system"], "be brief");
                assert_eq!(
                    body["messages"],
                    serde_json::json!([{"role": "user", "content": [{"type": "text", "text": "hello there gateway"}]}])
                );
                assert_eq!(body["max_tokens"], 64);
                assert_eq!(body["temperature"], 0.2);
                assert_eq!(headers["x-api-key"], "sk-ant-test-secret");
                assert_eq!(headers["anthropic-version"], "2023-06-01");
                assert!(headers.get("authorization").is_none());
            }
            "gemini" => {
                assert_eq!(
                    body["systemInstruction"],
                    serde_json::json!({"parts": [{"text": "be brief"}]})
                );
                assert_eq!(
                    body["contents"],
                    serde_json::json!([{"role": "user", "parts": [{"text": "hello there gateway"}]}])
                );
                assert_eq!(
                    body["generationConfig"],
                    serde_json::json!({"temperature": 0.2, "maxOutputTokens": 64})
                );
                assert_eq!(headers["x-goog-api-key"], "gemini-test-secret");
                assert!(headers.get("authorization").is_none());
            }
            other => unreachable!("{other}"),
        }
    }
    // Identical response shape: an assistant message with one text part, one attempt.
    assert!(shapes.windows(2).all(|w| w[0] == w[1]), "{shapes:?}");
    assert_eq!(shapes[0], (pb::Role::Assistant as i32, 1, 1));
}

#[tokio::test]
async fn same_stream_three_providers_same_events_usage_and_cost() {
    let (_mock, gateway) = all_providers_pair().await;
    let mut kinds = Vec::new();
    for model in MODELS {
        let (events, status) = stream(&gateway, shared_request(model)).await;
        status.unwrap_or_else(|s| panic!("{model}: {s:?}"));
        let Event::Start(start) = &events[0] else {
            panic!("{model}: first event must be start: {events:?}");
        };
        assert_eq!(format!("{}/{}", start.provider, start.model), model);
        assert_eq!(
            text_of(&events),
            "Mock reply to: hello there gateway",
            "{model}"
        );
        let deltas = events
            .iter()
            .filter(|e| matches!(e, Event::Delta(_)))
            .count();
        assert!(deltas >= 4, "{model}: {deltas} deltas");
        let Some(Event::Finish(finish)) = events.last() else {
            panic!("{model}: last event must be finish: {events:?}");
        };
        assert_eq!(
            finish.finish_reason,
            pb::FinishReason::Stop as i32,
            "{model}"
        );
        let usage = finish.usage.unwrap();
        assert_eq!(usage.source, pb::UsageSource::Provider as i32, "{model}");
        assert_eq!((usage.input_tokens, usage.output_tokens), (5, 6), "{model}");
        let cost = finish.cost.unwrap();
        assert!(
            (cost.total_usd - registry_cost(model, 5, 6)).abs() < 1e-12,
            "{model}"
        );
        kinds.push(
            events
                .iter()
                .map(|e| match e {
                    Event::Start(_) => "start",
                    Event::Delta(_) => "delta",
                    Event::Finish(_) => "finish",
                })
                .filter(|k| *k != "delta")
                .collect::<Vec<_>>(),
        );
    }
    assert!(kinds.iter().all(|k| k == &["start", "finish"]), "{kinds:?}");
}

#[tokio::test]
async fn cached_tokens_are_normalized_and_priced() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    // Directive-suffixed names are not in the registry: price them in the config.
    let extra = r#"
[[models]]
provider = "anthropic"
model = "claude-haiku-4-5+cached=3"
input = 1.0
output = 5.0
cached_input = 0.1
cache_write = 1.25
[[models]]
provider = "gemini"
model = "gemini-2.5-flash+cached=3"
input = 0.30
output = 2.50
cached_input = 0.03
"#;
    let gateway = Gateway::start(&all_providers_toml(&mock, extra)).await;
    for (model, prices) in [
        ("anthropic/claude-haiku-4-5+cached=3", (1.0, 5.0, 0.1)),
        ("gemini/gemini-2.5-flash+cached=3", (0.30, 2.50, 0.03)),
    ] {
        let response = gateway
            .client()
            .chat(shared_request(model))
            .await
            .unwrap()
            .into_inner();
        let usage = response.usage.unwrap();
        // Anthropic reports input_tokens without the cache reads; the gateway includes them.
        assert_eq!(usage.input_tokens, 5, "{model}");
        assert_eq!(usage.cached_input_tokens, Some(3), "{model}");
        let (input, output, cached) = prices;
        let expected = (2.0 * input + 3.0 * cached + 6.0 * output) / 1e6;
        let cost = response.cost.unwrap();
        assert!(
            (cost.total_usd - expected).abs() < 1e-12,
            "{model}: {cost:?}"
        );
    }
}

#[tokio::test]
async fn anthropic_max_tokens_defaults_to_4096() {
    let (mock, gateway) = all_providers_pair().await;
    gateway
        .client()
        .chat(request("anthropic/claude-sonnet-4-5", "hi"))
        .await
        .unwrap();
    assert_eq!(mock.stats().last_body().unwrap()["max_tokens"], 4096);
}

#[tokio::test]
async fn unary_tool_calls_through_each_format() {
    let (mock, gateway) = all_providers_pair().await;
    for (model, id) in [
        ("openai/gpt-4o+tools", "call_mock_1"),
        ("anthropic/claude-sonnet-4-5+tools", "toolu_mock_1"),
        ("gemini/gemini-2.5-flash+tools", "call_0"),
    ] {
        let mut req = request(model, "weather in Paris?");
        req.tools = vec![weather_tool()];
        req.tool_choice = Some(pb::ToolChoice {
            mode: pb::ToolChoiceMode::Named as i32,
            tool_name: "get_weather".into(),
        });
        let response = gateway.client().chat(req).await.unwrap().into_inner();
        assert_eq!(
            response.finish_reason,
            pb::FinishReason::ToolCalls as i32,
            "{model}"
        );
        let calls = tool_calls(&response);
        assert_eq!(calls.len(), 1, "{model}: {response:?}");
        assert_eq!(
            (calls[0].id.as_str(), calls[0].name.as_str()),
            (id, "get_weather")
        );
        let args: serde_json::Value = serde_json::from_str(&calls[0].arguments).unwrap();
        assert_eq!(
            args,
            serde_json::from_str::<serde_json::Value>(TOOL_ARGUMENTS).unwrap()
        );

        let body = mock.stats().last_body().unwrap();
        if model.starts_with("anthropic/") {
            assert_eq!(
                body["tools"],
                serde_json::json!([{"name": "get_weather", "description": "current weather", "input_schema": {"type": "object"}}])
            );
            assert_eq!(
                body["tool_choice"],
                serde_json::json!({"type": "tool", "name": "get_weather"})
            );
        } else if model.starts_with("gemini/") {
            assert_eq!(
                body["tools"],
                serde_json::json!([{"functionDeclarations": [{"name": "get_weather", "description": "current weather", "parametersJsonSchema": {"type": "object"}}]}])
            );
            assert_eq!(
                body["toolConfig"],
                serde_json::json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}})
            );
        }
    }
}

#[tokio::test]
async fn streamed_tool_call_arguments_through_each_format() {
    let (_mock, gateway) = all_providers_pair().await;
    for (model, id, min_pieces) in [
        ("openai/gpt-4o+tools+chunks=4", "call_mock_1", 4),
        (
            "anthropic/claude-sonnet-4-5+tools+chunks=4",
            "toolu_mock_1",
            4,
        ),
        // Gemini sends a function call whole, in one chunk.
        ("gemini/gemini-2.5-flash+tools+chunks=4", "call_0", 1),
    ] {
        let mut req = request(model, "weather?");
        req.tools = vec![weather_tool()];
        let (events, status) = stream(&gateway, req).await;
        status.unwrap_or_else(|s| panic!("{model}: {s:?}"));
        let pieces = tool_deltas(&events);
        assert!(pieces.len() >= min_pieces, "{model}: {pieces:?}");
        assert!(pieces.iter().all(|p| p.index == 0), "{model}");
        assert_eq!(
            (pieces[0].id.as_str(), pieces[0].name.as_str()),
            (id, "get_weather")
        );
        let args: String = pieces.iter().map(|p| p.arguments.as_str()).collect();
        assert_eq!(args, TOOL_ARGUMENTS, "{model}");
        let Some(Event::Finish(finish)) = events.last() else {
            panic!("{model}: no finish: {events:?}");
        };
        assert_eq!(
            finish.finish_reason,
            pb::FinishReason::ToolCalls as i32,
            "{model}"
        );
    }
}

#[tokio::test]
async fn tool_results_reach_anthropic_and_gemini_in_their_formats() {
    let (mock, gateway) = all_providers_pair().await;
    for model in ["anthropic/claude-sonnet-4-5", "gemini/gemini-2.5-flash"] {
        let mut req = request(model, "weather?");
        req.messages.push(pb::Message {
            role: pb::Role::Assistant as i32,
            content: vec![pb::ContentPart {
                part: Some(Part::ToolCall(pb::ToolCall {
                    id: "call_1".into(),
                    name: "get_weather".into(),
                    arguments: "{\"location\":\"Paris\"}".into(),
                })),
            }],
            name: String::new(),
        });
        // The result names no tool: the gateway fills it in from the call (Gemini needs it).
        req.messages.push(pb::Message {
            role: pb::Role::Tool as i32,
            content: vec![pb::ContentPart {
                part: Some(Part::ToolResult(pb::ToolResult {
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
        if model.starts_with("anthropic/") {
            assert_eq!(
                body["messages"][1],
                serde_json::json!({"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"location": "Paris"}}]})
            );
            assert_eq!(
                body["messages"][2],
                serde_json::json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "sunny, 21C"}]})
            );
        } else {
            assert_eq!(
                body["contents"][1],
                serde_json::json!({"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"location": "Paris"}}}]})
            );
            assert_eq!(
                body["contents"][2],
                serde_json::json!({"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"content": "sunny, 21C"}}}]})
            );
        }
    }
}

#[tokio::test]
async fn images_are_sent_in_each_format() {
    let (mock, gateway) = all_providers_pair().await;
    for model in ["anthropic/claude-sonnet-4-5", "gemini/gemini-2.5-flash"] {
        let mut req = request(model, "what are these?");
        req.messages[0].content.push(pb::ContentPart {
            part: Some(Part::Image(pb::Image {
                source: Some(pb::image::Source::Data(vec![0x89, b'P', b'N', b'G'].into())),
                mime_type: "image/png".into(),
                detail: pb::ImageDetail::High as i32,
            })),
        });
        req.messages[0].content.push(pb::ContentPart {
            part: Some(Part::Image(pb::Image {
                source: Some(pb::image::Source::Url("https://example.com/cat.jpg".into())),
                mime_type: "image/jpeg".into(),
                detail: 0,
            })),
        });
        gateway.client().chat(req).await.unwrap();
        let body = mock.stats().last_body().unwrap();
        if model.starts_with("anthropic/") {
            assert_eq!(
                body["messages"][0]["content"],
                serde_json::json!([
                    {"type": "text", "text": "what are these?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw=="}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}
                ])
            );
        } else {
            assert_eq!(
                body["contents"][0]["parts"],
                serde_json::json!([
                    {"text": "what are these?"},
                    {"inlineData": {"mimeType": "image/png", "data": "iVBORw=="}},
                    {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/cat.jpg"}}
                ])
            );
        }
    }
}

#[tokio::test]
async fn rate_limits_carry_the_providers_retry_delay() {
    let (_mock, gateway) = all_providers_pair().await;
    // Anthropic says it in `retry-after`; Gemini in a RESOURCE_EXHAUSTED RetryInfo detail.
    for model in [
        "anthropic/claude-sonnet-4-5+status=429+retry_after=7",
        "gemini/gemini-2.5-flash+status=429+retry_after=7",
    ] {
        let status = gateway
            .client()
            .chat(request(model, "hi"))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::ResourceExhausted,
            "{model}: {status:?}"
        );
        assert_eq!(reason(&status), "RATE_LIMITED");
        let retry = status.get_error_details().retry_info().unwrap().retry_delay;
        assert_eq!(retry, Some(Duration::from_secs(7)), "{model}");
    }
}

#[tokio::test]
async fn upstream_errors_map_to_the_same_statuses_for_every_format() {
    let (_mock, gateway) = all_providers_pair().await;
    let cases = [
        (
            "anthropic/claude-sonnet-4-5+status=529",
            Code::Unavailable,
            "OVERLOADED",
        ),
        (
            "gemini/gemini-2.5-flash+status=503",
            Code::Unavailable,
            "OVERLOADED",
        ),
        (
            "anthropic/claude-sonnet-4-5+status=500",
            Code::Unavailable,
            "SERVER_ERROR",
        ),
        (
            "gemini/gemini-2.5-flash+status=500",
            Code::Unavailable,
            "SERVER_ERROR",
        ),
        (
            "anthropic/claude-sonnet-4-5+status=401",
            Code::FailedPrecondition,
            "AUTHENTICATION",
        ),
        (
            "gemini/gemini-2.5-flash+status=401",
            Code::FailedPrecondition,
            "AUTHENTICATION",
        ),
        (
            "anthropic/claude-9+status=404",
            Code::NotFound,
            "MODEL_NOT_FOUND",
        ),
        (
            "gemini/gemini-9+status=404",
            Code::NotFound,
            "MODEL_NOT_FOUND",
        ),
        (
            "anthropic/claude-sonnet-4-5+status=400",
            Code::InvalidArgument,
            "INVALID_REQUEST",
        ),
        (
            "gemini/gemini-2.5-flash+status=400",
            Code::InvalidArgument,
            "INVALID_REQUEST",
        ),
        (
            "anthropic/claude-sonnet-4-5+malformed",
            Code::Unavailable,
            "INVALID_RESPONSE",
        ),
        (
            "gemini/gemini-2.5-flash+malformed",
            Code::Unavailable,
            "INVALID_RESPONSE",
        ),
    ];
    for (model, code, why) in cases {
        let status = gateway
            .client()
            .chat(request(model, "hi"))
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), reason(&status).as_str()),
            (code, why),
            "{model}: {status:?}"
        );
        assert!(!status.message().contains("secret"), "{}", status.message());
        // Only the caller's own faults may quote the provider's short message.
        if !matches!(code, Code::InvalidArgument | Code::NotFound) {
            assert!(
                !status.message().contains("mock"),
                "upstream text: {}",
                status.message()
            );
        }
    }
}

#[tokio::test]
async fn broken_streams_end_with_an_error_never_a_clean_end() {
    let (_mock, gateway) = all_providers_pair().await;
    let cases = [
        (
            "anthropic/claude-sonnet-4-5+chunks=6+truncate",
            "STREAM_BROKEN",
        ),
        ("gemini/gemini-2.5-flash+chunks=6+truncate", "STREAM_BROKEN"),
        (
            "anthropic/claude-sonnet-4-5+chunks=6+malformed",
            "STREAM_BROKEN",
        ),
        (
            "gemini/gemini-2.5-flash+chunks=6+malformed",
            "STREAM_BROKEN",
        ),
        // Anthropic's in-stream overloaded_error keeps its class; Gemini's INTERNAL breaks it.
        (
            "anthropic/claude-sonnet-4-5+chunks=6+stream_error",
            "OVERLOADED",
        ),
        (
            "gemini/gemini-2.5-flash+chunks=6+stream_error",
            "STREAM_BROKEN",
        ),
    ];
    for (model, why) in cases {
        let (events, status) = stream(&gateway, request(model, "hi")).await;
        let status = status.unwrap_err();
        assert_eq!(
            (status.code(), reason(&status).as_str()),
            (Code::Unavailable, why),
            "{model}: {status:?}"
        );
        assert!(
            !events.iter().any(|e| matches!(e, Event::Finish(_))),
            "{model}: {events:?}"
        );
        assert!(
            !text_of(&events).is_empty(),
            "{model}: content before the break is delivered"
        );
    }
}

#[tokio::test]
async fn stalled_anthropic_and_gemini_streams_time_out() {
    let (_mock, gateway) = all_providers_pair().await;
    for model in [
        "anthropic/claude-sonnet-4-5+chunks=6+stall",
        "gemini/gemini-2.5-flash+chunks=6+stall",
    ] {
        let (events, status) = stream(&gateway, request(model, "hi")).await;
        assert!(
            !text_of(&events).is_empty(),
            "{model}: the first chunk arrives"
        );
        let status = status.unwrap_err();
        assert_eq!(
            (status.code(), reason(&status).as_str()),
            (Code::Unavailable, "TIMEOUT"),
            "{model}"
        );
    }
}

#[tokio::test]
async fn missing_usage_is_reported_as_such_for_every_format() {
    let (_mock, gateway) = all_providers_pair().await;
    for model in [
        "anthropic/claude-sonnet-4-5+no_usage",
        "gemini/gemini-2.5-flash+no_usage",
    ] {
        let response = gateway
            .client()
            .chat(request(model, "hi"))
            .await
            .unwrap()
            .into_inner();
        let usage = response.usage.unwrap();
        assert_eq!(usage.source, pb::UsageSource::NotReported as i32, "{model}");
        assert!(response.cost.is_none(), "{model}");

        let (events, status) = stream(&gateway, request(model, "hi")).await;
        status.unwrap();
        let Some(Event::Finish(finish)) = events.last() else {
            panic!("{model}: no finish: {events:?}");
        };
        assert_eq!(
            finish.usage.unwrap().source,
            pb::UsageSource::NotReported as i32,
            "{model}"
        );
        assert!(finish.cost.is_none(), "{model}");
    }
}

#[tokio::test]
async fn azure_uses_deployment_urls_and_the_api_key_header() {
    let (mock, gateway) = all_providers_pair().await;
    let mut req = request("azure/gpt-4o-prod", "hello azure");
    req.max_tokens = Some(7);
    let response = gateway.client().chat(req).await.unwrap().into_inner();
    assert_eq!(reply_text(&response), "Mock reply to: hello azure");
    assert_eq!(
        response.usage.unwrap().source,
        pb::UsageSource::Provider as i32
    );
    // Deployment names are the operator's: no built-in price.
    assert!(response.cost.is_none());
    let headers = mock.stats().last_headers().unwrap();
    assert_eq!(headers["api-key"], "azure-test-secret");
    assert!(headers.get("authorization").is_none());
    assert_eq!(
        mock.stats().last_body().unwrap()["max_completion_tokens"],
        7
    );

    let (events, status) = stream(&gateway, request("azure/gpt-4o-prod", "hello azure")).await;
    status.unwrap();
    assert_eq!(text_of(&events), "Mock reply to: hello azure");
    let status = gateway
        .client()
        .chat(request("azure/gpt-4o-prod+status=429+retry_after=3", "hi"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
}

#[tokio::test]
async fn presets_speak_openai_and_keep_their_own_registry_kind() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&format!(
        r#"
[providers.team-a]
kind = "groq"
base_url = "{url}"
api_key = "gsk-a"
[providers.team-b]
kind = "groq"
base_url = "{url}"
api_key = "gsk-b"
[providers.local]
kind = "vllm"
base_url = "{url}"
"#,
        url = mock.openai_base_url()
    ))
    .await;
    for (provider, key) in [
        ("team-a", Some("Bearer gsk-a")),
        ("team-b", Some("Bearer gsk-b")),
        ("local", None),
    ] {
        let response = gateway
            .client()
            .chat(request(
                &format!("{provider}/llama-3.3-70b-versatile"),
                "hi",
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply_text(&response), "Mock reply to: hi");
        let headers = mock.stats().last_headers().unwrap();
        assert_eq!(
            headers.get("authorization").map(|v| v.to_str().unwrap()),
            key
        );
    }
    // Groq's quirk: the output limit goes in max_completion_tokens.
    let mut req = request("team-a/llama-3.3-70b-versatile", "hi");
    req.max_tokens = Some(9);
    gateway.client().chat(req).await.unwrap();
    assert_eq!(
        mock.stats().last_body().unwrap()["max_completion_tokens"],
        9
    );
    // A preset is not OpenAI: it does not list OpenAI's models.
    let models = gateway
        .client()
        .list_models(pb::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        !models.models.iter().any(|m| m.model.starts_with("gpt-")),
        "{models:?}"
    );
}

#[tokio::test]
async fn list_models_reports_anthropic_and_gemini_prices() {
    let (_mock, gateway) = all_providers_pair().await;
    let models = gateway
        .client()
        .list_models(pb::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let find = |id: &str| {
        models
            .models
            .iter()
            .find(|m| m.id == id)
            .unwrap_or_else(|| panic!("{id} not listed"))
    };
    let sonnet = find("anthropic/claude-sonnet-4-5");
    assert_eq!(
        (
            sonnet.input_price_per_mtok,
            sonnet.output_price_per_mtok,
            sonnet.cached_input_price_per_mtok
        ),
        (Some(3.0), Some(15.0), Some(0.3))
    );
    assert_eq!(sonnet.context_window, Some(200_000));
    assert!(sonnet.supports_tools && sonnet.supports_images);
    let flash = find("gemini/gemini-2.5-flash");
    assert_eq!(
        (flash.input_price_per_mtok, flash.output_price_per_mtok),
        (Some(0.30), Some(2.50))
    );
    assert_eq!(flash.context_window, Some(1_048_576));
    // Azure deployments are the operator's: none are listed without an allowlist.
    assert!(
        !models.models.iter().any(|m| m.provider == "azure"),
        "{models:?}"
    );
}

#[tokio::test]
async fn anthropic_json_formats_are_structured_outputs() {
    let (mock, gateway) = all_providers_pair().await;
    let mut schema = prost_types::Struct::default();
    schema.fields.insert(
        "type".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue("object".into())),
        },
    );
    for (format, expected) in [
        (
            pb::ResponseFormat {
                r#type: pb::ResponseFormatType::JsonSchema as i32,
                schema_name: "answer".into(),
                schema: Some(schema.clone()),
                strict: true,
            },
            serde_json::json!({"format": {"type": "json_schema", "schema": {"type": "object"}}}),
        ),
        (
            pb::ResponseFormat {
                r#type: pb::ResponseFormatType::JsonObject as i32,
                ..Default::default()
            },
            serde_json::json!({"format": {"type": "json_schema", "schema": {"type": "object"}}}),
        ),
    ] {
        let mut req = request("anthropic/claude-sonnet-4-5", "answer in json");
        req.response_format = Some(format);
        let response = gateway.client().chat(req).await.unwrap().into_inner();
        assert!(!reply_text(&response).is_empty());
        assert_eq!(mock.stats().last_body().unwrap()["output_config"], expected);
    }
}

#[tokio::test]
async fn upstream_messages_never_carry_the_key_or_a_bearer_token() {
    let (_mock, gateway) = all_providers_pair().await;
    for (model, key) in [
        ("openai/gpt-4o-mini+echo_key", "sk-test-secret"),
        ("anthropic/claude-sonnet-4-5+echo_key", "sk-ant-test-secret"),
        ("gemini/gemini-2.5-flash+echo_key", "gemini-test-secret"),
        ("azure/my-deployment+echo_key", "azure-test-secret"),
    ] {
        let status = gateway
            .client()
            .chat(request(model, "hi"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{model}: {status:?}");
        assert_eq!(reason(&status), "INVALID_REQUEST", "{model}");
        // The caller sees what is wrong...
        assert!(
            status.message().contains("temperature"),
            "{model}: {status:?}"
        );
        // ...but neither the key nor the token, anywhere in the status.
        let everything = format!("{status:?} {:?}", status.get_details_error_info());
        for secret in [key, "ya29.mock-oauth-token-0123456789"] {
            assert!(!everything.contains(secret), "{model}: {everything}");
        }
    }
}

#[tokio::test]
async fn list_models_includes_models_the_config_adds_and_providers_show_their_kind() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&all_providers_toml(
        &mock,
        &format!(
            r#"
[providers.local]
kind = "openai-compatible"
base_url = "{url}"
[providers.fast]
kind = "groq"
base_url = "{url}"
[[models]]
provider = "azure"
model = "gpt-4o-prod"
input = 2.5
output = 10.0
[[models]]
provider = "local"
model = "my-finetune"
context_window = 8192
"#,
            url = mock.openai_base_url()
        ),
    ))
    .await;
    let models = list_models(&gateway).await;
    let by_id: std::collections::HashMap<&str, &pb::ModelInfo> =
        models.models.iter().map(|m| (m.id.as_str(), m)).collect();
    let azure = by_id
        .get("azure/gpt-4o-prod")
        .unwrap_or_else(|| panic!("the priced azure deployment is not listed: {models:?}"));
    assert_eq!(
        (azure.input_price_per_mtok, azure.output_price_per_mtok),
        (Some(2.5), Some(10.0))
    );
    let local = by_id
        .get("local/my-finetune")
        .unwrap_or_else(|| panic!("the added model is not listed: {models:?}"));
    assert_eq!(local.context_window, Some(8192));
    // What is listed is routable, at the configured price.
    let response = gateway
        .client()
        .chat(request("azure/gpt-4o-prod", "hi"))
        .await
        .unwrap()
        .into_inner();
    assert!(response.cost.unwrap().total_usd > 0.0);

    let providers = admin_client(gateway.channel.clone())
        .list_providers(pb::ListProvidersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .providers;
    let kinds: std::collections::BTreeMap<&str, &str> = providers
        .iter()
        .map(|p| (p.name.as_str(), p.kind.as_str()))
        .collect();
    assert_eq!(kinds["local"], "openai-compatible");
    assert_eq!(kinds["fast"], "groq");
    assert_eq!(kinds["azure"], "azure");
    assert_eq!(kinds["anthropic"], "anthropic");
}
