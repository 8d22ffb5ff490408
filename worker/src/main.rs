//! The worker binary: parse config, set up telemetry, bind the admin port, run until
//! SIGTERM/SIGINT. Started with `worker::pdf::EXTRACTOR_ARG` it is instead a PDF
//! extractor child of a worker (see `worker::pdf`).

use std::process::ExitCode;

use anyhow::Context;
use shared::config::ConfigError;
use shared::service::Start;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use worker::RawConfig;

fn main() -> ExitCode {
    // Before config: the extractor runs with an empty environment and no flags.
    if worker::pdf::is_extractor_call() {
        return worker::pdf::extractor_main();
    }
    shared::service::main("worker", start(), serve)
}

fn start() -> Result<Start<worker::Config>, ConfigError> {
    let raw = RawConfig::load(std::env::args_os())?;
    let config = raw.validate()?;
    let log_format = config.cluster.log_format;
    Ok(Start::new(raw.check_config, config, log_format, |c| {
        c.summary().to_string()
    }))
}

async fn serve(config: worker::Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let admin = TcpListener::bind(config.cluster.admin_listen)
        .await
        .with_context(|| {
            format!(
                "SB_ADMIN_LISTEN: cannot bind {}",
                config.cluster.admin_listen
            )
        })?;
    worker::run(admin, config, shutdown).await?;
    Ok(())
}
