//! The `llmgateway.v1.LlmGateway` handlers. They are thin: convert and validate the request,
//! ask routing for a plan, let the executor run it, convert the answer. Every call runs in a
//! span carrying its request id.

use std::{pin::Pin, sync::Arc};

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{
    access::{Access, now_ms},
    authz, convert,
    deadline::{CallLimits, call_deadline},
    meter::{CallMeter, MeterConfig, Outcome},
    request_id::RequestId,
};
use crate::{
    error::GatewayError,
    executor::{CallEvent, Executor},
    pb::{self, llm_gateway_server::LlmGateway},
    routing::{Plan, Router, estimate_tokens},
    telemetry::{TraceContext, continue_traceparent},
};

/// The gateway service.
#[derive(Clone)]
pub struct GatewayService {
    access: Arc<Access>,
    router: Arc<Router>,
    executor: Executor,
    limits: CallLimits,
    meter: MeterConfig,
}

impl GatewayService {
    /// A service routing with `router`, running calls on `executor`, accounting with `meter`.
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
}

impl GatewayService {
    /// Applies the verified key's model patterns, forced tags, limits and budget, and plans.
    fn prepare(
        &self,
        extensions: &tonic::Extensions,
        request: pb::ChatRequest,
        meter: &mut CallMeter,
        stream: bool,
    ) -> Result<(crate::types::ChatRequest, Plan), GatewayError> {
        let caller = authz::principal(extensions)?.key().cloned();
        let mut req = convert::chat_request(request)?;
        let table = self.router.load();
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

fn count_limited(err: &GatewayError) {
    if let GatewayError::ResourceExhausted { reason, .. } = err {
        metrics::counter!(crate::telemetry::names::LIMITED, "reason" => *reason).increment(1);
    }
}

fn request_id<T>(request: &Request<T>) -> String {
    request.extensions().get::<RequestId>().map_or_else(
        || {
            super::request_id::generate()
                .to_str()
                .unwrap_or("")
                .to_owned()
        },
        |id| id.as_str().to_owned(),
    )
}

/// The caller's W3C trace context, continued for the upstream requests of this call.
fn trace_context<T>(request: &Request<T>) -> Option<TraceContext> {
    let traceparent = request.metadata().get("traceparent")?.to_str().ok()?;
    Some(TraceContext {
        traceparent: continue_traceparent(traceparent)?,
        tracestate: request
            .metadata()
            .get("tracestate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    })
}

/// Ends a failed call: log, account, convert.
fn fail(meter: &mut CallMeter, err: GatewayError) -> Status {
    err.log("call failed");
    meter.finish(Outcome::failed(&err));
    err.into_status()
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ChatStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl LlmGateway for GatewayService {
    async fn chat(
        &self,
        request: Request<pb::ChatRequest>,
    ) -> Result<Response<pb::ChatResponse>, Status> {
        let id = request_id(&request);
        let deadline = call_deadline(request.metadata(), &self.limits);
        let trace = trace_context(&request);
        let mut meter = CallMeter::start(&self.meter, "Chat", id.clone());
        let span = tracing::info_span!("call", rpc = "Chat", request_id = %id);
        async move {
            let result = async {
                let (_, extensions, message) = request.into_parts();
                let (req, plan) = self.prepare(&extensions, message, &mut meter, false)?;
                self.executor.chat(&plan, &req, deadline, trace.as_ref()).await
            }
            .await;
            match result {
                Ok(answer) => {
                    tracing::debug!(provider = %answer.provider, model = %answer.response.model, "call succeeded");
                    meter.finish(Outcome {
                        code: tonic::Code::Ok,
                        error_class: "",
                        route: Some(&answer.route),
                        usage: answer.response.usage,
                        cost: answer.cost,
                        ttft: None,
                    });
                    Ok(Response::new(convert::chat_response(id, answer)))
                }
                Err(err) => Err(fail(&mut meter, err)),
            }
        }
        .instrument(span)
        .await
    }

    type ChatStreamStream = EventStream;

    async fn chat_stream(
        &self,
        request: Request<pb::ChatRequest>,
    ) -> Result<Response<Self::ChatStreamStream>, Status> {
        let id = request_id(&request);
        let deadline = call_deadline(request.metadata(), &self.limits);
        let trace = trace_context(&request);
        let mut meter = CallMeter::start(&self.meter, "ChatStream", id.clone());
        let started = tokio::time::Instant::now();
        let span = tracing::info_span!("call", rpc = "ChatStream", request_id = %id);
        let committed = async {
            let (_, extensions, message) = request.into_parts();
            let (req, plan) = self.prepare(&extensions, message, &mut meter, true)?;
            self.executor
                .chat_stream(&plan, &req, deadline, trace.as_ref())
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
        meter.stream_opened();
        let events = committed.map(move |event| match event {
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
                Ok(convert::stream_event(&id, event))
            }
            Err(err) => {
                let _entered = span.enter();
                Err(fail(&mut meter, err))
            }
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let filter = request.into_inner().provider;
        let table = self.router.load();
        let mut models: Vec<pb::ModelInfo> = table
            .models()
            .into_iter()
            .filter(|(provider, _, _)| filter.is_empty() || *provider == filter)
            .map(|(provider, model, info)| {
                let prices = info.as_ref().and_then(|i| i.prices);
                pb::ModelInfo {
                    id: format!("{provider}/{model}"),
                    kind: pb::ModelKind::Model as i32,
                    context_window: info.as_ref().and_then(|i| i.context_window),
                    max_output_tokens: info.as_ref().and_then(|i| i.max_output_tokens),
                    input_price_per_mtok: prices.map(|p| p.input),
                    output_price_per_mtok: prices.map(|p| p.output),
                    cached_input_price_per_mtok: prices.and_then(|p| p.cached_input),
                    supports_tools: info.as_ref().is_some_and(|i| i.supports_tools),
                    supports_images: info.as_ref().is_some_and(|i| i.supports_images),
                    description: String::new(),
                    provider,
                    model,
                }
            })
            .collect();
        if filter.is_empty() {
            models.extend(table.policies().values().map(|p| pb::ModelInfo {
                id: p.spec.name.clone(),
                kind: pb::ModelKind::Policy as i32,
                description: p.spec.description.clone(),
                ..pb::ModelInfo::default()
            }));
            models.sort_by(|a, b| a.id.cmp(&b.id));
        }
        Ok(Response::new(pb::ListModelsResponse { models }))
    }
}
