//! AWS Bedrock and Google Vertex AI end to end: the real server, called through the
//! generated client, in front of the mock upstream, which checks every Bedrock request's
//! SigV4 signature and issues Vertex OAuth tokens only for JWT assertions signed with the
//! test service account's key. So these tests run the real auth flows offline.

use llm_gateway::{
    mock_upstream::{
        MOCK_AWS_ACCESS_KEY_ID, MOCK_AWS_SECRET_ACCESS_KEY, MockSettings, MockUpstream,
        TOOL_ARGUMENTS,
    },
    pb::{self, chat_stream_response::Event},
};
use tonic::Code;

use crate::common::*;

const BEDROCK_CLAUDE: &str = "bedrock/anthropic.claude-3-haiku-20240307-v1:0";
const BEDROCK_NOVA: &str = "bedrock/amazon.nova-lite-v1:0";
const VERTEX_GEMINI: &str = "vertex/gemini-2.5-flash";
const VERTEX_CLAUDE: &str = "vertex/claude-haiku-4-5@20251001";

/// The gateway config: `bedrock` and `vertex` in front of `mock` with the mock's test
/// credentials (`bedrock_key` and `vertex_key` override them).
fn cloud_toml(
    mock: &MockUpstream,
    bedrock_key: Option<&str>,
    vertex_key: Option<&str>,
    extra: &str,
) -> String {
    let bedrock_key = bedrock_key
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{MOCK_AWS_ACCESS_KEY_ID}:{MOCK_AWS_SECRET_ACCESS_KEY}"));
    let vertex_key = vertex_key
        .map(str::to_owned)
        .unwrap_or_else(|| mock.vertex_service_account_json());
    format!(
        r#"
[server]
shutdown_grace = "5s"
deadline_margin = "250ms"
[upstream]
stream_idle_timeout = "2s"
[providers.bedrock]
kind = "bedrock"
base_url = "{bedrock}"
region = "us-east-1"
api_key = "{bedrock_key}"
[providers.vertex]
kind = "vertex"
base_url = "{vertex}"
region = "us-central1"
api_key = '{vertex_key}'
{extra}
"#,
        bedrock = mock.bedrock_endpoint(),
        vertex = mock.vertex_base_url(),
    )
}

async fn cloud_pair() -> (MockUpstream, Gateway) {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&cloud_toml(&mock, None, None, "")).await;
    (mock, gateway)
}

/// "be brief" + "hello there gateway": 5 input tokens; the reply "Mock reply to: hello
/// there gateway" is 6.
fn shared_request(model: &str) -> pb::ChatRequest {
    pb::ChatRequest {
        model: model.to_owned(),
        messages: vec![system("be brief"), user("hello there gateway")],
        max_tokens: Some(64),
        ..Default::default()
    }
}

#[tokio::test]
async fn unary_calls_through_bedrock_and_both_vertex_families_with_usage_and_cost() {
    let (mock, gateway) = cloud_pair().await;
    for model in [BEDROCK_CLAUDE, BEDROCK_NOVA, VERTEX_GEMINI, VERTEX_CLAUDE] {
        let response = gateway
            .client()
            .chat(shared_request(model))
            .await
            .unwrap_or_else(|s| panic!("{model}: {s:?}"))
            .into_inner();
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
        assert_eq!((usage.input_tokens, usage.output_tokens), (5, 6), "{model}");
        let cost = response.cost.unwrap();
        assert!(
            (cost.total_usd - registry_cost(model, 5, 6)).abs() < 1e-12,
            "{model}: {cost:?}"
        );
        let headers = mock.stats().last_headers().unwrap();
        let auth = headers["authorization"].to_str().unwrap();
        if model.starts_with("bedrock/") {
            // A SigV4 signature the mock recomputed and accepted.
            assert!(
                auth.starts_with(&format!(
                    "AWS4-HMAC-SHA256 Credential={MOCK_AWS_ACCESS_KEY_ID}/"
                )) && auth.contains("/us-east-1/bedrock/aws4_request"),
                "{auth}"
            );
            let body = mock.stats().last_body().unwrap();
            assert_eq!(body["system"], serde_json::json!([{"text": "be brief"}]));
            assert_eq!(
                body["inferenceConfig"],
                serde_json::json!({"maxTokens": 64})
            );
        } else {
            // A token the mock issued for the signed service-account assertion.
            assert!(auth.starts_with("Bearer ya29.mock-token-"), "{auth}");
        }
    }
    // Both Vertex families shared one cached token.
    assert_eq!(mock.vertex_token_requests(), 1);
}

#[tokio::test]
async fn streams_through_bedrock_and_both_vertex_families_with_usage_and_cost() {
    let (_mock, gateway) = cloud_pair().await;
    for model in [BEDROCK_CLAUDE, VERTEX_GEMINI, VERTEX_CLAUDE] {
        let (events, status) = stream(&gateway, shared_request(model)).await;
        status.unwrap_or_else(|s| panic!("{model}: {s:?}"));
        assert!(matches!(events.first(), Some(Event::Start(_))), "{model}");
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
            panic!("{model}: no finish: {events:?}");
        };
        assert_eq!(
            finish.finish_reason,
            pb::FinishReason::Stop as i32,
            "{model}"
        );
        let usage = finish.usage.unwrap();
        assert_eq!((usage.input_tokens, usage.output_tokens), (5, 6), "{model}");
        let cost = finish.cost.unwrap();
        assert!(
            (cost.total_usd - registry_cost(model, 5, 6)).abs() < 1e-12,
            "{model}"
        );
    }
}

#[tokio::test]
async fn tool_calls_unary_and_streamed_through_bedrock_and_vertex() {
    let (mock, gateway) = cloud_pair().await;
    for (model, id) in [
        (
            "bedrock/anthropic.claude-3-haiku-20240307-v1:0+tools",
            "tooluse_mock_1",
        ),
        ("vertex/gemini-2.5-flash+tools", "call_0"),
        ("vertex/claude-haiku-4-5@20251001+tools", "toolu_mock_1"),
    ] {
        let mut req = request(model, "weather in Paris?");
        req.tools = vec![weather_tool()];
        req.tool_choice = Some(pb::ToolChoice {
            mode: pb::ToolChoiceMode::Named as i32,
            tool_name: "get_weather".into(),
        });
        let response = gateway
            .client()
            .chat(req.clone())
            .await
            .unwrap()
            .into_inner();
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
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&calls[0].arguments).unwrap(),
            serde_json::from_str::<serde_json::Value>(TOOL_ARGUMENTS).unwrap(),
            "{model}"
        );
        if model.starts_with("bedrock/") {
            assert_eq!(
                mock.stats().last_body().unwrap()["toolConfig"],
                serde_json::json!({
                    "tools": [{"toolSpec": {"name": "get_weather", "description": "current weather", "inputSchema": {"json": {"type": "object"}}}}],
                    "toolChoice": {"tool": {"name": "get_weather"}}
                })
            );
        }
        let (events, status) = stream(&gateway, req).await;
        status.unwrap_or_else(|s| panic!("{model}: {s:?}"));
        let pieces = tool_deltas(&events);
        assert!(!pieces.is_empty(), "{model}");
        assert_eq!(
            (pieces[0].id.as_str(), pieces[0].name.as_str()),
            (id, "get_weather")
        );
        let args: String = pieces.iter().map(|p| p.arguments.as_str()).collect();
        assert_eq!(args, TOOL_ARGUMENTS, "{model}");
        let Some(Event::Finish(finish)) = events.last() else {
            panic!("{model}: no finish");
        };
        assert_eq!(
            finish.finish_reason,
            pb::FinishReason::ToolCalls as i32,
            "{model}"
        );
    }
}

#[tokio::test]
async fn bedrock_cache_reads_are_normalized_and_priced() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let extra = r#"
[[models]]
provider = "bedrock"
model = "amazon.nova-pro-v1:0+cached=3"
input = 0.80
output = 3.20
cached_input = 0.20
"#;
    let gateway = Gateway::start(&cloud_toml(&mock, None, None, extra)).await;
    let response = gateway
        .client()
        .chat(shared_request("bedrock/amazon.nova-pro-v1:0+cached=3"))
        .await
        .unwrap()
        .into_inner();
    let usage = response.usage.unwrap();
    // Converse's inputTokens leaves the cache reads out; the gateway counts them in.
    assert_eq!(usage.input_tokens, 5);
    assert_eq!(usage.cached_input_tokens, Some(3));
    let expected = (2.0 * 0.80 + 3.0 * 0.20 + 6.0 * 3.20) / 1e6;
    assert!((response.cost.unwrap().total_usd - expected).abs() < 1e-12);
}

#[tokio::test]
async fn a_wrong_aws_secret_is_refused_by_the_signature_check() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let wrong = format!("{MOCK_AWS_ACCESS_KEY_ID}:not-the-secret");
    let gateway = Gateway::start(&cloud_toml(&mock, Some(&wrong), None, "")).await;
    let status = gateway
        .client()
        .chat(request(BEDROCK_CLAUDE, "hi"))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::FailedPrecondition, "AUTHENTICATION"),
        "{status:?}"
    );
    assert!(
        !status.message().contains("not-the-secret"),
        "{}",
        status.message()
    );
    assert_eq!(mock.stats().requests(), 1);
}

#[tokio::test]
async fn bedrock_credentials_rotate_past_an_unknown_access_key() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    mock.add_aws_credentials("AKIDSECONDEXAMPLE", "second-secret", Some("session-token"));
    let extra =
        r#"api_keys = ["AKIDUNKNOWN:whatever", "AKIDSECONDEXAMPLE:second-secret:session-token"]"#;
    let toml = cloud_toml(&mock, None, None, "").replace(
        &format!("api_key = \"{MOCK_AWS_ACCESS_KEY_ID}:{MOCK_AWS_SECRET_ACCESS_KEY}\""),
        extra,
    );
    let gateway = Gateway::start(&toml).await;
    for _ in 0..2 {
        let response = gateway
            .client()
            .chat(request(BEDROCK_CLAUDE, "hi"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply_text(&response), "Mock reply to: hi");
    }
    // The unknown key was refused once (403) and then rested; temporary credentials carry
    // their session token.
    assert_eq!(mock.stats().requests_with_key("AKIDUNKNOWN"), 1);
    assert_eq!(mock.stats().requests_with_key("AKIDSECONDEXAMPLE"), 2);
    let headers = mock.stats().last_headers().unwrap();
    assert_eq!(headers["x-amz-security-token"], "session-token");
}

#[tokio::test]
async fn broken_bedrock_streams_end_with_an_error() {
    let (_mock, gateway) = cloud_pair().await;
    for directive in ["truncate", "malformed", "stream_error"] {
        let model = format!("{BEDROCK_CLAUDE}+chunks=6+{directive}");
        let (events, status) = stream(&gateway, request(&model, "hello there gateway")).await;
        let status = status.expect_err(&model);
        assert_eq!(status.code(), Code::Unavailable, "{model}: {status:?}");
        assert_eq!(reason(&status), "STREAM_BROKEN", "{model}");
        assert!(
            !events.iter().any(|e| matches!(e, Event::Finish(_))),
            "{model}: {events:?}"
        );
    }
}

#[tokio::test]
async fn bedrock_errors_map_like_every_other_provider() {
    let (_mock, gateway) = cloud_pair().await;
    for (directive, code, why) in [
        ("status=429", Code::ResourceExhausted, "RATE_LIMITED"),
        ("status=503", Code::Unavailable, "OVERLOADED"),
        ("status=500", Code::Unavailable, "SERVER_ERROR"),
        ("status=400", Code::InvalidArgument, "INVALID_REQUEST"),
        ("status=404", Code::NotFound, "MODEL_NOT_FOUND"),
        ("malformed", Code::Unavailable, "INVALID_RESPONSE"),
    ] {
        let model = format!("{BEDROCK_CLAUDE}+{directive}");
        let status = gateway
            .client()
            .chat(request(&model, "hi"))
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), reason(&status).as_str()),
            (code, why),
            "{model}: {status:?}"
        );
    }
}

#[tokio::test]
async fn an_untrusted_service_account_key_is_refused_at_the_token_endpoint() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let mut key: serde_json::Value =
        serde_json::from_str(&mock.vertex_service_account_json()).unwrap();
    key["private_key"] =
        include_str!("../../src/mock_upstream/testdata/vertex-untrusted-test-key.pem").into();
    let gateway = Gateway::start(&cloud_toml(&mock, None, Some(&key.to_string()), "")).await;
    let status = gateway
        .client()
        .chat(request(VERTEX_GEMINI, "hi"))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::FailedPrecondition, "AUTHENTICATION"),
        "{status:?}"
    );
    assert!(
        !status.message().contains("PRIVATE KEY"),
        "{}",
        status.message()
    );
    // The token endpoint refused it; the API was never called.
    assert_eq!(mock.vertex_token_requests(), 1);
    assert_eq!(mock.stats().requests(), 0);
}

#[tokio::test]
async fn a_revoked_vertex_token_is_replaced() {
    let (mock, gateway) = cloud_pair().await;
    gateway
        .client()
        .chat(request(VERTEX_CLAUDE, "hi"))
        .await
        .unwrap();
    assert_eq!(mock.vertex_token_requests(), 1);
    // Revoked before its expiry: the API answers 401, the gateway fetches a new token.
    mock.revoke_vertex_tokens();
    let response = gateway
        .client()
        .chat(request(VERTEX_CLAUDE, "hi"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply_text(&response), "Mock reply to: hi");
    assert_eq!(mock.vertex_token_requests(), 2);
}

#[tokio::test]
async fn the_vertex_project_comes_from_the_key_file_unless_configured() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    // The mock serves only the test account's project; another configured project is
    // refused with Google's 403.
    let toml = cloud_toml(&mock, None, None, "").replace(
        "region = \"us-central1\"",
        "region = \"us-central1\"\nproject = \"someone-elses-project\"",
    );
    let gateway = Gateway::start(&toml).await;
    let status = gateway
        .client()
        .chat(request(VERTEX_GEMINI, "hi"))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::FailedPrecondition, "PERMISSION"),
        "{status:?}"
    );
}
