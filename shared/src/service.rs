//! What every Switchboard binary does around its library's `run`: a configuration
//! error exits 64 naming the key, `--check-config` prints and exits 0, then logs, the
//! runtime, and SIGTERM/SIGINT turned into the shutdown token `run` watches.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::telemetry::{LogFormat, init_tracing};

/// sysexits EX_USAGE: configuration errors are not worth a restart loop.
pub const EXIT_CONFIG: u8 = 64;

/// What a binary's configuration step decided.
pub enum Start<C> {
    /// Serve with this configuration, logging in this format.
    Serve(C, LogFormat),
    /// `--check-config` passed: print this line and exit 0.
    Checked(String),
}

impl<C> Start<C> {
    /// After validation: `--check-config` (`check_only`) reports `config ok` with the
    /// summary of what would run; otherwise serve.
    pub fn new(
        check_only: bool,
        config: C,
        log_format: LogFormat,
        summary: impl FnOnce(&C) -> String,
    ) -> Start<C> {
        if check_only {
            Start::Checked(format!("config ok: {}", summary(&config)))
        } else {
            Start::Serve(config, log_format)
        }
    }
}

/// Runs a binary: `start` is its parsed and validated configuration (or the error
/// that names the bad key); `serve` binds and calls the library's `run` with the
/// shutdown token. Returns the process exit code.
pub fn main<C, E, Fut>(
    name: &str,
    start: Result<Start<C>, impl Display>,
    serve: impl FnOnce(C, CancellationToken) -> Fut,
) -> ExitCode
where
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let (config, log_format) = match start {
        Ok(Start::Serve(config, log_format)) => (config, log_format),
        Ok(Start::Checked(line)) => {
            println!("{line}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap prints its own help/version text through this path too.
            eprintln!("{name}: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_tracing(log_format);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = rt.block_on(async {
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            signal.cancel();
        });
        serve(config, shutdown).await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), binary = name, "failed");
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM (Kubernetes, the cluster scripts) or SIGINT (a terminal).
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
