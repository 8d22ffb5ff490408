//! The Redis session store: the one place that reads and writes the unified session
//! keys (connections, per-user limits, node heartbeats, cached user context, revoked
//! tokens), so every node of the cluster sees the same state.
//!
//! The connection is opened lazily and re-opened by `redis`'s `ConnectionManager`
//! after a restart, so a process can start while Redis is down and recover by itself.
//! Every command is bounded by a response timeout: a dead Redis is an error, never a hang.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redis::{AsyncCommands, Script};
use serde::Serialize;

mod backend;
mod channel;
mod channel_model;
mod error;
pub mod memory;
mod presence_sweep;

pub use backend::{CONNECT_TIMEOUT, Conn, RECONNECT_MAX_DELAY, RESPONSE_TIMEOUT, Target};
pub use channel_model::{
    ChannelHistory, ChannelSettings, MAX_READ_OFFSET, Position, PresenceEntry,
};
pub use error::StoreError;

use crate::keys::{Keys, REVOCATION_SHARDS};
use crate::protocol::{Channel, HistoryMessage, UserContext};

use backend::Backend;

/// Ceiling for one store operation including a (re)connect.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(3);
/// Lifetime of a connection record without refresh: a dead node's connections vanish
/// within this time (90 s).
pub const CONN_TTL: Duration = Duration::from_secs(90);
/// How often live connections are refreshed: three refreshes per TTL tolerate two
/// missed rounds (a Redis blip) without losing records.
pub const CONN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// The last fetched user context is kept this long: it is only served `degraded`
/// (backend or every worker down), where an hour-old team list beats none.
pub const CONTEXT_TTL: Duration = Duration::from_secs(3600);
/// Chat sessions (meta and history) live this long after their last use.
pub const CHAT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Messages kept per session (the message window, default 100).
pub const DEFAULT_HISTORY_WINDOW: usize = 100;

/// A live connection as recorded in Redis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnRecord {
    pub conn_id: String,
    pub user_id: String,
    pub node: String,
    /// Client address as the gateway resolved it (behind trusted proxies: the real one).
    pub ip: String,
    /// Unix milliseconds.
    pub connected_at: u64,
}

impl ConnRecord {
    /// The record as one member of the user's connection set,
    /// `conn_id|node|connected_at|ip`: the set is the whole registry, so opening and
    /// closing a connection touch one key. Connection ids and node ids never contain
    /// `|` (they are validated tokens), and the address comes last.
    pub fn member(&self) -> String {
        format!(
            "{}|{}|{}|{}",
            self.conn_id, self.node, self.connected_at, self.ip
        )
    }

    /// Parses [`ConnRecord::member`]; `None` for anything else.
    pub fn from_member(user_id: &str, member: &str) -> Option<ConnRecord> {
        let mut parts = member.splitn(4, '|');
        let conn_id = parts.next()?;
        let node = parts.next()?;
        let connected_at = parts.next()?.parse().ok()?;
        let ip = parts.next()?;
        Some(ConnRecord {
            conn_id: conn_id.to_owned(),
            user_id: user_id.to_owned(),
            node: node.to_owned(),
            ip: ip.to_owned(),
            connected_at,
        })
    }
}

/// A gateway node's heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeRecord {
    pub node: String,
    pub connections: u64,
    /// Unix milliseconds.
    pub started_at: u64,
    /// Unix milliseconds of the last heartbeat.
    pub heartbeat_at: u64,
    pub version: String,
}

/// Outcome of registering a connection against the per-user limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// The user already holds `limit` live connections cluster-wide.
    OverLimit,
}

// === the store seams ===
//
// Three traits by noun, one implementation on Redis ([`RedisStore`]) and one in
// memory ([`memory::MemoryStore`], for in-process tests of several nodes). Callers hold a
// [`SharedStore`]; every method is one bounded operation that fails with
// [`StoreError`] and never hangs.

/// Connections, node heartbeats and revoked tokens.
#[async_trait]
pub trait ConnStore: Send + Sync {
    /// Round trip to the store, for readiness checks.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Records a new connection unless the user already holds `limit` live ones
    /// cluster-wide (0 = no limit); check and record are one atomic step.
    async fn register_conn(&self, rec: &ConnRecord, limit: u32) -> Result<Admission, StoreError>;
    /// Extends the life of live connections, given as `(user_id, member)` with the
    /// member from [`ConnRecord::member`]; a removed one does not come back, and the
    /// users' expired members are dropped.
    async fn refresh_conns(&self, conns: &[(String, String)]) -> Result<(), StoreError>;
    /// Forgets a closed connection.
    async fn unregister_conn(&self, user_id: &str, member: &str) -> Result<(), StoreError>;
    /// A user's live connections across the cluster, oldest first.
    async fn user_connections(&self, user_id: &str) -> Result<Vec<ConnRecord>, StoreError>;
    /// Announces a node as alive for `ttl`.
    async fn node_heartbeat(&self, rec: &NodeRecord, ttl: Duration) -> Result<(), StoreError>;
    /// Removes a node that shut down cleanly.
    async fn remove_node(&self, node: &str) -> Result<(), StoreError>;
    /// Live nodes (heartbeat not expired), by id.
    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    /// Revokes a token id until `exp` (unix seconds).
    async fn revoke(&self, jti: &str, exp: u64) -> Result<(), StoreError>;
    /// Every token id revoked and not yet expired, with its `exp`.
    async fn revocations(&self) -> Result<Vec<(String, u64)>, StoreError>;
}

/// Chat sessions, their history, the per-user chat rate and cached user context.
#[async_trait]
pub trait ChatStore: Send + Sync {
    /// Creates `user_id`'s session if new; checks ownership otherwise.
    async fn claim_session(
        &self,
        session_id: &str,
        user_id: &str,
    ) -> Result<SessionAccess, StoreError>;
    /// The owner recorded for `user_id`'s session `session_id`, if it exists.
    async fn session_owner(
        &self,
        user_id: &str,
        session_id: &str,
    ) -> Result<Option<String>, StoreError>;
    /// The most recent `limit` messages of `user_id`'s session, oldest first.
    async fn history(
        &self,
        user_id: &str,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<HistoryMessage>, StoreError>;
    /// Appends one request's messages unless that request is already recorded; keeps
    /// the last `window` messages and slides the session's TTL; claims the session
    /// for `owner` again when its record is gone. Returns whether anything was
    /// appended.
    async fn append_history(
        &self,
        session_id: &str,
        owner: &str,
        request_id: &str,
        messages: &[HistoryMessage],
        window: usize,
    ) -> Result<bool, StoreError>;
    /// Counts one chat request of `user_id` in the current window of `window`; over
    /// `limit` it is refused until the window ends.
    async fn chat_rate(
        &self,
        user_id: &str,
        limit: u32,
        window: Duration,
    ) -> Result<RateDecision, StoreError>;
    /// The last cached context of a user ([`CONTEXT_TTL`]).
    async fn cached_context(&self, user_id: &str) -> Result<Option<UserContext>, StoreError>;
    /// Caches a fetched context (stored not `degraded`).
    async fn cache_context(&self, user_id: &str, ctx: &UserContext) -> Result<(), StoreError>;

    /// The assistant reply recorded for a request, if any (a redelivered request
    /// that already completed only republishes it).
    async fn recorded_reply(
        &self,
        user_id: &str,
        session_id: &str,
        request_id: &str,
    ) -> Result<Option<HistoryMessage>, StoreError> {
        let all = self
            .history(user_id, session_id, DEFAULT_HISTORY_WINDOW * 10)
            .await?;
        Ok(all
            .into_iter()
            .find(|m| m.role == "assistant" && m.request_id.as_deref() == Some(request_id)))
    }
}

/// Channel offsets and history (recovery), presence, read offsets and each node's
/// subscriber counts.
#[async_trait]
pub trait ChannelStore: Send + Sync {
    /// Stores a publication and returns its offset with the channel's epoch. The
    /// frame is `head + offset + tail`.
    async fn publish_channel(
        &self,
        ch: &Channel,
        head: &str,
        tail: &str,
        settings: &ChannelSettings,
    ) -> Result<Position, StoreError>;
    /// The channel's position, started (a new epoch, offset 0) when missing; a
    /// subscriber holds it, so it lives another TTL.
    async fn channel_position(
        &self,
        ch: &Channel,
        settings: &ChannelSettings,
    ) -> Result<Position, StoreError>;
    /// The position and the publications after `since` of `epoch` (the current one
    /// when `None`); `recovered` says whether they are complete.
    async fn channel_since(
        &self,
        ch: &Channel,
        since: u64,
        epoch: Option<u64>,
        settings: &ChannelSettings,
    ) -> Result<ChannelHistory, StoreError>;
    /// The newest publication with its position, if the channel has one.
    async fn channel_top(&self, ch: &Channel) -> Result<Option<(Position, String)>, StoreError>;
    /// Publications strictly between `from` and `to` of `epoch` (`None` when the
    /// channel is in another epoch by now or gone).
    async fn channel_range(
        &self,
        ch: &Channel,
        epoch: u64,
        from: u64,
        to: u64,
    ) -> Result<Option<Vec<(u64, String)>>, StoreError>;
    /// Marks `(channel, user, conn)` present for `ttl`.
    async fn presence_touch(
        &self,
        entries: &[(Channel, String, String)],
        ttl: Duration,
    ) -> Result<(), StoreError>;
    /// Removes one connection from a channel's presence; returns how many live
    /// connections of the user remain there.
    async fn presence_remove(
        &self,
        ch: &Channel,
        user: &str,
        conn: &str,
    ) -> Result<u64, StoreError>;
    /// Live connections of `user` present in `ch`.
    async fn presence_count(&self, ch: &Channel, user: &str) -> Result<u64, StoreError>;
    /// Who is present in `ch`, by user.
    async fn presence(&self, ch: &Channel) -> Result<Vec<PresenceEntry>, StoreError>;
    /// Removes expired users from each channel's presence; returns, per channel, the
    /// users this call removed (a concurrent caller gets none of them).
    async fn presence_sweep(
        &self,
        channels: &[Channel],
    ) -> Result<Vec<(Channel, Vec<String>)>, StoreError>;
    /// Keeps the highest read offset of `user` in `channel`; returns it.
    async fn set_read(&self, user: &str, channel: &str, offset: u64) -> Result<u64, StoreError>;
    /// The user's read offset in `channel`.
    async fn read_offset(&self, user: &str, channel: &str) -> Result<Option<u64>, StoreError>;
    /// Records this node's local subscriber counts for `ttl`.
    async fn node_channels(
        &self,
        node: &str,
        counts: &HashMap<String, u64>,
        ttl: Duration,
    ) -> Result<(), StoreError>;
    /// Subscriber counts summed over live nodes, by channel.
    async fn channels(&self) -> Result<BTreeMap<String, u64>, StoreError>;
}

/// Everything a gateway or worker keeps in the shared store.
pub trait Store: ConnStore + ChatStore + ChannelStore + std::fmt::Debug {}
impl<T: ConnStore + ChatStore + ChannelStore + std::fmt::Debug> Store for T {}

/// The store as the services hold it.
pub type SharedStore = Arc<dyn Store>;

/// The store on Redis (a single server or a Cluster); cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    backend: Arc<Backend>,
    keys: Keys,
    epochs: Arc<channel_model::EpochCache>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never print it.
        f.debug_struct("RedisStore")
            .field("backend", &self.backend)
            .field("keys", &self.keys)
            .finish()
    }
}

/// Checks the per-user limit against the user's live connections and records the new
/// one, atomically, so two nodes admitting the same user at once cannot both exceed
/// it. Expired members (a dead node's) are not counted; the refresh sweeps them.
/// KEYS: user_conns. ARGV: now_ms, expiry_ms, limit, member, ttl_ms.
const REGISTER_SCRIPT: &str = r#"
local limit = tonumber(ARGV[3])
if limit > 0 and redis.call('ZCOUNT', KEYS[1], ARGV[1], '+inf') >= limit then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"#;

/// Claims a chat session for a user: creates it when new, refreshes it when the user
/// owns it, refuses it otherwise. Returns 2 created, 1 owned, 0 foreign.
const CLAIM_SESSION_SCRIPT: &str = r#"
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner then
  if owner ~= ARGV[1] then return 0 end
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return 1
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'created_at', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 2
"#;

/// Appends a request's messages to a session's history unless an entry of that
/// request is already there, so a redelivered request is recorded exactly once. A
/// session whose owner record is gone (Redis restarted empty while the request was
/// in flight) is claimed again for the request's user, so the owner can read it.
/// ARGV: request_id, window, ttl_ms, messages... Returns 1 appended, 0 already there.
const APPEND_SCRIPT: &str = r#"
local items = redis.call('LRANGE', KEYS[1], 0, -1)
for _, item in ipairs(items) do
  local ok, m = pcall(cjson.decode, item)
  if ok and type(m) == 'table' and m['request_id'] == ARGV[1] then return 0 end
end
if redis.call('HEXISTS', KEYS[2], 'owner') == 0 then
  redis.call('HSET', KEYS[2], 'owner', ARGV[4], 'created_at', ARGV[5])
end
for i = 6, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"#;

/// Fixed-window counter: returns the count and the window's remaining milliseconds.
const RATE_SCRIPT: &str = r#"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]); ttl = tonumber(ARGV[1]) end
return {n, ttl}
"#;

/// Who may use a chat session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionAccess {
    /// A new session, now owned by the caller.
    Created,
    /// The caller's own session.
    Owned,
    /// Another user's session.
    Forbidden,
}

/// Outcome of a cluster-wide rate check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    Allowed,
    /// Over the limit; the window ends after this long.
    Limited(Duration),
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Bounds a whole operation (connect + commands): the manager queues commands while
/// it reconnects, and a request must fail rather than wait for an outage to end.
pub(crate) async fn bounded<T>(
    op: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(OPERATION_TIMEOUT, op).await {
        Ok(r) => r,
        Err(_) => Err(StoreError::Timeout(OPERATION_TIMEOUT)),
    }
}

impl RedisStore {
    /// One Redis server; parses the URL, does not connect (the first command does).
    pub fn new(url: &str, keys: Keys) -> Result<RedisStore, redis::RedisError> {
        RedisStore::open(Target::Single(url.to_owned()), keys)
    }

    /// A single server or a Redis Cluster; does not connect.
    pub fn open(target: Target, keys: Keys) -> Result<RedisStore, redis::RedisError> {
        RedisStore::open_tls(target, None, keys)
    }

    /// As [`RedisStore::open`], trusting `tls_ca` (PEM) for `rediss://` servers.
    pub fn open_tls(
        target: Target,
        tls_ca: Option<Vec<u8>>,
        keys: Keys,
    ) -> Result<RedisStore, redis::RedisError> {
        Ok(RedisStore {
            backend: Backend::new(target, tls_ca)?,
            keys,
            epochs: Arc::default(),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Whether the data lives in a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.backend.is_cluster()
    }

    /// The shared connection, opened on first use.
    pub(crate) async fn conn(&self) -> Result<Conn, StoreError> {
        self.backend.conn().await
    }
}

#[async_trait]
impl ConnStore for RedisStore {
    /// Round trip to Redis, for readiness checks.
    async fn ping(&self) -> Result<(), StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let _: String = redis::cmd("PING").query_async(&mut c).await?;
            Ok(())
        })
        .await
    }

    // === connections ===

    /// Records a new connection unless the user already holds `limit` (0 = no limit).
    /// One script on the user's slot: the limit check, the record and its TTL.
    async fn register_conn(&self, rec: &ConnRecord, limit: u32) -> Result<Admission, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let now = now_ms();
            let ttl = CONN_TTL.as_millis() as u64;
            let admitted: i64 = Script::new(REGISTER_SCRIPT)
                .key(self.keys.user_conns(&rec.user_id))
                .arg(now)
                .arg(now + ttl)
                .arg(limit)
                .arg(rec.member())
                .arg(ttl)
                .invoke_async(&mut c)
                .await?;
            Ok(if admitted == 1 {
                Admission::Admitted
            } else {
                Admission::OverLimit
            })
        })
        .await
    }

    /// Extends the life of live connections, given as `(user_id, member)` with the
    /// member from [`ConnRecord::member`], and drops the user's expired members (a
    /// dead node's), so the hot path never has to.
    async fn refresh_conns(&self, conns: &[(String, String)]) -> Result<(), StoreError> {
        let ttl = CONN_TTL.as_millis() as i64;
        let now = now_ms() as i64;
        let expiry = now + ttl;
        bounded(self.backend.batch(conns, |p, (user_id, member)| {
            let set = self.keys.user_conns(user_id);
            // XX: a connection removed meanwhile (kick, close) must not come back.
            p.cmd("ZADD")
                .arg(&set)
                .arg("XX")
                .arg(expiry)
                .arg(member)
                .ignore();
            p.cmd("ZREMRANGEBYSCORE")
                .arg(&set)
                .arg("-inf")
                .arg(now)
                .ignore();
            p.pexpire(&set, ttl).ignore();
        }))
        .await
    }

    /// Forgets a closed connection: one command.
    async fn unregister_conn(&self, user_id: &str, member: &str) -> Result<(), StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let _: () = c.zrem(self.keys.user_conns(user_id), member).await?;
            Ok(())
        })
        .await
    }

    /// A user's live connections across the cluster, oldest first.
    async fn user_connections(&self, user_id: &str) -> Result<Vec<ConnRecord>, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let members: Vec<String> = c
                .zrangebyscore(self.keys.user_conns(user_id), now_ms(), "+inf")
                .await?;
            let mut out: Vec<ConnRecord> = members
                .iter()
                .filter_map(|m| ConnRecord::from_member(user_id, m))
                .collect();
            out.sort_by_key(|r| r.connected_at);
            Ok(out)
        })
        .await
    }

    // === nodes ===

    /// Announces a node as alive for `ttl`.
    async fn node_heartbeat(&self, rec: &NodeRecord, ttl: Duration) -> Result<(), StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let key = self.keys.node(&rec.node);
            let ttl_ms = ttl.as_millis() as i64;
            // The node's own slot and the index are apart on a cluster: two round
            // trips, once per heartbeat.
            let _: () = redis::pipe()
                .hset_multiple(
                    &key,
                    &[
                        ("connections", rec.connections.to_string()),
                        ("started_at", rec.started_at.to_string()),
                        ("heartbeat_at", rec.heartbeat_at.to_string()),
                        ("version", rec.version.clone()),
                    ],
                )
                .ignore()
                .pexpire(&key, ttl_ms)
                .ignore()
                .query_async(&mut c)
                .await?;
            let _: () = c
                .zadd(self.keys.nodes(), &rec.node, now_ms() as i64 + ttl_ms)
                .await?;
            Ok(())
        })
        .await
    }

    /// Removes a node that shut down cleanly.
    async fn remove_node(&self, node: &str) -> Result<(), StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let _: () = c.del(self.keys.node(node)).await?;
            let _: () = c.zrem(self.keys.nodes(), node).await?;
            Ok(())
        })
        .await
    }

    /// Live nodes (heartbeat not expired), by id.
    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let now = now_ms();
            let _: () = c.zrembyscore(self.keys.nodes(), "-inf", now).await?;
            let ids: Vec<String> = c.zrangebyscore(self.keys.nodes(), now, "+inf").await?;
            let hashes: Vec<HashMap<String, String>> = self
                .backend
                .query_each(&ids, |id| {
                    let mut cmd = redis::cmd("HGETALL");
                    cmd.arg(self.keys.node(id));
                    cmd
                })
                .await?;
            let num = |h: &HashMap<String, String>, k: &str| -> u64 {
                h.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
            };
            let mut out: Vec<NodeRecord> = ids
                .into_iter()
                .zip(hashes)
                .filter(|(_, h)| !h.is_empty())
                .map(|(node, h)| NodeRecord {
                    connections: num(&h, "connections"),
                    started_at: num(&h, "started_at"),
                    heartbeat_at: num(&h, "heartbeat_at"),
                    version: h.get("version").cloned().unwrap_or_default(),
                    node,
                })
                .collect();
            out.sort_by(|a, b| a.node.cmp(&b.node));
            Ok(out)
        })
        .await
    }

    // === tokens ===
    //
    // Revocations are read in the background by every gateway (see
    // `gateway::revocations`), never per connection: a connect costs Redis nothing for
    // them.

    /// Revokes a token id until `exp` (unix seconds), after which it is invalid anyway.
    async fn revoke(&self, jti: &str, exp: u64) -> Result<(), StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let key = self.keys.revoked(jti);
            let now = now_ms() / 1000;
            let _: () = redis::pipe()
                .zadd(&key, jti, exp.max(now + 1))
                .ignore()
                .zrembyscore(&key, "-inf", now)
                .ignore()
                .query_async(&mut c)
                .await?;
            Ok(())
        })
        .await
    }

    /// Every token id revoked and not yet expired, with its `exp`: one command per
    /// shard.
    async fn revocations(&self) -> Result<Vec<(String, u64)>, StoreError> {
        bounded(async {
            let now = now_ms() / 1000;
            let shards: Vec<u32> = (0..REVOCATION_SHARDS).collect();
            let all: Vec<Vec<(String, f64)>> = self
                .backend
                .query_each(&shards, |n| {
                    let mut cmd = redis::cmd("ZRANGEBYSCORE");
                    cmd.arg(self.keys.revoked_shard(*n))
                        .arg(now)
                        .arg("+inf")
                        .arg("WITHSCORES");
                    cmd
                })
                .await?;
            Ok(all
                .into_iter()
                .flatten()
                .map(|(jti, exp): (String, f64)| (jti, exp as u64))
                .collect())
        })
        .await
    }
}

#[async_trait]
impl ChatStore for RedisStore {
    /// Creates the session for `user_id` if new; checks ownership otherwise. Sessions
    /// are keyed by owner and id together, so another user's session of the same id
    /// is a different session; `Forbidden` remains only as a guard against a record
    /// that names someone else.
    async fn claim_session(
        &self,
        session_id: &str,
        user_id: &str,
    ) -> Result<SessionAccess, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let r: i64 = Script::new(CLAIM_SESSION_SCRIPT)
                .key(self.keys.chat_meta(user_id, session_id))
                .key(self.keys.chat_history(user_id, session_id))
                .arg(user_id)
                .arg(now_ms())
                .arg(CHAT_TTL.as_millis() as u64)
                .invoke_async(&mut c)
                .await?;
            Ok(match r {
                2 => SessionAccess::Created,
                1 => SessionAccess::Owned,
                _ => SessionAccess::Forbidden,
            })
        })
        .await
    }

    /// The owner recorded for `user_id`'s session `session_id`, if it exists.
    async fn session_owner(
        &self,
        user_id: &str,
        session_id: &str,
    ) -> Result<Option<String>, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            Ok(c.hget(self.keys.chat_meta(user_id, session_id), "owner")
                .await?)
        })
        .await
    }

    /// The most recent `limit` messages of `user_id`'s session, oldest first.
    async fn history(
        &self,
        user_id: &str,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<HistoryMessage>, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            if limit == 0 {
                return Ok(Vec::new());
            }
            let key = self.keys.chat_history(user_id, session_id);
            let raw: Vec<String> = c.lrange(&key, -(limit as isize), -1).await?;
            raw.iter()
                .map(|s| {
                    serde_json::from_str(s).map_err(|source| StoreError::Corrupt {
                        key: key.clone(),
                        source,
                    })
                })
                .collect()
        })
        .await
    }

    /// Appends one request's messages unless that request is already recorded;
    /// keeps the last `window` messages and slides the session's TTL. Returns
    /// whether anything was appended.
    async fn append_history(
        &self,
        session_id: &str,
        owner: &str,
        request_id: &str,
        messages: &[HistoryMessage],
        window: usize,
    ) -> Result<bool, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let key = self.keys.chat_history(owner, session_id);
            let script = Script::new(APPEND_SCRIPT);
            let mut inv = script.prepare_invoke();
            inv.key(&key)
                .key(self.keys.chat_meta(owner, session_id))
                .arg(request_id)
                .arg(window.max(1))
                .arg(CHAT_TTL.as_millis() as u64)
                .arg(owner)
                .arg(now_ms());
            for m in messages {
                let json = serde_json::to_string(m).map_err(|source| StoreError::Corrupt {
                    key: key.clone(),
                    source,
                })?;
                inv.arg(json);
            }
            let r: i64 = inv.invoke_async(&mut c).await?;
            Ok(r == 1)
        })
        .await
    }

    /// Counts one chat request of `user_id` in the current window of `window`;
    /// over `limit` it is refused until the window ends.
    async fn chat_rate(
        &self,
        user_id: &str,
        limit: u32,
        window: Duration,
    ) -> Result<RateDecision, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let (n, ttl): (u64, i64) = Script::new(RATE_SCRIPT)
                .key(self.keys.rate_chat(user_id))
                .arg(window.as_millis() as u64)
                .invoke_async(&mut c)
                .await?;
            Ok(if n > u64::from(limit) {
                RateDecision::Limited(Duration::from_millis(ttl.max(1) as u64))
            } else {
                RateDecision::Allowed
            })
        })
        .await
    }

    // === user context ===

    async fn cached_context(&self, user_id: &str) -> Result<Option<UserContext>, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let key = self.keys.user_ctx(user_id);
            let raw: Option<String> = c.get(&key).await?;
            match raw {
                None => Ok(None),
                Some(s) => serde_json::from_str(&s)
                    .map(Some)
                    .map_err(|source| StoreError::Corrupt { key, source }),
            }
        })
        .await
    }

    async fn cache_context(&self, user_id: &str, ctx: &UserContext) -> Result<(), StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let cached = UserContext {
                degraded: false,
                ..ctx.clone()
            };
            let body = serde_json::to_string(&cached).map_err(|source| StoreError::Corrupt {
                key: self.keys.user_ctx(user_id),
                source,
            })?;
            let _: () = c
                .set_ex(self.keys.user_ctx(user_id), body, CONTEXT_TTL.as_secs())
                .await?;
            Ok(())
        })
        .await
    }
}
