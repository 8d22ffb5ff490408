//! `sb-cluster`: the local cluster's launcher and supervisor (`scripts/cluster`).
//! Parses the command line, sets up logging and runs the command.

use std::io::IsTerminal;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SB_CLUSTER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match faults::local::run(faults::local::Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sb-cluster: {e:#}");
            ExitCode::FAILURE
        }
    }
}
