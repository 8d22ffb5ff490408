//! The connection task: one socket at a time, reconnected by the close-code rules,
//! with the application's subscriptions, chat requests and queued requests carried
//! across sockets.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use protocol::{ClientFrame, FrameId, ServerFrame};
use tokio::net::TcpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;

use crate::backoff::{Backoff, Ended, Next};
use crate::chat::Chats;
use crate::error::ClientError;
use crate::event::{ChatEvent, Delivery, Event, Info, Status};
use crate::options::{Options, RESTART_JITTER, TokenFuture, TokenReason};
use crate::stats::Counters;
use crate::subscription::Subscriptions;

/// A socket, plain or TLS.
pub(crate) trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

type Ws = WebSocketStream<Box<dyn Io>>;
type Sink = SplitSink<Ws, Message>;
pub(crate) type Reply = oneshot::Sender<Result<ServerFrame, ClientError>>;

/// How often timers (ping, chat silence, refresh retry) are looked at.
const TICK: Duration = Duration::from_millis(250);
/// A close frame the client sends waits this long for the server's answer.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// What the handle asks of the connection task.
pub(crate) enum Command {
    /// A frame with a direct reply.
    Request {
        frame: ClientFrame,
        reply: Reply,
    },
    /// A frame without one (`typing`).
    Send {
        frame: ClientFrame,
    },
    /// Stop reading the socket for a while.
    Hold(Duration),
    /// Close with 1000, stay away this long, connect again.
    Away(Duration),
    Close,
}

/// Who waits for the reply to a frame id.
enum Waiter {
    User(Reply),
    ChatSend(Reply),
    /// A subscribe (the application's, or a resume after a reconnect).
    Subscribe {
        channel: String,
    },
    Unsubscribe(Reply),
    /// The client reads `history` to fill replies it missed.
    Fill(Delivery),
    Refresh,
}

enum SessionEnd {
    Ended(Ended),
    /// The application asked to be away this long.
    Away(Duration),
    /// The application closed the client (or dropped every handle).
    Closed,
}

pub(crate) struct Connection {
    opts: Options,
    cmds: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    status: watch::Sender<Status>,
    subs: Subscriptions,
    chats: Chats,
    waiters: HashMap<i64, Waiter>,
    /// Replies to the application's subscribes, answered by the next `subscribed`
    /// of the channel (also after a reconnect).
    sub_replies: HashMap<String, Vec<Reply>>,
    queued: VecDeque<Command>,
    next_id: i64,
    backoff: Backoff,
    counters: Arc<Counters>,
    /// Built at the first `wss://` attempt.
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Connection {
    pub(crate) fn new(
        opts: Options,
        cmds: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
        status: watch::Sender<Status>,
        counters: Arc<Counters>,
    ) -> Connection {
        let backoff = Backoff {
            base: opts.backoff_base,
            cap: opts.backoff_cap,
            restart_jitter: RESTART_JITTER,
        };
        let chats = Chats::new(opts.max_finished_chats);
        Connection {
            opts,
            cmds,
            events,
            status,
            subs: Subscriptions::default(),
            chats,
            waiters: HashMap::new(),
            sub_replies: HashMap::new(),
            queued: VecDeque::new(),
            next_id: 0,
            backoff,
            counters,
            tls: None,
        }
    }

    pub(crate) async fn run(mut self) {
        let mut attempt: u32 = 0;
        let mut reason = TokenReason::Connect;
        let mut url_index = 0;
        loop {
            self.set_status(Status::Connecting { attempt }).await;
            let ended = match self.token(reason).await {
                Err(stop) => return self.stop(Some(stop)).await,
                Ok(None) => Ended {
                    reason: "the token source failed".into(),
                    ..Ended::default()
                },
                Ok(Some(token)) => {
                    let url = self.opts.urls[url_index % self.opts.urls.len()].clone();
                    url_index += 1;
                    match self.open(&url, &token).await {
                        Ok((ws, info)) => {
                            let up = Instant::now();
                            match self.session(ws, info).await {
                                SessionEnd::Closed => return self.stop(None).await,
                                SessionEnd::Away(away) => {
                                    self.set_status(Status::Reconnecting {
                                        code: Some(1000),
                                        retry_in: away,
                                        reason: "the application went away".into(),
                                    })
                                    .await;
                                    if !self.wait(away).await {
                                        return self.stop(None).await;
                                    }
                                    (attempt, reason) = (0, TokenReason::Reconnect);
                                    continue;
                                }
                                SessionEnd::Ended(e) => {
                                    if up.elapsed() >= self.opts.stable_after {
                                        attempt = 0;
                                    }
                                    e
                                }
                            }
                        }
                        Err(e) => e,
                    }
                }
            };
            match self.backoff.next(&ended, attempt) {
                Next::Stop(why) => return self.stop(why).await,
                Next::Retry { delay, expired } => {
                    // A fresh token that is refused as expired again must not spin.
                    let delay = if expired && reason == TokenReason::Expired {
                        self.backoff.delay(attempt)
                    } else {
                        delay
                    };
                    reason = if expired {
                        TokenReason::Expired
                    } else {
                        TokenReason::Reconnect
                    };
                    attempt = attempt.saturating_add(1);
                    self.set_status(Status::Reconnecting {
                        code: ended.code,
                        retry_in: delay,
                        reason: ended.reason.clone(),
                    })
                    .await;
                    tracing::debug!(code = ?ended.code, reason = %ended.reason, ?delay, "reconnecting");
                    if !self.wait(delay).await {
                        return self.stop(None).await;
                    }
                }
            }
        }
    }

    /// A token, `Ok(None)` for a retryable failure, `Err` for a fatal one.
    async fn token(&mut self, reason: TokenReason) -> Result<Option<String>, String> {
        match tokio::time::timeout(self.opts.request_timeout, (self.opts.token)(reason)).await {
            Ok(Ok(t)) => Ok(Some(t)),
            Ok(Err(e)) if !e.retryable => Err(format!("token source: {e}")),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "token source failed; retrying");
                Ok(None)
            }
            Err(_) => Ok(None),
        }
    }

    /// Between attempts: commands are queued; false when the application closed.
    async fn wait(&mut self, delay: Duration) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => return true,
                cmd = self.cmds.recv() => match cmd {
                    None | Some(Command::Close) => return false,
                    Some(c) => self.enqueue(c),
                },
            }
        }
    }

    fn enqueue(&mut self, cmd: Command) {
        if !matches!(cmd, Command::Request { .. }) {
            // `typing`, holds and absences mean nothing without a socket.
            return;
        }
        if self.queued.len() >= self.opts.max_queued {
            if let Command::Request { reply, .. } = cmd {
                let _ = reply.send(Err(ClientError::QueueFull(self.opts.max_queued)));
            }
            return;
        }
        self.queued.push_back(cmd);
    }

    async fn stop(mut self, why: Option<String>) {
        let err = ClientError::Stopped(why.clone().unwrap_or_else(|| "closed".into()));
        for (_, w) in self.waiters.drain() {
            if let Waiter::User(r) | Waiter::ChatSend(r) | Waiter::Unsubscribe(r) = w {
                let _ = r.send(Err(err.clone()));
            }
        }
        for (_, replies) in self.sub_replies.drain() {
            for r in replies {
                let _ = r.send(Err(err.clone()));
            }
        }
        for cmd in self.queued.drain(..) {
            if let Command::Request { reply, .. } = cmd {
                let _ = reply.send(Err(err.clone()));
            }
        }
        self.set_status(Status::Stopped(why)).await;
    }

    async fn set_status(&mut self, s: Status) {
        self.status.send_replace(s.clone());
        self.emit(Event::Status(s)).await;
    }

    async fn emit(&mut self, e: Event) {
        // An application that dropped its event receiver still uses requests.
        let _ = self.events.send(e).await;
    }

    /// TCP, upgrade, `auth`, `authenticated`, within the connect timeout.
    async fn open(&mut self, url: &str, token: &str) -> Result<(Ws, Info), Ended> {
        let failed = |reason: String| Ended {
            reason,
            ..Ended::default()
        };
        let limit = self.opts.connect_timeout;
        let attempt = async {
            let mut ws = self.handshake(url).await.map_err(failed)?;
            let auth = ClientFrame::Auth {
                token: token.to_owned(),
            };
            ws.send(Message::text(frame_text(&auth, None)))
                .await
                .map_err(|e| failed(e.to_string()))?;
            let mut ended = Ended::default();
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerFrame>(&t) {
                        Ok(ServerFrame::Authenticated {
                            user,
                            expires_at,
                            teams,
                            tasks,
                            degraded,
                            node,
                            conn_id,
                            ..
                        }) => {
                            let info = Info {
                                user,
                                teams,
                                tasks,
                                degraded,
                                node,
                                conn_id,
                                expires_at,
                            };
                            return Ok((ws, info));
                        }
                        Ok(ServerFrame::Error(e)) => {
                            ended.retry_after = e.retry_after_ms;
                            ended.reason = format!("{}: {}", e.code.as_str(), e.message);
                            self.emit(Event::Error(e)).await;
                        }
                        _ => {}
                    },
                    Some(Ok(Message::Close(f))) => {
                        if let Some(f) = f {
                            ended.code = Some(u16::from(f.code));
                            if ended.reason.is_empty() {
                                ended.reason = f.reason.to_string();
                            }
                        }
                        return Err(ended);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(failed(e.to_string())),
                    None => return Err(failed("closed during authentication".into())),
                }
            }
        };
        match tokio::time::timeout(limit, attempt).await {
            Ok(r) => r,
            Err(_) => Err(failed(format!("not authenticated within {limit:?}"))),
        }
    }

    async fn handshake(&mut self, url: &str) -> Result<Ws, String> {
        let mut req = url.into_client_request().map_err(|e| e.to_string())?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(protocol::SUBPROTOCOL),
        );
        let uri = req.uri();
        let tls = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(format!("{url}: not a ws:// or wss:// URL")),
        };
        let host = uri.host().ok_or("the URL has no host")?.to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| format!("{host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host}: no address"))?;
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| e.to_string())?;
        if let Some(ip) = self.opts.local_addr {
            socket.bind((ip, 0).into()).map_err(|e| e.to_string())?;
        }
        if let Some(size) = self.opts.recv_buffer {
            socket
                .set_recv_buffer_size(size)
                .map_err(|e| e.to_string())?;
        }
        let stream = socket.connect(addr).await.map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let stream: Box<dyn Io> = if tls {
            if self.tls.is_none() {
                self.tls = Some(crate::tls::connector(self.opts.tls_ca.as_deref())?);
            }
            let connector = self.tls.as_ref().expect("set above");
            // A bracketed IPv6 literal is not a DNS name; the certificate names the IP.
            let name = host.trim_start_matches('[').trim_end_matches(']');
            Box::new(crate::tls::handshake(connector, name, stream).await?)
        } else {
            Box::new(stream)
        };
        let (ws, _) = tokio_tungstenite::client_async(req, stream)
            .await
            .map_err(|e| e.to_string())?;
        Ok(ws)
    }

    /// One authenticated socket, until it ends.
    async fn session(&mut self, ws: Ws, info: Info) -> SessionEnd {
        let mut expires_at = info.expires_at;
        self.set_status(Status::Authenticated(Box::new(info))).await;
        let (mut sink, mut stream) = ws.split();
        let mut ended = Ended::default();
        if let Err(e) = self.resume(&mut sink).await {
            ended.reason = e;
            return self.ended(ended);
        }
        let mut last_heard = Instant::now();
        let mut ping_sent: Option<Instant> = None;
        let mut refresh: Option<TokenFuture> = None;
        let mut refresh_retry_at: Option<Instant> = None;
        let mut tick = tokio::time::interval(TICK);
        let mut held_until: Option<tokio::time::Instant> = None;
        loop {
            let held = held_until.is_some();
            let resume_at = held_until.unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                cmd = self.cmds.recv() => match cmd {
                    None | Some(Command::Close) => {
                        close(&mut sink, &mut stream).await;
                        return SessionEnd::Closed;
                    }
                    Some(Command::Away(away)) => {
                        close(&mut sink, &mut stream).await;
                        self.ended(Ended::default());
                        return SessionEnd::Away(away);
                    }
                    Some(Command::Hold(d)) => {
                        held_until = Some(tokio::time::Instant::now() + d);
                    }
                    Some(c) => {
                        if let Err(e) = self.command(c, &mut sink).await {
                            ended.reason = e;
                            break;
                        }
                    }
                },
                _ = tokio::time::sleep_until(resume_at), if held => {
                    held_until = None;
                    last_heard = Instant::now();
                }
                msg = stream.next(), if !held => {
                    last_heard = Instant::now();
                    ping_sent = None;
                    match msg {
                        Some(Ok(Message::Text(t))) => {
                            let frame = match serde_json::from_str::<ServerFrame>(&t) {
                                Ok(f) => f,
                                Err(e) => {
                                    // A frame of a newer server: not this client's business.
                                    tracing::debug!(error = %e, "unknown server frame ignored");
                                    continue;
                                }
                            };
                            match self.frame(frame, &mut ended).await {
                                Ok(FrameOutcome::Continue) => {}
                                Ok(FrameOutcome::Refresh) => {
                                    refresh = Some((self.opts.token)(TokenReason::Refresh));
                                }
                                Ok(FrameOutcome::RefreshFailed) => {
                                    refresh_retry_at = Some(Instant::now() + self.opts.refresh_retry);
                                }
                                Ok(FrameOutcome::Refreshed(exp)) => {
                                    expires_at = exp;
                                    refresh_retry_at = None;
                                }
                                Err(e) => {
                                    ended.reason = e;
                                    break;
                                }
                            }
                        }
                        Some(Ok(Message::Close(f))) => {
                            if let Some(f) = f {
                                ended.code = Some(u16::from(f.code));
                                ended.reason = f.reason.to_string();
                            }
                            break;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            ended.reason = e.to_string();
                            break;
                        }
                        None => {
                            ended.reason = "the connection broke".into();
                            break;
                        }
                    }
                },
                token = async { refresh.as_mut().expect("guarded").await }, if refresh.is_some() => {
                    refresh = None;
                    match token {
                        Ok(token) => {
                            let frame = ClientFrame::Refresh { token };
                            if let Err(e) = self.send(&mut sink, &frame, Some(Waiter::Refresh)).await {
                                ended.reason = e;
                                break;
                            }
                        }
                        Err(e) if !e.retryable => {
                            // The connection lives until its token expires (then 4001,
                            // and the token source is asked again).
                            tracing::debug!(error = %e, "token source refused a refresh");
                        }
                        Err(_) => refresh_retry_at = Some(Instant::now() + self.opts.refresh_retry),
                    }
                },
                _ = tick.tick(), if !held => {
                    let now = Instant::now();
                    if let Some(sent) = ping_sent {
                        if now.duration_since(sent) >= self.opts.pong_timeout {
                            ended.reason = "no answer to ping".into();
                            break;
                        }
                    } else if now.duration_since(last_heard) >= self.opts.ping_interval {
                        ping_sent = Some(now);
                        if let Err(e) = self.send(&mut sink, &ClientFrame::Ping {}, None).await {
                            ended.reason = e;
                            break;
                        }
                    }
                    if refresh_retry_at.is_some_and(|t| now >= t) && refresh.is_none() {
                        refresh_retry_at = None;
                        if unix_now() < expires_at {
                            refresh = Some((self.opts.token)(TokenReason::Refresh));
                        }
                    }
                    if let Err(e) = self.check_chats(&mut sink, false).await {
                        ended.reason = e;
                        break;
                    }
                },
            }
        }
        self.ended(ended)
    }

    /// After a socket ended: replies that will not come fail; subscribes wait for
    /// the next socket.
    fn ended(&mut self, ended: Ended) -> SessionEnd {
        for (_, w) in self.waiters.drain() {
            if let Waiter::User(r) | Waiter::ChatSend(r) | Waiter::Unsubscribe(r) = w {
                let _ = r.send(Err(ClientError::Disconnected));
            }
        }
        SessionEnd::Ended(ended)
    }

    /// A new socket: subscriptions resume where they were, missed chat replies are
    /// read from history, queued requests go out.
    async fn resume(&mut self, sink: &mut Sink) -> Result<(), String> {
        for channel in self.subs.channels() {
            let (since, epoch) = self.subs.resume_point(&channel);
            let frame = ClientFrame::Subscribe {
                channel: channel.clone(),
                since,
                epoch,
            };
            self.send(sink, &frame, Some(Waiter::Subscribe { channel }))
                .await?;
        }
        self.check_chats(sink, true).await?;
        while let Some(cmd) = self.queued.pop_front() {
            self.command(cmd, sink).await?;
        }
        Ok(())
    }

    async fn check_chats(&mut self, sink: &mut Sink, reconnected: bool) -> Result<(), String> {
        let now = Instant::now();
        for e in self.chats.expired(now, self.opts.chat_idle_timeout) {
            self.emit(Event::Chat(e)).await;
        }
        let delivery = if reconnected {
            Delivery::AfterReconnect
        } else {
            Delivery::AfterSilence
        };
        for session_id in self
            .chats
            .due_for_history(now, reconnected, self.opts.chat_silence)
        {
            let frame = ClientFrame::History {
                session_id,
                limit: None,
            };
            self.send(sink, &frame, Some(Waiter::Fill(delivery)))
                .await?;
        }
        Ok(())
    }

    async fn command(&mut self, cmd: Command, sink: &mut Sink) -> Result<(), String> {
        match cmd {
            Command::Close | Command::Hold(_) | Command::Away(_) => Ok(()),
            Command::Send { frame } => self.send(sink, &frame, None).await,
            Command::Request { frame, reply } => {
                if reply.is_closed() {
                    // Timed out while queued: the application has given up on it.
                    return Ok(());
                }
                let waiter = match &frame {
                    ClientFrame::Subscribe {
                        channel,
                        since,
                        epoch,
                    } => {
                        self.subs.add(channel, *since, epoch.clone());
                        self.sub_replies
                            .entry(channel.clone())
                            .or_default()
                            .push(reply);
                        let (since, epoch) = self.subs.resume_point(channel);
                        let frame = ClientFrame::Subscribe {
                            channel: channel.clone(),
                            since,
                            epoch,
                        };
                        let channel = channel.clone();
                        return self
                            .send(sink, &frame, Some(Waiter::Subscribe { channel }))
                            .await;
                    }
                    ClientFrame::Unsubscribe { channel } => {
                        self.subs.remove(channel);
                        Waiter::Unsubscribe(reply)
                    }
                    ClientFrame::ChatSend { .. } => Waiter::ChatSend(reply),
                    _ => Waiter::User(reply),
                };
                self.send(sink, &frame, Some(waiter)).await
            }
        }
    }

    async fn send(
        &mut self,
        sink: &mut Sink,
        frame: &ClientFrame,
        waiter: Option<Waiter>,
    ) -> Result<(), String> {
        let id = waiter.map(|w| {
            self.next_id += 1;
            self.waiters.insert(self.next_id, w);
            self.next_id
        });
        let text = frame_text(frame, id);
        match tokio::time::timeout(self.opts.request_timeout, sink.send(Message::text(text))).await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the socket took nothing for the request timeout".into()),
        }
    }

    async fn frame(
        &mut self,
        frame: ServerFrame,
        ended: &mut Ended,
    ) -> Result<FrameOutcome, String> {
        let now = Instant::now();
        let waiter = reply_id(&frame).and_then(|id| self.waiters.remove(&id));
        match (frame, waiter) {
            (
                ServerFrame::Message {
                    channel,
                    offset,
                    data,
                    from,
                },
                _,
            ) => {
                if self.subs.message(&channel, offset) {
                    self.emit(Event::Message {
                        channel,
                        offset,
                        data,
                        from,
                    })
                    .await;
                } else {
                    self.counters.duplicate_messages.fetch_add(1, Relaxed);
                }
            }
            (f @ ServerFrame::Subscribed { .. }, Some(Waiter::Subscribe { channel: waited })) => {
                let ServerFrame::Subscribed {
                    ref channel,
                    offset,
                    ref epoch,
                    recovered,
                    read_offset,
                    ..
                } = f
                else {
                    unreachable!("matched above")
                };
                let event =
                    self.subs
                        .subscribed(channel, offset, epoch.clone(), recovered, read_offset);
                if let Some(e) = event {
                    self.emit(e).await;
                }
                for r in self.sub_replies.remove(&waited).unwrap_or_default() {
                    let _ = r.send(Ok(f.clone()));
                }
            }
            (
                ServerFrame::Subscribed {
                    channel,
                    offset,
                    epoch,
                    ..
                },
                _,
            ) => {
                // Not a reply: the channel's offsets started over.
                if let Some(e) = self.subs.restarted(&channel, offset, epoch) {
                    self.emit(e).await;
                }
            }
            (f @ ServerFrame::Unsubscribed { .. }, Some(Waiter::Unsubscribe(reply))) => {
                let _ = reply.send(Ok(f));
            }
            (
                ServerFrame::Unsubscribed {
                    channel, reason, ..
                },
                _,
            ) => {
                self.subs.remove(&channel);
                for r in self.sub_replies.remove(&channel).unwrap_or_default() {
                    let _ = r.send(Err(ClientError::Stopped(format!(
                        "the server ended {channel}"
                    ))));
                }
                self.emit(Event::Unsubscribed { channel, reason }).await;
            }
            (ServerFrame::Error(e), Some(w)) => {
                let refused = ClientError::Server(e.clone());
                match w {
                    Waiter::User(r) | Waiter::ChatSend(r) => {
                        let _ = r.send(Err(refused));
                    }
                    Waiter::Unsubscribe(reply) => {
                        let _ = reply.send(Err(refused));
                    }
                    Waiter::Subscribe { channel } => {
                        self.subs.remove(&channel);
                        for r in self.sub_replies.remove(&channel).unwrap_or_default() {
                            let _ = r.send(Err(refused.clone()));
                        }
                        self.emit(Event::Error(e)).await;
                    }
                    Waiter::Fill(_) => {}
                    Waiter::Refresh => {
                        self.emit(Event::Error(e)).await;
                        return Ok(FrameOutcome::RefreshFailed);
                    }
                }
            }
            (ServerFrame::Error(e), None) => {
                ended.retry_after = e.retry_after_ms;
                self.emit(Event::Error(e)).await;
            }
            (f @ ServerFrame::Ack { .. }, Some(Waiter::ChatSend(reply))) => {
                if let ServerFrame::Ack {
                    session_id: Some(s),
                    request_id: Some(r),
                    ..
                } = &f
                {
                    self.chats.acked(s, r, now);
                }
                let _ = reply.send(Ok(f));
            }
            (
                ServerFrame::History {
                    session_id,
                    messages,
                    ..
                },
                Some(Waiter::Fill(delivery)),
            ) => {
                for e in self.chats.fill(&session_id, &messages, delivery) {
                    self.emit(Event::Chat(e)).await;
                }
            }
            (ServerFrame::Refreshed { expires_at, .. }, _) => {
                self.emit(Event::Refreshed { expires_at }).await;
                return Ok(FrameOutcome::Refreshed(expires_at));
            }
            (ServerFrame::TokenExpiring { .. }, _) => return Ok(FrameOutcome::Refresh),
            (
                ServerFrame::ChatChunk {
                    session_id,
                    request_id,
                    seq,
                    content,
                },
                _,
            ) => {
                let events = self.chats.chunk(session_id, request_id, seq, content, now);
                if events.is_empty() {
                    self.counters.repeated_chunks.fetch_add(1, Relaxed);
                }
                for e in events {
                    self.emit(Event::Chat(e)).await;
                }
            }
            (
                ServerFrame::ChatComplete {
                    session_id,
                    request_id,
                    content,
                    usage,
                },
                _,
            ) => {
                if self.chats.finish(&request_id) {
                    let e = ChatEvent::Complete {
                        session_id,
                        request_id,
                        content,
                        usage,
                        delivery: Delivery::Live,
                    };
                    self.emit(Event::Chat(e)).await;
                } else {
                    self.counters.duplicate_finals.fetch_add(1, Relaxed);
                }
            }
            (
                ServerFrame::ChatError {
                    session_id,
                    request_id,
                    code,
                    message,
                    retryable,
                },
                _,
            ) => {
                if self.chats.finish(&request_id) {
                    let e = ChatEvent::Error {
                        session_id,
                        request_id,
                        code,
                        message,
                        retryable,
                    };
                    self.emit(Event::Chat(e)).await;
                } else {
                    self.counters.duplicate_finals.fetch_add(1, Relaxed);
                }
            }
            (ServerFrame::Reconnect { retry_after_ms, .. }, _) => {
                ended.reconnect_hint = Some(retry_after_ms);
                self.emit(Event::Draining { retry_after_ms }).await;
            }
            (
                ServerFrame::Context {
                    teams,
                    tasks,
                    degraded,
                },
                _,
            ) => {
                self.emit(Event::Context {
                    teams,
                    tasks,
                    degraded,
                })
                .await;
            }
            (ServerFrame::Join { channel, user }, _) => {
                self.emit(Event::Join { channel, user }).await
            }
            (ServerFrame::Leave { channel, user }, _) => {
                self.emit(Event::Leave { channel, user }).await
            }
            (ServerFrame::Typing { channel, user }, _) => {
                self.emit(Event::Typing { channel, user }).await
            }
            (
                ServerFrame::Read {
                    channel,
                    user,
                    offset,
                },
                _,
            ) => {
                self.emit(Event::Read {
                    channel,
                    user,
                    offset,
                })
                .await
            }
            (f, Some(Waiter::User(reply))) => {
                let _ = reply.send(Ok(f));
            }
            (_, _) => {}
        }
        Ok(FrameOutcome::Continue)
    }
}

enum FrameOutcome {
    Continue,
    /// `token_expiring`: get a new token.
    Refresh,
    RefreshFailed,
    Refreshed(u64),
}

/// The id of a direct reply (the client numbers its requests).
fn reply_id(frame: &ServerFrame) -> Option<i64> {
    let id = match frame {
        ServerFrame::Authenticated { id, .. }
        | ServerFrame::Refreshed { id, .. }
        | ServerFrame::Pong { id }
        | ServerFrame::Subscribed { id, .. }
        | ServerFrame::Unsubscribed { id, .. }
        | ServerFrame::Ack { id, .. }
        | ServerFrame::History { id, .. }
        | ServerFrame::Presence { id, .. } => id.as_ref(),
        ServerFrame::Error(e) => e.id.as_ref(),
        _ => None,
    };
    match id {
        Some(FrameId::Int(i)) => Some(*i),
        _ => None,
    }
}

fn frame_text(frame: &ClientFrame, id: Option<i64>) -> String {
    let mut v = serde_json::to_value(frame).expect("client frames serialise");
    if let (Some(id), Some(obj)) = (id, v.as_object_mut()) {
        obj.insert("id".into(), id.into());
    }
    v.to_string()
}

/// A clean close: 1000, then a short wait for the server's close frame.
async fn close(sink: &mut Sink, stream: &mut SplitStream<Ws>) {
    let frame = CloseFrame {
        code: WsCloseCode::Normal,
        reason: "client closed".into(),
    };
    let _ = sink.send(Message::Close(Some(frame))).await;
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(m)) = stream.next().await {
            if m.is_close() {
                break;
            }
        }
    })
    .await;
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
