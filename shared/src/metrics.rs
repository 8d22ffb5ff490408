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
/// Counter by `scope` (message, connect).
pub const RATE_LIMITED: &str = "switchboard_rate_limited_total";
/// Counter by `op`: NATS request/publish failures.
pub const NATS_ERRORS: &str = "switchboard_nats_errors_total";
/// Counter by `op`: Redis command failures.
pub const REDIS_ERRORS: &str = "switchboard_redis_errors_total";
/// Histogram: TCP accept to `authenticated` sent, seconds.
pub const HANDSHAKE_SECONDS: &str = "switchboard_handshake_seconds";
/// Counter: connections closed because their outbound queue was full.
pub const SLOW_CONSUMERS: &str = "switchboard_slow_consumer_closes_total";
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

/// Histogram buckets for latencies in seconds: sub-millisecond to the 10 s ceiling
/// of any request we make.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Resident memory of this process in bytes, if the platform tells.
pub fn process_rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // Linux on every platform we ship to uses 4 KiB pages.
    Some(pages * 4096)
}
