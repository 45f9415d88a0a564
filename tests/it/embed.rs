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
