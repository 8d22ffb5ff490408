//! `faults`: the fault-injection driver. Parses the command line, sets up logging
//! and runs the suite; exits 1 when a scenario failed.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    faults::init_logging("FAULTS_LOG");
    let cli = faults::cli::Cli::parse();
    let pass = faults::run(cli).await?;
    if !pass {
        std::process::exit(1);
    }
    Ok(())
}
