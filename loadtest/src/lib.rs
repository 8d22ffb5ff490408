//! Switchboard's load generator: scenarios that drive a gateway over loopback and
//! report what it did (connect rate, handshake latency, failures by cause, memory per
//! connection, delivery latency, chat-path overhead, memory growth), spread over
//! several processes when one process's open-file limit is not enough.
#![forbid(unsafe_code)]

pub mod chat;
pub mod cli;
pub mod client;
pub mod clock;
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
pub mod threshold;
pub mod tokens;

use std::ffi::OsString;
use std::sync::Arc;

use anyhow::{Result, bail};

use cli::{Cli, ScenarioName};
use report::Outputs;
use report::broadcast::BroadcastReport;
use report::chat::ChatReport;
use report::connect::ConnectReport;
use report::soak::SoakReport;
use scenario::connect::{self, Plan};
use scenario::population;
use spawn::{WorkerLink, WorkerMsg};

/// Runs what the command line asks for. `Ok(true)`: the run met its goal.
pub async fn run(cli: Cli, args: Vec<OsString>) -> Result<bool> {
    let fd_limit = spawn::raise_fd_limit();
    let common = cli.scenario.common();
    match spawn::worker_role(common.worker_index, common.worker_count)? {
        Some((index, count)) => run_worker(&cli, fd_limit, index, count).await,
        None => run_parent(cli, fd_limit, args).await,
    }
}

/// Workers get the same flags plus the run's epoch, so that they derive the same plan
/// and their series line up.
fn worker_args(mut args: Vec<OsString>, epoch_ms: u64) -> Vec<OsString> {
    args.push("--epoch-ms".into());
    args.push(epoch_ms.to_string().into());
    args
}

async fn run_parent(mut cli: Cli, fd_limit: u64, mut args: Vec<OsString>) -> Result<bool> {
    let common = cli.scenario.common();
    let outputs = Outputs {
        json: common.json.clone(),
        html: common.html.clone(),
    };
    let (pids, metrics_url) = (common.pid.clone(), common.metrics_url.clone());
    if cli.scenario.name() == ScenarioName::Connect {
        if pids.len() > 1 {
            bail!("connect takes one --pid (the gateway whose memory per connection it reports)");
        }
        let plan = Arc::new(Plan::from_cli(&cli, fd_limit)?);
        let probe = probe::Probe::new(pids.first().copied(), metrics_url.as_deref())?;
        let worker_args = worker_args(args, plan.epoch_ms);
        let facts = connect::run(Arc::clone(&plan), probe, worker_args).await?;
        let r = ConnectReport::build(&plan, facts);
        report::emit(&r, &r.render_text(), || r.render_html(), &outputs)?;
        return Ok(r.head.goal_met);
    }
    let chat_flags = cli.scenario.chat_mut();
    if let Some((flags, url)) = chat_flags.and_then(|f| f.llm_stub.clone().map(|u| (f, u))) {
        // Read once here; workers get the figures as flags, so that all agree.
        let timing = chat::LlmTiming::from_stub(&url).await?;
        let first = *flags
            .llm_first_token_ms
            .get_or_insert(timing.first_token_ms);
        let stream = *flags.llm_stream_ms.get_or_insert(timing.stream_ms);
        eprintln!("LLM stub at {url}: first token after {first} ms, then {stream} ms of tokens");
        for (flag, value) in [("--llm-first-token-ms", first), ("--llm-stream-ms", stream)] {
            args.push(flag.into());
            args.push(value.to_string().into());
        }
    }
    let plan = Arc::new(population::Plan::from_cli(&cli, fd_limit)?);
    // The first --pid is the gateway whose memory is sampled; every one gets its CPU
    // reported.
    let gateway = probe::Probe::new(pids.first().copied(), metrics_url.as_deref())?;
    for &pid in &pids {
        if probe::cpu_seconds(Some(pid)).is_none() {
            bail!("--pid {pid}: no such process");
        }
    }
    let mut workers = Vec::new();
    let worker_metrics = match &cli.scenario {
        cli::Scenario::Chat(a) => &a.chat.worker_metrics[..],
        cli::Scenario::Soak(a) => &a.chat.worker_metrics[..],
        cli::Scenario::Connect(_) | cli::Scenario::Broadcast(_) => &[],
    };
    for url in worker_metrics {
        if let Some(p) = probe::Probe::new(None, Some(url))? {
            workers.push((url.clone(), p));
        }
    }
    let watch = population::Watch {
        gateway,
        pids,
        workers,
    };
    let worker_args = worker_args(args, plan.epoch_ms);
    let result = population::execute(Arc::clone(&plan), &watch, worker_args).await?;
    let goal_met = match plan.scenario {
        ScenarioName::Broadcast => {
            let r = BroadcastReport::build(&plan, &result);
            report::emit(&r, &r.render_text(), || r.render_html(), &outputs)?;
            r.head.goal_met
        }
        ScenarioName::Chat => {
            let r = ChatReport::build(&plan, &result);
            report::emit(&r, &r.render_text(), || r.render_html(), &outputs)?;
            r.head.goal_met
        }
        _ => {
            let r = SoakReport::build(&plan, &result);
            report::emit(&r, &r.render_text(), || r.render_html(), &outputs)?;
            r.head.goal_met
        }
    };
    Ok(goal_met)
}

async fn run_worker(cli: &Cli, fd_limit: u64, index: u32, count: u32) -> Result<bool> {
    // Ctrl-C in a terminal reaches the whole process group; the parent decides what
    // happens (it tells us to abort), so the signal itself is ignored here.
    tokio::spawn(async { while tokio::signal::ctrl_c().await.is_ok() {} });
    if cli.scenario.name() == ScenarioName::Connect {
        let link: WorkerLink<connect::Progress, connect::Tallies> = WorkerLink::stdio();
        let Some((plan, link)) = plan_or_fatal(Plan::from_cli(cli, fd_limit), link).await? else {
            return Ok(false);
        };
        connect::run_worker(plan, index, count, link).await?;
    } else {
        let link: WorkerLink<population::Progress, population::Tallies> = WorkerLink::stdio();
        let plan = population::Plan::from_cli(cli, fd_limit);
        let Some((plan, link)) = plan_or_fatal(plan, link).await? else {
            return Ok(false);
        };
        population::run_worker(plan, index, count, false, link).await?;
    }
    Ok(true)
}

/// A worker's plan, or (when its flags do not make one) the error told to the parent.
async fn plan_or_fatal<T, P, R>(
    plan: Result<T>,
    mut link: WorkerLink<P, R>,
) -> Result<Option<(Arc<T>, WorkerLink<P, R>)>>
where
    P: serde::Serialize,
    R: serde::Serialize,
{
    match plan {
        Ok(plan) => Ok(Some((Arc::new(plan), link))),
        Err(e) => {
            link.send(WorkerMsg::Fatal {
                error: format!("{e:#}"),
            })
            .await?;
            Ok(None)
        }
    }
}
