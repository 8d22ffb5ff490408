//! The protocol client of the suite: one simulated user that behaves like a
//! well-written app, which is the Rust client (`clients/rust`): reconnects by the
//! close-code rules, resumes its channel with `since`, passes chat replies once and
//! fills missed ones from `history`. This module records what the suite asserts on
//! from the client's events: attempts, closes and their codes, reconnect times,
//! `authenticated` (node, degraded), errors, channel offsets (gaps, and the
//! repeats the client dropped), delivery latency and every chat stream.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use switchboard_client::protocol::{ClientFrame, HistoryMessage, ServerFrame};
use switchboard_client::{ChatEvent, ClientError, Delivery, Event, Events, Options, Status};
use tokio_util::sync::CancellationToken;

/// TCP connect, upgrade and `authenticated` together; a healthy cluster needs
/// milliseconds, a cluster without Redis answers at once with UNAVAILABLE.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Backoff of reconnects after an abnormal close or a refused attempt (doubling,
/// jittered): shorter than an app's, so a scenario sees recovery within seconds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// An acked chat with no event for this long is looked up in `history`: a client
/// that stayed connected through a NATS restart may have missed `chat.complete`.
const STALL_AFTER: Duration = Duration::from_secs(8);
/// Longer than any scenario: a reply is never given up on by the client.
const CHAT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Latency samples kept per user between two scenario reads (bounded memory).
const MAX_LATENCIES: usize = 200_000;

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
    /// Offsets the client received again and dropped.
    pub dups: u64,
    /// Chunks repeated within a delivery, and finals after the first, that the
    /// client dropped.
    pub dup_chunks: u64,
    pub extra_completes: u64,
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

/// A simulated user: the Rust client, and what it recorded.
pub struct User {
    pub profile: Profile,
    state: Mutex<State>,
    client: switchboard_client::Client,
    /// The channel subscription was answered once; the client resumes it itself.
    subscribed: AtomicBool,
    /// The next close is the user's own (churn).
    away: AtomicBool,
}

impl User {
    /// Starts the user: it connects and keeps connecting until `stop`.
    pub fn spawn(profile: Profile, env: Arc<Env>, stop: CancellationToken) -> Arc<User> {
        let (client, events) = switchboard_client::connect(options(&profile, &env));
        let user = Arc::new(User {
            profile,
            state: Mutex::new(State::default()),
            client,
            subscribed: AtomicBool::new(false),
            away: AtomicBool::new(false),
        });
        tokio::spawn(record(user.clone(), events, stop));
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

    /// Sends a frame and waits for the frame that answers it (an `error` frame is an
    /// answer too).
    pub async fn request(&self, frame: Value, limit: Duration) -> Result<Value, ReqError> {
        if !self.connected() {
            return Err(ReqError::NotConnected);
        }
        let frame: ClientFrame =
            serde_json::from_value(frame).expect("the suite sends valid frames");
        match tokio::time::timeout(limit, self.client.request(frame)).await {
            Err(_) | Ok(Err(ClientError::Timeout(_))) => Err(ReqError::Timeout),
            Ok(Ok(answer)) => Ok(serde_json::to_value(answer).unwrap_or(Value::Null)),
            Ok(Err(ClientError::Server(body))) => {
                self.state().errors.push(ErrorSeen {
                    at: Instant::now(),
                    code: body.code.as_str().to_owned(),
                    id: Some("request".into()),
                });
                Ok(serde_json::to_value(ServerFrame::Error(body)).unwrap_or(Value::Null))
            }
            Ok(Err(ClientError::QueueFull(_))) => Err(ReqError::Busy),
            Ok(Err(ClientError::Disconnected)) => Err(ReqError::Disconnected),
            Ok(Err(ClientError::Stopped(_) | ClientError::Unexpected(_))) => {
                Err(ReqError::NotConnected)
            }
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
        let r = self.request(frame, limit).await;
        if let Ok(v) = &r
            && let Some(rid) = v["request_id"].as_str()
        {
            let now = Instant::now();
            let mut st = self.state();
            let chat = st
                .chats
                .entry(session.to_owned())
                .or_insert_with(|| Chat::new(now));
            chat.acked.push(rid.to_owned());
            chat.last_event = now;
            chat.streams.entry(rid.to_owned()).or_default().acked_at = Some(now);
        }
        r
    }

    /// Stop reading for `d` (the socket fills up, as with a stuck app); zero resumes.
    pub fn pause(self: &Arc<Self>, d: Duration) -> bool {
        let u = self.clone();
        tokio::spawn(async move { u.client.hold_reads(d).await });
        true
    }

    /// Close normally, stay away `away`, then connect again.
    pub fn churn(self: &Arc<Self>, away: Duration) -> bool {
        self.away.store(true, Ordering::SeqCst);
        let u = self.clone();
        tokio::spawn(async move { u.client.disconnect_for(away).await });
        true
    }

    /// Subscribes to the profile's channel once (the client resumes it after that).
    fn subscribe(self: &Arc<Self>) {
        let Some(channel) = self.profile.channel.clone() else {
            return;
        };
        if self.subscribed.swap(true, Ordering::SeqCst) {
            return;
        }
        let u = self.clone();
        tokio::spawn(async move {
            if u.client.subscribe(&channel).await.is_err() {
                // Answered on no connection: the next `authenticated` tries again.
                u.subscribed.store(false, Ordering::SeqCst);
            }
        });
    }

    /// Sessions whose `chat.send` got no answer: the request may be stored, so
    /// history is read after a reconnect, as an app would.
    fn check_unacked(self: &Arc<Self>) {
        let sessions: Vec<String> = self
            .state()
            .chats
            .iter()
            .filter(|(_, c)| c.acked.is_empty())
            .map(|(s, _)| s.clone())
            .collect();
        for session in sessions {
            let u = self.clone();
            tokio::spawn(async move {
                if let Ok(messages) = u.client.history(&session, None).await {
                    u.fill(&session, &messages, Fill::Reconnect);
                }
            });
        }
    }

    fn fill(&self, session: &str, messages: &[HistoryMessage], fill: Fill) {
        let now = Instant::now();
        let mut st = self.state();
        let Some(chat) = st.chats.get_mut(session) else {
            return;
        };
        for m in messages.iter().filter(|m| m.role == "assistant") {
            let Some(rid) = m.request_id.as_deref() else {
                continue;
            };
            let s = chat.streams.entry(rid.to_owned()).or_default();
            if s.complete.is_none() && s.filled.is_none() {
                s.filled = Some((m.content.clone(), fill));
                chat.last_event = now;
            }
            // An ack lost with its connection: history names the request.
            if !chat.acked.iter().any(|a| a == rid) {
                chat.acked.push(rid.to_owned());
            }
        }
    }
}

fn options(p: &Profile, env: &Env) -> Options {
    let token = testkit::tokens::hs256(&env.secret, &testkit::tokens::claims(&p.id, 3600));
    let mut o = Options::with_token(env.url.clone(), token);
    o.backoff_base = BACKOFF_MIN;
    o.backoff_cap = BACKOFF_MAX;
    o.connect_timeout = CONNECT_TIMEOUT;
    o.chat_silence = STALL_AFTER;
    o.chat_idle_timeout = CHAT_IDLE_TIMEOUT;
    o.local_addr = Some(p.src_ip.into());
    o.recv_buffer = p.recv_buffer;
    o
}

/// Turns the client's events into the user's record, until `stop`.
async fn record(user: Arc<User>, mut events: Events, stop: CancellationToken) {
    let mut down: Option<(Instant, Option<u16>, Option<String>)> = None;
    let mut draining = false;
    let mut last_error: Option<String> = None;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => {
                user.client.close().await;
                let mut st = user.state();
                if st.connected {
                    st.disconnected(Ended {
                        at: Instant::now(),
                        code: Some(1000),
                        by_client: true,
                        after_reconnect_frame: false,
                        last_error: None,
                        node: None,
                    });
                }
                return;
            }
            e = events.recv() => match e {
                Some(e) => e,
                None => return,
            },
        };
        let now = Instant::now();
        match event {
            Event::Status(Status::Connecting { .. }) => user.state().attempts += 1,
            Event::Status(Status::Authenticated(info)) => {
                {
                    let mut st = user.state();
                    st.successes += 1;
                    st.connected = true;
                    st.node = Some(info.node.clone());
                    if let Some((down_at, code, from)) = down.take() {
                        st.reconnects.push(Reconnect {
                            down_at,
                            up_at: now,
                            code,
                            from,
                            to: info.node.clone(),
                        });
                    }
                    st.auths.push(Auth {
                        at: now,
                        node: info.node.clone(),
                        degraded: info.degraded,
                        teams: info.teams.len(),
                    });
                }
                (draining, last_error) = (false, None);
                user.subscribe();
                user.check_unacked();
            }
            Event::Status(Status::Reconnecting { code, reason, .. }) => {
                let by_client = user.away.swap(false, Ordering::SeqCst);
                let mut st = user.state();
                if st.connected {
                    let end = Ended {
                        at: now,
                        code,
                        by_client,
                        after_reconnect_frame: draining,
                        last_error: last_error.clone(),
                        node: None,
                    };
                    let node = st.disconnected(end);
                    if !by_client {
                        down = Some((now, code, node));
                    }
                } else {
                    st.failures.push(Failure {
                        at: now,
                        cause: reason,
                    });
                }
            }
            Event::Status(Status::Stopped(why)) => {
                let mut st = user.state();
                if st.connected {
                    st.disconnected(Ended {
                        at: now,
                        code: None,
                        by_client: false,
                        after_reconnect_frame: draining,
                        last_error: last_error.clone(),
                        node: None,
                    });
                }
                st.stopped = why.or_else(|| Some("closed".into()));
                return;
            }
            Event::Draining { .. } => {
                draining = true;
                user.state().reconnect_frames += 1;
            }
            Event::Error(e) => {
                let code = e.code.as_str().to_owned();
                last_error = Some(code.clone());
                user.state().errors.push(ErrorSeen {
                    at: now,
                    code,
                    id: None,
                });
            }
            Event::Message { offset, data, .. } => user.state().message(offset, &data),
            Event::Subscribed {
                since,
                recovered,
                offset,
                epoch,
                ..
            } => {
                let mut st = user.state();
                st.epoch = Some(epoch);
                st.subscribes.push(SubRec {
                    at: now,
                    since,
                    recovered,
                    offset,
                });
                match since {
                    None => st.last_offset = Some(offset),
                    Some(s) if !recovered => {
                        // The server could not replay: everything after `since` up to
                        // the current offset is lost for this client (it would reload).
                        st.unrecovered += offset.saturating_sub(s);
                        st.last_offset = Some(offset);
                    }
                    Some(_) => {}
                }
            }
            Event::Restarted { epoch, .. } => {
                // The channel's count started over: later offsets are of the new epoch.
                let mut st = user.state();
                st.restarts += 1;
                st.last_offset = Some(0);
                st.epoch = Some(epoch);
            }
            Event::Chat(c) => user.state().chat(c, now),
            _ => {}
        }
        let dropped = user.client.stats();
        let mut st = user.state();
        st.dups = dropped.duplicate_messages;
        st.dup_chunks = dropped.repeated_chunks;
        st.extra_completes = dropped.duplicate_finals;
    }
}

impl State {
    /// The connection ended as `end` says (its node is filled in); the node it was on.
    fn disconnected(&mut self, mut end: Ended) -> Option<String> {
        self.connected = false;
        end.node = self.node.take();
        let node = end.node.clone();
        self.ended.push(end);
        node
    }

    fn message(&mut self, offset: u64, data: &Value) {
        self.received += 1;
        if data["from"].is_string()
            && let Some(n) = data["n"].as_u64()
        {
            self.seen_n.insert(n);
        }
        if let Some(ts) = data["ts"].as_u64()
            && self.latencies_ms.len() < MAX_LATENCIES
        {
            let lat = now_ms().saturating_sub(ts).min(u32::MAX as u64) as u32;
            self.latencies_ms.push(lat);
        }
        // The client passes each offset once, in order: a jump is a gap.
        if let Some(last) = self.last_offset
            && offset > last + 1
        {
            self.gaps += offset - last - 1;
        }
        self.last_offset = Some(offset);
    }

    fn chat(&mut self, event: ChatEvent, now: Instant) {
        let (session, rid) = match &event {
            ChatEvent::Chunk {
                session_id,
                request_id,
                ..
            }
            | ChatEvent::Restarted {
                session_id,
                request_id,
            }
            | ChatEvent::Complete {
                session_id,
                request_id,
                ..
            }
            | ChatEvent::Error {
                session_id,
                request_id,
                ..
            }
            | ChatEvent::TimedOut {
                session_id,
                request_id,
            } => (session_id.clone(), request_id.clone()),
        };
        let chat = self.chats.entry(session).or_insert_with(|| Chat::new(now));
        chat.last_event = now;
        let s = chat.streams.entry(rid.clone()).or_default();
        match event {
            ChatEvent::Chunk { seq, content, .. } => {
                s.chunks.insert(seq, content);
            }
            ChatEvent::Restarted { .. } => s.chunks.clear(),
            ChatEvent::Complete {
                content, delivery, ..
            } => match delivery {
                Delivery::Live => {
                    s.completes += 1;
                    s.complete = Some(content);
                    s.complete_at = Some(now);
                }
                Delivery::AfterReconnect | Delivery::AfterSilence => {
                    let fill = if delivery == Delivery::AfterReconnect {
                        Fill::Reconnect
                    } else {
                        Fill::Stall
                    };
                    s.filled = Some((content, fill));
                    if !chat.acked.contains(&rid) {
                        chat.acked.push(rid);
                    }
                }
            },
            ChatEvent::Error {
                code, retryable, ..
            } => {
                s.error = Some((code.as_str().to_owned(), retryable));
            }
            ChatEvent::TimedOut { .. } => {}
        }
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
/// backend down): the `authenticated` summary, or how it was refused. One attempt:
/// the client is closed after its first outcome.
pub async fn probe_auth(env: &Env, user_id: &str, src_ip: Ipv4Addr) -> Result<Auth, Refused> {
    let profile = Profile {
        id: user_id.to_owned(),
        src_ip,
        channel: None,
        recv_buffer: None,
    };
    let (client, mut events) = switchboard_client::connect(options(&profile, env));
    let mut code = None;
    let outcome = async {
        while let Some(e) = events.recv().await {
            match e {
                Event::Error(b) => code = Some(b.code.as_str().to_owned()),
                Event::Status(Status::Authenticated(info)) => {
                    return Ok(Auth {
                        at: Instant::now(),
                        node: info.node,
                        degraded: info.degraded,
                        teams: info.teams.len(),
                    });
                }
                Event::Status(Status::Reconnecting {
                    code: close,
                    reason,
                    ..
                }) => {
                    return Err((reason, close));
                }
                Event::Status(Status::Stopped(why)) => {
                    return Err((why.unwrap_or_default(), None));
                }
                _ => {}
            }
        }
        Err(("the client ended".to_owned(), None))
    };
    let r = tokio::time::timeout(CONNECT_TIMEOUT, outcome).await;
    client.close().await;
    match r {
        Ok(Ok(auth)) => Ok(auth),
        Ok(Err((cause, close))) => Err(Refused { cause, code, close }),
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
    fn a_stream_is_resolved_by_complete_fill_or_error() {
        let mut s = Stream::default();
        assert!(!s.resolved());
        s.filled = Some(("x".into(), Fill::Reconnect));
        assert!(s.resolved());
        assert_eq!(s.reply(), Some("x"));
        s.complete = Some("y".into());
        assert_eq!(s.reply(), Some("y"));
    }

    #[test]
    fn offsets_in_order_count_jumps_as_gaps() {
        let mut st = State::default();
        for o in [1, 2, 5, 6] {
            st.message(o, &Value::Null);
        }
        assert_eq!((st.gaps, st.received, st.last_offset), (2, 4, Some(6)));
    }
}
