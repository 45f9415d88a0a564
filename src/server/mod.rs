//! The gRPC server: assembles the services (gateway, health, reflection), the layers, and
//! the shutdown sequence.
//!
//! Request path, outermost first: tonic's HTTP/2 server -> [`request_id::RequestIdLayer`]
//! (id in extensions and response metadata) -> service router -> handler in
//! [`gateway`] (deadline, span, validation in [`convert`]) -> routing -> executor ->
//! provider.
//!
//! Shutdown: the signal flips health to NOT_SERVING, the listener stops accepting, in-flight
//! calls and streams get `shutdown_grace` to finish, then the rest are ended with UNAVAILABLE.

pub mod convert;
pub mod deadline;
pub mod gateway;
pub mod request_id;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::{
    config::{Config, ProviderKind},
    executor::{Executor, ExecutorSettings},
    models::ModelRegistry,
    pb::{self, llm_gateway_server::LlmGatewayServer},
    providers::{self, Provider, ProviderRegistry, mock::Mock, openai},
    routing::RoutingTable,
};

/// The largest request message accepted (inline images make requests large).
pub const MAX_REQUEST_BYTES: usize = 32 * 1024 * 1024;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The HTTP client could not be built.
    #[error("cannot build the http client: {0}")]
    HttpClient(#[from] reqwest::Error),
    /// The built-in model registry is broken (a build problem).
    #[error("the built-in model registry is invalid: {0}")]
    Registry(#[from] toml::de::Error),
    /// The transport failed.
    #[error("grpc server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection could not be set up.
    #[error("reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Builds the configured providers, sharing one HTTP client.
pub fn providers_from_config(config: &Config) -> Result<ProviderRegistry, ServeError> {
    let client = providers::http_client(&config.http)?;
    let mut registry = ProviderRegistry::new();
    for p in &config.providers {
        let provider: Arc<dyn Provider> = match &p.kind {
            ProviderKind::OpenAi {
                max_tokens_field,
                developer_role,
                stream_usage,
            } => {
                let mut c = openai::OpenAiConfig::new(&p.name, &p.base_url, p.api_key.clone());
                c.max_tokens_field = *max_tokens_field;
                c.developer_role = *developer_role;
                c.stream_usage = *stream_usage;
                Arc::new(openai::OpenAi::new(c, client.clone()))
            }
            ProviderKind::Mock => Arc::new(Mock::new(&p.name)),
        };
        registry.insert(provider);
    }
    Ok(registry)
}

/// Builds the routing table for `config` over `providers`.
pub fn routing_table(
    config: &Config,
    providers: &ProviderRegistry,
) -> Result<RoutingTable, ServeError> {
    let registry = ModelRegistry::builtin()?;
    let allowed = |name: &str| {
        let p = config.providers.iter().find(|p| p.name == name)?;
        match (&p.models, &p.kind) {
            (Some(models), _) => Some(models.clone()),
            (None, ProviderKind::Mock) => Some(
                providers::mock::MODELS
                    .iter()
                    .map(|m| (*m).to_owned())
                    .collect(),
            ),
            (None, _) => None,
        }
    };
    let mut table = RoutingTable::new(providers, registry.clone(), &allowed);
    for raw in &config.models {
        let Some(provider) = providers.get(&raw.provider) else {
            continue;
        };
        let info = match table.model_info(&raw.provider, &raw.model) {
            Some(base) => raw.clone().overlay(&base),
            None => ModelRegistry::from_raw(raw.clone(), provider.kind()),
        };
        table.set_model_info(&raw.provider, info);
    }
    Ok(table)
}

/// Runs the gateway on `listener` until `shutdown` resolves, with the providers `config`
/// describes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let providers = providers_from_config(&config)?;
    serve(config, providers, listener, shutdown).await
}

/// Like [`run`], with an explicit provider registry (tests register scripted fakes here).
pub async fn serve(
    config: Config,
    providers: ProviderRegistry,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let table = Arc::new(routing_table(&config, &providers)?);
    let hard_stop = CancellationToken::new();
    let executor = Executor::new(
        ExecutorSettings {
            stream_idle_timeout: config.stream_idle_timeout,
        },
        hard_stop.clone(),
    );
    let gateway = gateway::GatewayService::new(
        table,
        executor,
        deadline::CallLimits {
            default_timeout: config.default_call_timeout,
            max: config.max_call_duration,
            margin: config.deadline_margin,
        },
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let stop_accepting = CancellationToken::new();
    let local_addr = listener.local_addr().ok();
    let server = Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .layer(request_id::RequestIdLayer)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            LlmGatewayServer::new(gateway)
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_REQUEST_BYTES),
        )
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            stop_accepting.clone().cancelled_owned(),
        );
    let mut server = std::pin::pin!(server);

    health
        .set_serving::<LlmGatewayServer<gateway::GatewayService>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    tracing::info!(addr = ?local_addr, "llm-gateway serving");

    tokio::select! {
        result = &mut server => return result.map_err(Into::into),
        () = shutdown => {}
    }

    tracing::info!(grace = ?config.shutdown_grace, "shutting down: draining in-flight calls");
    health
        .set_not_serving::<LlmGatewayServer<gateway::GatewayService>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    stop_accepting.cancel();
    match tokio::time::timeout(config.shutdown_grace, &mut server).await {
        Ok(result) => {
            tracing::info!("all calls finished; stopped");
            result.map_err(Into::into)
        }
        Err(_) => {
            tracing::warn!("shutdown grace period over; ending the remaining calls");
            hard_stop.cancel();
            // Give the ended calls a moment to send their status.
            let _ = tokio::time::timeout(Duration::from_millis(500), &mut server).await;
            Ok(())
        }
    }
}
