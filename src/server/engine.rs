//! The call path every surface shares (the gRPC handlers in [`super::gateway`] and the
//! OpenAI- and Anthropic-compatible HTTP front in [`super::http`]), over domain types only.
//!
//! Order of one call, written once:
//! 1. the meter starts (in-flight gauge; the ledger record is written however the call ends);
//! 2. authentication: the presented gateway key, or none where none is required;
//! 3. the surface's request is converted and validated (only once the caller is known);
//! 4. the key's scope, forced tags, budget fallback and limits (rate, tokens, streams, budget);
//! 5. routing to a plan; 6. the executor (fallback, hedging, deadline, commit point);
//! 7. the meter and ledger record the outcome, labelled with the surface's `rpc` name.

mod embed;

use futures_util::{Stream, StreamExt};
use tokio::time::Instant;
use tracing::Instrument;

use super::{
    access::{Access, now_ms},
    deadline::CallLimits,
    meter::{CallMeter, MeterConfig, Outcome},
};
use crate::{
    auth::Caller,
    error::GatewayError,
    executor::{Answer, CallEvent, Executor},
    routing::{Plan, Router, RoutingTable, estimate_tokens},
    telemetry::{TraceContext, continue_traceparent},
    types::ChatRequest,
};
use std::sync::Arc;

/// The shared engine: access, routing, execution and accounting.
#[derive(Clone)]
pub struct Engine {
    access: Arc<Access>,
    router: Arc<Router>,
    executor: Executor,
    limits: CallLimits,
    meter: MeterConfig,
}

/// What a surface knows about one call before it reads the request.
pub struct Call<'a> {
    /// The surface's name for the call (the `rpc` metric and ledger label).
    pub rpc: &'static str,
    /// The request id.
    pub request_id: String,
    /// When the call's budget runs out.
    pub deadline: Instant,
    /// The caller's trace context, continued upstream.
    pub trace: Option<TraceContext>,
    /// Who is calling.
    pub credential: Credential<'a>,
}

/// The caller of a call, as the surface knows it.
#[derive(Debug)]
pub enum Credential<'a> {
    /// Verified already (the gRPC surface: [`super::authz::AuthzLayer`]); `None` when no key
    /// was sent and none is required.
    Verified(Option<Caller>),
    /// A presented gateway key secret (or none), verified here.
    Bearer(Option<&'a str>),
}

/// The events of a committed stream; the meter settles when the stream ends or is dropped.
pub type Events = std::pin::Pin<Box<dyn Stream<Item = Result<CallEvent, GatewayError>> + Send>>;

impl Engine {
    /// An engine routing with `router`, running calls on `executor`, accounting with `meter`.
    pub fn new(
        router: Arc<Router>,
        executor: Executor,
        access: Arc<Access>,
        limits: CallLimits,
        meter: MeterConfig,
    ) -> Self {
        Self {
            access,
            router,
            executor,
            limits,
            meter,
        }
    }

    /// Call budget settings.
    pub fn limits(&self) -> &CallLimits {
        &self.limits
    }

    /// Access control (for surfaces with their own listings).
    pub fn access(&self) -> &Access {
        &self.access
    }

    /// The routing table now.
    pub fn table(&self) -> Arc<RoutingTable> {
        self.router.load()
    }

    /// Runs a unary call. `request` converts and validates the surface's request; it runs
    /// after authentication.
    pub async fn chat(
        &self,
        call: Call<'_>,
        request: impl FnOnce() -> Result<ChatRequest, GatewayError> + Send,
    ) -> Result<Answer, GatewayError> {
        let mut meter = CallMeter::start(&self.meter, call.rpc, call.request_id.clone());
        let span = tracing::info_span!("call", rpc = call.rpc, request_id = %call.request_id);
        async move {
            let result = async {
                let (req, plan) = self.prepare(call.credential, request, &mut meter, false)?;
                self.executor
                    .chat(&plan, &req, call.deadline, call.trace.as_ref())
                    .await
            }
            .await;
            match result {
                Ok(answer) => {
                    tracing::debug!(provider = %answer.provider, model = %answer.response.model, "call succeeded");
                    meter.set_target(answer.metrics.clone());
                    meter.finish(Outcome {
                        code: tonic::Code::Ok,
                        error_class: "",
                        route: Some(&answer.route),
                        usage: answer.response.usage,
                        cost: answer.cost,
                        ttft: None,
                    });
                    Ok(answer)
                }
                Err(err) => Err(fail(&mut meter, err)),
            }
        }
        .instrument(span)
        .await
    }

    /// Starts a streaming call: resolves at the commit point (the first content), or with
    /// the error that ended the call before it.
    pub async fn chat_stream(
        &self,
        call: Call<'_>,
        request: impl FnOnce() -> Result<ChatRequest, GatewayError> + Send,
    ) -> Result<Events, GatewayError> {
        let mut meter = CallMeter::start(&self.meter, call.rpc, call.request_id.clone());
        let started = Instant::now();
        let span = tracing::info_span!("call", rpc = call.rpc, request_id = %call.request_id);
        let committed = async {
            let (req, plan) = self.prepare(call.credential, request, &mut meter, true)?;
            self.executor
                .chat_stream(&plan, &req, call.deadline, call.trace.as_ref())
                .await
        }
        .instrument(span.clone())
        .await;
        let committed = match committed {
            Ok(committed) => committed,
            Err(err) => {
                let _entered = span.enter();
                return Err(fail(&mut meter, err));
            }
        };
        let ttft = started.elapsed();
        meter.set_target(Some(committed.target_metrics().clone()));
        meter.stream_opened();
        Ok(Box::pin(committed.map(move |event| match event {
            Ok(event) => {
                if let CallEvent::Finish {
                    usage, cost, route, ..
                } = &event
                {
                    meter.finish(Outcome {
                        code: tonic::Code::Ok,
                        error_class: "",
                        route: Some(route),
                        usage: *usage,
                        cost: *cost,
                        ttft: Some(ttft),
                    });
                }
                Ok(event)
            }
            Err(err) => {
                let _entered = span.enter();
                Err(fail(&mut meter, err))
            }
        })))
    }

    /// Authenticates, applies the key's scope, forced tags, limits and budget, and plans.
    fn prepare(
        &self,
        credential: Credential<'_>,
        request: impl FnOnce() -> Result<ChatRequest, GatewayError> + Send,
        meter: &mut CallMeter,
        stream: bool,
    ) -> Result<(ChatRequest, Plan), GatewayError> {
        let caller = match credential {
            Credential::Verified(caller) => caller,
            Credential::Bearer(secret) => self.access.chat_caller_secret(secret)?,
        };
        let mut req = request()?;
        let table = self.router.current();
        let mut permit = None;
        // Routed to the budget's fallback policy: the budget no longer refuses calls.
        let mut budget_fallback = false;
        if let Some(caller) = &caller {
            caller.force_tags(&mut req.tags);
            meter.set_key(caller.name());
            caller.may_call(&req.model, table.is_policy(&req.model))?;
            let subjects = self.access.subjects(caller);
            let fallback = &caller.key.spec.budget_fallback_policy;
            let now = now_ms();
            if !fallback.is_empty()
                && subjects
                    .iter()
                    .any(|s| self.access.limits.budget_spent(s, now))
            {
                tracing::info!(key = caller.name(), policy = %fallback, "budget spent: routing to the fallback policy");
                req.model.clone_from(fallback);
                budget_fallback = true;
            }
            let (input, output) = estimate_tokens(&req);
            permit = Some(
                self.access
                    .limits
                    .admit(subjects, input + output, stream)
                    .inspect_err(count_limited)?,
            );
        }
        meter.set_tags(&req.tags);
        let mut plan = table.plan(&req)?;
        if let Some(mut permit) = permit {
            let (input, output) = estimate_tokens(&req);
            let estimate = plan
                .targets
                .first()
                .and_then(|t| t.info.as_ref())
                .and_then(|i| i.prices)
                .map_or(0.0, |p| {
                    (input as f64 * p.input + output as f64 * p.output) / 1e6
                });
            if !budget_fallback && let Err(err) = permit.reserve(estimate, now_ms()) {
                // This call would pass the budget: the fallback policy, when there is one.
                let fallback = caller
                    .as_ref()
                    .map(|c| c.key.spec.budget_fallback_policy.clone())
                    .unwrap_or_default();
                if fallback.is_empty() {
                    count_limited(&err);
                    return Err(err);
                }
                req.model = fallback;
                plan = table.plan(&req)?;
            }
            meter.set_permit(permit);
        }
        Ok((req, plan))
    }
}

/// The caller's W3C trace context (`traceparent`, `tracestate`), continued for the upstream
/// requests of this call.
pub fn trace_context(traceparent: Option<&str>, tracestate: Option<&str>) -> Option<TraceContext> {
    Some(TraceContext {
        traceparent: continue_traceparent(traceparent?)?,
        tracestate: tracestate.map(str::to_owned),
    })
}

fn count_limited(err: &GatewayError) {
    if let GatewayError::ResourceExhausted { reason, .. } = err {
        metrics::counter!(crate::telemetry::names::LIMITED, "reason" => *reason).increment(1);
    }
}

/// Ends a failed call: log and account.
fn fail(meter: &mut CallMeter, err: GatewayError) -> GatewayError {
    err.log("call failed");
    meter.finish(Outcome::failed(&err));
    err
}
