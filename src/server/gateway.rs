//! The `llmgateway.v1.LlmGateway` handlers. They are thin: read the call's metadata, hand
//! the request (converted and validated in [`convert`]) to the shared [`Engine`], convert the
//! answer and map errors to statuses.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, metadata::MetadataMap};

use super::{
    authz, convert, convert_embed,
    deadline::call_deadline,
    engine::{Call, Credential, Engine, trace_context},
    request_id::RequestId,
};
use crate::{
    error::GatewayError,
    pb::{self, llm_gateway_server::LlmGateway},
};

/// The gateway service: a thin adapter from gRPC to the shared [`Engine`].
#[derive(Clone)]
pub struct GatewayService {
    engine: Engine,
}

impl GatewayService {
    /// A service running calls on `engine`.
    pub fn new(engine: Engine) -> Self {
        Self { engine }
    }

    /// What the engine needs to know about a call before reading it; the caller is the one
    /// the authorization layer verified.
    fn call<'a>(
        &self,
        metadata: &'a MetadataMap,
        extensions: &tonic::Extensions,
        rpc: &'static str,
    ) -> Result<Call<'a>, Status> {
        let caller = authz::principal(extensions)
            .map_err(GatewayError::into_status)?
            .key()
            .cloned();
        let text = |key| metadata.get(key).and_then(|v| v.to_str().ok());
        Ok(Call {
            rpc,
            request_id: request_id(extensions),
            deadline: call_deadline(metadata, self.engine.limits()),
            trace: trace_context(text("traceparent"), text("tracestate")),
            credential: Credential::Verified(caller),
            cache_control: crate::cache::CacheControl::parse(text("cache-control")),
        })
    }
}

fn request_id(extensions: &tonic::Extensions) -> String {
    extensions.get::<RequestId>().map_or_else(
        || {
            super::request_id::generate()
                .to_str()
                .unwrap_or("")
                .to_owned()
        },
        |id| id.as_str().to_owned(),
    )
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ChatStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl LlmGateway for GatewayService {
    async fn chat(
        &self,
        request: Request<pb::ChatRequest>,
    ) -> Result<Response<pb::ChatResponse>, Status> {
        let (metadata, extensions, message) = request.into_parts();
        let call = self.call(&metadata, &extensions, "Chat")?;
        let id = call.request_id.clone();
        match self
            .engine
            .chat(call, move || convert::chat_request(message))
            .await
        {
            Ok(answer) => Ok(Response::new(convert::chat_response(id, answer))),
            Err(err) => Err(err.into_status()),
        }
    }

    type ChatStreamStream = EventStream;

    async fn chat_stream(
        &self,
        request: Request<pb::ChatRequest>,
    ) -> Result<Response<Self::ChatStreamStream>, Status> {
        let (metadata, extensions, message) = request.into_parts();
        let call = self.call(&metadata, &extensions, "ChatStream")?;
        let id = call.request_id.clone();
        let events = self
            .engine
            .chat_stream(call, move || convert::chat_request(message))
            .await
            .map_err(GatewayError::into_status)?;
        Ok(Response::new(Box::pin(events.map(move |event| {
            event
                .map(|event| convert::stream_event(&id, event))
                .map_err(GatewayError::into_status)
        }))))
    }

    async fn embed(
        &self,
        request: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let (metadata, extensions, message) = request.into_parts();
        let call = self.call(&metadata, &extensions, "Embed")?;
        let id = call.request_id.clone();
        let mut encoding = Default::default();
        match self
            .engine
            .embed(call, || {
                let req = convert_embed::embed_request(message)?;
                encoding = req.encoding;
                Ok(req)
            })
            .await
        {
            Ok(answer) => Ok(Response::new(convert_embed::embed_response(
                id, answer, encoding,
            ))),
            Err(err) => Err(err.into_status()),
        }
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let filter = request.into_inner().provider;
        let table = self.engine.table();
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
