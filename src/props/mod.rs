//! Property tests for every decoder a caller or an upstream can reach: the request
//! conversion (`server::convert`), the HTTP front's request bodies (`server::http`), the SSE
//! framing (`providers::sse`) and each provider's response and stream-event parsers. Each asserts that no input panics and that every error
//! is classified (a caller's input is never INTERNAL; an upstream's is an upstream class).
//!
//! `cargo test` runs [`DEFAULT_CASES`] cases per property; CI raises it with
//! `PROPTEST_CASES` (see `.ci/run`).

mod convert;
mod http;
mod providers;
mod sse;

/// Cases per property in a plain `cargo test`: enough to catch regressions, quick to run.
pub const DEFAULT_CASES: u32 = 64;

/// The proptest configuration: `PROPTEST_CASES` or [`DEFAULT_CASES`].
pub fn config() -> proptest::test_runner::Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    proptest::test_runner::Config {
        cases,
        // No `.proptest-regressions` files in the source tree.
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    }
}
