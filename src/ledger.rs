//! The usage and cost ledger: one record per call, written to the store without ever
//! blocking or slowing a call.
//!
//! Calls hand records to a bounded queue (`try_send`); when it is full the record is dropped
//! and counted (`llm_gateway_usage_records_dropped_total`), so memory never grows without
//! bound. One writer task drains the queue in batches (what gathered within
//! [`BATCH_INTERVAL`] of the first record, up to [`MAX_BATCH`], in one transaction), prunes records older than the retention period every
//! hour, and on shutdown writes what is queued within a bound, logging what it wrote and dropped.
//! A batch the store refuses (a database restarting) is retried with backoff up to
//! [`MAX_RETRY_BACKOFF`] while new records wait in the queue, so nothing queued is lost
//! to an outage the queue can absorb.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{settings::Issues, telemetry::names};

/// Most records written in one transaction.
pub const MAX_BATCH: usize = 2048;

/// How long the writer lets records gather before it writes a batch.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(100);

/// `[ledger]` as written in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLedger {
    /// `ledger.enabled`.
    pub enabled: Option<bool>,
    /// `ledger.queue_capacity`.
    pub queue_capacity: Option<usize>,
    /// `ledger.retention`: how long raw records are kept.
    pub retention: Option<String>,
    /// `ledger.rollup_retention`: how long per-minute rollups are kept.
    pub rollup_retention: Option<String>,
    /// `ledger.tenant_retention`: team -> how long its raw records are kept (shorter than
    /// `retention`).
    #[serde(default)]
    pub tenant_retention: BTreeMap<String, String>,
}

/// The validated `[ledger]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerSettings {
    /// The queue capacity, or `None` when the ledger is off.
    pub capacity: Option<usize>,
    /// How long raw usage records are kept (ExportUsage reads them).
    pub retention: Duration,
    /// How long per-minute rollups are kept (GetUsage and budget seeding read them).
    pub rollup_retention: Duration,
    /// Per tenant (the `team` tag, a key's owner): how long its raw records are kept.
    pub tenant_retention: BTreeMap<String, Duration>,
}

/// The shortest rollup retention: budget seeding reads the current month's rollups.
pub const MIN_ROLLUP_RETENTION: Duration = Duration::from_secs(32 * 24 * 3600);

impl LedgerSettings {
    /// Validates `[ledger]`.
    pub fn from_raw(raw: RawLedger, issues: &mut Issues) -> Self {
        let retention = issues.duration(
            "ledger.retention",
            raw.retention.as_deref(),
            Duration::from_secs(30 * 24 * 3600),
        );
        let mut tenant_retention = BTreeMap::new();
        for (team, value) in &raw.tenant_retention {
            let field = format!("ledger.tenant_retention.{team}");
            let d = issues.duration(&field, Some(value), retention);
            if d > retention {
                issues.push(
                    field,
                    "must not be longer than ledger.retention (which prunes every tenant)",
                );
            }
            tenant_retention.insert(team.clone(), d);
        }
        Self {
            tenant_retention,
            capacity: raw
                .enabled
                .unwrap_or(true)
                .then_some(raw.queue_capacity.unwrap_or(10_000).max(1)),
            retention,
            rollup_retention: {
                let d = issues.duration(
                    "ledger.rollup_retention",
                    raw.rollup_retention.as_deref(),
                    Duration::from_secs(400 * 24 * 3600),
                );
                if d < MIN_ROLLUP_RETENTION {
                    issues.push(
                        "ledger.rollup_retention",
                        "must be at least 32d: budgets are seeded from the month's rollups at start",
                    );
                }
                d
            },
        }
    }
}

/// What the gateway records about one call.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UsageRecord {
    /// When the call ended, Unix milliseconds.
    pub time_ms: i64,
    /// Request id.
    pub request_id: String,
    /// `Chat` or `ChatStream`.
    pub rpc: String,
    /// Gateway key name, when keys are in use.
    pub key: String,
    /// Request tags.
    pub tags: BTreeMap<String, String>,
    /// Policy, or empty.
    pub policy: String,
    /// Provider that answered or was last tried.
    pub provider: String,
    /// Model that answered or was last tried.
    pub model: String,
    /// Upstream attempts made.
    pub attempts: u32,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Cached input tokens.
    pub cached_input_tokens: u64,
    /// Whether the provider reported usage.
    pub usage_reported: bool,
    /// Cost in US dollars, when known.
    pub cost_usd: Option<f64>,
    /// Call duration in milliseconds.
    pub latency_ms: f64,
    /// Time to first token in milliseconds, for streams.
    pub ttft_ms: Option<f64>,
    /// gRPC code name, e.g. `OK`.
    pub code: String,
    /// Error class when the call failed.
    pub error_class: String,
    /// What the response cache did (`hit`, `miss`, `stored`, `bypass`; empty: off).
    pub cache: String,
    /// For a cache hit: what the original call cost (the hit itself costs zero).
    pub cost_saved_usd: Option<f64>,
    /// The call's guardrail decisions, `direction:entity:action=count` comma-separated
    /// (e.g. `request:email:redact=2,reply:credit_card:block=1`); empty when none.
    pub guardrails: String,
    /// The policy version that served the call (0 for a concrete model).
    pub policy_version: u64,
    /// During a rollout: `baseline` or `canary`; empty otherwise.
    pub rollout_arm: String,
    /// The experiment arm and shadow link of the call (empty for most calls).
    pub trial: Trial,
    /// The call's redacted prompt and reply, when its key keeps content (stored apart, in
    /// `usage_content`, until it expires).
    pub content: Option<Box<Content>>,
}

/// The kept content of one call: prompt and reply, every built-in entity type redacted.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Content {
    /// The request's messages as sent, `role: text` per line.
    pub prompt: String,
    /// The reply's text (empty when the call failed).
    pub reply: String,
    /// The key's owning team.
    pub tenant: String,
    /// When it is deleted, Unix milliseconds.
    pub expires_ms: i64,
}

/// Kept content as read back (GetUsageContent).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StoredContent {
    /// The call's request id.
    pub request_id: String,
    /// When the call ended, Unix milliseconds.
    pub time_ms: i64,
    /// The key's name.
    pub key: String,
    /// The content.
    pub content: Content,
}

/// The `rpc` of shadow calls' records: GetUsage and budget seeding leave them out unless a
/// query filters on `rpc` itself.
pub const SHADOW_RPC: &str = "Shadow";

/// Where a call stands in an experiment, and for a shadow call its primary.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Trial {
    /// The experiment the call (or its primary) was assigned in, or empty.
    pub experiment: String,
    /// The arm, or empty.
    pub arm: String,
    /// For a shadow call: the primary call's request id; empty otherwise.
    pub shadow_of: String,
    /// For a shadow call whose primary and own reply both exist: how they compare.
    pub comparison: Option<Comparison>,
}

/// A cheap comparison of a shadow reply with its primary's.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Comparison {
    /// Shadow reply length / primary reply length in characters (`None` when the primary
    /// reply is empty and the shadow's is not).
    pub length_ratio: Option<f64>,
    /// The replies are equal.
    pub exact_match: bool,
    /// In JSON mode: both parse and are equal as JSON values; `None` outside JSON mode.
    pub json_agree: Option<bool>,
    /// The shadow's finish reason (`stop`, `length`, ...).
    pub finish_reason: String,
}

/// What the ledger needs of durable storage: append usage records, read them back, prune
/// old ones. The ledger owns this interface and the store implements it, so the ledger
/// depends on no storage backend.
#[async_trait::async_trait]
pub trait UsageSink: Send + Sync + 'static {
    /// Appends records in one transaction.
    async fn insert_usage(&self, records: Vec<UsageRecord>) -> Result<(), SinkError>;

    /// Records with `from_ms <= time_ms < to_ms`, oldest first.
    async fn usage_between(&self, from_ms: i64, to_ms: i64) -> Result<Vec<UsageRecord>, SinkError>;

    /// Deletes records older than `cutoff_ms`; returns how many.
    async fn delete_usage_before(&self, cutoff_ms: i64) -> Result<u64, SinkError>;

    /// Deletes the records of `tenant` (the `team` tag) older than `cutoff_ms`; returns how
    /// many.
    async fn delete_tenant_usage_before(
        &self,
        tenant: &str,
        cutoff_ms: i64,
    ) -> Result<u64, SinkError> {
        let _ = (tenant, cutoff_ms);
        Err(SinkError(
            "this usage sink cannot prune per tenant".to_owned(),
        ))
    }

    /// GetUsage: the query's groups, aggregated by the database over the per-minute
    /// rollups ([`usage_sql`]). Sinks without rollups refuse.
    async fn usage_groups(&self, query: &UsageQuery) -> Result<Vec<UsageGroup>, SinkError> {
        let _ = query;
        Err(SinkError("this usage sink keeps no rollups".to_owned()))
    }

    /// ExportUsage: up to `limit` records with `from_ms <= time_ms < to_ms` after the keyset
    /// cursor `after` (`(time_ms, id)` of the last record of the previous page), oldest
    /// first, each with its id.
    async fn usage_page(
        &self,
        from_ms: i64,
        to_ms: i64,
        after: Option<(i64, i64)>,
        limit: usize,
    ) -> Result<Vec<(i64, UsageRecord)>, SinkError> {
        let _ = (from_ms, to_ms, after, limit);
        Err(SinkError("this usage sink cannot page".to_owned()))
    }

    /// Spend per UTC day, key and team since `from_ms`, from the rollups (budget seeding).
    async fn day_spend(&self, from_ms: i64) -> Result<Vec<DaySpend>, SinkError> {
        let _ = from_ms;
        Err(SinkError("this usage sink keeps no rollups".to_owned()))
    }

    /// Deletes rollups of minutes before `cutoff_ms`; returns how many rows.
    async fn delete_rollups_before(&self, cutoff_ms: i64) -> Result<u64, SinkError> {
        let _ = cutoff_ms;
        Ok(0)
    }

    /// The kept content of the call `request_id` that has not expired at `now_ms`.
    async fn usage_content(
        &self,
        request_id: &str,
        now_ms: i64,
    ) -> Result<Vec<StoredContent>, SinkError> {
        let _ = (request_id, now_ms);
        Err(SinkError("this usage sink keeps no content".to_owned()))
    }

    /// Deletes kept content that expired before `now_ms`; returns how many.
    async fn delete_expired_content(&self, now_ms: i64) -> Result<u64, SinkError> {
        let _ = now_ms;
        Ok(0)
    }
}

/// Why a [`UsageSink`] failed: its backend's description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SinkError(pub String);

/// The sending side of the ledger; cheap to clone.
#[derive(Debug, Clone)]
pub struct Ledger {
    tx: Option<mpsc::Sender<UsageRecord>>,
}

/// The writer task; [`LedgerWriter::finish`] stops it after it wrote what is queued.
#[derive(Debug)]
pub struct LedgerWriter {
    handle: JoinHandle<()>,
    stop: CancellationToken,
    flush: Arc<FlushCounts>,
}

/// What the final flush did.
#[derive(Debug, Default)]
struct FlushCounts {
    /// Records queued when the flush began.
    queued: AtomicU64,
    /// Of those, written.
    written: AtomicU64,
}

/// The outcome of [`LedgerWriter::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushOutcome {
    /// Records the final flush wrote.
    pub written: u64,
    /// Records it could not write (the store failed or the time ran out).
    pub dropped: u64,
    /// Whether the time ran out.
    pub timed_out: bool,
}

impl Ledger {
    /// A ledger that records nothing.
    pub fn disabled() -> Self {
        Self { tx: None }
    }

    /// Starts the writer over `store` with a queue of `capacity` records.
    pub fn start(
        store: Arc<dyn UsageSink>,
        capacity: usize,
        retention: Duration,
        rollup_retention: Duration,
    ) -> (Ledger, LedgerWriter) {
        Self::start_with_tenants(
            store,
            capacity,
            retention,
            rollup_retention,
            BTreeMap::new(),
        )
    }

    /// [`Ledger::start`], also pruning each tenant's records past its own retention.
    pub fn start_with_tenants(
        store: Arc<dyn UsageSink>,
        capacity: usize,
        retention: Duration,
        rollup_retention: Duration,
        tenant_retention: BTreeMap<String, Duration>,
    ) -> (Ledger, LedgerWriter) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let stop = CancellationToken::new();
        let flush = Arc::new(FlushCounts::default());
        let handle = tokio::spawn(write_loop(
            store,
            rx,
            [retention, rollup_retention],
            tenant_retention,
            stop.clone(),
            flush.clone(),
        ));
        (
            Ledger { tx: Some(tx) },
            LedgerWriter {
                handle,
                stop,
                flush,
            },
        )
    }

    /// Queues a record; drops (and counts) it when the queue is full.
    pub fn record(&self, record: UsageRecord) {
        let Some(tx) = &self.tx else {
            return;
        };
        if tx.try_send(record).is_err() {
            metrics::counter!(names::LEDGER_DROPPED).increment(1);
        }
    }
}

impl LedgerWriter {
    /// Stops the writer: what is queued now is written within `timeout` (records that come
    /// later are dropped and counted), and the outcome is logged with its counts. The
    /// writer does not wait for the [`Ledger`] clones to go away.
    pub async fn finish(mut self, timeout: Duration) -> FlushOutcome {
        self.stop.cancel();
        let timed_out = tokio::time::timeout(timeout, &mut self.handle)
            .await
            .is_err();
        if timed_out {
            self.handle.abort();
        }
        let queued = self.flush.queued.load(Ordering::Acquire);
        let written = self.flush.written.load(Ordering::Acquire);
        let outcome = FlushOutcome {
            written,
            dropped: queued.saturating_sub(written),
            timed_out,
        };
        if timed_out {
            // Failed writes count themselves; these were never tried or never confirmed.
            metrics::counter!(names::LEDGER_DROPPED).increment(outcome.dropped);
            tracing::warn!(
                written = outcome.written,
                dropped = outcome.dropped,
                timeout = ?timeout,
                "usage ledger: the final flush ran out of time; the rest is dropped"
            );
        } else if outcome.dropped > 0 {
            tracing::warn!(
                written = outcome.written,
                dropped = outcome.dropped,
                "usage ledger: the final flush could not write every record"
            );
        } else {
            tracing::info!(
                written = outcome.written,
                dropped = 0,
                "usage ledger flushed"
            );
        }
        outcome
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

async fn write_loop(
    store: Arc<dyn UsageSink>,
    mut rx: mpsc::Receiver<UsageRecord>,
    [retention, rollup_retention]: [Duration; 2],
    tenant_retention: BTreeMap<String, Duration>,
    stop: CancellationToken,
    flush: Arc<FlushCounts>,
) {
    let mut prune = tokio::time::interval(Duration::from_secs(3600));
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        tokio::select! {
            // The stop wins over more records: the final flush takes those.
            biased;
            () = stop.cancelled() => break,
            record = rx.recv() => {
                let Some(record) = record else { break };
                batch.push(record);
                // Let a batch gather: one transaction per interval instead of one per call
                // keeps the writer's cost per record small under load.
                tokio::time::sleep(BATCH_INTERVAL).await;
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                write_retrying(&*store, &mut batch, &stop).await;
            }
            _ = prune.tick() => {
                let cutoff = |d: Duration| now_ms() - i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
                match store.delete_usage_before(cutoff(retention)).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(records = n, "pruned usage records past retention"),
                    Err(e) => tracing::warn!(error = %e, "pruning usage records failed"),
                }
                match store.delete_rollups_before(cutoff(rollup_retention)).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(rows = n, "pruned usage rollups past retention"),
                    Err(e) => tracing::warn!(error = %e, "pruning usage rollups failed"),
                }
                match store.delete_expired_content(now_ms()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(records = n, "pruned expired usage content"),
                    Err(e) => tracing::warn!(error = %e, "pruning usage content failed"),
                }
                for (tenant, keep) in &tenant_retention {
                    match store.delete_tenant_usage_before(tenant, cutoff(*keep)).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(tenant = %tenant, records = n, "pruned a tenant's usage records past its retention"),
                        Err(e) => tracing::warn!(tenant = %tenant, error = %e, "pruning a tenant's usage records failed"),
                    }
                }
            }
        }
    }
    // The final flush: what is queued now; later records are refused (and counted).
    rx.close();
    while let Ok(record) = rx.try_recv() {
        batch.push(record);
    }
    flush.queued.store(batch.len() as u64, Ordering::Release);
    while !batch.is_empty() {
        let mut rest = batch.split_off(batch.len().min(MAX_BATCH));
        std::mem::swap(&mut batch, &mut rest);
        let written = write(&*store, &mut rest).await;
        flush.written.fetch_add(written, Ordering::AcqRel);
    }
}

/// Writes and empties `batch`, retrying while the store fails (it may be restarting): new
/// records wait in the bounded queue meanwhile, and those it has no room for are dropped
/// and counted by [`Ledger::record`]. On `stop` the batch goes back to the final flush.
async fn write_retrying(
    store: &dyn UsageSink,
    batch: &mut Vec<UsageRecord>,
    stop: &CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    while !batch.is_empty() {
        match store.insert_usage(batch.clone()).await {
            Ok(()) => {
                metrics::counter!(names::LEDGER_WRITTEN).increment(batch.len() as u64);
                batch.clear();
            }
            Err(e) => {
                tracing::warn!(error = %e, records = batch.len(), retry_in = ?backoff, "writing usage records failed; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_RETRY_BACKOFF);
            }
        }
    }
}

/// The longest wait between two tries of a failed write.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(2);

/// Writes and empties `batch` (one try); returns how many records were written.
async fn write(store: &dyn UsageSink, batch: &mut Vec<UsageRecord>) -> u64 {
    if batch.is_empty() {
        return 0;
    }
    let records = std::mem::take(batch);
    let n = records.len() as u64;
    match store.insert_usage(records).await {
        Ok(()) => {
            metrics::counter!(names::LEDGER_WRITTEN).increment(n);
            n
        }
        Err(e) => {
            metrics::counter!(names::LEDGER_DROPPED).increment(n);
            tracing::warn!(error = %e, records = n, "writing usage records failed");
            0
        }
    }
}

/// Totals of a set of records.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Totals {
    /// Calls.
    pub calls: u64,
    /// Non-OK calls.
    pub errors: u64,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Cached input tokens.
    pub cached_input_tokens: u64,
    /// Cost.
    pub cost_usd: f64,
    /// Calls without reported usage.
    pub calls_without_usage: u64,
    /// Latency p50/p95/p99 in ms.
    pub latency_ms: [Option<f64>; 3],
    /// TTFT p50/p95 in ms.
    pub ttft_ms: [Option<f64>; 2],
    /// Guardrail decisions (the sum of their counts) of a query naming a guardrail
    /// dimension; 0 otherwise.
    pub guardrail_decisions: u64,
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted.get(rank.min(sorted.len() - 1)).copied()
}

/// The value of a grouping dimension for a record; `None` for an unknown dimension.
pub fn dimension<'a>(record: &'a UsageRecord, name: &str) -> Option<&'a str> {
    Some(match name {
        "provider" => &record.provider,
        "model" => &record.model,
        "policy" => &record.policy,
        "key" => &record.key,
        "rpc" => &record.rpc,
        "code" => &record.code,
        _ => {
            let tag = name.strip_prefix("tag:")?;
            return Some(record.tags.get(tag).map_or("", String::as_str));
        }
    })
}

/// Whether `name` is a GetUsage dimension: one [`dimension`] knows, or one of
/// [`GUARDRAIL_DIMENSIONS`] (a record may have several values of those).
pub fn valid_dimension(name: &str) -> bool {
    matches!(
        name,
        "provider" | "model" | "policy" | "key" | "rpc" | "code"
    ) || guardrail_dimension(name).is_some()
        || name.strip_prefix("tag:").is_some_and(|t| !t.is_empty())
}

/// The GetUsage dimensions of guardrail decisions, in the order of their columns in
/// `usage_guardrail_minute` (`phase`, `entity`, `action`) and of the bits of its
/// `grouping` column (1, 2, 4).
pub const GUARDRAIL_DIMENSIONS: [&str; 3] =
    ["guardrail_phase", "guardrail_entity", "guardrail_action"];

/// The columns of [`GUARDRAIL_DIMENSIONS`] in `usage_guardrail_minute`.
const GUARDRAIL_COLUMNS: [&str; 3] = ["phase", "entity", "action"];

/// The position of a guardrail dimension in [`GUARDRAIL_DIMENSIONS`].
fn guardrail_dimension(name: &str) -> Option<usize> {
    GUARDRAIL_DIMENSIONS.iter().position(|d| *d == name)
}

/// The `grouping` bits of the guardrail dimensions a query names (in `group_by` or
/// `filter`).
fn guardrail_grouping<'a>(names: impl IntoIterator<Item = &'a str>) -> i64 {
    names
        .into_iter()
        .filter_map(guardrail_dimension)
        .fold(0, |bits, i| bits | (1 << i))
}

/// One guardrail decision of a record's `guardrails`: phase (`request`/`reply`), entity,
/// action, count.
pub type Decision<'a> = (&'a str, &'a str, &'a str, u64);

/// Parses a record's `guardrails` (`phase:entity:action=count`, comma-separated); entries
/// not of that form are left out.
pub fn parse_guardrails(text: &str) -> Vec<Decision<'_>> {
    text.split(',')
        .filter_map(|entry| {
            let (decision, count) = entry.rsplit_once('=')?;
            let (phase, rest) = decision.split_once(':')?;
            let (entity, action) = rest.rsplit_once(':')?;
            let count = count.parse().ok()?;
            (!phase.is_empty() && !entity.is_empty() && !action.is_empty())
                .then_some((phase, entity, action, count))
        })
        .collect()
}

/// Aggregates records.
pub fn totals<'a>(records: impl IntoIterator<Item = &'a UsageRecord>) -> Totals {
    let mut t = Totals::default();
    let mut latencies = Vec::new();
    let mut ttfts = Vec::new();
    for r in records {
        t.calls += 1;
        if r.code != "OK" {
            t.errors += 1;
        }
        if r.usage_reported {
            t.input_tokens += r.input_tokens;
            t.output_tokens += r.output_tokens;
            t.cached_input_tokens += r.cached_input_tokens;
        } else {
            t.calls_without_usage += 1;
        }
        t.cost_usd += r.cost_usd.unwrap_or(0.0);
        latencies.push(r.latency_ms);
        if let Some(v) = r.ttft_ms {
            ttfts.push(v);
        }
    }
    latencies.sort_by(f64::total_cmp);
    ttfts.sort_by(f64::total_cmp);
    t.latency_ms = [
        percentile(&latencies, 50.0),
        percentile(&latencies, 95.0),
        percentile(&latencies, 99.0),
    ];
    t.ttft_ms = [percentile(&ttfts, 50.0), percentile(&ttfts, 95.0)];
    t
}

/// Upper bounds (ms) of the latency and time-to-first-token histogram buckets that rollups
/// keep; one more bucket holds what is above the last bound. A percentile over rollups is the
/// upper bound of the bucket it falls in: at most 2.5x the true value (1-2-5 steps).
pub const HISTOGRAM_BOUNDS_MS: [f64; 19] = [
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    20.0,
    50.0,
    100.0,
    200.0,
    500.0,
    1_000.0,
    2_000.0,
    5_000.0,
    10_000.0,
    20_000.0,
    50_000.0,
    100_000.0,
    300_000.0,
    1_800_000.0,
];

/// Buckets per histogram.
pub const BUCKETS: usize = HISTOGRAM_BOUNDS_MS.len() + 1;

/// The rollup period: rollups sum the records of one UTC minute.
pub const ROLLUP_MS: i64 = 60_000;

/// The dimensions of a rollup row, in column order (all text; `tags` is the JSON object).
pub const ROLLUP_DIMENSIONS: [&str; 8] = [
    "key",
    "policy",
    "provider",
    "model",
    "rpc",
    "code",
    "error_class",
    "tags",
];

/// The integer sums of a rollup row, in column order (then `cost_usd`, then the histograms).
pub const ROLLUP_COUNTS: [&str; 6] = [
    "calls",
    "errors",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "calls_without_usage",
];

fn bucket(ms: f64) -> usize {
    HISTOGRAM_BOUNDS_MS
        .iter()
        .position(|b| ms <= *b)
        .unwrap_or(HISTOGRAM_BOUNDS_MS.len())
}

/// The rollup table's histogram columns: `lat_0.. lat_19, ttft_0 .. ttft_19`.
pub fn histogram_columns() -> Vec<String> {
    (0..BUCKETS)
        .map(|i| format!("lat_{i}"))
        .chain((0..BUCKETS).map(|i| format!("ttft_{i}")))
        .collect()
}

/// One per-minute rollup row: the values of [`ROLLUP_DIMENSIONS`] and the minute's sums.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rollup {
    /// The minute's start, Unix ms.
    pub minute_ms: i64,
    /// The dimension values, in [`ROLLUP_DIMENSIONS`] order.
    pub dimensions: [String; 8],
    /// The sums of [`ROLLUP_COUNTS`], in order.
    pub counts: [i64; 6],
    /// The cost sum.
    pub cost_usd: f64,
    /// Calls per latency bucket, then per time-to-first-token bucket (`2 * BUCKETS`).
    pub histograms: Vec<i64>,
}

impl Rollup {
    /// The parameters of [`rollup_upsert_sql`] for this row, in order.
    pub fn params(&self) -> Vec<SqlParam> {
        std::iter::once(SqlParam::Int(self.minute_ms))
            .chain(self.dimensions.iter().cloned().map(SqlParam::Text))
            .chain(self.counts.iter().copied().map(SqlParam::Int))
            .chain([SqlParam::Real(self.cost_usd)])
            .chain(self.histograms.iter().copied().map(SqlParam::Int))
            .collect()
    }
}

/// The marker that stands for the rollup migration in a store's migration list: the
/// store runs [`rollup_table_sql`] and [`rollup_backfill_sql`] of its dialect there.
pub const ROLLUP_MIGRATION: &str = "-- the usage_minute rollups (ledger::rollup_table_sql)";

/// The rollup deltas of a batch of records (one per minute and dimension values).
pub fn rollups(records: &[UsageRecord]) -> Vec<Rollup> {
    // Keyed by borrowed dimensions (the same order as the owned ones: tags last), so a
    // record that adds to an existing row copies no string.
    let mut out: BTreeMap<(i64, [&str; 7], String), Rollup> = BTreeMap::new();
    for r in records {
        let minute_ms = r.time_ms.div_euclid(ROLLUP_MS) * ROLLUP_MS;
        let row = out
            .entry((minute_ms, borrowed_dimensions(r), tags_json(r)))
            .or_insert_with_key(|(_, d, tags)| empty_rollup(minute_ms, d, tags));
        add_call(row, r);
    }
    out.into_values().collect()
}

/// A record's `tags` dimension: the JSON object.
fn tags_json(r: &UsageRecord) -> String {
    match r.tags.is_empty() {
        true => "{}".to_owned(),
        false => serde_json::to_string(&r.tags).unwrap_or_else(|_| "{}".to_owned()),
    }
}

/// A record's [`ROLLUP_DIMENSIONS`] but the tags.
fn borrowed_dimensions(r: &UsageRecord) -> [&str; 7] {
    [
        r.key.as_str(),
        &r.policy,
        &r.provider,
        &r.model,
        &r.rpc,
        &r.code,
        &r.error_class,
    ]
}

/// A rollup row with nothing counted yet.
fn empty_rollup(minute_ms: i64, d: &[&str; 7], tags: &str) -> Rollup {
    Rollup {
        minute_ms,
        dimensions: [
            d[0].to_owned(),
            d[1].to_owned(),
            d[2].to_owned(),
            d[3].to_owned(),
            d[4].to_owned(),
            d[5].to_owned(),
            d[6].to_owned(),
            tags.to_owned(),
        ],
        histograms: vec![0; 2 * BUCKETS],
        ..Rollup::default()
    }
}

/// Adds one call to a rollup row.
fn add_call(row: &mut Rollup, r: &UsageRecord) {
    let tokens = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    row.counts[0] += 1;
    row.counts[1] += i64::from(r.code != "OK");
    if r.usage_reported {
        row.counts[2] += tokens(r.input_tokens);
        row.counts[3] += tokens(r.output_tokens);
        row.counts[4] += tokens(r.cached_input_tokens);
    } else {
        row.counts[5] += 1;
    }
    row.cost_usd += r.cost_usd.unwrap_or(0.0);
    row.histograms[bucket(r.latency_ms)] += 1;
    if let Some(ttft) = r.ttft_ms {
        row.histograms[BUCKETS + bucket(ttft)] += 1;
    }
}

/// The SQL dialect of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite (`?N` parameters, `json_extract`).
    Sqlite,
    /// PostgreSQL (`$N` parameters, `->>`).
    Postgres,
}

/// A bound parameter of a generated query.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlParam {
    /// An integer.
    Int(i64),
    /// A text.
    Text(String),
    /// A float.
    Real(f64),
}

/// What GetUsage asks of the rollups: the minutes overlapping `[from_ms, to_ms)`, grouped by
/// dimensions ([`valid_dimension`] names), filtered by dimension values.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UsageQuery {
    /// Start, Unix ms (rounded down to its minute).
    pub from_ms: i64,
    /// End, Unix ms (rounded up to a minute).
    pub to_ms: i64,
    /// Dimensions to group by.
    pub group_by: Vec<String>,
    /// Dimension values every counted record has.
    pub filter: Vec<(String, String)>,
    /// Count only the calls that had a guardrail decision (matching the filter), each once,
    /// with their decisions, even when no guardrail dimension is named (the total of a
    /// query grouped by one).
    pub guardrail_calls: bool,
}

/// One group of a [`UsageQuery`]'s answer.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageGroup {
    /// The value of each `group_by` dimension, in order.
    pub key: Vec<String>,
    /// The group's totals.
    pub totals: Totals,
}

struct Sql {
    dialect: Dialect,
    params: Vec<SqlParam>,
}

impl Sql {
    fn param(&mut self, p: SqlParam) -> String {
        self.params.push(p);
        match self.dialect {
            Dialect::Sqlite => format!("?{}", self.params.len()),
            Dialect::Postgres => format!("${}", self.params.len()),
        }
    }

    /// The SQL expression of a dimension; `None` for an unknown one.
    fn dimension(&mut self, name: &str) -> Option<String> {
        if let Some(column) = ["provider", "model", "policy", "key", "rpc", "code"]
            .into_iter()
            .find(|c| *c == name)
        {
            return Some(column.to_owned());
        }
        if let Some(i) = guardrail_dimension(name) {
            return GUARDRAIL_COLUMNS.get(i).map(|c| (*c).to_owned());
        }
        let tag = name.strip_prefix("tag:").filter(|t| !t.is_empty())?;
        Some(self.tag(tag))
    }

    fn tag(&mut self, tag: &str) -> String {
        match self.dialect {
            Dialect::Sqlite => {
                let path = self.param(SqlParam::Text(format!(
                    "$.\"{}\"",
                    tag.replace('"', "\\\"")
                )));
                format!("COALESCE(json_extract(tags, {path}), '')")
            }
            Dialect::Postgres => {
                let key = self.param(SqlParam::Text(tag.to_owned()));
                format!("COALESCE(tags::jsonb ->> {key}::TEXT, '')")
            }
        }
    }
}

/// The query of a [`UsageQuery`] over the per-minute rollups, with its parameters: over
/// `usage_minute`, or over `usage_guardrail_minute` when it names a guardrail dimension (or
/// asks for [`UsageQuery::guardrail_calls`]), at the `grouping` of the guardrail dimensions
/// it names, so each group counts a call once. Its rows: one text column per `group_by`
/// dimension, then the [`ROLLUP_COUNTS`] sums (BIGINT), the cost sum, the histogram sums
/// (BIGINT), and the guardrail decisions (BIGINT; 0 over `usage_minute`); read them with
/// [`usage_group`]. `None` when it names an unknown dimension.
pub fn usage_sql(query: &UsageQuery, dialect: Dialect) -> Option<(String, Vec<SqlParam>)> {
    let mut sql = Sql {
        dialect,
        params: Vec::new(),
    };
    let from = sql.param(SqlParam::Int(
        query.from_ms.div_euclid(ROLLUP_MS) * ROLLUP_MS,
    ));
    let to = sql.param(SqlParam::Int(
        query
            .to_ms
            .saturating_add(ROLLUP_MS - 1)
            .div_euclid(ROLLUP_MS)
            * ROLLUP_MS,
    ));
    let mut groups = Vec::new();
    for dim in &query.group_by {
        groups.push(sql.dimension(dim)?);
    }
    let mut filters = vec![format!("minute_ms >= {from}"), format!("minute_ms < {to}")];
    if !query.filter.iter().any(|(dim, _)| dim == "rpc") {
        let shadow = sql.param(SqlParam::Text(SHADOW_RPC.to_owned()));
        filters.push(format!("rpc <> {shadow}"));
    }
    for (dim, value) in &query.filter {
        let expr = sql.dimension(dim)?;
        let value = sql.param(SqlParam::Text(value.clone()));
        filters.push(format!("{expr} = {value}"));
    }
    let grouping = guardrail_grouping(
        query
            .group_by
            .iter()
            .chain(query.filter.iter().map(|(dim, _)| dim))
            .map(String::as_str),
    );
    let (table, decisions) = if grouping != 0 || query.guardrail_calls {
        let bits = sql.param(SqlParam::Int(grouping));
        filters.push(format!("grouped_by = {bits}"));
        (
            GUARDRAIL_TABLE,
            "CAST(COALESCE(SUM(decisions), 0) AS BIGINT)",
        )
    } else {
        ("usage_minute", "CAST(0 AS BIGINT)")
    };
    let sum = |c: &str| format!("CAST(COALESCE(SUM({c}), 0) AS BIGINT)");
    let columns: Vec<String> = groups
        .iter()
        .cloned()
        .chain(ROLLUP_COUNTS.iter().map(|c| sum(c)))
        .chain(["COALESCE(SUM(cost_usd), 0.0)".to_owned()])
        .chain(histogram_columns().iter().map(|c| sum(c)))
        .chain([decisions.to_owned()])
        .collect();
    let mut text = format!(
        "SELECT {} FROM {table} WHERE {}",
        columns.join(", "),
        filters.join(" AND ")
    );
    if !groups.is_empty() {
        let positions: Vec<String> = (1..=groups.len()).map(|i| i.to_string()).collect();
        text.push_str(&format!(" GROUP BY {}", positions.join(", ")));
    }
    Some((text, sql.params))
}

/// Whether a query's `group_by` or `filter` names a guardrail dimension.
pub fn names_guardrails<'a>(names: impl IntoIterator<Item = &'a str>) -> bool {
    guardrail_grouping(names) != 0
}

/// A row of [`usage_sql`]: `dims` texts, then the sums.
pub fn usage_group(
    dims: Vec<String>,
    counts: [i64; 6],
    cost_usd: f64,
    histograms: &[i64],
    guardrail_decisions: i64,
) -> UsageGroup {
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    let (latency, ttft) = histograms.split_at(BUCKETS.min(histograms.len()));
    UsageGroup {
        key: dims,
        totals: Totals {
            calls: n(counts[0]),
            errors: n(counts[1]),
            input_tokens: n(counts[2]),
            output_tokens: n(counts[3]),
            cached_input_tokens: n(counts[4]),
            calls_without_usage: n(counts[5]),
            cost_usd,
            latency_ms: [
                histogram_percentile(latency, 50.0),
                histogram_percentile(latency, 95.0),
                histogram_percentile(latency, 99.0),
            ],
            ttft_ms: [
                histogram_percentile(ttft, 50.0),
                histogram_percentile(ttft, 95.0),
            ],
            guardrail_decisions: n(guardrail_decisions),
        },
    }
}

/// The upper bound of the bucket holding the `p`th percentile (the last bound for the open
/// bucket); `None` for an empty histogram.
pub fn histogram_percentile(counts: &[i64], p: f64) -> Option<f64> {
    let total: i64 = counts.iter().sum();
    if total <= 0 {
        return None;
    }
    let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as i64;
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return HISTOGRAM_BOUNDS_MS
                .get(i)
                .or(HISTOGRAM_BOUNDS_MS.last())
                .copied();
        }
    }
    HISTOGRAM_BOUNDS_MS.last().copied()
}

/// The rollup table and its indexes. `int` and `real` are the dialect's type names. Frozen:
/// it is a published migration of both stores.
pub fn rollup_table_sql(dialect: Dialect) -> String {
    let (int, real, strict) = match dialect {
        Dialect::Sqlite => ("INTEGER", "REAL", " STRICT"),
        Dialect::Postgres => ("BIGINT", "DOUBLE PRECISION", ""),
    };
    let mut columns = vec![format!("minute_ms {int} NOT NULL")];
    columns.extend(
        ROLLUP_DIMENSIONS
            .iter()
            .map(|d| format!("{d} TEXT NOT NULL")),
    );
    columns.extend(
        ROLLUP_COUNTS
            .iter()
            .map(|c| format!("{c} {int} NOT NULL DEFAULT 0")),
    );
    columns.push(format!("cost_usd {real} NOT NULL DEFAULT 0"));
    columns.extend(
        histogram_columns()
            .iter()
            .map(|c| format!("{c} {int} NOT NULL DEFAULT 0")),
    );
    format!(
        "CREATE TABLE usage_minute ({}){strict};
        CREATE UNIQUE INDEX usage_minute_row ON usage_minute (minute_ms, {});",
        columns.join(", "),
        ROLLUP_DIMENSIONS.join(", ")
    )
}

/// [`rollup_upsert_sql`], built once per dialect (every batch the writer stores uses it).
pub fn rollup_upsert(dialect: Dialect) -> &'static str {
    static SQLITE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static POSTGRES: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    match dialect {
        Dialect::Sqlite => SQLITE.get_or_init(|| rollup_upsert_sql(dialect)),
        Dialect::Postgres => POSTGRES.get_or_init(|| rollup_upsert_sql(dialect)),
    }
}

/// Adds rollup deltas to their rows (`INSERT ... ON CONFLICT DO UPDATE`), with the
/// dialect's parameters: 1 minute, 8 dimensions, 6 counts, cost, 40 histogram buckets.
pub fn rollup_upsert_sql(dialect: Dialect) -> String {
    let sums: Vec<String> = ROLLUP_COUNTS
        .iter()
        .map(|c| (*c).to_owned())
        .chain(["cost_usd".to_owned()])
        .chain(histogram_columns())
        .collect();
    add_to_rows_sql(dialect, "usage_minute", &ROLLUP_DIMENSIONS, &sums)
}

/// `INSERT INTO table (minute_ms, keys.., sums..) VALUES (..) ON CONFLICT (minute_ms, keys..)
/// DO UPDATE SET sum = table.sum + excluded.sum, ..`, with the dialect's parameters in
/// column order: the upsert of both rollup tables.
fn add_to_rows_sql(dialect: Dialect, table: &str, keys: &[&str], sums: &[String]) -> String {
    let p = |i: usize| match dialect {
        Dialect::Sqlite => format!("?{i}"),
        Dialect::Postgres => format!("${i}"),
    };
    let all: Vec<&str> = ["minute_ms"]
        .into_iter()
        .chain(keys.iter().copied())
        .chain(sums.iter().map(String::as_str))
        .collect();
    let values: Vec<String> = (1..=all.len()).map(p).collect();
    let updates: Vec<String> = sums
        .iter()
        .map(|c| format!("{c} = {table}.{c} + excluded.{c}"))
        .collect();
    format!(
        "INSERT INTO {table} ({}) VALUES ({}) ON CONFLICT (minute_ms, {}) DO UPDATE SET {}",
        all.join(", "),
        values.join(", "),
        keys.join(", "),
        updates.join(", ")
    )
}

/// Fills the rollups from the raw records already stored (the migration that adds them).
/// Frozen like [`rollup_table_sql`].
pub fn rollup_backfill_sql(dialect: Dialect) -> String {
    let when = |cond: String| format!("SUM(CASE WHEN {cond} THEN 1 ELSE 0 END)");
    let reported = match dialect {
        Dialect::Sqlite => "usage_reported = 1",
        Dialect::Postgres => "usage_reported",
    };
    let mut sums = vec![
        "COUNT(*)".to_owned(),
        when("code <> 'OK'".to_owned()),
        format!("SUM(CASE WHEN {reported} THEN input_tokens ELSE 0 END)"),
        format!("SUM(CASE WHEN {reported} THEN output_tokens ELSE 0 END)"),
        format!("SUM(CASE WHEN {reported} THEN cached_input_tokens ELSE 0 END)"),
        when(format!("NOT ({reported})")),
        "SUM(COALESCE(cost_usd, 0))".to_owned(),
    ];
    for column in ["latency_ms", "ttft_ms"] {
        for i in 0..BUCKETS {
            let low = i
                .checked_sub(1)
                .and_then(|j| HISTOGRAM_BOUNDS_MS.get(j))
                .map(|b| format!("{column} > {b:?}"));
            let high = HISTOGRAM_BOUNDS_MS
                .get(i)
                .map(|b| format!("{column} <= {b:?}"));
            let cond = match (low, high) {
                (Some(l), Some(h)) => format!("{l} AND {h}"),
                (None, Some(h)) => h,
                (Some(l), None) => l,
                (None, None) => "FALSE".to_owned(),
            };
            sums.push(when(cond));
        }
    }
    let columns: Vec<String> = ["minute_ms"]
        .into_iter()
        .chain(ROLLUP_DIMENSIONS)
        .map(str::to_owned)
        .chain(ROLLUP_COUNTS.iter().map(|c| (*c).to_owned()))
        .chain(["cost_usd".to_owned()])
        .chain(histogram_columns())
        .collect();
    format!(
        "INSERT INTO usage_minute ({}) SELECT (time_ms / {ROLLUP_MS}) * {ROLLUP_MS}, {}, {} FROM usage GROUP BY 1, {}",
        columns.join(", "),
        ROLLUP_DIMENSIONS.join(", "),
        sums.join(", "),
        ROLLUP_DIMENSIONS.join(", ")
    )
}

/// The table of the guardrail rollups.
pub const GUARDRAIL_TABLE: &str = "usage_guardrail_minute";

/// The marker that stands for the guardrail rollup migration in a store's migration list:
/// the store runs [`guardrail_rollup_table_sql`] there, then fills the table from the raw
/// records it still keeps with [`guardrail_rollups`] (the same code as the live writes).
pub const GUARDRAIL_ROLLUP_MIGRATION: &str =
    "-- the usage_guardrail_minute rollups (ledger::guardrail_rollup_table_sql)";

/// The columns of a guardrail rollup row between the usage dimensions and the sums: the
/// grouping bits (which of phase, entity, action the row keeps; the others are empty),
/// then phase, entity, action.
const GUARDRAIL_KEY_COLUMNS: [&str; 4] = ["grouped_by", "phase", "entity", "action"];

/// The guardrail rollup table and its index (`IF NOT EXISTS`: a schema taken back to an
/// older version migrates again and keeps the rows; the backfill only fills an empty
/// table). Frozen once published, like [`rollup_table_sql`].
pub fn guardrail_rollup_table_sql(dialect: Dialect) -> String {
    let (int, real, strict) = match dialect {
        Dialect::Sqlite => ("INTEGER", "REAL", " STRICT"),
        Dialect::Postgres => ("BIGINT", "DOUBLE PRECISION", ""),
    };
    let mut columns = vec![format!("minute_ms {int} NOT NULL")];
    columns.extend(
        ROLLUP_DIMENSIONS
            .iter()
            .map(|d| format!("{d} TEXT NOT NULL")),
    );
    columns.push(format!("grouped_by {int} NOT NULL"));
    columns.extend(
        GUARDRAIL_COLUMNS
            .iter()
            .map(|c| format!("{c} TEXT NOT NULL")),
    );
    columns.extend(
        ROLLUP_COUNTS
            .iter()
            .map(|c| format!("{c} {int} NOT NULL DEFAULT 0")),
    );
    columns.push(format!("decisions {int} NOT NULL DEFAULT 0"));
    columns.push(format!("cost_usd {real} NOT NULL DEFAULT 0"));
    columns.extend(
        histogram_columns()
            .iter()
            .map(|c| format!("{c} {int} NOT NULL DEFAULT 0")),
    );
    format!(
        "CREATE TABLE IF NOT EXISTS {GUARDRAIL_TABLE} ({}){strict};
        CREATE UNIQUE INDEX IF NOT EXISTS {GUARDRAIL_TABLE}_row ON {GUARDRAIL_TABLE} (minute_ms, {}, {});",
        columns.join(", "),
        ROLLUP_DIMENSIONS.join(", "),
        GUARDRAIL_KEY_COLUMNS.join(", ")
    )
}

/// [`guardrail_rollup_upsert_sql`], built once per dialect.
pub fn guardrail_rollup_upsert(dialect: Dialect) -> &'static str {
    static SQLITE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static POSTGRES: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    match dialect {
        Dialect::Sqlite => SQLITE.get_or_init(|| guardrail_rollup_upsert_sql(dialect)),
        Dialect::Postgres => POSTGRES.get_or_init(|| guardrail_rollup_upsert_sql(dialect)),
    }
}

/// Adds guardrail rollup deltas to their rows, with the parameters of
/// [`GuardrailRollup::params`].
pub fn guardrail_rollup_upsert_sql(dialect: Dialect) -> String {
    let sums: Vec<String> = ROLLUP_COUNTS
        .iter()
        .map(|c| (*c).to_owned())
        .chain(["decisions".to_owned(), "cost_usd".to_owned()])
        .chain(histogram_columns())
        .collect();
    let keys: Vec<&str> = ROLLUP_DIMENSIONS
        .into_iter()
        .chain(GUARDRAIL_KEY_COLUMNS)
        .collect();
    add_to_rows_sql(dialect, GUARDRAIL_TABLE, &keys, &sums)
}

/// One per-minute guardrail rollup row: the calls (with the usage dimensions of
/// `rollup`) that had a decision with these phase, entity and action values, each call
/// once, and the sum of those decisions' counts. `grouped_by` says which of the three the
/// row keeps (bits 1, 2, 4); the others are empty, so a query grouped by fewer of them
/// still counts a call once per group.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GuardrailRollup {
    /// The usage dimensions and sums, as in `usage_minute`.
    pub rollup: Rollup,
    /// Which of phase, entity, action the row keeps.
    pub grouped_by: i64,
    /// Phase, entity, action (empty where `grouped_by` leaves it out).
    pub decision: [String; 3],
    /// The sum of the decision counts.
    pub decisions: i64,
}

impl GuardrailRollup {
    /// The parameters of [`guardrail_rollup_upsert_sql`] for this row, in order.
    pub fn params(&self) -> Vec<SqlParam> {
        let r = &self.rollup;
        std::iter::once(SqlParam::Int(r.minute_ms))
            .chain(r.dimensions.iter().cloned().map(SqlParam::Text))
            .chain([SqlParam::Int(self.grouped_by)])
            .chain(self.decision.iter().cloned().map(SqlParam::Text))
            .chain(r.counts.iter().copied().map(SqlParam::Int))
            .chain([SqlParam::Int(self.decisions), SqlParam::Real(r.cost_usd)])
            .chain(r.histograms.iter().copied().map(SqlParam::Int))
            .collect()
    }
}

/// The guardrail rollup deltas of a batch of records: for each record with decisions,
/// for each of the 8 groupings, one row per distinct projection of its decisions.
pub fn guardrail_rollups(records: &[UsageRecord]) -> Vec<GuardrailRollup> {
    type Key<'a> = (i64, [&'a str; 7], String, i64, [&'a str; 3]);
    let mut out: BTreeMap<Key<'_>, GuardrailRollup> = BTreeMap::new();
    for r in records {
        let decisions = parse_guardrails(&r.guardrails);
        if decisions.is_empty() {
            continue;
        }
        let minute_ms = r.time_ms.div_euclid(ROLLUP_MS) * ROLLUP_MS;
        let tags = tags_json(r);
        let dimensions = borrowed_dimensions(r);
        for grouped_by in 0..8i64 {
            let mut projected: BTreeMap<[&str; 3], i64> = BTreeMap::new();
            for (phase, entity, action, n) in &decisions {
                let mut key = [*phase, *entity, *action];
                for (i, part) in key.iter_mut().enumerate() {
                    if grouped_by & (1 << i) == 0 {
                        *part = "";
                    }
                }
                *projected.entry(key).or_insert(0) += i64::try_from(*n).unwrap_or(i64::MAX);
            }
            for (decision, n) in projected {
                let row = out
                    .entry((minute_ms, dimensions, tags.clone(), grouped_by, decision))
                    .or_insert_with(|| GuardrailRollup {
                        rollup: empty_rollup(minute_ms, &dimensions, &tags),
                        grouped_by,
                        decision: decision.map(str::to_owned),
                        decisions: 0,
                    });
                add_call(&mut row.rollup, r);
                row.decisions = row.decisions.saturating_add(n);
            }
        }
    }
    out.into_values().collect()
}

/// The spend of one key and team on one UTC day (budget seeding reads these).
#[derive(Debug, Clone, PartialEq)]
pub struct DaySpend {
    /// The UTC day index (Unix ms / 86,400,000).
    pub day: i64,
    /// The key, or empty.
    pub key: String,
    /// The `team` tag, or empty.
    pub team: String,
    /// The cost.
    pub cost_usd: f64,
}

/// The query of [`DaySpend`] rows since `from_ms`, over the rollups, with its parameters.
/// Its rows: day (BIGINT), key, team, cost.
pub fn day_spend_sql(dialect: Dialect, from_ms: i64) -> (String, Vec<SqlParam>) {
    let mut sql = Sql {
        dialect,
        params: Vec::new(),
    };
    let from = sql.param(SqlParam::Int(from_ms));
    let shadow = sql.param(SqlParam::Text(SHADOW_RPC.to_owned()));
    let team = sql.tag("team");
    (
        format!(
            "SELECT minute_ms / 86400000, key, {team}, COALESCE(SUM(cost_usd), 0.0) FROM usage_minute
             WHERE minute_ms >= {from} AND rpc <> {shadow} GROUP BY 1, 2, 3"
        ),
        sql.params,
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    /// Records in memory.
    #[derive(Default)]
    struct MemorySink(Mutex<Vec<UsageRecord>>);

    #[async_trait::async_trait]
    impl UsageSink for MemorySink {
        async fn insert_usage(&self, records: Vec<UsageRecord>) -> Result<(), SinkError> {
            self.0.lock().unwrap().extend(records);
            Ok(())
        }

        async fn usage_between(
            &self,
            from_ms: i64,
            to_ms: i64,
        ) -> Result<Vec<UsageRecord>, SinkError> {
            let records = self.0.lock().unwrap();
            Ok(records
                .iter()
                .filter(|r| (from_ms..to_ms).contains(&r.time_ms))
                .cloned()
                .collect())
        }

        async fn delete_usage_before(&self, cutoff_ms: i64) -> Result<u64, SinkError> {
            let mut records = self.0.lock().unwrap();
            let before = records.len();
            records.retain(|r| r.time_ms >= cutoff_ms);
            Ok((before - records.len()) as u64)
        }
    }

    fn record(provider: &str, code: &str, cost: f64, latency: f64) -> UsageRecord {
        UsageRecord {
            time_ms: now_ms(),
            request_id: "r".into(),
            rpc: "Chat".into(),
            provider: provider.into(),
            model: "m".into(),
            attempts: 1,
            input_tokens: 10,
            output_tokens: 5,
            usage_reported: true,
            cost_usd: Some(cost),
            latency_ms: latency,
            code: code.into(),
            tags: [("team".to_owned(), "search".to_owned())].into(),
            ..UsageRecord::default()
        }
    }

    #[test]
    fn totals_and_percentiles() {
        let records: Vec<_> = (1..=100)
            .map(|i| {
                record(
                    "a",
                    if i % 10 == 0 { "UNAVAILABLE" } else { "OK" },
                    0.01,
                    f64::from(i),
                )
            })
            .collect();
        let t = totals(&records);
        assert_eq!(t.calls, 100);
        assert_eq!(t.errors, 10);
        assert_eq!(t.input_tokens, 1000);
        assert!((t.cost_usd - 1.0).abs() < 1e-9);
        assert_eq!(t.latency_ms, [Some(51.0), Some(95.0), Some(99.0)]);
        assert_eq!(dimension(&records[0], "tag:team"), Some("search"));
        assert_eq!(dimension(&records[0], "tag:none"), Some(""));
        assert_eq!(dimension(&records[0], "bogus"), None);
    }

    #[test]
    fn guardrail_decisions_parse_and_skip_what_is_malformed() {
        assert_eq!(
            parse_guardrails("request:email:redact=2,reply:credit_card:block=1"),
            [
                ("request", "email", "redact", 2),
                ("reply", "credit_card", "block", 1)
            ]
        );
        assert_eq!(parse_guardrails(""), []);
        assert_eq!(
            parse_guardrails(
                "request:email=2,x,request::log=1,request:hook:allow=z,reply:hook:allow=1"
            ),
            [("reply", "hook", "allow", 1)]
        );
    }

    #[test]
    fn guardrail_rollups_count_each_call_once_per_group_at_every_grouping() {
        let mut a = record("p", "FAILED_PRECONDITION", 0.5, 3.0);
        a.guardrails =
            "request:credit_card:block=1,request:email:redact=2,reply:email:redact=1".into();
        let mut b = record("p", "OK", 0.25, 3.0);
        b.guardrails = "request:email:redact=1".into();
        let plain = record("p", "OK", 1.0, 3.0);
        let rows = guardrail_rollups(&[a, b, plain]);
        let at = |grouped_by: i64| -> BTreeMap<[String; 3], (i64, i64, i64)> {
            // Summed over the usage dimensions (the two calls' codes differ).
            let mut out = BTreeMap::new();
            for r in rows.iter().filter(|r| r.grouped_by == grouped_by) {
                let e: &mut (i64, i64, i64) = out.entry(r.decision.clone()).or_default();
                e.0 += r.rollup.counts[0];
                e.1 += r.rollup.counts[1];
                e.2 += r.decisions;
            }
            out
        };
        let k = |p: &str, e: &str, a: &str| [p.to_owned(), e.to_owned(), a.to_owned()];
        // Every grouping: the call without decisions is in none.
        assert_eq!(at(0), [(k("", "", ""), (2, 1, 5))].into());
        assert_eq!(
            at(2),
            [
                (k("", "credit_card", ""), (1, 1, 1)),
                // `a` had two email decisions (request and reply): one call, 3 decisions.
                (k("", "email", ""), (2, 1, 4)),
            ]
            .into()
        );
        assert_eq!(
            at(7),
            [
                (k("reply", "email", "redact"), (1, 1, 1)),
                (k("request", "credit_card", "block"), (1, 1, 1)),
                (k("request", "email", "redact"), (2, 1, 3)),
            ]
            .into()
        );
        assert_eq!(
            at(1),
            [
                (k("reply", "", ""), (1, 1, 1)),
                (k("request", "", ""), (2, 1, 4))
            ]
            .into()
        );
        let email = rows
            .iter()
            .find(|r| r.grouped_by == 2 && r.decision[1] == "email" && r.rollup.counts[1] == 1)
            .unwrap();
        assert!((email.rollup.cost_usd - 0.5).abs() < 1e-9);
        assert_eq!(email.rollup.dimensions[2], "p");
        assert_eq!(email.params().len(), 1 + 8 + 4 + 6 + 2 + 2 * BUCKETS);
        assert_eq!(
            guardrail_rollup_upsert_sql(Dialect::Postgres)
                .matches('$')
                .count(),
            email.params().len()
        );
    }

    #[test]
    fn usage_sql_reads_the_guardrail_rollups_when_a_guardrail_dimension_is_named() {
        let query = UsageQuery {
            from_ms: 0,
            to_ms: ROLLUP_MS,
            group_by: vec!["guardrail_entity".into(), "provider".into()],
            filter: vec![("guardrail_action".into(), "redact".into())],
            guardrail_calls: false,
        };
        let (text, params) = usage_sql(&query, Dialect::Sqlite).unwrap();
        assert!(text.starts_with("SELECT entity, provider, "), "{text}");
        assert!(
            text.contains(" FROM usage_guardrail_minute WHERE "),
            "{text}"
        );
        assert!(text.contains("action = ?4"), "{text}");
        assert!(text.contains("grouped_by = ?5"), "{text}");
        assert!(text.contains("SUM(decisions)"), "{text}");
        assert!(text.ends_with(" GROUP BY 1, 2"), "{text}");
        // entity (2) | action (4)
        assert_eq!(params[4], SqlParam::Int(6));
        assert_eq!(params[3], SqlParam::Text("redact".into()));

        // Without a guardrail dimension: the usage rollups, no decisions.
        let plain = UsageQuery {
            group_by: vec!["provider".into()],
            ..query.clone()
        };
        let plain = UsageQuery {
            filter: Vec::new(),
            ..plain
        };
        let (text, _) = usage_sql(&plain, Dialect::Postgres).unwrap();
        assert!(text.contains(" FROM usage_minute WHERE "), "{text}");
        assert!(text.contains("CAST(0 AS BIGINT)"), "{text}");
        assert!(!text.contains("grouped_by"), "{text}");
        // The total of a query grouped by a guardrail dimension: calls with any decision.
        let total = UsageQuery {
            group_by: Vec::new(),
            filter: Vec::new(),
            guardrail_calls: true,
            ..query.clone()
        };
        let (text, params) = usage_sql(&total, Dialect::Postgres).unwrap();
        assert!(
            text.contains(" FROM usage_guardrail_minute WHERE "),
            "{text}"
        );
        assert!(text.contains("grouped_by = $4"), "{text}");
        assert_eq!(params[3], SqlParam::Int(0));
        assert!(!text.contains("GROUP BY"), "{text}");

        for bad in ["guardrail", "guardrail_decision", "guardrail_entity "] {
            assert!(!valid_dimension(bad), "{bad}");
            let q = UsageQuery {
                group_by: vec![bad.into()],
                ..query.clone()
            };
            assert_eq!(usage_sql(&q, Dialect::Sqlite), None, "{bad}");
        }
        for good in GUARDRAIL_DIMENSIONS {
            assert!(valid_dimension(good));
        }
        assert!(names_guardrails(["code", "guardrail_phase"]));
        assert!(!names_guardrails(["code", "tag:guardrail_phase"]));
    }

    #[test]
    fn guardrail_table_and_upsert_agree_on_columns() {
        for dialect in [Dialect::Sqlite, Dialect::Postgres] {
            let table = guardrail_rollup_table_sql(dialect);
            let upsert = guardrail_rollup_upsert_sql(dialect);
            let inserted = upsert
                .split_once('(')
                .and_then(|(_, rest)| rest.split_once(')'))
                .map(|(cols, _)| cols.split(", ").collect::<Vec<_>>())
                .unwrap();
            for column in &inserted {
                assert!(table.contains(&format!("{column} ")), "{column} in {table}");
            }
            assert!(upsert.contains(
                "ON CONFLICT (minute_ms, key, policy, provider, model, rpc, code, error_class, tags, grouped_by, phase, entity, action)"
            ), "{upsert}");
            assert!(table.contains("(minute_ms, key, policy, provider, model, rpc, code, error_class, tags, grouped_by, phase, entity, action)"), "{table}");
        }
    }

    #[tokio::test]
    async fn queue_full_drops_and_shutdown_flushes() {
        let store = Arc::new(MemorySink::default());
        let (ledger, writer) = Ledger::start(store.clone(), 4, HOUR, HOUR);
        // A burst far larger than the queue, without yielding to the writer.
        for i in 0..1000 {
            ledger.record(record("a", "OK", 0.0, f64::from(i)));
        }
        drop(ledger);
        writer.finish(Duration::from_secs(5)).await;
        let stored = store.usage_between(0, i64::MAX).await.unwrap();
        assert!(
            !stored.is_empty(),
            "queued records were written on shutdown"
        );
        assert!(
            stored.len() < 1000,
            "the burst over capacity was dropped, not buffered"
        );
    }

    #[tokio::test]
    async fn finish_does_not_wait_for_the_senders_and_counts_what_it_wrote() {
        let store = Arc::new(MemorySink::default());
        let (ledger, writer) = Ledger::start(store.clone(), 64, HOUR, HOUR);
        for i in 0..3 {
            ledger.record(record("a", "OK", 0.0, f64::from(i)));
        }
        // `ledger` is still alive (a call that has not ended): the flush ends anyway.
        let outcome = writer.finish(Duration::from_secs(3600)).await;
        assert!(!outcome.timed_out);
        assert_eq!(outcome.dropped, 0);
        let stored = store.usage_between(0, i64::MAX).await.unwrap();
        assert_eq!(outcome.written, stored.len() as u64);
        assert_eq!(stored.len(), 3);
        // After the flush, records are refused rather than queued for ever.
        ledger.record(record("a", "OK", 0.0, 1.0));
        assert_eq!(store.usage_between(0, i64::MAX).await.unwrap().len(), 3);
    }

    /// A sink whose writes never finish.
    struct StuckSink;

    #[async_trait::async_trait]
    impl UsageSink for StuckSink {
        async fn insert_usage(&self, _: Vec<UsageRecord>) -> Result<(), SinkError> {
            std::future::pending().await
        }

        async fn usage_between(&self, _: i64, _: i64) -> Result<Vec<UsageRecord>, SinkError> {
            Ok(Vec::new())
        }

        async fn delete_usage_before(&self, _: i64) -> Result<u64, SinkError> {
            Ok(0)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_final_flush_is_bounded_and_counts_the_dropped() {
        let (ledger, writer) = Ledger::start(Arc::new(StuckSink), 64, HOUR, HOUR);
        for i in 0..5 {
            ledger.record(record("a", "OK", 0.0, f64::from(i)));
        }
        let outcome = writer.finish(Duration::from_secs(5)).await;
        assert_eq!(
            outcome,
            FlushOutcome {
                written: 0,
                dropped: 5,
                timed_out: true
            }
        );
    }
}
