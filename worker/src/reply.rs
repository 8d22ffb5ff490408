//! The reply frames a user receives for one request, on `sb.user.<uid>` (every
//! connection of the user, on any gateway): `chat.chunk` with `seq` 0, 1, 2.. of
//! text coalesced to at most one chunk per 20 ms unless 64 characters wait (the
//! first text is sent at once), then one `chat.complete` (the whole text) or
//! `chat.error`.
//!
//! A redelivered request streams again from `seq` 0: clients drop chunks whose
//! `request_id` + `seq` they already have, and take `chat.complete`'s content as the
//! final text (a regenerated reply may differ from the chunks of the lost attempt).
//! The final frame (`chat.complete` or `chat.error`) also goes to JetStream
//! (`SB_CHAT_EVENTS`, `sb.chat.events.<uid>`), and the request is acked only after
//! JetStream stored it: core NATS loses frames published while a gateway is not
//! subscribed (a NATS node dying, a restart), the stream does not, and every gateway
//! reads it. Every frame carries the request id in a header (`Sb-Request`, the final
//! one also `Sb-Final`), so gateways deliver one final per request and drop late
//! chunks of a finished one. The last frame is also sent again on core NATS when the
//! link dropped during the reply (see `link`); gateways drop that copy when the
//! stream's came first.

use std::time::Duration;

use shared::bus::stream::{HEADER_FINAL, HEADER_REQUEST};
use shared::bus::{BusError, Log, SharedBus};
use shared::protocol::{ErrorCode, ServerFrame, Usage};
use tokio::time::Instant;

use crate::link::Link;
use crate::state::{PUBLISH_TIMEOUT, Worker};

/// JetStream must confirm a stored final frame within this time, else the request is
/// nak'd and a later delivery publishes the final again (from history).
pub const FINAL_STORE_TIMEOUT: Duration = shared::bus::stream::JETSTREAM_TIMEOUT;

/// Collects streamed text into chunks, at most one chunk per `interval` unless
/// `max_chars` characters are waiting. Leading edge: text arriving after a quiet
/// `interval` (the first token above all) goes out at once, so coalescing never adds
/// latency to a slow stream; a fast stream is sent every `interval` or `max_chars`.
#[derive(Debug)]
pub struct Coalescer {
    buf: String,
    chars: usize,
    last_sent: Option<Instant>,
    max_chars: usize,
    interval: Duration,
}

impl Coalescer {
    pub fn new(max_chars: usize, interval: Duration) -> Coalescer {
        Coalescer {
            buf: String::new(),
            chars: 0,
            last_sent: None,
            max_chars: max_chars.max(1),
            interval,
        }
    }

    /// Adds text; `true` when a chunk should go out now.
    pub fn push(&mut self, text: &str, now: Instant) -> bool {
        if text.is_empty() {
            return false;
        }
        self.buf.push_str(text);
        self.chars += text.chars().count();
        self.chars >= self.max_chars || self.last_sent.is_none_or(|t| now >= t + self.interval)
    }

    /// When the waiting text is due, if any is waiting.
    pub fn deadline(&self) -> Option<Instant> {
        if self.buf.is_empty() {
            return None;
        }
        Some(match self.last_sent {
            Some(t) => t + self.interval,
            // Nothing sent yet: due at once.
            None => Instant::now(),
        })
    }

    /// The chunk to send now, if any text is waiting.
    pub fn take(&mut self, now: Instant) -> Option<String> {
        if self.buf.is_empty() {
            return None;
        }
        self.last_sent = Some(now);
        self.chars = 0;
        Some(std::mem::take(&mut self.buf))
    }
}

/// Why a frame could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("bus publish: {0}")]
    Bus(String),
    #[error("publish did not complete within {0:?}")]
    Timeout(Duration),
    #[error("JetStream did not store the final frame: {0}")]
    Store(String),
}

/// Publishes one request's frames to its user.
pub struct Reply {
    bus: SharedBus,
    link: Link,
    /// The link's loss count when the reply started.
    losses_at_start: u64,
    subject: String,
    /// `sb.chat.events.<uid>`: where the final frame is stored.
    events_subject: String,
    session_id: String,
    request_id: String,
    next_seq: u64,
    /// Characters of text published in chunks so far.
    pub sent_chars: usize,
}

impl Reply {
    pub fn new(worker: &Worker, user_id: &str, session_id: &str, request_id: &str) -> Reply {
        Reply {
            bus: worker.bus.clone(),
            losses_at_start: worker.link.losses(),
            link: worker.link.clone(),
            subject: worker.subjects.user(user_id),
            events_subject: worker.subjects.chat_events(user_id),
            session_id: session_id.to_owned(),
            request_id: request_id.to_owned(),
            next_seq: 0,
            sent_chars: 0,
        }
    }

    /// Chunks published so far.
    pub fn chunks(&self) -> u64 {
        self.next_seq
    }

    fn headers(&self, last: bool) -> Vec<(String, String)> {
        let mut h = vec![(HEADER_REQUEST.to_owned(), self.request_id.clone())];
        if last {
            h.push((HEADER_FINAL.to_owned(), "1".to_owned()));
        }
        h
    }

    async fn publish(&self, frame: bytes::Bytes, last: bool) -> Result<(), PublishError> {
        match tokio::time::timeout(
            PUBLISH_TIMEOUT,
            self.bus
                .publish(self.subject.clone(), self.headers(last), frame),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(PublishError::Bus(e.to_string())),
            Err(_) => Err(PublishError::Timeout(PUBLISH_TIMEOUT)),
        }
    }

    /// `chat.complete` or `chat.error`: live on core NATS (echoed later when the link
    /// dropped meanwhile), and stored in JetStream for gateways that missed it.
    async fn publish_last(&self, frame: &ServerFrame) -> Result<(), PublishError> {
        let bytes = frame.to_bytes();
        // The live copy may be lost in an outage; the stored one is what counts.
        if let Err(e) = self.publish(bytes.clone(), true).await {
            metrics::counter!(shared::metrics::NATS_ERRORS, "op" => "final").increment(1);
            tracing::debug!(error = %e, "final frame not published live");
        }
        if self.link.needs_echo(self.losses_at_start) {
            self.link
                .echo(self.subject.clone(), self.headers(true), bytes.clone());
        }
        self.store_final(bytes).await
    }

    /// Stores the final frame in `SB_CHAT_EVENTS` (de-duplicated by request id) and
    /// waits for JetStream's ack. A missing stream (JetStream lost its store) is
    /// created again once.
    async fn store_final(&self, frame: bytes::Bytes) -> Result<(), PublishError> {
        let mut result = self.try_store_final(frame.clone()).await;
        if result.is_err() && self.bus.prepare(Log::ChatEvents).await.is_ok() {
            result = self.try_store_final(frame).await;
        }
        if let Err(e) = &result {
            metrics::counter!(shared::metrics::NATS_ERRORS, "op" => "final_store").increment(1);
            tracing::warn!(error = %e, request_id = %self.request_id, "final frame not stored");
        }
        result
    }

    async fn try_store_final(&self, frame: bytes::Bytes) -> Result<(), PublishError> {
        self.bus
            .store(
                Log::ChatEvents,
                self.events_subject.clone(),
                &self.request_id,
                self.headers(true),
                frame,
                FINAL_STORE_TIMEOUT,
            )
            .await
            .map_err(|e| match e {
                BusError::Timeout(d) => PublishError::Timeout(d),
                e => PublishError::Store(e.to_string()),
            })
    }

    /// A `chat.chunk`. A lost chunk is not fatal (`chat.complete` carries the whole
    /// text), so failures are counted and logged, not returned.
    pub async fn chunk(&mut self, content: String) {
        let chars = content.chars().count();
        let frame = ServerFrame::ChatChunk {
            session_id: self.session_id.clone(),
            request_id: self.request_id.clone(),
            seq: self.next_seq,
            content,
        };
        self.next_seq += 1;
        self.sent_chars += chars;
        metrics::counter!(shared::metrics::WORKER_CHUNKS).increment(1);
        if let Err(e) = self.publish(frame.to_bytes(), false).await {
            metrics::counter!(shared::metrics::NATS_ERRORS, "op" => "chunk").increment(1);
            tracing::debug!(error = %e, "chunk not published");
        }
    }

    pub async fn complete(
        &self,
        content: String,
        usage: Option<Usage>,
    ) -> Result<(), PublishError> {
        self.publish_last(&ServerFrame::ChatComplete {
            session_id: self.session_id.clone(),
            request_id: self.request_id.clone(),
            content,
            usage,
        })
        .await
    }

    pub async fn error(
        &self,
        code: ErrorCode,
        message: String,
        retryable: bool,
    ) -> Result<(), PublishError> {
        self.publish_last(&ServerFrame::ChatError {
            session_id: self.session_id.clone(),
            request_id: self.request_id.clone(),
            code,
            message,
            retryable,
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_fill_up_or_wait_for_the_interval() {
        let ms = Duration::from_millis;
        let t = Instant::now();
        let mut c = Coalescer::new(5, ms(20));
        assert_eq!(c.deadline(), None);
        // The first text is due at once.
        assert!(c.push("a", t));
        assert_eq!(c.take(t).as_deref(), Some("a"));
        // More within the interval waits for it...
        assert!(!c.push("bc", t + ms(5)));
        assert!(!c.push("", t + ms(6)));
        assert_eq!(c.deadline(), Some(t + ms(20)));
        // ...unless the chunk fills up.
        assert!(c.push("déf", t + ms(10)));
        assert_eq!(c.take(t + ms(10)).as_deref(), Some("bcdéf"));
        assert_eq!(c.deadline(), None);
        assert_eq!(c.take(t + ms(11)), None);
        // After a quiet interval, text goes out at once again.
        assert!(c.push("x", t + ms(40)));
    }
}
