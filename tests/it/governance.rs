//! Data governance in the ledger: each usage record carries the call's guardrail decisions
//! by direction, entity type and action.

use llm_gateway::mock_upstream::{MockSettings, MockUpstream};
use tonic::Code;

use crate::common::*;

const PROFILES: &str = r#"
[guardrails.mixed]
actions = { email = "redact", credit_card = "block", ip_address = "log" }

[policies.guarded]
targets = [{ provider = "openai", model = "gpt-4o-mini" }]
guardrails = "mixed"
"#;

#[tokio::test]
async fn usage_records_carry_the_guardrail_decisions() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&openai_toml(&mock, PROFILES)).await;
    let mut client = gateway.client();
    client
        .chat(request(
            "guarded",
            "mail a.b@example.com and c.d@example.com",
        ))
        .await
        .unwrap();
    let blocked = client
        .chat(request("guarded", "card 4111 1111 1111 1111 from 10.0.0.1"))
        .await
        .unwrap_err();
    assert_eq!(blocked.code(), Code::FailedPrecondition);
    let (_, end) = stream(&gateway, request("guarded", "host 10.1.2.3")).await;
    end.unwrap();
    client
        .chat(request("openai/gpt-4o-mini", "mail a.b@example.com"))
        .await
        .unwrap();

    let mut admin = admin_client(gateway.channel.clone());
    let records = usage_records(&mut admin, 4).await;
    let mut got: Vec<(String, String, String)> = records
        .iter()
        .map(|r| (r.rpc.clone(), r.code.clone(), r.guardrails.clone()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (
                "Chat".into(),
                "FAILED_PRECONDITION".into(),
                "request:credit_card:block=1,request:ip_address:log=1".into()
            ),
            ("Chat".into(), "OK".into(), String::new()),
            ("Chat".into(), "OK".into(), "request:email:redact=2".into()),
            // The echoed reply repeats the logged address: the reply scan counts it too.
            (
                "ChatStream".into(),
                "OK".into(),
                "request:ip_address:log=1,reply:ip_address:log=1".into()
            ),
        ],
        "{records:#?}"
    );
}

/// Records of two tenants, 10 days and 1 day old (their times are the injected clock).
fn aged_records() -> Vec<llm_gateway::ledger::UsageRecord> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let day = 86_400_000;
    [("short", 10), ("short", 1), ("long", 10), ("long", 1)]
        .into_iter()
        .map(|(team, age)| llm_gateway::ledger::UsageRecord {
            time_ms: now - age * day,
            request_id: format!("{team}-{age}"),
            rpc: "Chat".into(),
            tags: [("team".to_owned(), team.to_owned())].into(),
            code: "OK".into(),
            ..Default::default()
        })
        .collect()
}

/// The ledger's pruning keeps each tenant's records for its own retention (`short`: 7
/// days) and the others for the global one (30 days).
async fn tenant_retention_prunes(sink: std::sync::Arc<dyn llm_gateway::ledger::UsageSink>) {
    use std::time::Duration;
    sink.insert_usage(aged_records()).await.unwrap();
    let day = Duration::from_secs(86_400);
    let (ledger, writer) = llm_gateway::ledger::Ledger::start_with_tenants(
        sink.clone(),
        16,
        30 * day,
        400 * day,
        [("short".to_owned(), 7 * day)].into(),
    );
    // The writer prunes when it starts (then hourly): wait, bounded, for the tenant's
    // pass, which runs after the global one.
    let mut left = Vec::new();
    for _ in 0..200 {
        left = sink
            .usage_between(0, i64::MAX)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.request_id)
            .collect::<Vec<_>>();
        if !left.contains(&"short-10".to_owned()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    left.sort();
    assert_eq!(left, ["long-1", "long-10", "short-1"]);
    drop(ledger);
    writer.finish(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn sqlite_prunes_each_tenant_past_its_retention() {
    let store =
        llm_gateway::store::sqlite::SqliteStore::open(std::path::Path::new(":memory:")).unwrap();
    tenant_retention_prunes(std::sync::Arc::new(store)).await;
}

#[tokio::test]
async fn postgres_prunes_each_tenant_past_its_retention() {
    let Some(url) = crate::pg_server::database().await else {
        return;
    };
    let store = llm_gateway::store::postgres::PgStore::connect(&url)
        .await
        .unwrap();
    tenant_retention_prunes(std::sync::Arc::new(store)).await;
}

#[test]
fn a_tenant_retention_longer_than_the_global_one_is_refused() {
    let raw: llm_gateway::ledger::RawLedger =
        toml::from_str("retention = \"7d\"\ntenant_retention = { search = \"30d\", ads = \"1x\" }")
            .unwrap();
    let mut issues = llm_gateway::settings::Issues::new();
    let settings = llm_gateway::ledger::LedgerSettings::from_raw(raw, &mut issues);
    let fields: Vec<String> = issues.into_vec().into_iter().map(|i| i.field).collect();
    assert_eq!(
        fields,
        [
            "ledger.tenant_retention.ads",
            "ledger.tenant_retention.search"
        ]
    );
    assert_eq!(settings.tenant_retention.len(), 2);
}

/// A key's secret with these settings.
async fn key_secret(admin: &mut Admin, key: llm_gateway::pb::Key) -> String {
    admin
        .create_key(llm_gateway::pb::CreateKeyRequest { key: Some(key) })
        .await
        .unwrap()
        .into_inner()
        .secret
}

/// The kept content of `request_id`, once the ledger wrote it (polls, bounded; `want`
/// false: once the call's usage record is there).
async fn content_of(
    admin: &mut Admin,
    request_id: &str,
    want: bool,
) -> Vec<llm_gateway::pb::UsageContent> {
    for _ in 0..200 {
        let contents = admin
            .get_usage_content(llm_gateway::pb::GetUsageContentRequest {
                request_id: request_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .contents;
        let recorded = usage_records(admin, 0)
            .await
            .iter()
            .any(|r| r.request_id == request_id);
        if !contents.is_empty() || (!want && recorded) {
            return contents;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("no usage record of {request_id}");
}

fn keyed<T>(message: T, secret: &str, request_id: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {secret}").parse().unwrap());
    req.metadata_mut()
        .insert("x-request-id", request_id.parse().unwrap());
    req
}

#[tokio::test]
async fn a_key_that_keeps_content_keeps_it_redacted_and_only_admins_read_it() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&openai_toml(&mock, PROFILES)).await;
    let mut admin = admin_client(gateway.channel.clone());
    let keeper = key_secret(
        &mut admin,
        llm_gateway::pb::Key {
            name: "keeper".into(),
            owner: "search".into(),
            scopes: vec!["chat".into()],
            keep_content: true,
            ..Default::default()
        },
    )
    .await;
    let plain = key_secret(
        &mut admin,
        llm_gateway::pb::Key {
            name: "plain".into(),
            scopes: vec!["chat".into()],
            ..Default::default()
        },
    )
    .await;
    let text = "mail jo@example.com, card 4111 1111 1111 1111";
    let redacted = "mail [EMAIL], card [CREDIT_CARD]";
    let mut client = gateway.client();
    client
        .chat(keyed(
            request("openai/gpt-4o-mini", text),
            &keeper,
            "kept-unary",
        ))
        .await
        .unwrap();
    let kept = content_of(&mut admin, "kept-unary", true).await;
    assert_eq!(kept.len(), 1);
    let c = &kept[0];
    assert_eq!(c.prompt, format!("user: {redacted}"));
    assert_eq!(c.reply, format!("Mock reply to: {redacted}"));
    assert_eq!((c.key.as_str(), c.tenant.as_str()), ("keeper", "search"));
    let (time, expires) = (c.time.unwrap().seconds, c.expire_time.unwrap().seconds);
    assert_eq!(expires - time, 30 * 86_400);
    // Streamed, the reply as it went out.
    let stream = client
        .chat_stream(keyed(
            request("openai/gpt-4o-mini", text),
            &keeper,
            "kept-stream",
        ))
        .await
        .unwrap()
        .into_inner();
    let (_, end) = collect_stream(stream).await;
    end.unwrap();
    let kept = content_of(&mut admin, "kept-stream", true).await;
    assert_eq!(kept[0].reply, format!("Mock reply to: {redacted}"));
    // Nothing is kept by default.
    client
        .chat(keyed(
            request("openai/gpt-4o-mini", text),
            &plain,
            "not-kept",
        ))
        .await
        .unwrap();
    assert!(content_of(&mut admin, "not-kept", false).await.is_empty());
    // Admin only: a usage-read key may not read it.
    let reader = key_secret(
        &mut admin,
        llm_gateway::pb::Key {
            name: "reader".into(),
            scopes: vec!["usage-read".into()],
            ..Default::default()
        },
    )
    .await;
    let mut req = tonic::Request::new(llm_gateway::pb::GetUsageContentRequest {
        request_id: "kept-unary".into(),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {reader}").parse().unwrap());
    let status = llm_gateway::pb::llm_gateway_admin_client::LlmGatewayAdminClient::new(
        gateway.channel.clone(),
    )
    .get_usage_content(req)
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // A retention out of range is refused.
    let status = admin
        .create_key(llm_gateway::pb::CreateKeyRequest {
            key: Some(llm_gateway::pb::Key {
                name: "bad".into(),
                scopes: vec!["chat".into()],
                keep_content: true,
                content_retention: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(violated_fields(&status).contains(&"key.content_retention".to_owned()));
}

/// Kept content on a store: read back until it expires, then pruned.
async fn content_expires(sink: std::sync::Arc<dyn llm_gateway::ledger::UsageSink>) {
    let record = |id: &str, expires_ms: i64| llm_gateway::ledger::UsageRecord {
        time_ms: 1_000,
        request_id: id.into(),
        key: "k".into(),
        code: "OK".into(),
        content: Some(Box::new(llm_gateway::ledger::Content {
            prompt: "user: hi [EMAIL]".into(),
            reply: "hello".into(),
            tenant: "search".into(),
            expires_ms,
        })),
        ..Default::default()
    };
    sink.insert_usage(vec![record("old", 5_000), record("new", 50_000)])
        .await
        .unwrap();
    // At t = 10 s, "old" has expired.
    assert!(sink.usage_content("old", 10_000).await.unwrap().is_empty());
    let kept = sink.usage_content("new", 10_000).await.unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].content.prompt, "user: hi [EMAIL]");
    assert_eq!(kept[0].content.tenant, "search");
    assert_eq!(sink.delete_expired_content(10_000).await.unwrap(), 1);
    assert_eq!(sink.usage_content("old", 0).await.unwrap().len(), 0);
    assert_eq!(sink.usage_content("new", 0).await.unwrap().len(), 1);
}

#[tokio::test]
async fn sqlite_keeps_content_until_it_expires() {
    let store =
        llm_gateway::store::sqlite::SqliteStore::open(std::path::Path::new(":memory:")).unwrap();
    content_expires(std::sync::Arc::new(store)).await;
}

#[tokio::test]
async fn postgres_keeps_content_until_it_expires() {
    let Some(url) = crate::pg_server::database().await else {
        return;
    };
    let store = llm_gateway::store::postgres::PgStore::connect(&url)
        .await
        .unwrap();
    content_expires(std::sync::Arc::new(store)).await;
}
