//! Embedding calls on the shared call path: the steps of a unary chat call, in the same
//! order (see the parent module): the meter, authentication, conversion, the key's scope,
//! forced tags, budget fallback and limits, routing, the executor, accounting.
//!
//! Access and routing see the embedding request as a chat request whose messages are the
//! inputs (one user message each) and whose output limit is 0: the key's model patterns,
//! policy variants, sticky routing, the token estimate and the budget reservation (input
//! tokens at the input price) then apply unchanged.

use tracing::Instrument as _;

use super::{Call, Engine, fail};
use crate::{
    error::GatewayError,
    executor::EmbedAnswer,
    server::meter::{CallMeter, Outcome},
    types::{ChatRequest, ContentPart, EmbedRequest, Message, Role, SamplingParams},
};

impl Engine {
    /// Runs an embedding call. `request` converts and validates the surface's request; it
    /// runs after authentication.
    pub async fn embed(
        &self,
        call: Call<'_>,
        request: impl FnOnce() -> Result<EmbedRequest, GatewayError> + Send,
    ) -> Result<EmbedAnswer, GatewayError> {
        let mut meter = CallMeter::start(&self.meter, call.rpc, call.request_id.clone());
        let span = tracing::info_span!("call", rpc = call.rpc, request_id = %call.request_id);
        async move {
            let result = async {
                let mut settings = None;
                // The request guardrails ran over the inputs (the view's messages); an
                // embedding has no text reply to scan.
                let (view, plan, _namespace, _guarding) = self.prepare(
                    call.credential,
                    || {
                        let (view, rest) = routing_view(request()?);
                        settings = Some(rest);
                        Ok(view)
                    },
                    &mut meter,
                    false,
                    call.deadline,
                )
                .await?;
                let settings = settings.ok_or_else(|| {
                    GatewayError::Internal("the embedding request was not converted".to_owned())
                })?;
                let req = from_view(view, settings);
                self.executor
                    .embed(&plan, &req, call.deadline, call.trace.as_ref())
                    .await
            }
            .await;
            match result {
                Ok(answer) => {
                    tracing::debug!(provider = %answer.provider, model = %answer.response.model, "call succeeded");
                    finish(&mut meter, &answer);
                    Ok(answer)
                }
                Err(err) => Err(fail(&mut meter, err)),
            }
        }
        .instrument(span)
        .await
    }
}

/// Accounts for a successful embedding call (also the semantic cache's own, in
/// [`crate::server::cache_stage`]).
pub fn finish(meter: &mut CallMeter, answer: &EmbedAnswer) {
    meter.set_target(answer.metrics.clone());
    meter.finish(Outcome {
        code: tonic::Code::Ok,
        error_class: "",
        route: Some(&answer.route),
        usage: answer.response.usage,
        cost: answer.cost,
        ttft: None,
    });
}

/// The chat request access and routing see (the inputs moved into it), and the rest of the
/// embedding request.
fn routing_view(mut req: EmbedRequest) -> (ChatRequest, EmbedRequest) {
    let view = ChatRequest {
        model: std::mem::take(&mut req.model),
        messages: std::mem::take(&mut req.inputs)
            .into_iter()
            .map(|text| Message::text(Role::User, text))
            .collect(),
        params: SamplingParams {
            max_tokens: Some(0),
            ..SamplingParams::default()
        },
        tags: std::mem::take(&mut req.tags),
        user: req.user.clone(),
        ..ChatRequest::default()
    };
    (view, req)
}

/// The embedding request back from its view: the model (a budget fallback may have changed
/// it), the tags (with the key's forced ones) and the inputs.
fn from_view(view: ChatRequest, mut rest: EmbedRequest) -> EmbedRequest {
    rest.model = view.model;
    rest.tags = view.tags;
    rest.inputs = view
        .messages
        .into_iter()
        .map(|m| match m.content.into_iter().next() {
            Some(ContentPart::Text(text)) => text,
            _ => String::new(),
        })
        .collect();
    rest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_round_trips_and_estimates_no_output() {
        let req = EmbedRequest {
            model: "openai/text-embedding-3-small".into(),
            inputs: vec!["a b".into(), "c".into()],
            dimensions: Some(8),
            tags: [("team".to_owned(), "x".to_owned())].into(),
            user: Some("u".into()),
            ..EmbedRequest::default()
        };
        let (view, rest) = routing_view(req.clone());
        assert_eq!(view.messages.len(), 2);
        assert_eq!(crate::routing::estimate_tokens(&view).1, 0);
        assert_eq!(view.user.as_deref(), Some("u"));
        assert_eq!(from_view(view, rest), req);
    }
}
