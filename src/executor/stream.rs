//! The committed stream of a `ChatStream` call.
//!
//! After the commit point the call is bound to one upstream stream. [`CallStream`] forwards
//! its content, and guards its integrity: it ends with exactly one [`CallEvent::Finish`]
//! (carrying usage, cost and route) when the upstream finished properly, and with an error
//! otherwise: the upstream broke, stalled past the idle timeout, ended without its terminal
//! event, the deadline passed, or the gateway's shutdown grace ran out. It never just ends.
//! Dropping it drops the upstream response, which closes the upstream connection.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use futures_util::{FutureExt, Stream};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::{cost_of, shutting_down};
use crate::{
    error::GatewayError,
    health::{AttemptGuard, AttemptResult},
    models::Cost,
    providers::{ErrorClass, EventStream, ProviderError},
    routing::Target,
    telemetry::TargetMetrics,
    types::{
        AttemptKind, AttemptOutcome, AttemptRecord, FinishReason, Route, StreamEvent,
        ToolCallDelta, Usage,
    },
};

/// One event of a streaming call, provider-neutral.
#[derive(Debug, Clone, PartialEq)]
pub enum CallEvent {
    /// The call is committed to this provider and model.
    Start {
        /// Configured provider name.
        provider: String,
        /// Model at the provider.
        model: String,
    },
    /// More reply text.
    Text(String),
    /// More reasoning text.
    Reasoning(String),
    /// A piece of a tool call.
    ToolCall(ToolCallDelta),
    /// The reply is complete.
    Finish {
        /// Why generation stopped.
        reason: FinishReason,
        /// Usage, when the provider reported it.
        usage: Option<Usage>,
        /// Cost, when usage and prices are known.
        cost: Option<Cost>,
        /// The route taken.
        route: Route,
        /// The external guardrail checks of the call (set by the server's guard stage).
        guardrails: crate::types::GuardVerdicts,
    },
}

/// What the executor hands over at the commit point.
pub(super) struct Committed {
    pub target: Target,
    pub guard: Option<AttemptGuard>,
    pub kind: AttemptKind,
    pub upstream: EventStream,
    pub buffered: Vec<StreamEvent>,
    pub call_started: Instant,
    pub attempt_started: Instant,
    /// Index of this attempt's record in `route.attempts`.
    pub slot: usize,
    pub time_to_first_token: Duration,
    pub route: Route,
    pub deadline: Instant,
    pub idle_timeout: Duration,
    pub hard_stop: CancellationToken,
}

/// The committed stream; see the module docs.
pub struct CallStream {
    c: Committed,
    buffered: VecDeque<StreamEvent>,
    started: bool,
    done: bool,
    usage: Option<Usage>,
    /// One timer for both the deadline and the idle timeout, armed at the earlier of the
    /// two. An event does not re-arm it (that would be a timer-wheel update per chunk): it
    /// only notes its time, and the timer, when it fires, re-arms itself if an event came.
    timer: Pin<Box<Sleep>>,
    last_event: Instant,
    /// Cancelled with the shutdown token: a child of it per call, so that polling it locks
    /// this call's own waiter list, not the one every stream shares.
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl CallStream {
    pub(super) fn new(mut c: Committed) -> Self {
        let now = Instant::now();
        let timer = Box::pin(tokio::time::sleep_until(
            c.deadline.min(now + c.idle_timeout),
        ));
        let stop = Box::pin(c.hard_stop.child_token().cancelled_owned());
        let buffered = VecDeque::from(std::mem::take(&mut c.buffered));
        Self {
            c,
            buffered,
            started: false,
            done: false,
            usage: None,
            timer,
            last_event: now,
            stop,
        }
    }

    fn deadline_passed(&mut self) -> Poll<Option<Result<CallEvent, GatewayError>>> {
        let route = self.record(AttemptOutcome::Failed("DEADLINE_EXCEEDED"));
        self.fail(GatewayError::DeadlineExceeded { route })
    }

    /// The provider the call is committed to.
    pub fn provider(&self) -> &str {
        self.c.target.provider.name()
    }

    /// The model the call is committed to.
    pub fn model(&self) -> &str {
        &self.c.target.model
    }

    /// The metric handles of the target the call is committed to.
    pub fn target_metrics(&self) -> &Arc<TargetMetrics> {
        &self.c.target.metrics
    }

    fn record(&mut self, outcome: AttemptOutcome) -> Route {
        let latency = self.c.attempt_started.elapsed();
        let health = match &outcome {
            AttemptOutcome::Succeeded => AttemptResult::Success {
                latency,
                ttft: Some(self.c.time_to_first_token),
            },
            AttemptOutcome::Failed("DEADLINE_EXCEEDED") => AttemptResult::Neutral,
            AttemptOutcome::Failed(r) if *r == ErrorClass::LocalResource.reason() => {
                AttemptResult::Neutral
            }
            AttemptOutcome::Failed(_) => AttemptResult::Failure { latency },
            AttemptOutcome::Cancelled | AttemptOutcome::Skipped(_) => AttemptResult::Neutral,
        };
        if let Some(guard) = self.c.guard.take() {
            guard.finish(health);
        }
        let mut route = std::mem::take(&mut self.c.route);
        let record = AttemptRecord {
            provider: self.c.target.provider.name().to_owned(),
            model: self.c.target.model.to_string(),
            kind: self.c.kind,
            outcome,
            start_offset: self.c.attempt_started.duration_since(self.c.call_started),
            latency,
            time_to_first_token: Some(self.c.time_to_first_token),
        };
        super::observe_attempt(&record, &self.c.target.metrics);
        match route.attempts.get_mut(self.c.slot) {
            Some(slot) => *slot = record,
            None => route.attempts.push(record),
        }
        route
    }

    fn fail(&mut self, error: GatewayError) -> Poll<Option<Result<CallEvent, GatewayError>>> {
        self.done = true;
        // Replace the upstream so its connection closes now, not when the call is dropped.
        self.c.upstream = Box::pin(futures_util::stream::empty());
        Poll::Ready(Some(Err(error)))
    }

    fn upstream_failed(
        &mut self,
        err: ProviderError,
    ) -> Poll<Option<Result<CallEvent, GatewayError>>> {
        tracing::warn!(
            provider = self.c.target.provider.name(),
            model = &*self.c.target.model,
            error_class = err.class.label(),
            "stream failed after commit"
        );
        let route = self.record(AttemptOutcome::Failed(err.class.reason()));
        self.fail(GatewayError::Upstream {
            all_rate_limited: err.class == ErrorClass::RateLimited,
            error: err,
            route,
        })
    }

    /// Handles one upstream event; `Some` when it yields a call event.
    fn on_event(&mut self, event: StreamEvent) -> Option<CallEvent> {
        match event {
            StreamEvent::Usage(usage) => {
                self.usage = Some(usage);
                None
            }
            StreamEvent::Finish(reason) => {
                self.done = true;
                let route = self.record(AttemptOutcome::Succeeded);
                Some(CallEvent::Finish {
                    reason,
                    usage: self.usage,
                    cost: cost_of(&self.c.target, self.usage.as_ref()),
                    route,
                    guardrails: Default::default(),
                })
            }
            StreamEvent::Text(t) => Some(CallEvent::Text(t)),
            StreamEvent::Reasoning(t) => Some(CallEvent::Reasoning(t)),
            StreamEvent::ToolCall(d) => Some(CallEvent::ToolCall(d)),
        }
    }
}

impl Stream for CallStream {
    type Item = Result<CallEvent, GatewayError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if !this.started {
            this.started = true;
            return Poll::Ready(Some(Ok(CallEvent::Start {
                provider: this.c.target.provider.name().to_owned(),
                model: this.c.target.model.to_string(),
            })));
        }
        while let Some(event) = this.buffered.pop_front() {
            if let Some(out) = this.on_event(event) {
                return Poll::Ready(Some(Ok(out)));
            }
        }
        if this.stop.poll_unpin(cx).is_ready() {
            return this.fail(shutting_down());
        }
        loop {
            match this.c.upstream.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(event))) => {
                    let now = Instant::now();
                    if now >= this.c.deadline {
                        return this.deadline_passed();
                    }
                    this.last_event = now;
                    if let Some(out) = this.on_event(event) {
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(Some(Err(err))) => return this.upstream_failed(err),
                Poll::Ready(None) => return this.upstream_failed(ProviderError::truncated()),
                Poll::Pending => loop {
                    ready!(this.timer.as_mut().poll(cx));
                    let now = Instant::now();
                    if now >= this.c.deadline {
                        return this.deadline_passed();
                    }
                    let idle_end = this.last_event + this.c.idle_timeout;
                    if now >= idle_end {
                        return this.upstream_failed(ProviderError::new(
                            ErrorClass::Timeout,
                            "the provider's stream stalled past the idle timeout",
                        ));
                    }
                    // Fired early: an event came since it was armed.
                    this.timer.as_mut().reset(idle_end.min(this.c.deadline));
                },
            }
        }
    }
}
