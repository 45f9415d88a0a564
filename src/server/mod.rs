//! The gRPC server: assembles the services (gateway, health, reflection), the layers, and
//! the shutdown sequence.
//!
//! The HTTP front ([`http`]) is a second surface over the same [`engine`].
//!
//! Request path, outermost first: tonic's HTTP/2 server -> [`request_id::RequestIdLayer`]
//! (id in extensions and response metadata) -> [`authz::AuthzLayer`] (the credential each
//! RPC requires, from one table) -> service router -> handler in
//! [`gateway`] (deadline, span, validation in [`convert`]) -> routing -> executor ->
//! provider.
//!
//! Connections arrive through [`conn::incoming`] (limits, handshakes) and streams pass
//! [`conn::StreamLayer`] (per-connection stream count) before the request id layer.
//!
//! Shutdown: the signal flips health to NOT_SERVING, long-lived admin streams (health Watch)
//! end, the listener stops accepting, in-flight
//! calls and streams get `shutdown_grace` to finish, then the rest are ended with UNAVAILABLE.

pub mod access;
pub mod admin;
pub mod admission;
pub mod authz;
pub mod batch;
pub mod cache_stage;
pub mod conn;
pub mod console;
pub mod convert;
pub mod convert_admin;
pub mod convert_embed;
pub mod convert_trial;
pub mod deadline;
pub mod engine;
pub mod framing;
pub mod gateway;
pub mod guarding;
pub mod http;
pub mod meter;
pub mod request_id;
pub mod settings;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::{
    config::Config,
    error::FieldViolation,
    executor::Executor,
    health::HealthRegistry,
    models::ModelRegistry,
    pb::{
        self, llm_gateway_admin_server::LlmGatewayAdminServer, llm_gateway_server::LlmGatewayServer,
    },
    providers::{self, ProviderRegistry},
    routing::{PolicyRecord, PolicySource, Router, RoutingTable, policy},
    store::{Store, StoreError, postgres::PgStore, sqlite::SqliteStore},
};

/// How long the usage ledger's final flush may take at shutdown.
const LEDGER_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    /// Policies in the config file are invalid.
    #[error("invalid policies in the config file:\n{}", .0.iter().map(|v| format!("  - {}: {}", v.field, v.description)).collect::<Vec<_>>().join("\n"))]
    Policies(Vec<FieldViolation>),
    /// The admin token file could not be read or written.
    #[error("admin token file {path}: {source}")]
    AdminToken {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The TLS certificate, key or client CA is unusable.
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The HTTP front failed.
    #[error("http front failed: {0}")]
    HttpFront(std::io::Error),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// Builds the configured providers, sharing one HTTP client. Each HTTP provider gets a
/// [`providers::KeyRing`] with its keys, which a reload swaps in place.
pub fn providers_from_config(config: &Config) -> Result<ProviderRegistry, ServeError> {
    let client = providers::Upstream::new(&config.upstream.http, false)?;
    let h2c = match config.providers.iter().any(|p| p.http2_prior_knowledge) {
        true => Some(providers::Upstream::new(&config.upstream.http, true)?),
        false => None,
    };
    let mut registry = ProviderRegistry::new();
    // One limiter for every provider account of this process; with `[shared]`, one that
    // keeps capacity in Redis once `serve_with` has the connection.
    let limiter: Arc<dyn crate::pacing::Limiter> = match config.shared.redis_url {
        Some(_) => Arc::new(crate::pacing::SharedLimiter::new()),
        None => Arc::new(crate::pacing::LocalLimiter::new()),
    };
    for p in &config.providers {
        let keys = Arc::new(providers::KeyRing::new(
            &p.name,
            p.api_keys.clone(),
            config.upstream.key_auth_rest,
        ));
        if config.pacing.enabled {
            keys.set_pacer(Arc::new(crate::pacing::Pacer::new(
                &p.name,
                p.pacing,
                &config.pacing,
                limiter.clone(),
            )));
        }
        let provider = match (&h2c, p.http2_prior_knowledge) {
            (Some(h2c), true) => p.build(keys, h2c),
            _ => p.build(keys, &client),
        };
        registry.insert(provider);
    }
    Ok(registry)
}

/// Builds the routing table for `config` over `providers`.
pub fn routing_table(
    config: &Config,
    providers: &ProviderRegistry,
    health: Arc<HealthRegistry>,
) -> Result<RoutingTable, ServeError> {
    let registry = ModelRegistry::builtin()?;
    let allowed = |name: &str| {
        config
            .providers
            .iter()
            .find(|p| p.name == name)?
            .allowed_models()
    };
    let mut table = RoutingTable::new(providers, registry.clone(), &allowed, health);
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
    table.set_guardrails(config.guardrails.profiles.keys().cloned());
    Ok(table)
}

/// What a running gateway needs beyond its config: where a reload reads the configuration
/// from, and what triggers one besides the `ReloadConfig` RPC.
#[derive(Default)]
pub struct ServeOptions {
    /// Reads the configuration afresh; without one, reloads fail with FAILED_PRECONDITION.
    pub config_source: Option<crate::reload::ConfigSource>,
    /// Every notification reloads (the binary's SIGHUP handler notifies it).
    pub reload_signal: Option<Arc<tokio::sync::Notify>>,
    /// A bound listener for the HTTP front, used instead of binding `http.listen`.
    pub http_listener: Option<TcpListener>,
}

/// Runs the gateway on `listener` until `shutdown` resolves, with the providers `config`
/// describes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    run_with(config, listener, shutdown, ServeOptions::default()).await
}

/// Like [`run`], with reload options.
pub async fn run_with(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    options: ServeOptions,
) -> Result<(), ServeError> {
    let providers = providers_from_config(&config)?;
    serve_with(config, providers, listener, shutdown, options).await
}

/// Like [`run`], with an explicit provider registry (tests register scripted fakes here).
pub async fn serve(
    config: Config,
    providers: ProviderRegistry,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_with(
        config,
        providers,
        listener,
        shutdown,
        ServeOptions::default(),
    )
    .await
}

/// What startup validates before it opens anything, and `--check-config` runs too.
pub struct Checked {
    /// The loaded certificates, when TLS is configured.
    pub tls: Option<Arc<crate::tls::TlsState>>,
    /// The routing table over the providers.
    pub table: RoutingTable,
    /// The config file's policies, validated against the table.
    pub config_policies: Vec<PolicyRecord>,
}

/// The one validation of a loaded config that startup runs (and `--check-config`, through
/// [`check_config`]): TLS files, the model table, config policies against the providers,
/// and a stored admin token being readable. Side-effect free: nothing is bound, opened for
/// writing or generated.
pub fn check(config: &Config, providers: &ProviderRegistry) -> Result<Checked, ServeError> {
    let tls = config
        .tls
        .as_ref()
        .map(crate::tls::TlsState::load)
        .transpose()?;
    let health_registry = Arc::new(HealthRegistry::new(config.health.clone()));
    let table = routing_table(config, providers, health_registry)?;
    // Config policies are validated against the providers; they are read-only via the API.
    let mut violations = Vec::new();
    let mut config_policies = Vec::new();
    for spec in &config.policies {
        violations.extend(policy::validate(
            spec,
            &table,
            &format!("policies.{}", spec.name),
        ));
        config_policies.push(PolicyRecord {
            spec: spec.clone(),
            version: 1,
            created_ms: 0,
            updated_ms: 0,
            source: PolicySource::Config,
        });
    }
    if !violations.is_empty() {
        return Err(ServeError::Policies(violations));
    }
    stored_admin_token(config)?;
    Ok(Checked {
        tls,
        table,
        config_policies,
    })
}

/// `--check-config`: builds the providers as startup does and runs [`check`].
pub fn check_config(config: &Config) -> Result<(), ServeError> {
    check(config, &providers_from_config(config)?).map(|_| ())
}

/// Like [`serve`], with reload options.
pub async fn serve_with(
    config: Config,
    providers: ProviderRegistry,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    options: ServeOptions,
) -> Result<(), ServeError> {
    let Checked {
        tls,
        table,
        config_policies,
    } = check(&config, &providers)?;
    let reloader = Arc::new(crate::reload::Reloader::new(
        options.config_source,
        config.clone(),
        providers.clone(),
        tls.clone(),
    ));
    let background = tokio_util::task::TaskTracker::new();
    let stop_background = CancellationToken::new();
    if let Some(state) = &tls {
        let interval = config
            .tls
            .as_ref()
            .map_or(Duration::from_secs(5), |t| t.reload_interval);
        background.spawn(state.clone().watch(interval, stop_background.clone()));
    }
    let (store, pg_pool): (Arc<dyn Store>, _) = match &config.store.url {
        Some(url) => {
            let pg = PgStore::connect(url).await?;
            let pool = pg.pool();
            (Arc::new(pg), Some(pool))
        }
        None => (Arc::new(SqliteStore::open(&config.store.path)?), None),
    };
    let shared = crate::shared::Shared::connect(&config.shared).map_err(|e| {
        ServeError::Store(StoreError::Backend(format!(
            "cannot set up shared state: {e}"
        )))
    })?;
    if let Some(shared) = &shared {
        share_rests(shared, table.health(), &background, &stop_background);
        share_key_rests(shared, &providers, &background, &stop_background);
        for pacer in providers.iter().filter_map(|p| p.keys()?.pacer()) {
            pacer.limiter().share(shared);
        }
    }
    let router = Arc::new(Router::new(table));
    let stop_metrics = CancellationToken::new();
    let admin_token = admin_token(&config)?;
    let limits = crate::limits::Limits::with_shared(shared.clone());
    limits.prepare().await;
    limits.background(&background, &stop_background);
    seed_spend(&*store, &limits).await;
    let access = Arc::new(access::Access::new(
        Arc::new(crate::auth::KeyRing::new()),
        limits,
        admin_token,
        config.auth.require_keys,
        config.teams.clone(),
    ));
    let hard_stop = CancellationToken::new();
    let executor = Executor::new(config.executor.clone(), hard_stop.clone());
    let (ledger, ledger_writer) = match config.ledger.capacity {
        Some(capacity) => {
            let (ledger, writer) = crate::ledger::Ledger::start_with_tenants(
                store.clone(),
                capacity,
                config.ledger.retention,
                config.ledger.rollup_retention,
                config.ledger.tenant_retention.clone(),
            );
            (ledger, Some(writer))
        }
        None => (crate::ledger::Ledger::disabled(), None),
    };
    crate::providers::set_body_logging(config.log.bodies);

    let meter = meter::MeterConfig {
        ledger,
        tag_labels: config.metrics.tag_labels.clone().into(),
    };
    // With shared state, replies live in Redis (every replica serves every replica's).
    let mut response_cache = match &shared {
        Some(shared) => crate::cache::ResponseCache::with_store(
            config.cache.clone(),
            Arc::new(crate::cache::RedisStore::new(
                shared.clone(),
                config.cache.semantic_max_entries,
            )),
        ),
        None => crate::cache::ResponseCache::new(config.cache.clone()),
    };
    if !config.cache.embedding_model.is_empty() {
        response_cache = response_cache.with_embedder(Arc::new(cache_stage::GatewayEmbedder {
            router: router.clone(),
            executor: executor.clone(),
            model: config.cache.embedding_model.clone(),
            meter: meter.clone(),
        }));
    }
    let response_cache = Arc::new(response_cache);
    let admin = admin::AdminService::new(
        access.clone(),
        router.clone(),
        store.clone(),
        config_policies,
        config
            .providers
            .iter()
            .map(|p| admin::ProviderInfo {
                name: p.name.clone(),
                kind: p.kind.to_owned(),
                base_url: p.base_url.clone(),
            })
            .collect(),
    )
    .with_reloader(reloader.clone())
    .with_cache(response_cache.clone());
    if let Some(signal) = options.reload_signal {
        background.spawn(reload_on(
            signal,
            reloader,
            admin.auditor().clone(),
            stop_background.clone(),
        ));
    }
    background.spawn(crate::audit::prune_loop(
        admin.auditor().sink(),
        config.audit.retention,
        crate::audit::wall_clock_ms,
        stop_background.clone(),
    ));
    admin.reload().await.map_err(|e| {
        ServeError::Store(StoreError::Backend(format!(
            "cannot load stored policies: {e}"
        )))
    })?;
    admin
        .reload_keys()
        .await
        .map_err(|e| ServeError::Store(StoreError::Backend(format!("cannot load keys: {e}"))))?;
    // Other replicas' writes reach this one's snapshot (a store only this process writes
    // reports nothing, and both tasks end at once).
    let admin = Arc::new(admin);
    let (changes_tx, changes_rx) = tokio::sync::mpsc::channel(256);
    // Staged rollouts: their driver moves steps on and asks for a new snapshot here.
    admin.rollouts().notify_to(changes_tx.clone());
    background.spawn(admin.rollouts().clone().run(stop_background.clone()));
    let follow_store = store.clone();
    let stop_follow = stop_background.clone();
    background.spawn(async move { follow_store.follow_changes(changes_tx, stop_follow).await });
    // The rollouts' driver holds a sender too: the follower ends with the background tasks.
    let follow_admin = admin.clone();
    let stop_following = stop_background.clone();
    background.spawn(async move {
        tokio::select! {
            () = follow_admin.follow(changes_rx) => {}
            () = stop_following.cancelled() => {}
        }
    });
    let admin_service = LlmGatewayAdminServer::from_arc(admin);

    // Metrics: the process-wide recorder, served on its own address.
    let metrics_handle = crate::telemetry::metrics_handle();
    let mut metrics_task = None;
    if let (Some(addr), Some(handle)) = (config.metrics.listen, metrics_handle) {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Listen { addr, source })?;
        tracing::info!(addr = %addr, "metrics on http://{addr}/metrics");
        metrics_task = Some(tokio::spawn(crate::telemetry::serve_metrics(
            listener,
            handle,
            stop_metrics.clone().cancelled_owned(),
        )));
    }
    let authz = authz::AuthzLayer::new(access.clone(), meter.clone());
    // The in-flight bound of chat calls, shared by the gRPC and HTTP fronts.
    let admission = admission::Admission::new(config.admission.clone());
    let admission_layer = admission::AdmissionLayer::new(admission.clone(), meter.clone());
    let batch_meter = meter.clone();
    let console_access = access.clone();
    let shadows =
        crate::experiments::shadow::ShadowPool::new(executor.clone(), meter.ledger.clone());
    let engine = engine::Engine::new(
        router,
        executor,
        access,
        deadline::CallLimits {
            default_timeout: config.server.default_call_timeout,
            max: config.server.max_call_duration,
            margin: config.server.deadline_margin,
        },
        meter,
    )
    .with_cache(response_cache)
    .with_guardrails(
        Arc::new(config.guardrails.clone()),
        providers::http_client(&config.upstream.http)?,
    )
    .with_shadows(shadows.clone());
    let batch_store: Arc<dyn crate::batch::BatchStore> = match pg_pool {
        // Claims are leases renewed by the store's heartbeat; one job's bound holds over
        // every replica.
        Some(pool) => {
            let options = crate::batch::postgres::PgBatchOptions {
                lease: config.batch.lease,
                job_concurrency: config.batch.job_concurrency,
            };
            let url = config.store.url.as_deref().unwrap_or_default();
            let store = Arc::new(
                crate::batch::postgres::PgBatchStore::open(pool, url, options)
                    .await
                    .map_err(|e| ServeError::Store(StoreError::Backend(e.to_string())))?,
            );
            background.spawn(store.clone().run(stop_background.clone()));
            store
        }
        None => Arc::new(
            crate::batch::sqlite::SqliteBatchStore::open(&config.store.path)
                .map_err(|e| ServeError::Store(StoreError::Backend(e.to_string())))?,
        ),
    };
    let batches = crate::batch::Batches::new(
        batch_store,
        Arc::new(
            batch::EngineExec::new(engine.clone())
                .with_native(batch::NativeAccounts::from_config(&config)?, batch_meter),
        ),
        config.batch.clone(),
    );
    batches
        .resume()
        .await
        .map_err(|e| ServeError::Store(StoreError::Backend(e.to_string())))?;
    if config.store.url.is_some() {
        // Replicas share the jobs: each runs those it does not run yet.
        background.spawn(
            batches
                .clone()
                .adopt(Duration::from_secs(2), stop_background.clone()),
        );
    }
    let gateway = gateway::GatewayService::new(engine.clone(), batches.clone());
    let http_listener = match (options.http_listener, config.http.listen) {
        (Some(listener), _) => Some(listener),
        (None, Some(addr)) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Listen { addr, source })?,
        ),
        (None, None) => None,
    };

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
    let gateway_service = LlmGatewayServer::new(gateway)
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_REQUEST_BYTES);
    // The console and the JSON mapping call the services in process, through the same
    // layers as a gRPC client's calls.
    let console = config.admin.console.then(|| {
        let grpc = tower::ServiceBuilder::new()
            .layer(request_id::RequestIdLayer)
            .layer(authz.clone())
            .layer(admission_layer.clone())
            .layer(framing::FramingLayer)
            .service(
                tonic::service::Routes::new(admin_service.clone())
                    .add_service(gateway_service.clone()),
            );
        console::Console::new(tower::util::BoxCloneSyncService::new(grpc), console_access)
    });
    // HTTP/1.1 connections to the listener that carries the Admin API go to the console.
    let admin_addr = match config.admin.listen {
        Some(addr) => Some(addr),
        None => local_addr,
    };
    let (console_sink, console_server) = match (console, admin_addr) {
        (Some(console), Some(addr)) => {
            let (sink, listener) = conn::Http1Listener::channel(addr);
            tracing::info!(addr = %addr, "console on http://{addr}/console");
            let stop = stop_accepting.clone().cancelled_owned();
            let serve = async move {
                // Serving only fails to accept, which this listener never does.
                let _ = axum::serve(listener, console.router())
                    .with_graceful_shutdown(stop)
                    .await;
            };
            (Some(sink), Some(serve))
        }
        _ => (None, None),
    };
    // Long-lived admin streams (health Watch) end when the drain begins.
    let drain_streams = CancellationToken::new();
    let stream_layer = conn::StreamLayer::new(drain_streams.clone());
    let mut builder = conn::apply(
        &config.connections,
        Server::builder()
            .tcp_nodelay(true)
            .max_concurrent_streams(config.admission.max_concurrent_streams),
    )
    .layer(stream_layer.clone())
    .layer(request_id::RequestIdLayer)
    .layer(authz.clone())
    .layer(admission_layer)
    .layer(framing::FramingLayer);
    let mut routes = builder
        .add_service(health_service.clone())
        .add_service(reflection_v1.clone())
        .add_service(reflection_v1alpha.clone())
        .add_service(gateway_service);
    // The builder keeps a copy of the layers, and the authorization layer a ledger sender.
    drop(builder);
    // The admin service goes on its own listener when one is configured (for mesh policies),
    // otherwise beside the gateway.
    let admin_server = match config.admin.listen {
        Some(addr) => {
            let admin_listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Listen { addr, source })?;
            tracing::info!(addr = %addr, "admin service on its own listener");
            let admin_routes =
                conn::apply(&config.connections, Server::builder().tcp_nodelay(true))
                    .layer(stream_layer)
                    .layer(request_id::RequestIdLayer)
                    .layer(authz)
                    .layer(framing::FramingLayer)
                    .add_service(health_service)
                    .add_service(reflection_v1)
                    .add_service(reflection_v1alpha)
                    .add_service(admin_service);
            Some(admin_routes.serve_with_incoming_shutdown(
                conn::incoming(
                    admin_listener,
                    tls.clone(),
                    config.connections.clone(),
                    "admin",
                    console_sink.clone(),
                ),
                stop_accepting.clone().cancelled_owned(),
            ))
        }
        None => {
            // The layer holds a ledger sender; only the servers may keep it, so that the
            // ledger drains as soon as they are dropped.
            drop(authz);
            routes = routes.add_service(admin_service);
            None
        }
    };
    let main_server = routes.serve_with_incoming_shutdown(
        conn::incoming(
            listener,
            tls,
            config.connections.clone(),
            "grpc",
            config
                .admin
                .listen
                .is_none()
                .then_some(console_sink)
                .flatten(),
        ),
        stop_accepting.clone().cancelled_owned(),
    );
    let grpc_server = async move {
        match admin_server {
            Some(admin_server) => {
                let (a, b) = tokio::join!(main_server, admin_server);
                a.and(b)
            }
            None => main_server.await,
        }
        .map_err(ServeError::from)
    };
    let http_server = http_listener.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(addr = %addr, "openai- and anthropic-compatible http on http://{addr}/v1");
        }
        let settings = config.http.clone();
        let stop = stop_accepting.clone().cancelled_owned();
        let admission = admission.clone();
        async move {
            http::serve(listener, engine, &settings, admission, stop)
                .await
                .map_err(ServeError::HttpFront)
        }
    });
    let server = async move {
        let console = async move {
            if let Some(console) = console_server {
                console.await;
            }
        };
        match http_server {
            Some(http_server) => {
                let (a, b, ()) = tokio::join!(grpc_server, http_server, console);
                a.and(b)
            }
            None => {
                let (a, ()) = tokio::join!(grpc_server, console);
                a
            }
        }
    };
    // Boxed (not stack-pinned) so that it can be dropped before the ledger is flushed.
    let mut server = Box::pin(server);

    health
        .set_serving::<LlmGatewayServer<gateway::GatewayService>>()
        .await;
    health
        .set_service_status(
            "llmgateway.v1.LlmGatewayAdmin",
            tonic_health::ServingStatus::Serving,
        )
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    tracing::info!(addr = ?local_addr, "llm-gateway serving");

    let result = tokio::select! {
        result = &mut server => result,
        () = shutdown => {
            tracing::info!(grace = ?config.server.shutdown_grace, "shutting down: draining in-flight calls");
            health
                .set_not_serving::<LlmGatewayServer<gateway::GatewayService>>()
                .await;
            health
                .set_service_status("llmgateway.v1.LlmGatewayAdmin", tonic_health::ServingStatus::NotServing)
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            // NOT_SERVING is in every Watch stream's channel: end them after it is sent.
            drain_streams.cancel();
            // Batch jobs start nothing new; their results streams end (readers reconnect).
            batches.stop_claiming();
            stop_accepting.cancel();
            match tokio::time::timeout(config.server.shutdown_grace, &mut server).await {
                Ok(result) => {
                    tracing::info!("all calls finished; stopped");
                    result
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
    };
    // Dropping the server drops the services, and with them the ledger's senders: the writer
    // then drains what is queued and stops.
    drop(server);
    // Batch requests still running get the grace period (the executor's hard stop may have
    // ended them already), then go back to pending for the next start.
    batches.shutdown(config.server.shutdown_grace).await;
    drop(batches);
    // Shadow calls still running are cancelled (they are never worth a wait).
    shadows.close().await;
    stop_metrics.cancel();
    stop_background.cancel();
    background.close();
    background.wait().await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    if let Some(writer) = ledger_writer {
        writer.finish(LEDGER_FLUSH_TIMEOUT).await;
    }
    result
}

/// Reloads on every notification of `signal` until `stop`.
async fn reload_on(
    signal: Arc<tokio::sync::Notify>,
    reloader: Arc<crate::reload::Reloader>,
    auditor: crate::audit::Auditor,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = signal.notified() => {}
        }
        match reloader.reload().await {
            Ok(report) => {
                let entry = admin::reload_entry("signal:SIGHUP".to_owned(), &report);
                let _ = auditor.record(entry).await;
            }
            Err(err) => {
                tracing::error!(error = %err, "reload failed; the running configuration stays")
            }
        }
    }
}

/// Where a generated admin token is kept: `admin-token` beside the store (`None` for an
/// in-memory store).
fn admin_token_path(config: &Config) -> Option<std::path::PathBuf> {
    (config.store.path != std::path::Path::new(":memory:")).then(|| {
        config
            .store
            .path
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("admin-token")
    })
}

/// The admin token that exists already: configured, or stored by an earlier start. An
/// unreadable token file is an error.
fn stored_admin_token(config: &Config) -> Result<Option<String>, ServeError> {
    if let Some(token) = &config.admin.token {
        return Ok(Some(token.clone()));
    }
    let Some(path) = admin_token_path(config) else {
        return Ok(None);
    };
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => Ok(Some(token.trim().to_owned())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ServeError::AdminToken { path, source }),
    }
}

/// The admin token: configured, or generated once and kept in `admin-token` beside the store
/// (readable only by the owner). An in-memory store gets a fresh random token per start.
fn admin_token(config: &Config) -> Result<String, ServeError> {
    if let Some(token) = stored_admin_token(config)? {
        return Ok(token);
    }
    let generated = || -> Result<String, ServeError> {
        let mut bytes = [0u8; 32];
        crate::auth::secure_random(&mut bytes)
            .map_err(|e| ServeError::Store(StoreError::Backend(e.to_string())))?;
        Ok(format!("lgw-admin-{}", crate::auth::hex(&bytes)))
    };
    let Some(path) = admin_token_path(config) else {
        tracing::warn!(
            "no admin token configured and the store is in memory: admin calls are refused until admin.token is set"
        );
        return generated();
    };
    let token = generated()?;
    write_private(&path, &token).map_err(|source| ServeError::AdminToken {
        path: path.clone(),
        source,
    })?;
    tracing::info!(path = %path.display(), "generated an admin token; admin calls need `authorization: Bearer <contents of this file>`");
    Ok(token)
}

fn write_private(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

/// Rests targets on every replica together: this replica's rests are published, the
/// others' applied (see [`crate::shared::rests`]).
fn share_rests(
    shared: &Arc<crate::shared::Shared>,
    health: &Arc<HealthRegistry>,
    background: &tokio_util::task::TaskTracker,
    stop: &CancellationToken,
) {
    let rests = crate::shared::rests::Rests::new(shared.clone(), crate::shared::rests::TARGETS);
    let publisher = rests.clone();
    health.on_rest(crate::health::RestHook(Arc::new(
        move |provider, model, rest| {
            publisher.publish(&[provider, model], rest);
        },
    )));
    let registry = health.clone();
    let apply: crate::shared::rests::Apply = Arc::new(move |fields, rest| {
        if let [provider, model] = fields {
            registry
                .get(provider, model)
                .rest_from_peer(rest, tokio::time::Instant::now());
        }
    });
    background.spawn(rests.run(apply, stop.clone()));
}

/// Rests refused or rate-limited provider API keys on every replica together: each ring's
/// rests are published (by key fingerprint, never the secret), the others' applied to the
/// key with that fingerprint (see [`crate::shared::rests::KEYS`]).
fn share_key_rests(
    shared: &Arc<crate::shared::Shared>,
    providers: &ProviderRegistry,
    background: &tokio_util::task::TaskTracker,
    stop: &CancellationToken,
) {
    let rests = crate::shared::rests::Rests::new(shared.clone(), crate::shared::rests::KEYS);
    for ring in providers.iter().filter_map(|p| p.keys()) {
        let publisher = rests.clone();
        ring.on_rest(providers::keys::KeyRestHook(Arc::new(
            move |provider, fingerprint, reason, rest| {
                let fingerprint = format!("{fingerprint:016x}");
                let fields = [provider, &fingerprint, reason.label()];
                if rest.is_zero() && reason == providers::keys::KeyRestReason::Refused {
                    // A reload ended the refusal here: end it everywhere.
                    publisher.end(&fields);
                } else {
                    publisher.publish(&fields, rest);
                }
            },
        )));
    }
    let providers = providers.clone();
    let apply: crate::shared::rests::Apply = Arc::new(move |fields, rest| {
        if let [provider, fingerprint, reason] = fields
            && let Ok(fingerprint) = u64::from_str_radix(fingerprint, 16)
            && let Some(reason) = providers::keys::KeyRestReason::from_label(reason)
            && let Some(ring) = providers.get(provider).and_then(|p| p.keys())
        {
            if rest.is_zero() && reason == providers::keys::KeyRestReason::Refused {
                ring.end_refusal_from_peer(fingerprint);
            } else {
                ring.rest_from_peer(fingerprint, reason, rest);
            }
        }
    });
    background.spawn(rests.run(apply, stop.clone()));
}

/// Seeds budget spend for the current UTC day and month from the usage ledger's rollups
/// (one row per day, key and team: bounded however busy the month was), so a restart does
/// not reset budgets.
async fn seed_spend(store: &dyn Store, limits: &crate::limits::Limits) {
    let now = access::now_ms();
    let (today, month) = crate::limits::periods(now);
    // The month started at most 31 days ago.
    let days = match store.day_spend(now - 32 * 86_400_000).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read usage to seed budgets");
            return;
        }
    };
    let mut spend: std::collections::HashMap<String, (f64, f64)> = std::collections::HashMap::new();
    for d in days {
        let (day, rec_month) = crate::limits::periods(d.day.saturating_mul(86_400_000));
        if rec_month != month {
            continue;
        }
        let mut add = |subject: String| {
            let entry = spend.entry(subject).or_default();
            entry.1 += d.cost_usd;
            if day == today {
                entry.0 += d.cost_usd;
            }
        };
        if !d.key.is_empty() {
            add(format!("key:{}", d.key));
        }
        if !d.team.is_empty() {
            add(format!("team:{}", d.team));
        }
    }
    for (subject, (day_usd, month_usd)) in spend {
        limits.seed_spend(&subject, now, day_usd, month_usd).await;
    }
}
