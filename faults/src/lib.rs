//! Switchboard's fault-injection suite (issue 8): starts the real cluster on
//! loopback (NATS with JetStream, Redis, three gateways behind HAProxy, two workers,
//! the STUB mock-llm and mock-backend), loads it with simulated users, injects one
//! fault at a time and checks the promises of DESIGN.md "Failure semantics" from the
//! clients' side. Each run writes `report.json` and `report.md` plus every
//! component's log to the report directory. `main.rs` only parses the command line.
#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod cluster;
pub mod fleet;
pub mod plan;
pub mod process;
pub mod report;
pub mod scenario;
pub mod stats;
pub mod tap;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use cli::Cli;
use client::Env;
use cluster::{Bins, Cluster, RedisMode};
use plan::Plan;
use report::RunReport;
use scenario::Ctx;

/// Component logs of a cluster with one Redis go to `logs/`, those of a cluster
/// on Redis Cluster to `logs/redis-cluster/` (the same component names).
fn log_dir(logs: &std::path::Path, mode: RedisMode) -> std::path::PathBuf {
    match mode {
        RedisMode::Single => logs.to_path_buf(),
        RedisMode::Cluster => logs.join("redis-cluster"),
    }
}

/// Runs the scenarios the command line asks for. `Ok(true)`: all passed.
pub async fn run(cli: Cli) -> Result<bool> {
    let names = cli.scenarios().map_err(anyhow::Error::msg)?;
    let mut plan = Plan::new(cli.size);
    if let Some(s) = cli.soak_secs {
        plan.soak = Duration::from_secs(s);
    }
    if let Some(u) = cli.users {
        if u < plan.streams * 2 + 10 || u < plan.channels {
            bail!(
                "--users {u}: at least {} needed for {} streams and {} channels",
                (plan.streams * 2 + 10).max(plan.channels),
                plan.streams,
                plan.channels
            );
        }
        plan.users = u;
    }
    let dir = cli.report.clone();
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let bins = Bins {
        dir: cli.bin_dir.clone(),
    };
    tracing::info!(size = ?plan.size, scenarios = ?names, report = %dir.display(), "starting the cluster");
    let first_mode = names
        .first()
        .map_or(RedisMode::Single, |n| scenario::redis_mode(n));
    let cluster = Cluster::start(
        &bins,
        &log_dir(&logs, first_mode),
        plan.cluster.clone(),
        first_mode,
    )
    .await?;
    let env = Arc::new(Env {
        lb: cluster.lb_addr(),
        url: cluster.ws_url(),
        secret: cluster.secret.clone(),
    });
    let mut ctx = Ctx {
        cluster,
        plan: plan.clone(),
        env,
        run_id: format!("{:04x}", rand::random::<u16>()),
    };
    let mut report = RunReport {
        size: format!("{:?}", plan.size).to_lowercase(),
        started_unix_ms: client::now_ms(),
        settings: serde_json::to_value(&plan.cluster)?,
        plan: serde_json::to_value(&plan)?,
        scenarios: Vec::new(),
        pass: false,
    };
    for name in names {
        let mode = scenario::redis_mode(name);
        if ctx.cluster.redis_mode != mode {
            // Redis runs one way per cluster: the whole cluster is started again
            // the other way (`all` lists the Redis Cluster scenarios last, so this
            // happens once per run).
            tracing::info!(?mode, "starting the cluster again with another Redis");
            ctx.cluster.stop().await;
            ctx.cluster =
                Cluster::start(&bins, &log_dir(&logs, mode), plan.cluster.clone(), mode).await?;
            ctx.env = Arc::new(Env {
                lb: ctx.cluster.lb_addr(),
                url: ctx.cluster.ws_url(),
                secret: ctx.cluster.secret.clone(),
            });
        }
        tracing::info!(scenario = name, "running");
        let r = scenario::run(&mut ctx, name).await;
        tracing::info!(
            scenario = name,
            pass = r.pass,
            seconds = r.seconds as u64,
            error = r.error.as_deref().unwrap_or(""),
            "done"
        );
        for c in r.checks.iter().filter(|c| !c.pass) {
            tracing::warn!(scenario = name, check = %c.name, bound = %c.bound, measured = %c.value, "check failed");
        }
        report.scenarios.push(r);
        report.pass = report.scenarios.iter().all(|s| s.pass);
        // Written after every scenario: an interrupted run keeps what it measured.
        report.write(&dir)?;
    }
    ctx.cluster.stop().await;
    println!("{}", report.markdown());
    println!("report: {}", dir.join("report.md").display());
    Ok(report.pass)
}
