//! The worker's NATS link as replies see it: it counts connection losses, and a reply
//! that ended across one has its last frame sent again once the link is back. Core
//! NATS delivers only to subscriptions that exist when a message reaches the server;
//! after a NATS restart this worker flushes what it buffered at once, while each
//! gateway re-subscribes its users up to a reconnect backoff later. The first copy of
//! `chat.complete` can reach no gateway; the echo does. Since finals are also stored
//! in the `SB_CHAT_EVENTS` stream (see `reply`), which every gateway follows, the echo
//! is a second safety net; gateways deliver one final per request and drop the rest.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Wait after the link is back before the echo: a gateway's subscription connection
/// retries at most 2 s apart (`gateway::mux`), plus its handshake and re-subscribe.
pub const ECHO_DELAY: Duration = Duration::from_secs(3);
/// An echo waits at most this long for the link to come back; later, the client's
/// own rule (read `history` after a silence) is what remains.
pub const ECHO_MAX_WAIT: Duration = Duration::from_secs(120);
/// How often a pending echo looks at the connection state.
const STATE_POLL: Duration = Duration::from_millis(100);
/// Echoes pending at most (one per reply that ended during an outage); beyond this
/// they are dropped and history still has the reply.
pub const MAX_ECHOES: usize = 4096;
/// An echo's publish must not hang its task.
const ECHO_PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Shared by the connection's event callback and every reply.
#[derive(Clone, Default)]
pub struct Link {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    losses: AtomicU64,
    pending: AtomicUsize,
    stop: CancellationToken,
}

/// Decrements the pending count however the echo task ends.
struct Pending(Arc<Inner>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Link {
    /// For `ConnectOptions::event_callback`.
    pub fn on_event(&self, event: &async_nats::Event) {
        if matches!(event, async_nats::Event::Disconnected) {
            self.inner.losses.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Connection losses so far: a reply compares the count at its start and end.
    pub fn losses(&self) -> u64 {
        self.inner.losses.load(Ordering::Acquire)
    }

    /// Echoes pending now.
    pub fn pending(&self) -> usize {
        self.inner.pending.load(Ordering::Acquire)
    }

    /// Drops pending echoes (shutdown).
    pub fn stop(&self) {
        self.inner.stop.cancel();
    }

    /// Whether a reply that started at `losses_at_start` may have lost its live
    /// frames: the link dropped since, or is down now (the frame only buffered).
    pub fn needs_echo(&self, nats: &async_nats::Client, losses_at_start: u64) -> bool {
        self.losses() != losses_at_start || nats.connection_state() != State::Connected
    }

    /// Publishes `frame` (with its `headers`, which let gateways drop it when they
    /// already delivered the final) again [`ECHO_DELAY`] after the link is (back) up.
    pub fn echo(
        &self,
        nats: async_nats::Client,
        subject: String,
        headers: async_nats::HeaderMap,
        frame: Bytes,
    ) {
        let inner = self.inner.clone();
        if inner.pending.fetch_add(1, Ordering::AcqRel) >= MAX_ECHOES {
            inner.pending.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!(shared::metrics::WORKER_ECHOES, "result" => "dropped").increment(1);
            return;
        }
        let guard = Pending(inner.clone());
        tokio::spawn(async move {
            let _guard = guard;
            let deadline = Instant::now() + ECHO_MAX_WAIT;
            while nats.connection_state() != State::Connected {
                if Instant::now() >= deadline {
                    metrics::counter!(shared::metrics::WORKER_ECHOES, "result" => "expired")
                        .increment(1);
                    return;
                }
                tokio::select! {
                    _ = inner.stop.cancelled() => return,
                    _ = tokio::time::sleep(STATE_POLL) => {}
                }
            }
            tokio::select! {
                _ = inner.stop.cancelled() => return,
                _ = tokio::time::sleep(ECHO_DELAY) => {}
            }
            let sent = tokio::time::timeout(
                ECHO_PUBLISH_TIMEOUT,
                nats.publish_with_headers(subject, headers, frame),
            )
            .await;
            let result = if matches!(sent, Ok(Ok(()))) {
                "sent"
            } else {
                "failed"
            };
            metrics::counter!(shared::metrics::WORKER_ECHOES, "result" => result).increment(1);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_disconnections() {
        let link = Link::default();
        link.on_event(&async_nats::Event::Connected);
        assert_eq!(link.losses(), 0);
        link.on_event(&async_nats::Event::Disconnected);
        link.on_event(&async_nats::Event::Connected);
        assert_eq!(link.losses(), 1);
    }
}
