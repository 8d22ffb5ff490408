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
    if cli.scenario.name() == ScenarioName::Connect && pids.len() > 1 {
        bail!("connect takes one --pid (the gateway whose memory per connection it reports)");
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
    match plan.scenario {
        ScenarioName::Connect => report::emit(&ConnectReport::build(&plan, &result), &outputs),
        ScenarioName::Broadcast => report::emit(&BroadcastReport::build(&plan, &result), &outputs),
        ScenarioName::Chat => report::emit(&ChatReport::build(&plan, &result), &outputs),
        ScenarioName::Soak => report::emit(&SoakReport::build(&plan, &result), &outputs),
    }
}

async fn run_worker(cli: &Cli, fd_limit: u64, index: u32, count: u32) -> Result<bool> {
    // Ctrl-C in a terminal reaches the whole process group; the parent decides what
    // happens (it tells us to abort), so the signal itself is ignored here.
    tokio::spawn(async { while tokio::signal::ctrl_c().await.is_ok() {} });
    let mut link: WorkerLink<population::Progress, population::Tallies> = WorkerLink::stdio();
    match population::Plan::from_cli(cli, fd_limit) {
        Ok(plan) => population::run_worker(Arc::new(plan), index, count, false, link).await?,
        // A worker whose flags do not make a plan tells the parent why.
        Err(e) => {
            let error = format!("{e:#}");
            link.send(WorkerMsg::Fatal { error }).await?;
            return Ok(false);
        }
    }
    Ok(true)
}
