//! The admin API: policy CRUD with etags, validation, routing through policies,
//! ExplainRoute, durability across restarts (including kill -9), and admin auth.

use std::{collections::HashMap, time::Duration};

use llm_gateway::{
    mock_upstream::{MockSettings, MockUpstream},
    pb::{self, chat_stream_response::Event, llm_gateway_admin_client::LlmGatewayAdminClient},
};
use tonic::{Code, Request, transport::Channel};

use crate::common::*;

fn admin(gateway: &Gateway) -> Admin {
    admin_client(gateway.channel.clone())
}

/// Two providers `a` and `b` in front of one mock, and a gateway.
async fn two_providers(extra: &str) -> (MockUpstream, Gateway) {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let url = mock.openai_base_url();
    let gateway = Gateway::start(&format!(
        r#"
[upstream]
stream_idle_timeout = "5s"
[providers.a]
kind = "openai-compatible"
base_url = "{url}"
[providers.b]
kind = "openai-compatible"
base_url = "{url}"
{extra}
"#
    ))
    .await;
    (mock, gateway)
}

fn target(provider: &str, model: &str) -> pb::PolicyTarget {
    pb::PolicyTarget {
        provider: provider.into(),
        model: model.into(),
        ..Default::default()
    }
}

fn policy(name: &str, targets: Vec<pb::PolicyTarget>) -> pb::Policy {
    pb::Policy {
        name: name.into(),
        targets,
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

#[tokio::test]
async fn admin_calls_need_the_token() {
    let (_mock, gateway) = two_providers("").await;
    let mut anonymous = LlmGatewayAdminClient::new(gateway.channel.clone());
    let status = anonymous
        .list_policies(pb::ListPoliciesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut req = Request::new(pb::ListPoliciesRequest::default());
    req.metadata_mut().insert(
        "authorization",
        "Bearer wrong-token-wrong-token".parse().unwrap(),
    );
    let status = anonymous.list_policies(req).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    admin(&gateway)
        .list_policies(pb::ListPoliciesRequest::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn crud_and_routing_through_a_policy() {
    let (_mock, gateway) = two_providers("").await;
    let mut admin = admin(&gateway);
    let created = create(&mut admin, policy("chat", vec![target("a", "gpt-4o-mini")])).await;
    assert_eq!(created.etag, "v1");
    assert_eq!(created.source, pb::PolicySource::Api as i32);

    let answer = gateway
        .client()
        .chat(request("chat", "hi"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.provider, "a");
    assert_eq!(answer.route.as_ref().unwrap().policy, "chat");

    let status = admin
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(policy("chat", vec![target("b", "x")])),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);

    let mut changed = created.clone();
    changed.targets = vec![target("b", "gpt-4o-mini")];
    let updated = admin
        .update_policy(pb::UpdatePolicyRequest {
            policy: Some(changed),
        })
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    assert_eq!(updated.etag, "v2");
    let answer = gateway
        .client()
        .chat(request("chat", "hi"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.provider, "b", "the change applies to the next call");

    let got = admin
        .get_policy(pb::GetPolicyRequest {
            name: "chat".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    assert_eq!(got.targets[0].provider, "b");

    let models = gateway
        .client()
        .list_models(pb::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        models
            .models
            .iter()
            .any(|m| m.id == "chat" && m.kind == pb::ModelKind::Policy as i32)
    );

    let status = admin
        .delete_policy(pb::DeletePolicyRequest {
            name: "chat".into(),
            etag: "v1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    admin
        .delete_policy(pb::DeletePolicyRequest {
            name: "chat".into(),
            etag: "v2".into(),
        })
        .await
        .unwrap();
    let status = gateway
        .client()
        .chat(request("chat", "hi"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = admin
        .get_policy(pb::GetPolicyRequest {
            name: "chat".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn concurrent_updaters_do_not_lose_updates() {
    let (_mock, gateway) = two_providers("").await;
    let mut admin = admin(&gateway);
    let base = create(&mut admin, policy("race", vec![target("a", "m")])).await;
    let mut tasks = Vec::new();
    for (i, provider) in ["a", "b", "a", "b"].into_iter().enumerate() {
        let mut client = admin.clone();
        let mut p = base.clone();
        p.description = format!("writer {i}");
        p.targets = vec![target(provider, "m")];
        tasks.push(tokio::spawn(async move {
            client
                .update_policy(pb::UpdatePolicyRequest { policy: Some(p) })
                .await
        }));
    }
    let mut ok = 0;
    let mut aborted = 0;
    let mut winner = String::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(r) => {
                ok += 1;
                winner = r.into_inner().policy.unwrap().description;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Aborted, "{status:?}");
                aborted += 1;
            }
        }
    }
    assert_eq!((ok, aborted), (1, 3));
    let stored = admin
        .get_policy(pb::GetPolicyRequest {
            name: "race".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    assert_eq!(stored.description, winner);
    assert_eq!(stored.etag, "v2");
}

#[tokio::test]
async fn invalid_policies_name_every_field() {
    let (_mock, gateway) = two_providers("").await;
    let mut admin = admin(&gateway);
    let mut bad = policy(
        "Bad Name",
        vec![target("nope", "m"), target("a", "m"), target("a", "m")],
    );
    bad.strategy = 99;
    bad.constraints = Some(pb::Constraints {
        allowed_regions: vec!["mars".into()],
        ..Default::default()
    });
    let status = admin
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(bad.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let fields = violated_fields(&status);
    for expected in [
        "policy.strategy",
        "policy.name",
        "policy.targets[0].provider",
        "policy.targets[2]",
        "policy.constraints.allowed_regions",
    ] {
        assert!(
            fields.iter().any(|f| f == expected),
            "{expected} missing from {fields:?}"
        );
    }

    // ValidatePolicy reports the same without storing anything.
    let report = admin
        .validate_policy(pb::ValidatePolicyRequest { policy: Some(bad) })
        .await
        .unwrap()
        .into_inner();
    assert!(!report.valid);
    assert_eq!(report.violations.len(), fields.len());

    let mut weights = policy("w", vec![target("a", "m"), target("b", "m")]);
    weights.strategy = pb::Strategy::Weighted as i32;
    let status = admin
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(weights),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), vec!["policy.targets"]);

    let status = admin
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(policy("empty", vec![])),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), vec!["policy.targets"]);

    let mut huge = policy("huge", vec![target("a", "m")]);
    huge.description = "x".repeat(70_000);
    let status = admin
        .create_policy(pb::CreatePolicyRequest { policy: Some(huge) })
        .await
        .unwrap_err();
    let fields = violated_fields(&status);
    assert!(fields.contains(&"policy".to_owned()), "{fields:?}");

    let listed = admin
        .list_policies(pb::ListPoliciesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.policies.is_empty(), "nothing invalid was stored");
}

#[tokio::test]
async fn constraints_fail_closed_on_calls() {
    let (_mock, gateway) = two_providers("").await;
    let mut admin = admin(&gateway);
    let mut p = policy(
        "eu-only",
        vec![
            pb::PolicyTarget {
                region: "us".into(),
                ..target("a", "m")
            },
            pb::PolicyTarget {
                region: "eu".into(),
                ..target("b", "m")
            },
        ],
    );
    p.constraints = Some(pb::Constraints {
        allowed_regions: vec!["eu".into()],
        ..Default::default()
    });
    create(&mut admin, p).await;
    let answer = gateway
        .client()
        .chat(request("eu-only", "hi"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.provider, "b");

    // A variant for `tier=free` callers only has a US target: fail closed, never elsewhere.
    let mut p = policy(
        "tiered",
        vec![pb::PolicyTarget {
            region: "eu".into(),
            ..target("b", "m")
        }],
    );
    p.variants = vec![pb::PolicyVariant {
        match_tags: HashMap::from([("tier".to_owned(), "free".to_owned())]),
        targets: vec![pb::PolicyTarget {
            region: "us".into(),
            ..target("a", "m")
        }],
    }];
    p.constraints = Some(pb::Constraints {
        allowed_regions: vec!["eu".into()],
        ..Default::default()
    });
    create(&mut admin, p).await;
    let mut req = request("tiered", "hi");
    req.tags.insert("tier".into(), "free".into());
    let status = gateway.client().chat(req).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("allowed_regions"),
        "{}",
        status.message()
    );
    assert_eq!(reason(&status), "CONSTRAINT_UNSATISFIED");
}

#[tokio::test]
async fn weighted_split_and_sticky_users() {
    let (_mock, gateway) = two_providers("").await;
    let mut admin = admin(&gateway);
    let mut p = policy(
        "ab",
        vec![
            pb::PolicyTarget {
                weight: 80,
                ..target("a", "m")
            },
            pb::PolicyTarget {
                weight: 20,
                ..target("b", "m")
            },
        ],
    );
    p.strategy = pb::Strategy::Weighted as i32;
    create(&mut admin, p.clone()).await;
    let n = 300;
    let mut a = 0;
    for _ in 0..n {
        if gateway
            .client()
            .chat(request("ab", "hi"))
            .await
            .unwrap()
            .into_inner()
            .provider
            == "a"
        {
            a += 1;
        }
    }
    // 80% of 300 = 240, sd ~ 6.9: allow 5 sd.
    assert!((205..=275).contains(&a), "a got {a} of {n}");

    p.name = "sticky".into();
    p.sticky_key = "user".into();
    p.targets[0].weight = 50;
    p.targets[1].weight = 50;
    create(&mut admin, p).await;
    let mut arms = std::collections::HashSet::new();
    for user in ["u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8"] {
        let mut first = None;
        for _ in 0..5 {
            let mut req = request("sticky", "hi");
            req.user = user.into();
            let provider = gateway
                .client()
                .chat(req)
                .await
                .unwrap()
                .into_inner()
                .provider;
            assert_eq!(
                *first.get_or_insert(provider.clone()),
                provider,
                "user {user} moved"
            );
        }
        arms.insert(first.unwrap());
    }
    assert_eq!(arms.len(), 2, "8 users all landed on one arm");
}

#[tokio::test]
async fn explain_route_says_why() {
    let (_mock, gateway) = two_providers("").await;
    let mut admin = admin(&gateway);
    let mut p = policy(
        "cheap",
        vec![
            pb::PolicyTarget {
                region: "eu".into(),
                ..target("a", "gpt-4o")
            },
            pb::PolicyTarget {
                region: "eu".into(),
                ..target("b", "gpt-4o-mini")
            },
            pb::PolicyTarget {
                region: "us".into(),
                ..target("b", "gpt-4.1-nano")
            },
        ],
    );
    p.preset = "cheapest".into();
    p.constraints = Some(pb::Constraints {
        allowed_regions: vec!["eu".into()],
        ..Default::default()
    });
    let created = create(&mut admin, p).await;
    assert_eq!(
        created.strategy,
        pb::Strategy::LowestCost as i32,
        "the preset set the strategy"
    );
    let explained = admin
        .explain_route(pb::ExplainRouteRequest {
            request: Some(request("cheap", "hello")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(explained.policy, "cheap");
    let summary: Vec<(String, bool, u32)> = explained
        .candidates
        .iter()
        .map(|c| (format!("{}/{}", c.provider, c.model), c.chosen, c.rank))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("b/gpt-4o-mini".to_owned(), true, 1),
            ("a/gpt-4o".to_owned(), true, 2),
            ("b/gpt-4.1-nano".to_owned(), false, 0),
        ]
    );
    assert!(
        explained.candidates[0]
            .reason
            .starts_with("estimated cost $")
    );
    assert!(
        explained.candidates[0].estimated_cost_usd.unwrap()
            < explained.candidates[1].estimated_cost_usd.unwrap()
    );
    assert!(explained.candidates[2].reason.contains("region us"));

    // Explaining never calls a provider, and bad input is named under `request`.
    let status = admin
        .explain_route(pb::ExplainRouteRequest {
            request: Some(request("cheap", "")).map(|mut r| {
                r.messages.clear();
                r
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), vec!["request.messages"]);
}

#[tokio::test]
async fn pagination_lists_every_policy_once() {
    let (_mock, gateway) = two_providers("").await;
    let mut admin = admin(&gateway);
    for i in 0..7 {
        create(&mut admin, policy(&format!("p{i}"), vec![target("a", "m")])).await;
    }
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_policies(pb::ListPoliciesRequest {
                page_size: 3,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.policies.len() <= 3);
        names.extend(page.policies.into_iter().map(|p| p.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(names, (0..7).map(|i| format!("p{i}")).collect::<Vec<_>>());
}

#[tokio::test]
async fn config_policies_route_and_are_read_only() {
    let (_mock, gateway) = two_providers(
        r#"
[policies.from-config]
description = "defined in the file"
targets = [{ provider = "b", model = "gpt-4o-mini" }]
"#,
    )
    .await;
    let answer = gateway
        .client()
        .chat(request("from-config", "hi"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.provider, "b");
    let mut admin = admin(&gateway);
    let p = admin
        .get_policy(pb::GetPolicyRequest {
            name: "from-config".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    assert_eq!(p.source, pb::PolicySource::Config as i32);
    let status = admin
        .update_policy(pb::UpdatePolicyRequest { policy: Some(p) })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let status = admin
        .delete_policy(pb::DeletePolicyRequest {
            name: "from-config".into(),
            etag: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn inflight_stream_keeps_its_plan_while_the_policy_changes() {
    let (_mock, gateway) = two_providers("").await;
    let mut admin = admin(&gateway);
    let created = create(
        &mut admin,
        policy(
            "live",
            vec![target("a", "gpt-4o-mini+chunks=8+chunk_delay=60")],
        ),
    )
    .await;
    let mut stream = gateway
        .client()
        .chat_stream(request("live", "hi"))
        .await
        .unwrap()
        .into_inner();
    let Some(Event::Start(start)) = stream.message().await.unwrap().unwrap().event else {
        panic!("no start event");
    };
    assert_eq!(start.provider, "a");
    let mut changed = created;
    changed.targets = vec![target("b", "gpt-4o-mini")];
    admin
        .update_policy(pb::UpdatePolicyRequest {
            policy: Some(changed),
        })
        .await
        .unwrap();
    let answer = gateway
        .client()
        .chat(request("live", "hi"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.provider, "b");
    let (events, status) = collect_stream(stream).await;
    status.unwrap();
    let Some(Event::Finish(finish)) = events.last() else {
        panic!("stream did not finish: {events:?}");
    };
    assert_eq!(finish.route.as_ref().unwrap().attempts[0].provider, "a");
}

#[tokio::test]
async fn policies_survive_kill_9_and_restart() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("gateway.toml");
    std::fs::write(
        &config_path,
        format!(
            // No HTTP front: its default port is fixed and may be taken.
            "[providers.a]\nkind = \"openai-compatible\"\nbase_url = \"{}\"\n[http]\nlisten = \"off\"\n",
            mock.openai_base_url()
        ),
    )
    .unwrap();
    let start = || async {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-gateway"))
            .arg("--config")
            .arg(&config_path)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--admin-token")
            .arg(ADMIN_TOKEN)
            .arg("--log-level")
            .arg("warn")
            .arg("--metrics-listen")
            .arg("off")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut channel = None;
        for _ in 0..200 {
            if let Ok(c) = Channel::from_shared(format!("http://127.0.0.1:{port}"))
                .unwrap()
                .connect()
                .await
            {
                channel = Some(c);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (child, channel.expect("the gateway process started"))
    };
    let (mut child, channel) = start().await;
    let mut admin: Admin = admin_client(channel);
    create(
        &mut admin,
        policy("durable", vec![target("a", "gpt-4o-mini")]),
    )
    .await;
    child.start_kill().unwrap(); // SIGKILL: no shutdown, no flush.
    child.wait().await.unwrap();

    let (_child, channel) = start().await;
    let mut admin: Admin = admin_client(channel.clone());
    let p = admin
        .get_policy(pb::GetPolicyRequest {
            name: "durable".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    assert_eq!(p.targets[0].provider, "a");
    let answer = pb::llm_gateway_client::LlmGatewayClient::new(channel)
        .chat(request("durable", "still there?"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.route.unwrap().policy, "durable");
}
