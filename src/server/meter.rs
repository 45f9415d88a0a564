//! Per-call accounting: metrics and the usage ledger record, written once when a call ends
//! (successfully, with an error, or because the caller went away).

use std::{borrow::Cow, collections::BTreeMap, sync::Arc, time::Duration};

use tokio::time::Instant;
use tonic::Code;

use crate::{
    error::{GatewayError, code_name},
    ledger::{Ledger, UsageRecord},
    limits::Permit,
    models::Cost,
    routing::{Plan, RolloutObserver},
    telemetry::{CallHandles, HandleCache, StaticSlots, TargetMetrics, names},
    types::{ArmRef, AttemptOutcome, PolicyRevision, Route, Usage},
};

/// What the meter needs from the gateway, shared by all calls.
#[derive(Debug, Clone)]
pub struct MeterConfig {
    /// Where records go.
    pub ledger: Ledger,
    /// Request tags that become metric labels.
    pub tag_labels: Arc<[String]>,
}

/// How a call ended.
pub struct Outcome<'a> {
    /// The status code.
    pub code: Code,
    /// The error class (ErrorInfo reason), for failures.
    pub error_class: &'a str,
    /// The route, when routing happened.
    pub route: Option<&'a Route>,
    /// Usage, when reported.
    pub usage: Option<Usage>,
    /// Cost, when known.
    pub cost: Option<Cost>,
    /// Time to first content, for streams.
    pub ttft: Option<Duration>,
}

impl<'a> Outcome<'a> {
    /// The outcome of a failed call: its code and error class (the ErrorInfo reason) both
    /// come from [`GatewayError::classify`].
    pub fn failed(err: &'a GatewayError) -> Self {
        let route = err.route();
        let class = err.classify();
        Outcome {
            code: class.code,
            error_class: class.reason,
            route,
            usage: None,
            cost: None,
            ttft: None,
        }
    }
}

/// The most bytes of a prompt or a reply the ledger keeps (after redaction).
pub const MAX_KEPT: usize = 1 << 20;

/// `text` redacted, then cut to [`MAX_KEPT`] bytes (on a character boundary).
fn kept(text: &str) -> String {
    let mut out = crate::guard::redact_all(text);
    if out.len() > MAX_KEPT {
        let mut at = MAX_KEPT;
        while !out.is_char_boundary(at) {
            at -= 1;
        }
        out.truncate(at);
    }
    out
}

/// Accounts for one call; see the module docs.
pub struct CallMeter {
    config: MeterConfig,
    rpc: &'static str,
    request_id: String,
    started: Instant,
    policy: String,
    tags: BTreeMap<String, String>,
    done: bool,
    stream: bool,
    key: String,
    permit: Option<Permit>,
    /// Cost charged to the permit's budgets beside the call's own (the semantic cache's
    /// embedding call, recorded in the ledger as a call of its own).
    also_charged_usd: f64,
    target: Option<Arc<TargetMetrics>>,
    /// A reply served from the response cache: who made it, and what it cost then.
    cached: Option<(String, String, Option<f64>)>,
    /// The call's guardrail decisions, read when it ends.
    guardrails: Option<crate::guard::Tally>,
    /// The policy version of the plan, and its rollout's observer.
    revision: Option<PolicyRevision>,
    observer: Option<Arc<dyn RolloutObserver>>,
    /// The experiment arm, for a call that failed before it had a route.
    arm: Option<Arc<ArmRef>>,
    /// Kept content (keys with `keep_content`): how long, and the redacted prompt and reply.
    content: Option<(std::time::Duration, crate::ledger::Content)>,
}

/// How a call counts for a rollout's test: `Some(true)` failed for a reason of the
/// version (the upstream, the deadline, a constraint), `Some(false)` succeeded, `None`
/// not counted (the caller's fault, our own limits, cancelled).
fn rollout_failure(code: Code) -> Option<bool> {
    match code {
        Code::Ok => Some(false),
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Internal
        | Code::Unknown
        | Code::DataLoss
        | Code::FailedPrecondition => Some(true),
        Code::Cancelled
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Unauthenticated => None,
    }
}

fn inflight(rpc: &'static str) -> Cow<'static, metrics::Gauge> {
    static GAUGES: std::sync::LazyLock<StaticSlots<metrics::Gauge, 8>> =
        std::sync::LazyLock::new(Default::default);
    let make = || metrics::gauge!(names::INFLIGHT, "rpc" => rpc);
    match GAUGES.slot(rpc, make) {
        Some(gauge) => Cow::Borrowed(gauge),
        None => Cow::Owned(GAUGES.get(rpc, make)),
    }
}

fn open_streams() -> &'static metrics::Gauge {
    static GAUGE: std::sync::LazyLock<metrics::Gauge> =
        std::sync::LazyLock::new(|| metrics::gauge!(names::OPEN_STREAMS));
    &GAUGE
}

/// Call handles by label set, for the calls whose target keeps none for them (failures,
/// tag labels).
static HANDLES: std::sync::LazyLock<HandleCache<CallHandles>> =
    std::sync::LazyLock::new(Default::default);

impl CallMeter {
    /// The handles for this call's labels: the answering target's own for a successful call
    /// without tag labels, otherwise registered once per label set in a shared cache.
    fn handles(&self, provider: &str, model: &str, code: &'static str) -> Cow<'_, CallHandles> {
        if code == "OK"
            && self.config.tag_labels.is_empty()
            && let Some(target) = &self.target
            && target.policy() == self.policy
            && **target.provider() == *provider
            && **target.model() == *model
            && let Some(handles) = target.call_ok(self.rpc)
        {
            return Cow::Borrowed(handles);
        }
        let tag_values: Vec<&str> = self
            .config
            .tag_labels
            .iter()
            .map(|t| self.tags.get(t).map_or("", String::as_str))
            .collect();
        let mut key = format!(
            "{}\u{1f}{}\u{1f}{provider}\u{1f}{model}\u{1f}{code}",
            self.rpc, self.policy
        );
        for v in &tag_values {
            key.push('\u{1f}');
            key.push_str(v);
        }
        Cow::Owned(HANDLES.get(&key, || {
            let tags: Vec<(&str, &str)> = self
                .config
                .tag_labels
                .iter()
                .map(String::as_str)
                .zip(tag_values.iter().copied())
                .collect();
            CallHandles::register(self.rpc, code, &self.policy, provider, model, &tags)
        }))
    }

    /// Starts accounting for a call.
    pub fn start(config: &MeterConfig, rpc: &'static str, request_id: String) -> Self {
        inflight(rpc).increment(1.0);
        Self {
            config: config.clone(),
            rpc,
            request_id,
            started: Instant::now(),
            policy: String::new(),
            tags: BTreeMap::new(),
            done: false,
            stream: false,
            key: String::new(),
            permit: None,
            also_charged_usd: 0.0,
            target: None,
            cached: None,
            guardrails: None,
            revision: None,
            observer: None,
            arm: None,
            content: None,
        }
    }

    /// Keeps the call's content (redacted) for `retention`, owned by `tenant`.
    pub fn keep_content(&mut self, retention: std::time::Duration, tenant: &str) {
        self.content = Some((
            retention,
            crate::ledger::Content {
                tenant: tenant.to_owned(),
                ..crate::ledger::Content::default()
            },
        ));
    }

    /// Whether the call's content is kept.
    pub fn keeps_content(&self) -> bool {
        self.content.is_some()
    }

    /// The prompt as sent (redacted here, then cut to [`MAX_KEPT`]), when content is kept.
    pub fn set_prompt(&mut self, prompt: &str) {
        if let Some((_, c)) = &mut self.content {
            c.prompt = kept(prompt);
        }
    }

    /// The reply (redacted here, then cut to [`MAX_KEPT`]), when content is kept.
    pub fn set_reply(&mut self, reply: &str) {
        if let Some((_, c)) = &mut self.content {
            c.reply = kept(reply);
        }
    }

    /// The call's request id.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The plan's policy version and, during a rollout, who hears how the call ended.
    pub fn set_rollout(&mut self, plan: &Plan) {
        self.revision = plan.revision;
        self.observer.clone_from(&plan.observer);
    }

    /// The target that answers the call (its metric handles).
    pub fn set_target(&mut self, target: Option<Arc<TargetMetrics>>) {
        self.target = target;
    }

    /// The reply came from the response cache: `provider` and `model` made it, for
    /// `saved_usd` then; the call itself has no upstream attempt and zero cost.
    pub fn set_cache_hit(&mut self, provider: &str, model: &str, saved_usd: Option<f64>) {
        self.cached = Some((provider.to_owned(), model.to_owned(), saved_usd));
    }

    /// Who the call is for (a semantic cache lookup's embedding call is recorded for it).
    pub fn attribution(&self) -> crate::cache::Attribution<'_> {
        crate::cache::Attribution {
            request_id: &self.request_id,
            key: &self.key,
            tags: &self.tags,
        }
    }

    /// The request's tags (for the ledger and tag labels).
    pub fn set_tags(&mut self, tags: &BTreeMap<String, String>) {
        self.tags.clone_from(tags);
    }

    /// The call's experiment arm, when planning failed (a route carries it otherwise).
    pub fn set_arm(&mut self, arm: Option<Arc<ArmRef>>) {
        self.arm = arm;
    }

    /// The gateway key that made the call (for attribution).
    pub fn set_key(&mut self, name: &str) {
        name.clone_into(&mut self.key);
    }

    /// The call's guardrail decisions (recorded in the ledger when the call ends).
    pub fn set_guardrails(&mut self, tally: crate::guard::Tally) {
        self.guardrails = Some(tally);
    }

    /// The call's limits permit, settled with the real usage and cost when the call ends.
    pub fn set_permit(&mut self, permit: Permit) {
        self.permit = Some(permit);
    }

    /// Charges `usd` to the call's budgets with the call's own cost when it ends (the cost
    /// of the semantic cache's embedding call made for it).
    pub fn charge_also(&mut self, usd: f64) {
        self.also_charged_usd += usd;
    }

    /// The stream is open (counted in `llm_gateway_open_streams` until the meter ends).
    pub fn stream_opened(&mut self) {
        self.stream = true;
        open_streams().increment(1.0);
    }

    /// Records the call's end. Later calls do nothing.
    pub fn finish(&mut self, outcome: Outcome<'_>) {
        if self.done {
            return;
        }
        self.done = true;
        let elapsed = self.started.elapsed();
        let route = outcome.route;
        if let Some(policy) = route.and_then(|r| r.policy.as_deref()) {
            policy.clone_into(&mut self.policy);
        }
        // The answering attempt, or the last one tried.
        let last = route.and_then(|r| {
            r.attempts
                .iter()
                .rev()
                .find(|a| a.outcome == AttemptOutcome::Succeeded)
                .or_else(|| {
                    r.attempts
                        .iter()
                        .rev()
                        .find(|a| !matches!(a.outcome, AttemptOutcome::Skipped(_)))
                })
        });
        let cached = self.cached.take();
        let revision = route.and_then(|r| r.revision).or(self.revision);
        if let (Some(observer), Some(revision), None) = (self.observer.take(), revision, &cached)
            && let Some(failed) = rollout_failure(outcome.code)
        {
            observer.observe(revision.arm, failed, elapsed);
        }
        let (provider, model) = match (&cached, last) {
            (Some((p, m, _)), _) => (p.clone(), m.clone()),
            (None, last) => (
                last.map_or("", |a| a.provider.as_str()).to_owned(),
                last.map_or("", |a| a.model.as_str()).to_owned(),
            ),
        };
        let attempts = route.map_or(0, |r| {
            r.attempts
                .iter()
                .filter(|a| !matches!(a.outcome, AttemptOutcome::Skipped(_)))
                .count()
        });
        let code = code_name(outcome.code);
        let arm = route
            .and_then(|r| r.arm.clone())
            .or_else(|| self.arm.take());

        let handles = self.handles(&provider, &model, code);
        handles.calls.increment(1);
        handles.duration.record(elapsed.as_secs_f64());
        if let Some(ttft) = outcome.ttft {
            handles.ttft.record(ttft.as_secs_f64());
        }
        if let Some(u) = &outcome.usage {
            handles.input_tokens.increment(u.input_tokens);
            handles.output_tokens.increment(u.output_tokens);
            if let Some(cached) = u.cached_input_tokens {
                handles.cached_tokens.increment(cached);
            }
        }
        if let Some(cost) = &outcome.cost {
            handles.cost.record(cost.total_usd());
        }

        if let Some(permit) = self.permit.as_mut() {
            let own = outcome.cost.map(|c| c.total_usd());
            let also = self.also_charged_usd;
            let charged = if also > 0.0 {
                Some(own.unwrap_or(0.0) + also)
            } else {
                own
            };
            permit.settle(
                outcome.usage.map(|u| u.total_tokens()),
                charged,
                super::access::now_ms(),
            );
        }
        let usage = outcome.usage.unwrap_or_default();
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        // Content of a call that got as far as sending its prompt.
        let content = self
            .content
            .take()
            .filter(|(_, c)| !c.prompt.is_empty())
            .map(|(keep, mut c)| {
                c.expires_ms =
                    time_ms.saturating_add(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
                Box::new(c)
            });
        self.config.ledger.record(UsageRecord {
            time_ms,
            content,
            request_id: std::mem::take(&mut self.request_id),
            rpc: self.rpc.to_owned(),
            key: std::mem::take(&mut self.key),
            tags: std::mem::take(&mut self.tags),
            policy: std::mem::take(&mut self.policy),
            provider,
            model,
            attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
            cached_input_tokens: usage.cached_input_tokens.unwrap_or(0),
            usage_reported: outcome.usage.is_some(),
            cost_usd: outcome.cost.map(|c| c.total_usd()),
            latency_ms: elapsed.as_secs_f64() * 1000.0,
            ttft_ms: outcome.ttft.map(|t| t.as_secs_f64() * 1000.0),
            code: code.to_owned(),
            error_class: outcome.error_class.to_owned(),
            cache: route.map_or("", |r| r.cache.label()).to_owned(),
            cost_saved_usd: cached.and_then(|(_, _, saved)| saved),
            guardrails: self
                .guardrails
                .as_ref()
                .map(crate::guard::Tally::summary)
                .unwrap_or_default(),
            policy_version: revision.map_or(0, |r| u64::from(r.version)),
            rollout_arm: revision.map_or("", |r| r.arm.label()).to_owned(),
            trial: crate::ledger::Trial {
                experiment: arm
                    .as_ref()
                    .map(|a| a.experiment.clone())
                    .unwrap_or_default(),
                arm: arm.map(|a| a.arm.clone()).unwrap_or_default(),
                ..crate::ledger::Trial::default()
            },
        });
    }
}

impl Drop for CallMeter {
    fn drop(&mut self) {
        // Ended without an outcome: the caller went away (or the call was cut off).
        self.finish(Outcome {
            code: Code::Cancelled,
            error_class: GatewayError::Cancelled.reason(),
            route: None,
            usage: None,
            cost: None,
            ttft: None,
        });
        inflight(self.rpc).decrement(1.0);
        if self.stream {
            open_streams().decrement(1.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use tonic_types::StatusExt as _;
    use tracing::Level;

    use super::*;
    use crate::{
        error::Classification,
        providers::{ErrorClass, ProviderError},
    };

    /// Which variant an error is; adding a variant breaks this match, and with it the table.
    fn variant(err: &GatewayError) -> usize {
        match err {
            GatewayError::InvalidArgument(_) => 0,
            GatewayError::NotFound { .. } => 1,
            GatewayError::Unauthenticated(_) => 2,
            GatewayError::PermissionDenied(_) => 3,
            GatewayError::ResourceExhausted { .. } => 4,
            GatewayError::FailedPrecondition { .. } => 5,
            GatewayError::Upstream { .. } => 6,
            GatewayError::DeadlineExceeded { .. } => 7,
            GatewayError::Cancelled => 8,
            GatewayError::Unavailable { .. } => 9,
            GatewayError::Aborted(_) => 10,
            GatewayError::AlreadyExists(_) => 11,
            GatewayError::Internal(_) => 12,
            GatewayError::GuardrailBlocked { .. } => 13,
        }
    }
    const VARIANTS: usize = 14;

    fn upstream(class: ErrorClass, all_rate_limited: bool) -> GatewayError {
        GatewayError::Upstream {
            error: ProviderError::new(class, "the provider failed"),
            all_rate_limited,
            route: Route::default(),
        }
    }

    /// Every variant (every upstream class, both ways) with the code, reason and log level
    /// the README's status table promises.
    fn table() -> Vec<(GatewayError, Code, &'static str, Level)> {
        use Code as C;
        use ErrorClass as E;
        let exhausted = |reason| GatewayError::ResourceExhausted {
            reason,
            subject: "key:k".into(),
            message: "spent".into(),
            retry_after: Some(Duration::from_secs(3)),
        };
        let mut rows = vec![
            (
                GatewayError::invalid("model", "must not be empty"),
                C::InvalidArgument,
                "INVALID_ARGUMENT",
                Level::DEBUG,
            ),
            (
                GatewayError::NotFound {
                    reason: "MODEL_NOT_FOUND",
                    message: "no model".into(),
                },
                C::NotFound,
                "MODEL_NOT_FOUND",
                Level::DEBUG,
            ),
            (
                GatewayError::Unauthenticated("no key".into()),
                C::Unauthenticated,
                "UNAUTHENTICATED",
                Level::INFO,
            ),
            (
                GatewayError::PermissionDenied("no scope".into()),
                C::PermissionDenied,
                "PERMISSION_DENIED",
                Level::INFO,
            ),
            (
                exhausted("RATE_LIMIT_REQUESTS"),
                C::ResourceExhausted,
                "RATE_LIMIT_REQUESTS",
                Level::INFO,
            ),
            (
                exhausted("BUDGET_EXCEEDED"),
                C::ResourceExhausted,
                "BUDGET_EXCEEDED",
                Level::INFO,
            ),
            (
                GatewayError::FailedPrecondition {
                    reason: "CONSTRAINT_UNSATISFIED",
                    message: "no target".into(),
                },
                C::FailedPrecondition,
                "CONSTRAINT_UNSATISFIED",
                Level::INFO,
            ),
            (
                GatewayError::DeadlineExceeded {
                    route: Route::default(),
                },
                C::DeadlineExceeded,
                "DEADLINE_EXCEEDED",
                Level::INFO,
            ),
            (
                GatewayError::Cancelled,
                C::Cancelled,
                "CANCELLED",
                Level::INFO,
            ),
            (
                GatewayError::Unavailable {
                    reason: "SHUTTING_DOWN",
                    message: "stopping".into(),
                    retry_after: None,
                },
                C::Unavailable,
                "SHUTTING_DOWN",
                Level::INFO,
            ),
            (
                GatewayError::Aborted("stale".into()),
                C::Aborted,
                "ABORTED",
                Level::INFO,
            ),
            (
                GatewayError::AlreadyExists("exists".into()),
                C::AlreadyExists,
                "ALREADY_EXISTS",
                Level::INFO,
            ),
            (
                GatewayError::Internal("bug".into()),
                C::Internal,
                "INTERNAL",
                Level::ERROR,
            ),
            (
                GatewayError::GuardrailBlocked {
                    profiles: vec!["pii".into()],
                    entities: vec!["email".into()],
                    reply: false,
                },
                C::FailedPrecondition,
                "GUARDRAIL_BLOCKED",
                Level::INFO,
            ),
        ];
        for (class, code, reason) in [
            (E::RateLimited, C::Unavailable, "RATE_LIMITED"),
            (E::Overloaded, C::Unavailable, "OVERLOADED"),
            (E::ServerError, C::Unavailable, "SERVER_ERROR"),
            (E::Timeout, C::Unavailable, "TIMEOUT"),
            (E::Connect, C::Unavailable, "CONNECT"),
            (E::StreamBroken, C::Unavailable, "STREAM_BROKEN"),
            (E::InvalidResponse, C::Unavailable, "INVALID_RESPONSE"),
            (E::Authentication, C::FailedPrecondition, "AUTHENTICATION"),
            (E::Permission, C::FailedPrecondition, "PERMISSION"),
            (E::InvalidRequest, C::InvalidArgument, "INVALID_REQUEST"),
            (
                E::ContextLengthExceeded,
                C::InvalidArgument,
                "CONTEXT_LENGTH_EXCEEDED",
            ),
            (E::ContentFiltered, C::InvalidArgument, "CONTENT_FILTERED"),
            (E::ModelNotFound, C::NotFound, "MODEL_NOT_FOUND"),
            (E::LocalResource, C::Unavailable, "LOCAL_RESOURCE"),
        ] {
            rows.push((upstream(class, false), code, reason, Level::INFO));
            let all_limited = if class == E::RateLimited {
                C::ResourceExhausted
            } else {
                code
            };
            rows.push((upstream(class, true), all_limited, reason, Level::INFO));
        }
        assert_eq!(rows.len(), VARIANTS - 1 + 1 + 2 * ErrorClass::ALL.len());
        rows
    }

    #[test]
    fn status_label_ledger_and_log_level_agree_for_every_error() {
        let mut seen = BTreeSet::new();
        for (err, code, reason, level) in table() {
            seen.insert(variant(&err));
            let context = format!("{err:?}");
            assert_eq!(
                err.classify(),
                Classification {
                    reason,
                    code,
                    level
                },
                "{context}"
            );
            assert_eq!(err.label(), reason, "{context}");
            // The ledger record.
            let outcome = Outcome::failed(&err);
            assert_eq!(outcome.code, code, "{context}");
            assert_eq!(outcome.error_class, reason, "{context}");
            // The status the caller sees.
            let status = err.into_status();
            assert_eq!(status.code(), code, "{context}");
            let details = status.get_error_details();
            let info = details.error_info().expect("every status has an ErrorInfo");
            assert_eq!(info.reason, reason, "{context}");
            assert_eq!(info.domain, crate::error::ERROR_DOMAIN);
        }
        assert_eq!(seen.len(), VARIANTS, "every variant is in the table");
    }
}
