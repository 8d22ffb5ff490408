//! The reply frames a user receives for one request, on `sb.user.<uid>` (every
//! connection of the user, on any gateway): `chat.chunk` with `seq` 0, 1, 2.. of
//! text coalesced to about every 20 ms or 64 characters, then one `chat.complete`
//! (the whole text) or `chat.error`.
//!
//! A redelivered request streams again from `seq` 0: clients drop chunks whose
//! `request_id` + `seq` they already have, and take `chat.complete`'s content as the
//! final text (a regenerated reply may differ from the chunks of the lost attempt).

use std::time::Duration;

use shared::protocol::{ErrorCode, ServerFrame, Usage};
use tokio::time::Instant;

use crate::PUBLISH_TIMEOUT;

/// Collects streamed text into chunks: a chunk is due when it holds `max_chars`
/// characters, or `interval` after its first character arrived.
#[derive(Debug)]
pub struct Coalescer {
    buf: String,
    chars: usize,
    since: Option<Instant>,
    max_chars: usize,
    interval: Duration,
}

impl Coalescer {
    pub fn new(max_chars: usize, interval: Duration) -> Coalescer {
        Coalescer {
            buf: String::new(),
            chars: 0,
            since: None,
            max_chars: max_chars.max(1),
            interval,
        }
    }

    /// Adds text; `true` when the chunk is full and should go out now.
    pub fn push(&mut self, text: &str, now: Instant) -> bool {
        if text.is_empty() {
            return false;
        }
        self.since.get_or_insert(now);
        self.buf.push_str(text);
        self.chars += text.chars().count();
        self.chars >= self.max_chars
    }

    /// When the pending chunk is due, if there is one.
    pub fn deadline(&self) -> Option<Instant> {
        self.since.map(|t| t + self.interval)
    }

    /// The pending chunk, if any.
    pub fn take(&mut self) -> Option<String> {
        self.since = None;
        self.chars = 0;
        (!self.buf.is_empty()).then(|| std::mem::take(&mut self.buf))
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
        subject: String,
        session_id: &str,
        request_id: &str,
    ) -> Reply {
        Reply {
            nats,
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
        match tokio::time::timeout(
            PUBLISH_TIMEOUT,
            self.nats.publish(self.subject.clone(), frame.to_bytes()),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(PublishError::Nats(e.to_string())),
            Err(_) => Err(PublishError::Timeout(PUBLISH_TIMEOUT)),
        }
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
        self.publish(&ServerFrame::ChatComplete {
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
        self.publish(&ServerFrame::ChatError {
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
    fn chunks_fill_up_or_time_out() {
        let t = Instant::now();
        let mut c = Coalescer::new(5, Duration::from_millis(20));
        assert_eq!(c.deadline(), None);
        assert!(!c.push("ab", t));
        assert_eq!(c.deadline(), Some(t + Duration::from_millis(20)));
        assert!(!c.push("", t + Duration::from_millis(5)));
        assert!(c.push("cdé", t + Duration::from_millis(10)));
        assert_eq!(c.take().as_deref(), Some("abcdé"));
        assert_eq!(c.deadline(), None);
        assert_eq!(c.take(), None);
        assert!(!c.push("x", t + Duration::from_millis(30)));
        assert_eq!(c.deadline(), Some(t + Duration::from_millis(50)));
    }
}
