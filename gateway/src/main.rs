//! The gateway binary: parse config, set up telemetry, bind, run until SIGTERM/SIGINT.

use std::process::ExitCode;

use anyhow::Context;
use gateway::{Listeners, RawConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// sysexits EX_USAGE: configuration errors are not worth a restart loop.
const EXIT_CONFIG: u8 = 64;
/// Listen backlog: a reconnect wave after a drain arrives thousands at a time; the
/// default 128 drops SYNs and costs clients a one-second retransmit.
const LISTEN_BACKLOG: u32 = 4096;

fn main() -> ExitCode {
    raise_open_file_limit();
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
            tracing::error!(error = format!("{e:#}"), "gateway failed");
            eprintln!("gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Every connection is a file descriptor: lift the soft limit to the hard one (some
/// container runtimes start processes at 1024). The per-node connection cap defaults
/// to this limit minus a reserve, so it must be raised before the config is read.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn config_error(e: &shared::config::ConfigError) -> ExitCode {
    // clap prints its own help/version text through this path too.
    eprintln!("gateway: {e}");
    ExitCode::from(EXIT_CONFIG)
}

async fn serve(config: gateway::Config) -> anyhow::Result<()> {
    let public = listen(config.listen)
        .with_context(|| format!("SB_LISTEN: cannot bind {}", config.listen))?;
    let admin = listen(config.admin_listen)
        .with_context(|| format!("SB_ADMIN_LISTEN: cannot bind {}", config.admin_listen))?;
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signal.cancel();
    });
    gateway::run(Listeners { public, admin }, config, shutdown).await?;
    Ok(())
}

fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
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
