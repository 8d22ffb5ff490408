//! The `connect` scenario: open N authenticated connections at a target rate with a
//! bounded number of handshakes in flight, hold them idle, then close them. Workers
//! (in-process or child processes) each take a contiguous share of the connections;
//! the parent starts the hold when every worker is ready, reads the gateway's memory
//! before, while held and after, and turns the merged results into the report.

use std::ffi::OsString;
use std::net::IpAddr;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::{Cli, Scenario};
use crate::client::{self, Failure};
use crate::clock::{Clock, unix_ms};
use crate::probe::{self, GatewaySample, Probe};
use crate::progress::{ProgressLine, Snapshot};
use crate::scenario::{
    self, Spread, credentials, dispatch, layout_warnings, min_some, progress_ticker, slot_ticker,
};
use crate::source::SourcePlan;
use crate::spawn::{self, Control, Event, WorkerLink, WorkerMsg, Workers};
use crate::stats::series::SLOT_MS;
use crate::stats::{EventSeries, GaugeSeries, Histogram, Tally, bump, drop_one};
use crate::target::Target;
use crate::tokens::TokenSource;

/// Capacity of the queue from connection tasks to their worker's bookkeeping: a burst
/// of completions is absorbed, and a full queue makes connection tasks wait.
const OUTCOME_QUEUE: usize = 4096;

/// Everything a run needs, identical in the parent and every worker (all derive it
/// from the same command line).
pub struct Plan {
    pub target: Target,
    pub url: String,
    pub total: u64,
    pub rate: f64,
    pub concurrency: u64,
    pub hold: Duration,
    pub timeout: Duration,
    pub tokens: TokenSource,
    /// How the tokens are made, for the report.
    pub tokens_described: String,
    pub sources: SourcePlan,
    pub processes: u32,
    /// Open-file limit in force (after raising the soft limit).
    pub fd_limit: u64,
    /// Ephemeral ports per source address.
    pub ports: u64,
    pub allow_failures_pct: f64,
    pub epoch_ms: u64,
}

impl Plan {
    /// The plan of `loadtest connect`; clap checked each flag's own range.
    pub fn from_cli(cli: &Cli, fd_limit: u64) -> Result<Plan> {
        let Scenario::Connect(args) = &cli.scenario else {
            bail!("not a connect command line");
        };
        let common = &args.common;
        let url = match common.url.as_slice() {
            [one] => one.clone(),
            _ => bail!(
                "connect takes one --url (several gateways: put a load balancer in front, or \
                 run one loadtest per gateway)"
            ),
        };
        let target = Target::parse(&url)?;
        let epoch_ms = common.epoch_ms.unwrap_or_else(unix_ms);
        let users = common.users.unwrap_or(args.connections);
        let (tokens, tokens_described) = credentials(common, users, epoch_ms)?;
        let Spread {
            sources,
            ports,
            processes,
        } = Spread::plan(
            common,
            args.connections,
            args.connections,
            target.addr.ip(),
            fd_limit,
        )?;
        Ok(Plan {
            url,
            target,
            total: args.connections,
            rate: args.rate,
            concurrency: common.concurrency,
            hold: Duration::from_secs(args.hold),
            timeout: Duration::from_secs(common.timeout),
            tokens,
            tokens_described,
            sources,
            processes,
            fd_limit,
            ports,
            allow_failures_pct: common.allow_failures,
            epoch_ms,
        })
    }

    /// Problems visible before the run starts.
    pub fn warnings(&self) -> Vec<String> {
        layout_warnings(
            self.total,
            self.total,
            self.processes,
            self.fd_limit,
            &self.sources,
            self.ports,
        )
    }

    /// Worker `index`'s connection indices, rate and concurrency.
    fn share(&self, index: u32, count: u32) -> (Range<u64>, f64, u64) {
        let range = spawn::share(self.total, index, count);
        let rate = spawn::split(self.rate, count);
        let concurrency = self.concurrency.div_ceil(u64::from(count.max(1))).max(1);
        (range, rate, concurrency)
    }
}

// === what workers report ===

/// A worker's cumulative counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub attempted: u64,
    pub ok: u64,
    pub failed: u64,
    pub aborted: u64,
    pub open: u64,
    pub in_flight: u64,
    pub dropped: u64,
}

impl Progress {
    fn add(&mut self, o: &Progress) {
        self.attempted += o.attempted;
        self.ok += o.ok;
        self.failed += o.failed;
        self.aborted += o.aborted;
        self.open += o.open;
        self.in_flight += o.in_flight;
        self.dropped += o.dropped;
    }
}

/// Everything a worker measured; merged by the parent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tallies {
    pub attempted: u64,
    pub ok: u64,
    pub failed: u64,
    /// Handshakes abandoned because the run was aborted.
    pub aborted: u64,
    /// Connections closed by the server or dropped after `authenticated`.
    pub dropped: u64,
    pub failures: Tally,
    pub failure_limits: Tally,
    pub drops: Tally,
    pub drop_limits: Tally,
    /// TCP connect start to `authenticated`, microseconds.
    pub latency_us: Histogram,
    pub connects: EventSeries,
    pub failure_series: EventSeries,
    pub drop_series: EventSeries,
    pub open: GaugeSeries,
    /// Run-epoch milliseconds of the first attempt and of the last connect outcome.
    pub first_attempt_ms: Option<u64>,
    pub last_outcome_ms: Option<u64>,
    /// Connections open when the worker was told to finish.
    pub open_at_finish: u64,
}

impl Tallies {
    pub fn merge(&mut self, o: &Tallies) {
        self.attempted += o.attempted;
        self.ok += o.ok;
        self.failed += o.failed;
        self.aborted += o.aborted;
        self.dropped += o.dropped;
        self.failures.merge(&o.failures);
        self.failure_limits.merge(&o.failure_limits);
        self.drops.merge(&o.drops);
        self.drop_limits.merge(&o.drop_limits);
        self.latency_us.merge(&o.latency_us);
        self.connects.merge(&o.connects);
        self.failure_series.merge(&o.failure_series);
        self.drop_series.merge(&o.drop_series);
        self.open.merge(&o.open);
        self.first_attempt_ms = min_some(self.first_attempt_ms, o.first_attempt_ms);
        self.last_outcome_ms = self.last_outcome_ms.max(o.last_outcome_ms);
        self.open_at_finish += o.open_at_finish;
    }

    fn apply(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Connected {
                started_ms,
                at_ms,
                latency,
            } => {
                self.attempted += 1;
                self.ok += 1;
                self.first_attempt_ms = min_some(self.first_attempt_ms, Some(started_ms));
                self.last_outcome_ms = self.last_outcome_ms.max(Some(at_ms));
                self.latency_us
                    .record(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
                self.connects.record(at_ms, 1);
            }
            Outcome::Failed {
                started_ms,
                at_ms,
                failure,
            } => {
                self.attempted += 1;
                self.failed += 1;
                self.first_attempt_ms = min_some(self.first_attempt_ms, Some(started_ms));
                self.last_outcome_ms = self.last_outcome_ms.max(Some(at_ms));
                self.failures.add(&failure.to_string(), 1);
                self.failure_limits.add(failure.limit().label(), 1);
                self.failure_series.record(at_ms, 1);
            }
            Outcome::Aborted => self.aborted += 1,
            Outcome::Dropped { at_ms, failure } => {
                self.dropped += 1;
                self.drops.add(&failure.to_string(), 1);
                self.drop_limits.add(failure.limit().label(), 1);
                self.drop_series.record(at_ms, 1);
            }
        }
    }
}

/// What a connection task tells its worker.
enum Outcome {
    Connected {
        started_ms: u64,
        at_ms: u64,
        latency: Duration,
    },
    Failed {
        started_ms: u64,
        at_ms: u64,
        failure: Failure,
    },
    Aborted,
    Dropped {
        at_ms: u64,
        failure: Failure,
    },
}

impl Outcome {
    /// Whether this ends a handshake (as opposed to a later drop).
    fn ends_handshake(&self) -> bool {
        !matches!(self, Outcome::Dropped { .. })
    }
}

/// Live counters shared by a worker's connection tasks.
#[derive(Default)]
struct Counters {
    attempted: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    aborted: AtomicU64,
    open: AtomicU64,
    in_flight: AtomicU64,
    dropped: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> Progress {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Progress {
            attempted: get(&self.attempted),
            ok: get(&self.ok),
            failed: get(&self.failed),
            aborted: get(&self.aborted),
            open: get(&self.open),
            in_flight: get(&self.in_flight),
            dropped: get(&self.dropped),
        }
    }
}

// === worker ===

/// What a connection task needs besides its index.
struct Shared {
    plan: Arc<Plan>,
    clock: Clock,
    counters: Counters,
    outcomes: mpsc::Sender<Outcome>,
    /// Cancelled on Abort: no new attempts, handshakes in flight are abandoned.
    stop_connecting: CancellationToken,
    /// Cancelled on Finish or Abort: held connections close.
    stop_holding: CancellationToken,
}

/// Runs worker `index` of `count`: its share of the connections, then waits for the
/// parent's commands, then reports.
pub async fn run_worker(
    plan: Arc<Plan>,
    index: u32,
    count: u32,
    mut link: WorkerLink<Progress, Tallies>,
) -> Result<()> {
    let (range, rate, concurrency) = plan.share(index, count);
    let (outcomes_tx, mut outcomes) = mpsc::channel(OUTCOME_QUEUE);
    let shared = Arc::new(Shared {
        clock: Clock::from_unix_ms(plan.epoch_ms),
        plan,
        counters: Counters::default(),
        outcomes: outcomes_tx,
        stop_connecting: CancellationToken::new(),
        stop_holding: CancellationToken::new(),
    });
    let tracker = TaskTracker::new();
    let task_shared = Arc::clone(&shared);
    let mut dispatcher = tokio::spawn(dispatch(
        range,
        rate,
        concurrency,
        shared.stop_connecting.clone(),
        tracker.clone(),
        move |index, permit| {
            let shared = Arc::clone(&task_shared);
            async move { connection(index, &shared, permit).await }
        },
    ));

    let mut tallies = Tallies::default();
    tallies.open.sample(shared.clock.now_ms(), 0);
    // Tick on the run's slot boundaries, so that each open-connections sample is the
    // level at the start of its slot in every worker alike.
    let mut ticker = slot_ticker(&shared.clock, 0);
    let mut dispatched: Option<u64> = None;
    let mut handshakes_done = 0u64;
    let mut ready_sent = false;
    let mut finishing = false;
    loop {
        tokio::select! {
            Some(outcome) = outcomes.recv() => {
                if outcome.ends_handshake() {
                    handshakes_done += 1;
                }
                tallies.apply(outcome);
            }
            joined = &mut dispatcher, if dispatched.is_none() => {
                dispatched = Some(joined.context("the dispatcher panicked")?);
            }
            _ = ticker.tick() => {
                let p = shared.counters.snapshot();
                tallies.open.sample(shared.clock.now_ms(), p.open);
                link.send(WorkerMsg::Progress(p)).await?;
            }
            control = link.recv(), if !finishing => match control {
                Control::Hold | Control::Expect(_) => {}
                Control::Finish => {
                    finishing = true;
                    tallies.open_at_finish = shared.counters.snapshot().open;
                    shared.stop_holding.cancel();
                }
                Control::Abort => {
                    finishing = true;
                    tallies.open_at_finish = shared.counters.snapshot().open;
                    shared.stop_connecting.cancel();
                    shared.stop_holding.cancel();
                }
            },
            () = tracker.wait(), if finishing && dispatched.is_some() => break,
        }
        if !ready_sent && dispatched == Some(handshakes_done) {
            ready_sent = true;
            link.send(WorkerMsg::Ready(shared.counters.snapshot()))
                .await?;
        }
    }
    // Every task has ended; collect what they sent last. The channel stays open (this
    // function holds a sender), so drain what is queued rather than wait for its end.
    while let Ok(outcome) = outcomes.try_recv() {
        tallies.apply(outcome);
    }
    // Everything is closed by the next slot boundary.
    let p = shared.counters.snapshot();
    tallies.open.sample(shared.clock.now_ms() + SLOT_MS, p.open);
    link.send(WorkerMsg::Progress(p)).await?;
    link.send(WorkerMsg::Result(tallies)).await
}

/// One connection: handshake (holding a concurrency permit), then hold until told.
async fn connection(index: u64, shared: &Shared, permit: tokio::sync::OwnedSemaphorePermit) {
    let c = &shared.counters;
    let plan = &shared.plan;
    let source: Option<IpAddr> = plan.sources.for_connection(index);
    let started_ms = shared.clock.now_ms();
    bump(&c.in_flight);
    let result = match plan.tokens.token_for(index) {
        Err(e) => Some(Err(Failure::Token(format!("{e:#}")))),
        Ok(token) => tokio::select! {
            r = client::connect(&plan.target, source, &token, plan.timeout) => Some(r),
            () = shared.stop_connecting.cancelled() => None,
        },
    };
    drop_one(&c.in_flight);
    drop(permit);
    let at_ms = shared.clock.now_ms();
    let outcome = match result {
        None => {
            bump(&c.aborted);
            Outcome::Aborted
        }
        Some(Err(failure)) => {
            bump(&c.attempted);
            bump(&c.failed);
            Outcome::Failed {
                started_ms,
                at_ms,
                failure,
            }
        }
        Some(Ok(auth)) => {
            bump(&c.attempted);
            bump(&c.ok);
            bump(&c.open);
            let connected = Outcome::Connected {
                started_ms,
                at_ms,
                latency: auth.latency,
            };
            if shared.outcomes.send(connected).await.is_err() {
                drop_one(&c.open);
                return;
            }
            let held = client::hold(auth.ws, &shared.stop_holding).await;
            drop_one(&c.open);
            match held {
                Ok(()) => return,
                Err(failure) => {
                    bump(&c.dropped);
                    Outcome::Dropped {
                        at_ms: shared.clock.now_ms(),
                        failure,
                    }
                }
            }
        }
    };
    // The worker only stops listening after every task has ended.
    let _ = shared.outcomes.send(outcome).await;
}

// === parent ===

/// What the parent knows at the end of a run.
pub struct RunFacts {
    pub tallies: Tallies,
    pub interrupted: bool,
    pub errors: Vec<String>,
    /// How long the connections were held (None: the hold never started).
    pub held_for: Option<Duration>,
    /// Open connections when the hold ended.
    pub open_when_held: u64,
    /// Gateway readings before, at the end of the hold and after; `None` without a probe.
    #[allow(clippy::type_complexity)]
    pub gateway: Option<(
        Option<GatewaySample>,
        Option<GatewaySample>,
        Option<GatewaySample>,
    )>,
    pub gateway_series: Vec<GatewaySample>,
    /// Growth of the kernel's listen-queue overflow counter during the run.
    pub listen_overflows: Option<u64>,
    pub finished_ms: u64,
}

/// The phase of the whole run, as the parent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Holding,
    Closing,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::Holding => "holding",
            Phase::Closing => "closing",
        }
    }
}

/// Runs the scenario with its workers and prints progress. Returns what it measured.
pub async fn run(
    plan: Arc<Plan>,
    probe: Option<Probe>,
    worker_args: Vec<OsString>,
) -> Result<RunFacts> {
    let clock = Clock::from_unix_ms(plan.epoch_ms);
    let mut line = ProgressLine::new();
    line.note(&format!(
        "connect: {} connections to {} from {} process{}, rate {}, concurrency {}, hold {} s, \
         sources {}",
        plan.total,
        plan.url,
        plan.processes,
        if plan.processes == 1 { "" } else { "es" },
        if plan.rate > 0.0 {
            format!("{}/s", plan.rate)
        } else {
            "unlimited".to_owned()
        },
        plan.concurrency,
        plan.hold.as_secs(),
        plan.sources.describe(),
    ));
    for w in plan.warnings() {
        line.note(&format!("warning: {w}"));
    }

    let overflows_before = probe::listen_overflows();
    let mut gateway_series: Vec<GatewaySample> = Vec::new();
    let before = match &probe {
        Some(p) => {
            let s = p.sample(clock.now_ms()).await;
            gateway_series.push(s);
            Some(s)
        }
        None => None,
    };

    let mut workers: Workers<Progress, Tallies> = if plan.processes == 1 {
        let plan = Arc::clone(&plan);
        Workers::in_process(move |link| run_worker(plan, 0, 1, link))
    } else {
        Workers::processes(plan.processes, &worker_args)?
    };
    let n = workers.count();
    let mut latest = vec![Progress::default(); n];
    let mut ready = vec![false; n];
    let mut results: Vec<Option<Tallies>> = vec![None; n];
    let mut errors: Vec<String> = Vec::new();
    let mut phase = Phase::Connecting;
    let mut hold_started: Option<Instant> = None;
    let mut hold_deadline = Instant::now();
    let mut held: Option<GatewaySample> = None;
    let mut open_when_held = 0u64;
    let mut interrupted = false;
    let mut last_ok = 0u64;
    let mut last_tick = Instant::now();
    let mut ticker = progress_ticker(&clock);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);

    loop {
        tokio::select! {
            event = workers.next() => {
                let Some((i, event)) = event else { break };
                let i = i as usize;
                match event {
                    Event::Msg(WorkerMsg::Progress(p)) => latest[i] = p,
                    Event::Msg(WorkerMsg::Ready(p)) => {
                        latest[i] = p;
                        ready[i] = true;
                        if phase == Phase::Connecting && ready.iter().all(|r| *r) {
                            phase = Phase::Holding;
                            workers.broadcast(Control::Hold).await;
                            hold_started = Some(Instant::now());
                            hold_deadline = Instant::now() + plan.hold;
                        }
                    }
                    Event::Msg(WorkerMsg::Result(t)) => results[i] = Some(t),
                    Event::Msg(WorkerMsg::Fatal { error }) => {
                        errors.push(format!("worker {i}: {error}"));
                        phase = Phase::Closing;
                        workers.broadcast(Control::Abort).await;
                    }
                    Event::Gone { detail } => {
                        if results[i].is_none() {
                            errors.push(format!("worker {i} ended without results: {detail}"));
                            if phase != Phase::Closing {
                                phase = Phase::Closing;
                                workers.broadcast(Control::Abort).await;
                            }
                        }
                    }
                }
            }
            () = tokio::time::sleep_until(hold_deadline), if phase == Phase::Holding => {
                open_when_held = latest.iter().map(|p| p.open).sum();
                if let Some(p) = &probe {
                    let s = p.sample(clock.now_ms()).await;
                    gateway_series.push(s);
                    held = Some(s);
                }
                phase = Phase::Closing;
                workers.broadcast(Control::Finish).await;
            }
            _ = ticker.tick() => {
                let mut total = Progress::default();
                for p in &latest {
                    total.add(p);
                }
                let dt = last_tick.elapsed().as_secs_f64().max(1e-3);
                let rate = total.ok.saturating_sub(last_ok) as f64 / dt;
                last_ok = total.ok;
                last_tick = Instant::now();
                line.show(&Snapshot {
                    elapsed: clock.elapsed(),
                    phase: phase.label(),
                    open: total.open,
                    in_flight: total.in_flight,
                    ok: total.ok,
                    failed: total.failed,
                    dropped: total.dropped,
                    rate,
                    target: plan.total,
                });
                if let Some(p) = &probe {
                    gateway_series.push(p.sample(clock.now_ms()).await);
                }
            }
            res = &mut ctrl_c, if !interrupted => {
                interrupted = true;
                scenario::interrupted(&mut line, res);
                phase = Phase::Closing;
                workers.broadcast(Control::Abort).await;
            }
        }
    }
    line.finish();
    let after = match &probe {
        Some(p) => {
            let s = p.sample(clock.now_ms()).await;
            gateway_series.push(s);
            Some(s)
        }
        None => None,
    };

    let mut merged = Tallies::default();
    for t in results.iter().flatten() {
        merged.merge(t);
    }
    let held_for = hold_started.map(|s| s.elapsed().min(plan.hold));
    let listen_overflows = match (overflows_before, probe::listen_overflows()) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b)),
        _ => None,
    };
    Ok(RunFacts {
        tallies: merged,
        interrupted,
        errors,
        held_for,
        open_when_held,
        gateway: probe.as_ref().map(|_| (before, held, after)),
        gateway_series,
        listen_overflows,
        finished_ms: clock.now_ms(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn cli(extra: &[&str]) -> Cli {
        let mut args = vec!["loadtest", "connect", "--secret", SECRET];
        args.extend_from_slice(extra);
        Cli::try_parse_from(args).unwrap()
    }

    #[test]
    fn plan_checks_its_inputs() {
        let plan = Plan::from_cli(&cli(&["--connections", "50000"]), 20_000).unwrap();
        assert_eq!(plan.processes, 3);
        assert!(
            !plan.sources.addrs.is_empty(),
            "50k connections need several sources"
        );
        assert!(plan.warnings().is_empty(), "{:?}", plan.warnings());
        for bad in [
            &["--url", "ws://8.8.8.8/ws"][..],
            &["--connections", "0"],
            &["--rate=-1"],
            &["--rate", "NaN"],
            &["--concurrency", "0"],
            &["--timeout", "0"],
            &["--allow-failures", "101"],
            &["--connections", "2", "--processes", "3"],
            &["--users", "0"],
            &[
                "--url",
                "ws://127.0.0.1:1/ws",
                "--url",
                "ws://127.0.0.1:2/ws",
            ],
        ] {
            let args = [&["connect", "--secret", SECRET][..], bad].concat();
            assert!(
                scenario::plan_from_args(&args, Plan::from_cli).is_err(),
                "{bad:?}"
            );
        }
        let no_creds = Cli::try_parse_from(["loadtest", "connect"]).unwrap();
        if std::env::var_os("SB_JWT_SECRET").is_none() {
            assert!(Plan::from_cli(&no_creds, 20_000).is_err());
        }
    }

    #[test]
    fn forced_process_count_is_warned_about() {
        let plan = Plan::from_cli(
            &cli(&["--connections", "30000", "--processes", "1"]),
            20_000,
        )
        .unwrap();
        assert!(plan.warnings().iter().any(|w| w.contains("EMFILE")));
        let plan = Plan::from_cli(
            &cli(&["--connections", "30000", "--source-ips", "127.0.0.2"]),
            20_000,
        )
        .unwrap();
        let expected_warning = plan.ports < 30_000;
        assert_eq!(
            plan.warnings().iter().any(|w| w.contains("EADDRNOTAVAIL")),
            expected_warning
        );
    }

    #[test]
    fn shares_split_rate_and_concurrency() {
        let plan = Plan::from_cli(
            &cli(&[
                "--connections",
                "10",
                "--rate",
                "100",
                "--concurrency",
                "5",
                "--processes",
                "2",
            ]),
            20_000,
        )
        .unwrap();
        let (r0, rate, conc) = plan.share(0, 2);
        let (r1, _, _) = plan.share(1, 2);
        assert_eq!((r0, r1), (0..5, 5..10));
        assert_eq!(rate, 50.0);
        assert_eq!(conc, 3);
    }

    #[test]
    fn tallies_merge() {
        let mut a = Tallies::default();
        a.apply(Outcome::Connected {
            started_ms: 10,
            at_ms: 20,
            latency: Duration::from_millis(10),
        });
        a.apply(Outcome::Failed {
            started_ms: 5,
            at_ms: 1500,
            failure: Failure::Http(429),
        });
        let mut b = Tallies::default();
        b.apply(Outcome::Connected {
            started_ms: 30,
            at_ms: 2500,
            latency: Duration::from_millis(30),
        });
        b.apply(Outcome::Dropped {
            at_ms: 3000,
            failure: Failure::Closed {
                code: 1013,
                error: None,
            },
        });
        b.apply(Outcome::Aborted);
        a.merge(&b);
        assert_eq!(
            (a.attempted, a.ok, a.failed, a.dropped, a.aborted),
            (3, 2, 1, 1, 1)
        );
        assert_eq!(a.first_attempt_ms, Some(5));
        assert_eq!(a.last_outcome_ms, Some(2500));
        assert_eq!(a.latency_us.count(), 2);
        assert_eq!(a.failure_limits.get("rate_limited"), 1);
        assert_eq!(a.drops.get("close 1013 (OVERLOADED)"), 1);
        assert_eq!(a.connects.counts(), &[1, 0, 1]);
        // And the merged form survives the trip from a worker process.
        let back: Tallies = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back.latency_us, a.latency_us);
        assert_eq!(back.failures, a.failures);
    }
}
