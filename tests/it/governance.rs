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
            guardrails: "request:email:redact=1".into(),
            ..Default::default()
        })
        .collect()
}

/// Calls per team in the guardrail rollups.
async fn guardrail_calls_by_team(sink: &dyn llm_gateway::ledger::UsageSink) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = sink
        .usage_groups(&llm_gateway::ledger::UsageQuery {
            from_ms: 0,
            to_ms: i64::MAX / 2,
            group_by: vec!["tag:team".into(), "guardrail_entity".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|g| (g.key.join("/"), g.totals.calls))
        .collect();
    out.sort();
    out
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
    // The tenant's guardrail rollups went with its records; the others keep theirs.
    assert_eq!(
        guardrail_calls_by_team(&*sink).await,
        [("long/email".to_owned(), 2), ("short/email".to_owned(), 1)]
    );
    // The rollup pruning covers them too.
    assert!(sink.delete_rollups_before(i64::MAX / 2).await.unwrap() > 0);
    assert_eq!(guardrail_calls_by_team(&*sink).await, []);
}

/// Records with guardrail decisions over three minutes.
fn decided_records() -> Vec<llm_gateway::ledger::UsageRecord> {
    (0..30)
        .map(|i| llm_gateway::ledger::UsageRecord {
            time_ms: 1_700_000_000_000 + i * 7_000,
            request_id: format!("r{i}"),
            rpc: "Chat".into(),
            provider: ["a", "b"][(i % 2) as usize].into(),
            tags: [(
                "team".to_owned(),
                ["x", "y", "z"][(i % 3) as usize].to_owned(),
            )]
            .into(),
            code: if i % 5 == 0 {
                "FAILED_PRECONDITION"
            } else {
                "OK"
            }
            .into(),
            latency_ms: i as f64,
            guardrails: match i % 4 {
                0 => "request:credit_card:block=1,request:email:redact=2",
                1 => "reply:email:redact=1",
                2 => "request:ip_address:log=3",
                _ => "",
            }
            .into(),
            ..Default::default()
        })
        .collect()
}

/// Every guardrail grouping of the records, read back.
async fn guardrail_answers(
    sink: &dyn llm_gateway::ledger::UsageSink,
) -> Vec<Vec<llm_gateway::ledger::UsageGroup>> {
    let mut out = Vec::new();
    for group_by in [
        &["guardrail_phase", "guardrail_entity", "guardrail_action"][..],
        &["guardrail_entity", "provider"][..],
        &["guardrail_phase", "tag:team"][..],
        &["guardrail_action"][..],
    ] {
        let mut groups = sink
            .usage_groups(&llm_gateway::ledger::UsageQuery {
                from_ms: 0,
                to_ms: i64::MAX / 2,
                group_by: group_by.iter().map(|d| (*d).to_owned()).collect(),
                ..Default::default()
            })
            .await
            .unwrap();
        groups.sort_by(|a, b| a.key.cmp(&b.key));
        out.push(groups);
    }
    out
}

/// The migration's backfill gives the rollups the live writes gave: `reset` takes the
/// store back to before the guardrail rollup migration, `reopen` migrates it again.
async fn backfill_matches_live_writes<S, F>(sink: S, reset: impl AsyncFnOnce(), reopen: F)
where
    S: llm_gateway::ledger::UsageSink,
    F: AsyncFnOnce() -> S,
{
    sink.insert_usage(decided_records()).await.unwrap();
    let live = guardrail_answers(&sink).await;
    assert_eq!(live[0].len(), 4, "{live:#?}");
    assert_eq!(
        live[0].iter().map(|g| g.totals.calls).sum::<u64>(),
        // block and redact of i % 4 == 0 (8 calls), reply redact (8), log (7).
        8 + 8 + 8 + 7,
        "{live:#?}"
    );
    drop(sink);
    reset().await;
    let again = reopen().await;
    assert_eq!(guardrail_answers(&again).await, live);
}

#[tokio::test]
async fn sqlite_backfills_the_guardrail_rollups() {
    use llm_gateway::store::sqlite::SqliteStore;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let open = || SqliteStore::open(&path).unwrap();
    backfill_matches_live_writes(
        open(),
        async || {
            let conn = rusqlite::Connection::open(&path).unwrap();
            let version: i64 = conn
                .pragma_query_value(None, "user_version", |row| row.get(0))
                .unwrap();
            conn.execute_batch("DROP TABLE usage_guardrail_minute")
                .unwrap();
            conn.pragma_update(None, "user_version", version - 1)
                .unwrap();
        },
        async || open(),
    )
    .await;
}

#[tokio::test]
async fn postgres_backfills_the_guardrail_rollups() {
    use llm_gateway::store::postgres::PgStore;
    let Some(url) = crate::pg_server::database().await else {
        return;
    };
    backfill_matches_live_writes(
        PgStore::connect(&url).await.unwrap(),
        async || {
            crate::pg_server::connect(&url)
                .await
                .batch_execute(
                    "DROP TABLE usage_guardrail_minute;
                     DELETE FROM schema_migrations WHERE version = (SELECT MAX(version) FROM schema_migrations)",
                )
                .await
                .unwrap();
        },
        async || PgStore::connect(&url).await.unwrap(),
    )
    .await;
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

const REDACT_AND_BLOCK: &str = r#"
[guardrails.pii]
actions = { email = "redact", credit_card = "block" }

[policies.guarded]
targets = [{ provider = "openai", model = "gpt-4o-mini" }]
guardrails = "pii"
"#;

/// GetUsage of `admin` over everything so far.
async fn usage(
    admin: &mut Admin,
    group_by: &[&str],
    filter: &[(&str, &str)],
) -> Result<llm_gateway::pb::GetUsageResponse, tonic::Status> {
    admin
        .get_usage(llm_gateway::pb::GetUsageRequest {
            group_by: group_by.iter().map(|d| (*d).to_owned()).collect(),
            filter: filter
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// (group key values in `group_by` order, calls, errors, decisions), sorted.
fn groups(
    response: &llm_gateway::pb::GetUsageResponse,
    group_by: &[&str],
) -> Vec<(Vec<String>, u64, u64, u64)> {
    let mut out: Vec<_> = response
        .groups
        .iter()
        .map(|g| {
            let t = g.totals.unwrap_or_default();
            (
                group_by.iter().map(|d| g.key[*d].clone()).collect(),
                t.calls,
                t.errors,
                t.guardrail_decisions,
            )
        })
        .collect();
    out.sort();
    out
}

/// Real calls through a profile that redacts emails and blocks cards, then GetUsage by
/// guardrail decision: each group counts the calls that had that decision, once each, with
/// the decisions' counts; filters narrow them; an unknown dimension is refused.
async fn usage_by_guardrail_decision(gateway: &Gateway) {
    let mut client = gateway.client();
    // request:email:redact=2
    client
        .chat(request(
            "guarded",
            "mail a.b@example.com and c.d@example.com",
        ))
        .await
        .unwrap();
    // request:credit_card:block=1
    let blocked = client
        .chat(request("guarded", "card 4111 1111 1111 1111"))
        .await
        .unwrap_err();
    assert_eq!(blocked.code(), Code::FailedPrecondition);
    // request:credit_card:block=1,request:email:redact=1
    let blocked = client
        .chat(request(
            "guarded",
            "e.f@example.com pays with 4111 1111 1111 1111",
        ))
        .await
        .unwrap_err();
    assert_eq!(blocked.code(), Code::FailedPrecondition);
    // No decision.
    client.chat(request("guarded", "hello")).await.unwrap();

    let mut admin = admin_client(gateway.channel.clone());
    let records = usage_records(&mut admin, 4).await;
    assert_eq!(records.len(), 4, "{records:#?}");

    let by = ["guardrail_entity", "guardrail_action"];
    let got = usage(&mut admin, &by, &[]).await.unwrap();
    assert_eq!(
        groups(&got, &by),
        [
            (vec!["credit_card".into(), "block".into()], 2, 2, 2),
            (vec!["email".into(), "redact".into()], 2, 1, 3),
        ],
        "{got:#?}"
    );
    // The total: the three calls with a decision, each once, and all five decisions.
    let total = got.total.unwrap();
    assert_eq!(
        (total.calls, total.errors, total.guardrail_decisions),
        (3, 2, 5)
    );

    // Grouped by phase alone, the call with an email and a card counts once.
    let by_phase = ["guardrail_phase"];
    let got = usage(&mut admin, &by_phase, &[]).await.unwrap();
    assert_eq!(groups(&got, &by_phase), [(vec!["request".into()], 3, 2, 5)]);

    // A filter: blocked decisions, by code.
    let by_code = ["code"];
    let got = usage(&mut admin, &by_code, &[("guardrail_action", "block")])
        .await
        .unwrap();
    assert_eq!(
        groups(&got, &by_code),
        [(vec!["FAILED_PRECONDITION".into()], 2, 2, 2)]
    );
    let total = got.total.unwrap();
    assert_eq!((total.calls, total.guardrail_decisions), (2, 2));
    let got = usage(
        &mut admin,
        &["guardrail_action"],
        &[("guardrail_entity", "email"), ("code", "OK")],
    )
    .await
    .unwrap();
    assert_eq!(
        groups(&got, &["guardrail_action"]),
        [(vec!["redact".into()], 1, 0, 2)]
    );

    // Without a guardrail dimension: every call, no decisions.
    let total = usage(&mut admin, &[], &[]).await.unwrap().total.unwrap();
    assert_eq!((total.calls, total.guardrail_decisions), (4, 0));

    for (group_by, filter) in [
        (&["guardrail_type"][..], &[][..]),
        (&[][..], &[("guardrail", "block")][..]),
    ] {
        let err = usage(&mut admin, group_by, filter).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("guardrail_entity"), "{err:?}");
    }
}

#[tokio::test]
async fn sqlite_usage_groups_by_guardrail_decision() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&openai_toml(&mock, REDACT_AND_BLOCK)).await;
    usage_by_guardrail_decision(&gateway).await;
}

#[tokio::test]
async fn postgres_usage_groups_by_guardrail_decision() {
    let Some(url) = crate::pg_server::database().await else {
        return;
    };
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let mut config = Gateway::config(&openai_toml(
        &mock,
        &format!("[store]\nurl = \"{url}\"\n{REDACT_AND_BLOCK}"),
    ));
    config.store.path = ":memory:".into();
    let gateway = Gateway::start_config(config).await;
    usage_by_guardrail_decision(&gateway).await;
}
