//! What a client is told: where to connect, how to get tokens, and its timings.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::error::TokenError;

/// First reconnect delay after an abnormal close: most are one node going away, and
/// the next attempt lands on another node.
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest reconnect delay (doubling, jittered): a long outage is not hammered.
pub const BACKOFF_CAP: Duration = Duration::from_secs(20);
/// Direct replies (`ack`, `subscribed`, `history`...) and the token source.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP connect, upgrade and `authenticated` together (the server's own auth
/// deadline is 10 s).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Authenticated this long: the backoff starts over at the next close.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Silence after which the client sends a `ping` frame (the server pings every 25 s).
pub const PING_INTERVAL: Duration = Duration::from_secs(25);
/// No frame heard this long after a `ping`: the link is dead (a half-open TCP
/// connection never closes by itself).
pub const PONG_TIMEOUT: Duration = Duration::from_secs(10);
/// Retry of a failed token refresh while the current token is still valid.
pub const REFRESH_RETRY: Duration = Duration::from_secs(5);
/// Requests waiting for a connection before `QueueFull`.
pub const MAX_QUEUED: usize = 256;
/// An acked chat request that hears nothing this long on a live link is looked up in
/// `history` (its final frame may have been lost while the connection stayed up).
pub const CHAT_SILENCE: Duration = Duration::from_secs(10);
/// An acked chat request that hears nothing this long ends with `TimedOut`: a reply
/// that failed while the client was away leaves no trace in `history`.
pub const CHAT_IDLE_TIMEOUT: Duration = Duration::from_secs(180);
/// Ended chat requests remembered, so a late repeat of their frames is dropped.
pub const MAX_FINISHED_CHATS: usize = 256;
/// Events buffered for the application; when it falls behind, the client stops
/// reading the socket (and the server's slow-consumer rule applies).
pub const EVENT_QUEUE: usize = 1024;
/// Jitter ceiling for a 1012 close that came without a `reconnect` frame.
pub const RESTART_JITTER: Duration = Duration::from_secs(1);

/// Why the client asks for a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenReason {
    /// The first connection.
    Connect,
    /// A reconnect after a close; the previous token may still be valid.
    Reconnect,
    /// The server closed with 4001: the token expired. Never hand back the old one.
    Expired,
    /// The server sent `token_expiring`: a new token for the live connection.
    Refresh,
}

/// A future that yields a token.
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<String, TokenError>> + Send>>;
/// Called before every connection attempt and on `token_expiring`.
pub type TokenSource = Arc<dyn Fn(TokenReason) -> TokenFuture + Send + Sync>;

/// Everything a client needs; [`Options::new`] fills the defaults above.
#[derive(Clone)]
pub struct Options {
    /// Gateway (or load balancer) WebSocket URLs, `ws://host:port/ws`; reconnects
    /// go to the next one in turn.
    pub urls: Vec<String>,
    pub token: TokenSource,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub stable_after: Duration,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub refresh_retry: Duration,
    pub max_queued: usize,
    pub chat_silence: Duration,
    pub chat_idle_timeout: Duration,
    pub max_finished_chats: usize,
    pub event_queue: usize,
    /// Source address of the TCP connection (a load generator spreads users over
    /// 127.0.0.x so per-address limits see distinct clients).
    pub local_addr: Option<IpAddr>,
    /// Socket receive buffer in bytes (a test of slow consumers makes it small).
    pub recv_buffer: Option<u32>,
    /// PEM certificates trusted for `wss://` instead of the system's roots.
    pub tls_ca: Option<Vec<u8>>,
}

impl Options {
    /// `token` is called with the reason before every connection attempt and on
    /// `token_expiring`.
    pub fn new<F, Fut>(url: impl Into<String>, token: F) -> Options
    where
        F: Fn(TokenReason) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, TokenError>> + Send + 'static,
    {
        Options {
            urls: vec![url.into()],
            token: Arc::new(move |reason| Box::pin(token(reason))),
            backoff_base: BACKOFF_BASE,
            backoff_cap: BACKOFF_CAP,
            request_timeout: REQUEST_TIMEOUT,
            connect_timeout: CONNECT_TIMEOUT,
            stable_after: STABLE_AFTER,
            ping_interval: PING_INTERVAL,
            pong_timeout: PONG_TIMEOUT,
            refresh_retry: REFRESH_RETRY,
            max_queued: MAX_QUEUED,
            chat_silence: CHAT_SILENCE,
            chat_idle_timeout: CHAT_IDLE_TIMEOUT,
            max_finished_chats: MAX_FINISHED_CHATS,
            event_queue: EVENT_QUEUE,
            local_addr: None,
            recv_buffer: None,
            tls_ca: None,
        }
    }

    /// One fixed token for every attempt (tests, tools); a 4001 then stops the client.
    pub fn with_token(url: impl Into<String>, token: impl Into<String>) -> Options {
        let token: String = token.into();
        Options::new(url, move |reason| {
            let token = token.clone();
            async move {
                match reason {
                    TokenReason::Expired | TokenReason::Refresh => Err(TokenError::fatal(
                        "the token expired and no source of new ones was given",
                    )),
                    _ => Ok(token),
                }
            }
        })
    }

    /// More gateway URLs, tried in turn on reconnects.
    pub fn with_urls(mut self, urls: impl IntoIterator<Item = String>) -> Options {
        self.urls.extend(urls);
        self
    }
}
