//! The `demo-backend` binary (a STAND-IN team backend): parse flags, set up logs,
//! bind, serve until SIGTERM/SIGINT.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use demo_backend::Args;
use shared::service::Start;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let start = Args::parse().validate().map(|config| {
        let log_format = config.log_format;
        Start::Serve(config, log_format)
    });
    shared::service::main("demo-backend", start, serve)
}

async fn serve(config: demo_backend::Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("--listen: cannot bind {}", config.listen))?;
    tracing::info!(addr = %config.listen, "demo-backend (STAND-IN team backend) listening");
    demo_backend::run(listener, config, shutdown).await?;
    Ok(())
}
