//! The one place where failures become what the user reads in `chat.error`: a code,
//! a message that names no internals (no URLs, no keys), and whether retrying the
//! same request can succeed.

use shared::protocol::ErrorCode;

use crate::attachments::AttachmentError;
use crate::llm::{LlmError, TimeoutKind};

/// A `chat.error` for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserError {
    pub code: ErrorCode,
    pub message: String,
    pub retryable: bool,
}

impl UserError {
    fn new(code: ErrorCode, message: impl Into<String>, retryable: bool) -> UserError {
        UserError {
            code,
            message: message.into(),
            retryable,
        }
    }

    /// An LLM failure. `mid_stream`: text had already reached the user, so the
    /// request is not retried here (the user decides).
    pub fn from_llm(e: &LlmError, mid_stream: bool) -> UserError {
        use ErrorCode::{BadRequest, Internal, Unavailable};
        if mid_stream {
            let why = match e {
                LlmError::Timeout(TimeoutKind::Idle) => "the assistant stopped responding",
                LlmError::Timeout(TimeoutKind::Total) => "the reply took too long",
                _ => "the reply was interrupted",
            };
            return UserError::new(Unavailable, format!("{why}; try again"), true);
        }
        match e {
            LlmError::Status {
                code: 400, message, ..
            } => UserError::new(
                BadRequest,
                format!("the assistant refused the request: {message}"),
                false,
            ),
            LlmError::Status { code: 413, .. } => UserError::new(
                BadRequest,
                "the conversation is too long for the assistant",
                false,
            ),
            LlmError::Status { code: 429, .. } => {
                UserError::new(Unavailable, "the assistant is busy; try again later", true)
            }
            LlmError::Status { code, .. } if (400..500).contains(code) => {
                UserError::new(Internal, "the assistant is not configured correctly", false)
            }
            LlmError::Timeout(TimeoutKind::FirstToken) => {
                UserError::new(Unavailable, "the assistant did not answer in time", true)
            }
            LlmError::Timeout(_) => UserError::new(Unavailable, "the reply took too long", true),
            LlmError::Protocol(_) => UserError::new(
                Internal,
                "the assistant sent a reply that could not be read",
                true,
            ),
            LlmError::Upstream(_) => {
                UserError::new(Unavailable, "the assistant failed to answer", true)
            }
            LlmError::Status { .. } | LlmError::Connect(_) | LlmError::Interrupted(_) => {
                UserError::new(Unavailable, "the assistant is unavailable; try again", true)
            }
            LlmError::Cancelled => UserError::new(Unavailable, "cancelled", false),
        }
    }

    /// Attachments that cannot be used: names the file.
    pub fn from_attachment(e: &AttachmentError) -> UserError {
        if e.is_retryable() {
            return UserError::new(ErrorCode::Unavailable, e.to_string(), true);
        }
        UserError::new(ErrorCode::BadRequest, e.to_string(), false)
    }

    /// The request failed on every delivery.
    pub fn exhausted(deliveries: i64) -> UserError {
        UserError::new(
            ErrorCode::Internal,
            format!("the request failed {deliveries} times; giving up"),
            false,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mid_stream_failures_are_retryable_by_the_user() {
        let e = UserError::from_llm(&LlmError::Interrupted("eof".into()), true);
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert!(e.retryable);
        let e = UserError::from_llm(&LlmError::Timeout(TimeoutKind::Idle), true);
        assert!(e.message.contains("stopped responding"));
    }

    #[test]
    fn statuses_map_to_codes() {
        let status = |code| LlmError::Status {
            code,
            message: "m".into(),
            retry_after: None,
            should_retry: None,
        };
        assert_eq!(
            UserError::from_llm(&status(400), false).code,
            ErrorCode::BadRequest
        );
        assert!(!UserError::from_llm(&status(401), false).retryable);
        assert!(UserError::from_llm(&status(429), false).retryable);
        assert!(UserError::from_llm(&status(503), false).retryable);
        let e = UserError::from_llm(&LlmError::Connect("http://secret-host".into()), false);
        assert!(!e.message.contains("secret-host"));
    }
}
