//! `llm-gateway-mock`: a mock LLM provider speaking the providers' wire formats, with
//! scripted latency and faults, for tests, benchmarks and trying a config under faults.

use std::{process::ExitCode, time::Duration};

use clap::Parser;
use llm_gateway::mock_upstream::{MockSettings, MockUpstream};

/// A mock LLM provider speaking the OpenAI (and Azure OpenAI), Anthropic, Gemini, AWS Bedrock
/// and Google Vertex AI wire formats. Per-request faults are scripted with `+directive`
/// suffixes on the model name,
/// e.g. `gpt-4o-mini+status=429+retry_after=2`.
#[derive(Debug, Parser)]
#[command(name = "llm-gateway-mock", version, about)]
struct Args {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:8089")]
    listen: String,
    /// Median latency before answering, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Lognormal latencies around --latency-ms (the median) with this sigma of the log (0:
    /// constant).
    #[arg(long, default_value_t = 0.0)]
    latency_sigma: f64,
    /// Share of requests (0 to 1) that take --tail-ms instead.
    #[arg(long, default_value_t = 0.0)]
    tail_ratio: f64,
    /// Latency of the slow tail, in milliseconds.
    #[arg(long, default_value_t = 0)]
    tail_ms: u64,
    /// Stream chunks per reply.
    #[arg(long, default_value_t = 4)]
    chunks: usize,
    /// Delay between stream chunks, in milliseconds.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Share of requests (0 to 1) answered with --error-status.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// HTTP status of random errors.
    #[arg(long, default_value_t = 500)]
    error_status: u16,
    /// Requests per minute each API key may send; past it the provider's 429 with its
    /// rate-limit headers (0: unlimited).
    #[arg(long, default_value_t = 0)]
    requests_per_minute: u32,
    /// Write the test service account's key file (JSON, test-only credentials) for the Vertex
    /// endpoints to this path.
    #[arg(long)]
    vertex_key_file: Option<std::path::PathBuf>,
}

#[expect(
    clippy::print_stderr,
    reason = "reports startup problems to the terminal"
)]
#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("llm-gateway-mock: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let settings = MockSettings {
        latency: Duration::from_millis(args.latency_ms),
        latency_sigma: args.latency_sigma,
        tail_ratio: args.tail_ratio,
        tail_latency: Duration::from_millis(args.tail_ms),
        chunks: args.chunks,
        chunk_delay: Duration::from_millis(args.chunk_delay_ms),
        error_rate: args.error_rate,
        error_status: args.error_status,
        requests_per_minute: (args.requests_per_minute > 0).then_some(args.requests_per_minute),
        batch_delay: Duration::ZERO,
    };
    let mock = match MockUpstream::start_on(listener, settings) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("llm-gateway-mock: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(path) = &args.vertex_key_file
        && let Err(e) = std::fs::write(path, mock.vertex_service_account_json())
    {
        eprintln!("llm-gateway-mock: cannot write {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    eprintln!("llm-gateway-mock listening on http://{}", mock.addr());
    let _ = tokio::signal::ctrl_c().await;
    ExitCode::SUCCESS
}
