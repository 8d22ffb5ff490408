//! Command line of the `faults` driver.

use std::path::PathBuf;

use clap::Parser;
use clap::builder::PossibleValuesParser;

use crate::plan::Size;

/// The `--scenario` value that runs every scenario.
pub const ALL: &str = "all";

/// Every scenario, in the order `all` runs them.
pub const SCENARIOS: &[&str] = &[
    "gateway-kill",
    "worker-kill",
    "nats-restart",
    "redis-restart",
    "rolling-restart",
    "upstream-faults",
    "slow-client",
    "soak",
    // Last: each runs on a cluster of its own shape (three NATS nodes; a Redis
    // Cluster), started once the scenarios on one server of each are done.
    "nats-node-kill",
    "redis-failover",
];

#[derive(Debug, Clone, Parser)]
#[command(
    name = "faults",
    about = "Fault-injection suite: starts the cluster on loopback, loads it, injects one fault at a time, reports"
)]
pub struct Cli {
    /// `ci` (a few minutes) or `full` (hundreds of users, 10-minute soak).
    #[arg(long, value_enum, default_value = "ci")]
    pub size: Size,
    /// `all`, or scenario names separated by commas (gateway-kill, worker-kill,
    /// nats-restart, redis-restart, rolling-restart, upstream-faults, slow-client, soak,
    /// nats-node-kill, redis-failover).
    #[arg(
        long,
        default_value = ALL,
        value_delimiter = ',',
        value_parser = PossibleValuesParser::new(std::iter::once(ALL).chain(SCENARIOS.iter().copied())),
    )]
    pub scenario: Vec<String>,
    /// Directory for report.json, report.md and the component logs.
    #[arg(long, default_value = "target/faults")]
    pub report: PathBuf,
    /// Where gateway, worker, mock-llm and mock-backend are (release builds).
    #[arg(long, default_value = "target/release")]
    pub bin_dir: PathBuf,
    /// Soak duration in seconds (overrides the size's).
    #[arg(long)]
    pub soak_secs: Option<u64>,
    /// Users per scenario (overrides the size's).
    #[arg(long)]
    pub users: Option<usize>,
}

impl Cli {
    /// The scenarios asked for (clap has checked the names), in the order given.
    pub fn scenarios(&self) -> Vec<&'static str> {
        if self.scenario.iter().any(|s| s == ALL) {
            return SCENARIOS.to_vec();
        }
        self.scenario
            .iter()
            .filter_map(|s| SCENARIOS.iter().find(|n| **n == s).copied())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_lists_are_validated() {
        let cli = |s: &str| Cli::try_parse_from(["faults", "--scenario", s]);
        assert_eq!(cli("all").unwrap().scenarios().len(), SCENARIOS.len());
        assert_eq!(
            Cli::parse_from(["faults"]).scenarios().len(),
            SCENARIOS.len()
        );
        assert_eq!(
            cli("soak,gateway-kill").unwrap().scenarios(),
            vec!["soak", "gateway-kill"]
        );
        let err = cli("soak,nope").unwrap_err().to_string();
        assert!(
            err.contains("'nope'") && err.contains("--scenario"),
            "{err}"
        );
    }
}
