//! The response cache: exact hits and misses, the streaming replay, tenant isolation,
//! per-call controls, InvalidateCache and the ledger's record of a hit.

use llm_gateway::{
    mock_upstream::{MockSettings, MockUpstream},
    pb::{self, chat_stream_response::Event},
};
use tonic::Request;

use crate::common::*;

const CACHED_POLICY: &str = r#"
[policies.cached]
targets = [{ provider = "openai", model = "gpt-4o-mini" }]
cache = { mode = "exact", ttl = "10m", max_temperature = 0.5 }
[policies.uncached]
targets = [{ provider = "openai", model = "gpt-4o-mini" }]
"#;

async fn setup(extra: &str) -> (MockUpstream, Gateway) {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&openai_toml(&mock, &format!("{CACHED_POLICY}{extra}"))).await;
    (mock, gateway)
}

pub fn outcome(response: &pb::ChatResponse) -> pb::CacheOutcome {
    response.route.as_ref().unwrap().cache()
}

async fn chat(
    gateway: &Gateway,
    req: impl tonic::IntoRequest<pb::ChatRequest>,
) -> pb::ChatResponse {
    gateway.client().chat(req).await.unwrap().into_inner()
}

fn with_metadata<T>(message: T, key: &'static str, value: &str) -> Request<T> {
    let mut req = Request::new(message);
    req.metadata_mut().insert(key, value.parse().unwrap());
    req
}

fn cold(text: &str) -> pb::ChatRequest {
    let mut req = request("cached", text);
    req.temperature = Some(0.0);
    req
}

#[tokio::test]
async fn identical_requests_hit_and_every_difference_that_matters_misses() {
    let (mock, gateway) = setup("").await;
    let first = chat(&gateway, cold("hello")).await;
    assert_eq!(outcome(&first), pb::CacheOutcome::Stored);
    assert_eq!(mock.stats().requests(), 1);

    let again = chat(&gateway, cold("hello")).await;
    assert_eq!(outcome(&again), pb::CacheOutcome::Hit);
    assert_eq!(mock.stats().requests(), 1, "a hit makes no upstream call");
    assert_eq!(reply_text(&again), reply_text(&first));
    assert_eq!(again.provider, "openai");
    assert_eq!(again.model, first.model);
    assert_eq!(again.cost.unwrap().total_usd, 0.0, "a hit costs nothing");
    assert_eq!(again.usage, first.usage, "the original usage is replayed");
    assert!(again.route.as_ref().unwrap().attempts.is_empty());
    assert_ne!(again.id, first.id);

    // Attribution and the request id do not matter.
    let mut tagged = cold("hello");
    tagged.tags.insert("feature".into(), "search".into());
    tagged.user = "someone".into();
    let tagged = chat(&gateway, with_metadata(tagged, "x-request-id", "other-id")).await;
    assert_eq!(outcome(&tagged), pb::CacheOutcome::Hit);

    // Everything that changes the answer does.
    let mut with_tool = cold("hello");
    with_tool.tools = vec![weather_tool()];
    let mut with_param = cold("hello");
    with_param.max_tokens = Some(7);
    let mut with_message = cold("hello");
    with_message.messages.insert(0, system("be brief"));
    let mut other_model = cold("hello");
    other_model.model = "openai/gpt-4o-mini".into();
    for (i, req) in [with_tool, with_param, with_message, cold("hello!")]
        .into_iter()
        .enumerate()
    {
        let before = mock.stats().requests();
        let r = chat(&gateway, req).await;
        assert_eq!(outcome(&r), pb::CacheOutcome::Stored, "variant {i}");
        assert_eq!(mock.stats().requests(), before + 1, "variant {i}");
    }
    // A concrete model is not cached unless `[cache].models` says so.
    let r = chat(&gateway, other_model).await;
    assert_eq!(outcome(&r), pb::CacheOutcome::Unspecified);
    let r = chat(&gateway, request("uncached", "hello")).await;
    assert_eq!(outcome(&r), pb::CacheOutcome::Unspecified);

    // Above the policy's max_temperature: neither looked up nor stored.
    let mut hot = cold("hello");
    hot.temperature = Some(0.9);
    assert_eq!(
        outcome(&chat(&gateway, hot.clone()).await),
        pb::CacheOutcome::Bypass
    );
    assert_eq!(
        outcome(&chat(&gateway, hot).await),
        pb::CacheOutcome::Bypass
    );
}

#[tokio::test]
async fn a_new_policy_version_misses() {
    let (mock, gateway) = setup("").await;
    let mut admin = admin_client(gateway.channel.clone());
    let policy = pb::Policy {
        name: "api".into(),
        targets: vec![pb::PolicyTarget {
            provider: "openai".into(),
            model: "gpt-4o-mini".into(),
            ..Default::default()
        }],
        cache: Some(pb::PolicyCache {
            mode: pb::CacheMode::Exact as i32,
            ..Default::default()
        }),
        ..Default::default()
    };
    let created = admin
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(policy),
        })
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    assert_eq!(created.cache.unwrap().mode(), pb::CacheMode::Exact);
    let req = request("api", "hello");
    assert_eq!(
        outcome(&chat(&gateway, req.clone()).await),
        pb::CacheOutcome::Stored
    );
    assert_eq!(
        outcome(&chat(&gateway, req.clone()).await),
        pb::CacheOutcome::Hit
    );

    let mut changed = created.clone();
    changed.description = "same targets, new version".into();
    admin
        .update_policy(pb::UpdatePolicyRequest {
            policy: Some(changed),
        })
        .await
        .unwrap();
    let before = mock.stats().requests();
    assert_eq!(
        outcome(&chat(&gateway, req.clone()).await),
        pb::CacheOutcome::Stored
    );
    assert_eq!(mock.stats().requests(), before + 1);

    // An invalid cache block is refused with the field named.
    let mut bad = created;
    bad.name = "bad".into();
    bad.etag.clear();
    bad.cache = Some(pb::PolicyCache {
        mode: pb::CacheMode::Exact as i32,
        max_temperature: Some(3.0),
        ..Default::default()
    });
    let status = admin
        .create_policy(pb::CreatePolicyRequest { policy: Some(bad) })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["policy.cache.max_temperature"]);
}

#[tokio::test]
async fn a_cached_reply_replays_as_a_normal_stream() {
    let (mock, gateway) = setup("").await;
    let (first, status) = stream(&gateway, cold("stream please")).await;
    status.unwrap();
    let Some(Event::Finish(finish)) = first.last() else {
        panic!("last event must be finish: {first:?}");
    };
    assert_eq!(
        finish.route.as_ref().unwrap().cache(),
        pb::CacheOutcome::Stored
    );

    let (events, status) = stream(&gateway, cold("stream please")).await;
    status.unwrap();
    assert_eq!(mock.stats().requests(), 1);
    let Event::Start(start) = &events[0] else {
        panic!("first event must be start: {events:?}");
    };
    assert_eq!(
        (start.provider.as_str(), start.model.as_str()),
        ("openai", "gpt-4o-mini")
    );
    assert!(
        events[1..events.len() - 1]
            .iter()
            .all(|e| matches!(e, Event::Delta(_)))
    );
    assert_eq!(text_of(&events), text_of(&first));
    let Some(Event::Finish(replayed)) = events.last() else {
        panic!("last event must be finish: {events:?}");
    };
    assert_eq!(replayed.finish_reason, pb::FinishReason::Stop as i32);
    assert_eq!(replayed.usage, finish.usage);
    assert_eq!(replayed.cost.unwrap().total_usd, 0.0);
    assert_eq!(
        replayed.route.as_ref().unwrap().cache(),
        pb::CacheOutcome::Hit
    );

    // The unary call of the same request is the same reply.
    let unary = chat(&gateway, cold("stream please")).await;
    assert_eq!(outcome(&unary), pb::CacheOutcome::Hit);
    assert_eq!(reply_text(&unary), text_of(&first));
}

#[tokio::test]
async fn streamed_tool_calls_replay_and_broken_streams_are_never_stored() {
    let (mock, gateway) = setup("[policies.tools]\ntargets = [{ provider = \"openai\", model = \"gpt-4o+tools+chunks=4\" }]\ncache = { mode = \"exact\" }\n[policies.broken]\ntargets = [{ provider = \"openai\", model = \"gpt-4o-mini+truncate\" }]\ncache = { mode = \"exact\" }\n").await;
    let mut req = request("tools", "weather?");
    req.tools = vec![weather_tool()];
    let (first, status) = stream(&gateway, req.clone()).await;
    status.unwrap();
    let (again, status) = stream(&gateway, req.clone()).await;
    status.unwrap();
    assert_eq!(mock.stats().requests(), 1);
    let args = |events: &[Event]| -> String {
        tool_deltas(events)
            .iter()
            .map(|d| d.arguments.as_str())
            .collect()
    };
    assert_eq!(args(&again), args(&first));
    assert!(!args(&first).is_empty());
    let unary = chat(&gateway, req).await;
    assert_eq!(outcome(&unary), pb::CacheOutcome::Hit);
    assert_eq!(tool_calls(&unary)[0].arguments, args(&first));

    // A stream that breaks is not stored: the next call goes upstream again.
    let (_, status) = stream(&gateway, request("broken", "x")).await;
    assert!(status.is_err());
    let before = mock.stats().requests();
    let (_, status) = stream(&gateway, request("broken", "x")).await;
    assert!(status.is_err());
    assert_eq!(mock.stats().requests(), before + 1);
}

#[tokio::test]
async fn cache_control_no_cache_and_no_store() {
    let (mock, gateway) = setup("").await;
    let r = chat(
        &gateway,
        with_metadata(cold("a"), "cache-control", "no-store"),
    )
    .await;
    assert_eq!(outcome(&r), pb::CacheOutcome::Bypass);
    let r = chat(&gateway, cold("a")).await;
    assert_eq!(
        outcome(&r),
        pb::CacheOutcome::Stored,
        "no-store kept nothing"
    );
    let r = chat(
        &gateway,
        with_metadata(cold("a"), "cache-control", "no-cache"),
    )
    .await;
    assert_eq!(
        outcome(&r),
        pb::CacheOutcome::Stored,
        "no-cache skips the lookup"
    );
    assert_eq!(mock.stats().requests(), 3);
    let r = chat(
        &gateway,
        with_metadata(cold("a"), "cache-control", "no-store"),
    )
    .await;
    assert_eq!(
        outcome(&r),
        pb::CacheOutcome::Bypass,
        "no-store skips the lookup too"
    );
    let r = chat(&gateway, cold("a")).await;
    assert_eq!(outcome(&r), pb::CacheOutcome::Hit);
    assert_eq!(mock.stats().requests(), 4);
}

pub async fn create_key(admin: &mut Admin, name: &str, owner: &str) -> String {
    admin
        .create_key(pb::CreateKeyRequest {
            key: Some(pb::Key {
                name: name.into(),
                owner: owner.into(),
                scopes: vec!["chat".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .secret
}

/// `InvalidateCache` with `req`: how many replies it removed.
pub async fn invalidate(admin: &mut Admin, req: pb::InvalidateCacheRequest) -> u64 {
    admin
        .invalidate_cache(req)
        .await
        .unwrap()
        .into_inner()
        .removed
}

#[tokio::test]
async fn a_key_never_receives_another_tenants_reply() {
    let (mock, gateway) = setup("[auth]\nrequire_keys = true\n").await;
    let mut admin = admin_client(gateway.channel.clone());
    let search = create_key(&mut admin, "search-1", "search").await;
    let search2 = create_key(&mut admin, "search-2", "search").await;
    let ads = create_key(&mut admin, "ads-1", "ads").await;
    let as_key = |secret: &str| {
        with_metadata(
            cold("secret plans"),
            "authorization",
            &format!("Bearer {secret}"),
        )
    };
    assert_eq!(
        outcome(&chat(&gateway, as_key(&search)).await),
        pb::CacheOutcome::Stored
    );
    assert_eq!(
        outcome(&chat(&gateway, as_key(&ads)).await),
        pb::CacheOutcome::Stored
    );
    assert_eq!(mock.stats().requests(), 2, "the other tenant went upstream");
    // Keys of one owner share the team's namespace.
    assert_eq!(
        outcome(&chat(&gateway, as_key(&search2)).await),
        pb::CacheOutcome::Hit
    );
    assert_eq!(
        outcome(&chat(&gateway, as_key(&ads)).await),
        pb::CacheOutcome::Hit
    );
    assert_eq!(mock.stats().requests(), 2);

    // Invalidating one namespace leaves the other.
    let removed = admin
        .invalidate_cache(pb::InvalidateCacheRequest {
            namespace: "team:ads".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .removed;
    assert_eq!(removed, 1);
    assert_eq!(
        outcome(&chat(&gateway, as_key(&ads)).await),
        pb::CacheOutcome::Stored
    );
    assert_eq!(
        outcome(&chat(&gateway, as_key(&search)).await),
        pb::CacheOutcome::Hit
    );
}

#[tokio::test]
async fn invalidate_cache_by_policy_and_age() {
    let (_mock, gateway) = setup("[policies.other]\ntargets = [{ provider = \"openai\", model = \"gpt-4o-mini\" }]\ncache = { mode = \"exact\" }\n").await;
    let mut admin = admin_client(gateway.channel.clone());
    chat(&gateway, cold("a")).await;
    chat(&gateway, request("other", "a")).await;
    let invalidate =
        |policy: &str, older_than: Option<prost_types::Duration>| pb::InvalidateCacheRequest {
            policy: policy.into(),
            older_than,
            ..Default::default()
        };
    let mut admin2 = admin.clone();
    let removed = admin
        .invalidate_cache(invalidate(
            "",
            Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
        ))
        .await
        .unwrap()
        .into_inner()
        .removed;
    assert_eq!(removed, 0, "nothing is an hour old");
    let removed = admin2
        .invalidate_cache(invalidate("cached", None))
        .await
        .unwrap()
        .into_inner()
        .removed;
    assert_eq!(removed, 1);
    assert_eq!(
        outcome(&chat(&gateway, cold("a")).await),
        pb::CacheOutcome::Stored
    );
    assert_eq!(
        outcome(&chat(&gateway, request("other", "a")).await),
        pb::CacheOutcome::Hit
    );
    let status = admin
        .invalidate_cache(invalidate(
            "",
            Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["older_than"]);
}

#[tokio::test]
async fn the_ledger_records_a_hit_with_zero_cost_and_what_it_saved() {
    let (_mock, gateway) = setup("").await;
    let mut admin = admin_client(gateway.channel.clone());
    let first = chat(&gateway, cold("ledger")).await;
    chat(&gateway, cold("ledger")).await;
    let records = usage_records(&mut admin, 2).await;
    assert_eq!(records.len(), 2);
    let (stored, hit) = (&records[0], &records[1]);
    assert_eq!(stored.cache, "stored");
    assert_eq!(stored.cost_usd, Some(first.cost.unwrap().total_usd));
    assert_eq!(stored.cost_saved_usd, None);
    assert_eq!(hit.cache, "hit");
    assert_eq!(hit.cost_usd, Some(0.0));
    assert_eq!(hit.cost_saved_usd, stored.cost_usd);
    assert_eq!(
        (hit.input_tokens, hit.output_tokens, hit.attempts),
        (0, 0, 0)
    );
    assert_eq!(
        (hit.provider.as_str(), hit.model.as_str()),
        ("openai", "gpt-4o-mini")
    );
    assert_eq!(hit.policy, "cached");
    assert_eq!(hit.code, "OK");
}

const SEMANTIC: &str = r#"
[cache]
embedding_model = "openai/text-embedding-3-small"
semantic_threshold = 0.9
[policies.semantic]
targets = [{ provider = "openai", model = "gpt-4o-mini" }]
cache = { mode = "semantic" }
[policies.semantic_tools]
targets = [{ provider = "openai", model = "gpt-4o-mini" }]
cache = { mode = "semantic", allow_tools = true }
"#;

fn similarity(response: &pb::ChatResponse) -> f32 {
    response.route.as_ref().unwrap().cache_similarity
}

#[tokio::test]
async fn semantic_hits_for_the_same_words_and_misses_for_unrelated_prompts() {
    let (_mock, gateway) = setup(SEMANTIC).await;
    let first = chat(
        &gateway,
        request("semantic", "What is the capital of France?"),
    )
    .await;
    assert_eq!(outcome(&first), pb::CacheOutcome::Stored);
    // Different bytes (no exact hit), the same words for the deterministic embedding.
    let near = chat(
        &gateway,
        request("semantic", "what is the capital of FRANCE"),
    )
    .await;
    assert_eq!(outcome(&near), pb::CacheOutcome::Hit);
    assert!(similarity(&near) > 0.99, "{}", similarity(&near));
    assert_eq!(reply_text(&near), reply_text(&first));
    let far = chat(
        &gateway,
        request("semantic", "Tell me a long story about dragons"),
    )
    .await;
    assert_eq!(outcome(&far), pb::CacheOutcome::Stored);
    assert_eq!(similarity(&far), 0.0);

    // A request with tools is not served semantically unless the policy allows it.
    let with_tools = |model: &str, text: &str| {
        let mut r = request(model, text);
        r.tools = vec![weather_tool()];
        r
    };
    chat(&gateway, with_tools("semantic", "weather in Paris?")).await;
    let r = chat(&gateway, with_tools("semantic", "Weather in paris")).await;
    assert_eq!(outcome(&r), pb::CacheOutcome::Stored);
    chat(&gateway, with_tools("semantic_tools", "weather in Paris?")).await;
    let r = chat(&gateway, with_tools("semantic_tools", "Weather in paris")).await;
    assert_eq!(outcome(&r), pb::CacheOutcome::Hit);
}

#[tokio::test]
async fn semantic_hits_stay_within_the_tenant() {
    let (_mock, gateway) = setup(&format!("{SEMANTIC}\n[auth]\nrequire_keys = true\n")).await;
    let mut admin = admin_client(gateway.channel.clone());
    let a = create_key(&mut admin, "a-1", "a").await;
    let b = create_key(&mut admin, "b-1", "b").await;
    let as_key = |secret: &str, text: &str| {
        with_metadata(
            request("semantic", text),
            "authorization",
            &format!("Bearer {secret}"),
        )
    };
    chat(&gateway, as_key(&a, "the quarterly numbers, please")).await;
    let other = chat(&gateway, as_key(&b, "The quarterly numbers please")).await;
    assert_eq!(outcome(&other), pb::CacheOutcome::Stored);
    let same = chat(&gateway, as_key(&a, "The quarterly numbers please")).await;
    assert_eq!(outcome(&same), pb::CacheOutcome::Hit);
}

#[tokio::test]
async fn an_invalidated_prompt_is_never_served_and_the_next_live_one_is() {
    let (_mock, gateway) = setup(SEMANTIC).await;
    let mut admin = admin_client(gateway.channel.clone());
    let words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet";
    let first = chat(&gateway, request("semantic", words)).await;
    assert_eq!(outcome(&first), pb::CacheOutcome::Stored);
    let by_policy = pb::InvalidateCacheRequest {
        policy: "semantic".into(),
        ..Default::default()
    };
    assert_eq!(invalidate(&mut admin, by_policy).await, 1);
    // A longer prompt: the invalidated one (its nearest) is not served.
    let longer = chat(&gateway, request("semantic", &format!("{words} kilo"))).await;
    assert_eq!(outcome(&longer), pb::CacheOutcome::Stored);
    // The first prompt's words again: the invalidated prompt is the nearest, but dead; the
    // next live one is served.
    let query = chat(&gateway, request("semantic", &words.to_uppercase())).await;
    assert_eq!(outcome(&query), pb::CacheOutcome::Hit);
    assert_eq!(reply_text(&query), reply_text(&longer));
    let sim = similarity(&query);
    assert!(
        sim > 0.9 && sim < 0.999,
        "the longer prompt's similarity: {sim}"
    );
}

#[tokio::test]
async fn the_semantic_lookups_embedding_call_is_in_the_ledger() {
    let (mock, gateway) = setup(&format!("{SEMANTIC}\n[auth]\nrequire_keys = true\n")).await;
    let mut admin = admin_client(gateway.channel.clone());
    let secret = create_key(&mut admin, "search-1", "search").await;
    let mut req = request("semantic", "How tall is the Eiffel tower?");
    req.tags.insert("feature".into(), "faq".into());
    let mut req = with_metadata(req, "x-request-id", "req-embed-1");
    req.metadata_mut()
        .insert("authorization", format!("Bearer {secret}").parse().unwrap());
    let answer = chat(&gateway, req).await;
    assert_eq!(outcome(&answer), pb::CacheOutcome::Stored);
    assert_eq!(mock.stats().requests(), 2, "one embedding, one chat");
    let records = usage_records(&mut admin, 2).await;
    let embed = records
        .iter()
        .find(|r| r.rpc == "CacheEmbed")
        .unwrap_or_else(|| panic!("no CacheEmbed record in {records:?}"));
    let chat_record = records.iter().find(|r| r.rpc == "Chat").unwrap();
    assert_eq!(embed.request_id, "req-embed-1");
    assert_eq!(embed.request_id, chat_record.request_id);
    assert_eq!(embed.key, "search-1");
    assert_eq!(embed.tags.get("feature").map(String::as_str), Some("faq"));
    assert_eq!(embed.tags, chat_record.tags);
    assert_eq!(
        (embed.provider.as_str(), embed.model.as_str()),
        ("openai", "text-embedding-3-small")
    );
    assert!(embed.input_tokens > 0, "{embed:?}");
    assert_eq!(embed.output_tokens, 0);
    assert!(embed.cost_usd.is_some_and(|c| c > 0.0), "{embed:?}");
    assert_eq!(embed.code, "OK");
}

#[tokio::test]
async fn the_semantic_lookups_embedding_call_is_charged_to_the_keys_budget() {
    let (_mock, gateway) = setup(&format!("{SEMANTIC}\n[auth]\nrequire_keys = true\n")).await;
    let mut admin = admin_client(gateway.channel.clone());
    let secret = create_key_secret(
        &mut admin,
        pb::Key {
            name: "budgeted".into(),
            owner: "search".into(),
            scopes: vec!["chat".into()],
            daily_budget_usd: 1.0,
            ..Default::default()
        },
    )
    .await;
    let as_key = |text: &str| {
        with_metadata(
            request("semantic", text),
            "authorization",
            &format!("Bearer {secret}"),
        )
    };
    let stored = chat(&gateway, as_key("How tall is the Eiffel tower?")).await;
    assert_eq!(outcome(&stored), pb::CacheOutcome::Stored);
    // A hit costs nothing itself, but its embedding call does.
    let hit = chat(&gateway, as_key("HOW TALL is the Eiffel tower?")).await;
    assert_eq!(outcome(&hit), pb::CacheOutcome::Hit);
    let records = usage_records(&mut admin, 4).await;
    let embeds: Vec<f64> = records
        .iter()
        .filter(|r| r.rpc == "CacheEmbed")
        .filter_map(|r| r.cost_usd)
        .collect();
    assert_eq!(embeds.len(), 2, "{records:?}");
    assert!(embeds.iter().all(|c| *c > 0.0), "{embeds:?}");
    let ledger: f64 = records.iter().filter_map(|r| r.cost_usd).sum();
    let spent = spent_today_usd(&mut admin, "budgeted").await;
    assert!(
        (spent - ledger).abs() < 1e-12,
        "the budget was charged {spent}, the ledger's calls cost {ledger}: {records:?}"
    );
}
