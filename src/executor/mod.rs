//! The executor runs a [`Plan`]: it tries targets in order within the call's deadline, falls
//! back on retryable errors, records every attempt in the [`Route`], and for streams decides
//! the commit point (the first content chunk) after which the call is bound to one upstream.
//!
//! Dropping the future of a call (the caller cancelled) or reaching the deadline drops the
//! upstream request at once, which closes its HTTP connection.

mod stream;

use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use self::stream::{CallEvent, CallStream};
use crate::{
    error::GatewayError,
    health::{Admission, AttemptGuard, AttemptResult},
    models::Cost,
    providers::{ErrorClass, EventStream, ProviderError},
    routing::{Plan, Target},
    types::{
        AttemptKind, AttemptOutcome, AttemptRecord, ChatRequest, ChatResponse, Route, StreamEvent,
        Usage,
    },
};

/// Settings of the executor.
#[derive(Debug, Clone)]
pub struct ExecutorSettings {
    /// A stream that sends nothing for this long is broken.
    pub stream_idle_timeout: Duration,
}

/// Runs plans.
#[derive(Debug, Clone)]
pub struct Executor {
    settings: ExecutorSettings,
    /// Cancelled when the shutdown grace period is over: calls still running end with
    /// UNAVAILABLE.
    hard_stop: CancellationToken,
}

/// A successful unary call.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The provider's answer.
    pub response: ChatResponse,
    /// The configured provider that answered.
    pub provider: String,
    /// The cost, when the model has prices.
    pub cost: Option<Cost>,
    /// The route taken.
    pub route: Route,
}

/// The cost of `usage` on `target`, when both are known.
pub fn cost_of(target: &Target, usage: Option<&Usage>) -> Option<Cost> {
    let prices = target.info.as_ref()?.prices?;
    Some(prices.cost(usage?))
}

fn shutting_down() -> GatewayError {
    GatewayError::Unavailable {
        reason: "SHUTTING_DOWN",
        message: "the gateway is shutting down; retry on another instance".to_owned(),
        retry_after: None,
    }
}

/// Tracks attempts and the deciding error while a plan runs.
struct Attempts {
    started: Instant,
    route: Route,
    last_error: Option<ProviderError>,
    all_rate_limited: bool,
}

impl Attempts {
    fn new(plan: &Plan) -> Self {
        let mut attempts = Self {
            started: Instant::now(),
            route: Route {
                policy: plan.policy.as_deref().map(str::to_owned),
                attempts: Vec::with_capacity(plan.targets.len() + plan.skipped.len()),
            },
            last_error: None,
            all_rate_limited: true,
        };
        for skipped in &plan.skipped {
            attempts.skip(&skipped.target, skipped.reason);
        }
        attempts
    }

    /// Records a target that was not tried.
    fn skip(&mut self, target: &Target, reason: &'static str) {
        self.route.attempts.push(AttemptRecord {
            provider: target.provider.name().to_owned(),
            model: target.model.to_string(),
            kind: AttemptKind::Fallback,
            outcome: AttemptOutcome::Skipped(reason),
            start_offset: self.started.elapsed(),
            latency: Duration::ZERO,
            time_to_first_token: None,
        });
    }

    fn record(
        &mut self,
        target: &Target,
        kind: AttemptKind,
        outcome: AttemptOutcome,
        attempt_start: Instant,
        ttft: Option<Duration>,
    ) {
        self.route.attempts.push(AttemptRecord {
            provider: target.provider.name().to_owned(),
            model: target.model.to_string(),
            kind,
            outcome,
            start_offset: attempt_start.duration_since(self.started),
            latency: attempt_start.elapsed(),
            time_to_first_token: ttft,
        });
    }

    fn failed(
        &mut self,
        target: &Target,
        kind: AttemptKind,
        start: Instant,
        guard: AttemptGuard,
        err: ProviderError,
    ) {
        guard.finish(health_result(&err, start.elapsed()));
        tracing::info!(
            provider = target.provider.name(),
            model = &*target.model,
            attempt = kind.label(),
            error_class = err.class.label(),
            http_status = err.http_status,
            "upstream attempt failed"
        );
        self.record(
            target,
            kind,
            AttemptOutcome::Failed(err.class.reason()),
            start,
            None,
        );
        self.all_rate_limited &= err.class == ErrorClass::RateLimited;
        self.last_error = Some(err);
    }

    fn deadline_exceeded(
        mut self,
        target: &Target,
        kind: AttemptKind,
        start: Instant,
    ) -> GatewayError {
        self.record(
            target,
            kind,
            AttemptOutcome::Failed("DEADLINE_EXCEEDED"),
            start,
            None,
        );
        GatewayError::DeadlineExceeded { route: self.route }
    }

    fn exhausted(self) -> GatewayError {
        match self.last_error {
            Some(error) => GatewayError::Upstream {
                error,
                all_rate_limited: self.all_rate_limited,
                route: self.route,
            },
            None => GatewayError::Unavailable {
                reason: "NO_TARGET",
                message: "no upstream target is available for this model".to_owned(),
                retry_after: None,
            },
        }
    }
}

/// What an upstream error says about the target's health.
fn health_result(err: &ProviderError, latency: Duration) -> AttemptResult {
    match err.class {
        ErrorClass::RateLimited | ErrorClass::Overloaded => AttemptResult::RateLimited {
            rest: err.retry_after.unwrap_or(DEFAULT_REST),
        },
        ErrorClass::ServerError
        | ErrorClass::Timeout
        | ErrorClass::Connect
        | ErrorClass::StreamBroken
        | ErrorClass::InvalidResponse
        | ErrorClass::Authentication
        | ErrorClass::Permission => AttemptResult::Failure { latency },
        // The request's own fault: says nothing about the target.
        ErrorClass::InvalidRequest
        | ErrorClass::ContextLengthExceeded
        | ErrorClass::ContentFiltered
        | ErrorClass::ModelNotFound => AttemptResult::Neutral,
    }
}

/// The route's reason code for a target health did not admit.
fn skip_reason(admission: Admission) -> &'static str {
    match admission {
        Admission::CoolingDown(_) => "COOLING_DOWN",
        Admission::Allowed | Admission::Probe | Admission::CircuitOpen => "CIRCUIT_OPEN",
    }
}

/// How long a target rests after a rate limit or overload that named no Retry-After.
const DEFAULT_REST: Duration = Duration::from_secs(1);

fn attempt_kind(index: usize) -> AttemptKind {
    if index == 0 {
        AttemptKind::Primary
    } else {
        AttemptKind::Fallback
    }
}

impl Executor {
    /// An executor.
    pub fn new(settings: ExecutorSettings, hard_stop: CancellationToken) -> Self {
        Self {
            settings,
            hard_stop,
        }
    }

    /// Runs a unary call.
    pub async fn chat(
        &self,
        plan: &Plan,
        request: &ChatRequest,
        deadline: Instant,
    ) -> Result<Answer, GatewayError> {
        let mut attempts = Attempts::new(plan);
        let max = plan.execution.max_attempts as usize;
        for (index, target) in plan.targets.iter().take(max).enumerate() {
            let kind = attempt_kind(index);
            let start = Instant::now();
            let guard = match AttemptGuard::admit(&target.health, start) {
                Ok(guard) => guard,
                Err(admission) => {
                    attempts.skip(target, skip_reason(admission));
                    continue;
                }
            };
            let call = target.provider.chat(&target.model, request);
            let result = tokio::select! {
                biased;
                () = self.hard_stop.cancelled() => return Err(shutting_down()),
                r = tokio::time::timeout_at(deadline, call) => r,
            };
            match result {
                Err(_elapsed) => return Err(attempts.deadline_exceeded(target, kind, start)),
                Ok(Ok(response)) => {
                    guard.finish(AttemptResult::Success {
                        latency: start.elapsed(),
                        ttft: None,
                    });
                    attempts.record(target, kind, AttemptOutcome::Succeeded, start, None);
                    return Ok(Answer {
                        cost: cost_of(target, response.usage.as_ref()),
                        provider: target.provider.name().to_owned(),
                        response,
                        route: attempts.route,
                    });
                }
                Ok(Err(err)) if err.is_retryable() => {
                    attempts.failed(target, kind, start, guard, err);
                }
                Ok(Err(err)) => {
                    attempts.failed(target, kind, start, guard, err);
                    return Err(attempts.exhausted());
                }
            }
        }
        Err(attempts.exhausted())
    }

    /// Starts a streaming call. Resolves once one upstream stream produced its first content
    /// (the commit point); until then, failures fall back to the next target.
    pub async fn chat_stream(
        &self,
        plan: &Plan,
        request: &ChatRequest,
        deadline: Instant,
    ) -> Result<CallStream, GatewayError> {
        let mut attempts = Attempts::new(plan);
        let max = plan.execution.max_attempts as usize;
        for (index, target) in plan.targets.iter().take(max).enumerate() {
            let kind = attempt_kind(index);
            let start = Instant::now();
            let guard = match AttemptGuard::admit(&target.health, start) {
                Ok(guard) => guard,
                Err(admission) => {
                    attempts.skip(target, skip_reason(admission));
                    continue;
                }
            };
            let open = open_until_first_content(target, request, self.settings.stream_idle_timeout);
            let result = tokio::select! {
                biased;
                () = self.hard_stop.cancelled() => return Err(shutting_down()),
                r = tokio::time::timeout_at(deadline, open) => r,
            };
            match result {
                Err(_elapsed) => return Err(attempts.deadline_exceeded(target, kind, start)),
                Ok(Ok((upstream, buffered))) => {
                    let ttft = start.elapsed();
                    return Ok(CallStream::new(stream::Committed {
                        target: target.clone(),
                        guard: Some(guard),
                        kind,
                        upstream,
                        buffered,
                        call_started: attempts.started,
                        attempt_started: start,
                        time_to_first_token: ttft,
                        route: attempts.route,
                        deadline,
                        idle_timeout: self.settings.stream_idle_timeout,
                        hard_stop: self.hard_stop.clone(),
                    }));
                }
                Ok(Err(err)) if err.is_retryable() => {
                    attempts.failed(target, kind, start, guard, err);
                }
                Ok(Err(err)) => {
                    attempts.failed(target, kind, start, guard, err);
                    return Err(attempts.exhausted());
                }
            }
        }
        Err(attempts.exhausted())
    }
}

/// Opens a stream and reads it up to and including the first content event (or the finish
/// of an empty reply).
async fn open_until_first_content(
    target: &Target,
    request: &ChatRequest,
    idle_timeout: Duration,
) -> Result<(EventStream, Vec<StreamEvent>), ProviderError> {
    let mut upstream = target.provider.chat_stream(&target.model, request).await?;
    let mut buffered = Vec::new();
    loop {
        match tokio::time::timeout(idle_timeout, upstream.next()).await {
            Err(_) => {
                return Err(ProviderError::new(
                    ErrorClass::Timeout,
                    "the provider's stream sent nothing within the idle timeout",
                ));
            }
            Ok(None) => return Err(ProviderError::truncated()),
            Ok(Some(Err(err))) => return Err(err),
            Ok(Some(Ok(event))) => {
                let commit = event.is_content() || matches!(event, StreamEvent::Finish(_));
                buffered.push(event);
                if commit {
                    return Ok((upstream, buffered));
                }
            }
        }
    }
}
