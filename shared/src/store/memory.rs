//! The store in process memory: the same contract as [`super::RedisStore`], for
//! in-process tests of several nodes sharing one store.
//!
//! Redis is the reference: every method mirrors what the Redis side does, down to the
//! details a caller can observe (which bound is inclusive, which write slides which
//! TTL, what a script leaves behind when it fails), so a test passing here passes on
//! Redis. `testkit/tests/store.rs` runs the same checks against both. State is one
//! map per Redis key family; keys carry their own expiry, checked lazily on access as
//! Redis does for a key nobody's active expiry cycle reached yet, so no background
//! task is needed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use super::channel_model::{
    ChannelHistory, ChannelSettings, MAX_READ_OFFSET, Position, PresenceEntry, READ_TTL,
    TTL_REFRESH_INTERVAL,
};
use super::error::StoreError;
use super::presence_sweep::SWEEP_MAX_USERS;
use super::{
    Admission, CHAT_TTL, CONN_TTL, CONTEXT_TTL, ChannelStore, ChatStore, ConnRecord, ConnStore,
    NodeRecord, RateDecision, SessionAccess, now_ms,
};
use crate::keys::{REVOCATION_SHARDS, revocation_shard};
use crate::protocol::{Channel, HistoryMessage, UserContext};

/// The in-memory store. Share it as a [`super::SharedStore`] (`Arc`), one per
/// simulated cluster: every node holding the same `Arc` sees the same state.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    /// While set, every call fails as a Redis outage does (see [`MemoryStore::set_down`]).
    down: AtomicBool,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The contents can be large and are behind a lock: a log line must not wait
        // for it.
        f.debug_struct("MemoryStore")
            .field("down", &self.down.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Simulates Redis restarting empty (no persistence): every key is gone. Epochs
    /// handed out afterwards are still later ones, as the Redis clock's are.
    pub fn flush_all(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let last_epoch = st.last_epoch;
        *st = State::default();
        st.last_epoch = last_epoch;
    }

    /// Simulates a store outage: while `down`, every call fails with the error a
    /// refused Redis connection gives, so callers take their real outage path; the
    /// data survives the outage (as a Redis that comes back with its keys).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// The state for one operation, or the outage error. Every operation is one
    /// critical section, so each is atomic, as each Redis script is.
    fn state(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("the in-memory store is down"));
        }
        // A panic inside an operation leaves it half applied at worst, as a Redis
        // script failing halfway does; the other keys stay usable, so go on.
        Ok(self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

// === keys with expiry ===

/// Millisecond TTL as the Redis side passes it (`Duration::as_millis`, truncated).
fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// One family of keys, each with an optional expiry (unix ms), as Redis keeps them:
/// a key lives while `now <= expires_at`, `PEXPIRE 0` deletes it, a write to a missing
/// key creates it without TTL, and an emptied collection is deleted.
#[derive(Debug)]
struct Keyspace<K, V> {
    keys: HashMap<K, Timed<V>>,
}

#[derive(Debug)]
struct Timed<V> {
    value: V,
    expires_at: Option<u64>,
}

impl<K, V> Default for Keyspace<K, V> {
    fn default() -> Self {
        Keyspace {
            keys: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Clone, V> Keyspace<K, V> {
    /// Drops `key` if it has expired, so a read never sees it.
    fn expire(&mut self, key: &K, now: u64) {
        if self
            .keys
            .get(key)
            .is_some_and(|t| t.expires_at.is_some_and(|at| now > at))
        {
            self.keys.remove(key);
        }
    }

    fn get(&mut self, key: &K, now: u64) -> Option<&V> {
        self.expire(key, now);
        self.keys.get(key).map(|t| &t.value)
    }

    fn get_mut(&mut self, key: &K, now: u64) -> Option<&mut V> {
        self.expire(key, now);
        self.keys.get_mut(key).map(|t| &mut t.value)
    }

    /// The key's value, created empty (no TTL) when missing, as a write command does.
    fn entry(&mut self, key: &K, now: u64) -> &mut V
    where
        V: Default,
    {
        self.expire(key, now);
        &mut self
            .keys
            .entry(key.clone())
            .or_insert_with(|| Timed {
                value: V::default(),
                expires_at: None,
            })
            .value
    }

    /// `SET`-like: replaces the value and its TTL.
    fn set(&mut self, key: K, value: V, expires_at: Option<u64>) {
        self.keys.insert(key, Timed { value, expires_at });
    }

    /// `PEXPIRE key ttl_ms`: a no-op on a missing key; 0 deletes the key.
    fn pexpire(&mut self, key: &K, ttl_ms: u64, now: u64) {
        self.expire(key, now);
        if ttl_ms == 0 {
            self.keys.remove(key);
        } else if let Some(t) = self.keys.get_mut(key) {
            t.expires_at = Some(now + ttl_ms);
        }
    }

    /// `PTTL`: -2 missing, -1 without TTL, else the milliseconds left.
    fn pttl(&mut self, key: &K, now: u64) -> i64 {
        self.expire(key, now);
        match self.keys.get(key) {
            None => -2,
            Some(Timed {
                expires_at: None, ..
            }) => -1,
            Some(Timed {
                expires_at: Some(at),
                ..
            }) => at.saturating_sub(now) as i64,
        }
    }

    fn remove(&mut self, key: &K) {
        self.keys.remove(key);
    }

    /// Deletes the key when `empty` says its collection is, as Redis does.
    fn remove_if(&mut self, key: &K, empty: impl Fn(&V) -> bool) {
        if self.keys.get(key).is_some_and(|t| empty(&t.value)) {
            self.keys.remove(key);
        }
    }
}

/// A sorted set as the store uses them: member -> score (an expiry or `exp`).
type ZSet = BTreeMap<String, u64>;

/// `ZRANGEBYSCORE` order: by score, then member.
fn by_score(set: &ZSet, keep: impl Fn(u64) -> bool) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = set
        .iter()
        .filter(|(_, s)| keep(**s))
        .map(|(m, s)| (m.clone(), *s))
        .collect();
    out.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    out
}

// === the state ===

/// A chat session's meta hash.
#[derive(Debug)]
struct Meta {
    owner: String,
}

/// A node's heartbeat hash.
#[derive(Debug, Default)]
struct NodeHash {
    connections: u64,
    started_at: u64,
    heartbeat_at: u64,
    version: String,
}

/// A channel's stream: entries `<epoch>-<offset>`, all of one epoch (a lost stream
/// comes back as a new `Log` under a later epoch).
#[derive(Debug)]
struct Log {
    epoch: u64,
    /// The last offset handed out: the stream's last id, which outlives trimming.
    last: u64,
    entries: VecDeque<LogEntry>,
    /// When this store last slid the TTL with a publication; `None` while no
    /// publication went through this store, which the Redis side learns as "epoch
    /// not cached" and answers with the slow path (which always slides it).
    ttl_extended: Option<Instant>,
}

#[derive(Debug)]
struct LogEntry {
    offset: u64,
    /// `None` for the `<epoch>-0` position marker.
    publication: Option<Publication>,
}

#[derive(Debug)]
struct Publication {
    head: String,
    tail: String,
    /// Publish time, unix ms.
    ts: u64,
}

impl Log {
    fn top(&self) -> Position {
        Position {
            epoch: self.epoch,
            offset: self.entries.back().map_or(self.last, |e| e.offset),
        }
    }

    /// `XADD ... MAXLEN = size <epoch>-*`.
    fn append(&mut self, head: &str, tail: &str, ts: u64, size: usize) -> Position {
        self.last += 1;
        self.entries.push_back(LogEntry {
            offset: self.last,
            publication: Some(Publication {
                head: head.to_owned(),
                tail: tail.to_owned(),
                ts,
            }),
        });
        while self.entries.len() > size {
            self.entries.pop_front();
        }
        Position {
            epoch: self.epoch,
            offset: self.last,
        }
    }

    /// Publications with `lo <= offset <= hi`, with their publish time.
    fn frames(&self, lo: u64, hi: u64) -> Vec<(u64, String, u64)> {
        self.entries
            .iter()
            .filter(|e| e.offset >= lo && e.offset <= hi)
            .filter_map(|e| {
                let p = e.publication.as_ref()?;
                Some((e.offset, format!("{}{}{}", p.head, e.offset, p.tail), p.ts))
            })
            .collect()
    }
}

#[derive(Debug, Default)]
struct State {
    /// user -> connection member -> expiry (ms).
    conns: Keyspace<String, ZSet>,
    /// node -> heartbeat hash.
    node_hashes: Keyspace<String, NodeHash>,
    /// The node index: node -> heartbeat expiry (ms); no key TTL.
    node_index: ZSet,
    /// shard -> jti -> exp (s), kept as the double Redis scores are.
    revoked: BTreeMap<u32, HashMap<String, f64>>,
    /// (owner, session) -> meta hash.
    chat_meta: Keyspace<(String, String), Meta>,
    /// (owner, session) -> messages, oldest first.
    chat_history: Keyspace<(String, String), Vec<HistoryMessage>>,
    /// user -> chat requests in the current window.
    rate: Keyspace<String, u64>,
    contexts: Keyspace<String, UserContext>,
    logs: Keyspace<Channel, Log>,
    /// channel -> user -> latest connection expiry (ms).
    presence: Keyspace<Channel, ZSet>,
    /// (channel, user) -> connection -> expiry (ms).
    presence_conns: Keyspace<(Channel, String), ZSet>,
    /// user -> channel -> read offset.
    reads: Keyspace<String, HashMap<String, u64>>,
    /// node -> channel -> local subscriber count.
    node_channels: Keyspace<String, HashMap<String, u64>>,
    /// The last epoch handed out.
    last_epoch: u64,
}

impl State {
    // --- connections ---

    fn register_conn(&mut self, rec: &ConnRecord, limit: u32, now: u64) -> Admission {
        let ttl = ms(CONN_TTL);
        let key = &rec.user_id;
        let live = self
            .conns
            .get(key, now)
            .map_or(0, |set| set.values().filter(|e| **e >= now).count());
        if limit > 0 && live >= limit as usize {
            return Admission::OverLimit;
        }
        self.conns.entry(key, now).insert(rec.member(), now + ttl);
        self.conns.pexpire(key, ttl, now);
        Admission::Admitted
    }

    fn refresh_conns(&mut self, conns: &[(String, String)], now: u64) {
        let ttl = ms(CONN_TTL);
        for (user, member) in conns {
            if let Some(set) = self.conns.get_mut(user, now) {
                // XX: only a member still there is extended, even an expired one
                // nobody swept yet (as `ZADD XX` does).
                if let Some(e) = set.get_mut(member) {
                    *e = now + ttl;
                }
                set.retain(|_, e| *e > now);
            }
            self.conns.remove_if(user, ZSet::is_empty);
            self.conns.pexpire(user, ttl, now);
        }
    }

    fn unregister_conn(&mut self, user: &str, member: &str, now: u64) {
        let key = user.to_owned();
        if let Some(set) = self.conns.get_mut(&key, now) {
            set.remove(member);
        }
        self.conns.remove_if(&key, ZSet::is_empty);
    }

    fn user_connections(&mut self, user: &str, now: u64) -> Vec<ConnRecord> {
        let Some(set) = self.conns.get(&user.to_owned(), now) else {
            return Vec::new();
        };
        let mut out: Vec<ConnRecord> = by_score(set, |e| e >= now)
            .iter()
            .filter_map(|(m, _)| ConnRecord::from_member(user, m))
            .collect();
        out.sort_by_key(|r| r.connected_at);
        out
    }

    // --- nodes ---

    fn node_heartbeat(&mut self, rec: &NodeRecord, ttl: Duration, now: u64) {
        let ttl_ms = ms(ttl);
        let hash = self.node_hashes.entry(&rec.node, now);
        hash.connections = rec.connections;
        hash.started_at = rec.started_at;
        hash.heartbeat_at = rec.heartbeat_at;
        hash.version = rec.version.clone();
        self.node_hashes.pexpire(&rec.node, ttl_ms, now);
        self.node_index.insert(rec.node.clone(), now + ttl_ms);
    }

    fn remove_node(&mut self, node: &str) {
        self.node_hashes.remove(&node.to_owned());
        self.node_index.remove(node);
    }

    fn nodes(&mut self, now: u64) -> Vec<NodeRecord> {
        self.node_index.retain(|_, e| *e > now);
        let ids = by_score(&self.node_index, |e| e >= now);
        let mut out: Vec<NodeRecord> = ids
            .into_iter()
            .filter_map(|(node, _)| {
                let h = self.node_hashes.get(&node, now)?;
                Some(NodeRecord {
                    connections: h.connections,
                    started_at: h.started_at,
                    heartbeat_at: h.heartbeat_at,
                    version: h.version.clone(),
                    node,
                })
            })
            .collect();
        out.sort_by(|a, b| a.node.cmp(&b.node));
        out
    }

    // --- tokens ---

    fn revoke(&mut self, jti: &str, exp: u64, now_s: u64) {
        let shard = self.revoked.entry(revocation_shard(jti)).or_default();
        shard.insert(jti.to_owned(), exp.max(now_s + 1) as f64);
        shard.retain(|_, e| *e > now_s as f64);
    }

    fn revocations(&self, now_s: u64) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for n in 0..REVOCATION_SHARDS {
            let Some(shard) = self.revoked.get(&n) else {
                continue;
            };
            let mut live: Vec<(&String, f64)> = shard
                .iter()
                .filter(|(_, e)| **e >= now_s as f64)
                .map(|(j, e)| (j, *e))
                .collect();
            live.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(b.0)));
            out.extend(live.into_iter().map(|(j, e)| (j.clone(), e as u64)));
        }
        out
    }

    // --- chat ---

    fn claim_session(&mut self, session_id: &str, user_id: &str, now: u64) -> SessionAccess {
        let key = (user_id.to_owned(), session_id.to_owned());
        let ttl = ms(CHAT_TTL);
        match self.chat_meta.get(&key, now) {
            Some(meta) if meta.owner != user_id => SessionAccess::Forbidden,
            Some(_) => {
                self.chat_meta.pexpire(&key, ttl, now);
                self.chat_history.pexpire(&key, ttl, now);
                SessionAccess::Owned
            }
            None => {
                self.chat_meta.set(
                    key,
                    Meta {
                        owner: user_id.to_owned(),
                    },
                    Some(now + ttl),
                );
                SessionAccess::Created
            }
        }
    }

    fn history(
        &mut self,
        user_id: &str,
        session_id: &str,
        limit: usize,
        now: u64,
    ) -> Vec<HistoryMessage> {
        if limit == 0 {
            return Vec::new();
        }
        let key = (user_id.to_owned(), session_id.to_owned());
        let Some(list) = self.chat_history.get(&key, now) else {
            return Vec::new();
        };
        // The Redis side asks `LRANGE -limit -1` with this very arithmetic.
        lrange(list, (limit as isize).wrapping_neg(), -1).to_vec()
    }

    fn append_history(
        &mut self,
        session_id: &str,
        owner: &str,
        request_id: &str,
        messages: &[HistoryMessage],
        window: usize,
        now: u64,
    ) -> bool {
        let key = (owner.to_owned(), session_id.to_owned());
        let ttl = ms(CHAT_TTL);
        let recorded = self.chat_history.get(&key, now).is_some_and(|list| {
            list.iter()
                .any(|m| m.request_id.as_deref() == Some(request_id))
        });
        if recorded {
            return false;
        }
        if self.chat_meta.get(&key, now).is_none() {
            self.chat_meta.set(
                key.clone(),
                Meta {
                    owner: owner.to_owned(),
                },
                None,
            );
        }
        if !messages.is_empty() {
            self.chat_history
                .entry(&key, now)
                .extend(messages.iter().cloned());
        }
        if let Some(list) = self.chat_history.get_mut(&key, now) {
            let window = window.max(1);
            if list.len() > window {
                list.drain(..list.len() - window);
            }
        }
        self.chat_history.pexpire(&key, ttl, now);
        self.chat_meta.pexpire(&key, ttl, now);
        true
    }

    fn chat_rate(&mut self, user_id: &str, limit: u32, window: Duration, now: u64) -> RateDecision {
        let key = user_id.to_owned();
        let window_ms = ms(window);
        let n = {
            let count = self.rate.entry(&key, now);
            *count += 1;
            *count
        };
        if n == 1 {
            self.rate.pexpire(&key, window_ms, now);
        }
        let mut ttl = self.rate.pttl(&key, now);
        if ttl < 0 {
            self.rate.pexpire(&key, window_ms, now);
            ttl = window_ms as i64;
        }
        if n > u64::from(limit) {
            RateDecision::Limited(Duration::from_millis(ttl.max(1) as u64))
        } else {
            RateDecision::Allowed
        }
    }

    // --- channels ---

    /// A new epoch: unix microseconds, as the Redis side takes from `TIME`, and
    /// later than any this store handed out, so a channel started again within one
    /// microsecond still gets a count of its own.
    fn new_epoch(&mut self) -> u64 {
        let us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        self.last_epoch = us.max(self.last_epoch + 1);
        self.last_epoch
    }

    /// The channel's position, starting it with a `<epoch>-0` marker when missing.
    fn top_or_start(&mut self, ch: &Channel, now: u64) -> Position {
        if let Some(log) = self.logs.get(ch, now) {
            return log.top();
        }
        let epoch = self.new_epoch();
        self.logs.set(
            ch.clone(),
            Log {
                epoch,
                last: 0,
                entries: VecDeque::from([LogEntry {
                    offset: 0,
                    publication: None,
                }]),
                ttl_extended: None,
            },
            None,
        );
        Position { epoch, offset: 0 }
    }

    fn publish_channel(
        &mut self,
        ch: &Channel,
        head: &str,
        tail: &str,
        settings: &ChannelSettings,
        now: u64,
    ) -> Position {
        let size = settings.history_size.max(1);
        let ttl = ms(settings.offset_ttl);
        let extend;
        let at = match self.logs.get_mut(ch, now) {
            Some(log) => {
                // Once the epoch is known a publication slides the TTL at most once per
                // interval, as the Redis side's epoch cache does.
                extend = log
                    .ttl_extended
                    .is_none_or(|t| t.elapsed() >= TTL_REFRESH_INTERVAL);
                if extend {
                    log.ttl_extended = Some(Instant::now());
                }
                log.append(head, tail, now, size)
            }
            None => {
                extend = true;
                let epoch = self.new_epoch();
                let mut log = Log {
                    epoch,
                    last: 0,
                    entries: VecDeque::new(),
                    ttl_extended: Some(Instant::now()),
                };
                let at = log.append(head, tail, now, size);
                self.logs.set(ch.clone(), log, None);
                at
            }
        };
        if extend {
            self.logs.pexpire(ch, ttl, now);
        }
        at
    }

    fn channel_since(
        &mut self,
        ch: &Channel,
        since: u64,
        epoch: Option<u64>,
        settings: &ChannelSettings,
        now: u64,
    ) -> Result<ChannelHistory, StoreError> {
        let top = self.top_or_start(ch, now);
        self.logs.pexpire(ch, ms(settings.offset_ttl), now);
        let mut frames = self
            .logs
            .get(ch, now)
            .map(|log| log.frames(since.saturating_add(1), u64::MAX))
            .unwrap_or_default();
        let stale_before = now.saturating_sub(ms(settings.history_ttl));
        if frames.last().is_some_and(|f| f.2 < stale_before) {
            frames.clear();
        }
        let frames: Vec<(u64, String)> = frames.into_iter().map(|(o, f, _)| (o, f)).collect();
        Ok(ChannelHistory::read(since, epoch, top, frames))
    }

    fn channel_top(&mut self, ch: &Channel, now: u64) -> Option<(Position, String)> {
        let log = self.logs.get(ch, now)?;
        let last = log.entries.back()?;
        let p = last.publication.as_ref()?;
        let at = Position {
            epoch: log.epoch,
            offset: last.offset,
        };
        Some((at, format!("{}{}{}", p.head, at.offset, p.tail)))
    }

    fn channel_range(
        &mut self,
        ch: &Channel,
        epoch: u64,
        from: u64,
        to: u64,
        now: u64,
    ) -> Result<Option<Vec<(u64, String)>>, StoreError> {
        let Some(log) = self.logs.get(ch, now) else {
            return Ok(None);
        };
        if log.entries.is_empty() || (epoch != 0 && epoch != log.epoch) {
            return Ok(None);
        }
        let (lo, hi) = (from.saturating_add(1), to.saturating_sub(1));
        if lo > hi {
            return Ok(Some(Vec::new()));
        }
        Ok(Some(
            log.frames(lo, hi)
                .into_iter()
                .map(|(o, f, _)| (o, f))
                .collect(),
        ))
    }

    // --- presence ---

    fn presence_touch(&mut self, entries: &[(Channel, String, String)], ttl: Duration, now: u64) {
        let ttl_ms = ms(ttl);
        let expiry = now + ttl_ms;
        for (ch, user, conn) in entries {
            let conns_key = (ch.clone(), user.clone());
            self.presence_conns
                .entry(&conns_key, now)
                .insert(conn.clone(), expiry);
            self.presence_conns.pexpire(&conns_key, ttl_ms, now);
            // GT: a refresh of one connection never shortens the user's entry.
            let score = self
                .presence
                .entry(ch, now)
                .entry(user.clone())
                .or_insert(expiry);
            *score = (*score).max(expiry);
            self.presence.pexpire(ch, ttl_ms, now);
        }
    }

    fn live_conns(&mut self, ch: &Channel, user: &str, now: u64) -> u64 {
        self.presence_conns
            .get(&(ch.clone(), user.to_owned()), now)
            .map_or(0, |set| set.values().filter(|e| **e >= now).count() as u64)
    }

    fn presence_remove(&mut self, ch: &Channel, user: &str, conn: &str, now: u64) -> u64 {
        let key = (ch.clone(), user.to_owned());
        if let Some(set) = self.presence_conns.get_mut(&key, now) {
            set.remove(conn);
        }
        self.presence_conns.remove_if(&key, ZSet::is_empty);
        let left = self.live_conns(ch, user, now);
        if left == 0 {
            if let Some(users) = self.presence.get_mut(ch, now) {
                users.remove(user);
            }
            self.presence.remove_if(ch, ZSet::is_empty);
        }
        left
    }

    fn presence(&mut self, ch: &Channel, now: u64) -> Vec<PresenceEntry> {
        // As on Redis, reading drops expired users: a sweep after this read does not
        // report them.
        if let Some(users) = self.presence.get_mut(ch, now) {
            users.retain(|_, e| *e > now);
        }
        self.presence.remove_if(ch, ZSet::is_empty);
        let mut users: Vec<String> = self
            .presence
            .get(ch, now)
            .map(|set| {
                by_score(set, |e| e >= now)
                    .into_iter()
                    .map(|(u, _)| u)
                    .collect()
            })
            .unwrap_or_default();
        users.sort();
        users
            .into_iter()
            .map(|user_id| {
                let connections = self.live_conns(ch, &user_id, now);
                PresenceEntry {
                    user_id,
                    connections,
                }
            })
            .filter(|e| e.connections > 0)
            .collect()
    }

    fn presence_sweep(&mut self, channels: &[Channel], now: u64) -> Vec<(Channel, Vec<String>)> {
        let mut out = Vec::new();
        for ch in channels {
            let Some(users) = self.presence.get_mut(ch, now) else {
                continue;
            };
            let gone: Vec<String> = by_score(users, |e| e <= now)
                .into_iter()
                .take(SWEEP_MAX_USERS)
                .map(|(u, _)| u)
                .collect();
            for u in &gone {
                users.remove(u);
            }
            self.presence.remove_if(ch, ZSet::is_empty);
            if !gone.is_empty() {
                out.push((ch.clone(), gone));
            }
        }
        out
    }

    // --- read offsets ---

    fn set_read(&mut self, user: &str, channel: &str, offset: u64, now: u64) -> u64 {
        let key = user.to_owned();
        let new = offset.min(MAX_READ_OFFSET);
        // A missing offset compares as 0, so a first read of 0 stores nothing.
        let cur = self
            .reads
            .get(&key, now)
            .and_then(|h| h.get(channel).copied())
            .unwrap_or(0);
        let kept = if new > cur {
            self.reads.entry(&key, now).insert(channel.to_owned(), new);
            new
        } else {
            cur
        };
        self.reads.pexpire(&key, ms(READ_TTL), now);
        kept
    }

    fn read_offset(&mut self, user: &str, channel: &str, now: u64) -> Option<u64> {
        self.reads
            .get(&user.to_owned(), now)
            .and_then(|h| h.get(channel).copied())
    }

    // --- node channel counts ---

    fn node_channels(
        &mut self,
        node: &str,
        counts: &HashMap<String, u64>,
        ttl: Duration,
        now: u64,
    ) {
        let key = node.to_owned();
        self.node_channels.remove(&key);
        if !counts.is_empty() {
            self.node_channels.set(key.clone(), counts.clone(), None);
            self.node_channels.pexpire(&key, ms(ttl), now);
        }
    }

    fn channels(&mut self, now: u64) -> BTreeMap<String, u64> {
        let nodes = self.nodes(now);
        let mut total = BTreeMap::new();
        for n in nodes {
            let Some(counts) = self.node_channels.get(&n.node, now) else {
                continue;
            };
            for (ch, c) in counts {
                *total.entry(ch.clone()).or_insert(0u64) += c;
            }
        }
        total
    }
}

/// `LRANGE start stop` with Redis's index rules (negative counts from the end,
/// out-of-range ends clamped).
fn lrange<T>(list: &[T], start: isize, stop: isize) -> &[T] {
    let len = list.len() as isize;
    let start = if start < 0 {
        (len + start).max(0)
    } else {
        start
    };
    let stop = if stop < 0 {
        len + stop
    } else {
        stop.min(len - 1)
    };
    if start > stop || start >= len {
        return &[];
    }
    &list[start as usize..=stop as usize]
}

// === the seams ===

#[async_trait]
impl ConnStore for MemoryStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.state().map(drop)
    }

    async fn register_conn(&self, rec: &ConnRecord, limit: u32) -> Result<Admission, StoreError> {
        Ok(self.state()?.register_conn(rec, limit, now_ms()))
    }

    async fn refresh_conns(&self, conns: &[(String, String)]) -> Result<(), StoreError> {
        self.state()?.refresh_conns(conns, now_ms());
        Ok(())
    }

    async fn unregister_conn(&self, user_id: &str, member: &str) -> Result<(), StoreError> {
        self.state()?.unregister_conn(user_id, member, now_ms());
        Ok(())
    }

    async fn user_connections(&self, user_id: &str) -> Result<Vec<ConnRecord>, StoreError> {
        Ok(self.state()?.user_connections(user_id, now_ms()))
    }

    async fn node_heartbeat(&self, rec: &NodeRecord, ttl: Duration) -> Result<(), StoreError> {
        self.state()?.node_heartbeat(rec, ttl, now_ms());
        Ok(())
    }

    async fn remove_node(&self, node: &str) -> Result<(), StoreError> {
        self.state()?.remove_node(node);
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        Ok(self.state()?.nodes(now_ms()))
    }

    async fn revoke(&self, jti: &str, exp: u64) -> Result<(), StoreError> {
        self.state()?.revoke(jti, exp, now_ms() / 1000);
        Ok(())
    }

    async fn revocations(&self) -> Result<Vec<(String, u64)>, StoreError> {
        Ok(self.state()?.revocations(now_ms() / 1000))
    }
}

#[async_trait]
impl ChatStore for MemoryStore {
    async fn claim_session(
        &self,
        session_id: &str,
        user_id: &str,
    ) -> Result<SessionAccess, StoreError> {
        Ok(self.state()?.claim_session(session_id, user_id, now_ms()))
    }

    async fn session_owner(
        &self,
        user_id: &str,
        session_id: &str,
    ) -> Result<Option<String>, StoreError> {
        let key = (user_id.to_owned(), session_id.to_owned());
        Ok(self
            .state()?
            .chat_meta
            .get(&key, now_ms())
            .map(|m| m.owner.clone()))
    }

    async fn history(
        &self,
        user_id: &str,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<HistoryMessage>, StoreError> {
        Ok(self.state()?.history(user_id, session_id, limit, now_ms()))
    }

    async fn append_history(
        &self,
        session_id: &str,
        owner: &str,
        request_id: &str,
        messages: &[HistoryMessage],
        window: usize,
    ) -> Result<bool, StoreError> {
        Ok(self
            .state()?
            .append_history(session_id, owner, request_id, messages, window, now_ms()))
    }

    async fn chat_rate(
        &self,
        user_id: &str,
        limit: u32,
        window: Duration,
    ) -> Result<RateDecision, StoreError> {
        Ok(self.state()?.chat_rate(user_id, limit, window, now_ms()))
    }

    async fn cached_context(&self, user_id: &str) -> Result<Option<UserContext>, StoreError> {
        Ok(self
            .state()?
            .contexts
            .get(&user_id.to_owned(), now_ms())
            .cloned())
    }

    async fn cache_context(&self, user_id: &str, ctx: &UserContext) -> Result<(), StoreError> {
        let cached = UserContext {
            degraded: false,
            ..ctx.clone()
        };
        // `SET EX` takes whole seconds.
        let ttl = CONTEXT_TTL.as_secs() * 1000;
        self.state()?
            .contexts
            .set(user_id.to_owned(), cached, Some(now_ms() + ttl));
        Ok(())
    }
}

#[async_trait]
impl ChannelStore for MemoryStore {
    async fn publish_channel(
        &self,
        ch: &Channel,
        head: &str,
        tail: &str,
        settings: &ChannelSettings,
    ) -> Result<Position, StoreError> {
        Ok(self
            .state()?
            .publish_channel(ch, head, tail, settings, now_ms()))
    }

    async fn channel_position(
        &self,
        ch: &Channel,
        settings: &ChannelSettings,
    ) -> Result<Position, StoreError> {
        let now = now_ms();
        let mut s = self.state()?;
        let top = s.top_or_start(ch, now);
        s.logs.pexpire(ch, ms(settings.offset_ttl), now);
        Ok(top)
    }

    async fn channel_since(
        &self,
        ch: &Channel,
        since: u64,
        epoch: Option<u64>,
        settings: &ChannelSettings,
    ) -> Result<ChannelHistory, StoreError> {
        self.state()?
            .channel_since(ch, since, epoch, settings, now_ms())
    }

    async fn channel_top(&self, ch: &Channel) -> Result<Option<(Position, String)>, StoreError> {
        Ok(self.state()?.channel_top(ch, now_ms()))
    }

    async fn channel_range(
        &self,
        ch: &Channel,
        epoch: u64,
        from: u64,
        to: u64,
    ) -> Result<Option<Vec<(u64, String)>>, StoreError> {
        self.state()?.channel_range(ch, epoch, from, to, now_ms())
    }

    async fn presence_touch(
        &self,
        entries: &[(Channel, String, String)],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.state()?.presence_touch(entries, ttl, now_ms());
        Ok(())
    }

    async fn presence_remove(
        &self,
        ch: &Channel,
        user: &str,
        conn: &str,
    ) -> Result<u64, StoreError> {
        Ok(self.state()?.presence_remove(ch, user, conn, now_ms()))
    }

    async fn presence_count(&self, ch: &Channel, user: &str) -> Result<u64, StoreError> {
        Ok(self.state()?.live_conns(ch, user, now_ms()))
    }

    async fn presence(&self, ch: &Channel) -> Result<Vec<PresenceEntry>, StoreError> {
        Ok(self.state()?.presence(ch, now_ms()))
    }

    async fn presence_sweep(
        &self,
        channels: &[Channel],
    ) -> Result<Vec<(Channel, Vec<String>)>, StoreError> {
        if channels.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.state()?.presence_sweep(channels, now_ms()))
    }

    async fn set_read(&self, user: &str, channel: &str, offset: u64) -> Result<u64, StoreError> {
        Ok(self.state()?.set_read(user, channel, offset, now_ms()))
    }

    async fn read_offset(&self, user: &str, channel: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.state()?.read_offset(user, channel, now_ms()))
    }

    async fn node_channels(
        &self,
        node: &str,
        counts: &HashMap<String, u64>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.state()?.node_channels(node, counts, ttl, now_ms());
        Ok(())
    }

    async fn channels(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        Ok(self.state()?.channels(now_ms()))
    }
}
