//! The command line: one flat set of flags shared by every scenario (each scenario
//! reads the ones it needs), plus the hidden flags a parent passes to its workers.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// Default target: a gateway started locally with `SB_LISTEN=127.0.0.1:8080`.
pub const DEFAULT_URL: &str = "ws://127.0.0.1:8080/ws";
/// Default connection count: the README's smoke run, seconds on this machine.
pub const DEFAULT_CONNECTIONS: u64 = 1000;
/// Default in-flight handshakes: enough to keep a 2-core gateway busy without
/// turning the run into a SYN flood that only measures the listen backlog.
pub const DEFAULT_CONCURRENCY: u64 = 100;
/// Default rate: unpaced, so that a run measures the most the gateway accepts.
pub const DEFAULT_RATE: f64 = 0.0;
/// Default tolerance: none, so that a smoke run passes only if everything worked.
pub const DEFAULT_ALLOW_FAILURES_PCT: f64 = 0.0;
/// Default hold: long enough for the gateway's memory to settle after the connect
/// burst, short enough for a smoke run.
pub const DEFAULT_HOLD_SECS: u64 = 5;

/// Which scenario to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScenarioName {
    /// Open N authenticated connections at a rate, hold them idle, report.
    Connect,
}

/// Switchboard load generator. Sends traffic to loopback addresses only.
#[derive(Debug, Clone, Parser)]
#[command(name = "loadtest", version, long_about = None)]
pub struct Cli {
    /// Scenario to run.
    #[arg(long, value_enum)]
    pub scenario: ScenarioName,

    /// Gateway WebSocket URL (loopback only: 127.0.0.0/8, [::1] or localhost).
    #[arg(long, default_value = DEFAULT_URL)]
    pub url: String,

    /// Connections to open.
    #[arg(long, default_value_t = DEFAULT_CONNECTIONS)]
    pub connections: u64,

    /// Target connects per second over the whole run; 0 = as fast as --concurrency allows.
    #[arg(long, default_value_t = DEFAULT_RATE)]
    pub rate: f64,

    /// Seconds to hold the connections open once all are attempted.
    #[arg(long, default_value_t = DEFAULT_HOLD_SECS)]
    pub hold: u64,

    /// Handshakes in flight at once (over all processes).
    #[arg(long, default_value_t = DEFAULT_CONCURRENCY)]
    pub concurrency: u64,

    /// Seconds allowed for one handshake (TCP connect to `authenticated`).
    #[arg(long, default_value_t = crate::client::DEFAULT_HANDSHAKE_TIMEOUT.as_secs())]
    pub timeout: u64,

    /// HS256 secret to mint tokens with (the gateway's SB_JWT_SECRET).
    #[arg(long, env = "SB_JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,

    /// File of tokens, one per line, used in turn (takes precedence over --secret).
    #[arg(long)]
    pub token_file: Option<PathBuf>,

    /// Distinct user ids for minted tokens (lt-0, lt-1, ...); default: one per connection.
    #[arg(long)]
    pub users: Option<u64>,

    /// Lifetime of minted tokens, seconds.
    #[arg(long, default_value_t = crate::tokens::DEFAULT_TTL_SECS)]
    pub ttl: u64,

    /// Gateway process id: its RSS is read from /proc/<pid>/status.
    #[arg(long)]
    pub pid: Option<u32>,

    /// Gateway metrics URL (admin port), for RSS and its connection count.
    #[arg(long)]
    pub metrics_url: Option<String>,

    /// Write machine-readable results here.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Write a self-contained HTML report here.
    #[arg(long)]
    pub html: Option<PathBuf>,

    /// Worker processes; default: enough for the open-file limit (`ulimit -Hn`).
    #[arg(long)]
    pub processes: Option<u32>,

    /// Source addresses, e.g. 127.0.0.2-127.0.0.9 or 127.0.0.2,127.0.0.3; default:
    /// chosen automatically when one address has too few ephemeral ports.
    #[arg(long)]
    pub source_ips: Option<String>,

    /// Failures (connects that failed plus connections dropped while held) tolerated,
    /// in percent of --connections, before the exit code says the goal was missed.
    #[arg(long, default_value_t = DEFAULT_ALLOW_FAILURES_PCT)]
    pub allow_failures: f64,

    /// Internal: this process is worker `i` of a multi-process run.
    #[arg(long, hide = true)]
    pub worker_index: Option<u32>,

    /// Internal: number of workers in the run.
    #[arg(long, hide = true)]
    pub worker_count: Option<u32>,

    /// Internal: the run's epoch (unix milliseconds), shared by all workers.
    #[arg(long, hide = true)]
    pub epoch_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_and_flags_parse() {
        let cli = Cli::try_parse_from(["loadtest", "--scenario", "connect"]).unwrap();
        assert_eq!(cli.scenario, ScenarioName::Connect);
        assert_eq!(cli.connections, DEFAULT_CONNECTIONS);
        assert_eq!(cli.url, DEFAULT_URL);
        let cli = Cli::try_parse_from([
            "loadtest",
            "--scenario",
            "connect",
            "--connections",
            "10000",
            "--rate",
            "2500",
            "--source-ips",
            "127.0.0.2-127.0.0.9",
            "--worker-index",
            "1",
            "--worker-count",
            "2",
        ])
        .unwrap();
        assert_eq!(cli.connections, 10_000);
        assert_eq!(cli.rate, 2500.0);
        assert_eq!(cli.worker_index, Some(1));
        assert!(Cli::try_parse_from(["loadtest", "--scenario", "nope"]).is_err());
        assert!(Cli::try_parse_from(["loadtest"]).is_err());
    }
}
