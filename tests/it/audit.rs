//! The audit log: every mutating Admin RPC leaves an entry with its actor and the etags
//! before and after; ListAuditLog filters and pages newest first; only admin credentials
//! read it. The same on the PostgreSQL store.

use std::sync::Arc;

use llm_gateway::{
    config::Config,
    mock_upstream::{MockSettings, MockUpstream},
    pb,
    server::ServeOptions,
};
use tonic::{Code, Request};

use crate::{common::*, pg_server};

fn gateway_toml(mock: &MockUpstream, extra: &str) -> String {
    format!(
        r#"
[http]
listen = "off"
[providers.a]
kind = "openai-compatible"
base_url = "{}"
{extra}
"#,
        mock.openai_base_url()
    )
}

/// A gateway whose ReloadConfig reads `config` again.
async fn start(config: Config) -> Gateway {
    let source = config.clone();
    Gateway::start_with(
        config,
        ServeOptions {
            config_source: Some(Arc::new(move || Ok(source.clone()))),
            ..Default::default()
        },
    )
    .await
}

fn policy(name: &str, model: &str) -> pb::Policy {
    pb::Policy {
        name: name.into(),
        targets: vec![pb::PolicyTarget {
            provider: "a".into(),
            model: model.into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn entries(admin: &mut Admin, req: pb::ListAuditLogRequest) -> Vec<pb::AuditEntry> {
    admin
        .list_audit_log(req)
        .await
        .unwrap()
        .into_inner()
        .entries
}

/// (action, resource_kind, resource, before_etag, after_etag) of an entry.
fn summary(e: &pb::AuditEntry) -> (&str, &str, &str, &str, &str) {
    (
        e.action.as_str(),
        e.resource_kind.as_str(),
        e.resource.as_str(),
        e.before_etag.as_str(),
        e.after_etag.as_str(),
    )
}

/// Calls every mutating Admin RPC once and checks the entries they left.
async fn every_mutation_is_recorded(gateway: &Gateway) {
    let mut admin = admin_client(gateway.channel.clone());
    let created = admin
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(policy("audited", "m1")),
        })
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    let mut update = policy("audited", "m2");
    update.etag = created.etag.clone();
    let updated = admin
        .update_policy(pb::UpdatePolicyRequest {
            policy: Some(update),
        })
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    admin
        .delete_policy(pb::DeletePolicyRequest {
            name: "audited".into(),
            etag: updated.etag.clone(),
        })
        .await
        .unwrap();
    let key = admin
        .create_key(pb::CreateKeyRequest {
            key: Some(pb::Key {
                name: "ops".into(),
                owner: "platform".into(),
                scopes: vec!["admin".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let secret = key.secret.clone();
    let key = key.key.unwrap();
    let mut change = key.clone();
    change.requests_per_minute = 60;
    let changed = admin
        .update_key(pb::UpdateKeyRequest { key: Some(change) })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    // A failed change leaves no entry.
    let stale = admin
        .update_key(pb::UpdateKeyRequest { key: Some(key) })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    admin
        .reload_config(pb::ReloadConfigRequest {})
        .await
        .unwrap();
    // Made with the admin key: its name is the actor.
    let mut as_key = Request::new(pb::InvalidateCacheRequest {
        policy: "audited".into(),
        ..Default::default()
    });
    as_key
        .metadata_mut()
        .insert("authorization", format!("Bearer {secret}").parse().unwrap());
    pb::llm_gateway_admin_client::LlmGatewayAdminClient::new(gateway.channel.clone())
        .invalidate_cache(as_key)
        .await
        .unwrap();
    admin
        .revoke_key(pb::RevokeKeyRequest { name: "ops".into() })
        .await
        .unwrap();

    let all = entries(&mut admin, pb::ListAuditLogRequest::default()).await;
    let got: Vec<_> = all.iter().map(summary).collect();
    assert_eq!(
        got,
        [
            ("RevokeKey", "key", "ops", "v2", "v3"),
            ("InvalidateCache", "cache", "policy=audited", "", ""),
            ("ReloadConfig", "config", "", "", ""),
            ("UpdateKey", "key", "ops", "v1", changed.etag.as_str()),
            ("CreateKey", "key", "ops", "", "v1"),
            ("DeletePolicy", "policy", "audited", "v2", ""),
            ("UpdatePolicy", "policy", "audited", "v1", "v2"),
            ("CreatePolicy", "policy", "audited", "", "v1"),
        ],
        "{all:#?}"
    );
    let actors: Vec<&str> = all.iter().map(|e| e.actor.as_str()).collect();
    assert_eq!(
        actors,
        [
            "admin-token",
            "key:ops",
            "admin-token",
            "admin-token",
            "admin-token",
            "admin-token",
            "admin-token",
            "admin-token"
        ]
    );
    let detail = |action: &str| {
        all.iter()
            .find(|e| e.action == action)
            .map(|e| e.detail.clone())
            .unwrap()
    };
    assert_eq!(detail("UpdatePolicy"), "changed: targets");
    assert_eq!(detail("UpdateKey"), "changed: requests_per_minute");
    assert_eq!(detail("InvalidateCache"), "removed 0 replies");
    assert!(detail("CreateKey").contains("owner `platform`"));
    // No entry carries the secret.
    let secret_part = secret.rsplit('_').next().unwrap();
    for e in &all {
        assert!(!format!("{e:?}").contains(secret_part), "{e:?}");
        assert!(e.time.is_some());
    }
    // Newest first, with non-decreasing times going back.
    let times: Vec<i64> = all
        .iter()
        .map(|e| e.time.as_ref().unwrap().seconds)
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");

    // Filters.
    let keys = entries(
        &mut admin,
        pb::ListAuditLogRequest {
            resource_kind: "key".into(),
            resource: "ops".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(keys.len(), 3);
    let by_key = entries(
        &mut admin,
        pb::ListAuditLogRequest {
            actor: "key:ops".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_key.len(), 1);
    assert_eq!(by_key[0].action, "InvalidateCache");
    let future = entries(
        &mut admin,
        pb::ListAuditLogRequest {
            start_time: Some(prost_types::Timestamp {
                seconds: all[0].time.as_ref().unwrap().seconds + 3600,
                nanos: 0,
            }),
            ..Default::default()
        },
    )
    .await;
    assert!(future.is_empty(), "{future:?}");
}

#[tokio::test]
async fn every_admin_change_is_recorded() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = start(Gateway::config(&gateway_toml(&mock, ""))).await;
    every_mutation_is_recorded(&gateway).await;
}

#[tokio::test]
async fn every_admin_change_is_recorded_on_postgresql() {
    let Some(url) = pg_server::database().await else {
        return;
    };
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let mut config = Gateway::config(&gateway_toml(&mock, &format!("[store]\nurl = \"{url}\"\n")));
    config.store.path = ":memory:".into();
    let gateway = start(config).await;
    every_mutation_is_recorded(&gateway).await;
}

#[tokio::test]
async fn pages_go_back_in_time_with_keyset_tokens() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&gateway_toml(&mock, "")).await;
    let mut admin = admin_client(gateway.channel.clone());
    for i in 0..5 {
        admin
            .create_policy(pb::CreatePolicyRequest {
                policy: Some(policy(&format!("p{i}"), "m")),
            })
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = admin
            .list_audit_log(pb::ListAuditLogRequest {
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.entries.len() <= 2);
        seen.extend(page.entries.into_iter().map(|e| e.resource));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ["p4", "p3", "p2", "p1", "p0"]);

    let bad = admin
        .list_audit_log(pb::ListAuditLogRequest {
            page_token: "not-a-token".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&bad), ["page_token"]);
}

#[tokio::test]
async fn only_admin_credentials_read_the_log() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&gateway_toml(&mock, "")).await;
    let mut admin = admin_client(gateway.channel.clone());
    let mut secret_of = async |name: &str, scope: &str| {
        admin
            .create_key(pb::CreateKeyRequest {
                key: Some(pb::Key {
                    name: name.into(),
                    scopes: vec![scope.into()],
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .secret
    };
    let chat = secret_of("chatter", "chat").await;
    let usage = secret_of("reader", "usage-read").await;
    let mut client = llm_gateway::pb::llm_gateway_admin_client::LlmGatewayAdminClient::new(
        gateway.channel.clone(),
    );
    for secret in [chat, usage] {
        let mut req = Request::new(pb::ListAuditLogRequest::default());
        req.metadata_mut()
            .insert("authorization", format!("Bearer {secret}").parse().unwrap());
        let status = client.list_audit_log(req).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    let status = client
        .list_audit_log(pb::ListAuditLogRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}
