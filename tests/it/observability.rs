//! Metrics scraped over HTTP, trace context at the upstream, the usage ledger through
//! GetUsage / ExportUsage, and logs that never carry keys or prompts.

use std::{
    collections::HashMap,
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use llm_gateway::{
    mock_upstream::{MockSettings, MockUpstream},
    pb,
};
use tonic::Request;

use crate::common::*;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// One parsed sample of the Prometheus text format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (head, value) = line.rsplit_once(' ')?;
            let (name, labels) = match head.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (head, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|kv| !kv.is_empty())
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_owned(), v.trim_matches('"').to_owned()))
                })
                .collect();
            Some(Sample {
                name: name.to_owned(),
                labels,
                value: value.parse().ok()?,
            })
        })
        .collect()
}

/// The sum of the samples of `name` whose labels include `want`.
fn value(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| {
            s.name == name
                && want
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

async fn scrape(port: u16) -> Vec<Sample> {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    parse(&body)
}

#[tokio::test]
async fn metrics_and_usage_agree_after_a_mixed_burst() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let port = free_port();
    // A provider name no other test uses: the metrics recorder is process-wide.
    let gateway = Gateway::start(&format!(
        r#"
[metrics]
listen = "127.0.0.1:{port}"
tag_labels = ["team"]
[providers.obs]
kind = "openai-compatible"
base_url = "{}"
[policies.obs-hedged]
targets = [{{ provider = "obs", model = "gpt-4o-mini+latency=2000" }}, {{ provider = "obs", model = "gpt-4o-mini" }}]
execution = {{ hedging = {{ mode = "fixed", delay = "50ms" }} }}
"#,
        mock.openai_base_url()
    ))
    .await;
    let mut client = gateway.client();
    let mut expected_cost = 0.0;
    let mut expected_input = 0;
    for team in ["search", "search", "ads"] {
        let mut req = request("obs/gpt-4o-mini", "count these tokens");
        req.tags.insert("team".into(), team.into());
        let answer = client.chat(req).await.unwrap().into_inner();
        expected_cost += answer.cost.unwrap().total_usd;
        expected_input += answer.usage.unwrap().input_tokens;
    }
    let mut req = request("obs/gpt-4o-mini", "stream me");
    req.tags.insert("team".into(), "search".into());
    let (events, status) =
        collect_stream(client.chat_stream(req).await.unwrap().into_inner()).await;
    status.unwrap();
    let Some(pb::chat_stream_response::Event::Finish(finish)) = events.last() else {
        panic!("no finish");
    };
    expected_cost += finish.cost.unwrap().total_usd;
    expected_input += finish.usage.unwrap().input_tokens;
    let failed = client
        .chat(request("obs/gpt-4o-mini+status=500", "fail"))
        .await
        .unwrap_err();
    assert_eq!(failed.code(), tonic::Code::Unavailable);
    let hedged = client
        .chat(request("obs-hedged", "hedge me"))
        .await
        .unwrap()
        .into_inner();
    expected_cost += hedged.cost.unwrap().total_usd;
    expected_input += hedged.usage.unwrap().input_tokens;

    // Prometheus.
    let m = scrape(port).await;
    let ok_chat = [
        ("provider", "obs"),
        ("rpc", "Chat"),
        ("code", "OK"),
        ("policy", ""),
    ];
    assert_eq!(
        value(
            &m,
            "llm_gateway_calls_total",
            &[
                ("provider", "obs"),
                ("rpc", "Chat"),
                ("code", "OK"),
                ("policy", "")
            ]
        ),
        3.0
    );
    assert_eq!(
        value(
            &m,
            "llm_gateway_calls_total",
            &[("provider", "obs"), ("tag_team", "search"), ("code", "OK")]
        ),
        3.0
    );
    assert_eq!(
        value(
            &m,
            "llm_gateway_calls_total",
            &[("provider", "obs"), ("rpc", "ChatStream"), ("code", "OK")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "llm_gateway_calls_total",
            &[("provider", "obs"), ("code", "UNAVAILABLE")]
        ),
        1.0
    );
    assert_eq!(
        value(&m, "llm_gateway_call_duration_seconds_count", &ok_chat),
        3.0
    );
    assert_eq!(
        value(
            &m,
            "llm_gateway_call_duration_seconds_bucket",
            &[
                ("provider", "obs"),
                ("rpc", "Chat"),
                ("code", "OK"),
                ("policy", ""),
                ("le", "+Inf")
            ]
        ),
        3.0
    );
    assert_eq!(
        value(
            &m,
            "llm_gateway_time_to_first_token_seconds_count",
            &[("provider", "obs")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "llm_gateway_tokens_total",
            &[("provider", "obs"), ("type", "input")]
        ),
        expected_input as f64
    );
    let cost = value(&m, "llm_gateway_cost_usd_sum", &[("provider", "obs")]);
    assert!(
        (cost - expected_cost).abs() < 1e-12,
        "metrics cost {cost} vs responses {expected_cost}"
    );
    assert_eq!(
        value(
            &m,
            "llm_gateway_upstream_attempts_total",
            &[("provider", "obs"), ("error_class", "SERVER_ERROR")]
        ),
        3.0
    );
    assert_eq!(
        value(
            &m,
            "llm_gateway_hedges_started_total",
            &[("policy", "obs-hedged")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "llm_gateway_hedges_won_total",
            &[("policy", "obs-hedged")]
        ),
        1.0
    );
    assert!(value(&m, "llm_gateway_build_info", &[]) >= 1.0);

    // The ledger, through GetUsage: the same numbers.
    let mut admin: Admin = admin_client(gateway.channel.clone());
    let mut usage = None;
    for _ in 0..100 {
        let u = admin
            .get_usage(pb::GetUsageRequest {
                group_by: vec!["provider".into(), "tag:team".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if u.total.as_ref().is_some_and(|t| t.calls == 6) {
            usage = Some(u);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let usage = usage.expect("six usage records were written");
    let total = usage.total.unwrap();
    assert_eq!(total.errors, 1);
    assert!((total.error_rate - 1.0 / 6.0).abs() < 1e-9);
    assert_eq!(total.input_tokens, expected_input);
    assert!((total.cost_usd - expected_cost).abs() < 1e-12);
    assert!(total.latency_p50.is_some() && total.latency_p99.is_some());
    assert!(total.time_to_first_token_p50.is_some());
    let search = usage
        .groups
        .iter()
        .find(|g| g.key.get("tag:team").map(String::as_str) == Some("search"))
        .unwrap();
    assert_eq!(search.key["provider"], "obs");
    assert_eq!(search.totals.as_ref().unwrap().calls, 3);

    let mut export = admin
        .export_usage(pb::ExportUsageRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut records = Vec::new();
    while let Some(batch) = export.message().await.unwrap() {
        records.extend(batch.records);
    }
    assert_eq!(records.len(), 6);
    let failed_record = records.iter().find(|r| r.code == "UNAVAILABLE").unwrap();
    assert_eq!(failed_record.error_class, "SERVER_ERROR");
    assert_eq!(failed_record.attempts, 3);
    let hedged_record = records.iter().find(|r| r.policy == "obs-hedged").unwrap();
    assert_eq!(hedged_record.attempts, 2);
    assert!(records.iter().all(|r| !r.request_id.is_empty()));

    let status = admin
        .get_usage(pb::GetUsageRequest {
            group_by: vec!["user".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), vec!["group_by[0]"]);
}

#[tokio::test]
async fn traceparent_continues_into_the_upstream_request() {
    let (mock, gateway) = openai_pair().await;
    let mut req = Request::new(request("openai/gpt-4o-mini", "trace me"));
    req.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    req.metadata_mut()
        .insert("tracestate", "vendor=abc".parse().unwrap());
    gateway.client().chat(req).await.unwrap();
    let headers = mock.stats().last_headers().unwrap();
    let upstream = headers["traceparent"].to_str().unwrap();
    assert!(
        upstream.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{upstream}"
    );
    assert!(
        !upstream.contains("00f067aa0ba902b7"),
        "a new parent id: {upstream}"
    );
    assert_eq!(headers["tracestate"], "vendor=abc");

    // No incoming context: none is invented.
    gateway
        .client()
        .chat(request("openai/gpt-4o-mini", "no trace"))
        .await
        .unwrap();
    assert!(
        mock.stats()
            .last_headers()
            .unwrap()
            .get("traceparent")
            .is_none()
    );
}

/// A log sink for one test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn logs_never_carry_keys_or_prompts() {
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || sink.clone())
        .finish();
    // This runtime has one thread: the server's tasks log through this subscriber too.
    let _guard = tracing::subscriber::set_default(subscriber);

    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&format!(
        r#"
[providers.leaky]
kind = "openai-compatible"
base_url = "{}"
api_key = "sk-live-SECRETKEY1234567890"
"#,
        mock.openai_base_url()
    ))
    .await;
    // Other tests register callsites on other threads while this one installs its scoped
    // subscriber; a registration racing with it can cache a callsite as "never" for every
    // subscriber. Re-evaluating the cache now, before the calls, closes that window.
    tracing::callsite::rebuild_interest_cache();
    let prompt = "my confidential prompt text";
    let mut client = gateway.client();
    client
        .chat(request("leaky/gpt-4o-mini", prompt))
        .await
        .unwrap();
    let _ = client
        .chat(request("leaky/gpt-4o-mini+status=401", prompt))
        .await;
    let _ = client
        .chat(request("leaky/gpt-4o-mini+status=400", prompt))
        .await;
    let (_, status) = collect_stream(
        client
            .chat_stream(request("leaky/gpt-4o-mini", prompt))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    status.unwrap();

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("upstream attempt failed"),
        "the test captured the gateway's logs:\n{logs}"
    );
    assert!(
        !logs.contains("SECRETKEY"),
        "an API key leaked into the logs:\n{logs}"
    );
    assert!(
        !logs.contains("confidential"),
        "a prompt leaked into the logs:\n{logs}"
    );
}

/// An exported span: its name and string attributes.
type ExportedSpan = (String, HashMap<String, String>);

/// A fake OTLP collector: keeps every exported span.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<ExportedSpan>>>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        request: Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                for span in ss.spans {
                    let attrs = span
                        .attributes
                        .iter()
                        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
                            Value::StringValue(s) => Some((kv.key.clone(), s.clone())),
                            _ => None,
                        })
                        .collect();
                    spans.push((span.name, attrs));
                }
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_export_carries_call_and_attempt_spans() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let service = TraceServiceServer::new(collector.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // The process-wide subscriber: this is the only test that installs one.
    let guard = llm_gateway::telemetry::init(&llm_gateway::telemetry::LogConfig {
        filter: "llm_gateway=info".into(),
        format: llm_gateway::telemetry::LogFormat::None,
        bodies: None,
        otlp_endpoint: Some(endpoint),
        service_name: "gateway-under-test".into(),
    });
    let (_mock, gateway) = openai_pair().await;
    gateway
        .client()
        .chat(request("openai/gpt-4o-mini", "traced"))
        .await
        .unwrap();
    guard.shutdown();
    let spans = collector.0.lock().unwrap().clone();
    let call = spans.iter().find(|(name, attrs)| {
        name == "call" && attrs.get("rpc").map(String::as_str) == Some("Chat")
    });
    assert!(call.is_some(), "no call span exported: {spans:?}");
    let attempt = spans.iter().find(|(name, attrs)| {
        name == "attempt" && attrs.get("provider").map(String::as_str) == Some("openai")
    });
    let (_, attrs) = attempt.expect("an attempt span with its provider");
    assert_eq!(attrs["kind"], "primary");
    assert_eq!(attrs["model"], "gpt-4o-mini");
}
