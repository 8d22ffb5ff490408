//! The size of a run: how many users, channels and chat streams, how long each
//! phase lasts, and the bounds the checks hold the cluster to. `ci` fits a few
//! minutes on a shared two-core machine; `full` is the full size of docs/faults.md
//! (600 users, 40 channels, 60 streams, a 10-minute soak).

use std::time::Duration;

use serde::Serialize;

use crate::cluster::{RedisMode, Shape};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    Ci,
    Full,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub size: Size,
    /// Connected users per scenario (each one connection through HAProxy).
    pub users: usize,
    /// `room:` channels; every user subscribes to one, the first member publishes.
    pub channels: usize,
    /// Each publisher publishes this often.
    pub publish_every: Duration,
    /// Chat streams in flight when a fault hits.
    pub streams: usize,
    /// How long the soak lasts.
    pub soak: Duration,
    /// Soak: connections closed and reopened per second.
    pub churn_per_sec: f64,
    /// Soak: chat requests per second over the fleet.
    pub soak_chats_per_sec: f64,
    /// Slow-client scenario: channels that get one never-reading subscriber.
    pub slow_channels: usize,
    /// Slow-client scenario: publications per channel at most (the flood of a
    /// channel stops once its slow client is closed; about 1,400 of 4 KiB are
    /// needed here) and their payload size.
    pub flood_messages: usize,
    pub flood_payload_bytes: usize,
    /// NATS and Redis stay down this long.
    pub outage: Duration,
    /// Upstream faults: how long the LLM answers 429 (then 500).
    pub llm_fault: Duration,
    pub bounds: Bounds,
    pub cluster: Settings,
}

/// The limits the checks state; each with its reason.
#[derive(Debug, Clone, Serialize)]
pub struct Bounds {
    /// A client of a killed or draining gateway is authenticated again within this
    /// (HAProxy redispatches at once; the client's first backoff is 100 ms).
    pub reconnect_ms: u64,
    /// Every acked chat is resolved at the client within this after the fault.
    pub chat_resolve: Duration,
    /// A request answered while a dependency is down: answered within this (the
    /// gateway's own JetStream timeout is 3 s), never a hang.
    pub answer_ms: u64,
    /// readyz turns 503 within this after NATS stops (async-nats notices a dead
    /// server at once on loopback; the readiness check runs every second).
    pub readyz_flip_ms: u64,
    /// Delivery latency p99 of the normal subscribers while slow clients stall.
    pub slow_p99_ms: u64,
    /// Soak: connection success ratio at least this.
    pub soak_success: f64,
    /// Soak: memory growth per hour after warm-up at most this (bytes).
    pub soak_growth_per_hour: u64,
    /// Breaker: opens within this after the backend died (enough logins arrive).
    pub breaker_open: Duration,
}

/// Replies take about 4 s (200 ms to the first token, 100 tokens at 25/s): long
/// enough that a fault lands mid-stream, short enough for CI.
const LLM_FIRST_TOKEN_MS: u64 = 200;
const LLM_TOKENS_PER_SEC: f64 = 25.0;
const LLM_REPLY_TOKENS: usize = 100;

impl Plan {
    pub fn new(size: Size) -> Plan {
        let ci = size == Size::Ci;
        // CI shortens the worker's ack wait (the redelivery delay after a worker
        // crash) and the drain window; full size runs the defaults.
        let ack_wait_secs = if ci { 5 } else { 30 };
        let cluster = Settings {
            drain_secs: if ci { 4 } else { 10 },
            ack_wait_secs,
            breaker_cooldown_ms: if ci { 2_000 } else { 10_000 },
            llm_first_token_ms: LLM_FIRST_TOKEN_MS,
            llm_tokens_per_sec: LLM_TOKENS_PER_SEC,
            llm_reply_tokens: LLM_REPLY_TOKENS,
        };
        Plan {
            size,
            users: if ci { 150 } else { 600 },
            channels: if ci { 15 } else { 40 },
            publish_every: Duration::from_millis(250),
            streams: if ci { 20 } else { 60 },
            soak: Duration::from_secs(if ci { 60 } else { 600 }),
            churn_per_sec: if ci { 2.0 } else { 5.0 },
            soak_chats_per_sec: if ci { 1.0 } else { 3.0 },
            slow_channels: if ci { 3 } else { 8 },
            flood_messages: 6000,
            flood_payload_bytes: 4096,
            outage: Duration::from_secs(if ci { 3 } else { 10 }),
            llm_fault: Duration::from_secs(if ci { 3 } else { 6 }),
            bounds: Bounds {
                reconnect_ms: 5_000,
                // Redelivery waits the ack wait, then the reply streams again (4 s).
                chat_resolve: Duration::from_secs(ack_wait_secs * 2 + 20),
                answer_ms: 5_000,
                readyz_flip_ms: 3_000,
                slow_p99_ms: if ci { 1_000 } else { 500 },
                soak_success: 0.999,
                soak_growth_per_hour: 64 * 1024 * 1024,
                breaker_open: Duration::from_secs(10),
            },
            cluster,
        }
    }
}

/// Cluster settings that differ between sizes (values and reasons in [`Plan::new`]).
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub drain_secs: u64,
    pub ack_wait_secs: u64,
    pub breaker_cooldown_ms: u64,
    pub llm_first_token_ms: u64,
    pub llm_tokens_per_sec: f64,
    pub llm_reply_tokens: usize,
}

impl Settings {
    /// The suite's cluster: `nats_nodes` NATS servers, Redis as `mode`, the STUB LLM
    /// behind the tap, and these settings on the gateways and workers.
    pub fn shape(&self, nats_nodes: usize, mode: RedisMode) -> Shape {
        let llm = vec![
            "--first-token-ms".to_owned(),
            self.llm_first_token_ms.to_string(),
            "--tokens-per-sec".to_owned(),
            self.llm_tokens_per_sec.to_string(),
            "--reply-tokens".to_owned(),
            self.llm_reply_tokens.to_string(),
        ];
        let mut shape = Shape::new(nats_nodes, mode, llm);
        shape.gateway_env = vec![
            (
                "SB_PUBLIC_NAMESPACES".to_owned(),
                crate::cluster::ROOM_NAMESPACE.to_owned(),
            ),
            ("SB_DRAIN_SECS".to_owned(), self.drain_secs.to_string()),
        ];
        shape.worker_env = vec![
            (
                "SB_ACK_WAIT_SECS".to_owned(),
                self.ack_wait_secs.to_string(),
            ),
            (
                "SB_BREAKER_COOLDOWN_MS".to_owned(),
                self.breaker_cooldown_ms.to_string(),
            ),
            // The retry decisions (and their delays) are logged at debug.
            ("SB_LOG".to_owned(), "info,worker::llm=debug".to_owned()),
        ];
        shape
    }
}
