//! Switchboard's fault-injection suite (docs/faults.md): starts the real cluster on
//! loopback (NATS with JetStream, Redis, three gateways behind HAProxy, two workers,
//! the STUB mock-llm and mock-backend), loads it with simulated users, injects one
//! fault at a time and checks the promises of docs/DESIGN.md#failure-semantics from the
//! clients' side. Each run writes `report.json` and `report.md` plus every
//! component's log to the report directory. `main.rs` only parses the command line.
#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod cluster;
pub mod fleet;
pub mod local;
pub mod plan;
pub mod process;
pub mod report;
pub mod scenario;
pub mod stats;
pub mod tap;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use cli::Cli;
use client::Env;
use cluster::{Bins, Cluster, RedisMode};
use plan::Plan;
use report::RunReport;
use scenario::Ctx;

/// Logs to stderr at `info` unless the variable `env_var` says otherwise; colours only
/// on a terminal, so a redirected log stays plain text. Both binaries start with it.
pub fn init_logging(env_var: &str) {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(env_var)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

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
    let names = cli.scenarios();
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
    let mut report = RunReport {
        size: format!("{:?}", plan.size).to_lowercase(),
        started_unix_ms: client::now_ms(),
        settings: serde_json::to_value(&plan.cluster)?,
        plan: serde_json::to_value(&plan)?,
        scenarios: Vec::new(),
        pass: false,
    };
    let mut ctx: Option<Ctx> = None;
    for name in names {
        // A scenario that needs another shape (three NATS nodes, a Redis Cluster) gets
        // a cluster of its own; the list runs them last, so a run starts few clusters.
        let shape = (scenario::nats_nodes(name), scenario::redis_mode(name));
        if ctx
            .as_ref()
            .is_none_or(|c| (c.cluster.shape.nats_nodes, c.cluster.redis_mode) != shape)
        {
            if let Some(mut old) = ctx.take() {
                old.cluster.stop(None).await;
            }
            ctx = Some(start_ctx(&bins, &logs, &plan, shape).await?);
        }
        let ctx = ctx.as_mut().context("no cluster")?;
        tracing::info!(scenario = name, "running");
        let r = scenario::run(ctx, name).await;
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
    if let Some(mut ctx) = ctx {
        ctx.cluster.stop(None).await;
    }
    println!("{}", report.markdown());
    println!("report: {}", dir.join("report.md").display());
    Ok(report.pass)
}

/// Starts a cluster of one shape: `nats_nodes` NATS servers and Redis as one server or
/// a cluster. Each shape logs to its own directory: its gateways and workers have
/// the same names as the first cluster's.
async fn start_ctx(
    bins: &Bins,
    logs: &Path,
    plan: &Plan,
    (nats_nodes, mode): (usize, RedisMode),
) -> Result<Ctx> {
    let logs = match nats_nodes {
        1 => log_dir(logs, mode),
        n => log_dir(&logs.join(format!("nats-{n}-nodes")), mode),
    };
    tracing::info!(size = ?plan.size, nats_nodes, ?mode, logs = %logs.display(), "starting the cluster");
    // One more try on a fresh set of ports and processes: a start can lose a port
    // picked for a server to another process before the server binds it. The first
    // error is logged, with every process's state.
    let shape = plan.cluster.shape(nats_nodes, mode);
    let cluster = match Cluster::start(bins, &logs, shape.clone()).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "the cluster did not start; trying once more"
            );
            Cluster::start(bins, &logs.join("second-start"), shape).await?
        }
    };
    let env = Arc::new(Env {
        lb: cluster.lb_addr(),
        url: cluster.ws_url(),
        secret: cluster.secret.clone(),
    });
    Ok(Ctx {
        cluster,
        plan: plan.clone(),
        env,
        run_id: format!("{:04x}", rand::random::<u16>()),
    })
}
