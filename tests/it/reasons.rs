//! One reason for every outcome: the status a caller sees and the usage ledger's record of
//! the same call carry the same code and reason (ErrorInfo reason = `error_class`).

use std::time::Duration;

use llm_gateway::{
    mock_upstream::{MockSettings, MockUpstream},
    pb,
};
use tonic::{Code, Request};

use crate::common::*;

fn call(model: &str, secret: &str, id: &str) -> Request<pb::ChatRequest> {
    let mut req = Request::new(request(model, "hello"));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {secret}").parse().unwrap());
    req.metadata_mut()
        .insert("x-request-id", id.parse().unwrap());
    req
}

#[tokio::test]
async fn ledger_records_the_reason_the_caller_saw() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&openai_toml(&mock, "[auth]\nrequire_keys = true\n")).await;
    let mut admin = admin_client(gateway.channel.clone());
    let create = |name: &str, allowed: &[&str], rpm: u32| pb::CreateKeyRequest {
        key: Some(pb::Key {
            name: name.into(),
            scopes: vec!["chat".into()],
            allowed_models: allowed.iter().map(|m| (*m).to_owned()).collect(),
            requests_per_minute: rpm,
            ..Default::default()
        }),
    };
    let narrow = admin
        .create_key(create("narrow", &["openai/gpt-4o*"], 1))
        .await
        .unwrap()
        .into_inner()
        .secret;
    let reader = admin
        .create_key(pb::CreateKeyRequest {
            key: Some(pb::Key {
                name: "reader".into(),
                scopes: vec!["usage-read".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .secret;

    let mut client = gateway.client();
    let mut statuses = Vec::new();
    // Served, then over the key's one request per minute.
    client
        .chat(call("openai/gpt-4o-mini", &narrow, "r-ok"))
        .await
        .unwrap();
    for (id, model, secret) in [
        ("r-limited", "openai/gpt-4o-mini", narrow.as_str()),
        // Outside the key's model patterns (refused before the rate limit).
        ("r-pattern", "openai/gpt-4.1-nano", narrow.as_str()),
        // A key without the chat scope: refused by the authorization layer.
        ("r-scope", "openai/gpt-4o-mini", reader.as_str()),
        // An unknown key.
        (
            "r-unknown",
            "openai/gpt-4o-mini",
            "lgw_0123456789abcdef_nope",
        ),
    ] {
        let status = client.chat(call(model, secret, id)).await.unwrap_err();
        statuses.push((id, status));
    }
    let codes: Vec<(&str, Code, String)> = statuses
        .iter()
        .map(|(id, s)| (*id, s.code(), reason(s)))
        .collect();
    assert_eq!(
        codes,
        vec![
            (
                "r-limited",
                Code::ResourceExhausted,
                "RATE_LIMIT_REQUESTS".to_owned()
            ),
            (
                "r-pattern",
                Code::PermissionDenied,
                "PERMISSION_DENIED".to_owned()
            ),
            (
                "r-scope",
                Code::PermissionDenied,
                "PERMISSION_DENIED".to_owned()
            ),
            (
                "r-unknown",
                Code::Unauthenticated,
                "UNAUTHENTICATED".to_owned()
            ),
        ]
    );

    let records = usage_records(&mut admin, 5).await;
    let record = |id: &str| {
        records
            .iter()
            .find(|r| r.request_id == id)
            .unwrap_or_else(|| panic!("no ledger record for {id}: {records:?}"))
    };
    let ok = record("r-ok");
    assert_eq!((ok.code.as_str(), ok.error_class.as_str()), ("OK", ""));
    for (id, code, reason) in &codes {
        let r = record(id);
        let code_name = match code {
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::Unauthenticated => "UNAUTHENTICATED",
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(r.code, code_name, "{id}");
        assert_eq!(&r.error_class, reason, "{id}");
        assert_eq!(r.rpc, "Chat", "{id}");
    }
    assert_eq!(record("r-limited").key, "narrow");
}

#[tokio::test]
async fn a_monthly_budget_refusal_points_to_the_first_of_next_month() {
    use llm_gateway::limits::Period;
    use tonic_types::StatusExt as _;

    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&openai_toml(&mock, "[auth]\nrequire_keys = true\n")).await;
    let mut admin = admin_client(gateway.channel.clone());
    let secret = admin
        .create_key(pb::CreateKeyRequest {
            key: Some(pb::Key {
                name: "monthly".into(),
                scopes: vec!["chat".into()],
                // Less than the estimate of any call: the first one is refused.
                monthly_budget_usd: 0.000_000_1,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .secret;
    let before = now_ms();
    let mut req = call("openai/gpt-4o-mini", &secret, "r-monthly");
    req.get_mut().max_tokens = Some(5);
    let status = gateway.client().chat(req).await.unwrap_err();
    let after = now_ms();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "BUDGET_EXCEEDED");
    let delay = status
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("a RetryInfo delay");
    // Between what the first of next month is from just after and just before the call.
    assert!(
        Period::Month.until_reset(after) <= delay + Duration::from_millis(1)
            && delay <= Period::Month.until_reset(before),
        "{delay:?}"
    );
    let resets = [
        Period::Month.reset_at(before),
        Period::Month.reset_at(after),
    ];
    assert!(
        resets
            .iter()
            .any(|r| status.message().contains(&format!("resets at {r}"))),
        "{}",
        status.message()
    );
}
