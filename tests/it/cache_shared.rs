//! The response cache shared through Redis (`[shared] redis_url`): two gateway replicas on
//! one Redis serve each other's exact and semantic hits, an invalidation through one
//! reaches the other, tenants stay apart across replicas, and a stopped Redis turns the
//! cache into misses without failing a call.
//!
//! Gateway keys must be the same on both replicas: they share one SQLite store file (the
//! keys are created on the first before the second starts).

use llm_gateway::{
    mock_upstream::{MockSettings, MockUpstream},
    pb,
};
use tonic::{Code, Request};

use crate::{
    cache::{create_key, invalidate, outcome},
    common::*,
    redis_server::RedisServer,
};

const POLICIES: &str = r#"
[cache]
embedding_model = "openai/text-embedding-3-small"
semantic_threshold = 0.9
[policies.cached]
targets = [{ provider = "openai", model = "gpt-4o-mini" }]
cache = { mode = "exact", ttl = "10m" }
[policies.semantic]
targets = [{ provider = "openai", model = "gpt-4o-mini" }]
cache = { mode = "semantic", ttl = "10m" }
"#;

struct Pair {
    mock: MockUpstream,
    _dir: tempfile::TempDir,
    a: Gateway,
    b: Gateway,
    /// Secrets of a key of team `x` and one of team `y`.
    x: String,
    y: String,
}

/// Two replicas on `redis`, one mock upstream, one store file, keys of teams x and y.
async fn pair(redis: &RedisServer) -> Pair {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[auth]\nrequire_keys = true\n[store]\npath = \"{}\"\n[shared]\nredis_url = \"{}\"\n{POLICIES}",
        dir.path().join("gw.db").display(),
        redis.url()
    );
    let toml = openai_toml(&mock, &extra);
    let a = Gateway::start(&toml).await;
    let mut admin = admin_client(a.channel.clone());
    let x = create_key(&mut admin, "x-1", "x").await;
    let y = create_key(&mut admin, "y-1", "y").await;
    let b = Gateway::start(&toml).await;
    Pair {
        mock,
        _dir: dir,
        a,
        b,
        x,
        y,
    }
}

fn as_key(secret: &str, policy: &str, text: &str) -> Request<pb::ChatRequest> {
    let mut req = Request::new(request(policy, text));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {secret}").parse().unwrap());
    req
}

async fn chat(gateway: &Gateway, req: Request<pb::ChatRequest>) -> pb::ChatResponse {
    gateway.client().chat(req).await.unwrap().into_inner()
}

#[tokio::test]
async fn two_replicas_share_exact_hits_invalidation_and_tenant_isolation() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let p = pair(&redis).await;
    let first = chat(&p.a, as_key(&p.x, "cached", "shared hello")).await;
    assert_eq!(outcome(&first), pb::CacheOutcome::Stored);
    assert_eq!(p.mock.stats().requests(), 1);

    // Replica B serves A's reply without an upstream call.
    let hit = chat(&p.b, as_key(&p.x, "cached", "shared hello")).await;
    assert_eq!(outcome(&hit), pb::CacheOutcome::Hit);
    assert_eq!(
        p.mock.stats().requests(),
        1,
        "B's hit made no upstream call"
    );
    assert_eq!(reply_text(&hit), reply_text(&first));
    assert_eq!(hit.usage, first.usage);
    assert_eq!(hit.cost.unwrap().total_usd, 0.0);

    // Another tenant misses on either replica, and its reply is shared in its namespace.
    let other = chat(&p.b, as_key(&p.y, "cached", "shared hello")).await;
    assert_eq!(outcome(&other), pb::CacheOutcome::Stored);
    assert_eq!(p.mock.stats().requests(), 2);
    let other_hit = chat(&p.a, as_key(&p.y, "cached", "shared hello")).await;
    assert_eq!(outcome(&other_hit), pb::CacheOutcome::Hit);
    assert_eq!(p.mock.stats().requests(), 2);

    // A stream on B replays A's reply too.
    let stream_req = as_key(&p.x, "cached", "shared hello");
    let mut events =
        p.b.client()
            .chat_stream(stream_req)
            .await
            .unwrap()
            .into_inner();
    let mut last = None;
    while let Some(event) = events.message().await.unwrap() {
        last = event.event;
    }
    let Some(pb::chat_stream_response::Event::Finish(finish)) = last else {
        panic!("the replay ends with a finish event: {last:?}");
    };
    assert_eq!(
        finish.route.as_ref().unwrap().cache(),
        pb::CacheOutcome::Hit
    );
    assert_eq!(p.mock.stats().requests(), 2);

    // Invalidating x's namespace through A: B misses for x, still hits for y.
    let team_x = pb::InvalidateCacheRequest {
        namespace: "team:x".into(),
        ..Default::default()
    };
    assert_eq!(
        invalidate(&mut admin_client(p.a.channel.clone()), team_x).await,
        1
    );
    let after = chat(&p.b, as_key(&p.x, "cached", "shared hello")).await;
    assert_eq!(outcome(&after), pb::CacheOutcome::Stored);
    assert_eq!(p.mock.stats().requests(), 3);
    let kept = chat(&p.b, as_key(&p.y, "cached", "shared hello")).await;
    assert_eq!(outcome(&kept), pb::CacheOutcome::Hit);

    // By policy, through B: A misses.
    let by_policy = pb::InvalidateCacheRequest {
        policy: "cached".into(),
        ..Default::default()
    };
    let removed = invalidate(&mut admin_client(p.b.channel.clone()), by_policy).await;
    assert_eq!(removed, 2, "x's new reply and y's");
    let after = chat(&p.a, as_key(&p.y, "cached", "shared hello")).await;
    assert_eq!(outcome(&after), pb::CacheOutcome::Stored);
}

#[tokio::test]
async fn semantic_entries_are_shared_and_invalidation_reaches_the_other_index() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let p = pair(&redis).await;
    let first = chat(
        &p.a,
        as_key(&p.x, "semantic", "What is the capital of France?"),
    )
    .await;
    assert_eq!(outcome(&first), pb::CacheOutcome::Stored);
    let before = p.mock.stats().requests();
    // B has never seen the prompt: its index learns it from Redis.
    let near = chat(
        &p.b,
        as_key(&p.x, "semantic", "what is the capital of FRANCE"),
    )
    .await;
    assert_eq!(outcome(&near), pb::CacheOutcome::Hit);
    assert_eq!(reply_text(&near), reply_text(&first));
    assert_eq!(
        p.mock.stats().requests(),
        before + 1,
        "only B's embedding call went upstream"
    );
    // Not across tenants.
    let other = chat(
        &p.b,
        as_key(&p.y, "semantic", "What is the capital of France"),
    )
    .await;
    assert_eq!(outcome(&other), pb::CacheOutcome::Stored);

    // Invalidated through B: A does not serve it, exactly or semantically.
    let team_x = pb::InvalidateCacheRequest {
        namespace: "team:x".into(),
        ..Default::default()
    };
    invalidate(&mut admin_client(p.b.channel.clone()), team_x).await;
    let again = chat(
        &p.a,
        as_key(&p.x, "semantic", "What is the capital of France?"),
    )
    .await;
    assert_eq!(outcome(&again), pb::CacheOutcome::Stored);
    let y_still = chat(
        &p.a,
        as_key(&p.y, "semantic", "what is the capital of france?"),
    )
    .await;
    assert_eq!(outcome(&y_still), pb::CacheOutcome::Hit);
}

#[tokio::test]
async fn a_stopped_redis_turns_the_cache_into_misses_and_fails_no_call() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let p = pair(&redis).await;
    let first = chat(&p.a, as_key(&p.x, "cached", "while redis lives")).await;
    assert_eq!(outcome(&first), pb::CacheOutcome::Stored);
    redis.stop();
    for gateway in [&p.a, &p.b, &p.a] {
        let before = p.mock.stats().requests();
        let r = chat(gateway, as_key(&p.x, "cached", "while redis lives")).await;
        assert_eq!(outcome(&r), pb::CacheOutcome::Miss, "looked up, not stored");
        assert_eq!(reply_text(&r), reply_text(&first));
        assert_eq!(p.mock.stats().requests(), before + 1);
    }
    // Semantic calls too (the index cannot sync; the embedding still works).
    let r = chat(&p.b, as_key(&p.x, "semantic", "anything at all")).await;
    assert_eq!(outcome(&r), pb::CacheOutcome::Miss);
    // An invalidation that cannot reach Redis says so.
    let status = admin_client(p.a.channel.clone())
        .invalidate_cache(pb::InvalidateCacheRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("not invalidated"), "{status:?}");
}
