//! Embedding calls: the same race as a unary chat call (deadline, deadline-aware fallback,
//! retries with backoff, hedging, health), over [`Provider::embed`].
//!
//! Targets whose provider kind serves no embeddings are set aside before the race and
//! recorded in the route as skipped (`EMBEDDINGS_UNSUPPORTED`); when that leaves none, the
//! call fails with `FAILED_PRECONDITION` naming each such provider and its kind.
//!
//! [`Provider::embed`]: crate::providers::Provider::embed

use std::sync::Arc;

use futures_util::FutureExt as _;
use tokio::time::Instant;

use super::{Executor, Mode, cost_of};
use crate::{
    error::GatewayError,
    health::AttemptResult,
    models::Cost,
    providers::embed::UNSUPPORTED_REASON,
    routing::{Plan, Skipped, Target},
    telemetry::{TargetMetrics, TraceContext},
    types::{EmbedRequest, EmbedResponse, Route},
};

/// A successful embedding call.
#[derive(Debug, Clone)]
pub struct EmbedAnswer {
    /// The provider's answer.
    pub response: EmbedResponse,
    /// The configured provider that answered.
    pub provider: String,
    /// The cost, when the model has prices.
    pub cost: Option<Cost>,
    /// The route taken.
    pub route: Route,
    /// The metric handles of the target that answered (`None` when no target did).
    pub metrics: Option<Arc<TargetMetrics>>,
}

/// `plan` without the targets that serve no embeddings (recorded as skipped); an error
/// naming them when none is left.
pub fn embedding_plan(plan: &Plan) -> Result<Plan, GatewayError> {
    if plan
        .targets
        .iter()
        .all(|t| t.provider.supports_embeddings())
    {
        return Ok(plan.clone());
    }
    let mut out = Plan {
        policy: plan.policy.clone(),
        targets: Vec::with_capacity(plan.targets.len()),
        skipped: plan.skipped.clone(),
        execution: plan.execution.clone(),
        counters: plan.counters.clone(),
        revision: plan.revision,
        observer: plan.observer.clone(),
        arm: plan.arm.clone(),
    };
    let mut unsupported: Vec<String> = Vec::new();
    for target in &plan.targets {
        if target.provider.supports_embeddings() {
            out.targets.push(target.clone());
            continue;
        }
        let name = format!(
            "provider `{}` (kind `{}`)",
            target.provider.name(),
            target.provider.kind()
        );
        if !unsupported.contains(&name) {
            unsupported.push(name);
        }
        out.skipped.push(Skipped {
            target: target.clone(),
            reason: UNSUPPORTED_REASON,
            // Set aside ahead of every remaining target: it would have been the primary.
            first: out.targets.is_empty(),
        });
    }
    if out.targets.is_empty() {
        return Err(GatewayError::FailedPrecondition {
            reason: UNSUPPORTED_REASON,
            message: format!(
                "{} serves no embeddings; use an embedding model of a provider that has them \
                 (openai, azure, gemini, bedrock, the OpenAI-compatible kinds, mock)",
                unsupported.join(", ")
            ),
        });
    }
    Ok(out)
}

impl Executor {
    /// Runs an embedding call on `plan` (see the module docs).
    pub async fn embed(
        &self,
        plan: &Plan,
        request: &EmbedRequest,
        deadline: Instant,
        trace: Option<&TraceContext>,
    ) -> Result<EmbedAnswer, GatewayError> {
        let plan = embedding_plan(plan)?;
        let attempt = |target: Target, _deadline: Instant| {
            async move { target.provider.embed(&target.model, request).await }.boxed()
        };
        // Estimated input tokens (about 4 characters each), for pacing.
        let tokens = request.inputs.iter().map(|t| t.len() as u64 / 4 + 1).sum();
        let won = self
            .race(&plan, Mode::Unary, deadline, trace, tokens, &attempt)
            .await?;
        won.guard.finish(AttemptResult::Success {
            latency: won.started.elapsed(),
            ttft: None,
        });
        Ok(EmbedAnswer {
            cost: cost_of(&won.target, won.value.usage.as_ref()),
            provider: won.target.provider.name().to_owned(),
            response: won.value,
            route: won.route,
            metrics: Some(won.target.metrics),
        })
    }
}
