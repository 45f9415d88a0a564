//! Experiments: sticky arm assignment (the route and the ledger show the arm) and
//! GetExperiment reports per arm with intervals against the control.

use std::collections::BTreeMap;

use llm_gateway::{
    mock_upstream::{MockSettings, MockUpstream},
    pb,
};

use crate::common::{Gateway, admin_client, openai_toml, request, usage_records};

const AB: &str = r#"
[policies.ex-ab]
targets = [{ provider = "openai", model = "gpt-4o-mini" }]
[policies.ex-ab.experiment]
name = "ab"
sticky_by = "user"
arms = [
  { name = "control", weight = 1 },
  { name = "treatment", weight = 1, targets = [{ provider = "openai", model = "gpt-4o" }], tags = { prompt_version = "v2" } },
]
"#;

fn as_user(model: &str, user: &str) -> pb::ChatRequest {
    let mut req = request(model, "hello");
    req.user = user.to_owned();
    req
}

#[tokio::test]
async fn assignment_is_sticky_across_calls_and_servers_and_balanced() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let one = Gateway::start(&openai_toml(&mock, AB)).await;
    let two = Gateway::start(&openai_toml(&mock, AB)).await;
    let clients = [one.client(), one.client(), two.client()];
    let users = 40;
    let mut arms: BTreeMap<String, u32> = BTreeMap::new();
    for i in 0..users {
        let user = format!("user-{i}");
        let mut seen = Vec::new();
        for client in &clients {
            let answer = client
                .clone()
                .chat(as_user("ex-ab", &user))
                .await
                .unwrap()
                .into_inner();
            let route = answer.route.unwrap();
            assert_eq!(route.experiment, "ab");
            // The arm's targets: the treatment answers with its own model.
            let expected = if route.arm == "treatment" {
                "gpt-4o"
            } else {
                "gpt-4o-mini"
            };
            assert_eq!(route.attempts[0].model, expected);
            seen.push(route.arm);
        }
        assert!(seen.iter().all(|a| *a == seen[0]), "{user}: {seen:?}");
        *arms.entry(seen[0].clone()).or_default() += 1;
    }
    // Balanced within 3 sigma: 20 ± 3 * sqrt(40 * 0.25).
    let sigma3 = 3.0 * (f64::from(users) * 0.25).sqrt();
    for arm in ["control", "treatment"] {
        let n = f64::from(arms.get(arm).copied().unwrap_or(0));
        assert!((n - 20.0).abs() <= sigma3, "{arms:?}");
    }
    // The ledger has the arm, and the arm's tags.
    let mut admin = admin_client(one.channel.clone());
    let records = usage_records(&mut admin, 80).await;
    assert_eq!(records.len(), 80);
    for r in &records {
        assert_eq!(r.experiment, "ab");
        assert!(r.arm == "control" || r.arm == "treatment", "{r:?}");
        assert_eq!(
            r.tags.get("prompt_version").map(String::as_str),
            (r.arm == "treatment").then_some("v2")
        );
    }
}

#[tokio::test]
async fn get_experiment_reports_counts_error_rates_and_intervals() {
    report_scenario("").await;
}

#[tokio::test]
async fn get_experiment_reports_from_postgresql() {
    let Some(url) = crate::pg_server::database().await else {
        return;
    };
    report_scenario(&format!("[store]\nurl = \"{url}\"\n")).await;
}

/// A scripted run where arm B's provider fails about half of its calls, then its report;
/// `store` is the `[store]` section (empty: in memory).
async fn report_scenario(store: &str) {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    // Arm B's provider fails about half of its calls.
    let flaky = MockUpstream::start(MockSettings {
        error_rate: 0.5,
        error_status: 500,
        ..MockSettings::default()
    })
    .await
    .unwrap();
    let gateway = Gateway::start(&openai_toml(
        &mock,
        &format!(
            r#"
[providers.flaky]
kind = "openai-compatible"
base_url = "{}"
[policies.ex-report]
targets = [{{ provider = "openai", model = "gpt-4o-mini" }}]
execution = {{ max_attempts = 1 }}
[policies.ex-report.experiment]
name = "report"
sticky_by = "user"
arms = [
  {{ name = "a", weight = 1 }},
  {{ name = "b", weight = 1, targets = [{{ provider = "flaky", model = "gpt-4o-mini" }}] }},
]
[policies.ex-report.shadow]
sample = 1.0
rate_per_second = 10000
max_queue = 4096
targets = [{{ provider = "openai", model = "gpt-4o-mini" }}]
{store}
"#,
            flaky.openai_base_url()
        ),
    ))
    .await;
    let mut client = gateway.client();
    #[derive(Default, Debug)]
    struct Seen {
        calls: u64,
        errors: u64,
        input: u64,
        output: u64,
    }
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    let calls = 120;
    for i in 0..calls {
        let user = format!("user-{i}");
        match client.chat(as_user("ex-report", &user)).await {
            Ok(answer) => {
                let answer = answer.into_inner();
                let arm = answer.route.unwrap().arm;
                let s = seen.entry(arm).or_default();
                s.calls += 1;
                let usage = answer.usage.unwrap();
                s.input += usage.input_tokens;
                s.output += usage.output_tokens;
            }
            Err(status) => {
                // Only arm B's provider fails.
                let s = seen.entry("b".to_owned()).or_default();
                s.calls += 1;
                s.errors += 1;
                assert_ne!(status.code(), tonic::Code::Ok);
            }
        }
    }
    // Every call is in the ledger, and a shadow of each call that reached an upstream (a
    // call refused at once by arm B's open circuit has none).
    let ok: u64 = seen.values().map(|s| s.calls - s.errors).sum();
    let mut admin = admin_client(gateway.channel.clone());
    let mut records = Vec::new();
    // Wait for every primary and for the compared shadow of every successful primary
    // (shadows of failed primaries are recorded too, but not compared, so counting all
    // shadows can stop the wait before the compared ones are in).
    for _ in 0..500 {
        records = usage_records(&mut admin, 0).await;
        let primaries = records.iter().filter(|r| r.rpc != "Shadow").count();
        let compared = records
            .iter()
            .filter(|r| r.rpc == "Shadow" && r.shadow.is_some())
            .count();
        if primaries == calls && compared >= ok as usize {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let compared = records
        .iter()
        .filter(|r| r.rpc == "Shadow" && r.shadow.is_some())
        .count();
    assert!(
        compared >= ok as usize,
        "{compared} compared shadows of {ok} successful primaries"
    );
    assert!(records.iter().all(|r| r.experiment == "report"));
    assert_eq!(records.iter().filter(|r| r.rpc != "Shadow").count(), calls);

    let report = admin
        .get_experiment(pb::GetExperimentRequest {
            name: "report".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.control, "a");
    let names: Vec<&str> = report.arms.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    for arm in &report.arms {
        let s = &seen[&arm.name];
        assert_eq!(arm.calls, s.calls, "{}", arm.name);
        assert_eq!(arm.errors, s.errors, "{}", arm.name);
        assert_eq!(arm.input_tokens, s.input, "{}", arm.name);
        assert_eq!(arm.output_tokens, s.output, "{}", arm.name);
        assert!((arm.error_rate - s.errors as f64 / s.calls as f64).abs() < 1e-12);
        assert!(arm.latency_p50_ms.is_some() && arm.latency_p95_ms.is_some());
        // Unary calls have no time to first token.
        assert_eq!(arm.ttft_p50_ms, None);
        // Each call that reached an upstream was mirrored; the compared shadows (those of
        // successful primaries) all match.
        assert!(arm.shadow_calls >= s.calls - s.errors, "{}", arm.name);
        assert!(arm.shadow_calls <= s.calls, "{}", arm.name);
        // An arm with no successful primary (arm B's circuit may open early and stay
        // open) has no compared shadow, so no match rate.
        let expected = (s.calls > s.errors).then_some(1.0);
        assert_eq!(arm.shadow_exact_match_rate, expected, "{}: {s:?}", arm.name);
    }
    let (a, b) = (&report.arms[0], &report.arms[1]);
    assert!(a.diffs.is_empty(), "the control has no differences");
    assert_eq!(a.errors, 0);
    assert!(b.errors > 0, "{b:?}");
    let error_rate = b
        .diffs
        .iter()
        .find(|d| d.metric == "error_rate")
        .expect("an error rate difference");
    assert_eq!(error_rate.method, "newcombe");
    assert!((error_rate.difference - b.error_rate).abs() < 1e-12);
    // About 50 points worse with ~60 calls per arm: the interval is well above 0.
    assert!(
        error_rate.significant && error_rate.lower > 0.0,
        "{error_rate:?}"
    );
    let latency = b
        .diffs
        .iter()
        .find(|d| d.metric == "latency_p50_ms")
        .expect("a latency difference");
    assert!(latency.lower <= latency.difference && latency.difference <= latency.upper);

    // Unknown experiments are NOT_FOUND; a bad range is INVALID_ARGUMENT.
    let missing = admin
        .get_experiment(pb::GetExperimentRequest {
            name: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let empty = admin
        .get_experiment(pb::GetExperimentRequest::default())
        .await
        .unwrap_err();
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn bad_experiment_and_shadow_blocks_are_invalid_argument() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&openai_toml(&mock, "")).await;
    let mut admin = admin_client(gateway.channel.clone());
    let status = admin
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(pb::Policy {
                name: "ex-bad".into(),
                targets: vec![pb::PolicyTarget {
                    provider: "openai".into(),
                    model: "gpt-4o-mini".into(),
                    ..Default::default()
                }],
                shadow: Some(pb::PolicyShadow {
                    targets: vec![pb::ShadowTarget {
                        provider: "missing".into(),
                        model: "m".into(),
                    }],
                    sample: 2.0,
                    ..Default::default()
                }),
                experiment: Some(pb::PolicyExperiment {
                    name: "x".into(),
                    arms: vec![pb::ExperimentArm {
                        name: "only".into(),
                        weight: 1,
                        ..Default::default()
                    }],
                    sticky_by: "device".into(),
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let fields = crate::common::violated_fields(&status);
    for field in [
        "policy.shadow.targets[0].provider",
        "policy.shadow.sample",
        "policy.experiment.arms",
        "policy.experiment.sticky_by",
    ] {
        assert!(fields.iter().any(|f| f == field), "{field} in {fields:?}");
    }
}
