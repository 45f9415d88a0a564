//! Gateway API keys: every auth outcome, forced tags, rate limits and budgets under load.

use std::time::Duration;

use llm_gateway::{
    mock_upstream::{MockSettings, MockUpstream},
    pb::{self, llm_gateway_admin_client::LlmGatewayAdminClient},
};
use tonic::{Code, Request};
use tonic_types::StatusExt;

use crate::common::*;

fn admin(gateway: &Gateway) -> Admin {
    admin_client(gateway.channel.clone())
}

async fn setup(extra: &str) -> (MockUpstream, Gateway) {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&format!(
        r#"
[auth]
require_keys = true
[providers.openai]
kind = "openai"
base_url = "{}"
api_key = "sk-upstream"
[policies.cheap]
targets = [{{ provider = "openai", model = "gpt-4o-mini" }}]
{extra}
"#,
        mock.openai_base_url()
    ))
    .await;
    (mock, gateway)
}

async fn create_key(admin: &mut Admin, key: pb::Key) -> (pb::Key, String) {
    let r = admin
        .create_key(pb::CreateKeyRequest { key: Some(key) })
        .await
        .unwrap()
        .into_inner();
    (r.key.unwrap(), r.secret)
}

fn key(name: &str, scopes: &[&str]) -> pb::Key {
    pb::Key {
        name: name.into(),
        owner: "search".into(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

fn authed<T>(message: T, secret: &str) -> Request<T> {
    let mut req = Request::new(message);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {secret}").parse().unwrap());
    req
}

fn small(model: &str) -> pb::ChatRequest {
    let mut req = request(model, "hello there");
    req.max_tokens = Some(5);
    req
}

#[tokio::test]
async fn every_auth_outcome() {
    let (_mock, gateway) = setup("").await;
    let mut admin = admin(&gateway);
    let mut client = gateway.client();

    // Missing.
    let status = client.chat(small("openai/gpt-4o-mini")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // Unknown.
    let status = client
        .chat(authed(
            small("openai/gpt-4o-mini"),
            "lgw_0123456789abcdef_nope",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // Valid.
    let (created, secret) = create_key(&mut admin, key("svc", &["chat"])).await;
    assert!(secret.starts_with(&format!("lgw_{}_", created.id)));
    client
        .chat(authed(small("openai/gpt-4o-mini"), &secret))
        .await
        .unwrap();

    // Wrong scope: a chat key on the admin API; a usage-read key on chat.
    let mut as_chat_key = LlmGatewayAdminClient::new(gateway.channel.clone());
    let status = as_chat_key
        .list_policies(authed(pb::ListPoliciesRequest::default(), &secret))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let (_, reader) = create_key(&mut admin, key("reader", &["usage-read"])).await;
    let status = client
        .chat(authed(small("openai/gpt-4o-mini"), &reader))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    as_chat_key
        .get_usage(authed(pb::GetUsageRequest::default(), &reader))
        .await
        .unwrap();

    // Outside the allowed models or policies.
    let mut narrow = key("narrow", &["chat"]);
    narrow.allowed_models = vec!["openai/gpt-4o*".into()];
    narrow.allowed_policies = vec!["exp-*".into()];
    let (_, narrow) = create_key(&mut admin, narrow).await;
    client
        .chat(authed(small("openai/gpt-4o-mini"), &narrow))
        .await
        .unwrap();
    let status = client
        .chat(authed(small("openai/gpt-4.1-nano"), &narrow))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = client
        .chat(authed(small("cheap"), &narrow))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // Expired.
    let mut expired = key("expired", &["chat"]);
    expired.expire_time = Some(prost_types::Timestamp {
        seconds: 1,
        nanos: 0,
    });
    let (_, expired) = create_key(&mut admin, expired).await;
    let status = client
        .chat(authed(small("openai/gpt-4o-mini"), &expired))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("expired"));

    // Revoked: at once.
    admin
        .revoke_key(pb::RevokeKeyRequest { name: "svc".into() })
        .await
        .unwrap();
    let status = client
        .chat(authed(small("openai/gpt-4o-mini"), &secret))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("revoked"));

    // Listing never shows a secret; a duplicate name is ALREADY_EXISTS.
    let listed = admin
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.keys.len(), 4);
    assert!(listed.keys.iter().any(|k| k.name == "svc" && k.revoked));
    let status = admin
        .create_key(pb::CreateKeyRequest {
            key: Some(key("svc", &["chat"])),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    let status = admin
        .create_key(pb::CreateKeyRequest {
            key: Some(key("Bad Name", &["root"])),
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&status),
        vec!["key.scopes[0]", "key.name", "key.scopes"]
    );
}

#[tokio::test]
async fn forced_tags_attribute_usage_and_the_secret_is_not_stored() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&format!(
        r#"
[store]
path = "{}"
[providers.openai]
kind = "openai"
base_url = "{}"
api_key = "sk-upstream"
"#,
        dir.path().join("gw.db").display(),
        mock.openai_base_url()
    ))
    .await;
    let mut admin = admin(&gateway);
    let mut k = key("team-search", &["chat"]);
    k.forced_tags.insert("project".into(), "ranker".into());
    let (_, secret) = create_key(&mut admin, k).await;
    let mut req = small("openai/gpt-4o-mini");
    req.tags.insert("team".into(), "spoofed".into());
    req.tags.insert("feature".into(), "autocomplete".into());
    gateway.client().chat(authed(req, &secret)).await.unwrap();

    let mut groups = Vec::new();
    for _ in 0..100 {
        let usage = admin
            .get_usage(pb::GetUsageRequest {
                group_by: vec![
                    "key".into(),
                    "tag:team".into(),
                    "tag:project".into(),
                    "tag:feature".into(),
                ],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if !usage.groups.is_empty() {
            groups = usage.groups;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(groups.len(), 1);
    let key = &groups[0].key;
    assert_eq!(key["key"], "team-search");
    assert_eq!(
        key["tag:team"], "search",
        "the caller cannot override the owner's team"
    );
    assert_eq!(key["tag:project"], "ranker");
    assert_eq!(key["tag:feature"], "autocomplete");

    // Only a hash is stored.
    let db = std::fs::read(dir.path().join("gw.db")).unwrap();
    let wal = std::fs::read(dir.path().join("gw.db-wal")).unwrap_or_default();
    let needle = secret.as_bytes();
    for bytes in [&db, &wal] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "the secret is stored in clear"
        );
    }
}

#[tokio::test]
async fn requests_per_minute_hold_under_concurrent_load() {
    let (_mock, gateway) = setup("").await;
    let mut admin = admin(&gateway);
    let mut k = key("limited", &["chat"]);
    k.requests_per_minute = 10;
    let (_, secret) = create_key(&mut admin, k).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut client = gateway.client();
        let secret = secret.clone();
        tasks.push(tokio::spawn(async move {
            client
                .chat(authed(small("openai/gpt-4o-mini"), &secret))
                .await
        }));
    }
    let mut ok = 0;
    let mut limited = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted);
                let details = status.get_error_details();
                let quota = details.quota_failure().expect("QuotaFailure detail");
                assert_eq!(quota.violations[0].subject, "key:limited");
                assert!(details.retry_info().unwrap().retry_delay.unwrap() > Duration::ZERO);
                assert_eq!(reason(&status), "RATE_LIMIT_REQUESTS");
                limited += 1;
            }
        }
    }
    assert_eq!((ok, limited), (10, 10));
}

#[tokio::test]
async fn budget_exhaustion_is_bounded_and_can_route_to_a_cheaper_policy() {
    let (_mock, gateway) = setup("").await;
    let mut admin = admin(&gateway);
    // Each call costs $0.0000033 (2 input, 5 output tokens of gpt-4o-mini) and is estimated
    // at $0.0000039 before it runs: two fit in $0.00001, a third would not.
    let mut k = key("tight", &["chat"]);
    k.daily_budget_usd = 0.00001;
    let (_, secret) = create_key(&mut admin, k).await;
    let mut client = gateway.client();
    let mut ok = 0;
    let mut last = None;
    for _ in 0..6 {
        match client
            .chat(authed(small("openai/gpt-4o-mini"), &secret))
            .await
        {
            Ok(_) => ok += 1,
            Err(status) => last = Some(status),
        }
    }
    let status = last.expect("the budget stopped calls");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "BUDGET_EXCEEDED");
    assert_eq!(ok, 2, "calls within the budget were served");
    let spent = admin
        .get_key(pb::GetKeyRequest {
            name: "tight".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
        .spent_today_usd;
    assert!(
        spent <= 0.00001,
        "overspend: spent {spent} of a $0.00001 budget"
    );

    // A key whose budget says so moves to a cheaper policy instead.
    let mut k = key("falls-back", &["chat"]);
    k.daily_budget_usd = 0.00001;
    k.budget_fallback_policy = "cheap".into();
    let (_, secret) = create_key(&mut admin, k).await;
    let mut routed = None;
    for _ in 0..6 {
        let answer = client
            .chat(authed(small("openai/gpt-4o-mini"), &secret))
            .await
            .unwrap()
            .into_inner();
        if answer.route.as_ref().unwrap().policy == "cheap" {
            routed = Some(answer);
            break;
        }
    }
    assert!(
        routed.is_some(),
        "after the budget was spent, calls went to the fallback policy"
    );
}

#[tokio::test]
async fn budget_holds_under_concurrent_load() {
    let (_mock, gateway) = setup("").await;
    let mut admin = admin(&gateway);
    let mut k = key("burst", &["chat"]);
    // Room for exactly two calls (each estimated at $0.0000039, costing $0.0000033).
    k.daily_budget_usd = 0.00001;
    let (_, secret) = create_key(&mut admin, k).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut client = gateway.client();
        let secret = secret.clone();
        tasks.push(tokio::spawn(async move {
            client
                .chat(authed(small("openai/gpt-4o-mini"), &secret))
                .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => assert_eq!(reason(&status), "BUDGET_EXCEEDED"),
        }
    }
    assert_eq!(ok, 2, "reservations admit exactly what fits in the budget");
    let spent = admin
        .get_key(pb::GetKeyRequest {
            name: "burst".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
        .spent_today_usd;
    assert!(spent <= 0.00001, "spent {spent} of a $0.00001 budget");
}

#[tokio::test]
async fn concurrent_streams_are_capped_per_key() {
    let (_mock, gateway) = setup("").await;
    let mut admin = admin(&gateway);
    let mut k = key("streamer", &["chat"]);
    k.max_concurrent_streams = 1;
    let (_, secret) = create_key(&mut admin, k).await;
    let mut client = gateway.client();
    let first = client
        .chat_stream(authed(
            small("openai/gpt-4o-mini+chunks=10+chunk_delay=50"),
            &secret,
        ))
        .await
        .unwrap()
        .into_inner();
    let status = client
        .chat_stream(authed(small("openai/gpt-4o-mini"), &secret))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "RATE_LIMIT_STREAMS");
    let (_, done) = collect_stream(first).await;
    done.unwrap();
    let (_, done) = collect_stream(
        client
            .chat_stream(authed(small("openai/gpt-4o-mini"), &secret))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    done.unwrap();
}
