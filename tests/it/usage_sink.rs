//! The usage ledger's store side on both backends (SQLite and PostgreSQL), through the same
//! checks: rollups written beside raw records, GetUsage's groups aggregated over rollups,
//! ExportUsage's keyset pages, budget seeding's daily spend, retention per table, and the
//! migration that fills rollups from records stored before it.

// The measurement below reports its times on stderr.
#![allow(clippy::print_stderr)]

use std::{collections::BTreeMap, sync::Arc};

use llm_gateway::{
    ledger::{UsageQuery, UsageRecord, UsageSink},
    store::{postgres::PgStore, sqlite::SqliteStore},
};

use crate::pg_server;

const MINUTE: i64 = 60_000;
/// A fixed minute-aligned base time (2026-12-01T00:00Z).
const T0: i64 = 1_796_083_200_000;

fn record(i: i64, provider: &str, team: &str, code: &str) -> UsageRecord {
    UsageRecord {
        time_ms: T0 + i * 1_000,
        request_id: format!("r{i}"),
        rpc: "Chat".into(),
        key: if i % 2 == 0 {
            "k-even".into()
        } else {
            "k-odd".into()
        },
        tags: [("team".to_owned(), team.to_owned())].into(),
        provider: provider.into(),
        model: "m".into(),
        attempts: 1,
        input_tokens: 10,
        output_tokens: 5,
        usage_reported: i % 10 != 9,
        cost_usd: Some(0.25),
        latency_ms: if i < 100 { 3.0 } else { 700.0 },
        ttft_ms: (i % 2 == 0).then_some(1.5),
        code: code.into(),
        guardrails: if i % 7 == 0 {
            "request:email:redact=1".into()
        } else {
            String::new()
        },
        // The experiment and shadow columns round-trip (rpc stays `Chat`: totals unchanged).
        trial: llm_gateway::ledger::Trial {
            experiment: "exp".into(),
            arm: if i % 2 == 0 { "a" } else { "b" }.into(),
            shadow_of: if i % 5 == 0 {
                format!("p{i}")
            } else {
                String::new()
            },
            comparison: (i % 5 == 0).then(|| llm_gateway::ledger::Comparison {
                length_ratio: (i % 10 == 0).then_some(0.5),
                exact_match: i % 10 == 0,
                json_agree: (i % 3 == 0).then_some(i % 2 == 0),
                finish_reason: "stop".into(),
            }),
        },
        ..UsageRecord::default()
    }
}

/// 150 records over three minutes: providers a (100) and b (50), teams search/ads.
fn records() -> Vec<UsageRecord> {
    (0..150)
        .map(|i| {
            record(
                i,
                if i < 100 { "a" } else { "b" },
                if i % 3 == 0 { "ads" } else { "search" },
                if i % 25 == 0 { "UNAVAILABLE" } else { "OK" },
            )
        })
        .collect()
}

async fn check(sink: Arc<dyn UsageSink>) {
    let all = records();
    // Written in several batches, like the ledger writer does.
    for chunk in all.chunks(40) {
        sink.insert_usage(chunk.to_vec()).await.unwrap();
    }
    let range = |group_by: &[&str], filter: &[(&str, &str)]| UsageQuery {
        from_ms: T0,
        to_ms: T0 + 3 * MINUTE,
        group_by: group_by.iter().map(|s| (*s).to_owned()).collect(),
        filter: filter
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    };
    let total = sink.usage_groups(&range(&[], &[])).await.unwrap();
    assert_eq!(total.len(), 1);
    let t = &total[0].totals;
    assert_eq!(t.calls, 150);
    assert_eq!(t.errors, 6);
    assert_eq!(t.calls_without_usage, 15);
    assert_eq!(t.input_tokens, 135 * 10);
    assert!((t.cost_usd - 150.0 * 0.25).abs() < 1e-9);
    // 100 calls at 3 ms (bucket <= 5 ms), 50 at 700 ms (bucket <= 1000 ms).
    assert_eq!(t.latency_ms, [Some(5.0), Some(1000.0), Some(1000.0)]);
    assert_eq!(t.ttft_ms, [Some(2.0), Some(2.0)]);

    let mut by: BTreeMap<Vec<String>, u64> = BTreeMap::new();
    for g in sink
        .usage_groups(&range(&["provider", "tag:team"], &[]))
        .await
        .unwrap()
    {
        by.insert(g.key, g.totals.calls);
    }
    let want = |p: &str, team: &str| {
        all.iter()
            .filter(|r| r.provider == p && r.tags["team"] == team)
            .count() as u64
    };
    assert_eq!(by.len(), 4, "{by:?}");
    for (p, team) in [("a", "ads"), ("a", "search"), ("b", "ads"), ("b", "search")] {
        assert_eq!(by[&vec![p.to_owned(), team.to_owned()]], want(p, team));
    }
    let filtered = sink
        .usage_groups(&range(&["key"], &[("provider", "b"), ("tag:team", "ads")]))
        .await
        .unwrap();
    let calls: u64 = filtered.iter().map(|g| g.totals.calls).sum();
    assert_eq!(calls, want("b", "ads"));
    // A missing tag groups as the empty value; the second minute alone has 60 calls.
    let minute = UsageQuery {
        from_ms: T0 + MINUTE,
        to_ms: T0 + 2 * MINUTE,
        group_by: vec!["tag:none".into()],
        ..Default::default()
    };
    let groups = sink.usage_groups(&minute).await.unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].key, [""]);
    assert_eq!(groups[0].totals.calls, 60);

    // Export: keyset pages of 64 cover every record once, in order.
    let mut exported = Vec::new();
    let mut after = None;
    loop {
        let page = sink
            .usage_page(T0, T0 + 3 * MINUTE, after, 64)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().map(|(id, r)| (r.time_ms, *id));
        exported.extend(page.into_iter().map(|(_, r)| r));
    }
    assert_eq!(exported, all);

    // Budget seeding: spend per day, key and team.
    let spend = sink.day_spend(T0 - MINUTE).await.unwrap();
    let sum: f64 = spend.iter().map(|d| d.cost_usd).sum();
    assert!((sum - 37.5).abs() < 1e-9);
    assert!(spend.iter().all(|d| d.day == T0 / 86_400_000));
    let even_ads: f64 = spend
        .iter()
        .filter(|d| d.key == "k-even" && d.team == "ads")
        .map(|d| d.cost_usd)
        .sum();
    let want_even_ads = all
        .iter()
        .filter(|r| r.key == "k-even" && r.tags["team"] == "ads")
        .count() as f64
        * 0.25;
    assert!((even_ads - want_even_ads).abs() < 1e-9);

    // Retention per table: raw records go, the rollups stay (and the other way round).
    assert_eq!(sink.delete_usage_before(T0 + MINUTE).await.unwrap(), 60);
    let t = sink.usage_groups(&range(&[], &[])).await.unwrap();
    assert_eq!(t[0].totals.calls, 150);
    assert!(sink.delete_rollups_before(T0 + MINUTE).await.unwrap() > 0);
    let t = sink.usage_groups(&range(&[], &[])).await.unwrap();
    assert_eq!(t[0].totals.calls, 90);
}

#[tokio::test]
async fn sqlite_usage_sink_rolls_up_pages_and_seeds() {
    check(Arc::new(
        SqliteStore::open(std::path::Path::new(":memory:")).unwrap(),
    ))
    .await;
}

#[tokio::test]
async fn postgres_usage_sink_rolls_up_pages_and_seeds() {
    let Some(url) = pg_server::database().await else {
        return;
    };
    check(Arc::new(PgStore::connect(&url).await.unwrap())).await;
}

#[tokio::test]
async fn the_rollup_migration_fills_rollups_from_stored_records() {
    let Some(url) = pg_server::database().await else {
        return;
    };
    let store = PgStore::connect(&url).await.unwrap();
    store.insert_usage(records()).await.unwrap();
    // Back to the schema before rollups, with the records kept.
    let client = pg_server::connect(&url).await;
    client
        .batch_execute("DROP TABLE usage_minute; ALTER TABLE usage DROP COLUMN cache, DROP COLUMN cost_saved_usd; DELETE FROM schema_migrations WHERE version >= 2")
        .await
        .unwrap();
    let store = PgStore::connect(&url).await.unwrap();
    let total = store
        .usage_groups(&UsageQuery {
            from_ms: T0,
            to_ms: T0 + 3 * MINUTE,
            group_by: vec!["tag:team".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let calls: u64 = total.iter().map(|g| g.totals.calls).sum();
    assert_eq!(calls, 150);
    let latency = store
        .usage_groups(&UsageQuery {
            from_ms: T0,
            to_ms: T0 + 3 * MINUTE,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(latency[0].totals.latency_ms[0], Some(5.0));
    assert_eq!(latency[0].totals.ttft_ms[0], Some(2.0));
}

/// A bounded measurement, not a pass/fail timing: a day of rollups at 5,000 calls/s (200
/// distinct dimension rows a minute, 1,500 calls each: 288,000 rows for 432M calls) and the
/// time of GetUsage's queries over them. Run with `cargo test --test it -- --ignored
/// get_usage_over_a_day`; the numbers are in BENCHMARKS.md.
#[tokio::test]
#[ignore = "a measurement (about 20 s); see BENCHMARKS.md"]
async fn get_usage_over_a_day_of_rollups() {
    let Some(url) = pg_server::database().await else {
        return;
    };
    let store = PgStore::connect(&url).await.unwrap();
    let client = pg_server::connect(&url).await;
    let start = std::time::Instant::now();
    client
        .batch_execute(&format!(
            "INSERT INTO usage_minute (minute_ms, key, policy, provider, model, rpc, code,
               error_class, tags, calls, errors, input_tokens, output_tokens, cost_usd,
               lat_3, lat_9, ttft_2)
             SELECT {T0} + m * 60000, 'key-' || (c % 20), 'policy-' || (c % 5),
               'prov-' || (c % 4), 'model-' || (c % 10), 'Chat',
               CASE WHEN c % 50 = 0 THEN 'UNAVAILABLE' ELSE 'OK' END, 'class-' || (c % 50),
               '{{\"team\":\"team-' || (c % 8) || '\"}}', 1500, 0, 150000, 75000, 3.0,
               1200, 300, 1000
             FROM generate_series(0, 1439) m, generate_series(0, 199) c;
             ANALYZE usage_minute"
        ))
        .await
        .unwrap();
    eprintln!("generated 288,000 rollup rows in {:?}", start.elapsed());
    let day = |group_by: &[&str], filter: &[(&str, &str)]| UsageQuery {
        from_ms: T0,
        to_ms: T0 + 1440 * MINUTE,
        group_by: group_by.iter().map(|s| (*s).to_owned()).collect(),
        filter: filter
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    };
    for (name, query, groups) in [
        ("total", day(&[], &[]), 1),
        ("by provider, model", day(&["provider", "model"], &[]), 20),
        ("by tag:team", day(&["tag:team"], &[]), 8),
        ("key-3 by model", day(&["model"], &[("key", "key-3")]), 1),
    ] {
        let mut times = Vec::new();
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let got = store.usage_groups(&query).await.unwrap();
            times.push(t.elapsed());
            assert_eq!(got.len(), groups, "{name}");
            let calls: u64 = got.iter().map(|g| g.totals.calls).sum();
            let want = if name.starts_with("key-3") {
                432_000_000 / 20
            } else {
                432_000_000
            };
            assert_eq!(calls, want, "{name}");
        }
        times.sort();
        eprintln!("GetUsage {name}: median {:?} of 3", times[1]);
    }
}
