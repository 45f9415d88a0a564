//! Outbound smoothing: the mock's per-key requests-per-minute limit, and the gateway pacing
//! its calls inside the limits of every provider account.

use std::time::Duration;

use llm_gateway::mock_upstream::{MockSettings, MockUpstream};
use serde_json::json;

/// Posts a chat body to the mock at `url` with `headers`; returns the status and headers.
async fn post(
    url: &str,
    headers: &[(&str, &str)],
    body: serde_json::Value,
) -> (u16, reqwest::header::HeaderMap) {
    let mut req = llm_gateway::providers::http_client(&Default::default())
        .unwrap()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.headers().clone())
}

#[tokio::test]
async fn the_mock_limits_each_key_and_answers_with_the_providers_headers() {
    let mock = MockUpstream::start(MockSettings {
        requests_per_minute: Some(2),
        ..MockSettings::default()
    })
    .await
    .unwrap();
    mock.limit_key("sk-big", Some(600));
    let openai = format!("{}/chat/completions", mock.openai_base_url());
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    let auth = [("authorization", "Bearer sk-small")];
    for remaining in ["1", "0"] {
        let (status, h) = post(&openai, &auth, body.clone()).await;
        assert_eq!(status, 200);
        assert_eq!(h["x-ratelimit-limit-requests"], "2");
        assert_eq!(h["x-ratelimit-remaining-requests"], remaining);
        assert!(
            h["x-ratelimit-reset-requests"]
                .to_str()
                .unwrap()
                .ends_with('s')
        );
    }
    let (status, h) = post(&openai, &auth, body.clone()).await;
    assert_eq!(status, 429);
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    assert_eq!(mock.rate_limited(), 1);
    // Another key has its own bucket.
    let (status, h) = post(&openai, &[("authorization", "Bearer sk-big")], body.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(h["x-ratelimit-limit-requests"], "600");

    let anthropic = format!("{}/v1/messages", mock.anthropic_base_url());
    let body = json!({"model": "claude-3-5-haiku", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    let auth = [("x-api-key", "sk-ant"), ("anthropic-version", "2023-06-01")];
    for _ in 0..2 {
        let (status, _) = post(&anthropic, &auth, body.clone()).await;
        assert_eq!(status, 200);
    }
    let (status, h) = post(&anthropic, &auth, body).await;
    assert_eq!(status, 429);
    assert_eq!(h["anthropic-ratelimit-requests-limit"], "2");
    assert_eq!(h["anthropic-ratelimit-requests-remaining"], "0");
    let reset = h["anthropic-ratelimit-requests-reset"].to_str().unwrap();
    let reset = humantime::parse_rfc3339(reset).unwrap();
    assert!(reset > std::time::SystemTime::now() - Duration::from_secs(2));
    assert!(h.contains_key("retry-after"));
}
