//! Channels: permissions, subscribe with recovery, publish with offsets, presence,
//! typing and read receipts. A publication is stored in Redis (offset and bounded
//! history) before it goes to NATS, so a subscriber that missed it live can always
//! find it: at `subscribe` with `since`, or when a later offset shows a gap.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use shared::protocol::{Channel, FrameId, PresenceUser, ServerFrame, UserContext};
use shared::store::{ChannelSettings, MAX_READ_OFFSET, Position, StoreError, now_ms};

use crate::error::SessionError;
use crate::headers::{
    HEADER_CHANNEL, HEADER_EPOCH, HEADER_FROM, HEADER_OFFSET, HEADER_SKIP_SENDER, HEADER_TS,
};
use crate::node::Node;

/// The namespace whose channels belong to one user each.
pub use crate::hub::USER_NAMESPACE;
/// The namespace whose channels belong to the members of one team each.
pub const TEAM_NAMESPACE: &str = "team";
/// How long a connection holds publications that arrived ahead of a missing offset
/// before repairing from history: concurrent publishers reorder in NATS by well
/// under this; a real loss costs one history read after it.
pub const REORDER_WINDOW: Duration = Duration::from_millis(100);
/// Publications held per channel and connection while a gap is open.
const MAX_HELD: usize = 256;
/// NATS publish of a stored publication must not hang the publisher.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);

/// What a user may do, from the token and the user's context.
#[derive(Debug, Clone, Default)]
pub struct Perms {
    pub user_id: String,
    /// Ids of the user's teams (`teams[].id`, strings or numbers).
    pub teams: HashSet<String>,
}

impl Perms {
    pub fn new(user_id: &str, ctx: &UserContext) -> Perms {
        Perms {
            user_id: user_id.to_owned(),
            teams: teams_of(ctx),
        }
    }
}

/// Team ids from a context's `teams` (objects with `id`).
pub fn teams_of(ctx: &UserContext) -> HashSet<String> {
    ctx.teams
        .iter()
        .filter_map(|t| match t.get("id") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        })
        .collect()
}

/// What a client wants to do with a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Subscribe,
    Publish,
}

/// PROTOCOL.md section 3 and 6: `user:<id>` only that user; `team:<id>` only its
/// members; public namespaces anyone (subscribe and publish); everything else no.
pub fn check(
    node: &Node,
    perms: &Perms,
    ch: &Channel,
    _access: Access,
) -> Result<(), SessionError> {
    let allowed = match ch.namespace.as_str() {
        USER_NAMESPACE => ch.name == perms.user_id,
        TEAM_NAMESPACE => perms.teams.contains(&ch.name),
        ns => node
            .config
            .channels
            .public_namespaces
            .iter()
            .any(|p| p == ns),
    };
    if allowed {
        Ok(())
    } else {
        Err(SessionError::Forbidden(format!(
            "no access to channel {ch}"
        )))
    }
}

pub fn parse(channel: &str) -> Result<Channel, SessionError> {
    Channel::parse(channel).map_err(SessionError::BadRequest)
}

fn store_down(op: &'static str, e: StoreError) -> SessionError {
    metrics::counter!(shared::metrics::REDIS_ERRORS, "op" => op).increment(1);
    tracing::warn!(error = %e, op, "session store unavailable");
    SessionError::Unavailable("session store")
}

// === a connection's subscriptions ===

struct Sub {
    channel: Channel,
    /// The epoch `last` counts in (see `shared::store::Position`); 0 until the first
    /// publication for a hidden subscription to a channel that had no position.
    epoch: u64,
    /// Highest offset delivered to this connection.
    last: u64,
    /// Publications that arrived ahead of a missing offset, held for the reorder
    /// window: concurrent publishes can reach NATS out of offset order.
    ahead: BTreeMap<u64, Bytes>,
    /// When the current gap was first seen.
    gap_since: Option<Instant>,
    /// False for a hidden subscription that never read the channel's position (a
    /// connection's own `user:` channel costs Redis nothing at connect): the first
    /// publication it sees sets where it stands.
    positioned: bool,
}

impl Sub {
    fn new(channel: Channel, at: Position) -> Sub {
        Sub {
            channel,
            epoch: at.epoch,
            last: at.offset,
            ahead: BTreeMap::new(),
            gap_since: None,
            positioned: true,
        }
    }

    /// A hidden subscription that has not read the channel's position.
    fn unpositioned(channel: Channel) -> Sub {
        Sub {
            positioned: false,
            ..Sub::new(
                channel,
                Position {
                    epoch: 0,
                    offset: 0,
                },
            )
        }
    }

    /// Starts over in a later epoch: the channel's position was lost (Redis restarted
    /// empty) and its offsets count from 1 again. What was held belongs to the old
    /// count and can never be completed.
    fn restart(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.last = 0;
        self.ahead.clear();
        self.gap_since = None;
    }

    /// Moves held publications that are now next in line to `out`.
    fn release(&mut self, out: &mut Vec<Bytes>) {
        while let Some(f) = self.ahead.remove(&(self.last + 1)) {
            self.last += 1;
            out.push(f);
        }
        // Anything at or below `last` arrived twice.
        let last = self.last;
        self.ahead.retain(|o, _| *o > last);
        self.gap_since = if self.ahead.is_empty() {
            None
        } else {
            self.gap_since.or(Some(Instant::now()))
        };
    }
}

/// The channels one connection is subscribed to, with delivery positions.
#[derive(Default)]
pub struct Subscriptions {
    subs: SubList,
}

/// A connection's subscriptions as a short list searched in order: connections hold
/// a handful (at most `SB_MAX_SUBSCRIPTIONS`, default 100), and the smallest HashMap
/// table of these entries cost about 1 KiB per idle connection.
#[derive(Default)]
struct SubList(Vec<(Arc<str>, Sub)>);

impl SubList {
    fn position(&self, key: &str) -> Option<usize> {
        self.0.iter().position(|(k, _)| &**k == key)
    }

    fn get_mut(&mut self, key: &str) -> Option<&mut Sub> {
        self.position(key).map(|i| &mut self.0[i].1)
    }

    fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_some()
    }

    fn insert(&mut self, key: Arc<str>, sub: Sub) {
        match self.position(&key) {
            Some(i) => self.0[i].1 = sub,
            None => {
                // Most connections subscribe once or twice: grow one entry at a time
                // rather than by Vec's default of four.
                self.0.reserve_exact(1);
                self.0.push((key, sub));
            }
        }
    }

    fn remove(&mut self, key: &str) -> Option<Sub> {
        self.position(key).map(|i| self.0.swap_remove(i).1)
    }

    fn drain(&mut self) -> impl Iterator<Item = (Arc<str>, Sub)> + '_ {
        self.0.drain(..)
    }

    fn values(&self) -> impl Iterator<Item = &Sub> {
        self.0.iter().map(|(_, s)| s)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut Sub> {
        self.0.iter_mut().map(|(_, s)| s)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Subscriptions {
    pub fn len(&self) -> usize {
        self.subs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    pub fn contains(&self, channel: &str) -> bool {
        self.subs.contains_key(channel)
    }

    pub fn channels(&self) -> Vec<Channel> {
        self.subs.values().map(|s| s.channel.clone()).collect()
    }
}

/// How a `subscribe` goes beyond joining the channel. The default is a hidden
/// subscription without recovery: the connection's own `user:` channel at connect.
#[derive(Debug, Default)]
pub struct SubscribeOptions<'a> {
    /// Replay what was published after this offset (the client's `since`).
    pub since: Option<u64>,
    /// The epoch `since` counts in, as the client sent it.
    pub epoch: Option<&'a str>,
    /// Answer with `subscribed`. Without it the subscription is hidden: no answer,
    /// and no position is read from Redis until the client subscribes itself.
    pub announce: Option<Announce>,
}

/// The `subscribed` answer a client asked for.
#[derive(Debug, Default)]
pub struct Announce {
    /// The id of the `subscribe` frame, echoed.
    pub id: Option<FrameId>,
}

impl Announce {
    fn subscribed(
        self,
        ch: &Channel,
        at: Position,
        recovered: bool,
        read_offset: Option<u64>,
    ) -> Bytes {
        ServerFrame::Subscribed {
            channel: ch.to_string(),
            offset: at.offset,
            epoch: at.epoch.to_string(),
            recovered,
            read_offset,
            id: self.id,
        }
        .to_bytes()
    }
}

/// The client's `since` with its epoch already parsed.
struct Recovery {
    since: Option<u64>,
    epoch: Option<u64>,
}

/// Subscribes a connection. Returns the frames to write, in order: the replay (when
/// `since` is given and history reaches back that far), then `subscribed`. The hub
/// interest exists (and NATS has the subscription) before history is read, so a
/// publication is either in the replay or arrives live; live duplicates of replayed
/// offsets are dropped by [`on_publication`].
pub async fn subscribe(
    node: &Node,
    conn_id: &str,
    perms: &Perms,
    subs: &mut Subscriptions,
    channel: &str,
    opts: SubscribeOptions<'_>,
) -> Result<Vec<Bytes>, SessionError> {
    let SubscribeOptions {
        since,
        epoch,
        announce,
    } = opts;
    let ch = parse(channel)?;
    check(node, perms, &ch, Access::Subscribe)?;
    // An epoch that is not a number is nobody's: `since` cannot be recovered in it.
    let epoch = epoch.map(|e| e.parse::<u64>().unwrap_or(0));
    let key: Arc<str> = ch.to_string().into();
    if let Some(sub) = subs.subs.get_mut(&key) {
        if (sub.epoch == 0 || !sub.positioned) && announce.is_some() {
            // A hidden subscription that has no position yet: the client is about to
            // hold an offset, so it gets an epoch with it.
            let at = node
                .store
                .channel_position(&ch, &settings(node))
                .await
                .map_err(|e| store_down("channel_position", e))?;
            if !sub.positioned {
                sub.epoch = at.epoch;
                sub.last = at.offset;
                sub.positioned = true;
            } else if sub.last == 0 {
                sub.epoch = at.epoch;
            }
        }
        let at = Position {
            epoch: sub.epoch,
            offset: sub.last,
        };
        let wanted = Recovery { since, epoch };
        return resubscribe(node, &perms.user_id, &ch, at, wanted, announce).await;
    }
    let max = node.config.channels.max_subscriptions;
    if subs.len() >= max {
        return Err(SessionError::BadRequest(format!(
            "at most {max} subscriptions per connection"
        )));
    }
    let new_interest = node.hub.join_channel(conn_id, &ch).await.map_err(|e| {
        metrics::counter!(shared::metrics::NATS_ERRORS, "op" => "subscribe").increment(1);
        tracing::warn!(error = %e, "cannot subscribe channel");
        SessionError::Unavailable("message bus")
    })?;
    let fail = |e: SessionError| {
        node.hub.leave_channel(conn_id, &key);
        e
    };
    if new_interest {
        node.hub
            .barrier()
            .await
            .map_err(|_| fail(SessionError::Unavailable("message bus")))?;
    }

    let mut out = Vec::new();
    let (at, recovered) = match since {
        Some(since) => {
            let h = node
                .store
                .channel_since(&ch, since, epoch, &settings(node))
                .await
                .map_err(|e| fail(store_down("channel_since", e)))?;
            let result = if h.complete { "hit" } else { "miss" };
            metrics::counter!(shared::metrics::RECOVERIES, "result" => result).increment(1);
            if h.complete {
                out.extend(h.frames.into_iter().map(|(_, f)| Bytes::from(f)));
            }
            let at = Position {
                epoch: h.epoch,
                offset: h.top,
            };
            (at, h.complete)
        }
        None if announce.is_none() => {
            // Hidden (the connection's own channel): no Redis at connect.
            subs.subs.insert(key.clone(), Sub::unpositioned(ch.clone()));
            metrics::gauge!(shared::metrics::SUBSCRIPTIONS).increment(1.0);
            return Ok(out);
        }
        None => (
            node.store
                .channel_position(&ch, &settings(node))
                .await
                .map_err(|e| fail(store_down("channel_position", e)))?,
            false,
        ),
    };
    let read_offset = node
        .store
        .read_offset(&perms.user_id, &key)
        .await
        .map_err(|e| fail(store_down("read_offset", e)))?;
    subs.subs.insert(key.clone(), Sub::new(ch.clone(), at));
    metrics::gauge!(shared::metrics::SUBSCRIPTIONS).increment(1.0);
    join_presence(node, perms, conn_id, &ch).await;
    if let Some(a) = announce {
        out.push(a.subscribed(&ch, at, recovered, read_offset));
    }
    Ok(out)
}

/// `subscribe` to a channel the connection already has (its own `user:` channel,
/// or a client that lost track): answers `subscribed` again and, with `since`,
/// replays what this connection was already given after `since` (in its epoch).
async fn resubscribe(
    node: &Node,
    user_id: &str,
    ch: &Channel,
    at: Position,
    wanted: Recovery,
    announce: Option<Announce>,
) -> Result<Vec<Bytes>, SessionError> {
    let Recovery { since, epoch } = wanted;
    let mut out = Vec::new();
    let mut recovered = false;
    let last = at.offset;
    if let Some(since) = since.filter(|s| *s <= last && epoch.is_none_or(|e| e == at.epoch)) {
        let h = node
            .store
            .channel_since(ch, since, Some(at.epoch), &settings(node))
            .await
            .map_err(|e| store_down("channel_since", e))?;
        let frames: Vec<_> = h.frames.into_iter().filter(|(o, _)| *o <= last).collect();
        recovered = h.epoch == at.epoch
            && frames.len() as u64 == last - since
            && frames.first().is_none_or(|(o, _)| *o == since + 1);
        if recovered {
            out.extend(frames.into_iter().map(|(_, f)| Bytes::from(f)));
        }
    }
    let read_offset = node
        .store
        .read_offset(user_id, &ch.to_string())
        .await
        .map_err(|e| store_down("read_offset", e))?;
    if let Some(a) = announce {
        out.push(a.subscribed(ch, at, recovered, read_offset));
    }
    Ok(out)
}

/// Unsubscribes a connection from one channel.
pub async fn unsubscribe(
    node: &Node,
    conn_id: &str,
    perms: &Perms,
    subs: &mut Subscriptions,
    channel: &str,
    id: Option<FrameId>,
) -> Result<ServerFrame, SessionError> {
    let ch = parse(channel)?;
    let key = ch.to_string();
    if subs.subs.remove(key.as_str()).is_none() {
        return Err(SessionError::BadRequest(format!("not subscribed to {ch}")));
    }
    node.hub.leave_channel(conn_id, &key);
    metrics::gauge!(shared::metrics::SUBSCRIPTIONS).decrement(1.0);
    leave_presence(node, perms, conn_id, &ch).await;
    Ok(ServerFrame::Unsubscribed {
        channel: key,
        reason: None,
        id,
    })
}

/// Drops every subscription of a closing connection (presence and `leave` events).
pub async fn leave_all(node: &Node, conn_id: &str, perms: &Perms, subs: &mut Subscriptions) {
    for (key, sub) in subs.subs.drain() {
        node.hub.leave_channel(conn_id, &key);
        metrics::gauge!(shared::metrics::SUBSCRIPTIONS).decrement(1.0);
        leave_presence(node, perms, conn_id, &sub.channel).await;
    }
}

/// Drops subscriptions the user may no longer hold (after a context refresh took a
/// team away); returns `unsubscribed {reason: FORBIDDEN}` frames for them.
pub async fn revoke_lost(
    node: &Node,
    conn_id: &str,
    perms: &Perms,
    subs: &mut Subscriptions,
) -> Vec<Bytes> {
    let lost: Vec<Channel> = subs
        .subs
        .values()
        .filter(|s| check(node, perms, &s.channel, Access::Subscribe).is_err())
        .map(|s| s.channel.clone())
        .collect();
    let mut out = Vec::new();
    for ch in lost {
        if let Ok(mut f) = unsubscribe(node, conn_id, perms, subs, &ch.to_string(), None).await {
            if let ServerFrame::Unsubscribed { reason, .. } = &mut f {
                *reason = Some(shared::protocol::ErrorCode::Forbidden);
            }
            out.push(f.to_bytes());
        }
    }
    out
}

/// Decides what of a live publication this connection writes, in offset order:
/// nothing for a duplicate, a straggler of an earlier epoch or an unsubscribed
/// channel; a publication that comes ahead of a missing offset is held until the gap
/// fills (or is repaired from history once [`REORDER_WINDOW`] passes, see
/// [`repair_gaps`]). The first publication of a later epoch restarts the count and is
/// preceded by `subscribed {recovered: false}` without `id`: what the old count still
/// had for this connection is lost, the client must know (PROTOCOL.md "Epochs").
/// `epoch` 0 (a publisher that sends none) counts as the subscription's own.
pub fn on_publication(
    subs: &mut Subscriptions,
    channel: &str,
    at: Position,
    frame: Bytes,
) -> Vec<Bytes> {
    let Some(sub) = subs.subs.get_mut(channel) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if !sub.positioned {
        // The first publication a hidden subscription sees is where it starts.
        sub.positioned = true;
        sub.epoch = at.epoch;
        sub.last = at.offset.saturating_sub(1);
    } else if at.epoch != 0 && sub.epoch == 0 && sub.last == 0 {
        // Subscribed before the channel had a position: this is its first count.
        sub.epoch = at.epoch;
    } else if at.epoch != 0 && at.epoch != sub.epoch {
        if at.epoch < sub.epoch {
            return out;
        }
        sub.restart(at.epoch);
        metrics::counter!(shared::metrics::EPOCH_RESTARTS).increment(1);
        out.push(
            ServerFrame::Subscribed {
                channel: channel.to_owned(),
                offset: 0,
                epoch: at.epoch.to_string(),
                recovered: false,
                read_offset: None,
                id: None,
            }
            .to_bytes(),
        );
    }
    let offset = at.offset;
    if offset <= sub.last {
        return out;
    }
    if offset == sub.last + 1 {
        sub.last = offset;
        out.push(frame);
    } else if sub.ahead.len() < MAX_HELD {
        sub.ahead.insert(offset, frame);
    } else {
        // Far behind: make the repair due now rather than hold more.
        sub.ahead.insert(offset, frame);
        sub.gap_since = Some(Instant::now() - REORDER_WINDOW);
        return out;
    }
    sub.release(&mut out);
    out
}

/// When the oldest open gap of this connection must be repaired.
pub fn next_repair(subs: &Subscriptions) -> Option<Instant> {
    subs.subs
        .values()
        .filter_map(|s| s.gap_since)
        .min()
        .map(|t| t + REORDER_WINDOW)
}

/// Repairs gaps older than the reorder window from the channel's history: the
/// missing offsets were lost between nodes. Returns the frames to write. When
/// history cannot fill a gap (Redis away, or the offsets trimmed), the connection
/// must not silently skip them: the error closes it, and the client recovers with
/// `since`.
pub async fn repair_gaps(
    node: &Node,
    subs: &mut Subscriptions,
    now: Instant,
) -> Result<Vec<Bytes>, SessionError> {
    let mut out = Vec::new();
    for sub in subs.subs.values_mut() {
        let due = sub.gap_since.is_some_and(|t| now >= t + REORDER_WINDOW);
        let Some((&upto, _)) = sub.ahead.last_key_value() else {
            continue;
        };
        if !due {
            continue;
        }
        metrics::counter!(shared::metrics::GAP_REPAIRS).increment(1);
        let missing = node
            .store
            .channel_range(&sub.channel, sub.epoch, sub.last, upto)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, channel = %sub.channel, "cannot repair a gap in channel delivery");
                SessionError::DeliveryGap
            })?;
        // Another epoch by now: the offsets held are of a count nobody can complete.
        let Some(missing) = missing else {
            tracing::warn!(channel = %sub.channel, last = sub.last, "channel position restarted during a gap");
            return Err(SessionError::DeliveryGap);
        };
        for (o, f) in missing {
            sub.ahead.entry(o).or_insert_with(|| Bytes::from(f));
        }
        sub.release(&mut out);
        if !sub.ahead.is_empty() {
            tracing::warn!(channel = %sub.channel, last = sub.last, "history no longer holds missing offsets");
            return Err(SessionError::DeliveryGap);
        }
    }
    Ok(out)
}

/// Whether an ephemeral event goes to this connection.
pub fn wants_event(subs: &Subscriptions, channel: &str, skip_user: Option<&str>, me: &str) -> bool {
    subs.contains(channel) && skip_user != Some(me)
}

// === publish ===

/// Why a publication failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Store(#[from] StoreError),
}

pub fn settings(node: &Node) -> ChannelSettings {
    ChannelSettings {
        history_size: node.config.channels.history_size,
        history_ttl: node.config.channels.history_ttl,
        offset_ttl: node.config.channels.offset_ttl,
    }
}

/// Stores a publication (offset, history) and sends it to every subscribing node.
/// Returns the offset. Once stored it is durable: a failed NATS publish only delays
/// delivery until a subscriber notices the gap or recovers.
pub async fn publish(
    node: &Node,
    ch: &Channel,
    data: &Value,
    from: &str,
    source: &'static str,
) -> Result<u64, PublishError> {
    let channel = serde_json::to_string(&ch.to_string()).unwrap_or_default();
    let head = format!(r#"{{"type":"message","channel":{channel},"offset":"#);
    let tail = format!(
        r#","data":{},"from":{}}}"#,
        serde_json::to_string(data).unwrap_or_else(|_| "null".into()),
        serde_json::to_string(from).unwrap_or_default(),
    );
    let Position { epoch, offset } = node
        .store
        .publish_channel(ch, &head, &tail, &settings(node))
        .await?;
    metrics::counter!(shared::metrics::PUBLICATIONS, "source" => source).increment(1);
    let frame = format!("{head}{offset}{tail}");
    let mut headers = vec![
        (HEADER_OFFSET.to_owned(), offset.to_string()),
        (HEADER_EPOCH.to_owned(), epoch.to_string()),
        (HEADER_TS.to_owned(), now_ms().to_string()),
    ];
    let subject = subject(node, ch, &mut headers);
    let sent = tokio::time::timeout(
        PUBLISH_TIMEOUT,
        node.bus.publish(subject, headers, frame.into()),
    )
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        metrics::counter!(shared::metrics::NATS_ERRORS, "op" => "channel_publish").increment(1);
        tracing::warn!(channel = %ch, offset, "publication stored but not sent live");
    }
    Ok(offset)
}

/// Handles a client `publish`.
pub async fn client_publish(
    node: &Node,
    perms: &Perms,
    channel: &str,
    data: &Value,
    id: Option<FrameId>,
) -> Result<ServerFrame, SessionError> {
    let ch = parse(channel)?;
    check(node, perms, &ch, Access::Publish)?;
    let offset = publish(node, &ch, data, &perms.user_id, "client")
        .await
        .map_err(|PublishError::Store(e)| store_down("publish", e))?;
    Ok(ServerFrame::Ack {
        offset: Some(offset),
        session_id: None,
        request_id: None,
        id,
    })
}

/// Sends an ephemeral event (never stored, no offset) to a channel's subscribers.
async fn event(node: &Node, ch: &Channel, frame: &ServerFrame, from: &str, skip_sender: bool) {
    let mut headers = vec![(HEADER_FROM.to_owned(), from.to_owned())];
    if skip_sender {
        headers.push((HEADER_SKIP_SENDER.to_owned(), "1".to_owned()));
    }
    let subject = subject(node, ch, &mut headers);
    let sent = tokio::time::timeout(
        PUBLISH_TIMEOUT,
        node.bus.publish(subject, headers, frame.to_bytes()),
    )
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        metrics::counter!(shared::metrics::NATS_ERRORS, "op" => "channel_event").increment(1);
    }
}

/// The NATS subject a channel's traffic travels on: `sb.ch.<ns>.<name>`, except a
/// user's own channel, which rides on `sb.user.<id>` marked with its channel name.
fn subject(node: &Node, ch: &Channel, headers: &mut Vec<(String, String)>) -> String {
    if ch.namespace == USER_NAMESPACE {
        headers.push((HEADER_CHANNEL.to_owned(), ch.to_string()));
        node.subjects.user(&ch.name)
    } else {
        node.subjects.channel(&ch.namespace, &ch.name)
    }
}

fn enabled(list: &[String], ns: &str) -> bool {
    list.iter().any(|n| n == ns)
}

// === presence, typing, read ===

/// Whether a channel keeps presence: not a user's own channel, whose presence is the
/// connection registry (`GET /v1/users/<id>/connections`), so a connection's hidden
/// subscription to it costs Redis nothing.
pub fn keeps_presence(ch: &Channel) -> bool {
    ch.namespace != USER_NAMESPACE
}

async fn join_presence(node: &Node, perms: &Perms, conn_id: &str, ch: &Channel) {
    if !keeps_presence(ch) {
        return;
    }
    let ttl = node.config.channels.presence_ttl;
    let before = node
        .store
        .presence_count(ch, &perms.user_id)
        .await
        .unwrap_or(1);
    let entry = [(ch.clone(), perms.user_id.clone(), conn_id.to_owned())];
    if let Err(e) = node.store.presence_touch(&entry, ttl).await {
        metrics::counter!(shared::metrics::REDIS_ERRORS, "op" => "presence").increment(1);
        tracing::debug!(error = %e, "presence not recorded");
        return;
    }
    if before == 0 && enabled(&node.config.channels.presence_namespaces, &ch.namespace) {
        let f = ServerFrame::Join {
            channel: ch.to_string(),
            user: perms.user_id.clone(),
        };
        event(node, ch, &f, &perms.user_id, true).await;
    }
}

async fn leave_presence(node: &Node, perms: &Perms, conn_id: &str, ch: &Channel) {
    if !keeps_presence(ch) {
        return;
    }
    match node
        .store
        .presence_remove(ch, &perms.user_id, conn_id)
        .await
    {
        Ok(0) if enabled(&node.config.channels.presence_namespaces, &ch.namespace) => {
            let f = ServerFrame::Leave {
                channel: ch.to_string(),
                user: perms.user_id.clone(),
            };
            event(node, ch, &f, &perms.user_id, true).await;
        }
        Ok(_) => {}
        Err(e) => {
            metrics::counter!(shared::metrics::REDIS_ERRORS, "op" => "presence").increment(1);
            tracing::debug!(error = %e, "presence not removed; it expires");
        }
    }
}

/// Keeps this node's presence entries alive; a dead node's expire, and the sweep
/// after each refresh announces their users' `leave`.
pub async fn presence_loop(node: &Node) {
    let period = node.config.channels.presence_ttl / 3;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            biased;
            _ = node.life.stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let entries: Vec<_> = node
            .hub
            .subscriptions()
            .into_iter()
            .filter_map(|(ch, user, conn)| {
                shared::protocol::Channel::parse(&ch)
                    .ok()
                    .filter(keeps_presence)
                    .map(|c| (c, user.to_string(), conn.to_string()))
            })
            .collect();
        if let Err(e) = node
            .store
            .presence_touch(&entries, node.config.channels.presence_ttl)
            .await
        {
            metrics::counter!(shared::metrics::REDIS_ERRORS, "op" => "presence").increment(1);
            tracing::warn!(error = %e, "presence refresh failed");
        }
        // Users of dead nodes leave the channels this node has subscribers in
        // (nobody else needs to hear it).
        let mut channels: Vec<_> = entries.into_iter().map(|(c, _, _)| c).collect();
        channels.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        channels.dedup();
        sweep_presence(node, &channels).await;
    }
}

/// Announces `leave` for users whose last connection in one of `channels` expired
/// without a goodbye (their gateway died): the sweep removes each such user
/// atomically, so of all nodes sweeping a channel exactly one announces them. Called
/// by every node for the channels it has subscribers in ([`presence_loop`]), so a
/// dead node's users leave within the presence TTL plus one refresh period.
pub async fn sweep_presence(node: &Node, channels: &[Channel]) {
    let namespaces = &node.config.channels.presence_namespaces;
    let wanted: Vec<Channel> = channels
        .iter()
        .filter(|c| enabled(namespaces, &c.namespace))
        .cloned()
        .collect();
    let gone = match node.store.presence_sweep(&wanted).await {
        Ok(g) => g,
        Err(e) => {
            metrics::counter!(shared::metrics::REDIS_ERRORS, "op" => "presence_sweep").increment(1);
            tracing::debug!(error = %e, "presence sweep failed; the next one retries");
            return;
        }
    };
    for (ch, users) in gone {
        for user in users {
            let f = ServerFrame::Leave {
                channel: ch.to_string(),
                user: user.clone(),
            };
            event(node, &ch, &f, &user, true).await;
        }
    }
}

/// Handles a `presence` request: users in the channel with connection counts.
pub async fn presence(
    node: &Node,
    perms: &Perms,
    channel: &str,
    id: Option<FrameId>,
) -> Result<ServerFrame, SessionError> {
    let ch = parse(channel)?;
    check(node, perms, &ch, Access::Subscribe)?;
    let users = presence_users(node, &ch)
        .await
        .map_err(|e| store_down("presence", e))?;
    Ok(ServerFrame::Presence {
        channel: ch.to_string(),
        users,
        id,
    })
}

pub async fn presence_users(node: &Node, ch: &Channel) -> Result<Vec<PresenceUser>, StoreError> {
    // Reading presence drops expired users; sweeping first announces their `leave`.
    sweep_presence(node, std::slice::from_ref(ch)).await;
    Ok(node
        .store
        .presence(ch)
        .await?
        .into_iter()
        .map(|p| PresenceUser {
            user_id: p.user_id,
            connections: p.connections,
        })
        .collect())
}

/// Handles `typing`: relayed to the channel's other subscribers, never stored.
pub async fn typing(
    node: &Node,
    perms: &Perms,
    subs: &Subscriptions,
    channel: &str,
) -> Result<(), SessionError> {
    let ch = parse(channel)?;
    if !subs.contains(&ch.to_string()) {
        return Err(SessionError::BadRequest(format!(
            "subscribe to {ch} before typing in it"
        )));
    }
    let f = ServerFrame::Typing {
        channel: ch.to_string(),
        user: perms.user_id.clone(),
    };
    event(node, &ch, &f, &perms.user_id, true).await;
    Ok(())
}

/// Handles `read`: records the user's read offset (the highest wins) and relays a
/// `read` event in namespaces that enable it.
pub async fn read(
    node: &Node,
    perms: &Perms,
    channel: &str,
    offset: u64,
    id: Option<FrameId>,
) -> Result<ServerFrame, SessionError> {
    let ch = parse(channel)?;
    check(node, perms, &ch, Access::Subscribe)?;
    // A read offset names a publication the user could have seen: one past the
    // channel's last offset is a client bug or an attempt to poison the user's read
    // state (a huge one once came back from Lua as a double and broke `subscribe`).
    if offset > MAX_READ_OFFSET {
        return Err(SessionError::BadRequest(format!(
            "`offset` {offset} is past the channel's last offset"
        )));
    }
    let at = node
        .store
        .channel_position(&ch, &settings(node))
        .await
        .map_err(|e| store_down("channel_position", e))?;
    if offset > at.offset {
        return Err(SessionError::BadRequest(format!(
            "`offset` {offset} is past the channel's last offset {}",
            at.offset
        )));
    }
    let key = ch.to_string();
    let stored = node
        .store
        .set_read(&perms.user_id, &key, offset)
        .await
        .map_err(|e| store_down("read", e))?;
    if enabled(&node.config.channels.read_namespaces, &ch.namespace) {
        let f = ServerFrame::Read {
            channel: key,
            user: perms.user_id.clone(),
            offset: stored,
        };
        event(node, &ch, &f, &perms.user_id, false).await;
    }
    Ok(ServerFrame::Ack {
        offset: Some(stored),
        session_id: None,
        request_id: None,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPOCH: u64 = 1_764_000_000_000_000;

    fn subs(last: u64) -> Subscriptions {
        let ch = Channel::parse("news:x").unwrap();
        let mut s = Subscriptions::default();
        let at = Position {
            epoch: EPOCH,
            offset: last,
        };
        s.subs.insert("news:x".into(), Sub::new(ch, at));
        s
    }

    fn at(offset: u64) -> Position {
        Position {
            epoch: EPOCH,
            offset,
        }
    }

    fn f(o: u64) -> Bytes {
        Bytes::from(o.to_string())
    }

    fn delivered(out: Vec<Bytes>) -> Vec<String> {
        out.iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    #[test]
    fn in_order_and_duplicates() {
        let mut s = subs(3);
        assert_eq!(
            delivered(on_publication(&mut s, "news:x", at(4), f(4))),
            ["4"]
        );
        assert!(on_publication(&mut s, "news:x", at(4), f(4)).is_empty());
        assert!(on_publication(&mut s, "news:x", at(2), f(2)).is_empty());
        assert!(
            on_publication(&mut s, "news:y", at(5), f(5)).is_empty(),
            "not subscribed"
        );
        assert!(next_repair(&s).is_none());
    }

    #[test]
    fn reordered_publications_are_held_then_released_in_order() {
        let mut s = subs(0);
        assert!(on_publication(&mut s, "news:x", at(3), f(3)).is_empty());
        assert!(on_publication(&mut s, "news:x", at(2), f(2)).is_empty());
        assert!(next_repair(&s).is_some(), "a gap is open");
        assert_eq!(
            delivered(on_publication(&mut s, "news:x", at(1), f(1))),
            ["1", "2", "3"]
        );
        assert!(next_repair(&s).is_none(), "the gap closed without history");
        assert_eq!(
            delivered(on_publication(&mut s, "news:x", at(4), f(4))),
            ["4"]
        );
    }

    #[test]
    fn a_later_epoch_restarts_the_count_and_says_so() {
        let mut s = subs(0);
        for o in 1..=3 {
            on_publication(&mut s, "news:x", at(o), f(o));
        }
        // Redis came back empty: the next publication is offset 1 of a later epoch.
        let later = Position {
            epoch: EPOCH + 5_000_000,
            offset: 1,
        };
        let out = delivered(on_publication(&mut s, "news:x", later, f(1)));
        assert_eq!(out.len(), 2, "{out:?}");
        let announced: Value = serde_json::from_str(&out[0]).unwrap();
        assert_eq!(announced["type"], "subscribed");
        assert_eq!(announced["channel"], "news:x");
        assert_eq!(announced["offset"], 0);
        assert_eq!(announced["recovered"], false);
        assert_eq!(announced["epoch"], (EPOCH + 5_000_000).to_string());
        assert!(announced.get("id").is_none());
        assert_eq!(out[1], "1");
        let next = Position { offset: 2, ..later };
        assert_eq!(
            delivered(on_publication(&mut s, "news:x", next, f(2))),
            ["2"]
        );
        // A straggler of the old count is neither delivered nor a reason to go back.
        assert!(on_publication(&mut s, "news:x", at(4), f(4)).is_empty());
        let next = Position { offset: 3, ..later };
        assert_eq!(
            delivered(on_publication(&mut s, "news:x", next, f(3))),
            ["3"]
        );
    }

    #[test]
    fn a_subscription_without_an_epoch_takes_the_first_one_silently() {
        let ch = Channel::parse("user:u").unwrap();
        let mut s = Subscriptions::default();
        let none = Position {
            epoch: 0,
            offset: 0,
        };
        s.subs.insert("user:u".into(), Sub::new(ch, none));
        assert_eq!(
            delivered(on_publication(&mut s, "user:u", at(1), f(1))),
            ["1"]
        );
        assert_eq!(
            delivered(on_publication(&mut s, "user:u", at(2), f(2))),
            ["2"]
        );
    }

    #[test]
    fn a_publication_without_an_epoch_counts_in_the_subscriptions_own() {
        let mut s = subs(2);
        let unknown = Position {
            epoch: 0,
            offset: 3,
        };
        assert_eq!(
            delivered(on_publication(&mut s, "news:x", unknown, f(3))),
            ["3"]
        );
        assert!(on_publication(&mut s, "news:x", at(3), f(3)).is_empty());
    }
}
