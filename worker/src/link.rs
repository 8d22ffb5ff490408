//! The worker's bus link as replies see it: a reply that ended across a connection
//! loss (the bus counts them, [`shared::bus::Bus::connection_losses`]) has its last
//! frame sent again once the link is back. Core
//! NATS delivers only to subscriptions that exist when a message reaches the server;
//! after a NATS restart this worker flushes what it buffered at once, while each
//! gateway re-subscribes its users up to a reconnect backoff later. The first copy of
//! `chat.complete` can reach no gateway; the echo does. Since finals are also stored
//! in the `SB_CHAT_EVENTS` stream (see `reply`), which every gateway follows, the echo
//! is a second safety net; gateways deliver one final per request and drop the rest.
//!
//! Only the bus knows its connection: on NATS the client's events feed the count
//! (`shared::bus::nats::Losses`); a bus that cannot count still reports whether it is
//! connected now, so a final published during an outage is still echoed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use shared::bus::SharedBus;
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

/// Shared by every reply.
#[derive(Clone)]
pub struct Link {
    inner: Arc<Inner>,
}

struct Inner {
    bus: SharedBus,
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
    pub fn new(bus: SharedBus) -> Link {
        Link {
            inner: Arc::new(Inner {
                bus,
                pending: AtomicUsize::new(0),
                stop: CancellationToken::new(),
            }),
        }
    }

    /// Connection losses so far: a reply compares the count at its start and end.
    pub fn losses(&self) -> u64 {
        self.inner.bus.connection_losses()
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
    pub fn needs_echo(&self, losses_at_start: u64) -> bool {
        self.losses() != losses_at_start || !self.inner.bus.connected()
    }

    /// Publishes `frame` (with its `headers`, which let gateways drop it when they
    /// already delivered the final) again [`ECHO_DELAY`] after the link is (back) up.
    pub fn echo(&self, subject: String, headers: Vec<(String, String)>, frame: Bytes) {
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
            while !inner.bus.connected() {
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
                inner.bus.publish(subject, headers, frame),
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
    use shared::bus::memory::MemoryBus;
    use shared::subjects::Subjects;

    #[test]
    fn a_loss_or_an_outage_needs_an_echo() {
        let bus = Arc::new(MemoryBus::new(Subjects::new("sb")));
        let link = Link::new(bus.clone());
        let at_start = link.losses();
        assert!(!link.needs_echo(at_start));
        bus.set_connected(false);
        assert!(link.needs_echo(at_start), "down now");
        bus.set_connected(true);
        assert!(link.needs_echo(at_start), "lost since the start");
        assert!(!link.needs_echo(link.losses()));
    }
}
