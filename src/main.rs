//! The `llm-gateway` binary: arguments -> config -> telemetry -> `server::run`. SIGHUP
//! reloads the configuration (provider keys, certificates; see `llm_gateway::reload`).

use std::{path::PathBuf, process::ExitCode, sync::Arc};

/// mimalloc instead of glibc's malloc: per-thread free lists without arena locks, and memory
/// that goes back to the OS, for a server that allocates and frees per call on every core
/// (measured in BENCHMARKS.md, issue 16).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use llm_gateway::{
    config::{Config, Overrides},
    server, telemetry,
};

/// A gRPC gateway to many LLM providers. With no config file it listens on
/// 127.0.0.1:50051, registers OpenAI when OPENAI_API_KEY is set, and otherwise serves the
/// built-in offline `mock` provider.
#[derive(Debug, Parser)]
#[command(name = "llm-gateway", version, about)]
struct Args {
    /// A TOML config file (optional; see README for the reference).
    #[arg(short, long, env = "LLM_GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// The gRPC listen address, e.g. 0.0.0.0:50051 (overrides `server.listen`).
    #[arg(long, env = "LLM_GATEWAY_LISTEN")]
    listen: Option<String>,
    /// Log filter, e.g. `info` or `llm_gateway=debug` (overrides `log.level`).
    #[arg(long, env = "LLM_GATEWAY_LOG")]
    log_level: Option<String>,
    /// Log format: `text` or `json` (overrides `log.format`).
    #[arg(long, env = "LLM_GATEWAY_LOG_FORMAT")]
    log_format: Option<String>,
    /// Data directory for the embedded store (overrides `store.path`).
    #[arg(long, env = "LLM_GATEWAY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The admin bearer token (overrides `admin.token`; at least 16 characters).
    #[arg(long, env = "LLM_GATEWAY_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// The Prometheus metrics address, or `off` (overrides `metrics.listen`).
    #[arg(long, env = "LLM_GATEWAY_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Validate the configuration, print a summary and exit.
    #[arg(long)]
    check_config: bool,
}

#[expect(
    clippy::print_stderr,
    clippy::print_stdout,
    reason = "the binary reports config problems and summaries to the terminal"
)]
fn main() -> ExitCode {
    // No transparent huge pages for this process: with the kernel's THP set to `always`, the
    // allocator's arenas are backed by 2 MiB pages, which doubled idle RSS (20 -> 37 MiB)
    // for no measured speed-up (BENCHMARKS.md, issue 16). Best effort: an old kernel says no.
    #[cfg(target_os = "linux")]
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    let args = Args::parse();
    let overrides = Overrides {
        listen: args.listen,
        log_level: args.log_level,
        log_format: args.log_format,
        data_dir: args.data_dir,
        admin_token: args.admin_token,
        metrics_listen: args.metrics_listen,
    };
    let config_path = args.config.clone();
    let config = match Config::load(args.config.as_deref(), &overrides, &|name| {
        std::env::var(name).ok()
    }) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("llm-gateway: {err}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        // Exactly the validation startup runs, with the message startup would log.
        if let Err(err) = server::check_config(&config) {
            eprintln!("llm-gateway: {err}");
            return ExitCode::from(2);
        }
        println!("configuration is valid");
        println!("  listen: {}", config.server.listen);
        for p in &config.providers {
            println!("  provider {}: {} {}", p.name, p.kind, p.base_url);
        }
        for p in &config.policies {
            println!("  policy {}: {} target(s)", p.name, p.targets.len());
        }
        match &config.store.url {
            Some(url) => println!("  store: {}", llm_gateway::store::redacted_url(url)),
            None => println!("  store: {}", config.store.path.display()),
        }
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("llm-gateway: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    // A reload reads the same file with the same overrides, and the environment again.
    let config_source: llm_gateway::reload::ConfigSource = Arc::new(move || {
        Config::load(config_path.as_deref(), &overrides, &|name| {
            std::env::var(name).ok()
        })
    });
    runtime.block_on(async move {
        let telemetry = telemetry::init(&config.log);
        let code = serve(config, config_source).await;
        telemetry.shutdown();
        code
    })
}

async fn serve(config: Config, config_source: llm_gateway::reload::ConfigSource) -> ExitCode {
    let reload_signal = Arc::new(tokio::sync::Notify::new());
    forward_sighup(reload_signal.clone());
    let listener = match tokio::net::TcpListener::bind(config.server.listen).await {
        Ok(l) => l,
        Err(err) => {
            tracing::error!(addr = %config.server.listen, error = %err, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    let options = server::ServeOptions {
        config_source: Some(config_source),
        reload_signal: Some(reload_signal),
        http_listener: None,
    };
    match server::run_with(config, listener, shutdown_signal(), options).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "gateway failed");
            ExitCode::FAILURE
        }
    }
}

/// Notifies `reload` on every SIGHUP (unix only).
fn forward_sighup(reload: Arc<tokio::sync::Notify>) {
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hangups) => {
            // Lives as long as the process; nothing to finish at shutdown.
            tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    tracing::info!("received SIGHUP: reloading the configuration");
                    reload.notify_one();
                }
            });
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGHUP; reload with the ReloadConfig rpc")
        }
    }
    #[cfg(not(unix))]
    let _ = reload;
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("received SIGINT"),
        () = term => tracing::info!("received SIGTERM"),
    }
}
