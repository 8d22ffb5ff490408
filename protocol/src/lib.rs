//! Switchboard's client wire protocol (`docs/PROTOCOL.md`), for clients and servers
//! alike: every frame as a serde type, the close codes and error codes with their
//! retry rules, and the channel-name grammar.
//!
//! No I/O and nothing async: the crate depends on serde and serde_json only, so a
//! client (or a fuzz target) that needs the frames does not build the gateway's
//! HTTP, NATS and Redis stacks. Servers reach it as `shared::protocol` too.
//!
//! Client frames are parsed leniently about extra fields (forward compatibility) but
//! strictly about the fields they need; a frame that cannot be parsed is answered with
//! `BAD_REQUEST` carrying the frame's `id` when one could be read.
#![forbid(unsafe_code)]

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The subprotocol clients offer and the server selects.
pub const SUBPROTOCOL: &str = "switchboard.v1";
/// Prefix of the subprotocol entry that carries a token (`bearer.<jwt>`) for browsers,
/// which cannot set an `Authorization` header on a WebSocket.
pub const BEARER_SUBPROTOCOL_PREFIX: &str = "bearer.";
/// Longest string `id` a client may attach to a frame (PROTOCOL.md section 2).
pub const MAX_ID_CHARS: usize = 64;
/// Longest channel name part after the namespace (PROTOCOL.md section 3).
pub const MAX_CHANNEL_NAME_CHARS: usize = 128;
/// Longest namespace; keeps subjects and keys short.
pub const MAX_NAMESPACE_CHARS: usize = 64;
/// Bounds of a `chat.send` message in characters (PROTOCOL.md section 2).
pub const MAX_CHAT_MESSAGE_CHARS: usize = 50_000;

// === close codes ===

/// WebSocket close codes the server sends. 4000-4499 mean "reconnect",
/// 4500-4999 mean "do not reconnect automatically".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    Normal,
    GoingAway,
    ProtocolError,
    Unsupported,
    InvalidPayload,
    TooLarge,
    Internal,
    Restart,
    TryAgainLater,
    AuthTimeout,
    TokenExpired,
    SlowConsumer,
    RateLimited,
    Forbidden,
    ConnectionLimit,
    /// Any other application code (an operator's kick may choose one).
    Other(u16),
}

/// What a client should do after a close, derived from the code alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconnectPolicy {
    /// Do nothing (normal close) or fix the client (1003, 1009).
    None,
    /// Reconnect with exponential backoff and jitter.
    Backoff,
    /// Reconnect now, with a little jitter (a draining node).
    Immediately,
    /// Get a new token first, then reconnect.
    RefreshToken,
    /// Do not reconnect automatically.
    Stop,
}

impl CloseCode {
    pub const fn as_u16(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::ProtocolError => 1002,
            CloseCode::Unsupported => 1003,
            CloseCode::InvalidPayload => 1007,
            CloseCode::TooLarge => 1009,
            CloseCode::Internal => 1011,
            CloseCode::Restart => 1012,
            CloseCode::TryAgainLater => 1013,
            CloseCode::AuthTimeout => 4000,
            CloseCode::TokenExpired => 4001,
            CloseCode::SlowConsumer => 4008,
            CloseCode::RateLimited => 4029,
            CloseCode::Forbidden => 4503,
            CloseCode::ConnectionLimit => 4509,
            CloseCode::Other(c) => c,
        }
    }

    pub fn from_u16(code: u16) -> CloseCode {
        match code {
            1000 => CloseCode::Normal,
            1001 => CloseCode::GoingAway,
            1002 => CloseCode::ProtocolError,
            1003 => CloseCode::Unsupported,
            1007 => CloseCode::InvalidPayload,
            1009 => CloseCode::TooLarge,
            1011 => CloseCode::Internal,
            1012 => CloseCode::Restart,
            1013 => CloseCode::TryAgainLater,
            4000 => CloseCode::AuthTimeout,
            4001 => CloseCode::TokenExpired,
            4008 => CloseCode::SlowConsumer,
            4029 => CloseCode::RateLimited,
            4503 => CloseCode::Forbidden,
            4509 => CloseCode::ConnectionLimit,
            other => CloseCode::Other(other),
        }
    }

    /// The client rule of PROTOCOL.md section 4.
    pub fn policy(self) -> ReconnectPolicy {
        match self.as_u16() {
            4001 => ReconnectPolicy::RefreshToken,
            1012 => ReconnectPolicy::Immediately,
            1000 | 1003 | 1009 => ReconnectPolicy::None,
            4000..=4499 => ReconnectPolicy::Backoff,
            4500..=4999 => ReconnectPolicy::Stop,
            _ => ReconnectPolicy::Backoff,
        }
    }

    /// Whether an operator may close connections with this code through the API.
    pub fn is_valid_kick_code(code: u16) -> bool {
        code == 1000 || code == 1012 || (4000..=4999).contains(&code)
    }

    /// Label for metrics (`close_code="4503"`).
    pub fn label(self) -> &'static str {
        match self {
            CloseCode::Normal => "1000",
            CloseCode::GoingAway => "1001",
            CloseCode::ProtocolError => "1002",
            CloseCode::Unsupported => "1003",
            CloseCode::InvalidPayload => "1007",
            CloseCode::TooLarge => "1009",
            CloseCode::Internal => "1011",
            CloseCode::Restart => "1012",
            CloseCode::TryAgainLater => "1013",
            CloseCode::AuthTimeout => "4000",
            CloseCode::TokenExpired => "4001",
            CloseCode::SlowConsumer => "4008",
            CloseCode::RateLimited => "4029",
            CloseCode::Forbidden => "4503",
            CloseCode::ConnectionLimit => "4509",
            CloseCode::Other(_) => "other",
        }
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_u16())
    }
}

// === error codes ===

/// Codes carried by `error` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    BadRequest,
    Forbidden,
    NotFound,
    RateLimited,
    Unavailable,
    TooLarge,
    Internal,
    Overloaded,
    AuthTimeout,
    TokenExpired,
    TokenInvalid,
    SlowConsumer,
    ConnectionLimit,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::TooLarge => "TOO_LARGE",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::Overloaded => "OVERLOADED",
            ErrorCode::AuthTimeout => "AUTH_TIMEOUT",
            ErrorCode::TokenExpired => "TOKEN_EXPIRED",
            ErrorCode::TokenInvalid => "TOKEN_INVALID",
            ErrorCode::SlowConsumer => "SLOW_CONSUMER",
            ErrorCode::ConnectionLimit => "CONNECTION_LIMIT",
        }
    }

    /// Whether retrying the same thing later can succeed.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::RateLimited
                | ErrorCode::Unavailable
                | ErrorCode::Internal
                | ErrorCode::Overloaded
                | ErrorCode::AuthTimeout
                | ErrorCode::SlowConsumer
        )
    }

    /// The close code that follows this error when it ends the connection.
    pub fn close_code(self) -> CloseCode {
        match self {
            ErrorCode::AuthTimeout => CloseCode::AuthTimeout,
            ErrorCode::TokenExpired => CloseCode::TokenExpired,
            ErrorCode::TokenInvalid | ErrorCode::Forbidden => CloseCode::Forbidden,
            ErrorCode::ConnectionLimit => CloseCode::ConnectionLimit,
            ErrorCode::SlowConsumer => CloseCode::SlowConsumer,
            ErrorCode::RateLimited => CloseCode::RateLimited,
            ErrorCode::Overloaded | ErrorCode::Unavailable => CloseCode::TryAgainLater,
            ErrorCode::TooLarge => CloseCode::TooLarge,
            ErrorCode::Internal => CloseCode::Internal,
            ErrorCode::BadRequest | ErrorCode::NotFound => CloseCode::ProtocolError,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a client should do about an error besides retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorAction {
    RefreshToken,
}

// === frame ids ===

/// A client-chosen correlation id, echoed on the direct reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum FrameId {
    Int(i64),
    Str(String),
}

impl<'de> Deserialize<'de> for FrameId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Str(String),
        }
        match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("`id` must be a string or an integer"))?
        {
            Raw::Int(i) => Ok(FrameId::Int(i)),
            Raw::Str(s) if s.chars().count() <= MAX_ID_CHARS => Ok(FrameId::Str(s)),
            Raw::Str(_) => Err(serde::de::Error::custom(format_args!(
                "`id` is longer than {MAX_ID_CHARS} characters"
            ))),
        }
    }
}

// === client -> server ===

/// One attachment on `chat.send`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileAttachment {
    pub name: String,
    #[serde(rename = "type")]
    pub content_type: String,
    /// Base64 (standard alphabet) of the file's bytes.
    pub data: String,
}

/// Every frame a client may send; `type` selects the variant. Serialisable for
/// clients written against this crate (`clients/rust`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ClientFrame {
    #[serde(rename = "auth")]
    Auth { token: String },
    #[serde(rename = "refresh")]
    Refresh { token: String },
    #[serde(rename = "ping")]
    Ping {},
    #[serde(rename = "subscribe")]
    Subscribe {
        channel: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
        /// The epoch `since` counts in, from the `subscribed` that started the count.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
    },
    #[serde(rename = "unsubscribe")]
    Unsubscribe { channel: String },
    #[serde(rename = "publish")]
    Publish { channel: String, data: Value },
    #[serde(rename = "chat.send")]
    ChatSend {
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session_id: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        files: Vec<FileAttachment>,
    },
    #[serde(rename = "chat.cancel")]
    ChatCancel { request_id: String },
    #[serde(rename = "history")]
    History {
        session_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    #[serde(rename = "presence")]
    Presence { channel: String },
    #[serde(rename = "typing")]
    Typing { channel: String },
    #[serde(rename = "read")]
    Read { channel: String, offset: u64 },
}

impl ClientFrame {
    /// The `type` string, for metrics labels and messages.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Auth { .. } => "auth",
            ClientFrame::Refresh { .. } => "refresh",
            ClientFrame::Ping {} => "ping",
            ClientFrame::Subscribe { .. } => "subscribe",
            ClientFrame::Unsubscribe { .. } => "unsubscribe",
            ClientFrame::Publish { .. } => "publish",
            ClientFrame::ChatSend { .. } => "chat.send",
            ClientFrame::ChatCancel { .. } => "chat.cancel",
            ClientFrame::History { .. } => "history",
            ClientFrame::Presence { .. } => "presence",
            ClientFrame::Typing { .. } => "typing",
            ClientFrame::Read { .. } => "read",
        }
    }
}

/// The `type` values [`ClientFrame`] knows, for the "unknown type" message.
pub const CLIENT_FRAME_TYPES: &[&str] = &[
    "auth",
    "refresh",
    "ping",
    "subscribe",
    "unsubscribe",
    "publish",
    "chat.send",
    "chat.cancel",
    "history",
    "presence",
    "typing",
    "read",
];

/// A parsed client frame with its correlation id.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientMessage {
    pub id: Option<FrameId>,
    pub frame: ClientFrame,
}

/// Why a client frame was refused; always answered with `BAD_REQUEST`.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameError {
    /// The frame's id when it could be read, so the client can match the error.
    pub id: Option<FrameId>,
    pub message: String,
}

impl ClientMessage {
    /// Parses one text frame. Never panics; every failure says what was wrong.
    pub fn parse(text: &[u8]) -> Result<ClientMessage, FrameError> {
        #[derive(Deserialize)]
        struct Head {
            #[serde(default, rename = "type")]
            kind: Option<Value>,
            #[serde(default)]
            id: Option<Value>,
        }
        // serde reads a JSON array into a struct by position; only objects are frames.
        if text.trim_ascii_start().first() != Some(&b'{') {
            let message = match serde_json::from_slice::<serde::de::IgnoredAny>(text) {
                Ok(_) => "a frame must be a JSON object".to_owned(),
                Err(e) => format!("invalid JSON: {}", strip_position(&e)),
            };
            return Err(FrameError { id: None, message });
        }
        let head: Head = match serde_json::from_slice(text) {
            Ok(h) => h,
            Err(e) => {
                let message = if e.is_data() {
                    "a frame must be a JSON object".to_owned()
                } else {
                    format!("invalid JSON: {e}")
                };
                return Err(FrameError { id: None, message });
            }
        };
        let id = match head.id {
            None | Some(Value::Null) => None,
            Some(v) => match serde_json::from_value::<FrameId>(v) {
                Ok(id) => Some(id),
                Err(e) => {
                    return Err(FrameError {
                        id: None,
                        message: e.to_string(),
                    });
                }
            },
        };
        let kind = match head.kind {
            Some(Value::String(s)) => s,
            Some(_) => {
                return Err(FrameError {
                    id,
                    message: "`type` must be a string".into(),
                });
            }
            None => {
                return Err(FrameError {
                    id,
                    message: "missing `type`".into(),
                });
            }
        };
        if !CLIENT_FRAME_TYPES.contains(&kind.as_str()) {
            let mut shown: String = kind.chars().take(MAX_ID_CHARS).collect();
            if shown.len() < kind.len() {
                shown.push('…');
            }
            return Err(FrameError {
                id,
                message: format!("unknown frame type {shown:?}"),
            });
        }
        match serde_json::from_slice::<ClientFrame>(text) {
            Ok(frame) => Ok(ClientMessage { id, frame }),
            Err(e) => Err(FrameError {
                id,
                message: format!("invalid `{kind}` frame: {}", strip_position(&e)),
            }),
        }
    }
}

/// serde_json appends "at line 1 column 42"; clients care about the field, not the column.
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.find(" at line ") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

// === server -> client ===

/// The user as the server knows it from the token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserInfo {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// A team or task from the team backend: any JSON object with at least `id`.
pub type ContextItem = Value;

/// Token usage reported by the LLM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

/// One message of a chat session's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryMessage {
    /// `user` or `assistant`.
    pub role: String,
    pub content: String,
    /// Unix milliseconds.
    pub ts: u64,
    /// The chat request this message belongs to: lets a client match history to a
    /// stream it saw partly (gap fill after a reconnect) and makes appends idempotent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// Every frame the server sends; serialised with `type` first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ServerFrame {
    #[serde(rename = "authenticated")]
    Authenticated {
        user: UserInfo,
        expires_at: u64,
        teams: Vec<ContextItem>,
        tasks: Vec<ContextItem>,
        degraded: bool,
        node: String,
        /// This connection's id, for support tickets and `POST /v1/disconnect`.
        conn_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<FrameId>,
    },
    #[serde(rename = "refreshed")]
    Refreshed {
        expires_at: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<FrameId>,
    },
    #[serde(rename = "pong")]
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<FrameId>,
    },
    #[serde(rename = "token_expiring")]
    TokenExpiring { expires_at: u64 },
    #[serde(rename = "subscribed")]
    Subscribed {
        channel: String,
        offset: u64,
        /// Which count of the channel's offsets `offset` belongs to (opaque).
        epoch: String,
        recovered: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        read_offset: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<FrameId>,
    },
    #[serde(rename = "unsubscribed")]
    Unsubscribed {
        channel: String,
        /// Set when the server ended the subscription (not a reply to `unsubscribe`):
        /// `FORBIDDEN` when the user may no longer hold the channel.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<ErrorCode>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<FrameId>,
    },
    /// The user's teams and tasks changed or were checked again (a context refresh
    /// or the periodic re-check); never a direct reply.
    #[serde(rename = "context")]
    Context {
        teams: Vec<ContextItem>,
        tasks: Vec<ContextItem>,
        degraded: bool,
    },
    #[serde(rename = "ack")]
    Ack {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<FrameId>,
    },
    #[serde(rename = "history")]
    History {
        session_id: String,
        messages: Vec<HistoryMessage>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<FrameId>,
    },
    #[serde(rename = "message")]
    Message {
        channel: String,
        offset: u64,
        data: Value,
        from: String,
    },
    #[serde(rename = "chat.chunk")]
    ChatChunk {
        session_id: String,
        request_id: String,
        seq: u64,
        content: String,
    },
    #[serde(rename = "chat.complete")]
    ChatComplete {
        session_id: String,
        request_id: String,
        content: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage: Option<Usage>,
    },
    #[serde(rename = "chat.error")]
    ChatError {
        session_id: String,
        request_id: String,
        code: ErrorCode,
        message: String,
        retryable: bool,
    },
    #[serde(rename = "presence")]
    Presence {
        channel: String,
        users: Vec<PresenceUser>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<FrameId>,
    },
    #[serde(rename = "join")]
    Join { channel: String, user: String },
    #[serde(rename = "leave")]
    Leave { channel: String, user: String },
    #[serde(rename = "typing")]
    Typing { channel: String, user: String },
    #[serde(rename = "read")]
    Read {
        channel: String,
        user: String,
        offset: u64,
    },
    #[serde(rename = "reconnect")]
    Reconnect { reason: String, retry_after_ms: u64 },
    #[serde(rename = "error")]
    Error(ErrorBody),
}

/// One user in a `presence` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresenceUser {
    pub user_id: String,
    pub connections: u64,
}

/// The body of an `error` frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    pub retryable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<ErrorAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<FrameId>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            code,
            message: message.into(),
            retryable: code.retryable(),
            action: (code == ErrorCode::TokenExpired).then_some(ErrorAction::RefreshToken),
            retry_after_ms: None,
            id: None,
        }
    }

    pub fn with_id(mut self, id: Option<FrameId>) -> ErrorBody {
        self.id = id;
        self
    }

    pub fn retry_after(mut self, ms: u64) -> ErrorBody {
        self.retry_after_ms = Some(ms);
        self
    }
}

impl ServerFrame {
    /// Serialises the frame. Serialising these types cannot fail (string keys only).
    pub fn to_bytes(&self) -> bytes::Bytes {
        bytes::Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// The `type` string, for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerFrame::Authenticated { .. } => "authenticated",
            ServerFrame::Refreshed { .. } => "refreshed",
            ServerFrame::Pong { .. } => "pong",
            ServerFrame::TokenExpiring { .. } => "token_expiring",
            ServerFrame::Subscribed { .. } => "subscribed",
            ServerFrame::Unsubscribed { .. } => "unsubscribed",
            ServerFrame::Context { .. } => "context",
            ServerFrame::Ack { .. } => "ack",
            ServerFrame::History { .. } => "history",
            ServerFrame::Message { .. } => "message",
            ServerFrame::ChatChunk { .. } => "chat.chunk",
            ServerFrame::ChatComplete { .. } => "chat.complete",
            ServerFrame::ChatError { .. } => "chat.error",
            ServerFrame::Presence { .. } => "presence",
            ServerFrame::Join { .. } => "join",
            ServerFrame::Leave { .. } => "leave",
            ServerFrame::Typing { .. } => "typing",
            ServerFrame::Read { .. } => "read",
            ServerFrame::Reconnect { .. } => "reconnect",
            ServerFrame::Error(_) => "error",
        }
    }
}

// === internal messages between gateways and workers ===

/// `sb.rpc.user_context` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserContextRequest {
    pub user_id: String,
    /// The user's bearer token, only when the gateway forwards it
    /// (`SB_FORWARD_USER_TOKEN`: a team backend that authorizes as the user); the
    /// worker then sends it unless it has its own `SB_BACKEND_TOKEN`. Off by default, so
    /// no raw token travels on NATS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Ask the team backend even when the worker holds a recent answer for the user
    /// (a context refresh after a membership change must not see the old one).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fresh: bool,
}

/// `sb.rpc.user_context` reply, also the cached value in `sb:user:<uid>:ctx`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserContext {
    #[serde(default)]
    pub teams: Vec<ContextItem>,
    #[serde(default)]
    pub tasks: Vec<ContextItem>,
    #[serde(default)]
    pub degraded: bool,
}

/// `sb.ctl.disconnect` payload: close a user's connections, or one connection, everywhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DisconnectCommand {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conn_id: Option<String>,
    pub code: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `sb.ctl.refresh_context` payload: every gateway holding connections of `user_id`
/// fetches the user's context again (bypassing caches) and applies it to them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefreshContextCommand {
    pub user_id: String,
}

/// `sb.chat.requests` payload: one chat turn for a worker. Published to JetStream
/// with `Nats-Msg-Id` = `request_id`, so a retried publish is stored once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    pub request_id: String,
    pub session_id: String,
    pub user_id: String,
    pub message: String,
    #[serde(default)]
    pub files: Vec<FileAttachment>,
    /// Unix milliseconds when the gateway accepted it.
    pub created_at: u64,
    /// Gateway node that accepted it (diagnostics only).
    #[serde(default)]
    pub node: String,
}

/// `sb.chat.cancel` payload, to every worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCancel {
    pub request_id: String,
    /// Only the owner may cancel; workers check it against the request they hold.
    pub user_id: String,
}

// === channel names ===

/// A validated `namespace:name` channel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Channel {
    pub namespace: String,
    pub name: String,
}

impl Channel {
    /// Validates `namespace:name`: namespace `[a-z0-9_-]{1,64}`, name `[A-Za-z0-9_-]{1,128}`.
    pub fn parse(s: &str) -> Result<Channel, String> {
        let Some((ns, name)) = s.split_once(':') else {
            return Err("a channel is `namespace:name`".into());
        };
        let ns_ok = !ns.is_empty()
            && ns.len() <= MAX_NAMESPACE_CHARS
            && ns
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !ns_ok {
            return Err(format!(
                "channel namespace must match [a-z0-9_-]{{1,{MAX_NAMESPACE_CHARS}}}"
            ));
        }
        if !valid_name(name) {
            return Err(format!(
                "channel name must match [A-Za-z0-9_-]{{1,{MAX_CHANNEL_NAME_CHARS}}}"
            ));
        }
        Ok(Channel {
            namespace: ns.to_owned(),
            name: name.to_owned(),
        })
    }
}

/// `[A-Za-z0-9_-]{1,128}`: safe as a NATS subject token and inside a Redis key.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_CHANNEL_NAME_CHARS
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_frames_with_ids() {
        let m = ClientMessage::parse(br#"{"type":"ping","id":7}"#).unwrap();
        assert_eq!(m.id, Some(FrameId::Int(7)));
        assert_eq!(m.frame, ClientFrame::Ping {});
        let m = ClientMessage::parse(br#"{"type":"auth","token":"t","id":"a"}"#).unwrap();
        assert_eq!(m.frame, ClientFrame::Auth { token: "t".into() });
        let m = ClientMessage::parse(
            br#"{"type":"chat.send","message":"hi","files":[{"name":"a.txt","type":"text/plain","data":"aGk="}]}"#,
        )
        .unwrap();
        assert!(matches!(m.frame, ClientFrame::ChatSend { ref files, .. } if files.len() == 1));
    }

    #[test]
    fn refuses_bad_frames_with_reasons() {
        let e = ClientMessage::parse(b"{nope").unwrap_err();
        assert!(e.message.starts_with("invalid JSON"), "{}", e.message);
        let e = ClientMessage::parse(b"[1,2]").unwrap_err();
        assert_eq!(e.message, "a frame must be a JSON object");
        let e = ClientMessage::parse(br#"{"type":"warp","id":"x"}"#).unwrap_err();
        assert_eq!(e.id, Some(FrameId::Str("x".into())));
        assert!(e.message.contains("unknown frame type"));
        let e = ClientMessage::parse(br#"{"type":"auth","id":3}"#).unwrap_err();
        assert_eq!(e.id, Some(FrameId::Int(3)));
        assert!(e.message.contains("token"), "{}", e.message);
        let long = "x".repeat(65);
        let e = ClientMessage::parse(json!({"type":"ping","id":long}).to_string().as_bytes())
            .unwrap_err();
        assert!(e.message.contains("longer than 64"));
        let e = ClientMessage::parse(br#"{"type":"ping","id":[1]}"#).unwrap_err();
        assert!(e.message.contains("string or an integer"));
    }

    #[test]
    fn server_frames_serialise_as_the_protocol_says() {
        let f = ServerFrame::Error(
            ErrorBody::new(ErrorCode::TokenExpired, "expired").with_id(Some(FrameId::Int(1))),
        );
        let v: Value = serde_json::from_slice(&f.to_bytes()).unwrap();
        assert_eq!(
            v,
            json!({"type":"error","code":"TOKEN_EXPIRED","message":"expired","retryable":false,
                   "action":"REFRESH_TOKEN","id":1})
        );
        let f = ServerFrame::Ack {
            offset: Some(3),
            session_id: None,
            request_id: None,
            id: None,
        };
        assert_eq!(
            serde_json::from_slice::<Value>(&f.to_bytes()).unwrap(),
            json!({"type":"ack","offset":3})
        );
        let f = ServerFrame::Unsubscribed {
            channel: "team:a".into(),
            reason: Some(ErrorCode::Forbidden),
            id: None,
        };
        assert_eq!(
            serde_json::from_slice::<Value>(&f.to_bytes()).unwrap(),
            json!({"type":"unsubscribed","channel":"team:a","reason":"FORBIDDEN"})
        );
        let f = ServerFrame::Context {
            teams: vec![json!({"id": "t1"})],
            tasks: vec![],
            degraded: false,
        };
        assert_eq!(
            serde_json::from_slice::<Value>(&f.to_bytes()).unwrap(),
            json!({"type":"context","teams":[{"id":"t1"}],"tasks":[],"degraded":false})
        );
        // Old workers read a request without `fresh`; new ones default it.
        let r: UserContextRequest = serde_json::from_str(r#"{"user_id":"u","token":"t"}"#).unwrap();
        assert!(!r.fresh);
    }

    #[test]
    fn close_code_rules() {
        assert_eq!(
            CloseCode::from_u16(4001).policy(),
            ReconnectPolicy::RefreshToken
        );
        assert_eq!(CloseCode::from_u16(4029).policy(), ReconnectPolicy::Backoff);
        assert_eq!(CloseCode::from_u16(4509).policy(), ReconnectPolicy::Stop);
        assert_eq!(
            CloseCode::from_u16(1012).policy(),
            ReconnectPolicy::Immediately
        );
        for c in [
            1000, 1003, 1009, 1011, 1012, 1013, 4000, 4001, 4008, 4029, 4503, 4509,
        ] {
            assert_eq!(CloseCode::from_u16(c).as_u16(), c);
        }
        assert_eq!(
            ErrorCode::Unavailable.close_code(),
            CloseCode::TryAgainLater
        );
    }

    #[test]
    fn channel_names() {
        assert!(Channel::parse("team:abc-1_2").is_ok());
        for bad in [
            "team", ":x", "team:", "Team:x", "team:a.b", "team:a b", "t:é",
        ] {
            assert!(Channel::parse(bad).is_err(), "{bad}");
        }
        assert!(Channel::parse(&format!("ns:{}", "a".repeat(129))).is_err());
    }
}
