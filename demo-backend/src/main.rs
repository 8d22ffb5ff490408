//! The `demo-backend` binary (a STAND-IN team backend): parse flags, set up logs,
//! bind, serve until SIGTERM/SIGINT.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use demo_backend::Args;
use tokio_util::sync::CancellationToken;

/// sysexits EX_USAGE: configuration errors are not worth a restart loop.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let config = match Args::parse().validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("demo-backend: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    shared::telemetry::init_tracing(config.log_format);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("demo-backend: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo-backend: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: demo_backend::Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("--listen: cannot bind {}", config.listen))?;
    tracing::info!(addr = %config.listen, "demo-backend (STAND-IN team backend) listening");
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signal.cancel();
    });
    demo_backend::run(listener, config, shutdown).await?;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
