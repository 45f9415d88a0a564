//! The call path every surface shares (the gRPC handlers in [`super::gateway`] and the
//! OpenAI- and Anthropic-compatible HTTP front in [`super::http`]), over domain types only.
//!
//! Order of one call, written once:
//! 1. the meter starts (in-flight gauge; the ledger record is written however the call ends);
//! 2. authentication: the presented gateway key, or none where none is required;
//! 3. the surface's request is converted and validated (only once the caller is known);
//! 4. the key's scope, forced tags, budget fallback and limits (rate, tokens, streams, budget);
//! 5. routing to a plan; then guardrails on the request (the key's forced profile, then
//!    the policy's: [`super::guarding`]), so that nothing unguarded is looked up, stored or
//!    sent;
//! 6. the response cache ([`super::cache_stage`]): a live cached reply in the caller's
//!    namespace ends the call here (a unary answer, or a replayed stream), with no upstream
//!    attempt and zero cost; the call still counted against the request rate limit, its
//!    token and budget reservations are given back; a semantic lookup's embedding call
//!    (a ledger record of its own) is charged to the call's budgets when the call ends;
//! 7. the executor (fallback, hedging, deadline, commit point); a complete answer that
//!    finished normally is stored in the cache (a stream: when its finish arrives, never a
//!    partial or failed one);
//! 8. guardrails on the reply (the unary answer, or the stream as it goes; cached replies
//!    too, as stored before this step: tokenized values are restored per call);
//! 9. the meter and ledger record the outcome, labelled with the surface's `rpc` name.

pub(crate) mod embed;

use futures_util::{Stream, StreamExt};
use tokio::time::Instant;
use tracing::Instrument;

use super::{
    access::{Access, now_ms},
    cache_stage,
    deadline::CallLimits,
    guarding::{GuardStage, guard_stream},
    meter::{CallMeter, MeterConfig, Outcome},
};
use crate::{
    auth::Caller,
    cache::{CacheControl, ResponseCache},
    error::GatewayError,
    executor::{Answer, CallEvent, Executor},
    experiments::shadow::{Mirror, Primary, ShadowPool},
    guard::Guarding,
    limits::{Ask, BudgetCheck},
    routing::{Plan, Router, RoutingTable, estimate_tokens},
    telemetry::{TraceContext, continue_traceparent},
    types::{CacheOutcome, ChatRequest, ToolCallDelta, Usage},
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
    cache: Option<Arc<ResponseCache>>,
    guard: GuardStage,
    shadows: Option<ShadowPool>,
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
    /// The caller's `cache-control` directives.
    pub cache_control: CacheControl,
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
            cache: None,
            guard: GuardStage::default(),
            shadows: None,
        }
    }

    /// Mirrors sampled calls of policies with a `shadow` block on `pool`.
    pub fn with_shadows(mut self, pool: ShadowPool) -> Self {
        self.shadows = Some(pool);
        self
    }

    /// Whether to mirror this call (see [`ShadowPool::sample`]).
    fn mirror(&self, plan: &Plan, req: &ChatRequest) -> Option<Mirror> {
        let pool = self.shadows.as_ref()?;
        pool.sample(&self.router.load(), plan, req)
    }

    /// The engine with these guardrail profiles (`[guardrails.*]`); their external checks
    /// use `client`.
    pub fn with_guardrails(
        mut self,
        settings: Arc<crate::guard::GuardSettings>,
        client: reqwest::Client,
    ) -> Self {
        self.guard = GuardStage::new(settings, client);
        self
    }

    /// Serves and stores replies with `cache`.
    pub fn with_cache(mut self, cache: Arc<ResponseCache>) -> Self {
        self.cache = Some(cache);
        self
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
                let (req, plan, namespace, mut guarding) = self
                    .prepare(call.credential, request, &mut meter, false, call.deadline)
                    .await?;
                let mut cached = match &self.cache {
                    Some(cache) => {
                        let table = self.router.load();
                        let mut cached =
                            cache_stage::begin(cache, &table, &namespace, &req, call.cache_control);
                        let found = cached.lookup(meter.attribution()).await;
                        meter.charge_also(cached.embedding_cost_usd());
                        if let Some(entry) = found {
                            let mut route =
                                cache_stage::hit_route(&req, &table, cached.outcome());
                            route.arm = plan.arm.as_ref().map(|a| a.arm.clone());
                            meter.set_cache_hit(
                                &entry.provider,
                                &entry.response.model,
                                entry.cost.map(|c| c.total_usd()),
                            );
                            let mut answer = cache_stage::answer(&entry, route);
                            if guarding.is_active() {
                                guarding.reply(&mut answer.response)?;
                                self.guard
                                    .reply(&mut guarding, &mut answer, call.deadline)
                                    .await?;
                            }
                            return Ok(answer);
                        }
                        Some(cached)
                    }
                    None => None,
                };
                let mirror = self.mirror(&plan, &req);
                let result = self
                    .executor
                    .chat(&plan, &req, call.deadline, call.trace.as_ref())
                    .await;
                // Off the caller's path: the shadow runs on its own pool.
                if let Some(mirror) = mirror {
                    mirror.submit(Primary {
                        request_id: &call.request_id,
                        reply: result.as_ref().ok().map(|a| &a.response),
                    });
                }
                let mut answer = result?;
                if let Some(cached) = cached.as_mut() {
                    answer.route.cache = cached
                        .store(&answer.response, &answer.provider, answer.cost)
                        .await;
                }
                if guarding.is_active() {
                    guarding.reply(&mut answer.response)?;
                    self.guard
                        .reply(&mut guarding, &mut answer, call.deadline)
                        .await?;
                }
                Ok(answer)
            }
            .await;
            match result {
                Ok(answer) => {
                    let hit = matches!(answer.route.cache, CacheOutcome::Hit { .. });
                    tracing::debug!(provider = %answer.provider, model = %answer.response.model, "call succeeded");
                    if meter.keeps_content() {
                        meter.set_reply(&crate::guard::reply_transcript(&answer.response));
                    }
                    meter.set_target(answer.metrics.clone());
                    meter.finish(Outcome {
                        code: tonic::Code::Ok,
                        error_class: "",
                        route: Some(&answer.route),
                        // A hit used no upstream tokens.
                        usage: if hit {
                            Some(Usage::default())
                        } else {
                            answer.response.usage
                        },
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
            let (req, plan, namespace, guarding) = self
                .prepare(call.credential, request, &mut meter, true, call.deadline)
                .await?;
            let mut cached = None;
            if let Some(cache) = &self.cache {
                let table = self.router.load();
                let mut call_cache =
                    cache_stage::begin(cache, &table, &namespace, &req, call.cache_control);
                let found = call_cache.lookup(meter.attribution()).await;
                meter.charge_also(call_cache.embedding_cost_usd());
                if let Some(entry) = found {
                    let mut route = cache_stage::hit_route(&req, &table, call_cache.outcome());
                    route.arm = plan.arm.as_ref().map(|a| a.arm.clone());
                    meter.set_cache_hit(
                        &entry.provider,
                        &entry.response.model,
                        entry.cost.map(|c| c.total_usd()),
                    );
                    let events: Events = Box::pin(futures_util::stream::iter(cache_stage::replay(
                        &entry, route,
                    )));
                    return Ok((events, None, true, guarding, None));
                }
                cached = Some((call_cache, cache_stage::Collector::default()));
            }
            let mirror = self
                .mirror(&plan, &req)
                .map(|m| (m, cache_stage::Collector::default()));
            let stream = self
                .executor
                .chat_stream(&plan, &req, call.deadline, call.trace.as_ref())
                .await?;
            meter.set_target(Some(stream.target_metrics().clone()));
            let events: Events = Box::pin(stream);
            Ok((events, cached, false, guarding, mirror))
        }
        .instrument(span.clone())
        .await;
        let (committed, mut cached, hit, guarding, mut mirror) = match committed {
            Ok(committed) => committed,
            Err(err) => {
                let _entered = span.enter();
                return Err(fail(&mut meter, err));
            }
        };
        let ttft = started.elapsed();
        meter.stream_opened();
        let request_id = call.request_id;
        // The cache stores the reply as it came (before the reply guardrails, which run on
        // hits and misses alike), before the finish event goes on.
        let collected: Events = Box::pin(committed.then(move |event| {
            let mut finished = None;
            if let Ok(event) = &event {
                if let Some((_, collector)) = cached.as_mut() {
                    collector.push(event);
                }
                if let CallEvent::Finish {
                    reason,
                    usage,
                    cost,
                    ..
                } = event
                    && let Some((call_cache, collector)) = cached.take()
                {
                    finished = Some((call_cache, collector.finish(*reason, *usage), *cost));
                }
                if let Some((_, collector)) = mirror.as_mut() {
                    collector.push(event);
                }
                // The assembled primary reply goes to the shadow once the stream finished.
                if let CallEvent::Finish { reason, usage, .. } = event
                    && let Some((pending, collector)) = mirror.take()
                {
                    let (response, _) = collector.finish(*reason, *usage);
                    pending.submit(Primary {
                        request_id: &request_id,
                        reply: Some(&response),
                    });
                }
            }
            async move {
                let mut event = event?;
                if let Some((mut call_cache, (response, provider), cost)) = finished
                    && let CallEvent::Finish { route, .. } = &mut event
                {
                    route.cache = call_cache.store(&response, &provider, cost).await;
                }
                Ok(event)
            }
        }));
        let guarded = guard_stream(collected, guarding, &self.guard, call.deadline);
        // Kept content: the reply as it went out.
        let mut reply = meter.keeps_content().then(String::new);
        Ok(Box::pin(guarded.map(move |event| match event {
            Ok(event) => {
                if let (
                    Some(reply),
                    CallEvent::Text(t) | CallEvent::ToolCall(ToolCallDelta { arguments: t, .. }),
                ) = (reply.as_mut(), &event)
                    && reply.len() < super::meter::MAX_KEPT * 2
                {
                    reply.push_str(t);
                }
                if let CallEvent::Finish {
                    usage, cost, route, ..
                } = &event
                {
                    if let Some(reply) = reply.take() {
                        meter.set_reply(&reply);
                    }
                    meter.finish(Outcome {
                        code: tonic::Code::Ok,
                        error_class: "",
                        route: Some(route),
                        // A hit used no upstream tokens.
                        usage: if hit { Some(Usage::default()) } else { *usage },
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

    /// Authenticates, applies the key's scope and forced tags, plans, and asks the limits
    /// once (rates, stream slot and budget together: one round trip with shared limits);
    /// a spent budget with a fallback policy plans again on that policy.
    async fn prepare(
        &self,
        credential: Credential<'_>,
        request: impl FnOnce() -> Result<ChatRequest, GatewayError> + Send,
        meter: &mut CallMeter,
        stream: bool,
        deadline: Instant,
    ) -> Result<(ChatRequest, Plan, Arc<str>, Guarding), GatewayError> {
        let caller = match credential {
            Credential::Verified(caller) => caller,
            Credential::Bearer(secret) => self.access.chat_caller_secret(secret)?,
        };
        let mut req = request()?;
        let table = self.router.current();
        let Some(caller) = &caller else {
            let plan = plan(&table, &req, meter)?;
            apply_arm(&mut req, &plan);
            meter.set_tags(&req.tags);
            meter.set_rollout(&plan);
            let (req, plan, guarding) = self
                .guarded(req, plan, None, &table, meter, deadline)
                .await?;
            return Ok((req, plan, cache_stage::namespace(None), guarding));
        };
        caller.force_tags(&mut req.tags);
        meter.set_key(caller.name());
        if let Some(keep) = caller.key.spec.content_retention() {
            meter.keep_content(keep, &caller.key.spec.owner);
        }
        caller.may_call(&req.model, table.is_policy(&req.model))?;
        meter.set_tags(&req.tags);
        let mut plan = plan(&table, &req, meter)?;
        let subjects = self.access.subjects(caller);
        let (input, output) = estimate_tokens(&req);
        let estimated_usd = if subjects.any_budget() {
            plan.targets
                .first()
                .and_then(|t| t.info.as_ref())
                .and_then(|i| i.prices)
                .map_or(0.0, |p| {
                    (input as f64 * p.input + output as f64 * p.output) / 1e6
                })
        } else {
            0.0
        };
        let fallback = &caller.key.spec.budget_fallback_policy;
        let ask = Ask {
            subjects,
            estimated_tokens: input + output,
            stream,
            estimated_usd,
            budget: if fallback.is_empty() {
                BudgetCheck::Reserve
            } else {
                BudgetCheck::FallbackWhenSpent
            },
        };
        let permit = self
            .access
            .limits
            .admit(ask, now_ms())
            .await
            .inspect_err(count_limited)?;
        if permit.budget_spent() {
            // Routed to the budget's fallback policy: the budget no longer refuses calls.
            tracing::info!(key = caller.name(), policy = %fallback, "budget spent: routing to the fallback policy");
            req.model.clone_from(fallback);
            plan = self::plan(&table, &req, meter)?;
        }
        if plan.arm.is_some() {
            apply_arm(&mut req, &plan);
            meter.set_tags(&req.tags);
        }
        meter.set_permit(permit);
        meter.set_rollout(&plan);
        let (req, plan, guarding) = self
            .guarded(req, plan, Some(caller), &table, meter, deadline)
            .await?;
        Ok((req, plan, cache_stage::namespace(Some(caller)), guarding))
    }

    /// Applies the call's guardrails (the key's forced profile, then the policy's) to the
    /// request: their detectors, then their external checks; the guarding goes on with the
    /// reply. Its decisions go to the meter.
    async fn guarded(
        &self,
        mut req: ChatRequest,
        plan: Plan,
        caller: Option<&Caller>,
        table: &RoutingTable,
        meter: &mut CallMeter,
        deadline: Instant,
    ) -> Result<(ChatRequest, Plan, Guarding), GatewayError> {
        let mut guarding = self
            .guard
            .for_call(caller, table, &plan, &req, meter.request_id())?;
        if guarding.is_active() {
            meter.set_guardrails(guarding.state.tally.clone());
            guarding.request(&mut req)?;
            self.guard
                .request(&mut guarding, &mut req, deadline)
                .await?;
        }
        if meter.keeps_content() {
            meter.set_prompt(&crate::guard::transcript(&req));
        }
        Ok((req, plan, guarding))
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

/// Plans the call; a call that cannot be planned still counts for its experiment arm.
fn plan(
    table: &RoutingTable,
    req: &ChatRequest,
    meter: &mut CallMeter,
) -> Result<Plan, GatewayError> {
    table
        .plan_call(req, meter.request_id())
        .inspect_err(|_| meter.set_arm(table.assigned_arm(req)))
}

/// Applies the parameters and tags of the call's experiment arm, if any.
fn apply_arm(req: &mut ChatRequest, plan: &Plan) {
    if let Some(arm) = &plan.arm {
        arm.apply(req);
    }
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
