//! Several replicas on one PostgreSQL (`store.url`): admin changes on one replica route on
//! the others (LISTEN/NOTIFY), etag conflicts across replicas have one winner, keys created
//! on one replica authenticate on the others, and a PostgreSQL restart under load loses no
//! acknowledged usage record while calls keep routing.
//!
//! Each test takes a fresh database on the test run's shared server ([`pg_server`]); the
//! restart test runs a server of its own.

// The observed propagation times are written to stderr (not asserted: see BENCHMARKS.md).
#![allow(clippy::print_stderr)]

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use llm_gateway::{
    mock_upstream::{MockSettings, MockUpstream},
    pb,
    store::{Store, StoreError, postgres::PgStore},
};
use tonic::{Code, Request};

use crate::{common::*, pg_server};

/// Longer than any propagation through NOTIFY and far shorter than the 30 s periodic
/// resync: a change seen within it came through the notification.
const PROPAGATION_DEADLINE: Duration = Duration::from_secs(10);

fn replica_toml(mock: &MockUpstream, url: &str, extra: &str) -> String {
    let base = mock.openai_base_url();
    format!(
        r#"
[store]
url = "{url}"
[http]
listen = "off"
[upstream]
stream_idle_timeout = "5s"
[providers.a]
kind = "openai-compatible"
base_url = "{base}"
[providers.b]
kind = "openai-compatible"
base_url = "{base}"
{extra}
"#
    )
}

/// Three replicas on the database at `url`.
async fn replicas(mock: &MockUpstream, url: &str, extra: &str) -> Vec<Gateway> {
    let toml = replica_toml(mock, url, extra);
    // Started together: they migrate the fresh database at the same moment.
    let (a, b, c) = tokio::join!(
        Gateway::start(&toml),
        Gateway::start(&toml),
        Gateway::start(&toml)
    );
    vec![a, b, c]
}

fn policy(name: &str, provider: &str) -> pb::Policy {
    pb::Policy {
        name: name.into(),
        targets: vec![pb::PolicyTarget {
            provider: provider.into(),
            model: "m".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The provider that answers a call to `model` on `gateway`, or the status.
async fn answered_by(
    gateway: &Gateway,
    model: &str,
    secret: Option<&str>,
) -> Result<String, tonic::Status> {
    let mut req = Request::new(request(model, "hi"));
    if let Some(secret) = secret {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {secret}").parse().unwrap());
    }
    Ok(gateway.client().chat(req).await?.into_inner().provider)
}

/// Polls until `model` is answered by `provider` on `gateway`; how long it took.
async fn until_routed(gateway: &Gateway, model: &str, provider: &str) -> Duration {
    let start = Instant::now();
    loop {
        let got = answered_by(gateway, model, None).await;
        if got.as_deref().ok() == Some(provider) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < PROPAGATION_DEADLINE,
            "`{model}` still answered by {got:?} on {} after {PROPAGATION_DEADLINE:?}",
            gateway.addr
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_policy_change_on_one_replica_routes_on_the_others() {
    let Some(url) = pg_server::database().await else {
        return;
    };
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gws = replicas(&mock, &url, "").await;
    let mut admin_a = admin_client(gws[0].channel.clone());
    let created = admin_a
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(policy("shared", "a")),
        })
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    for gw in &gws[1..] {
        until_routed(gw, "shared", "a").await;
    }
    let mut update = policy("shared", "b");
    update.etag = created.etag;
    admin_a
        .update_policy(pb::UpdatePolicyRequest {
            policy: Some(update),
        })
        .await
        .unwrap();
    for gw in &gws {
        let took = until_routed(gw, "shared", "b").await;
        eprintln!("policy update routed on {} after {took:?}", gw.addr);
    }
    // A delete reaches them too.
    let mut admin_c = admin_client(gws[2].channel.clone());
    admin_c
        .delete_policy(pb::DeletePolicyRequest {
            name: "shared".into(),
            etag: String::new(),
        })
        .await
        .unwrap();
    for gw in &gws {
        let start = Instant::now();
        loop {
            match answered_by(gw, "shared", None).await {
                Err(status) if status.code() == Code::NotFound => break,
                other => assert!(
                    start.elapsed() < PROPAGATION_DEADLINE,
                    "a deleted policy still answers: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test]
async fn concurrent_updates_with_one_etag_have_exactly_one_winner() {
    let Some(url) = pg_server::database().await else {
        return;
    };
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gws = replicas(&mock, &url, "").await;
    let mut admins: Vec<Admin> = gws
        .iter()
        .map(|g| admin_client(g.channel.clone()))
        .collect();
    let mut etag = admins[0]
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(policy("race", "a")),
        })
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap()
        .etag;
    for round in 0..5 {
        let calls = admins.iter_mut().enumerate().map(|(i, admin)| {
            let mut p = policy("race", if i % 2 == 0 { "a" } else { "b" });
            p.description = format!("round {round} replica {i}");
            p.etag = etag.clone();
            async move {
                admin
                    .update_policy(pb::UpdatePolicyRequest { policy: Some(p) })
                    .await
            }
        });
        let results = futures_util::future::join_all(calls).await;
        let winners: Vec<&pb::Policy> = results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .filter_map(|r| r.get_ref().policy.as_ref())
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        for r in &results {
            if let Err(status) = r {
                assert_eq!(status.code(), Code::Aborted, "round {round}: {status:?}");
            }
        }
        etag = winners[0].etag.clone();
        // What the winner wrote is what every replica reads.
        let stored = admins[2]
            .get_policy(pb::GetPolicyRequest {
                name: "race".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .policy
            .unwrap();
        assert_eq!(stored.etag, etag);
        assert_eq!(stored.description, winners[0].description);
    }
}

#[tokio::test]
async fn a_key_created_on_one_replica_authenticates_on_the_others() {
    let Some(url) = pg_server::database().await else {
        return;
    };
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gws = replicas(&mock, &url, "[auth]\nrequire_keys = true").await;
    let mut admin_a = admin_client(gws[0].channel.clone());
    let created = admin_a
        .create_key(pb::CreateKeyRequest {
            key: Some(pb::Key {
                name: "team-search".into(),
                owner: "search".into(),
                scopes: vec!["chat".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let secret = created.secret;
    let model = "a/m";
    for gw in &gws {
        let start = Instant::now();
        loop {
            match answered_by(gw, model, Some(&secret)).await {
                Ok(provider) => {
                    assert_eq!(provider, "a");
                    break;
                }
                Err(status) => {
                    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
                    assert!(
                        start.elapsed() < PROPAGATION_DEADLINE,
                        "the key does not authenticate on {}",
                        gw.addr
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // Revoked on C: refused everywhere.
    admin_client(gws[2].channel.clone())
        .revoke_key(pb::RevokeKeyRequest {
            name: "team-search".into(),
        })
        .await
        .unwrap();
    for gw in &gws {
        let start = Instant::now();
        while answered_by(gw, model, Some(&secret)).await.is_ok() {
            assert!(
                start.elapsed() < PROPAGATION_DEADLINE,
                "a revoked key still works on {}",
                gw.addr
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let status = answered_by(gw, model, Some(&secret)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
}

#[tokio::test]
async fn replicas_starting_at_once_migrate_once_and_the_store_decides_etags() {
    let Some(url) = pg_server::database().await else {
        return;
    };
    let (a, b, c) = tokio::join!(
        PgStore::connect(&url),
        PgStore::connect(&url),
        PgStore::connect(&url)
    );
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    let version = a.schema_version().await.unwrap();
    assert!(version >= 1);
    assert_eq!(b.schema_version().await.unwrap(), version);
    let client = pg_server::connect(&url).await;
    let rows: i64 = client
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, i64::from(version), "each migration ran once");

    let spec = |provider: &str| llm_gateway::routing::policy::PolicySpec {
        name: "p".into(),
        description: String::new(),
        targets: vec![llm_gateway::routing::policy::TargetSpec {
            provider: provider.into(),
            model: "m".into(),
            weight: 0,
            priority: 0,
            region: None,
            tags: vec![],
        }],
        strategy: Default::default(),
        sticky_key: None,
        constraints: Default::default(),
        execution: Default::default(),
        variants: vec![],
        cache: Default::default(),
        guardrails: None,
        shadow: None,
        experiment: None,
    };
    assert_eq!(a.create_policy(spec("a")).await.unwrap().version, 1);
    assert_eq!(
        b.create_policy(spec("a")).await.unwrap_err(),
        StoreError::AlreadyExists("p".into())
    );
    let (ra, rb, rc) = tokio::join!(
        a.update_policy(spec("a"), 1),
        b.update_policy(spec("b"), 1),
        c.update_policy(spec("a"), 1)
    );
    let results = [ra, rb, rc];
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    for r in &results {
        if let Err(e) = r {
            assert_eq!(
                *e,
                StoreError::Conflict {
                    name: "p".into(),
                    current: 2
                }
            );
        }
    }
    assert!(matches!(
        c.delete_policy("p", Some(1)).await,
        Err(StoreError::Conflict { current: 2, .. })
    ));
    c.delete_policy("p", Some(2)).await.unwrap();
    assert_eq!(a.get_policy("p").await.unwrap(), None);
    assert_eq!(
        a.update_policy(spec("a"), 2).await.unwrap_err(),
        StoreError::NotFound("p".into())
    );
}

/// Sends chats round-robin over the replicas until `stop`; the request ids of the calls
/// that were answered (acknowledged), and the statuses of those that failed.
async fn load(
    gws: &[Gateway],
    stop: tokio::sync::watch::Receiver<bool>,
) -> (Vec<String>, Vec<tonic::Status>) {
    let mut acknowledged = Vec::new();
    let mut failed = Vec::new();
    let mut i = 0;
    while !*stop.borrow() {
        let gw = &gws[i % gws.len()];
        i += 1;
        match gw.client().chat(request("steady", "hi")).await {
            Ok(response) => acknowledged.push(response.into_inner().id),
            Err(status) => failed.push(status),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (acknowledged, failed)
}

#[tokio::test]
async fn a_postgres_restart_under_load_loses_no_acknowledged_record() {
    let Some(server) = pg_server::PgServer::start().await else {
        return;
    };
    let url = server.database().await;
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gws = replicas(&mock, &url, "").await;
    let mut admin_a = admin_client(gws[0].channel.clone());
    admin_a
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(policy("steady", "a")),
        })
        .await
        .unwrap();
    for gw in &gws {
        until_routed(gw, "steady", "a").await;
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let calls = async {
        let (acknowledged, failed) = load(&gws, stop_rx.clone()).await;
        (acknowledged, failed)
    };
    let outage = async {
        // Some calls before, during and after the outage.
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.stop().await;
        // Calls route on the last snapshot; admin writes fail UNAVAILABLE.
        let status = admin_a
            .create_policy(pb::CreatePolicyRequest {
                policy: Some(policy("during-outage", "a")),
            })
            .await
            .unwrap_err();
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.restart().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop_tx.send(true).unwrap();
        status
    };
    let ((acknowledged, failed), write_status) = tokio::join!(calls, outage);
    assert_eq!(write_status.code(), Code::Unavailable, "{write_status:?}");
    assert!(
        failed.is_empty(),
        "calls failed during the outage: {failed:?}"
    );
    assert!(!acknowledged.is_empty());
    eprintln!("{} calls answered across the outage", acknowledged.len());

    // Admin writes work again once the database is back (the pool reconnects).
    let start = Instant::now();
    loop {
        let r = admin_a
            .create_policy(pb::CreatePolicyRequest {
                policy: Some(policy("after-outage", "b")),
            })
            .await;
        match r {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(start.elapsed() < Duration::from_secs(30), "{status:?}");
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ... and reach the other replicas through the re-established LISTEN.
    for gw in &gws[1..] {
        until_routed(gw, "after-outage", "b").await;
    }

    // Every acknowledged call's record reaches the database (the writers retry).
    let client = pg_server::connect(&url).await;
    let want: HashSet<String> = acknowledged.iter().cloned().collect();
    let start = Instant::now();
    loop {
        let rows = client
            .query("SELECT request_id FROM usage", &[])
            .await
            .unwrap();
        let stored: HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
        let missing = want.difference(&stored).count();
        if missing == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{missing} of {} acknowledged records never reached the database",
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
