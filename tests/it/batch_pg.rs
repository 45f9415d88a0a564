//! Batch jobs on PostgreSQL (`store.url`): a job created on one replica is read, streamed,
//! cancelled and finished on another, no request runs twice when two replicas run one
//! job, and the store's claims are leases a dead replica's successor takes over: renewed
//! by a heartbeat while the replica lives, retaken soon after it dies; one job's
//! concurrency bound holds over all replicas; a replica hears of results recorded
//! elsewhere through LISTEN/NOTIFY; a gateway process killed with `-9` mid-job leaves
//! its requests to another within a few leases (`batch.lease`).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use llm_gateway::{
    batch::{
        BatchStore, JobState, NewJob, NewRequest, RequestFormat, ResultRecord,
        postgres::{PgBatchOptions, PgBatchStore},
    },
    mock_upstream::{MockSettings, MockUpstream},
    pb::{self, llm_gateway_client::LlmGatewayClient},
    store::postgres::PgStore,
};

use crate::{
    batch::{MODEL, answers, create, get, item, job, reply, results},
    common::*,
    pg_server,
};

/// A replica's batch store on the database at `url`, its claims holding for a minute.
async fn replica_store(url: &str) -> Arc<PgBatchStore> {
    let options = PgBatchOptions {
        lease: Duration::from_secs(60),
        job_concurrency: 64,
    };
    store_with(url, options).await
}

async fn store_with(url: &str, options: PgBatchOptions) -> Arc<PgBatchStore> {
    let pool = PgStore::connect(url).await.unwrap().pool();
    Arc::new(PgBatchStore::open(pool, url, options).await.unwrap())
}

/// The lease of request `idx` of job `job`, read from the database.
async fn lease_until(url: &str, job: &str, idx: i64) -> i64 {
    let pool = PgStore::connect(url).await.unwrap().pool();
    let client = pool.get().await.unwrap();
    client
        .query_one(
            "SELECT lease_until_ms FROM batch_requests WHERE job_id = $1 AND idx = $2",
            &[&job, &idx],
        )
        .await
        .unwrap()
        .get(0)
}

fn new_job(n: usize) -> NewJob {
    NewJob {
        owner: "key1".to_owned(),
        tags: BTreeMap::new(),
        timeout: Duration::from_secs(3600),
        mode: Default::default(),
        requests: (0..n)
            .map(|i| NewRequest {
                custom_id: format!("c{i}"),
                format: RequestFormat::Proto,
                body: vec![u8::try_from(i).unwrap()],
            })
            .collect(),
    }
}

fn ok(index: u32) -> ResultRecord {
    ResultRecord {
        code: 0,
        cost: None,
        payload: index.to_be_bytes().to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_claim_each_request_once_and_record_results_in_one_order() {
    let Some(url) = pg_server::database().await else {
        return;
    };
    // Opened together: they migrate the fresh database at the same moment.
    let (a, b) = tokio::join!(replica_store(&url), replica_store(&url));
    a.create_job("j", new_job(40), now_ms(), now_ms() + 3_600_000)
        .await
        .unwrap();
    // Eight claimers, four per replica, race for the 40 requests; each completes what it
    // claims.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while let Some(claimed) = store.claim("j", now_ms()).await.unwrap() {
                assert_eq!(claimed.runs, 1);
                mine.push(claimed.index);
                assert!(
                    store
                        .complete("j", claimed.index, ok(claimed.index), now_ms())
                        .await
                        .unwrap()
                );
            }
            mine
        }));
    }
    let mut claimed = Vec::new();
    for t in tasks {
        claimed.extend(t.await.unwrap());
    }
    claimed.sort_unstable();
    assert_eq!(claimed, (0..40).collect::<Vec<u32>>(), "claimed once each");
    // Positions 0..40 without a gap or a repeat, each request once, read from either.
    let all = b.results("j", 0, 100).await.unwrap();
    assert_eq!(
        all.iter().map(|r| r.offset).collect::<Vec<_>>(),
        (0..40).collect::<Vec<u64>>()
    );
    let mut indexes: Vec<Vec<u8>> = all.iter().map(|r| r.payload.clone()).collect();
    indexes.sort();
    indexes.dedup();
    assert_eq!(indexes.len(), 40);
    assert_eq!(a.results("j", 38, 10).await.unwrap()[..], all[38..]);
    let job = a.job("j").await.unwrap().unwrap();
    assert_eq!((job.counts.succeeded, job.counts.pending), (40, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_claim_is_left_alone_and_a_dead_replicas_claim_is_taken_over() {
    let Some(url) = pg_server::database().await else {
        return;
    };
    let (a, b) = tokio::join!(replica_store(&url), replica_store(&url));
    let dead = replica_store(&url).await;
    a.create_job("k", new_job(3), now_ms(), now_ms() + 3_600_000)
        .await
        .unwrap();
    // A holds request 0; a replica that died two minutes ago held request 1.
    let held = a.claim("k", now_ms()).await.unwrap().unwrap();
    let lost = dead.claim("k", now_ms() - 120_000).await.unwrap().unwrap();
    assert_eq!((held.index, lost.index), (0, 1));
    // B releases only the dead replica's request, then takes both free ones over.
    assert_eq!(b.release_running("k").await.unwrap(), 1);
    let mut took = Vec::new();
    while let Some(c) = b.claim("k", now_ms()).await.unwrap() {
        took.push((c.index, c.runs));
    }
    took.sort_unstable();
    assert_eq!(took, [(1, 2), (2, 1)], "A's live claim is not taken");
    // B's view: A's request is pending, to look at again within a second; B runs two.
    let queue = b.queue("k").await.unwrap();
    assert_eq!((queue.pending, queue.running), (1, 2));
    assert!(queue.next_ms.unwrap() <= now_ms() + 1_000, "{queue:?}");
    // Only the holder puts a request back.
    b.retry_later("k", 0, 0).await.unwrap();
    assert_eq!(a.queue("k").await.unwrap().running, 1);
    // A cancel on any replica: nothing more starts anywhere, nothing is due.
    b.set_state("k", &[JobState::Running], JobState::Cancelling, None)
        .await
        .unwrap();
    a.retry_later("k", 0, 0).await.unwrap();
    assert_eq!(a.claim("k", now_ms()).await.unwrap(), None);
    assert_eq!(a.queue("k").await.unwrap().next_ms, None);
    // The dead replica's late result still counts once; B's for the same request does
    // not.
    assert!(dead.complete("k", 1, ok(1), now_ms()).await.unwrap());
    assert!(!b.complete("k", 1, ok(1), now_ms()).await.unwrap());
    assert_eq!(
        b.set_state(
            "k",
            &[JobState::Cancelling],
            JobState::Cancelled,
            Some(now_ms())
        )
        .await
        .unwrap(),
        Some(JobState::Cancelled)
    );
    assert_eq!(
        a.set_state("k", &[JobState::Running], JobState::Completed, None)
            .await
            .unwrap(),
        Some(JobState::Cancelled),
        "an ended job does not move again"
    );
    assert!(a.unfinished_jobs().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_created_on_one_replica_is_streamed_and_finished_on_another() {
    let Some(url) = pg_server::database().await else {
        return;
    };
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let toml = openai_toml(
        &mock,
        &format!("[store]\nurl = \"{url}\"\n[batch]\njob_concurrency = 2"),
    );
    let (mut a, b) = tokio::join!(Gateway::start(&toml), Gateway::start(&toml));
    let model = format!("{MODEL}+latency=100");
    let items: Vec<_> = (0..60)
        .map(|i| item(&format!("r{i}"), &model, &format!("q{i}")))
        .collect();
    let created = create(&mut a.client(), job(items)).await;
    // B reports the job A runs, streams its results, and takes it up (within 2 s).
    let mut client = b.client();
    let seen = get(&mut client, &created.id).await;
    assert_eq!(seen.counts.unwrap().total, 60);
    let mut stream = client
        .stream_batch_results(pb::StreamBatchResultsRequest {
            batch_id: created.id.clone(),
            offset: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut received = Vec::new();
    while received.len() < 5 {
        received.push(stream.message().await.unwrap().unwrap().result.unwrap());
    }
    // A goes away (its running requests finish within the grace); B finishes the job
    // without a restart.
    a.signal_shutdown();
    a.take_handle().await.unwrap().unwrap();
    while let Some(msg) = stream.message().await.unwrap() {
        received.push(msg.result.unwrap());
    }
    assert_eq!(received.len(), 60);
    let answered = answers(&received);
    assert_eq!(answered.len(), 60);
    assert!(answered.values().all(|n| *n == 1), "{answered:?}");
    for r in &received {
        let n = r.custom_id.strip_prefix('r').unwrap();
        assert_eq!(reply(r), format!("Mock reply to: q{n}"));
    }
    assert_eq!(
        mock.stats().requests(),
        60,
        "a request reached the upstream twice"
    );
    let done = get(&mut client, &created.id).await;
    assert_eq!(done.state, pb::BatchState::Completed as i32);
    assert_eq!(done.counts.unwrap().succeeded, 60);
    // A replica started after the end reads the same results in the same order.
    let c = Gateway::start(&toml).await;
    let again = results(&mut c.client(), &created.id, 0).await;
    assert_eq!(
        again.iter().map(|r| &r.custom_id).collect::<Vec<_>>(),
        received.iter().map(|r| &r.custom_id).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_on_another_replica_stops_the_job_everywhere() {
    let Some(url) = pg_server::database().await else {
        return;
    };
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let toml = openai_toml(
        &mock,
        &format!("[store]\nurl = \"{url}\"\n[batch]\njob_concurrency = 1"),
    );
    let (a, b) = tokio::join!(Gateway::start(&toml), Gateway::start(&toml));
    let model = format!("{MODEL}+latency=200");
    let items: Vec<_> = (0..30)
        .map(|i| item(&format!("r{i}"), &model, &format!("q{i}")))
        .collect();
    let created = create(&mut a.client(), job(items)).await;
    let cancelled = b
        .client()
        .cancel_batch(pb::CancelBatchRequest {
            batch_id: created.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap();
    assert_eq!(cancelled.state, pb::BatchState::Cancelling as i32);
    // A hears of it from the store: what had not started ends CANCELLED, once each.
    let all = results(&mut a.client(), &created.id, 0).await;
    let answered = answers(&all);
    assert_eq!(answered.len(), 30);
    assert!(answered.values().all(|n| *n == 1), "{answered:?}");
    let done = get(&mut b.client(), &created.id).await;
    assert_eq!(done.state, pb::BatchState::Cancelled as i32);
    let counts = done.counts.unwrap();
    assert_eq!(counts.succeeded + counts.cancelled, 30, "{counts:?}");
    assert!(counts.cancelled >= 25, "{counts:?}");
    assert_eq!(mock.stats().requests(), u64::from(counts.succeeded));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_concurrency_holds_over_all_replicas() {
    let Some(url) = pg_server::database().await else {
        return;
    };
    let options = PgBatchOptions {
        lease: Duration::from_secs(60),
        job_concurrency: 3,
    };
    let (a, b) = tokio::join!(store_with(&url, options.clone()), store_with(&url, options));
    a.create_job("c", new_job(10), now_ms(), now_ms() + 3_600_000)
        .await
        .unwrap();
    // Eight claimers on two replicas race: three claims in all, not three per replica.
    let now = now_ms();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(
            async move { store.claim("c", now).await.unwrap() },
        ));
    }
    let mut claimed = Vec::new();
    for t in tasks {
        claimed.extend(t.await.unwrap());
    }
    assert_eq!(claimed.len(), 3, "{claimed:?}");
    // At the bound, the pending requests are looked at again later, not at once.
    let queue = a.queue("c").await.unwrap();
    assert_eq!(queue.pending + queue.running, 10);
    assert!(queue.next_ms.unwrap() > now_ms(), "{queue:?}");
    // A result (recorded by whichever replica) frees a slot for any replica.
    let first = &claimed[0];
    assert!(
        a.complete("c", first.index, ok(first.index), now_ms())
            .await
            .unwrap()
    );
    assert!(b.claim("c", now_ms()).await.unwrap().is_some());
    assert!(a.claim("c", now_ms()).await.unwrap().is_none());
    // Claims whose lease ran out (their replicas died) do not count: an hour later, three
    // of them are taken over (runs 2), and the bound still holds.
    let later = now_ms() + 3_600_000 - 1;
    let mut retaken = Vec::new();
    while let Some(c) = b.claim("c", later).await.unwrap() {
        retaken.push(c.runs);
    }
    assert_eq!(retaken, [2, 2, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_heartbeat_keeps_a_claim_and_a_dead_replicas_claim_is_retaken_after_one_lease() {
    let Some(url) = pg_server::database().await else {
        return;
    };
    // Deterministic first: the lease is 30 s from the claim, renewals push it on, and only
    // once it ran out may another replica take the request.
    let options = PgBatchOptions {
        lease: Duration::from_secs(30),
        job_concurrency: 64,
    };
    let (a, b) = tokio::join!(store_with(&url, options.clone()), store_with(&url, options));
    a.create_job("h", new_job(1), now_ms(), now_ms() + 3_600_000)
        .await
        .unwrap();
    let t = now_ms();
    assert_eq!(a.claim("h", t).await.unwrap().unwrap().runs, 1);
    assert_eq!(b.claim("h", t + 20_000).await.unwrap(), None);
    assert_eq!(a.renew(t + 25_000).await.unwrap(), 1);
    assert_eq!(b.claim("h", t + 40_000).await.unwrap(), None);
    let retaken = b.claim("h", t + 55_000).await.unwrap().unwrap();
    assert_eq!(retaken.runs, 2, "retaken once A's renewed lease ran out");
    // A (presumed dead) renews nothing of it any more.
    assert_eq!(a.renew(t + 56_000).await.unwrap(), 0);

    // Then the heartbeat itself, on a short lease: while A's task runs, the lease moves
    // on; after A stops (as a kill -9 would), B retakes the request on its own.
    let short = PgBatchOptions {
        lease: Duration::from_millis(300),
        job_concurrency: 64,
    };
    let (a, b) = tokio::join!(store_with(&url, short.clone()), store_with(&url, short));
    a.create_job("k9", new_job(1), now_ms(), now_ms() + 3_600_000)
        .await
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let heartbeat = tokio::spawn(a.clone().run(stop.clone()));
    a.claim("k9", now_ms()).await.unwrap().unwrap();
    let first = lease_until(&url, "k9", 0).await;
    let mut renewed = false;
    for _ in 0..500 {
        if lease_until(&url, "k9", 0).await > first {
            renewed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(renewed, "the heartbeat never renewed the claim");
    stop.cancel();
    heartbeat.await.unwrap();
    let mut taken = None;
    for _ in 0..500 {
        if let Some(c) = b.claim("k9", now_ms()).await.unwrap() {
            taken = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        taken
            .expect("the dead replica's claim was never retaken")
            .runs,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_hears_of_results_and_state_changes_recorded_on_another() {
    let Some(url) = pg_server::database().await else {
        return;
    };
    let (a, b) = tokio::join!(replica_store(&url), replica_store(&url));
    let stop = tokio_util::sync::CancellationToken::new();
    let listener = tokio::spawn(b.clone().run(stop.clone()));
    let mut changes = b.remote_changes().unwrap();
    // Listening: the session's start wakes the streams once.
    tokio::time::timeout(Duration::from_secs(20), changes.changed())
        .await
        .expect("the listening session never started")
        .unwrap();
    changes.borrow_and_update();
    a.create_job("n", new_job(2), now_ms(), now_ms() + 3_600_000)
        .await
        .unwrap();
    let claimed = a.claim("n", now_ms()).await.unwrap().unwrap();
    a.complete("n", claimed.index, ok(claimed.index), now_ms())
        .await
        .unwrap();
    // Not the 5 s poll: the notification of A's commit wakes B (bounded wait, not timed).
    tokio::time::timeout(Duration::from_secs(20), changes.changed())
        .await
        .expect("no notification of a result recorded on another replica")
        .unwrap();
    changes.borrow_and_update();
    assert_eq!(b.results("n", 0, 10).await.unwrap().len(), 1);
    a.set_state("n", &[JobState::Running], JobState::Cancelling, None)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), changes.changed())
        .await
        .expect("no notification of a state change on another replica")
        .unwrap();
    stop.cancel();
    listener.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_process_killed_mid_job_leaves_its_requests_to_the_other_within_a_few_leases() {
    let Some(url) = pg_server::database().await else {
        return;
    };
    // Two real gateway processes with 1 s leases (renewed every 333 ms), four requests of
    // the job at once over both, each taking 500 ms upstream.
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let toml = openai_toml(
        &mock,
        &format!("[store]\nurl = \"{url}\"\n[batch]\njob_concurrency = 4\nlease = \"1s\""),
    );
    let dir = tempfile::tempdir().unwrap();
    let (mut a, a_channel) = gateway_process(dir.path(), &toml).await;
    let model = format!("{MODEL}+latency=500");
    let items: Vec<_> = (0..24)
        .map(|i| item(&format!("r{i}"), &model, &format!("q{i}")))
        .collect();
    // The job's own deadline is the bound: 20 s, far under the default 30 s lease. Requests
    // a dead replica held that were not retaken in time would end DEADLINE_EXCEEDED.
    let mut req = job(items);
    req.timeout = Some(prost_types::Duration {
        seconds: 20,
        nanos: 0,
    });
    let created = create(&mut LlmGatewayClient::new(a_channel.clone()), req).await;
    // A runs the job alone until it has answered some and holds claims on more.
    let mut a_client = LlmGatewayClient::new(a_channel);
    loop {
        let counts = get(&mut a_client, &created.id).await.counts.unwrap();
        if counts.succeeded >= 4 && counts.running > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // kill -9 mid-job: no shutdown, no release; A's claims hold until their leases run out.
    a.start_kill().unwrap();
    a.wait().await.unwrap();
    let (_b, b_channel) = gateway_process(dir.path(), &toml).await;
    let mut client = LlmGatewayClient::new(b_channel);
    let all = tokio::time::timeout(
        Duration::from_secs(120),
        results(&mut client, &created.id, 0),
    )
    .await
    .expect("the job never ended on the surviving replica");
    // Every custom_id has exactly one result, a reply: none expired waiting for A's claims.
    assert_eq!(all.len(), 24);
    let answered = answers(&all);
    assert_eq!(answered.len(), 24);
    assert!(answered.values().all(|n| *n == 1), "{answered:?}");
    for r in &all {
        let n = r.custom_id.strip_prefix('r').unwrap();
        assert_eq!(reply(r), format!("Mock reply to: q{n}"));
    }
    // The requests A held when it died were run again by B (their second claim); those
    // are the only ones that reached the upstream twice.
    let retaken = all.iter().filter(|r| r.runs == 2).count();
    assert!(
        (1..=4).contains(&retaken),
        "A held claims when it was killed: {retaken}"
    );
    assert!(all.iter().all(|r| r.runs <= 2));
    assert!(mock.stats().requests() >= 24 + u64::try_from(retaken).unwrap());
    let done = get(&mut client, &created.id).await;
    assert_eq!(done.state, pb::BatchState::Completed as i32);
    assert_eq!(done.counts.unwrap().succeeded, 24);
}
