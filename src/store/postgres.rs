//! The shared PostgreSQL store (`store.url = "postgres://..."`): several replicas keep their
//! policies, keys and usage ledger in one database.
//!
//! - Connections come from a pool ([`POOL_SIZE`]); a database that cannot be reached fails
//!   the operation with [`StoreError::Backend`] (admin writes answer UNAVAILABLE) within
//!   [`CONNECT_TIMEOUT`].
//! - Schema migrations are numbered and recorded in `schema_migrations`; they run in one
//!   transaction under an advisory lock, so replicas starting at once migrate once.
//! - Etag conflicts are decided by the database: an update is `UPDATE ... WHERE version =
//!   expected`, so of concurrent updates with one etag exactly one matches a row.
//! - Every write sends `NOTIFY llmgateway_changes` in its transaction (delivered on commit);
//!   [`Store::follow_changes`] LISTENs on a connection of its own and reports what changed,
//!   and a [`Change::Resync`] after every (re)connect and every [`RESYNC_INTERVAL`].

use std::{str::FromStr, time::Duration};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls, Row, Transaction, types::ToSql};
use tokio_util::sync::CancellationToken;

use super::{Change, RolloutRow, Store, StoreError};
use crate::experiments::report::{self, ExperimentReport};
use crate::{
    audit::{self, AuditError, AuditSink},
    auth::{KeyRecord, KeySpec},
    ledger::{
        self, DaySpend, Dialect, SinkError, SqlParam, UsageGroup, UsageQuery, UsageRecord,
        UsageSink,
    },
    routing::{PolicyRecord, PolicySource, policy::PolicySpec},
};

/// Most connections one replica holds (the change listener has one more of its own).
pub const POOL_SIZE: usize = 16;

/// How long connecting (or waiting for a pooled connection) may take before an operation
/// fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How often every replica reloads everything even without a notification (a safety net
/// behind LISTEN/NOTIFY).
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(30);

/// The NOTIFY channel of policy and key changes.
pub const CHANNEL: &str = "llmgateway_changes";

/// The advisory lock key migrations run under (any constant shared by every replica).
const MIGRATION_LOCK: i64 = 0x6c6c_6d67_7721;

/// Schema migrations, applied in order; never edit a published one, add a new one.
const MIGRATIONS: &[&str] = &[
    // 1: routing policies, gateway keys (only a hash of each secret), the usage ledger.
    "CREATE TABLE policies (
        name TEXT PRIMARY KEY,
        doc TEXT NOT NULL,
        version BIGINT NOT NULL,
        created_ms BIGINT NOT NULL,
        updated_ms BIGINT NOT NULL
    );
    CREATE TABLE keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        doc TEXT NOT NULL,
        secret_hash BYTEA NOT NULL,
        revoked BOOLEAN NOT NULL,
        version BIGINT NOT NULL,
        created_ms BIGINT NOT NULL
    );
    CREATE TABLE usage (
        id BIGSERIAL PRIMARY KEY,
        time_ms BIGINT NOT NULL,
        request_id TEXT NOT NULL,
        rpc TEXT NOT NULL,
        key TEXT NOT NULL,
        tags TEXT NOT NULL,
        policy TEXT NOT NULL,
        provider TEXT NOT NULL,
        model TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        input_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        cached_input_tokens BIGINT NOT NULL,
        usage_reported BOOLEAN NOT NULL,
        cost_usd DOUBLE PRECISION,
        latency_ms DOUBLE PRECISION NOT NULL,
        ttft_ms DOUBLE PRECISION,
        code TEXT NOT NULL,
        error_class TEXT NOT NULL
    );
    CREATE INDEX usage_time ON usage (time_ms, id);",
    // 2: per-minute usage rollups, filled from the records already stored.
    ledger::ROLLUP_MIGRATION,
    // 3: the response cache's outcome and what a hit saved (SQLite migration 4).
    "ALTER TABLE usage ADD COLUMN cache TEXT NOT NULL DEFAULT '';
    ALTER TABLE usage ADD COLUMN cost_saved_usd DOUBLE PRECISION;",
    // 4: the audit log of admin changes (SQLite migration 6). `IF NOT EXISTS`: a schema
    // rolled back to an earlier version without dropping it migrates again.
    "CREATE TABLE IF NOT EXISTS audit_log (
        id BIGSERIAL PRIMARY KEY,
        time_ms BIGINT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        resource_kind TEXT NOT NULL,
        resource TEXT NOT NULL,
        before_etag TEXT NOT NULL,
        after_etag TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS audit_log_time ON audit_log (time_ms, id);",
    // 5: each call's guardrail decisions (SQLite migration 7).
    "ALTER TABLE usage ADD COLUMN IF NOT EXISTS guardrails TEXT NOT NULL DEFAULT '';",
    // 6: each policy's latest rollout; the policy version (and rollout arm) of a call
    // (SQLite migration 8; IF NOT EXISTS: a database taken back to an older schema version
    // re-runs it).
    "CREATE TABLE IF NOT EXISTS rollouts (
        policy TEXT PRIMARY KEY NOT NULL,
        doc TEXT NOT NULL,
        version BIGINT NOT NULL
    );
    ALTER TABLE usage ADD COLUMN IF NOT EXISTS policy_version BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN IF NOT EXISTS rollout_arm TEXT NOT NULL DEFAULT '';",
    // 7: experiments and shadow traffic (SQLite migration 9): the arm of a call, a shadow's
    // primary and comparison (IF NOT EXISTS: it may run again after a schema rollback).
    "ALTER TABLE usage ADD COLUMN IF NOT EXISTS experiment TEXT NOT NULL DEFAULT '';
    ALTER TABLE usage ADD COLUMN IF NOT EXISTS arm TEXT NOT NULL DEFAULT '';
    ALTER TABLE usage ADD COLUMN IF NOT EXISTS shadow_of TEXT NOT NULL DEFAULT '';
    ALTER TABLE usage ADD COLUMN IF NOT EXISTS shadow_length_ratio DOUBLE PRECISION;
    ALTER TABLE usage ADD COLUMN IF NOT EXISTS shadow_exact_match BOOLEAN;
    ALTER TABLE usage ADD COLUMN IF NOT EXISTS shadow_json_agree BOOLEAN;
    ALTER TABLE usage ADD COLUMN IF NOT EXISTS shadow_finish_reason TEXT NOT NULL DEFAULT '';
    CREATE INDEX IF NOT EXISTS usage_experiment ON usage (experiment, time_ms) WHERE experiment <> '';",
    // Kept content (keys with `keep_content`, SQLite's usage_content migration): redacted
    // prompt and reply until they expire.
    "CREATE TABLE IF NOT EXISTS usage_content (
        request_id TEXT NOT NULL,
        time_ms BIGINT NOT NULL,
        key TEXT NOT NULL,
        tenant TEXT NOT NULL,
        prompt TEXT NOT NULL,
        reply TEXT NOT NULL,
        expires_ms BIGINT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS usage_content_request ON usage_content (request_id);
    CREATE INDEX IF NOT EXISTS usage_content_expires ON usage_content (expires_ms);",
    // Per-minute rollups by guardrail decision, filled from the records still kept (the
    // SQLite migration of the same name).
    ledger::GUARDRAIL_ROLLUP_MIGRATION,
];

/// Parses a `store.url`: a `postgres://` or `postgresql://` URL naming a host.
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(format!(
            "`{}` is not a postgres:// url",
            super::redacted_url(url)
        ));
    }
    let config = tokio_postgres::Config::from_str(url)
        .map_err(|e| format!("`{}` is not usable: {e}", super::redacted_url(url)))?;
    if config.get_hosts().is_empty() {
        return Err(format!("`{}` names no host", super::redacted_url(url)));
    }
    Ok(config)
}

/// The PostgreSQL store.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    config: tokio_postgres::Config,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("hosts", &self.config.get_hosts())
            .field("dbname", &self.config.get_dbname())
            .finish_non_exhaustive()
    }
}

/// A list of numbered schema migrations and where their version is recorded.
pub(crate) struct Schema<'a> {
    /// What the schema belongs to, for the error when the database is newer
    /// (`the database`, `the batch tables`).
    pub what: &'a str,
    /// The table recording applied versions.
    pub table: &'a str,
    /// Its `version` column's type, as first created (`INTEGER`, `BIGINT`).
    pub version_type: &'a str,
    /// The advisory lock key the migrations run under.
    pub lock: i64,
    /// The migrations, applied in order (version = position + 1).
    pub migrations: &'a [&'a str],
}

/// Applies the migrations of `schema` not yet recorded, in one transaction under its
/// advisory lock: replicas starting at once wait for each other and migrate once.
/// `statements` turns a migration into what runs (usually itself; a migration whose SQL
/// is generated names it).
pub(crate) async fn migrate(
    client: &mut Object,
    schema: &Schema<'_>,
    statements: impl Fn(&str) -> Vec<String>,
) -> Result<(), StoreError> {
    let Schema {
        what,
        table,
        version_type,
        lock,
        migrations,
    } = schema;
    let tx = client.transaction().await.map_err(pg)?;
    // Held until commit: a replica starting at the same time waits here, then finds the
    // schema current.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[lock])
        .await
        .map_err(pg)?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (
            version {version_type} PRIMARY KEY,
            applied_ms BIGINT NOT NULL
        )"
    ))
    .await
    .map_err(pg)?;
    let current: i64 = tx
        .query_one(
            &format!("SELECT COALESCE(MAX(version), 0)::BIGINT FROM {table}"),
            &[],
        )
        .await
        .map_err(pg)?
        .get(0);
    let current = usize::try_from(current).unwrap_or(0);
    if current > migrations.len() {
        return Err(StoreError::Backend(format!(
            "{what} at schema version {current} is newer than this gateway knows ({}); upgrade the gateway",
            migrations.len()
        )));
    }
    let insert = format!("INSERT INTO {table} (version, applied_ms) VALUES ($1::BIGINT, $2)");
    for (i, sql) in migrations.iter().enumerate().skip(current) {
        for statement in statements(sql) {
            if statement == GUARDRAIL_BACKFILL {
                backfill_guardrail_rollups(&tx).await?;
            } else {
                tx.batch_execute(&statement).await.map_err(pg)?;
            }
        }
        let version = i64::try_from(i + 1).unwrap_or(i64::MAX);
        tx.execute(&insert, &[&version, &now_ms()])
            .await
            .map_err(pg)?;
        tracing::info!(table, version, "postgresql schema migrated");
    }
    tx.commit().await.map_err(pg)
}

/// The statement that stands for the guardrail rollup backfill (done in Rust, in the
/// migration's transaction).
const GUARDRAIL_BACKFILL: &str = "-- backfill the guardrail rollups";

/// Raw records read per page by the guardrail rollup backfill.
const BACKFILL_PAGE: i64 = 5000;

/// Fills the guardrail rollups, when empty, from the raw records that have decisions, a
/// page at a time (the rollups add up, so the pages may split a minute), with the live
/// writes' code.
async fn backfill_guardrail_rollups(tx: &Transaction<'_>) -> Result<(), StoreError> {
    let filled: bool = tx
        .query_one(
            &format!("SELECT EXISTS (SELECT 1 FROM {})", ledger::GUARDRAIL_TABLE),
            &[],
        )
        .await
        .map_err(pg)?
        .get(0);
    if filled {
        return Ok(());
    }
    let select = tx
        .prepare(&format!(
            "SELECT id, {USAGE_COLUMNS} FROM usage WHERE guardrails <> '' AND id > $1
             ORDER BY id LIMIT $2"
        ))
        .await
        .map_err(pg)?;
    let upsert = tx
        .prepare(ledger::guardrail_rollup_upsert(Dialect::Postgres))
        .await
        .map_err(pg)?;
    let mut after = i64::MIN;
    loop {
        let rows = tx
            .query(&select, &[&after, &BACKFILL_PAGE])
            .await
            .map_err(pg)?;
        let Some(last) = rows.last() else {
            return Ok(());
        };
        after = last.get("id");
        let records: Vec<UsageRecord> = rows.iter().map(usage_from_row).collect();
        for rollup in ledger::guardrail_rollups(&records) {
            tx.execute(&upsert, &pg_params(&rollup.params()))
                .await
                .map_err(pg)?;
        }
    }
}

/// A database error as a store error (the server's message, not just "db error").
pub(crate) fn pg(e: tokio_postgres::Error) -> StoreError {
    let message = match e.as_db_error() {
        Some(db) => format!("postgresql: {} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(&e) {
            Some(source) => format!("postgresql: {e}: {source}"),
            None => format!("postgresql: {e}"),
        },
    };
    StoreError::Backend(message)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl PgStore {
    /// Connects to the database at `url` and brings its schema up to date.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let mut config = parse_url(url).map_err(StoreError::Backend)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("llm-gateway");
        }
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Backend(format!("postgresql pool: {e}")))?;
        let store = Self { pool, config };
        store.migrate().await?;
        Ok(store)
    }

    /// The connection pool (the batch store shares it).
    pub fn pool(&self) -> Pool {
        self.pool.clone()
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => pg(e),
            other => StoreError::Backend(format!("postgresql: {other}")),
        })
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let schema = Schema {
            what: "the database",
            table: "schema_migrations",
            version_type: "INTEGER",
            lock: MIGRATION_LOCK,
            migrations: MIGRATIONS,
        };
        migrate(&mut client, &schema, |sql| {
            if sql == ledger::ROLLUP_MIGRATION {
                vec![
                    ledger::rollup_table_sql(Dialect::Postgres),
                    ledger::rollup_backfill_sql(Dialect::Postgres),
                ]
            } else if sql == ledger::GUARDRAIL_ROLLUP_MIGRATION {
                vec![
                    ledger::guardrail_rollup_table_sql(Dialect::Postgres),
                    GUARDRAIL_BACKFILL.to_owned(),
                ]
            } else {
                vec![sql.to_owned()]
            }
        })
        .await
    }

    /// The schema version the database is at.
    pub async fn schema_version(&self) -> Result<u32, StoreError> {
        let client = self.client().await?;
        let v: i32 = client
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                &[],
            )
            .await
            .map_err(pg)?
            .get(0);
        Ok(u32::try_from(v).unwrap_or(0))
    }

    /// One LISTEN session: reports notifications until the connection fails (returns) or
    /// `stop` (returns `true`).
    async fn listen_once(
        &self,
        changes: &mpsc::Sender<Change>,
        stop: &CancellationToken,
    ) -> Result<bool, StoreError> {
        let (client, mut connection) = self.config.connect(NoTls).await.map_err(pg)?;
        let (messages_tx, mut messages) = mpsc::unbounded_channel();
        // The connection only makes progress while polled; the driver forwards what the
        // server sends on its own and ends when the connection does.
        let driver = async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(message)) => {
                        if messages_tx.send(Ok(message)).is_err() {
                            return;
                        }
                    }
                    Some(Err(e)) => {
                        let _ = messages_tx.send(Err(e));
                        return;
                    }
                    None => return,
                }
            }
        };
        let listen = async {
            client
                .batch_execute(&format!("LISTEN {CHANNEL}"))
                .await
                .map_err(pg)?;
            // Listening now: whatever changed before is caught by a full reload.
            if changes.send(Change::Resync).await.is_err() {
                return Ok(true);
            }
            let mut resync = tokio::time::interval(RESYNC_INTERVAL);
            resync.tick().await;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return Ok(true),
                    _ = resync.tick() => {
                        if changes.send(Change::Resync).await.is_err() {
                            return Ok(true);
                        }
                    }
                    message = messages.recv() => match message {
                        Some(Ok(AsyncMessage::Notification(n))) => {
                            if let Some(change) = parse_payload(n.payload())
                                && changes.send(change).await.is_err()
                            {
                                return Ok(true);
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(pg(e)),
                        None => {
                            return Err(StoreError::Backend(
                                "postgresql: the listening connection closed".to_owned(),
                            ));
                        }
                    },
                }
            }
        };
        tokio::select! {
            result = listen => result,
            () = driver => Err(StoreError::Backend(
                "postgresql: the listening connection closed".to_owned(),
            )),
        }
    }
}

/// `policy <version|deleted> <name>` or `key - <name>`.
fn payload(kind: &str, version: Option<u64>, name: &str) -> String {
    match version {
        Some(v) => format!("{kind} {v} {name}"),
        None => format!("{kind} deleted {name}"),
    }
}

fn parse_payload(payload: &str) -> Option<Change> {
    let mut parts = payload.splitn(3, ' ');
    let (kind, version, name) = (parts.next()?, parts.next()?, parts.next()?);
    match kind {
        "policy" => Some(Change::Policy {
            name: name.to_owned(),
            version: version.parse().ok(),
        }),
        "key" => Some(Change::Key {
            name: name.to_owned(),
        }),
        "rollout" => Some(Change::Rollout {
            policy: name.to_owned(),
        }),
        _ => None,
    }
}

async fn notify(
    tx: &Transaction<'_>,
    kind: &str,
    version: Option<u64>,
    name: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[&CHANNEL, &payload(kind, version, name)],
    )
    .await
    .map(|_| ())
    .map_err(pg)
}

/// Why a write matched no row: another version is current (a conflict), or `missing`.
async fn not_matched(
    tx: &Transaction<'_>,
    table: &str,
    name: &str,
    missing: StoreError,
) -> StoreError {
    let current = tx
        .query_opt(
            &format!("SELECT version FROM {table} WHERE name = $1"),
            &[&name],
        )
        .await;
    match current {
        Ok(Some(row)) => StoreError::Conflict {
            name: name.to_owned(),
            current: to_u64(row.get(0)),
        },
        Ok(None) => missing,
        Err(e) => pg(e),
    }
}

/// Replaces a policy inside `tx` if its version is `expected_version` (and notifies).
async fn update_policy_in(
    tx: &Transaction<'_>,
    spec: PolicySpec,
    expected_version: u64,
) -> Result<PolicyRecord, StoreError> {
    let doc = to_json(&spec)?;
    let now = now_ms();
    // Concurrent updates of the row queue on its lock; after the winner commits the
    // others re-check `version` against the new row and match nothing.
    let row = tx
        .query_opt(
            "UPDATE policies SET doc = $2, version = version + 1, updated_ms = $3
             WHERE name = $1 AND version = $4 RETURNING created_ms, version",
            &[&spec.name, &doc, &now, &to_i64(expected_version)],
        )
        .await
        .map_err(pg)?;
    let Some(row) = row else {
        let missing = StoreError::NotFound(spec.name.clone());
        return Err(not_matched(tx, "policies", &spec.name, missing).await);
    };
    let version = to_u64(row.get(1));
    notify(tx, "policy", Some(version), &spec.name).await?;
    Ok(PolicyRecord {
        spec,
        version,
        created_ms: row.get(0),
        updated_ms: now,
        source: PolicySource::Api,
    })
}

fn rollout_from_row(row: &Row) -> RolloutRow {
    RolloutRow {
        policy: row.get(0),
        doc: row.get(1),
        version: to_u64(row.get(2)),
    }
}

fn policy_from_row(row: &Row) -> Result<PolicyRecord, StoreError> {
    let doc: String = row.get("doc");
    let spec: PolicySpec = serde_json::from_str(&doc)
        .map_err(|e| StoreError::Backend(format!("stored policy is unreadable: {e}")))?;
    Ok(PolicyRecord {
        spec,
        version: to_u64(row.get("version")),
        created_ms: row.get("created_ms"),
        updated_ms: row.get("updated_ms"),
        source: PolicySource::Api,
    })
}

fn key_from_row(row: &Row) -> Result<KeyRecord, StoreError> {
    let doc: String = row.get("doc");
    Ok(KeyRecord {
        id: row.get("id"),
        spec: serde_json::from_str(&doc)
            .map_err(|e| StoreError::Backend(format!("stored key is unreadable: {e}")))?,
        secret_hash: row.get("secret_hash"),
        revoked: row.get("revoked"),
        version: to_u64(row.get("version")),
        created_ms: row.get("created_ms"),
    })
}

const POLICY_COLUMNS: &str = "name, doc, version, created_ms, updated_ms";
const KEY_COLUMNS: &str = "id, doc, secret_hash, revoked, version, created_ms";

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Backend(e.to_string()))
}

/// `SELECT columns FROM table ORDER BY name`, each row converted.
async fn list<T>(
    client: &Object,
    columns: &str,
    table: &str,
    convert: fn(&Row) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let rows = client
        .query(&format!("SELECT {columns} FROM {table} ORDER BY name"), &[])
        .await
        .map_err(pg)?;
    rows.iter().map(convert).collect()
}

#[async_trait]
impl Store for PgStore {
    async fn experiment_report(
        &self,
        name: &str,
        from_ms: i64,
        to_ms: i64,
        defined: Option<Vec<String>>,
    ) -> Result<Option<ExperimentReport>, StoreError> {
        report::run(self, name, from_ms, to_ms, defined)
            .await
            .map_err(StoreError::Backend)
    }

    async fn list_policies(&self) -> Result<Vec<PolicyRecord>, StoreError> {
        let client = self.client().await?;
        list(&client, POLICY_COLUMNS, "policies", policy_from_row).await
    }

    async fn get_policy(&self, name: &str) -> Result<Option<PolicyRecord>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {POLICY_COLUMNS} FROM policies WHERE name = $1"),
                &[&name],
            )
            .await
            .map_err(pg)?;
        row.as_ref().map(policy_from_row).transpose()
    }

    async fn create_policy(&self, spec: PolicySpec) -> Result<PolicyRecord, StoreError> {
        let doc = to_json(&spec)?;
        let now = now_ms();
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let inserted = tx
            .execute(
                "INSERT INTO policies (name, doc, version, created_ms, updated_ms)
                 VALUES ($1, $2, 1, $3, $3) ON CONFLICT (name) DO NOTHING",
                &[&spec.name, &doc, &now],
            )
            .await
            .map_err(pg)?;
        if inserted == 0 {
            return Err(StoreError::AlreadyExists(spec.name));
        }
        notify(&tx, "policy", Some(1), &spec.name).await?;
        tx.commit().await.map_err(pg)?;
        Ok(PolicyRecord {
            spec,
            version: 1,
            created_ms: now,
            updated_ms: now,
            source: PolicySource::Api,
        })
    }

    async fn update_policy(
        &self,
        spec: PolicySpec,
        expected_version: u64,
    ) -> Result<PolicyRecord, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let record = update_policy_in(&tx, spec, expected_version).await?;
        tx.commit().await.map_err(pg)?;
        Ok(record)
    }

    async fn list_rollouts(&self) -> Result<Vec<RolloutRow>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT policy, doc, version FROM rollouts ORDER BY policy",
                &[],
            )
            .await
            .map_err(pg)?;
        Ok(rows.iter().map(rollout_from_row).collect())
    }

    async fn get_rollout(&self, policy: &str) -> Result<Option<RolloutRow>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT policy, doc, version FROM rollouts WHERE policy = $1",
                &[&policy],
            )
            .await
            .map_err(pg)?;
        Ok(row.as_ref().map(rollout_from_row))
    }

    async fn put_rollout(
        &self,
        policy: &str,
        doc: String,
        expected: u64,
        replace: Option<(PolicySpec, u64)>,
    ) -> Result<(u64, Option<PolicyRecord>), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let written = if expected == 0 {
            tx.execute(
                "INSERT INTO rollouts (policy, doc, version) VALUES ($1, $2, 1)
                 ON CONFLICT (policy) DO NOTHING",
                &[&policy, &doc],
            )
            .await
        } else {
            tx.execute(
                "UPDATE rollouts SET doc = $2, version = version + 1
                 WHERE policy = $1 AND version = $3",
                &[&policy, &doc, &to_i64(expected)],
            )
            .await
        }
        .map_err(pg)?;
        if written == 0 {
            let current = tx
                .query_opt("SELECT version FROM rollouts WHERE policy = $1", &[&policy])
                .await
                .map_err(pg)?
                .map_or(0, |row| to_u64(row.get(0)));
            return Err(StoreError::Conflict {
                name: policy.to_owned(),
                current,
            });
        }
        let record = match replace {
            Some((spec, version)) => Some(update_policy_in(&tx, spec, version).await?),
            None => None,
        };
        notify(&tx, "rollout", Some(expected + 1), policy).await?;
        tx.commit().await.map_err(pg)?;
        Ok((expected + 1, record))
    }

    async fn delete_policy(
        &self,
        name: &str,
        expected_version: Option<u64>,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let expected = expected_version.map(to_i64);
        let deleted = tx
            .execute(
                "DELETE FROM policies WHERE name = $1 AND ($2::BIGINT IS NULL OR version = $2)",
                &[&name, &expected],
            )
            .await
            .map_err(pg)?;
        if deleted == 0 {
            let missing = StoreError::NotFound(name.to_owned());
            return Err(not_matched(&tx, "policies", name, missing).await);
        }
        notify(&tx, "policy", None, name).await?;
        tx.commit().await.map_err(pg)
    }

    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let client = self.client().await?;
        list(&client, KEY_COLUMNS, "keys", key_from_row).await
    }

    async fn create_key(
        &self,
        id: String,
        spec: KeySpec,
        secret_hash: Vec<u8>,
    ) -> Result<KeyRecord, StoreError> {
        let doc = to_json(&spec)?;
        let now = now_ms();
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let inserted = tx
            .execute(
                "INSERT INTO keys (id, name, doc, secret_hash, revoked, version, created_ms)
                 VALUES ($1, $2, $3, $4, FALSE, 1, $5) ON CONFLICT DO NOTHING",
                &[&id, &spec.name, &doc, &secret_hash, &now],
            )
            .await
            .map_err(pg)?;
        if inserted == 0 {
            return Err(StoreError::Key(format!(
                "a key named `{}` already exists",
                spec.name
            )));
        }
        notify(&tx, "key", Some(1), &spec.name).await?;
        tx.commit().await.map_err(pg)?;
        Ok(KeyRecord {
            id,
            spec,
            secret_hash,
            revoked: false,
            version: 1,
            created_ms: now,
        })
    }

    async fn update_key(
        &self,
        spec: KeySpec,
        expected_version: u64,
    ) -> Result<KeyRecord, StoreError> {
        let doc = to_json(&spec)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let row = tx
            .query_opt(
                &format!(
                    "UPDATE keys SET doc = $2, version = version + 1
                     WHERE name = $1 AND version = $3 RETURNING {KEY_COLUMNS}"
                ),
                &[&spec.name, &doc, &to_i64(expected_version)],
            )
            .await
            .map_err(pg)?;
        let Some(row) = row else {
            let missing = StoreError::Key(format!("no key named `{}`", spec.name));
            return Err(not_matched(&tx, "keys", &spec.name, missing).await);
        };
        let record = key_from_row(&row)?;
        notify(&tx, "key", Some(record.version), &spec.name).await?;
        tx.commit().await.map_err(pg)?;
        Ok(record)
    }

    async fn revoke_key(&self, name: &str) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let row = tx
            .query_opt(
                "UPDATE keys SET revoked = TRUE, version = version + 1 WHERE name = $1
                 RETURNING version",
                &[&name],
            )
            .await
            .map_err(pg)?;
        let Some(row) = row else {
            return Err(StoreError::Key(format!("no key named `{name}`")));
        };
        notify(&tx, "key", Some(to_u64(row.get(0))), name).await?;
        tx.commit().await.map_err(pg)
    }

    async fn follow_changes(&self, changes: mpsc::Sender<Change>, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let result = tokio::select! {
                () = stop.cancelled() => return,
                result = self.listen_once(&changes, &stop) => result,
            };
            match result {
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "postgresql change feed lost; reconnecting");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

fn sink(e: StoreError) -> SinkError {
    SinkError::from(e)
}

/// The ledger's sink: usage records in the `usage` table.
#[async_trait]
impl UsageSink for PgStore {
    async fn insert_usage(&self, records: Vec<UsageRecord>) -> Result<(), SinkError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut cols = UsageColumns::with_capacity(records.len());
        for r in &records {
            cols.push(r).map_err(sink)?;
        }
        let mut client = self.client().await.map_err(sink)?;
        let tx = client.transaction().await.map_err(|e| sink(pg(e)))?;
        // One statement for the whole batch: the columns travel as arrays.
        tx.execute(
            "INSERT INTO usage (time_ms, request_id, rpc, key, tags, policy, provider, model,
                 attempts, input_tokens, output_tokens, cached_input_tokens, usage_reported,
                 cost_usd, latency_ms, ttft_ms, code, error_class, cache, cost_saved_usd,
                 guardrails, policy_version, rollout_arm, experiment, arm, shadow_of,
                 shadow_length_ratio, shadow_exact_match, shadow_json_agree, shadow_finish_reason)
                 SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::TEXT[],
                 $5::TEXT[], $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::INTEGER[], $10::BIGINT[],
                 $11::BIGINT[], $12::BIGINT[], $13::BOOLEAN[], $14::DOUBLE PRECISION[],
                 $15::DOUBLE PRECISION[], $16::DOUBLE PRECISION[], $17::TEXT[], $18::TEXT[],
                 $19::TEXT[], $20::DOUBLE PRECISION[], $21::TEXT[], $22::BIGINT[],
                 $23::TEXT[], $24::TEXT[], $25::TEXT[], $26::TEXT[], $27::DOUBLE PRECISION[],
                 $28::BOOLEAN[], $29::BOOLEAN[], $30::TEXT[])",
            &[
                &cols.time_ms,
                &cols.request_id,
                &cols.rpc,
                &cols.key,
                &cols.tags,
                &cols.policy,
                &cols.provider,
                &cols.model,
                &cols.attempts,
                &cols.input_tokens,
                &cols.output_tokens,
                &cols.cached_input_tokens,
                &cols.usage_reported,
                &cols.cost_usd,
                &cols.latency_ms,
                &cols.ttft_ms,
                &cols.code,
                &cols.error_class,
                &cols.cache,
                &cols.cost_saved_usd,
                &cols.guardrails,
                &cols.policy_version,
                &cols.rollout_arm,
                &cols.experiment,
                &cols.arm,
                &cols.shadow_of,
                &cols.shadow_length_ratio,
                &cols.shadow_exact_match,
                &cols.shadow_json_agree,
                &cols.shadow_finish_reason,
            ],
        )
        .await
        .map_err(|e| sink(pg(e)))?;
        for r in &records {
            if let Some(c) = &r.content {
                tx.execute(
                    "INSERT INTO usage_content (request_id, time_ms, key, tenant, prompt, reply,
                     expires_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    &[
                        &r.request_id,
                        &r.time_ms,
                        &r.key,
                        &c.tenant,
                        &c.prompt,
                        &c.reply,
                        &c.expires_ms,
                    ],
                )
                .await
                .map_err(|e| sink(pg(e)))?;
            }
        }
        // The rollups, in the same transaction. Rows come sorted by (minute, dimensions),
        // so replicas writing the same rows lock them in one order (no deadlock).
        let upsert = tx
            .prepare(ledger::rollup_upsert(Dialect::Postgres))
            .await
            .map_err(|e| sink(pg(e)))?;
        for rollup in ledger::rollups(&records) {
            let params = rollup.params();
            tx.execute(&upsert, &pg_params(&params))
                .await
                .map_err(|e| sink(pg(e)))?;
        }
        let guardrails = ledger::guardrail_rollups(&records);
        if !guardrails.is_empty() {
            let upsert = tx
                .prepare(ledger::guardrail_rollup_upsert(Dialect::Postgres))
                .await
                .map_err(|e| sink(pg(e)))?;
            for rollup in guardrails {
                tx.execute(&upsert, &pg_params(&rollup.params()))
                    .await
                    .map_err(|e| sink(pg(e)))?;
            }
        }
        tx.commit().await.map_err(|e| sink(pg(e)))
    }

    async fn usage_groups(&self, query: &UsageQuery) -> Result<Vec<UsageGroup>, SinkError> {
        let dims = query.group_by.len();
        let (sql, params) = ledger::usage_sql(query, Dialect::Postgres)
            .ok_or_else(|| SinkError("unknown usage dimension".to_owned()))?;
        let client = self.client().await.map_err(sink)?;
        let rows = client
            .query(&sql, &pg_params(&params))
            .await
            .map_err(|e| sink(pg(e)))?;
        Ok(rows
            .iter()
            .map(|row| {
                let key = (0..dims).map(|i| row.get::<_, String>(i)).collect();
                let mut counts = [0i64; 6];
                for (j, c) in counts.iter_mut().enumerate() {
                    *c = row.get(dims + j);
                }
                let histograms: Vec<i64> = (0..2 * ledger::BUCKETS)
                    .map(|j| row.get(dims + 7 + j))
                    .collect();
                let decisions = row.get(dims + 7 + 2 * ledger::BUCKETS);
                ledger::usage_group(key, counts, row.get(dims + 6), &histograms, decisions)
            })
            .collect())
    }

    async fn usage_page(
        &self,
        from_ms: i64,
        to_ms: i64,
        after: Option<(i64, i64)>,
        limit: usize,
    ) -> Result<Vec<(i64, UsageRecord)>, SinkError> {
        let (after_time, after_id) = after.unwrap_or((i64::MIN, i64::MIN));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let client = self.client().await.map_err(sink)?;
        let rows = client
            .query(
                &format!(
                    "SELECT id, {USAGE_COLUMNS} FROM usage
                     WHERE time_ms >= $1 AND time_ms < $2 AND (time_ms, id) > ($3, $4)
                     ORDER BY time_ms, id LIMIT $5"
                ),
                &[&from_ms, &to_ms, &after_time, &after_id, &limit],
            )
            .await
            .map_err(|e| sink(pg(e)))?;
        Ok(rows
            .iter()
            .map(|row| (row.get("id"), usage_from_row(row)))
            .collect())
    }

    async fn day_spend(&self, from_ms: i64) -> Result<Vec<DaySpend>, SinkError> {
        let (sql, params) = ledger::day_spend_sql(Dialect::Postgres, from_ms);
        let client = self.client().await.map_err(sink)?;
        let rows = client
            .query(&sql, &pg_params(&params))
            .await
            .map_err(|e| sink(pg(e)))?;
        Ok(rows
            .iter()
            .map(|row| DaySpend {
                day: row.get(0),
                key: row.get(1),
                team: row.get(2),
                cost_usd: row.get(3),
            })
            .collect())
    }

    async fn delete_rollups_before(&self, cutoff_ms: i64) -> Result<u64, SinkError> {
        let client = self.client().await.map_err(sink)?;
        let mut n = 0;
        for table in ["usage_minute", ledger::GUARDRAIL_TABLE] {
            n += client
                .execute(
                    &format!("DELETE FROM {table} WHERE minute_ms < $1"),
                    &[&cutoff_ms],
                )
                .await
                .map_err(|e| sink(pg(e)))?;
        }
        Ok(n)
    }

    async fn usage_between(&self, from_ms: i64, to_ms: i64) -> Result<Vec<UsageRecord>, SinkError> {
        let client = self.client().await.map_err(sink)?;
        let rows = client
            .query(
                &format!(
                    "SELECT {USAGE_COLUMNS} FROM usage
                     WHERE time_ms >= $1 AND time_ms < $2 ORDER BY time_ms, id"
                ),
                &[&from_ms, &to_ms],
            )
            .await
            .map_err(|e| sink(pg(e)))?;
        Ok(rows.iter().map(usage_from_row).collect())
    }

    async fn delete_usage_before(&self, cutoff_ms: i64) -> Result<u64, SinkError> {
        let client = self.client().await.map_err(sink)?;
        client
            .execute("DELETE FROM usage WHERE time_ms < $1", &[&cutoff_ms])
            .await
            .map_err(|e| sink(pg(e)))
    }

    async fn usage_content(
        &self,
        request_id: &str,
        now_ms: i64,
    ) -> Result<Vec<ledger::StoredContent>, SinkError> {
        let client = self.client().await.map_err(sink)?;
        let rows = client
            .query(
                "SELECT request_id, time_ms, key, tenant, prompt, reply, expires_ms
                 FROM usage_content WHERE request_id = $1 AND expires_ms > $2 ORDER BY time_ms",
                &[&request_id, &now_ms],
            )
            .await
            .map_err(|e| sink(pg(e)))?;
        Ok(rows
            .iter()
            .map(|row| ledger::StoredContent {
                request_id: row.get(0),
                time_ms: row.get(1),
                key: row.get(2),
                content: ledger::Content {
                    tenant: row.get(3),
                    prompt: row.get(4),
                    reply: row.get(5),
                    expires_ms: row.get(6),
                },
            })
            .collect())
    }

    async fn delete_expired_content(&self, now_ms: i64) -> Result<u64, SinkError> {
        let client = self.client().await.map_err(sink)?;
        client
            .execute(
                "DELETE FROM usage_content WHERE expires_ms <= $1",
                &[&now_ms],
            )
            .await
            .map_err(|e| sink(pg(e)))
    }

    async fn delete_tenant_usage_before(
        &self,
        tenant: &str,
        cutoff_ms: i64,
    ) -> Result<u64, SinkError> {
        let mut client = self.client().await.map_err(sink)?;
        let tx = client.transaction().await.map_err(|e| sink(pg(e)))?;
        let n = tx
            .execute(
                "DELETE FROM usage WHERE time_ms < $1 AND (tags::jsonb) ->> 'team' = $2",
                &[&cutoff_ms, &tenant],
            )
            .await
            .map_err(|e| sink(pg(e)))?;
        // The tenant's guardrail rollups too: they say what kinds of data it sent.
        tx.execute(
            &format!(
                "DELETE FROM {} WHERE minute_ms < $1 AND (tags::jsonb) ->> 'team' = $2",
                ledger::GUARDRAIL_TABLE
            ),
            &[&cutoff_ms, &tenant],
        )
        .await
        .map_err(|e| sink(pg(e)))?;
        tx.commit().await.map_err(|e| sink(pg(e)))?;
        Ok(n)
    }
}

/// The audit log's sink: entries in the `audit_log` table.
#[async_trait]
impl AuditSink for PgStore {
    async fn append_audit(&self, time_ms: i64, e: audit::Entry) -> Result<i64, AuditError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "INSERT INTO audit_log (time_ms, actor, action, resource_kind, resource,
                 before_etag, after_etag, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 RETURNING id",
                &[
                    &time_ms,
                    &e.actor,
                    &e.action,
                    &e.resource_kind,
                    &e.resource,
                    &e.before_etag,
                    &e.after_etag,
                    &e.detail,
                ],
            )
            .await
            .map_err(pg)?;
        Ok(row.get(0))
    }

    async fn list_audit(&self, q: &audit::Query) -> Result<Vec<audit::Record>, AuditError> {
        let (before_time, before_id) = q.before.unwrap_or((i64::MAX, i64::MAX));
        let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, time_ms, actor, action, resource_kind, resource, before_etag,
                 after_etag, detail FROM audit_log
                 WHERE time_ms >= $1 AND time_ms < $2 AND (time_ms, id) < ($3, $4)
                 AND ($5 = '' OR actor = $5) AND ($6 = '' OR resource_kind = $6)
                 AND ($7 = '' OR resource = $7)
                 ORDER BY time_ms DESC, id DESC LIMIT $8",
                &[
                    &q.from_ms,
                    &q.to_ms,
                    &before_time,
                    &before_id,
                    &q.actor,
                    &q.resource_kind,
                    &q.resource,
                    &limit,
                ],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|row| audit::Record {
                id: row.get("id"),
                time_ms: row.get("time_ms"),
                entry: audit::Entry {
                    actor: row.get("actor"),
                    action: row.get("action"),
                    resource_kind: row.get("resource_kind"),
                    resource: row.get("resource"),
                    before_etag: row.get("before_etag"),
                    after_etag: row.get("after_etag"),
                    detail: row.get("detail"),
                },
            })
            .collect())
    }

    async fn delete_audit_before(&self, cutoff_ms: i64) -> Result<u64, AuditError> {
        let client = self.client().await?;
        client
            .execute("DELETE FROM audit_log WHERE time_ms < $1", &[&cutoff_ms])
            .await
            .map_err(|e| AuditError::from(pg(e)))
    }
}

const USAGE_COLUMNS: &str = "time_ms, request_id, rpc, key, tags, policy, provider, model,
    attempts, input_tokens, output_tokens, cached_input_tokens, usage_reported, cost_usd,
    latency_ms, ttft_ms, code, error_class, cache, cost_saved_usd, guardrails, policy_version,
    rollout_arm, experiment, arm, shadow_of, shadow_length_ratio, shadow_exact_match,
    shadow_json_agree, shadow_finish_reason";

#[async_trait]
impl report::Query for PgStore {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    async fn rows(
        &self,
        sql: String,
        params: Vec<SqlParam>,
        kinds: Vec<report::Kind>,
    ) -> Result<Vec<Vec<report::Value>>, String> {
        let client = self.client().await.map_err(|e| e.to_string())?;
        let rows = client
            .query(&sql, &pg_params(&params))
            .await
            .map_err(|e| pg(e).to_string())?;
        let value = |row: &Row, i: usize, kind: report::Kind| {
            Ok(match kind {
                report::Kind::Int => row
                    .try_get::<_, Option<i64>>(i)?
                    .map_or(report::Value::Null, report::Value::Int),
                report::Kind::Real => row
                    .try_get::<_, Option<f64>>(i)?
                    .map_or(report::Value::Null, report::Value::Real),
                report::Kind::Text => row
                    .try_get::<_, Option<String>>(i)?
                    .map_or(report::Value::Null, report::Value::Text),
            })
        };
        rows.iter()
            .map(|row| {
                kinds
                    .iter()
                    .enumerate()
                    .map(|(i, kind)| value(row, i, *kind))
                    .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pg(e).to_string())
    }
}

/// Generated-query parameters as PostgreSQL parameters.
fn pg_params(params: &[SqlParam]) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|p| match p {
            SqlParam::Int(v) => v as &(dyn ToSql + Sync),
            SqlParam::Text(v) => v as &(dyn ToSql + Sync),
            SqlParam::Real(v) => v as &(dyn ToSql + Sync),
        })
        .collect()
}

fn usage_from_row(row: &Row) -> UsageRecord {
    let tags: String = row.get("tags");
    UsageRecord {
        time_ms: row.get("time_ms"),
        request_id: row.get("request_id"),
        rpc: row.get("rpc"),
        key: row.get("key"),
        tags: serde_json::from_str(&tags).unwrap_or_default(),
        policy: row.get("policy"),
        provider: row.get("provider"),
        model: row.get("model"),
        attempts: u32::try_from(row.get::<_, i32>("attempts")).unwrap_or(0),
        input_tokens: to_u64(row.get("input_tokens")),
        output_tokens: to_u64(row.get("output_tokens")),
        cached_input_tokens: to_u64(row.get("cached_input_tokens")),
        usage_reported: row.get("usage_reported"),
        cost_usd: row.get("cost_usd"),
        latency_ms: row.get("latency_ms"),
        ttft_ms: row.get("ttft_ms"),
        code: row.get("code"),
        error_class: row.get("error_class"),
        cache: row.get("cache"),
        cost_saved_usd: row.get("cost_saved_usd"),
        guardrails: row.get("guardrails"),
        policy_version: to_u64(row.get("policy_version")),
        rollout_arm: row.get("rollout_arm"),
        trial: ledger::Trial {
            experiment: row.get("experiment"),
            arm: row.get("arm"),
            shadow_of: row.get("shadow_of"),
            comparison: row
                .get::<_, Option<bool>>("shadow_exact_match")
                .map(|exact_match| ledger::Comparison {
                    length_ratio: row.get("shadow_length_ratio"),
                    exact_match,
                    json_agree: row.get("shadow_json_agree"),
                    finish_reason: row.get("shadow_finish_reason"),
                }),
        },
        content: None,
    }
}

/// A batch of usage records, column by column (the arrays of one `UNNEST` insert).
#[derive(Default)]
struct UsageColumns {
    time_ms: Vec<i64>,
    request_id: Vec<String>,
    rpc: Vec<String>,
    key: Vec<String>,
    tags: Vec<String>,
    policy: Vec<String>,
    provider: Vec<String>,
    model: Vec<String>,
    attempts: Vec<i32>,
    input_tokens: Vec<i64>,
    output_tokens: Vec<i64>,
    cached_input_tokens: Vec<i64>,
    usage_reported: Vec<bool>,
    cost_usd: Vec<Option<f64>>,
    latency_ms: Vec<f64>,
    ttft_ms: Vec<Option<f64>>,
    code: Vec<String>,
    error_class: Vec<String>,
    cache: Vec<String>,
    cost_saved_usd: Vec<Option<f64>>,
    guardrails: Vec<String>,
    policy_version: Vec<i64>,
    rollout_arm: Vec<String>,
    experiment: Vec<String>,
    arm: Vec<String>,
    shadow_of: Vec<String>,
    shadow_length_ratio: Vec<Option<f64>>,
    shadow_exact_match: Vec<Option<bool>>,
    shadow_json_agree: Vec<Option<bool>>,
    shadow_finish_reason: Vec<String>,
}

impl UsageColumns {
    fn with_capacity(n: usize) -> Self {
        Self {
            time_ms: Vec::with_capacity(n),
            ..Self::default()
        }
    }

    fn push(&mut self, r: &UsageRecord) -> Result<(), StoreError> {
        self.time_ms.push(r.time_ms);
        self.request_id.push(r.request_id.clone());
        self.rpc.push(r.rpc.clone());
        self.key.push(r.key.clone());
        self.tags.push(to_json(&r.tags)?);
        self.policy.push(r.policy.clone());
        self.provider.push(r.provider.clone());
        self.model.push(r.model.clone());
        self.attempts
            .push(i32::try_from(r.attempts).unwrap_or(i32::MAX));
        self.input_tokens.push(to_i64(r.input_tokens));
        self.output_tokens.push(to_i64(r.output_tokens));
        self.cached_input_tokens.push(to_i64(r.cached_input_tokens));
        self.usage_reported.push(r.usage_reported);
        self.cost_usd.push(r.cost_usd);
        self.latency_ms.push(r.latency_ms);
        self.ttft_ms.push(r.ttft_ms);
        self.code.push(r.code.clone());
        self.error_class.push(r.error_class.clone());
        self.cache.push(r.cache.clone());
        self.cost_saved_usd.push(r.cost_saved_usd);
        self.guardrails.push(r.guardrails.clone());
        self.policy_version.push(to_i64(r.policy_version));
        self.rollout_arm.push(r.rollout_arm.clone());
        let t = &r.trial;
        self.experiment.push(t.experiment.clone());
        self.arm.push(t.arm.clone());
        self.shadow_of.push(t.shadow_of.clone());
        let c = t.comparison.as_ref();
        self.shadow_length_ratio
            .push(c.and_then(|c| c.length_ratio));
        self.shadow_exact_match.push(c.map(|c| c.exact_match));
        self.shadow_json_agree.push(c.and_then(|c| c.json_agree));
        self.shadow_finish_reason
            .push(c.map_or_else(String::new, |c| c.finish_reason.clone()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        assert_eq!(
            parse_payload(&payload("policy", Some(3), "chat eu")),
            Some(Change::Policy {
                name: "chat eu".into(),
                version: Some(3)
            })
        );
        assert_eq!(
            parse_payload(&payload("policy", None, "p")),
            Some(Change::Policy {
                name: "p".into(),
                version: None
            })
        );
        assert_eq!(
            parse_payload(&payload("key", Some(1), "k")),
            Some(Change::Key { name: "k".into() })
        );
        assert_eq!(parse_payload("bogus"), None);
    }

    #[test]
    fn store_url_and_path_are_exclusive() {
        use crate::{
            settings::Issues,
            store::{RawStore, StoreSettings},
        };
        let settings = |path: Option<&str>, url: Option<&str>| {
            let mut issues = Issues::new();
            let s = StoreSettings::from_raw(
                RawStore {
                    path: path.map(str::to_owned),
                    url: url.map(str::to_owned),
                },
                &mut issues,
            );
            (s, issues.into_vec())
        };
        let (s, issues) = settings(None, Some("postgres://gw:pw@db:5432/gw"));
        assert!(issues.is_empty(), "{issues:?}");
        assert!(!format!("{s:?}").contains("pw@"), "{s:?}");
        let (_, issues) = settings(Some("/x.db"), Some("postgres://db/gw"));
        assert_eq!(issues.len(), 1);
        assert_eq!(issues[0].field, "store.url");
        let (_, issues) = settings(None, Some("redis://db"));
        assert_eq!(issues[0].field, "store.url");
        assert!(
            issues[0].message.contains("not a postgres:// url"),
            "{issues:?}"
        );
    }

    #[test]
    fn urls_are_checked_and_redacted() {
        assert!(parse_url("postgres://u:pw@127.0.0.1:5432/db").is_ok());
        let err = parse_url("mysql://u:secret@h/db").unwrap_err();
        assert!(!err.contains("secret"), "{err}");
        assert_eq!(
            super::super::redacted_url("postgres://u:secret@h:1/db?x=1"),
            "postgres://u:***@h:1/db?x=1"
        );
        assert_eq!(
            super::super::redacted_url("postgres://h/db"),
            "postgres://h/db"
        );
    }
}
