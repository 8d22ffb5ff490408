//! The presence sweep: users whose last connection in a channel expired (their node
//! died without removing them) are taken out of the channel's presence, atomically,
//! so that of all the nodes sweeping the same channel exactly one learns each of them
//! and announces the `leave`.

use super::{RedisStore, StoreError, bounded, now_ms};
use crate::protocol::Channel;

/// Users removed per channel and sweep at most: bounds the script's run time (Redis
/// runs nothing else meanwhile); the rest go in the next sweep.
pub const SWEEP_MAX_USERS: usize = 1000;
/// Channels per pipeline on one server: the same batch size as `presence_touch`.
const SWEEP_BATCH: usize = 512;

/// One key (the channel's users-by-expiry set), so it runs on Redis Cluster too. A
/// user's score is their latest connection's expiry (`ZADD GT`), so a score in the
/// past means no connection of theirs is alive. The per-user connection set expires
/// by itself (`PEXPIRE` at every touch).
const SWEEP_SCRIPT: &str = r#"
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #gone > 0 then
  redis.call('ZREM', KEYS[1], unpack(gone))
end
return gone
"#;

impl RedisStore {
    /// Removes expired users from each channel's presence; returns, per channel, the
    /// users this call removed (another caller removing them at the same time gets
    /// none of them).
    pub(super) async fn sweep(
        &self,
        channels: &[Channel],
    ) -> Result<Vec<(Channel, Vec<String>)>, StoreError> {
        if channels.is_empty() {
            return Ok(Vec::new());
        }
        bounded(async {
            let now = now_ms();
            let mut out = Vec::new();
            for batch in channels.chunks(SWEEP_BATCH) {
                // One script per channel, each on its channel's slot: a pipeline on
                // one server, concurrent commands on a cluster.
                let replies: Vec<Vec<String>> = self
                    .backend
                    .query_each(batch, |ch| {
                        let mut cmd = redis::cmd("EVAL");
                        cmd.arg(SWEEP_SCRIPT)
                            .arg(1)
                            .arg(self.keys.channel_presence(&ch.namespace, &ch.name))
                            .arg(now)
                            .arg(SWEEP_MAX_USERS);
                        cmd
                    })
                    .await?;
                for (ch, gone) in batch.iter().zip(replies) {
                    if !gone.is_empty() {
                        out.push((ch.clone(), gone));
                    }
                }
            }
            Ok(out)
        })
        .await
    }
}
