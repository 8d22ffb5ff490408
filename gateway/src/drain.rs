//! Lame-duck drain on SIGTERM: readiness fails at once, the listener closes, and every
//! socket gets `reconnect` then close 1012, spread evenly over the drain window so the
//! rest of the cluster sees a gentle ramp instead of a reconnect storm.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::close::CloseCause;
use crate::node::Node;

/// How long after its `reconnect` a client should wait at most (jitter ceiling): the
/// spreading already happened on our side, so clients reconnect promptly.
pub const RECONNECT_JITTER_MS: u64 = 1000;
/// Grace after the window for the last close handshakes and Redis clean-up.
pub const FINISH_GRACE: Duration = Duration::from_secs(5);

/// Marks the node draining (readiness 503 from now on).
pub fn begin(node: &Node) {
    node.life.draining.store(true, Ordering::Release);
    metrics::gauge!(shared::metrics::DRAINING).set(1.0);
}

/// Closes every socket over `window`. Returns when each has been asked to close.
pub async fn run(node: Arc<Node>, window: Duration) {
    let sockets = node.sockets.all();
    let n = sockets.len();
    tracing::info!(
        connections = n,
        window_ms = window.as_millis() as u64,
        "draining"
    );
    if n == 0 {
        return;
    }
    let step = window / n as u32;
    let start = tokio::time::Instant::now();
    for (i, closer) in sockets.into_iter().enumerate() {
        tokio::time::sleep_until(start + step * i as u32).await;
        closer.close(CloseCause::Draining {
            retry_after_ms: RECONNECT_JITTER_MS,
        });
    }
}
