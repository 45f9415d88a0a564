//! The audit log: one entry per change made through the Admin API (and by the gateway's own
//! control-plane work, such as rollout steps), kept durably in the store and read back with
//! `ListAuditLog`.
//!
//! An entry says who ([`Entry::actor`]: `admin-token` or `key:NAME`, never a secret), what
//! ([`Entry::action`], the RPC name), on which resource (kind and name), the etag before and
//! after, and a short summary without secrets. The store implements [`AuditSink`] (as it
//! implements the ledger's sink); [`Auditor`] is the handle the admin service (and anything
//! else that changes control-plane state) records through. Entries past
//! `[audit].retention` are pruned by [`prune_loop`].

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::settings::Issues;

/// `[audit]` as written in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    /// `audit.retention`: how long entries are kept.
    pub retention: Option<String>,
}

/// The validated `[audit]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    /// How long entries are kept (default 400 days).
    pub retention: Duration,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            retention: DEFAULT_RETENTION,
        }
    }
}

/// The default retention of audit entries.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(400 * 24 * 3600);

/// How often entries past their retention are deleted.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

impl AuditSettings {
    /// Validates `[audit]`.
    pub fn from_raw(raw: RawAudit, issues: &mut Issues) -> Self {
        Self {
            retention: issues.duration(
                "audit.retention",
                raw.retention.as_deref(),
                DEFAULT_RETENTION,
            ),
        }
    }
}

/// One change, as a caller records it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Entry {
    /// Who made the change: `admin-token`, `key:NAME`, or a component such as
    /// `rollout:POLICY`. Never a secret.
    pub actor: String,
    /// What was done: the Admin RPC name (`UpdatePolicy`), or a component's step name.
    pub action: String,
    /// The kind of resource: `policy`, `key`, `config`, `cache`, ...
    pub resource_kind: String,
    /// The resource's name (or a description of the selection, e.g. an invalidation filter).
    pub resource: String,
    /// The resource's etag before the change; empty when it did not exist or has none.
    pub before_etag: String,
    /// The resource's etag after the change; empty when it was deleted or has none.
    pub after_etag: String,
    /// A short summary of the change (which fields changed, counts); never a secret.
    pub detail: String,
}

impl Entry {
    /// An entry of `actor` doing `action` to the `resource_kind` named `resource`.
    pub fn new(
        actor: impl Into<String>,
        action: impl Into<String>,
        resource_kind: impl Into<String>,
        resource: impl Into<String>,
    ) -> Self {
        Self {
            actor: actor.into(),
            action: action.into(),
            resource_kind: resource_kind.into(),
            resource: resource.into(),
            ..Self::default()
        }
    }

    /// With the etags before and after the change.
    pub fn with_etags(mut self, before: impl Into<String>, after: impl Into<String>) -> Self {
        self.before_etag = before.into();
        self.after_etag = after.into();
        self
    }

    /// With a short summary of the change (never a secret).
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }
}

/// A stored entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The store's id (increasing; ties of `time_ms` are ordered by it).
    pub id: i64,
    /// When the entry was recorded, Unix milliseconds.
    pub time_ms: i64,
    /// The entry.
    pub entry: Entry,
}

/// Which entries to list: newest first, every set filter must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Only this actor (empty: any).
    pub actor: String,
    /// Only this resource kind (empty: any).
    pub resource_kind: String,
    /// Only this resource name (empty: any).
    pub resource: String,
    /// Only entries at or after this time (Unix ms).
    pub from_ms: i64,
    /// Only entries before this time (Unix ms).
    pub to_ms: i64,
    /// Keyset cursor: only entries older than `(time_ms, id)` of the previous page's last.
    pub before: Option<(i64, i64)>,
    /// The most entries returned.
    pub limit: usize,
}

/// Why the audit log's storage failed: its backend's description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AuditError(pub String);

/// What the audit log needs of durable storage. The store implements it.
#[async_trait::async_trait]
pub trait AuditSink: Send + Sync + 'static {
    /// Appends an entry recorded at `time_ms`; returns its id.
    async fn append_audit(&self, time_ms: i64, entry: Entry) -> Result<i64, AuditError>;

    /// The entries matching `query`, newest first.
    async fn list_audit(&self, query: &Query) -> Result<Vec<Record>, AuditError>;

    /// Deletes entries recorded before `cutoff_ms`; returns how many.
    async fn delete_audit_before(&self, cutoff_ms: i64) -> Result<u64, AuditError>;
}

/// The handle changes are recorded through; cheap to clone.
#[derive(Clone)]
pub struct Auditor {
    sink: Arc<dyn AuditSink>,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor").finish_non_exhaustive()
    }
}

impl Auditor {
    /// An auditor writing to `sink`.
    pub fn new(sink: Arc<dyn AuditSink>) -> Self {
        Self { sink }
    }

    /// Records a change that has happened, now. The change is already committed, so a
    /// failed write does not undo it or fail the caller: it is logged at error level with
    /// the whole entry (the log is the fallback trail) and returned for callers that care.
    pub async fn record(&self, entry: Entry) -> Result<(), AuditError> {
        match self.sink.append_audit(now_ms(), entry.clone()).await {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::error!(
                    error = %e,
                    actor = %entry.actor,
                    action = %entry.action,
                    resource_kind = %entry.resource_kind,
                    resource = %entry.resource,
                    before_etag = %entry.before_etag,
                    after_etag = %entry.after_etag,
                    detail = %entry.detail,
                    "cannot write an audit entry; the change itself is applied"
                );
                Err(e)
            }
        }
    }

    /// The entries matching `query`, newest first.
    pub async fn list(&self, query: &Query) -> Result<Vec<Record>, AuditError> {
        self.sink.list_audit(query).await
    }

    /// The storage behind this auditor.
    pub fn sink(&self) -> Arc<dyn AuditSink> {
        self.sink.clone()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Deletes entries older than `retention` every [`PRUNE_INTERVAL`] (the first time at once)
/// until `stop`. `now_ms` is the clock (wall time in production; tests pass their own).
pub async fn prune_loop(
    sink: Arc<dyn AuditSink>,
    retention: Duration,
    now_ms: impl Fn() -> i64 + Send,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(PRUNE_INTERVAL);
    let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match sink
            .delete_audit_before(now_ms().saturating_sub(retention_ms))
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(entries = n, "pruned audit entries past retention"),
            Err(e) => tracing::warn!(error = %e, "pruning audit entries failed"),
        }
    }
}

/// The wall clock, for [`prune_loop`].
pub fn wall_clock_ms() -> i64 {
    now_ms()
}

/// A summary of what differs between two versions of a serializable resource: the
/// top-level fields that changed, e.g. `changed: targets, execution`. Values are not
/// shown (they could hold secrets or personal data); `no field changed` when none did.
pub fn changed_fields<T: serde::Serialize>(before: &T, after: &T) -> String {
    let (Ok(serde_json::Value::Object(before)), Ok(serde_json::Value::Object(after))) =
        (serde_json::to_value(before), serde_json::to_value(after))
    else {
        return String::new();
    };
    let mut changed: Vec<&str> = before
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(*v))
        .map(|(k, _)| k.as_str())
        .collect();
    changed.extend(
        after
            .keys()
            .filter(|k| !before.contains_key(*k))
            .map(String::as_str),
    );
    if changed.is_empty() {
        "no field changed".to_owned()
    } else {
        format!("changed: {}", changed.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Memory(Mutex<Vec<Record>>);

    #[async_trait::async_trait]
    impl AuditSink for Memory {
        async fn append_audit(&self, time_ms: i64, entry: Entry) -> Result<i64, AuditError> {
            let mut all = self.0.lock().unwrap();
            let id = all.len() as i64 + 1;
            all.push(Record { id, time_ms, entry });
            Ok(id)
        }

        async fn list_audit(&self, _: &Query) -> Result<Vec<Record>, AuditError> {
            Ok(self.0.lock().unwrap().clone())
        }

        async fn delete_audit_before(&self, cutoff_ms: i64) -> Result<u64, AuditError> {
            let mut all = self.0.lock().unwrap();
            let before = all.len();
            all.retain(|r| r.time_ms >= cutoff_ms);
            Ok((before - all.len()) as u64)
        }
    }

    #[test]
    fn changed_fields_names_fields_not_values() {
        #[derive(serde::Serialize)]
        struct Doc {
            a: u32,
            b: &'static str,
        }
        assert_eq!(
            changed_fields(&Doc { a: 1, b: "x" }, &Doc { a: 2, b: "x" }),
            "changed: a"
        );
        assert_eq!(
            changed_fields(&Doc { a: 1, b: "x" }, &Doc { a: 1, b: "x" }),
            "no field changed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pruning_deletes_what_is_past_retention_every_interval() {
        let sink = Arc::new(Memory::default());
        let day = 86_400_000;
        for time_ms in [0, 5 * day, 9 * day] {
            sink.append_audit(time_ms, Entry::default()).await.unwrap();
        }
        // The clock follows tokio's (paused) time from day 10.
        let start = tokio::time::Instant::now();
        let clock = move || 10 * day + i64::try_from(start.elapsed().as_millis()).unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(prune_loop(
            sink.clone(),
            Duration::from_secs(3 * 86_400),
            clock,
            stop.clone(),
        ));
        // The first tick runs at once: day 0 and day 5 are older than 3 days.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let left: Vec<i64> = sink.0.lock().unwrap().iter().map(|r| r.time_ms).collect();
        assert_eq!(left, [9 * day]);
        // Two days of intervals later, day 9 is past retention too.
        tokio::time::sleep(Duration::from_secs(2 * 86_400 + 3600)).await;
        assert!(sink.0.lock().unwrap().is_empty());
        stop.cancel();
        task.await.unwrap();
    }
}
