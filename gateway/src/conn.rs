//! One client connection from upgrade to close: authentication (handshake token or
//! `auth` frame within the deadline), the frame loop with rate limits, token refresh
//! and expiry, heartbeats, outbound delivery from the hub, and every way it can end.
//!
//! A connection is one task: one `select!` over the close signal, socket readiness
//! (reads and writes are cancel-safe), the outbound queue and the next timer. The
//! handlers of an event run in a boxed future, so the long-lived connection future
//! stays small (an idle connection's memory is mostly this future).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use shared::auth::Claims;
use shared::metrics as m;
use shared::protocol::{ClientFrame, ClientMessage, FrameId, ServerFrame, UserInfo};
use shared::store::{Admission, ConnRecord, now_ms};
use tokio::time::sleep_until;
use tracing::Instrument;

use crate::channels::{self, Announce, Perms, SubscribeOptions, Subscriptions};
use crate::chat;
use crate::close::{CloseCause, CloseSignal};
use crate::credentials::Source;
use crate::error::SessionError;
use crate::hub::{Closer, Member, Outbound, Registration, TokenSlot};
use crate::limits::{Bucket, MessageLimiter, MessageVerdict};
use crate::node::Node;
use crate::outbox::Outbox;
use crate::transport::{self, Inbound, ReadError, WsReader, WsWriter};

/// The upgrade must complete this quickly after the 101 response.
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);
/// `token_expiring` is sent this long before `exp` (PROTOCOL.md: about 60 s).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(60);
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
/// `refresh` frames a connection may send at once: a client retrying a refresh a
/// couple of times is fine; each costs a token check and a context fetch.
pub const REFRESH_BURST: f64 = 3.0;
/// Sustained `refresh` frames per second per connection: tokens live minutes to
/// hours, so one every 30 s is far more than any client needs.
pub const REFRESH_PER_SEC: f64 = 1.0 / 30.0;

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
            node.release_socket();
            return;
        }
        Err(_) => {
            node.release_socket();
            return;
        }
    };
    let closer = Arc::new(Closer::default());
    let guard = node.track_socket(closer.clone());
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
        auth: None,
        last_heard: now,
        next_ping: now,
        auth_deadline: now,
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

/// An authenticated identity on this connection.
struct Authed {
    claims: Claims,
    /// The current token, shared with the hub (context re-checks use it).
    token: TokenSlot,
    /// Allowance of `refresh` frames.
    refreshes: Bucket,
    /// Close 4001 at this instant (exp + leeway).
    expires: Instant,
    /// Send `token_expiring` at this instant, once.
    warn_at: Option<Instant>,
    perms: Perms,
    subs: Subscriptions,
    _registration: Registration,
    /// This connection's member of the user's Redis registry (`ConnRecord::member`).
    registry: Arc<str>,
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
    auth: Option<Authed>,
    limiter: MessageLimiter,
    last_heard: Instant,
    next_ping: Instant,
    auth_deadline: Instant,
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

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_conn_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl Session {
    /// Serves the connection until it ends; the caller then runs [`Session::finish`].
    async fn run(
        &mut self,
        token: Option<Result<(String, Source), &'static str>>,
        refusal: Option<SessionError>,
    ) -> End {
        let now = Instant::now();
        self.auth_deadline = now + self.node.config.auth_timeout;
        self.next_ping = now + self.node.config.ping_interval;
        let mut end = None;
        if let Some(refusal) = refusal {
            end = Some(self.fail(refusal, None).await);
        } else {
            match token {
                Some(Ok((token, source))) => {
                    if let Err(e) =
                        Box::pin(self.authenticate(token, source, None, self.started)).await
                    {
                        end = Some(self.fail(e, None).await);
                    }
                }
                Some(Err(why)) => {
                    let e = SessionError::Auth(shared::auth::AuthError::Malformed);
                    tracing::debug!(why, "malformed handshake credentials");
                    end = Some(self.fail(e, None).await);
                }
                None => {}
            }
        }

        match end {
            Some(Some(end)) => end,
            _ => loop {
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
                    Event::Read(res) => Box::pin(self.on_read(res, self.started)).await,
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
        match &self.auth {
            None => d = d.min(self.auth_deadline),
            Some(a) => {
                d = d.min(a.expires);
                if let Some(r) = channels::next_repair(&a.subs) {
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
        if let Some(a) = self.auth.as_mut()
            && channels::next_repair(&a.subs).is_some_and(|t| now >= t)
        {
            match channels::repair_gaps(&node, &mut a.subs, now).await {
                Ok(frames) => self.write_all(&frames),
                Err(e) => return self.fail(e, None).await,
            }
        }
        match &mut self.auth {
            None if now >= self.auth_deadline => {
                return self.fail(SessionError::AuthTimeout, None).await;
            }
            Some(a) if now >= a.expires => {
                return self.fail(SessionError::TokenExpired, None).await;
            }
            Some(a) if a.warn_at.is_some_and(|w| now >= w) => {
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
                let Some(a) = self.auth.as_mut() else {
                    return;
                };
                let frames = channels::on_publication(&mut a.subs, &channel, at, frame);
                self.write_all(&frames)
            }
            Outbound::Context(ctx) => self.apply_context(&ctx).await,
            Outbound::Event {
                channel,
                skip_user,
                frame,
            } => {
                let wanted = self.auth.as_ref().is_some_and(|a| {
                    channels::wants_event(
                        &a.subs,
                        &channel,
                        skip_user.as_deref(),
                        &a.claims.user_id,
                    )
                });
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
        let (node, conn_id) = (self.node.clone(), self.conn_id.clone());
        let Some(a) = self.auth.as_mut() else {
            return;
        };
        a.perms.teams = channels::teams_of(ctx);
        let revoked = channels::revoke_lost(&node, &conn_id, &a.perms, &mut a.subs).await;
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

    async fn on_read(&mut self, res: Result<Inbound, ReadError>, started: Instant) -> Option<End> {
        self.last_heard = Instant::now();
        match res {
            Ok(Inbound::Text(text)) => self.on_text(text, started).await,
            Ok(Inbound::Binary(_)) => self.fail(SessionError::Binary, None).await,
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
                Some(CloseCause::Error { error, id }) => self.fail(error, id).await,
                Some(cause) => Some(end_with(&cause)),
                None => Some(End::PeerGone),
            },
        }
    }

    async fn on_text(&mut self, text: Bytes, started: Instant) -> Option<End> {
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
                return self.fail(SessionError::RateLimited(wait), id).await;
            }
            MessageVerdict::Abusive(wait) => {
                metrics::counter!(m::RATE_LIMITED, "scope" => "message").increment(1);
                return self.fail(SessionError::Abusive(wait), id).await;
            }
        }
        let msg = match parsed {
            Ok(msg) => msg,
            Err(e) => {
                metrics::counter!(m::FRAMES_IN, "type" => "invalid").increment(1);
                return self.fail(SessionError::BadRequest(e.message), e.id).await;
            }
        };
        metrics::counter!(m::FRAMES_IN, "type" => msg.frame.kind()).increment(1);
        let id = msg.id;
        let result = match msg.frame {
            ClientFrame::Auth { token } if self.auth.is_none() => {
                self.authenticate(token, Source::Frame, id.clone(), started)
                    .await
            }
            ClientFrame::Auth { .. } => Err(SessionError::BadRequest(
                "already authenticated; use `refresh` to replace the token".into(),
            )),
            ClientFrame::Ping {} => {
                self.send(&ServerFrame::Pong { id: id.clone() });
                Ok(())
            }
            _ if self.auth.is_none() => Err(SessionError::BadRequest(
                "send an `auth` frame first".into(),
            )),
            ClientFrame::Refresh { token } => self.refresh(token, id.clone()).await,
            ClientFrame::ChatSend {
                message,
                session_id,
                files,
            } => {
                let user = self.user_id();
                let r = chat::send(&self.node, &user, message, session_id, files, id.clone()).await;
                self.reply(r).await
            }
            ClientFrame::ChatCancel { request_id } => {
                let user = self.user_id();
                let r = chat::cancel(&self.node, &user, &request_id, id.clone()).await;
                self.reply(r).await
            }
            ClientFrame::History { session_id, limit } => {
                let user = self.user_id();
                let r = chat::history(&self.node, &user, &session_id, limit, id.clone()).await;
                self.reply(r).await
            }
            ClientFrame::Subscribe {
                channel,
                since,
                epoch,
            } => {
                let node = self.node.clone();
                let conn_id = self.conn_id.clone();
                let r = match self.auth.as_mut() {
                    Some(a) => {
                        let opts = SubscribeOptions {
                            since,
                            epoch: epoch.as_deref(),
                            announce: Some(Announce { id: id.clone() }),
                        };
                        channels::subscribe(&node, &conn_id, &a.perms, &mut a.subs, &channel, opts)
                            .await
                    }
                    None => Ok(Vec::new()),
                };
                match r {
                    Ok(frames) => self.write_paced(frames).await,
                    Err(e) => Err(e),
                }
            }
            ClientFrame::Unsubscribe { channel } => {
                let node = self.node.clone();
                let conn_id = self.conn_id.clone();
                let r = match self.auth.as_mut() {
                    Some(a) => {
                        channels::unsubscribe(
                            &node,
                            &conn_id,
                            &a.perms,
                            &mut a.subs,
                            &channel,
                            id.clone(),
                        )
                        .await
                    }
                    None => Err(SessionError::BadRequest(
                        "send an `auth` frame first".into(),
                    )),
                };
                self.reply(r).await
            }
            ClientFrame::Publish { channel, data } => {
                let r = match &self.auth {
                    Some(a) => {
                        channels::client_publish(&self.node, &a.perms, &channel, &data, id.clone())
                            .await
                    }
                    None => Err(SessionError::BadRequest(
                        "send an `auth` frame first".into(),
                    )),
                };
                self.reply(r).await
            }
            ClientFrame::Presence { channel } => {
                let r = match &self.auth {
                    Some(a) => channels::presence(&self.node, &a.perms, &channel, id.clone()).await,
                    None => Err(SessionError::BadRequest(
                        "send an `auth` frame first".into(),
                    )),
                };
                self.reply(r).await
            }
            ClientFrame::Typing { channel } => match &self.auth {
                Some(a) => channels::typing(&self.node, &a.perms, &a.subs, &channel).await,
                None => Err(SessionError::BadRequest(
                    "send an `auth` frame first".into(),
                )),
            },
            ClientFrame::Read { channel, offset } => {
                let r = match &self.auth {
                    Some(a) => {
                        channels::read(&self.node, &a.perms, &channel, offset, id.clone()).await
                    }
                    None => Err(SessionError::BadRequest(
                        "send an `auth` frame first".into(),
                    )),
                };
                self.reply(r).await
            }
        };
        match result {
            Ok(()) => None,
            Err(e) => self.fail(e, id).await,
        }
    }

    /// The authenticated user's id (empty before authentication, which the frame
    /// dispatch rules out).
    fn user_id(&self) -> String {
        self.auth
            .as_ref()
            .map(|a| a.claims.user_id.clone())
            .unwrap_or_default()
    }

    /// Sends a handler's direct reply, or passes its error on.
    async fn reply(&mut self, r: Result<ServerFrame, SessionError>) -> Result<(), SessionError> {
        self.send(&r?);
        Ok(())
    }

    /// Validates a token, checks revocation and the per-user limit, fetches the user's
    /// context, joins the hub and answers `authenticated`.
    async fn authenticate(
        &mut self,
        token: String,
        source: Source,
        id: Option<FrameId>,
        started: Instant,
    ) -> Result<(), SessionError> {
        let node = self.node.clone();
        let claims = node.validator.validate(&token).map_err(|e| {
            metrics::counter!(m::AUTH_FAILURES, "reason" => e.reason()).increment(1);
            SessionError::Auth(e)
        })?;
        self.check_revoked(&claims).await?;

        let rec = ConnRecord {
            conn_id: self.conn_id.to_string(),
            user_id: claims.user_id.clone(),
            node: node.config.node_id.clone(),
            ip: self.ip.to_string(),
            connected_at: now_ms(),
        };
        match node
            .store
            .register_conn(&rec, node.config.max_connections_per_user)
            .await
        {
            Ok(Admission::Admitted) => {}
            Ok(Admission::OverLimit) => return Err(SessionError::ConnectionLimit),
            Err(e) => {
                metrics::counter!(m::REDIS_ERRORS, "op" => "register").increment(1);
                tracing::warn!(error = %e, "cannot register connection");
                return Err(SessionError::AuthUnavailable("session store"));
            }
        }
        // From here on the Redis record exists: `finish` removes it on every path.
        let registry: Arc<str> = rec.member().into();
        let token_slot: TokenSlot = Arc::new(std::sync::Mutex::new(token.as_str().into()));
        let user: Arc<str> = claims.user_id.as_str().into();
        let registration = match node
            .hub
            .register(Member {
                conn_id: self.conn_id.clone(),
                user_id: user,
                outbox: self.outbox.clone(),
                closer: self.closer.clone(),
                registry: registry.clone(),
                token: token_slot.clone(),
            })
            .await
        {
            Ok(r) => r,
            Err(e) => {
                metrics::counter!(m::NATS_ERRORS, "op" => "subscribe").increment(1);
                tracing::warn!(error = %e, "cannot subscribe user subject");
                self.unregister(&claims.user_id, &registry).await;
                return Err(SessionError::AuthUnavailable("message bus"));
            }
        };
        let ctx = node.user_context(&claims.user_id, &token, false).await;
        tracing::Span::current().record("user", claims.user_id.as_str());
        let ctx_for_perms = ctx.clone();
        let user_id_str = claims.user_id.clone();

        let (expires, warn_at) = self.timers_for(claims.exp);
        let frame = ServerFrame::Authenticated {
            user: UserInfo {
                id: claims.user_id.clone(),
                email: claims.email.clone(),
                role: claims.role.clone(),
            },
            expires_at: claims.exp,
            teams: ctx.teams,
            tasks: ctx.tasks,
            degraded: ctx.degraded,
            node: node.config.node_id.clone(),
            conn_id: self.conn_id.to_string(),
            id,
        };
        let perms = Perms::new(&claims.user_id, &ctx_for_perms);
        self.auth = Some(Authed {
            claims,
            token: token_slot,
            refreshes: Bucket::new(REFRESH_PER_SEC, REFRESH_BURST, Instant::now()),
            expires,
            warn_at,
            perms,
            subs: Subscriptions::default(),
            _registration: registration,
            registry,
        });
        // Every connection is subscribed to its own `user:` channel.
        let own = format!("{}:{}", channels::USER_NAMESPACE, user_id_str);
        let (node2, conn_id) = (self.node.clone(), self.conn_id.clone());
        if let Some(a) = self.auth.as_mut()
            && let Err(e) = channels::subscribe(
                &node2,
                &conn_id,
                &a.perms,
                &mut a.subs,
                &own,
                SubscribeOptions::default(),
            )
            .await
        {
            tracing::warn!(error = %e, "own user channel not subscribed");
        }
        metrics::gauge!(m::CONNECTIONS_PENDING).decrement(1.0);
        metrics::gauge!(m::CONNECTIONS).increment(1.0);
        metrics::counter!(m::CONNECTS, "result" => "ok").increment(1);
        metrics::histogram!(m::HANDSHAKE_SECONDS).record(started.elapsed().as_secs_f64());
        tracing::debug!(
            source = source.label(),
            degraded = ctx.degraded,
            "authenticated"
        );
        self.send(&frame);
        Ok(())
    }

    /// Replaces the token of a live connection (same user only).
    async fn refresh(&mut self, token: String, id: Option<FrameId>) -> Result<(), SessionError> {
        if let Some(a) = &mut self.auth
            && !a.refreshes.try_take(Instant::now())
        {
            metrics::counter!(m::RATE_LIMITED, "scope" => "refresh").increment(1);
            return Err(SessionError::RefreshRateLimited(a.refreshes.wait_time()));
        }
        let claims = self.node.validator.validate(&token).map_err(|e| {
            metrics::counter!(m::AUTH_FAILURES, "reason" => e.reason()).increment(1);
            SessionError::RefreshRejected(e)
        })?;
        let Some(current) = &self.auth else {
            return Err(SessionError::BadRequest(
                "send an `auth` frame first".into(),
            ));
        };
        if claims.user_id != current.claims.user_id {
            metrics::counter!(m::AUTH_FAILURES, "reason" => "wrong_user").increment(1);
            return Err(SessionError::WrongUser);
        }
        self.check_revoked(&claims).await?;
        let (expires, warn_at) = self.timers_for(claims.exp);
        let exp = claims.exp;
        // The user's teams may have changed: refresh them, and drop subscriptions
        // to teams the user left.
        let ctx = self.node.user_context(&claims.user_id, &token, false).await;
        let (node, conn_id) = (self.node.clone(), self.conn_id.clone());
        let mut revoked = Vec::new();
        if let Some(a) = &mut self.auth {
            a.claims = claims;
            *a.token.lock().unwrap_or_else(|p| p.into_inner()) = token.into();
            a.expires = expires;
            a.warn_at = warn_at;
            if !ctx.degraded {
                a.perms.teams = channels::teams_of(&ctx);
                revoked = channels::revoke_lost(&node, &conn_id, &a.perms, &mut a.subs).await;
            }
        }
        self.send(&ServerFrame::Refreshed {
            expires_at: exp,
            id,
        });
        self.write_all(&revoked);
        Ok(())
    }

    async fn check_revoked(&self, claims: &Claims) -> Result<(), SessionError> {
        let Some(jti) = &claims.jti else {
            return Ok(());
        };
        match self.node.revocations.is_revoked(jti) {
            Ok(false) => Ok(()),
            Ok(true) => {
                metrics::counter!(m::AUTH_FAILURES, "reason" => "revoked").increment(1);
                Err(SessionError::Revoked)
            }
            Err(crate::revocations::NotSynced) => {
                // The list was never read (Redis down since start): nothing to vouch
                // for the token with.
                metrics::counter!(m::REDIS_ERRORS, "op" => "revoked").increment(1);
                Err(SessionError::AuthUnavailable("session store"))
            }
        }
    }

    /// Close and warning instants for a token's `exp`: the connection lives until
    /// exp + leeway, the same leeway the validator granted, so a token that was just
    /// accepted is never closed at once (the seeds' expired-token loop).
    fn timers_for(&self, exp: u64) -> (Instant, Option<Instant>) {
        let now = Instant::now();
        let left = Duration::from_secs(
            (exp + self.node.config.jwt.leeway_secs).saturating_sub(unix_now()),
        );
        let expires = now + left;
        let warn_at = Some(
            now + Duration::from_secs(exp.saturating_sub(unix_now()))
                .saturating_sub(EXPIRY_WARNING),
        );
        (expires, warn_at)
    }

    /// Sends a server frame straight to the socket.
    /// Queues a server frame; the loop writes it.
    fn send(&mut self, frame: &ServerFrame) {
        metrics::counter!(m::FRAMES_OUT, "type" => frame.kind()).increment(1);
        self.writer.queue_text(&frame.to_bytes());
    }

    /// Answers an error: an `error` frame, or for fatal errors the close (its
    /// [`CloseCause`] carries the error frame).
    async fn fail(&mut self, e: SessionError, id: Option<FrameId>) -> Option<End> {
        if !e.is_fatal() {
            self.send(&ServerFrame::Error(e.to_body(id)));
            return None;
        }
        if self.auth.is_none() {
            metrics::counter!(m::CONNECTS, "result" => e.connect_result()).increment(1);
        }
        Some(end_with(&CloseCause::Error { error: e, id }))
    }

    async fn unregister(&self, user_id: &str, registry: &str) {
        if let Err(e) = self.node.store.unregister_conn(user_id, registry).await {
            metrics::counter!(m::REDIS_ERRORS, "op" => "unregister").increment(1);
            // The record expires by itself within the connection TTL.
            tracing::debug!(error = %e, "cannot unregister connection");
        }
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
        if let Some(mut a) = self.auth.take() {
            metrics::gauge!(m::CONNECTIONS).decrement(1.0);
            channels::leave_all(&self.node, &self.conn_id, &a.perms, &mut a.subs).await;
            let user = a.claims.user_id.clone();
            let registry = a.registry.clone();
            drop(a);
            self.unregister(&user, &registry).await;
        } else {
            metrics::gauge!(m::CONNECTIONS_PENDING).decrement(1.0);
        }
    }
}

/// The one way the loop ends on our side: the cause's signal, sent by `finish`.
fn end_with(cause: &CloseCause) -> End {
    let signal = cause.signal();
    tracing::debug!(?cause, code = %signal.code, "closing");
    End::Close(Box::new(signal))
}
