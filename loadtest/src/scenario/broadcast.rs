//! The `broadcast` scenario: N subscribers (authenticated like `connect`, spread over
//! worker processes and round-robin over the gateway URLs) each subscribe to one of C
//! channels; once all are subscribed, the parent publishes at a target rate for a
//! duration (HTTP API or client frames, see [`crate::publish`]), then tells the
//! workers the last acknowledged offset of each channel and waits until every
//! subscriber has caught up (or `--drain` passed). Subscribers measure delivery
//! latency from the publish timestamp in each payload and track offsets for gaps and
//! duplicates; the parent merges it all into the report.

use std::ffi::OsString;
use std::net::IpAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::{Cli, PublishVia};
use crate::client::{self, Failure, Stage};
use crate::payload::{self, Frame};
use crate::probe::{self, CpuSeconds, GatewaySample, Probe};
use crate::progress::{self, ProgressLine, TICK};
use crate::publish::{self, Live, PublishTallies, Route, Schedule};
use crate::report::broadcast::{BroadcastReport, CpuUse, ProcessCpu, RunFacts};
use crate::scenario::connect::Outputs;
use crate::scenario::{Clock, bump, dispatch, drop_one, min_some, unix_ms};
use crate::source::{self, SourcePlan};
use crate::spawn::{self, Control, Event, WorkerLink, WorkerMsg, Workers};
use crate::stats::series::SLOT_MS;
use crate::stats::{
    EventSeries, GapSummary, GaugeSeries, Histogram, HistogramSeries, OffsetTracker, Tally,
};
use crate::target::Target;
use crate::tokens::{Minter, TokenSource};

/// Largest publication rate accepted: far beyond a loopback gateway; a larger value is
/// a typo, and the bound keeps the schedule arithmetic finite.
const MAX_RATE: f64 = 1_000_000.0;
/// Longest publishing time and drain accepted (one day).
const MAX_DURATION_SECS: u64 = 86_400;
/// Longest handshake deadline accepted (ten minutes).
const MAX_TIMEOUT_SECS: u64 = 600;
/// Largest payload: the gateway's default frame limit is 64 KiB, and the `message`
/// frame wraps the payload in about 100 bytes more.
const MAX_PAYLOAD_BYTES: usize = 60 * 1024;
/// Most publisher connections.
const MAX_PUBLISHERS: u32 = 1024;
/// Capacity of the queue from subscriber tasks to their worker's bookkeeping.
const OUTCOME_QUEUE: usize = 4096;
/// Latency series per worker, each behind its own lock: subscriber i records into
/// shard i mod this, so that the runtime's threads rarely wait on one another while
/// every delivery is recorded at once (and the live p50/p99 is never stale).
const LATENCY_SHARDS: usize = 8;
/// How often a draining worker checks whether its subscribers caught up, so that the
/// run ends promptly rather than on the next one-second tick.
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// Examples of subscribers with gaps or duplicates kept per worker for the report.
const MAX_PROBLEM_EXAMPLES: usize = 10;
/// Delay of the progress line after the workers' reports.
const PROGRESS_LAG_MS: u64 = 50;
/// Exit status after a second Ctrl-C.
const EXIT_INTERRUPTED: i32 = 130;
/// `expected` value of a channel whose last offset is not known (yet).
const UNKNOWN: u64 = u64::MAX;

/// Everything a run needs, identical in the parent and every worker.
pub struct Plan {
    pub targets: Vec<Target>,
    pub urls: Vec<String>,
    pub api_urls: Vec<reqwest::Url>,
    pub api_key: Option<String>,
    pub via: PublishVia,
    pub subscribers: u64,
    pub channels: u64,
    pub namespace: String,
    pub rate: f64,
    pub duration: Duration,
    pub payload_bytes: usize,
    pub publishers: u32,
    pub concurrency: u64,
    pub timeout: Duration,
    pub drain: Duration,
    pub tokens: TokenSource,
    pub tokens_described: String,
    pub sources: SourcePlan,
    pub processes: u32,
    pub fd_limit: u64,
    pub ports: u64,
    pub allow_failures_pct: f64,
    pub epoch_ms: u64,
}

impl Plan {
    pub fn from_cli(cli: &Cli, fd_limit: u64) -> Result<Plan> {
        let targets = cli
            .url
            .iter()
            .map(|u| Target::parse(u))
            .collect::<Result<Vec<_>>>()?;
        if targets.is_empty() {
            bail!("give at least one --url");
        }
        if cli.subscribers == 0 {
            bail!("--subscribers must be at least 1");
        }
        if cli.channels == 0 || cli.channels > cli.subscribers {
            bail!("--channels must be between 1 and --subscribers");
        }
        shared::protocol::Channel::parse(&format!("{}:0", cli.namespace)).map_err(|e| {
            anyhow::anyhow!(
                "--namespace {:?} is not a channel namespace: {e}",
                cli.namespace
            )
        })?;
        let rate = cli.rate.unwrap_or(crate::cli::DEFAULT_PUBLISH_RATE);
        if !rate.is_finite() || rate <= 0.0 || rate > MAX_RATE {
            bail!("--rate (publications per second) must be above 0 and at most {MAX_RATE}");
        }
        if cli.duration == 0 || cli.duration > MAX_DURATION_SECS {
            bail!("--duration must be between 1 and {MAX_DURATION_SECS} s");
        }
        if cli.drain > MAX_DURATION_SECS {
            bail!("--drain must be at most {MAX_DURATION_SECS} s");
        }
        if cli.payload_bytes > MAX_PAYLOAD_BYTES {
            bail!(
                "--payload-bytes must be at most {MAX_PAYLOAD_BYTES} (the gateway's frame limit is 64 KiB)"
            );
        }
        if cli.publishers == 0 || cli.publishers > MAX_PUBLISHERS {
            bail!("--publishers must be between 1 and {MAX_PUBLISHERS}");
        }
        if cli.concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        if cli.timeout == 0 || cli.timeout > MAX_TIMEOUT_SECS {
            bail!("--timeout must be between 1 and {MAX_TIMEOUT_SECS} s");
        }
        if !cli.allow_failures.is_finite() || !(0.0..=100.0).contains(&cli.allow_failures) {
            bail!("--allow-failures is a percentage, 0 to 100");
        }
        let api_urls = cli
            .api_url
            .iter()
            .map(|u| publish::publish_url(u))
            .collect::<Result<Vec<_>>>()?;
        let api_key = cli.api_key.clone().filter(|k| !k.is_empty());
        if cli.publish_via == PublishVia::Api {
            if api_urls.is_empty() {
                bail!(
                    "--publish-via api needs --api-url (the gateway's public HTTP address, \
                     e.g. http://127.0.0.1:8080)"
                );
            }
            if api_key.is_none() {
                bail!(
                    "--publish-via api needs --api-key (or SB_API_KEY): the gateway's SB_API_KEY"
                );
            }
        }
        let epoch_ms = cli.epoch_ms.unwrap_or_else(unix_ms);
        let publisher_tokens = match cli.publish_via {
            PublishVia::Api => 0,
            PublishVia::Client => u64::from(cli.publishers),
        };
        let (tokens, tokens_described) = match (&cli.token_file, &cli.secret) {
            (Some(path), _) => {
                let source = TokenSource::from_file(path)?;
                let n = match &source {
                    TokenSource::File(lines) => lines.len(),
                    TokenSource::Mint(_) => 0,
                };
                (source, format!("{n} from {}", path.display()))
            }
            (None, Some(secret)) => {
                let users = cli.users.unwrap_or(cli.subscribers + publisher_tokens);
                let minter = Minter::new(secret, users, cli.ttl, epoch_ms)?;
                (
                    TokenSource::Mint(Arc::new(minter)),
                    format!("minted HS256, {users} users, ttl {} s", cli.ttl),
                )
            }
            (None, None) => bail!(
                "no credentials: give --secret (or SB_JWT_SECRET) to mint tokens, or --token-file"
            ),
        };
        let ports = source::ephemeral_ports();
        // Every URL gets its share of the subscribers; plan ports for the busiest one.
        let per_target = cli.subscribers.div_ceil(targets.len() as u64);
        let sources = SourcePlan::new(
            cli.source_ips.as_deref(),
            per_target,
            targets[0].addr.ip(),
            ports,
        )?;
        let processes = spawn::process_count(cli.subscribers, cli.processes, fd_limit);
        if u64::from(processes) > cli.subscribers {
            bail!(
                "--processes {processes} is more than --subscribers {}",
                cli.subscribers
            );
        }
        Ok(Plan {
            urls: cli.url.clone(),
            targets,
            api_urls,
            api_key,
            via: cli.publish_via,
            subscribers: cli.subscribers,
            channels: cli.channels,
            namespace: cli.namespace.clone(),
            rate,
            duration: Duration::from_secs(cli.duration),
            payload_bytes: cli.payload_bytes,
            publishers: cli.publishers,
            concurrency: cli.concurrency,
            timeout: Duration::from_secs(cli.timeout),
            drain: Duration::from_secs(cli.drain),
            tokens,
            tokens_described,
            sources,
            processes,
            fd_limit,
            ports,
            allow_failures_pct: cli.allow_failures,
            epoch_ms,
        })
    }

    /// Channel `k`'s name.
    pub fn channel_name(&self, k: u64) -> String {
        format!("{}:{k}", self.namespace)
    }

    /// Every channel's name, by index.
    pub fn channel_names(&self) -> Vec<String> {
        (0..self.channels).map(|k| self.channel_name(k)).collect()
    }

    /// The channel index of subscriber `i`.
    pub fn channel_of(&self, i: u64) -> u64 {
        i % self.channels
    }

    /// Subscribers on channel `k`.
    pub fn subscribers_on(&self, k: u64) -> u64 {
        self.subscribers / self.channels + u64::from(k < self.subscribers % self.channels)
    }

    /// The gateway URL of subscriber `i` (round robin).
    pub fn target_of(&self, i: u64) -> &Target {
        &self.targets[(i % self.targets.len() as u64) as usize]
    }

    /// Deliveries per second if every publication reaches every subscriber of its
    /// channel in time.
    pub fn target_deliveries_per_s(&self) -> f64 {
        self.rate * self.subscribers as f64 / self.channels as f64
    }

    /// Problems visible before the run starts.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        let per_process = self.subscribers.div_ceil(u64::from(self.processes));
        let capacity = spawn::connections_per_process(self.fd_limit);
        if per_process > capacity {
            w.push(format!(
                "each of {} processes opens up to {per_process} connections but can hold about \
                 {capacity} (open-file limit {}): expect EMFILE; use more --processes",
                self.processes, self.fd_limit
            ));
        }
        let per_target = self.subscribers.div_ceil(self.targets.len() as u64);
        let port_capacity = self.sources.port_capacity(self.ports);
        if per_target > port_capacity {
            w.push(format!(
                "{per_target} connections per gateway need more than the {port_capacity} \
                 ephemeral ports of {}: expect EADDRNOTAVAIL; give more --source-ips",
                self.sources.describe()
            ));
        }
        if self.via == PublishVia::Client {
            let per_connection = self.rate / f64::from(self.publishers);
            if per_connection > f64::from(crate::cli::GATEWAY_DEFAULT_MESSAGE_RATE) {
                w.push(format!(
                    "--publish-via client sends {per_connection:.0} frames/s per publisher \
                     connection; the gateway's default per-connection limit is {}/s \
                     (SB_MESSAGE_RATE, SB_MESSAGE_BURST): raise them or give more --publishers",
                    crate::cli::GATEWAY_DEFAULT_MESSAGE_RATE
                ));
            }
        }
        w
    }

    /// Worker `index`'s subscriber indices and handshake concurrency.
    fn share(&self, index: u32, count: u32) -> (Range<u64>, u64) {
        let range = spawn::share(self.subscribers, index, count);
        let concurrency = self.concurrency.div_ceil(u64::from(count.max(1))).max(1);
        (range, concurrency)
    }

    /// What the publisher needs.
    fn schedule(&self) -> Schedule {
        let route = match self.via {
            PublishVia::Api => Route::Api {
                urls: self.api_urls.clone(),
                key: self.api_key.clone().unwrap_or_default(),
            },
            PublishVia::Client => Route::Client {
                targets: self.targets.clone(),
                tokens: self.tokens.clone(),
                first_token: self.subscribers,
            },
        };
        Schedule {
            route,
            channels: self.channel_names(),
            rate: self.rate,
            duration: self.duration,
            payload_bytes: self.payload_bytes,
            publishers: self.publishers,
            timeout: self.timeout,
        }
    }
}

// === what workers report ===

/// A worker's counters, about once a second.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub attempted: u64,
    pub subscribed: u64,
    pub failed: u64,
    pub aborted: u64,
    pub open: u64,
    pub in_flight: u64,
    pub closed: u64,
    pub deliveries: u64,
    /// Once the expected offsets are known: open subscribers that received up to the
    /// last acknowledged offset of their channel.
    pub caught_up: Option<u64>,
    /// Delivery latency in the last complete one-second slot: `(slot, histogram)`.
    pub window: Option<(u64, Histogram)>,
}

/// Everything a worker measured; merged by the parent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tallies {
    pub attempted: u64,
    pub subscribed: u64,
    pub failed: u64,
    pub aborted: u64,
    /// Subscribers the server closed or dropped after `subscribed`.
    pub closed: u64,
    pub failures: Tally,
    pub failure_limits: Tally,
    pub closes: Tally,
    pub close_limits: Tally,
    /// TCP connect start to `subscribed`, microseconds.
    pub setup_latency_us: Histogram,
    /// Delivery latency (receive time minus the publish timestamp), microseconds, per
    /// one-second slot of the run; each slot's count is that second's deliveries.
    pub latency_us: HistogramSeries,
    /// Deliveries whose payload carried no timestamp (someone else's publications).
    pub untimed: u64,
    /// Frames on a channel the subscriber did not subscribe to, or unreadable.
    pub stray_frames: u64,
    pub gaps: GapSummary,
    /// Deliveries per subscriber that stayed subscribed to the end.
    pub per_subscriber: Histogram,
    pub problems: Vec<String>,
    pub open: GaugeSeries,
    pub close_series: EventSeries,
    pub first_attempt_ms: Option<u64>,
    pub last_outcome_ms: Option<u64>,
    pub last_delivery_ms: Option<u64>,
    pub open_at_finish: u64,
    /// CPU this worker process used from the start of publishing to the end of the
    /// drain (worker processes only; an in-process worker is the parent's CPU).
    pub cpu: Option<CpuSeconds>,
}

impl Tallies {
    pub fn merge(&mut self, o: &Tallies) {
        self.attempted += o.attempted;
        self.subscribed += o.subscribed;
        self.failed += o.failed;
        self.aborted += o.aborted;
        self.closed += o.closed;
        self.failures.merge(&o.failures);
        self.failure_limits.merge(&o.failure_limits);
        self.closes.merge(&o.closes);
        self.close_limits.merge(&o.close_limits);
        self.setup_latency_us.merge(&o.setup_latency_us);
        self.latency_us.merge(&o.latency_us);
        self.untimed += o.untimed;
        self.stray_frames += o.stray_frames;
        self.gaps.merge(&o.gaps);
        self.per_subscriber.merge(&o.per_subscriber);
        for p in &o.problems {
            if self.problems.len() < MAX_PROBLEM_EXAMPLES {
                self.problems.push(p.clone());
            }
        }
        self.open.merge(&o.open);
        self.close_series.merge(&o.close_series);
        self.first_attempt_ms = min_some(self.first_attempt_ms, o.first_attempt_ms);
        self.last_outcome_ms = self.last_outcome_ms.max(o.last_outcome_ms);
        self.last_delivery_ms = self.last_delivery_ms.max(o.last_delivery_ms);
        self.open_at_finish += o.open_at_finish;
        self.cpu = match (self.cpu, o.cpu) {
            (Some(mut a), Some(b)) => {
                a.add(&b);
                Some(a)
            }
            (a, b) => a.or(b),
        };
    }

    fn apply(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Subscribed {
                started_ms,
                at_ms,
                latency,
            } => {
                self.attempted += 1;
                self.subscribed += 1;
                self.first_attempt_ms = min_some(self.first_attempt_ms, Some(started_ms));
                self.last_outcome_ms = self.last_outcome_ms.max(Some(at_ms));
                self.setup_latency_us
                    .record(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
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
            }
            Outcome::Aborted => self.aborted += 1,
            Outcome::Ended(end) => {
                let SubscriberEnd {
                    received,
                    gaps,
                    problem,
                    closed,
                    untimed,
                    stray_frames,
                } = *end;
                self.gaps.merge(&gaps);
                self.untimed += untimed;
                self.stray_frames += stray_frames;
                if let Some(p) = problem
                    && self.problems.len() < MAX_PROBLEM_EXAMPLES
                {
                    self.problems.push(p);
                }
                match closed {
                    Some((at_ms, failure)) => {
                        self.closed += 1;
                        self.closes.add(&failure.to_string(), 1);
                        self.close_limits.add(failure.limit().label(), 1);
                        self.close_series.record(at_ms, 1);
                    }
                    None => self.per_subscriber.record(received),
                }
            }
        }
    }
}

/// How one subscriber's life ended.
struct SubscriberEnd {
    received: u64,
    gaps: GapSummary,
    problem: Option<String>,
    /// When and why the server ended it, if it did.
    closed: Option<(u64, Failure)>,
    untimed: u64,
    stray_frames: u64,
}

/// What a subscriber task tells its worker.
enum Outcome {
    Subscribed {
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
    Ended(Box<SubscriberEnd>),
}

impl Outcome {
    fn ends_setup(&self) -> bool {
        !matches!(self, Outcome::Ended(_))
    }
}

/// Live counters shared by a worker's subscriber tasks.
#[derive(Default)]
struct Counters {
    attempted: AtomicU64,
    subscribed: AtomicU64,
    failed: AtomicU64,
    aborted: AtomicU64,
    open: AtomicU64,
    in_flight: AtomicU64,
    closed: AtomicU64,
    deliveries: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> Progress {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Progress {
            attempted: get(&self.attempted),
            subscribed: get(&self.subscribed),
            failed: get(&self.failed),
            aborted: get(&self.aborted),
            open: get(&self.open),
            in_flight: get(&self.in_flight),
            closed: get(&self.closed),
            deliveries: get(&self.deliveries),
            caught_up: None,
            window: None,
        }
    }
}

/// One live subscriber as its worker sees it, to tell when everyone caught up.
struct SubState {
    channel: usize,
    /// Highest offset received (starts at the `subscribed` offset).
    max_offset: AtomicU64,
    open: AtomicBool,
}

// === worker ===

struct Shared {
    plan: Arc<Plan>,
    clock: Clock,
    counters: Counters,
    outcomes: mpsc::Sender<Outcome>,
    stop_connecting: CancellationToken,
    stop_holding: CancellationToken,
    /// Last acknowledged offset per channel index ([`UNKNOWN`] until told).
    expected: Vec<AtomicU64>,
    latency: Vec<Mutex<HistogramSeries>>,
    last_delivery_ms: AtomicU64,
    subs: Mutex<Vec<Arc<SubState>>>,
}

impl Shared {
    fn latency_shard(&self, subscriber: u64) -> std::sync::MutexGuard<'_, HistogramSeries> {
        self.latency[(subscriber % self.latency.len() as u64) as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The latencies of one slot, over every shard.
    fn latency_slot(&self, slot: usize) -> Histogram {
        let mut h = Histogram::new();
        for shard in &self.latency {
            h.merge(&shard.lock().unwrap_or_else(|e| e.into_inner()).slot(slot));
        }
        h
    }

    /// Every latency recorded, per slot (the shards emptied).
    fn take_latency(&self) -> HistogramSeries {
        let mut all = HistogramSeries::new();
        for shard in &self.latency {
            all.merge(&std::mem::take(
                &mut *shard.lock().unwrap_or_else(|e| e.into_inner()),
            ));
        }
        all
    }

    /// Open subscribers that received everything acknowledged on their channel;
    /// `None` before the expected offsets are known.
    fn caught_up(&self, told: bool) -> Option<u64> {
        if !told {
            return None;
        }
        let subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
        let n = subs
            .iter()
            .filter(|s| s.open.load(Ordering::Relaxed))
            .filter(|s| {
                let want = self.expected[s.channel].load(Ordering::Relaxed);
                want == UNKNOWN || s.max_offset.load(Ordering::Relaxed) >= want
            })
            .count();
        Some(n as u64)
    }
}

/// Runs worker `index` of `count`: its share of the subscribers, then waits for the
/// parent's commands, then reports.
pub async fn run_worker(
    plan: Arc<Plan>,
    index: u32,
    count: u32,
    in_process: bool,
    mut link: WorkerLink<Progress, Tallies>,
) -> Result<()> {
    let (range, concurrency) = plan.share(index, count);
    let (outcomes_tx, mut outcomes) = mpsc::channel(OUTCOME_QUEUE);
    let shared = Arc::new(Shared {
        clock: Clock::from_unix_ms(plan.epoch_ms),
        expected: (0..plan.channels)
            .map(|_| AtomicU64::new(UNKNOWN))
            .collect(),
        plan,
        counters: Counters::default(),
        outcomes: outcomes_tx,
        stop_connecting: CancellationToken::new(),
        stop_holding: CancellationToken::new(),
        latency: (0..LATENCY_SHARDS)
            .map(|_| Mutex::new(HistogramSeries::new()))
            .collect(),
        last_delivery_ms: AtomicU64::new(0),
        subs: Mutex::new(Vec::new()),
    });
    let tracker = TaskTracker::new();
    let task_shared = Arc::clone(&shared);
    let mut dispatcher = tokio::spawn(dispatch(
        range,
        0.0,
        concurrency,
        shared.stop_connecting.clone(),
        tracker.clone(),
        move |index, permit| {
            let shared = Arc::clone(&task_shared);
            async move { subscriber(index, &shared, permit).await }
        },
    ));

    let mut tallies = Tallies::default();
    tallies.open.sample(shared.clock.now_ms(), 0);
    let now_ms = shared.clock.now_ms();
    let next_boundary_ms = (now_ms / SLOT_MS + 1) * SLOT_MS;
    let mut ticker = tokio::time::interval_at(
        Instant::now() + Duration::from_millis(next_boundary_ms - now_ms),
        TICK,
    );
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut drain_poll = tokio::time::interval(DRAIN_POLL);
    drain_poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut dispatched: Option<u64> = None;
    let mut setups_done = 0u64;
    let mut ready_sent = false;
    let mut finishing = false;
    let mut told = false;
    let mut reported_caught_up = false;
    let mut cpu_start: Option<CpuSeconds> = None;
    let snapshot = |told: bool| {
        let mut p = shared.counters.snapshot();
        p.caught_up = shared.caught_up(told);
        p
    };
    loop {
        tokio::select! {
            Some(outcome) = outcomes.recv() => {
                if outcome.ends_setup() {
                    setups_done += 1;
                }
                tallies.apply(outcome);
            }
            joined = &mut dispatcher, if dispatched.is_none() => {
                dispatched = Some(joined.context("the dispatcher panicked")?);
            }
            _ = ticker.tick() => {
                let now_ms = shared.clock.now_ms();
                let mut p = snapshot(told);
                tallies.open.sample(now_ms, p.open);
                let slot = now_ms / SLOT_MS;
                if slot > 0 {
                    p.window = Some((slot - 1, shared.latency_slot((slot - 1) as usize)));
                }
                link.send(WorkerMsg::Progress(p)).await?;
            }
            _ = drain_poll.tick(), if told && !reported_caught_up && !finishing => {
                let p = snapshot(true);
                if p.caught_up.is_some_and(|c| c >= p.open) {
                    reported_caught_up = true;
                    link.send(WorkerMsg::Progress(p)).await?;
                }
            }
            control = link.recv(), if !finishing => match control {
                Control::Hold => {
                    if !in_process {
                        cpu_start = probe::cpu_seconds(None);
                    }
                }
                Control::Expect(last) => {
                    for (slot, value) in shared.expected.iter().zip(last) {
                        slot.store(value.unwrap_or(UNKNOWN), Ordering::Relaxed);
                    }
                    told = true;
                }
                Control::Finish | Control::Abort => {
                    if let (Some(start), Some(end)) = (cpu_start, probe::cpu_seconds(None)) {
                        tallies.cpu = Some(end.since(&start));
                    }
                    if matches!(control, Control::Abort) {
                        shared.stop_connecting.cancel();
                    }
                    finishing = true;
                    tallies.open_at_finish = shared.counters.snapshot().open;
                    shared.stop_holding.cancel();
                }
            },
            () = tracker.wait(), if finishing && dispatched.is_some() => break,
        }
        if !ready_sent && dispatched == Some(setups_done) {
            ready_sent = true;
            link.send(WorkerMsg::Ready(snapshot(false))).await?;
        }
    }
    while let Ok(outcome) = outcomes.try_recv() {
        tallies.apply(outcome);
    }
    tallies.latency_us = shared.take_latency();
    let last = shared.last_delivery_ms.load(Ordering::Relaxed);
    tallies.last_delivery_ms = (last > 0).then_some(last);
    let p = shared.counters.snapshot();
    tallies.open.sample(shared.clock.now_ms() + SLOT_MS, p.open);
    link.send(WorkerMsg::Progress(p)).await?;
    link.send(WorkerMsg::Result(tallies)).await
}

/// One subscriber: connect, authenticate, subscribe (holding a concurrency permit),
/// then receive until told to stop.
async fn subscriber(index: u64, shared: &Shared, permit: OwnedSemaphorePermit) {
    let c = &shared.counters;
    let plan = &shared.plan;
    let source: Option<IpAddr> = plan.sources.for_connection(index);
    let channel = plan.channel_of(index);
    let channel_name = plan.channel_name(channel);
    let started_ms = shared.clock.now_ms();
    let start = Instant::now();
    bump(&c.in_flight);
    let setup = async {
        let token = plan
            .tokens
            .token_for(index)
            .map_err(|e| Failure::Token(format!("{e:#}")))?;
        let mut auth = client::connect(plan.target_of(index), source, &token, plan.timeout).await?;
        let offset =
            client::subscribe(&mut auth.ws, &channel_name, Instant::now() + plan.timeout).await?;
        Ok::<_, Failure>((auth.ws, offset))
    };
    let result = tokio::select! {
        r = setup => Some(r),
        () = shared.stop_connecting.cancelled() => None,
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
        Some(Ok((ws, offset))) => {
            bump(&c.attempted);
            bump(&c.subscribed);
            bump(&c.open);
            let subscribed = Outcome::Subscribed {
                started_ms,
                at_ms,
                latency: start.elapsed(),
            };
            if shared.outcomes.send(subscribed).await.is_err() {
                drop_one(&c.open);
                return;
            }
            let state = Arc::new(SubState {
                channel: channel as usize,
                max_offset: AtomicU64::new(offset),
                open: AtomicBool::new(true),
            });
            shared
                .subs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Arc::clone(&state));
            let end = receive(index, ws, shared, &channel_name, offset, &state).await;
            state.open.store(false, Ordering::Relaxed);
            drop_one(&c.open);
            if end.closed.is_some() {
                bump(&c.closed);
            }
            Outcome::Ended(Box::new(end))
        }
    };
    let _ = shared.outcomes.send(outcome).await;
}

/// The receive loop of a subscribed connection: every `message` is checked against
/// the offsets seen so far and its latency recorded, until `stop_holding` (then a
/// normal close) or the server ends the connection.
async fn receive(
    index: u64,
    mut ws: client::Ws,
    shared: &Shared,
    channel: &str,
    subscribed_at: u64,
    state: &SubState,
) -> SubscriberEnd {
    let epoch_us = shared.clock.epoch_unix_ms().saturating_mul(1000);
    let mut offsets = OffsetTracker::new();
    offsets.expect(channel, subscribed_at.checked_add(1), None);
    let mut received = 0u64;
    let mut untimed = 0u64;
    let mut stray_frames = 0u64;
    let mut last_ms = 0u64;
    let mut error_code: Option<String> = None;
    let mut closed: Option<Failure> = None;
    let stopped = shared.stop_holding.cancelled();
    tokio::pin!(stopped);
    loop {
        let msg = tokio::select! {
            biased;
            () = &mut stopped => break,
            msg = ws.next() => msg,
        };
        match msg {
            Some(Ok(Message::Text(text))) => match payload::parse(text.as_str()) {
                Frame::Message(d) if d.channel == channel => {
                    offsets.record(channel, d.offset);
                    received += 1;
                    shared.counters.deliveries.fetch_add(1, Ordering::Relaxed);
                    state.max_offset.fetch_max(d.offset, Ordering::Relaxed);
                    match d.ts_us {
                        Some(ts) => {
                            let now_us = payload::unix_micros();
                            let at_ms = now_us.saturating_sub(epoch_us) / 1000;
                            shared
                                .latency_shard(index)
                                .record(at_ms, now_us.saturating_sub(ts));
                            last_ms = at_ms;
                        }
                        None => untimed += 1,
                    }
                }
                Frame::Message(_) | Frame::Invalid => stray_frames += 1,
                Frame::Other(o) => {
                    if o.kind == "error" {
                        error_code = o.code;
                    }
                }
            },
            Some(Ok(Message::Close(frame))) => {
                closed = Some(Failure::Closed {
                    code: frame.map_or(1005, |f| u16::from(f.code)),
                    error: error_code.take(),
                });
                break;
            }
            Some(Ok(Message::Binary(_))) => stray_frames += 1,
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                closed = Some(Failure::from_ws(e, Stage::Holding, error_code.take()));
                break;
            }
            None => {
                closed = Some(Failure::Dropped {
                    stage: Stage::Holding,
                    error: error_code.take(),
                });
                break;
            }
        }
    }
    shared
        .last_delivery_ms
        .fetch_max(last_ms, Ordering::Relaxed);
    let closed_at = shared.clock.now_ms();
    if closed.is_none() {
        // Stopped by us: everything acknowledged on the channel should be here.
        let k = state.channel;
        let last = shared.expected[k].load(Ordering::Relaxed);
        if last != UNKNOWN {
            offsets.expect(channel, None, Some(last));
        }
        // Closed with 1000 before the task ends, so that the worker (which waits
        // for every task) never exits with a subscriber half-closed.
        client::close(ws).await;
    }
    let report = offsets.report();
    let gaps = offsets.summary();
    let problem = report
        .get(channel)
        .filter(|r| r.missing > 0 || r.duplicates > 0)
        .map(|r| {
            let listed: Vec<String> = r
                .gaps
                .iter()
                .take(3)
                .map(|(a, b)| {
                    if a == b {
                        a.to_string()
                    } else {
                        format!("{a}-{b}")
                    }
                })
                .collect();
            format!(
                "subscriber {index} on {channel}: {} missing in {} gap(s){}, {} duplicate(s)",
                r.missing,
                r.gap_count,
                if listed.is_empty() {
                    String::new()
                } else {
                    format!(" (offsets {})", listed.join(", "))
                },
                r.duplicates
            )
        });
    SubscriberEnd {
        received,
        gaps,
        problem,
        closed: closed.map(|f| (closed_at, f)),
        untimed,
        stray_frames,
    }
}

// === parent ===

/// The phase of the whole run, as the parent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Subscribing,
    Publishing,
    Draining,
    Closing,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Subscribing => "subscribing",
            Phase::Publishing => "publishing",
            Phase::Draining => "draining",
            Phase::Closing => "closing",
        }
    }
}

/// CPU readings of the watched processes at the start of publishing.
struct CpuWatch {
    started: Instant,
    /// (pid, name, CPU at start)
    pids: Vec<(u32, String, Option<CpuSeconds>)>,
    own: Option<CpuSeconds>,
}

impl CpuWatch {
    fn start(pids: &[u32]) -> CpuWatch {
        CpuWatch {
            started: Instant::now(),
            pids: pids
                .iter()
                .map(|&pid| {
                    (
                        pid,
                        probe::process_name(pid).unwrap_or_else(|| "?".to_owned()),
                        probe::cpu_seconds(Some(pid)),
                    )
                })
                .collect(),
            own: probe::cpu_seconds(None),
        }
    }

    /// Readings now; worker processes' own CPU is added with [`CpuUse::add_workers`]
    /// when their results arrive.
    fn finish(&self) -> CpuUse {
        let wall_s = self.started.elapsed().as_secs_f64();
        let processes = self
            .pids
            .iter()
            .map(|(pid, name, start)| {
                let cpu = match (start, probe::cpu_seconds(Some(*pid))) {
                    (Some(a), Some(b)) => Some(b.since(a)),
                    _ => None,
                };
                ProcessCpu {
                    pid: *pid,
                    name: name.clone(),
                    cpu,
                    cores: cpu.map(|c| c.total() / wall_s.max(1e-3)),
                    rss_bytes: probe::rss_bytes(*pid),
                }
            })
            .collect();
        let parent = match (self.own, probe::cpu_seconds(None)) {
            (Some(a), Some(b)) => Some(b.since(&a)),
            _ => None,
        };
        CpuUse::new(wall_s, processes, parent)
    }
}

/// Runs the scenario with its workers and the publisher, prints progress and the
/// summary, writes the outputs. Returns whether the run met its goal.
pub async fn run(
    plan: Arc<Plan>,
    probe: Option<Probe>,
    pids: Vec<u32>,
    outputs: Outputs,
    worker_args: Vec<OsString>,
) -> Result<bool> {
    let clock = Clock::from_unix_ms(plan.epoch_ms);
    let mut line = ProgressLine::new();
    line.note(&format!(
        "broadcast: {} subscribers on {} channel{} ({}:0..) via {}, {} publications/s via {} \
         for {} s, payload {} B, from {} process{}",
        plan.subscribers,
        plan.channels,
        if plan.channels == 1 { "" } else { "s" },
        plan.namespace,
        plan.urls.join(", "),
        plan.rate,
        match plan.via {
            PublishVia::Api => "POST /v1/publish",
            PublishVia::Client => "client publish frames",
        },
        plan.duration.as_secs(),
        payload::data_len(plan.payload_bytes),
        plan.processes,
        if plan.processes == 1 { "" } else { "es" },
    ));
    for w in plan.warnings() {
        line.note(&format!("warning: {w}"));
    }

    let mut gateway_series: Vec<GatewaySample> = Vec::new();
    let before = match &probe {
        Some(p) => {
            let s = p.sample(clock.now_ms()).await;
            gateway_series.push(s);
            Some(s)
        }
        None => None,
    };

    let worker_processes = plan.processes > 1;
    let mut workers: Workers<Progress, Tallies> = if worker_processes {
        Workers::processes(plan.processes, &worker_args)?
    } else {
        let plan = Arc::clone(&plan);
        Workers::in_process(move |link| run_worker(plan, 0, 1, true, link))
    };
    let n = workers.count();
    let mut latest = vec![Progress::default(); n];
    let mut ready = vec![false; n];
    let mut results: Vec<Option<Tallies>> = vec![None; n];
    let mut errors: Vec<String> = Vec::new();
    let mut phase = Phase::Subscribing;
    let mut interrupted = false;
    let live = Arc::new(Live::default());
    let stop_publishing = CancellationToken::new();
    let mut publisher: Option<tokio::task::JoinHandle<Result<PublishTallies>>> = None;
    let mut published: Option<PublishTallies> = None;
    let mut publish_started_ms: Option<u64> = None;
    let mut publish_ended_ms: Option<u64> = None;
    let mut drain_deadline = Instant::now();
    let mut drain_s: Option<f64> = None;
    let mut drain_started: Option<Instant> = None;
    let mut drained_fully = false;
    let mut cpu_watch: Option<CpuWatch> = None;
    let mut cpu_end: Option<Instant> = None;
    let mut subscribed_sample: Option<GatewaySample> = None;
    let mut drained_sample: Option<GatewaySample> = None;
    let mut last_deliveries = 0u64;
    let mut last_sent = 0u64;
    let mut last_tick = Instant::now();
    let now_ms = clock.now_ms();
    let first_ms = (now_ms / SLOT_MS + 1) * SLOT_MS + PROGRESS_LAG_MS;
    let mut ticker = tokio::time::interval_at(
        Instant::now() + Duration::from_millis(first_ms - now_ms),
        TICK,
    );
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);

    // Ends the drain (or a run that cannot go on): readings, then Finish.
    macro_rules! finish {
        () => {
            if phase != Phase::Closing {
                if let Some(started) = drain_started {
                    drain_s = Some(started.elapsed().as_secs_f64());
                }
                cpu_end.get_or_insert_with(Instant::now);
                if let Some(p) = &probe {
                    let s = p.sample(clock.now_ms()).await;
                    gateway_series.push(s);
                    drained_sample = Some(s);
                }
                phase = Phase::Closing;
                workers.broadcast(Control::Finish).await;
            }
        };
    }

    let mut cpu: Option<CpuUse> = None;
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
                        if phase == Phase::Subscribing && ready.iter().all(|r| *r) {
                            if let Some(p) = &probe {
                                let s = p.sample(clock.now_ms()).await;
                                gateway_series.push(s);
                                subscribed_sample = Some(s);
                            }
                            phase = Phase::Publishing;
                            workers.broadcast(Control::Hold).await;
                            cpu_watch = Some(CpuWatch::start(&pids));
                            publish_started_ms = Some(clock.now_ms());
                            publisher = Some(tokio::spawn(publish::run(
                                plan.schedule(),
                                clock,
                                Arc::clone(&live),
                                stop_publishing.clone(),
                            )));
                        }
                    }
                    Event::Msg(WorkerMsg::Result(t)) => results[i] = Some(t),
                    Event::Msg(WorkerMsg::Fatal { error }) => {
                        errors.push(format!("worker {i}: {error}"));
                        stop_publishing.cancel();
                        if phase != Phase::Closing {
                            phase = Phase::Closing;
                            workers.broadcast(Control::Abort).await;
                        }
                    }
                    Event::Gone { detail } => {
                        if results[i].is_none() {
                            errors.push(format!("worker {i} ended without results: {detail}"));
                            stop_publishing.cancel();
                            if phase != Phase::Closing {
                                phase = Phase::Closing;
                                workers.broadcast(Control::Abort).await;
                            }
                        }
                    }
                }
                if phase == Phase::Draining && all_caught_up(&latest) {
                    drained_fully = true;
                    finish!();
                }
            }
            joined = async { publisher.as_mut().expect("guarded").await }, if publisher.is_some() => {
                publisher = None;
                publish_ended_ms = Some(clock.now_ms());
                match joined {
                    Ok(Ok(t)) => {
                        let last = t.channel_last.clone();
                        published = Some(t);
                        if phase == Phase::Publishing {
                            phase = Phase::Draining;
                            drain_started = Some(Instant::now());
                            drain_deadline = Instant::now() + plan.drain;
                            workers.broadcast(Control::Expect(last)).await;
                        }
                    }
                    Ok(Err(e)) => {
                        errors.push(format!("publisher: {e:#}"));
                        finish!();
                    }
                    Err(e) => {
                        errors.push(format!("publisher panicked: {e}"));
                        finish!();
                    }
                }
            }
            () = tokio::time::sleep_until(drain_deadline), if phase == Phase::Draining => {
                finish!();
            }
            _ = ticker.tick() => {
                let mut total = Progress::default();
                let mut window = Histogram::new();
                let newest = latest.iter().filter_map(|p| p.window.as_ref().map(|w| w.0)).max();
                for p in &latest {
                    add_progress(&mut total, p);
                    if let Some((slot, h)) = &p.window
                        && Some(*slot) == newest
                    {
                        window.merge(h);
                    }
                }
                let dt = last_tick.elapsed().as_secs_f64().max(1e-3);
                last_tick = Instant::now();
                let sent = live.sent.load(Ordering::Relaxed);
                let snapshot = progress::BroadcastSnapshot {
                    elapsed: clock.elapsed(),
                    phase: phase.label(),
                    subscribed: total.subscribed,
                    target: plan.subscribers,
                    open: total.open,
                    failed: total.failed,
                    closed: total.closed,
                    publish_rate: sent.saturating_sub(last_sent) as f64 / dt,
                    acked: live.acked.load(Ordering::Relaxed),
                    publish_failed: live.failed.load(Ordering::Relaxed),
                    delivery_rate: total.deliveries.saturating_sub(last_deliveries) as f64 / dt,
                    p50_ms: window.quantile(0.5).map(|v| v as f64 / 1000.0),
                    p99_ms: window.quantile(0.99).map(|v| v as f64 / 1000.0),
                };
                last_sent = sent;
                last_deliveries = total.deliveries;
                line.show_text(&progress::render_broadcast(&snapshot));
                if let Some(p) = &probe {
                    gateway_series.push(p.sample(clock.now_ms()).await);
                }
                if phase == Phase::Draining && all_caught_up(&latest) {
                    drained_fully = true;
                    finish!();
                }
            }
            res = &mut ctrl_c, if !interrupted => {
                interrupted = true;
                if res.is_ok() {
                    line.note("interrupted: closing connections (Ctrl-C again to quit at once)");
                    tokio::spawn(async {
                        if tokio::signal::ctrl_c().await.is_ok() {
                            std::process::exit(EXIT_INTERRUPTED);
                        }
                    });
                }
                stop_publishing.cancel();
                if phase != Phase::Closing {
                    cpu_end.get_or_insert_with(Instant::now);
                    phase = Phase::Closing;
                    workers.broadcast(Control::Abort).await;
                }
            }
        }
        if cpu.is_none()
            && cpu_end.is_some()
            && let Some(w) = &cpu_watch
        {
            // Worker CPU arrives with the results; the rest is read now.
            cpu = Some(w.finish());
        }
    }
    line.finish();
    // A publisher still running (workers gone early) is stopped and awaited.
    if let Some(handle) = publisher.take() {
        stop_publishing.cancel();
        match handle.await {
            Ok(Ok(t)) => published = Some(t),
            Ok(Err(e)) => errors.push(format!("publisher: {e:#}")),
            Err(e) => errors.push(format!("publisher panicked: {e}")),
        }
        publish_ended_ms.get_or_insert(clock.now_ms());
    }
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
    if let Some(c) = cpu.as_mut()
        && worker_processes
    {
        c.add_workers(merged.cpu);
    }
    let report = BroadcastReport::build(RunFacts {
        plan: &plan,
        tallies: &merged,
        published: published.unwrap_or_default(),
        interrupted,
        errors,
        publish_started_ms,
        publish_ended_ms,
        drain_s,
        drained_fully,
        gateway: probe
            .as_ref()
            .map(|_| [before, subscribed_sample, drained_sample, after]),
        gateway_series,
        cpu,
        finished_ms: clock.now_ms(),
    });
    print!("{}", report.render_text());
    if let Some(path) = &outputs.json {
        let json = serde_json::to_vec_pretty(&report).context("encoding the JSON report")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &outputs.html {
        std::fs::write(path, report.render_html())
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(report.goal_met)
}

fn add_progress(total: &mut Progress, p: &Progress) {
    total.attempted += p.attempted;
    total.subscribed += p.subscribed;
    total.failed += p.failed;
    total.aborted += p.aborted;
    total.open += p.open;
    total.in_flight += p.in_flight;
    total.closed += p.closed;
    total.deliveries += p.deliveries;
}

/// Every worker knows the expected offsets and all its open subscribers reached them.
fn all_caught_up(latest: &[Progress]) -> bool {
    latest
        .iter()
        .all(|p| p.caught_up.is_some_and(|c| c >= p.open))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn cli(extra: &[&str]) -> Cli {
        let mut args = vec![
            "loadtest",
            "--scenario",
            "broadcast",
            "--secret",
            SECRET,
            "--api-url",
            "http://127.0.0.1:8080",
            "--api-key",
            "0123456789abcdef",
        ];
        args.extend_from_slice(extra);
        Cli::try_parse_from(args).unwrap()
    }

    #[test]
    fn plan_checks_its_inputs() {
        let plan =
            Plan::from_cli(&cli(&["--subscribers", "10", "--channels", "3"]), 20_000).unwrap();
        assert_eq!(plan.rate, crate::cli::DEFAULT_PUBLISH_RATE);
        assert_eq!(plan.channel_names(), vec!["bench:0", "bench:1", "bench:2"]);
        assert_eq!(
            (0..3).map(|k| plan.subscribers_on(k)).collect::<Vec<_>>(),
            vec![4, 3, 3]
        );
        assert_eq!(plan.channel_of(4), 1);
        assert_eq!(
            plan.api_urls[0].as_str(),
            "http://127.0.0.1:8080/v1/publish"
        );
        assert!((plan.target_deliveries_per_s() - 10.0 * 10.0 / 3.0).abs() < 1e-9);
        for bad in [
            &["--url", "ws://8.8.8.8/ws"][..],
            &["--subscribers", "0"],
            &["--subscribers", "2", "--channels", "3"],
            &["--channels", "0"],
            &["--rate", "0"],
            &["--rate", "NaN"],
            &["--duration", "0"],
            &["--payload-bytes", "70000"],
            &["--publishers", "0"],
            &["--namespace", "Bad.Name"],
            &["--api-url", "http://10.0.0.1:8080"],
            &["--allow-failures", "101"],
            &["--subscribers", "2", "--processes", "3"],
        ] {
            assert!(Plan::from_cli(&cli(bad), 20_000).is_err(), "{bad:?}");
        }
        // The API route needs its URL and key; the client route does not.
        let no_api =
            Cli::try_parse_from(["loadtest", "--scenario", "broadcast", "--secret", SECRET])
                .unwrap();
        if std::env::var_os("SB_API_KEY").is_none() {
            assert!(Plan::from_cli(&no_api, 20_000).is_err());
        }
        let client = Cli::try_parse_from([
            "loadtest",
            "--scenario",
            "broadcast",
            "--secret",
            SECRET,
            "--publish-via",
            "client",
            "--publishers",
            "2",
            "--subscribers",
            "10",
        ])
        .unwrap();
        let plan = Plan::from_cli(&client, 20_000).unwrap();
        assert!(
            plan.tokens_described.contains("12 users"),
            "{}",
            plan.tokens_described
        );
        assert!(plan.warnings().is_empty(), "{:?}", plan.warnings());
    }

    #[test]
    fn several_urls_share_the_subscribers() {
        let plan = Plan::from_cli(
            &cli(&[
                "--url",
                "ws://127.0.0.1:1001/ws",
                "--url",
                "ws://127.0.0.1:1002/ws",
                "--url",
                "ws://127.0.0.1:1003/ws",
                "--subscribers",
                "60000",
            ]),
            20_000,
        )
        .unwrap();
        let ports: Vec<u16> = (0..6).map(|i| plan.target_of(i).addr.port()).collect();
        assert_eq!(ports, vec![1001, 1002, 1003, 1001, 1002, 1003]);
        // 20,000 per gateway fit one source address's ports; 60,000 need 4 processes.
        assert!(plan.sources.addrs.is_empty());
        assert_eq!(plan.processes, 4);
        assert!(plan.warnings().is_empty(), "{:?}", plan.warnings());
    }

    #[test]
    fn client_publishing_beyond_the_gateway_default_is_warned_about() {
        let plan = Plan::from_cli(
            &cli(&[
                "--publish-via",
                "client",
                "--rate",
                "1000",
                "--publishers",
                "2",
            ]),
            20_000,
        )
        .unwrap();
        assert!(
            plan.warnings()
                .iter()
                .any(|w| w.contains("SB_MESSAGE_RATE"))
        );
    }

    #[test]
    fn tallies_merge_and_survive_the_pipe() {
        let mut a = Tallies::default();
        a.apply(Outcome::Subscribed {
            started_ms: 10,
            at_ms: 20,
            latency: Duration::from_millis(10),
        });
        a.apply(Outcome::Failed {
            started_ms: 5,
            at_ms: 30,
            failure: Failure::Refused {
                request: "subscribe",
                code: "FORBIDDEN".into(),
            },
        });
        let mut gaps = OffsetTracker::new();
        for o in [1, 2, 2, 5] {
            gaps.record("bench:0", o);
        }
        a.apply(Outcome::Ended(Box::new(SubscriberEnd {
            received: 4,
            gaps: gaps.summary(),
            problem: Some("subscriber 0 on bench:0: 2 missing".into()),
            closed: None,
            untimed: 0,
            stray_frames: 1,
        })));
        let mut b = Tallies::default();
        b.apply(Outcome::Subscribed {
            started_ms: 1,
            at_ms: 40,
            latency: Duration::from_millis(39),
        });
        b.apply(Outcome::Ended(Box::new(SubscriberEnd {
            received: 2,
            gaps: GapSummary::default(),
            problem: None,
            closed: Some((
                2_500,
                Failure::Closed {
                    code: 4008,
                    error: Some("SLOW_CONSUMER".into()),
                },
            )),
            untimed: 2,
            stray_frames: 0,
        })));
        b.latency_us.record(1_200, 3_000);
        b.cpu = Some(CpuSeconds {
            user: 1.0,
            system: 0.5,
        });
        a.merge(&b);
        assert_eq!(
            (a.attempted, a.subscribed, a.failed, a.closed),
            (3, 2, 1, 1)
        );
        assert_eq!(a.failure_limits.get("channel_forbidden"), 1);
        assert_eq!(a.close_limits.get("slow_consumer"), 1);
        assert_eq!(a.closes.get("close 4008 SLOW_CONSUMER"), 1);
        assert_eq!(a.close_series.counts(), &[0, 0, 1]);
        assert_eq!((a.gaps.missing, a.gaps.duplicates), (2, 1));
        assert_eq!(
            a.per_subscriber.count(),
            1,
            "closed subscribers are not counted"
        );
        assert_eq!((a.untimed, a.stray_frames), (2, 1));
        assert_eq!(a.first_attempt_ms, Some(1));
        assert_eq!(a.problems.len(), 1);
        assert_eq!(a.cpu.map(|c| c.total()), Some(1.5));
        let back: Tallies = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back.latency_us, a.latency_us);
        assert_eq!(back.gaps, a.gaps);
        assert_eq!(back.closes, a.closes);
    }

    #[test]
    fn caught_up_needs_every_worker() {
        let mut p = Progress {
            open: 3,
            caught_up: Some(3),
            ..Progress::default()
        };
        assert!(all_caught_up(std::slice::from_ref(&p)));
        let other = Progress {
            open: 2,
            caught_up: None,
            ..Progress::default()
        };
        assert!(!all_caught_up(&[p.clone(), other]));
        p.caught_up = Some(2);
        assert!(!all_caught_up(&[p]));
    }
}
