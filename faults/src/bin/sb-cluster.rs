//! `sb-cluster`: the local cluster's launcher and supervisor (`scripts/cluster`).
//! Parses the command line, sets up logging and runs the command.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    faults::init_logging("SB_CLUSTER_LOG");
    match faults::local::run(faults::local::Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sb-cluster: {e:#}");
            ExitCode::FAILURE
        }
    }
}
