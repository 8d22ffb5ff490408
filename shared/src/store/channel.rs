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

/// Where a channel's offsets stand: the epoch of its current count and its last
/// offset (0 before the first publication of the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub epoch: u64,
    pub offset: u64,
}

/// What a subscriber with `since` can be given.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelHistory {
    /// The channel's epoch when history was read.
    pub epoch: u64,
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

/// The channel's epoch, created with its position from the Redis clock (unix
/// microseconds): a position lost with Redis (restart without persistence, eviction,
/// expiry) starts again at offset 1 under a later epoch than any issued before, so a
/// gateway or client holding an old offset can tell the two counts apart.
macro_rules! epoch_lua {
    () => {
        r#"
local function epoch(key)
  local e = redis.call('HGET', key, 'epoch')
  if not e then
    local t = redis.call('TIME')
    e = t[1] .. string.format('%06d', tonumber(t[2]))
    redis.call('HSET', key, 'epoch', e)
  end
  return e
end
"#
    };
}

/// Assigns the next offset, stores the frame (`head .. offset .. tail`) in the
/// bounded history, and returns the offset and epoch: one atomic step, so offsets are
/// gapless and history order is offset order. The first offset of an epoch drops
/// whatever history an earlier epoch left.
const PUBLISH_SCRIPT: &str = concat!(
    epoch_lua!(),
    r#"
local e = epoch(KEYS[1])
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if offset == 1 then redis.call('DEL', KEYS[2]) end
local frame = ARGV[1] .. offset .. ARGV[2]
redis.call('ZADD', KEYS[2], offset, frame)
local size = tonumber(ARGV[3])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(size + 1))
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {offset, e}
"#
);

/// The channel's position (created when missing) as `e` and `top`; `ARGV[1]` is the
/// offset TTL: a subscriber holds the position, so it lives another TTL.
macro_rules! position_lua {
    () => {
        r#"
local e = epoch(KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
local top = tonumber(redis.call('HGET', KEYS[1], 'offset') or '0')
"#
    };
}

/// Reads (creating when missing) the channel's position.
const POSITION_SCRIPT: &str = concat!(epoch_lua!(), position_lua!(), "return {top, e}");

/// The position (as [`POSITION_SCRIPT`]) and the frames after `since` (`ARGV[2]`), in
/// one step.
const SINCE_SCRIPT: &str = concat!(
    epoch_lua!(),
    position_lua!(),
    r#"
local frames = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[2], '+inf', 'WITHSCORES')
return {top, e, frames}
"#
);

/// Frames strictly between two offsets of one epoch; nil when the channel is in
/// another epoch by now (its history is not the one the offsets belong to). An empty
/// epoch is not checked (a subscription that has seen no epoch yet).
const RANGE_SCRIPT: &str = r#"
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return false end
return redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[2], '(' .. ARGV[3], 'WITHSCORES')
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
    /// Stores a publication and returns its offset with the channel's epoch. The
    /// frame is `head + offset + tail` (the caller builds both halves of the JSON).
    pub async fn publish_channel(
        &self,
        ch: &Channel,
        head: &str,
        tail: &str,
        settings: &ChannelSettings,
    ) -> Result<Position, StoreError> {
        let key = self.keys.channel_position(&ch.namespace, &ch.name);
        bounded(async {
            let mut c = self.conn().await?;
            let (offset, epoch): (u64, String) = Script::new(PUBLISH_SCRIPT)
                .key(&key)
                .key(self.keys.channel_history(&ch.namespace, &ch.name))
                .arg(head)
                .arg(tail)
                .arg(settings.history_size.max(1))
                .arg(settings.history_ttl.as_millis() as u64)
                .arg(settings.offset_ttl.as_millis() as u64)
                .invoke_async(&mut c)
                .await?;
            position(&key, offset, &epoch)
        })
        .await
    }

    /// The channel's position, started (epoch, offset 0) for a channel that has none,
    /// so every subscriber holds an epoch.
    pub async fn channel_position(
        &self,
        ch: &Channel,
        settings: &ChannelSettings,
    ) -> Result<Position, StoreError> {
        let key = self.keys.channel_position(&ch.namespace, &ch.name);
        bounded(async {
            let mut c = self.conn().await?;
            let (offset, epoch): (u64, String) = Script::new(POSITION_SCRIPT)
                .key(&key)
                .arg(settings.offset_ttl.as_millis() as u64)
                .invoke_async(&mut c)
                .await?;
            position(&key, offset, &epoch)
        })
        .await
    }

    /// The channel's position as it is, without starting one: epoch 0 and offset 0 for
    /// a channel that has none. For subscriptions the client never hears of (a
    /// connection's own `user:` channel), so idle users cost Redis no key.
    pub async fn peek_channel_position(&self, ch: &Channel) -> Result<Position, StoreError> {
        let key = self.keys.channel_position(&ch.namespace, &ch.name);
        bounded(async {
            let mut c = self.conn().await?;
            let (offset, epoch): (Option<u64>, Option<String>) = redis::cmd("HMGET")
                .arg(&key)
                .arg("offset")
                .arg("epoch")
                .query_async(&mut c)
                .await?;
            Ok(Position {
                epoch: match epoch {
                    Some(e) => parse_epoch(&key, &e)?,
                    None => 0,
                },
                offset: offset.unwrap_or(0),
            })
        })
        .await
    }

    /// Frames after `since`, and whether they reach back to it without a gap. `since`
    /// counts in `epoch` when the caller knows which; another epoch is never complete.
    pub async fn channel_since(
        &self,
        ch: &Channel,
        since: u64,
        epoch: Option<u64>,
        settings: &ChannelSettings,
    ) -> Result<ChannelHistory, StoreError> {
        let key = self.keys.channel_position(&ch.namespace, &ch.name);
        bounded(async {
            let mut c = self.conn().await?;
            let (top, current, raw): (u64, String, Vec<String>) = Script::new(SINCE_SCRIPT)
                .key(&key)
                .key(self.keys.channel_history(&ch.namespace, &ch.name))
                .arg(settings.offset_ttl.as_millis() as u64)
                .arg(since)
                .invoke_async(&mut c)
                .await?;
            let current = parse_epoch(&key, &current)?;
            let frames = scored(raw);
            let complete = if epoch.is_some_and(|e| e != current) || since > top {
                // The offsets the client saw belong to a count this channel no longer
                // has (its position was lost and started again).
                false
            } else if since == top {
                true
            } else {
                frames.first().map(|(o, _)| *o) == Some(since + 1)
                    && frames.last().map(|(o, _)| *o) == Some(top)
                    && frames.len() as u64 == top - since
            };
            Ok(ChannelHistory {
                epoch: current,
                top,
                frames,
                complete,
            })
        })
        .await
    }

    /// Frames with `from < offset < to` of `epoch`, for repairing a gap seen in live
    /// delivery; `None` when the channel has moved to another epoch. Epoch 0 (not
    /// known) reads whatever the channel has.
    pub async fn channel_range(
        &self,
        ch: &Channel,
        epoch: u64,
        from: u64,
        to: u64,
    ) -> Result<Option<Vec<(u64, String)>>, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let raw: Option<Vec<String>> = Script::new(RANGE_SCRIPT)
                .key(self.keys.channel_position(&ch.namespace, &ch.name))
                .key(self.keys.channel_history(&ch.namespace, &ch.name))
                .arg(if epoch == 0 {
                    String::new()
                } else {
                    epoch.to_string()
                })
                .arg(from)
                .arg(to)
                .invoke_async(&mut c)
                .await?;
            Ok(raw.map(scored))
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

/// `[frame, score, frame, score, ...]` (a `WITHSCORES` reply) as `(offset, frame)`.
fn scored(raw: Vec<String>) -> Vec<(u64, String)> {
    let mut frames = Vec::with_capacity(raw.len() / 2);
    let mut it = raw.into_iter();
    while let (Some(frame), Some(score)) = (it.next(), it.next()) {
        let offset = score.parse::<f64>().unwrap_or(0.0) as u64;
        frames.push((offset, frame));
    }
    frames
}

/// A script's `{offset, epoch}` reply as a [`Position`].
fn position(key: &str, offset: u64, epoch: &str) -> Result<Position, StoreError> {
    Ok(Position {
        epoch: parse_epoch(key, epoch)?,
        offset,
    })
}

fn parse_epoch(key: &str, value: &str) -> Result<u64, StoreError> {
    value.parse().map_err(|_| StoreError::CorruptValue {
        key: key.to_owned(),
        value: value.to_owned(),
    })
}
