//! Logging and tracing setup. Log lines are structured (data in fields), text by default or
//! JSON lines for log pipelines. Prompts, replies and secrets are never logged.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogConfig;

/// Installs the global subscriber. Logs go to stderr.
pub fn init(log: &LogConfig) {
    let filter = EnvFilter::try_new(&log.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    if log.json {
        let _ = registry
            .with(
                fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_current_span(true),
            )
            .try_init();
    } else {
        let _ = registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init();
    }
}
