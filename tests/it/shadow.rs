//! Shadow traffic: a policy mirrors sampled calls to candidate targets on a bounded pool;
//! callers never see a shadow, and each shadow's result is in the ledger beside its primary.

use llm_gateway::{
    mock_upstream::{MockSettings, MockUpstream},
    pb,
};

use crate::common::{
    Gateway, admin_client, collect_stream, openai_toml, reply_text, request, usage_records,
};

fn started_stream(events: &[pb::chat_stream_response::Event]) -> String {
    events
        .iter()
        .find_map(|e| match e {
            pb::chat_stream_response::Event::Start(s) => Some(s.id.clone()),
            _ => None,
        })
        .expect("a start event")
}

fn finish_route(events: &[pb::chat_stream_response::Event]) -> pb::Route {
    events
        .iter()
        .find_map(|e| match e {
            pb::chat_stream_response::Event::Finish(f) => f.route.clone(),
            _ => None,
        })
        .expect("a finish event with a route")
}

/// The shadow records of `primary`, by shadow model.
fn shadows_of<'a>(records: &'a [pb::UsageRecord], primary: &str) -> Vec<&'a pb::UsageRecord> {
    let mut out: Vec<_> = records
        .iter()
        .filter(|r| r.rpc == "Shadow" && r.shadow_of == primary)
        .collect();
    out.sort_by(|a, b| a.model.cmp(&b.model));
    out
}

/// The current value of a counter in the process-wide metrics recorder.
fn counter(name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = llm_gateway::telemetry::metrics_handle()
        .expect("the metrics recorder")
        .render();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn hanging_failing_and_slow_shadows_change_nothing_for_callers() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&openai_toml(
        &mock,
        r#"
[policies.sh-main]
targets = [{ provider = "openai", model = "gpt-4o-mini" }]
[policies.sh-main.shadow]
sample = 1.0
timeout = "300ms"
max_concurrency = 16
targets = [
  { provider = "openai", model = "cand+hang" },
  { provider = "openai", model = "cand+status=500" },
  { provider = "openai", model = "cand+latency=100" },
]
"#,
    ))
    .await;
    let mut client = gateway.client();
    let mut primaries = Vec::new();
    for i in 0..4 {
        let answer = client
            .chat(request("sh-main", &format!("question {i}")))
            .await
            .expect("the caller's call succeeds")
            .into_inner();
        let route = answer.route.as_ref().unwrap();
        // The route shows the primary only.
        assert_eq!(route.attempts.len(), 1, "{route:?}");
        assert_eq!(route.attempts[0].model, "gpt-4o-mini");
        assert_eq!(reply_text(&answer), format!("Mock reply to: question {i}"));
        primaries.push(answer.id);
    }
    let stream = client
        .chat_stream(request("sh-main", "streamed question"))
        .await
        .unwrap()
        .into_inner();
    let (events, end) = collect_stream(stream).await;
    end.expect("the caller's stream succeeds");
    assert_eq!(finish_route(&events).attempts.len(), 1);
    primaries.push(started_stream(&events));

    // 5 primaries and 3 shadows each (the hanging one ends at its own deadline).
    let mut admin = admin_client(gateway.channel.clone());
    let records = usage_records(&mut admin, 5 * 4).await;
    let real: Vec<_> = records.iter().filter(|r| r.rpc != "Shadow").collect();
    assert_eq!(real.len(), 5);
    assert!(real.iter().all(|r| r.code == "OK"), "{real:?}");
    for primary in &primaries {
        let shadows = shadows_of(&records, primary);
        let models: Vec<&str> = shadows.iter().map(|r| r.model.as_str()).collect();
        assert_eq!(
            models,
            ["cand+hang", "cand+latency=100", "cand+status=500"],
            "shadows of {primary}"
        );
        let [hang, slow, failed] = shadows[..] else {
            unreachable!()
        };
        // Its deadline, or (once its circuit opened) refused at once: a failure either way.
        assert!(
            ["DEADLINE_EXCEEDED", "UNAVAILABLE"].contains(&hang.code.as_str()),
            "{hang:?}"
        );
        assert_eq!(failed.code, "UNAVAILABLE", "{failed:?}");
        assert!(failed.shadow.is_none() && hang.shadow.is_none());
        assert_eq!(slow.code, "OK");
        assert!(slow.key.is_empty(), "shadows are not billed to a key");
        let comparison = slow.shadow.as_ref().expect("a comparison");
        assert!(comparison.exact_match, "same mock reply: {comparison:?}");
        assert_eq!(comparison.length_ratio, Some(1.0));
        assert_eq!(comparison.json_agree, None);
        assert_eq!(comparison.finish_reason, "stop");
    }

    // GetUsage counts the real calls only, unless asked for the shadows.
    let total = admin
        .get_usage(pb::GetUsageRequest::default())
        .await
        .unwrap()
        .into_inner()
        .total
        .unwrap();
    assert_eq!(total.calls, 5);
    let shadows = admin
        .get_usage(pb::GetUsageRequest {
            filter: [("rpc".to_owned(), "Shadow".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .total
        .unwrap();
    assert_eq!(shadows.calls, 15);
}

#[tokio::test]
async fn a_full_pool_drops_and_counts_and_callers_do_not_notice() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&openai_toml(
        &mock,
        r#"
[policies.sh-full]
targets = [{ provider = "openai", model = "gpt-4o-mini" }]
[policies.sh-full.shadow]
sample = 1.0
max_concurrency = 1
max_queue = 0
rate_per_second = 1000
timeout = "60s"
targets = [{ provider = "openai", model = "cand+hang" }]
"#,
    ))
    .await;
    let dropped = || {
        counter(
            "llm_gateway_shadow_dropped_total",
            &[("policy", "sh-full"), ("reason", "full")],
        )
    };
    let before = dropped();
    let mut client = gateway.client();
    for i in 0..5 {
        client
            .chat(request("sh-full", &format!("q{i}")))
            .await
            .expect("the caller's call succeeds");
    }
    // The first shadow hangs in the only slot; the four after it found the pool full.
    assert_eq!(dropped() - before, 4.0);
    // The hanging shadow is still running: only the 5 real calls are in the ledger.
    let mut admin = admin_client(gateway.channel.clone());
    let records = usage_records(&mut admin, 5).await;
    assert_eq!(records.len(), 5);
    assert!(records.iter().all(|r| r.rpc == "Chat"));
}

#[tokio::test]
async fn comparisons_with_scripted_replies() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&openai_toml(
        &mock,
        r#"
[policies.sh-json]
targets = [{ provider = "openai", model = 'm+reply={"a":1,"b":[2]}' }]
[policies.sh-json.shadow]
sample = 1.0
targets = [
  { provider = "openai", model = 'same+reply={"b":[2],"a":1}' },
  { provider = "openai", model = 'other+reply={"a":2}' },
  { provider = "openai", model = 'text+reply=not-json-but-longer-than-the-primary' },
]
"#,
    ))
    .await;
    let mut req = request("sh-json", "give me json");
    req.response_format = Some(pb::ResponseFormat {
        r#type: pb::ResponseFormatType::JsonObject as i32,
        ..Default::default()
    });
    let answer = gateway.client().chat(req).await.unwrap().into_inner();
    assert_eq!(reply_text(&answer), r#"{"a":1,"b":[2]}"#);
    let mut admin = admin_client(gateway.channel.clone());
    let records = usage_records(&mut admin, 4).await;
    let shadows = shadows_of(&records, &answer.id);
    assert_eq!(shadows.len(), 3, "{records:?}");
    let by_model = |prefix: &str| {
        shadows
            .iter()
            .find(|r| r.model.starts_with(prefix))
            .and_then(|r| r.shadow.clone())
            .unwrap()
    };
    let same = by_model("same");
    assert_eq!(same.json_agree, Some(true));
    assert!(!same.exact_match);
    assert_eq!(same.length_ratio, Some(1.0));
    let other = by_model("other");
    assert_eq!(other.json_agree, Some(false));
    assert_eq!(other.length_ratio, Some(7.0 / 15.0));
    let text = by_model("text");
    assert_eq!(text.json_agree, Some(false));
    assert!(text.length_ratio.unwrap() > 1.0);
}
