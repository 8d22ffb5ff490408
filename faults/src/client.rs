//! The protocol client: one simulated user that behaves like a well-written app
//! (docs/PROTOCOL.md). It connects through the load balancer, reconnects by the
//! close-code rules (1012 at once with jitter up to `retry_after_ms`, backoff for
//! 1006/1011/1013/4xxx, never for 45xx), re-subscribes its channel with `since`,
//! drops repeated chat chunks by (`request_id`, `seq`), fills chat replies it may
//! have missed from `history` after a reconnect (and after a long silence), and
//! records everything the suite asserts on: attempts, closes and their codes,
//! reconnect times, `authenticated` (node, degraded), errors, channel offsets (gaps
//! and duplicates), delivery latency and every chat stream.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use shared::protocol::{CloseCode, ReconnectPolicy};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_util::sync::CancellationToken;

/// TCP connect, upgrade and `authenticated` together; a healthy cluster needs
/// milliseconds, a cluster without Redis answers at once with UNAVAILABLE.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing side waits for the peer's close frame.
pub const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Backoff of reconnects after an abnormal close or a refused attempt (doubling,
/// jittered), as an app would: fast first retry, bounded so a long outage is not
/// hammered.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Jitter ceiling for a 1012 close without a `reconnect` frame before it.
pub const DEFAULT_RECONNECT_JITTER_MS: u64 = 1000;
/// An acked chat with no event for this long is looked up in `history`: a client
/// that stayed connected through a NATS restart may have missed `chat.complete`.
pub const STALL_AFTER: Duration = Duration::from_secs(8);
/// Commands queued for one connection at most.
const COMMAND_QUEUE: usize = 64;
/// The subprotocol every client offers.
const SUBPROTOCOL: &str = shared::protocol::SUBPROTOCOL;
/// Latency samples kept per user between two scenario reads (bounded memory).
const MAX_LATENCIES: usize = 200_000;

pub type Ws = WebSocketStream<TcpStream>;

/// What every client shares: where to connect and how to mint tokens.
pub struct Env {
    pub lb: SocketAddr,
    pub url: String,
    pub secret: String,
}

/// Who a simulated user is.
#[derive(Debug, Clone)]
pub struct Profile {
    pub id: String,
    /// Source address (127.0.0.x): per-address connect limits see distinct clients.
    pub src_ip: Ipv4Addr,
    /// The `room:` channel the user subscribes to, if any.
    pub channel: Option<String>,
    /// A small receive buffer (the slow client), bytes.
    pub recv_buffer: Option<u32>,
}

/// Unix milliseconds (delivery latency uses the publisher's timestamp).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone)]
pub struct Failure {
    pub at: Instant,
    pub cause: String,
}

/// A connection that ended.
#[derive(Debug, Clone)]
pub struct Ended {
    pub at: Instant,
    /// The close code the server sent; `None` = no close frame (1006 in a browser).
    pub code: Option<u16>,
    /// The client closed it (churn, end of run).
    pub by_client: bool,
    /// A `reconnect` frame came before the close.
    pub after_reconnect_frame: bool,
    /// Frames other than `reconnect` and `error` in the last 0 ms before the close do
    /// not matter; what the server said last (error code) does.
    pub last_error: Option<String>,
    pub node: Option<String>,
}

/// A connection that came back after the server ended the previous one.
#[derive(Debug, Clone)]
pub struct Reconnect {
    pub down_at: Instant,
    pub up_at: Instant,
    pub code: Option<u16>,
    pub from: Option<String>,
    pub to: String,
}

#[derive(Debug, Clone)]
pub struct Auth {
    pub at: Instant,
    pub node: String,
    pub degraded: bool,
    pub teams: usize,
}

#[derive(Debug, Clone)]
pub struct ErrorSeen {
    pub at: Instant,
    pub code: String,
    pub id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct SubRec {
    pub at: Instant,
    pub since: Option<u64>,
    pub recovered: bool,
    pub offset: u64,
}

/// How a reply came to be known without its live `chat.complete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Read from `history` right after a reconnect.
    Reconnect,
    /// Read from `history` after a long silence on a live connection.
    Stall,
}

/// One chat request (one `request_id`) as the client saw it.
#[derive(Debug, Clone, Default)]
pub struct Stream {
    pub acked_at: Option<Instant>,
    /// Chunks of the latest delivery, by `seq` (repeats dropped).
    pub chunks: BTreeMap<u64, String>,
    pub dup_chunks: u64,
    pub complete: Option<String>,
    pub completes: u32,
    pub complete_at: Option<Instant>,
    pub error: Option<(String, bool)>,
    pub filled: Option<(String, Fill)>,
}

impl Stream {
    /// The reply is known (live, or from history) or the request failed visibly.
    pub fn resolved(&self) -> bool {
        self.complete.is_some() || self.filled.is_some() || self.error.is_some()
    }

    /// The whole reply as the client holds it.
    pub fn reply(&self) -> Option<&str> {
        self.complete
            .as_deref()
            .or(self.filled.as_ref().map(|(c, _)| c.as_str()))
    }
}

/// A chat session the client owns (the suite uses one session per user message).
#[derive(Debug, Clone)]
pub struct Chat {
    pub started: Instant,
    /// Request ids in the order their `ack` arrived (a retry adds one).
    pub acked: Vec<String>,
    pub streams: HashMap<String, Stream>,
    pub last_event: Instant,
    pub history_asked: Option<Instant>,
}

impl Chat {
    fn new(now: Instant) -> Chat {
        Chat {
            started: now,
            acked: Vec::new(),
            streams: HashMap::new(),
            last_event: now,
            history_asked: None,
        }
    }

    /// The latest acked request, if any.
    pub fn latest(&self) -> Option<(&String, &Stream)> {
        let id = self.acked.last()?;
        Some((id, self.streams.get(id)?))
    }

    fn unresolved(&self) -> bool {
        self.latest().is_none_or(|(_, s)| !s.resolved())
    }
}

/// Everything the suite reads about one user.
#[derive(Debug, Default)]
pub struct State {
    pub connected: bool,
    pub node: Option<String>,
    /// Why the client stopped reconnecting (a "do not reconnect" close), if it did.
    pub stopped: Option<String>,
    pub attempts: u64,
    pub successes: u64,
    pub failures: Vec<Failure>,
    pub ended: Vec<Ended>,
    pub reconnects: Vec<Reconnect>,
    pub auths: Vec<Auth>,
    pub errors: Vec<ErrorSeen>,
    pub reconnect_frames: u64,
    /// Highest channel offset delivered in order.
    pub last_offset: Option<u64>,
    /// The epoch `last_offset` counts in (from `subscribed`).
    pub epoch: Option<String>,
    /// Unsolicited `subscribed {recovered: false}`: the channel's offsets started over
    /// while this client stayed subscribed (its position was lost with Redis).
    pub restarts: u64,
    pub received: u64,
    pub gaps: u64,
    pub dups: u64,
    /// Offsets a `subscribed {recovered: false}` after `since` skipped.
    pub unrecovered: u64,
    pub subscribes: Vec<SubRec>,
    pub latencies_ms: Vec<u32>,
    /// Sequence numbers (`data.n`) of the channel publisher's messages received:
    /// end-to-end loss shows here even when offsets look gap-free.
    pub seen_n: HashSet<u64>,
    pub chats: HashMap<String, Chat>,
}

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReqError {
    NotConnected,
    Busy,
    Timeout,
    /// The connection ended before the answer.
    Disconnected,
}

impl std::fmt::Display for ReqError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReqError::NotConnected => "not connected",
            ReqError::Busy => "command queue full",
            ReqError::Timeout => "no answer in time",
            ReqError::Disconnected => "connection ended before the answer",
        })
    }
}

enum Cmd {
    Request {
        frame: Value,
        reply: oneshot::Sender<Value>,
    },
    /// Stop reading the socket for this long (the slow client).
    Pause(Duration),
    /// Close with 1000, stay away this long, connect again (churn).
    Churn(Duration),
}

/// A simulated user; its connection runs in its own task.
pub struct User {
    pub profile: Profile,
    state: Mutex<State>,
    cmd: mpsc::Sender<Cmd>,
    stop: CancellationToken,
}

impl User {
    /// Starts the user's task: it connects and keeps connecting until `stop`.
    pub fn spawn(profile: Profile, env: Arc<Env>, stop: CancellationToken) -> Arc<User> {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let user = Arc::new(User {
            profile,
            state: Mutex::new(State::default()),
            cmd: tx,
            stop,
        });
        tokio::spawn(run(user.clone(), env, rx));
        user
    }

    pub fn id(&self) -> &str {
        &self.profile.id
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn connected(&self) -> bool {
        self.state().connected
    }

    /// Sends a frame (an `id` is added) and waits for the frame that answers it.
    pub async fn request(&self, frame: Value, limit: Duration) -> Result<Value, ReqError> {
        if !self.connected() {
            return Err(ReqError::NotConnected);
        }
        let (tx, rx) = oneshot::channel();
        self.cmd
            .try_send(Cmd::Request { frame, reply: tx })
            .map_err(|_| ReqError::Busy)?;
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(ReqError::Disconnected),
            Err(_) => Err(ReqError::Timeout),
        }
    }

    /// `chat.send` in a new session named `session` (the message carries the marker
    /// the LLM tap reads). Returns the answer (`ack` or `error`).
    pub async fn chat(&self, session: &str, limit: Duration) -> Result<Value, ReqError> {
        let now = Instant::now();
        self.state()
            .chats
            .entry(session.to_owned())
            .or_insert_with(|| Chat::new(now));
        let frame = json!({
            "type": "chat.send",
            "session_id": session,
            "message": format!("Tell me something about the weather [m:{session}]"),
        });
        self.request(frame, limit).await
    }

    /// Stop reading for `d` (the socket fills up, as with a stuck app).
    pub fn pause(&self, d: Duration) -> bool {
        self.cmd.try_send(Cmd::Pause(d)).is_ok()
    }

    /// Close normally, stay away `away`, then connect again.
    pub fn churn(&self, away: Duration) -> bool {
        self.cmd.try_send(Cmd::Churn(away)).is_ok()
    }
}

/// How a connection ended, as the reconnect logic needs it.
enum End {
    Stop,
    Churn(Duration),
    Server {
        code: Option<u16>,
        jitter_ms: Option<u64>,
    },
}

fn backoff(n: u32) -> Duration {
    let exp = BACKOFF_MIN.saturating_mul(1 << n.min(8)).min(BACKOFF_MAX);
    exp.mul_f64(0.5 + 0.5 * rand::random::<f64>())
}

async fn run(user: Arc<User>, env: Arc<Env>, mut rx: mpsc::Receiver<Cmd>) {
    let mut failures_in_row: u32 = 0;
    let mut down: Option<(Instant, Option<u16>, Option<String>)> = None;
    let mut delay = Duration::ZERO;
    loop {
        if !delay.is_zero() {
            tokio::select! {
                _ = user.stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        if user.stop.is_cancelled() {
            return;
        }
        user.state().attempts += 1;
        let attempt = tokio::select! {
            _ = user.stop.cancelled() => return,
            r = tokio::time::timeout(CONNECT_TIMEOUT, connect_once(&user, &env)) => {
                r.unwrap_or_else(|_| Err(Refusal::cause("timeout before authenticated")))
            }
        };
        let (ws, auth) = match attempt {
            Ok(x) => x,
            Err(r) => {
                let stop =
                    r.close.map(|c| CloseCode::from_u16(c).policy()) == Some(ReconnectPolicy::Stop);
                {
                    let mut st = user.state();
                    st.failures.push(Failure {
                        at: Instant::now(),
                        cause: r.cause.clone(),
                    });
                    if stop {
                        st.stopped = Some(r.cause);
                    }
                }
                if stop {
                    return;
                }
                failures_in_row += 1;
                delay = backoff(failures_in_row);
                continue;
            }
        };
        failures_in_row = 0;
        let now = Instant::now();
        {
            let mut st = user.state();
            st.successes += 1;
            st.connected = true;
            st.node = Some(auth.node.clone());
            if let Some((down_at, code, from)) = down.take() {
                st.reconnects.push(Reconnect {
                    down_at,
                    up_at: now,
                    code,
                    from,
                    to: auth.node.clone(),
                });
            }
            st.auths.push(auth);
        }
        let end = Session::new(&user, ws).run(&mut rx).await;
        let node = {
            let mut st = user.state();
            st.connected = false;
            st.node.take()
        };
        match end {
            End::Stop => return,
            End::Churn(away) => delay = away,
            End::Server { code, jitter_ms } => {
                down = Some((Instant::now(), code, node));
                let policy = code
                    .map(|c| CloseCode::from_u16(c).policy())
                    .unwrap_or(ReconnectPolicy::Backoff);
                delay = match policy {
                    ReconnectPolicy::Immediately => Duration::from_millis(
                        (rand::random::<f64>()
                            * jitter_ms.unwrap_or(DEFAULT_RECONNECT_JITTER_MS) as f64)
                            as u64,
                    ),
                    ReconnectPolicy::Backoff => backoff(0),
                    ReconnectPolicy::None
                    | ReconnectPolicy::RefreshToken
                    | ReconnectPolicy::Stop => {
                        user.state().stopped = Some(format!("closed {code:?}: not reconnecting"));
                        return;
                    }
                };
            }
        }
    }
}

/// Why an attempt did not end with `authenticated`.
struct Refusal {
    cause: String,
    /// The `error` frame's code, when the server refused with one.
    code: Option<String>,
    close: Option<u16>,
}

impl Refusal {
    fn cause(c: impl Into<String>) -> Refusal {
        Refusal {
            cause: c.into(),
            code: None,
            close: None,
        }
    }
}

async fn connect_once(user: &User, env: &Env) -> Result<(Ws, Auth), Refusal> {
    let p = &user.profile;
    let sock = TcpSocket::new_v4().map_err(|e| Refusal::cause(format!("socket: {e}")))?;
    sock.bind(SocketAddr::from((p.src_ip, 0)))
        .map_err(|e| Refusal::cause(format!("bind {}: {e}", p.src_ip)))?;
    if let Some(b) = p.recv_buffer {
        sock.set_recv_buffer_size(b)
            .map_err(|e| Refusal::cause(format!("SO_RCVBUF: {e}")))?;
    }
    let stream = sock
        .connect(env.lb)
        .await
        .map_err(|e| Refusal::cause(format!("tcp connect: {e}")))?;
    let token = testkit::tokens::hs256(&env.secret, &testkit::tokens::claims(&p.id, 3600));
    let mut req = env
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| Refusal::cause(format!("request: {e}")))?;
    let h = req.headers_mut();
    h.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|e| Refusal::cause(format!("header: {e}")))?,
    );
    h.insert(
        "sec-websocket-protocol",
        HeaderValue::from_static(SUBPROTOCOL),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream)
        .await
        .map_err(|e| Refusal::cause(handshake_cause(&e)))?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t)
                    .map_err(|e| Refusal::cause(format!("bad first frame: {e}")))?;
                if v["type"] == "authenticated" {
                    return Ok((
                        ws,
                        Auth {
                            at: Instant::now(),
                            node: v["node"].as_str().unwrap_or_default().to_owned(),
                            degraded: v["degraded"].as_bool().unwrap_or(false),
                            teams: v["teams"].as_array().map_or(0, Vec::len),
                        },
                    ));
                }
                let code = v["code"].as_str().unwrap_or("?").to_owned();
                // The close that follows a refusal tells whether to come back.
                let close = read_close(&mut ws).await;
                return Err(Refusal {
                    cause: format!("refused {code} close {close:?}"),
                    code: Some(code),
                    close,
                });
            }
            Some(Ok(Message::Close(f))) => {
                let close = f.map(|f| u16::from(f.code));
                return Err(Refusal {
                    cause: format!("closed {close:?} before authenticated"),
                    code: None,
                    close,
                });
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(Refusal::cause(format!("read: {e}"))),
            None => return Err(Refusal::cause("closed before authenticated")),
        }
    }
}

fn handshake_cause(e: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error;
    match e {
        Error::Http(r) => format!("upgrade refused: HTTP {}", r.status().as_u16()),
        other => format!("handshake: {other}"),
    }
}

async fn read_close(ws: &mut Ws) -> Option<u16> {
    let read = async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    };
    tokio::time::timeout(CLOSE_WAIT, read).await.ok().flatten()
}

/// What an answer with an `id` is for.
enum Pending {
    External(oneshot::Sender<Value>),
    History { session: String, fill: Fill },
    Subscribe { since: Option<u64> },
}

/// One live connection.
struct Session<'a> {
    user: &'a User,
    ws: Ws,
    pending: HashMap<String, Pending>,
    next_id: u64,
    reconnect_jitter: Option<u64>,
    last_error: Option<String>,
    paused_until: Option<tokio::time::Instant>,
}

impl<'a> Session<'a> {
    fn new(user: &'a User, ws: Ws) -> Session<'a> {
        Session {
            user,
            ws,
            pending: HashMap::new(),
            next_id: 0,
            reconnect_jitter: None,
            last_error: None,
            paused_until: None,
        }
    }

    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}{}", self.next_id)
    }

    async fn send(&mut self, v: &Value) -> bool {
        self.ws.send(Message::text(v.to_string())).await.is_ok()
    }

    async fn run(mut self, rx: &mut mpsc::Receiver<Cmd>) -> End {
        if !self.after_auth().await {
            return self.finish_abnormal().await;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let paused = self.paused_until.is_some();
            let resume = self.paused_until.unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                biased;
                _ = self.user.stop.cancelled() => {
                    self.close_ours().await;
                    return End::Stop;
                }
                _ = tokio::time::sleep_until(resume), if paused => {
                    self.paused_until = None;
                }
                m = self.ws.next(), if !paused => match m {
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                        self.on_frame(v).await;
                    }
                    Some(Ok(Message::Close(f))) => {
                        let code = f.map(|f| u16::from(f.code));
                        return self.ended(code);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return self.ended(None),
                },
                c = rx.recv() => match c {
                    Some(Cmd::Request { mut frame, reply }) => {
                        let id = self.id("q");
                        frame["id"] = Value::String(id.clone());
                        self.pending.insert(id, Pending::External(reply));
                        if !self.send(&frame).await {
                            return self.finish_abnormal().await;
                        }
                    }
                    Some(Cmd::Pause(d)) => {
                        self.paused_until = Some(tokio::time::Instant::now() + d);
                    }
                    Some(Cmd::Churn(away)) => {
                        self.close_ours().await;
                        return End::Churn(away);
                    }
                    None => return End::Stop,
                },
                _ = tick.tick() => {
                    if !self.stall_check().await {
                        return self.finish_abnormal().await;
                    }
                }
            }
        }
    }

    /// Re-subscribes (with `since` after a first subscription) and asks `history`
    /// for every chat whose reply is not known yet.
    async fn after_auth(&mut self) -> bool {
        if let Some(ch) = self.user.profile.channel.clone() {
            let (since, epoch) = {
                let st = self.user.state();
                (st.last_offset, st.epoch.clone())
            };
            let id = self.id("s");
            let mut f = json!({"type": "subscribe", "channel": ch, "id": id});
            if let Some(s) = since {
                f["since"] = json!(s);
                if let Some(e) = epoch {
                    f["epoch"] = json!(e);
                }
            }
            self.pending.insert(id, Pending::Subscribe { since });
            if !self.send(&f).await {
                return false;
            }
        }
        let open: Vec<String> = {
            let st = self.user.state();
            st.chats
                .iter()
                .filter(|(_, c)| c.unresolved())
                .map(|(s, _)| s.clone())
                .collect()
        };
        for session in open {
            if !self.ask_history(&session, Fill::Reconnect).await {
                return false;
            }
        }
        true
    }

    async fn ask_history(&mut self, session: &str, fill: Fill) -> bool {
        let id = self.id("h");
        if let Some(c) = self.user.state().chats.get_mut(session) {
            c.history_asked = Some(Instant::now());
        }
        self.pending.insert(
            id.clone(),
            Pending::History {
                session: session.to_owned(),
                fill,
            },
        );
        self.send(&json!({"type": "history", "session_id": session, "id": id}))
            .await
    }

    async fn stall_check(&mut self) -> bool {
        let now = Instant::now();
        let stalled: Vec<String> = {
            let st = self.user.state();
            st.chats
                .iter()
                .filter(|(_, c)| {
                    !c.acked.is_empty()
                        && c.unresolved()
                        && now.duration_since(c.last_event) > STALL_AFTER
                        && c.history_asked
                            .is_none_or(|t| now.duration_since(t) > STALL_AFTER)
                })
                .map(|(s, _)| s.clone())
                .collect()
        };
        for s in stalled {
            if !self.ask_history(&s, Fill::Stall).await {
                return false;
            }
        }
        true
    }

    async fn on_frame(&mut self, v: Value) {
        let now = Instant::now();
        let kind = v["type"].as_str().unwrap_or_default().to_owned();
        match kind.as_str() {
            "message" => self.on_message(&v),
            "subscribed" if v.get("id").is_none() => self.on_restart(&v),
            "chat.chunk" | "chat.complete" | "chat.error" => self.on_chat(&kind, &v, now),
            "reconnect" => {
                self.reconnect_jitter = v["retry_after_ms"].as_u64();
                self.user.state().reconnect_frames += 1;
            }
            "error" => {
                let code = v["code"].as_str().unwrap_or("?").to_owned();
                self.last_error = Some(code.clone());
                self.user.state().errors.push(ErrorSeen {
                    at: now,
                    code,
                    id: v["id"].as_str().map(str::to_owned),
                });
            }
            "ack" => {
                if let (Some(s), Some(r)) = (v["session_id"].as_str(), v["request_id"].as_str()) {
                    let mut st = self.user.state();
                    let chat = st
                        .chats
                        .entry(s.to_owned())
                        .or_insert_with(|| Chat::new(now));
                    chat.acked.push(r.to_owned());
                    chat.last_event = now;
                    chat.streams.entry(r.to_owned()).or_default().acked_at = Some(now);
                }
            }
            _ => {}
        }
        let Some(id) = v["id"].as_str() else {
            return;
        };
        match self.pending.remove(id) {
            Some(Pending::External(tx)) => {
                let _ = tx.send(v);
            }
            Some(Pending::History { session, fill }) if kind == "history" => {
                self.fill_from_history(&session, &v, fill);
            }
            Some(Pending::Subscribe { since }) if kind == "subscribed" => {
                self.on_subscribed(&v, since, now);
            }
            // An error answer to our own history or subscribe: recorded above.
            Some(_) | None => {}
        }
    }

    fn on_message(&mut self, v: &Value) {
        let Some(offset) = v["offset"].as_u64() else {
            return;
        };
        let mut st = self.user.state();
        st.received += 1;
        if v["data"]["from"].is_string()
            && let Some(n) = v["data"]["n"].as_u64()
        {
            st.seen_n.insert(n);
        }
        if let Some(ts) = v["data"]["ts"].as_u64()
            && st.latencies_ms.len() < MAX_LATENCIES
        {
            let lat = now_ms().saturating_sub(ts).min(u32::MAX as u64) as u32;
            st.latencies_ms.push(lat);
        }
        match st.last_offset {
            // Replay and live frames before the first `subscribed` cannot happen
            // without `since`; count them as in order.
            None => st.last_offset = Some(offset),
            Some(last) if offset == last + 1 => st.last_offset = Some(offset),
            Some(last) if offset <= last => st.dups += 1,
            Some(last) => {
                st.gaps += offset - last - 1;
                st.last_offset = Some(offset);
            }
        }
    }

    /// The server's word that the channel's count started over: later offsets are
    /// of the new epoch, counted from the one it names.
    fn on_restart(&mut self, v: &Value) {
        if v["channel"].as_str() != self.user.profile.channel.as_deref() {
            return;
        }
        let mut st = self.user.state();
        st.restarts += 1;
        st.last_offset = Some(v["offset"].as_u64().unwrap_or(0));
        st.epoch = v["epoch"].as_str().map(str::to_owned);
    }

    fn on_subscribed(&mut self, v: &Value, since: Option<u64>, now: Instant) {
        let offset = v["offset"].as_u64().unwrap_or(0);
        let recovered = v["recovered"].as_bool().unwrap_or(false);
        let mut st = self.user.state();
        st.epoch = v["epoch"].as_str().map(str::to_owned);
        st.subscribes.push(SubRec {
            at: now,
            since,
            recovered,
            offset,
        });
        match since {
            None => st.last_offset = Some(offset),
            Some(s) if !recovered => {
                // The server could not replay: everything after `since` up to the
                // current offset is lost for this client (it would reload).
                st.unrecovered += offset.saturating_sub(s);
                st.last_offset = Some(offset);
            }
            Some(_) => {}
        }
    }

    fn on_chat(&mut self, kind: &str, v: &Value, now: Instant) {
        let (Some(session), Some(rid)) = (v["session_id"].as_str(), v["request_id"].as_str())
        else {
            return;
        };
        let mut st = self.user.state();
        let chat = st
            .chats
            .entry(session.to_owned())
            .or_insert_with(|| Chat::new(now));
        chat.last_event = now;
        let s = chat.streams.entry(rid.to_owned()).or_default();
        match kind {
            "chat.chunk" => {
                let seq = v["seq"].as_u64().unwrap_or(0);
                let content = v["content"].as_str().unwrap_or_default().to_owned();
                match s.chunks.entry(seq) {
                    std::collections::btree_map::Entry::Occupied(_) => s.dup_chunks += 1,
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert(content);
                    }
                }
            }
            "chat.complete" => {
                s.completes += 1;
                if s.complete.is_none() {
                    s.complete = Some(v["content"].as_str().unwrap_or_default().to_owned());
                    s.complete_at = Some(now);
                }
            }
            _ => {
                s.error = Some((
                    v["code"].as_str().unwrap_or("?").to_owned(),
                    v["retryable"].as_bool().unwrap_or(false),
                ));
            }
        }
    }

    fn fill_from_history(&mut self, session: &str, v: &Value, fill: Fill) {
        let Some(messages) = v["messages"].as_array() else {
            return;
        };
        let now = Instant::now();
        let mut st = self.user.state();
        let Some(chat) = st.chats.get_mut(session) else {
            return;
        };
        for m in messages.iter().filter(|m| m["role"] == "assistant") {
            let Some(rid) = m["request_id"].as_str() else {
                continue;
            };
            let s = chat.streams.entry(rid.to_owned()).or_default();
            if s.complete.is_none() && s.filled.is_none() {
                s.filled = Some((m["content"].as_str().unwrap_or_default().to_owned(), fill));
                chat.last_event = now;
            }
            // An ack lost with its connection: history names the request.
            if !chat.acked.iter().any(|a| a == rid) {
                chat.acked.push(rid.to_owned());
            }
        }
    }

    fn ended(&mut self, code: Option<u16>) -> End {
        let mut st = self.user.state();
        let node = st.node.clone();
        st.ended.push(Ended {
            at: Instant::now(),
            code,
            by_client: false,
            after_reconnect_frame: self.reconnect_jitter.is_some(),
            last_error: self.last_error.clone(),
            node,
        });
        End::Server {
            code,
            jitter_ms: self.reconnect_jitter,
        }
    }

    /// A send failed: the server may still have sent its close frame.
    async fn finish_abnormal(&mut self) -> End {
        let code = read_close(&mut self.ws).await;
        self.ended(code)
    }

    /// Closes with 1000 and waits for the server's close.
    async fn close_ours(&mut self) {
        let _ = self
            .ws
            .send(Message::Close(Some(CloseFrame {
                code: WsCloseCode::Normal,
                reason: "bye".into(),
            })))
            .await;
        let _ = read_close(&mut self.ws).await;
        let mut st = self.user.state();
        let node = st.node.clone();
        st.ended.push(Ended {
            at: Instant::now(),
            code: Some(1000),
            by_client: true,
            after_reconnect_frame: false,
            last_error: None,
            node,
        });
    }
}

/// How a probe connection was refused.
#[derive(Debug, Clone)]
pub struct Refused {
    pub cause: String,
    pub code: Option<String>,
    pub close: Option<u16>,
}

/// The connection a scenario opens itself to probe authentication (Redis down,
/// backend down): the `authenticated` summary, or how it was refused.
pub async fn probe_auth(env: &Env, user_id: &str, src_ip: Ipv4Addr) -> Result<Auth, Refused> {
    let user = User {
        profile: Profile {
            id: user_id.to_owned(),
            src_ip,
            channel: None,
            recv_buffer: None,
        },
        state: Mutex::new(State::default()),
        cmd: mpsc::channel(1).0,
        stop: CancellationToken::new(),
    };
    let r = tokio::time::timeout(CONNECT_TIMEOUT, connect_once(&user, env)).await;
    match r {
        Ok(Ok((mut ws, auth))) => {
            let _ = ws.close(None).await;
            Ok(auth)
        }
        Ok(Err(r)) => Err(Refused {
            cause: r.cause,
            code: r.code,
            close: r.close,
        }),
        Err(_) => Err(Refused {
            cause: "timeout before authenticated".into(),
            code: None,
            close: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for n in 0..20 {
            let d = backoff(n);
            assert!(d <= BACKOFF_MAX, "{n}: {d:?}");
            assert!(d >= BACKOFF_MIN / 2, "{n}: {d:?}");
        }
        assert!(backoff(10) >= BACKOFF_MAX / 2);
    }

    #[test]
    fn a_stream_is_resolved_by_complete_fill_or_error() {
        let mut s = Stream::default();
        assert!(!s.resolved());
        s.filled = Some(("x".into(), Fill::Reconnect));
        assert!(s.resolved());
        assert_eq!(s.reply(), Some("x"));
        s.complete = Some("y".into());
        assert_eq!(s.reply(), Some("y"));
    }
}
