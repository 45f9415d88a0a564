//! Routing plus the executor around a scripted instant fake provider: the gateway's own
//! cost per call between the gRPC handler and the provider adapter.

use std::{hint::black_box, sync::Arc, time::Duration};

use async_trait::async_trait;
use criterion::Criterion;
use futures_util::StreamExt;
use llm_gateway::{
    executor::{Executor, ExecutorSettings},
    health::{HealthRegistry, HealthSettings},
    models::ModelRegistry,
    providers::{EventStream, Provider, ProviderError, ProviderRegistry},
    routing::RoutingTable,
    types::{ChatRequest, ChatResponse, ContentPart, FinishReason, StreamEvent, Usage},
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::fixtures;

/// Answers at once with a fixed reply; streams a role-less 8-chunk reply.
struct Instant0;

const REPLY: [&str; 8] = [
    "Your", " order", " ships", " on", " Monday", ",", " Jane", ".",
];

fn usage() -> Usage {
    Usage {
        input_tokens: 64,
        output_tokens: 8,
        ..Usage::default()
    }
}

#[async_trait]
impl Provider for Instant0 {
    fn name(&self) -> &str {
        "fake"
    }

    // Priced like OpenAI, so the executor computes a cost as on the real path.
    fn kind(&self) -> &'static str {
        "openai"
    }

    async fn chat(
        &self,
        model: &str,
        _request: &ChatRequest,
    ) -> Result<ChatResponse, ProviderError> {
        Ok(ChatResponse {
            model: model.to_owned(),
            content: vec![ContentPart::Text(REPLY.concat())],
            finish_reason: FinishReason::Stop,
            usage: Some(usage()),
        })
    }

    async fn chat_stream(
        &self,
        _model: &str,
        _request: &ChatRequest,
    ) -> Result<EventStream, ProviderError> {
        let events = REPLY
            .iter()
            .map(|t| Ok(StreamEvent::Text((*t).to_owned())))
            .chain([
                Ok(StreamEvent::Usage(usage())),
                Ok(StreamEvent::Finish(FinishReason::Stop)),
            ]);
        Ok(Box::pin(futures_util::stream::iter(events)))
    }
}

pub fn bench(c: &mut Criterion) {
    let mut providers = ProviderRegistry::new();
    providers.insert(Arc::new(Instant0));
    let registry = ModelRegistry::builtin().expect("the built-in registry loads");
    let health = Arc::new(HealthRegistry::new(HealthSettings::default()));
    let table = RoutingTable::new(&providers, registry, &|_| None, health);
    let executor = Executor::new(ExecutorSettings::default(), CancellationToken::new());
    let request = ChatRequest {
        model: "fake/gpt-4o-mini".to_owned(),
        ..fixtures::request()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime starts");

    let mut g = c.benchmark_group("executor");
    g.bench_function("plan", |b| b.iter(|| table.plan(black_box(&request))));
    g.bench_function("chat", |b| {
        b.iter(|| {
            rt.block_on(async {
                let plan = table.plan(&request).expect("the model routes");
                let deadline = Instant::now() + Duration::from_secs(300);
                executor
                    .chat(&plan, &request, deadline, None)
                    .await
                    .map(|a| a.cost)
            })
        });
    });
    g.bench_function("chat_stream_8_chunks", |b| {
        b.iter(|| {
            rt.block_on(async {
                let plan = table.plan(&request).expect("the model routes");
                let deadline = Instant::now() + Duration::from_secs(300);
                let mut stream = executor
                    .chat_stream(&plan, &request, deadline, None)
                    .await
                    .expect("the fake stream opens");
                let mut events = 0;
                while let Some(event) = stream.next().await {
                    event.expect("the fake stream completes");
                    events += 1;
                }
                events
            })
        });
    });
    g.finish();
}
