//! How a connection ends. Every close the server starts is a [`CloseCause`], and
//! [`CloseCause::signal`] is the one place that turns a cause into what the client
//! sees: the close code, the close text and the frame sent before the close
//! (PROTOCOL.md section 4).

use shared::protocol::{CloseCode, ErrorBody, ErrorCode, FrameId, ServerFrame};

use crate::error::SessionError;

/// Close text of a cause that states nothing more specific.
const GENERIC_TEXT: &str = "closing";
/// Error message of a kick that names no reason.
const KICK_MESSAGE: &str = "disconnected by the server";
/// Close code of a kick that names none: "do not reconnect; sign in again"
/// (PROTOCOL.md "Kicks"), the safe reading of an operator removing a session.
pub const DEFAULT_KICK_CODE: CloseCode = CloseCode::Forbidden;

/// Why the server ends a connection.
#[derive(Debug)]
pub enum CloseCause {
    /// A fatal error ([`SessionError::is_fatal`]): its `error` frame, answering the
    /// client frame `id` that caused it, then the close its error code calls for.
    Error {
        error: SessionError,
        id: Option<FrameId>,
    },
    /// Nothing heard from the peer for the idle timeout.
    IdleTimeout,
    /// The peer broke the WebSocket protocol.
    ProtocolViolation,
    /// A text message that is not UTF-8.
    InvalidUtf8,
    /// The node drains: `reconnect` first, so the client comes back at once.
    Draining { retry_after_ms: u64 },
    /// An operator's kick (`sb.ctl.disconnect`) with the code it asked for; only the
    /// default 4503 carries an error frame, with `reason` as its message.
    Kicked { code: u16, reason: Option<String> },
    /// The close signal fired without a cause. A cause is always set before the
    /// signal, but the loop must close with something.
    Unexplained,
}

impl From<SessionError> for CloseCause {
    /// A fatal error that answers no client frame.
    fn from(error: SessionError) -> CloseCause {
        CloseCause::Error { error, id: None }
    }
}

/// What goes on the wire for a [`CloseCause`]: `frame` (if any), then the close
/// frame with `code` and `text`.
#[derive(Debug, Clone)]
pub struct CloseSignal {
    pub code: CloseCode,
    pub frame: Option<ServerFrame>,
    /// Close frame reason text (short, for humans reading captures).
    pub text: &'static str,
}

impl CloseCause {
    /// The single mapping from causes to close codes, close texts and the frame
    /// before the close.
    pub fn signal(&self) -> CloseSignal {
        let (code, frame, text) = match self {
            CloseCause::Error {
                error: SessionError::Binary,
                ..
            } => (CloseCode::Unsupported, None, "binary frames not supported"),
            CloseCause::Error { error, id } => {
                let body = error.to_body(id.clone());
                let text = match body.code {
                    ErrorCode::AuthTimeout => "auth timeout",
                    ErrorCode::TokenExpired => "token expired",
                    ErrorCode::TokenInvalid | ErrorCode::Forbidden => "forbidden",
                    ErrorCode::ConnectionLimit => "connection limit",
                    ErrorCode::RateLimited => "rate limited",
                    ErrorCode::Overloaded | ErrorCode::Unavailable => "try again later",
                    ErrorCode::TooLarge => "message too large",
                    ErrorCode::SlowConsumer => "slow consumer",
                    ErrorCode::BadRequest | ErrorCode::NotFound | ErrorCode::Internal => {
                        GENERIC_TEXT
                    }
                };
                (body.code.close_code(), Some(ServerFrame::Error(body)), text)
            }
            CloseCause::IdleTimeout => (CloseCode::GoingAway, None, "idle timeout"),
            CloseCause::ProtocolViolation => (CloseCode::ProtocolError, None, "protocol error"),
            CloseCause::InvalidUtf8 => (CloseCode::InvalidPayload, None, "protocol error"),
            CloseCause::Draining { retry_after_ms } => (
                CloseCode::Restart,
                Some(ServerFrame::Reconnect {
                    reason: "node draining".into(),
                    retry_after_ms: *retry_after_ms,
                }),
                "node draining",
            ),
            CloseCause::Kicked { code, reason } => {
                let code = CloseCode::from_u16(*code);
                let frame = (code == DEFAULT_KICK_CODE).then(|| {
                    ServerFrame::Error(ErrorBody::new(
                        ErrorCode::Forbidden,
                        reason.as_deref().unwrap_or(KICK_MESSAGE),
                    ))
                });
                (code, frame, "disconnected")
            }
            CloseCause::Unexplained => (CloseCode::GoingAway, None, GENERIC_TEXT),
        };
        CloseSignal { code, frame, text }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;

    use shared::auth::AuthError;

    use super::*;

    /// PROTOCOL.md is the contract; the test reads it so the two cannot drift.
    const PROTOCOL: &str = include_str!("../../docs/PROTOCOL.md");

    /// Marks an error that never closes a connection.
    const NOT_A_CLOSE: usize = usize::MAX;

    /// The index in [`every_cause`] of `c`'s kind. A new cause or error does not
    /// compile until it is placed here; give it the next index and its sample at
    /// that index in [`every_cause`].
    fn kind(c: &CloseCause) -> usize {
        use SessionError as E;
        match c {
            CloseCause::Error { error, .. } => match error {
                E::Auth(e) if e.is_expired() => 0,
                E::Auth(_) => 1,
                E::Revoked => 2,
                E::AuthTimeout => 3,
                E::TokenExpired => 4,
                E::WrongUser => 5,
                E::ConnectionLimit => 6,
                E::Overloaded => 7,
                E::ConnectRateLimited(_) => 8,
                E::Abusive(_) => 9,
                E::TooLarge(_) => 10,
                E::Binary => 11,
                E::AuthUnavailable(_) => 12,
                E::DeliveryGap => 13,
                E::SlowConsumer => 14,
                E::RefreshRejected(_)
                | E::BadRequest(_)
                | E::Forbidden(_)
                | E::NotFound(_)
                | E::RateLimited(_)
                | E::RefreshRateLimited(_)
                | E::Unavailable(_) => NOT_A_CLOSE,
            },
            CloseCause::IdleTimeout => 15,
            CloseCause::ProtocolViolation => 16,
            CloseCause::InvalidUtf8 => 17,
            CloseCause::Draining { .. } => 18,
            CloseCause::Kicked { code: 4503, .. } => 19,
            CloseCause::Kicked { .. } => 20,
            CloseCause::Unexplained => 21,
        }
    }

    /// One cause of every kind, at the index [`kind`] gives it.
    fn every_cause() -> Vec<CloseCause> {
        let wait = Duration::from_millis(5);
        vec![
            SessionError::Auth(AuthError::Expired).into(),
            SessionError::Auth(AuthError::InvalidSignature).into(),
            SessionError::Revoked.into(),
            SessionError::AuthTimeout.into(),
            SessionError::TokenExpired.into(),
            SessionError::WrongUser.into(),
            SessionError::ConnectionLimit.into(),
            SessionError::Overloaded.into(),
            SessionError::ConnectRateLimited(wait).into(),
            SessionError::Abusive(wait).into(),
            SessionError::TooLarge(1).into(),
            SessionError::Binary.into(),
            SessionError::AuthUnavailable("redis").into(),
            SessionError::DeliveryGap.into(),
            SessionError::SlowConsumer.into(),
            CloseCause::IdleTimeout,
            CloseCause::ProtocolViolation,
            CloseCause::InvalidUtf8,
            CloseCause::Draining { retry_after_ms: 1 },
            CloseCause::Kicked {
                code: 4503,
                reason: None,
            },
            CloseCause::Kicked {
                code: 1000,
                reason: None,
            },
            CloseCause::Unexplained,
        ]
    }

    /// Close code -> the error codes its row allows, from the table in section 4.
    fn close_table() -> BTreeMap<u16, BTreeSet<String>> {
        let section = PROTOCOL
            .split("\n## 4.")
            .nth(1)
            .and_then(|s| s.split("\n## 5.").next())
            .expect("PROTOCOL.md has a section 4");
        let mut table = BTreeMap::new();
        for line in section.lines() {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let Some(code) = cells.get(1).and_then(|c| c.parse::<u16>().ok()) else {
                continue;
            };
            // Error codes are the upper-case words in backticks; the rest of the
            // cell (`action: ...`) is not a code.
            let errors = cells[2]
                .split('`')
                .skip(1)
                .step_by(2)
                .filter(|w| w.chars().all(|ch| ch.is_ascii_uppercase() || ch == '_'))
                .map(str::to_owned)
                .collect();
            table.insert(code, errors);
        }
        assert!(table.len() > 10, "close-code table not found");
        table
    }

    #[test]
    fn every_cause_closes_as_the_protocol_table_says() {
        let table = close_table();
        let all = every_cause();
        for (i, cause) in all.iter().enumerate() {
            assert_eq!(kind(cause), i, "{cause:?} is not at its index");
            if let CloseCause::Error { error, .. } = cause {
                assert!(error.is_fatal(), "{error:?} does not close");
            }
            let signal = cause.signal();
            let code = signal.code.as_u16();
            let allowed = table
                .get(&code)
                .unwrap_or_else(|| panic!("{cause:?}: close {code} is not in the table"));
            let error = match &signal.frame {
                Some(ServerFrame::Error(body)) => Some(body.code.as_str().to_owned()),
                _ => None,
            };
            match error {
                Some(e) => assert!(
                    allowed.contains(&e),
                    "{cause:?}: {e} does not go with close {code}"
                ),
                None => assert!(
                    allowed.is_empty(),
                    "{cause:?}: close {code} comes with one of {allowed:?}"
                ),
            }
            assert!(!signal.text.is_empty(), "{cause:?} has no close text");
        }
    }

    #[test]
    fn errors_that_do_not_close_are_not_causes() {
        for e in [
            SessionError::RefreshRejected(AuthError::Expired),
            SessionError::BadRequest("x".into()),
            SessionError::Forbidden("x".into()),
            SessionError::NotFound("x".into()),
            SessionError::RateLimited(Duration::from_millis(1)),
            SessionError::RefreshRateLimited(Duration::from_millis(1)),
            SessionError::Unavailable("x"),
        ] {
            assert!(!e.is_fatal(), "{e:?}");
            assert_eq!(kind(&e.into()), NOT_A_CLOSE);
        }
    }

    #[test]
    fn fatal_errors_carry_the_table_codes() {
        let cases = [
            (
                SessionError::Auth(AuthError::Expired),
                Some(4001),
                Some(ErrorCode::TokenExpired),
            ),
            (
                SessionError::Auth(AuthError::InvalidSignature),
                Some(4503),
                Some(ErrorCode::TokenInvalid),
            ),
            (
                SessionError::Revoked,
                Some(4503),
                Some(ErrorCode::TokenInvalid),
            ),
            (
                SessionError::AuthTimeout,
                Some(4000),
                Some(ErrorCode::AuthTimeout),
            ),
            (
                SessionError::WrongUser,
                Some(4503),
                Some(ErrorCode::Forbidden),
            ),
            (
                SessionError::ConnectionLimit,
                Some(4509),
                Some(ErrorCode::ConnectionLimit),
            ),
            (
                SessionError::Overloaded,
                Some(1013),
                Some(ErrorCode::Overloaded),
            ),
            (
                SessionError::Abusive(Duration::from_millis(5)),
                Some(4029),
                Some(ErrorCode::RateLimited),
            ),
            (
                SessionError::TooLarge(1),
                Some(1009),
                Some(ErrorCode::TooLarge),
            ),
            (SessionError::Binary, Some(1003), None),
            (
                SessionError::AuthUnavailable("redis"),
                Some(1013),
                Some(ErrorCode::Unavailable),
            ),
            (
                SessionError::BadRequest("x".into()),
                None,
                Some(ErrorCode::BadRequest),
            ),
            (
                SessionError::RefreshRejected(AuthError::InvalidSignature),
                None,
                Some(ErrorCode::TokenInvalid),
            ),
            (
                SessionError::RateLimited(Duration::from_millis(5)),
                None,
                Some(ErrorCode::RateLimited),
            ),
            (
                SessionError::RefreshRateLimited(Duration::from_millis(5)),
                None,
                Some(ErrorCode::RateLimited),
            ),
            (
                SessionError::SlowConsumer,
                Some(4008),
                Some(ErrorCode::SlowConsumer),
            ),
        ];
        for (e, close, code) in cases {
            // What the client gets: the close signal of a fatal error, the error
            // frame alone otherwise.
            let desc = format!("{e:?}");
            let (got_close, got_code) = if e.is_fatal() {
                let signal = CloseCause::from(e).signal();
                let code = match signal.frame {
                    Some(shared::protocol::ServerFrame::Error(b)) => Some(b.code),
                    _ => None,
                };
                (Some(signal.code.as_u16()), code)
            } else {
                (None, Some(e.to_body(None).code))
            };
            assert_eq!(got_close, close, "{desc}");
            assert_eq!(got_code, code, "{desc}");
        }
        let b = SessionError::Auth(AuthError::Expired).to_body(None);
        assert!(b.action.is_some());
        let b = SessionError::RateLimited(Duration::from_millis(250)).to_body(None);
        assert_eq!(b.retry_after_ms, Some(250));
    }
}
