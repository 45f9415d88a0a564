//! [`BatchStore`] in PostgreSQL (`store.url = "postgres://..."`): jobs, requests and results
//! in the shared database, so every replica reports and streams every job, and a job
//! outlives the replica that ran it.
//!
//! - Its own tables (`batch_jobs`, `batch_requests`, `batch_results`) with their own schema
//!   version in `batch_schema_migrations`, migrated in one transaction under an advisory
//!   lock of their own, so the store's numbered migrations and these never collide. It
//!   shares the store's connection pool.
//! - **Claims are leases.** A request is claimed by one `UPDATE` of the row picked with
//!   `FOR UPDATE SKIP LOCKED`: replicas running the same job never take the same request.
//!   The claim records this store's replica id and a lease ([`PgBatchOptions::lease`], `batch.lease`,
//!   30 s by default) that [`PgBatchStore::run`] renews every third of it for every request
//!   this replica runs (one `UPDATE`); a request whose lease ran out (its replica died, or
//!   lost the database for longer than the lease) is claimable again, so a `kill -9`ed
//!   replica's requests run again elsewhere within about one lease. Only the replica
//!   holding a request puts it back to pending ([`BatchStore::retry_later`],
//!   [`BatchStore::release_running`]; the latter also releases expired leases), so a
//!   replica that starts, or finds nothing of its own running, never takes a request
//!   another replica is running.
//! - **`batch.job_concurrency` holds over all replicas.** A claim first locks the job's
//!   row (claims of one job are serialized, briefly) and takes a request only while fewer
//!   than the bound of the job's requests are running under a live lease, on any replica.
//!   At the bound, [`BatchStore::queue`] makes pending requests due within a second (a
//!   slot freed by another replica is seen that late; one freed here at once).
//! - **Results reach every replica's streams at once.** Recording results and changing a
//!   job's state `NOTIFY` channel `llmgw_batch` in the same transaction; [`PgBatchStore::run`]
//!   `LISTEN`s on a connection of its own and wakes this replica's results streams
//!   ([`BatchStore::remote_changes`]). After the listening connection fails it reconnects
//!   (and wakes every stream once to catch what it missed); the runner's 5 s poll stays as
//!   the fallback meanwhile.
//! - Nothing starts once the job is not [`JobState::Running`] (a cancel on any replica).
//! - **Results in completion order.** Recording a result bumps the job row's result count
//!   in the same transaction (a row lock: one job's results are recorded one at a time),
//!   and the result's position is that count, so a reader paging by offset on any replica
//!   never skips or repeats one. A second result for a request is refused.
//! - [`BatchStore::queue`] is this replica's view: `running` counts the requests it runs;
//!   requests other replicas run count as pending, due within a second (so a replica
//!   waits for them instead of ending the job, ends it soon after them, and takes them
//!   over when their lease runs out). A job that is no longer running has nothing due.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use deadpool_postgres::{Object, Pool};
use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, NoTls, Row, Transaction};
use tokio_util::sync::CancellationToken;

use crate::store::postgres::{Schema, migrate};

use super::{
    BatchMode, BatchStore, BatchStoreError, Claimed, CostSum, Counts, JobRecord, JobState, NewJob,
    Queue, RequestFormat, ResultFor, ResultRecord, StoredResult, codes,
};

/// The advisory lock key the batch migrations run under (not the store's).
const MIGRATION_LOCK: i64 = 0x6c6c_6d67_7762;

/// How often a replica looks again at a job whose remaining requests other replicas run
/// (it cannot hear their results; this bounds how late it ends the job after them).
const FOREIGN_POLL_MS: i64 = 1_000;

/// The channel results and state changes are announced on (payload: the job id).
const CHANNEL: &str = "llmgw_batch";

/// Requests inserted per statement when a job is created.
const INSERT_CHUNK: usize = 2_000;

/// Schema migrations, applied in order; never edit a published one, add a new one.
const MIGRATIONS: &[&str] = &[
    // 1: jobs, their requests (state 0 pending, 1 running, 2 done, with the claim's lease),
    // and results (pos: the position among the job's results).
    "CREATE TABLE batch_jobs (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        owner TEXT NOT NULL,
        state BIGINT NOT NULL,
        tags TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        deadline_ms BIGINT NOT NULL,
        ended_ms BIGINT,
        total BIGINT NOT NULL,
        results BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX batch_jobs_owner ON batch_jobs (owner, seq);
    CREATE INDEX batch_jobs_unfinished ON batch_jobs (state, seq);
    CREATE TABLE batch_requests (
        job_id TEXT NOT NULL,
        idx BIGINT NOT NULL,
        custom_id TEXT NOT NULL,
        format BIGINT NOT NULL,
        body BYTEA NOT NULL,
        state BIGINT NOT NULL,
        runs BIGINT NOT NULL,
        not_before_ms BIGINT NOT NULL,
        claimed_by TEXT NOT NULL DEFAULT '',
        lease_until_ms BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (job_id, idx)
    );
    CREATE INDEX batch_requests_claim ON batch_requests (job_id, state, not_before_ms);
    CREATE TABLE batch_results (
        job_id TEXT NOT NULL,
        pos BIGINT NOT NULL,
        idx BIGINT NOT NULL,
        code BIGINT NOT NULL,
        cost_total DOUBLE PRECISION,
        cost_input DOUBLE PRECISION,
        cost_output DOUBLE PRECISION,
        runs BIGINT NOT NULL,
        time_ms BIGINT NOT NULL,
        payload BYTEA NOT NULL,
        PRIMARY KEY (job_id, pos),
        UNIQUE (job_id, idx)
    );",
    // 2: the heartbeat renews one replica's running requests.
    "CREATE INDEX batch_requests_claimed ON batch_requests (claimed_by) WHERE state = 1;",
    // 3: how a job runs (1 real time, 2 native) and its native batches document; requests in
    // state 3 are in a provider's native batch (see `super::offload`).
    "ALTER TABLE batch_jobs ADD COLUMN mode BIGINT NOT NULL DEFAULT 1;
    ALTER TABLE batch_jobs ADD COLUMN native TEXT NOT NULL DEFAULT '';",
];

use super::request_state::{DONE, NATIVE, PENDING, RUNNING};

/// How one replica's PostgreSQL batch store claims requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBatchOptions {
    /// How long a claim holds without a renewal ([`PgBatchStore::run`] renews every third
    /// of it).
    pub lease: Duration,
    /// Requests of one job running at once over all replicas (`batch.job_concurrency`).
    pub job_concurrency: usize,
}

impl Default for PgBatchOptions {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            job_concurrency: 64,
        }
    }
}

/// The PostgreSQL batch store of one replica.
pub struct PgBatchStore {
    pool: Pool,
    /// Where the listening connection connects.
    config: tokio_postgres::Config,
    /// Names this replica's claims.
    replica: String,
    /// How long a claim holds without a renewal.
    lease_ms: i64,
    /// Requests of one job running at once over all replicas.
    job_concurrency: i64,
    /// Bumped on every notification heard (results streams wait on it).
    changes: watch::Sender<u64>,
}

impl std::fmt::Debug for PgBatchStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBatchStore")
            .field("replica", &self.replica)
            .field("lease_ms", &self.lease_ms)
            .field("job_concurrency", &self.job_concurrency)
            .finish_non_exhaustive()
    }
}

fn pg(e: tokio_postgres::Error) -> BatchStoreError {
    BatchStoreError(crate::store::postgres::pg(e).to_string())
}

fn backend(e: impl std::fmt::Display) -> BatchStoreError {
    BatchStoreError(e.to_string())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn to_u32(n: i64) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

fn to_i64(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

impl PgBatchStore {
    /// The batch tables in the database behind `pool` (at `url`, for the listening
    /// connection), migrated. Run [`PgBatchStore::run`] beside it: without it, claims are
    /// not renewed and expire after `options.lease`.
    pub async fn open(
        pool: Pool,
        url: &str,
        options: PgBatchOptions,
    ) -> Result<Self, BatchStoreError> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| backend(format!("store.url is not a postgresql url: {e}")))?;
        let mut replica = [0u8; 8];
        crate::auth::secure_random(&mut replica).map_err(backend)?;
        let store = Self {
            pool,
            config,
            replica: crate::auth::hex(&replica),
            lease_ms: to_i64(options.lease.as_millis()).max(1),
            job_concurrency: to_i64(options.job_concurrency).max(1),
            changes: watch::Sender::new(0),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Renews the lease of every request this replica runs, to `now_ms` + the lease;
    /// returns how many.
    pub async fn renew(&self, now_ms: i64) -> Result<u64, BatchStoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE batch_requests SET lease_until_ms = $3
                 WHERE claimed_by = $1 AND state = $2",
                &[
                    &self.replica,
                    &RUNNING,
                    &now_ms.saturating_add(self.lease_ms),
                ],
            )
            .await
            .map_err(pg)
    }

    /// This replica's background work until `stop`: the heartbeat (every third of the
    /// lease, [`PgBatchStore::renew`]) and the `LISTEN` session that wakes results streams
    /// (reconnecting after a failure).
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let heartbeat = async {
            let period = Duration::from_millis(u64::try_from(self.lease_ms / 3).unwrap_or(1));
            let mut tick = tokio::time::interval(period.max(Duration::from_millis(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(err) = self.renew(now_ms()).await {
                    tracing::warn!(error = %err, "cannot renew this replica's batch claims");
                }
            }
        };
        let listen = async {
            loop {
                if let Err(err) = self.listen_once().await {
                    tracing::warn!(error = %err, "batch notifications: listening connection lost; results streams poll meanwhile");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        tokio::select! {
            () = stop.cancelled() => {}
            () = heartbeat => {}
            () = listen => {}
        }
    }

    /// One `LISTEN` session: wakes the results streams on each notification, and once when
    /// listening starts (for what was missed before); returns when the connection fails.
    async fn listen_once(&self) -> Result<(), BatchStoreError> {
        let (client, mut connection) = self.config.connect(NoTls).await.map_err(pg)?;
        let (messages_tx, mut messages) = tokio::sync::mpsc::unbounded_channel();
        // The connection only makes progress while polled: the driver forwards what the
        // server sends and ends with the connection.
        let driver = async move {
            while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                let failed = message.is_err();
                if messages_tx.send(message).is_err() || failed {
                    return;
                }
            }
        };
        let listen = async {
            client
                .batch_execute(&format!("LISTEN {CHANNEL}"))
                .await
                .map_err(pg)?;
            self.changes.send_modify(|n| *n += 1);
            loop {
                match messages.recv().await {
                    Some(Ok(AsyncMessage::Notification(_))) => {
                        self.changes.send_modify(|n| *n += 1);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(pg(e)),
                    None => return Ok(()),
                }
            }
        };
        tokio::select! {
            result = listen => result,
            () = driver => Ok(()),
        }
    }

    async fn client(&self) -> Result<Object, BatchStoreError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => pg(e),
            other => BatchStoreError(format!("postgresql: {other}")),
        })
    }

    async fn migrate(&self) -> Result<(), BatchStoreError> {
        let mut client = self.client().await?;
        let schema = Schema {
            what: "the batch tables",
            table: "batch_schema_migrations",
            version_type: "BIGINT",
            lock: MIGRATION_LOCK,
            migrations: MIGRATIONS,
        };
        migrate(&mut client, &schema, |sql| vec![sql.to_owned()])
            .await
            .map_err(|e| BatchStoreError(e.to_string()))
    }
}

/// A job row with its counts and cost.
async fn load_job(
    client: &impl tokio_postgres::GenericClient,
    id: &str,
) -> Result<Option<(i64, JobRecord)>, BatchStoreError> {
    let Some(row) = client
        .query_opt(
            "SELECT seq, owner, state, tags, created_ms, deadline_ms, ended_ms, total, mode,
                    native
             FROM batch_jobs WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(pg)?
    else {
        return Ok(None);
    };
    let state: i64 = row.get(2);
    let state = JobState::from_i64(state)
        .ok_or_else(|| backend(format!("job {id} has an unknown state {state}")))?;
    let tags: BTreeMap<String, String> = serde_json::from_str(row.get(3))
        .map_err(|e| backend(format!("job {id} has unreadable tags: {e}")))?;
    let mut counts = Counts {
        total: to_u32(row.get(7)),
        ..Counts::default()
    };
    for r in client
        .query(
            "SELECT state, count(*) FROM batch_requests WHERE job_id = $1 AND state <> 2
             GROUP BY state",
            &[&id],
        )
        .await
        .map_err(pg)?
    {
        match r.get::<_, i64>(0) {
            PENDING => counts.pending = to_u32(r.get(1)),
            _ => counts.running = to_u32(r.get(1)),
        }
    }
    let mut cost: Option<CostSum> = None;
    for r in client
        .query(
            "SELECT code, count(*), count(cost_total), COALESCE(sum(cost_total), 0),
                    COALESCE(sum(cost_input), 0), COALESCE(sum(cost_output), 0)
             FROM batch_results WHERE job_id = $1 GROUP BY code",
            &[&id],
        )
        .await
        .map_err(pg)?
    {
        let n = to_u32(r.get(1));
        match i32::try_from(r.get::<_, i64>(0)).unwrap_or(-1) {
            codes::OK => counts.succeeded += n,
            codes::CANCELLED => counts.cancelled += n,
            codes::DEADLINE_EXCEEDED => counts.deadline_exceeded += n,
            _ => counts.failed += n,
        }
        if r.get::<_, i64>(2) > 0 {
            let sum = cost.get_or_insert_with(CostSum::default);
            sum.total += r.get::<_, f64>(3);
            sum.input += r.get::<_, f64>(4);
            sum.output += r.get::<_, f64>(5);
        }
    }
    Ok(Some((
        row.get(0),
        JobRecord {
            id: id.to_owned(),
            owner: row.get(1),
            state,
            tags,
            created_ms: row.get(4),
            deadline_ms: row.get(5),
            ended_ms: row.get(6),
            counts,
            cost,
            mode: BatchMode::from_i64(row.get(8)),
            native: row.get(9),
        },
    )))
}

/// Records the results of `done` (index, runs, result) and marks their requests done, in
/// `tx`: positions follow the job's result count, which the update locks.
async fn insert_results(
    tx: &Transaction<'_>,
    job_id: &str,
    done: &[(i64, i64, ResultRecord)],
    now_ms: i64,
) -> Result<(), BatchStoreError> {
    if done.is_empty() {
        return Ok(());
    }
    let Some(row) = tx
        .query_opt(
            "UPDATE batch_jobs SET results = results + $2 WHERE id = $1 RETURNING results",
            &[&job_id, &to_i64(done.len())],
        )
        .await
        .map_err(pg)?
    else {
        return Err(backend(format!("job {job_id} is gone")));
    };
    let first = row.get::<_, i64>(0) - to_i64(done.len());
    let insert = tx
        .prepare(
            "INSERT INTO batch_results
               (job_id, pos, idx, code, cost_total, cost_input, cost_output, runs, time_ms, payload)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .await
        .map_err(pg)?;
    for (i, (index, runs, result)) in done.iter().enumerate() {
        tx.execute(
            &insert,
            &[
                &job_id,
                &(first + to_i64(i)),
                index,
                &i64::from(result.code),
                &result.cost.map(|c| c.total),
                &result.cost.map(|c| c.input),
                &result.cost.map(|c| c.output),
                runs,
                &now_ms,
                &result.payload,
            ],
        )
        .await
        .map_err(pg)?;
    }
    let indexes: Vec<i64> = done.iter().map(|(index, _, _)| *index).collect();
    tx.execute(
        "UPDATE batch_requests SET state = $3, claimed_by = '', lease_until_ms = 0
         WHERE job_id = $1 AND idx = ANY($2)",
        &[&job_id, &indexes, &DONE],
    )
    .await
    .map_err(pg)?;
    notify(tx, job_id).await
}

/// Announces a change of `job_id` to every replica when `tx` commits.
async fn notify(
    client: &impl tokio_postgres::GenericClient,
    job_id: &str,
) -> Result<(), BatchStoreError> {
    client
        .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &job_id])
        .await
        .map_err(pg)?;
    Ok(())
}

fn claimed_from_row(row: &Row) -> Result<Claimed, BatchStoreError> {
    let index: i64 = row.get(0);
    let format: i64 = row.get(2);
    Ok(Claimed {
        index: to_u32(index),
        custom_id: row.get(1),
        format: RequestFormat::from_i64(format)
            .ok_or_else(|| backend(format!("request {index} has an unknown format")))?,
        body: row.get(3),
        runs: to_u32(row.get(4)),
    })
}

#[async_trait]
impl BatchStore for PgBatchStore {
    async fn create_job(
        &self,
        id: &str,
        job: NewJob,
        created_ms: i64,
        deadline_ms: i64,
    ) -> Result<(), BatchStoreError> {
        let tags = serde_json::to_string(&job.tags).map_err(backend)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        tx.execute(
            "INSERT INTO batch_jobs (id, owner, state, tags, created_ms, deadline_ms, total, mode)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &id,
                &job.owner,
                &(JobState::Running as i64),
                &tags,
                &created_ms,
                &deadline_ms,
                &to_i64(job.requests.len()),
                &(job.mode as i64),
            ],
        )
        .await
        .map_err(pg)?;
        for (chunk_no, chunk) in job.requests.chunks(INSERT_CHUNK).enumerate() {
            let start = chunk_no * INSERT_CHUNK;
            let indexes: Vec<i64> = (0..chunk.len()).map(|i| to_i64(start + i)).collect();
            let custom_ids: Vec<&str> = chunk.iter().map(|r| r.custom_id.as_str()).collect();
            let formats: Vec<i64> = chunk.iter().map(|r| r.format as i64).collect();
            let bodies: Vec<&[u8]> = chunk.iter().map(|r| r.body.as_slice()).collect();
            tx.execute(
                "INSERT INTO batch_requests
                   (job_id, idx, custom_id, format, body, state, runs, not_before_ms)
                 SELECT $1, i, c, f, b, 0, 0, 0
                 FROM UNNEST($2::BIGINT[], $3::TEXT[], $4::BIGINT[], $5::BYTEA[]) AS r(i, c, f, b)",
                &[&id, &indexes, &custom_ids, &formats, &bodies],
            )
            .await
            .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)
    }

    async fn job(&self, id: &str) -> Result<Option<JobRecord>, BatchStoreError> {
        let client = self.client().await?;
        Ok(load_job(&**client, id).await?.map(|(_, job)| job))
    }

    async fn job_state(&self, id: &str) -> Result<Option<JobState>, BatchStoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT state FROM batch_jobs WHERE id = $1", &[&id])
            .await
            .map_err(pg)?;
        Ok(row.and_then(|r| JobState::from_i64(r.get(0))))
    }

    async fn list_jobs(
        &self,
        owner: &str,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, JobRecord)>, BatchStoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id FROM batch_jobs WHERE owner = $1 AND seq < $2
                 ORDER BY seq DESC LIMIT $3",
                &[&owner, &after.unwrap_or(i64::MAX), &to_i64(limit)],
            )
            .await
            .map_err(pg)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.extend(load_job(&**client, row.get(0)).await?);
        }
        Ok(out)
    }

    async fn unfinished_jobs(&self) -> Result<Vec<String>, BatchStoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id FROM batch_jobs WHERE state IN ($1, $2) ORDER BY seq",
                &[&(JobState::Running as i64), &(JobState::Cancelling as i64)],
            )
            .await
            .map_err(pg)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn release_running(&self, job_id: &str) -> Result<u64, BatchStoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE batch_requests SET state = $2, claimed_by = '', lease_until_ms = 0
                 WHERE job_id = $1 AND state = $3 AND (claimed_by = $4 OR lease_until_ms <= $5)",
                &[&job_id, &PENDING, &RUNNING, &self.replica, &now_ms()],
            )
            .await
            .map_err(pg)
    }

    async fn claim(&self, job_id: &str, now_ms: i64) -> Result<Option<Claimed>, BatchStoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        // The job's row first: claims of one job are decided one at a time, so the count
        // of live claims below is the one the next claim sees.
        if tx
            .query_opt(
                "SELECT 1 FROM batch_jobs WHERE id = $1 AND state = $2 FOR UPDATE",
                &[&job_id, &(JobState::Running as i64)],
            )
            .await
            .map_err(pg)?
            .is_none()
        {
            return Ok(None);
        }
        let row = tx
            .query_opt(
                "UPDATE batch_requests r
                 SET state = $3, runs = r.runs + 1, claimed_by = $4, lease_until_ms = $5
                 FROM (
                     SELECT q.job_id, q.idx FROM batch_requests q
                     WHERE q.job_id = $1
                       AND ((q.state = $6 AND q.not_before_ms <= $2)
                            OR (q.state = $3 AND q.lease_until_ms <= $2))
                       AND (SELECT count(*) FROM batch_requests l
                            WHERE l.job_id = $1 AND l.state = $3 AND l.lease_until_ms > $2) < $7
                     ORDER BY q.not_before_ms, q.idx
                     LIMIT 1
                     FOR UPDATE OF q SKIP LOCKED
                 ) picked
                 WHERE r.job_id = picked.job_id AND r.idx = picked.idx
                 RETURNING r.idx, r.custom_id, r.format, r.body, r.runs",
                &[
                    &job_id,
                    &now_ms,
                    &RUNNING,
                    &self.replica,
                    &now_ms.saturating_add(self.lease_ms),
                    &PENDING,
                    &self.job_concurrency,
                ],
            )
            .await
            .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        row.as_ref().map(claimed_from_row).transpose()
    }

    async fn queue(&self, job_id: &str) -> Result<Queue, BatchStoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE NOT mine),
                        count(*) FILTER (WHERE mine),
                        min(due) FILTER (WHERE NOT mine AND EXISTS (
                            SELECT 1 FROM batch_jobs WHERE id = $1 AND state = $6
                        ))
                 FROM (
                     SELECT state = $2 AND claimed_by = $3 AND lease_until_ms > $4 AS mine,
                            CASE WHEN state = $2 THEN LEAST(lease_until_ms, $4 + $7)
                                 WHEN live.n >= $8 THEN GREATEST(not_before_ms, $4 + $7)
                                 ELSE not_before_ms END AS due
                     FROM batch_requests,
                          (SELECT count(*) AS n FROM batch_requests
                           WHERE job_id = $1 AND state = $2 AND lease_until_ms > $4) live
                     WHERE job_id = $1 AND state < $5
                 ) q",
                &[
                    &job_id,
                    &RUNNING,
                    &self.replica,
                    &now_ms(),
                    &DONE,
                    &(JobState::Running as i64),
                    &FOREIGN_POLL_MS,
                    &self.job_concurrency,
                ],
            )
            .await
            .map_err(pg)?;
        Ok(Queue {
            pending: to_u32(row.get(0)),
            running: to_u32(row.get(1)),
            next_ms: row.get(2),
        })
    }

    async fn complete(
        &self,
        job_id: &str,
        index: u32,
        result: ResultRecord,
        now_ms: i64,
    ) -> Result<bool, BatchStoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let Some(row) = tx
            .query_opt(
                "SELECT state, runs FROM batch_requests WHERE job_id = $1 AND idx = $2
                 FOR UPDATE",
                &[&job_id, &i64::from(index)],
            )
            .await
            .map_err(pg)?
        else {
            return Ok(false);
        };
        if row.get::<_, i64>(0) == DONE {
            return Ok(false);
        }
        insert_results(
            &tx,
            job_id,
            &[(i64::from(index), row.get(1), result)],
            now_ms,
        )
        .await?;
        tx.commit().await.map_err(pg)?;
        Ok(true)
    }

    async fn retry_later(
        &self,
        job_id: &str,
        index: u32,
        not_before_ms: i64,
    ) -> Result<(), BatchStoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE batch_requests
                 SET state = $3, not_before_ms = $4, claimed_by = '', lease_until_ms = 0
                 WHERE job_id = $1 AND idx = $2 AND state = $5 AND claimed_by = $6",
                &[
                    &job_id,
                    &i64::from(index),
                    &PENDING,
                    &not_before_ms,
                    &RUNNING,
                    &self.replica,
                ],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn finish_pending(
        &self,
        job_id: &str,
        result: ResultFor,
        now_ms: i64,
    ) -> Result<u64, BatchStoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        // Pending requests, and those whose replica died holding them.
        let rows = tx
            .query(
                "SELECT idx, custom_id, runs FROM batch_requests
                 WHERE job_id = $1 AND (state = $2 OR (state = $3 AND lease_until_ms <= $4))
                 ORDER BY idx FOR UPDATE",
                &[&job_id, &PENDING, &RUNNING, &now_ms],
            )
            .await
            .map_err(pg)?;
        let done: Vec<(i64, i64, ResultRecord)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(2), result(r.get(1))))
            .collect();
        insert_results(&tx, job_id, &done, now_ms).await?;
        tx.commit().await.map_err(pg)?;
        Ok(done.len() as u64)
    }

    async fn set_state(
        &self,
        job_id: &str,
        from: &[JobState],
        to: JobState,
        ended_ms: Option<i64>,
    ) -> Result<Option<JobState>, BatchStoreError> {
        let from: Vec<i64> = from.iter().map(|s| *s as i64).collect();
        let client = self.client().await?;
        // One statement: the old state when it was not in `from`, the new one when it was.
        let row = client
            .query_one(
                "WITH moved AS (
                     UPDATE batch_jobs SET state = $3, ended_ms = $4
                     WHERE id = $1 AND state = ANY($2) RETURNING state
                 )
                 SELECT COALESCE(
                     (SELECT state FROM moved),
                     (SELECT state FROM batch_jobs WHERE id = $1)
                 )",
                &[&job_id, &from, &(to as i64), &ended_ms],
            )
            .await
            .map_err(pg)?;
        let state: Option<i64> = row.get(0);
        let state = state.and_then(JobState::from_i64);
        if state == Some(to) {
            notify(&**client, job_id).await?;
        }
        Ok(state)
    }

    fn remote_changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.changes.subscribe())
    }

    async fn results(
        &self,
        job_id: &str,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<StoredResult>, BatchStoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT pos, runs, time_ms, payload FROM batch_results
                 WHERE job_id = $1 AND pos >= $2 ORDER BY pos LIMIT $3",
                &[&job_id, &to_i64(offset), &to_i64(limit)],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| StoredResult {
                offset: u64::try_from(r.get::<_, i64>(0)).unwrap_or(0),
                runs: to_u32(r.get(1)),
                time_ms: r.get(2),
                payload: r.get(3),
            })
            .collect())
    }

    async fn native_requests(
        &self,
        job_id: &str,
        take_pending: bool,
    ) -> Result<Vec<Claimed>, BatchStoreError> {
        let client = self.client().await?;
        if take_pending {
            client
                .execute(
                    "UPDATE batch_requests SET state = $2, runs = runs + 1
                     WHERE job_id = $1 AND state = $3",
                    &[&job_id, &NATIVE, &PENDING],
                )
                .await
                .map_err(pg)?;
        }
        let rows = client
            .query(
                "SELECT idx, custom_id, format, body, runs FROM batch_requests
                 WHERE job_id = $1 AND state = $2 ORDER BY idx",
                &[&job_id, &NATIVE],
            )
            .await
            .map_err(pg)?;
        rows.iter().map(claimed_from_row).collect()
    }

    async fn native_release(
        &self,
        job_id: &str,
        indexes: &[u32],
        sent: bool,
    ) -> Result<(), BatchStoreError> {
        let indexes: Vec<i64> = indexes.iter().map(|i| i64::from(*i)).collect();
        let client = self.client().await?;
        client
            .execute(
                "UPDATE batch_requests SET state = $3, not_before_ms = 0,
                   runs = GREATEST(runs - $5, 0)
                 WHERE job_id = $1 AND idx = ANY($2) AND state = $4",
                &[&job_id, &indexes, &PENDING, &NATIVE, &i64::from(!sent)],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn set_native(&self, job_id: &str, document: String) -> Result<(), BatchStoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE batch_jobs SET native = $2 WHERE id = $1",
                &[&job_id, &document],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }
}
