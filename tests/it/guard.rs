//! Guardrails end to end: profiles from `[guardrails.*]`, attached to policies and forced by
//! keys, applied to requests before they leave and to replies (unary and streamed, split
//! across chunks in every provider's wire format).

use llm_gateway::{
    mock_upstream::{MockSettings, MockUpstream},
    pb,
};
use tonic::Code;

use crate::common::*;

/// The guardrail profiles of these tests.
const PROFILES: &str = r#"
[guardrails.strict]
default_action = "block"

[guardrails.redact]
default_action = "redact"

[guardrails.tokens]
actions = { email = "tokenize", phone = "tokenize", credit_card = "mask" }

[guardrails.replies]
requests = false
default_action = "redact"

[policies.safe]
targets = [{ provider = "openai", model = "gpt-4o-mini" }]
guardrails = "redact"

[policies.open]
targets = [{ provider = "openai", model = "gpt-4o-mini" }]
"#;

const PII: &str = "mail jane.doe@example.com, card 4111 1111 1111 1111, call +44 20 7946 0958, key AKIAIOSFODNN7EXAMPLE";

async fn pair() -> (MockUpstream, Gateway) {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&all_providers_toml(&mock, PROFILES)).await;
    (mock, gateway)
}

/// A key with this forced profile (empty: none); its secret.
async fn key(gateway: &Gateway, name: &str, guardrails: &str) -> String {
    let mut admin = admin_client(gateway.channel.clone());
    admin
        .create_key(pb::CreateKeyRequest {
            key: Some(pb::Key {
                name: name.into(),
                scopes: vec!["chat".into()],
                guardrails: guardrails.into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .secret
}

fn with_key<T>(message: T, secret: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {secret}").parse().unwrap());
    req
}

#[tokio::test]
async fn a_policy_profile_redacts_the_request_before_it_leaves() {
    let (mock, gateway) = pair().await;
    let reply = gateway
        .client()
        .chat(request("safe", PII))
        .await
        .unwrap()
        .into_inner();
    let expected = "mail [EMAIL], card [CREDIT_CARD], call [PHONE], key [SECRET]";
    assert_eq!(reply_text(&reply), format!("Mock reply to: {expected}"));
    let sent = mock.stats().last_body().unwrap().to_string();
    assert!(sent.contains(expected), "{sent}");
    assert!(
        !sent.contains("jane.doe") && !sent.contains("4111"),
        "{sent}"
    );
    // A policy without a profile passes the text as it is.
    let reply = gateway
        .client()
        .chat(request("open", PII))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply_text(&reply), format!("Mock reply to: {PII}"));
}

#[tokio::test]
async fn a_forced_key_profile_blocks_whatever_the_policy_and_names_only_types() {
    let (mock, gateway) = pair().await;
    let secret = key(&gateway, "guarded", "strict").await;
    for model in [
        "open",
        "safe",
        "openai/gpt-4o-mini",
        "anthropic/claude-sonnet-4-5",
    ] {
        let status = gateway
            .client()
            .chat(with_key(request(model, PII), &secret))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{model}: {status:?}"
        );
        assert_eq!(reason(&status), "GUARDRAIL_BLOCKED");
        let msg = status.message();
        for entity in ["credit_card", "email", "phone", "secret"] {
            assert!(msg.contains(entity), "{msg}");
        }
        assert!(!msg.contains("jane") && !msg.contains("4111") && !msg.contains("AKIA"));
    }
    assert_eq!(mock.stats().requests(), 0, "nothing left the gateway");
    // Clean text passes, with the key.
    let reply = gateway
        .client()
        .chat(with_key(request("open", "hello"), &secret))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply_text(&reply), "Mock reply to: hello");
    // The same key without a forced profile is not blocked.
    let plain = key(&gateway, "plain", "").await;
    gateway
        .client()
        .chat(with_key(request("open", PII), &plain))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_blocked_stream_fails_before_it_starts() {
    let (_mock, gateway) = pair().await;
    let secret = key(&gateway, "guarded", "strict").await;
    let status = gateway
        .client()
        .chat_stream(with_key(request("open", PII), &secret))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "GUARDRAIL_BLOCKED");
}

/// The providers of [`all_providers_toml`], each its own wire format.
const MODELS: [&str; 4] = [
    "openai/gpt-4o-mini",
    "anthropic/claude-sonnet-4-5",
    "gemini/gemini-2.5-flash",
    "azure/gpt-4o-mini",
];

#[tokio::test]
async fn tokenized_values_round_trip_unary_and_streamed_in_every_format() {
    let (mock, gateway) = pair().await;
    let secret = key(&gateway, "tok", "tokens").await;
    let text = "to jane.doe@example.com or jane.doe@example.com, +44 20 7946 0958, card 4111 1111 1111 1111";
    let masked = "to jane.doe@example.com or jane.doe@example.com, +44 20 7946 0958, card **** **** **** 1111";
    for model in MODELS {
        let reply = gateway
            .client()
            .chat(with_key(request(model, text), &secret))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            reply_text(&reply),
            format!("Mock reply to: {masked}"),
            "{model}"
        );
        let sent = mock.stats().last_body().unwrap().to_string();
        assert!(
            sent.contains("to [EMAIL_1] or [EMAIL_1], [PHONE_1]") && !sent.contains("jane"),
            "{model}: {sent}"
        );
        for chunks in [3, 7, 16, 40] {
            let stream = gateway
                .client()
                .chat_stream(with_key(
                    request(&format!("{model}+chunks={chunks}"), text),
                    &secret,
                ))
                .await
                .unwrap()
                .into_inner();
            let (events, status) = collect_stream(stream).await;
            status.unwrap();
            assert_eq!(
                text_of(&events),
                format!("Mock reply to: {masked}"),
                "{model} in {chunks} chunks"
            );
        }
    }
}

#[tokio::test]
async fn replies_are_redacted_even_when_an_entity_is_split_across_chunks() {
    let (_mock, gateway) = pair().await;
    let secret = key(&gateway, "out", "replies").await;
    let expected = "Mock reply to: mail [EMAIL], card [CREDIT_CARD], call [PHONE], key [SECRET]";
    for model in MODELS {
        let reply = gateway
            .client()
            .chat(with_key(request(model, PII), &secret))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply_text(&reply), expected, "{model}");
        for chunks in [2, 5, 9, 13, 31, 64] {
            let stream = gateway
                .client()
                .chat_stream(with_key(
                    request(&format!("{model}+chunks={chunks}"), PII),
                    &secret,
                ))
                .await
                .unwrap()
                .into_inner();
            let (events, status) = collect_stream(stream).await;
            status.unwrap();
            assert_eq!(text_of(&events), expected, "{model} in {chunks} chunks");
            assert!(matches!(
                events.last(),
                Some(pb::chat_stream_response::Event::Finish(_))
            ));
        }
    }
}

#[tokio::test]
async fn policies_may_name_only_configured_profiles() {
    let (_mock, gateway) = pair().await;
    let mut admin = admin_client(gateway.channel.clone());
    let policy = |guardrails: &str| pb::Policy {
        name: "api".into(),
        targets: vec![pb::PolicyTarget {
            provider: "openai".into(),
            model: "gpt-4o-mini".into(),
            ..Default::default()
        }],
        guardrails: guardrails.into(),
        ..Default::default()
    };
    let status = admin
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(policy("nope")),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["policy.guardrails"]);
    let created = admin
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(policy("redact")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.policy.unwrap().guardrails, "redact");
    let reply = gateway
        .client()
        .chat(request("api", "mail a@example.com"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply_text(&reply), "Mock reply to: mail [EMAIL]");
}

#[tokio::test]
async fn a_key_naming_a_missing_profile_fails_closed() {
    let (_mock, gateway) = pair().await;
    let secret = key(&gateway, "ghost", "gone").await;
    let status = gateway
        .client()
        .chat(with_key(request("open", "hello"), &secret))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "GUARDRAIL_NOT_CONFIGURED");
}

#[test]
fn profile_problems_are_config_errors_naming_the_field() {
    let err = llm_gateway::config::Config::from_toml(
        "[guardrails.p]\nactions = { email = \"shred\" }\n",
        std::path::Path::new("t.toml"),
        &Default::default(),
        &|_| None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("guardrails.p.actions.email"), "{err}");
}
