//! Command line of the `faults` driver.

use std::path::PathBuf;

use clap::Parser;

use crate::plan::Size;

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
    #[arg(long, default_value = "all")]
    pub scenario: String,
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
    /// The scenarios asked for, validated.
    pub fn scenarios(&self) -> Result<Vec<&'static str>, String> {
        if self.scenario == "all" {
            return Ok(SCENARIOS.to_vec());
        }
        self.scenario
            .split(',')
            .map(|s| {
                SCENARIOS
                    .iter()
                    .find(|n| **n == s.trim())
                    .copied()
                    .ok_or_else(|| {
                        format!(
                            "unknown scenario `{s}`; known: all, {}",
                            SCENARIOS.join(", ")
                        )
                    })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_lists_are_validated() {
        let cli = |s: &str| Cli::parse_from(["faults", "--scenario", s]);
        assert_eq!(cli("all").scenarios().unwrap().len(), SCENARIOS.len());
        assert_eq!(
            cli("soak,gateway-kill").scenarios().unwrap(),
            vec!["soak", "gateway-kill"]
        );
        assert!(
            cli("nope")
                .scenarios()
                .unwrap_err()
                .contains("unknown scenario `nope`")
        );
    }
}
