//! External guardrails end to end: a profile's HTTP hook (the mock's `/guard/hook`) and
//! OpenAI moderation calls (the mock's `/v1/moderations`) on requests and replies, unary
//! and streamed; allow, block, rewrite, failures and timeouts failing open or closed, the
//! call's deadline, and the verdicts in the route and the ledger.

use std::time::Duration;

use llm_gateway::{
    mock_upstream::{MockSettings, MockUpstream},
    pb,
};
use pb::chat_stream_response::Event;
use tonic::Code;

use crate::common::*;

/// Profiles over the mock at `mock`: `hook_<mode>` with a hook in both phases (`allow`
/// decides by the texts), `reply_hook` on replies only, `moderated` and `thresholds` with
/// moderation, `hang_open`/`hang_closed` with a hook that never answers, `slow` with a long
/// timeout; a policy of each name.
fn config(mock: &MockUpstream) -> String {
    let hook = format!("http://{}/guard/hook", mock.addr());
    let mut extra = format!(
        r#"
[guardrails.hook_allow]
actions = {{ email = "redact" }}
hook = {{ url = "{hook}", timeout_ms = 5000, phases = ["request", "response"] }}

[guardrails.reply_hook]
hook = {{ url = "{hook}", timeout_ms = 5000, phases = ["response"] }}

[guardrails.hang_open]
hook = {{ url = "{hook}?mode=hang", timeout_ms = 100, on_error = "fail_open" }}

[guardrails.hang_closed]
hook = {{ url = "{hook}?mode=hang", timeout_ms = 100 }}

[guardrails.broken]
hook = {{ url = "{hook}?mode=status=500", timeout_ms = 5000 }}

[guardrails.slow]
hook = {{ url = "{hook}", timeout_ms = 30000, on_error = "fail_open" }}

[guardrails.slow_closed]
hook = {{ url = "{hook}", timeout_ms = 30000 }}

[guardrails.moderated]
moderation = {{ provider = "openai", timeout_ms = 5000, phases = ["request", "response"] }}

[guardrails.thresholds]
moderation = {{ provider = "openai", timeout_ms = 5000, thresholds = {{ harassment = 0.005 }} }}

[guardrails.moderation_hangs]
moderation = {{ provider = "openai", model = "omni-moderation-latest+hang", timeout_ms = 100, on_error = "fail_open" }}
"#
    );
    for name in [
        "hook_allow",
        "reply_hook",
        "hang_open",
        "hang_closed",
        "broken",
        "slow",
        "slow_closed",
        "moderated",
        "thresholds",
        "moderation_hangs",
    ] {
        extra.push_str(&format!(
            "[policies.{name}]\ntargets = [{{ provider = \"openai\", model = \"gpt-4o-mini\" }}]\nguardrails = \"{name}\"\n"
        ));
    }
    openai_toml(mock, &extra)
}

async fn pair() -> (MockUpstream, Gateway) {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&config(&mock)).await;
    (mock, gateway)
}

/// (check, phase, decision, detail) of each verdict of a route.
fn verdicts(route: Option<&pb::Route>) -> Vec<(i32, i32, i32, String)> {
    route
        .unwrap()
        .guardrails
        .iter()
        .map(|v| (v.check, v.phase, v.decision, v.detail.clone()))
        .collect()
}

const HOOK: i32 = pb::GuardrailCheck::Hook as i32;
const MODERATION: i32 = pb::GuardrailCheck::Moderation as i32;
const REQUEST: i32 = pb::GuardrailPhase::Request as i32;
const RESPONSE: i32 = pb::GuardrailPhase::Response as i32;

fn decision(d: pb::GuardrailDecision) -> i32 {
    d as i32
}

#[tokio::test]
async fn a_hook_allows_sees_only_redacted_text_and_leaves_its_verdicts() {
    let (mock, gateway) = pair().await;
    let mut admin = admin_client(gateway.channel.clone());
    let secret = admin
        .create_key(pb::CreateKeyRequest {
            key: Some(pb::Key {
                name: "hooked".into(),
                owner: "search".into(),
                scopes: vec!["chat".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .secret;
    let mut req = tonic::Request::new(request("hook_allow", "mail jo@example.com please"));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {secret}").parse().unwrap());
    let reply = gateway.client().chat(req).await.unwrap().into_inner();
    assert_eq!(reply_text(&reply), "Mock reply to: mail [EMAIL] please");
    let allow = decision(pb::GuardrailDecision::Allow);
    let got = verdicts(reply.route.as_ref());
    assert_eq!(
        got,
        [
            (HOOK, REQUEST, allow, String::new()),
            (HOOK, RESPONSE, allow, String::new())
        ]
    );
    assert!(reply.route.as_ref().unwrap().guardrails[0].profile == "hook_allow");
    // The last call the mock saw is the response hook: the contract's fields, the redacted
    // reply, and neither the original value nor any secret.
    let body = mock.stats().last_body().unwrap();
    assert_eq!(body["version"], 1);
    assert_eq!(body["phase"], "response");
    assert_eq!(body["profile"], "hook_allow");
    assert_eq!(body["policy"], "hook_allow");
    assert_eq!(body["key"], "hooked");
    assert_eq!(body["tenant"], "search");
    assert_eq!(body["texts"][0]["role"], "assistant");
    assert_eq!(
        body["texts"][0]["text"],
        "Mock reply to: mail [EMAIL] please"
    );
    let raw = body.to_string();
    assert!(
        !raw.contains("jo@example.com") && !raw.contains(&secret) && !raw.contains("sk-test"),
        "{raw}"
    );
    // Counted in the ledger by direction, check and decision.
    let records = usage_records(&mut admin, 1).await;
    assert_eq!(
        records[0].guardrails,
        "request:email:redact=1,request:hook:allow=1,reply:hook:allow=1"
    );
}

#[tokio::test]
async fn a_hook_blocks_with_its_reason_before_anything_leaves() {
    let (mock, gateway) = pair().await;
    let status = gateway
        .client()
        .chat(request("hook_allow", "do hook:block now"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "GUARDRAIL_BLOCKED");
    assert!(
        status.message().contains("hook (mock policy)"),
        "{status:?}"
    );
    assert!(!status.message().contains("do hook:block"), "{status:?}");
    // Only the hook was called, never the provider.
    assert_eq!(mock.stats().requests(), 1);
    assert_eq!(mock.stats().last_body().unwrap()["phase"], "request");
}

#[tokio::test]
async fn a_hook_rewrites_the_request() {
    let (mock, gateway) = pair().await;
    let reply = gateway
        .client()
        .chat(request("hook_allow", "please hook:rewrite this"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply_text(&reply), "Mock reply to: please [REWRITTEN] this");
    let got = verdicts(reply.route.as_ref());
    assert_eq!(got[0].2, decision(pb::GuardrailDecision::Rewrite));
    assert_eq!(got[1].2, decision(pb::GuardrailDecision::Allow));
    assert_eq!(mock.stats().requests(), 3);
}

#[tokio::test]
async fn a_hook_that_never_answers_fails_open_or_closed_as_configured() {
    let (_mock, gateway) = pair().await;
    let reply = gateway
        .client()
        .chat(request("hang_open", "hello"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply_text(&reply), "Mock reply to: hello");
    let got = verdicts(reply.route.as_ref());
    assert_eq!(
        got,
        [(
            HOOK,
            REQUEST,
            decision(pb::GuardrailDecision::FailedOpen),
            "timeout".to_owned()
        )]
    );
    assert!(reply.route.unwrap().guardrails[0].latency_us >= 100_000);
    let status = gateway
        .client()
        .chat(request("hang_closed", "hello"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "GUARDRAIL_UNAVAILABLE");
    assert!(status.message().contains("timeout"), "{status:?}");
    let status = gateway
        .client()
        .chat(request("broken", "hello"))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "GUARDRAIL_UNAVAILABLE");
    assert!(status.message().contains("status 500"), "{status:?}");
}

#[tokio::test]
async fn a_hook_without_time_left_in_the_call_does_not_start() {
    let (mock, gateway) = pair().await;
    // 30 s of hook timeout, a 2 s call: the hook cannot finish in time.
    let mut req = tonic::Request::new(request("slow", "hello"));
    req.set_timeout(Duration::from_secs(2));
    let reply = gateway.client().chat(req).await.unwrap().into_inner();
    let got = verdicts(reply.route.as_ref());
    assert_eq!(
        got,
        [(
            HOOK,
            REQUEST,
            decision(pb::GuardrailDecision::FailedOpen),
            "no time left".to_owned()
        )]
    );
    assert_eq!(mock.stats().requests(), 1, "only the provider was called");
    let mut req = tonic::Request::new(request("slow_closed", "hello"));
    req.set_timeout(Duration::from_secs(2));
    let status = gateway.client().chat(req).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(mock.stats().requests(), 1);
}

#[tokio::test]
async fn moderation_blocks_flagged_categories_and_thresholds() {
    let (mock, gateway) = pair().await;
    let reply = gateway
        .client()
        .chat(request("moderated", "a calm question"))
        .await
        .unwrap()
        .into_inner();
    let allow = decision(pb::GuardrailDecision::Allow);
    assert_eq!(
        verdicts(reply.route.as_ref()),
        [
            (MODERATION, REQUEST, allow, String::new()),
            (MODERATION, RESPONSE, allow, String::new())
        ]
    );
    // The moderation call uses the provider's key and OpenAI's request shape.
    let headers = mock.stats().last_headers().unwrap();
    assert_eq!(headers["authorization"], "Bearer sk-test-secret");
    let body = mock.stats().last_body().unwrap();
    assert_eq!(body["model"], "omni-moderation-latest");
    assert_eq!(body["input"][0], "Mock reply to: a calm question");

    let status = gateway
        .client()
        .chat(request("moderated", "something flag:violence here"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "GUARDRAIL_BLOCKED");
    assert!(
        status.message().contains("moderation:violence"),
        "{status:?}"
    );
    assert!(!status.message().contains("something"), "{status:?}");
    // A threshold below the mock's baseline score blocks that category.
    let status = gateway
        .client()
        .chat(request("thresholds", "a calm question"))
        .await
        .unwrap_err();
    assert!(
        status.message().contains("moderation:harassment"),
        "{status:?}"
    );
    // A moderation call that never answers, failing open.
    let reply = gateway
        .client()
        .chat(request("moderation_hangs", "hello"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        verdicts(reply.route.as_ref()),
        [(
            MODERATION,
            REQUEST,
            decision(pb::GuardrailDecision::FailedOpen),
            "timeout".to_owned()
        )]
    );
}

#[tokio::test]
async fn streamed_calls_carry_the_verdicts_and_a_reply_hook_can_end_the_stream() {
    let (_mock, gateway) = pair().await;
    let stream = gateway
        .client()
        .chat_stream(request("hook_allow", "hello there"))
        .await
        .unwrap()
        .into_inner();
    let (events, status) = collect_stream(stream).await;
    status.unwrap();
    assert_eq!(text_of(&events), "Mock reply to: hello there");
    let Some(Event::Finish(finish)) = events.last() else {
        panic!("{events:?}")
    };
    let allow = decision(pb::GuardrailDecision::Allow);
    assert_eq!(
        verdicts(finish.route.as_ref()),
        [
            (HOOK, REQUEST, allow, String::new()),
            (HOOK, RESPONSE, allow, String::new())
        ]
    );
    // The reply (the mock echoes the prompt) holds what the reply hook blocks: the stream
    // ends with the error instead of its finish.
    let stream = gateway
        .client()
        .chat_stream(request("reply_hook", "say hook:block"))
        .await
        .unwrap()
        .into_inner();
    let (events, status) = collect_stream(stream).await;
    let status = status.unwrap_err();
    assert_eq!(reason(&status), "GUARDRAIL_BLOCKED");
    assert!(status.message().contains("reply"), "{status:?}");
    assert!(!events.iter().any(|e| matches!(e, Event::Finish(_))));
    // A request hook that never answers, failing closed, fails the stream before it starts.
    let status = gateway
        .client()
        .chat_stream(request("hang_closed", "hello"))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "GUARDRAIL_UNAVAILABLE");
}

#[tokio::test]
async fn bad_hook_settings_name_their_field() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let toml = openai_toml(
        &mock,
        r#"
[http]
listen = "off"
[guardrails.p]
hook = { url = "not a url", on_error = "shrug" }
moderation = { provider = "nobody" }
"#,
    );
    let err = llm_gateway::config::Config::from_toml(
        &toml,
        std::path::Path::new("test.toml"),
        &llm_gateway::config::Overrides::default(),
        &|_| None,
    )
    .unwrap_err()
    .to_string();
    for field in [
        "guardrails.p.hook.url",
        "guardrails.p.hook.on_error",
        "guardrails.p.moderation.provider",
    ] {
        assert!(err.contains(field), "{field}: {err}");
    }
}
