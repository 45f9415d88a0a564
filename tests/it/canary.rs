//! Canary rollouts: a staged UpdatePolicy splits calls between the old and the new version,
//! rolls itself back when the sequential test finds the new version worse, and otherwise
//! steps through to 100 %.

use std::time::Duration;

use llm_gateway::{
    mock_upstream::{MockSettings, MockUpstream},
    pb,
};
use tonic::Code;

use crate::common::*;

/// Two providers: `good` (never fails) and `flaky` (its mock fails `error_rate` of calls).
async fn gateway(error_rate: f64) -> (MockUpstream, MockUpstream, Gateway) {
    let good = MockUpstream::start(MockSettings::default()).await.unwrap();
    let flaky = MockUpstream::start(MockSettings {
        error_rate,
        error_status: 500,
        ..MockSettings::default()
    })
    .await
    .unwrap();
    let gateway = Gateway::start(&format!(
        r#"
[upstream]
stream_idle_timeout = "5s"
[providers.good]
kind = "openai-compatible"
base_url = "{}"
[providers.flaky]
kind = "openai-compatible"
base_url = "{}"
"#,
        good.openai_base_url(),
        flaky.openai_base_url()
    ))
    .await;
    (good, flaky, gateway)
}

/// A policy with one target and no retries (a failed attempt is a failed call).
fn policy(provider: &str, model: &str) -> pb::Policy {
    pb::Policy {
        name: "chat".into(),
        targets: vec![pb::PolicyTarget {
            provider: provider.into(),
            model: model.into(),
            ..Default::default()
        }],
        execution: Some(pb::ExecutionSettings {
            max_attempts: Some(1),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Half of the calls to the new version for an hour, then all; a 5-point error margin.
fn half_then_all() -> pb::RolloutSpec {
    pb::RolloutSpec {
        steps: vec![50.0, 100.0],
        step_duration: Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
        error_rate_margin: 0.05,
        confidence: 0.95,
        ..Default::default()
    }
}

async fn create(admin: &mut Admin, p: pb::Policy) -> pb::Policy {
    admin
        .create_policy(pb::CreatePolicyRequest { policy: Some(p) })
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap()
}

/// Stages `next` over `current` with `rollout`.
async fn stage(
    admin: &mut Admin,
    current: &pb::Policy,
    mut next: pb::Policy,
    rollout: pb::RolloutSpec,
) -> Result<pb::Policy, tonic::Status> {
    next.etag.clone_from(&current.etag);
    next.rollout = Some(rollout);
    admin
        .update_policy(pb::UpdatePolicyRequest { policy: Some(next) })
        .await
        .map(|r| r.into_inner().policy.unwrap())
}

async fn rollout(admin: &mut Admin) -> pb::Rollout {
    admin
        .get_rollout(pb::GetRolloutRequest {
            policy: "chat".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .rollout
        .unwrap()
}

async fn get_policy(admin: &mut Admin) -> pb::Policy {
    admin
        .get_policy(pb::GetPolicyRequest {
            name: "chat".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap()
}

/// One call of the policy: the version and arm that served it, and whether it failed.
async fn call(gateway: &Gateway) -> (Option<pb::PolicyRevision>, Option<String>, bool) {
    match gateway.client().chat(request("chat", "hello")).await {
        Ok(r) => {
            let route = r.into_inner().route.unwrap();
            let provider = route.attempts.last().map(|a| a.provider.clone());
            (route.policy_revision, provider, false)
        }
        Err(status) => {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            (None, None, true)
        }
    }
}

/// Calls until the rollout leaves `state` (bounded); returns the calls made.
async fn calls_until_not(gateway: &Gateway, admin: &mut Admin, state: pb::RolloutState) -> usize {
    for n in 0..20_000 {
        let _ = call(gateway).await;
        if n % 5 == 0 && rollout(admin).await.state() != state {
            return n + 1;
        }
    }
    panic!("the rollout stayed {state:?}");
}

/// Polls until the stored policy has `etag` (the snapshot reloads in the background).
async fn wait_for_etag(admin: &mut Admin, etag: &str) -> pb::Policy {
    for _ in 0..500 {
        let p = get_policy(admin).await;
        if p.etag == etag {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the policy never reached {etag}");
}

#[tokio::test]
async fn a_canary_failing_a_fifth_of_its_calls_is_rolled_back() {
    let (_good, flaky, gateway) = gateway(0.2).await;
    let mut admin = admin_client(gateway.channel.clone());
    let v1 = create(&mut admin, policy("good", "gpt-4o-mini")).await;
    let v2 = stage(
        &mut admin,
        &v1,
        policy("flaky", "gpt-4o-mini"),
        half_then_all(),
    )
    .await
    .unwrap();
    assert_eq!(v2.etag, "v2");
    assert_eq!(v2.rollout_state(), pb::RolloutState::Running);

    // Both versions serve while it runs; each route says which.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        if let (Some(rev), _, _) = call(&gateway).await {
            seen.insert((rev.version, rev.arm()));
        }
    }
    assert!(seen.contains(&(1, pb::RolloutArm::Baseline)), "{seen:?}");

    let calls = calls_until_not(&gateway, &mut admin, pb::RolloutState::Running).await;
    let r = rollout(&mut admin).await;
    assert_eq!(r.state(), pb::RolloutState::RolledBack, "{r:?}");
    assert!(
        r.reason.starts_with("error rate: new version"),
        "{}",
        r.reason
    );
    assert!(r.reason.contains("vs old version 0.0%"), "{}", r.reason);
    assert_eq!(r.canary_percent, 0.0);
    assert_eq!((r.baseline_version, r.canary_version), (1, 2));
    let canary = r.canary.unwrap();
    assert!(
        canary.errors > 0 && canary.calls > canary.errors,
        "{canary:?}"
    );
    assert_eq!(r.baseline.unwrap().errors, 0);
    assert_eq!(r.history.len(), 1);
    assert_eq!(r.history[0].outcome, "rolled_back");
    assert!(r.end_time.is_some());
    assert!(calls < 2_000, "took {calls} calls");

    // The old version is the policy again (a new etag), and serves every later call.
    let v3 = wait_for_etag(&mut admin, "v3").await;
    assert_eq!(v3.targets[0].provider, "good");
    assert_eq!(v3.rollout_state(), pb::RolloutState::RolledBack);
    let flaky_before = flaky.stats().requests();
    for _ in 0..50 {
        let (rev, provider, failed) = call(&gateway).await;
        assert!(!failed);
        assert_eq!(provider.as_deref(), Some("good"));
        let rev = rev.unwrap();
        assert_eq!((rev.version, rev.arm()), (3, pb::RolloutArm::Unspecified));
    }
    assert_eq!(flaky.stats().requests(), flaky_before);

    // The audit log has the staged update and the rollback with its reason.
    let audit = audit_actions(&mut admin).await;
    assert!(
        audit
            .iter()
            .any(|e| e.action == "UpdatePolicy" && e.detail.contains("staged as a rollout")),
        "{audit:?}"
    );
    let rollback = audit
        .iter()
        .find(|e| e.action == "RolloutRollback")
        .unwrap_or_else(|| panic!("{audit:?}"));
    assert_eq!(rollback.actor, "rollout:chat");
    assert_eq!(
        (rollback.before_etag.as_str(), rollback.after_etag.as_str()),
        ("v2", "v3")
    );
    assert!(
        rollback.detail.contains("error rate: new version"),
        "{}",
        rollback.detail
    );

    // The ledger says which version served each call.
    let records = usage_records(&mut admin, calls + 70).await;
    let arm = |a: &str| records.iter().filter(|r| r.rollout_arm == a).count();
    assert!(arm("canary") > 0 && arm("baseline") > 0);
    assert!(
        records
            .iter()
            .filter(|r| r.rollout_arm == "canary")
            .all(|r| r.policy_version == 2 && r.provider == "flaky")
    );
    assert!(
        records
            .iter()
            .any(|r| r.policy_version == 3 && r.rollout_arm.is_empty())
    );
}

#[tokio::test]
async fn a_healthy_canary_steps_through_to_100_percent() {
    let (_good, _flaky, gateway) = gateway(0.0).await;
    let mut admin = admin_client(gateway.channel.clone());
    let v1 = create(&mut admin, policy("good", "gpt-4o-mini")).await;
    stage(
        &mut admin,
        &v1,
        policy("flaky", "gpt-4o"),
        pb::RolloutSpec {
            // The default steps: 1, 5, 25, 100.
            step_duration: Some(prost_types::Duration {
                seconds: 0,
                nanos: 20_000_000,
            }),
            min_calls_per_step: 3,
            confidence: 0.999,
            ..Default::default()
        },
    )
    .await
    .unwrap();

    let mut percents = vec![rollout(&mut admin).await.canary_percent];
    loop {
        let state = rollout(&mut admin).await;
        if state.state() != pb::RolloutState::Running {
            break;
        }
        calls_until_step_changes(&gateway, &mut admin, state.step).await;
        percents.push(rollout(&mut admin).await.canary_percent);
    }
    let r = rollout(&mut admin).await;
    assert_eq!(r.state(), pb::RolloutState::Completed, "{r:?}");
    assert_eq!(r.reason, "");
    assert_eq!(r.canary_percent, 100.0);
    let steps: Vec<(u32, f64, &str)> = r
        .history
        .iter()
        .map(|h| (h.step, h.percent, h.outcome.as_str()))
        .collect();
    assert_eq!(
        steps,
        vec![
            (0, 1.0, "advanced"),
            (1, 5.0, "advanced"),
            (2, 25.0, "advanced"),
            (3, 100.0, "completed"),
        ]
    );
    for pair in r.history.windows(2) {
        let end = pair[0].end_time.unwrap();
        let start = pair[1].start_time.unwrap();
        assert_eq!(end, start, "a step starts when the one before it ends");
    }
    assert!(
        r.history
            .iter()
            .all(|h| h.canary_calls >= 3 && h.canary_errors == 0)
    );
    assert!(percents.windows(2).all(|w| w[0] <= w[1]), "{percents:?}");

    let audit = audit_actions(&mut admin).await;
    let steps = audit.iter().filter(|e| e.action == "RolloutStep").count();
    let completed = audit
        .iter()
        .filter(|e| e.action == "RolloutComplete")
        .count();
    assert_eq!((steps, completed), (3, 1), "{audit:?}");

    // The new version is the policy and serves everything; the old one is gone.
    let p = get_policy(&mut admin).await;
    assert_eq!(
        (p.etag.as_str(), p.rollout_state()),
        ("v2", pb::RolloutState::Completed)
    );
    assert!(p.rollout.is_none());
    for _ in 0..200 {
        if call(&gateway).await.0.unwrap().arm() == pb::RolloutArm::Unspecified {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for _ in 0..20 {
        let (rev, provider, _) = call(&gateway).await;
        let rev = rev.unwrap();
        assert_eq!((rev.version, rev.arm()), (2, pb::RolloutArm::Unspecified));
        assert_eq!(provider.as_deref(), Some("flaky"));
    }
}

/// The audit log's entries about policy `chat`, newest first.
async fn audit_actions(admin: &mut Admin) -> Vec<pb::AuditEntry> {
    admin
        .list_audit_log(pb::ListAuditLogRequest {
            resource_kind: "policy".into(),
            resource: "chat".into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries
}

/// Calls until the rollout's step is no longer `step` (or it ended).
async fn calls_until_step_changes(gateway: &Gateway, admin: &mut Admin, step: u32) {
    for n in 0..20_000 {
        let _ = call(gateway).await;
        if n % 10 == 0 {
            let r = rollout(admin).await;
            if r.step != step || r.state() != pb::RolloutState::Running {
                return;
            }
        }
    }
    panic!("step {step} never ended");
}

#[tokio::test]
async fn rollouts_pause_resume_abort_and_refuse_what_they_must() {
    let (_good, _flaky, gateway) = gateway(0.0).await;
    let mut admin = admin_client(gateway.channel.clone());
    let missing = admin
        .get_rollout(pb::GetRolloutRequest {
            policy: "chat".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let v1 = create(&mut admin, policy("good", "gpt-4o-mini")).await;

    // A bad spec names its fields.
    let bad = stage(
        &mut admin,
        &v1,
        policy("flaky", "gpt-4o"),
        pb::RolloutSpec {
            steps: vec![5.0, 1.0],
            confidence: 2.0,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let fields = violated_fields(&bad);
    assert!(
        fields.contains(&"policy.rollout.steps".to_owned()),
        "{fields:?}"
    );
    assert!(
        fields.contains(&"policy.rollout.confidence".to_owned()),
        "{fields:?}"
    );

    let long = half_then_all();
    let v2 = stage(&mut admin, &v1, policy("flaky", "gpt-4o"), long.clone())
        .await
        .unwrap();
    assert_eq!(v2.rollout.as_ref().unwrap().steps, vec![50.0, 100.0]);

    // While it runs, plain updates, new rollouts and deletes are refused.
    let mut plain = policy("good", "gpt-4o");
    plain.etag.clone_from(&v2.etag);
    let refused = admin
        .update_policy(pb::UpdatePolicyRequest {
            policy: Some(plain),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("rollout in progress"),
        "{}",
        refused.message()
    );
    let refused = admin
        .delete_policy(pb::DeletePolicyRequest {
            name: "chat".into(),
            etag: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);

    // Pause, resume: the step starts again.
    let paused = admin
        .pause_rollout(pb::PauseRolloutRequest {
            policy: "chat".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .rollout
        .unwrap();
    assert_eq!(paused.state(), pb::RolloutState::Paused);
    assert_eq!(paused.canary_percent, 50.0);
    let again = admin
        .pause_rollout(pb::PauseRolloutRequest {
            policy: "chat".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    let resumed = admin
        .resume_rollout(pb::ResumeRolloutRequest {
            policy: "chat".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .rollout
        .unwrap();
    assert_eq!(resumed.state(), pb::RolloutState::Running);
    let outcomes: Vec<&str> = resumed.history.iter().map(|h| h.outcome.as_str()).collect();
    assert_eq!(outcomes, vec!["paused", ""]);

    // Abort: the old version is the policy again.
    let aborted = admin
        .abort_rollout(pb::AbortRolloutRequest {
            policy: "chat".into(),
            reason: "wrong model".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .rollout
        .unwrap();
    assert_eq!(aborted.state(), pb::RolloutState::Aborted);
    assert_eq!(aborted.reason, "aborted by an admin: wrong model");
    let actions: Vec<String> = audit_actions(&mut admin)
        .await
        .into_iter()
        .map(|e| e.action)
        .collect();
    for action in ["PauseRollout", "ResumeRollout", "AbortRollout"] {
        assert!(actions.iter().any(|a| a == action), "{actions:?}");
    }
    let v3 = get_policy(&mut admin).await;
    assert_eq!(v3.etag, "v3");
    assert_eq!(v3.targets[0].model, "gpt-4o-mini");
    let (rev, provider, _) = call(&gateway).await;
    assert_eq!(rev.unwrap().version, 3);
    assert_eq!(provider.as_deref(), Some("good"));

    // Once it ended, a new rollout may start.
    let v4 = stage(&mut admin, &v3, policy("flaky", "gpt-4o"), long)
        .await
        .unwrap();
    assert_eq!(v4.etag, "v4");
    assert_eq!(rollout(&mut admin).await.baseline_version, 3);
}

/// With a shared PostgreSQL store every replica follows the same rollout: one stages it,
/// the other splits its calls, finds the failing version and rolls back for both.
#[tokio::test]
async fn replicas_on_postgresql_follow_one_rollout() {
    let Some(url) = crate::pg_server::database().await else {
        return;
    };
    let good = MockUpstream::start(MockSettings::default()).await.unwrap();
    let flaky = MockUpstream::start(MockSettings {
        error_rate: 0.2,
        error_status: 500,
        ..MockSettings::default()
    })
    .await
    .unwrap();
    let toml = format!(
        r#"
[store]
url = "{url}"
[http]
listen = "off"
[upstream]
stream_idle_timeout = "5s"
[providers.good]
kind = "openai-compatible"
base_url = "{}"
[providers.flaky]
kind = "openai-compatible"
base_url = "{}"
"#,
        good.openai_base_url(),
        flaky.openai_base_url()
    );
    let (a, b) = tokio::join!(Gateway::start(&toml), Gateway::start(&toml));
    let mut admin_a = admin_client(a.channel.clone());
    let mut admin_b = admin_client(b.channel.clone());
    let v1 = create(&mut admin_a, policy("good", "gpt-4o-mini")).await;
    stage(
        &mut admin_a,
        &v1,
        policy("flaky", "gpt-4o-mini"),
        half_then_all(),
    )
    .await
    .unwrap();

    // Replica b learns of it through the change feed and splits its calls too.
    let mut split = false;
    for _ in 0..500 {
        if let (Some(rev), _, _) = call(&b).await
            && rev.arm() == pb::RolloutArm::Canary
        {
            split = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(split, "replica b never served the new version");
    assert_eq!(
        rollout(&mut admin_b).await.state(),
        pb::RolloutState::Running
    );

    // Only b serves calls: b's test rolls back, and a follows.
    calls_until_not(&b, &mut admin_b, pb::RolloutState::Running).await;
    let r = rollout(&mut admin_a).await;
    assert_eq!(r.state(), pb::RolloutState::RolledBack, "{r:?}");
    // Failing calls of the new version can also be slow ones on a loaded machine: either
    // test may be the one that decides.
    assert!(
        r.reason.starts_with("error rate:") || r.reason.starts_with("p95 latency:"),
        "{}",
        r.reason
    );
    let mut followed = false;
    for _ in 0..500 {
        if let (Some(rev), _, _) = call(&a).await
            && rev.version == 3
        {
            followed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(followed, "replica a never routed to the restored version");
    for _ in 0..30 {
        let (rev, provider, failed) = call(&a).await;
        assert!(!failed);
        assert_eq!(provider.as_deref(), Some("good"));
        assert_eq!(rev.unwrap().version, 3);
    }
}
