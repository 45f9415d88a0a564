//! Integration tests: the real server on 127.0.0.1:0, called through the generated client,
//! against mock upstreams that speak each provider's wire format.

// Test helpers outside `#[test]` functions may fail loudly too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

mod admin;
mod authz;
mod bad_input;
mod chat;
mod check_config;
mod cloud;
mod conn;
mod console;
mod deploy;
mod errors;
mod executor;
mod http;
mod keys;
mod observability;
mod providers;
mod reasons;
mod security;
mod server;
mod stream;
