//! The console's HTTP side on the listener that carries the Admin API: HTTP/1.1 connections
//! get the pages and the JSON mapping of the API, HTTP/2 ones stay gRPC; the JSON calls go
//! through the same authorization and error mapping as gRPC ones. (The pages themselves are
//! tested end to end in headless Chromium by `.ci/console`.)

use llm_gateway::pb;
use serde_json::{Value, json};

use crate::common::*;

const ADMIN: &str = "llmgateway.v1.LlmGatewayAdmin";

fn http1() -> reqwest::Client {
    reqwest::Client::builder().http1_only().build().unwrap()
}

async fn post(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    auth: Option<&str>,
    body: Value,
) -> (u16, Value) {
    let mut req = client
        .post(format!("{base}/{path}"))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(token) = auth {
        req = req.bearer_auth(token);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test]
async fn http1_gets_the_console_and_json_while_grpc_keeps_working_on_the_same_port() {
    let (_mock, gateway) = openai_pair().await;
    let base = format!("http://{}", gateway.addr);
    let client = http1();
    let page = client.get(format!("{base}/console")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert!(page.text().await.unwrap().contains("/console/console.js"));
    let script = client
        .get(format!("{base}/console/console.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        script.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );

    // A policy created as JSON is the one gRPC reads back.
    let (status, created) = post(
        &client,
        &base,
        &format!("{ADMIN}/CreatePolicy"),
        Some(ADMIN_TOKEN),
        json!({"policy": {"name": "json-made", "targets": [{"provider": "openai", "model": "gpt-4o-mini"}]}}),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["policy"]["name"], "json-made");
    let etag = created["policy"]["etag"].as_str().unwrap().to_owned();
    let mut admin = admin_client(gateway.channel.clone());
    let mut req = tonic::Request::new(pb::GetPolicyRequest {
        name: "json-made".into(),
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_TOKEN}").parse().unwrap(),
    );
    let policy = admin
        .get_policy(req)
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    assert_eq!(policy.etag, etag);
    assert_eq!(policy.targets[0].model, "gpt-4o-mini");

    // A chat through the JSON mapping, then through gRPC on the same port.
    let (status, answer) = post(
        &client,
        &base,
        "llmgateway.v1.LlmGateway/Chat",
        None,
        json!({"model": "json-made", "messages": [{"role": "ROLE_USER", "content": [{"text": "hello"}]}]}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["provider"], "openai");
    assert!(
        answer["usage"]["inputTokens"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 0
    );
    let grpc = gateway
        .client()
        .chat(request("json-made", "hello"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grpc.provider, "openai");
}

#[tokio::test]
async fn json_errors_carry_the_grpc_code_reason_and_field() {
    let (_mock, gateway) = openai_pair().await;
    let base = format!("http://{}", gateway.addr);
    let client = http1();
    // No credential: the Admin API's own refusal.
    let (status, body) = post(
        &client,
        &base,
        &format!("{ADMIN}/ListKeys"),
        None,
        json!({}),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["code"], "unauthenticated");
    // A field the API rejects names the field.
    let (status, body) = post(
        &client,
        &base,
        &format!("{ADMIN}/CreatePolicy"),
        Some(ADMIN_TOKEN),
        json!({"policy": {"name": "bad", "targets": [{"provider": "nope", "model": "m"}]}}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "invalid_argument");
    let violation = &body["details"][1]["fieldViolations"][0];
    assert_eq!(violation["field"], "policy.targets[0].provider");
    // JSON that is not the message: which message, and what is wrong.
    let (status, body) = post(
        &client,
        &base,
        &format!("{ADMIN}/GetUsage"),
        Some(ADMIN_TOKEN),
        json!({"groupBy": 7}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("llmgateway.v1.GetUsageRequest"),
        "{body}"
    );
    // An unknown method, and a body that is not JSON.
    let (status, body) = post(
        &client,
        &base,
        &format!("{ADMIN}/Nope"),
        Some(ADMIN_TOKEN),
        json!({}),
    )
    .await;
    assert_eq!(status, 501, "{body}");
    let res = client
        .post(format!("{base}/{ADMIN}/ListPolicies"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    // A stale etag is a conflict.
    let (_, created) = post(
        &client,
        &base,
        &format!("{ADMIN}/CreatePolicy"),
        Some(ADMIN_TOKEN),
        json!({"policy": {"name": "twice", "targets": [{"provider": "openai", "model": "gpt-4o-mini"}]}}),
    )
    .await;
    let mut edit = created["policy"].clone();
    edit["description"] = json!("first");
    let (status, _) = post(
        &client,
        &base,
        &format!("{ADMIN}/UpdatePolicy"),
        Some(ADMIN_TOKEN),
        json!({"policy": edit.clone()}),
    )
    .await;
    assert_eq!(status, 200);
    edit["description"] = json!("second, from a stale copy");
    let (status, body) = post(
        &client,
        &base,
        &format!("{ADMIN}/UpdatePolicy"),
        Some(ADMIN_TOKEN),
        json!({"policy": edit}),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "aborted");
}

#[tokio::test]
async fn server_streams_are_json_lines_and_a_session_cookie_is_the_admin_credential() {
    let (_mock, gateway) = openai_pair().await;
    let base = format!("http://{}", gateway.addr);
    let client = http1();
    let res = client
        .post(format!("{base}/llmgateway.v1.LlmGateway/ChatStream"))
        .header("content-type", "application/json")
        .body(
            json!({"model": "openai/gpt-4o-mini", "messages": [{"role": "ROLE_USER", "content": [{"text": "stream please"}]}]})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["content-type"], "application/x-ndjson");
    let text = res.text().await.unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.first().unwrap().get("start").is_some(), "{text}");
    assert!(lines.iter().any(|l| l.get("delta").is_some()), "{text}");
    assert!(lines.last().unwrap().get("finish").is_some(), "{text}");

    // A failing stream ends with its error as the last line.
    let res = client
        .post(format!("{base}/llmgateway.v1.LlmGateway/ChatStream"))
        .header("content-type", "application/json")
        .body(json!({"model": "openai/gpt-4o-mini+status=400", "messages": [{"role": "ROLE_USER", "content": [{"text": "x"}]}]}).to_string())
        .send()
        .await
        .unwrap();
    // Before the first chunk the call fails as a whole: the HTTP status says so.
    assert_eq!(res.status(), 400);
    let body: Value = serde_json::from_str(&res.text().await.unwrap()).unwrap();
    assert_eq!(body["code"], "invalid_argument", "{body}");
    // After it, the error is the last line (the stream was committed: 200 and its lines).
    let res = client
        .post(format!("{base}/llmgateway.v1.LlmGateway/ChatStream"))
        .header("content-type", "application/json")
        .body(json!({"model": "openai/gpt-4o-mini+stream_error+chunks=6", "messages": [{"role": "ROLE_USER", "content": [{"text": "x"}]}]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert!(last["error"]["code"].is_string(), "{text}");
    assert!(text.lines().any(|l| l.contains("\"delta\"")), "{text}");

    // Login: a wrong token is refused; the right one sets an HttpOnly session cookie, which
    // then authenticates JSON calls without the secret; logout ends it.
    let res = client
        .post(format!("{base}/console/login"))
        .body(json!({"token": "wrong-token-wrong-token"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let res = client
        .post(format!("{base}/console/login"))
        .body(json!({"token": ADMIN_TOKEN}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let cookie = res.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(!cookie.contains(ADMIN_TOKEN));
    let session = cookie.split(';').next().unwrap().to_owned();
    let keyed = |path: &str| {
        client
            .post(format!("{base}/{ADMIN}/{path}"))
            .header("content-type", "application/json")
            .header("cookie", session.clone())
            .body("{}")
            .send()
    };
    assert_eq!(keyed("ListKeys").await.unwrap().status(), 200);
    // The cookie needs a JSON content type (a cross-site form cannot send one).
    let form = client
        .post(format!("{base}/{ADMIN}/ListKeys"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("cookie", session.clone())
        .body("a=b")
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 400);
    let out = client
        .post(format!("{base}/console/logout"))
        .header("cookie", session.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 200);
    assert_eq!(keyed("ListKeys").await.unwrap().status(), 401);
}

#[tokio::test]
async fn with_the_console_off_http1_is_closed_as_before() {
    let mock = llm_gateway::mock_upstream::MockUpstream::start(Default::default())
        .await
        .unwrap();
    let gateway = Gateway::start(&openai_toml(&mock, "[admin]\nconsole = false\n")).await;
    let err = http1()
        .get(format!("http://{}/console", gateway.addr))
        .send()
        .await;
    assert!(err.is_err(), "{err:?}");
    // gRPC is unaffected.
    gateway
        .client()
        .chat(request("openai/gpt-4o-mini", "hi"))
        .await
        .unwrap();
}
