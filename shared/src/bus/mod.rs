//! The message bus seam: what gateways and workers need of NATS (publish, subscribe,
//! request, the two JetStream streams, and the workers' share of the chat work
//! queue: [`Bus::consume`], [`Bus::backlog`]), as one trait with the real
//! implementation on NATS ([`nats::NatsBus`]) and one in memory ([`memory::MemoryBus`], for
//! in-process tests of several nodes). The stream layout itself is in [`stream`].

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::BoxStream;

pub mod memory;
pub mod nats;
pub mod stream;

/// One message as a subscriber sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message {
    pub subject: String,
    /// Where a request wants its answer.
    pub reply: Option<String>,
    /// Header names and values, in order; a name may repeat.
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
}

impl Message {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A subscription's messages until it is dropped (dropping unsubscribes).
pub type Subscription = BoxStream<'static, Message>;

/// A stored message of a stream, with its sequence number there.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub seq: u64,
    pub message: Message,
}

/// A stream read from a point on: the sequence of its last message when the read
/// started, then every later message in order. An `Err` item ends the read (the
/// caller starts another after the last sequence it saw).
pub struct Follow {
    pub last: u64,
    pub messages: BoxStream<'static, Result<Stored, BusError>>,
}

/// The JetStream streams the product uses (layout in [`stream`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Log {
    /// `SB_CHAT`: the chat request work queue.
    ChatRequests,
    /// `SB_CHAT_EVENTS`: each request's final frame.
    ChatEvents,
}

/// The workers' durable consumer of the chat work queue, as [`Bus::consume`]
/// creates or updates it. Every worker passes the same settings; the last one wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerSettings {
    /// A delivery neither acked nor marked in progress within this is delivered again
    /// (to any consumer).
    pub ack_wait: Duration,
    /// Deliveries of one request at most (`<= 0`: unlimited); a request delivered
    /// this often and not acked is not delivered again.
    pub max_deliver: i64,
    /// Delivered-but-unacked requests across every consumer at most (`<= 0`:
    /// unlimited): beyond it pulls wait.
    pub max_ack_pending: i64,
}

/// What a consumer tells the work queue about one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// Done: the request leaves the queue.
    Ack,
    /// Deliver it again, after the delay if any.
    Nak(Option<Duration>),
    /// Still working on it: the ack wait starts again.
    Progress,
    /// Never deliver it again: the request leaves the queue.
    Term,
}

/// Sends a delivery's acknowledgements (one implementation per bus).
#[async_trait]
pub trait Acker: Send + Sync {
    /// Fire and forget as on NATS: `Ok` means queued, not that the queue applied it.
    async fn send(&self, kind: AckKind) -> Result<(), BusError>;
}

/// One delivery of a queued request.
pub struct Delivery {
    pub message: Message,
    /// 1 on the first delivery, 2 on the first redelivery, ...
    pub delivered: u64,
    /// The request's sequence in the queue's stream: the same on every delivery.
    pub seq: u64,
    acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("delivered", &self.delivered)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    pub fn new(message: Message, delivered: u64, seq: u64, acker: Box<dyn Acker>) -> Delivery {
        Delivery {
            message,
            delivered,
            seq,
            acker,
        }
    }

    pub async fn ack_with(&self, kind: AckKind) -> Result<(), BusError> {
        self.acker.send(kind).await
    }

    pub async fn ack(&self) -> Result<(), BusError> {
        self.ack_with(AckKind::Ack).await
    }

    /// Gives the request back, to be delivered again after `delay` (at once: `None`).
    pub async fn nak(&self, delay: Option<Duration>) -> Result<(), BusError> {
        self.ack_with(AckKind::Nak(delay)).await
    }

    /// Restarts the ack wait while a long request is still being worked on.
    pub async fn in_progress(&self) -> Result<(), BusError> {
        self.ack_with(AckKind::Progress).await
    }

    pub async fn term(&self) -> Result<(), BusError> {
        self.ack_with(AckKind::Term).await
    }
}

/// The deliveries of one pull, as they arrive. An `Err` item ends the pull (the
/// consumer may be gone: create it again).
pub type Deliveries = BoxStream<'static, Result<Delivery, BusError>>;

/// A handle on the workers' durable consumer (from [`Bus::consume`]).
#[async_trait]
pub trait Consumer: Send + Sync {
    /// Asks for at most `max` requests: the stream yields them as they are delivered
    /// and ends after `max` of them or once `expires` has passed, whichever is first.
    async fn pull(&self, max: usize, expires: Duration) -> Result<Deliveries, BusError>;
}

/// The chat work queue's backlog as the shared consumer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Backlog {
    /// Requests not delivered yet.
    pub pending: u64,
    /// Requests delivered and not yet acked (or terminated, or given up).
    pub ack_pending: u64,
}

/// Errors of the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("NATS: {0}")]
    Nats(String),
    #[error("JetStream: {0}")]
    JetStream(String),
    #[error("NATS did not answer within {0:?}")]
    Timeout(Duration),
    /// A request to a subject nobody serves.
    #[error("no responders")]
    NoResponders,
}

/// What the services need of the message bus. Every call is bounded: it fails rather
/// than waits for an outage to end.
#[async_trait]
pub trait Bus: Send + Sync + std::fmt::Debug {
    /// Whether the bus is reachable now (readiness).
    fn connected(&self) -> bool;
    /// Fire and forget: queued for the server, no acknowledgement.
    async fn publish(
        &self,
        subject: String,
        headers: Vec<(String, String)>,
        payload: Bytes,
    ) -> Result<(), BusError>;
    /// Messages on `subject` (wildcards `*` and `>` allowed); with `queue`, each
    /// message goes to one member of the group.
    async fn subscribe(
        &self,
        subject: String,
        queue: Option<String>,
    ) -> Result<Subscription, BusError>;
    /// Sends a request and waits at most `timeout` for the first answer.
    async fn request(
        &self,
        subject: String,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, BusError>;
    /// Returns once the server has processed everything this client sent before,
    /// subscriptions included, or fails after `timeout`.
    async fn flush(&self, timeout: Duration) -> Result<(), BusError>;
    /// Stores a message in `log` and waits, at most `timeout`, until it is stored
    /// (replicated); a second store with the same `id` within the duplicate window
    /// is acknowledged without storing it again. Core subscribers of the subject get
    /// it too.
    async fn store(
        &self,
        log: Log,
        subject: String,
        id: &str,
        headers: Vec<(String, String)>,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<(), BusError>;
    /// Makes sure `log` exists, so that the first store does not pay for creating
    /// it. Stores create it too; this only moves the cost to start-up.
    async fn prepare(&self, _log: Log) -> Result<(), BusError> {
        Ok(())
    }
    /// Reads `log` after sequence `after` (from its current end when `None`). For
    /// [`Log::ChatEvents`]: the work queue is read by the workers' durable consumer
    /// only (core subscribers of its subject see each request as it is stored).
    async fn follow(&self, log: Log, after: Option<u64>) -> Result<Follow, BusError>;
    /// Creates or updates the workers' durable consumer of [`Log::ChatRequests`]
    /// (creating the log if needed) and returns a handle to pull from it. Each
    /// request goes to one consumer at a time: redelivered after `ack_wait` without
    /// an ack or progress, after a nak (and its delay), up to `max_deliver` times; an
    /// ack or term removes it.
    async fn consume(&self, settings: ConsumerSettings) -> Result<Box<dyn Consumer>, BusError>;
    /// The chat work queue's backlog; fails while the consumer does not exist.
    async fn backlog(&self) -> Result<Backlog, BusError>;
    /// Connection losses so far (a reply compares the count at its start and end to
    /// learn whether its live frames may have been lost). `0` for a bus that cannot
    /// tell; [`Bus::connected`] is then all a caller knows.
    fn connection_losses(&self) -> u64 {
        0
    }
}

/// The bus as the services hold it.
pub type SharedBus = std::sync::Arc<dyn Bus>;

/// Whether `subject` matches the subscription `pattern` (`*` one token, `>` the
/// rest), as NATS matches them.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_match_like_nats() {
        assert!(subject_matches("sb.user.u1", "sb.user.u1"));
        assert!(subject_matches("sb.user.*", "sb.user.u1"));
        assert!(!subject_matches("sb.user.*", "sb.user.u1.x"));
        assert!(subject_matches("sb.chat.events.>", "sb.chat.events.u1"));
        assert!(!subject_matches("sb.chat.events.>", "sb.chat.events"));
        assert!(!subject_matches("sb.user.u1", "sb.user.u2"));
        assert!(!subject_matches("sb.user", "sb.user.u1"));
    }
}
