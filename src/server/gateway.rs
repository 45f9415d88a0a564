//! The `llmgateway.v1.LlmGateway` handlers. They are thin: read the call's metadata, hand
//! the request (converted and validated in [`convert`]) to the shared [`Engine`], convert the
//! answer and map errors to statuses.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, metadata::MetadataMap};

use super::{
    authz, batch, convert, convert_embed,
    deadline::call_deadline,
    engine::{Call, Credential, Engine, trace_context},
    request_id::RequestId,
};
use crate::{
    error::GatewayError,
    pb::{self, llm_gateway_server::LlmGateway},
};

/// The gateway service: a thin adapter from gRPC to the shared [`Engine`] and the batch
/// runner.
#[derive(Clone)]
pub struct GatewayService {
    engine: Engine,
    batches: crate::batch::Batches,
}

impl GatewayService {
    /// A service running calls on `engine` and batch jobs on `batches`.
    pub fn new(engine: Engine, batches: crate::batch::Batches) -> Self {
        Self { engine, batches }
    }

    /// The owner of the batch jobs the caller creates and sees.
    fn batch_owner(extensions: &tonic::Extensions) -> Result<String, Status> {
        let principal = authz::principal(extensions).map_err(GatewayError::into_status)?;
        Ok(batch::owner(principal.key()))
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
type BatchResultStream =
    Pin<Box<dyn Stream<Item = Result<pb::StreamBatchResultsResponse, Status>> + Send>>;

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

    async fn create_batch(
        &self,
        request: Request<pb::CreateBatchRequest>,
    ) -> Result<Response<pb::CreateBatchResponse>, Status> {
        let owner = Self::batch_owner(request.extensions())?;
        let job = batch::new_job(request.into_inner(), owner, &self.batches)
            .map_err(GatewayError::into_status)?;
        let job = self
            .batches
            .create(job)
            .await
            .map_err(GatewayError::into_status)?;
        Ok(Response::new(pb::CreateBatchResponse {
            batch: Some(batch::batch_out(job)),
        }))
    }

    async fn get_batch(
        &self,
        request: Request<pb::GetBatchRequest>,
    ) -> Result<Response<pb::GetBatchResponse>, Status> {
        let owner = Self::batch_owner(request.extensions())?;
        let job = self
            .batches
            .get(&owner, &request.into_inner().batch_id)
            .await
            .map_err(GatewayError::into_status)?;
        Ok(Response::new(pb::GetBatchResponse {
            batch: Some(batch::batch_out(job)),
        }))
    }

    type StreamBatchResultsStream = BatchResultStream;

    async fn stream_batch_results(
        &self,
        request: Request<pb::StreamBatchResultsRequest>,
    ) -> Result<Response<Self::StreamBatchResultsStream>, Status> {
        let owner = Self::batch_owner(request.extensions())?;
        let results = batch::results(&self.batches, &owner, request.into_inner())
            .await
            .map_err(GatewayError::into_status)?;
        Ok(Response::new(Box::pin(
            results.map(|r| r.map_err(GatewayError::into_status)),
        )))
    }

    async fn cancel_batch(
        &self,
        request: Request<pb::CancelBatchRequest>,
    ) -> Result<Response<pb::CancelBatchResponse>, Status> {
        let owner = Self::batch_owner(request.extensions())?;
        let job = self
            .batches
            .cancel(&owner, &request.into_inner().batch_id)
            .await
            .map_err(GatewayError::into_status)?;
        Ok(Response::new(pb::CancelBatchResponse {
            batch: Some(batch::batch_out(job)),
        }))
    }

    async fn list_batches(
        &self,
        request: Request<pb::ListBatchesRequest>,
    ) -> Result<Response<pb::ListBatchesResponse>, Status> {
        let owner = Self::batch_owner(request.extensions())?;
        batch::list(&self.batches, &owner, request.into_inner())
            .await
            .map(Response::new)
            .map_err(GatewayError::into_status)
    }
}
