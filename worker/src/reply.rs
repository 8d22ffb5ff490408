//! The reply frames a user receives for one request, on `sb.user.<uid>` (every
//! connection of the user, on any gateway): `chat.chunk` with `seq` 0, 1, 2.. of
//! text coalesced to at most one chunk per 20 ms unless 64 characters wait (the
//! first text is sent at once), then one `chat.complete` (the whole text) or
//! `chat.error`.
//!
//! A redelivered request streams again from `seq` 0: clients drop chunks whose
//! `request_id` + `seq` they already have, and take `chat.complete`'s content as the
//! final text (a regenerated reply may differ from the chunks of the lost attempt).
//! The last frame is sent again when the NATS link dropped during the reply (see
//! `link`).

use std::time::Duration;

use shared::protocol::{ErrorCode, ServerFrame, Usage};
use tokio::time::Instant;

use crate::PUBLISH_TIMEOUT;
use crate::link::Link;

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
    #[error("NATS publish: {0}")]
    Nats(String),
    #[error("NATS publish did not complete within {0:?}")]
    Timeout(Duration),
}

/// Publishes one request's frames to its user.
pub struct Reply {
    nats: async_nats::Client,
    link: Link,
    /// The link's loss count when the reply started.
    losses_at_start: u64,
    subject: String,
    session_id: String,
    request_id: String,
    next_seq: u64,
    /// Characters of text published in chunks so far.
    pub sent_chars: usize,
}

impl Reply {
    pub fn new(
        nats: async_nats::Client,
        link: Link,
        subject: String,
        session_id: &str,
        request_id: &str,
    ) -> Reply {
        Reply {
            nats,
            losses_at_start: link.losses(),
            link,
            subject,
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

    async fn publish(&self, frame: &ServerFrame) -> Result<(), PublishError> {
        self.publish_bytes(frame.to_bytes()).await
    }

    async fn publish_bytes(&self, frame: bytes::Bytes) -> Result<(), PublishError> {
        match tokio::time::timeout(
            PUBLISH_TIMEOUT,
            self.nats.publish(self.subject.clone(), frame),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(PublishError::Nats(e.to_string())),
            Err(_) => Err(PublishError::Timeout(PUBLISH_TIMEOUT)),
        }
    }

    /// `chat.complete` or `chat.error`, echoed later when the link dropped meanwhile.
    async fn publish_last(&self, frame: &ServerFrame) -> Result<(), PublishError> {
        let bytes = frame.to_bytes();
        self.publish_bytes(bytes.clone()).await?;
        if self.link.needs_echo(&self.nats, self.losses_at_start) {
            self.link
                .echo(self.nats.clone(), self.subject.clone(), bytes);
        }
        Ok(())
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
        if let Err(e) = self.publish(&frame).await {
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
