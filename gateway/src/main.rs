//! The gateway binary: parse config, set up telemetry, bind, run until SIGTERM/SIGINT.

use std::process::ExitCode;

use anyhow::Context;
use gateway::{Listeners, RawConfig};
use shared::config::ConfigError;
use shared::service::Start;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Listen backlog: a reconnect wave after a drain arrives thousands at a time; the
/// default 128 drops SYNs and costs clients a one-second retransmit.
const LISTEN_BACKLOG: u32 = 4096;

fn main() -> ExitCode {
    raise_open_file_limit();
    shared::service::main("gateway", start(), serve)
}

fn start() -> Result<Start<gateway::Config>, ConfigError> {
    let raw = RawConfig::load(std::env::args_os())?;
    let config = raw.validate()?;
    let log_format = config.cluster.log_format;
    Ok(Start::new(raw.check_config, config, log_format, |c| {
        c.summary().to_string()
    }))
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

async fn serve(config: gateway::Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let public = listen(config.listen)
        .with_context(|| format!("SB_LISTEN: cannot bind {}", config.listen))?;
    let admin = listen(config.cluster.admin_listen).with_context(|| {
        format!(
            "SB_ADMIN_LISTEN: cannot bind {}",
            config.cluster.admin_listen
        )
    })?;
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
