//! llm-gateway: a gRPC gateway that gives every team one typed API to many LLM providers,
//! and takes over routing, retries, failover, tail latency, deadlines and cost accounting.
//!
//! # Layout
//!
//! Dependencies point one way: `server -> executor -> {routing, providers} -> types/error`.
//!
//! - [`pb`]: generated protobuf/gRPC code and the reflection descriptor set.
//! - [`config`]: the TOML config file, env interpolation, overrides, validation.
//! - [`types`]: provider-neutral requests, messages, answers, stream events, usage, routes.
//! - [`error`]: [`error::GatewayError`] and its single mapping to gRPC statuses.
//! - [`models`]: the model registry (context windows, prices) and cost computation.
//! - [`providers`]: the [`providers::Provider`] trait, one file per provider, shared SSE
//!   decoding and the error taxonomy.
//! - [`routing`]: from the caller's `model` to a [`routing::Plan`].
//! - [`executor`]: deadlines, fallback, the stream commit point, cancellation.
//! - [`server`]: the tonic server, handlers, pb conversion, layers, shutdown.
//! - [`mock_upstream`]: an HTTP server speaking provider wire formats with scripted faults,
//!   used by tests, benchmarks and the `llm-gateway-mock` binary.
//! - [`reload`]: reloading provider keys and certificates without a restart (SIGHUP,
//!   `ReloadConfig`).
//! - [`tls`]: TLS and mutual TLS for the gRPC listeners, with certificate reload.
//! - [`telemetry`]: logging setup.

pub mod auth;
pub mod config;
pub mod error;
pub mod executor;
pub mod health;
pub mod ledger;
pub mod limits;
pub mod mock_upstream;
pub mod models;
pub mod pb;
pub mod providers;
pub mod reload;
pub mod routing;
pub mod server;
pub mod settings;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod types;
