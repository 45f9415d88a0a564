//! Logging, metrics and trace context.
//!
//! - Logs: structured (data in fields), text by default or JSON lines. Prompts, replies and
//!   secrets are never logged; optional body logging redacts keys and truncates.
//! - Metrics: every metric name is defined and described here, prefixed `llm_gateway_`, with
//!   units in the names. Meanings follow the OpenTelemetry GenAI semantic conventions where
//!   they exist (token usage, time to first token, operation duration). Labels are bounded:
//!   never request ids or users; request tags only when listed in `metrics.tag_labels`.
//! - Trace context: the caller's W3C `traceparent` continues into upstream HTTP requests
//!   (same trace id, a new parent id per call), through a task-local set around each attempt.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::settings::Issues;

/// `[log]` as written in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// `log.level`.
    pub level: Option<String>,
    /// `log.format`.
    pub format: Option<String>,
    /// `log.bodies`.
    pub bodies: Option<bool>,
    /// `log.body_max_bytes`.
    pub body_max_bytes: Option<usize>,
    /// `log.otlp_endpoint`.
    pub otlp_endpoint: Option<String>,
    /// `log.service_name`.
    pub service_name: Option<String>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable text.
    Text,
    /// JSON lines, for log pipelines.
    Json,
    /// No log lines (traces may still be exported over OTLP).
    None,
}

/// Log output settings (`[log]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A `tracing_subscriber::EnvFilter` directive, e.g. `info` or `llm_gateway=debug`.
    pub filter: String,
    /// How log lines are written to stderr.
    pub format: LogFormat,
    /// Log upstream request and error bodies (redacted, truncated to this many bytes).
    pub bodies: Option<usize>,
    /// Export traces over OTLP/gRPC to this endpoint (e.g. `http://127.0.0.1:4317`).
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of exported traces.
    pub service_name: String,
}

impl LogConfig {
    /// Validates `[log]`.
    pub fn from_raw(raw: RawLog, issues: &mut Issues) -> Self {
        let format = match raw.format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            "none" => LogFormat::None,
            other => {
                issues.push(
                    "log.format",
                    format!("`{other}` is not one of: text, json, none"),
                );
                LogFormat::Text
            }
        };
        let filter = raw.level.unwrap_or_else(|| "info".to_owned());
        if let Err(e) = EnvFilter::try_new(&filter) {
            issues.push(
                "log.level",
                format!("`{filter}` is not a valid filter: {e}"),
            );
        }
        let otlp_endpoint = match raw.otlp_endpoint.filter(|e| !e.is_empty()) {
            Some(e) if !(e.starts_with("http://") || e.starts_with("https://")) => {
                issues.push(
                    "log.otlp_endpoint",
                    format!("`{e}` must start with http:// or https://"),
                );
                None
            }
            other => other,
        };
        Self {
            filter,
            format,
            bodies: raw
                .bodies
                .unwrap_or(false)
                .then_some(raw.body_max_bytes.unwrap_or(4096)),
            otlp_endpoint,
            service_name: raw.service_name.unwrap_or_else(|| "llm-gateway".to_owned()),
        }
    }
}

/// The default metrics address.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// `[metrics]` as written in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// `metrics.listen`: an address, or `off`.
    pub listen: Option<String>,
    /// `metrics.tag_labels`.
    pub tag_labels: Option<Vec<String>>,
}

/// The Prometheus endpoint (`[metrics]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSettings {
    /// The endpoint's address; `None` when off.
    pub listen: Option<std::net::SocketAddr>,
    /// Request tags that become metric labels (`tag_<name>`).
    pub tag_labels: Vec<String>,
}

impl MetricsSettings {
    /// Validates `[metrics]`.
    pub fn from_raw(raw: RawMetrics, issues: &mut Issues) -> Self {
        let listen = match raw.listen.as_deref() {
            None => DEFAULT_METRICS_LISTEN.parse().ok(),
            Some("" | "off") => None,
            Some(l) => match l.parse() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    issues.push(
                        "metrics.listen",
                        format!("`{l}` is not a socket address (or `off`)"),
                    );
                    None
                }
            },
        };
        let tag_labels = raw.tag_labels.unwrap_or_default();
        for (i, tag) in tag_labels.iter().enumerate() {
            if tag.is_empty() || !tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                issues.push(
                    format!("metrics.tag_labels[{i}]"),
                    "tag label names use letters, digits and `_`",
                );
            }
        }
        if tag_labels.len() > 8 {
            issues.push(
                "metrics.tag_labels",
                "at most 8 tags may become labels (cardinality)",
            );
        }
        Self { listen, tag_labels }
    }
}

/// Keeps trace export running; [`TelemetryGuard::shutdown`] flushes it.
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Exports the spans still buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "flushing traces failed");
        }
    }
}

/// Installs the global log subscriber (logs to stderr) and, when `log.otlp_endpoint` is set,
/// OTLP/gRPC trace export. Must run inside the tokio runtime when OTLP is on.
pub fn init(log: &LogConfig) -> TelemetryGuard {
    let filter = EnvFilter::try_new(&log.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (otel, provider) = match log
        .otlp_endpoint
        .as_deref()
        .map(|e| otlp_layer(e, &log.service_name))
    {
        Some(Ok((layer, provider))) => (Some(layer), Some(provider)),
        Some(Err(e)) => {
            // Logging is not up yet: say it on stderr through the subscriber once it is.
            let message = e;
            let _ = tracing_subscriber::registry()
                .with(filter)
                .with(text_layer())
                .try_init();
            tracing::error!(error = %message, "cannot start otlp trace export; continuing without it");
            return TelemetryGuard::default();
        }
        None => (None, None),
    };
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let _ = match log.format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_current_span(true),
            )
            .try_init(),
        LogFormat::Text => registry.with(text_layer()).try_init(),
        LogFormat::None => registry.try_init(),
    };
    TelemetryGuard { provider }
}

/// The text log layer on stderr, with ANSI colour only when stderr is a terminal (never in
/// a file or a pipe).
fn text_layer<S>()
-> fmt::Layer<S, fmt::format::DefaultFields, fmt::format::Format, fn() -> std::io::Stderr> {
    use std::io::IsTerminal as _;
    fmt::layer()
        .with_writer(std::io::stderr as fn() -> std::io::Stderr)
        .with_ansi(std::io::stderr().is_terminal())
}

type OtelLayer = tracing_opentelemetry::OpenTelemetryLayer<
    tracing_subscriber::layer::Layered<EnvFilter, tracing_subscriber::Registry>,
    opentelemetry_sdk::trace::SdkTracer,
>;

fn otlp_layer(
    endpoint: &str,
    service_name: &str,
) -> Result<(OtelLayer, opentelemetry_sdk::trace::SdkTracerProvider), String> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| e.to_string())?;
    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service_name.to_owned())
                .build(),
        )
        .build();
    let tracer = provider.tracer("llm-gateway");
    Ok((tracing_opentelemetry::layer().with_tracer(tracer), provider))
}

/// Metric names, in one place.
pub mod names {
    /// Calls by rpc, policy, provider, model and gRPC code (counter).
    pub const CALLS: &str = "llm_gateway_calls_total";
    /// Call duration (histogram; OTel `gen_ai.client.operation.duration`).
    pub const CALL_DURATION: &str = "llm_gateway_call_duration_seconds";
    /// Time to first token of streams (histogram; OTel `gen_ai.server.time_to_first_token`).
    pub const TIME_TO_FIRST_TOKEN: &str = "llm_gateway_time_to_first_token_seconds";
    /// Upstream attempts by provider, model, kind, outcome and error class (counter).
    pub const ATTEMPTS: &str = "llm_gateway_upstream_attempts_total";
    /// Upstream attempt duration by provider, model and outcome (histogram).
    pub const ATTEMPT_DURATION: &str = "llm_gateway_upstream_duration_seconds";
    /// Tokens by provider, model, policy and type: input, output, cached_input (counter; OTel
    /// `gen_ai.client.token.usage`).
    pub const TOKENS: &str = "llm_gateway_tokens_total";
    /// Cost per call in US dollars (histogram: `_sum` is the total cost).
    pub const COST: &str = "llm_gateway_cost_usd";
    /// Hedges started, by policy (counter).
    pub const HEDGES_STARTED: &str = "llm_gateway_hedges_started_total";
    /// Hedges that won the race, by policy (counter).
    pub const HEDGES_WON: &str = "llm_gateway_hedges_won_total";
    /// Fallback attempts started, by policy (counter).
    pub const FALLBACKS: &str = "llm_gateway_fallbacks_total";
    /// Targets skipped because the deadline was too close, by policy (counter).
    pub const DEADLINE_SKIPS: &str = "llm_gateway_deadline_skips_total";
    /// Circuit breaker state per target: 0 closed, 1 half-open, 2 open (gauge).
    pub const CIRCUIT_STATE: &str = "llm_gateway_circuit_state";
    /// Circuit breaker transitions per target and new state (counter).
    pub const CIRCUIT_TRANSITIONS: &str = "llm_gateway_circuit_transitions_total";
    /// Calls in flight, by rpc (gauge).
    pub const INFLIGHT: &str = "llm_gateway_inflight_calls";
    /// Open client streams (gauge).
    pub const OPEN_STREAMS: &str = "llm_gateway_open_streams";
    /// Usage records dropped because the ledger queue was full (counter).
    pub const LEDGER_DROPPED: &str = "llm_gateway_usage_records_dropped_total";
    /// Usage records written (counter).
    pub const LEDGER_WRITTEN: &str = "llm_gateway_usage_records_written_total";
    /// Share of a budget spent, by subject (`key:NAME`, `team:NAME`) and period (gauge).
    pub const BUDGET_USED: &str = "llm_gateway_budget_used_ratio";
    /// Budget thresholds (50, 80, 100 %) crossed, by subject, period and threshold (counter).
    pub const BUDGET_ALERTS: &str = "llm_gateway_budget_alerts_total";
    /// Calls refused by the gateway's own limits and budgets, by reason (counter).
    pub const LIMITED: &str = "llm_gateway_limited_calls_total";
    /// Build information (gauge, always 1).
    pub const BUILD_INFO: &str = "llm_gateway_build_info";
    /// Client connections open per listener, in handshake or established (gauge).
    pub const CONNECTIONS_OPEN: &str = "llm_gateway_connections_open";
    /// Client connections the gateway closed, per listener and reason: `handshake_timeout`,
    /// `tls_failed`, `not_http2`, `closed_in_handshake`, `idle`, `max_age` (the GOAWAY at the
    /// maximum age), `max_age_forced` (closed when the grace after it ran out) (counter).
    pub const CONNECTIONS_CLOSED: &str = "llm_gateway_connections_closed_total";
    /// Client connections refused because the listener had `max_connections` open (counter).
    pub const CONNECTIONS_REFUSED: &str = "llm_gateway_connections_refused_total";
    /// Failed accepts per listener and kind: `fd_limit`, `memory` (accept pauses), `other`.
    pub const ACCEPT_ERRORS: &str = "llm_gateway_accept_errors_total";
    /// Guardrail decisions by direction (`request`, `reply`), entity type and action
    /// (counter).
    pub const GUARDRAIL_DECISIONS: &str = "llm_gateway_guardrail_decisions_total";
    /// External guardrail checks' latency by check (`hook`, `moderation`) and phase
    /// (histogram, seconds).
    pub const GUARDRAIL_CHECK_SECONDS: &str = "llm_gateway_guardrail_check_seconds";
    /// Whether the shared state (Redis) is unreachable: 1 degraded, 0 fine (gauge).
    pub const SHARED_STATE_DEGRADED: &str = "llm_gateway_shared_state_degraded";
    /// Failed shared-state (Redis) operations by op: `admit`, `settle`, `renew`, `seed`,
    /// `rest`, `settle_dropped` (counter).
    pub const SHARED_STATE_ERRORS: &str = "llm_gateway_shared_state_errors_total";
    /// Calls admitted by the shared (Redis) limits, by `via`: `credit` (out of this
    /// replica's block, no round trip) or `redis` (a round trip) (counter).
    pub const SHARED_LIMIT_ADMISSIONS: &str = "llm_gateway_shared_limit_admissions_total";
    /// Pacing decisions made from this replica's own limits because the shared limiter
    /// (Redis) was unreachable, by `mode` (`fail_open`: admitted locally, `fail_closed`:
    /// refused) (counter).
    pub const PACING_SHARED_FALLBACK: &str = "llm_gateway_pacing_shared_fallback_total";
    /// Provider API key rests by provider, reason (`refused`, `rate_limited`) and source
    /// (`local`: this replica saw the answer; `peer`: another replica did) (counter).
    pub const PROVIDER_KEY_RESTS: &str = "llm_gateway_provider_key_rests_total";
    /// Shadow calls dropped, by policy and reason: `full` (the pool and its queue),
    /// `rate`, `budget` (counter).
    pub const SHADOW_DROPPED: &str = "llm_gateway_shadow_dropped_total";
    /// Shadow calls made, by policy and gRPC code (counter).
    pub const SHADOW_CALLS: &str = "llm_gateway_shadow_calls_total";
}

/// Histogram buckets for latencies in seconds: 1 ms to 2 minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Buckets for the cost of one call in US dollars.
const COST_BUCKETS: &[f64] = &[0.000_001, 0.000_01, 0.000_1, 0.001, 0.01, 0.1, 1.0, 10.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle).
/// `None` when another recorder was installed first.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(names::COST.to_owned()),
                        COST_BUCKETS,
                    )
                });
            let handle = builder.ok()?.install_recorder().ok()?;
            describe();
            metrics::gauge!(names::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            Some(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        names::CALLS,
        "Calls by rpc, policy, provider, model and gRPC code."
    );
    describe_histogram!(names::CALL_DURATION, Unit::Seconds, "Call duration.");
    describe_histogram!(
        names::TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "Time from the start of a streaming call to its first content."
    );
    describe_counter!(
        names::ATTEMPTS,
        "Upstream attempts by kind, outcome and error class."
    );
    describe_histogram!(
        names::ATTEMPT_DURATION,
        Unit::Seconds,
        "Upstream attempt duration."
    );
    describe_counter!(
        names::TOKENS,
        "Tokens by type: input, output, cached_input."
    );
    describe_histogram!(
        names::COST,
        "Cost per call in US dollars; the sum is the total cost."
    );
    describe_counter!(names::HEDGES_STARTED, "Hedged attempts started.");
    describe_counter!(
        names::HEDGES_WON,
        "Hedged attempts that produced the answer."
    );
    describe_counter!(names::FALLBACKS, "Fallback attempts started.");
    describe_counter!(
        names::DEADLINE_SKIPS,
        "Targets skipped: not enough time left."
    );
    describe_gauge!(
        names::CIRCUIT_STATE,
        "Circuit state: 0 closed, 1 half-open, 2 open."
    );
    describe_counter!(names::CIRCUIT_TRANSITIONS, "Circuit breaker state changes.");
    describe_gauge!(names::INFLIGHT, "Calls in flight.");
    describe_gauge!(names::OPEN_STREAMS, "Client streams open.");
    describe_counter!(
        names::LEDGER_DROPPED,
        "Usage records dropped: the ledger queue was full."
    );
    describe_counter!(names::LEDGER_WRITTEN, "Usage records written to the store.");
    describe_gauge!(
        names::BUDGET_USED,
        "Share of a budget spent in the current period."
    );
    describe_counter!(
        names::BUDGET_ALERTS,
        "Budget thresholds crossed (50, 80, 100 percent)."
    );
    describe_counter!(
        names::LIMITED,
        "Calls refused by the gateway's limits and budgets."
    );
    describe_gauge!(names::BUILD_INFO, "Build information.");
    describe_gauge!(names::CONNECTIONS_OPEN, "Client connections open.");
    describe_counter!(
        names::CONNECTIONS_CLOSED,
        "Client connections the gateway closed, by reason."
    );
    describe_counter!(
        names::CONNECTIONS_REFUSED,
        "Client connections refused at max_connections."
    );
    describe_counter!(names::ACCEPT_ERRORS, "Failed accepts, by kind.");
    describe_counter!(
        names::GUARDRAIL_DECISIONS,
        "Guardrail decisions, by direction, entity type and action."
    );
    describe_histogram!(
        names::GUARDRAIL_CHECK_SECONDS,
        Unit::Seconds,
        "External guardrail checks' latency, by check and phase."
    );
    describe_gauge!(
        names::SHARED_STATE_DEGRADED,
        "1 while the shared state (redis) is unreachable."
    );
    describe_counter!(
        names::SHARED_STATE_ERRORS,
        "Failed shared-state (redis) operations, by op."
    );
    describe_counter!(
        names::SHARED_LIMIT_ADMISSIONS,
        "Calls admitted by the shared limits, by via (credit: no round trip; redis)."
    );
    describe_counter!(
        names::PROVIDER_KEY_RESTS,
        "Provider API key rests, by provider, reason and source (local or peer)."
    );
    describe_counter!(
        names::PACING_SHARED_FALLBACK,
        "Pacing decisions made from local limits while redis was unreachable, by mode."
    );
    describe_counter!(
        names::SHADOW_DROPPED,
        "Shadow calls dropped, by policy and reason."
    );
    describe_counter!(
        names::SHADOW_CALLS,
        "Shadow calls made, by policy and code."
    );
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves; runs the exporter's upkeep.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let render = handle.clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = render.clone();
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    handle.render(),
                )
            }
        }),
    );
    let upkeep = tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
    if let Err(err) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!(error = %err, "metrics endpoint failed");
    }
    upkeep.abort();
}

/// Metric handles registered once per label set and reused: registering (hashing the name
/// and labels in the recorder) costs far more than incrementing. The label sets are bounded
/// (no ids), so the cache is too.
#[derive(Debug)]
pub struct HandleCache<T> {
    map: std::sync::Mutex<std::collections::HashMap<String, T>>,
}

impl<T: Clone> Default for HandleCache<T> {
    fn default() -> Self {
        Self {
            map: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }
}

impl<T: Clone> HandleCache<T> {
    /// The handles for `key` (the label values joined), registered with `make` on first use.
    pub fn get(&self, key: &str, make: impl FnOnce() -> T) -> T {
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(handles) = map.get(key) {
            return handles.clone();
        }
        let handles = make();
        map.insert(key.to_owned(), handles.clone());
        handles
    }
}

/// A small lock-free map from a `&'static str` label (an rpc name) to handles: the first
/// `N` labels each claim a slot, later ones fall back to a [`HandleCache`]. Reading a claimed
/// slot is a few atomic loads and a string comparison, with no lock and no allocation.
#[derive(Debug)]
pub struct StaticSlots<T, const N: usize> {
    slots: [std::sync::OnceLock<(&'static str, T)>; N],
    overflow: HandleCache<T>,
}

impl<T: Clone, const N: usize> Default for StaticSlots<T, N> {
    fn default() -> Self {
        Self {
            slots: std::array::from_fn(|_| std::sync::OnceLock::new()),
            overflow: HandleCache::default(),
        }
    }
}

impl<T: Clone, const N: usize> StaticSlots<T, N> {
    /// The handles for `label` when it has (or now claims) a slot, made with `make` on first
    /// use; `None` when every slot is taken by other labels.
    pub fn slot(&self, label: &'static str, make: impl Fn() -> T) -> Option<&T> {
        for slot in &self.slots {
            let (key, value) = slot.get_or_init(|| (label, make()));
            if *key == label {
                return Some(value);
            }
        }
        None
    }

    /// The handles for `label`, made with `make` on first use.
    pub fn get(&self, label: &'static str, make: impl Fn() -> T) -> T {
        match self.slot(label, &make) {
            Some(value) => value.clone(),
            None => self.overflow.get(label, make),
        }
    }
}

/// The metric handles of one call label set (`rpc`, `code`, `policy`, `provider`, `model`
/// and the configured tag labels): `llm_gateway_calls_total`, the call duration, time to
/// first token, tokens and cost.
#[derive(Clone)]
pub struct CallHandles {
    /// `llm_gateway_calls_total`.
    pub calls: metrics::Counter,
    /// `llm_gateway_call_duration_seconds`.
    pub duration: metrics::Histogram,
    /// `llm_gateway_time_to_first_token_seconds`.
    pub ttft: metrics::Histogram,
    /// `llm_gateway_tokens_total{type="input"}`.
    pub input_tokens: metrics::Counter,
    /// `llm_gateway_tokens_total{type="output"}`.
    pub output_tokens: metrics::Counter,
    /// `llm_gateway_tokens_total{type="cached_input"}`.
    pub cached_tokens: metrics::Counter,
    /// `llm_gateway_cost_usd`.
    pub cost: metrics::Histogram,
}

impl CallHandles {
    /// Registers the handles of one label set; `tags` are `(tag name, value)` pairs of the
    /// configured tag labels (labelled `tag_<name>`).
    pub fn register(
        rpc: &'static str,
        code: &'static str,
        policy: &str,
        provider: &str,
        model: &str,
        tags: &[(&str, &str)],
    ) -> Self {
        let target = |extra: Option<(&'static str, &'static str)>| {
            let mut l = vec![
                metrics::Label::new("policy", policy.to_owned()),
                metrics::Label::new("provider", provider.to_owned()),
                metrics::Label::new("model", model.to_owned()),
            ];
            l.extend(
                tags.iter()
                    .map(|(t, v)| metrics::Label::new(format!("tag_{t}"), (*v).to_owned())),
            );
            if let Some((k, v)) = extra {
                l.push(metrics::Label::new(k, v));
            }
            l
        };
        let mut call = vec![
            metrics::Label::new("rpc", rpc),
            metrics::Label::new("code", code),
        ];
        call.extend(target(None));
        CallHandles {
            calls: metrics::counter!(names::CALLS, call.clone()),
            duration: metrics::histogram!(names::CALL_DURATION, call),
            ttft: metrics::histogram!(names::TIME_TO_FIRST_TOKEN, target(None)),
            input_tokens: metrics::counter!(names::TOKENS, target(Some(("type", "input")))),
            output_tokens: metrics::counter!(names::TOKENS, target(Some(("type", "output")))),
            cached_tokens: metrics::counter!(names::TOKENS, target(Some(("type", "cached_input")))),
            cost: metrics::histogram!(names::COST, target(None)),
        }
    }
}

/// The attempt outcomes whose handles a target keeps: the ones every call reports.
const KEPT_OUTCOMES: [&str; 2] = ["succeeded", "cancelled"];

/// The metric handles of one routable target (a provider and a model, resolved for a policy
/// or as a concrete model), made once with the routing snapshot. Each handle is registered
/// with the recorder on first use and then read without a lock or a string key: attempts by
/// kind that succeeded or were cancelled, their durations, and the call handles of
/// successful calls per rpc (calls without tag labels). Rarer label sets (failures, skips,
/// tag labels) go through [`HandleCache`]s.
///
/// Handles are not registered up front so that `/metrics` shows only series that happened.
pub struct TargetMetrics {
    provider: std::sync::Arc<str>,
    model: std::sync::Arc<str>,
    policy: std::sync::Arc<str>,
    attempts: [[std::sync::OnceLock<metrics::Counter>; KEPT_OUTCOMES.len()]; 4],
    durations: [std::sync::OnceLock<metrics::Histogram>; KEPT_OUTCOMES.len()],
    calls: StaticSlots<CallHandles, 4>,
}

impl std::fmt::Debug for TargetMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TargetMetrics({}/{})", self.provider, self.model)
    }
}

fn kind_index(kind: crate::types::AttemptKind) -> usize {
    use crate::types::AttemptKind as K;
    match kind {
        K::Primary => 0,
        K::Fallback => 1,
        K::Hedge => 2,
        K::Retry => 3,
    }
}

impl TargetMetrics {
    /// The handles of `provider/model`, as routed by `policy` (empty for a concrete model).
    pub fn new(provider: &str, model: std::sync::Arc<str>, policy: &str) -> Self {
        Self {
            provider: std::sync::Arc::from(provider),
            model,
            policy: std::sync::Arc::from(policy),
            attempts: Default::default(),
            durations: Default::default(),
            calls: StaticSlots::default(),
        }
    }

    /// The configured provider's name.
    pub fn provider(&self) -> &std::sync::Arc<str> {
        &self.provider
    }

    /// The model at the provider.
    pub fn model(&self) -> &std::sync::Arc<str> {
        &self.model
    }

    /// The policy the target was resolved for (empty for a concrete model).
    pub fn policy(&self) -> &str {
        &self.policy
    }

    /// The attempt counter and duration histogram of an attempt of `kind` that ended with
    /// `outcome` (`succeeded`, `cancelled`, ...) and no error class; `None` for the outcomes
    /// this target does not keep.
    pub fn attempt(
        &self,
        kind: crate::types::AttemptKind,
        outcome: &'static str,
    ) -> Option<(&metrics::Counter, &metrics::Histogram)> {
        let o = KEPT_OUTCOMES.iter().position(|k| *k == outcome)?;
        let counter = self.attempts[kind_index(kind)][o].get_or_init(|| {
            metrics::counter!(
                names::ATTEMPTS,
                "provider" => self.provider.to_string(),
                "model" => self.model.to_string(),
                "kind" => kind.label(),
                "outcome" => outcome,
                "error_class" => ""
            )
        });
        let duration = self.durations[o].get_or_init(|| {
            metrics::histogram!(
                names::ATTEMPT_DURATION,
                "provider" => self.provider.to_string(),
                "model" => self.model.to_string(),
                "outcome" => outcome
            )
        });
        Some((counter, duration))
    }

    /// The call handles of a successful `rpc` call answered by this target, labelled with
    /// its policy and no tag labels; `None` when its rpc slots are taken by others.
    pub fn call_ok(&self, rpc: &'static str) -> Option<&CallHandles> {
        self.calls.slot(rpc, || {
            CallHandles::register(rpc, "OK", &self.policy, &self.provider, &self.model, &[])
        })
    }
}

/// The counters of one policy (hedges, fallbacks, deadline skips), made with the routing
/// snapshot and registered on first use.
#[derive(Debug, Default)]
pub struct PolicyCounters {
    policy: std::sync::Arc<str>,
    hedges_started: std::sync::OnceLock<metrics::Counter>,
    hedges_won: std::sync::OnceLock<metrics::Counter>,
    fallbacks: std::sync::OnceLock<metrics::Counter>,
    deadline_skips: std::sync::OnceLock<metrics::Counter>,
}

impl PolicyCounters {
    /// The counters of `policy` (empty for a concrete model).
    pub fn new(policy: &str) -> Self {
        Self {
            policy: std::sync::Arc::from(policy),
            ..Self::default()
        }
    }

    fn get<'a>(
        &'a self,
        slot: &'a std::sync::OnceLock<metrics::Counter>,
        name: &'static str,
    ) -> &'a metrics::Counter {
        slot.get_or_init(|| metrics::counter!(name, "policy" => self.policy.to_string()))
    }

    /// `llm_gateway_hedges_started_total`.
    pub fn hedges_started(&self) -> &metrics::Counter {
        self.get(&self.hedges_started, names::HEDGES_STARTED)
    }

    /// `llm_gateway_hedges_won_total`.
    pub fn hedges_won(&self) -> &metrics::Counter {
        self.get(&self.hedges_won, names::HEDGES_WON)
    }

    /// `llm_gateway_fallbacks_total`.
    pub fn fallbacks(&self) -> &metrics::Counter {
        self.get(&self.fallbacks, names::FALLBACKS)
    }

    /// `llm_gateway_deadline_skips_total`.
    pub fn deadline_skips(&self) -> &metrics::Counter {
        self.get(&self.deadline_skips, names::DEADLINE_SKIPS)
    }
}

/// The trace context of a call, propagated to upstream requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// The `traceparent` to send upstream (the caller's trace id, this call's parent id).
    pub traceparent: String,
    /// The caller's `tracestate`, passed through.
    pub tracestate: Option<String>,
}

tokio::task_local! {
    /// The trace context of the attempt being run.
    pub static TRACE_CONTEXT: TraceContext;
}

/// Continues a W3C `traceparent` (`00-<trace id>-<parent id>-<flags>`) with a new parent id
/// for this gateway's call. `None` when the value is not a valid version-00 traceparent.
pub fn continue_traceparent(incoming: &str) -> Option<String> {
    let parts: Vec<&str> = incoming.trim().split('-').collect();
    let [version, trace_id, parent_id, flags] = parts.as_slice() else {
        return None;
    };
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    if *version != "00"
        || !hex(trace_id, 32)
        || !hex(parent_id, 16)
        || !hex(flags, 2)
        || trace_id.bytes().all(|b| b == b'0')
        || parent_id.bytes().all(|b| b == b'0')
    {
        return None;
    }
    let mut span_id = fastrand::u64(..);
    if span_id == 0 {
        span_id = 1;
    }
    Some(format!("00-{trace_id}-{span_id:016x}-{flags}"))
}

/// The upstream headers for the current attempt's trace context, if any.
pub fn trace_headers() -> Option<TraceContext> {
    TRACE_CONTEXT.try_with(Clone::clone).ok()
}

/// Replaces things that look like API keys or bearer tokens with `[REDACTED]`.
pub fn redact(text: &str) -> String {
    const PREFIXES: &[&str] = &["sk-", "sk_", "AIza", "Bearer ", "bearer ", "x-api-key"];
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'outer: while !rest.is_empty() {
        for prefix in PREFIXES {
            if rest.starts_with(prefix) {
                let secret_len = rest[prefix.len()..]
                    .find(|c: char| {
                        !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
                    })
                    .unwrap_or(rest.len() - prefix.len());
                if secret_len >= 8 {
                    out.push_str(prefix);
                    out.push_str("[REDACTED]");
                    rest = &rest[prefix.len() + secret_len..];
                    continue 'outer;
                }
            }
        }
        let mut chars = rest.chars();
        if let Some(c) = chars.next() {
            out.push(c);
        }
        rest = chars.as_str();
    }
    out
}

/// Cuts `text` to at most `max` bytes on a char boundary, marking the cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...[{} more bytes]", &text[..end], text.len() - end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_continues_with_a_new_parent() {
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let out = continue_traceparent(incoming).unwrap();
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(out.ends_with("-01"));
        assert_ne!(out, incoming);
        assert_eq!(out.len(), incoming.len());
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert_eq!(continue_traceparent(bad), None, "{bad}");
        }
    }

    #[test]
    fn redaction_hides_keys() {
        let text = r#"{"key":"sk-proj-abcdefghijkl1234","auth":"Bearer abcdefghijklmnop","g":"AIzaSyA1234567890abcdefg","short":"sk-1"}"#;
        let red = redact(text);
        assert!(!red.contains("abcdefghijkl1234"), "{red}");
        assert!(!red.contains("abcdefghijklmnop"), "{red}");
        assert!(!red.contains("SyA1234567890"), "{red}");
        assert!(red.contains("sk-1"), "short strings stay: {red}");
    }

    #[test]
    fn static_slots_keep_each_label_apart_and_overflow() {
        let slots: StaticSlots<&'static str, 2> = StaticSlots::default();
        assert_eq!(slots.get("a", || "a"), "a");
        assert_eq!(slots.get("b", || "b"), "b");
        assert_eq!(slots.slot("c", || "c"), None, "both slots are taken");
        assert_eq!(slots.get("c", || "c"), "c");
        assert_eq!(slots.get("a", || "made again"), "a");
        assert_eq!(slots.get("c", || "made again"), "c");
    }

    #[test]
    fn a_target_keeps_handles_for_its_common_outcomes_only() {
        let t = TargetMetrics::new("p", std::sync::Arc::from("m"), "");
        use crate::types::AttemptKind;
        assert!(t.attempt(AttemptKind::Primary, "succeeded").is_some());
        assert!(t.attempt(AttemptKind::Hedge, "cancelled").is_some());
        assert!(t.attempt(AttemptKind::Primary, "failed").is_none());
        assert!(t.call_ok("Chat").is_some());
    }

    #[test]
    fn truncation_marks_the_cut() {
        assert_eq!(truncate("hello", 10), "hello");
        assert_eq!(truncate("hello world", 5), "hello...[6 more bytes]");
    }
}
