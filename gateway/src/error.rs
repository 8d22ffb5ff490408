//! Gateway errors and the one place where they become `error` frames. A fatal error
//! closes the connection as a [`CloseCause`](crate::close::CloseCause), whose close
//! code and text are chosen in `close.rs`; nothing else in the gateway picks codes.

use std::time::Duration;

use shared::auth::AuthError;
use shared::protocol::{ErrorBody, ErrorCode, FrameId};

/// Everything that can go wrong while serving one connection.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    // --- fatal: the connection closes ---
    #[error("{0}")]
    Auth(AuthError),
    #[error("token revoked")]
    Revoked,
    #[error("no auth frame within the auth deadline")]
    AuthTimeout,
    #[error("token expired")]
    TokenExpired,
    #[error("refresh token belongs to another user")]
    WrongUser,
    #[error("too many connections for this user")]
    ConnectionLimit,
    #[error("node is at its connection limit")]
    Overloaded,
    #[error("connect rate exceeded")]
    ConnectRateLimited(Duration),
    #[error("message rate exceeded repeatedly")]
    Abusive(Duration),
    #[error("message larger than {0} bytes")]
    TooLarge(usize),
    #[error("binary frames are not supported")]
    Binary,
    #[error("{0} unavailable")]
    AuthUnavailable(&'static str),
    /// Channel messages were lost in transit and history could not supply them:
    /// the connection closes so the client recovers them with `since`.
    #[error("channel delivery interrupted; resubscribe with since to recover")]
    DeliveryGap,
    /// The client did not take a history replay within the outbound budget.
    #[error("the client did not read fast enough")]
    SlowConsumer,

    // --- not fatal: an error frame, the connection stays open ---
    /// A `refresh` with a bad token: the current token stays in force until it expires.
    #[error("refresh refused: {0}")]
    RefreshRejected(AuthError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("message rate exceeded")]
    RateLimited(Duration),
    /// More `refresh` frames than the per-connection allowance.
    #[error("refresh rate exceeded")]
    RefreshRateLimited(Duration),
    #[error("{0} unavailable")]
    Unavailable(&'static str),
}

impl SessionError {
    /// The single mapping from errors to `error` frames (PROTOCOL.md section 4),
    /// answering the client frame `id`. A binary frame closes without one (the
    /// close code says it all, see `close.rs`), so its body is never sent.
    pub fn to_body(&self, id: Option<FrameId>) -> ErrorBody {
        use SessionError as E;
        let (code, message, retry): (ErrorCode, String, Option<Duration>) = match self {
            E::Auth(e) if e.is_expired() => (ErrorCode::TokenExpired, e.to_string(), None),
            E::Auth(e) => (ErrorCode::TokenInvalid, e.to_string(), None),
            E::RefreshRejected(e) if e.is_expired() => {
                (ErrorCode::TokenExpired, self.to_string(), None)
            }
            E::RefreshRejected(_) => (ErrorCode::TokenInvalid, self.to_string(), None),
            E::Revoked => (ErrorCode::TokenInvalid, "token revoked".into(), None),
            E::AuthTimeout => (ErrorCode::AuthTimeout, "no auth frame in time".into(), None),
            E::TokenExpired => (
                ErrorCode::TokenExpired,
                "token expired; refresh it and reconnect".into(),
                None,
            ),
            E::WrongUser => (ErrorCode::Forbidden, self.to_string(), None),
            E::ConnectionLimit => (ErrorCode::ConnectionLimit, self.to_string(), None),
            E::Overloaded => (ErrorCode::Overloaded, self.to_string(), None),
            E::ConnectRateLimited(d)
            | E::Abusive(d)
            | E::RateLimited(d)
            | E::RefreshRateLimited(d) => (ErrorCode::RateLimited, self.to_string(), Some(*d)),
            E::TooLarge(_) => (ErrorCode::TooLarge, self.to_string(), None),
            E::SlowConsumer => (ErrorCode::SlowConsumer, self.to_string(), None),
            E::Binary => (ErrorCode::BadRequest, self.to_string(), None),
            E::AuthUnavailable(_) | E::Unavailable(_) | E::DeliveryGap => {
                (ErrorCode::Unavailable, self.to_string(), None)
            }
            E::BadRequest(m) => (ErrorCode::BadRequest, m.clone(), None),
            E::Forbidden(m) => (ErrorCode::Forbidden, m.clone(), None),
            E::NotFound(m) => (ErrorCode::NotFound, m.clone(), None),
        };
        let mut body = ErrorBody::new(code, message).with_id(id);
        if let Some(d) = retry {
            body = body.retry_after(d.as_millis().max(1) as u64);
        }
        body
    }

    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            SessionError::BadRequest(_)
                | SessionError::Forbidden(_)
                | SessionError::NotFound(_)
                | SessionError::RateLimited(_)
                | SessionError::RefreshRateLimited(_)
                | SessionError::Unavailable(_)
                | SessionError::RefreshRejected(_)
        )
    }

    /// Label for `switchboard_connects_total{result}` when this error ends a handshake.
    pub fn connect_result(&self) -> &'static str {
        match self {
            SessionError::Auth(_) | SessionError::Revoked | SessionError::WrongUser => {
                "auth_failed"
            }
            SessionError::AuthTimeout => "auth_timeout",
            SessionError::ConnectionLimit => "over_limit",
            SessionError::Overloaded => "overloaded",
            SessionError::ConnectRateLimited(_) => "rate_limited",
            SessionError::AuthUnavailable(_) | SessionError::Unavailable(_) => "unavailable",
            _ => "error",
        }
    }
}

/// Errors of the HTTP API, answered as `{"error": {"code", "message"}}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or wrong api key")]
    Unauthorized,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0} unavailable")]
    Unavailable(&'static str),
    #[error("too many connection attempts")]
    TooManyRequests(Duration),
    #[error("too many failed api key attempts from this address")]
    TooManyKeyFailures(Duration),
    #[error("origin not allowed")]
    ForbiddenOrigin,
    #[error("node is draining")]
    Draining,
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(Duration),
}

impl ApiError {
    /// HTTP status and error code: the HTTP counterpart of [`SessionError::to_body`].
    pub fn status_and_code(&self) -> (http::StatusCode, &'static str) {
        use http::StatusCode as S;
        match self {
            ApiError::Unauthorized => (S::UNAUTHORIZED, "UNAUTHORIZED"),
            ApiError::BadRequest(_) => (S::BAD_REQUEST, "BAD_REQUEST"),
            ApiError::NotFound(_) => (S::NOT_FOUND, "NOT_FOUND"),
            ApiError::MethodNotAllowed(_) => (S::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED"),
            ApiError::Unavailable(_) => (S::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
            ApiError::TooManyRequests(_) | ApiError::TooManyKeyFailures(_) => {
                (S::TOO_MANY_REQUESTS, "RATE_LIMITED")
            }
            ApiError::ForbiddenOrigin => (S::FORBIDDEN, "FORBIDDEN"),
            ApiError::BodyTimeout(_) => (S::REQUEST_TIMEOUT, "TIMEOUT"),
            ApiError::Draining => (S::SERVICE_UNAVAILABLE, "DRAINING"),
        }
    }
}
