//! Three gateway replicas on one Redis (`[shared]`), calls spread round-robin: rate limits,
//! budgets and stream leases hold across replicas; a dead replica's lease expires; a Redis
//! restart under load fails no call in `fail_open` mode.
//!
//! Gateway keys must be the same on every replica: the replicas share one SQLite store file
//! (the key is created on the first before the others start).

use std::time::Duration;

use llm_gateway::{
    mock_upstream::{MockSettings, MockUpstream},
    pb::{self, llm_gateway_client::LlmGatewayClient},
};
use tonic::{Code, Request};

use crate::{common::*, redis_server::RedisServer};

pub(crate) struct Cluster {
    _mock: MockUpstream,
    _dir: tempfile::TempDir,
    pub(crate) replicas: Vec<Gateway>,
    pub(crate) secret: String,
    /// The replicas' config (for a replica run as a process).
    toml: String,
}

pub(crate) fn authed<T>(message: T, secret: &str) -> Request<T> {
    let mut req = Request::new(message);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {secret}").parse().unwrap());
    req
}

pub(crate) fn small() -> pb::ChatRequest {
    let mut req = request("openai/gpt-4o-mini", "hello there");
    req.max_tokens = Some(5);
    req
}

/// The replicas' config: one store file, one Redis.
fn replica_toml(mock: &MockUpstream, store: &std::path::Path, redis: &str, shared: &str) -> String {
    format!(
        r#"
[auth]
require_keys = true
[store]
path = "{}"
[shared]
redis_url = "{redis}"
{shared}
[providers.openai]
kind = "openai"
base_url = "{}"
api_key = "sk-upstream"
"#,
        store.display(),
        mock.openai_base_url()
    )
}

/// Three replicas sharing `redis`, with one key (`key`) created on the first.
pub(crate) async fn cluster(redis: &RedisServer, key: pb::Key, shared: &str) -> Cluster {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let toml = replica_toml(&mock, &dir.path().join("gw.db"), &redis.url(), shared);
    let first = Gateway::start(&toml).await;
    let secret = admin_client(first.channel.clone())
        .create_key(pb::CreateKeyRequest { key: Some(key) })
        .await
        .unwrap()
        .into_inner()
        .secret;
    let mut replicas = vec![first];
    for _ in 0..2 {
        replicas.push(Gateway::start(&toml).await);
    }
    Cluster {
        _mock: mock,
        _dir: dir,
        replicas,
        secret,
        toml,
    }
}

pub(crate) fn key(name: &str) -> pb::Key {
    pb::Key {
        name: name.into(),
        owner: "search".into(),
        scopes: vec!["chat".into()],
        ..Default::default()
    }
}

/// Waits (bounded) until `done` holds: for state Redis reaches after a call (settlements
/// are written off the call path).
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..300 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not reached within 6 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_60_rpm_key_admits_60_in_total_across_three_replicas() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut k = key("burst60");
    k.requests_per_minute = 60;
    // A generous timeout: a call that times out is admitted by its replica alone
    // (fail_open), and this machine is shared.
    let c = cluster(&redis, k, "timeout = \"5s\"").await;
    let before = redis.command_calls().get("evalsha").copied().unwrap_or(0);
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..300 {
        let mut client = c.replicas[i % 3].client();
        let secret = c.secret.clone();
        tasks.push(tokio::spawn(async move {
            client.chat(authed(small(), &secret)).await
        }));
    }
    let mut ok = 0u64;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert_eq!(reason(&status), "RATE_LIMIT_REQUESTS");
            }
        }
    }
    // The bucket refills at one request per second: a burst that took longer than a
    // second may admit one more per second it took (it is 60, not 180, either way).
    let refill = started.elapsed().as_secs();
    assert!(
        (60..=60 + refill).contains(&ok),
        "admitted {ok} of 300 in {refill} s with a 60 rpm key on three replicas"
    );
    // One admission round trip per call (settlements come on top, off the call path).
    let scripts = redis.command_calls().get("evalsha").copied().unwrap_or(0) - before;
    assert!(scripts >= 300, "{scripts} script calls for 300 admissions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_budget_is_enforced_once_under_30_concurrent_callers_on_three_replicas() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    // Room for exactly two calls: each is estimated at $0.0000039 before it runs (2 input
    // tokens, max_tokens 5 of gpt-4o-mini) and costs $0.0000033.
    let mut k = key("tight30");
    k.daily_budget_usd = 0.00001;
    let c = cluster(&redis, k, "timeout = \"5s\"").await;
    let mut tasks = Vec::new();
    for i in 0..30 {
        let mut client = c.replicas[i % 3].client();
        let secret = c.secret.clone();
        tasks.push(tokio::spawn(async move {
            client.chat(authed(small(), &secret)).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => assert_eq!(reason(&status), "BUDGET_EXCEEDED", "{status:?}"),
        }
    }
    assert_eq!(
        ok, 2,
        "reservations across replicas admit exactly what fits"
    );
    // Settlements are written after the calls: wait until no reservation is left.
    eventually("every reservation settled", || {
        redis.leased("llmgw:key:tight30:limits", "r") == 0.0
    })
    .await;
    let spent: f64 = redis
        .command("HGET llmgw:key:tight30:limits d")
        .parse()
        .unwrap();
    // The documented bound: the budget plus what calls in flight cost beyond their
    // estimates (nothing here: every call cost less than its estimate).
    assert!(
        spent <= 0.00001 && spent > 0.0000065,
        "spent {spent} of a $0.00001 budget over three replicas"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_mid_stream_frees_its_stream_lease_within_the_lease_ttl() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut k = key("onestream");
    k.max_concurrent_streams = 1;
    let c = cluster(&redis, k, "lease_ttl = \"1s\"").await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, channel) = gateway_process(dir.path(), &c.toml).await;
    // A stream that sends its first chunk and then nothing: it holds its slot.
    let mut stalled = request("openai/gpt-4o-mini+stall", "hello");
    stalled.max_tokens = Some(5);
    let held = LlmGatewayClient::new(channel)
        .chat_stream(authed(stalled, &c.secret))
        .await
        .expect("the process replica opened the stream");
    // The slot is taken for every replica.
    let status = c.replicas[0]
        .client()
        .chat_stream(authed(small(), &c.secret))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "RATE_LIMIT_STREAMS", "{status:?}");
    assert_eq!(redis.leased("llmgw:key:onestream:limits", "s"), 1.0);
    // kill -9: no shutdown, no release; only the lease's expiry frees the slot.
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    drop(held);
    let killed = std::time::Instant::now();
    let mut freed = None;
    for _ in 0..300 {
        match c.replicas[1]
            .client()
            .chat_stream(authed(small(), &c.secret))
            .await
        {
            Ok(stream) => {
                let (_, end) = collect_stream(stream.into_inner()).await;
                end.unwrap();
                freed = Some(killed.elapsed());
                break;
            }
            Err(status) => assert_eq!(reason(&status), "RATE_LIMIT_STREAMS", "{status:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Renewed every third of the TTL, the lease expires at most one TTL after the kill
    // (measured here: about 1 s; timing is not asserted).
    assert!(
        freed.is_some(),
        "the dead replica's stream lease was never freed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_that_outlives_its_subjects_hash_expiry_keeps_its_slot() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut k = key("longstream");
    k.max_concurrent_streams = 1;
    let c = cluster(&redis, k, "lease_ttl = \"1s\"").await;
    let hash = "llmgw:key:longstream:limits";
    let mut stalled = request("openai/gpt-4o-mini+stall", "hello");
    stalled.max_tokens = Some(5);
    let _held = c.replicas[0]
        .client()
        .chat_stream(authed(stalled, &c.secret))
        .await
        .expect("the stream opened");
    assert_eq!(redis.leased(hash, "s"), 1.0);
    // The hash's expiry comes before the stream ends (here: in 1.5 s, as after 2 minutes of
    // a long stream with no other admission on the key). The renewals (every third of the
    // lease TTL) must push it out, or the slot goes with the hash.
    assert_eq!(redis.command(&format!("PEXPIRE {hash} 1500")), ":1");
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(
        redis.leased(hash, "s"),
        1.0,
        "the slot was lost with the hash"
    );
    let ttl: i64 = redis
        .command(&format!("PTTL {hash}"))
        .trim_start_matches(':')
        .parse()
        .unwrap();
    assert!(ttl > 60_000, "the renewal pushed the expiry out: {ttl} ms");
    let status = c.replicas[1]
        .client()
        .chat_stream(authed(small(), &c.secret))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "RATE_LIMIT_STREAMS", "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_under_load_fails_no_call_in_fail_open_mode() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let mut k = key("steady");
    k.requests_per_minute = 1_000_000;
    k.tokens_per_minute = 100_000_000;
    k.daily_budget_usd = 1000.0;
    let c = cluster(&redis, k, "mode = \"fail_open\"").await;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for i in 0..6 {
        let mut client = c.replicas[i % 3].client();
        let (secret, done, stop) = (c.secret.clone(), done.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut failed = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Err(status) = client.chat(authed(small(), &secret)).await {
                    failed.push(status);
                }
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            failed
        }));
    }
    let calls = || done.load(std::sync::atomic::Ordering::Relaxed);
    let wait_for = |n: u64| async move {
        for _ in 0..1000 {
            if calls() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the load stalled at {} calls", calls());
    };
    wait_for(60).await;
    redis.stop();
    let down_at = calls();
    wait_for(down_at + 60).await;
    redis.restart();
    let up_at = calls();
    wait_for(up_at + 60).await;
    // The replicas are back on Redis by themselves: the new server runs their scripts.
    eventually("the replicas reconnected", || {
        redis.command_calls().get("evalsha").copied().unwrap_or(0) > 0
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        let failed = task.await.unwrap();
        assert!(failed.is_empty(), "calls failed: {failed:?}");
    }
}

/// How long `replica` says `model` of openai rests, if it does.
async fn cooldown(replica: &Gateway, model: &str) -> Option<prost_types::Duration> {
    admin_client(replica.channel.clone())
        .list_providers(pb::ListProvidersRequest {})
        .await
        .unwrap()
        .into_inner()
        .targets
        .into_iter()
        .find(|t| t.provider == "openai" && t.model == model)
        .and_then(|t| t.cooldown_remaining)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_after_rests_the_target_on_every_replica() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let c = cluster(&redis, key("rests"), "").await;
    // The first replica's call is answered 429 with Retry-After: 30.
    let model = "gpt-4o-mini+status=429+retry_after=30";
    let mut limited = request(&format!("openai/{model}"), "hello");
    limited.max_tokens = Some(5);
    let status = c.replicas[0]
        .client()
        .chat(authed(limited.clone(), &c.secret))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let sent = c._mock.stats().requests();
    // The others rest it too, without having called it.
    for replica in &c.replicas[1..] {
        let mut rest = None;
        for _ in 0..300 {
            rest = cooldown(replica, model).await;
            if rest.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let rest = rest.expect("the rest reached the other replica");
        assert!(rest.seconds > 20 && rest.seconds <= 30, "{rest:?}");
        let status = replica
            .client()
            .chat(authed(limited.clone(), &c.secret))
            .await
            .unwrap_err();
        // Skipped, not tried: the target rests here too.
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("resting"), "{status:?}");
    }
    assert_eq!(
        c._mock.stats().requests(),
        sent,
        "a resting target was called"
    );
}

/// The sum of the samples of `name` in the process's metrics whose labels include each of
/// `labels` (`key="value"`).
fn metric(
    handle: &metrics_exporter_prometheus::PrometheusHandle,
    name: &str,
    labels: &[&str],
) -> f64 {
    handle
        .render()
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The Redis key a provider API key's shared rest lives under (its fingerprint: the first 8
/// bytes of the secret's SHA-256).
fn key_rest(provider: &str, secret: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let fp = u64::from_be_bytes(digest.as_ref()[..8].try_into().unwrap()).max(1);
    format!("llmgw:key-rest:{provider}/{fp:016x}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_or_limited_provider_key_rests_on_every_replica() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    // The recorder is process-wide: the provider name is this test's own.
    let metrics = llm_gateway::telemetry::metrics_handle().expect("the metrics recorder");
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    // One key is refused (401), one allows one request a minute (then 429 with
    // Retry-After), one is fine.
    mock.accept_keys(Some(&["sk-limited", "sk-good"]));
    mock.limit_key("sk-limited", Some(1));
    // Pacing off: it would learn the limited key's limit from its first answer's headers
    // and never earn the 429 this test is about.
    let toml = format!(
        r#"
[shared]
redis_url = "{}"
timeout = "5s"
[pacing]
enabled = false
[providers.keyshare]
kind = "openai"
base_url = "{}"
api_keys = ["sk-refused", "sk-limited", "sk-good"]
"#,
        redis.url(),
        mock.openai_base_url()
    );
    let a = Gateway::start(&toml).await;
    let b = Gateway::start(&toml).await;
    let sent = |key: &str| mock.stats().requests_with_key(key);
    // Replica A meets both: every call still succeeds on another key.
    let mut calls = 0;
    while sent("sk-refused") == 0 || mock.rate_limited() == 0 {
        a.client()
            .chat(request("keyshare/gpt-4o-mini", "hello"))
            .await
            .expect("another key carries the call");
        calls += 1;
        assert!(calls <= 6, "three keys in turn meet both within six calls");
    }
    assert_eq!((sent("sk-refused"), sent("sk-limited")), (1, 2));
    // Published with the rest as the expiry: 300 s (upstream.key_auth_rest) for the refusal,
    // the Retry-After (up to 60 s) for the limit.
    let ttl = |secret: &str| -> i64 {
        let reply = redis.command(&format!("PTTL {}", key_rest("keyshare", secret)));
        reply.trim_start_matches(':').parse().unwrap()
    };
    // Published from a task beside the call: wait for it, then read the expiries.
    eventually("replica A published both rests", || {
        ttl("sk-refused") > 0 && ttl("sk-limited") > 0
    })
    .await;
    assert!((250_000..=300_000).contains(&ttl("sk-refused")));
    assert!((1..=60_000).contains(&ttl("sk-limited")));
    assert_eq!(ttl("sk-good"), -2, "a key that did not fail is not rested");
    // Replica B heard both (only B applies peer rests: A ignores its own messages).
    eventually("replica B applied both rests", || {
        ["reason=\"refused\"", "reason=\"rate_limited\""]
            .iter()
            .all(|reason| {
                metric(
                    &metrics,
                    "llm_gateway_provider_key_rests_total",
                    &["provider=\"keyshare\"", "source=\"peer\"", reason],
                ) >= 1.0
            })
    })
    .await;
    let good = sent("sk-good");
    for _ in 0..6 {
        b.client()
            .chat(request("keyshare/gpt-4o-mini", "hello"))
            .await
            .unwrap();
    }
    assert_eq!(
        (sent("sk-refused"), sent("sk-limited"), sent("sk-good")),
        (1, 2, good + 6),
        "replica B sent a key replica A saw refused or rate limited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_overspend_across_three_replicas_stays_within_the_bound() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    // Calls reserve their estimate on the policy's first target (gpt-4o-mini, whose
    // provider is down) and are served by the dearer fallback (gpt-4o): each costs more
    // than it reserved, the case the bound is about. The extra sections follow [shared].
    let extra = r#"timeout = "5s"
[providers.down]
kind = "openai"
base_url = "http://127.0.0.1:1/v1"
api_key = "sk-down"
[policies.dear]
targets = [{ provider = "down", model = "gpt-4o-mini" }, { provider = "openai", model = "gpt-4o" }]
"#;
    let budget = 0.00002;
    let mut k = key("dear30");
    k.daily_budget_usd = budget;
    let c = cluster(&redis, k, extra).await;
    let mut tasks = Vec::new();
    for i in 0..30 {
        let mut client = c.replicas[i % 3].client();
        let secret = c.secret.clone();
        tasks.push(tokio::spawn(async move {
            let mut req = request("dear", "hello there");
            req.max_tokens = Some(5);
            client.chat(authed(req, &secret)).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(answer) => {
                ok += 1;
                let route = answer.into_inner().route.unwrap();
                assert_eq!(route.attempts.last().unwrap().model, "gpt-4o", "{route:?}");
            }
            Err(status) => assert_eq!(reason(&status), "BUDGET_EXCEEDED", "{status:?}"),
        }
    }
    eventually("every reservation settled", || {
        redis.leased("llmgw:key:dear30:limits", "r") == 0.0
    })
    .await;
    let spent: f64 = redis
        .command("HGET llmgw:key:dear30:limits d")
        .parse()
        .unwrap();
    // The documented bound: budget + C x e, C = 30 calls in flight at most, e = what one
    // call costs beyond its estimate (input: (16 + 11) / 4 = 6 tokens, output: max_tokens;
    // the mock reports 2 input tokens and 5 output).
    let estimate = registry_cost("openai/gpt-4o-mini", 6, 5);
    let excess = registry_cost("openai/gpt-4o", 2, 5) - estimate;
    let bound = budget + 30.0 * excess;
    assert!(ok >= 1, "no call was admitted");
    assert!(
        spent > budget && spent <= bound,
        "spent {spent} of a {budget} budget with {ok} calls admitted; bound {bound}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_that_changes_the_keys_ends_a_refusal_rest_on_every_replica() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let metrics = llm_gateway::telemetry::metrics_handle().expect("the metrics recorder");
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    // `sk-fixed` is refused until the operator fixes it upstream and reloads.
    mock.accept_keys(Some(&["sk-fine"]));
    let toml = |keys: &str| {
        format!(
            r#"
[shared]
redis_url = "{}"
timeout = "5s"
[pacing]
enabled = false
[providers.keyreload]
kind = "openai"
base_url = "{}"
api_keys = [{keys}]
"#,
            redis.url(),
            mock.openai_base_url()
        )
    };
    let a_toml = std::sync::Arc::new(std::sync::Mutex::new(toml(r#""sk-fixed", "sk-fine""#)));
    let source_toml = a_toml.clone();
    let source: llm_gateway::reload::ConfigSource =
        std::sync::Arc::new(move || Ok(Gateway::config(&source_toml.lock().unwrap())));
    let reload = std::sync::Arc::new(tokio::sync::Notify::new());
    let options = llm_gateway::server::ServeOptions {
        config_source: Some(source),
        reload_signal: Some(reload.clone()),
        ..Default::default()
    };
    let initial = Gateway::config(&a_toml.lock().unwrap());
    let a = Gateway::start_with(initial, options).await;
    let b = Gateway::start(&toml(r#""sk-fixed", "sk-fine""#)).await;
    let sent = |key: &str| mock.stats().requests_with_key(key);
    while sent("sk-fixed") == 0 {
        a.client()
            .chat(request("keyreload/gpt-4o-mini", "hello"))
            .await
            .expect("the other key carries the call");
    }
    eventually("replica B applied the refusal", || {
        metric(
            &metrics,
            "llm_gateway_provider_key_rests_total",
            &[
                "provider=\"keyreload\"",
                "source=\"peer\"",
                "reason=\"refused\"",
            ],
        ) >= 1.0
    })
    .await;
    for _ in 0..4 {
        b.client()
            .chat(request("keyreload/gpt-4o-mini", "hello"))
            .await
            .unwrap();
    }
    assert_eq!(sent("sk-fixed"), 1, "replica B sent the refused key");
    // Fixed upstream; replica A reloads a changed key set (one key added).
    mock.accept_keys(Some(&["sk-fixed", "sk-fine", "sk-new"]));
    *a_toml.lock().unwrap() = toml(r#""sk-fixed", "sk-fine", "sk-new""#);
    reload.notify_one();
    // Replica B, whose config did not change, tries the key again (its rest was 300 s).
    let mut tried = false;
    for _ in 0..200 {
        b.client()
            .chat(request("keyreload/gpt-4o-mini", "hello"))
            .await
            .unwrap();
        if sent("sk-fixed") > 1 {
            tried = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(
        tried,
        "replica B kept resting the key after replica A's reload"
    );
    // And the rest key is gone, so a replica that (re)subscribes later does not rest it.
    assert_eq!(
        redis.command(&format!("EXISTS {}", key_rest("keyreload", "sk-fixed"))),
        ":0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_tokens_given_back_at_settlement_admit_more_calls_on_redis() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let settings = llm_gateway::shared::SharedSettings {
        redis_url: Some(redis.url()),
        timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let limits = llm_gateway::limits::Limits::with_shared(
        llm_gateway::shared::Shared::connect(&settings).unwrap(),
    );
    limits.prepare().await;
    let tracker = tokio_util::task::TaskTracker::new();
    let stop = tokio_util::sync::CancellationToken::new();
    limits.background(&tracker, &stop);
    // 60 tokens a minute (one a second refills), each call estimated at 20 tokens.
    let subjects = limits.subjects(vec![llm_gateway::limits::SubjectLimits {
        subject: "key:giveback".into(),
        requests_per_minute: 0,
        tokens_per_minute: 60,
        max_concurrent_streams: 0,
        daily_budget_usd: 0.0,
        monthly_budget_usd: 0.0,
    }]);
    let ask = || llm_gateway::limits::Ask {
        subjects: subjects.clone(),
        estimated_tokens: 20,
        stream: false,
        estimated_usd: 0.0,
        budget: llm_gateway::limits::BudgetCheck::Skip,
    };
    let mut permits = Vec::new();
    for _ in 0..3 {
        permits.push(limits.admit(ask(), now_ms()).await.unwrap());
    }
    let status = limits
        .admit(ask(), now_ms())
        .await
        .unwrap_err()
        .into_status();
    assert_eq!(reason(&status), "RATE_LIMIT_TOKENS", "{status:?}");
    let field = |name: &str| -> f64 {
        redis.hash("llmgw:key:giveback:limits")[name]
            .parse()
            .unwrap()
    };
    let (before, at) = (field("tt"), field("ta"));
    // Two calls used 5 tokens each: 15 each go back, added to the stored level as is (the
    // refill since `ta` is the same either way, capped when read).
    for permit in permits.iter_mut().take(2) {
        permit.settle(Some(5), None, now_ms());
    }
    eventually("both settlements landed", || field("tt") > before + 29.0).await;
    assert_eq!(field("tt"), before + 30.0);
    assert_eq!(field("ta"), at);
    // A call that used more than its estimate (30 of 20) takes the 10 more at settlement,
    // from the level refilled until then (one token a second).
    permits[2].settle(Some(30), None, now_ms());
    eventually("the overrun was charged", || field("ta") != at).await;
    let refilled = (before + 30.0 + (field("ta") - at) / 1000.0).min(60.0);
    assert!(
        (field("tt") - (refilled - 10.0)).abs() < 1e-6,
        "{} != {refilled} - 10",
        field("tt")
    );
    // What came back admits another call of 20 at once.
    limits.admit(ask(), now_ms()).await.unwrap();
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}

/// Limits on `redis` with a credit window, their background tasks running.
async fn credit_limits(
    redis: &RedisServer,
    window: Duration,
) -> (
    std::sync::Arc<llm_gateway::limits::Limits>,
    String,
    tokio_util::task::TaskTracker,
    tokio_util::sync::CancellationToken,
) {
    let settings = llm_gateway::shared::SharedSettings {
        redis_url: Some(redis.url()),
        timeout: Duration::from_secs(5),
        credit_window: window,
        ..Default::default()
    };
    let shared = llm_gateway::shared::Shared::connect(&settings)
        .unwrap()
        .unwrap();
    let replica = shared.replica_id().to_owned();
    let limits = llm_gateway::limits::Limits::with_shared(Some(shared));
    limits.prepare().await;
    let tracker = tokio_util::task::TaskTracker::new();
    let stop = tokio_util::sync::CancellationToken::new();
    limits.background(&tracker, &stop);
    (limits, replica, tracker, stop)
}

fn limited(
    subject: &str,
    rpm: u32,
    daily_budget_usd: f64,
) -> Vec<llm_gateway::limits::SubjectLimits> {
    vec![llm_gateway::limits::SubjectLimits {
        subject: subject.into(),
        requests_per_minute: rpm,
        tokens_per_minute: 0,
        max_concurrent_streams: 0,
        daily_budget_usd,
        monthly_budget_usd: 0.0,
    }]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_admits_a_busy_keys_calls_without_a_round_trip_and_gives_back_what_is_left() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (limits, replica, tracker, stop) = credit_limits(&redis, Duration::from_millis(300)).await;
    let subjects = limits.subjects(limited("key:credit", 120_000, 10.0));
    let ask = || llm_gateway::limits::Ask {
        subjects: subjects.clone(),
        estimated_tokens: 10,
        stream: false,
        estimated_usd: 0.001,
        budget: llm_gateway::limits::BudgetCheck::Reserve,
    };
    let field = |name: &str| -> f64 {
        redis
            .hash("llmgw:key:credit:limits")
            .get(name)
            .map_or(0.0, |v| v.parse().unwrap())
    };
    let mut first = limits.admit(ask(), now_ms()).await.unwrap();
    // The first call took itself and a block: 600 requests (a 300 ms window of 2,000 a
    // second), and $10 / 64 reserved beside its own $0.001.
    let (rt, ra) = (field("rt"), field("ra"));
    assert_eq!(rt, 120_000.0 - 1.0 - 600.0);
    let block = 10.0 / 64.0;
    let reserved = format!("r:{replica}");
    assert!((field(&reserved) - (0.001 + block)).abs() < 1e-9);
    first.settle(Some(10), Some(0.001), now_ms());
    let calls = redis.command_calls().get("evalsha").copied().unwrap_or(0);
    // The next 99 come out of the block: the bucket is not touched.
    for _ in 0..99 {
        let mut permit = limits.admit(ask(), now_ms()).await.unwrap();
        permit.settle(Some(10), Some(0.001), now_ms());
    }
    eventually("the settlements landed", || (field("d") - 0.1).abs() < 1e-9).await;
    assert_eq!(
        (field("rt"), field("ra")),
        (rt, ra),
        "no admission reached redis"
    );
    let scripts = redis.command_calls().get("evalsha").copied().unwrap_or(0) - calls;
    assert!(
        (99..=101).contains(&scripts),
        "{scripts} scripts for 99 settlements (plus at most a give-back)"
    );
    // What the calls drew is out of the reservation; what is left of the block goes back
    // once the window ends: the requests to the bucket, the reservation to zero.
    eventually("the block went back", || field(&reserved) == 0.0).await;
    assert_eq!(field("rt"), rt + 600.0 - 99.0);
    assert!((field("d") - 0.1).abs() < 1e-9);
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_on_two_replicas_admits_the_limit_and_not_one_call_more() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    // A long window: no block expires during the test, so no credit is stranded.
    let (a, _, ta, sa) = credit_limits(&redis, Duration::from_secs(10)).await;
    let (b, _, tb, sb) = credit_limits(&redis, Duration::from_secs(10)).await;
    let subjects = [
        a.subjects(limited("key:exact", 1_200, 0.0)),
        b.subjects(limited("key:exact", 1_200, 0.0)),
    ];
    let started = std::time::Instant::now();
    let (mut admitted, mut permits) = (0u64, Vec::new());
    loop {
        let mut refused = 0;
        for (limits, subjects) in [&a, &b].into_iter().zip(&subjects) {
            let ask = llm_gateway::limits::Ask {
                subjects: subjects.clone(),
                estimated_tokens: 10,
                stream: false,
                estimated_usd: 0.0,
                budget: llm_gateway::limits::BudgetCheck::Reserve,
            };
            match limits.admit(ask, now_ms()).await {
                Ok(permit) => {
                    admitted += 1;
                    permits.push(permit);
                }
                Err(e) => {
                    assert_eq!(reason(&e.into_status()), "RATE_LIMIT_REQUESTS");
                    refused += 1;
                }
            }
        }
        if refused == 2 {
            break;
        }
    }
    // 1,200 a minute is 20 a second of refill while the test ran.
    let refill = (started.elapsed().as_secs_f64() * 20.0).ceil() as u64;
    assert!(
        (1_200..=1_200 + refill + 1).contains(&admitted),
        "admitted {admitted} of a 1,200 rpm limit on two replicas with credit (refill {refill})"
    );
    drop(permits);
    for (stop, tracker) in [(sa, ta), (sb, tb)] {
        stop.cancel();
        tracker.close();
        tracker.wait().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlements_sent_together_land_exactly_once_even_after_redis_forgot_the_scripts() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (limits, _, tracker, stop) = credit_limits(&redis, Duration::from_secs(10)).await;
    let subjects = limits.subjects(limited("key:batch", 120_000, 10.0));
    let mut permits = Vec::new();
    for _ in 0..50 {
        let ask = llm_gateway::limits::Ask {
            subjects: subjects.clone(),
            estimated_tokens: 10,
            stream: false,
            estimated_usd: 0.001,
            budget: llm_gateway::limits::BudgetCheck::Reserve,
        };
        permits.push(limits.admit(ask, now_ms()).await.unwrap());
    }
    // Redis restarted without its script cache: the first pipeline's calls fail with
    // NOSCRIPT before they run, and go again one by one.
    assert_eq!(redis.command("SCRIPT FLUSH"), "+OK");
    for permit in &mut permits {
        permit.settle(Some(10), Some(0.002), now_ms());
    }
    let spent = || -> f64 {
        redis
            .hash("llmgw:key:batch:limits")
            .get("d")
            .map_or(0.0, |v| v.parse().unwrap())
    };
    eventually("every settlement landed", || (spent() - 0.1).abs() < 1e-9).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!((spent() - 0.1).abs() < 1e-9, "charged twice: {}", spent());
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_keys_calls_are_admitted_out_of_credit_and_counted_so() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    // The recorder is process-wide (other tests count too): the deltas are at least ours.
    let metrics = llm_gateway::telemetry::metrics_handle().expect("the metrics recorder");
    let mut k = key("busy");
    k.requests_per_minute = 1_000_000;
    k.daily_budget_usd = 1000.0;
    let c = cluster(&redis, k, "").await;
    let via = |how: &str| {
        metric(
            &metrics,
            "llm_gateway_shared_limit_admissions_total",
            &[&format!("via=\"{how}\"")],
        )
    };
    let (credit, redis_before) = (via("credit"), via("redis"));
    let mut client = c.replicas[0].client();
    for _ in 0..20 {
        client.chat(authed(small(), &c.secret)).await.unwrap();
    }
    assert!(
        via("redis") - redis_before >= 1.0,
        "the first call asks redis"
    );
    assert!(
        via("credit") - credit >= 15.0,
        "most of 20 calls came out of credit: {}",
        via("credit") - credit
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_block_of_credit_is_freed_when_its_lease_expires() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    // Replica A takes a block and dies at once: no renewal, no give-back (its background
    // tasks never run, as after `kill -9`).
    let settings = llm_gateway::shared::SharedSettings {
        redis_url: Some(redis.url()),
        timeout: Duration::from_secs(5),
        lease_ttl: Duration::from_millis(500),
        ..Default::default()
    };
    let shared = llm_gateway::shared::Shared::connect(&settings)
        .unwrap()
        .unwrap();
    let dead = shared.replica_id().to_owned();
    let a = llm_gateway::limits::Limits::with_shared(Some(shared));
    a.prepare().await;
    let ask = |limits: &llm_gateway::limits::Limits| llm_gateway::limits::Ask {
        subjects: limits.subjects(limited("key:dead", 120_000, 10.0)),
        estimated_tokens: 10,
        stream: false,
        estimated_usd: 0.001,
        budget: llm_gateway::limits::BudgetCheck::Reserve,
    };
    std::mem::forget(a.admit(ask(&a), now_ms()).await.unwrap());
    let fields = || redis.hash("llmgw:key:dead:limits");
    let reserved: f64 = fields()[&format!("r:{dead}")].parse().unwrap();
    assert!(
        (reserved - (0.001 + 10.0 / 64.0)).abs() < 1e-9,
        "{reserved}"
    );
    // After the lease TTL the first admission of another replica that reads the hash
    // deletes the dead replica's lease and reservation, block included.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (b, _, tracker, stop) = credit_limits(&redis, Duration::from_millis(500)).await;
    b.admit(ask(&b), now_ms()).await.unwrap();
    let after = fields();
    assert!(
        !after.contains_key(&format!("r:{dead}")) && !after.contains_key(&format!("x:{dead}")),
        "{after:?}"
    );
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}
