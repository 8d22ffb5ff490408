//! Control subjects every gateway listens on (kicks, revocations, context refreshes,
//! the publish RPC): subscribing until the node stops, retrying while the bus
//! refuses, and decoding each JSON command.

use futures_util::StreamExt;
use shared::bus::{Bus, Subscription};
use tokio_util::sync::CancellationToken;

/// The scaffold's readiness interval, here also the pause between subscription
/// retries.
pub use shared::scaffold::HEALTH_INTERVAL;

/// Subscribes (in a queue group when given), retrying while the bus refuses, until
/// `stop`. The NATS client re-sends the subscription after reconnects.
pub async fn subscribe_until_stopped(
    bus: &dyn Bus,
    subject: String,
    queue: Option<&str>,
    stop: &CancellationToken,
) -> Option<Subscription> {
    loop {
        match bus
            .subscribe(subject.clone(), queue.map(str::to_owned))
            .await
        {
            Ok(s) => return Some(s),
            Err(e) => {
                tracing::warn!(error = %e, subject, "cannot subscribe; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
                }
            }
        }
    }
}

/// Hands each JSON message of a control subject to `apply` until `stop`; a malformed
/// one is logged and skipped.
pub async fn messages<T: serde::de::DeserializeOwned>(
    bus: &dyn Bus,
    subject: String,
    what: &'static str,
    stop: &CancellationToken,
    apply: impl Fn(T),
) {
    let Some(mut sub) = subscribe_until_stopped(bus, subject, None, stop).await else {
        return;
    };
    loop {
        let msg = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            m = sub.next() => match m { Some(m) => m, None => break },
        };
        match serde_json::from_slice::<T>(&msg.payload) {
            Ok(v) => apply(v),
            Err(e) => tracing::warn!(error = %e, what, "malformed control message"),
        }
    }
}
