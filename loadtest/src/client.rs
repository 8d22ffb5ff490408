//! One simulated client connection: TCP connect (optionally from a chosen source
//! address), WebSocket upgrade with `Authorization: Bearer`, wait for `authenticated`;
//! then hold it idle, answering pings, until told to close. Every way this can fail is
//! reduced to a [`Failure`] that names its cause and the [`Limit`] behind it.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, error::ProtocolError};
use tokio_util::sync::CancellationToken;

use crate::source;
use crate::target::Target;

/// An open, authenticated connection.
pub type Ws = WebSocketStream<TcpStream>;

/// Default deadline for one whole handshake (TCP connect, upgrade, `authenticated`):
/// the gateway's own auth deadline, so a slow gateway shows up as timeouts, not hangs.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the close handshake when a run ends; a gateway that does not
/// answer in time is simply disconnected.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Read buffer per connection: idle clients receive only small control and JSON frames,
/// and tungstenite's 128 KiB default would cost 1.3 GB at 10,000 connections.
const READ_BUFFER_BYTES: usize = 4 * 1024;
/// Largest message accepted from the gateway (its default frame limit is 64 KiB; the
/// margin covers a future larger `authenticated` with many teams).
const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES))
}

/// Where in the connection's life something went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Tcp,
    Upgrade,
    Authenticated,
    Subscribe,
    Holding,
    /// A chat user's connection, between messages or during a stream.
    Chatting,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Tcp => "tcp connect",
            Stage::Upgrade => "websocket upgrade",
            Stage::Authenticated => "waiting for authenticated",
            Stage::Subscribe => "waiting for subscribed",
            Stage::Holding => "holding",
            Stage::Chatting => "chatting",
        })
    }
}

/// Why a TCP connect failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectError {
    /// EADDRNOTAVAIL (or EADDRINUSE): no free ephemeral port for this source address.
    EphemeralPorts,
    /// EMFILE / ENFILE: this process (or the system) is out of file descriptors.
    OpenFiles { system_wide: bool },
    /// ECONNREFUSED: nothing listens, or the listen queue overflowed.
    Refused,
    /// Anything else, by errno name or error kind.
    Other(String),
}

impl ConnectError {
    pub fn classify(e: &io::Error) -> ConnectError {
        use nix::errno::Errno;
        match e.raw_os_error().map(Errno::from_raw) {
            Some(Errno::EADDRNOTAVAIL | Errno::EADDRINUSE) => ConnectError::EphemeralPorts,
            Some(Errno::EMFILE) => ConnectError::OpenFiles { system_wide: false },
            Some(Errno::ENFILE) => ConnectError::OpenFiles { system_wide: true },
            Some(Errno::ECONNREFUSED) => ConnectError::Refused,
            Some(errno) => ConnectError::Other(format!("{errno:?}")),
            None => ConnectError::Other(format!("{:?}", e.kind())),
        }
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::EphemeralPorts => f.write_str("out of ephemeral ports (EADDRNOTAVAIL)"),
            ConnectError::OpenFiles { system_wide: false } => {
                f.write_str("open-file limit (EMFILE)")
            }
            ConnectError::OpenFiles { system_wide: true } => {
                f.write_str("system-wide open-file limit (ENFILE)")
            }
            ConnectError::Refused => f.write_str("refused (ECONNREFUSED)"),
            ConnectError::Other(name) => f.write_str(name),
        }
    }
}

/// Why a connection failed or ended early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Connect(ConnectError),
    Timeout(Stage),
    /// The upgrade was answered with this HTTP status instead of 101.
    Http(u16),
    /// The server closed the connection with this code, after an `error` frame with
    /// this `code` if one came.
    Closed {
        code: u16,
        error: Option<String>,
    },
    /// The connection ended without a close frame (close code 1006).
    Dropped {
        stage: Stage,
        error: Option<String>,
    },
    /// An `error` frame came, then nothing until the deadline.
    ErrorFrame {
        code: String,
    },
    /// A request (`subscribe`) was answered with an `error` frame of this code.
    Refused {
        request: &'static str,
        code: String,
    },
    /// Anything the protocol does not allow (bad handshake, binary frame, bad JSON).
    Protocol(String),
    /// The client could not build its credentials.
    Token(String),
}

/// Name of a close code sent without an `error` frame.
fn close_name(code: u16) -> Option<&'static str> {
    Some(match code {
        1000 => "normal",
        1001 => "going away",
        1002 => "protocol error",
        1003 => "unsupported data",
        1008 => "policy violation",
        1009 => "too large",
        1011 => "INTERNAL",
        1012 => "draining",
        1013 => "OVERLOADED",
        4000 => "AUTH_TIMEOUT",
        4001 => "TOKEN_EXPIRED",
        4008 => "SLOW_CONSUMER",
        4029 => "RATE_LIMITED",
        4503 => "FORBIDDEN",
        4509 => "CONNECTION_LIMIT",
        _ => return None,
    })
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "connect: {e}"),
            Failure::Timeout(stage) => write!(f, "timeout: {stage}"),
            Failure::Http(status) => {
                let reason = StatusCode::from_u16(*status)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("");
                write!(f, "http {status} {reason}")
            }
            Failure::Closed { code, error } => match (error, close_name(*code)) {
                (Some(e), _) => write!(f, "close {code} {e}"),
                (None, Some(name)) => write!(f, "close {code} ({name})"),
                (None, None) => write!(f, "close {code}"),
            },
            Failure::Dropped { stage, error } => {
                write!(f, "close 1006 (no close frame) {stage}")?;
                match error {
                    Some(e) => write!(f, " after error {e}"),
                    None => Ok(()),
                }
            }
            Failure::ErrorFrame { code } => write!(f, "error {code} without close"),
            Failure::Refused { request, code } => write!(f, "{request} refused: {code}"),
            Failure::Protocol(detail) => write!(f, "protocol: {detail}"),
            Failure::Token(detail) => write!(f, "token: {detail}"),
        }
    }
}

/// The limit or condition a failure points to; used to say what stopped a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Limit {
    EphemeralPorts,
    GeneratorOpenFiles,
    GatewayFull,
    AcceptStalled,
    PerUserLimit,
    RateLimited,
    Credentials,
    Saturated,
    Refused,
    Dropped,
    Draining,
    GatewayError,
    SlowConsumer,
    ChannelForbidden,
    Other,
}

impl Limit {
    /// Every limit, for parsing labels back.
    pub const ALL: [Limit; 15] = [
        Limit::EphemeralPorts,
        Limit::GeneratorOpenFiles,
        Limit::GatewayFull,
        Limit::AcceptStalled,
        Limit::PerUserLimit,
        Limit::RateLimited,
        Limit::Credentials,
        Limit::Saturated,
        Limit::Refused,
        Limit::Dropped,
        Limit::Draining,
        Limit::GatewayError,
        Limit::SlowConsumer,
        Limit::ChannelForbidden,
        Limit::Other,
    ];

    /// Stable label (JSON and tallies).
    pub fn label(self) -> &'static str {
        match self {
            Limit::EphemeralPorts => "ephemeral_ports",
            Limit::GeneratorOpenFiles => "generator_open_files",
            Limit::GatewayFull => "gateway_full",
            Limit::AcceptStalled => "accept_stalled",
            Limit::PerUserLimit => "per_user_limit",
            Limit::RateLimited => "rate_limited",
            Limit::Credentials => "credentials",
            Limit::Saturated => "saturated",
            Limit::Refused => "refused",
            Limit::Dropped => "dropped",
            Limit::Draining => "draining",
            Limit::GatewayError => "gateway_error",
            Limit::SlowConsumer => "slow_consumer",
            Limit::ChannelForbidden => "channel_forbidden",
            Limit::Other => "other",
        }
    }

    pub fn from_label(label: &str) -> Option<Limit> {
        Limit::ALL.into_iter().find(|l| l.label() == label)
    }

    /// One sentence for the summary: what the limit is and what to change.
    pub fn explain(self) -> &'static str {
        match self {
            Limit::EphemeralPorts => {
                "out of ephemeral ports (EADDRNOTAVAIL): one source address reaches one \
                 target through about 28k ports; spread the load with --source-ips \
                 127.0.0.2-127.0.0.9"
            }
            Limit::GeneratorOpenFiles => {
                "the load generator hit its open-file limit (EMFILE): each process holds at \
                 most `ulimit -Hn` sockets; use more --processes"
            }
            Limit::GatewayFull => {
                "the gateway is full (close 1013 OVERLOADED or HTTP 503): its \
                 SB_MAX_CONNECTIONS or memory bound; add gateway processes"
            }
            Limit::AcceptStalled => {
                "TCP connects timed out: the gateway stopped accepting (most likely its own \
                 open-file limit, about 20,000 per process here) or its listen backlog is full"
            }
            Limit::PerUserLimit => {
                "the per-user connection limit (close 4509 CONNECTION_LIMIT): raise --users or \
                 run the gateway with SB_MAX_CONNECTIONS_PER_USER=0"
            }
            Limit::RateLimited => {
                "the gateway's connect rate limit (HTTP 429 or close 4029): lower --rate, \
                 spread --source-ips, or raise SB_CONNECT_RATE_PER_IP / SB_CONNECT_BURST_PER_IP"
            }
            Limit::Credentials => {
                "credentials were refused (close 4503/4001/4000 or HTTP 403): check --secret or \
                 --token-file against the gateway's SB_JWT_* settings"
            }
            Limit::Saturated => {
                "handshakes timed out after the TCP connect: the gateway or the generator is \
                 CPU-bound; lower --rate or --concurrency, or raise --timeout"
            }
            Limit::Refused => {
                "connections were refused (ECONNREFUSED): nothing listens at --url, or the \
                 listen queue overflowed"
            }
            Limit::Dropped => {
                "connections were dropped without a close frame (1006): the gateway crashed, \
                 was killed, or reset them"
            }
            Limit::Draining => {
                "the gateway was draining (close 1012 after `reconnect`, or 1001): it was shut \
                 down or restarted during the run"
            }
            Limit::GatewayError => "the gateway reported internal errors (close 1011 INTERNAL)",
            Limit::SlowConsumer => {
                "the gateway closed subscribers 4008 SLOW_CONSUMER: they did not read as fast as \
                 it delivered (its per-connection queue, SB_OUTBOUND_QUEUE, filled); the \
                 generator is CPU-bound or the rate is beyond the box: lower --rate, or give \
                 the generator more --processes"
            }
            Limit::ChannelForbidden => {
                "subscribe was refused FORBIDDEN: run the gateway with \
                 SB_PUBLIC_NAMESPACES listing the --namespace (default bench)"
            }
            Limit::Other => "other failures (see the table)",
        }
    }
}

impl Failure {
    /// The limit this failure points to.
    pub fn limit(&self) -> Limit {
        match self {
            Failure::Connect(ConnectError::EphemeralPorts) => Limit::EphemeralPorts,
            Failure::Connect(ConnectError::OpenFiles { .. }) => Limit::GeneratorOpenFiles,
            Failure::Connect(ConnectError::Refused) => Limit::Refused,
            Failure::Connect(ConnectError::Other(_)) => Limit::Other,
            Failure::Timeout(Stage::Tcp) => Limit::AcceptStalled,
            Failure::Timeout(_) => Limit::Saturated,
            Failure::Http(429) => Limit::RateLimited,
            Failure::Http(503) => Limit::GatewayFull,
            Failure::Http(401 | 403) => Limit::Credentials,
            Failure::Http(_) => Limit::Other,
            Failure::Closed { code, .. } => match code {
                1013 => Limit::GatewayFull,
                4509 => Limit::PerUserLimit,
                4029 => Limit::RateLimited,
                4000 | 4001 | 4503 => Limit::Credentials,
                1011 => Limit::GatewayError,
                1001 | 1012 => Limit::Draining,
                4008 => Limit::SlowConsumer,
                _ => Limit::Other,
            },
            Failure::Dropped { .. } => Limit::Dropped,
            Failure::Refused { code, .. } => match code.as_str() {
                "FORBIDDEN" => Limit::ChannelForbidden,
                "RATE_LIMITED" => Limit::RateLimited,
                "INTERNAL" => Limit::GatewayError,
                _ => Limit::Other,
            },
            Failure::ErrorFrame { .. } | Failure::Protocol(_) | Failure::Token(_) => Limit::Other,
        }
    }

    /// A failure from a tungstenite error at `stage`, after an `error` frame of code
    /// `error` if one came.
    pub fn from_ws(e: WsError, stage: Stage, error: Option<String>) -> Failure {
        match e {
            WsError::Http(response) => Failure::Http(response.status().as_u16()),
            WsError::ConnectionClosed
            | WsError::AlreadyClosed
            | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
                Failure::Dropped { stage, error }
            }
            WsError::Io(io) => match io.kind() {
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof => Failure::Dropped { stage, error },
                _ => Failure::Protocol(format!("{stage}: {}", ConnectError::classify(&io))),
            },
            other => Failure::Protocol(format!("{stage}: {other}")),
        }
    }
}

/// A connection that reached `authenticated`.
pub struct Authenticated {
    pub ws: Ws,
    /// TCP connect start to `authenticated` received.
    pub latency: Duration,
}

/// The fields of a server frame that the load generator looks at.
#[derive(Deserialize)]
struct Incoming {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    code: Option<String>,
}

/// Connects, upgrades with the bearer token and waits for `authenticated`, all within
/// `timeout`. Latency is measured from the start of the TCP connect.
pub async fn connect(
    target: &Target,
    source: Option<IpAddr>,
    token: &str,
    timeout: Duration,
) -> Result<Authenticated, Failure> {
    let start = Instant::now();
    let deadline = start + timeout;
    let tcp = match timeout_at(deadline, source::connect(target.addr, source)).await {
        Err(_) => return Err(Failure::Timeout(Stage::Tcp)),
        Ok(Err(e)) => return Err(Failure::Connect(ConnectError::classify(&e))),
        Ok(Ok(tcp)) => tcp,
    };
    let mut request = target
        .uri
        .clone()
        .into_client_request()
        .map_err(|e| Failure::Protocol(format!("request: {e}")))?;
    let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| Failure::Token("not a valid header value".to_owned()))?;
    request.headers_mut().insert(header::AUTHORIZATION, bearer);
    request.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(shared::protocol::SUBPROTOCOL),
    );
    let upgrade = tokio_tungstenite::client_async_with_config(request, tcp, Some(ws_config()));
    let mut ws = match timeout_at(deadline, upgrade).await {
        Err(_) => return Err(Failure::Timeout(Stage::Upgrade)),
        Ok(Err(e)) => return Err(Failure::from_ws(e, Stage::Upgrade, None)),
        Ok(Ok((ws, _response))) => ws,
    };
    let mut error_code = None;
    match timeout_at(deadline, await_authenticated(&mut ws, &mut error_code)).await {
        Err(_) => Err(match error_code {
            Some(code) => Failure::ErrorFrame { code },
            None => Failure::Timeout(Stage::Authenticated),
        }),
        Ok(Err(failure)) => Err(failure),
        Ok(Ok(())) => Ok(Authenticated {
            ws,
            latency: start.elapsed(),
        }),
    }
}

/// Reads until `authenticated` (Ok) or the end of the connection (the failure).
async fn await_authenticated(ws: &mut Ws, error_code: &mut Option<String>) -> Result<(), Failure> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let frame: Incoming = serde_json::from_str(text.as_str()).map_err(|e| {
                    Failure::Protocol(format!("unparseable frame before authenticated: {e}"))
                })?;
                match frame.kind.as_str() {
                    "authenticated" => return Ok(()),
                    "error" => *error_code = frame.code,
                    // Nothing else is expected before `authenticated`; tolerate it.
                    _ => {}
                }
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(Failure::Closed {
                    code: frame.map_or(1005, |f| u16::from(f.code)),
                    error: error_code.take(),
                });
            }
            Some(Ok(Message::Binary(_))) => {
                return Err(Failure::Protocol(
                    "binary frame before authenticated".to_owned(),
                ));
            }
            Some(Ok(_)) => {} // ping (answered by tungstenite), pong, raw frame
            Some(Err(e)) => {
                return Err(Failure::from_ws(e, Stage::Authenticated, error_code.take()));
            }
            None => {
                return Err(Failure::Dropped {
                    stage: Stage::Authenticated,
                    error: error_code.take(),
                });
            }
        }
    }
}

/// Subscribes an authenticated connection to `channel` and waits (until `deadline`)
/// for `subscribed`; returns the channel's offset at that moment (the last
/// publication before this subscriber joined).
pub async fn subscribe(ws: &mut Ws, channel: &str, deadline: Instant) -> Result<u64, Failure> {
    let send = ws.send(Message::text(crate::payload::subscribe_frame(channel)));
    match timeout_at(deadline, send).await {
        Err(_) => return Err(Failure::Timeout(Stage::Subscribe)),
        Ok(Err(e)) => return Err(Failure::from_ws(e, Stage::Subscribe, None)),
        Ok(Ok(())) => {}
    }
    let mut error_code = None;
    let wait = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    if let crate::payload::Frame::Other(o) = crate::payload::parse(text.as_str()) {
                        match o.kind.as_str() {
                            "subscribed" if o.channel.as_deref() == Some(channel) => {
                                return Ok(o.offset.unwrap_or(0));
                            }
                            "error" => {
                                let code = o.code.unwrap_or_else(|| "UNKNOWN".to_owned());
                                if o.id == Some(serde_json::Value::from("sub")) {
                                    return Err(Failure::Refused {
                                        request: "subscribe",
                                        code,
                                    });
                                }
                                error_code = Some(code);
                            }
                            _ => {}
                        }
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(Failure::Closed {
                        code: frame.map_or(1005, |f| u16::from(f.code)),
                        error: error_code.take(),
                    });
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    return Err(Failure::from_ws(e, Stage::Subscribe, error_code.take()));
                }
                None => {
                    return Err(Failure::Dropped {
                        stage: Stage::Subscribe,
                        error: error_code.take(),
                    });
                }
            }
        }
    };
    timeout_at(deadline, wait)
        .await
        .unwrap_or(Err(Failure::Timeout(Stage::Subscribe)))
}

/// Holds an authenticated connection: keeps reading (which answers pings) until `stop`
/// is cancelled, then closes with 1000. Returns the failure if the server ended the
/// connection first.
pub async fn hold(mut ws: Ws, stop: &CancellationToken) -> Result<(), Failure> {
    read_until(&mut ws, stop).await?;
    close(ws).await;
    Ok(())
}

/// Reads and drops whatever arrives (answering pings) until `stop` is cancelled; the
/// failure if the server ended the connection first.
pub async fn read_until(ws: &mut Ws, stop: &CancellationToken) -> Result<(), Failure> {
    let mut error_code: Option<String> = None;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(()),
            msg = ws.next() => {
                if let Some(failure) = ended(msg, Stage::Holding, &mut error_code) {
                    return Err(failure);
                }
            }
        }
    }
}

/// What one read says about the connection: `Some(failure)` when it ended (close
/// frame, error, end of stream); otherwise `None`, remembering the `code` of an
/// `error` frame so that a close that follows names it.
pub fn ended(
    msg: Option<Result<Message, WsError>>,
    stage: Stage,
    error_code: &mut Option<String>,
) -> Option<Failure> {
    match msg {
        Some(Ok(Message::Text(text))) => {
            if let Ok(frame) = serde_json::from_str::<Incoming>(text.as_str())
                && frame.kind == "error"
            {
                *error_code = frame.code;
            }
            None
        }
        Some(Ok(Message::Close(frame))) => Some(Failure::Closed {
            code: frame.map_or(1005, |f| u16::from(f.code)),
            error: error_code.take(),
        }),
        Some(Ok(_)) => None,
        Some(Err(e)) => Some(Failure::from_ws(e, stage, error_code.take())),
        None => Some(Failure::Dropped {
            stage,
            error: error_code.take(),
        }),
    }
}

/// Sends a normal close and waits (bounded) for the server's close or EOF.
pub async fn close(mut ws: Ws) {
    let deadline = Instant::now() + CLOSE_TIMEOUT;
    let frame = CloseFrame {
        code: WsCloseCode::Normal,
        reason: "load test done".into(),
    };
    if timeout_at(deadline, ws.send(Message::Close(Some(frame))))
        .await
        .is_err()
    {
        return;
    }
    let _ = timeout_at(deadline, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_errors_are_classified() {
        let e = io::Error::from_raw_os_error(nix::errno::Errno::EADDRNOTAVAIL as i32);
        assert_eq!(ConnectError::classify(&e), ConnectError::EphemeralPorts);
        let e = io::Error::from_raw_os_error(nix::errno::Errno::EMFILE as i32);
        assert_eq!(
            ConnectError::classify(&e),
            ConnectError::OpenFiles { system_wide: false }
        );
        let e = io::Error::from_raw_os_error(nix::errno::Errno::ECONNREFUSED as i32);
        assert_eq!(ConnectError::classify(&e), ConnectError::Refused);
        let e = io::Error::from_raw_os_error(nix::errno::Errno::EHOSTUNREACH as i32);
        assert_eq!(ConnectError::classify(&e).to_string(), "EHOSTUNREACH");
    }

    #[test]
    fn failures_name_their_cause_and_limit() {
        let cases = [
            (
                Failure::Connect(ConnectError::EphemeralPorts),
                "connect: out of ephemeral ports (EADDRNOTAVAIL)",
                Limit::EphemeralPorts,
            ),
            (
                Failure::Connect(ConnectError::OpenFiles { system_wide: false }),
                "connect: open-file limit (EMFILE)",
                Limit::GeneratorOpenFiles,
            ),
            (
                Failure::Closed {
                    code: 4509,
                    error: Some("CONNECTION_LIMIT".into()),
                },
                "close 4509 CONNECTION_LIMIT",
                Limit::PerUserLimit,
            ),
            (
                Failure::Closed {
                    code: 1013,
                    error: None,
                },
                "close 1013 (OVERLOADED)",
                Limit::GatewayFull,
            ),
            (
                Failure::Closed {
                    code: 4029,
                    error: Some("RATE_LIMITED".into()),
                },
                "close 4029 RATE_LIMITED",
                Limit::RateLimited,
            ),
            (
                Failure::Http(429),
                "http 429 Too Many Requests",
                Limit::RateLimited,
            ),
            (Failure::Http(403), "http 403 Forbidden", Limit::Credentials),
            (
                Failure::Http(503),
                "http 503 Service Unavailable",
                Limit::GatewayFull,
            ),
            (
                Failure::Timeout(Stage::Tcp),
                "timeout: tcp connect",
                Limit::AcceptStalled,
            ),
            (
                Failure::Timeout(Stage::Authenticated),
                "timeout: waiting for authenticated",
                Limit::Saturated,
            ),
            (
                Failure::Dropped {
                    stage: Stage::Holding,
                    error: None,
                },
                "close 1006 (no close frame) holding",
                Limit::Dropped,
            ),
            (
                Failure::Closed {
                    code: 4242,
                    error: None,
                },
                "close 4242",
                Limit::Other,
            ),
            (
                Failure::Closed {
                    code: 4008,
                    error: Some("SLOW_CONSUMER".into()),
                },
                "close 4008 SLOW_CONSUMER",
                Limit::SlowConsumer,
            ),
            (
                Failure::Refused {
                    request: "subscribe",
                    code: "FORBIDDEN".into(),
                },
                "subscribe refused: FORBIDDEN",
                Limit::ChannelForbidden,
            ),
            (
                Failure::Timeout(Stage::Subscribe),
                "timeout: waiting for subscribed",
                Limit::Saturated,
            ),
        ];
        for (failure, text, limit) in cases {
            assert_eq!(failure.to_string(), text);
            assert_eq!(failure.limit(), limit, "{text}");
        }
    }

    #[test]
    fn limit_labels_round_trip() {
        for l in Limit::ALL {
            assert_eq!(Limit::from_label(l.label()), Some(l));
            assert!(!l.explain().is_empty());
        }
        assert_eq!(Limit::from_label("nope"), None);
    }
}
