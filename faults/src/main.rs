//! `faults`: the fault-injection driver. Parses the command line, sets up logging
//! and runs the suite; exits 1 when a scenario failed.

use std::io::IsTerminal;

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FAULTS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a redirected log stays plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = faults::cli::Cli::parse();
    let pass = faults::run(cli).await?;
    if !pass {
        std::process::exit(1);
    }
    Ok(())
}
