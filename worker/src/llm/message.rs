//! What one LLM call carries, in either dialect: the messages sent, the events
//! streamed back, and what can go wrong. Apart from the client (`mod.rs`) so the
//! dialects (`openai.rs`, `ollama.rs`) and the client share them without depending
//! on each other.

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use shared::protocol::Usage;

/// Who said a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One message of the conversation sent to the LLM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn system(content: impl Into<String>) -> Message {
        Message {
            role: Role::System,
            content: content.into(),
        }
    }
    pub fn user(content: impl Into<String>) -> Message {
        Message {
            role: Role::User,
            content: content.into(),
        }
    }
    pub fn assistant(content: impl Into<String>) -> Message {
        Message {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// Which timeout fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    FirstToken,
    Idle,
    Total,
}

impl fmt::Display for TimeoutKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TimeoutKind::FirstToken => "no first token in time",
            TimeoutKind::Idle => "stream went silent",
            TimeoutKind::Total => "reply took too long",
        })
    }
}

/// Everything that can go wrong with one LLM call.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("cannot reach the LLM: {0}")]
    Connect(String),
    #[error("LLM answered HTTP {code}: {message}")]
    Status {
        code: u16,
        message: String,
        retry_after: Option<Duration>,
        /// `x-should-retry`, when the server said.
        should_retry: Option<bool>,
    },
    #[error("LLM timeout: {0}")]
    Timeout(TimeoutKind),
    #[error("LLM stream malformed: {0}")]
    Protocol(String),
    #[error("LLM reported an error: {0}")]
    Upstream(String),
    #[error("LLM stream interrupted: {0}")]
    Interrupted(String),
    #[error("cancelled")]
    Cancelled,
}

impl LlmError {
    /// Metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            LlmError::Connect(_) => "connect",
            LlmError::Status { .. } => "status",
            LlmError::Timeout(TimeoutKind::FirstToken) => "timeout_first_token",
            LlmError::Timeout(TimeoutKind::Idle) => "timeout_idle",
            LlmError::Timeout(TimeoutKind::Total) => "timeout_total",
            LlmError::Protocol(_) => "protocol",
            LlmError::Upstream(_) => "upstream",
            LlmError::Interrupted(_) => "interrupted",
            LlmError::Cancelled => "cancelled",
        }
    }

    /// Worth another attempt, if no text was produced yet.
    pub fn retryable(&self) -> bool {
        match self {
            LlmError::Connect(_) | LlmError::Interrupted(_) | LlmError::Upstream(_) => true,
            LlmError::Status {
                code,
                message,
                should_retry,
                ..
            } => should_retry.unwrap_or_else(|| {
                super::retry::retryable_status(*code) && !message.contains("insufficient_quota")
            }),
            LlmError::Timeout(_) | LlmError::Protocol(_) | LlmError::Cancelled => false,
        }
    }

    /// The server's own retry hint.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            LlmError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Metrics label for a retry caused by this error.
    pub(super) fn retry_reason(&self) -> &'static str {
        match self {
            LlmError::Status { code: 429, .. } => "429",
            LlmError::Status { .. } => "status",
            other => other.kind(),
        }
    }
}

/// What a stream tells, decoded from either dialect.
#[derive(Debug, Clone, PartialEq)]
pub enum LlmEvent {
    /// Generated text (never empty).
    Content(String),
    Usage(Usage),
    /// The model stopped (`stop`, `length`, ...): the reply is whole.
    Finish(String),
    /// End of the stream (`[DONE]`, `done: true`).
    Done,
}
