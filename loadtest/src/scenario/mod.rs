//! The scenarios and what they share (pacing, tickers, credentials, the process
//! layout): every scenario runs on the population engine, which returns what it
//! measured; the caller builds the scenario's report from it.

pub mod population;

use std::future::Future;
use std::net::IpAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::CommonArgs;
use crate::clock::Clock;
use crate::progress::{ProgressLine, TICK};
use crate::source::{self, SourcePlan};
use crate::spawn;
use crate::stats::series::SLOT_MS;
use crate::tokens::{Minter, TokenSource};

/// Delay of the parent's progress line after the workers' reports: time for their
/// lines to cross the pipes.
const PROGRESS_LAG_MS: u64 = 50;
/// Exit status after a second Ctrl-C: the shell convention for death by SIGINT.
const EXIT_INTERRUPTED: i32 = 130;

/// Starts one task per index in `range`, at most `concurrency` holding a permit at
/// once, paced to `rate` starts per second (0 = as fast as permits allow), until
/// `stop` is cancelled. Returns how many were started; closes `tracker`.
pub(crate) async fn dispatch<F, Fut>(
    range: Range<u64>,
    rate: f64,
    concurrency: u64,
    stop: CancellationToken,
    tracker: TaskTracker,
    task: F,
) -> u64
where
    F: Fn(u64, OwnedSemaphorePermit) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(
        usize::try_from(concurrency)
            .unwrap_or(Semaphore::MAX_PERMITS)
            .min(Semaphore::MAX_PERMITS),
    ));
    let start = Instant::now();
    let mut started = 0u64;
    for index in range {
        if stop.is_cancelled() {
            break;
        }
        if rate > 0.0 {
            let due = start + Duration::from_secs_f64(started as f64 / rate);
            if due > Instant::now() {
                tokio::select! {
                    () = tokio::time::sleep_until(due) => {}
                    () = stop.cancelled() => break,
                }
            }
        }
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break, // never closed
            },
            () = stop.cancelled() => break,
        };
        tracker.spawn(task(index, permit));
        started += 1;
    }
    tracker.close();
    started
}

/// The clients' tokens: `--token-file`, or minted for `users` users; and how they
/// are made, for the report.
pub(crate) fn credentials(
    cli: &CommonArgs,
    users: u64,
    epoch_ms: u64,
) -> Result<(TokenSource, String)> {
    match (&cli.token_file, &cli.secret) {
        (Some(path), _) => {
            let source = TokenSource::from_file(path)?;
            let n = match &source {
                TokenSource::File(lines) => lines.len(),
                TokenSource::Mint(_) => 0,
            };
            Ok((source, format!("{n} from {}", path.display())))
        }
        (None, Some(secret)) => {
            let minter = Minter::new(secret, users, cli.ttl, epoch_ms)?;
            Ok((
                TokenSource::Mint(Arc::new(minter)),
                format!("minted HS256, {users} users, ttl {} s", cli.ttl),
            ))
        }
        (None, None) => bail!(
            "no credentials: give --secret (or SB_JWT_SECRET) to mint tokens, or --token-file"
        ),
    }
}

/// Where `connections` connections come from and how many processes hold them.
pub(crate) struct Spread {
    pub sources: SourcePlan,
    /// Ephemeral ports per source address.
    pub ports: u64,
    pub processes: u32,
}

impl Spread {
    /// Plans `connections` connections, at most `per_target` of them to one target
    /// address (`target`), under the open-file limit `fd_limit`.
    pub fn plan(
        cli: &CommonArgs,
        connections: u64,
        per_target: u64,
        target: IpAddr,
        fd_limit: u64,
    ) -> Result<Spread> {
        let ports = source::ephemeral_ports();
        let sources = SourcePlan::new(cli.source_ips.as_deref(), per_target, target, ports)?;
        let processes = spawn::process_count(connections, cli.processes, fd_limit);
        if u64::from(processes) > connections {
            bail!("--processes {processes} is more than the {connections} connections");
        }
        Ok(Spread {
            sources,
            ports,
            processes,
        })
    }
}

/// What cannot work in a layout, said before the run: more connections per process
/// than its open-file limit holds, or per target than the source addresses' ports.
pub(crate) fn layout_warnings(
    connections: u64,
    per_target: u64,
    processes: u32,
    fd_limit: u64,
    sources: &SourcePlan,
    ports: u64,
) -> Vec<String> {
    let mut w = Vec::new();
    let per_process = connections.div_ceil(u64::from(processes.max(1)));
    let capacity = spawn::connections_per_process(fd_limit);
    if per_process > capacity {
        w.push(format!(
            "each of {processes} processes opens up to {per_process} connections but can hold \
             about {capacity} (open-file limit {fd_limit}): expect EMFILE; use more --processes"
        ));
    }
    let port_capacity = sources.port_capacity(ports);
    if per_target > port_capacity {
        w.push(format!(
            "{per_target} connections per target need more than the {port_capacity} \
             ephemeral ports of {}: expect EADDRNOTAVAIL; give more --source-ips",
            sources.describe()
        ));
    }
    w
}

/// A one-second ticker whose ticks fall `lag_ms` after the run's slot boundaries:
/// workers sample on the boundaries (every worker's sample is the level at the start
/// of its slot), the parent prints just after, when their reports are in.
pub(crate) fn slot_ticker(clock: &Clock, lag_ms: u64) -> Interval {
    let now_ms = clock.now_ms();
    let first_ms = (now_ms / SLOT_MS + 1) * SLOT_MS + lag_ms;
    let mut ticker = tokio::time::interval_at(
        Instant::now() + Duration::from_millis(first_ms - now_ms),
        TICK,
    );
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker
}

/// The parent's progress ticker.
pub(crate) fn progress_ticker(clock: &Clock) -> Interval {
    slot_ticker(clock, PROGRESS_LAG_MS)
}

/// After a first Ctrl-C (the run closes its connections and reports), a second one
/// quits at once; worker processes see their stdin close and abort.
pub(crate) fn interrupted(line: &mut ProgressLine, signal: std::io::Result<()>) {
    if signal.is_ok() {
        line.note("interrupted: closing connections (Ctrl-C again to quit at once)");
        // Our handler replaced the default action; restore "quit" for the second one.
        tokio::spawn(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(EXIT_INTERRUPTED);
            }
        });
    }
}

/// The smaller of two optional values, or whichever is set.
pub(crate) fn min_some(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

/// A scenario's plan from a command line (without the program name), for tests: an
/// error is clap's or the plan's, whichever rejected it.
#[cfg(test)]
pub(crate) fn plan_from_args<T>(
    args: &[&str],
    from_cli: fn(&crate::cli::Cli, u64) -> Result<T>,
) -> Result<T> {
    use clap::Parser;
    let cli =
        crate::cli::Cli::try_parse_from(std::iter::once("loadtest").chain(args.iter().copied()))?;
    from_cli(&cli, 20_000)
}
