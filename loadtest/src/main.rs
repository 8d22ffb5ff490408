//! `loadtest`: the Switchboard load generator (see loadtest/README.md).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = switchboard_loadtest::cli::Cli::parse();
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(switchboard_loadtest::run(cli, args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}
