//! The node's local registry of authenticated connections and its NATS interest:
//! a node subscribes to `sb.user.<uid>` and `sb.ch.<ns>.<name>` only while it holds a
//! connection that needs them (reference-counted, on the [`Mux`] connection), and fans
//! each message out to the local connections by `try_send` into their bounded queues,
//! sharing the bytes. A full queue closes that connection 4008; nobody else waits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use shared::bus::{BusError, SharedBus, Subscription};
use shared::protocol::{Channel, DisconnectCommand, UserContext};
use shared::store::Position;
use shared::subjects::Subjects;
use tokio_util::sync::CancellationToken;

use crate::close::CloseCause;
use crate::error::SessionError;
use crate::mux::{Deliver, Msg, Mux, Topic};
use crate::outbox::{OfferError, Outbox};
use crate::recent_finals::RecentFinals;
use tokio_util::task::TaskTracker;

/// A NATS subscribe that takes longer than this means the client is wedged; the
/// request is answered `UNAVAILABLE` rather than left without deliveries.
pub const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The namespace whose channels ride on user subjects.
pub const USER_NAMESPACE: &str = "user";

// === Closer ===

/// Asks a connection's task to close; the first cause wins.
#[derive(Debug, Default)]
pub struct Closer {
    token: CancellationToken,
    /// Boxed: the cause is rare, the closer lives as long as the connection.
    cause: OnceLock<Box<CloseCause>>,
}

impl Closer {
    pub fn close(&self, cause: CloseCause) {
        if self.cause.set(Box::new(cause)).is_ok() {
            self.token.cancel();
        }
    }

    pub async fn closed(&self) {
        self.token.cancelled().await
    }

    pub fn cause(&self) -> Option<&CloseCause> {
        self.cause.get().map(|r| &**r)
    }
}

// === what the hub hands a connection ===

/// One item in a connection's outbound queue.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A ready frame for this connection (from its user subject).
    Frame(Bytes),
    /// A channel publication: the connection drops duplicates and repairs gaps by
    /// offset before writing it.
    Publication {
        channel: Arc<str>,
        at: Position,
        frame: Bytes,
    },
    /// The user's teams and tasks, fetched again (context refresh or re-check): the
    /// connection applies them to its permissions and tells the client.
    Context(Arc<UserContext>),
    /// An ephemeral channel event (join, leave, typing, read); never stored.
    Event {
        channel: Arc<str>,
        /// The user it came from, when the sender's own connections must skip it.
        skip_user: Option<Arc<str>>,
        frame: Bytes,
    },
}

// === Hub ===

/// One authenticated local connection as the hub sees it.
#[derive(Debug, Clone)]
pub struct Member {
    pub conn_id: Arc<str>,
    pub user_id: Arc<str>,
    pub outbox: Arc<Outbox<Outbound>>,
    pub closer: Arc<Closer>,
    /// The connection's member of the user's Redis registry, for its refresh.
    pub registry: Arc<str>,
    /// The connection's current token (replaced on `refresh`): the node fetches the
    /// user's context again with it.
    pub token: TokenSlot,
}

/// A connection's current token, shared between the connection and the hub.
pub type TokenSlot = Arc<Mutex<Arc<str>>>;

/// Which of `slots` re-check slots a user falls in: stable for a user, spread evenly
/// over users, so each is checked once per period and the checks are spread out.
pub fn slot_of(user: &str, slots: u64) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    user.hash(&mut h);
    h.finish() % slots.max(1)
}

struct ConnEntry {
    member: Member,
    channels: Vec<Arc<str>>,
}

/// Local connections interested in one subject, and what ends the subscription when
/// the last one leaves: its multiplexer id, or the switch of its forwarding task.
struct Interest {
    conns: Vec<Arc<str>>,
    sid: Option<u64>,
    /// Only for a forwarding task (the async-nats path).
    stop: Option<CancellationToken>,
}

/// How subscriptions reach the bus: the node's multiplexer (`nats://`), or one bus
/// subscription and forwarding task per subject (`.creds` NATS, and the in-memory
/// bus).
pub enum Wire {
    Mux(Arc<Mux>),
    Bus,
}

#[derive(Default)]
struct State {
    conns: HashMap<Arc<str>, ConnEntry>,
    users: HashMap<Arc<str>, Interest>,
    channels: HashMap<Arc<str>, Interest>,
}

/// The local registry; cheap to share (`Arc<Hub>`).
pub struct Hub {
    bus: SharedBus,
    wire: Wire,
    subjects: Subjects,
    state: Mutex<State>,
    /// Requests whose final frame local connections got (see `finals`). Locked
    /// after `state`, never before.
    finals: Mutex<RecentFinals>,
    /// Signalled when the subscription connection came back (see `Node::catch_up`).
    pub resubscribed: tokio::sync::Notify,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// Removes a connection (and its channel interest) from the hub when dropped.
pub struct Registration {
    hub: Arc<Hub>,
    conn_id: Arc<str>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.remove(&self.conn_id);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("NATS subscribe failed: {0}")]
    Subscribe(String),
    #[error("NATS did not answer within {0:?}")]
    Timeout(Duration),
}

impl Hub {
    pub fn new(
        bus: SharedBus,
        wire: Wire,
        subjects: Subjects,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Hub> {
        Arc::new(Hub {
            bus,
            wire,
            subjects,
            state: Mutex::new(State::default()),
            finals: Mutex::new(RecentFinals::default()),
            resubscribed: tokio::sync::Notify::new(),
            tasks,
            shutdown,
        })
    }

    /// Starts the multiplexer's connection (when there is one).
    pub fn start(self: &Arc<Self>) {
        if let Wire::Mux(mux) = &self.wire {
            let sink: Arc<dyn Deliver> = self.clone();
            self.tasks
                .spawn(mux.clone().run(sink, self.shutdown.clone()));
        }
    }

    /// The subscription connection is up (always true without a multiplexer: the
    /// async-nats client's state covers it).
    pub fn wire_connected(&self) -> bool {
        match &self.wire {
            Wire::Mux(m) => m.is_connected(),
            Wire::Bus => true,
        }
    }

    /// Records the first interest in a subject: on the multiplexer the `SUB` is queued
    /// at once; otherwise the caller subscribes with [`Hub::subscribe`] and the
    /// returned switch ends its forwarding task.
    fn first_interest(
        &self,
        interest: &mut Interest,
        subject: String,
        topic: Topic,
    ) -> Option<CancellationToken> {
        match &self.wire {
            Wire::Mux(m) => {
                interest.sid = Some(m.subscribe(subject, topic));
                None
            }
            Wire::Bus => {
                let stop = self.shutdown.child_token();
                interest.stop = Some(stop.clone());
                Some(stop)
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the maps half-updated in a way
        // that matters more than losing every connection, so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a connection; subscribes to the user's subject if it is the user's first
    /// on this node. The subscription is queued on the NATS connection before this
    /// returns, ahead of anything this connection publishes afterwards.
    pub async fn register(self: &Arc<Self>, m: Member) -> Result<Registration, HubError> {
        let (first, needs_task) = {
            let mut st = self.lock();
            st.conns.insert(
                m.conn_id.clone(),
                ConnEntry {
                    member: m.clone(),
                    channels: Vec::new(),
                },
            );
            match add_interest(&mut st.users, &m.user_id, &m.conn_id) {
                Some(interest) => {
                    let subject = self.subjects.user(&m.user_id);
                    let task =
                        self.first_interest(interest, subject, Topic::User(m.user_id.clone()));
                    (true, task)
                }
                None => (false, None),
            }
        };
        let reg = Registration {
            hub: self.clone(),
            conn_id: m.conn_id.clone(),
        };
        if let Some(stop) = needs_task {
            let subject = self.subjects.user(&m.user_id);
            self.subscribe(subject, Topic::User(m.user_id.clone()), stop)
                .await?;
        } else if first
            && let Wire::Mux(mux) = &self.wire
            && mux.is_connected()
        {
            // Best effort: the user's events flow once the server has the SUB. While
            // NATS is away the SUB waits in the table and authentication goes on.
            if let Err(e) = mux.flush(SUBSCRIBE_TIMEOUT).await {
                tracing::debug!(error = %e, "user subscription not confirmed");
            }
        }
        Ok(reg)
    }

    /// Adds a connection to a channel. Returns `true` when this node had no interest
    /// in the channel before (the caller then waits for [`Hub::barrier`]).
    pub async fn join_channel(
        self: &Arc<Self>,
        conn_id: &str,
        ch: &Channel,
    ) -> Result<bool, HubError> {
        let key: Arc<str> = ch.to_string().into();
        let needs_task = {
            let mut st = self.lock();
            let Some(entry) = st.conns.get_mut(conn_id) else {
                return Ok(false);
            };
            if entry.channels.contains(&key) {
                return Ok(false);
            }
            entry.channels.push(key.clone());
            let conn = entry.member.conn_id.clone();
            match add_interest(&mut st.channels, &key, &conn) {
                // The user's own channel arrives on the user subject, which this node
                // already holds for the connection's user.
                Some(_) if ch.namespace == USER_NAMESPACE => return Ok(false),
                Some(interest) => {
                    let subject = self.subjects.channel(&ch.namespace, &ch.name);
                    self.first_interest(interest, subject, Topic::Channel(key.clone()))
                }
                None => return Ok(false),
            }
        };
        if let Some(stop) = needs_task {
            let subject = self.subjects.channel(&ch.namespace, &ch.name);
            if let Err(e) = self.subscribe(subject, Topic::Channel(key), stop).await {
                self.leave_channel(conn_id, &ch.to_string());
                return Err(e);
            }
        }
        Ok(true)
    }

    /// Removes a connection from a channel; `true` if it was subscribed.
    pub fn leave_channel(&self, conn_id: &str, channel: &str) -> bool {
        let mut st = self.lock();
        let Some(entry) = st.conns.get_mut(conn_id) else {
            return false;
        };
        let before = entry.channels.len();
        entry.channels.retain(|c| &**c != channel);
        if entry.channels.len() == before {
            return false;
        }
        self.drop_interest(&mut st, Kind::Channel, channel, conn_id);
        true
    }

    /// Waits until the NATS server has processed every subscription queued so far:
    /// a request to a subject nobody serves is answered "no responders" only after
    /// the server read everything this connection sent before it.
    pub async fn barrier(&self) -> Result<(), HubError> {
        if let Wire::Mux(mux) = &self.wire {
            return mux.flush(SUBSCRIBE_TIMEOUT).await.map_err(|e| match e {
                crate::mux::MuxError::Timeout => HubError::Timeout(SUBSCRIBE_TIMEOUT),
                e => HubError::Subscribe(e.to_string()),
            });
        }
        self.bus
            .flush(SUBSCRIBE_TIMEOUT)
            .await
            .map_err(|e| match e {
                BusError::Timeout(t) => HubError::Timeout(t),
                e => HubError::Subscribe(e.to_string()),
            })
    }

    async fn subscribe(
        self: &Arc<Self>,
        subject: String,
        topic: Topic,
        stop: CancellationToken,
    ) -> Result<(), HubError> {
        let sub = match tokio::time::timeout(SUBSCRIBE_TIMEOUT, self.bus.subscribe(subject, None))
            .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(HubError::Subscribe(e.to_string())),
            Err(_) => return Err(HubError::Timeout(SUBSCRIBE_TIMEOUT)),
        };
        let hub = self.clone();
        self.tasks
            .spawn(async move { hub.forward(topic, sub, stop).await });
        Ok(())
    }

    fn remove(&self, conn_id: &str) {
        let mut st = self.lock();
        let Some(entry) = st.conns.remove(conn_id) else {
            return;
        };
        self.drop_interest(&mut st, Kind::User, &entry.member.user_id, conn_id);
        for ch in &entry.channels {
            self.drop_interest(&mut st, Kind::Channel, ch, conn_id);
        }
    }

    fn drop_interest(&self, st: &mut State, kind: Kind, key: &str, conn: &str) {
        let map = match kind {
            Kind::User => &mut st.users,
            Kind::Channel => &mut st.channels,
        };
        if let Some(i) = map.get_mut(key) {
            i.conns.retain(|c| &**c != conn);
            if i.conns.is_empty() {
                if let Some(stop) = &i.stop {
                    stop.cancel();
                }
                if let (Some(sid), Wire::Mux(mux)) = (i.sid, &self.wire) {
                    mux.unsubscribe(sid);
                }
                map.remove(key);
            }
        }
    }

    /// Delivers one subject's messages to its local connections until the last one
    /// leaves (or the node stops).
    async fn forward(&self, topic: Topic, mut sub: Subscription, stop: CancellationToken) {
        loop {
            let msg = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                m = sub.next() => match m {
                    Some(m) => m,
                    None => break,
                },
            };
            let headers = crate::mux::headers_of(&msg);
            self.deliver(
                &topic,
                Msg {
                    payload: msg.payload,
                    headers,
                },
            );
        }
        // Dropping the subscription unsubscribes.
        drop(sub);
    }

    /// Queues a ready frame for every local connection of `user`.
    pub fn deliver_to_user(&self, user: &str, payload: Bytes) {
        let st = self.lock();
        let Some(interest) = st.users.get(user) else {
            return;
        };
        for id in &interest.conns {
            if let Some(e) = st.conns.get(id) {
                offer(&e.member, Outbound::Frame(payload.clone()));
            }
        }
    }

    /// Queues a fetched context for every local connection of `user`; returns how
    /// many got it.
    pub fn deliver_context(&self, user: &str, ctx: Arc<UserContext>) -> usize {
        let st = self.lock();
        let Some(interest) = st.users.get(user) else {
            return 0;
        };
        let mut n = 0;
        for id in &interest.conns {
            if let Some(e) = st.conns.get(id) {
                offer(&e.member, Outbound::Context(ctx.clone()));
                n += 1;
            }
        }
        n
    }

    /// A current token of one of `user`'s local connections, if it has any.
    pub fn token_of(&self, user: &str) -> Option<Arc<str>> {
        let st = self.lock();
        let id = st.users.get(user)?.conns.first()?;
        let e = st.conns.get(id)?;
        let token = e.member.token.lock().unwrap_or_else(|p| p.into_inner());
        Some(token.clone())
    }

    /// Users with local connections in re-check slot `slot` of `slots`.
    pub fn users_in_slot(&self, slot: u64, slots: u64) -> Vec<Arc<str>> {
        let st = self.lock();
        st.users
            .keys()
            .filter(|u| slot_of(u, slots) == slot)
            .cloned()
            .collect()
    }

    /// A worker's chat frame for `user`: a request's first final frame is delivered
    /// and remembered, a repeated one dropped, and so are chunks arriving after the
    /// final. Only users with local connections are remembered.
    fn deliver_chat(&self, user: &str, request: &str, last: bool, payload: Bytes) -> bool {
        let st = self.lock();
        let Some(interest) = st.users.get(user) else {
            return false;
        };
        {
            let mut finals = self.finals.lock().unwrap_or_else(|e| e.into_inner());
            let fresh = if last {
                finals.first(request, std::time::Instant::now())
            } else {
                !finals.finished(request)
            };
            if !fresh {
                let kind = if last { "final" } else { "chunk" };
                metrics::counter!(shared::metrics::CHAT_FRAMES_DROPPED, "kind" => kind)
                    .increment(1);
                return false;
            }
        }
        for id in &interest.conns {
            if let Some(e) = st.conns.get(id) {
                offer(&e.member, Outbound::Frame(payload.clone()));
            }
        }
        true
    }

    /// A final frame from the `SB_CHAT_EVENTS` stream (see `finals`): delivered
    /// unless the live copy was.
    pub fn deliver_stored_final(&self, user: &str, request: &str, payload: Bytes) {
        if self.deliver_chat(user, request, true, payload) {
            // The live copy was lost: this is what the stream is for.
            metrics::counter!(shared::metrics::CHAT_FINALS_FROM_STREAM).increment(1);
        }
    }

    /// A publication for a channel's local subscribers, as if it came from NATS.
    pub(crate) fn deliver_to_channel(&self, channel: &Arc<str>, msg: Msg) {
        let h = msg.headers;
        let item = match h.offset {
            Some(offset) => {
                if let Some(ts) = h.ts {
                    let lag = shared::store::now_ms().saturating_sub(ts) as f64 / 1000.0;
                    metrics::histogram!(shared::metrics::FANOUT_SECONDS).record(lag);
                }
                Outbound::Publication {
                    channel: channel.clone(),
                    at: Position {
                        epoch: h.epoch.unwrap_or(0),
                        offset,
                    },
                    frame: msg.payload,
                }
            }
            None => Outbound::Event {
                channel: channel.clone(),
                skip_user: if h.skip_sender { h.from } else { None },
                frame: msg.payload,
            },
        };
        let st = self.lock();
        let Some(interest) = st.channels.get(&**channel) else {
            return;
        };
        let mut n = 0u64;
        for id in &interest.conns {
            if let Some(e) = st.conns.get(id) {
                offer(&e.member, item.clone());
                n += 1;
            }
        }
        metrics::counter!(shared::metrics::DELIVERIES).increment(n);
    }

    /// Applies a kick from `sb.ctl.disconnect` to the local connections it names.
    pub fn disconnect(&self, cmd: &DisconnectCommand) -> usize {
        let st = self.lock();
        let reason = || CloseCause::Kicked {
            code: cmd.code,
            reason: cmd.reason.clone(),
        };
        let mut n = 0;
        if let Some(c) = &cmd.conn_id
            && let Some(e) = st.conns.get(c.as_str())
            && cmd
                .user_id
                .as_deref()
                .is_none_or(|u| u == &*e.member.user_id)
        {
            e.member.closer.close(reason());
            n += 1;
        } else if cmd.conn_id.is_none()
            && let Some(u) = cmd.user_id.as_deref().and_then(|u| st.users.get(u))
        {
            for id in &u.conns {
                if let Some(e) = st.conns.get(id) {
                    e.member.closer.close(reason());
                    n += 1;
                }
            }
        }
        n
    }

    /// `(user_id, registry member)` of every local connection, for the Redis refresh.
    pub fn snapshot(&self) -> Vec<(String, String)> {
        let st = self.lock();
        st.conns
            .values()
            .map(|e| (e.member.user_id.to_string(), e.member.registry.to_string()))
            .collect()
    }

    /// `(channel, user_id, conn_id)` of every local subscription, for presence refresh.
    pub fn subscriptions(&self) -> Vec<(Arc<str>, Arc<str>, Arc<str>)> {
        let st = self.lock();
        st.conns
            .values()
            .flat_map(|e| {
                e.channels.iter().map(|c| {
                    (
                        c.clone(),
                        e.member.user_id.clone(),
                        e.member.conn_id.clone(),
                    )
                })
            })
            .collect()
    }

    /// Local subscriber count per channel.
    pub fn channel_counts(&self) -> HashMap<String, u64> {
        let st = self.lock();
        st.channels
            .iter()
            .map(|(c, i)| (c.to_string(), i.conns.len() as u64))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Deliver for Hub {
    fn resubscribed(&self) {
        self.resubscribed.notify_one();
    }

    fn deliver(&self, topic: &Topic, msg: Msg) {
        match topic {
            Topic::User(user) => {
                if let Some(ch) = msg.headers.channel.clone() {
                    self.deliver_to_channel(&ch, msg);
                } else if let Some(request) = msg.headers.request.clone() {
                    self.deliver_chat(user, &request, msg.headers.last, msg.payload);
                } else {
                    self.deliver_to_user(user, msg.payload);
                }
            }
            Topic::Channel(ch) => self.deliver_to_channel(ch, msg),
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    User,
    Channel,
}

/// Adds `conn` to the interest in `key`; returns the new entry when this is the
/// first interest (the caller subscribes).
fn add_interest<'a>(
    map: &'a mut HashMap<Arc<str>, Interest>,
    key: &Arc<str>,
    conn: &Arc<str>,
) -> Option<&'a mut Interest> {
    use std::collections::hash_map::Entry;
    match map.entry(key.clone()) {
        Entry::Occupied(mut e) => {
            e.get_mut().conns.push(conn.clone());
            None
        }
        Entry::Vacant(v) => Some(v.insert(Interest {
            conns: vec![conn.clone()],
            sid: None,
            stop: None,
        })),
    }
}

/// Offers an item to one connection without waiting; a full queue means the client
/// does not read fast enough, and it is closed instead of slowing the fan-out.
pub fn offer(m: &Member, item: Outbound) {
    match m.outbox.offer(item) {
        Ok(()) => {}
        Err(OfferError::Full) => {
            if m.closer.cause().is_none() {
                metrics::counter!(shared::metrics::SLOW_CONSUMERS).increment(1);
            }
            m.closer.close(SessionError::SlowConsumer.into());
        }
        // The connection is closing; its frames no longer matter.
        Err(OfferError::Closed) => {}
    }
}
