//! Metric names (all prefixed `switchboard_`), shared by the binaries, the Grafana
//! dashboard and the alert rules so that none of them can drift from the others.

// === gateway ===
/// Gauge: open, authenticated WebSocket connections on this node.
pub const CONNECTIONS: &str = "switchboard_connections";
/// Gauge: upgraded sockets not yet authenticated.
pub const CONNECTIONS_PENDING: &str = "switchboard_connections_pending";
/// Counter by `result`: ok, auth_failed, auth_timeout, over_limit, overloaded,
/// rate_limited, unavailable, forbidden_origin, flood.
pub const CONNECTS: &str = "switchboard_connects_total";
/// Counter by `reason` (see `auth::AuthError::reason`, plus `revoked`).
pub const AUTH_FAILURES: &str = "switchboard_auth_failures_total";
/// Counter by `type`: client frames received.
pub const FRAMES_IN: &str = "switchboard_frames_in_total";
/// Counter by `type`: server frames sent.
pub const FRAMES_OUT: &str = "switchboard_frames_out_total";
/// Counter by `code`: close codes sent by the server.
pub const CLOSES: &str = "switchboard_closes_total";
/// Counter by `scope` (message, connect, chat, api_key).
pub const RATE_LIMITED: &str = "switchboard_rate_limited_total";
/// Counter: HTTP API requests with a missing or wrong api key.
pub const API_KEY_FAILURES: &str = "switchboard_api_key_failures_total";
/// Counter by `op`: NATS request/publish failures.
pub const NATS_ERRORS: &str = "switchboard_nats_errors_total";
/// Counter by `op`: Redis command failures.
pub const REDIS_ERRORS: &str = "switchboard_redis_errors_total";
/// Histogram: TCP accept to `authenticated` sent, seconds.
pub const HANDSHAKE_SECONDS: &str = "switchboard_handshake_seconds";
/// Counter: connections closed because their outbound queue was full, or a history
/// replay stalled past the outbound budget.
pub const SLOW_CONSUMERS: &str = "switchboard_slow_consumer_closes_total";
/// Counter by `result` (applied, degraded, dropped): fresh user-context fetches for
/// live connections (refresh-context and the periodic re-check).
pub const CONTEXT_REVALIDATIONS: &str = "switchboard_context_revalidations_total";
/// Gauge: channel subscriptions on this node.
pub const SUBSCRIPTIONS: &str = "switchboard_subscriptions";
/// Counter by `source` (client, api, nats): publications accepted into channels.
pub const PUBLICATIONS: &str = "switchboard_publications_total";
/// Counter: channel publications and events queued to local connections.
pub const DELIVERIES: &str = "switchboard_deliveries_total";
/// Counter by `result` (hit, miss): `subscribe` with `since`.
pub const RECOVERIES: &str = "switchboard_recoveries_total";
/// Counter: gaps in live channel delivery repaired from history.
pub const GAP_REPAIRS: &str = "switchboard_gap_repairs_total";
/// Counter: subscriptions that started over because their channel's offsets did (its
/// position was lost with Redis and a new epoch began).
pub const EPOCH_RESTARTS: &str = "switchboard_epoch_restarts_total";
/// Histogram: publish (stored in Redis) to arrival at a subscribing node, seconds.
pub const FANOUT_SECONDS: &str = "switchboard_fanout_seconds";
/// Counter by `kind` (final, chunk): a worker's chat frames dropped because local
/// connections already got the request's final frame (a copy from the stream, a
/// redelivered request, an echo, or a chunk arriving late).
pub const CHAT_FRAMES_DROPPED: &str = "switchboard_chat_frames_dropped_total";
/// Counter: final chat frames delivered from the `SB_CHAT_EVENTS` stream because the
/// live copy never arrived (lost in a NATS outage or failover).
pub const CHAT_FINALS_FROM_STREAM: &str = "switchboard_chat_finals_from_stream_total";
/// Gauge: 1 while the node is draining.
pub const DRAINING: &str = "switchboard_draining";

// === every binary ===
/// Gauge: resident set size of the process, bytes (from /proc/self/statm).
pub const PROCESS_RSS_BYTES: &str = "switchboard_process_resident_memory_bytes";
/// Gauge: 1 when NATS is connected, by binary.
pub const NATS_CONNECTED: &str = "switchboard_nats_connected";
/// Gauge: 1 when the last Redis check succeeded.
pub const REDIS_UP: &str = "switchboard_redis_up";
/// Gauge: always 1, labelled with `version` and `node`.
pub const BUILD_INFO: &str = "switchboard_build_info";

// === worker ===
/// Counter by `outcome`: completed, cancelled, llm_error, bad_request, republished
/// (a redelivered request that had completed), exhausted (max deliveries), retry_later
/// (nak'd for redelivery), malformed, abandoned (shutdown grace over).
pub const WORKER_REQUESTS: &str = "switchboard_worker_requests_total";
/// Gauge: chat requests this worker is processing.
pub const WORKER_IN_FLIGHT: &str = "switchboard_worker_requests_in_flight";
/// Histogram: LLM request sent to first generated text, seconds (retries included).
pub const WORKER_FIRST_TOKEN_SECONDS: &str = "switchboard_worker_llm_first_token_seconds";
/// Histogram: request pulled to acked, seconds.
pub const WORKER_REQUEST_SECONDS: &str = "switchboard_worker_request_duration_seconds";
/// Counter by `kind`: connect, status, timeout_first_token, timeout_idle, timeout_total,
/// protocol, upstream, interrupted, cancelled.
pub const WORKER_LLM_ERRORS: &str = "switchboard_worker_llm_errors_total";
/// Counter by `reason` (connect, status code class, interrupted): LLM retries before
/// the first token.
pub const WORKER_LLM_RETRIES: &str = "switchboard_worker_llm_retries_total";
/// Counter: chat requests received again (delivery count above 1).
pub const WORKER_REDELIVERIES: &str = "switchboard_worker_redeliveries_total";
/// Counter: `chat.chunk` frames published.
pub const WORKER_CHUNKS: &str = "switchboard_worker_chunks_total";
/// Counter by `result` (sent, failed, expired, dropped): a reply's last frame sent again
/// after the NATS link dropped while the reply was in flight.
pub const WORKER_ECHOES: &str = "switchboard_worker_echoes_total";
/// Counter by `endpoint` (teams, tasks) and `result` (ok, status, timeout, error, invalid).
pub const WORKER_BACKEND_CALLS: &str = "switchboard_worker_backend_calls_total";
/// Gauge: team backend circuit breaker, 0 closed, 1 open, 2 half-open.
pub const WORKER_BREAKER_STATE: &str = "switchboard_worker_breaker_state";
/// Counter by `result` (fresh, cached, empty): user-context RPC replies.
pub const WORKER_CONTEXT_REPLIES: &str = "switchboard_worker_user_context_replies_total";
/// Counter by `op`: JetStream consumer failures (setup, pull, ack, info).
pub const WORKER_CONSUMER_ERRORS: &str = "switchboard_worker_consumer_errors_total";
/// Gauge: chat requests waiting in `SB_CHAT` for a worker (the shared consumer's
/// `num_pending`; the same cluster-wide value from every worker, take the max).
pub const WORKER_CHAT_PENDING: &str = "switchboard_worker_chat_pending";
/// Gauge: chat requests delivered to workers and not yet acked (the shared consumer's
/// `num_ack_pending`; cluster-wide, take the max).
pub const WORKER_CHAT_IN_FLIGHT: &str = "switchboard_worker_chat_in_flight";
/// Gauge: 1 while the chat consumer is pulling.
pub const WORKER_CONSUMER_UP: &str = "switchboard_worker_consumer_up";

/// Histogram buckets for latencies in seconds: sub-millisecond to the 10 s ceiling
/// of any request we make.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Histogram buckets for whole chat requests, seconds: LLM replies take up to minutes.
pub const DURATION_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];

/// Resident memory of this process in bytes, if the platform tells.
pub fn process_rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // Linux on every platform we ship to uses 4 KiB pages.
    Some(pages * 4096)
}
