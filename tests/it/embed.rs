//! Embeddings end to end: the `Embed` RPC through the real server, against the mock
//! upstream's embedding endpoints (deterministic vectors, see `mock_upstream::text_embedding`).

use std::time::Duration;

use llm_gateway::{
    mock_upstream::{EMBEDDING_DIMENSIONS, MockSettings, MockUpstream, text_embedding},
    pb,
};
use tonic::Code;

use crate::common::*;

fn embed_request(model: &str, inputs: &[&str]) -> pb::EmbedRequest {
    pb::EmbedRequest {
        model: model.to_owned(),
        inputs: inputs.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

fn from_le(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The usage records the ledger holds once `n` were written.
async fn records(gateway: &Gateway, n: usize) -> Vec<pb::UsageRecord> {
    let mut admin = admin_client(gateway.channel.clone());
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
        if records.len() >= n {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{n} usage records were not written");
}

#[tokio::test]
async fn a_batch_gets_one_vector_per_input_with_usage_cost_and_a_ledger_record() {
    let (mock, gateway) = openai_pair().await;
    let inputs = [
        "reset my password",
        "how do I reset the password",
        "quarterly revenue",
    ];
    let answer = gateway
        .client()
        .embed(embed_request("openai/text-embedding-3-small", &inputs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.provider, "openai");
    assert_eq!(answer.model, "text-embedding-3-small");
    assert!(!answer.id.is_empty());
    assert_eq!(answer.embeddings.len(), 3);
    for (i, (embedding, text)) in answer.embeddings.iter().zip(inputs).enumerate() {
        assert_eq!(embedding.index as usize, i);
        assert_eq!(embedding.values, text_embedding(text, EMBEDDING_DIMENSIONS));
        assert!(embedding.packed.is_empty());
    }
    // One upstream request for the batch, in OpenAI's wire format.
    let body = mock.stats().last_body().unwrap();
    assert_eq!(body["input"], serde_json::json!(inputs));
    assert_eq!(body["model"], "text-embedding-3-small");
    assert!(body.get("encoding_format").is_none(), "{body}");
    assert_eq!(mock.stats().requests(), 1);
    // The mock counts a token per word: 3 + 6 + 2.
    let usage = answer.usage.unwrap();
    assert_eq!(usage.input_tokens, 11);
    assert_eq!(usage.output_tokens, 0);
    assert_eq!(usage.source, pb::UsageSource::Provider as i32);
    let cost = answer.cost.unwrap();
    let expected = registry_cost("openai/text-embedding-3-small", 11, 0);
    assert!(expected > 0.0);
    assert!((cost.total_usd - expected).abs() < 1e-15, "{cost:?}");
    assert_eq!(cost.output_usd, 0.0);
    let route = answer.route.unwrap();
    assert_eq!(route.attempts.len(), 1);
    assert_eq!(
        route.attempts[0].outcome,
        pb::AttemptOutcome::Succeeded as i32
    );

    let records = records(&gateway, 1).await;
    let record = &records[0];
    assert_eq!(record.rpc, "Embed");
    assert_eq!(record.code, "OK");
    assert_eq!(record.model, "text-embedding-3-small");
    assert_eq!(record.input_tokens, 11);
    assert!((record.cost_usd.unwrap() - expected).abs() < 1e-15);
}

#[tokio::test]
async fn dimensions_and_base64_reach_the_provider_and_come_back_packed() {
    let (mock, gateway) = openai_pair().await;
    let answer = gateway
        .client()
        .embed(pb::EmbedRequest {
            dimensions: Some(64),
            encoding: pb::EmbeddingEncoding::Base64 as i32,
            ..embed_request("openai/text-embedding-3-large", &["alpha beta", "gamma"])
        })
        .await
        .unwrap()
        .into_inner();
    let body = mock.stats().last_body().unwrap();
    assert_eq!(body["dimensions"], 64);
    assert_eq!(body["encoding_format"], "base64");
    assert_eq!(answer.embeddings.len(), 2);
    for (embedding, text) in answer.embeddings.iter().zip(["alpha beta", "gamma"]) {
        assert!(embedding.values.is_empty());
        assert_eq!(embedding.packed.len(), 64 * 4);
        assert_eq!(from_le(&embedding.packed), text_embedding(text, 64));
    }
}

#[tokio::test]
async fn azure_embeds_at_the_deployment_and_the_mock_provider_in_process() {
    let (mock, gateway) = all_providers_pair().await;
    let answer = gateway
        .client()
        .embed(embed_request("azure/my-embedder", &["hello"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.provider, "azure");
    assert_eq!(answer.embeddings[0].values, text_embedding("hello", 256));
    let headers = mock.stats().last_headers().unwrap();
    assert_eq!(headers["api-key"], "azure-test-secret");

    // The built-in mock needs no upstream.
    let gateway = Gateway::start("[providers.mock]\nkind = \"mock\"\n").await;
    let answer = gateway
        .client()
        .embed(pb::EmbedRequest {
            dimensions: Some(16),
            ..embed_request("mock/echo", &["offline text"])
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        answer.embeddings[0].values,
        text_embedding("offline text", 16)
    );
    assert_eq!(answer.usage.unwrap().input_tokens, 2);
}

#[tokio::test]
async fn a_retryable_failure_falls_back_to_the_next_target() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let url = mock.openai_base_url();
    let gateway = Gateway::start(&format!(
        r#"
[server]
deadline_margin = "250ms"
[providers.a]
kind = "openai-compatible"
base_url = "{url}"
[providers.b]
kind = "openai-compatible"
base_url = "{url}"
[providers.claude]
kind = "anthropic"
base_url = "{url}"
api_key = "sk-ant"
[policies.embed]
targets = [
  {{ provider = "claude", model = "claude-haiku-4-5" }},
  {{ provider = "a", model = "e+status=503" }},
  {{ provider = "b", model = "e" }},
]
"#
    ))
    .await;
    let answer = gateway
        .client()
        .embed(embed_request("embed", &["fall back"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.provider, "b");
    assert_eq!(
        answer.embeddings[0].values,
        text_embedding("fall back", 256)
    );
    let route = answer.route.unwrap();
    assert_eq!(route.policy, "embed");
    let summary: Vec<(String, i32, i32, String)> = route
        .attempts
        .iter()
        .map(|a| (a.provider.clone(), a.kind, a.outcome, a.reason.clone()))
        .collect();
    assert_eq!(
        summary,
        [
            (
                "claude".to_owned(),
                pb::AttemptKind::Primary as i32,
                pb::AttemptOutcome::Skipped as i32,
                "EMBEDDINGS_UNSUPPORTED".to_owned()
            ),
            (
                "a".to_owned(),
                pb::AttemptKind::Fallback as i32,
                pb::AttemptOutcome::Failed as i32,
                "OVERLOADED".to_owned()
            ),
            (
                "b".to_owned(),
                pb::AttemptKind::Fallback as i32,
                pb::AttemptOutcome::Succeeded as i32,
                String::new()
            ),
        ]
    );
    // Only the two embedding targets were called.
    assert_eq!(mock.stats().requests(), 2);
}

#[tokio::test]
async fn a_provider_kind_without_embeddings_is_a_failed_precondition() {
    let (mock, gateway) = all_providers_pair().await;
    let status = gateway
        .client()
        .embed(embed_request("anthropic/claude-haiku-4-5", &["hi"]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "EMBEDDINGS_UNSUPPORTED");
    assert!(
        status
            .message()
            .contains("provider `anthropic` (kind `anthropic`) serves no embeddings"),
        "{}",
        status.message()
    );
    assert_eq!(mock.stats().requests(), 0);
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let (mock, gateway) = openai_pair().await;
    let mut client = gateway.client();
    let model = "openai/text-embedding-3-small";
    let too_many: Vec<&str> = vec!["x"; 2049];
    for (req, fields) in [
        (embed_request(model, &[]), vec!["inputs"]),
        (embed_request(model, &["ok", ""]), vec!["inputs[1]"]),
        (embed_request(model, &too_many), vec!["inputs"]),
        (embed_request("", &["x"]), vec!["model"]),
        (
            pb::EmbedRequest {
                dimensions: Some(0),
                encoding: 7,
                ..embed_request(model, &["x"])
            },
            vec!["dimensions", "encoding"],
        ),
    ] {
        let status = client.embed(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(violated_fields(&status), fields, "{}", status.message());
    }
    // Unknown models are NOT_FOUND, as for chat.
    let status = client
        .embed(embed_request("nope/x", &["x"]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(mock.stats().requests(), 0);
}

#[tokio::test]
async fn an_upstream_error_keeps_its_class() {
    let (_mock, gateway) = openai_pair().await;
    let status = gateway
        .client()
        .embed(embed_request(
            "openai/text-embedding-3-small+status=400",
            &["x"],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(reason(&status), "INVALID_REQUEST");
    let status = gateway
        .client()
        .embed(embed_request("openai/e+malformed", &["x"]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(reason(&status), "INVALID_RESPONSE");
}

#[tokio::test]
async fn the_http_front_serves_openai_embeddings_in_floats_and_base64() {
    use base64::Engine as _;
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let (gateway, base) = Gateway::start_http(&openai_toml(&mock, "")).await;
    let client = llm_gateway::providers::http_client(&Default::default()).unwrap();
    let post = |body: serde_json::Value| {
        client
            .post(format!("{base}/v1/embeddings"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let response = post(serde_json::json!({
        "model": "openai/text-embedding-3-small",
        "input": ["red apple", "green apple"],
        "dimensions": 32,
        "metadata": {"team": "rag"},
    }))
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    let body: serde_json::Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "text-embedding-3-small");
    assert_eq!(body["usage"]["prompt_tokens"], 4);
    assert_eq!(body["data"][1]["index"], 1);
    let second: Vec<f32> = serde_json::from_value(body["data"][1]["embedding"].clone()).unwrap();
    assert_eq!(second, text_embedding("green apple", 32));

    // What the official SDKs ask for by default.
    let text = post(serde_json::json!({
        "model": "openai/text-embedding-3-small",
        "input": "red apple",
        "encoding_format": "base64",
    }))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    let packed = base64::engine::general_purpose::STANDARD
        .decode(body["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        from_le(&packed),
        text_embedding("red apple", EMBEDDING_DIMENSIONS)
    );

    // Errors in OpenAI's shape, naming the field.
    let response =
        post(serde_json::json!({"model": "openai/text-embedding-3-small", "input": [[1, 2]]}))
            .await
            .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(body["error"]["param"], "input");
    let response = post(serde_json::json!({"model": "anthropic/claude", "input": "x"}))
        .await
        .unwrap();
    assert_eq!(response.status(), 404);

    // Two served, two refused (the token array, the unknown provider).
    let records = records(&gateway, 4).await;
    let served: Vec<&pb::UsageRecord> = records.iter().filter(|r| r.code == "OK").collect();
    assert_eq!(served.len(), 2);
    assert!(served.iter().all(|r| r.rpc == "OpenAI.Embeddings"));
    assert!(
        served
            .iter()
            .any(|r| r.tags.get("team").map(String::as_str) == Some("rag"))
    );
}

#[tokio::test]
async fn gemini_batches_of_more_than_100_go_out_in_pieces_joined_in_order() {
    let (mock, gateway) = all_providers_pair().await;
    let texts: Vec<String> = (0..150).map(|i| format!("text number {i}")).collect();
    let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let answer = gateway
        .client()
        .embed(pb::EmbedRequest {
            dimensions: Some(8),
            ..embed_request("gemini/gemini-embedding-001", &inputs)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.provider, "gemini");
    assert_eq!(answer.embeddings.len(), 150);
    for (i, (embedding, text)) in answer.embeddings.iter().zip(&texts).enumerate() {
        assert_eq!(embedding.index as usize, i);
        assert_eq!(embedding.values, text_embedding(text, 8), "{i}");
    }
    // 100 + 50, each with the key in Gemini's header.
    assert_eq!(mock.stats().requests(), 2);
    assert_eq!(mock.stats().requests_with_key("gemini-test-secret"), 2);
    let body = mock.stats().last_body().unwrap();
    assert_eq!(body["requests"][0]["outputDimensionality"], 8);
    // The Gemini API reports no usage for embeddings: unknown, not zero, and no cost.
    let usage = answer.usage.unwrap();
    assert_eq!(usage.source, pb::UsageSource::NotReported as i32);
    assert!(answer.cost.is_none());
}

#[tokio::test]
async fn bedrock_titan_and_cohere_embed_through_signed_invoke_model() {
    use llm_gateway::mock_upstream::{MOCK_AWS_ACCESS_KEY_ID, MOCK_AWS_SECRET_ACCESS_KEY};
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&format!(
        r#"
[providers.bedrock]
kind = "bedrock"
base_url = "{}"
region = "us-east-1"
api_key = "{MOCK_AWS_ACCESS_KEY_ID}:{MOCK_AWS_SECRET_ACCESS_KEY}"
[providers.vertex]
kind = "vertex"
base_url = "{}"
region = "us-central1"
api_key = '{}'
"#,
        mock.bedrock_endpoint(),
        mock.vertex_base_url(),
        mock.vertex_service_account_json(),
    ))
    .await;
    let mut client = gateway.client();
    // Titan: one signed InvokeModel per text, token counts summed, priced.
    let answer = client
        .embed(pb::EmbedRequest {
            dimensions: Some(256),
            ..embed_request(
                "bedrock/amazon.titan-embed-text-v2:0",
                &["one two", "three"],
            )
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.embeddings.len(), 2);
    assert_eq!(answer.embeddings[0].values, text_embedding("one two", 256));
    assert_eq!(answer.embeddings[1].values, text_embedding("three", 256));
    assert_eq!(answer.usage.unwrap().input_tokens, 3);
    let expected = registry_cost("bedrock/amazon.titan-embed-text-v2:0", 3, 0);
    assert!((answer.cost.unwrap().total_usd - expected).abs() < 1e-15);
    assert_eq!(mock.stats().requests(), 2);
    let body = mock.stats().last_body().unwrap();
    assert_eq!(body["dimensions"], 256);
    let auth = mock.stats().last_headers().unwrap()["authorization"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(auth.contains("/us-east-1/bedrock/aws4_request"), "{auth}");

    // Cohere: the batch in one request, no usage in the body.
    let answer = client
        .embed(embed_request(
            "bedrock/cohere.embed-english-v3",
            &["a b", "c"],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.embeddings[1].values, text_embedding("c", 1024));
    assert_eq!(mock.stats().requests(), 3);
    assert_eq!(
        mock.stats().last_body().unwrap()["input_type"],
        "search_document"
    );
    assert_eq!(
        answer.usage.unwrap().source,
        pb::UsageSource::NotReported as i32
    );
    let status = client
        .embed(pb::EmbedRequest {
            dimensions: Some(8),
            ..embed_request("bedrock/cohere.embed-english-v3", &["a"])
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // Vertex serves no embeddings here.
    let status = client
        .embed(embed_request("vertex/gemini-2.5-flash", &["a"]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("(kind `vertex`)"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_keys_models_rate_limit_and_budget_apply_to_embed() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&openai_toml(&mock, "[auth]\nrequire_keys = true\n")).await;
    let mut admin = admin_client(gateway.channel.clone());
    let secret = create_key_secret(
        &mut admin,
        pb::Key {
            name: "embedder".into(),
            owner: "search".into(),
            scopes: vec!["chat".into()],
            allowed_models: vec!["openai/text-embedding-3-small".into()],
            requests_per_minute: 2,
            daily_budget_usd: 1.0,
            ..Default::default()
        },
    )
    .await;
    let authed = |req: pb::EmbedRequest| {
        let mut req = tonic::Request::new(req);
        req.metadata_mut()
            .insert("authorization", format!("Bearer {secret}").parse().unwrap());
        req
    };
    let small = || embed_request("openai/text-embedding-3-small", &["reset my password"]);
    let mut client = gateway.client();
    let status = client.embed(small()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let other = embed_request("openai/text-embedding-3-large", &["reset my password"]);
    let status = client.embed(authed(other)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("text-embedding-3-large"),
        "{status:?}"
    );
    // Two a minute: the refused calls above took none.
    for _ in 0..2 {
        client.embed(authed(small())).await.unwrap();
    }
    let status = client.embed(authed(small())).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "RATE_LIMIT_REQUESTS");
    assert_eq!(
        mock.stats().requests(),
        2,
        "refused calls reach no upstream"
    );
    // The two calls' cost is the key's spend, as the ledger has it.
    let records = records(&gateway, 2).await;
    let ledger: f64 = records
        .iter()
        .filter(|r| r.rpc == "Embed" && r.code == "OK")
        .filter_map(|r| r.cost_usd)
        .sum();
    let expected = 2.0 * registry_cost("openai/text-embedding-3-small", 3, 0);
    assert!((ledger - expected).abs() < 1e-15, "{records:?}");
    let spent = spent_today_usd(&mut admin, "embedder").await;
    assert!(
        (spent - ledger).abs() < 1e-15,
        "spent {spent}, ledger {ledger}"
    );
}
