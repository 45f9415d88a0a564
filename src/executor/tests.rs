//! Timing logic with scripted fake providers and paused time: deterministic, no sockets.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;

use super::*;
use crate::{
    health::{HealthRegistry, HealthSettings},
    models::ModelInfo,
    providers::{EventStream, Provider},
    routing::policy::ExecutionSettings,
    telemetry::{PolicyCounters, TargetMetrics},
    types::{ContentPart, FinishReason, Message, Role},
};

/// What a fake does on one call.
#[derive(Debug, Clone)]
enum Step {
    /// Answer after a delay.
    Reply(Duration),
    /// Fail after a delay.
    Fail(Duration, ErrorClass, Option<Duration>),
    /// Never answer.
    Hang,
}

/// A scripted provider: each call takes the next step (the last one repeats).
struct Fake {
    name: String,
    steps: Mutex<VecDeque<Step>>,
    calls: AtomicU32,
    dropped: Arc<AtomicU32>,
}

struct DropCounter(Arc<AtomicU32>, bool);
impl Drop for DropCounter {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Fake {
    fn new(name: &str, steps: &[Step]) -> Arc<Fake> {
        Arc::new(Fake {
            name: name.into(),
            steps: Mutex::new(steps.iter().cloned().collect()),
            calls: AtomicU32::new(0),
            dropped: Arc::new(AtomicU32::new(0)),
        })
    }

    fn next_step(&self) -> Step {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut steps = self.steps.lock().unwrap();
        if steps.len() > 1 {
            steps.pop_front().unwrap()
        } else {
            steps.front().cloned().unwrap_or(Step::Hang)
        }
    }

    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }

    fn dropped(&self) -> u32 {
        self.dropped.load(Ordering::SeqCst)
    }

    async fn perform(&self) -> Result<(), ProviderError> {
        let mut guard = DropCounter(self.dropped.clone(), false);
        let result = match self.next_step() {
            Step::Reply(d) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Step::Fail(d, class, retry_after) => {
                tokio::time::sleep(d).await;
                Err(ProviderError::new(class, "scripted failure").with_retry_after(retry_after))
            }
            Step::Hang => std::future::pending().await,
        };
        guard.1 = true;
        result
    }
}

#[async_trait]
impl Provider for Fake {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "fake"
    }

    async fn chat(
        &self,
        model: &str,
        _request: &ChatRequest,
    ) -> Result<ChatResponse, ProviderError> {
        self.perform().await?;
        Ok(ChatResponse {
            model: model.to_owned(),
            content: vec![ContentPart::Text(format!("from {}", self.name))],
            finish_reason: FinishReason::Stop,
            usage: None,
        })
    }

    async fn chat_stream(
        &self,
        _model: &str,
        _request: &ChatRequest,
    ) -> Result<EventStream, ProviderError> {
        self.perform().await?;
        let name = self.name.clone();
        let events = vec![
            Ok(StreamEvent::Text(format!("from {name}"))),
            Ok(StreamEvent::Finish(FinishReason::Stop)),
        ];
        Ok(Box::pin(futures_util::stream::iter(events)))
    }
}

struct Setup {
    health: Arc<HealthRegistry>,
    executor: Executor,
}

impl Setup {
    fn new(health: HealthSettings, settings: ExecutorSettings) -> Setup {
        Setup {
            health: Arc::new(HealthRegistry::new(health)),
            executor: Executor::new(settings, CancellationToken::new()),
        }
    }

    fn default() -> Setup {
        Setup::new(HealthSettings::default(), ExecutorSettings::default())
    }

    fn target(&self, fake: &Arc<Fake>) -> Target {
        self.target_with_window(fake, None)
    }

    fn target_with_window(&self, fake: &Arc<Fake>, window: Option<u32>) -> Target {
        Target {
            provider: fake.clone(),
            model: Arc::from("m"),
            info: window.map(|w| {
                Arc::new(ModelInfo {
                    provider_kind: "fake".into(),
                    model: "m".into(),
                    context_window: Some(w),
                    max_output_tokens: None,
                    prices: None,
                    supports_tools: true,
                    supports_images: false,
                })
            }),
            health: self.health.get(&fake.name, "m"),
            metrics: Arc::new(TargetMetrics::new(&fake.name, Arc::from("m"), "p")),
        }
    }
}

fn plan(targets: Vec<Target>, execution: ExecutionSettings) -> Plan {
    Plan {
        policy: Some(Arc::from("p")),
        targets,
        skipped: Vec::new(),
        execution: Arc::new(execution),
        counters: Arc::new(PolicyCounters::new("p")),
        revision: None,
        observer: None,
        arm: None,
    }
}

fn exec(max_attempts: u32, hedging: Hedging) -> ExecutionSettings {
    ExecutionSettings {
        max_attempts,
        hedging,
        backoff: (Duration::from_millis(100), Duration::from_secs(1), 2.0),
        ..ExecutionSettings::default()
    }
}

fn request() -> ChatRequest {
    ChatRequest {
        model: "p".into(),
        messages: vec![Message::text(Role::User, "hi")],
        ..ChatRequest::default()
    }
}

fn outcomes(route: &Route) -> Vec<(String, AttemptKind, AttemptOutcome)> {
    route
        .attempts
        .iter()
        .map(|a| (a.provider.clone(), a.kind, a.outcome.clone()))
        .collect()
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

#[tokio::test(start_paused = true)]
async fn primary_hangs_fallback_answers_within_the_deadline() {
    let s = Setup::default();
    let a = Fake::new("a", &[Step::Hang]);
    let b = Fake::new("b", &[Step::Reply(secs(0.2))]);
    let mut execution = exec(3, Hedging::Off);
    execution.attempt_timeout = Some(secs(1.0));
    let plan = plan(vec![s.target(&a), s.target(&b)], execution);
    let start = Instant::now();
    let answer = s
        .executor
        .chat(&plan, &request(), start + secs(5.0), None)
        .await
        .unwrap();
    assert_eq!(answer.provider, "b");
    assert_eq!(start.elapsed(), secs(1.2));
    assert_eq!(
        outcomes(&answer.route),
        vec![
            (
                "a".into(),
                AttemptKind::Primary,
                AttemptOutcome::Failed("TIMEOUT")
            ),
            ("b".into(), AttemptKind::Fallback, AttemptOutcome::Succeeded),
        ]
    );
    assert_eq!(a.dropped(), 1, "the hung attempt was dropped");
}

#[tokio::test(start_paused = true)]
async fn slow_primary_is_hedged_and_cancelled() {
    let s = Setup::default();
    let a = Fake::new("a", &[Step::Reply(secs(2.0))]);
    let b = Fake::new("b", &[Step::Reply(secs(0.05))]);
    let plan = plan(
        vec![s.target(&a), s.target(&b)],
        exec(
            3,
            Hedging::Fixed {
                delay: secs(0.1),
                max_extra: 1,
            },
        ),
    );
    let start = Instant::now();
    let answer = s
        .executor
        .chat(&plan, &request(), start + secs(10.0), None)
        .await
        .unwrap();
    assert_eq!(answer.provider, "b");
    assert_eq!(start.elapsed(), secs(0.15));
    assert_eq!(
        outcomes(&answer.route),
        vec![
            ("a".into(), AttemptKind::Primary, AttemptOutcome::Cancelled),
            ("b".into(), AttemptKind::Hedge, AttemptOutcome::Succeeded),
        ]
    );
    assert_eq!(a.dropped(), 1, "the losing attempt was dropped");
    assert_eq!(answer.route.attempts[1].start_offset, secs(0.1));
}

#[tokio::test(start_paused = true)]
async fn hedging_budget_exhausted_means_no_hedge() {
    let s = Setup::new(
        HealthSettings::default(),
        ExecutorSettings {
            hedge_budget_ratio: 0.0,
            hedge_budget_burst: 1.0,
            ..ExecutorSettings::default()
        },
    );
    let a = Fake::new("a", &[Step::Reply(secs(1.0))]);
    let b = Fake::new("b", &[Step::Reply(secs(0.05))]);
    let plan = plan(
        vec![s.target(&a), s.target(&b)],
        exec(
            3,
            Hedging::Fixed {
                delay: secs(0.1),
                max_extra: 1,
            },
        ),
    );
    let first = s
        .executor
        .chat(&plan, &request(), Instant::now() + secs(10.0), None)
        .await
        .unwrap();
    assert_eq!(first.provider, "b", "the one token buys one hedge");
    let second = s
        .executor
        .chat(&plan, &request(), Instant::now() + secs(10.0), None)
        .await
        .unwrap();
    assert_eq!(second.provider, "a", "no token left: no hedge");
    assert_eq!(second.route.attempts.len(), 1);
    assert_eq!(b.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn hedging_pauses_while_upstreams_fail() {
    let s = Setup::new(
        HealthSettings {
            failure_threshold: 1000,
            ..HealthSettings::default()
        },
        ExecutorSettings::default(),
    );
    let failing = Fake::new(
        "f",
        &[Step::Fail(secs(0.01), ErrorClass::ServerError, None)],
    );
    let fail_plan = plan(vec![s.target(&failing)], exec(1, Hedging::Off));
    for _ in 0..20 {
        let _ = s
            .executor
            .chat(&fail_plan, &request(), Instant::now() + secs(1.0), None)
            .await;
    }
    let a = Fake::new("a", &[Step::Reply(secs(1.0))]);
    let b = Fake::new("b", &[Step::Reply(secs(0.05))]);
    let plan = plan(
        vec![s.target(&a), s.target(&b)],
        exec(
            3,
            Hedging::Fixed {
                delay: secs(0.1),
                max_extra: 1,
            },
        ),
    );
    let answer = s
        .executor
        .chat(&plan, &request(), Instant::now() + secs(10.0), None)
        .await
        .unwrap();
    assert_eq!(answer.provider, "a");
    assert_eq!(b.calls(), 0, "no hedge while the failure rate is high");
}

#[tokio::test(start_paused = true)]
async fn both_fail_is_unavailable_with_the_trail() {
    let s = Setup::default();
    let a = Fake::new(
        "a",
        &[Step::Fail(secs(0.01), ErrorClass::ServerError, None)],
    );
    let b = Fake::new("b", &[Step::Fail(secs(0.01), ErrorClass::Overloaded, None)]);
    let plan = plan(vec![s.target(&a), s.target(&b)], exec(2, Hedging::Off));
    let err = s
        .executor
        .chat(&plan, &request(), Instant::now() + secs(5.0), None)
        .await
        .unwrap_err();
    let GatewayError::Upstream {
        error,
        route,
        all_rate_limited,
    } = err
    else {
        panic!("expected an upstream error, got {err:?}");
    };
    assert!(!all_rate_limited);
    assert_eq!(error.class, ErrorClass::Overloaded);
    assert_eq!(
        outcomes(&route),
        vec![
            (
                "a".into(),
                AttemptKind::Primary,
                AttemptOutcome::Failed("SERVER_ERROR")
            ),
            (
                "b".into(),
                AttemptKind::Fallback,
                AttemptOutcome::Failed("OVERLOADED")
            ),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_rests_the_target_and_others_carry_on() {
    let s = Setup::default();
    let a = Fake::new(
        "a",
        &[
            Step::Fail(secs(0.01), ErrorClass::RateLimited, Some(secs(10.0))),
            Step::Reply(secs(0.01)),
        ],
    );
    let b = Fake::new("b", &[Step::Reply(secs(0.01))]);
    let plan = plan(vec![s.target(&a), s.target(&b)], exec(3, Hedging::Off));
    let first = s
        .executor
        .chat(&plan, &request(), Instant::now() + secs(5.0), None)
        .await
        .unwrap();
    assert_eq!(first.provider, "b");
    let second = s
        .executor
        .chat(&plan, &request(), Instant::now() + secs(5.0), None)
        .await
        .unwrap();
    assert_eq!(second.provider, "b");
    assert_eq!(
        outcomes(&second.route)[0],
        (
            "a".into(),
            AttemptKind::Primary,
            AttemptOutcome::Skipped("COOLING_DOWN")
        )
    );
    assert_eq!(a.calls(), 1, "the resting target was not called");
    tokio::time::advance(secs(11.0)).await;
    let third = s
        .executor
        .chat(&plan, &request(), Instant::now() + secs(5.0), None)
        .await
        .unwrap();
    assert_eq!(third.provider, "a");
}

#[tokio::test(start_paused = true)]
async fn all_rate_limited_is_resource_exhausted() {
    let s = Setup::default();
    let a = Fake::new(
        "a",
        &[Step::Fail(
            secs(0.01),
            ErrorClass::RateLimited,
            Some(secs(3.0)),
        )],
    );
    let plan = plan(vec![s.target(&a)], exec(1, Hedging::Off));
    let err = s
        .executor
        .chat(&plan, &request(), Instant::now() + secs(5.0), None)
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        GatewayError::Upstream {
            all_rate_limited: true,
            ..
        }
    ));
    assert_eq!(err.into_status().code(), tonic::Code::ResourceExhausted);
}

#[tokio::test(start_paused = true)]
async fn breaker_opens_and_skips_the_target_then_probes() {
    let s = Setup::new(
        HealthSettings {
            failure_threshold: 2,
            open_duration: secs(30.0),
            half_open_probes: 1,
            ..HealthSettings::default()
        },
        ExecutorSettings::default(),
    );
    let a = Fake::new(
        "a",
        &[
            Step::Fail(secs(0.01), ErrorClass::ServerError, None),
            Step::Fail(secs(0.01), ErrorClass::ServerError, None),
            Step::Reply(secs(0.01)),
        ],
    );
    let b = Fake::new("b", &[Step::Reply(secs(0.01))]);
    let plan = plan(vec![s.target(&a), s.target(&b)], exec(2, Hedging::Off));
    for _ in 0..2 {
        let answer = s
            .executor
            .chat(&plan, &request(), Instant::now() + secs(5.0), None)
            .await
            .unwrap();
        assert_eq!(answer.provider, "b");
    }
    let answer = s
        .executor
        .chat(&plan, &request(), Instant::now() + secs(5.0), None)
        .await
        .unwrap();
    assert_eq!(
        outcomes(&answer.route)[0],
        (
            "a".into(),
            AttemptKind::Primary,
            AttemptOutcome::Skipped("CIRCUIT_OPEN")
        )
    );
    assert_eq!(a.calls(), 2);
    tokio::time::advance(secs(31.0)).await;
    let answer = s
        .executor
        .chat(&plan, &request(), Instant::now() + secs(5.0), None)
        .await
        .unwrap();
    assert_eq!(
        answer.provider, "a",
        "half-open: the probe goes through and succeeds"
    );
    let answer = s
        .executor
        .chat(&plan, &request(), Instant::now() + secs(5.0), None)
        .await
        .unwrap();
    assert_eq!(answer.provider, "a", "closed again");
}

#[tokio::test(start_paused = true)]
async fn fallback_that_cannot_finish_in_time_is_skipped() {
    let s = Setup::default();
    let a = Fake::new("a", &[Step::Fail(secs(0.1), ErrorClass::ServerError, None)]);
    let b = Fake::new("b", &[Step::Reply(secs(2.0))]);
    let b_target = s.target(&b);
    // b is known to take about 2 s.
    for _ in 0..5 {
        b_target.health.record(
            AttemptResult::Success {
                latency: secs(2.0),
                ttft: None,
            },
            Instant::now(),
        );
    }
    let plan = plan(vec![s.target(&a), b_target], exec(3, Hedging::Off));
    let start = Instant::now();
    let err = s
        .executor
        .chat(&plan, &request(), start + secs(1.0), None)
        .await
        .unwrap_err();
    assert!(start.elapsed() <= secs(1.0), "answered by the deadline");
    let GatewayError::DeadlineExceeded { route } = err else {
        panic!("expected DEADLINE_EXCEEDED, got {err:?}");
    };
    // a is retried (it is fast enough); b never is.
    assert_eq!(
        outcomes(&route)[..2],
        [
            (
                "a".into(),
                AttemptKind::Primary,
                AttemptOutcome::Failed("SERVER_ERROR")
            ),
            (
                "b".into(),
                AttemptKind::Fallback,
                AttemptOutcome::Skipped("DEADLINE")
            ),
        ]
    );
    assert_eq!(b.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn deadline_ends_the_call_on_time() {
    let s = Setup::default();
    let a = Fake::new("a", &[Step::Hang]);
    let plan = plan(vec![s.target(&a)], exec(3, Hedging::Off));
    let start = Instant::now();
    let err = s
        .executor
        .chat(&plan, &request(), start + secs(0.3), None)
        .await
        .unwrap_err();
    assert!(matches!(err, GatewayError::DeadlineExceeded { .. }));
    assert_eq!(start.elapsed(), secs(0.3));
    assert_eq!(a.dropped(), 1);
}

#[tokio::test(start_paused = true)]
async fn non_retryable_error_does_not_fall_back() {
    let s = Setup::default();
    let a = Fake::new(
        "a",
        &[Step::Fail(secs(0.01), ErrorClass::InvalidRequest, None)],
    );
    let b = Fake::new("b", &[Step::Reply(secs(0.01))]);
    let plan = plan(vec![s.target(&a), s.target(&b)], exec(3, Hedging::Off));
    let err = s
        .executor
        .chat(&plan, &request(), Instant::now() + secs(5.0), None)
        .await
        .unwrap_err();
    assert_eq!(err.into_status().code(), tonic::Code::InvalidArgument);
    assert_eq!(b.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn single_target_is_retried_with_backoff() {
    let s = Setup::default();
    let a = Fake::new(
        "a",
        &[
            Step::Fail(secs(0.01), ErrorClass::ServerError, None),
            Step::Fail(secs(0.01), ErrorClass::Connect, None),
            Step::Reply(secs(0.01)),
        ],
    );
    let plan = plan(vec![s.target(&a)], exec(3, Hedging::Off));
    let start = Instant::now();
    let answer = s
        .executor
        .chat(&plan, &request(), start + secs(5.0), None)
        .await
        .unwrap();
    assert_eq!(answer.provider, "a");
    assert_eq!(a.calls(), 3);
    let gap = answer.route.attempts[1].start_offset - answer.route.attempts[0].start_offset;
    // First retry backoff: 100 ms with jitter in [50, 100] ms, after a 10 ms attempt.
    assert!(gap >= secs(0.06) && gap <= secs(0.11), "gap {gap:?}");
}

#[tokio::test(start_paused = true)]
async fn context_length_falls_back_to_a_larger_window_when_allowed() {
    let s = Setup::default();
    let small = Fake::new(
        "small",
        &[Step::Fail(
            secs(0.01),
            ErrorClass::ContextLengthExceeded,
            None,
        )],
    );
    let same = Fake::new("same", &[Step::Reply(secs(0.01))]);
    let large = Fake::new("large", &[Step::Reply(secs(0.01))]);
    let mut execution = exec(3, Hedging::Off);
    execution.context_length_fallback = true;
    let plan = plan(
        vec![
            s.target_with_window(&small, Some(8_000)),
            s.target_with_window(&same, Some(8_000)),
            s.target_with_window(&large, Some(128_000)),
        ],
        execution,
    );
    let answer = s
        .executor
        .chat(&plan, &request(), Instant::now() + secs(5.0), None)
        .await
        .unwrap();
    assert_eq!(answer.provider, "large");
    assert_eq!(same.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn streaming_hedge_commits_to_the_first_stream_with_content() {
    let s = Setup::default();
    let a = Fake::new("a", &[Step::Reply(secs(3.0))]);
    let b = Fake::new("b", &[Step::Reply(secs(0.2))]);
    let plan = plan(
        vec![s.target(&a), s.target(&b)],
        exec(
            3,
            Hedging::Fixed {
                delay: secs(0.5),
                max_extra: 1,
            },
        ),
    );
    let start = Instant::now();
    let stream = s
        .executor
        .chat_stream(&plan, &request(), start + secs(10.0), None)
        .await
        .unwrap();
    assert_eq!(stream.provider(), "b");
    assert_eq!(start.elapsed(), secs(0.7));
    assert_eq!(a.dropped(), 1, "the slower stream was cancelled");
    let events: Vec<_> = stream.collect().await;
    let Some(Ok(CallEvent::Finish { route, .. })) = events.last() else {
        panic!("no finish: {events:?}");
    };
    assert_eq!(
        outcomes(route),
        vec![
            ("a".into(), AttemptKind::Primary, AttemptOutcome::Cancelled),
            ("b".into(), AttemptKind::Hedge, AttemptOutcome::Succeeded),
        ]
    );
    assert_eq!(route.attempts[1].time_to_first_token, Some(secs(0.2)));
}

#[tokio::test(start_paused = true)]
async fn adaptive_hedge_delay_uses_the_observed_percentile() {
    let s = Setup::default();
    let a = Fake::new("a", &[Step::Reply(secs(5.0))]);
    let b = Fake::new("b", &[Step::Reply(secs(0.01))]);
    let a_target = s.target(&a);
    for i in 1..=100 {
        a_target.health.record(
            AttemptResult::Success {
                latency: Duration::from_millis(i * 10),
                ttft: None,
            },
            Instant::now(),
        );
    }
    let plan = plan(
        vec![a_target, s.target(&b)],
        exec(
            3,
            Hedging::Percentile {
                percentile: 90.0,
                fallback_delay: secs(3.0),
                max_extra: 1,
            },
        ),
    );
    let answer = s
        .executor
        .chat(&plan, &request(), Instant::now() + secs(10.0), None)
        .await
        .unwrap();
    assert_eq!(answer.provider, "b");
    // p90 of 10..=1000 ms is about 900 ms.
    let hedge_start = answer.route.attempts[1].start_offset;
    assert!(
        hedge_start >= secs(0.88) && hedge_start <= secs(0.92),
        "{hedge_start:?}"
    );
}

/// Issue 13: with the default policy settings (no attempt timeout), a hanging primary leaves
/// the fallback its reserve, fails with TIMEOUT, and so opens its circuit.
#[tokio::test(start_paused = true)]
async fn hanging_primary_leaves_the_fallback_its_reserve_by_default() {
    let s = Setup::default();
    let a = Fake::new("a", &[Step::Hang]);
    let b = Fake::new("b", &[Step::Reply(secs(0.01))]);
    let two = plan(
        vec![s.target(&a), s.target(&b)],
        ExecutionSettings::default(),
    );
    let floor = ExecutorSettings::default().min_attempt_time;
    let cold = crate::routing::policy::DEFAULT_RESERVE;
    let failure_threshold = HealthSettings::default().failure_threshold;
    for call in 0..failure_threshold {
        let start = Instant::now();
        let answer = s
            .executor
            .chat(&two, &request(), start + secs(1.0), None)
            .await
            .unwrap();
        assert_eq!(answer.provider, "b", "call {call}");
        assert_eq!(
            outcomes(&answer.route),
            vec![
                (
                    "a".into(),
                    AttemptKind::Primary,
                    AttemptOutcome::Failed("TIMEOUT")
                ),
                ("b".into(), AttemptKind::Fallback, AttemptOutcome::Succeeded),
            ]
        );
        // b is cold: the default reserve is left to it.
        assert_eq!(answer.route.attempts[1].start_offset, secs(1.0) - cold);
    }
    assert_eq!(
        a.dropped(),
        failure_threshold,
        "every hung attempt was dropped"
    );
    // The cut-off attempts counted as failures: the circuit is open now.
    let answer = s
        .executor
        .chat(&two, &request(), Instant::now() + secs(1.0), None)
        .await
        .unwrap();
    assert_eq!(
        outcomes(&answer.route),
        vec![
            (
                "a".into(),
                AttemptKind::Primary,
                AttemptOutcome::Skipped("CIRCUIT_OPEN")
            ),
            ("b".into(), AttemptKind::Fallback, AttemptOutcome::Succeeded),
        ]
    );
    assert_eq!(a.calls(), failure_threshold);

    // Once b is known (fast), the primary keeps all but b's high percentile, at least the
    // minimum attempt time.
    let s = Setup::default();
    let a = Fake::new("a", &[Step::Hang]);
    let b_target = s.target(&b);
    for _ in 0..HEDGE_MIN_SAMPLES {
        b_target.health.record(
            AttemptResult::Success {
                latency: secs(0.01),
                ttft: None,
            },
            Instant::now(),
        );
    }
    let warm = plan(vec![s.target(&a), b_target], ExecutionSettings::default());
    let answer = s
        .executor
        .chat(&warm, &request(), Instant::now() + secs(1.0), None)
        .await
        .unwrap();
    assert_eq!(answer.provider, "b");
    assert_eq!(answer.route.attempts[1].start_offset, secs(1.0) - floor);
}

#[tokio::test(start_paused = true)]
async fn no_reserve_for_the_last_target_or_when_it_does_not_fit() {
    let s = Setup::default();
    // A single target keeps the whole budget.
    let a = Fake::new("a", &[Step::Hang]);
    let single = plan(vec![s.target(&a)], ExecutionSettings::default());
    let start = Instant::now();
    let err = s
        .executor
        .chat(&single, &request(), start + secs(1.0), None)
        .await
        .unwrap_err();
    assert!(matches!(err, GatewayError::DeadlineExceeded { .. }));
    assert_eq!(start.elapsed(), secs(1.0));
    // A budget too short for the reserve: the primary keeps it all (the fallback could not
    // have answered anyway).
    let b = Fake::new("b", &[Step::Reply(secs(0.01))]);
    let two = plan(
        vec![s.target(&a), s.target(&b)],
        ExecutionSettings::default(),
    );
    let start = Instant::now();
    let err = s
        .executor
        .chat(&two, &request(), start + secs(0.3), None)
        .await
        .unwrap_err();
    assert!(matches!(err, GatewayError::DeadlineExceeded { .. }));
    assert_eq!(start.elapsed(), secs(0.3));
    assert_eq!(b.calls(), 0);
    // Off: the primary keeps the whole budget.
    let execution = ExecutionSettings {
        reserve: None,
        ..ExecutionSettings::default()
    };
    let off = plan(vec![s.target(&a), s.target(&b)], execution);
    let start = Instant::now();
    let err = s
        .executor
        .chat(&off, &request(), start + secs(1.0), None)
        .await
        .unwrap_err();
    assert!(matches!(err, GatewayError::DeadlineExceeded { .. }));
    assert_eq!(start.elapsed(), secs(1.0));
}

#[tokio::test(start_paused = true)]
async fn attempt_kinds_tell_primary_fallback_retry_and_hedge() {
    let s = Setup::default();
    let a = Fake::new(
        "a",
        &[
            Step::Fail(secs(0.01), ErrorClass::ServerError, None),
            Step::Reply(secs(0.01)),
        ],
    );
    let b = Fake::new(
        "b",
        &[Step::Fail(secs(0.01), ErrorClass::ServerError, None)],
    );
    let plan = plan(vec![s.target(&a), s.target(&b)], exec(3, Hedging::Off));
    let answer = s
        .executor
        .chat(&plan, &request(), Instant::now() + secs(5.0), None)
        .await
        .unwrap();
    assert_eq!(
        outcomes(&answer.route),
        vec![
            (
                "a".into(),
                AttemptKind::Primary,
                AttemptOutcome::Failed("SERVER_ERROR")
            ),
            (
                "b".into(),
                AttemptKind::Fallback,
                AttemptOutcome::Failed("SERVER_ERROR")
            ),
            ("a".into(), AttemptKind::Retry, AttemptOutcome::Succeeded),
        ]
    );
}

/// Issue 13: hedged attempts that lose are cancelled; their latency is censored, not
/// dropped, so the percentile hedge delay converges to the primary's real percentile instead
/// of sliding down.
#[tokio::test(start_paused = true)]
async fn percentile_hedge_delay_converges_despite_cancelled_attempts() {
    let s = Setup::new(
        // Samples leave the window by count only (the run spans several paused minutes).
        HealthSettings {
            window_age: secs(3600.0),
            latency_window_size: 256,
            ..HealthSettings::default()
        },
        ExecutorSettings {
            hedge_budget_ratio: 1.0,
            ..ExecutorSettings::default()
        },
    );
    // a takes 15, 30, ..., 960 ms in turn (64 values, so that the 256-sample window always
    // holds whole cycles): its real 90th percentile is 870 ms (58 of 64 values are at most
    // that).
    let steps: Vec<Step> = (0..800)
        .map(|i| Step::Reply(Duration::from_millis((i % 64 + 1) * 15)))
        .collect();
    let a = Fake::new("a", &steps);
    let b = Fake::new("b", &[Step::Reply(secs(0.02))]);
    let a_target = s.target(&a);
    let plan = plan(
        vec![a_target.clone(), s.target(&b)],
        exec(
            2,
            Hedging::Percentile {
                percentile: 90.0,
                fallback_delay: secs(0.1),
                max_extra: 1,
            },
        ),
    );
    let call = || async {
        s.executor
            .chat(&plan, &request(), Instant::now() + secs(10.0), None)
            .await
            .unwrap()
    };
    for _ in 0..512 {
        call().await;
    }
    let p90 = a_target.health.latency_percentile(90.0, 1).unwrap();
    assert!(
        p90 >= secs(0.85) && p90 <= secs(0.89),
        "estimated p90 {p90:?}, real 870 ms"
    );
    // In steady state only the calls slower than the estimate are hedged: 5 or 6 in 64 (the
    // estimate, 884.7 ms, is due at the 885 ms timer tick, when the 885 ms attempt answers).
    let before = b.calls();
    for _ in 0..256 {
        let answer = call().await;
        if let Some(hedge) = answer.route.attempts.get(1) {
            assert!(hedge.start_offset >= secs(0.85), "{:?}", hedge.start_offset);
        }
    }
    let hedged = b.calls() - before;
    assert!((20..=24).contains(&hedged), "{hedged} hedges in 256 calls");
}
