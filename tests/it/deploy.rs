//! The Grafana dashboard and the Prometheus alert rules under `deploy/` query what a live
//! gateway exports: every metric they name is one of `telemetry::names`, and every label
//! they group by is on the samples a real burst of calls produces. (`promtool check rules`
//! and `promtool test rules` run in scripts/test.)

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
};

use llm_gateway::mock_upstream::{MockSettings, MockUpstream};

use crate::common::*;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// Every PromQL expression of the dashboard and the rule file.
fn expressions() -> Vec<String> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/llm-gateway.json")).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    let rules = read("deploy/prometheus/alerts.yml");
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let mut expr = rest.trim().trim_start_matches('|').to_owned();
        // A block scalar: the indented lines that follow.
        while let Some(next) = lines.peek() {
            if next.trim().is_empty() || next.trim_start().contains(": ") {
                break;
            }
            expr.push(' ');
            expr.push_str(next.trim());
            lines.next();
        }
        exprs.push(expr);
    }
    assert!(exprs.len() > 20, "found only {} expressions", exprs.len());
    exprs
}

fn metric_at(s: &str) -> Option<String> {
    let start = s.find("llm_gateway_")?;
    Some(
        s[start..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect(),
    )
}

/// Metric names an expression uses (recording-rule names like `llm_gateway:x` excluded).
fn metrics_of(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("llm_gateway_") {
        let name = metric_at(&rest[i..]).unwrap();
        rest = &rest[i + name.len()..];
        out.push(name);
    }
    out
}

/// (labels, metric) of each `by (labels) (...metric` in an expression.
fn groupings(expr: &str) -> Vec<(Vec<String>, String)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("by (") {
        rest = &rest[i + 4..];
        let close = rest.find(')').unwrap();
        let labels = rest[..close]
            .split(',')
            .map(|l| l.trim().to_owned())
            .collect();
        if let Some(metric) = metric_at(&rest[close..]) {
            out.push((labels, metric));
        }
        rest = &rest[close..];
    }
    out
}

/// The exported metric family a name belongs to (histograms export `_bucket/_sum/_count`).
fn family(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

/// The metric names declared in `telemetry::names`.
fn declared() -> BTreeSet<String> {
    let source = read("src/telemetry.rs");
    let names = source.split("pub mod names").nth(1).unwrap();
    names
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub const "))
        .filter_map(|l| l.split('"').nth(1))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_metric_the_dashboard_and_alerts_name_is_declared() {
    let declared = declared();
    assert!(declared.contains("llm_gateway_calls_total"));
    for expr in expressions() {
        for name in metrics_of(&expr) {
            assert!(
                declared.contains(family(&name)),
                "`{name}` in `{expr}` is not in telemetry::names"
            );
        }
    }
}

#[tokio::test]
async fn the_dashboard_groups_by_labels_the_gateway_exports() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // A provider name no other test uses: the metrics recorder is process-wide.
    let gateway = Gateway::start(&format!(
        r#"
[metrics]
listen = "127.0.0.1:{port}"
[providers.deploy]
kind = "openai-compatible"
base_url = "{}"
[policies.deploy-fallback]
targets = [{{ provider = "deploy", model = "gpt-4o-mini+status=503" }}, {{ provider = "deploy", model = "gpt-4o-mini" }}]
"#,
        mock.openai_base_url()
    ))
    .await;
    let mut client = gateway.client();
    client
        .chat(request("deploy/gpt-4o-mini", "hello"))
        .await
        .unwrap();
    client
        .chat(request("deploy-fallback", "fall back"))
        .await
        .unwrap();
    let (_, status) = collect_stream(
        client
            .chat_stream(request("deploy/gpt-4o-mini", "stream"))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    status.unwrap();
    let failed = client
        .chat(request("deploy/gpt-4o-mini+status=500", "fail"))
        .await
        .unwrap_err();
    assert_eq!(failed.code(), tonic::Code::Unavailable);

    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Label names per exported sample name.
    let mut labels: HashMap<String, BTreeSet<String>> = HashMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        let set = labels.entry(name.to_owned()).or_default();
        for pair in rest.split("\",") {
            if let Some((k, _)) = pair.split_once('=') {
                set.insert(k.trim_start_matches(',').to_owned());
            }
        }
    }
    let mut checked = 0;
    for expr in expressions() {
        for (by, metric) in groupings(&expr) {
            // Families a burst of healthy calls does not produce (budgets, circuits, limits,
            // connection closes) are checked against their declaration only.
            let Some(have) = labels.get(&metric) else {
                continue;
            };
            for label in by {
                assert!(
                    have.contains(&label),
                    "`{expr}` groups {metric} by `{label}`, which the gateway does not export \
                     (it has {have:?})"
                );
            }
            checked += 1;
        }
    }
    for family in [
        "llm_gateway_calls_total",
        "llm_gateway_call_duration_seconds_bucket",
        "llm_gateway_time_to_first_token_seconds_bucket",
        "llm_gateway_tokens_total",
        "llm_gateway_cost_usd_sum",
        "llm_gateway_upstream_attempts_total",
        "llm_gateway_fallbacks_total",
    ] {
        assert!(labels.contains_key(family), "{family} not exported");
    }
    assert!(checked >= 12, "only {checked} groupings checked");
}
