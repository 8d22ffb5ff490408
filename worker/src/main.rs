//! The worker binary: parse config, set up telemetry, bind the admin port, run until
//! SIGTERM/SIGINT.

use std::process::ExitCode;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use worker::RawConfig;

/// sysexits EX_USAGE: configuration errors are not worth a restart loop.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let raw = match RawConfig::load(std::env::args_os()) {
        Ok(r) => r,
        Err(e) => return config_error(&e),
    };
    let config = match raw.validate() {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    if raw.check_config {
        println!("config ok: {}", config.summary());
        return ExitCode::SUCCESS;
    }
    shared::telemetry::init_tracing(config.log_format);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "worker failed");
            eprintln!("worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn config_error(e: &shared::config::ConfigError) -> ExitCode {
    eprintln!("worker: {e}");
    ExitCode::from(EXIT_CONFIG)
}

async fn serve(config: worker::Config) -> anyhow::Result<()> {
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("SB_ADMIN_LISTEN: cannot bind {}", config.admin_listen))?;
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signal.cancel();
    });
    worker::run(admin, config, shutdown).await?;
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
