//! What the client tells the application, in order, on one queue.

use std::time::Duration;

use protocol::{ContextItem, ErrorBody, ErrorCode, Usage, UserInfo};
use serde_json::Value;

/// The last `authenticated`.
#[derive(Debug, Clone, PartialEq)]
pub struct Info {
    pub user: UserInfo,
    pub teams: Vec<ContextItem>,
    pub tasks: Vec<ContextItem>,
    pub degraded: bool,
    pub node: String,
    pub conn_id: String,
    /// Unix seconds.
    pub expires_at: u64,
}

/// Where the client is.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Getting a token, connecting and authenticating; `attempt` counts since the
    /// last stable connection (0 first).
    Connecting {
        attempt: u32,
    },
    Authenticated(Box<Info>),
    /// The connection ended (or an attempt failed); the next attempt starts after
    /// `retry_in`.
    Reconnecting {
        /// The server's close code; `None` when the link broke without one (1006).
        code: Option<u16>,
        retry_in: Duration,
        /// What happened, for logs (the close reason, the refusal, the I/O error).
        reason: String,
    },
    /// No more attempts: closed by the application (`None`), or the reason.
    Stopped(Option<String>),
}

/// One event for the application.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Status(Status),
    /// A channel message, in offset order and never twice per subscription
    /// (`user:<id>` messages too, which need no subscription).
    Message {
        channel: String,
        offset: u64,
        data: Value,
        from: String,
    },
    /// A subscription is live (the application's subscribe, or the client's own
    /// resume after a reconnect). With `since` and `recovered`, every message after
    /// `since` was replayed before this event; with `since` and not `recovered`,
    /// messages may have been missed: reload the channel by other means.
    Subscribed {
        channel: String,
        offset: u64,
        epoch: String,
        since: Option<u64>,
        recovered: bool,
        read_offset: Option<u64>,
    },
    /// The channel's offsets started over (its count was lost) while subscribed:
    /// messages continue from offset 1 of `epoch`; what came before may be lost.
    Restarted {
        channel: String,
        epoch: String,
    },
    /// The server ended a subscription (`FORBIDDEN`: the user left the team).
    Unsubscribed {
        channel: String,
        reason: Option<ErrorCode>,
    },
    Join {
        channel: String,
        user: String,
    },
    Leave {
        channel: String,
        user: String,
    },
    Typing {
        channel: String,
        user: String,
    },
    Read {
        channel: String,
        user: String,
        offset: u64,
    },
    /// The user's teams or tasks changed.
    Context {
        teams: Vec<ContextItem>,
        tasks: Vec<ContextItem>,
        degraded: bool,
    },
    Chat(ChatEvent),
    /// The token was replaced on the live connection.
    Refreshed {
        expires_at: u64,
    },
    /// The node is draining; the client reconnects within `retry_after_ms`.
    Draining {
        retry_after_ms: u64,
    },
    /// An `error` frame that answers no request (a failed refresh, a rate limit).
    Error(ErrorBody),
}

/// How a reply reached the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Its `chat.complete` frame.
    Live,
    /// Read from `history` after a reconnect (the frame came while away).
    AfterReconnect,
    /// Read from `history` after `chat_silence` on a live link (the frame was lost).
    AfterSilence,
}

/// Chat events of one request, deduplicated: a final event comes exactly once per
/// `request_id`, and chunks of a delivery never twice.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatEvent {
    Chunk {
        session_id: String,
        request_id: String,
        seq: u64,
        content: String,
    },
    /// The request was delivered to another worker: chunks start again at `seq` 0
    /// and the text may differ; drop what was shown of this request.
    Restarted {
        session_id: String,
        request_id: String,
    },
    /// The whole reply (authoritative over the chunks).
    Complete {
        session_id: String,
        request_id: String,
        content: String,
        usage: Option<Usage>,
        delivery: Delivery,
    },
    Error {
        session_id: String,
        request_id: String,
        code: ErrorCode,
        message: String,
        retryable: bool,
    },
    /// An acked request heard nothing for `chat_idle_timeout` and `history` does not
    /// have its reply: it failed while the client was away.
    TimedOut {
        session_id: String,
        request_id: String,
    },
}
