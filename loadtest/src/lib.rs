//! Switchboard's load generator: scenarios that drive a gateway over loopback and
//! report what it did (connect rate, handshake latency, failures by cause, memory per
//! connection), spread over several processes when one process's open-file limit is
//! not enough.
#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod payload;
pub mod probe;
pub mod progress;
pub mod publish;
pub mod report;
pub mod scenario;
pub mod source;
pub mod spawn;
pub mod stats;
pub mod target;
pub mod tokens;

use std::ffi::OsString;
use std::sync::Arc;

use anyhow::{Result, bail};

use cli::{Cli, ScenarioName};
use scenario::broadcast;
use scenario::connect::{self, Outputs, Plan};
use spawn::{WorkerLink, WorkerMsg};

/// Runs what the command line asks for. `Ok(true)`: the run met its goal.
pub async fn run(cli: Cli, args: Vec<OsString>) -> Result<bool> {
    let fd_limit = spawn::raise_fd_limit();
    match spawn::worker_role(cli.worker_index, cli.worker_count)? {
        Some((index, count)) => run_worker(&cli, fd_limit, index, count).await,
        None => run_parent(&cli, fd_limit, args).await,
    }
}

/// Workers get the same flags plus the run's epoch, so that they derive the same plan
/// and their series line up.
fn worker_args(mut args: Vec<OsString>, epoch_ms: u64) -> Vec<OsString> {
    args.push("--epoch-ms".into());
    args.push(epoch_ms.to_string().into());
    args
}

async fn run_parent(cli: &Cli, fd_limit: u64, args: Vec<OsString>) -> Result<bool> {
    let outputs = Outputs {
        json: cli.json.clone(),
        html: cli.html.clone(),
    };
    match cli.scenario {
        ScenarioName::Connect => {
            if cli.pid.len() > 1 {
                bail!(
                    "connect takes one --pid (the gateway whose memory per connection it reports)"
                );
            }
            let plan = Arc::new(Plan::from_cli(cli, fd_limit)?);
            let probe = probe::Probe::new(cli.pid.first().copied(), cli.metrics_url.as_deref())?;
            let worker_args = worker_args(args, plan.epoch_ms);
            connect::run(plan, probe, outputs, worker_args).await
        }
        ScenarioName::Broadcast => {
            let plan = Arc::new(broadcast::Plan::from_cli(cli, fd_limit)?);
            // The first --pid is the gateway whose memory is sampled; every one gets its
            // CPU reported.
            let probe = probe::Probe::new(cli.pid.first().copied(), cli.metrics_url.as_deref())?;
            for &pid in &cli.pid {
                if probe::cpu_seconds(Some(pid)).is_none() {
                    bail!("--pid {pid}: no such process");
                }
            }
            let worker_args = worker_args(args, plan.epoch_ms);
            broadcast::run(plan, probe, cli.pid.clone(), outputs, worker_args).await
        }
    }
}

async fn run_worker(cli: &Cli, fd_limit: u64, index: u32, count: u32) -> Result<bool> {
    // Ctrl-C in a terminal reaches the whole process group; the parent decides what
    // happens (it tells us to abort), so the signal itself is ignored here.
    tokio::spawn(async { while tokio::signal::ctrl_c().await.is_ok() {} });
    match cli.scenario {
        ScenarioName::Connect => {
            let mut link: WorkerLink<connect::Progress, connect::Tallies> = WorkerLink::stdio();
            let plan = match Plan::from_cli(cli, fd_limit) {
                Ok(plan) => Arc::new(plan),
                Err(e) => {
                    link.send(WorkerMsg::Fatal {
                        error: format!("{e:#}"),
                    })
                    .await?;
                    return Ok(false);
                }
            };
            connect::run_worker(plan, index, count, link).await?;
            Ok(true)
        }
        ScenarioName::Broadcast => {
            let mut link: WorkerLink<broadcast::Progress, broadcast::Tallies> = WorkerLink::stdio();
            let plan = match broadcast::Plan::from_cli(cli, fd_limit) {
                Ok(plan) => Arc::new(plan),
                Err(e) => {
                    link.send(WorkerMsg::Fatal {
                        error: format!("{e:#}"),
                    })
                    .await?;
                    return Ok(false);
                }
            };
            broadcast::run_worker(plan, index, count, false, link).await?;
            Ok(true)
        }
    }
}
