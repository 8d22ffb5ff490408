//! The chat queue's backlog as gauges: how many requests wait in `SB_CHAT` for a
//! worker (`num_pending` of the shared consumer) and how many are delivered but not
//! yet acked (`num_ack_pending`: being answered, or waiting out a dead worker's ack
//! wait). Every worker reports the same cluster-wide numbers (one consumer is
//! shared); dashboards and alerts take the `max` per namespace. A growing pending count
//! means workers cannot keep up, or none is pulling.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::state::Worker;

/// How often the consumer is asked: alerts look at minutes, and each poll is one
/// JetStream API request per worker.
pub const BACKLOG_INTERVAL: Duration = Duration::from_secs(5);

/// Polls the chat consumer until `stop`, setting the backlog gauges.
pub async fn poll(worker: Arc<Worker>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(BACKLOG_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        // Bounded by the bus (a JetStream API call on NATS).
        match worker.bus.backlog().await {
            Ok(b) => {
                metrics::gauge!(shared::metrics::WORKER_CHAT_PENDING).set(b.pending as f64);
                metrics::gauge!(shared::metrics::WORKER_CHAT_IN_FLIGHT).set(b.ack_pending as f64);
            }
            Err(e) => {
                // The gauges keep their last value; `consumer_up` tells whether it is
                // current.
                metrics::counter!(shared::metrics::WORKER_CONSUMER_ERRORS, "op" => "info")
                    .increment(1);
                tracing::debug!(error = %e, "chat consumer info unavailable");
            }
        }
    }
}
