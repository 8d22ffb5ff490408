//! The command line: one flat set of flags shared by every scenario (each scenario
//! reads the ones it needs), plus the hidden flags a parent passes to its workers.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

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

/// Which scenario to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScenarioName {
    /// Open N authenticated connections at a rate, hold them idle, report.
    Connect,
    /// N subscribers on C channels, publications at a rate; delivery rate, latency,
    /// gaps and duplicates.
    Broadcast,
    /// M users chatting with think time; ack, first-chunk and complete latency, the
    /// chat path's overhead over the LLM's own time, errors by code, chunk gaps.
    Chat,
    /// All of it for a duration with connection churn: success ratio, abnormal
    /// closes, latencies, memory growth per hour; thresholds for CI (`--fail-on`).
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
    /// Scenario to run.
    #[arg(long, value_enum)]
    pub scenario: ScenarioName,

    /// Gateway WebSocket URL (loopback only: 127.0.0.0/8, [::1] or localhost).
    /// `broadcast` accepts it repeated: subscribers are spread round-robin.
    #[arg(long, default_values_t = [DEFAULT_URL.to_owned()])]
    pub url: Vec<String>,

    /// Connections to open.
    #[arg(long, default_value_t = DEFAULT_CONNECTIONS)]
    pub connections: u64,

    /// connect: connects per second over the whole run (default 0 = as fast as
    /// --concurrency allows). broadcast: publications per second over all channels
    /// (default 10).
    #[arg(long)]
    pub rate: Option<f64>,

    /// Seconds to hold the connections open once all are attempted.
    #[arg(long, default_value_t = DEFAULT_HOLD_SECS)]
    pub hold: u64,

    /// Handshakes in flight at once (over all processes).
    #[arg(long, default_value_t = DEFAULT_CONCURRENCY)]
    pub concurrency: u64,

    /// Seconds allowed for one handshake (TCP connect to `authenticated`).
    #[arg(long, default_value_t = crate::client::DEFAULT_HANDSHAKE_TIMEOUT.as_secs())]
    pub timeout: u64,

    /// HS256 secret to mint tokens with (the gateway's SB_JWT_SECRET).
    #[arg(long, env = "SB_JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,

    /// File of tokens, one per line, used in turn (takes precedence over --secret).
    #[arg(long)]
    pub token_file: Option<PathBuf>,

    /// Distinct user ids for minted tokens (lt-0, lt-1, ...); default: one per connection.
    #[arg(long)]
    pub users: Option<u64>,

    /// Lifetime of minted tokens, seconds.
    #[arg(long, default_value_t = crate::tokens::DEFAULT_TTL_SECS)]
    pub ttl: u64,

    /// Gateway process id: its RSS is read from /proc/<pid>/status. `broadcast`
    /// accepts it repeated (gateways, nats-server, redis-server) and reports the CPU
    /// each one used while publishing, from /proc/<pid>/stat.
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
    /// in percent of --connections, before the exit code says the goal was missed.
    #[arg(long, default_value_t = DEFAULT_ALLOW_FAILURES_PCT)]
    pub allow_failures: f64,

    /// broadcast: subscriber connections (each subscribes to one channel).
    #[arg(long, default_value_t = DEFAULT_SUBSCRIBERS)]
    pub subscribers: u64,

    /// broadcast: channels `<namespace>:0` .. `<namespace>:<C-1>`; subscriber i takes
    /// channel i mod C, publication j goes to channel j mod C.
    #[arg(long, default_value_t = DEFAULT_CHANNELS)]
    pub channels: u64,

    /// broadcast: channel namespace; the gateway must list it in SB_PUBLIC_NAMESPACES.
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,

    /// Seconds of the window: publishing (broadcast, soak) and chatting (chat, soak).
    /// Default 10 (soak: 60; chat with --messages: until they are sent).
    #[arg(long)]
    pub duration: Option<u64>,

    /// broadcast: size of each publication's `data` (publish timestamp plus padding).
    #[arg(long, default_value_t = DEFAULT_PAYLOAD_BYTES)]
    pub payload_bytes: usize,

    /// broadcast: publish through the HTTP API or client `publish` frames.
    #[arg(long, value_enum, default_value_t = PublishVia::Api)]
    pub publish_via: PublishVia,

    /// broadcast: gateway HTTP base URL for `POST /v1/publish` (loopback only);
    /// repeated: publications are spread round-robin.
    #[arg(long)]
    pub api_url: Vec<String>,

    /// broadcast: the gateway's api key (SB_API_KEY) for `POST /v1/publish`.
    #[arg(long, env = "SB_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// broadcast: publisher connections (HTTP keep-alive connections, or WebSocket
    /// connections with --publish-via client).
    #[arg(long, default_value_t = DEFAULT_PUBLISHERS)]
    pub publishers: u32,

    /// broadcast: longest wait after the last publication for every subscriber to
    /// receive everything, seconds.
    #[arg(long, default_value_t = DEFAULT_DRAIN_SECS)]
    pub drain: u64,

    /// chat, soak: mean think time between a user's streams, ms (each wait is drawn
    /// from 0.5x to 1.5x of it). Default 1000.
    #[arg(long)]
    pub think_ms: Option<u64>,

    /// chat, soak: instead of think time, start streams on an open-loop schedule of
    /// this many per second over all users.
    #[arg(long)]
    pub chat_rate: Option<f64>,

    /// chat, soak: messages per user; the window ends when every user sent them
    /// (or --duration passed).
    #[arg(long)]
    pub messages: Option<u64>,

    /// chat, soak: size of each chat message, bytes.
    #[arg(long, default_value_t = DEFAULT_MESSAGE_BYTES)]
    pub message_bytes: usize,

    /// chat, soak: seconds over which users send their first message (default: the
    /// stub's stream time, or 1 s, plus the think time).
    #[arg(long)]
    pub ramp: Option<f64>,

    /// chat, soak: the LLM stub's first-token delay, ms (mock-llm --first-token-ms):
    /// overhead = first-chunk latency minus this.
    #[arg(long)]
    pub llm_first_token_ms: Option<u64>,

    /// chat, soak: the stub's time from first to last token, ms ((reply tokens - 1) /
    /// tokens per second): complete overhead = complete latency minus first token
    /// minus this.
    #[arg(long)]
    pub llm_stream_ms: Option<u64>,

    /// chat, soak: mock-llm's address (loopback): the two timings above are read from
    /// its GET /stub/config.
    #[arg(long)]
    pub llm_stub: Option<String>,

    /// soak: chat users beside the subscribers (default 10; 0 = no chat).
    #[arg(long)]
    pub chat_users: Option<u64>,

    /// soak: subscribers closed and replaced (a new connection and subscription) per
    /// second during the window (default 10).
    #[arg(long)]
    pub churn_rate: Option<f64>,

    /// soak (and chat): a chat worker's admin /metrics URL (loopback); repeatable.
    /// Its RSS is sampled every second and its growth reported.
    #[arg(long)]
    pub worker_metrics: Vec<String>,

    /// soak: thresholds that make the exit code 1, comma-separated or repeated, e.g.
    /// `success<99.9,abnormal>0,growth>64`. Metrics: success (%), abnormal (1006
    /// closes), closes, failures, gaps, duplicates, chat-errors, chat-error-pct,
    /// overhead-p99 (ms), delivery-p99 (ms), growth (gateway MiB/h), worker-growth
    /// (MiB/h). Default: success<99.9,abnormal>0,gaps>0,duplicates>0,chat-errors>0.
    #[arg(long)]
    pub fail_on: Vec<String>,

    /// soak: seconds at the start of the window left out of the memory trend (the
    /// allocator's warm-up). Default: a fifth of --duration, at most 300.
    #[arg(long)]
    pub warmup: Option<u64>,

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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_and_flags_parse() {
        let cli = Cli::try_parse_from(["loadtest", "--scenario", "connect"]).unwrap();
        assert_eq!(cli.scenario, ScenarioName::Connect);
        assert_eq!(cli.connections, DEFAULT_CONNECTIONS);
        assert_eq!(cli.url, vec![DEFAULT_URL.to_owned()]);
        assert_eq!(cli.rate, None);
        assert!(cli.pid.is_empty());
        let cli = Cli::try_parse_from([
            "loadtest",
            "--scenario",
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
        .unwrap();
        assert_eq!(cli.connections, 10_000);
        assert_eq!(cli.rate, Some(2500.0));
        assert_eq!(cli.worker_index, Some(1));
        assert!(Cli::try_parse_from(["loadtest", "--scenario", "nope"]).is_err());
        let cli = Cli::try_parse_from([
            "loadtest",
            "--scenario",
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
        .unwrap();
        assert_eq!(cli.scenario, ScenarioName::Broadcast);
        assert_eq!(cli.url.len(), 2);
        assert_eq!(cli.pid, vec![7, 8]);
        assert_eq!(cli.publish_via, PublishVia::Client);
        assert_eq!(cli.subscribers, 10_000);
        assert_eq!(cli.channels, DEFAULT_CHANNELS);
        assert!(Cli::try_parse_from(["loadtest"]).is_err());
        let cli = Cli::try_parse_from([
            "loadtest",
            "--scenario",
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
        .unwrap();
        assert_eq!(cli.scenario, ScenarioName::Soak);
        assert_eq!(cli.fail_on.len(), 2);
        assert_eq!(cli.worker_metrics.len(), 1);
        assert_eq!((cli.duration, cli.churn_rate), (Some(3600), Some(2.5)));
        let cli = Cli::try_parse_from(["loadtest", "--scenario", "chat", "--users", "7"]).unwrap();
        assert_eq!((cli.scenario, cli.users), (ScenarioName::Chat, Some(7)));
        assert_eq!(cli.message_bytes, DEFAULT_MESSAGE_BYTES);
    }
}
