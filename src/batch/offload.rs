//! Native mode ([`BatchMode::Native`]): a job's requests go to the providers' native batch
//! APIs ([`super::native`]) for their lower price, before the runner's real-time path runs
//! whatever is left.
//!
//! 1. Every pending request moves to the native state ([`BatchStore::native_requests`]);
//!    those whose target has a native batch API ([`Execute::native_request`]) are grouped
//!    by provider account into batches of at most [`MAX_PER_BATCH`], the others go back to
//!    pending for the real-time path.
//! 2. Each batch is recorded in the job's native document ([`Submission`], stored with the
//!    job) before it is submitted, and again with the provider's batch id once accepted: a
//!    restart polls the same provider batch instead of submitting again. (A stop between
//!    the provider's answer and that write submits the batch again; each request still gets
//!    one result.) A submission that fails sends its requests to the real-time path.
//! 3. Open batches are polled every `batch.native_poll_interval`. An ended batch's results
//!    are recorded one per custom id ([`Execute::native_result`]); a request it could not
//!    answer (expired, failed retryably, missing) goes to the real-time path while the
//!    job's deadline allows.
//! 4. A cancel, or the job's deadline, cancels the open provider batches (their cancel
//!    endpoints). Requests they had not run end CANCELLED (or DEADLINE_EXCEEDED) through
//!    the runner; one that ended before the cancel keeps its answer. A batch that has not
//!    ended [`CANCEL_POLLS`] polls after its cancel is given up: its requests end as the
//!    runner ends unstarted ones.
//!
//! At shutdown the phase just stops: the requests stay in the native state, and the next
//! start resumes polling.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    BatchStoreError, Claimed, JobRecord, JobState, NativeDone, Unstarted,
    native::NativeError,
    runner::{Inner, now_ms},
};

/// Most requests in one provider batch (OpenAI takes up to 50,000 lines, Anthropic up to
/// 100,000 requests; smaller batches also stay under their size limits).
pub const MAX_PER_BATCH: usize = 10_000;

/// Polls a cancelled provider batch gets to end before its requests are given up.
pub const CANCEL_POLLS: u32 = 5;

/// One provider batch of a job, as the job's native document stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submission {
    /// The provider account (configured provider name).
    pub account: String,
    /// The provider's batch id, once it accepted the batch.
    #[serde(default)]
    pub id: Option<String>,
    /// The job's requests in it.
    pub indexes: Vec<u32>,
    /// Its results are recorded (or its submission failed).
    #[serde(default)]
    pub done: bool,
}

/// A job's native document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Document {
    /// The provider batches, in submission order.
    batches: Vec<Submission>,
}

/// The submissions of a job's native document; `None` before the native part took the
/// job's requests (an empty document).
pub fn submissions(document: &str) -> Result<Option<Vec<Submission>>, BatchStoreError> {
    if document.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str::<Document>(document)
        .map(|d| Some(d.batches))
        .map_err(|e| BatchStoreError(format!("a batch job's native document is unreadable: {e}")))
}

async fn save(
    inner: &Arc<Inner>,
    job_id: &str,
    subs: &[Submission],
) -> Result<(), BatchStoreError> {
    let document = serde_json::to_string(&Document {
        batches: subs.to_vec(),
    })
    .map_err(|e| BatchStoreError(e.to_string()))?;
    inner.store.set_native(job_id, document).await?;
    inner.changed.send_modify(|n| *n += 1);
    Ok(())
}

/// Runs the native part of `job` until every provider batch of it is done; `Ok(false)`
/// when the runner stopped first (shutdown).
pub(super) async fn run(
    inner: &Arc<Inner>,
    job: &JobRecord,
    cancel: &CancellationToken,
    deadline: Instant,
) -> Result<bool, BatchStoreError> {
    let store = &inner.store;
    let id = job.id.as_str();
    let stored = submissions(&job.native)?;
    // Pending requests are taken once: later, pending ones are the real-time path's.
    let take = stored.is_none() && !cancel.is_cancelled() && Instant::now() < deadline;
    let requests: HashMap<u32, Claimed> = store
        .native_requests(id, take)
        .await?
        .into_iter()
        .map(|c| (c.index, c))
        .collect();
    let mut subs = stored.unwrap_or_default();
    let mut known: Vec<u32> = subs.iter().flat_map(|s| s.indexes.clone()).collect();
    known.sort_unstable();
    // Requests taken now (or by a run that stopped before recording them).
    let mut groups: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut realtime = Vec::new();
    let mut fresh: Vec<&Claimed> = requests
        .values()
        .filter(|c| known.binary_search(&c.index).is_err())
        .collect();
    fresh.sort_by_key(|c| c.index);
    for claimed in fresh {
        match inner
            .exec
            .native_request(&job.owner, claimed.format, &claimed.body)
        {
            Some(native) if take => groups
                .entry(native.account)
                .or_default()
                .push(claimed.index),
            _ => realtime.push(claimed.index),
        }
    }
    for (account, indexes) in groups {
        for chunk in indexes.chunks(MAX_PER_BATCH) {
            subs.push(Submission {
                account: account.clone(),
                id: None,
                indexes: chunk.to_vec(),
                done: false,
            });
        }
    }
    save(inner, id, &subs).await?;
    if !realtime.is_empty() {
        store.native_release(id, &realtime, false).await?;
    }

    // Submit what has no provider batch yet.
    for sub in subs.iter_mut().filter(|s| s.id.is_none() && !s.done) {
        if cancel.is_cancelled() || Instant::now() >= deadline {
            release(inner, id, sub, false).await?;
            continue;
        }
        let mut lines = Vec::with_capacity(sub.indexes.len());
        let mut kept = Vec::with_capacity(sub.indexes.len());
        let mut lost = Vec::new();
        for index in &sub.indexes {
            let native = requests
                .get(index)
                .and_then(|c| {
                    let n = inner.exec.native_request(&job.owner, c.format, &c.body)?;
                    Some((c.custom_id.clone(), n))
                })
                .filter(|(_, n)| n.account == sub.account);
            match native {
                Some((custom_id, n)) => {
                    lines.push((custom_id, n.body));
                    kept.push(*index);
                }
                None => lost.push(*index),
            }
        }
        if !lost.is_empty() {
            store.native_release(id, &lost, false).await?;
            sub.indexes = kept;
        }
        let submitted = match inner.exec.native_client(&sub.account) {
            Some(client) if !lines.is_empty() => client.submit(&lines).await,
            Some(_) => Ok(String::new()),
            None => Err(NativeError::Decode("an account without a native batch API")),
        };
        match submitted {
            Ok(batch) if !batch.is_empty() => {
                tracing::info!(batch_job = %id, account = %sub.account, native_batch = %batch, requests = sub.indexes.len(), "native batch submitted");
                sub.id = Some(batch);
            }
            Ok(_) => sub.done = true,
            Err(err) => {
                tracing::warn!(batch_job = %id, account = %sub.account, error = %err, "native batch submission failed; its requests run in real time");
                release(inner, id, sub, false).await?;
            }
        }
    }
    save(inner, id, &subs).await?;

    poll(inner, job, &requests, &mut subs, cancel, deadline).await
}

/// Sends a submission's requests to the real-time path and marks it done (`sent`: see
/// [`super::BatchStore::native_release`]).
async fn release(
    inner: &Arc<Inner>,
    job_id: &str,
    sub: &mut Submission,
    sent: bool,
) -> Result<(), BatchStoreError> {
    inner
        .store
        .native_release(job_id, &sub.indexes, sent)
        .await?;
    sub.done = true;
    Ok(())
}

/// Polls the open submissions until each is done.
async fn poll(
    inner: &Arc<Inner>,
    job: &JobRecord,
    requests: &HashMap<u32, Claimed>,
    subs: &mut [Submission],
    cancel: &CancellationToken,
    deadline: Instant,
) -> Result<bool, BatchStoreError> {
    let id = job.id.as_str();
    let interval = inner.settings.native_poll_interval;
    // Per submission: polls since its cancel was sent.
    let mut cancelled_polls: HashMap<usize, u32> = HashMap::new();
    loop {
        if inner.stop_claiming.is_cancelled() {
            return Ok(false);
        }
        // With a shared store, the cancel may come from another replica.
        if !cancel.is_cancelled() && inner.store.job_state(id).await? != Some(JobState::Running) {
            cancel.cancel();
        }
        let stopping = cancel.is_cancelled() || Instant::now() >= deadline;
        let mut open = 0;
        for (n, sub) in subs.iter_mut().enumerate() {
            let (Some(batch), false) = (sub.id.clone(), sub.done) else {
                continue;
            };
            let Some(client) = inner.exec.native_client(&sub.account) else {
                release(inner, id, sub, true).await?;
                continue;
            };
            if stopping && !cancelled_polls.contains_key(&n) {
                match client.cancel(&batch).await {
                    Ok(()) => {
                        tracing::info!(batch_job = %id, native_batch = %batch, "native batch cancelled")
                    }
                    Err(err) => {
                        tracing::warn!(batch_job = %id, native_batch = %batch, error = %err, "cannot cancel a native batch")
                    }
                }
                cancelled_polls.insert(n, 0);
            }
            let ended = match client.status(&batch).await {
                Ok(status) => status.ended,
                Err(NativeError::Status { status, .. })
                    if (400..500).contains(&status) && status != 408 && status != 429 =>
                {
                    tracing::warn!(batch_job = %id, native_batch = %batch, status, "the provider no longer knows a native batch; its requests run in real time");
                    release(inner, id, sub, true).await?;
                    continue;
                }
                Err(err) => {
                    tracing::warn!(batch_job = %id, native_batch = %batch, error = %err, "cannot poll a native batch; trying again");
                    false
                }
            };
            if ended {
                match record(inner, job, requests, sub, &batch, cancel, deadline).await {
                    Ok(()) => sub.done = true,
                    Err(Failure::Store(err)) => return Err(err),
                    Err(Failure::Native(err)) => {
                        tracing::warn!(batch_job = %id, native_batch = %batch, error = %err, "cannot read a native batch's results; trying again");
                    }
                }
            } else if let Some(polls) = cancelled_polls.get_mut(&n) {
                *polls += 1;
                if *polls > CANCEL_POLLS {
                    tracing::warn!(batch_job = %id, native_batch = %batch, "a cancelled native batch did not end; its requests end unstarted");
                    release(inner, id, sub, true).await?;
                }
            }
            if !sub.done {
                open += 1;
            }
        }
        save(inner, id, subs).await?;
        if open == 0 {
            return Ok(true);
        }
        let wait = tokio::time::sleep(interval);
        tokio::select! {
            () = wait => {}
            () = cancel.cancelled(), if !cancel.is_cancelled() => {}
            () = tokio::time::sleep_until(deadline), if Instant::now() < deadline => {}
            () = inner.stop_claiming.cancelled() => {}
        }
    }
}

enum Failure {
    Store(BatchStoreError),
    Native(NativeError),
}

/// Records the results of an ended provider batch.
async fn record(
    inner: &Arc<Inner>,
    job: &JobRecord,
    requests: &HashMap<u32, Claimed>,
    sub: &Submission,
    batch: &str,
    cancel: &CancellationToken,
    deadline: Instant,
) -> Result<(), Failure> {
    let client = inner
        .exec
        .native_client(&sub.account)
        .ok_or(Failure::Native(NativeError::Decode(
            "a native batch's account",
        )))?;
    let claimed: Vec<&Claimed> = sub.indexes.iter().filter_map(|i| requests.get(i)).collect();
    let custom_ids: Vec<String> = claimed.iter().map(|c| c.custom_id.clone()).collect();
    let outcomes = client
        .results(batch, &custom_ids)
        .await
        .map_err(Failure::Native)?;
    let store = &inner.store;
    let mut realtime = Vec::new();
    for (request, (_, outcome)) in claimed.into_iter().zip(outcomes) {
        let result = if cancel.is_cancelled() && outcome.is_retryable() {
            // Not run before the cancel: it ends as the runner ends unstarted requests.
            inner
                .exec
                .unstarted(&request.custom_id, Unstarted::Cancelled)
        } else {
            match inner
                .exec
                .native_result(job, request, &sub.account, outcome)
                .await
            {
                NativeDone::Done(result) => result,
                NativeDone::Realtime(_) if Instant::now() < deadline && !cancel.is_cancelled() => {
                    realtime.push(request.index);
                    continue;
                }
                NativeDone::Realtime(result) => result,
            }
        };
        store
            .complete(&job.id, request.index, result, now_ms())
            .await
            .map_err(Failure::Store)?;
    }
    if !realtime.is_empty() {
        tracing::info!(batch_job = %job.id, native_batch = %batch, requests = realtime.len(), "native batch left requests unanswered; they run in real time");
        store
            .native_release(&job.id, &realtime, true)
            .await
            .map_err(Failure::Store)?;
    }
    inner.changed.send_modify(|n| *n += 1);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_round_trips_and_tolerates_nothing() {
        let subs = vec![Submission {
            account: "openai".into(),
            id: Some("batch_1".into()),
            indexes: vec![0, 2],
            done: false,
        }];
        let text = serde_json::to_string(&Document {
            batches: subs.clone(),
        })
        .unwrap();
        assert_eq!(submissions(&text).unwrap(), Some(subs));
        assert_eq!(submissions("").unwrap(), None);
        assert_eq!(submissions(r#"{"batches": []}"#).unwrap(), Some(vec![]));
        assert_eq!(
            submissions(r#"{"batches": [{"account": "a", "indexes": [1]}]}"#).unwrap(),
            Some(vec![Submission {
                account: "a".into(),
                id: None,
                indexes: vec![1],
                done: false
            }])
        );
        assert!(submissions("[").is_err());
    }
}
