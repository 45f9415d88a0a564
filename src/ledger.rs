//! The usage and cost ledger: one record per call, written to the store without ever
//! blocking or slowing a call.
//!
//! Calls hand records to a bounded queue (`try_send`); when it is full the record is dropped
//! and counted (`llm_gateway_usage_records_dropped_total`), so memory never grows without
//! bound. One writer task drains the queue in batches (what gathered within
//! [`BATCH_INTERVAL`] of the first record, up to [`MAX_BATCH`], in one transaction), prunes records older than the retention period every
//! hour, and on shutdown writes what is queued within a bound, logging what it wrote and dropped.

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
    /// `ledger.retention`.
    pub retention: Option<String>,
}

/// The validated `[ledger]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerSettings {
    /// The queue capacity, or `None` when the ledger is off.
    pub capacity: Option<usize>,
    /// How long usage records are kept.
    pub retention: Duration,
}

impl LedgerSettings {
    /// Validates `[ledger]`.
    pub fn from_raw(raw: RawLedger, issues: &mut Issues) -> Self {
        Self {
            capacity: raw
                .enabled
                .unwrap_or(true)
                .then_some(raw.queue_capacity.unwrap_or(10_000).max(1)),
            retention: issues.duration(
                "ledger.retention",
                raw.retention.as_deref(),
                Duration::from_secs(30 * 24 * 3600),
            ),
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
    ) -> (Ledger, LedgerWriter) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let stop = CancellationToken::new();
        let flush = Arc::new(FlushCounts::default());
        let handle = tokio::spawn(write_loop(
            store,
            rx,
            retention,
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
    retention: Duration,
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
                write(&*store, &mut batch).await;
            }
            _ = prune.tick() => {
                let cutoff = now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
                match store.delete_usage_before(cutoff).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(records = n, "pruned usage records past retention"),
                    Err(e) => tracing::warn!(error = %e, "pruning usage records failed"),
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

/// Writes and empties `batch`; returns how many records were written.
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

/// Whether `name` is a dimension [`dimension`] knows.
pub fn valid_dimension(name: &str) -> bool {
    matches!(
        name,
        "provider" | "model" | "policy" | "key" | "rpc" | "code"
    ) || name.strip_prefix("tag:").is_some_and(|t| !t.is_empty())
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

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

    #[tokio::test]
    async fn queue_full_drops_and_shutdown_flushes() {
        let store = Arc::new(MemorySink::default());
        let (ledger, writer) = Ledger::start(store.clone(), 4, Duration::from_secs(3600));
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
        let (ledger, writer) = Ledger::start(store.clone(), 64, Duration::from_secs(3600));
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
        let (ledger, writer) = Ledger::start(Arc::new(StuckSink), 64, Duration::from_secs(3600));
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
