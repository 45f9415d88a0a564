//! The HTTP front: OpenAI Chat Completions and Anthropic Messages over the same engine as
//! the gRPC service (keys, routing, ledger), against the mock upstream.

use llm_gateway::{mock_upstream::reply_for, pb};
use serde_json::{Value, json};

use crate::common::*;

fn client() -> reqwest::Client {
    llm_gateway::providers::http_client(&Default::default()).unwrap()
}

async fn post(
    url: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.unwrap())
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// The `event:` names of an SSE body.
fn sse_events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn openai_chat_unary_and_stream_share_the_ledger_with_grpc() {
    let mock = llm_gateway::mock_upstream::MockUpstream::start(Default::default())
        .await
        .unwrap();
    let (gateway, base) = Gateway::start_http(&openai_toml(&mock, "")).await;
    let url = format!("{base}/v1/chat/completions");

    let (status, headers, body) = post(
        &url,
        json!({
            "model": "openai/gpt-4o-mini",
            "messages": [{"role": "user", "content": "hello http"}],
            "temperature": 0.2,
            "metadata": {"team": "search"},
            "unknown_field": 1
        }),
        &[("x-request-id", "req-http-1")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-request-id"], "req-http-1");
    let v = json_of(&body);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["id"], "chatcmpl-req-http-1");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        reply_for("hello http")
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0);

    let (status, headers, body) = post(
        &url,
        json!({
            "model": "openai/gpt-4o-mini",
            "messages": [{"role": "user", "content": "stream http"}],
            "stream": true,
            "stream_options": {"include_usage": true}
        }),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["content-type"], "text/event-stream");
    let data = sse_data(&body);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| json_of(d)).collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, reply_for("stream http"));
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert!(usage["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "stop"
    );

    // The same engine as gRPC: one ledger, the `rpc` label telling the surfaces apart.
    gateway
        .client()
        .chat(request("openai/gpt-4o-mini", "grpc too"))
        .await
        .unwrap();
    let mut admin = admin_client(gateway.channel.clone());
    let mut rpcs = Vec::new();
    for _ in 0..200 {
        let mut export = admin
            .export_usage(pb::ExportUsageRequest::default())
            .await
            .unwrap()
            .into_inner();
        let mut records = Vec::new();
        while let Some(batch) = export.message().await.unwrap() {
            records.extend(batch.records);
        }
        if records.len() == 3 {
            rpcs = records.into_iter().map(|r| (r.rpc, r.tags)).collect();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut names: Vec<&str> = rpcs.iter().map(|(r, _)| r.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "Chat",
            "OpenAI.ChatCompletions",
            "OpenAI.ChatCompletionsStream"
        ]
    );
    let unary = rpcs
        .iter()
        .find(|(r, _)| r == "OpenAI.ChatCompletions")
        .unwrap();
    assert_eq!(unary.1["team"], "search");
}

#[tokio::test]
async fn openai_tools_json_mode_and_models() {
    let mock = llm_gateway::mock_upstream::MockUpstream::start(Default::default())
        .await
        .unwrap();
    let (_gateway, base) = Gateway::start_http(&openai_toml(&mock, "")).await;
    let url = format!("{base}/v1/chat/completions");
    let tool = json!({"type": "function", "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}
    }});
    let (status, _, body) = post(
        &url,
        json!({
            "model": "openai/gpt-4o-mini+tools",
            "messages": [{"role": "user", "content": "weather in Paris?"}],
            "tools": [tool],
            "tool_choice": "auto",
            "parallel_tool_calls": true
        }),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v = json_of(&body);
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(
        call["function"]["arguments"],
        llm_gateway::mock_upstream::TOOL_ARGUMENTS
    );
    let sent = mock.stats().last_body().unwrap();
    assert_eq!(sent["tools"][0]["function"]["name"], "get_weather");
    assert_eq!(sent["parallel_tool_calls"], true);

    let (status, _, body) = post(
        &url,
        json!({
            "model": "openai/gpt-4o-mini",
            "messages": [{"role": "user", "content": "json please"}],
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "answer", "strict": true,
                "schema": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 1}}}
            }}
        }),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let sent = mock.stats().last_body().unwrap();
    assert_eq!(sent["response_format"]["type"], "json_schema");
    assert_eq!(
        sent["response_format"]["json_schema"]["schema"]["properties"]["a"]["minimum"],
        1
    );

    let models = client()
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(models.status().as_u16(), 200);
    let v = json_of(&models.text().await.unwrap());
    assert_eq!(v["object"], "list");
    assert!(
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "openai/gpt-4o-mini")
    );
}

#[tokio::test]
async fn openai_errors_have_the_sdk_statuses_and_shape() {
    let mock = llm_gateway::mock_upstream::MockUpstream::start(Default::default())
        .await
        .unwrap();
    let (_gateway, base) = Gateway::start_http(&openai_toml(&mock, "")).await;
    let url = format!("{base}/v1/chat/completions");
    let chat =
        |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "x"}]});

    // Validation: the field is named.
    let (status, _, body) = post(
        &url,
        json!({"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "top_p": 0}),
        &[],
    )
    .await;
    assert_eq!(status, 400);
    let v = json_of(&body);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["param"], "top_p");
    let (status, _, body) = post(&url, json!({"messages": []}), &[]).await;
    assert_eq!(status, 400);
    assert_eq!(json_of(&body)["error"]["param"], "model");
    let (status, _, body) = post(
        &url,
        json!({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}),
        &[],
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(json_of(&body)["error"]["param"], "messages[0].role");
    let resp = client()
        .post(&url)
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);

    // Unknown model, rate limit with retry-after, upstream outage, deadline.
    let (status, _, body) = post(&url, chat("openai/no-such-model+status=404"), &[]).await;
    assert_eq!(status, 404, "{body}");
    let (status, headers, body) = post(
        &url,
        chat("openai/gpt-4o-mini+status=429+retry_after=2"),
        &[],
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(headers["retry-after"], "2");
    assert_eq!(json_of(&body)["error"]["type"], "rate_limit_error");
    let (status, _, _) = post(&url, chat("openai/gpt-4o-mini+status=503"), &[]).await;
    assert_eq!(status, 503);
    let (status, _, body) = post(
        &url,
        chat("openai/gpt-4o-mini+hang"),
        &[("x-stainless-timeout", "0.5")],
    )
    .await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(json_of(&body)["error"]["code"], "deadline_exceeded");
    let (status, _, body) = post(
        &url,
        chat("openai/gpt-4o-mini+hang"),
        &[("request-timeout", "400ms"), ("x-stainless-timeout", "600")],
    )
    .await;
    assert_eq!(status, 504, "{body}");
    let (status, _, body) = post(
        &url,
        chat("openai/gpt-4o-mini"),
        &[("request-timeout", "soon")],
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(json_of(&body)["error"]["param"], "request-timeout");

    // Unknown path.
    let (status, _, body) = post(&format!("{base}/v1/completions"), json!({}), &[]).await;
    assert_eq!(status, 404);
    assert!(json_of(&body)["error"]["message"].is_string());
}

#[tokio::test]
async fn a_broken_stream_ends_with_an_error_event_and_no_done() {
    let mock = llm_gateway::mock_upstream::MockUpstream::start(Default::default())
        .await
        .unwrap();
    let (_gateway, base) = Gateway::start_http(&openai_toml(&mock, "")).await;
    let (status, _, body) = post(
        &format!("{base}/v1/chat/completions"),
        json!({
            "model": "openai/gpt-4o-mini+truncate+chunks=6",
            "messages": [{"role": "user", "content": "break please"}],
            "stream": true
        }),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    let data = sse_data(&body);
    assert!(!data.iter().any(|d| d == "[DONE]"), "{body}");
    let last = json_of(data.last().unwrap());
    assert!(last["error"]["message"].is_string(), "{body}");
}

#[tokio::test]
async fn keys_apply_to_the_http_front() {
    let mock = llm_gateway::mock_upstream::MockUpstream::start(Default::default())
        .await
        .unwrap();
    let (gateway, base) =
        Gateway::start_http(&openai_toml(&mock, "[auth]\nrequire_keys = true\n")).await;
    let url = format!("{base}/v1/chat/completions");
    let chat =
        json!({"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]});
    let (status, _, body) = post(&url, chat.clone(), &[]).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(json_of(&body)["error"]["type"], "authentication_error");

    let mut admin = admin_client(gateway.channel.clone());
    let create = |name: &str, scope: &str| pb::CreateKeyRequest {
        key: Some(pb::Key {
            name: name.into(),
            scopes: vec![scope.into()],
            ..Default::default()
        }),
    };
    let chat_key = admin
        .create_key(create("svc", "chat"))
        .await
        .unwrap()
        .into_inner()
        .secret;
    let reader = admin
        .create_key(create("reader", "usage-read"))
        .await
        .unwrap()
        .into_inner()
        .secret;
    let bearer = format!("Bearer {chat_key}");
    let (status, _, body) = post(&url, chat.clone(), &[("authorization", &bearer)]).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = post(
        &url,
        chat.clone(),
        &[("authorization", &format!("Bearer {reader}"))],
    )
    .await;
    assert_eq!(status, 403, "{body}");
    // The Anthropic surface takes the key as `x-api-key`.
    let (status, _, body) = post(
        &format!("{base}/v1/messages"),
        json!({"model": "openai/gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}),
        &[("x-api-key", &chat_key), ("anthropic-version", "2023-06-01")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn anthropic_messages_unary_stream_tools_and_errors() {
    let mock = llm_gateway::mock_upstream::MockUpstream::start(Default::default())
        .await
        .unwrap();
    let (_gateway, base) = Gateway::start_http(&openai_toml(&mock, "")).await;
    let url = format!("{base}/v1/messages");
    let version = [("anthropic-version", "2023-06-01")];

    let (status, _, body) = post(
        &url,
        json!({
            "model": "openai/gpt-4o-mini",
            "max_tokens": 100,
            "system": "be brief",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello anthropic"}]}]
        }),
        &version,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v = json_of(&body);
    assert_eq!(v["type"], "message");
    assert_eq!(v["content"][0]["text"], reply_for("hello anthropic"));
    assert_eq!(v["stop_reason"], "end_turn");
    let sent = mock.stats().last_body().unwrap();
    assert_eq!(sent["messages"][0]["role"], "system");
    assert_eq!(sent["max_tokens"], 100);

    let (status, _, body) = post(
        &url,
        json!({
            "model": "openai/gpt-4o-mini",
            "max_tokens": 100,
            "stream": true,
            "messages": [{"role": "user", "content": "stream anthropic"}]
        }),
        &version,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let events = sse_events(&body);
    assert_eq!(events.first().unwrap(), "message_start");
    assert_eq!(events.last().unwrap(), "message_stop");
    let text: String = sse_data(&body)
        .iter()
        .map(|d| json_of(d))
        .filter_map(|e| e["delta"]["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(text, reply_for("stream anthropic"));

    // Tool use, then the result sent back.
    let (status, _, body) = post(
        &url,
        json!({
            "model": "openai/gpt-4o-mini+tools",
            "max_tokens": 100,
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": "weather?"}]
        }),
        &version,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v = json_of(&body);
    assert_eq!(v["stop_reason"], "tool_use");
    let tool_use = v["content"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "tool_use")
        .unwrap()
        .clone();
    assert_eq!(tool_use["input"]["location"], "Paris");
    let (status, _, body) = post(
        &url,
        json!({
            "model": "openai/gpt-4o-mini",
            "max_tokens": 100,
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": [tool_use]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use["id"], "content": "sunny"}]}
            ]
        }),
        &version,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let sent = mock.stats().last_body().unwrap();
    assert_eq!(sent["messages"][2]["role"], "tool");
    assert_eq!(sent["messages"][2]["content"], "sunny");

    // Anthropic's error shape; a broken stream ends with `error`, no `message_stop`.
    let (status, _, body) = post(
        &url,
        json!({"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}),
        &version,
    )
    .await;
    assert_eq!(status, 400);
    let v = json_of(&body);
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens")
    );
    let (status, _, body) = post(
        &url,
        json!({
            "model": "openai/gpt-4o-mini+truncate+chunks=6",
            "max_tokens": 100,
            "stream": true,
            "messages": [{"role": "user", "content": "break please"}]
        }),
        &version,
    )
    .await;
    assert_eq!(status, 200);
    let events = sse_events(&body);
    assert_eq!(events.last().unwrap(), "error", "{body}");
    assert!(!events.iter().any(|e| e == "message_stop"));
}

#[tokio::test]
async fn a_policy_name_routes_with_fallback_on_both_surfaces() {
    let mock = llm_gateway::mock_upstream::MockUpstream::start(Default::default())
        .await
        .unwrap();
    let policy = r#"
[policies.resilient]
targets = [
  { provider = "openai", model = "gpt-4o-mini+status=503" },
  { provider = "openai", model = "gpt-4o-mini" },
]
"#;
    let (_gateway, base) = Gateway::start_http(&openai_toml(&mock, policy)).await;
    let (status, _, body) = post(
        &format!("{base}/v1/chat/completions"),
        json!({"model": "resilient", "messages": [{"role": "user", "content": "fall back"}]}),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        json_of(&body)["choices"][0]["message"]["content"],
        reply_for("fall back")
    );
    // The failing target first, then the fallback.
    assert_eq!(mock.stats().requests(), 2);
    let (status, _, body) = post(
        &format!("{base}/v1/messages"),
        json!({"model": "resilient", "max_tokens": 10, "stream": true,
               "messages": [{"role": "user", "content": "fall back"}]}),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(sse_events(&body).last().unwrap(), "message_stop");
    let models = client()
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        json_of(&models)["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "resilient" && m["owned_by"] == "llm-gateway")
    );
}
