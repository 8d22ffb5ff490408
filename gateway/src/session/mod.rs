//! One client connection from upgrade to close, as a state machine whose states are
//! types: an [`Unauthed`] connection answers only `auth` and `ping` and closes at its
//! auth deadline; authentication turns it into an [`Authed`] one, and only that state
//! reaches the frame handlers, one module per frame family ([`auth`], [`channels`],
//! [`chat`]), each given a small [`Ctx`] rather than the whole session.
//!
//! A connection is one task: one `select!` over the close signal, socket readiness
//! (reads and writes are cancel-safe), the outbound queue and the next timer. The
//! handlers of an event run in a boxed future, so the long-lived connection future
//! stays small (an idle connection's memory is mostly this future). Every way it
//! ends is a [`CloseCause`].

mod auth;
mod channels;
mod chat;
mod state;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use shared::metrics as m;
use shared::protocol::{ClientFrame, ClientMessage, FrameId, ServerFrame};
use tokio::time::sleep_until;
use tracing::Instrument;

use crate::close::{CloseCause, CloseSignal};
use crate::credentials::Source;
use crate::error::SessionError;
use crate::hub::{Closer, Outbound};
use crate::limits::{MessageLimiter, MessageVerdict};
use crate::node::Node;
use crate::outbox::Outbox;
use crate::transport::{self, Inbound, ReadError, WsReader, WsWriter};

use state::{Authed, Ctx, Reply, State, Unauthed};
pub use state::{EXPIRY_WARNING, REFRESH_BURST, REFRESH_PER_SEC};

/// The upgrade must complete this quickly after the 101 response.
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames taken from the outbound queue in one go, so a burst of deliveries becomes
/// one write instead of a select round and a syscall per frame.
const OUTBOUND_BATCH: usize = 64;
/// Bytes waiting for a slow peer before the connection stops taking more work:
/// beyond this, the outbound queue fills and the hub closes the connection 4008.
pub const MAX_PENDING_BYTES: usize = 64 * 1024;
/// A history replay waits for the peer to drain the write buffer below
/// [`MAX_PENDING_BYTES`] before the next page; a peer that takes nothing for this
/// long is a slow consumer (closed 4008). The same bound as a stuck write.
pub const REPLAY_STALL_TIMEOUT: Duration = transport::WRITE_TIMEOUT;
/// What the upgrade request decided before the socket existed.
pub struct Upgrade {
    pub ip: IpAddr,
    pub started: Instant,
    /// Handshake credentials (or the reason they are malformed).
    pub token: Option<Result<(String, Source), &'static str>>,
    /// Refuse after the upgrade with this error (rate limit, node full).
    pub refusal: Option<SessionError>,
}

/// Serves one upgraded socket until it closes.
/// `up` is boxed and the session is driven by reference: an async fn keeps its
/// by-value arguments twice in its state (as captured and as locals), and this state
/// is the biggest part of an idle connection's memory.
pub async fn serve(node: Arc<Node>, fut: fastwebsockets::upgrade::UpgradeFut, up: Box<Upgrade>) {
    let accepted = tokio::time::timeout(
        UPGRADE_TIMEOUT,
        transport::accept(fut, node.config.max_message_bytes),
    )
    .await;
    let (reader, writer) = match accepted {
        Ok(Ok(rw)) => rw,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "upgrade failed");
            node.sockets.release();
            return;
        }
        Err(_) => {
            node.sockets.release();
            return;
        }
    };
    let closer = Arc::new(Closer::default());
    let guard = node.sockets.track(closer.clone());
    let conn_id = new_conn_id();
    let span =
        tracing::debug_span!("conn", conn_id = %conn_id, ip = %up.ip, user = tracing::field::Empty);
    let outbox = Arc::new(Outbox::new(node.config.outbound_queue));
    let now = Instant::now();
    let Upgrade {
        ip,
        started,
        token,
        refusal,
    } = *up;
    let mut session = Session {
        reader,
        limiter: MessageLimiter::new(node.config.message_rate, node.config.message_burst, now),
        node,
        conn_id: conn_id.into(),
        ip,
        started,
        closer,
        outbox,
        writer,
        state: State::Unauthed(Unauthed { deadline: now }),
        last_heard: now,
        next_ping: now,
    };
    metrics::gauge!(m::CONNECTIONS_PENDING).increment(1.0);
    async move {
        let end = session.run(token, refusal).await;
        Box::pin(session.finish(end)).await;
    }
    .instrument(span)
    .await;
    drop(guard);
}

struct Session {
    node: Arc<Node>,
    conn_id: Arc<str>,
    ip: IpAddr,
    /// When the TCP connection was accepted (handshake latency).
    started: Instant,
    closer: Arc<Closer>,
    /// Frames for this connection from the hub (deliveries), bounded.
    outbox: Arc<Outbox<Outbound>>,
    reader: WsReader,
    writer: WsWriter,
    state: State,
    limiter: MessageLimiter,
    last_heard: Instant,
    next_ping: Instant,
}

/// How the loop ended.
enum End {
    /// We close with this signal, after sending its frame.
    Close(Box<CloseSignal>),
    /// The peer sent a close frame (echoed already) or vanished.
    PeerGone,
}

enum Event {
    Kill,
    Read(Result<Inbound, ReadError>),
    Outbound(Outbound),
    Timer,
    /// The socket can take more of the write buffer.
    Writable,
    /// The socket failed.
    Gone,
}

fn new_conn_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Dispatches a frame of an authenticated connection to its family's handler.
async fn on_authed_frame(
    cx: &Ctx<'_>,
    a: &mut Authed,
    frame: ClientFrame,
) -> Result<Reply, SessionError> {
    match frame {
        ClientFrame::Auth { .. } => Err(SessionError::BadRequest(
            "already authenticated; use `refresh` to replace the token".into(),
        )),
        ClientFrame::Ping {} => Ok(Reply::Frame(ServerFrame::Pong { id: cx.id.clone() })),
        ClientFrame::Refresh { token } => auth::refresh(cx, a, token).await,
        ClientFrame::ChatSend {
            message,
            session_id,
            files,
        } => chat::send(cx, a, message, session_id, files).await,
        ClientFrame::ChatCancel { request_id } => chat::cancel(cx, a, &request_id).await,
        ClientFrame::History { session_id, limit } => {
            chat::history(cx, a, &session_id, limit).await
        }
        ClientFrame::Subscribe {
            channel,
            since,
            epoch,
        } => channels::subscribe(cx, a, &channel, since, epoch.as_deref()).await,
        ClientFrame::Unsubscribe { channel } => channels::unsubscribe(cx, a, &channel).await,
        ClientFrame::Publish { channel, data } => channels::publish(cx, a, &channel, &data).await,
        ClientFrame::Presence { channel } => channels::presence(cx, a, &channel).await,
        ClientFrame::Typing { channel } => channels::typing(cx, a, &channel).await,
        ClientFrame::Read { channel, offset } => channels::read(cx, a, &channel, offset).await,
    }
}

impl Session {
    /// Serves the connection until it ends; the caller then runs [`Session::finish`].
    async fn run(
        &mut self,
        token: Option<Result<(String, Source), &'static str>>,
        refusal: Option<SessionError>,
    ) -> End {
        let now = Instant::now();
        self.state = State::Unauthed(Unauthed {
            deadline: now + self.node.config.auth_timeout,
        });
        self.next_ping = now + self.node.config.ping_interval;
        let mut end = None;
        if let Some(refusal) = refusal {
            end = self.fail(refusal, None);
        } else {
            match token {
                Some(Ok((token, source))) => {
                    if let Err(e) = Box::pin(self.authenticate(token, source, None)).await {
                        end = self.fail(e, None);
                    }
                }
                Some(Err(why)) => {
                    let e = SessionError::Auth(shared::auth::AuthError::Malformed);
                    tracing::debug!(why, "malformed handshake credentials");
                    end = self.fail(e, None);
                }
                None => {}
            }
        }

        match end {
            Some(end) => end,
            None => loop {
                // Write what is queued without waiting; while the peer is slow to
                // drain, stop taking work (frames and deliveries) so memory stays
                // bounded and the hub's queue fills: that is the slow-consumer signal.
                match self.writer.try_flush() {
                    Ok(_) => {}
                    Err(_) => break End::PeerGone,
                }
                let room = self.writer.pending() < MAX_PENDING_BYTES;
                let deadline = self.next_deadline();
                let ev = tokio::select! {
                    biased;
                    _ = self.closer.closed() => Event::Kill,
                    r = self.writer.writable(), if self.writer.pending() > 0 => match r {
                        Ok(()) => Event::Writable,
                        Err(_) => Event::Gone,
                    },
                    res = self.reader.next(), if room => Event::Read(res),
                    item = self.outbox.take(), if room => Event::Outbound(item),
                    _ = sleep_until(deadline.into()) => Event::Timer,
                };
                let step = match ev {
                    Event::Kill => Some(match self.closer.cause() {
                        Some(cause) => end_with(cause),
                        None => end_with(&CloseCause::Unexplained),
                    }),
                    Event::Read(res) => Box::pin(self.on_read(res)).await,
                    Event::Outbound(first) => Box::pin(self.on_outbound(first)).await,
                    Event::Timer => Box::pin(self.on_timer()).await,
                    Event::Writable => None,
                    Event::Gone => Some(End::PeerGone),
                };
                if let Some(end) = step {
                    break end;
                }
            },
        }
    }

    /// Earliest instant something must happen without input.
    fn next_deadline(&self) -> Instant {
        let cfg = &self.node.config;
        let mut d = self.next_ping.min(self.last_heard + cfg.idle_timeout);
        match &self.state {
            State::Unauthed(u) => d = d.min(u.deadline),
            State::Authed(a) => {
                d = d.min(a.expires);
                if let Some(r) = crate::channels::next_repair(&a.subs) {
                    d = d.min(r);
                }
                if let Some(w) = a.warn_at {
                    d = d.min(w);
                }
            }
        }
        d
    }

    async fn on_timer(&mut self) -> Option<End> {
        let now = Instant::now();
        let node = self.node.clone();
        let cfg = &node.config;
        if let State::Authed(a) = &mut self.state
            && crate::channels::next_repair(&a.subs).is_some_and(|t| now >= t)
        {
            match crate::channels::repair_gaps(&node, &mut a.subs, now).await {
                Ok(frames) => self.write_all(&frames),
                Err(e) => return self.fail(e, None),
            }
        }
        match &mut self.state {
            State::Unauthed(u) if now >= u.deadline => {
                return self.fail(SessionError::AuthTimeout, None);
            }
            State::Authed(a) if now >= a.expires => {
                return self.fail(SessionError::TokenExpired, None);
            }
            State::Authed(a) if a.warn_at.is_some_and(|w| now >= w) => {
                a.warn_at = None;
                let f = ServerFrame::TokenExpiring {
                    expires_at: a.claims.exp,
                };
                self.send(&f);
            }
            _ => {}
        }
        if now >= self.last_heard + cfg.idle_timeout {
            return Some(end_with(&CloseCause::IdleTimeout));
        }
        if now >= self.next_ping {
            self.next_ping = now + cfg.ping_interval;
            self.writer.queue_ping(b"sb");
        }
        None
    }

    async fn on_outbound(&mut self, first: Outbound) -> Option<End> {
        let mut next = Some(first);
        let mut n = 0;
        while let Some(item) = next.take() {
            self.deliver(item).await;
            n += 1;
            if n < OUTBOUND_BATCH && self.writer.pending() < MAX_PENDING_BYTES {
                next = self.outbox.try_take();
            }
        }
        None
    }

    /// Writes one queued item: user frames as they are; channel publications after
    /// de-duplication and gap repair; events only where this connection wants them.
    async fn deliver(&mut self, item: Outbound) {
        match item {
            Outbound::Frame(b) => self.writer.queue_text(&b),
            Outbound::Publication { channel, at, frame } => {
                let State::Authed(a) = &mut self.state else {
                    return;
                };
                let frames = crate::channels::on_publication(&mut a.subs, &channel, at, frame);
                self.write_all(&frames)
            }
            Outbound::Context(ctx) => self.apply_context(&ctx).await,
            Outbound::Event {
                channel,
                skip_user,
                frame,
            } => {
                let wanted = match &self.state {
                    State::Authed(a) => crate::channels::wants_event(
                        &a.subs,
                        &channel,
                        skip_user.as_deref(),
                        &a.claims.user_id,
                    ),
                    State::Unauthed(_) => false,
                };
                if wanted {
                    self.writer.queue_text(&frame);
                }
            }
        }
    }

    /// Applies a context fetched again for this user: subscriptions the user may no
    /// longer hold end with `unsubscribed {reason: FORBIDDEN}`, then the client gets
    /// the new teams and tasks in a `context` frame.
    async fn apply_context(&mut self, ctx: &shared::protocol::UserContext) {
        let State::Authed(a) = &mut self.state else {
            return;
        };
        a.perms.teams = crate::channels::teams_of(ctx);
        let revoked =
            crate::channels::revoke_lost(&self.node, &self.conn_id, &a.perms, &mut a.subs).await;
        self.write_all(&revoked);
        self.send(&ServerFrame::Context {
            teams: ctx.teams.clone(),
            tasks: ctx.tasks.clone(),
            degraded: ctx.degraded,
        });
    }

    /// Writes a history replay (then the `subscribed` that follows it) within the
    /// same outbound budget as live traffic: frames go to the write buffer while it
    /// holds less than [`MAX_PENDING_BYTES`]; past that, the next page waits for the
    /// peer to drain it. A peer that takes nothing for [`REPLAY_STALL_TIMEOUT`] is a
    /// slow consumer. Nothing beyond the budget (and the replay itself, bounded by
    /// the channel's history) is ever held for a peer that does not read.
    async fn write_paced(&mut self, frames: Vec<Bytes>) -> Result<(), SessionError> {
        let mut progress_at = Instant::now();
        for f in frames {
            while self.writer.pending() >= MAX_PENDING_BYTES {
                let before = self.writer.pending();
                if self.writer.try_flush().is_err() {
                    // The socket failed: the loop finds out on its next flush.
                    return Ok(());
                }
                let after = self.writer.pending();
                if after < MAX_PENDING_BYTES {
                    break;
                }
                if after < before {
                    progress_at = Instant::now();
                }
                let deadline = progress_at + REPLAY_STALL_TIMEOUT;
                tokio::select! {
                    biased;
                    // Closing anyway: the loop takes the reason.
                    _ = self.closer.closed() => return Ok(()),
                    r = tokio::time::timeout_at(deadline.into(), self.writer.writable()) => match r {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return Ok(()),
                        Err(_) => {
                            metrics::counter!(m::SLOW_CONSUMERS).increment(1);
                            return Err(SessionError::SlowConsumer);
                        }
                    },
                }
            }
            self.writer.queue_text(&f);
        }
        Ok(())
    }

    fn write_all(&mut self, frames: &[Bytes]) {
        for f in frames {
            self.writer.queue_text(f);
        }
    }

    async fn on_read(&mut self, res: Result<Inbound, ReadError>) -> Option<End> {
        self.last_heard = Instant::now();
        match res {
            Ok(Inbound::Text(text)) => self.on_text(text).await,
            Ok(Inbound::Binary(_)) => self.fail(SessionError::Binary, None),
            Ok(Inbound::Ping(p)) => {
                self.writer.queue_pong(&p);
                None
            }
            Ok(Inbound::Pong) => None,
            Ok(Inbound::Close(code, _)) => {
                // The peer closes: echo its code (RFC 6455 section 5.5.1); no cause of ours.
                self.writer.queue_close(code.unwrap_or(1000), "");
                let _ = tokio::time::timeout(transport::CLOSE_LINGER, self.writer.flush()).await;
                Some(End::PeerGone)
            }
            Err(e) => match e.close_cause() {
                // An oversized message counts as a failed handshake like other errors.
                Some(CloseCause::Error { error, id }) => self.fail(error, id),
                Some(cause) => Some(end_with(&cause)),
                None => Some(End::PeerGone),
            },
        }
    }

    async fn on_text(&mut self, text: Bytes) -> Option<End> {
        let now = Instant::now();
        let parsed = ClientMessage::parse(&text);
        let id = match &parsed {
            Ok(msg) => msg.id.clone(),
            Err(e) => e.id.clone(),
        };
        match self.limiter.check(now) {
            MessageVerdict::Allow => {}
            MessageVerdict::Limited(wait) => {
                metrics::counter!(m::RATE_LIMITED, "scope" => "message").increment(1);
                return self.fail(SessionError::RateLimited(wait), id);
            }
            MessageVerdict::Abusive(wait) => {
                metrics::counter!(m::RATE_LIMITED, "scope" => "message").increment(1);
                return self.fail(SessionError::Abusive(wait), id);
            }
        }
        let msg = match parsed {
            Ok(msg) => msg,
            Err(e) => {
                metrics::counter!(m::FRAMES_IN, "type" => "invalid").increment(1);
                return self.fail(SessionError::BadRequest(e.message), e.id);
            }
        };
        metrics::counter!(m::FRAMES_IN, "type" => msg.frame.kind()).increment(1);
        let id = msg.id;
        let reply = match &mut self.state {
            State::Unauthed(_) => self.on_unauthed_frame(msg.frame, id.clone()).await,
            State::Authed(a) => {
                let cx = Ctx {
                    node: &self.node,
                    conn_id: &self.conn_id,
                    id: id.clone(),
                };
                on_authed_frame(&cx, a, msg.frame).await
            }
        };
        let result = match reply {
            Ok(reply) => self.answer(reply).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => None,
            Err(e) => self.fail(e, id),
        }
    }

    /// Before authentication only `auth` and `ping` mean anything.
    async fn on_unauthed_frame(
        &mut self,
        frame: ClientFrame,
        id: Option<FrameId>,
    ) -> Result<Reply, SessionError> {
        match frame {
            ClientFrame::Auth { token } => {
                self.authenticate(token, Source::Frame, id).await?;
                Ok(Reply::Nothing)
            }
            ClientFrame::Ping {} => Ok(Reply::Frame(ServerFrame::Pong { id })),
            _ => Err(SessionError::BadRequest(
                "send an `auth` frame first".into(),
            )),
        }
    }

    /// Authenticates with `token` and, on success, becomes [`State::Authed`] and
    /// answers `authenticated`.
    async fn authenticate(
        &mut self,
        token: String,
        source: Source,
        id: Option<FrameId>,
    ) -> Result<(), SessionError> {
        let hs = auth::Handshake {
            node: &self.node,
            conn_id: &self.conn_id,
            ip: self.ip,
            outbox: &self.outbox,
            closer: &self.closer,
            started: self.started,
        };
        let (authed, frame) = auth::authenticate(&hs, token, source, id).await?;
        self.state = State::Authed(authed);
        self.send(&frame);
        Ok(())
    }

    /// Writes a handler's answer.
    async fn answer(&mut self, reply: Reply) -> Result<(), SessionError> {
        match reply {
            Reply::Nothing => {}
            Reply::Frame(f) => self.send(&f),
            Reply::FrameThen(f, rest) => {
                self.send(&f);
                self.write_all(&rest);
            }
            Reply::Paced(frames) => return self.write_paced(frames).await,
        }
        Ok(())
    }

    /// Queues a server frame; the loop writes it.
    fn send(&mut self, frame: &ServerFrame) {
        metrics::counter!(m::FRAMES_OUT, "type" => frame.kind()).increment(1);
        self.writer.queue_text(&frame.to_bytes());
    }

    /// Answers an error: an `error` frame, or for fatal errors the close (its
    /// [`CloseCause`] carries the error frame).
    fn fail(&mut self, e: SessionError, id: Option<FrameId>) -> Option<End> {
        if !e.is_fatal() {
            self.send(&ServerFrame::Error(e.to_body(id)));
            return None;
        }
        if matches!(self.state, State::Unauthed(_)) {
            metrics::counter!(m::CONNECTS, "result" => e.connect_result()).increment(1);
        }
        Some(end_with(&CloseCause::Error { error: e, id }))
    }

    /// Sends the close sequence (if we are the one closing), waits briefly for the
    /// peer's close, then releases everything the connection held.
    async fn finish(mut self, end: End) {
        self.outbox.close();
        if let End::Close(signal) = &end {
            metrics::counter!(m::CLOSES, "code" => signal.code.label()).increment(1);
            // What is already queued goes first; a slow peer gets the linger time to
            // drain it and see the close.
            if let Some(f) = &signal.frame {
                self.send(f);
            }
            self.writer.queue_close(signal.code.as_u16(), signal.text);
            let flushed = tokio::time::timeout(transport::CLOSE_LINGER, self.writer.flush()).await;
            if matches!(flushed, Ok(Ok(()))) {
                // Wait a moment for the peer's close; anything else it says no
                // longer matters.
                let _ = tokio::time::timeout(transport::CLOSE_LINGER, self.reader.next()).await;
            }
        }
        match self.state {
            State::Authed(mut a) => {
                metrics::gauge!(m::CONNECTIONS).decrement(1.0);
                crate::channels::leave_all(&self.node, &self.conn_id, &a.perms, &mut a.subs).await;
                let user = a.claims.user_id.clone();
                let registry = a.registry.clone();
                drop(a);
                auth::unregister(&self.node, &user, &registry).await;
            }
            State::Unauthed(_) => {
                metrics::gauge!(m::CONNECTIONS_PENDING).decrement(1.0);
            }
        }
    }
}

/// The one way the loop ends on our side: the cause's signal, sent by `finish`.
fn end_with(cause: &CloseCause) -> End {
    let signal = cause.signal();
    tracing::debug!(?cause, code = %signal.code, "closing");
    End::Close(Box::new(signal))
}
