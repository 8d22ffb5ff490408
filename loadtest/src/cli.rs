//! The command line: one subcommand per scenario, each with only the flags it reads
//! (plus the common ones and the hidden flags a parent passes to its workers), so that
//! clap rejects a foreign flag or an out-of-range value and names the flag.

use std::path::PathBuf;

use clap::builder::RangedU64ValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Default target: a gateway started locally with `SB_LISTEN=127.0.0.1:8080`.
pub const DEFAULT_URL: &str = "ws://127.0.0.1:8080/ws";
/// Default connection count: the README's smoke run, seconds on this machine.
pub const DEFAULT_CONNECTIONS: u64 = 1000;
/// Default in-flight handshakes: enough to keep a 2-core gateway busy without
/// turning the run into a SYN flood that only measures the listen backlog.
pub const DEFAULT_CONCURRENCY: u64 = 100;
/// Default connect rate: unpaced, so that a run measures the most the gateway accepts.
pub const DEFAULT_RATE: f64 = 0.0;
/// Default publication rate of `broadcast`: gentle enough for any gateway build (a
/// debug build included); measurements pick their own.
pub const DEFAULT_PUBLISH_RATE: f64 = 10.0;
/// Default subscriber count of `broadcast`: the README's smoke size.
pub const DEFAULT_SUBSCRIBERS: u64 = 1000;
/// Default channel count of `broadcast`: every subscriber on one channel, the fan-out
/// case the broadcast target of docs/benchmarks.md measures.
pub const DEFAULT_CHANNELS: u64 = 1;
/// Default window of `broadcast` and `chat` (publishing, chatting), seconds.
pub const DEFAULT_DURATION_SECS: u64 = 10;
/// Default size of a publication's `data`, bytes: a short chat message.
pub const DEFAULT_PAYLOAD_BYTES: usize = 100;
/// Default publisher connections (HTTP keep-alive connections for `api`, WebSocket
/// connections for `client`): one, so that publications reach the gateway, and its
/// NATS subject, in offset order. With several, concurrent requests overtake one
/// another, and every subscriber of the gateway repairs each reordering from Redis
/// (measured in loadtest/README.md); raise it for rates one connection cannot carry.
pub const DEFAULT_PUBLISHERS: u32 = 1;
/// Default longest wait, after the last publication, for subscribers to receive
/// everything: a backlog longer than this is a gateway that cannot keep up.
pub const DEFAULT_DRAIN_SECS: u64 = 10;
/// The gateway's default per-connection message rate (SB_MESSAGE_RATE), frames/s:
/// client publishing beyond it is refused `RATE_LIMITED` unless the gateway is told.
pub const GATEWAY_DEFAULT_MESSAGE_RATE: u32 = 20;
/// Default channel namespace of `broadcast` (the gateway must list it in
/// SB_PUBLIC_NAMESPACES).
pub const DEFAULT_NAMESPACE: &str = "bench";
/// Default tolerance: none, so that a smoke run passes only if everything worked.
pub const DEFAULT_ALLOW_FAILURES_PCT: f64 = 0.0;
/// Default hold: long enough for the gateway's memory to settle after the connect
/// burst, short enough for a smoke run.
pub const DEFAULT_HOLD_SECS: u64 = 5;
/// Default chat users of `chat`: a hundred concurrent conversations, the smaller
/// benchmark point of docs/benchmarks.md ("Chat").
pub const DEFAULT_CHAT_USERS: u64 = 100;
/// Default chat users of `soak`: a steady trickle of streams beside the subscribers.
pub const DEFAULT_SOAK_CHAT_USERS: u64 = 10;
/// Default think time between a user's streams, ms: a person reading the reply.
pub const DEFAULT_THINK_MS: u64 = 1000;
/// Default size of a chat message, bytes: a short question.
pub const DEFAULT_MESSAGE_BYTES: usize = 64;
/// Default window of `soak`, seconds: long enough for a first memory trend; real
/// soaks give hours.
pub const DEFAULT_SOAK_DURATION_SECS: u64 = 60;
/// Default churn of `soak`: subscribers closed and replaced per second.
pub const DEFAULT_CHURN_RATE: f64 = 10.0;
/// The gateway's default per-user chat rate (SB_CHAT_RATE_PER_MINUTE): faster users
/// are refused `RATE_LIMITED` unless the gateway is told.
pub const GATEWAY_DEFAULT_CHAT_RATE_PER_MINUTE: u32 = 20;

/// Largest connect rate accepted: far beyond what a loopback gateway can accept, so a
/// larger value is a typo; it also keeps the pacing arithmetic finite.
pub const MAX_CONNECT_RATE: f64 = 10_000_000.0;
/// Longest hold accepted (one day): bounded so that `--hold` cannot overflow a deadline.
pub const MAX_HOLD_SECS: u64 = 86_400;
/// Longest handshake deadline accepted (ten minutes).
pub const MAX_TIMEOUT_SECS: u64 = 600;
/// Largest publication (and chat stream) rate accepted: far beyond a loopback gateway;
/// a larger value is a typo, and the bound keeps the schedule arithmetic finite.
pub const MAX_RATE: f64 = 1_000_000.0;
/// Longest window and drain accepted (one day); also the window of a `chat` run
/// bounded by `--messages` alone.
pub const MAX_DURATION_SECS: u64 = 86_400;
/// Largest payload: the gateway's default frame limit is 64 KiB, and the `message`
/// frame wraps the payload in about 100 bytes more.
pub const MAX_PAYLOAD_BYTES: usize = 60 * 1024;
/// Largest chat message: the gateway's limit is 50,000 characters.
pub const MAX_MESSAGE_BYTES: usize = 50_000;
/// Most publisher connections.
pub const MAX_PUBLISHERS: u32 = 1024;
/// Largest churn rate accepted: beyond any gateway's connect rate on one machine.
pub const MAX_CHURN_RATE: f64 = 100_000.0;

/// Which scenario a plan is for (what the reports and the engine branch on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScenarioName {
    Connect,
    Broadcast,
    Chat,
    Soak,
}

/// How `broadcast` publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PublishVia {
    /// `POST /v1/publish` with the api key, over keep-alive HTTP/1.1 connections.
    Api,
    /// `publish` frames on authenticated WebSocket connections.
    Client,
}

/// Switchboard load generator. Sends traffic to loopback addresses only.
#[derive(Debug, Clone, Parser)]
#[command(name = "loadtest", version, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// The scenarios, each with its own flags.
#[derive(Debug, Clone, Subcommand)]
pub enum Scenario {
    /// Open N authenticated connections at a rate, hold them idle, report.
    Connect(ConnectArgs),
    /// N subscribers on C channels, publications at a rate; delivery rate, latency,
    /// gaps and duplicates.
    Broadcast(BroadcastArgs),
    /// M users chatting with think time; ack, first-chunk and complete latency, the
    /// chat path's overhead over the LLM's own time, errors by code, chunk gaps.
    Chat(ChatArgs),
    /// All of it for a duration with connection churn: success ratio, abnormal
    /// closes, latencies, memory growth per hour; thresholds for CI (`--fail-on`).
    Soak(SoakArgs),
}

impl Scenario {
    pub fn name(&self) -> ScenarioName {
        match self {
            Scenario::Connect(_) => ScenarioName::Connect,
            Scenario::Broadcast(_) => ScenarioName::Broadcast,
            Scenario::Chat(_) => ScenarioName::Chat,
            Scenario::Soak(_) => ScenarioName::Soak,
        }
    }

    pub fn common(&self) -> &CommonArgs {
        match self {
            Scenario::Connect(a) => &a.common,
            Scenario::Broadcast(a) => &a.common,
            Scenario::Chat(a) => &a.common,
            Scenario::Soak(a) => &a.common,
        }
    }

    /// The chat flags, for the scenarios that have chat users.
    pub fn chat_mut(&mut self) -> Option<&mut ChatFlags> {
        match self {
            Scenario::Chat(a) => Some(&mut a.chat),
            Scenario::Soak(a) => Some(&mut a.chat),
            Scenario::Connect(_) | Scenario::Broadcast(_) => None,
        }
    }
}

/// Flags every scenario reads.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Gateway WebSocket URL (loopback only: 127.0.0.0/8, [::1] or localhost).
    /// Repeatable except for `connect`: connections are spread round-robin.
    #[arg(long, default_values_t = [DEFAULT_URL.to_owned()])]
    pub url: Vec<String>,

    /// Handshakes in flight at once (over all processes).
    #[arg(long, default_value_t = DEFAULT_CONCURRENCY, value_parser = clap::value_parser!(u64).range(1..))]
    pub concurrency: u64,

    /// Seconds allowed for one handshake (TCP connect to `authenticated`).
    #[arg(
        long,
        default_value_t = crate::client::DEFAULT_HANDSHAKE_TIMEOUT.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_SECS)
    )]
    pub timeout: u64,

    /// HS256 secret to mint tokens with (the gateway's SB_JWT_SECRET).
    #[arg(long, env = "SB_JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,

    /// File of tokens, one per line, used in turn (takes precedence over --secret).
    #[arg(long)]
    pub token_file: Option<PathBuf>,

    /// Distinct user ids for minted tokens (lt-0, lt-1, ...); default: one per
    /// connection. `chat`: the number of chat users (default 100), each its own user.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub users: Option<u64>,

    /// Lifetime of minted tokens, seconds.
    #[arg(long, default_value_t = crate::tokens::DEFAULT_TTL_SECS)]
    pub ttl: u64,

    /// Gateway process id: its RSS is read from /proc/<pid>/status. Repeatable except
    /// for `connect` (gateways, nats-server, redis-server): the CPU each one used is
    /// reported, from /proc/<pid>/stat.
    #[arg(long)]
    pub pid: Vec<u32>,

    /// Gateway metrics URL (admin port), for RSS and its connection count.
    #[arg(long)]
    pub metrics_url: Option<String>,

    /// Write machine-readable results here.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Write a self-contained HTML report here.
    #[arg(long)]
    pub html: Option<PathBuf>,

    /// Worker processes; default: enough for the open-file limit (`ulimit -Hn`).
    #[arg(long)]
    pub processes: Option<u32>,

    /// Source addresses, e.g. 127.0.0.2-127.0.0.9 or 127.0.0.2,127.0.0.3; default:
    /// chosen automatically when one address has too few ephemeral ports.
    #[arg(long)]
    pub source_ips: Option<String>,

    /// Failures (connects that failed plus connections dropped while held) tolerated,
    /// in percent of the connections, before the exit code says the goal was missed.
    #[arg(long, default_value_t = DEFAULT_ALLOW_FAILURES_PCT, value_parser = percent)]
    pub allow_failures: f64,

    /// Internal: this process is worker `i` of a multi-process run.
    #[arg(long, hide = true)]
    pub worker_index: Option<u32>,

    /// Internal: number of workers in the run.
    #[arg(long, hide = true)]
    pub worker_count: Option<u32>,

    /// Internal: the run's epoch (unix milliseconds), shared by all workers.
    #[arg(long, hide = true)]
    pub epoch_ms: Option<u64>,
}

/// `loadtest connect`.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Connections to open.
    #[arg(long, default_value_t = DEFAULT_CONNECTIONS, value_parser = clap::value_parser!(u64).range(1..))]
    pub connections: u64,

    /// Connects per second over the whole run (0 = as fast as --concurrency allows).
    #[arg(long, default_value_t = DEFAULT_RATE, value_parser = connect_rate)]
    pub rate: f64,

    /// Seconds to hold the connections open once all are attempted.
    #[arg(long, default_value_t = DEFAULT_HOLD_SECS, value_parser = clap::value_parser!(u64).range(..=MAX_HOLD_SECS))]
    pub hold: u64,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// `loadtest broadcast`.
#[derive(Debug, Clone, Args)]
pub struct BroadcastArgs {
    /// Subscriber connections (each subscribes to one channel).
    #[arg(long, default_value_t = DEFAULT_SUBSCRIBERS, value_parser = clap::value_parser!(u64).range(1..))]
    pub subscribers: u64,

    /// Seconds of publishing.
    #[arg(long, default_value_t = DEFAULT_DURATION_SECS, value_parser = duration)]
    pub duration: u64,

    #[command(flatten)]
    pub publish: PublishFlags,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// `loadtest chat`.
#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    /// Seconds of chatting. Default 10; with --messages: until they are sent.
    #[arg(long, value_parser = duration)]
    pub duration: Option<u64>,

    #[command(flatten)]
    pub chat: ChatFlags,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// `loadtest soak`.
#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    /// Subscriber connections (each subscribes to one channel).
    #[arg(long, default_value_t = DEFAULT_CONNECTIONS, value_parser = clap::value_parser!(u64).range(1..))]
    pub connections: u64,

    /// Seconds of the window (publishing, chatting, churn).
    #[arg(long, default_value_t = DEFAULT_SOAK_DURATION_SECS, value_parser = duration)]
    pub duration: u64,

    /// Chat users beside the subscribers (0 = no chat).
    #[arg(long, default_value_t = DEFAULT_SOAK_CHAT_USERS)]
    pub chat_users: u64,

    /// Subscribers closed and replaced (a new connection and subscription) per second
    /// during the window.
    #[arg(long, default_value_t = DEFAULT_CHURN_RATE, value_parser = churn_rate)]
    pub churn_rate: f64,

    /// Thresholds that make the exit code 1, comma-separated or repeated, e.g.
    /// `success<99.9,abnormal>0,growth>64`. Metrics: success (%), abnormal (1006
    /// closes), closes, failures, gaps, duplicates, chat-errors, chat-error-pct,
    /// overhead-p99 (ms), delivery-p99 (ms), growth (gateway MiB/h), worker-growth
    /// (MiB/h). Default: success<99.9,abnormal>0,gaps>0,duplicates>0,chat-errors>0.
    #[arg(long)]
    pub fail_on: Vec<String>,

    /// Seconds at the start of the window left out of the memory trend (the
    /// allocator's warm-up). Default: a fifth of --duration, at most 300.
    #[arg(long)]
    pub warmup: Option<u64>,

    #[command(flatten)]
    pub publish: PublishFlags,

    #[command(flatten)]
    pub chat: ChatFlags,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// The publisher's flags (`broadcast`, `soak`).
#[derive(Debug, Clone, Args)]
pub struct PublishFlags {
    /// Publications per second over all channels.
    #[arg(long, default_value_t = DEFAULT_PUBLISH_RATE, value_parser = publish_rate)]
    pub rate: f64,

    /// Channels `<namespace>:0` .. `<namespace>:<C-1>`; subscriber i takes channel
    /// i mod C, publication j goes to channel j mod C.
    #[arg(long, default_value_t = DEFAULT_CHANNELS, value_parser = clap::value_parser!(u64).range(1..))]
    pub channels: u64,

    /// Channel namespace; the gateway must list it in SB_PUBLIC_NAMESPACES.
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,

    /// Size of each publication's `data` (publish timestamp plus padding).
    #[arg(
        long,
        default_value_t = DEFAULT_PAYLOAD_BYTES,
        value_parser = RangedU64ValueParser::<usize>::new().range(..=MAX_PAYLOAD_BYTES as u64)
    )]
    pub payload_bytes: usize,

    /// Publish through the HTTP API or client `publish` frames.
    #[arg(long, value_enum, default_value_t = PublishVia::Api)]
    pub publish_via: PublishVia,

    /// Gateway HTTP base URL for `POST /v1/publish` (loopback only); repeated:
    /// publications are spread round-robin.
    #[arg(long)]
    pub api_url: Vec<String>,

    /// The gateway's api key (SB_API_KEY) for `POST /v1/publish`.
    #[arg(long, env = "SB_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Publisher connections (HTTP keep-alive connections, or WebSocket connections
    /// with --publish-via client).
    #[arg(
        long,
        default_value_t = DEFAULT_PUBLISHERS,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_PUBLISHERS))
    )]
    pub publishers: u32,

    /// Longest wait after the last publication for every subscriber to receive
    /// everything, seconds.
    #[arg(long, default_value_t = DEFAULT_DRAIN_SECS, value_parser = clap::value_parser!(u64).range(..=MAX_DURATION_SECS))]
    pub drain: u64,
}

/// The chat users' flags (`chat`, `soak`).
#[derive(Debug, Clone, Args)]
pub struct ChatFlags {
    /// Mean think time between a user's streams, ms (each wait is drawn from 0.5x to
    /// 1.5x of it). Default 1000.
    #[arg(long)]
    pub think_ms: Option<u64>,

    /// Instead of think time, start streams on an open-loop schedule of this many per
    /// second over all users.
    #[arg(long, value_parser = publish_rate, conflicts_with = "think_ms")]
    pub chat_rate: Option<f64>,

    /// Messages per user; the window ends when every user sent them (or --duration
    /// passed).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub messages: Option<u64>,

    /// Size of each chat message, bytes.
    #[arg(
        long,
        default_value_t = DEFAULT_MESSAGE_BYTES,
        value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_MESSAGE_BYTES as u64)
    )]
    pub message_bytes: usize,

    /// Seconds over which users send their first message (default: the stub's stream
    /// time, or 1 s, plus the think time).
    #[arg(long, value_parser = ramp)]
    pub ramp: Option<f64>,

    /// The LLM stub's first-token delay, ms (mock-llm --first-token-ms): overhead =
    /// first-chunk latency minus this.
    #[arg(long)]
    pub llm_first_token_ms: Option<u64>,

    /// The stub's time from first to last token, ms ((reply tokens - 1) / tokens per
    /// second): complete overhead = complete latency minus first token minus this.
    #[arg(long, requires = "llm_first_token_ms")]
    pub llm_stream_ms: Option<u64>,

    /// mock-llm's address (loopback): the two timings above are read from its
    /// GET /stub/config.
    #[arg(long)]
    pub llm_stub: Option<String>,

    /// A chat worker's admin /metrics URL (loopback); repeatable. Its RSS is sampled
    /// every second and its growth reported.
    #[arg(long)]
    pub worker_metrics: Vec<String>,
}

/// A float flag within `low..=high` (above `low` when `open_low`); what clap's integer
/// ranges do for whole numbers.
fn bounded(s: &str, low: f64, open_low: bool, high: f64) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    let above_low = if open_low { v > low } else { v >= low };
    if v.is_finite() && above_low && v <= high {
        Ok(v)
    } else if open_low {
        Err(format!("must be above {low} and at most {high}"))
    } else {
        Err(format!("must be between {low} and {high}"))
    }
}

fn percent(s: &str) -> Result<f64, String> {
    bounded(s, 0.0, false, 100.0)
}

fn connect_rate(s: &str) -> Result<f64, String> {
    bounded(s, 0.0, false, MAX_CONNECT_RATE)
}

fn publish_rate(s: &str) -> Result<f64, String> {
    bounded(s, 0.0, true, MAX_RATE)
}

fn churn_rate(s: &str) -> Result<f64, String> {
    bounded(s, 0.0, false, MAX_CHURN_RATE)
}

fn ramp(s: &str) -> Result<f64, String> {
    bounded(s, 0.0, false, MAX_DURATION_SECS as f64)
}

fn duration(s: &str) -> Result<u64, String> {
    let v: u64 = s.parse().map_err(|e| format!("{e}"))?;
    if (1..=MAX_DURATION_SECS).contains(&v) {
        Ok(v)
    } else {
        Err(format!("must be between 1 and {MAX_DURATION_SECS} s"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("loadtest").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_and_flags_parse() {
        let Scenario::Connect(c) = parse(&["connect"]).unwrap().scenario else {
            panic!("not connect");
        };
        assert_eq!(c.connections, DEFAULT_CONNECTIONS);
        assert_eq!(c.common.url, vec![DEFAULT_URL.to_owned()]);
        assert_eq!(c.rate, DEFAULT_RATE);
        assert!(c.common.pid.is_empty());
        let Scenario::Connect(c) = parse(&[
            "connect",
            "--connections",
            "10000",
            "--rate",
            "2500",
            "--source-ips",
            "127.0.0.2-127.0.0.9",
            "--worker-index",
            "1",
            "--worker-count",
            "2",
        ])
        .unwrap()
        .scenario
        else {
            panic!("not connect");
        };
        assert_eq!((c.connections, c.rate), (10_000, 2500.0));
        assert_eq!(c.common.worker_index, Some(1));
        assert!(parse(&["nope"]).is_err());
        assert!(parse(&[]).is_err());
        let Scenario::Broadcast(b) = parse(&[
            "broadcast",
            "--url",
            "ws://127.0.0.1:1/ws",
            "--url",
            "ws://127.0.0.1:2/ws",
            "--pid",
            "7",
            "--pid",
            "8",
            "--publish-via",
            "client",
            "--subscribers",
            "10000",
        ])
        .unwrap()
        .scenario
        else {
            panic!("not broadcast");
        };
        assert_eq!(b.common.url.len(), 2);
        assert_eq!(b.common.pid, vec![7, 8]);
        assert_eq!(b.publish.publish_via, PublishVia::Client);
        assert_eq!(
            (b.subscribers, b.publish.channels),
            (10_000, DEFAULT_CHANNELS)
        );
        let Scenario::Soak(s) = parse(&[
            "soak",
            "--fail-on",
            "success<99.9,abnormal>0",
            "--fail-on",
            "growth>64",
            "--worker-metrics",
            "http://127.0.0.1:9091/metrics",
            "--duration",
            "3600",
            "--churn-rate",
            "2.5",
        ])
        .unwrap()
        .scenario
        else {
            panic!("not soak");
        };
        assert_eq!(s.fail_on.len(), 2);
        assert_eq!(s.chat.worker_metrics.len(), 1);
        assert_eq!((s.duration, s.churn_rate), (3600, 2.5));
        let cli = parse(&["chat", "--users", "7"]).unwrap();
        assert_eq!(cli.scenario.name(), ScenarioName::Chat);
        assert_eq!(cli.scenario.common().users, Some(7));
    }

    #[test]
    fn clap_names_the_flag_it_rejects() {
        for (args, flag) in [
            (&["connect", "--subscribers", "5"][..], "--subscribers"),
            (&["chat", "--rate", "5"], "--rate"),
            (&["broadcast", "--churn-rate", "5"], "--churn-rate"),
            (&["broadcast", "--fail-on", "gaps>0"], "--fail-on"),
            (&["connect", "--connections", "0"], "--connections"),
            (&["connect", "--rate", "NaN"], "--rate"),
            (
                &["broadcast", "--payload-bytes", "70000"],
                "--payload-bytes",
            ),
            (&["soak", "--allow-failures", "101"], "--allow-failures"),
            (
                &["chat", "--chat-rate", "5", "--think-ms", "10"],
                "--chat-rate",
            ),
            (&["chat", "--llm-stream-ms", "100"], "--llm-first-token-ms"),
        ] {
            let e = parse(args).unwrap_err().to_string();
            assert!(e.contains(flag), "{args:?}: {e}");
        }
    }
}
