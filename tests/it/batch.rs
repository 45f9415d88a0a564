//! Batch jobs: submit, stream, progress, cancel, deadline, retries, restart, ownership and
//! bad input, through the generated client against the mock upstream.

use std::collections::BTreeMap;

use llm_gateway::{
    mock_upstream::{MockSettings, MockUpstream},
    pb::{self, llm_gateway_client::LlmGatewayClient},
};
use tonic::{Code, Request, transport::Channel};

use crate::common::*;

pub(crate) const MODEL: &str = "openai/gpt-4o-mini";

pub(crate) fn item(custom_id: &str, model: &str, text: &str) -> pb::BatchRequestItem {
    pb::BatchRequestItem {
        custom_id: custom_id.to_owned(),
        request: Some(request(model, text)),
    }
}

pub(crate) fn job(items: Vec<pb::BatchRequestItem>) -> pb::CreateBatchRequest {
    pb::CreateBatchRequest {
        requests: items,
        ..Default::default()
    }
}

pub(crate) async fn create(
    client: &mut LlmGatewayClient<Channel>,
    req: pb::CreateBatchRequest,
) -> pb::Batch {
    client
        .create_batch(req)
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap()
}

/// Every result of a job from `offset`, until the stream ends.
pub(crate) async fn results(
    client: &mut LlmGatewayClient<Channel>,
    id: &str,
    offset: u64,
) -> Vec<pb::BatchResult> {
    let mut stream = client
        .stream_batch_results(pb::StreamBatchResultsRequest {
            batch_id: id.to_owned(),
            offset,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        out.push(msg.result.unwrap());
    }
    out
}

pub(crate) async fn get(client: &mut LlmGatewayClient<Channel>, id: &str) -> pb::Batch {
    client
        .get_batch(pb::GetBatchRequest {
            batch_id: id.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap()
}

pub(crate) fn reply(result: &pb::BatchResult) -> String {
    match &result.outcome {
        Some(pb::batch_result::Outcome::Response(r)) => reply_text(r),
        other => panic!("{}: not a reply: {other:?}", result.custom_id),
    }
}

fn error(result: &pb::BatchResult) -> &pb::BatchError {
    match &result.outcome {
        Some(pb::batch_result::Outcome::Error(e)) => e,
        other => panic!("{}: not an error: {other:?}", result.custom_id),
    }
}

/// How many results each custom id got.
pub(crate) fn answers(results: &[pb::BatchResult]) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for r in results {
        *seen.entry(r.custom_id.clone()).or_default() += 1;
    }
    seen
}

async fn pair(extra: &str) -> (MockUpstream, Gateway) {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&openai_toml(&mock, extra)).await;
    (mock, gateway)
}

#[tokio::test]
async fn a_job_runs_every_request_and_streams_each_result_once() {
    let (_mock, gateway) = pair("").await;
    let mut client = gateway.client();
    let items: Vec<_> = (0..6)
        .map(|i| item(&format!("req-{i}"), MODEL, &format!("question {i}")))
        .collect();
    let mut req = job(items);
    req.tags.insert("feature".into(), "nightly".into());
    let created = create(&mut client, req).await;
    assert!(created.id.starts_with("batch_"), "{}", created.id);
    assert_eq!(created.mode, pb::BatchMode::Gateway as i32);
    assert_eq!(created.counts.unwrap().total, 6);

    let all = results(&mut client, &created.id, 0).await;
    assert_eq!(all.len(), 6);
    assert!(
        answers(&all).values().all(|n| *n == 1),
        "{:?}",
        answers(&all)
    );
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r.offset, i as u64);
        assert_eq!(r.runs, 1);
        let n = r.custom_id.strip_prefix("req-").unwrap();
        assert_eq!(reply(r), format!("Mock reply to: question {n}"));
        assert!(r.usage.unwrap().input_tokens > 0);
        assert!(r.cost.unwrap().total_usd > 0.0);
        assert_eq!(r.route.as_ref().unwrap().attempts[0].provider, "openai");
        assert!(r.complete_time.is_some());
    }

    let done = get(&mut client, &created.id).await;
    assert_eq!(done.state, pb::BatchState::Completed as i32);
    let counts = done.counts.unwrap();
    assert_eq!(
        (counts.succeeded, counts.pending, counts.running),
        (6, 0, 0)
    );
    let cost: f64 = all.iter().map(|r| r.cost.unwrap().total_usd).sum();
    assert!((done.cost.unwrap().total_usd - cost).abs() < 1e-12);
    assert!(done.end_time.is_some());
    assert_eq!(done.tags["feature"], "nightly");

    // A reader that received two continues with the rest, each once.
    let rest = results(&mut client, &created.id, 2).await;
    assert_eq!(
        rest.iter().map(|r| &r.custom_id).collect::<Vec<_>>(),
        all[2..].iter().map(|r| &r.custom_id).collect::<Vec<_>>()
    );

    // The ledger has one record per request, tagged with the job.
    let mut admin = admin_client(gateway.channel.clone());
    let records: Vec<_> = usage_records(&mut admin, 6)
        .await
        .into_iter()
        .filter(|r| r.rpc == "Batch")
        .collect();
    assert_eq!(records.len(), 6);
    for r in &records {
        assert_eq!(r.tags["batch_job"], created.id);
        assert_eq!(r.tags["feature"], "nightly");
        assert_eq!(r.code, "OK");
    }

    let listed = client
        .list_batches(pb::ListBatchesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.batches.len(), 1);
    assert_eq!(listed.batches[0].id, created.id);
}

#[tokio::test]
async fn a_jsonl_job_in_the_openai_batch_format_runs() {
    let (mock, gateway) = pair("").await;
    let mut client = gateway.client();
    let jsonl = format!(
        "{}\n\n{}\n",
        r#"{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "first"}], "max_tokens": 20}}"#,
        r#"{"custom_id": "b", "body": {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "second"}]}}"#
    );
    let created = create(
        &mut client,
        pb::CreateBatchRequest {
            jsonl: jsonl.into_bytes(),
            ..Default::default()
        },
    )
    .await;
    let all = results(&mut client, &created.id, 0).await;
    let mut replies: Vec<(String, String)> = all
        .iter()
        .map(|r| (r.custom_id.clone(), reply(r)))
        .collect();
    replies.sort();
    assert_eq!(
        replies,
        [
            ("a".to_owned(), "Mock reply to: first".to_owned()),
            ("b".to_owned(), "Mock reply to: second".to_owned())
        ]
    );
    assert_eq!(mock.stats().requests(), 2);
}

#[tokio::test]
async fn cancel_stops_starting_requests_and_the_rest_end_cancelled() {
    let (_mock, gateway) = pair("[batch]\njob_concurrency = 1").await;
    let mut client = gateway.client();
    let model = format!("{MODEL}+latency=300");
    let items: Vec<_> = (0..10)
        .map(|i| item(&format!("c{i}"), &model, "slow"))
        .collect();
    let created = create(&mut client, job(items)).await;
    let cancelled = client
        .cancel_batch(pb::CancelBatchRequest {
            batch_id: created.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap();
    assert!(
        cancelled.state == pb::BatchState::Cancelling as i32
            || cancelled.state == pb::BatchState::Cancelled as i32
    );
    let all = results(&mut client, &created.id, 0).await;
    assert_eq!(all.len(), 10);
    assert!(answers(&all).values().all(|n| *n == 1));
    let never_started: Vec<_> = all
        .iter()
        .filter(|r| matches!(&r.outcome, Some(pb::batch_result::Outcome::Error(_))))
        .collect();
    assert!(!never_started.is_empty());
    for r in &never_started {
        let e = error(r);
        assert_eq!(
            (e.code, e.reason.as_str()),
            (Code::Cancelled as i32, "CANCELLED")
        );
        assert_eq!(r.runs, 0);
    }
    let done = get(&mut client, &created.id).await;
    assert_eq!(done.state, pb::BatchState::Cancelled as i32);
    let counts = done.counts.unwrap();
    assert_eq!(counts.cancelled as usize, never_started.len());
    assert_eq!(counts.cancelled + counts.succeeded, 10);
}

#[tokio::test]
async fn requests_not_started_by_the_deadline_end_deadline_exceeded() {
    let (_mock, gateway) = pair("[batch]\njob_concurrency = 1").await;
    let mut client = gateway.client();
    let model = format!("{MODEL}+hang");
    let items: Vec<_> = (0..3)
        .map(|i| item(&format!("d{i}"), &model, "x"))
        .collect();
    let mut req = job(items);
    req.timeout = Some(prost_types::Duration {
        seconds: 0,
        nanos: 500_000_000,
    });
    let created = create(&mut client, req).await;
    let all = results(&mut client, &created.id, 0).await;
    assert_eq!(all.len(), 3);
    for r in &all {
        let e = error(r);
        assert_eq!(e.code, Code::DeadlineExceeded as i32, "{e:?}");
    }
    let done = get(&mut client, &created.id).await;
    assert_eq!(done.state, pb::BatchState::Expired as i32);
    assert_eq!(done.counts.unwrap().deadline_exceeded, 3);
}

#[tokio::test]
async fn retryable_failures_are_retried_and_others_are_not() {
    let (mock, gateway) = pair("[batch]\nmax_runs = 3\nretry_backoff = \"10ms\"").await;
    let mut client = gateway.client();
    let created = create(
        &mut client,
        job(vec![
            item("down", &format!("{MODEL}+status=503"), "x"),
            item("bad", &format!("{MODEL}+status=400"), "x"),
        ]),
    )
    .await;
    let all = results(&mut client, &created.id, 0).await;
    let by_id: BTreeMap<_, _> = all.iter().map(|r| (r.custom_id.as_str(), r)).collect();
    let down = by_id["down"];
    assert_eq!(error(down).code, Code::Unavailable as i32);
    assert_eq!(down.runs, 3);
    assert!(down.route.is_some());
    let bad = by_id["bad"];
    assert_eq!(error(bad).code, Code::InvalidArgument as i32);
    assert_eq!(bad.runs, 1);
    // `bad` reached the upstream once, `down` more than once (once its target's circuit
    // opens, a run is refused before the upstream, which is retryable too).
    assert!(mock.stats().requests() >= 3, "{}", mock.stats().requests());
    let counts = get(&mut client, &created.id).await.counts.unwrap();
    assert_eq!(counts.failed, 2);
}

#[tokio::test]
async fn a_job_survives_a_restart_and_every_request_is_answered_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let toml = openai_toml(
        &mock,
        &format!(
            "[store]\npath = \"{}\"\n[batch]\njob_concurrency = 2",
            dir.path().join("gw.db").display()
        ),
    );
    let mut first = Gateway::start(&toml).await;
    let mut client = first.client();
    let model = format!("{MODEL}+latency=50");
    let items: Vec<_> = (0..40)
        .map(|i| item(&format!("r{i}"), &model, &format!("q{i}")))
        .collect();
    let created = create(&mut client, job(items)).await;

    // Read a few results, then stop the gateway midway.
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
    first.signal_shutdown();
    // The stream ends (UNAVAILABLE, or cleanly when the job had finished) at shutdown.
    while let Ok(Some(msg)) = stream.message().await {
        received.push(msg.result.unwrap());
    }
    first.take_handle().await.unwrap().unwrap();
    assert!(
        answers(&received).len() < 40,
        "the job finished before the restart"
    );

    // A new gateway on the same store resumes the job; the reader continues at its offset.
    let second = Gateway::start(&toml).await;
    let mut client = second.client();
    let rest = results(&mut client, &created.id, received.len() as u64).await;
    let mut all = received.clone();
    all.extend(rest);
    assert_eq!(all.len(), 40);
    let seen = answers(&all);
    assert_eq!(seen.len(), 40);
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    for r in &all {
        let n = r.custom_id.strip_prefix('r').unwrap();
        assert_eq!(reply(r), format!("Mock reply to: q{n}"));
    }
    // A fresh reader from 0 sees the same 40, in the same order.
    let again = results(&mut client, &created.id, 0).await;
    assert_eq!(
        again.iter().map(|r| &r.custom_id).collect::<Vec<_>>(),
        all.iter().map(|r| &r.custom_id).collect::<Vec<_>>()
    );
    let done = get(&mut client, &created.id).await;
    assert_eq!(done.state, pb::BatchState::Completed as i32);
    assert_eq!(done.counts.unwrap().succeeded, 40);
}

fn authed<T>(message: T, secret: &str) -> Request<T> {
    let mut req = Request::new(message);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {secret}").parse().unwrap());
    req
}

#[tokio::test]
async fn a_key_cannot_see_another_keys_job() {
    let (_mock, gateway) = pair("[auth]\nrequire_keys = true").await;
    let mut admin = admin_client(gateway.channel.clone());
    let mut secrets = Vec::new();
    for name in ["alice", "bob"] {
        let created = admin
            .create_key(pb::CreateKeyRequest {
                key: Some(pb::Key {
                    name: name.into(),
                    owner: "team".into(),
                    scopes: vec!["chat".into()],
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner();
        secrets.push(created.secret);
    }
    let (alice, bob) = (&secrets[0], &secrets[1]);
    let mut client = gateway.client();
    let status = client
        .create_batch(job(vec![item("a", MODEL, "x")]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let created = client
        .create_batch(authed(job(vec![item("a", MODEL, "x")]), alice))
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap();
    let id = || created.id.clone();

    let status = client
        .get_batch(authed(pb::GetBatchRequest { batch_id: id() }, bob))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = client
        .cancel_batch(authed(pb::CancelBatchRequest { batch_id: id() }, bob))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = client
        .stream_batch_results(authed(
            pb::StreamBatchResultsRequest {
                batch_id: id(),
                offset: 0,
            },
            bob,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let listed = client
        .list_batches(authed(pb::ListBatchesRequest::default(), bob))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.batches.is_empty());

    // Alice sees hers, and its request ran as her key (team tag from its owner).
    let mut stream = client
        .stream_batch_results(authed(
            pb::StreamBatchResultsRequest {
                batch_id: id(),
                offset: 0,
            },
            alice,
        ))
        .await
        .unwrap()
        .into_inner();
    let result = stream.message().await.unwrap().unwrap().result.unwrap();
    assert_eq!(reply(&result), "Mock reply to: x");
    let records = usage_records(&mut admin, 1).await;
    let record = records.iter().find(|r| r.rpc == "Batch").unwrap();
    assert_eq!(record.key, "alice");
    assert_eq!(record.tags["team"], "team");
    let listed = client
        .list_batches(authed(pb::ListBatchesRequest::default(), alice))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.batches.len(), 1);
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_request_or_line() {
    let (mock, gateway) = pair("[batch]\nmax_requests = 3").await;
    let mut client = gateway.client();
    let mut refused = async |req: pb::CreateBatchRequest| {
        let status = client.create_batch(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        (violated_fields(&status), status.message().to_owned())
    };

    let (fields, message) = refused(job(vec![])).await;
    assert_eq!(fields, ["requests"]);
    assert!(message.contains("at least one request"), "{message}");

    let (fields, message) = refused(job(vec![
        item("same", MODEL, "x"),
        item("other", MODEL, "x"),
        item("same", MODEL, "x"),
    ]))
    .await;
    assert_eq!(fields, ["requests[2].custom_id"]);
    assert!(message.contains("`same` is used twice"), "{message}");

    let (fields, message) = refused(job((0..4)
        .map(|i| item(&i.to_string(), MODEL, "x"))
        .collect()))
    .await;
    assert_eq!(fields, ["requests"]);
    assert!(
        message.contains("4 requests is more than the 3"),
        "{message}"
    );

    let mut no_messages = item("a", MODEL, "x");
    no_messages.request.as_mut().unwrap().messages.clear();
    let (fields, _) = refused(job(vec![no_messages, item("", MODEL, "x")])).await;
    assert_eq!(
        fields,
        ["requests[0].request.messages", "requests[1].custom_id"]
    );

    let jsonl = concat!(
        r#"{"custom_id": "a", "body": {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}}"#,
        "\n{\"custom_id\": \"b\", \"body\": {\n"
    );
    let (fields, message) = refused(pb::CreateBatchRequest {
        jsonl: jsonl.as_bytes().to_vec(),
        ..Default::default()
    })
    .await;
    assert_eq!(fields, ["jsonl line 2"]);
    assert!(message.contains("not valid JSON"), "{message}");

    let (fields, _) = refused(pb::CreateBatchRequest {
        jsonl: br#"{"custom_id": "a", "url": "/v1/embeddings", "body": {"model": "openai/gpt-4o-mini", "messages": []}}"#.to_vec(),
        ..Default::default()
    })
    .await;
    assert_eq!(fields, ["jsonl line 1.url", "jsonl line 1.body.messages"]);

    let (fields, _) = refused(pb::CreateBatchRequest {
        requests: vec![item("a", MODEL, "x")],
        jsonl: b"{}".to_vec(),
        ..Default::default()
    })
    .await;
    assert_eq!(fields, ["jsonl"]);

    let status = client
        .get_batch(pb::GetBatchRequest {
            batch_id: "batch_nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(mock.stats().requests(), 0);
}

/// The native batch clients against the mock's OpenAI Batch and Anthropic Message Batches
/// endpoints (real wire formats): every request gets one outcome per custom id, with the
/// provider's answer and usage; an item the batch left unprocessed (`+batch_expire`) is
/// reported expired, and a failed one with its status.
#[tokio::test]
async fn native_batches_answer_every_custom_id_in_the_providers_formats() {
    use llm_gateway::batch::native::{NativeBatch, NativeKind, NativeOutcome};
    use serde_json::json;
    let mock = MockUpstream::start(MockSettings {
        batch_delay: std::time::Duration::from_millis(50),
        ..MockSettings::default()
    })
    .await
    .unwrap();
    let client = llm_gateway::providers::http_client(&Default::default()).unwrap();
    let poll = std::time::Duration::from_millis(20);
    let ids: Vec<String> = ["a", "b", "late", "bad"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();

    let openai = NativeBatch::new(
        NativeKind::OpenAi,
        mock.openai_base_url(),
        "sk-test",
        client.clone(),
    );
    let body = |model: &str, text: &str| json!({"model": model, "messages": [{"role": "user", "content": text}]});
    let requests = vec![
        (ids[0].clone(), body("gpt-4o-mini", "hello")),
        (ids[1].clone(), body("gpt-4o-mini", "bye")),
        (ids[2].clone(), body("gpt-4o-mini+batch_expire", "too late")),
        (ids[3].clone(), body("gpt-4o-mini+status=400", "bad")),
    ];
    let id = openai.submit(&requests).await.unwrap();
    assert!(id.starts_with("batch_"), "{id}");
    let results = openai.wait(&id, &ids, poll).await.unwrap();
    assert_eq!(openai.status(&id).await.unwrap().status, "expired");
    let by_id: BTreeMap<_, _> = results.into_iter().collect();
    let NativeOutcome::Succeeded(answer) = &by_id["a"] else {
        panic!("{by_id:?}");
    };
    assert_eq!(answer["object"], "chat.completion");
    assert!(answer["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert!(matches!(by_id["b"], NativeOutcome::Succeeded(_)));
    assert_eq!(by_id["late"], NativeOutcome::Expired);
    assert!(
        matches!(
            &by_id["bad"],
            NativeOutcome::Failed {
                status: Some(400),
                ..
            }
        ),
        "{by_id:?}"
    );

    let anthropic = NativeBatch::new(
        NativeKind::Anthropic,
        mock.anthropic_base_url(),
        "sk-ant-test",
        client,
    );
    let params = |model: &str, text: &str| json!({"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": text}]});
    let requests = vec![
        (ids[0].clone(), params("claude-3-5-haiku", "hello")),
        (ids[1].clone(), params("claude-3-5-haiku", "bye")),
        (
            ids[2].clone(),
            params("claude-3-5-haiku+batch_expire", "late"),
        ),
        (ids[3].clone(), params("claude-3-5-haiku+status=400", "bad")),
    ];
    let id = anthropic.submit(&requests).await.unwrap();
    assert!(id.starts_with("msgbatch_"), "{id}");
    let by_id: BTreeMap<_, _> = anthropic
        .wait(&id, &ids, poll)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let NativeOutcome::Succeeded(message) = &by_id["a"] else {
        panic!("{by_id:?}");
    };
    assert_eq!(message["type"], "message");
    assert!(message["usage"]["output_tokens"].as_u64().unwrap() > 0);
    assert!(matches!(by_id["b"], NativeOutcome::Succeeded(_)));
    assert_eq!(by_id["late"], NativeOutcome::Expired);
    assert!(
        matches!(&by_id["bad"], NativeOutcome::Failed { code, .. } if code == "invalid_request_error"),
        "{by_id:?}"
    );
}

/// A mock whose native batches wait `delay` (or until `finish_native_batches`), and a
/// gateway polling them every 20 ms.
async fn native_pair(delay: std::time::Duration, extra: &str) -> (MockUpstream, Gateway) {
    let mock = MockUpstream::start(MockSettings {
        batch_delay: delay,
        ..MockSettings::default()
    })
    .await
    .unwrap();
    let toml = openai_toml(
        &mock,
        &format!("[batch]\nnative_poll_interval = \"20ms\"\nretry_backoff = \"10ms\"\n{extra}"),
    );
    let gateway = Gateway::start(&toml).await;
    (mock, gateway)
}

fn in_mode(
    mut req: pb::CreateBatchRequest,
    mode: pb::BatchMode,
    hours: i64,
) -> pb::CreateBatchRequest {
    req.mode = mode as i32;
    req.timeout = Some(prost_types::Duration {
        seconds: hours * 3600,
        nanos: 0,
    });
    req
}

/// Waits until the job's provider batch is accepted; returns the job.
async fn submitted(client: &mut LlmGatewayClient<Channel>, id: &str) -> pb::Batch {
    for _ in 0..500 {
        let job = get(client, id).await;
        if job.native_batches.first().is_some_and(|b| !b.id.is_empty()) {
            return job;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the job's native batch was never submitted");
}

#[tokio::test]
async fn a_native_job_answers_each_custom_id_once_at_the_discounted_price() {
    let (mock, gateway) = native_pair(std::time::Duration::from_millis(50), "").await;
    let mut client = gateway.client();
    // The same request in real time, for its full price.
    let realtime = create(&mut client, job(vec![item("rt", MODEL, "question 0")])).await;
    let full = results(&mut client, &realtime.id, 0).await[0].cost.unwrap();
    assert!(full.total_usd > 0.0);

    let items: Vec<_> = (0..4)
        .map(|i| item(&format!("n{i}"), MODEL, &format!("question {i}")))
        .collect();
    let mut req = in_mode(job(items), pb::BatchMode::Native, 1);
    req.tags.insert("feature".into(), "nightly".into());
    let created = create(&mut client, req).await;
    assert_eq!(created.mode, pb::BatchMode::Native as i32);
    let all = results(&mut client, &created.id, 0).await;
    assert_eq!(all.len(), 4);
    assert!(
        answers(&all).values().all(|n| *n == 1),
        "{:?}",
        answers(&all)
    );
    for r in &all {
        let n = r.custom_id.strip_prefix('n').unwrap();
        assert_eq!(reply(r), format!("Mock reply to: question {n}"));
        assert_eq!(r.mode, pb::BatchMode::Native as i32, "{r:?}");
        assert_eq!(r.runs, 1);
        assert_eq!(r.route.as_ref().unwrap().attempts[0].provider, "openai");
        assert!(r.usage.unwrap().output_tokens > 0);
    }
    let n0 = all
        .iter()
        .find(|r| r.custom_id == "n0")
        .unwrap()
        .cost
        .unwrap();
    assert!(
        (n0.total_usd - full.total_usd * 0.5).abs() < 1e-12,
        "{n0:?} vs {full:?}"
    );
    assert!((n0.input_usd - full.input_usd * 0.5).abs() < 1e-12);

    let done = get(&mut client, &created.id).await;
    assert_eq!(done.state, pb::BatchState::Completed as i32);
    assert_eq!(done.mode, pb::BatchMode::Native as i32);
    assert_eq!(done.counts.unwrap().succeeded, 4);
    assert_eq!(done.native_batches.len(), 1);
    let native = &done.native_batches[0];
    assert!(native.id.starts_with("batch_"), "{native:?}");
    assert_eq!(
        (native.provider.as_str(), native.requests, native.done),
        ("openai", 4, true)
    );
    let cost: f64 = all.iter().map(|r| r.cost.unwrap().total_usd).sum();
    assert!((done.cost.unwrap().total_usd - cost).abs() < 1e-12);
    assert_eq!(mock.native_batches().created, 1);

    // The ledger has each native answer at the discounted cost, tagged with job and mode.
    let mut admin = admin_client(gateway.channel.clone());
    let records: Vec<_> = usage_records(&mut admin, 5)
        .await
        .into_iter()
        .filter(|r| r.tags.get("batch_job") == Some(&created.id))
        .collect();
    assert_eq!(records.len(), 4);
    for r in &records {
        assert_eq!((r.rpc.as_str(), r.code.as_str()), ("Batch", "OK"));
        assert_eq!(r.tags["batch_mode"], "native");
        assert_eq!(r.tags["feature"], "nightly");
        assert_eq!(r.provider, "openai");
        assert!(r.output_tokens > 0);
    }
    let ledger_cost: f64 = records.iter().map(|r| r.cost_usd.unwrap()).sum();
    assert!((ledger_cost - cost).abs() < 1e-9, "{ledger_cost} vs {cost}");
}

#[tokio::test]
async fn auto_runs_in_real_time_when_the_deadline_is_short_and_natively_when_it_is_not() {
    let (mock, gateway) = native_pair(std::time::Duration::from_millis(20), "").await;
    let mut client = gateway.client();
    let short = create(
        &mut client,
        in_mode(job(vec![item("a", MODEL, "x")]), pb::BatchMode::Auto, 1),
    )
    .await;
    assert_eq!(short.mode, pb::BatchMode::Gateway as i32);
    let all = results(&mut client, &short.id, 0).await;
    assert_eq!(all[0].mode, pb::BatchMode::Gateway as i32);
    assert_eq!(reply(&all[0]), "Mock reply to: x");
    assert!(get(&mut client, &short.id).await.native_batches.is_empty());
    assert_eq!(mock.native_batches().created, 0);

    // A timeout that leaves room for the 24-hour window: native.
    let long = create(
        &mut client,
        in_mode(job(vec![item("a", MODEL, "x")]), pb::BatchMode::Auto, 25),
    )
    .await;
    assert_eq!(long.mode, pb::BatchMode::Native as i32);
    let all = results(&mut client, &long.id, 0).await;
    assert_eq!(all[0].mode, pb::BatchMode::Native as i32);
    assert_eq!(mock.native_batches().created, 1);
}

#[tokio::test]
async fn expired_native_items_run_in_real_time() {
    let (mock, gateway) = native_pair(std::time::Duration::from_millis(20), "").await;
    let mut client = gateway.client();
    let created = create(
        &mut client,
        in_mode(
            job(vec![
                item("a", MODEL, "first"),
                item("late", &format!("{MODEL}+batch_expire"), "second"),
                item("bad", &format!("{MODEL}+status=400"), "third"),
            ]),
            pb::BatchMode::Native,
            1,
        ),
    )
    .await;
    let all = results(&mut client, &created.id, 0).await;
    assert_eq!(all.len(), 3);
    assert!(
        answers(&all).values().all(|n| *n == 1),
        "{:?}",
        answers(&all)
    );
    let by_id: BTreeMap<_, _> = all.iter().map(|r| (r.custom_id.as_str(), r)).collect();
    assert_eq!(by_id["a"].mode, pb::BatchMode::Native as i32);
    assert_eq!(reply(by_id["a"]), "Mock reply to: first");
    // The item the native batch left expired ran in real time: its second run.
    let late = by_id["late"];
    assert_eq!(late.mode, pb::BatchMode::Gateway as i32);
    assert_eq!(reply(late), "Mock reply to: second");
    assert_eq!(late.runs, 2);
    // A request the provider refused is not run again.
    let bad = by_id["bad"];
    assert_eq!(bad.mode, pb::BatchMode::Native as i32);
    assert_eq!(error(bad).code, Code::InvalidArgument as i32, "{bad:?}");
    assert_eq!(bad.runs, 1);
    let done = get(&mut client, &created.id).await;
    assert_eq!(done.state, pb::BatchState::Completed as i32);
    let counts = done.counts.unwrap();
    assert_eq!((counts.succeeded, counts.failed), (2, 1));
    assert_eq!(mock.native_batches().created, 1);
}

#[tokio::test]
async fn a_restart_resumes_polling_the_same_native_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("path = \"{}\"", dir.path().join("gw.db").display());
    restart_resumes_the_native_batch(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_resumes_polling_the_same_native_batch_on_postgresql() {
    let Some(url) = crate::pg_server::database().await else {
        return;
    };
    restart_resumes_the_native_batch(&format!("url = \"{url}\"")).await;
}

/// A native job's gateway stops while its provider batch runs; the next start on the same
/// `[store]` polls that batch and records each result once.
async fn restart_resumes_the_native_batch(store: &str) {
    // The provider batch ends only when the test says so.
    let mock = MockUpstream::start(MockSettings {
        batch_delay: std::time::Duration::from_secs(3600),
        ..MockSettings::default()
    })
    .await
    .unwrap();
    let toml = openai_toml(
        &mock,
        &format!("[store]\n{store}\n[batch]\nnative_poll_interval = \"20ms\""),
    );
    let mut first = Gateway::start(&toml).await;
    let mut client = first.client();
    let items: Vec<_> = (0..5)
        .map(|i| item(&format!("r{i}"), MODEL, &format!("q{i}")))
        .collect();
    let created = create(&mut client, in_mode(job(items), pb::BatchMode::Native, 1)).await;
    let before = submitted(&mut client, &created.id).await;
    assert_eq!(before.counts.unwrap().running, 5);
    first.signal_shutdown();
    first.take_handle().await.unwrap().unwrap();

    let second = Gateway::start(&toml).await;
    let mut client = second.client();
    mock.finish_native_batches();
    let all = results(&mut client, &created.id, 0).await;
    assert_eq!(all.len(), 5);
    let seen = answers(&all);
    assert!(
        seen.len() == 5 && seen.values().all(|n| *n == 1),
        "{seen:?}"
    );
    for r in &all {
        assert_eq!(r.mode, pb::BatchMode::Native as i32);
        let n = r.custom_id.strip_prefix('r').unwrap();
        assert_eq!(reply(r), format!("Mock reply to: q{n}"));
    }
    let done = get(&mut client, &created.id).await;
    assert_eq!(done.state, pb::BatchState::Completed as i32);
    // The same provider batch, submitted once.
    assert_eq!(done.native_batches[0].id, before.native_batches[0].id);
    assert_eq!(mock.native_batches().created, 1);
}

#[tokio::test]
async fn cancel_reaches_the_providers_batch() {
    let (mock, gateway) = native_pair(std::time::Duration::from_secs(3600), "").await;
    let mut client = gateway.client();
    let items: Vec<_> = (0..3).map(|i| item(&format!("c{i}"), MODEL, "x")).collect();
    let created = create(&mut client, in_mode(job(items), pb::BatchMode::Native, 1)).await;
    submitted(&mut client, &created.id).await;
    client
        .cancel_batch(pb::CancelBatchRequest {
            batch_id: created.id.clone(),
        })
        .await
        .unwrap();
    let all = results(&mut client, &created.id, 0).await;
    assert_eq!(all.len(), 3);
    for r in &all {
        let e = error(r);
        assert_eq!(
            (e.code, e.reason.as_str()),
            (Code::Cancelled as i32, "CANCELLED")
        );
    }
    let done = get(&mut client, &created.id).await;
    assert_eq!(done.state, pb::BatchState::Cancelled as i32);
    assert_eq!(done.counts.unwrap().cancelled, 3);
    assert_eq!(mock.native_batches().cancelled, 1);
    assert_eq!(mock.stats().requests(), 0);
}
