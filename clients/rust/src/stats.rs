//! What the client dropped: the server's repeats, counted for applications that
//! watch delivery quality (and for the fault suite, which asserts they are zero).

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) duplicate_messages: AtomicU64,
    pub(crate) repeated_chunks: AtomicU64,
    pub(crate) duplicate_finals: AtomicU64,
}

/// Frames the client received and did not pass on, since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Channel messages at or below the offset already delivered.
    pub duplicate_messages: u64,
    /// Chunks repeated within one delivery of a request, or after its final frame.
    pub repeated_chunks: u64,
    /// A second `chat.complete`/`chat.error` of one request.
    pub duplicate_finals: u64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            duplicate_messages: self.duplicate_messages.load(Relaxed),
            repeated_chunks: self.repeated_chunks.load(Relaxed),
            duplicate_finals: self.duplicate_finals.load(Relaxed),
        }
    }
}
