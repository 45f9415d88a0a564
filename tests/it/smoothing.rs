//! Outbound smoothing: the mock's per-key requests-per-minute limit, and the gateway pacing
//! its calls inside the limits of every provider account.

use std::time::Duration;

use llm_gateway::{
    mock_upstream::{MockSettings, MockUpstream},
    pb,
};
use serde_json::json;
use tonic::Request;

use crate::common::{Gateway, request};

/// Posts a chat body to the mock at `url` with `headers`; returns the status and headers.
async fn post(
    url: &str,
    headers: &[(&str, &str)],
    body: serde_json::Value,
) -> (u16, reqwest::header::HeaderMap) {
    let mut req = llm_gateway::providers::http_client(&Default::default())
        .unwrap()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.headers().clone())
}

#[tokio::test]
async fn the_mock_limits_each_key_and_answers_with_the_providers_headers() {
    let mock = MockUpstream::start(MockSettings {
        requests_per_minute: Some(2),
        ..MockSettings::default()
    })
    .await
    .unwrap();
    mock.limit_key("sk-big", Some(600));
    let openai = format!("{}/chat/completions", mock.openai_base_url());
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    let auth = [("authorization", "Bearer sk-small")];
    for remaining in ["1", "0"] {
        let (status, h) = post(&openai, &auth, body.clone()).await;
        assert_eq!(status, 200);
        assert_eq!(h["x-ratelimit-limit-requests"], "2");
        assert_eq!(h["x-ratelimit-remaining-requests"], remaining);
        assert!(
            h["x-ratelimit-reset-requests"]
                .to_str()
                .unwrap()
                .ends_with('s')
        );
    }
    let (status, h) = post(&openai, &auth, body.clone()).await;
    assert_eq!(status, 429);
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    assert_eq!(mock.rate_limited(), 1);
    // Another key has its own bucket.
    let (status, h) = post(&openai, &[("authorization", "Bearer sk-big")], body.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(h["x-ratelimit-limit-requests"], "600");

    let anthropic = format!("{}/v1/messages", mock.anthropic_base_url());
    let body = json!({"model": "claude-3-5-haiku", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    let auth = [("x-api-key", "sk-ant"), ("anthropic-version", "2023-06-01")];
    for _ in 0..2 {
        let (status, _) = post(&anthropic, &auth, body.clone()).await;
        assert_eq!(status, 200);
    }
    let (status, h) = post(&anthropic, &auth, body).await;
    assert_eq!(status, 429);
    assert_eq!(h["anthropic-ratelimit-requests-limit"], "2");
    assert_eq!(h["anthropic-ratelimit-requests-remaining"], "0");
    let reset = h["anthropic-ratelimit-requests-reset"].to_str().unwrap();
    let reset = humantime::parse_rfc3339(reset).unwrap();
    assert!(reset > std::time::SystemTime::now() - Duration::from_secs(2));
    assert!(h.contains_key("retry-after"));
}

/// A gateway with a `smooth` policy: provider `primary` (keys `sk-a`, `sk-b`), then `backup`
/// (key `sk-c`), all on `mock`; `pacing` is each provider's pacing table.
fn smoothing_toml(mock: &MockUpstream, pacing: &str) -> String {
    format!(
        r#"
[server]
deadline_margin = "250ms"
[providers.primary]
kind = "openai"
base_url = "{url}"
api_keys = ["sk-a", "sk-b"]
{pacing}
[providers.backup]
kind = "openai"
base_url = "{url}"
api_key = "sk-c"
{pacing}
[policies.smooth]
strategy = "priority"
targets = [{{ provider = "primary", model = "m" }}, {{ provider = "backup", model = "m" }}]
"#,
        url = mock.openai_base_url()
    )
}

fn within(req: pb::ChatRequest, deadline: Duration) -> Request<pb::ChatRequest> {
    let mut req = Request::new(req);
    req.set_timeout(deadline);
    req
}

/// (provider, outcome, reason) of each attempt.
fn trail(route: &pb::Route) -> Vec<(String, i32, String)> {
    route
        .attempts
        .iter()
        .map(|a| (a.provider.clone(), a.outcome, a.reason.clone()))
        .collect()
}

/// A burst of 15 calls against accounts of 5 requests per minute each (two keys of the
/// primary, one of the backup): the primary's load spreads over its two keys, the rest goes
/// to the backup, and no call meets a 429.
#[tokio::test]
async fn a_burst_spreads_over_keys_and_targets_without_a_429() {
    let mock = MockUpstream::start(MockSettings {
        requests_per_minute: Some(5),
        ..MockSettings::default()
    })
    .await
    .unwrap();
    let gateway = Gateway::start(&smoothing_toml(
        &mock,
        "pacing = { requests_per_minute = 5 }",
    ))
    .await;
    let calls = (0..15).map(|i| {
        let mut client = gateway.client();
        async move {
            client
                .chat(within(
                    request("smooth", &format!("call {i}")),
                    Duration::from_secs(5),
                ))
                .await
        }
    });
    let results = futures_util::future::join_all(calls).await;
    let mut by_provider = std::collections::BTreeMap::<String, usize>::new();
    for result in results {
        let answer = result
            .expect("no call fails while an account has capacity")
            .into_inner();
        *by_provider.entry(answer.provider).or_default() += 1;
    }
    assert_eq!(
        mock.rate_limited(),
        0,
        "no request went past an account's limit"
    );
    assert_eq!(by_provider.get("primary"), Some(&10), "{by_provider:?}");
    assert_eq!(by_provider.get("backup"), Some(&5), "{by_provider:?}");
    assert_eq!(mock.stats().requests_with_key("sk-a"), 5);
    assert_eq!(mock.stats().requests_with_key("sk-b"), 5);
    // Every account is spent and a request frees up only after 12 s: a call that cannot
    // wait that long fails at once with RetryInfo, and the mock sees nothing.
    let status = gateway
        .client()
        .chat(within(
            request("smooth", "one more"),
            Duration::from_secs(2),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(crate::common::reason(&status), "RATE_LIMITED");
    let details = tonic_types::StatusExt::get_error_details(&status);
    assert!(details.retry_info().is_some(), "{status:?}");
    assert_eq!(mock.stats().requests(), 15);
}

/// Limits learned from the provider's headers alone (no configured limit): once the
/// primary's headers say its key has nothing left, a call whose deadline cannot wait for
/// the refill is routed to the backup at once, with the skip in its route.
#[tokio::test]
async fn a_call_that_cannot_wait_is_routed_on_at_once() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    mock.limit_key("sk-a", Some(2));
    mock.limit_key("sk-b", Some(2));
    let gateway = Gateway::start(&smoothing_toml(&mock, "")).await;
    let mut client = gateway.client();
    for i in 0..4 {
        let answer = client
            .chat(within(
                request("smooth", &format!("{i}")),
                Duration::from_secs(2),
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.provider, "primary");
    }
    let answer = client
        .chat(within(request("smooth", "next"), Duration::from_secs(2)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.provider, "backup");
    assert_eq!(
        trail(&answer.route.unwrap()),
        vec![
            (
                "primary".to_owned(),
                pb::AttemptOutcome::Skipped as i32,
                "NO_CAPACITY".to_owned()
            ),
            (
                "backup".to_owned(),
                pb::AttemptOutcome::Succeeded as i32,
                String::new()
            ),
        ]
    );
    assert_eq!(mock.rate_limited(), 0);
}

/// Two replicas on one Redis (`[shared]`), both calling provider `openai` with key
/// `sk-shared` on `mock`; `pacing` is the provider's pacing table. A generous Redis timeout:
/// on a loaded machine a timed-out lease would fall back to local limits.
fn shared_toml(mock: &MockUpstream, redis_url: &str, pacing: &str) -> String {
    format!(
        r#"
[shared]
redis_url = "{redis_url}"
timeout = "5s"
[providers.openai]
kind = "openai"
base_url = "{url}"
api_key = "sk-shared"
{pacing}
"#,
        url = mock.openai_base_url()
    )
}

/// A burst through two replicas sharing one provider key limited to 6 requests per minute:
/// together they send the mock 6 calls and no more, so no 429 comes back; the calls that
/// cannot wait for the refill fail at once with UNAVAILABLE. (Without sharing, each replica
/// would send 6.)
#[tokio::test]
async fn two_replicas_share_a_provider_keys_limit() {
    let Some(redis) = crate::redis_server::RedisServer::start() else {
        return;
    };
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    mock.limit_key("sk-shared", Some(6));
    let toml = shared_toml(&mock, &redis.url(), "pacing = { requests_per_minute = 6 }");
    let replicas = [Gateway::start(&toml).await, Gateway::start(&toml).await];
    let calls = (0..12).map(|i| {
        let mut client = replicas[i % 2].client();
        async move {
            client
                .chat(within(
                    request("openai/m", &format!("call {i}")),
                    Duration::from_secs(2),
                ))
                .await
        }
    });
    let results = futures_util::future::join_all(calls).await;
    let answered = results.iter().filter(|r| r.is_ok()).count();
    for status in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
    assert_eq!(mock.rate_limited(), 0, "no call went past the shared limit");
    assert_eq!(mock.stats().requests(), 6);
    assert_eq!(answered, 6);
}

/// A limit learned by one replica from the provider's headers paces the other: replica A
/// spends the key's 4 requests per minute (nothing configured), and replica B, which never
/// saw a header, does not send the next call.
#[tokio::test]
async fn a_limit_one_replica_learned_paces_the_other() {
    let Some(redis) = crate::redis_server::RedisServer::start() else {
        return;
    };
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    mock.limit_key("sk-shared", Some(4));
    let toml = shared_toml(&mock, &redis.url(), "");
    let (a, b) = (Gateway::start(&toml).await, Gateway::start(&toml).await);
    let mut client = a.client();
    for i in 0..4 {
        client
            .chat(within(
                request("openai/m", &format!("{i}")),
                Duration::from_secs(2),
            ))
            .await
            .unwrap();
    }
    // Until A's observations are in Redis: the account's limit, and nothing left.
    let give_up = std::time::Instant::now() + Duration::from_secs(30);
    let hash = loop {
        assert!(
            std::time::Instant::now() < give_up,
            "replica A's observations never reached redis"
        );
        let keys = redis.command("KEYS llmgw:pace:openai:*");
        if let Some(key) = keys.lines().find(|l| l.starts_with("llmgw:pace:")) {
            let (limit, left) = (
                redis.command(&format!("HGET {key} lr")),
                redis.command(&format!("HGET {key} r")),
            );
            if limit == "4" && left.parse::<f64>().is_ok_and(|r| r < 1.0) {
                break key.to_owned();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(hash.ends_with(":m"), "per model: {hash}");
    let status = b
        .client()
        .chat(within(request("openai/m", "next"), Duration::from_secs(2)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(mock.stats().requests(), 4);
    assert_eq!(mock.rate_limited(), 0);
}

/// Redis unreachable in `fail_open` mode: the replica paces the account by its own limit,
/// so calls keep flowing and none goes past it.
#[tokio::test]
async fn without_redis_a_replica_paces_by_its_own_limits() {
    let Some(mut redis) = crate::redis_server::RedisServer::start() else {
        return;
    };
    let url = redis.url();
    redis.stop();
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    mock.limit_key("sk-shared", Some(2));
    let gateway = Gateway::start(&shared_toml(
        &mock,
        &url,
        "pacing = { requests_per_minute = 2 }",
    ))
    .await;
    let mut client = gateway.client();
    let mut answered = 0;
    for i in 0..3 {
        match client
            .chat(within(
                request("openai/m", &format!("{i}")),
                Duration::from_secs(2),
            ))
            .await
        {
            Ok(_) => answered += 1,
            Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
        }
    }
    assert_eq!(answered, 2);
    assert_eq!(mock.rate_limited(), 0);
    assert_eq!(mock.stats().requests(), 2);
}

/// Benchmark: Redis round trips per call of the shared outbound limiter. Calls go out at a
/// fixed rate (each on its own task, so a slow one does not hold the next back) to one
/// provider key paced at `requests_per_minute = 60000` (the mock limits the key the same,
/// so every answer carries rate-limit headers and the replicas learn from them too); the
/// `EVALSHA` count from `INFO commandstats` covers both scripts (capacity leases and the
/// learned-limit writes, at most 4 per second per account). Numbers go to BENCHMARKS.md.
///
/// `cargo test --test it -- --ignored shared_limiter_round_trips_per_call --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it on purpose (see its docs)"]
#[expect(clippy::print_stderr, reason = "a benchmark reports its numbers")]
async fn shared_limiter_round_trips_per_call() {
    let Some(redis) = crate::redis_server::RedisServer::start() else {
        return;
    };
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    mock.limit_key("sk-shared", Some(60_000));
    let toml = shared_toml(
        &mock,
        &redis.url(),
        "pacing = { requests_per_minute = 60000 }",
    );
    let replicas = [Gateway::start(&toml).await, Gateway::start(&toml).await];
    let evalsha = || redis.command_calls().get("evalsha").copied().unwrap_or(0);
    eprintln!(
        "| replicas | offered calls/s | calls | achieved calls/s | EVALSHA | EVALSHA per call |"
    );
    eprintln!("|---|---|---|---|---|---|");
    for (used, rate, calls) in [
        (1, 2, 20),
        (1, 20, 100),
        (1, 100, 300),
        (1, 400, 800),
        (2, 100, 300),
    ] {
        let before = evalsha();
        let started = std::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..calls {
            tick.tick().await;
            let mut client = replicas[i % used].client();
            tasks.spawn(async move {
                client
                    .chat(within(
                        request("openai/m", &format!("{i}")),
                        Duration::from_secs(10),
                    ))
                    .await
                    .is_ok()
            });
        }
        let mut ok = 0;
        while let Some(done) = tasks.join_next().await {
            ok += usize::from(done.unwrap());
        }
        let elapsed = started.elapsed().as_secs_f64();
        // The learned-limit writes are off the call path: let the last ones land.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let trips = evalsha() - before;
        assert_eq!(ok, calls, "every call is answered");
        eprintln!(
            "| {used} | {rate} | {calls} | {:.0} | {trips} | {:.3} |",
            calls as f64 / elapsed,
            trips as f64 / calls as f64
        );
    }
    assert_eq!(mock.rate_limited(), 0);
}
