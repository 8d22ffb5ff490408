//! Channel state in Redis: per-channel offsets and bounded history (for recovery),
//! presence (who is subscribed, cluster-wide), per-user read offsets, and each node's
//! local subscriber counts (for `GET /v1/channels`).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::{AsyncCommands, Script};

use super::channel_model::{
    ChannelHistory, ChannelSettings, MAX_READ_OFFSET, Position, PresenceEntry, READ_TTL,
    TTL_REFRESH_INTERVAL,
};
use super::{ChannelStore, RedisStore, StoreError, bounded, now_ms};
use crate::protocol::Channel;

// A channel is one Redis stream, `sb:{ch:<ns>:<name>}:log`. Entry ids are
// `<epoch>-<offset>`: the stream's own id counter assigns gapless offsets within an
// epoch, `MAXLEN` bounds the history, and the stream's last id is the position. A
// stream lost with Redis (restart without persistence, failover before replication,
// eviction, expiry) is created again under a later epoch taken from the Redis clock
// (unix microseconds), so a gateway or client holding an old offset can tell the two
// counts apart. Entry `<epoch>-0` marks a position started before any publication.
// Fields: `h`/`t`, the frame's JSON before and after its offset; `ts`, publish time.

/// The newest entry's id, or a new epoch's marker when the stream is missing.
/// Expects `KEYS[1]`; leaves the id in `top`.
macro_rules! top_lua {
    () => {
        r#"
local top
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last == 0 then
  local t = redis.call('TIME')
  local e = t[1] .. string.format('%06d', tonumber(t[2]))
  top = redis.call('XADD', KEYS[1], e .. '-0', 'p', '1')
else
  top = last[1][1]
end
"#
    };
}

/// Flattens entries into `{id, head, tail, ts, ...}`, skipping position markers.
macro_rules! flat_lua {
    () => {
        r#"
local function flat(entries, out)
  for _, en in ipairs(entries) do
    local f = en[2]
    local h, t, ts = nil, '', '0'
    for i = 1, #f, 2 do
      if f[i] == 'h' then h = f[i + 1] elseif f[i] == 't' then t = f[i + 1] elseif f[i] == 'ts' then ts = f[i + 1] end
    end
    if h then
      out[#out + 1] = en[1]; out[#out + 1] = h; out[#out + 1] = t; out[#out + 1] = ts
    end
  end
  return out
end
"#
    };
}

/// A publication when this node does not know the channel's epoch (first use, or the
/// stream was lost or started again): reads the epoch (starting one when missing)
/// and appends. ARGV: head, tail, ts, size, ttl_ms. Returns the entry id.
const PUBLISH_SLOW_SCRIPT: &str = r#"
local id
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last == 0 then
  local t = redis.call('TIME')
  local e = t[1] .. string.format('%06d', tonumber(t[2]))
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '=', ARGV[4], e .. '-1', 'h', ARGV[1], 't', ARGV[2], 'ts', ARGV[3])
else
  local e = string.match(last[1][1], '^(%d+)-')
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '=', ARGV[4], e .. '-*', 'h', ARGV[1], 't', ARGV[2], 'ts', ARGV[3])
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return id
"#;

/// The channel's position (started when missing); a subscriber holds it, so it lives
/// another TTL. ARGV: ttl_ms.
const POSITION_SCRIPT: &str = concat!(
    top_lua!(),
    r#"
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return top
"#
);

/// The position (as [`POSITION_SCRIPT`]) and the publications from `ARGV[2]`
/// (`since + 1`) of the current epoch, in one step. Offsets travel as decimal strings
/// made in Rust: Lua's numbers are doubles and print 15-digit ones as `1e+14`, which
/// is no stream id.
const SINCE_SCRIPT: &str = concat!(
    top_lua!(),
    flat_lua!(),
    r#"
redis.call('PEXPIRE', KEYS[1], ARGV[1])
local e = string.match(top, '^(%d+)-')
local out = {top}
return flat(redis.call('XRANGE', KEYS[1], e .. '-' .. ARGV[2], '+'), out)
"#
);

/// Publications from `ARGV[2]` to `ARGV[3]` (strictly between two offsets, computed
/// in Rust for the same reason; `ARGV[4]` = `1` when nothing lies between) of one
/// epoch (`ARGV[1]`; empty = the current one); `{}` with no top when the channel is in another epoch by now (its
/// history is not the one the offsets belong to) or gone.
const RANGE_SCRIPT: &str = concat!(
    flat_lua!(),
    r#"
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last == 0 then return {} end
local e = string.match(last[1][1], '^(%d+)-')
if ARGV[1] ~= '' and ARGV[1] ~= e then return {} end
local out = {last[1][1]}
if ARGV[4] == '1' then return out end
return flat(redis.call('XRANGE', KEYS[1], e .. '-' .. ARGV[2], e .. '-' .. ARGV[3]), out)
"#
);

/// Keeps the highest read offset. Lua numbers are doubles, so the caller passes only
/// offsets up to [`MAX_READ_OFFSET`] and the decimal string is stored as given (never
/// a Lua number's rendering). A stored value that is not a whole number in that range
/// was not written by this script (an older version stored doubles such as
/// `1.8446744073709552e+19`): it counts as no read at all, so this write replaces it
/// instead of being compared with garbage forever. ARGV: channel, offset, ttl_ms.
const READ_SCRIPT: &str = r#"
local max = 9007199254740991
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if cur == nil or cur ~= cur or cur < 0 or cur > max or cur % 1 ~= 0 then cur = -1 end
local new = tonumber(ARGV[2])
if new > cur then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]); cur = new end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return cur
"#;

#[async_trait]
impl ChannelStore for RedisStore {
    /// Stores a publication and returns its offset with the channel's epoch. The
    /// frame is `head + offset + tail` (the caller builds both halves of the JSON).
    /// Once this process knows the channel's epoch a publication is one `XADD`
    /// (plus a `PEXPIRE` once per [`TTL_REFRESH_INTERVAL`]).
    async fn publish_channel(
        &self,
        ch: &Channel,
        head: &str,
        tail: &str,
        settings: &ChannelSettings,
    ) -> Result<Position, StoreError> {
        let key = self.keys.channel_log(&ch.namespace, &ch.name);
        let size = settings.history_size.max(1);
        let ttl = settings.offset_ttl.as_millis() as u64;
        let ts = now_ms();
        bounded(async {
            let mut c = self.conn().await?;
            if let Some(known) = self.epochs.get(&key) {
                let mut xadd = redis::cmd("XADD");
                xadd.arg(&key)
                    .arg("NOMKSTREAM")
                    .arg("MAXLEN")
                    .arg("=")
                    .arg(size)
                    .arg(format!("{}-*", known.epoch))
                    .arg("h")
                    .arg(head)
                    .arg("t")
                    .arg(tail)
                    .arg("ts")
                    .arg(ts);
                let extend = known.ttl_extended.elapsed() >= TTL_REFRESH_INTERVAL;
                let r: Result<Option<String>, redis::RedisError> = if extend {
                    let mut p = redis::pipe();
                    p.add_command(xadd).pexpire(&key, ttl as i64).ignore();
                    p.query_async::<(Option<String>,)>(&mut c)
                        .await
                        .map(|(id,)| id)
                } else {
                    xadd.query_async(&mut c).await
                };
                match r {
                    Ok(Some(id)) => {
                        let at = parse_id(&key, &id)?;
                        if at.epoch == known.epoch && at.offset > 0 {
                            if extend {
                                self.epochs.put(&key, at.epoch, Instant::now());
                            }
                            return Ok(at);
                        }
                        // Appended as the first entry of a count this node made up:
                        // the stream was in an older epoch. Undo and ask Redis.
                        let _: () = c.xdel(&key, &[id.as_str()]).await?;
                    }
                    // Missing stream (NOMKSTREAM), or it moved on to a later epoch
                    // ("equal or smaller than the target stream top item").
                    Ok(None) => {}
                    Err(e)
                        if e.kind()
                            == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) => {}
                    Err(e) => return Err(e.into()),
                }
                self.epochs.forget(&key);
            }
            let id: String = Script::new(PUBLISH_SLOW_SCRIPT)
                .key(&key)
                .arg(head)
                .arg(tail)
                .arg(ts)
                .arg(size)
                .arg(ttl)
                .invoke_async(&mut c)
                .await?;
            let at = parse_id(&key, &id)?;
            self.epochs.put(&key, at.epoch, Instant::now());
            Ok(at)
        })
        .await
    }

    /// The channel's position, started (epoch, offset 0) for a channel that has none,
    /// so every subscriber holds an epoch.
    async fn channel_position(
        &self,
        ch: &Channel,
        settings: &ChannelSettings,
    ) -> Result<Position, StoreError> {
        let key = self.keys.channel_log(&ch.namespace, &ch.name);
        bounded(async {
            let mut c = self.conn().await?;
            let id: String = Script::new(POSITION_SCRIPT)
                .key(&key)
                .arg(settings.offset_ttl.as_millis() as u64)
                .invoke_async(&mut c)
                .await?;
            parse_id(&key, &id)
        })
        .await
    }

    /// Frames after `since`, and whether they reach back to it without a gap. `since`
    /// counts in `epoch` when the caller knows which; another epoch is never complete.
    /// History is dropped `history_ttl` after the channel's last publication.
    async fn channel_since(
        &self,
        ch: &Channel,
        since: u64,
        epoch: Option<u64>,
        settings: &ChannelSettings,
    ) -> Result<ChannelHistory, StoreError> {
        let key = self.keys.channel_log(&ch.namespace, &ch.name);
        bounded(async {
            let mut c = self.conn().await?;
            let raw: Vec<String> = Script::new(SINCE_SCRIPT)
                .key(&key)
                .arg(settings.offset_ttl.as_millis() as u64)
                .arg(since.saturating_add(1).to_string())
                .invoke_async(&mut c)
                .await?;
            let (top, mut frames) = entries(&key, raw)?;
            let top = top.ok_or_else(|| StoreError::CorruptValue {
                key: key.clone(),
                value: "no position".into(),
            })?;
            let stale_before = now_ms().saturating_sub(settings.history_ttl.as_millis() as u64);
            if frames.last().is_some_and(|f| f.ts < stale_before) {
                frames.clear();
            }
            let frames: Vec<(u64, String)> =
                frames.into_iter().map(|f| (f.offset, f.frame)).collect();
            Ok(ChannelHistory::read(since, epoch, top, frames))
        })
        .await
    }

    /// The channel's last publication and its position, without starting a position:
    /// `None` for a channel without one or without publications. One command. A node
    /// whose subscriptions were away hands it to its subscribers, who then see any
    /// gap before it and repair it from history.
    async fn channel_top(&self, ch: &Channel) -> Result<Option<(Position, String)>, StoreError> {
        let key = self.keys.channel_log(&ch.namespace, &ch.name);
        bounded(async {
            let mut c = self.conn().await?;
            let reply: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
                .arg(&key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut c)
                .await?;
            let Some(entry) = reply.ids.into_iter().next() else {
                return Ok(None);
            };
            let at = parse_id(&key, &entry.id)?;
            let (Some(head), Some(tail)) = (entry.get::<String>("h"), entry.get::<String>("t"))
            else {
                // The position marker of a channel nobody published to yet.
                return Ok(None);
            };
            Ok(Some((at, format!("{head}{}{tail}", at.offset))))
        })
        .await
    }

    /// Frames with `from < offset < to` of `epoch`, for repairing a gap seen in live
    /// delivery; `None` when the channel has moved to another epoch. Epoch 0 (not
    /// known) reads whatever the channel has.
    async fn channel_range(
        &self,
        ch: &Channel,
        epoch: u64,
        from: u64,
        to: u64,
    ) -> Result<Option<Vec<(u64, String)>>, StoreError> {
        let key = self.keys.channel_log(&ch.namespace, &ch.name);
        bounded(async {
            let mut c = self.conn().await?;
            let raw: Vec<String> = Script::new(RANGE_SCRIPT)
                .key(&key)
                .arg(if epoch == 0 {
                    String::new()
                } else {
                    epoch.to_string()
                })
                .arg(from.saturating_add(1).to_string())
                .arg(to.saturating_sub(1).to_string())
                .arg(if from.saturating_add(1) > to.saturating_sub(1) {
                    "1"
                } else {
                    "0"
                })
                .invoke_async(&mut c)
                .await?;
            let (top, frames) = entries(&key, raw)?;
            Ok(top.map(|_| frames.into_iter().map(|f| (f.offset, f.frame)).collect()))
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
    async fn presence_touch(
        &self,
        entries: &[(Channel, String, String)],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let expiry = now_ms() + ttl.as_millis() as u64;
        let ttl_ms = ttl.as_millis() as i64;
        bounded(self.backend.batch(entries, |p, (ch, user, conn)| {
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
        }))
        .await
    }

    /// Removes one connection from a channel's presence; returns how many live
    /// connections the user still has in it (0 means the user left).
    async fn presence_remove(
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
    async fn presence_count(&self, ch: &Channel, user: &str) -> Result<u64, StoreError> {
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
    async fn presence(&self, ch: &Channel) -> Result<Vec<PresenceEntry>, StoreError> {
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

    /// Records a read offset (keeping the highest) and returns the stored one. The
    /// caller checks the offset against the channel's position; an offset above
    /// [`MAX_READ_OFFSET`] is cut to it, so what Lua compares and stores stays exact.
    async fn set_read(&self, user: &str, channel: &str, offset: u64) -> Result<u64, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let v: u64 = Script::new(READ_SCRIPT)
                .key(self.keys.user_reads(user))
                .arg(channel)
                .arg(offset.min(MAX_READ_OFFSET))
                .arg(READ_TTL.as_millis() as u64)
                .invoke_async(&mut c)
                .await?;
            Ok(v)
        })
        .await
    }

    /// The user's read offset in a channel. A stored value that is not an offset
    /// (written by an older version, or by hand) is logged and treated as absent: a
    /// read receipt must never make `subscribe` fail.
    async fn read_offset(&self, user: &str, channel: &str) -> Result<Option<u64>, StoreError> {
        bounded(async {
            let mut c = self.conn().await?;
            let key = self.keys.user_reads(user);
            let raw: Option<String> = c.hget(&key, channel).await?;
            Ok(raw.and_then(|v| parse_read_offset(&key, channel, &v)))
        })
        .await
    }

    // === node channel counts ===

    /// Replaces this node's channel -> local subscriber counts, alive for `ttl`.
    async fn node_channels(
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
    async fn channels(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let nodes = super::ConnStore::nodes(self).await?;
        bounded(async {
            let all: Vec<HashMap<String, u64>> = self
                .backend
                .query_each(&nodes, |n| {
                    let mut cmd = redis::cmd("HGETALL");
                    cmd.arg(self.keys.node_channels(&n.node));
                    cmd
                })
                .await?;
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

    async fn presence_sweep(
        &self,
        channels: &[Channel],
    ) -> Result<Vec<(Channel, Vec<String>)>, StoreError> {
        self.sweep(channels).await
    }
}

/// One stored publication.
struct Entry {
    offset: u64,
    frame: String,
    /// Publish time, unix ms.
    ts: u64,
}

/// A script's `{top_id, id, head, tail, ts, ...}` reply: the position and entries.
fn entries(key: &str, raw: Vec<String>) -> Result<(Option<Position>, Vec<Entry>), StoreError> {
    let mut it = raw.into_iter();
    let Some(top) = it.next() else {
        return Ok((None, Vec::new()));
    };
    let top = parse_id(key, &top)?;
    let mut out = Vec::new();
    while let (Some(id), Some(head), Some(tail), Some(ts)) =
        (it.next(), it.next(), it.next(), it.next())
    {
        let at = parse_id(key, &id)?;
        out.push(Entry {
            offset: at.offset,
            frame: format!("{head}{}{tail}", at.offset),
            ts: ts.parse().unwrap_or(0),
        });
    }
    Ok((Some(top), out))
}

/// A stored read offset, or `None` (logged) when it is not a whole number up to
/// [`MAX_READ_OFFSET`].
fn parse_read_offset(key: &str, channel: &str, value: &str) -> Option<u64> {
    match value.parse::<u64>() {
        Ok(offset) if offset <= MAX_READ_OFFSET => Some(offset),
        _ => {
            tracing::warn!(key, channel, value, "corrupt read offset ignored");
            None
        }
    }
}

/// A stream entry id `<epoch>-<offset>` as a [`Position`].
fn parse_id(key: &str, id: &str) -> Result<Position, StoreError> {
    let bad = || StoreError::CorruptValue {
        key: key.to_owned(),
        value: id.to_owned(),
    };
    let (epoch, offset) = id.split_once('-').ok_or_else(bad)?;
    Ok(Position {
        epoch: epoch.parse().map_err(|_| bad())?,
        offset: offset.parse().map_err(|_| bad())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_offsets_parse_only_exact_whole_numbers() {
        let parse = |v| parse_read_offset("sb:{u:u}:read", "team:t", v);
        assert_eq!(parse("0"), Some(0));
        assert_eq!(parse("7"), Some(7));
        assert_eq!(parse("9007199254740991"), Some(MAX_READ_OFFSET));
        for corrupt in [
            "9007199254740992",
            "1.8446744073709552e+19",
            "1.2345678901234568e+17",
            "-1",
            "7.5",
            "",
            "abc",
        ] {
            assert_eq!(parse(corrupt), None, "{corrupt}");
        }
    }
}
