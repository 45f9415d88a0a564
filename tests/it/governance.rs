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
