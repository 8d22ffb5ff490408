//! The subscription multiplexer: one NATS connection of the node's own that
//! carries every per-user and per-channel `SUB` and hands each `MSG` straight to the
//! hub. async-nats gives every subscription its own channel (a 32-slot block, about
//! 6 KiB, allocated up front) and the hub needed a task per subject to drain it; with
//! one subscription per connected user that was over a third of the gateway's memory.
//! Publishing, requests and JetStream stay on async-nats.
//!
//! The subscription table is the truth: after a reconnect the whole table is sent
//! again, so a `SUB` queued while NATS was away is never lost. Core NATS messages
//! published while the connection was down are lost, as they are for any NATS client;
//! channels repair that from history by offset.
//!
//! `tls://` servers (and servers whose `INFO` requires TLS) get TLS after `INFO`, as
//! the NATS protocol orders it, verified against `SB_NATS_TLS_CA` or else the
//! system's roots.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, oneshot};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_util::sync::CancellationToken;

/// Time to open the TCP connection and finish the CONNECT/PING/PONG handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle keepalive: a PING after this much silence; two unanswered PINGs end the
/// connection (nats-server's own defaults are 2 min and 2, too slow for readiness).
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered PINGs before the connection is declared stale.
pub const MAX_PINGS_OUT: usize = 2;
/// A write that makes no progress for this long means a wedged server.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// First reconnect delay; doubles per failed attempt up to [`RECONNECT_MAX`].
pub const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Reconnect delay cap: NATS restarts take seconds, and readiness is 503 meanwhile.
pub const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// A protocol line longer than this is a broken server or stream (subjects are
/// short; nats-server's own limit is 4 KiB).
pub const MAX_CONTROL_LINE: usize = 16 * 1024;
/// Read buffer growth step.
const READ_CHUNK: usize = 64 * 1024;
/// `max_payload` when a server's `INFO` leaves it out: the NATS server's default.
const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

/// The connection's halves, plain or TLS.
type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// What a subscription delivers to; the multiplexer only carries it.
#[derive(Debug, Clone)]
pub enum Topic {
    User(Arc<str>),
    Channel(Arc<str>),
}

/// The headers the gateway reads from a message (see `headers.rs`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Headers {
    pub offset: Option<u64>,
    pub epoch: Option<u64>,
    pub ts: Option<u64>,
    pub from: Option<Arc<str>>,
    pub skip_sender: bool,
    pub channel: Option<Arc<str>>,
    /// The chat request a worker's frame belongs to (`Sb-Request`).
    pub request: Option<Arc<str>>,
    /// The request's final frame (`Sb-Final`).
    pub last: bool,
}

/// One message for the hub.
#[derive(Debug, Clone)]
pub struct Msg {
    pub payload: Bytes,
    pub headers: Headers,
}

/// Where messages go: the hub.
pub trait Deliver: Send + Sync + 'static {
    fn deliver(&self, topic: &Topic, msg: Msg);
    /// The connection came back and every subscription was sent again: what was
    /// published meanwhile never arrived here.
    fn resubscribed(&self) {}
}

#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    #[error("NATS connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("NATS refused the connection: {0}")]
    Refused(String),
    #[error("NATS protocol: {0}")]
    Protocol(String),
    #[error("NATS did not answer in time")]
    Timeout,
    #[error("NATS connection lost before the server confirmed")]
    Lost,
    #[error("NATS TLS: {0}")]
    Tls(String),
}

/// A server address from `SB_NATS_URL` with its credentials.
#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub pass: Option<String>,
    pub token: Option<String>,
    /// `tls://`: TLS even when the server's `INFO` does not ask for it.
    pub tls: bool,
}

/// The multiplexer's servers from `SB_NATS_URL` as parsed once by
/// `shared::config::parse_nats_servers`, in order: the whole list, so the
/// subscription connection fails over between the servers of a NATS cluster like the
/// async-nats client does. A user without password is a token. Other schemes (ws)
/// are not spoken here: `None` tells the caller to keep async-nats subscriptions for
/// them.
pub fn servers_from(addrs: &[async_nats::ServerAddr]) -> Option<Vec<Server>> {
    if addrs.is_empty() || addrs.iter().any(|a| !matches!(a.scheme(), "nats" | "tls")) {
        return None;
    }
    let servers = addrs
        .iter()
        .map(|a| {
            let (user, pass, token) = match (a.username(), a.password()) {
                (Some(u), Some(p)) => (Some(u.to_owned()), Some(p.to_owned()), None),
                (Some(t), None) => (None, None, Some(t.to_owned())),
                _ => (None, None, None),
            };
            Server {
                host: a.host().to_owned(),
                port: a.port(),
                user,
                pass,
                token,
                tls: a.scheme() == "tls",
            }
        })
        .collect();
    Some(servers)
}

struct Sub {
    subject: String,
    topic: Topic,
}

#[derive(Default)]
struct State {
    subs: HashMap<u64, Sub>,
    /// Commands for the current connection, written by the writer.
    out: BytesMut,
    /// Flush waiters not yet covered by a PING.
    waiters: Vec<oneshot::Sender<()>>,
    /// One entry per PING in flight, in order: the waiters its PONG releases.
    inflight: VecDeque<Vec<oneshot::Sender<()>>>,
}

/// The node's subscription connection; cheap to share.
pub struct Mux {
    servers: Vec<Server>,
    name: String,
    /// For `tls://` servers and servers that require TLS; `None` refuses them.
    tls: Option<TlsConnector>,
    state: Mutex<State>,
    wake: Notify,
    connected: AtomicBool,
    next_sid: AtomicU64,
}

impl Mux {
    pub fn new(servers: Vec<Server>, name: String, tls: Option<TlsConnector>) -> Arc<Mux> {
        Arc::new(Mux {
            servers,
            name,
            tls,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            connected: AtomicBool::new(false),
            next_sid: AtomicU64::new(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Number of subscriptions held (a gauge for operators and tests).
    pub fn len(&self) -> usize {
        self.lock().subs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues a `SUB` and returns its id. It reaches the server with the next write
    /// (or the next connection); [`Mux::flush`] waits until the server has it.
    pub fn subscribe(&self, subject: String, topic: Topic) -> u64 {
        let sid = self.next_sid.fetch_add(1, Ordering::Relaxed);
        {
            let mut st = self.lock();
            push_sub(&mut st.out, &subject, sid);
            st.subs.insert(sid, Sub { subject, topic });
        }
        self.wake.notify_one();
        sid
    }

    pub fn unsubscribe(&self, sid: u64) {
        {
            let mut st = self.lock();
            if st.subs.remove(&sid).is_none() {
                return;
            }
            st.out.extend_from_slice(b"UNSUB ");
            st.out
                .extend_from_slice(itoa_u64(sid, &mut [0; 20]).as_bytes());
            st.out.extend_from_slice(b"\r\n");
        }
        self.wake.notify_one();
    }

    /// Waits until the server has processed everything queued before this call (a
    /// PING/PONG round trip, shared by every caller waiting at the same time).
    pub async fn flush(&self, timeout: Duration) -> Result<(), MuxError> {
        let (tx, rx) = oneshot::channel();
        self.lock().waiters.push(tx);
        self.wake.notify_one();
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(MuxError::Lost),
            Err(_) => Err(MuxError::Timeout),
        }
    }

    /// Keeps the connection up (reconnecting with backoff) until `stop`.
    pub async fn run(self: Arc<Self>, sink: Arc<dyn Deliver>, stop: CancellationToken) {
        let mut failures: u32 = 0;
        // Start at a random server of the list so the nodes of a NATS cluster share
        // the gateways' subscription connections; then round robin on failures.
        let mut next = rand::random::<u32>() as usize;
        loop {
            let server = &self.servers[next % self.servers.len()];
            next += 1;
            let session = async {
                let (rd, wr, info_max) = self.handshake(server).await?;
                failures = 0;
                self.session(rd, wr, info_max, &*sink).await
            };
            let res = tokio::select! {
                _ = stop.cancelled() => break,
                r = session => r,
            };
            self.disconnected();
            if let Err(e) = res {
                metrics::counter!(shared::metrics::NATS_ERRORS, "op" => "mux").increment(1);
                tracing::warn!(server = %server.host, port = server.port, error = %e, "NATS subscription connection down");
            }
            failures = failures.saturating_add(1);
            let backoff = RECONNECT_MIN
                .saturating_mul(1 << failures.min(5))
                .min(RECONNECT_MAX);
            let jitter = Duration::from_millis(rand::random::<u64>() % 100);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(backoff + jitter) => {}
            }
        }
        self.disconnected();
    }

    fn disconnected(&self) {
        self.connected.store(false, Ordering::Release);
        // Waiters of PINGs sent on the dead connection learn that it died; waiters
        // not yet covered by a PING wait for the next connection.
        self.lock().inflight.clear();
    }

    async fn handshake(&self, server: &Server) -> Result<(Reader, Writer, usize), MuxError> {
        let fut = async {
            let mut stream = TcpStream::connect((server.host.as_str(), server.port)).await?;
            stream.set_nodelay(true)?;
            let mut buf = BytesMut::with_capacity(4096);
            let info = read_line(&mut stream, &mut buf).await?;
            let info = info
                .strip_prefix("INFO ")
                .ok_or_else(|| MuxError::Protocol(format!("expected INFO, got {info:?}")))?;
            let info: serde_json::Value =
                serde_json::from_str(info).map_err(|e| MuxError::Protocol(format!("INFO: {e}")))?;
            let tls_required = info.get("tls_required").and_then(|v| v.as_bool()) == Some(true);
            let (mut rd, mut wr): (Reader, Writer) = if server.tls || tls_required {
                let Some(connector) = &self.tls else {
                    return Err(MuxError::Refused("the server requires TLS".into()));
                };
                let name = ServerName::try_from(server.host.clone())
                    .map_err(|e| MuxError::Tls(format!("server name {:?}: {e}", server.host)))?;
                let (r, w) = tokio::io::split(connector.connect(name, stream).await?);
                (Box::new(r), Box::new(w))
            } else {
                let (r, w) = stream.into_split();
                (Box::new(r), Box::new(w))
            };
            let max_payload = info
                .get("max_payload")
                .and_then(|v| v.as_u64())
                .map_or(DEFAULT_MAX_PAYLOAD, |v| v as usize);
            let mut connect = serde_json::json!({
                "verbose": false, "pedantic": false, "lang": "rust-switchboard",
                "version": env!("CARGO_PKG_VERSION"), "protocol": 1, "headers": true,
                "no_responders": true, "name": self.name,
            });
            if let Some(u) = &server.user {
                connect["user"] = u.as_str().into();
            }
            if let Some(p) = &server.pass {
                connect["pass"] = p.as_str().into();
            }
            if let Some(t) = &server.token {
                connect["auth_token"] = t.as_str().into();
            }
            wr.write_all(format!("CONNECT {connect}\r\nPING\r\n").as_bytes())
                .await?;
            loop {
                let line = read_line(&mut rd, &mut buf).await?;
                match line.as_str() {
                    "PONG" => break,
                    "+OK" => {}
                    l if l.starts_with("-ERR") => return Err(MuxError::Refused(l.to_owned())),
                    l if l.starts_with("INFO ") || l == "PING" => {}
                    l => return Err(MuxError::Protocol(format!("unexpected {l:?}"))),
                }
            }
            Ok::<_, MuxError>((rd, wr, max_payload))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, fut)
            .await
            .map_err(|_| MuxError::Timeout)?
    }

    async fn session(
        &self,
        rd: Reader,
        wr: Writer,
        max_payload: usize,
        sink: &dyn Deliver,
    ) -> Result<(), MuxError> {
        {
            // Everything queued for the old connection is replaced by the table.
            let mut st = self.lock();
            let State { subs, out, .. } = &mut *st;
            out.clear();
            for (sid, sub) in subs.iter() {
                push_sub(out, &sub.subject, *sid);
            }
        }
        self.connected.store(true, Ordering::Release);
        self.wake.notify_one();
        sink.resubscribed();
        tokio::select! {
            r = self.read_loop(rd, max_payload, sink) => r,
            r = self.write_loop(wr) => r,
        }
    }

    async fn write_loop(&self, mut wr: Writer) -> Result<(), MuxError> {
        loop {
            let woken = tokio::time::timeout(PING_INTERVAL, self.wake.notified())
                .await
                .is_ok();
            let out = {
                let mut st = self.lock();
                if !woken {
                    if st.inflight.len() >= MAX_PINGS_OUT {
                        return Err(MuxError::Protocol("stale connection: no PONG".into()));
                    }
                    st.out.extend_from_slice(b"PING\r\n");
                    st.inflight.push_back(Vec::new());
                } else if !st.waiters.is_empty() {
                    let waiters = std::mem::take(&mut st.waiters);
                    st.out.extend_from_slice(b"PING\r\n");
                    st.inflight.push_back(waiters);
                }
                st.out.split()
            };
            if out.is_empty() {
                continue;
            }
            tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&out))
                .await
                .map_err(|_| MuxError::Timeout)??;
        }
    }

    async fn read_loop(
        &self,
        mut rd: Reader,
        max_payload: usize,
        sink: &dyn Deliver,
    ) -> Result<(), MuxError> {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let mut parser = Parser::new(max_payload);
        loop {
            while let Some(frame) = parser.next(&mut buf)? {
                self.on_frame(frame, sink);
            }
            buf.reserve(READ_CHUNK);
            if rd.read_buf(&mut buf).await? == 0 {
                return Err(MuxError::Lost);
            }
        }
    }

    fn on_frame(&self, frame: Frame, sink: &dyn Deliver) {
        match frame {
            Frame::Msg { sid, msg } => {
                let topic = self.lock().subs.get(&sid).map(|s| s.topic.clone());
                // A message for a subscription just dropped is expected; ignore it.
                if let Some(topic) = topic {
                    sink.deliver(&topic, msg);
                }
            }
            Frame::Ping => {
                self.lock().out.extend_from_slice(b"PONG\r\n");
                self.wake.notify_one();
            }
            Frame::Pong => {
                if let Some(waiters) = self.lock().inflight.pop_front() {
                    for w in waiters {
                        let _ = w.send(());
                    }
                }
            }
            Frame::Err(e) => {
                tracing::warn!(error = %e, "NATS server error on the subscription connection");
            }
            Frame::Other => {}
        }
    }
}

fn push_sub(out: &mut BytesMut, subject: &str, sid: u64) {
    out.extend_from_slice(b"SUB ");
    out.extend_from_slice(subject.as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(itoa_u64(sid, &mut [0; 20]).as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn itoa_u64(mut n: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

async fn read_line(
    rd: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> Result<String, MuxError> {
    loop {
        if let Some(pos) = find_crlf(buf) {
            let line = buf.split_to(pos + 2);
            return Ok(String::from_utf8_lossy(&line[..pos]).into_owned());
        }
        if buf.len() > MAX_CONTROL_LINE {
            return Err(MuxError::Protocol("control line too long".into()));
        }
        if rd.read_buf(buf).await? == 0 {
            return Err(MuxError::Lost);
        }
    }
}

/// The TLS client for `tls://` servers: trusts the PEM certificates in `ca` (the
/// `SB_NATS_TLS_CA` file), or the system's roots without one, as async-nats does.
pub fn tls_connector(ca: Option<&Path>) -> Result<TlsConnector, MuxError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| MuxError::Tls(format!("{}: {e}", path.display())))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| MuxError::Tls(format!("{}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| MuxError::Tls(format!("{}: {e}", path.display())))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    if roots.is_empty() {
        return Err(MuxError::Tls("no trusted root certificate".into()));
    }
    let config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// What the server sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Msg { sid: u64, msg: Msg },
    Ping,
    Pong,
    Err(String),
    Other,
}

impl PartialEq for Msg {
    fn eq(&self, o: &Msg) -> bool {
        self.payload == o.payload && self.headers == o.headers
    }
}

/// Incremental parser of the server side of the NATS protocol.
pub struct Parser {
    max_payload: usize,
}

impl Parser {
    pub fn new(max_payload: usize) -> Parser {
        Parser { max_payload }
    }

    /// The next complete frame in `buf` (consumed), or `None` when more bytes are
    /// needed.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, MuxError> {
        // The same limit whether the line's CRLF came in this read or a later one: a
        // trailing `\r` may be the start of the CRLF, so it does not count yet.
        let Some(pos) = find_crlf(buf) else {
            if buf.len() - usize::from(buf.ends_with(b"\r")) > MAX_CONTROL_LINE {
                return Err(MuxError::Protocol("control line too long".into()));
            }
            return Ok(None);
        };
        if pos > MAX_CONTROL_LINE {
            return Err(MuxError::Protocol("control line too long".into()));
        }
        let line = std::str::from_utf8(&buf[..pos])
            .map_err(|_| MuxError::Protocol("control line is not UTF-8".into()))?;
        let (op, args) = line.split_once(' ').unwrap_or((line, ""));
        let (sid, hdr_len, total) = match op {
            "MSG" => {
                let a: Vec<&str> = args.split_ascii_whitespace().collect();
                // subject sid [reply-to] #bytes
                let (sid, size) = match a.len() {
                    3 => (a[1], a[2]),
                    4 => (a[1], a[3]),
                    _ => return Err(MuxError::Protocol(format!("bad MSG line {line:?}"))),
                };
                (num(sid, line)?, 0, num(size, line)? as usize)
            }
            "HMSG" => {
                // subject sid [reply-to] #header-bytes #total-bytes
                let a: Vec<&str> = args.split_ascii_whitespace().collect();
                let (sid, h, t) = match a.len() {
                    4 => (a[1], a[2], a[3]),
                    5 => (a[1], a[3], a[4]),
                    _ => return Err(MuxError::Protocol(format!("bad HMSG line {line:?}"))),
                };
                (
                    num(sid, line)?,
                    num(h, line)? as usize,
                    num(t, line)? as usize,
                )
            }
            _ => {
                let frame = match op {
                    "PING" => Frame::Ping,
                    "PONG" => Frame::Pong,
                    "-ERR" => Frame::Err(args.trim_matches('\'').to_owned()),
                    _ => Frame::Other,
                };
                buf.advance(pos + 2);
                return Ok(Some(frame));
            }
        };
        if hdr_len > total || total > self.max_payload.saturating_add(64 * 1024) {
            return Err(MuxError::Protocol(format!("bad sizes in {line:?}")));
        }
        let need = pos + 2 + total + 2;
        if buf.len() < need {
            buf.reserve(need - buf.len());
            return Ok(None);
        }
        buf.advance(pos + 2);
        let mut body = buf.split_to(total + 2);
        if &body[total..] != b"\r\n" {
            return Err(MuxError::Protocol("message not followed by CRLF".into()));
        }
        body.truncate(total);
        let headers = if hdr_len > 0 {
            parse_headers(&body[..hdr_len])
        } else {
            Headers::default()
        };
        body.advance(hdr_len);
        Ok(Some(Frame::Msg {
            sid,
            msg: Msg {
                payload: body.freeze(),
                headers,
            },
        }))
    }
}

fn num(s: &str, line: &str) -> Result<u64, MuxError> {
    s.parse()
        .map_err(|_| MuxError::Protocol(format!("bad number in {line:?}")))
}

/// Reads the gateway's headers from a `NATS/1.0` header block; others are ignored.
pub fn parse_headers(block: &[u8]) -> Headers {
    let text = String::from_utf8_lossy(block);
    headers_from(
        text.split("\r\n")
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim(), value.trim())),
    )
}

/// The same headers from a bus message (the per-subscription path).
pub fn headers_of(msg: &shared::bus::Message) -> Headers {
    headers_from(msg.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

fn headers_from<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Headers {
    use crate::headers::{
        HEADER_CHANNEL, HEADER_EPOCH, HEADER_FROM, HEADER_OFFSET, HEADER_SKIP_SENDER, HEADER_TS,
    };
    use shared::bus::stream::{HEADER_FINAL, HEADER_REQUEST};
    let mut h = Headers::default();
    for (name, value) in pairs {
        if name.eq_ignore_ascii_case(HEADER_OFFSET) {
            h.offset = value.parse().ok();
        } else if name.eq_ignore_ascii_case(HEADER_EPOCH) {
            h.epoch = value.parse().ok();
        } else if name.eq_ignore_ascii_case(HEADER_TS) {
            h.ts = value.parse().ok();
        } else if name.eq_ignore_ascii_case(HEADER_FROM) {
            h.from = Some(value.into());
        } else if name.eq_ignore_ascii_case(HEADER_SKIP_SENDER) {
            h.skip_sender = true;
        } else if name.eq_ignore_ascii_case(HEADER_CHANNEL) {
            h.channel = Some(value.into());
        } else if name.eq_ignore_ascii_case(HEADER_REQUEST) {
            h.request = Some(value.into());
        } else if name.eq_ignore_ascii_case(HEADER_FINAL) {
            h.last = true;
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8]) -> Vec<Frame> {
        let mut p = Parser::new(1 << 20);
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(f) = p.next(&mut buf).unwrap() {
            out.push(f);
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        out
    }

    #[test]
    fn parses_msg_hmsg_and_control_lines() {
        let input = b"PING\r\nMSG a.b 7 5\r\nhello\r\nMSG a.b 8 _INBOX.x 0\r\n\r\n\
HMSG sb.user.u 9 47 49\r\nNATS/1.0\r\nSb-Offset: 42\r\nSb-Channel: team:x\r\n\r\nhi\r\n\
+OK\r\n-ERR 'Permissions Violation'\r\nPONG\r\n";
        let frames = parse_all(input);
        assert_eq!(frames[0], Frame::Ping);
        assert_eq!(
            frames[1],
            Frame::Msg {
                sid: 7,
                msg: Msg {
                    payload: Bytes::from_static(b"hello"),
                    headers: Headers::default()
                }
            }
        );
        assert!(matches!(&frames[2], Frame::Msg { sid: 8, msg } if msg.payload.is_empty()));
        match &frames[3] {
            Frame::Msg { sid: 9, msg } => {
                assert_eq!(&msg.payload[..], b"hi");
                assert_eq!(msg.headers.offset, Some(42));
                assert_eq!(msg.headers.channel.as_deref(), Some("team:x"));
            }
            f => panic!("unexpected {f:?}"),
        }
        assert_eq!(frames[4], Frame::Other);
        assert_eq!(frames[5], Frame::Err("Permissions Violation".into()));
        assert_eq!(frames[6], Frame::Pong);
    }

    #[test]
    fn waits_for_the_whole_message_at_every_split() {
        let input: &[u8] =
            b"MSG s 1 11\r\nhello world\r\nHMSG s 2 22 24\r\nNATS/1.0\r\nSb-Ts: 5\r\n\r\nok\r\n";
        for cut in 0..input.len() {
            let mut p = Parser::new(1 << 20);
            let mut buf = BytesMut::from(&input[..cut]);
            let mut frames = Vec::new();
            while let Some(f) = p.next(&mut buf).unwrap() {
                frames.push(f);
            }
            buf.extend_from_slice(&input[cut..]);
            while let Some(f) = p.next(&mut buf).unwrap() {
                frames.push(f);
            }
            assert_eq!(frames.len(), 2, "cut at {cut}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn refuses_broken_input() {
        for bad in [
            &b"MSG s x 5\r\nhello\r\n"[..],
            b"MSG s 1\r\n",
            b"MSG s 1 5\r\nhelloXX",
            b"HMSG s 1 10 5\r\n",
            b"MSG s 1 99999999999\r\n",
        ] {
            let mut p = Parser::new(1 << 20);
            let mut buf = BytesMut::from(bad);
            assert!(
                p.next(&mut buf).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut p = Parser::new(1 << 20);
        let mut buf = BytesMut::from(&vec![b'x'; MAX_CONTROL_LINE + 1][..]);
        assert!(p.next(&mut buf).is_err());
    }

    #[test]
    fn takes_every_server_of_the_list() {
        let parse = |s: &str| shared::config::parse_nats_servers(s).unwrap();
        let s = servers_from(&parse(
            "nats://u:p@127.0.0.1:4223, nats://tok@h ,nats://h2:5",
        ))
        .unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!((s[0].host.as_str(), s[0].port), ("127.0.0.1", 4223));
        assert_eq!(
            (s[0].user.as_deref(), s[0].pass.as_deref()),
            (Some("u"), Some("p"))
        );
        assert_eq!((s[1].host.as_str(), s[1].port), ("h", 4222));
        assert_eq!(s[1].token.as_deref(), Some("tok"));
        assert_eq!((s[2].host.as_str(), s[2].port), ("h2", 5));
        let v6 = servers_from(&parse("nats://[::1]:4222")).unwrap();
        assert_eq!((v6[0].host.as_str(), v6[0].port), ("::1", 4222));
        let tls = servers_from(&parse("nats://a:1,tls://h:4222")).unwrap();
        assert_eq!((tls[0].tls, tls[1].tls), (false, true));
        assert!(servers_from(&parse("ws://h:4222")).is_none());
        assert!(servers_from(&[]).is_none());
    }
}
