//! The population engine behind every scenario: a population of simulated clients,
//! spread over worker processes and round-robin over the gateway URLs, each either a
//! **subscriber** (connects, authenticates, subscribes to one of C channels, then checks
//! every `message`: latency from the publish timestamp, offsets for gaps and
//! duplicates), a **chat user** (connects, authenticates, then chats, see
//! [`crate::chat`]) or an **idle** connection (`connect`: authenticates, then only
//! answers pings). The run goes through the same phases for every scenario:
//!
//! 1. *connecting*: every worker sets up its share (at `connect`'s `--rate`), then
//!    reports ready;
//! 2. *the window*: the parent publishes at a rate (when the scenario publishes, see
//!    [`crate::publish`]) and chat users chat, for `--duration` (`connect`: `--hold`, or
//!    until every chat user sent its `--messages`); with `--churn-rate`, workers close
//!    subscribers and connect replacements all along;
//! 3. *draining*: the parent tells the workers the last acknowledged offset of each
//!    channel; chat users finish the stream in flight; the drain ends when every
//!    subscriber has caught up and no stream is in flight (or `--drain` passed);
//! 4. *closing*: everything closes with 1000 and the workers report.
//!
//! The parent merges the workers' results; the scenario's report (`report::connect`,
//! `report::broadcast`, `report::chat`, `report::soak`) makes sense of them.

use std::ffi::OsString;
use std::net::IpAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Result, bail};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::chat::{self, ChatProgress, ChatTallies, LlmTiming, Pacing};
use crate::cli::{
    ChatFlags, Cli, CommonArgs, DEFAULT_CHANNELS, DEFAULT_DRAIN_SECS, DEFAULT_NAMESPACE,
    DEFAULT_PAYLOAD_BYTES, DEFAULT_PUBLISHERS, MAX_DURATION_SECS, PublishFlags, PublishVia,
    Scenario, ScenarioName,
};
use crate::client::{self, Failure, Stage};
use crate::clock::{Clock, unix_ms};
use crate::payload::{self, Frame};
use crate::probe::{self, CpuSeconds, CpuUse, GatewaySample, Probe, ProcessCpu};
use crate::progress::{self, ProgressLine};
use crate::publish::{self, Live, PublishTallies, Route, Schedule};
use crate::scenario::{
    self, Spread, credentials, dispatch, layout_warnings, min_some, progress_ticker, slot_ticker,
};
use crate::source::SourcePlan;
use crate::spawn::{self, Control, Event, WorkerLink, WorkerMsg, Workers};
use crate::stats::series::SLOT_MS;
use crate::stats::{
    EventSeries, GapSummary, GaugeSeries, Histogram, HistogramSeries, OffsetTracker, Shards, Tally,
    bump, drop_one,
};
use crate::target::Target;
use crate::threshold::{self, Threshold};
use crate::tokens::TokenSource;

/// Capacity of the queue from connection tasks to their worker's bookkeeping.
const OUTCOME_QUEUE: usize = 4096;
/// Latency and chat statistics per worker are split over this many locks (a
/// connection records into shard `index mod SHARDS`), so that the runtime's threads
/// rarely wait on one another while every delivery is recorded at once (and the live
/// p50/p99 is never stale).
const SHARDS: usize = 8;
/// How often a draining worker checks whether its subscribers caught up and its
/// streams ended, so that the run ends promptly rather than on the next tick.
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// Examples of subscribers with gaps or duplicates kept per worker for the report.
const MAX_PROBLEM_EXAMPLES: usize = 10;
/// `expected` value of a channel whose last offset is not known (yet).
const UNKNOWN: u64 = u64::MAX;
/// Longest default warm-up of a soak's memory trend: the allocator settles within
/// minutes; the rest of a long soak is the trend.
const MAX_DEFAULT_WARMUP: Duration = Duration::from_secs(300);
/// With think-time pacing and no known stream length, first messages are spread over
/// this much (plus the think time).
const DEFAULT_RAMP: Duration = Duration::from_secs(1);

/// The chat users of a run.
#[derive(Debug, Clone)]
pub struct ChatPlan {
    pub settings: chat::Settings,
}

/// Everything a run needs, identical in the parent and every worker (all derive it
/// from the same command line).
pub struct Plan {
    pub scenario: ScenarioName,
    pub targets: Vec<Target>,
    pub urls: Vec<String>,
    pub api_urls: Vec<reqwest::Url>,
    pub api_key: Option<String>,
    pub via: PublishVia,
    /// Subscriber connections (connection indices `0..subscribers`).
    pub subscribers: u64,
    pub channels: u64,
    pub namespace: String,
    /// Publications per second; 0: nothing is published (`chat`).
    pub rate: f64,
    /// The window: publishing and chatting time.
    pub duration: Duration,
    pub payload_bytes: usize,
    pub publishers: u32,
    pub concurrency: u64,
    pub timeout: Duration,
    pub drain: Duration,
    /// Subscribers closed and replaced per second during the window.
    pub churn_rate: f64,
    /// Chat users (connection indices after the subscribers).
    pub chat: Option<ChatPlan>,
    /// Idle connections (`connect`; connection indices after the chat users).
    pub idle: u64,
    /// Connection setups started per second (`connect --rate`); 0: unpaced.
    pub connect_rate: f64,
    /// `soak`: the thresholds that fail the run (`--fail-on`).
    pub fail_on: Vec<Threshold>,
    /// `soak`: the start of the window left out of memory trends.
    pub warmup: Duration,
    pub tokens: TokenSource,
    pub tokens_described: String,
    pub sources: SourcePlan,
    pub processes: u32,
    pub fd_limit: u64,
    pub ports: u64,
    pub allow_failures_pct: f64,
    pub epoch_ms: u64,
}

/// The flags of one population scenario, gathered: which groups it has and the
/// defaults of what it lacks.
struct Flags<'a> {
    common: &'a CommonArgs,
    subscribers: u64,
    chat_users: u64,
    idle: u64,
    connect_rate: f64,
    duration_secs: u64,
    drain_secs: u64,
    publish: Option<&'a PublishFlags>,
    chat: Option<&'a ChatFlags>,
    churn_rate: f64,
    fail_on: &'a [String],
    warmup: Option<u64>,
}

impl<'a> Flags<'a> {
    fn of(scenario: &'a Scenario) -> Result<Flags<'a>> {
        let none = Flags {
            common: scenario.common(),
            subscribers: 0,
            chat_users: 0,
            idle: 0,
            connect_rate: 0.0,
            duration_secs: crate::cli::DEFAULT_DURATION_SECS,
            drain_secs: DEFAULT_DRAIN_SECS,
            publish: None,
            chat: None,
            churn_rate: 0.0,
            fail_on: &[],
            warmup: None,
        };
        Ok(match scenario {
            // The hold is the window; nothing is in flight to drain after it.
            Scenario::Connect(a) => Flags {
                idle: a.connections,
                connect_rate: a.rate,
                duration_secs: a.hold,
                drain_secs: 0,
                ..none
            },
            Scenario::Broadcast(a) => Flags {
                subscribers: a.subscribers,
                duration_secs: a.duration,
                drain_secs: a.publish.drain,
                publish: Some(&a.publish),
                ..none
            },
            Scenario::Chat(a) => Flags {
                chat_users: a.common.users.unwrap_or(crate::cli::DEFAULT_CHAT_USERS),
                // `--messages` alone: the window lasts until every user sent them.
                duration_secs: match (a.duration, a.chat.messages) {
                    (Some(d), _) => d,
                    (None, Some(_)) => MAX_DURATION_SECS,
                    (None, None) => crate::cli::DEFAULT_DURATION_SECS,
                },
                chat: Some(&a.chat),
                ..none
            },
            Scenario::Soak(a) => Flags {
                subscribers: a.connections,
                chat_users: a.chat_users,
                duration_secs: a.duration,
                drain_secs: a.publish.drain,
                publish: Some(&a.publish),
                chat: Some(&a.chat),
                churn_rate: a.churn_rate,
                fail_on: &a.fail_on,
                warmup: a.warmup,
                ..none
            },
        })
    }
}

impl Plan {
    /// The plan of a scenario: clap checked each flag's own range; what is left are the
    /// rules between flags.
    pub fn from_cli(cli: &Cli, fd_limit: u64) -> Result<Plan> {
        let f = Flags::of(&cli.scenario)?;
        let common = f.common;
        let targets = common
            .url
            .iter()
            .map(|u| Target::parse(u))
            .collect::<Result<Vec<_>>>()?;
        let scenario = cli.scenario.name();
        if targets.is_empty() {
            bail!("give at least one --url");
        }
        if scenario == ScenarioName::Connect && targets.len() > 1 {
            bail!(
                "connect takes one --url (several gateways: put a load balancer in front, or \
                 run one loadtest per gateway)"
            );
        }
        let subscribers = f.subscribers;
        let channels = f.publish.map_or(DEFAULT_CHANNELS, |p| p.channels);
        if subscribers > 0 && channels > subscribers {
            bail!("--channels must be between 1 and the number of subscribers ({subscribers})");
        }
        let namespace = f.publish.map_or(DEFAULT_NAMESPACE, |p| &p.namespace);
        shared::protocol::Channel::parse(&format!("{namespace}:0")).map_err(|e| {
            anyhow::anyhow!("--namespace {namespace:?} is not a channel namespace: {e}")
        })?;
        let rate = f.publish.map_or(0.0, |p| p.rate);
        let duration_secs = f.duration_secs;
        let warmup = match f.warmup {
            Some(w) if w >= duration_secs => {
                bail!("--warmup must be shorter than --duration ({duration_secs} s)")
            }
            Some(w) => Duration::from_secs(w),
            None if scenario == ScenarioName::Soak => {
                Duration::from_secs(duration_secs / 5).min(MAX_DEFAULT_WARMUP)
            }
            None => Duration::ZERO,
        };
        let fail_on = match scenario {
            ScenarioName::Soak => threshold::parse_all(f.fail_on)?,
            _ => Vec::new(),
        };
        let via = f.publish.map_or(PublishVia::Api, |p| p.publish_via);
        let publishers = f.publish.map_or(DEFAULT_PUBLISHERS, |p| p.publishers);
        let api_urls = f
            .publish
            .map_or(&[][..], |p| &p.api_url)
            .iter()
            .map(|u| publish::publish_url(u))
            .collect::<Result<Vec<_>>>()?;
        let api_key = f
            .publish
            .and_then(|p| p.api_key.clone())
            .filter(|k| !k.is_empty());
        if rate > 0.0 && via == PublishVia::Api {
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
        let chat = match (f.chat, f.chat_users) {
            (Some(flags), users) if users > 0 => Some(ChatPlan {
                settings: chat_settings(flags, common, subscribers, users),
            }),
            _ => None,
        };
        let chat_users = f.chat_users;
        let epoch_ms = common.epoch_ms.unwrap_or_else(unix_ms);
        let connections = subscribers + chat_users + f.idle;
        let publisher_tokens = match (rate > 0.0, via) {
            (true, PublishVia::Client) => u64::from(publishers),
            _ => 0,
        };
        // `chat`: `--users` is the number of chat users, each its own user.
        let users = match scenario {
            ScenarioName::Chat => connections,
            _ => common.users.unwrap_or(connections + publisher_tokens),
        };
        let (tokens, tokens_described) = credentials(common, users, epoch_ms)?;
        // Every URL gets its share of the connections; plan ports for the busiest one.
        let per_target = connections.div_ceil(targets.len() as u64);
        let Spread {
            sources,
            ports,
            processes,
        } = Spread::plan(
            common,
            connections,
            per_target,
            targets[0].addr.ip(),
            fd_limit,
        )?;
        Ok(Plan {
            scenario,
            urls: common.url.clone(),
            targets,
            api_urls,
            api_key,
            via,
            subscribers,
            channels,
            namespace: namespace.to_owned(),
            rate,
            duration: Duration::from_secs(duration_secs),
            payload_bytes: f.publish.map_or(DEFAULT_PAYLOAD_BYTES, |p| p.payload_bytes),
            publishers,
            concurrency: common.concurrency,
            timeout: Duration::from_secs(common.timeout),
            drain: Duration::from_secs(f.drain_secs),
            churn_rate: f.churn_rate,
            chat,
            idle: f.idle,
            connect_rate: f.connect_rate,
            fail_on,
            warmup,
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

    /// Every connection: subscribers, then chat users, then idle connections.
    pub fn connections(&self) -> u64 {
        self.subscribers + self.chat_users() + self.idle
    }

    /// Chat users in the run.
    pub fn chat_users(&self) -> u64 {
        self.chat.as_ref().map_or(0, |c| c.settings.users)
    }

    /// What connection `i` does: subscribers first, then chat users, then idle ones.
    fn kind_of(&self, i: u64) -> Kind {
        if i < self.subscribers {
            Kind::Subscriber
        } else if i < self.subscribers + self.chat_users() {
            Kind::Chat
        } else {
            Kind::Idle
        }
    }

    /// Whether the parent publishes during the window.
    pub fn publishes(&self) -> bool {
        self.rate > 0.0
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

    /// The gateway URL of connection `i` (round robin).
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
        let mut w = layout_warnings(
            self.connections(),
            self.connections().div_ceil(self.targets.len() as u64),
            self.processes,
            self.fd_limit,
            &self.sources,
            self.ports,
        );
        if self.publishes() && self.via == PublishVia::Client {
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
        if let Some(c) = &self.chat {
            let per_minute = match c.settings.pacing {
                Pacing::Rate(r) => r * 60.0 / c.settings.users as f64,
                Pacing::Think(think) => {
                    let stream = c.settings.llm.map_or(0, |l| l.expected_ms());
                    60_000.0 / (think.as_millis() as f64 + stream as f64).max(1.0)
                }
            };
            if per_minute > f64::from(crate::cli::GATEWAY_DEFAULT_CHAT_RATE_PER_MINUTE) {
                w.push(format!(
                    "each chat user may send up to {per_minute:.0} messages a minute; the \
                     gateway's default limit is {} per user (SB_CHAT_RATE_PER_MINUTE): raise \
                     it, or expect `send refused: RATE_LIMITED`",
                    crate::cli::GATEWAY_DEFAULT_CHAT_RATE_PER_MINUTE
                ));
            }
        }
        w
    }

    /// Worker `index`'s connection indices, connect rate and handshake concurrency.
    fn share(&self, index: u32, count: u32) -> (Range<u64>, f64, u64) {
        let range = spawn::share(self.connections(), index, count);
        let rate = spawn::split(self.connect_rate, count);
        let concurrency = self.concurrency.div_ceil(u64::from(count.max(1))).max(1);
        (range, rate, concurrency)
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
                first_token: self.connections(),
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

/// The chat users' settings; clap checked each flag (and that --think-ms and
/// --chat-rate exclude one another).
fn chat_settings(
    flags: &ChatFlags,
    common: &CommonArgs,
    first_index: u64,
    users: u64,
) -> chat::Settings {
    let llm = flags.llm_first_token_ms.map(|first_token_ms| LlmTiming {
        first_token_ms,
        stream_ms: flags.llm_stream_ms.unwrap_or(0),
    });
    let pacing = match flags.chat_rate {
        Some(r) => Pacing::Rate(r),
        None => Pacing::Think(Duration::from_millis(
            flags.think_ms.unwrap_or(crate::cli::DEFAULT_THINK_MS),
        )),
    };
    let ramp = match flags.ramp {
        Some(r) => Duration::from_secs_f64(r),
        None => {
            llm.map_or(DEFAULT_RAMP, |l| Duration::from_millis(l.expected_ms()))
                + match pacing {
                    Pacing::Think(t) => t,
                    Pacing::Rate(_) => Duration::ZERO,
                }
        }
    };
    chat::Settings {
        pacing,
        users,
        first_index,
        ramp,
        messages: flags.messages,
        message_bytes: flags.message_bytes,
        timeout: Duration::from_secs(common.timeout),
        llm,
    }
}

// === what workers report ===

/// A worker's counters, about once a second.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Connection setups (subscribers and chat users, replacements included).
    pub attempted: u64,
    /// Setups that succeeded (`subscribed`, or `authenticated` for a chat user).
    pub subscribed: u64,
    pub failed: u64,
    pub aborted: u64,
    pub open: u64,
    pub in_flight: u64,
    pub closed: u64,
    /// Subscribers closed by churn (and replaced).
    pub churned: u64,
    pub deliveries: u64,
    /// Once the expected offsets are known: every open subscriber received up to the
    /// last acknowledged offset of its channel, and no chat stream is in flight.
    pub caught_up: Option<bool>,
    /// Delivery latency in the last complete one-second slot: `(slot, histogram)`.
    pub window: Option<(u64, Histogram)>,
    pub chat: ChatProgress,
}

/// Everything a worker measured; merged by the parent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tallies {
    pub attempted: u64,
    pub subscribed: u64,
    pub failed: u64,
    pub aborted: u64,
    /// Connections the server closed or dropped after their setup.
    pub closed: u64,
    /// Subscribers closed by churn (each replaced by a new setup).
    pub churned: u64,
    pub failures: Tally,
    pub failure_limits: Tally,
    pub closes: Tally,
    pub close_limits: Tally,
    /// TCP connect start to `subscribed` (`authenticated` for chat users),
    /// microseconds.
    pub setup_latency_us: Histogram,
    /// Successful and failed setups per second.
    pub setup_series: EventSeries,
    pub failure_series: EventSeries,
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
    /// CPU this worker process used from the start of the window to the end of the
    /// drain (worker processes only; an in-process worker is the parent's CPU).
    pub cpu: Option<CpuSeconds>,
    pub chat: ChatTallies,
}

impl Tallies {
    pub fn merge(&mut self, o: &Tallies) {
        self.attempted += o.attempted;
        self.subscribed += o.subscribed;
        self.failed += o.failed;
        self.aborted += o.aborted;
        self.closed += o.closed;
        self.churned += o.churned;
        self.failures.merge(&o.failures);
        self.failure_limits.merge(&o.failure_limits);
        self.closes.merge(&o.closes);
        self.close_limits.merge(&o.close_limits);
        self.setup_latency_us.merge(&o.setup_latency_us);
        self.setup_series.merge(&o.setup_series);
        self.failure_series.merge(&o.failure_series);
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
        self.chat.merge(&o.chat);
    }

    fn closed_by_server(&mut self, at_ms: u64, failure: &Failure) {
        self.closed += 1;
        self.closes.add(&failure.to_string(), 1);
        self.close_limits.add(failure.limit().label(), 1);
        self.close_series.record(at_ms, 1);
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
                self.setup_series.record(at_ms, 1);
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
            Outcome::Ended(end) => {
                let SubscriberEnd {
                    received,
                    gaps,
                    problem,
                    closed,
                    churned,
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
                    Some((at_ms, failure)) => self.closed_by_server(at_ms, &failure),
                    None if churned => self.churned += 1,
                    None => self.per_subscriber.record(received),
                }
            }
            Outcome::Left { closed } => {
                if let Some((at_ms, failure)) = closed {
                    self.closed_by_server(at_ms, &failure);
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
    /// Closed by churn (to be replaced), not at the end of the run.
    churned: bool,
    untimed: u64,
    stray_frames: u64,
}

/// What a connection task tells its worker.
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
    /// A chat user's or idle connection ended; when and why if the server ended it.
    Left {
        closed: Option<(u64, Failure)>,
    },
}

impl Outcome {
    fn ends_setup(&self) -> bool {
        !matches!(self, Outcome::Ended(_) | Outcome::Left { .. })
    }
}

/// What a connection does once set up; by its index (see [`Plan::kind_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Subscriber,
    Chat,
    Idle,
}

/// Live counters shared by a worker's connection tasks.
#[derive(Default)]
struct Counters {
    attempted: AtomicU64,
    subscribed: AtomicU64,
    failed: AtomicU64,
    aborted: AtomicU64,
    open: AtomicU64,
    in_flight: AtomicU64,
    closed: AtomicU64,
    churned: AtomicU64,
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
            churned: get(&self.churned),
            deliveries: get(&self.deliveries),
            caught_up: None,
            window: None,
            chat: ChatProgress::default(),
        }
    }
}

/// One live subscriber as its worker sees it: to tell when everyone caught up, and for
/// churn to pick and close it.
struct SubState {
    index: u64,
    channel: usize,
    /// Highest offset received (starts at the `subscribed` offset).
    max_offset: AtomicU64,
    open: AtomicBool,
    /// Cancelled to close this subscriber (churn); a child of `stop_holding`.
    leave: CancellationToken,
}

// === worker ===

struct Shared {
    plan: Arc<Plan>,
    clock: Clock,
    counters: Counters,
    outcomes: mpsc::Sender<Outcome>,
    stop_connecting: CancellationToken,
    stop_holding: CancellationToken,
    /// Cancelled when the window starts (chat users start chatting), after
    /// `window_start` is set.
    window_started: CancellationToken,
    window_start: OnceLock<Instant>,
    /// Cancelled when the window ends: no new chat message, no more churn.
    window_ended: CancellationToken,
    /// Last acknowledged offset per channel index ([`UNKNOWN`] until told).
    expected: Vec<AtomicU64>,
    latency: Shards<HistogramSeries>,
    last_delivery_ms: AtomicU64,
    subs: Mutex<Vec<Arc<SubState>>>,
    chat_counters: chat::Counters,
    chat_tallies: Shards<ChatTallies>,
}

impl Shared {
    /// The latencies of one slot, over every shard.
    fn latency_slot(&self, slot: usize) -> Histogram {
        self.latency
            .fold(Histogram::new(), |h, s| h.merge(&s.slot(slot)))
    }

    /// First-chunk latencies of one slot, over every shard.
    fn first_chunk_slot(&self, slot: usize) -> Histogram {
        self.chat_tallies.fold(Histogram::new(), |h, t| {
            h.merge(&t.first_chunk_us.slot(slot))
        })
    }

    /// Every open subscriber received everything acknowledged on its channel, and no
    /// chat stream is in flight; `None` before the expected offsets are known.
    fn caught_up(&self, told: bool) -> Option<bool> {
        if !told {
            return None;
        }
        let subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
        let subscribers = subs
            .iter()
            .filter(|s| s.open.load(Ordering::Relaxed))
            .all(|s| {
                let want = self.expected[s.channel].load(Ordering::Relaxed);
                want == UNKNOWN || s.max_offset.load(Ordering::Relaxed) >= want
            });
        Some(subscribers && self.chat_counters.in_flight.load(Ordering::Relaxed) == 0)
    }

    fn snapshot(&self, told: bool) -> Progress {
        let mut p = self.counters.snapshot();
        p.caught_up = self.caught_up(told);
        p.chat = self.chat_counters.snapshot();
        p
    }

    /// Closes the next open subscriber after `cursor` (round robin over the worker's
    /// subscribers, forgetting those already closed); its index, to reconnect it.
    fn churn_one(&self, cursor: &mut usize) -> Option<u64> {
        let mut subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
        subs.retain(|s| s.open.load(Ordering::Relaxed) && !s.leave.is_cancelled());
        if subs.is_empty() {
            return None;
        }
        *cursor %= subs.len();
        let s = subs.swap_remove(*cursor);
        *cursor += 1;
        s.leave.cancel();
        Some(s.index)
    }
}

/// Runs worker `index` of `count`: its share of the connections, then waits for the
/// parent's commands, then reports.
pub async fn run_worker(
    plan: Arc<Plan>,
    index: u32,
    count: u32,
    in_process: bool,
    mut link: WorkerLink<Progress, Tallies>,
) -> Result<()> {
    let (range, rate, concurrency) = plan.share(index, count);
    let (outcomes_tx, mut outcomes) = mpsc::channel(OUTCOME_QUEUE);
    let shared = Arc::new(Shared {
        clock: Clock::from_unix_ms(plan.epoch_ms),
        expected: (0..plan.channels)
            .map(|_| AtomicU64::new(UNKNOWN))
            .collect(),
        counters: Counters::default(),
        outcomes: outcomes_tx,
        stop_connecting: CancellationToken::new(),
        stop_holding: CancellationToken::new(),
        window_started: CancellationToken::new(),
        window_start: OnceLock::new(),
        window_ended: CancellationToken::new(),
        latency: Shards::new(SHARDS),
        last_delivery_ms: AtomicU64::new(0),
        subs: Mutex::new(Vec::new()),
        chat_counters: chat::Counters::default(),
        chat_tallies: Shards::new(SHARDS),
        plan,
    });
    let tracker = TaskTracker::new();
    let task_shared = Arc::clone(&shared);
    let mut dispatcher = tokio::spawn(dispatch(
        range.clone(),
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
    tallies.chat.in_flight.sample(shared.clock.now_ms(), 0);
    let mut ticker = slot_ticker(&shared.clock, 0);
    let mut drain_poll = tokio::time::interval(DRAIN_POLL);
    drain_poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut dispatched: Option<u64> = None;
    let mut setups_done = 0u64;
    let mut ready_sent = false;
    let mut finishing = false;
    let mut told = false;
    let mut reported_caught_up = false;
    let mut cpu_start: Option<CpuSeconds> = None;
    loop {
        tokio::select! {
            Some(outcome) = outcomes.recv() => {
                if outcome.ends_setup() {
                    setups_done += 1;
                }
                tallies.apply(outcome);
            }
            joined = &mut dispatcher, if dispatched.is_none() => {
                dispatched = Some(joined.map_err(|e| anyhow::anyhow!("the dispatcher panicked: {e}"))?);
            }
            _ = ticker.tick() => {
                let now_ms = shared.clock.now_ms();
                let mut p = shared.snapshot(told);
                tallies.open.sample(now_ms, p.open);
                tallies.chat.in_flight.sample(now_ms, p.chat.in_flight);
                let slot = now_ms / SLOT_MS;
                if slot > 0 {
                    p.window = Some((slot - 1, shared.latency_slot((slot - 1) as usize)));
                    p.chat.window =
                        Some((slot - 1, shared.first_chunk_slot((slot - 1) as usize)));
                }
                link.send(WorkerMsg::Progress(p)).await?;
            }
            _ = drain_poll.tick(), if told && !reported_caught_up && !finishing => {
                let p = shared.snapshot(true);
                if p.caught_up == Some(true) {
                    reported_caught_up = true;
                    link.send(WorkerMsg::Progress(p)).await?;
                }
            }
            control = link.recv(), if !finishing => match control {
                Control::Hold => {
                    if !in_process {
                        cpu_start = probe::cpu_seconds(None);
                    }
                    let _ = shared.window_start.set(Instant::now());
                    shared.window_started.cancel();
                    if shared.plan.churn_rate > 0.0 {
                        tracker.spawn(churn(
                            Arc::clone(&shared),
                            tracker.clone(),
                            range.clone(),
                            count,
                        ));
                    }
                }
                Control::Expect(last) => {
                    for (slot, value) in shared.expected.iter().zip(last) {
                        slot.store(value.unwrap_or(UNKNOWN), Ordering::Relaxed);
                    }
                    shared.window_ended.cancel();
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
                    shared.window_ended.cancel();
                    shared.stop_holding.cancel();
                }
            },
            () = tracker.wait(), if finishing && dispatched.is_some() => break,
        }
        if !ready_sent && dispatched == Some(setups_done) {
            ready_sent = true;
            link.send(WorkerMsg::Ready(shared.snapshot(false))).await?;
        }
    }
    while let Ok(outcome) = outcomes.try_recv() {
        tallies.apply(outcome);
    }
    for series in shared.latency.take_all() {
        tallies.latency_us.merge(&series);
    }
    let in_flight = std::mem::take(&mut tallies.chat.in_flight);
    for t in shared.chat_tallies.take_all() {
        tallies.chat.merge(&t);
    }
    tallies.chat.in_flight = in_flight;
    let last = shared.last_delivery_ms.load(Ordering::Relaxed);
    tallies.last_delivery_ms = (last > 0).then_some(last);
    let p = shared.counters.snapshot();
    let end_ms = shared.clock.now_ms() + SLOT_MS;
    tallies.open.sample(end_ms, p.open);
    tallies.chat.in_flight.sample(end_ms, 0);
    link.send(WorkerMsg::Progress(p)).await?;
    link.send(WorkerMsg::Result(tallies)).await
}

/// Churn: during the window, closes one of this worker's subscribers (round robin) at
/// its share of `--churn-rate` and connects a replacement for the same index (same
/// token, same channel), until the window ends. Replacements count as setups.
async fn churn(shared: Arc<Shared>, tracker: TaskTracker, range: Range<u64>, count: u32) {
    let plan = &shared.plan;
    let subscribers = range.start..range.end.min(plan.subscribers);
    if subscribers.is_empty() {
        return;
    }
    let rate = spawn::split(plan.churn_rate, count);
    let permits = Arc::new(Semaphore::new(
        usize::try_from(plan.concurrency).unwrap_or(Semaphore::MAX_PERMITS),
    ));
    let start = Instant::now();
    let mut cursor = 0usize;
    let mut n = 0u64;
    loop {
        n += 1;
        let due = start + Duration::from_secs_f64(n as f64 / rate);
        tokio::select! {
            () = tokio::time::sleep_until(due) => {}
            () = shared.window_ended.cancelled() => return,
        }
        let Some(index) = shared.churn_one(&mut cursor) else {
            continue;
        };
        bump(&shared.counters.churned);
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            () = shared.window_ended.cancelled() => return,
        };
        let task_shared = Arc::clone(&shared);
        tracker.spawn(async move { connection(index, &task_shared, permit).await });
    }
}

/// One connection: connect and authenticate (holding a concurrency permit); then a
/// subscriber subscribes and receives, a chat user chats, an idle connection answers
/// pings; all until told to stop.
async fn connection(index: u64, shared: &Shared, permit: OwnedSemaphorePermit) {
    let c = &shared.counters;
    let plan = &shared.plan;
    let kind = plan.kind_of(index);
    let source: Option<IpAddr> = plan.sources.for_connection(index);
    let channel = plan.channel_of(index);
    let channel_name = plan.channel_name(channel);
    let started_ms = shared.clock.now_ms();
    bump(&c.in_flight);
    let setup = async {
        let token = plan
            .tokens
            .token_for(index)
            .map_err(|e| Failure::Token(format!("{e:#}")))?;
        let mut auth = client::connect(plan.target_of(index), source, &token, plan.timeout).await?;
        let mut latency = auth.latency;
        let mut offset = 0;
        if kind == Kind::Subscriber {
            let start = Instant::now();
            offset = client::subscribe(&mut auth.ws, &channel_name, start + plan.timeout).await?;
            latency += start.elapsed();
        }
        Ok::<_, Failure>((auth.ws, offset, latency))
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
            if kind == Kind::Chat {
                bump(&shared.chat_counters.finished_users);
            }
            Outcome::Failed {
                started_ms,
                at_ms,
                failure,
            }
        }
        Some(Ok((ws, offset, latency))) => {
            bump(&c.attempted);
            bump(&c.subscribed);
            bump(&c.open);
            let subscribed = Outcome::Subscribed {
                started_ms,
                at_ms,
                latency,
            };
            if shared.outcomes.send(subscribed).await.is_err() {
                drop_one(&c.open);
                return;
            }
            let end = match kind {
                Kind::Subscriber => subscriber(index, ws, offset, shared).await,
                Kind::Chat => chatter(index, ws, shared).await,
                Kind::Idle => left(shared, client::hold(ws, &shared.stop_holding).await),
            };
            drop_one(&c.open);
            end
        }
    };
    let _ = shared.outcomes.send(outcome).await;
}

/// A chat user's life after `authenticated`: idle until the window starts, chat until
/// it ends, idle until told to stop, close.
async fn chatter(index: u64, mut ws: client::Ws, shared: &Shared) -> Outcome {
    let Some(chat) = &shared.plan.chat else {
        return Outcome::Left { closed: None };
    };
    let user = chat::User {
        index,
        settings: &chat.settings,
        clock: shared.clock,
        counters: &shared.chat_counters,
        tallies: &shared.chat_tallies,
    };
    let chatted = match client::read_until(&mut ws, &shared.window_started).await {
        Err(f) => Err(f),
        Ok(()) if shared.stop_holding.is_cancelled() => Ok(()),
        Ok(()) => {
            let window = shared
                .window_start
                .get()
                .copied()
                .unwrap_or_else(Instant::now);
            user.converse(&mut ws, window, &shared.window_ended, &shared.stop_holding)
                .await
        }
    };
    bump(&shared.chat_counters.finished_users);
    let result = match chatted {
        Ok(()) => client::read_until(&mut ws, &shared.stop_holding).await,
        Err(f) => Err(f),
    };
    if result.is_ok() {
        // Closed with 1000 before the task ends, so that the worker (which waits for
        // every task) never exits with a user half-closed.
        client::close(ws).await;
    }
    left(shared, result)
}

/// How a chat user's or an idle connection's life ended: normally, or closed by the
/// server.
fn left(shared: &Shared, result: Result<(), Failure>) -> Outcome {
    match result {
        Ok(()) => Outcome::Left { closed: None },
        Err(f) => {
            bump(&shared.counters.closed);
            Outcome::Left {
                closed: Some((shared.clock.now_ms(), f)),
            }
        }
    }
}

/// A subscriber's life after `subscribed`: receive until told to stop (or churned).
async fn subscriber(index: u64, ws: client::Ws, offset: u64, shared: &Shared) -> Outcome {
    let channel = shared.plan.channel_of(index);
    let channel_name = shared.plan.channel_name(channel);
    let state = Arc::new(SubState {
        index,
        channel: channel as usize,
        max_offset: AtomicU64::new(offset),
        open: AtomicBool::new(true),
        leave: shared.stop_holding.child_token(),
    });
    shared
        .subs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Arc::clone(&state));
    let end = receive(index, ws, shared, &channel_name, offset, &state).await;
    state.open.store(false, Ordering::Relaxed);
    if end.closed.is_some() {
        bump(&shared.counters.closed);
    }
    Outcome::Ended(Box::new(end))
}

/// The receive loop of a subscribed connection: every `message` is checked against
/// the offsets seen so far and its latency recorded, until `state.leave` (the end of
/// the run, or churn; then a normal close) or the server ends the connection.
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
    let stopped = state.leave.cancelled();
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
                                .latency
                                .with(index, |s| s.record(at_ms, now_us.saturating_sub(ts)));
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
    let churned = closed.is_none() && !shared.stop_holding.is_cancelled();
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
        churned,
        untimed,
        stray_frames,
    }
}

// === parent ===

/// The phase of the whole run, as the parent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Window,
    Draining,
    Closing,
}

impl Phase {
    fn label(self, scenario: ScenarioName) -> &'static str {
        match (self, scenario) {
            (Phase::Connecting, ScenarioName::Broadcast) => "subscribing",
            (Phase::Connecting, _) => "connecting",
            (Phase::Window, ScenarioName::Connect) => "holding",
            (Phase::Window, ScenarioName::Broadcast) => "publishing",
            (Phase::Window, ScenarioName::Chat) => "chatting",
            (Phase::Window, ScenarioName::Soak) => "soaking",
            (Phase::Draining, _) => "draining",
            (Phase::Closing, _) => "closing",
        }
    }
}

/// CPU readings of the watched processes at the start of the window.
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

/// What the parent watches besides its workers.
#[derive(Default)]
pub struct Watch {
    /// The gateway: RSS (`--pid` or `--metrics-url`) and its connection gauge.
    pub gateway: Option<Probe>,
    /// Every `--pid`: CPU over the window.
    pub pids: Vec<u32>,
    /// Chat workers' `/metrics` (`--worker-metrics`), by URL: their RSS over time.
    pub workers: Vec<(String, Probe)>,
}

/// One sampled process other than the gateway.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessSeries {
    pub url: String,
    pub samples: Vec<GatewaySample>,
}

/// Everything a run produced, for the scenario's report.
#[derive(Default)]
pub struct RunResult {
    pub tallies: Tallies,
    pub published: PublishTallies,
    pub interrupted: bool,
    pub errors: Vec<String>,
    /// Run-epoch milliseconds when the window started (every connection set up) and
    /// when it ended (publisher done, `--duration` over, or every chat user done).
    pub window_started_ms: Option<u64>,
    pub window_ended_ms: Option<u64>,
    /// How long the drain lasted, and whether every subscriber caught up and every
    /// stream ended in it.
    pub drain_s: Option<f64>,
    pub drained_fully: bool,
    /// Gateway readings before the run, once everyone was set up, after the drain and
    /// after closing; `None` without `--pid`/`--metrics-url`.
    pub gateway: Option<[Option<GatewaySample>; 4]>,
    pub gateway_series: Vec<GatewaySample>,
    pub worker_series: Vec<ProcessSeries>,
    pub cpu: Option<CpuUse>,
    /// Open connections when the window ended (`connect`: the connections held).
    pub open_at_window_end: u64,
    /// Growth of the kernel's listen-queue overflow counter during the run.
    pub listen_overflows: Option<u64>,
    pub finished_ms: u64,
}

impl Plan {
    /// The run in one line, for the start of the output.
    fn describe(&self) -> String {
        let processes = format!(
            "{} process{}",
            self.processes,
            if self.processes == 1 { "" } else { "es" }
        );
        if self.scenario == ScenarioName::Connect {
            return format!(
                "connect: {} connections to {} from {processes}, rate {}, concurrency {}, \
                 hold {} s, sources {}",
                self.idle,
                self.urls[0],
                if self.connect_rate > 0.0 {
                    format!("{}/s", self.connect_rate)
                } else {
                    "unlimited".to_owned()
                },
                self.concurrency,
                self.duration.as_secs(),
                self.sources.describe(),
            );
        }
        let mut parts = Vec::new();
        if self.subscribers > 0 {
            parts.push(format!(
                "{} subscribers on {} channel{} ({}:0..)",
                self.subscribers,
                self.channels,
                if self.channels == 1 { "" } else { "s" },
                self.namespace,
            ));
        }
        if self.publishes() {
            parts.push(format!(
                "{} publications/s via {}, payload {} B",
                self.rate,
                match self.via {
                    PublishVia::Api => "POST /v1/publish",
                    PublishVia::Client => "client publish frames",
                },
                payload::data_len(self.payload_bytes),
            ));
        }
        if self.churn_rate > 0.0 {
            parts.push(format!("churn {}/s", self.churn_rate));
        }
        if let Some(c) = &self.chat {
            let s = &c.settings;
            parts.push(format!(
                "{} chat users {}{}",
                s.users,
                match s.pacing {
                    Pacing::Think(t) => format!("thinking {} ms", t.as_millis()),
                    Pacing::Rate(r) => format!("at {r} streams/s"),
                },
                s.messages
                    .map(|m| format!(", {m} messages each"))
                    .unwrap_or_default()
            ));
        }
        format!(
            "{}: {} via {} for {} s, from {processes}",
            match self.scenario {
                ScenarioName::Broadcast => "broadcast",
                ScenarioName::Chat => "chat",
                _ => "soak",
            },
            parts.join("; "),
            self.urls.join(", "),
            self.duration.as_secs(),
        )
    }
}

/// Samples the gateway once, keeping the reading in its series.
async fn sample(
    probe: &Option<Probe>,
    clock: &Clock,
    series: &mut Vec<GatewaySample>,
) -> Option<GatewaySample> {
    let p = probe.as_ref()?;
    let s = p.sample(clock.now_ms()).await;
    series.push(s);
    Some(s)
}

/// Runs the population with its workers and the publisher, printing progress; returns
/// what happened.
pub async fn execute(
    plan: Arc<Plan>,
    watch: &Watch,
    worker_args: Vec<OsString>,
) -> Result<RunResult> {
    let clock = Clock::from_unix_ms(plan.epoch_ms);
    let mut line = ProgressLine::new();
    line.note(&plan.describe());
    for w in plan.warnings() {
        line.note(&format!("warning: {w}"));
    }

    let mut gateway_series: Vec<GatewaySample> = Vec::new();
    let mut worker_series: Vec<ProcessSeries> = watch
        .workers
        .iter()
        .map(|(url, _)| ProcessSeries {
            url: url.clone(),
            samples: Vec::new(),
        })
        .collect();
    let overflows_before = probe::listen_overflows();
    let before = sample(&watch.gateway, &clock, &mut gateway_series).await;

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
    let mut phase = Phase::Connecting;
    let mut interrupted = false;
    let live = Arc::new(Live::default());
    let stop_publishing = CancellationToken::new();
    let mut publisher: Option<tokio::task::JoinHandle<Result<PublishTallies>>> = None;
    let mut published: Option<PublishTallies> = None;
    let mut window_started_ms: Option<u64> = None;
    let mut window_ended_ms: Option<u64> = None;
    let mut open_at_window_end = 0u64;
    let mut window_deadline = Instant::now();
    let mut drain_deadline = Instant::now();
    let mut drain_s: Option<f64> = None;
    let mut drain_started: Option<Instant> = None;
    let mut drained_fully = false;
    let mut cpu_watch: Option<CpuWatch> = None;
    let mut cpu_end: Option<Instant> = None;
    let mut set_up_sample: Option<GatewaySample> = None;
    let mut drained_sample: Option<GatewaySample> = None;
    let mut last = Progress::default();
    let mut last_sent = 0u64;
    let mut last_tick = Instant::now();
    let mut ticker = progress_ticker(&clock);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);

    // Ends the window: the workers learn the last acknowledged offsets, chat users
    // stop sending, and the drain starts.
    macro_rules! end_window {
        () => {
            if phase == Phase::Window {
                phase = Phase::Draining;
                window_ended_ms = Some(clock.now_ms());
                open_at_window_end = latest.iter().map(|p| p.open).sum();
                drain_started = Some(Instant::now());
                drain_deadline = Instant::now() + plan.drain;
                let last = published.as_ref().map_or_else(
                    || vec![None; plan.channels as usize],
                    |p| p.channel_last.clone(),
                );
                workers.broadcast(Control::Expect(last)).await;
            }
        };
    }
    // Ends the drain (or a run that cannot go on): readings, then Finish.
    macro_rules! finish {
        () => {
            if phase != Phase::Closing {
                if let Some(started) = drain_started {
                    drain_s = Some(started.elapsed().as_secs_f64());
                }
                cpu_end.get_or_insert_with(Instant::now);
                drained_sample = sample(&watch.gateway, &clock, &mut gateway_series).await;
                phase = Phase::Closing;
                workers.broadcast(Control::Finish).await;
            }
        };
    }
    // Stops everything at once (a worker failed, Ctrl-C).
    macro_rules! abort {
        () => {
            stop_publishing.cancel();
            if phase != Phase::Closing {
                cpu_end.get_or_insert_with(Instant::now);
                phase = Phase::Closing;
                workers.broadcast(Control::Abort).await;
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
                        if phase == Phase::Connecting && ready.iter().all(|r| *r) {
                            set_up_sample = sample(&watch.gateway, &clock, &mut gateway_series).await;
                            phase = Phase::Window;
                            workers.broadcast(Control::Hold).await;
                            cpu_watch = Some(CpuWatch::start(&watch.pids));
                            window_started_ms = Some(clock.now_ms());
                            window_deadline = Instant::now() + plan.duration;
                            if plan.publishes() {
                                publisher = Some(tokio::spawn(publish::run(
                                    plan.schedule(),
                                    clock,
                                    Arc::clone(&live),
                                    stop_publishing.clone(),
                                )));
                            }
                        }
                    }
                    Event::Msg(WorkerMsg::Result(t)) => results[i] = Some(t),
                    Event::Msg(WorkerMsg::Fatal { error }) => {
                        errors.push(format!("worker {i}: {error}"));
                        abort!();
                    }
                    Event::Gone { detail } => {
                        if results[i].is_none() {
                            errors.push(format!("worker {i} ended without results: {detail}"));
                            abort!();
                        }
                    }
                }
                if phase == Phase::Window && !plan.publishes() && chat_done(&plan, &latest) {
                    end_window!();
                }
                if phase == Phase::Draining && all_caught_up(&latest) {
                    drained_fully = true;
                    finish!();
                }
            }
            joined = async { publisher.as_mut().expect("guarded").await }, if publisher.is_some() => {
                publisher = None;
                match joined {
                    Ok(Ok(t)) => {
                        published = Some(t);
                        end_window!();
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
            () = tokio::time::sleep_until(window_deadline), if phase == Phase::Window && !plan.publishes() => {
                end_window!();
            }
            () = tokio::time::sleep_until(drain_deadline), if phase == Phase::Draining => {
                finish!();
            }
            _ = ticker.tick() => {
                let mut total = Progress::default();
                let mut window = Histogram::new();
                let mut chat_window = Histogram::new();
                let newest = latest.iter().filter_map(|p| p.window.as_ref().map(|w| w.0)).max();
                for p in &latest {
                    add_progress(&mut total, p);
                    if let Some((slot, h)) = &p.window
                        && Some(*slot) == newest
                    {
                        window.merge(h);
                    }
                    if let Some((slot, h)) = &p.chat.window
                        && Some(*slot) == newest
                    {
                        chat_window.merge(h);
                    }
                }
                let dt = last_tick.elapsed().as_secs_f64().max(1e-3);
                last_tick = Instant::now();
                let sent = live.sent.load(Ordering::Relaxed);
                let per_s = |now: u64, before: u64| now.saturating_sub(before) as f64 / dt;
                let ms = |h: &Histogram, q: f64| h.quantile(q).map(|v| v as f64 / 1000.0);
                // With the stub's first-token delay known, show the chat path's share.
                let llm_ms = plan
                    .chat
                    .as_ref()
                    .and_then(|c| c.settings.llm)
                    .map(|l| l.first_token_ms as f64);
                let chat_ms = |q: f64| {
                    ms(&chat_window, q).map(|v| (v - llm_ms.unwrap_or(0.0)).max(0.0))
                };
                let snapshot = progress::PopulationSnapshot {
                    elapsed: clock.elapsed(),
                    phase: phase.label(plan.scenario),
                    set_up: total.subscribed,
                    setup_rate: per_s(total.subscribed, last.subscribed),
                    target: plan.connections(),
                    open: total.open,
                    in_flight: total.in_flight,
                    failed: total.failed,
                    closed: total.closed,
                    churned: total.churned,
                    publish_rate: per_s(sent, last_sent),
                    acked: live.acked.load(Ordering::Relaxed),
                    publish_failed: live.failed.load(Ordering::Relaxed),
                    delivery_rate: per_s(total.deliveries, last.deliveries),
                    p50_ms: ms(&window, 0.5),
                    p99_ms: ms(&window, 0.99),
                    streams: total.chat.in_flight,
                    stream_rate: per_s(total.chat.sent, last.chat.sent),
                    completed_rate: per_s(total.chat.completed, last.chat.completed),
                    stream_errors: total.chat.failed,
                    first_chunk_p50_ms: chat_ms(0.5),
                    first_chunk_p99_ms: chat_ms(0.99),
                    overhead: llm_ms.is_some(),
                };
                last_sent = sent;
                last = total;
                line.show_text(&match plan.scenario {
                    ScenarioName::Connect => progress::render_connect(&snapshot),
                    ScenarioName::Broadcast => progress::render_broadcast(&snapshot),
                    ScenarioName::Chat => progress::render_chat(&snapshot),
                    _ => progress::render_soak(&snapshot),
                });
                sample(&watch.gateway, &clock, &mut gateway_series).await;
                for ((_, p), series) in watch.workers.iter().zip(worker_series.iter_mut()) {
                    series.samples.push(p.sample(clock.now_ms()).await);
                }
                if phase == Phase::Draining && all_caught_up(&latest) {
                    drained_fully = true;
                    finish!();
                }
            }
            res = &mut ctrl_c, if !interrupted => {
                interrupted = true;
                scenario::interrupted(&mut line, res);
                abort!();
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
    }
    if window_started_ms.is_some() {
        window_ended_ms.get_or_insert(clock.now_ms());
    }
    let after = sample(&watch.gateway, &clock, &mut gateway_series).await;

    let mut merged = Tallies::default();
    for t in results.iter().flatten() {
        merged.merge(t);
    }
    if let Some(c) = cpu.as_mut()
        && worker_processes
    {
        c.add_workers(merged.cpu);
    }
    gateway_series.sort_by_key(|s| s.at_ms);
    Ok(RunResult {
        tallies: merged,
        published: published.unwrap_or_default(),
        interrupted,
        errors,
        window_started_ms,
        window_ended_ms,
        drain_s,
        drained_fully,
        gateway: watch
            .gateway
            .as_ref()
            .map(|_| [before, set_up_sample, drained_sample, after]),
        gateway_series,
        worker_series,
        cpu,
        open_at_window_end,
        listen_overflows: match (overflows_before, probe::listen_overflows()) {
            (Some(b), Some(a)) => Some(a.saturating_sub(b)),
            _ => None,
        },
        finished_ms: clock.now_ms(),
    })
}

fn add_progress(total: &mut Progress, p: &Progress) {
    total.attempted += p.attempted;
    total.subscribed += p.subscribed;
    total.failed += p.failed;
    total.aborted += p.aborted;
    total.open += p.open;
    total.in_flight += p.in_flight;
    total.closed += p.closed;
    total.churned += p.churned;
    total.deliveries += p.deliveries;
    total.chat.add(&p.chat);
}

/// Every worker knows the expected offsets, and all its open subscribers reached them
/// and none of its chat streams is in flight.
fn all_caught_up(latest: &[Progress]) -> bool {
    latest.iter().all(|p| p.caught_up == Some(true))
}

/// Every chat user of the run is done (sent its `--messages`, or lost its
/// connection); never true without `--messages` limits nor chat users.
fn chat_done(plan: &Plan, latest: &[Progress]) -> bool {
    let Some(c) = &plan.chat else { return false };
    c.settings.messages.is_some()
        && latest.iter().map(|p| p.chat.finished_users).sum::<u64>() >= c.settings.users
}

/// A plan for tests: `scenario` with a minting secret, an API URL and key, and the
/// `base` then `extra` flags.
#[cfg(test)]
pub(crate) fn test_plan(scenario: &str, base: &[&str], extra: &[&str]) -> Plan {
    let flags: Vec<&str> = base.iter().chain(extra).copied().collect();
    Plan::from_cli(&test_cli(scenario, &flags), 20_000).unwrap()
}

#[cfg(test)]
fn test_cli(scenario: &str, extra: &[&str]) -> Cli {
    use clap::Parser;
    let mut args = vec!["loadtest", scenario];
    args.extend_from_slice(&["--secret", "0123456789abcdef0123456789abcdef"]);
    if scenario == "broadcast" || scenario == "soak" {
        args.extend_from_slice(&["--api-url", "http://127.0.0.1:8080"]);
        args.extend_from_slice(&["--api-key", "0123456789abcdef"]);
    }
    args.extend_from_slice(extra);
    Cli::try_parse_from(args).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn cli(extra: &[&str]) -> Cli {
        test_cli("broadcast", extra)
    }

    /// `scenario`'s plan with a minting secret and `extra`, or why not.
    fn try_plan(scenario: &str, extra: &[&str]) -> Result<Plan> {
        let args = [&[scenario, "--secret", SECRET][..], extra].concat();
        scenario::plan_from_args(&args, Plan::from_cli)
    }

    fn cli_of(scenario: &str, extra: &[&str]) -> Cli {
        let mut args = vec!["loadtest", scenario, "--secret", SECRET];
        args.extend_from_slice(extra);
        Cli::try_parse_from(args).unwrap()
    }

    #[test]
    fn connect_plans_hold_idle_connections() {
        let plan = test_plan("connect", &["--connections", "50000"], &[]);
        assert_eq!(
            (plan.idle, plan.connections(), plan.processes),
            (50_000, 50_000, 3)
        );
        assert_eq!(plan.kind_of(0), Kind::Idle);
        assert!(plan.drain.is_zero() && !plan.publishes() && plan.chat.is_none());
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
            assert!(try_plan("connect", bad).is_err(), "{bad:?}");
        }
        if std::env::var_os("SB_JWT_SECRET").is_none() {
            let no_creds = Cli::try_parse_from(["loadtest", "connect"]).unwrap();
            assert!(Plan::from_cli(&no_creds, 20_000).is_err());
        }
        // A forced layout that cannot work is warned about.
        let plan = test_plan(
            "connect",
            &["--connections", "30000"],
            &["--processes", "1"],
        );
        assert!(plan.warnings().iter().any(|w| w.contains("EMFILE")));
        let plan = test_plan(
            "connect",
            &["--connections", "30000"],
            &["--source-ips", "127.0.0.2"],
        );
        assert_eq!(
            plan.warnings().iter().any(|w| w.contains("EADDRNOTAVAIL")),
            plan.ports < 30_000
        );
        // Workers split the connections, the connect rate and the concurrency.
        let flags = ["--connections", "10", "--rate", "100", "--concurrency", "5"];
        let plan = test_plan("connect", &flags, &["--processes", "2"]);
        let (r0, rate, conc) = plan.share(0, 2);
        assert_eq!((r0, plan.share(1, 2).0), (0..5, 5..10));
        assert_eq!((rate, conc), (50.0, 3));
    }

    #[test]
    fn plan_checks_its_inputs() {
        let plan =
            Plan::from_cli(&cli(&["--subscribers", "10", "--channels", "3"]), 20_000).unwrap();
        assert_eq!(plan.rate, crate::cli::DEFAULT_PUBLISH_RATE);
        assert_eq!(plan.duration.as_secs(), crate::cli::DEFAULT_DURATION_SECS);
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
        assert!(plan.chat.is_none() && plan.churn_rate == 0.0);
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
            &["--churn-rate", "5"],
        ] {
            assert!(try_plan("broadcast", bad).is_err(), "{bad:?}");
        }
        // The API route needs its URL and key; the client route does not.
        let no_api = cli_of("broadcast", &[]);
        if std::env::var_os("SB_API_KEY").is_none() {
            assert!(Plan::from_cli(&no_api, 20_000).is_err());
        }
        let client = cli_of(
            "broadcast",
            &[
                "--publish-via",
                "client",
                "--publishers",
                "2",
                "--subscribers",
                "10",
            ],
        );
        let plan = Plan::from_cli(&client, 20_000).unwrap();
        assert!(
            plan.tokens_described.contains("12 users"),
            "{}",
            plan.tokens_described
        );
        assert!(plan.warnings().is_empty(), "{:?}", plan.warnings());
    }

    #[test]
    fn chat_plans_have_users_and_no_publisher() {
        let plan = Plan::from_cli(
            &cli_of(
                "chat",
                &[
                    "--users",
                    "50",
                    "--think-ms",
                    "200",
                    "--llm-first-token-ms",
                    "300",
                    "--llm-stream-ms",
                    "1000",
                ],
            ),
            20_000,
        )
        .unwrap();
        assert_eq!((plan.subscribers, plan.chat_users()), (0, 50));
        assert!(!plan.publishes());
        assert_eq!(plan.connections(), 50);
        let s = &plan.chat.as_ref().unwrap().settings;
        assert_eq!(s.pacing, Pacing::Think(Duration::from_millis(200)));
        assert_eq!(s.first_index, 0);
        // Ramp: the stub's stream (1.3 s) plus the think time.
        assert_eq!(s.ramp, Duration::from_millis(1500));
        assert!(plan.tokens_described.contains("50 users"));
        assert!(
            plan.warnings()
                .iter()
                .any(|w| w.contains("SB_CHAT_RATE_PER_MINUTE")),
            "{:?}",
            plan.warnings()
        );
        // --messages alone: the window lasts until they are sent.
        let plan = Plan::from_cli(&cli_of("chat", &["--messages", "3"]), 20_000).unwrap();
        assert_eq!(plan.duration.as_secs(), MAX_DURATION_SECS);
        assert_eq!(plan.chat_users(), crate::cli::DEFAULT_CHAT_USERS);
        let plan = Plan::from_cli(&cli_of("chat", &["--chat-rate", "20"]), 20_000).unwrap();
        assert_eq!(plan.chat.unwrap().settings.pacing, Pacing::Rate(20.0));
        for bad in [
            &["--users", "0"][..],
            &["--rate", "5"],
            &["--messages", "0"],
            &["--message-bytes", "0"],
            &["--message-bytes", "60000"],
            &["--chat-rate", "0"],
            &["--chat-rate", "5", "--think-ms", "10"],
            &["--llm-stream-ms", "100"],
            &["--ramp=-1"],
        ] {
            assert!(try_plan("chat", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn soak_plans_mix_subscribers_chat_and_churn() {
        let plan = Plan::from_cli(
            &cli_of(
                "soak",
                &[
                    "--connections",
                    "100",
                    "--channels",
                    "4",
                    "--chat-users",
                    "5",
                    "--api-url",
                    "http://127.0.0.1:8080",
                    "--api-key",
                    "k",
                ],
            ),
            20_000,
        )
        .unwrap();
        assert_eq!((plan.subscribers, plan.chat_users()), (100, 5));
        assert_eq!(plan.connections(), 105);
        assert_eq!(plan.churn_rate, crate::cli::DEFAULT_CHURN_RATE);
        assert_eq!(
            plan.duration.as_secs(),
            crate::cli::DEFAULT_SOAK_DURATION_SECS
        );
        assert_eq!(plan.chat.as_ref().unwrap().settings.first_index, 100);
        assert!(plan.publishes());
        assert!(
            plan.describe().starts_with("soak: 100 subscribers"),
            "{}",
            plan.describe()
        );
        assert!(try_plan("soak", &["--connections", "0"]).is_err());
        assert!(try_plan("soak", &["--churn-rate=-1"]).is_err());
    }

    #[test]
    fn several_urls_share_the_connections() {
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
            churned: false,
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
            churned: false,
            untimed: 2,
            stray_frames: 0,
        })));
        // A churned subscriber is neither a close nor a subscriber that stayed.
        b.apply(Outcome::Ended(Box::new(SubscriberEnd {
            received: 9,
            gaps: GapSummary::default(),
            problem: None,
            closed: None,
            churned: true,
            untimed: 0,
            stray_frames: 0,
        })));
        b.apply(Outcome::Left {
            closed: Some((
                3_100,
                Failure::Dropped {
                    stage: Stage::Chatting,
                    error: None,
                },
            )),
        });
        b.latency_us.record(1_200, 3_000);
        b.chat.sent = 4;
        b.cpu = Some(CpuSeconds {
            user: 1.0,
            system: 0.5,
        });
        a.merge(&b);
        assert_eq!(
            (a.attempted, a.subscribed, a.failed, a.closed, a.churned),
            (3, 2, 1, 2, 1)
        );
        assert_eq!(a.failure_limits.get("channel_forbidden"), 1);
        assert_eq!(a.close_limits.get("slow_consumer"), 1);
        assert_eq!(a.close_limits.get("dropped"), 1);
        assert_eq!(a.closes.get("close 4008 SLOW_CONSUMER"), 1);
        assert_eq!(a.closes.get("close 1006 (no close frame) chatting"), 1);
        assert_eq!(a.close_series.counts(), &[0, 0, 1, 1]);
        assert_eq!(a.setup_series.counts(), &[2]);
        assert_eq!(a.failure_series.counts(), &[1]);
        assert_eq!((a.gaps.missing, a.gaps.duplicates), (2, 1));
        assert_eq!(
            a.per_subscriber.count(),
            1,
            "closed and churned subscribers are not counted"
        );
        assert_eq!((a.untimed, a.stray_frames), (2, 1));
        assert_eq!(a.first_attempt_ms, Some(1));
        assert_eq!(a.problems.len(), 1);
        assert_eq!(a.cpu.map(|c| c.total()), Some(1.5));
        assert_eq!(a.chat.sent, 4);
        let back: Tallies = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back.latency_us, a.latency_us);
        assert_eq!(back.gaps, a.gaps);
        assert_eq!(back.closes, a.closes);
        assert_eq!(back.chat.sent, 4);
    }

    #[test]
    fn caught_up_needs_every_worker() {
        let done = Progress {
            caught_up: Some(true),
            ..Progress::default()
        };
        assert!(all_caught_up(std::slice::from_ref(&done)));
        let untold = Progress::default();
        assert!(!all_caught_up(&[done.clone(), untold]));
        let behind = Progress {
            caught_up: Some(false),
            ..Progress::default()
        };
        assert!(!all_caught_up(&[done, behind]));
    }

    #[test]
    fn chat_is_done_when_every_user_finished_its_messages() {
        let plan = Plan::from_cli(
            &cli_of("chat", &["--users", "3", "--messages", "2"]),
            20_000,
        )
        .unwrap();
        let mut p = Progress::default();
        p.chat.finished_users = 2;
        assert!(!chat_done(&plan, std::slice::from_ref(&p)));
        let mut q = Progress::default();
        q.chat.finished_users = 1;
        assert!(chat_done(&plan, &[p.clone(), q]));
        // Without --messages only the clock ends the window.
        let plan = Plan::from_cli(&cli_of("chat", &["--users", "3"]), 20_000).unwrap();
        p.chat.finished_users = 3;
        assert!(!chat_done(&plan, &[p]));
    }
}
