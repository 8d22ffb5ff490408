//! Channels: permissions, subscribe with recovery, publish with offsets, presence,
//! typing and read receipts. A publication is stored in Redis (offset and bounded
//! history) before it goes to NATS, so a subscriber that missed it live can always
//! find it: at `subscribe` with `since`, or when a later offset shows a gap.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use shared::protocol::{Channel, FrameId, PresenceUser, ServerFrame, UserContext};
use shared::store::{ChannelSettings, StoreError, now_ms};

use crate::error::SessionError;
use crate::hub::{HEADER_CHANNEL, HEADER_FROM, HEADER_OFFSET, HEADER_SKIP_SENDER, HEADER_TS};
use crate::node::Node;

/// The namespace whose channels belong to one user each.
pub use crate::hub::USER_NAMESPACE;
/// The namespace whose channels belong to the members of one team each.
pub const TEAM_NAMESPACE: &str = "team";
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
    /// Highest offset delivered to this connection.
    last: u64,
}

/// The channels one connection is subscribed to, with delivery positions.
#[derive(Default)]
pub struct Subscriptions {
    subs: HashMap<Arc<str>, Sub>,
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

/// Subscribes a connection. Returns the frames to write, in order: the replay (when
/// `since` is given and history reaches back that far), then `subscribed`. The hub
/// interest exists (and NATS has the subscription) before history is read, so a
/// publication is either in the replay or arrives live; live duplicates of replayed
/// offsets are dropped by [`on_publication`].
#[allow(clippy::too_many_arguments)]
pub async fn subscribe(
    node: &Node,
    conn_id: &str,
    perms: &Perms,
    subs: &mut Subscriptions,
    channel: &str,
    since: Option<u64>,
    id: Option<FrameId>,
    announce: bool,
) -> Result<Vec<Bytes>, SessionError> {
    let ch = parse(channel)?;
    check(node, perms, &ch, Access::Subscribe)?;
    let key: Arc<str> = ch.to_string().into();
    if let Some(sub) = subs.subs.get(&key) {
        return resubscribe(node, &perms.user_id, &ch, sub.last, since, id, announce).await;
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
    let (last, recovered) = match since {
        Some(since) => {
            let h = node
                .store
                .channel_since(&ch, since)
                .await
                .map_err(|e| fail(store_down("channel_since", e)))?;
            let result = if h.complete { "hit" } else { "miss" };
            metrics::counter!(shared::metrics::RECOVERIES, "result" => result).increment(1);
            if h.complete {
                out.extend(h.frames.into_iter().map(|(_, f)| Bytes::from(f)));
            }
            (h.top, h.complete)
        }
        None => (
            node.store
                .channel_top(&ch)
                .await
                .map_err(|e| fail(store_down("channel_top", e)))?,
            false,
        ),
    };
    let read_offset = node
        .store
        .read_offset(&perms.user_id, &key)
        .await
        .map_err(|e| fail(store_down("read_offset", e)))?;
    subs.subs.insert(
        key.clone(),
        Sub {
            channel: ch.clone(),
            last,
        },
    );
    metrics::gauge!(shared::metrics::SUBSCRIPTIONS).increment(1.0);
    join_presence(node, perms, conn_id, &ch).await;
    if announce {
        out.push(
            ServerFrame::Subscribed {
                channel: key.to_string(),
                offset: last,
                recovered,
                read_offset,
                id,
            }
            .to_bytes(),
        );
    }
    Ok(out)
}

/// `subscribe` to a channel the connection already has (its own `user:` channel,
/// or a client that lost track): answers `subscribed` again and, with `since`,
/// replays what this connection was already given after `since`.
async fn resubscribe(
    node: &Node,
    user_id: &str,
    ch: &Channel,
    last: u64,
    since: Option<u64>,
    id: Option<FrameId>,
    announce: bool,
) -> Result<Vec<Bytes>, SessionError> {
    let mut out = Vec::new();
    let mut recovered = false;
    if let Some(since) = since.filter(|s| *s <= last) {
        let h = node
            .store
            .channel_since(ch, since)
            .await
            .map_err(|e| store_down("channel_since", e))?;
        let frames: Vec<_> = h.frames.into_iter().filter(|(o, _)| *o <= last).collect();
        recovered = frames.len() as u64 == last - since
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
    if announce {
        out.push(
            ServerFrame::Subscribed {
                channel: ch.to_string(),
                offset: last,
                recovered,
                read_offset,
                id,
            }
            .to_bytes(),
        );
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
    Ok(ServerFrame::Unsubscribed { channel: key, id })
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
/// team away); returns `unsubscribed` frames for them.
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
        if let Ok(f) = unsubscribe(node, conn_id, perms, subs, &ch.to_string(), None).await {
            out.push(f.to_bytes());
        }
    }
    out
}

/// Decides what of a live publication this connection writes: nothing for a
/// duplicate or an unsubscribed channel; for a gap, the missing offsets from
/// history first.
pub async fn on_publication(
    node: &Node,
    subs: &mut Subscriptions,
    channel: &str,
    offset: u64,
    frame: Bytes,
) -> Vec<Bytes> {
    let Some(sub) = subs.subs.get_mut(channel) else {
        return Vec::new();
    };
    if offset <= sub.last {
        return Vec::new();
    }
    let mut out = Vec::new();
    if offset > sub.last + 1 {
        metrics::counter!(shared::metrics::GAP_REPAIRS).increment(1);
        match node
            .store
            .channel_range(&sub.channel, sub.last, offset)
            .await
        {
            Ok(missing) => out.extend(missing.into_iter().map(|(_, f)| Bytes::from(f))),
            Err(e) => tracing::warn!(error = %e, "cannot repair a gap in channel delivery"),
        }
    }
    sub.last = offset;
    out.push(frame);
    out
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
    let offset = node
        .store
        .publish_channel(ch, &head, &tail, &settings(node))
        .await?;
    metrics::counter!(shared::metrics::PUBLICATIONS, "source" => source).increment(1);
    let frame = format!("{head}{offset}{tail}");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(HEADER_OFFSET, offset.to_string().as_str());
    headers.insert(HEADER_TS, now_ms().to_string().as_str());
    let subject = subject(node, ch, &mut headers);
    let sent = tokio::time::timeout(
        PUBLISH_TIMEOUT,
        node.nats
            .publish_with_headers(subject, headers, frame.into()),
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
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(HEADER_FROM, from);
    if skip_sender {
        headers.insert(HEADER_SKIP_SENDER, "1");
    }
    let subject = subject(node, ch, &mut headers);
    let sent = tokio::time::timeout(
        PUBLISH_TIMEOUT,
        node.nats
            .publish_with_headers(subject, headers, frame.to_bytes()),
    )
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        metrics::counter!(shared::metrics::NATS_ERRORS, "op" => "channel_event").increment(1);
    }
}

/// The NATS subject a channel's traffic travels on: `sb.ch.<ns>.<name>`, except a
/// user's own channel, which rides on `sb.user.<id>` marked with its channel name.
fn subject(node: &Node, ch: &Channel, headers: &mut async_nats::HeaderMap) -> String {
    if ch.namespace == USER_NAMESPACE {
        headers.insert(HEADER_CHANNEL, ch.to_string().as_str());
        node.subjects.user(&ch.name)
    } else {
        node.subjects.channel(&ch.namespace, &ch.name)
    }
}

fn enabled(list: &[String], ns: &str) -> bool {
    list.iter().any(|n| n == ns)
}

// === presence, typing, read ===

async fn join_presence(node: &Node, perms: &Perms, conn_id: &str, ch: &Channel) {
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
