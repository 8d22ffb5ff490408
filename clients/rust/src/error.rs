//! What can go wrong, for the application: one enum for requests, one for tokens.

use std::time::Duration;

use protocol::ErrorBody;

/// Why a request or the client failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The server answered the request with an `error` frame.
    #[error("the server refused: {} ({})", .0.code.as_str(), .0.message)]
    Server(ErrorBody),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The connection closed after the request was sent and before its reply; whether
    /// the server acted on it is unknown (a `chat.send` with the same `session_id`
    /// may be sent again).
    #[error("the connection closed before the reply")]
    Disconnected,
    #[error("{0} requests already wait for a connection")]
    QueueFull(usize),
    /// The client stopped (closed by the application, a 45xx close, a fatal token
    /// error); it does not reconnect.
    #[error("the client has stopped: {0}")]
    Stopped(String),
    /// The server answered with a frame that does not fit the request.
    #[error("unexpected reply: {0}")]
    Unexpected(String),
}

/// A token source's failure; `retryable: false` stops the client.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct TokenError {
    pub message: String,
    pub retryable: bool,
}

impl TokenError {
    /// The client retries with backoff.
    pub fn retryable(message: impl Into<String>) -> TokenError {
        TokenError {
            message: message.into(),
            retryable: true,
        }
    }

    /// The client stops.
    pub fn fatal(message: impl Into<String>) -> TokenError {
        TokenError {
            message: message.into(),
            retryable: false,
        }
    }
}
