//! The Redis session store: the one place that reads and writes the unified session
//! keys (connections, per-user limits, node heartbeats, cached user context, revoked
//! tokens), so every node of the cluster sees the same state.
//!
//! The connection is opened lazily and re-opened by `redis`'s `ConnectionManager`
//! after a restart, so a process can start while Redis is down and recover by itself.
//! Every command is bounded by a response timeout: a dead Redis is an error, never a hang.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use serde::Serialize;
use tokio::sync::OnceCell;

mod channel;
mod presence_sweep;

pub use channel::{ChannelHistory, ChannelSettings, Position, PresenceEntry};

use crate::keys::Keys;
use crate::protocol::{HistoryMessage, UserContext};

/// Connect timeout: a healthy Redis on the same network answers in milliseconds;
/// two seconds keeps auth latency bounded when it is down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Command timeout: longer than any command we send takes on a healthy server (the
/// crate's 500 ms default trips on a loaded Redis), short enough to fail fast.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Ceiling for one store operation including a (re)connect.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(3);
/// Reconnect backoff ceiling after Redis went away.
pub const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(2);
/// Lifetime of a connection record without refresh: a dead node's connections vanish
/// within this time (DESIGN.md: 90 s).
pub const CONN_TTL: Duration = Duration::from_secs(90);
/// How often live connections are refreshed: three refreshes per TTL tolerate two
/// missed rounds (a Redis blip) without losing records.
pub const CONN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Cached user context lifetime (DESIGN.md: 60 s).
pub const CONTEXT_TTL: Duration = Duration::from_secs(60);
/// Chat sessions (meta and history) live this long after their last use (DESIGN.md).
pub const CHAT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Messages kept per session (DESIGN.md: the message window, default 100).
pub const DEFAULT_HISTORY_WINDOW: usize = 100;
/// Connections refreshed per pipeline: large enough to amortise round trips, small
/// enough not to stall the multiplexed connection for other commands.
const REFRESH_BATCH: usize = 512;

/// Errors talking to Redis. Callers answer `UNAVAILABLE`; nothing here is the client's fault.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis unavailable: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("corrupt value in {key}: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("corrupt value in {key}: {value:?}")]
    CorruptValue { key: String, value: String },
}

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

/// Handle to the session keys; cheap to clone.
#[derive(Clone)]
pub struct SessionStore {
    client: redis::Client,
    conn: std::sync::Arc<OnceCell<ConnectionManager>>,
    keys: Keys,
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never print it.
        f.debug_struct("SessionStore")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

/// Atomically drops expired members, checks the per-user limit and records the
/// connection, so two nodes admitting the same user at once cannot both exceed it.
const REGISTER_SCRIPT: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local limit = tonumber(ARGV[3])
if limit > 0 and redis.call('ZCARD', KEYS[1]) >= limit then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[8])
redis.call('HSET', KEYS[2], 'user', ARGV[5], 'node', ARGV[6], 'connected_at', ARGV[7], 'ip', ARGV[9])
redis.call('PEXPIRE', KEYS[2], ARGV[8])
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

impl SessionStore {
    /// Parses the URL; does not connect (the first command does).
    pub fn new(url: &str, keys: Keys) -> Result<SessionStore, redis::RedisError> {
        Ok(SessionStore {
            client: redis::Client::open(url)?,
            conn: std::sync::Arc::new(OnceCell::new()),
            keys,
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The shared multiplexed connection, opened on first use. While Redis is down
    /// each caller waits at most [`CONNECT_TIMEOUT`]; initialisation is serialised,
    /// so an outage is not answered with a storm of connection attempts.
    pub(crate) async fn conn(&self) -> Result<ConnectionManager, StoreError> {
        let cm = self
            .conn
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_max_delay(RECONNECT_MAX_DELAY)
                    .set_number_of_retries(usize::MAX);
                match tokio::time::timeout(
                    CONNECT_TIMEOUT + RESPONSE_TIMEOUT,
                    ConnectionManager::new_with_config(self.client.clone(), config),
                )
                .await
                {
                    Ok(r) => r.map_err(StoreError::from),
                    Err(_) => Err(StoreError::Timeout(CONNECT_TIMEOUT)),
                }
            })
            .await?;
        Ok(cm.clone())
    }

    /// Round trip to Redis, for readiness checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let _: String = redis::cmd("PING").query_async(&mut c).await?;
            Ok(())
        })
        .await
    }

    // === connections ===

    /// Records a new connection unless the user already holds `limit` (0 = no limit).
    pub async fn register_conn(
        &self,
        rec: &ConnRecord,
        limit: u32,
    ) -> Result<Admission, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let now = now_ms();
            let ttl = CONN_TTL.as_millis() as u64;
            let admitted: i64 = Script::new(REGISTER_SCRIPT)
                .key(self.keys.user_conns(&rec.user_id))
                .key(self.keys.conn(&rec.conn_id))
                .arg(now)
                .arg(now + ttl)
                .arg(limit)
                .arg(&rec.conn_id)
                .arg(&rec.user_id)
                .arg(&rec.node)
                .arg(rec.connected_at)
                .arg(ttl)
                .arg(&rec.ip)
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

    /// Extends the life of live connections `(conn_id, user_id)`.
    pub async fn refresh_conns(&self, conns: &[(String, String)]) -> Result<(), StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let ttl = CONN_TTL.as_millis() as i64;
            for batch in conns.chunks(REFRESH_BATCH) {
                let expiry = now_ms() as i64 + ttl;
                let mut p = redis::pipe();
                for (conn_id, user_id) in batch {
                    let set = self.keys.user_conns(user_id);
                    p.pexpire(self.keys.conn(conn_id), ttl).ignore();
                    // XX: a connection removed meanwhile (kick, close) must not come back.
                    p.cmd("ZADD")
                        .arg(&set)
                        .arg("XX")
                        .arg(expiry)
                        .arg(conn_id)
                        .ignore();
                    p.pexpire(&set, ttl).ignore();
                }
                let _: () = p.query_async(&mut c).await?;
            }
            Ok(())
        })
        .await
    }

    /// Forgets a closed connection.
    pub async fn unregister_conn(&self, conn_id: &str, user_id: &str) -> Result<(), StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let _: () = redis::pipe()
                .del(self.keys.conn(conn_id))
                .ignore()
                .zrem(self.keys.user_conns(user_id), conn_id)
                .ignore()
                .query_async(&mut c)
                .await?;
            Ok(())
        })
        .await
    }

    /// A user's live connections across the cluster, oldest first.
    pub async fn user_connections(&self, user_id: &str) -> Result<Vec<ConnRecord>, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let ids: Vec<String> = c
                .zrangebyscore(self.keys.user_conns(user_id), now_ms(), "+inf")
                .await?;
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let mut p = redis::pipe();
            for id in &ids {
                p.hgetall(self.keys.conn(id));
            }
            let hashes: Vec<HashMap<String, String>> = p.query_async(&mut c).await?;
            let mut out: Vec<ConnRecord> = ids
                .into_iter()
                .zip(hashes)
                .filter(|(_, h)| !h.is_empty())
                .map(|(conn_id, h)| ConnRecord {
                    conn_id,
                    user_id: h.get("user").cloned().unwrap_or_default(),
                    node: h.get("node").cloned().unwrap_or_default(),
                    ip: h.get("ip").cloned().unwrap_or_default(),
                    connected_at: h
                        .get("connected_at")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0),
                })
                .collect();
            out.sort_by_key(|r| r.connected_at);
            Ok(out)
        })
        .await
    }

    // === nodes ===

    /// Announces a node as alive for `ttl`.
    pub async fn node_heartbeat(&self, rec: &NodeRecord, ttl: Duration) -> Result<(), StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let key = self.keys.node(&rec.node);
            let ttl_ms = ttl.as_millis() as i64;
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
                .zadd(self.keys.nodes(), &rec.node, now_ms() as i64 + ttl_ms)
                .ignore()
                .query_async(&mut c)
                .await?;
            Ok(())
        })
        .await
    }

    /// Removes a node that shut down cleanly.
    pub async fn remove_node(&self, node: &str) -> Result<(), StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let _: () = redis::pipe()
                .del(self.keys.node(node))
                .ignore()
                .zrem(self.keys.nodes(), node)
                .ignore()
                .query_async(&mut c)
                .await?;
            Ok(())
        })
        .await
    }

    /// Live nodes (heartbeat not expired), by id.
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let now = now_ms();
            let _: () = c.zrembyscore(self.keys.nodes(), "-inf", now).await?;
            let ids: Vec<String> = c.zrangebyscore(self.keys.nodes(), now, "+inf").await?;
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let mut p = redis::pipe();
            for id in &ids {
                p.hgetall(self.keys.node(id));
            }
            let hashes: Vec<HashMap<String, String>> = p.query_async(&mut c).await?;
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

    pub async fn is_revoked(&self, jti: &str) -> Result<bool, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            Ok(c.exists(self.keys.revoked(jti)).await?)
        })
        .await
    }

    /// Revokes a token id until `exp` (unix seconds), after which it is invalid anyway.
    pub async fn revoke(&self, jti: &str, exp: u64) -> Result<(), StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let now = now_ms() / 1000;
            let ttl = exp.saturating_sub(now).max(1);
            let _: () = c.set_ex(self.keys.revoked(jti), 1, ttl).await?;
            Ok(())
        })
        .await
    }

    // === chat sessions ===

    /// Creates the session for `user_id` if new; checks ownership otherwise.
    pub async fn claim_session(
        &self,
        session_id: &str,
        user_id: &str,
    ) -> Result<SessionAccess, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let r: i64 = Script::new(CLAIM_SESSION_SCRIPT)
                .key(self.keys.chat_meta(session_id))
                .key(self.keys.chat_history(session_id))
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

    /// The owner of a session, if it exists.
    pub async fn session_owner(&self, session_id: &str) -> Result<Option<String>, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            Ok(c.hget(self.keys.chat_meta(session_id), "owner").await?)
        })
        .await
    }

    /// The most recent `limit` messages, oldest first.
    pub async fn history(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<HistoryMessage>, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            if limit == 0 {
                return Ok(Vec::new());
            }
            let key = self.keys.chat_history(session_id);
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
    pub async fn append_history(
        &self,
        session_id: &str,
        owner: &str,
        request_id: &str,
        messages: &[HistoryMessage],
        window: usize,
    ) -> Result<bool, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let key = self.keys.chat_history(session_id);
            let script = Script::new(APPEND_SCRIPT);
            let mut inv = script.prepare_invoke();
            inv.key(&key)
                .key(self.keys.chat_meta(session_id))
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

    /// The assistant reply recorded for a request, if any (a redelivered request
    /// that already completed only republishes it).
    pub async fn recorded_reply(
        &self,
        session_id: &str,
        request_id: &str,
    ) -> Result<Option<HistoryMessage>, StoreError> {
        let all = self
            .history(session_id, DEFAULT_HISTORY_WINDOW * 10)
            .await?;
        Ok(all
            .into_iter()
            .find(|m| m.role == "assistant" && m.request_id.as_deref() == Some(request_id)))
    }

    /// Counts one chat request of `user_id` in the current window of `window`;
    /// over `limit` it is refused until the window ends.
    pub async fn chat_rate(
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

    pub async fn cached_context(&self, user_id: &str) -> Result<Option<UserContext>, StoreError> {
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

    pub async fn cache_context(&self, user_id: &str, ctx: &UserContext) -> Result<(), StoreError> {
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
