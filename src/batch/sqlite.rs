//! [`BatchStore`] in SQLite: its own tables (`batch_jobs`, `batch_requests`,
//! `batch_results`) in the gateway's store file, on its own connection (WAL journal,
//! `synchronous = FULL`), with its own schema version in `batch_schema`, so the store's
//! numbered migrations and these never collide. `:memory:` keeps the jobs in memory only.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};

use super::{
    BatchMode, BatchStore, BatchStoreError, Claimed, CostSum, Counts, JobRecord, JobState, NewJob,
    Queue, RequestFormat, ResultFor, ResultRecord, StoredResult, codes,
};

/// Schema versions, applied in order; never edit a published one, add a new one.
const MIGRATIONS: &[&str] = &[
    // 1: jobs, their requests (state 0 pending, 1 running, 2 done), and results.
    "CREATE TABLE batch_jobs (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        owner TEXT NOT NULL,
        state INTEGER NOT NULL,
        tags TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        deadline_ms INTEGER NOT NULL,
        ended_ms INTEGER,
        total INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX batch_jobs_owner ON batch_jobs (owner, seq);
    CREATE TABLE batch_requests (
        job_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        custom_id TEXT NOT NULL,
        format INTEGER NOT NULL,
        body BLOB NOT NULL,
        state INTEGER NOT NULL,
        runs INTEGER NOT NULL,
        not_before_ms INTEGER NOT NULL,
        PRIMARY KEY (job_id, idx)
    ) STRICT;
    CREATE INDEX batch_requests_claim ON batch_requests (job_id, state, not_before_ms);
    CREATE TABLE batch_results (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        code INTEGER NOT NULL,
        cost_total REAL,
        cost_input REAL,
        cost_output REAL,
        runs INTEGER NOT NULL,
        time_ms INTEGER NOT NULL,
        payload BLOB NOT NULL,
        UNIQUE (job_id, idx)
    ) STRICT;
    CREATE INDEX batch_results_job ON batch_results (job_id, seq);",
    // 2: how a job runs (1 real time, 2 native) and its native batches document; requests
    // in state 3 are in a provider's native batch.
    "ALTER TABLE batch_jobs ADD COLUMN mode INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE batch_jobs ADD COLUMN native TEXT NOT NULL DEFAULT '';",
];

use super::request_state::{DONE, NATIVE, PENDING, RUNNING};

/// The SQLite batch store.
#[derive(Clone)]
pub struct SqliteBatchStore {
    conn: Arc<Mutex<Connection>>,
}

fn backend(e: impl std::fmt::Display) -> BatchStoreError {
    BatchStoreError(e.to_string())
}

impl SqliteBatchStore {
    /// Opens (creating when needed) the batch tables in the store file at `path`;
    /// `:memory:` keeps them in memory.
    pub fn open(path: &Path) -> Result<Self, BatchStoreError> {
        let mut conn = crate::store::sqlite::connect(path).map_err(backend)?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, BatchStoreError> + Send + 'static,
    ) -> Result<T, BatchStoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().map_err(backend)?;
            f(&mut conn)
        })
        .await
        .map_err(backend)?
    }
}

fn migrate(conn: &mut Connection) -> Result<(), BatchStoreError> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(backend)?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS batch_schema (version INTEGER NOT NULL) STRICT;")
        .map_err(backend)?;
    let current: Option<i64> = tx
        .query_row("SELECT version FROM batch_schema", [], |row| row.get(0))
        .optional()
        .map_err(backend)?;
    let current = usize::try_from(current.unwrap_or(0)).unwrap_or(0);
    if current > MIGRATIONS.len() {
        return Err(backend(format!(
            "the batch tables have schema version {current}, newer than this gateway knows ({}); upgrade the gateway",
            MIGRATIONS.len()
        )));
    }
    for sql in &MIGRATIONS[current..] {
        tx.execute_batch(sql).map_err(backend)?;
    }
    tx.execute("DELETE FROM batch_schema", [])
        .map_err(backend)?;
    tx.execute(
        "INSERT INTO batch_schema (version) VALUES (?1)",
        params![i64::try_from(MIGRATIONS.len()).unwrap_or(0)],
    )
    .map_err(backend)?;
    tx.commit().map_err(backend)
}

fn to_u32(n: i64) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

/// A job row with its counts and cost.
fn load_job(conn: &Connection, id: &str) -> Result<Option<(i64, JobRecord)>, BatchStoreError> {
    let row = conn
        .query_row(
            "SELECT seq, owner, state, tags, created_ms, deadline_ms, ended_ms, total, mode,
                    native
             FROM batch_jobs WHERE id = ?1",
            params![id],
            |row| {
                Ok((
                    (
                        row.get::<_, i64>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, i64>(2)?,
                        row.get::<_, String>(3)?,
                        row.get::<_, i64>(4)?,
                        row.get::<_, i64>(5)?,
                        row.get::<_, Option<i64>>(6)?,
                        row.get::<_, i64>(7)?,
                    ),
                    (row.get::<_, i64>(8)?, row.get::<_, String>(9)?),
                ))
            },
        )
        .optional()
        .map_err(backend)?;
    let Some(((seq, owner, state, tags, created_ms, deadline_ms, ended_ms, total), (mode, native))) =
        row
    else {
        return Ok(None);
    };
    let state = JobState::from_i64(state)
        .ok_or_else(|| backend(format!("job {id} has an unknown state {state}")))?;
    let tags: BTreeMap<String, String> = serde_json::from_str(&tags)
        .map_err(|e| backend(format!("job {id} has unreadable tags: {e}")))?;
    let mut counts = Counts {
        total: to_u32(total),
        ..Counts::default()
    };
    let mut stmt = conn
        .prepare_cached(
            "SELECT state, count(*) FROM batch_requests WHERE job_id = ?1 AND state <> 2
             GROUP BY state",
        )
        .map_err(backend)?;
    let rows = stmt
        .query_map(params![id], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?))
        })
        .map_err(backend)?;
    for row in rows {
        match row.map_err(backend)? {
            (PENDING, n) => counts.pending = to_u32(n),
            (_, n) => counts.running = to_u32(n),
        }
    }
    let mut stmt = conn
        .prepare_cached(
            "SELECT code, count(*), count(cost_total), total(cost_total), total(cost_input),
                    total(cost_output)
             FROM batch_results WHERE job_id = ?1 GROUP BY code",
        )
        .map_err(backend)?;
    let rows = stmt
        .query_map(params![id], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, i64>(2)?,
                row.get::<_, f64>(3)?,
                row.get::<_, f64>(4)?,
                row.get::<_, f64>(5)?,
            ))
        })
        .map_err(backend)?;
    let mut cost: Option<CostSum> = None;
    for row in rows {
        let (code, n, priced, total, input, output) = row.map_err(backend)?;
        let n = to_u32(n);
        match i32::try_from(code).unwrap_or(-1) {
            codes::OK => counts.succeeded += n,
            codes::CANCELLED => counts.cancelled += n,
            codes::DEADLINE_EXCEEDED => counts.deadline_exceeded += n,
            _ => counts.failed += n,
        }
        if priced > 0 {
            let sum = cost.get_or_insert_with(CostSum::default);
            sum.total += total;
            sum.input += input;
            sum.output += output;
        }
    }
    Ok(Some((
        seq,
        JobRecord {
            id: id.to_owned(),
            owner,
            state,
            tags,
            created_ms,
            deadline_ms,
            ended_ms,
            counts,
            cost,
            mode: BatchMode::from_i64(mode),
            native,
        },
    )))
}

fn insert_result(
    tx: &rusqlite::Transaction<'_>,
    job_id: &str,
    index: u32,
    runs: u32,
    result: &ResultRecord,
    now_ms: i64,
) -> Result<(), BatchStoreError> {
    tx.execute(
        "INSERT INTO batch_results
           (job_id, idx, code, cost_total, cost_input, cost_output, runs, time_ms, payload)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            job_id,
            index,
            result.code,
            result.cost.map(|c| c.total),
            result.cost.map(|c| c.input),
            result.cost.map(|c| c.output),
            runs,
            now_ms,
            result.payload,
        ],
    )
    .map_err(backend)?;
    tx.execute(
        "UPDATE batch_requests SET state = ?3 WHERE job_id = ?1 AND idx = ?2",
        params![job_id, index, DONE],
    )
    .map_err(backend)?;
    Ok(())
}

#[async_trait]
impl BatchStore for SqliteBatchStore {
    async fn create_job(
        &self,
        id: &str,
        job: NewJob,
        created_ms: i64,
        deadline_ms: i64,
    ) -> Result<(), BatchStoreError> {
        let id = id.to_owned();
        self.with_conn(move |conn| {
            let tags = serde_json::to_string(&job.tags).map_err(backend)?;
            let tx = conn.transaction().map_err(backend)?;
            tx.execute(
                "INSERT INTO batch_jobs
                   (id, owner, state, tags, created_ms, deadline_ms, total, mode)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    id,
                    job.owner,
                    JobState::Running as i64,
                    tags,
                    created_ms,
                    deadline_ms,
                    i64::try_from(job.requests.len()).unwrap_or(i64::MAX),
                    job.mode as i64,
                ],
            )
            .map_err(backend)?;
            {
                let mut insert = tx
                    .prepare(
                        "INSERT INTO batch_requests
                           (job_id, idx, custom_id, format, body, state, runs, not_before_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, 0, 0, 0)",
                    )
                    .map_err(backend)?;
                for (i, r) in job.requests.iter().enumerate() {
                    insert
                        .execute(params![
                            id,
                            i64::try_from(i).unwrap_or(i64::MAX),
                            r.custom_id,
                            r.format as i64,
                            r.body
                        ])
                        .map_err(backend)?;
                }
            }
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn job(&self, id: &str) -> Result<Option<JobRecord>, BatchStoreError> {
        let id = id.to_owned();
        self.with_conn(move |conn| Ok(load_job(conn, &id)?.map(|(_, job)| job)))
            .await
    }

    async fn job_state(&self, id: &str) -> Result<Option<JobState>, BatchStoreError> {
        let id = id.to_owned();
        self.with_conn(move |conn| {
            let state: Option<i64> = conn
                .query_row(
                    "SELECT state FROM batch_jobs WHERE id = ?1",
                    params![id],
                    |row| row.get(0),
                )
                .optional()
                .map_err(backend)?;
            Ok(state.and_then(JobState::from_i64))
        })
        .await
    }

    async fn list_jobs(
        &self,
        owner: &str,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, JobRecord)>, BatchStoreError> {
        let owner = owner.to_owned();
        self.with_conn(move |conn| {
            let ids: Vec<String> = {
                let mut stmt = conn
                    .prepare(
                        "SELECT id FROM batch_jobs WHERE owner = ?1 AND seq < ?2
                         ORDER BY seq DESC LIMIT ?3",
                    )
                    .map_err(backend)?;
                let rows = stmt
                    .query_map(
                        params![
                            owner,
                            after.unwrap_or(i64::MAX),
                            i64::try_from(limit).unwrap_or(i64::MAX)
                        ],
                        |row| row.get(0),
                    )
                    .map_err(backend)?;
                rows.collect::<Result<_, _>>().map_err(backend)?
            };
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                out.extend(load_job(conn, &id)?);
            }
            Ok(out)
        })
        .await
    }

    async fn unfinished_jobs(&self) -> Result<Vec<String>, BatchStoreError> {
        self.with_conn(|conn| {
            let mut stmt = conn
                .prepare("SELECT id FROM batch_jobs WHERE state IN (?1, ?2) ORDER BY seq")
                .map_err(backend)?;
            let rows = stmt
                .query_map(
                    params![JobState::Running as i64, JobState::Cancelling as i64],
                    |row| row.get(0),
                )
                .map_err(backend)?;
            rows.collect::<Result<_, _>>().map_err(backend)
        })
        .await
    }

    async fn release_running(&self, job_id: &str) -> Result<u64, BatchStoreError> {
        let job_id = job_id.to_owned();
        self.with_conn(move |conn| {
            let n = conn
                .execute(
                    "UPDATE batch_requests SET state = ?2 WHERE job_id = ?1 AND state = ?3",
                    params![job_id, PENDING, RUNNING],
                )
                .map_err(backend)?;
            Ok(n as u64)
        })
        .await
    }

    async fn claim(&self, job_id: &str, now_ms: i64) -> Result<Option<Claimed>, BatchStoreError> {
        let job_id = job_id.to_owned();
        self.with_conn(move |conn| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(backend)?;
            let row = tx
                .query_row(
                    "SELECT idx, custom_id, format, body, runs FROM batch_requests
                     WHERE job_id = ?1 AND state = ?2 AND not_before_ms <= ?3
                     ORDER BY not_before_ms, idx LIMIT 1",
                    params![job_id, PENDING, now_ms],
                    |row| {
                        Ok((
                            row.get::<_, i64>(0)?,
                            row.get::<_, String>(1)?,
                            row.get::<_, i64>(2)?,
                            row.get::<_, Vec<u8>>(3)?,
                            row.get::<_, i64>(4)?,
                        ))
                    },
                )
                .optional()
                .map_err(backend)?;
            let Some((index, custom_id, format, body, runs)) = row else {
                return Ok(None);
            };
            let changed = tx
                .execute(
                    "UPDATE batch_requests SET state = ?3, runs = runs + 1
                     WHERE job_id = ?1 AND idx = ?2 AND state = ?4",
                    params![job_id, index, RUNNING, PENDING],
                )
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
            if changed != 1 {
                return Ok(None);
            }
            let format = RequestFormat::from_i64(format)
                .ok_or_else(|| backend(format!("request {index} has an unknown format")))?;
            Ok(Some(Claimed {
                index: to_u32(index),
                custom_id,
                format,
                body,
                runs: to_u32(runs + 1),
            }))
        })
        .await
    }

    async fn queue(&self, job_id: &str) -> Result<Queue, BatchStoreError> {
        let job_id = job_id.to_owned();
        self.with_conn(move |conn| {
            conn.query_row(
                "SELECT total(state = 0), total(state = 1),
                        min(CASE WHEN state = 0 THEN not_before_ms END)
                 FROM batch_requests WHERE job_id = ?1 AND state < 2",
                params![job_id],
                |row| {
                    Ok(Queue {
                        pending: row.get::<_, f64>(0)? as u32,
                        running: row.get::<_, f64>(1)? as u32,
                        next_ms: row.get(2)?,
                    })
                },
            )
            .map_err(backend)
        })
        .await
    }

    async fn complete(
        &self,
        job_id: &str,
        index: u32,
        result: ResultRecord,
        now_ms: i64,
    ) -> Result<bool, BatchStoreError> {
        let job_id = job_id.to_owned();
        self.with_conn(move |conn| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(backend)?;
            let row: Option<(i64, i64)> = tx
                .query_row(
                    "SELECT state, runs FROM batch_requests WHERE job_id = ?1 AND idx = ?2",
                    params![job_id, index],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()
                .map_err(backend)?;
            let Some((state, runs)) = row else {
                return Ok(false);
            };
            if state == DONE {
                return Ok(false);
            }
            insert_result(&tx, &job_id, index, to_u32(runs), &result, now_ms)?;
            tx.commit().map_err(backend)?;
            Ok(true)
        })
        .await
    }

    async fn retry_later(
        &self,
        job_id: &str,
        index: u32,
        not_before_ms: i64,
    ) -> Result<(), BatchStoreError> {
        let job_id = job_id.to_owned();
        self.with_conn(move |conn| {
            conn.execute(
                "UPDATE batch_requests SET state = ?3, not_before_ms = ?4
                 WHERE job_id = ?1 AND idx = ?2 AND state = ?5",
                params![job_id, index, PENDING, not_before_ms, RUNNING],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn finish_pending(
        &self,
        job_id: &str,
        result: ResultFor,
        now_ms: i64,
    ) -> Result<u64, BatchStoreError> {
        let job_id = job_id.to_owned();
        self.with_conn(move |conn| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(backend)?;
            let pending: Vec<(i64, String, i64)> = {
                let mut stmt = tx
                    .prepare(
                        "SELECT idx, custom_id, runs FROM batch_requests
                         WHERE job_id = ?1 AND state = ?2 ORDER BY idx",
                    )
                    .map_err(backend)?;
                let rows = stmt
                    .query_map(params![job_id, PENDING], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                    })
                    .map_err(backend)?;
                rows.collect::<Result<_, _>>().map_err(backend)?
            };
            for (index, custom_id, runs) in &pending {
                let record = result(custom_id);
                insert_result(&tx, &job_id, to_u32(*index), to_u32(*runs), &record, now_ms)?;
            }
            tx.commit().map_err(backend)?;
            Ok(pending.len() as u64)
        })
        .await
    }

    async fn set_state(
        &self,
        job_id: &str,
        from: &[JobState],
        to: JobState,
        ended_ms: Option<i64>,
    ) -> Result<Option<JobState>, BatchStoreError> {
        let job_id = job_id.to_owned();
        let from: Vec<i64> = from.iter().map(|s| *s as i64).collect();
        self.with_conn(move |conn| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(backend)?;
            let state: Option<i64> = tx
                .query_row(
                    "SELECT state FROM batch_jobs WHERE id = ?1",
                    params![job_id],
                    |row| row.get(0),
                )
                .optional()
                .map_err(backend)?;
            let Some(state) = state else {
                return Ok(None);
            };
            if !from.contains(&state) {
                return Ok(JobState::from_i64(state));
            }
            tx.execute(
                "UPDATE batch_jobs SET state = ?2, ended_ms = ?3 WHERE id = ?1",
                params![job_id, to as i64, ended_ms],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(Some(to))
        })
        .await
    }

    async fn results(
        &self,
        job_id: &str,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<StoredResult>, BatchStoreError> {
        let job_id = job_id.to_owned();
        self.with_conn(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT runs, time_ms, payload FROM batch_results WHERE job_id = ?1
                     ORDER BY seq LIMIT ?2 OFFSET ?3",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(
                    params![
                        job_id,
                        i64::try_from(limit).unwrap_or(i64::MAX),
                        i64::try_from(offset).unwrap_or(i64::MAX)
                    ],
                    |row| {
                        Ok((
                            row.get::<_, i64>(0)?,
                            row.get::<_, i64>(1)?,
                            row.get::<_, Vec<u8>>(2)?,
                        ))
                    },
                )
                .map_err(backend)?;
            let mut out = Vec::new();
            for (i, row) in rows.enumerate() {
                let (runs, time_ms, payload) = row.map_err(backend)?;
                out.push(StoredResult {
                    offset: offset + i as u64,
                    runs: to_u32(runs),
                    time_ms,
                    payload,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn native_requests(
        &self,
        job_id: &str,
        take_pending: bool,
    ) -> Result<Vec<Claimed>, BatchStoreError> {
        let job_id = job_id.to_owned();
        self.with_conn(move |conn| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(backend)?;
            if take_pending {
                tx.execute(
                    "UPDATE batch_requests SET state = ?2, runs = runs + 1
                     WHERE job_id = ?1 AND state = ?3",
                    params![job_id, NATIVE, PENDING],
                )
                .map_err(backend)?;
            }
            let rows: Vec<(i64, String, i64, Vec<u8>, i64)> = {
                let mut stmt = tx
                    .prepare(
                        "SELECT idx, custom_id, format, body, runs FROM batch_requests
                         WHERE job_id = ?1 AND state = ?2 ORDER BY idx",
                    )
                    .map_err(backend)?;
                let rows = stmt
                    .query_map(params![job_id, NATIVE], |row| {
                        Ok((
                            row.get(0)?,
                            row.get(1)?,
                            row.get(2)?,
                            row.get(3)?,
                            row.get(4)?,
                        ))
                    })
                    .map_err(backend)?;
                rows.collect::<Result<_, _>>().map_err(backend)?
            };
            tx.commit().map_err(backend)?;
            rows.into_iter()
                .map(|(index, custom_id, format, body, runs)| {
                    Ok(Claimed {
                        index: to_u32(index),
                        custom_id,
                        format: RequestFormat::from_i64(format).ok_or_else(|| {
                            backend(format!("request {index} has an unknown format"))
                        })?,
                        body,
                        runs: to_u32(runs),
                    })
                })
                .collect()
        })
        .await
    }

    async fn native_release(
        &self,
        job_id: &str,
        indexes: &[u32],
        sent: bool,
    ) -> Result<(), BatchStoreError> {
        let job_id = job_id.to_owned();
        let indexes = indexes.to_vec();
        self.with_conn(move |conn| {
            let tx = conn.transaction().map_err(backend)?;
            {
                let mut update = tx
                    .prepare(
                        "UPDATE batch_requests SET state = ?3, not_before_ms = 0,
                           runs = max(runs - ?5, 0)
                         WHERE job_id = ?1 AND idx = ?2 AND state = ?4",
                    )
                    .map_err(backend)?;
                for index in indexes {
                    update
                        .execute(params![job_id, index, PENDING, NATIVE, i64::from(!sent)])
                        .map_err(backend)?;
                }
            }
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn set_native(&self, job_id: &str, document: String) -> Result<(), BatchStoreError> {
        let job_id = job_id.to_owned();
        self.with_conn(move |conn| {
            conn.execute(
                "UPDATE batch_jobs SET native = ?2 WHERE id = ?1",
                params![job_id, document],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::NewRequest;

    fn job(n: usize) -> NewJob {
        NewJob {
            owner: "key1".to_owned(),
            tags: BTreeMap::from([("team".to_owned(), "search".to_owned())]),
            timeout: std::time::Duration::from_secs(60),
            mode: BatchMode::Realtime,
            requests: (0..n)
                .map(|i| NewRequest {
                    custom_id: format!("c{i}"),
                    format: RequestFormat::Proto,
                    body: vec![u8::try_from(i).unwrap()],
                })
                .collect(),
        }
    }

    fn ok(payload: u8) -> ResultRecord {
        ResultRecord {
            code: 0,
            cost: Some(CostSum {
                total: 0.5,
                input: 0.25,
                output: 0.25,
            }),
            payload: vec![payload],
        }
    }

    #[tokio::test]
    async fn a_request_is_claimed_once_and_answered_once() {
        let store = SqliteBatchStore::open(Path::new(":memory:")).unwrap();
        store.create_job("j", job(2), 1_000, 61_000).await.unwrap();
        let first = store.claim("j", 1_000).await.unwrap().unwrap();
        let second = store.claim("j", 1_000).await.unwrap().unwrap();
        assert_eq!(
            (first.index, first.runs, &first.custom_id[..]),
            (0, 1, "c0")
        );
        assert_eq!(second.index, 1);
        assert_eq!(store.claim("j", 1_000).await.unwrap(), None);
        assert!(store.complete("j", 0, ok(7), 2_000).await.unwrap());
        // A second result for the same request is refused and changes nothing.
        assert!(!store.complete("j", 0, ok(8), 2_000).await.unwrap());
        let results = store.results("j", 0, 10).await.unwrap();
        assert_eq!(results.len(), 1);
        assert_eq!((results[0].payload[0], results[0].runs), (7, 1));
        let job = store.job("j").await.unwrap().unwrap();
        assert_eq!(
            (job.counts.succeeded, job.counts.running, job.counts.pending),
            (1, 1, 0)
        );
        assert_eq!(job.cost.unwrap().total, 0.5);
        assert_eq!(job.tags["team"], "search");
    }

    #[tokio::test]
    async fn retries_wait_and_a_restart_releases_running_requests() {
        let store = SqliteBatchStore::open(Path::new(":memory:")).unwrap();
        store.create_job("j", job(2), 0, 60_000).await.unwrap();
        let a = store.claim("j", 0).await.unwrap().unwrap();
        store.retry_later("j", a.index, 5_000).await.unwrap();
        // Not before its time: the other request comes first.
        let b = store.claim("j", 1_000).await.unwrap().unwrap();
        assert_eq!(b.index, 1);
        assert_eq!(store.claim("j", 1_000).await.unwrap(), None);
        let queue = store.queue("j").await.unwrap();
        assert_eq!(
            (queue.pending, queue.running, queue.next_ms),
            (1, 1, Some(5_000))
        );
        let again = store.claim("j", 5_000).await.unwrap().unwrap();
        assert_eq!((again.index, again.runs), (0, 2));
        // A stopped gateway left both running: they are pending again, runs kept.
        assert_eq!(store.release_running("j").await.unwrap(), 2);
        let b = store.claim("j", 5_000).await.unwrap().unwrap();
        let a = store.claim("j", 5_000).await.unwrap().unwrap();
        assert_eq!([(b.index, b.runs), (a.index, a.runs)], [(1, 2), (0, 3)]);
    }

    #[tokio::test]
    async fn unstarted_requests_get_their_results_and_offsets_page() {
        let store = SqliteBatchStore::open(Path::new(":memory:")).unwrap();
        store.create_job("j", job(3), 0, 60_000).await.unwrap();
        let a = store.claim("j", 0).await.unwrap().unwrap();
        let finished = store
            .finish_pending(
                "j",
                Box::new(|id| ResultRecord {
                    code: codes::CANCELLED,
                    cost: None,
                    payload: id.as_bytes().to_vec(),
                }),
                1,
            )
            .await
            .unwrap();
        assert_eq!(finished, 2);
        assert!(store.complete("j", a.index, ok(0), 2).await.unwrap());
        let all = store.results("j", 0, 10).await.unwrap();
        assert_eq!(all.iter().map(|r| r.offset).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(all[0].payload, b"c1");
        let rest = store.results("j", 2, 10).await.unwrap();
        assert_eq!((rest.len(), rest[0].offset), (1, 2));
        let job = store.job("j").await.unwrap().unwrap();
        assert_eq!((job.counts.cancelled, job.counts.succeeded), (2, 1));
        assert_eq!(
            store
                .set_state("j", &[JobState::Running], JobState::Cancelled, Some(3))
                .await
                .unwrap(),
            Some(JobState::Cancelled)
        );
        // An ended job does not move again.
        assert_eq!(
            store
                .set_state("j", &[JobState::Running], JobState::Completed, Some(4))
                .await
                .unwrap(),
            Some(JobState::Cancelled)
        );
        assert!(store.unfinished_jobs().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn jobs_list_newest_first_per_owner() {
        let store = SqliteBatchStore::open(Path::new(":memory:")).unwrap();
        for id in ["a", "b", "c"] {
            store.create_job(id, job(1), 0, 1).await.unwrap();
        }
        let mut other = job(1);
        other.owner = "key2".to_owned();
        store.create_job("x", other, 0, 1).await.unwrap();
        let page = store.list_jobs("key1", None, 2).await.unwrap();
        let ids: Vec<&str> = page.iter().map(|(_, j)| j.id.as_str()).collect();
        assert_eq!(ids, ["c", "b"]);
        let next = store.list_jobs("key1", Some(page[1].0), 2).await.unwrap();
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].1.id, "a");
    }

    #[test]
    fn the_schema_is_versioned_and_reopening_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        drop(SqliteBatchStore::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .query_row("SELECT version FROM batch_schema", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        drop(conn);
        SqliteBatchStore::open(&path).unwrap();
    }
}
