//! Data governance in the ledger: each usage record carries the call's guardrail decisions
//! by direction, entity type and action.

use llm_gateway::mock_upstream::{MockSettings, MockUpstream};
use tonic::Code;

use crate::common::*;

const PROFILES: &str = r#"
[guardrails.mixed]
actions = { email = "redact", credit_card = "block", ip_address = "log" }

[policies.guarded]
targets = [{ provider = "openai", model = "gpt-4o-mini" }]
guardrails = "mixed"
"#;

#[tokio::test]
async fn usage_records_carry_the_guardrail_decisions() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&openai_toml(&mock, PROFILES)).await;
    let mut client = gateway.client();
    client
        .chat(request(
            "guarded",
            "mail a.b@example.com and c.d@example.com",
        ))
        .await
        .unwrap();
    let blocked = client
        .chat(request("guarded", "card 4111 1111 1111 1111 from 10.0.0.1"))
        .await
        .unwrap_err();
    assert_eq!(blocked.code(), Code::FailedPrecondition);
    let (_, end) = stream(&gateway, request("guarded", "host 10.1.2.3")).await;
    end.unwrap();
    client
        .chat(request("openai/gpt-4o-mini", "mail a.b@example.com"))
        .await
        .unwrap();

    let mut admin = admin_client(gateway.channel.clone());
    let records = usage_records(&mut admin, 4).await;
    let mut got: Vec<(String, String, String)> = records
        .iter()
        .map(|r| (r.rpc.clone(), r.code.clone(), r.guardrails.clone()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (
                "Chat".into(),
                "FAILED_PRECONDITION".into(),
                "request:credit_card:block=1,request:ip_address:log=1".into()
            ),
            ("Chat".into(), "OK".into(), String::new()),
            ("Chat".into(), "OK".into(), "request:email:redact=2".into()),
            // The echoed reply repeats the logged address: the reply scan counts it too.
            (
                "ChatStream".into(),
                "OK".into(),
                "request:ip_address:log=1,reply:ip_address:log=1".into()
            ),
        ],
        "{records:#?}"
    );
}
