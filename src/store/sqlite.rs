//! The embedded SQLite store: one file, WAL journal, numbered migrations tracked in
//! `PRAGMA user_version`. Blocking SQLite calls run on tokio's blocking pool.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};

use super::{RolloutRow, Store, StoreError};
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

/// Schema migrations, applied in order; never edit a published one, add a new one.
const MIGRATIONS: &[&str] = &[
    // 1: routing policies.
    "CREATE TABLE policies (
        name TEXT PRIMARY KEY NOT NULL,
        doc TEXT NOT NULL,
        version INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL
    ) STRICT;",
    // 2: the usage ledger.
    "CREATE TABLE usage (
        id INTEGER PRIMARY KEY,
        time_ms INTEGER NOT NULL,
        request_id TEXT NOT NULL,
        rpc TEXT NOT NULL,
        key TEXT NOT NULL,
        tags TEXT NOT NULL,
        policy TEXT NOT NULL,
        provider TEXT NOT NULL,
        model TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        cached_input_tokens INTEGER NOT NULL,
        usage_reported INTEGER NOT NULL,
        cost_usd REAL,
        latency_ms REAL NOT NULL,
        ttft_ms REAL,
        code TEXT NOT NULL,
        error_class TEXT NOT NULL
    ) STRICT;
    CREATE INDEX usage_time ON usage (time_ms);",
    // 3: gateway api keys (only a hash of each secret).
    "CREATE TABLE keys (
        id TEXT PRIMARY KEY NOT NULL,
        name TEXT NOT NULL UNIQUE,
        doc TEXT NOT NULL,
        secret_hash BLOB NOT NULL,
        revoked INTEGER NOT NULL,
        version INTEGER NOT NULL,
        created_ms INTEGER NOT NULL
    ) STRICT;",
    // 4: the response cache's outcome and what a hit saved.
    "ALTER TABLE usage ADD COLUMN cache TEXT NOT NULL DEFAULT '';
    ALTER TABLE usage ADD COLUMN cost_saved_usd REAL;",
    // 5: per-minute usage rollups, filled from the records already stored.
    ledger::ROLLUP_MIGRATION,
    // 6: the audit log of admin changes.
    "CREATE TABLE audit_log (
        id INTEGER PRIMARY KEY,
        time_ms INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        resource_kind TEXT NOT NULL,
        resource TEXT NOT NULL,
        before_etag TEXT NOT NULL,
        after_etag TEXT NOT NULL,
        detail TEXT NOT NULL
    ) STRICT;
    CREATE INDEX audit_log_time ON audit_log (time_ms, id);",
    // 7: each call's guardrail decisions.
    "ALTER TABLE usage ADD COLUMN guardrails TEXT NOT NULL DEFAULT '';",
    // 8: each policy's latest rollout; the policy version (and rollout arm) of a call.
    "CREATE TABLE rollouts (
        policy TEXT PRIMARY KEY NOT NULL,
        doc TEXT NOT NULL,
        version INTEGER NOT NULL
    ) STRICT;
    ALTER TABLE usage ADD COLUMN policy_version INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN rollout_arm TEXT NOT NULL DEFAULT '';",
    // 9: experiments and shadow traffic: the arm of a call, a shadow's primary and comparison.
    "ALTER TABLE usage ADD COLUMN experiment TEXT NOT NULL DEFAULT '';
    ALTER TABLE usage ADD COLUMN arm TEXT NOT NULL DEFAULT '';
    ALTER TABLE usage ADD COLUMN shadow_of TEXT NOT NULL DEFAULT '';
    ALTER TABLE usage ADD COLUMN shadow_length_ratio REAL;
    ALTER TABLE usage ADD COLUMN shadow_exact_match INTEGER;
    ALTER TABLE usage ADD COLUMN shadow_json_agree INTEGER;
    ALTER TABLE usage ADD COLUMN shadow_finish_reason TEXT NOT NULL DEFAULT '';
    CREATE INDEX usage_experiment ON usage (experiment, time_ms) WHERE experiment <> '';",
    // Kept content (keys with `keep_content`): redacted prompt and reply until they expire.
    "CREATE TABLE usage_content (
        request_id TEXT NOT NULL,
        time_ms INTEGER NOT NULL,
        key TEXT NOT NULL,
        tenant TEXT NOT NULL,
        prompt TEXT NOT NULL,
        reply TEXT NOT NULL,
        expires_ms INTEGER NOT NULL
    );
    CREATE INDEX usage_content_request ON usage_content (request_id);
    CREATE INDEX usage_content_expires ON usage_content (expires_ms);",
    // Per-minute rollups by guardrail decision, filled from the records still kept.
    ledger::GUARDRAIL_ROLLUP_MIGRATION,
];

/// The embedded store.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Opens a connection to the store file at `path` (creating it and its directory when
/// needed; `:memory:` is a private in-memory database) in WAL mode with
/// `synchronous = FULL`. Other tables in the same file (batch jobs) open theirs here too.
pub fn connect(path: &Path) -> Result<Connection, StoreError> {
    let conn = if path == Path::new(":memory:") {
        Connection::open_in_memory().map_err(backend)?
    } else {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| backend(format!("cannot create {}: {e}", dir.display())))?;
        }
        Connection::open(path)
            .map_err(|e| backend(format!("cannot open {}: {e}", path.display())))?
    };
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(backend)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(backend)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(backend)?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating when needed) the store at `path`; `:memory:` keeps it in memory.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = connect(path)?;
        let mut store = Self {
            conn: Arc::new(Mutex::new(conn)),
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let mut conn = self.conn.lock().map_err(backend)?;
        let current: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(backend)?;
        let current = usize::try_from(current).unwrap_or(0);
        if current > MIGRATIONS.len() {
            return Err(backend(format!(
                "the store has schema version {current}, newer than this gateway knows ({}); upgrade the gateway",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
            let tx = conn.transaction().map_err(backend)?;
            if *sql == ledger::ROLLUP_MIGRATION {
                tx.execute_batch(&ledger::rollup_table_sql(Dialect::Sqlite))
                    .map_err(backend)?;
                tx.execute(&ledger::rollup_backfill_sql(Dialect::Sqlite), [])
                    .map_err(backend)?;
            } else if *sql == ledger::GUARDRAIL_ROLLUP_MIGRATION {
                tx.execute_batch(&ledger::guardrail_rollup_table_sql(Dialect::Sqlite))
                    .map_err(backend)?;
                backfill_guardrail_rollups(&tx)?;
            } else {
                tx.execute_batch(sql).map_err(backend)?;
            }
            tx.pragma_update(None, "user_version", i + 1)
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
        }
        Ok(())
    }

    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().map_err(backend)?;
            f(&mut conn)
        })
        .await
        .map_err(backend)?
    }
}

fn row_to_record(
    doc: &str,
    version: i64,
    created_ms: i64,
    updated_ms: i64,
) -> Result<PolicyRecord, StoreError> {
    let spec: PolicySpec = serde_json::from_str(doc)
        .map_err(|e| backend(format!("stored policy is unreadable: {e}")))?;
    Ok(PolicyRecord {
        spec,
        version: u64::try_from(version).unwrap_or(0),
        created_ms,
        updated_ms,
        source: PolicySource::Api,
    })
}

fn current_version(conn: &Connection, name: &str) -> Result<Option<u64>, StoreError> {
    conn.query_row(
        "SELECT version FROM policies WHERE name = ?1",
        params![name],
        |row| row.get::<_, i64>(0),
    )
    .optional()
    .map_err(backend)
    .map(|v| v.map(|v| u64::try_from(v).unwrap_or(0)))
}

/// Replaces a policy inside `tx` if its version is `expected_version`.
fn update_policy_in(
    tx: &rusqlite::Transaction<'_>,
    spec: PolicySpec,
    expected_version: u64,
) -> Result<PolicyRecord, StoreError> {
    let doc = serde_json::to_string(&spec).map_err(backend)?;
    let now = now_ms();
    let expected = i64::try_from(expected_version).unwrap_or(i64::MAX);
    let updated = tx
        .execute(
            "UPDATE policies SET doc = ?2, version = version + 1, updated_ms = ?3
             WHERE name = ?1 AND version = ?4",
            params![spec.name, doc, now, expected],
        )
        .map_err(backend)?;
    if updated == 0 {
        return Err(match current_version(tx, &spec.name)? {
            Some(current) => StoreError::Conflict {
                name: spec.name,
                current,
            },
            None => StoreError::NotFound(spec.name),
        });
    }
    let created_ms: i64 = tx
        .query_row(
            "SELECT created_ms FROM policies WHERE name = ?1",
            params![spec.name],
            |row| row.get(0),
        )
        .map_err(backend)?;
    Ok(PolicyRecord {
        spec,
        version: expected_version + 1,
        created_ms,
        updated_ms: now,
        source: PolicySource::Api,
    })
}

fn rollout_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RolloutRow> {
    Ok(RolloutRow {
        policy: row.get(0)?,
        doc: row.get(1)?,
        version: to_u64(row.get(2)?),
    })
}

#[async_trait]
impl Store for SqliteStore {
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
        self.with_conn(|conn| {
            let mut stmt = conn
                .prepare("SELECT doc, version, created_ms, updated_ms FROM policies ORDER BY name")
                .map_err(backend)?;
            let rows = stmt
                .query_map([], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get(1)?,
                        row.get(2)?,
                        row.get(3)?,
                    ))
                })
                .map_err(backend)?;
            let mut out = Vec::new();
            for row in rows {
                let (doc, version, created, updated) = row.map_err(backend)?;
                out.push(row_to_record(&doc, version, created, updated)?);
            }
            Ok(out)
        })
        .await
    }

    async fn get_policy(&self, name: &str) -> Result<Option<PolicyRecord>, StoreError> {
        let name = name.to_owned();
        self.with_conn(move |conn| {
            let row = conn
                .query_row(
                    "SELECT doc, version, created_ms, updated_ms FROM policies WHERE name = ?1",
                    params![name],
                    |row| {
                        Ok((
                            row.get::<_, String>(0)?,
                            row.get(1)?,
                            row.get(2)?,
                            row.get(3)?,
                        ))
                    },
                )
                .optional()
                .map_err(backend)?;
            row.map(|(doc, v, c, u)| row_to_record(&doc, v, c, u))
                .transpose()
        })
        .await
    }

    async fn create_policy(&self, spec: PolicySpec) -> Result<PolicyRecord, StoreError> {
        self.with_conn(move |conn| {
            let doc = serde_json::to_string(&spec).map_err(backend)?;
            let now = now_ms();
            let inserted = conn
                .execute(
                    "INSERT INTO policies (name, doc, version, created_ms, updated_ms)
                     VALUES (?1, ?2, 1, ?3, ?3) ON CONFLICT(name) DO NOTHING",
                    params![spec.name, doc, now],
                )
                .map_err(backend)?;
            if inserted == 0 {
                return Err(StoreError::AlreadyExists(spec.name));
            }
            Ok(PolicyRecord {
                spec,
                version: 1,
                created_ms: now,
                updated_ms: now,
                source: PolicySource::Api,
            })
        })
        .await
    }

    async fn update_policy(
        &self,
        spec: PolicySpec,
        expected_version: u64,
    ) -> Result<PolicyRecord, StoreError> {
        self.with_conn(move |conn| {
            let tx = conn.transaction().map_err(backend)?;
            let record = update_policy_in(&tx, spec, expected_version)?;
            tx.commit().map_err(backend)?;
            Ok(record)
        })
        .await
    }

    async fn list_rollouts(&self) -> Result<Vec<RolloutRow>, StoreError> {
        self.with_conn(|conn| {
            let mut stmt = conn
                .prepare("SELECT policy, doc, version FROM rollouts ORDER BY policy")
                .map_err(backend)?;
            let rows = stmt
                .query_map([], rollout_from_row)
                .map_err(backend)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            Ok(rows)
        })
        .await
    }

    async fn get_rollout(&self, policy: &str) -> Result<Option<RolloutRow>, StoreError> {
        let policy = policy.to_owned();
        self.with_conn(move |conn| {
            conn.query_row(
                "SELECT policy, doc, version FROM rollouts WHERE policy = ?1",
                params![policy],
                rollout_from_row,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn put_rollout(
        &self,
        policy: &str,
        doc: String,
        expected: u64,
        replace: Option<(PolicySpec, u64)>,
    ) -> Result<(u64, Option<PolicyRecord>), StoreError> {
        let policy = policy.to_owned();
        self.with_conn(move |conn| {
            let tx = conn.transaction().map_err(backend)?;
            let expected_i = i64::try_from(expected).unwrap_or(i64::MAX);
            let written = if expected == 0 {
                tx.execute(
                    "INSERT INTO rollouts (policy, doc, version) VALUES (?1, ?2, 1)
                     ON CONFLICT (policy) DO NOTHING",
                    params![policy, doc],
                )
            } else {
                tx.execute(
                    "UPDATE rollouts SET doc = ?2, version = version + 1
                     WHERE policy = ?1 AND version = ?3",
                    params![policy, doc, expected_i],
                )
            }
            .map_err(backend)?;
            if written == 0 {
                let current: Option<i64> = tx
                    .query_row(
                        "SELECT version FROM rollouts WHERE policy = ?1",
                        params![policy],
                        |row| row.get(0),
                    )
                    .optional()
                    .map_err(backend)?;
                return Err(StoreError::Conflict {
                    name: policy,
                    current: current.map_or(0, to_u64),
                });
            }
            let record = match replace {
                Some((spec, version)) => Some(update_policy_in(&tx, spec, version)?),
                None => None,
            };
            tx.commit().map_err(backend)?;
            Ok((expected + 1, record))
        })
        .await
    }

    async fn delete_policy(
        &self,
        name: &str,
        expected_version: Option<u64>,
    ) -> Result<(), StoreError> {
        let name = name.to_owned();
        self.with_conn(move |conn| {
            let tx = conn.transaction().map_err(backend)?;
            let Some(current) = current_version(&tx, &name)? else {
                return Err(StoreError::NotFound(name));
            };
            if let Some(expected) = expected_version
                && expected != current
            {
                return Err(StoreError::Conflict { name, current });
            }
            tx.execute("DELETE FROM policies WHERE name = ?1", params![name])
                .map_err(backend)?;
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.with_conn(|conn| {
            let mut stmt = conn
                .prepare(&format!("SELECT {KEY_COLUMNS} FROM keys ORDER BY name"))
                .map_err(backend)?;
            let rows = stmt.query_map([], key_from_row).map_err(backend)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(key_record(row.map_err(backend)?)?);
            }
            Ok(out)
        })
        .await
    }

    async fn create_key(
        &self,
        id: String,
        spec: KeySpec,
        secret_hash: Vec<u8>,
    ) -> Result<KeyRecord, StoreError> {
        self.with_conn(move |conn| {
            let doc = serde_json::to_string(&spec).map_err(backend)?;
            let now = now_ms();
            let inserted = conn
                .execute(
                    "INSERT INTO keys (id, name, doc, secret_hash, revoked, version, created_ms)
                     VALUES (?1, ?2, ?3, ?4, 0, 1, ?5) ON CONFLICT DO NOTHING",
                    params![id, spec.name, doc, secret_hash, now],
                )
                .map_err(backend)?;
            if inserted == 0 {
                return Err(StoreError::Key(format!(
                    "a key named `{}` already exists",
                    spec.name
                )));
            }
            Ok(KeyRecord {
                id,
                spec,
                secret_hash,
                revoked: false,
                version: 1,
                created_ms: now,
            })
        })
        .await
    }

    async fn update_key(
        &self,
        spec: KeySpec,
        expected_version: u64,
    ) -> Result<KeyRecord, StoreError> {
        self.with_conn(move |conn| {
            let doc = serde_json::to_string(&spec).map_err(backend)?;
            let tx = conn.transaction().map_err(backend)?;
            let updated = tx
                .execute(
                    "UPDATE keys SET doc = ?2, version = version + 1 WHERE name = ?1 AND version = ?3",
                    params![spec.name, doc, to_i64(expected_version)],
                )
                .map_err(backend)?;
            let row = tx
                .query_row(
                    &format!("SELECT {KEY_COLUMNS} FROM keys WHERE name = ?1"),
                    params![spec.name],
                    key_from_row,
                )
                .optional()
                .map_err(backend)?;
            let Some(row) = row else {
                return Err(StoreError::Key(format!("no key named `{}`", spec.name)));
            };
            let record = key_record(row)?;
            if updated == 0 {
                return Err(StoreError::Conflict {
                    name: spec.name,
                    current: record.version,
                });
            }
            tx.commit().map_err(backend)?;
            Ok(record)
        })
        .await
    }

    async fn revoke_key(&self, name: &str) -> Result<(), StoreError> {
        let name = name.to_owned();
        self.with_conn(move |conn| {
            let n = conn
                .execute(
                    "UPDATE keys SET revoked = 1, version = version + 1 WHERE name = ?1",
                    params![name],
                )
                .map_err(backend)?;
            if n == 0 {
                return Err(StoreError::Key(format!("no key named `{name}`")));
            }
            Ok(())
        })
        .await
    }
}

/// Fills the guardrail rollups, when empty, from the raw records that have decisions, a
/// page at a time (the rollups add up, so the pages may split a minute).
fn backfill_guardrail_rollups(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    let filled: bool = tx
        .query_row(
            &format!("SELECT EXISTS (SELECT 1 FROM {})", ledger::GUARDRAIL_TABLE),
            [],
            |row| row.get(0),
        )
        .map_err(backend)?;
    if filled {
        return Ok(());
    }
    let mut select = tx
        .prepare(&format!(
            "SELECT id, {USAGE_COLUMNS} FROM usage WHERE guardrails <> '' AND id > ?1
             ORDER BY id LIMIT {BACKFILL_PAGE}"
        ))
        .map_err(backend)?;
    let mut upsert = tx
        .prepare(ledger::guardrail_rollup_upsert(Dialect::Sqlite))
        .map_err(backend)?;
    let mut after = i64::MIN;
    loop {
        let page = select
            .query_map(params![after], |row| {
                Ok((row.get::<_, i64>(0)?, usage_from_row(row, 1)?))
            })
            .map_err(backend)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend)?;
        let Some((last, _)) = page.last() else {
            return Ok(());
        };
        after = *last;
        let records: Vec<UsageRecord> = page.into_iter().map(|(_, r)| r).collect();
        for rollup in ledger::guardrail_rollups(&records) {
            upsert
                .execute(rusqlite::params_from_iter(values(rollup.params())))
                .map_err(backend)?;
        }
    }
}

/// Raw records read per page by the guardrail rollup backfill.
const BACKFILL_PAGE: usize = 5000;

/// The ledger's sink: usage records in the `usage` table.
#[async_trait]
impl UsageSink for SqliteStore {
    async fn insert_usage(&self, records: Vec<UsageRecord>) -> Result<(), SinkError> {
        // The ledger is an append log: a lost tail on power failure is acceptable, so the
        // batch commits with the connection's default durability like everything else.
        self.with_conn(move |conn| {
            let tx = conn.transaction().map_err(backend)?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO usage (time_ms, request_id, rpc, key, tags, policy, provider, model,
                         attempts, input_tokens, output_tokens, cached_input_tokens, usage_reported,
                         cost_usd, latency_ms, ttft_ms, code, error_class, cache, cost_saved_usd,
                         guardrails, policy_version, rollout_arm, experiment, arm, shadow_of,
                         shadow_length_ratio, shadow_exact_match, shadow_json_agree, shadow_finish_reason)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
                         ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30)",
                    )
                    .map_err(backend)?;
                for r in &records {
                    let tags = serde_json::to_string(&r.tags).map_err(backend)?;
                    stmt.execute(params![
                        r.time_ms,
                        r.request_id,
                        r.rpc,
                        r.key,
                        tags,
                        r.policy,
                        r.provider,
                        r.model,
                        r.attempts,
                        to_i64(r.input_tokens),
                        to_i64(r.output_tokens),
                        to_i64(r.cached_input_tokens),
                        r.usage_reported,
                        r.cost_usd,
                        r.latency_ms,
                        r.ttft_ms,
                        r.code,
                        r.error_class,
                        r.cache,
                        r.cost_saved_usd,
                        r.guardrails,
                        to_i64(r.policy_version),
                        r.rollout_arm,
                        r.trial.experiment,
                        r.trial.arm,
                        r.trial.shadow_of,
                        r.trial.comparison.as_ref().and_then(|c| c.length_ratio),
                        r.trial.comparison.as_ref().map(|c| c.exact_match),
                        r.trial.comparison.as_ref().and_then(|c| c.json_agree),
                        r.trial
                            .comparison
                            .as_ref()
                            .map_or("", |c| c.finish_reason.as_str()),
                    ])
                    .map_err(backend)?;
                }
                let mut content = tx
                    .prepare_cached(
                        "INSERT INTO usage_content (request_id, time_ms, key, tenant, prompt, reply,
                         expires_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    )
                    .map_err(backend)?;
                for r in &records {
                    if let Some(c) = &r.content {
                        content
                            .execute(params![
                                r.request_id,
                                r.time_ms,
                                r.key,
                                c.tenant,
                                c.prompt,
                                c.reply,
                                c.expires_ms
                            ])
                            .map_err(backend)?;
                    }
                }
                // The rollups, in the same transaction: they never disagree with the records.
                let mut upsert = tx
                    .prepare_cached(ledger::rollup_upsert(Dialect::Sqlite))
                    .map_err(backend)?;
                for rollup in ledger::rollups(&records) {
                    upsert
                        .execute(rusqlite::params_from_iter(values(rollup.params())))
                        .map_err(backend)?;
                }
                let guardrails = ledger::guardrail_rollups(&records);
                if !guardrails.is_empty() {
                    let mut upsert = tx
                        .prepare_cached(ledger::guardrail_rollup_upsert(Dialect::Sqlite))
                        .map_err(backend)?;
                    for rollup in guardrails {
                        upsert
                            .execute(rusqlite::params_from_iter(values(rollup.params())))
                            .map_err(backend)?;
                    }
                }
            }
            tx.commit().map_err(backend)
        })
        .await
        .map_err(SinkError::from)
    }

    async fn usage_groups(&self, query: &UsageQuery) -> Result<Vec<UsageGroup>, SinkError> {
        let dims = query.group_by.len();
        let (sql, params) = ledger::usage_sql(query, Dialect::Sqlite)
            .ok_or_else(|| SinkError("unknown usage dimension".to_owned()))?;
        self.with_conn(move |conn| {
            let mut stmt = conn.prepare(&sql).map_err(backend)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(values(params)), |row| {
                    let mut key = Vec::with_capacity(dims);
                    for i in 0..dims {
                        key.push(row.get::<_, String>(i)?);
                    }
                    let mut counts = [0i64; 6];
                    for (j, c) in counts.iter_mut().enumerate() {
                        *c = row.get(dims + j)?;
                    }
                    let cost: f64 = row.get(dims + 6)?;
                    let mut histograms = vec![0i64; 2 * ledger::BUCKETS];
                    for (j, h) in histograms.iter_mut().enumerate() {
                        *h = row.get(dims + 7 + j)?;
                    }
                    let decisions: i64 = row.get(dims + 7 + 2 * ledger::BUCKETS)?;
                    Ok(ledger::usage_group(
                        key,
                        counts,
                        cost,
                        &histograms,
                        decisions,
                    ))
                })
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
        .map_err(SinkError::from)
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
        self.with_conn(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT id, {USAGE_COLUMNS} FROM usage
                     WHERE time_ms >= ?1 AND time_ms < ?2 AND (time_ms, id) > (?3, ?4)
                     ORDER BY time_ms, id LIMIT ?5"
                ))
                .map_err(backend)?;
            let rows = stmt
                .query_map(
                    params![from_ms, to_ms, after_time, after_id, limit],
                    |row| Ok((row.get(0)?, usage_from_row(row, 1)?)),
                )
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
        .map_err(SinkError::from)
    }

    async fn day_spend(&self, from_ms: i64) -> Result<Vec<DaySpend>, SinkError> {
        let (sql, params) = ledger::day_spend_sql(Dialect::Sqlite, from_ms);
        self.with_conn(move |conn| {
            let mut stmt = conn.prepare(&sql).map_err(backend)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(values(params)), |row| {
                    Ok(DaySpend {
                        day: row.get(0)?,
                        key: row.get(1)?,
                        team: row.get(2)?,
                        cost_usd: row.get(3)?,
                    })
                })
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
        .map_err(SinkError::from)
    }

    async fn delete_rollups_before(&self, cutoff_ms: i64) -> Result<u64, SinkError> {
        self.with_conn(move |conn| {
            let tx = conn.transaction().map_err(backend)?;
            let mut n = 0;
            for table in ["usage_minute", ledger::GUARDRAIL_TABLE] {
                n += tx
                    .execute(
                        &format!("DELETE FROM {table} WHERE minute_ms < ?1"),
                        params![cutoff_ms],
                    )
                    .map_err(backend)? as u64;
            }
            tx.commit().map_err(backend)?;
            Ok(n)
        })
        .await
        .map_err(SinkError::from)
    }

    async fn usage_between(&self, from_ms: i64, to_ms: i64) -> Result<Vec<UsageRecord>, SinkError> {
        self.with_conn(move |conn| {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {USAGE_COLUMNS} FROM usage
                     WHERE time_ms >= ?1 AND time_ms < ?2 ORDER BY time_ms, id"
                ))
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![from_ms, to_ms], |row| usage_from_row(row, 0))
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
        .map_err(SinkError::from)
    }

    async fn delete_usage_before(&self, cutoff_ms: i64) -> Result<u64, SinkError> {
        self.with_conn(move |conn| {
            conn.execute("DELETE FROM usage WHERE time_ms < ?1", params![cutoff_ms])
                .map(|n| n as u64)
                .map_err(backend)
        })
        .await
        .map_err(SinkError::from)
    }

    async fn usage_content(
        &self,
        request_id: &str,
        now_ms: i64,
    ) -> Result<Vec<ledger::StoredContent>, SinkError> {
        let request_id = request_id.to_owned();
        self.with_conn(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT request_id, time_ms, key, tenant, prompt, reply, expires_ms
                     FROM usage_content WHERE request_id = ?1 AND expires_ms > ?2 ORDER BY time_ms",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![request_id, now_ms], |row| {
                    Ok(ledger::StoredContent {
                        request_id: row.get(0)?,
                        time_ms: row.get(1)?,
                        key: row.get(2)?,
                        content: ledger::Content {
                            tenant: row.get(3)?,
                            prompt: row.get(4)?,
                            reply: row.get(5)?,
                            expires_ms: row.get(6)?,
                        },
                    })
                })
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
        .map_err(SinkError::from)
    }

    async fn delete_expired_content(&self, now_ms: i64) -> Result<u64, SinkError> {
        self.with_conn(move |conn| {
            conn.execute(
                "DELETE FROM usage_content WHERE expires_ms <= ?1",
                params![now_ms],
            )
            .map(|n| n as u64)
            .map_err(backend)
        })
        .await
        .map_err(SinkError::from)
    }

    async fn delete_tenant_usage_before(
        &self,
        tenant: &str,
        cutoff_ms: i64,
    ) -> Result<u64, SinkError> {
        let tenant = tenant.to_owned();
        self.with_conn(move |conn| {
            let tx = conn.transaction().map_err(backend)?;
            let n = tx
                .execute(
                    "DELETE FROM usage WHERE time_ms < ?1 AND json_extract(tags, '$.team') = ?2",
                    params![cutoff_ms, tenant],
                )
                .map_err(backend)? as u64;
            // The tenant's guardrail rollups too: they say what kinds of data it sent.
            tx.execute(
                &format!(
                    "DELETE FROM {} WHERE minute_ms < ?1 AND json_extract(tags, '$.team') = ?2",
                    ledger::GUARDRAIL_TABLE
                ),
                params![cutoff_ms, tenant],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(n)
        })
        .await
        .map_err(SinkError::from)
    }
}

/// The audit log's sink: entries in the `audit_log` table.
#[async_trait]
impl AuditSink for SqliteStore {
    async fn append_audit(&self, time_ms: i64, e: audit::Entry) -> Result<i64, AuditError> {
        self.with_conn(move |conn| {
            conn.execute(
                "INSERT INTO audit_log (time_ms, actor, action, resource_kind, resource,
                 before_etag, after_etag, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    time_ms,
                    e.actor,
                    e.action,
                    e.resource_kind,
                    e.resource,
                    e.before_etag,
                    e.after_etag,
                    e.detail
                ],
            )
            .map_err(backend)?;
            Ok(conn.last_insert_rowid())
        })
        .await
        .map_err(AuditError::from)
    }

    async fn list_audit(&self, q: &audit::Query) -> Result<Vec<audit::Record>, AuditError> {
        let q = q.clone();
        self.with_conn(move |conn| {
            let (before_time, before_id) = q.before.unwrap_or((i64::MAX, i64::MAX));
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, time_ms, actor, action, resource_kind, resource, before_etag,
                     after_etag, detail FROM audit_log
                     WHERE time_ms >= ?1 AND time_ms < ?2 AND (time_ms, id) < (?3, ?4)
                     AND (?5 = '' OR actor = ?5) AND (?6 = '' OR resource_kind = ?6)
                     AND (?7 = '' OR resource = ?7)
                     ORDER BY time_ms DESC, id DESC LIMIT ?8",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(
                    params![
                        q.from_ms,
                        q.to_ms,
                        before_time,
                        before_id,
                        q.actor,
                        q.resource_kind,
                        q.resource,
                        i64::try_from(q.limit).unwrap_or(i64::MAX)
                    ],
                    |row| {
                        Ok(audit::Record {
                            id: row.get(0)?,
                            time_ms: row.get(1)?,
                            entry: audit::Entry {
                                actor: row.get(2)?,
                                action: row.get(3)?,
                                resource_kind: row.get(4)?,
                                resource: row.get(5)?,
                                before_etag: row.get(6)?,
                                after_etag: row.get(7)?,
                                detail: row.get(8)?,
                            },
                        })
                    },
                )
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
        .map_err(AuditError::from)
    }

    async fn delete_audit_before(&self, cutoff_ms: i64) -> Result<u64, AuditError> {
        self.with_conn(move |conn| {
            conn.execute(
                "DELETE FROM audit_log WHERE time_ms < ?1",
                params![cutoff_ms],
            )
            .map(|n| n as u64)
            .map_err(backend)
        })
        .await
        .map_err(AuditError::from)
    }
}

const USAGE_COLUMNS: &str = "time_ms, request_id, rpc, key, tags, policy, provider, model,
    attempts, input_tokens, output_tokens, cached_input_tokens, usage_reported, cost_usd,
    latency_ms, ttft_ms, code, error_class, cache, cost_saved_usd, guardrails, policy_version,
    rollout_arm, experiment, arm, shadow_of, shadow_length_ratio, shadow_exact_match,
    shadow_json_agree, shadow_finish_reason";

#[async_trait]
impl report::Query for SqliteStore {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    async fn rows(
        &self,
        sql: String,
        params: Vec<SqlParam>,
        kinds: Vec<report::Kind>,
    ) -> Result<Vec<Vec<report::Value>>, String> {
        self.with_conn(move |conn| {
            let mut stmt = conn.prepare(&sql).map_err(backend)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(values(params)), |row| {
                    (0..kinds.len())
                        .map(|i| {
                            Ok(match row.get::<_, rusqlite::types::Value>(i)? {
                                rusqlite::types::Value::Integer(v) => report::Value::Int(v),
                                rusqlite::types::Value::Real(v) => report::Value::Real(v),
                                rusqlite::types::Value::Text(v) => report::Value::Text(v),
                                rusqlite::types::Value::Null | rusqlite::types::Value::Blob(_) => {
                                    report::Value::Null
                                }
                            })
                        })
                        .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
        .map_err(|e| e.to_string())
    }
}

/// A usage record from the [`USAGE_COLUMNS`] of `row`, starting at column `at`.
fn usage_from_row(row: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<UsageRecord> {
    let tags: String = row.get(at + 4)?;
    Ok(UsageRecord {
        time_ms: row.get(at)?,
        request_id: row.get(at + 1)?,
        rpc: row.get(at + 2)?,
        key: row.get(at + 3)?,
        tags: serde_json::from_str(&tags).unwrap_or_default(),
        policy: row.get(at + 5)?,
        provider: row.get(at + 6)?,
        model: row.get(at + 7)?,
        attempts: row.get(at + 8)?,
        input_tokens: to_u64(row.get(at + 9)?),
        output_tokens: to_u64(row.get(at + 10)?),
        cached_input_tokens: to_u64(row.get(at + 11)?),
        usage_reported: row.get(at + 12)?,
        cost_usd: row.get(at + 13)?,
        latency_ms: row.get(at + 14)?,
        ttft_ms: row.get(at + 15)?,
        code: row.get(at + 16)?,
        error_class: row.get(at + 17)?,
        cache: row.get(at + 18)?,
        cost_saved_usd: row.get(at + 19)?,
        guardrails: row.get(at + 20)?,
        policy_version: to_u64(row.get(at + 21)?),
        rollout_arm: row.get(at + 22)?,
        trial: ledger::Trial {
            experiment: row.get(at + 23)?,
            arm: row.get(at + 24)?,
            shadow_of: row.get(at + 25)?,
            comparison: row
                .get::<_, Option<bool>>(at + 27)?
                .map(|exact_match| -> rusqlite::Result<_> {
                    Ok(ledger::Comparison {
                        length_ratio: row.get(at + 26)?,
                        exact_match,
                        json_agree: row.get(at + 28)?,
                        finish_reason: row.get(at + 29)?,
                    })
                })
                .transpose()?,
        },
        content: None,
    })
}

/// Generated-query parameters as SQLite values.
fn values(params: Vec<SqlParam>) -> impl Iterator<Item = rusqlite::types::Value> {
    params.into_iter().map(|p| match p {
        SqlParam::Int(v) => rusqlite::types::Value::Integer(v),
        SqlParam::Text(v) => rusqlite::types::Value::Text(v),
        SqlParam::Real(v) => rusqlite::types::Value::Real(v),
    })
}

fn key_from_row(
    row: &rusqlite::Row<'_>,
) -> rusqlite::Result<(String, String, Vec<u8>, bool, i64, i64)> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
    ))
}

fn key_record(
    (id, doc, secret_hash, revoked, version, created_ms): (String, String, Vec<u8>, bool, i64, i64),
) -> Result<KeyRecord, StoreError> {
    Ok(KeyRecord {
        id,
        spec: serde_json::from_str(&doc)
            .map_err(|e| backend(format!("stored key is unreadable: {e}")))?,
        secret_hash,
        revoked,
        version: to_u64(version),
        created_ms,
    })
}

const KEY_COLUMNS: &str = "id, doc, secret_hash, revoked, version, created_ms";

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::policy::TargetSpec;

    #[tokio::test]
    async fn usage_records_round_trip_through_the_ledger_sink() {
        let sink: Arc<dyn UsageSink> = Arc::new(SqliteStore::open(Path::new(":memory:")).unwrap());
        let record = |time_ms: i64, request_id: &str| UsageRecord {
            time_ms,
            request_id: request_id.into(),
            rpc: "Chat".into(),
            provider: "mock".into(),
            model: "m".into(),
            input_tokens: 10,
            usage_reported: true,
            cost_usd: Some(0.5),
            tags: [("team".to_owned(), "search".to_owned())].into(),
            code: "OK".into(),
            ..UsageRecord::default()
        };
        sink.insert_usage(vec![
            record(1_000, "a"),
            record(2_000, "b"),
            record(3_000, "c"),
        ])
        .await
        .unwrap();
        let between = sink.usage_between(1_500, 3_000).await.unwrap();
        assert_eq!(between, [record(2_000, "b")]);
        assert_eq!(sink.delete_usage_before(2_500).await.unwrap(), 2);
        let left = sink.usage_between(0, i64::MAX).await.unwrap();
        assert_eq!(left, [record(3_000, "c")]);
    }

    fn spec(name: &str, model: &str) -> PolicySpec {
        PolicySpec {
            name: name.into(),
            description: String::new(),
            targets: vec![TargetSpec {
                provider: "mock".into(),
                model: model.into(),
                weight: 0,
                priority: 0,
                region: None,
                tags: vec![],
            }],
            strategy: Default::default(),
            sticky_key: None,
            constraints: Default::default(),
            execution: Default::default(),
            variants: vec![],
            guardrails: None,
            shadow: None,
            experiment: None,
            cache: Default::default(),
        }
    }

    #[tokio::test]
    async fn crud_with_versions_and_conflicts() {
        let store = SqliteStore::open(Path::new(":memory:")).unwrap();
        let created = store.create_policy(spec("p", "a")).await.unwrap();
        assert_eq!(created.version, 1);
        assert_eq!(
            store.create_policy(spec("p", "a")).await.unwrap_err(),
            StoreError::AlreadyExists("p".into())
        );
        let updated = store.update_policy(spec("p", "b"), 1).await.unwrap();
        assert_eq!(updated.version, 2);
        assert!(matches!(
            store.update_policy(spec("p", "c"), 1).await.unwrap_err(),
            StoreError::Conflict { current: 2, .. }
        ));
        assert_eq!(
            store.get_policy("p").await.unwrap().unwrap().spec.targets[0].model,
            "b"
        );
        assert!(matches!(
            store.delete_policy("p", Some(1)).await.unwrap_err(),
            StoreError::Conflict { .. }
        ));
        store.delete_policy("p", Some(2)).await.unwrap();
        assert_eq!(store.get_policy("p").await.unwrap(), None);
        assert_eq!(
            store.update_policy(spec("p", "x"), 2).await.unwrap_err(),
            StoreError::NotFound("p".into())
        );
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/gw.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            store.create_policy(spec("keep", "a")).await.unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let all = store.list_policies().await.unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].spec.name, "keep");
    }
}
