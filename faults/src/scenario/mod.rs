//! The scenarios, one fault each, and what they share: the running cluster, the
//! plan, a fresh fleet per scenario (so one scenario's damage never leaks into the
//! next one's numbers) and the repair of the cluster afterwards.

mod ctx;
mod gateway_kill;
mod nats_node_kill;
mod nats_restart;
mod redis_failover;
mod redis_restart;
mod rolling_restart;
mod slow_client;
mod soak;
mod upstream;
mod worker_kill;

use std::time::Instant;

use crate::cluster::RedisMode;
use crate::report::ScenarioReport;

pub use ctx::{Ctx, FIRST_CHUNK, QUIESCE};

/// NATS servers the scenario needs: a three-node JetStream cluster to kill one
/// node of, else one server (what the other scenarios stop and start whole).
pub fn nats_nodes(name: &str) -> usize {
    match name {
        "nats-node-kill" => crate::cluster::NATS_CLUSTER_NODES,
        _ => 1,
    }
}

/// The Redis a scenario needs: a Redis Cluster for the failover, one server for
/// the rest (`redis-restart` restarts that server empty).
pub fn redis_mode(name: &str) -> RedisMode {
    match name {
        "redis-failover" => RedisMode::Cluster,
        _ => RedisMode::Single,
    }
}

/// Runs one scenario by name; harness errors end up in the report, not in a panic.
pub async fn run(ctx: &mut Ctx, name: &str) -> ScenarioReport {
    let started = Instant::now();
    let mut r = ScenarioReport::new(name, "");
    let result = match name {
        "gateway-kill" => gateway_kill::run(ctx, &mut r).await,
        "worker-kill" => worker_kill::run(ctx, &mut r).await,
        "nats-restart" => nats_restart::run(ctx, &mut r).await,
        "nats-node-kill" => nats_node_kill::run(ctx, &mut r).await,
        "redis-restart" => redis_restart::run(ctx, &mut r).await,
        "redis-failover" => redis_failover::run(ctx, &mut r).await,
        "rolling-restart" => rolling_restart::run(ctx, &mut r).await,
        "upstream-faults" => upstream::run(ctx, &mut r).await,
        "slow-client" => slow_client::run(ctx, &mut r).await,
        "soak" => soak::run(ctx, &mut r).await,
        other => Err(anyhow::anyhow!("unknown scenario {other}")),
    };
    if let Err(e) = result {
        r.error = Some(format!("{e:#}"));
    }
    r.seconds = started.elapsed().as_secs_f64();
    r.finish();
    if let Err(e) = ctx.heal().await {
        let msg = format!("cluster could not be repaired after the scenario: {e:#}");
        r.error = Some(match r.error.take() {
            Some(prev) => format!("{prev}; {msg}"),
            None => msg,
        });
        r.finish();
    }
    r
}
