//! Integration tests: the real server on 127.0.0.1:0, called through the generated client,
//! against mock upstreams that speak each provider's wire format.

// Test helpers outside `#[test]` functions may fail loudly too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

mod admin;
mod audit;
mod authz;
mod bad_input;
mod batch;
mod batch_pg;
mod bench_shared;
mod cache;
mod cache_shared;
mod canary;
mod chat;
mod check_config;
mod cloud;
mod conn;
mod console;
mod deploy;
mod embed;
mod errors;
mod executor;
mod experiments;
mod governance;
mod guard;
mod guard_hooks;
mod http;
mod keys;
mod observability;
mod overload;
mod pg_server;
mod providers;
mod reasons;
mod redis_server;
mod scale_pg;
mod scale_redis;
mod security;
mod server;
mod shadow;
mod smoothing;
mod stream;
mod usage_sink;
