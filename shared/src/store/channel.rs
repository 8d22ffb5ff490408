//! Channel state in Redis: per-channel offsets and bounded history (for recovery),
//! presence (who is subscribed, cluster-wide), per-user read offsets, and each node's
//! local subscriber counts (for `GET /v1/channels`).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use redis::{AsyncCommands, Script};
use serde::Serialize;

use super::{SessionStore, StoreError, bounded, now_ms};
use crate::protocol::Channel;

/// History and offset lifetimes of one deployment.
#[derive(Debug, Clone, Copy)]
pub struct ChannelSettings {
    /// Publications kept per channel.
    pub history_size: usize,
    /// History is dropped this long after the channel's last publication.
    pub history_ttl: Duration,
    /// The offset counter outlives the history so offsets never restart while a
    /// client may still hold one (Centrifugo's `history_meta_ttl`).
    pub offset_ttl: Duration,
}

/// What a subscriber with `since` can be given.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelHistory {
    /// The channel's last offset when history was read.
    pub top: u64,
    /// Ready frames after `since`, by offset.
    pub frames: Vec<(u64, String)>,
    /// Whether `frames` covers everything after `since` (no gap to the history's start).
    pub complete: bool,
}

/// One user's presence in a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PresenceEntry {
    pub user_id: String,
    pub connections: u64,
}

/// Assigns the next offset, stores the frame (`head .. offset .. tail`) in the
/// bounded history, and returns the offset: one atomic step, so offsets are gapless
/// and history order is offset order.
const PUBLISH_SCRIPT: &str = r#"
local offset = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local frame = ARGV[1] .. offset .. ARGV[2]
redis.call('ZADD', KEYS[2], offset, frame)
local size = tonumber(ARGV[3])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(size + 1))
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return offset
"#;

/// Reads the top offset and the frames after `since` in one step.
const SINCE_SCRIPT: &str = r#"
local top = tonumber(redis.call('GET', KEYS[1]) or '0')
local frames = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf', 'WITHSCORES')
return {top, frames}
"#;

/// Keeps the highest read offset.
const READ_SCRIPT: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local new = tonumber(ARGV[2])
if new > cur then redis.call('HSET', KEYS[1], ARGV[1], new); cur = new end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return cur
"#;

/// Read offsets are kept this long after the user's last read.
pub const READ_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

impl SessionStore {
    /// Stores a publication and returns its offset. The frame is
    /// `head + offset + tail` (the caller builds both halves of the JSON).
    pub async fn publish_channel(
        &self,
        ch: &Channel,
        head: &str,
        tail: &str,
        settings: &ChannelSettings,
    ) -> Result<u64, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let offset: u64 = Script::new(PUBLISH_SCRIPT)
                .key(self.keys.channel_offset(&ch.namespace, &ch.name))
                .key(self.keys.channel_history(&ch.namespace, &ch.name))
                .arg(head)
                .arg(tail)
                .arg(settings.history_size.max(1))
                .arg(settings.history_ttl.as_millis() as u64)
                .arg(settings.offset_ttl.as_millis() as u64)
                .invoke_async(&mut c)
                .await?;
            Ok(offset)
        })
        .await
    }

    /// The channel's current top offset (0 for a channel never published to).
    pub async fn channel_top(&self, ch: &Channel) -> Result<u64, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let v: Option<u64> = c
                .get(self.keys.channel_offset(&ch.namespace, &ch.name))
                .await?;
            Ok(v.unwrap_or(0))
        })
        .await
    }

    /// Frames after `since`, and whether they reach back to it without a gap.
    pub async fn channel_since(
        &self,
        ch: &Channel,
        since: u64,
    ) -> Result<ChannelHistory, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let (top, raw): (u64, Vec<String>) = Script::new(SINCE_SCRIPT)
                .key(self.keys.channel_offset(&ch.namespace, &ch.name))
                .key(self.keys.channel_history(&ch.namespace, &ch.name))
                .arg(since)
                .invoke_async(&mut c)
                .await?;
            let mut frames = Vec::with_capacity(raw.len() / 2);
            for pair in raw.chunks(2) {
                if let [frame, score] = pair {
                    let offset = score.parse::<f64>().unwrap_or(0.0) as u64;
                    frames.push((offset, frame.clone()));
                }
            }
            let complete = if since > top {
                // The client saw offsets this channel no longer has (history lost).
                false
            } else if since == top {
                true
            } else {
                frames.first().map(|(o, _)| *o) == Some(since + 1)
                    && frames.last().map(|(o, _)| *o) == Some(top)
                    && frames.len() as u64 == top - since
            };
            Ok(ChannelHistory {
                top,
                frames,
                complete,
            })
        })
        .await
    }

    /// Frames with `from < offset < to`, for repairing a gap seen in live delivery.
    pub async fn channel_range(
        &self,
        ch: &Channel,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, String)>, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let raw: Vec<(String, f64)> = c
                .zrangebyscore_withscores(
                    self.keys.channel_history(&ch.namespace, &ch.name),
                    format!("({from}"),
                    format!("({to}"),
                )
                .await?;
            Ok(raw.into_iter().map(|(f, s)| (s as u64, f)).collect())
        })
        .await
    }

    // === presence ===
    //
    // Two levels, so no operation reads a whole channel's connections: per channel
    // a sorted set of users scored by their latest connection's expiry, and per
    // (channel, user) a sorted set of that user's connections by expiry.

    /// Records connections `(channel, user, conn)` as present for `ttl` (added or
    /// refreshed).
    pub async fn presence_touch(
        &self,
        entries: &[(Channel, String, String)],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        bounded(async {
            let mut c = self.conn().await?;
            let expiry = now_ms() + ttl.as_millis() as u64;
            let ttl_ms = ttl.as_millis() as i64;
            for batch in entries.chunks(512) {
                let mut p = redis::pipe();
                for (ch, user, conn) in batch {
                    let users = self.keys.channel_presence(&ch.namespace, &ch.name);
                    let conns = self
                        .keys
                        .channel_presence_user(&ch.namespace, &ch.name, user);
                    p.zadd(&conns, conn, expiry).ignore();
                    p.pexpire(&conns, ttl_ms).ignore();
                    // GT: a refresh of one connection never shortens the user's entry.
                    p.cmd("ZADD")
                        .arg(&users)
                        .arg("GT")
                        .arg(expiry)
                        .arg(user)
                        .ignore();
                    p.pexpire(&users, ttl_ms).ignore();
                }
                let _: () = p.query_async(&mut c).await?;
            }
            Ok(())
        })
        .await
    }

    /// Removes one connection from a channel's presence; returns how many live
    /// connections the user still has in it (0 means the user left).
    pub async fn presence_remove(
        &self,
        ch: &Channel,
        user: &str,
        conn: &str,
    ) -> Result<u64, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let conns = self
                .keys
                .channel_presence_user(&ch.namespace, &ch.name, user);
            let now = now_ms();
            let (_, left): ((), u64) = redis::pipe()
                .zrem(&conns, conn)
                .zcount(&conns, now, "+inf")
                .query_async(&mut c)
                .await?;
            if left == 0 {
                let _: () = c
                    .zrem(self.keys.channel_presence(&ch.namespace, &ch.name), user)
                    .await?;
            }
            Ok(left)
        })
        .await
    }

    /// Live connections of a user in a channel.
    pub async fn presence_count(&self, ch: &Channel, user: &str) -> Result<u64, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let conns = self
                .keys
                .channel_presence_user(&ch.namespace, &ch.name, user);
            Ok(c.zcount(&conns, now_ms(), "+inf").await?)
        })
        .await
    }

    /// Who is in a channel right now, with connection counts, by user id.
    pub async fn presence(&self, ch: &Channel) -> Result<Vec<PresenceEntry>, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let key = self.keys.channel_presence(&ch.namespace, &ch.name);
            let now = now_ms();
            let _: () = c.zrembyscore(&key, "-inf", now).await?;
            let mut users: Vec<String> = c.zrangebyscore(&key, now, "+inf").await?;
            users.sort();
            if users.is_empty() {
                return Ok(Vec::new());
            }
            let mut p = redis::pipe();
            for u in &users {
                p.zcount(
                    self.keys.channel_presence_user(&ch.namespace, &ch.name, u),
                    now,
                    "+inf",
                );
            }
            let counts: Vec<u64> = p.query_async(&mut c).await?;
            Ok(users
                .into_iter()
                .zip(counts)
                .filter(|(_, n)| *n > 0)
                .map(|(user_id, connections)| PresenceEntry {
                    user_id,
                    connections,
                })
                .collect())
        })
        .await
    }

    // === read offsets ===

    /// Records a read offset (keeping the highest) and returns the stored one.
    pub async fn set_read(
        &self,
        user: &str,
        channel: &str,
        offset: u64,
    ) -> Result<u64, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let v: u64 = Script::new(READ_SCRIPT)
                .key(self.keys.user_reads(user))
                .arg(channel)
                .arg(offset)
                .arg(READ_TTL.as_millis() as u64)
                .invoke_async(&mut c)
                .await?;
            Ok(v)
        })
        .await
    }

    pub async fn read_offset(&self, user: &str, channel: &str) -> Result<Option<u64>, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            Ok(c.hget(self.keys.user_reads(user), channel).await?)
        })
        .await
    }

    // === node channel counts ===

    /// Replaces this node's channel -> local subscriber counts, alive for `ttl`.
    pub async fn node_channels(
        &self,
        node: &str,
        counts: &HashMap<String, u64>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let key = self.keys.node_channels(node);
            let mut p = redis::pipe();
            p.atomic().del(&key).ignore();
            if !counts.is_empty() {
                let items: Vec<(&String, &u64)> = counts.iter().collect();
                p.hset_multiple(&key, &items).ignore();
                p.pexpire(&key, ttl.as_millis() as i64).ignore();
            }
            let _: () = p.query_async(&mut c).await?;
            Ok(())
        })
        .await
    }

    /// Active channels with subscriber counts summed over the live nodes.
    pub async fn channels(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let nodes = self.nodes().await?;
        bounded(async {
            let mut c = self.conn().await?;
            let mut p = redis::pipe();
            for n in &nodes {
                p.hgetall(self.keys.node_channels(&n.node));
            }
            let all: Vec<HashMap<String, u64>> = p.query_async(&mut c).await?;
            let mut total = BTreeMap::new();
            for m in all {
                for (ch, n) in m {
                    *total.entry(ch).or_insert(0u64) += n;
                }
            }
            Ok(total)
        })
        .await
    }
}
