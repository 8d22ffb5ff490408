//! Redis key names. Every key is built here from one configurable prefix, so two
//! services can never spell a key differently, and every key carries a Redis Cluster
//! hash tag (`{...}`) so that each script and pipeline touches exactly one slot.
//!
//! ## Layout
//!
//! | key | type | TTL | holds | tag (one slot per) |
//! |---|---|---|---|---|
//! | `sb:{u:<uid>}:conns` | sorted set | 90 s, refreshed | live connections of the user, member `conn_id\|node\|connected_at\|ip`, score = expiry (ms): the cluster-wide per-user limit and `GET /v1/users/<id>/connections` | user |
//! | `sb:{u:<uid>}:ctx` | string (JSON) | 1 h | teams and tasks last fetched, served only `degraded` when the backend or every worker is down | user |
//! | `sb:{u:<uid>}:read` | hash | 30 days | channel -> last read offset | user |
//! | `sb:{u:<uid>}:rl:chat` | counter | window | chat requests in the current window | user |
//! | `sb:{c:<uid>:<sid>}:meta` | hash | 24 h sliding | chat session owner, created_at | chat session |
//! | `sb:{c:<uid>:<sid>}:history` | list (JSON) | 24 h sliding | the session's last N messages | chat session |
//! | `sb:{ch:<ns>:<name>}:log` | stream | offset TTL, refreshed | the channel's publications; entry id `<epoch>-<offset>`, so the stream is position, epoch and bounded history in one key | channel |
//! | `sb:{ch:<ns>:<name>}:presence` | sorted set | presence TTL | users present, score = latest expiry (ms) | channel |
//! | `sb:{ch:<ns>:<name>}:presence:<uid>` | sorted set | presence TTL | the user's connections in the channel by expiry | channel |
//! | `sb:{rev:<n>}:revoked` | sorted set | members expire by score | revoked token ids (`jti`) by `exp`, spread over [`REVOCATION_SHARDS`] keys | shard |
//! | `sb:{n:<node>}` | hash | heartbeat TTL | a gateway's heartbeat: connections, started_at, version | node |
//! | `sb:{n:<node>}:channels` | hash | heartbeat TTL | channel -> the node's local subscriber count | node |
//! | `sb:nodes` | sorted set | members expire by score | gateway node ids by heartbeat expiry | (index) |
//!
//! Chat sessions are named by their owner and the client's `session_id` together, so
//! two users choosing the same id have two sessions and nobody can claim an id before
//! its owner does (PROTOCOL.md, "Chat in detail"). Both parts are
//! `[A-Za-z0-9_-]{1,128}`, so the `:` between them cannot be forged by either.
//!
//! No key is touched by every operation: connection open and close touch only the
//! user's slot, a publication only the channel's. `sb:nodes` is written once per
//! heartbeat per gateway (a few writes per second for a hundred gateways), never per
//! connection or message; revocations are spread over sixteen keys and read by each
//! gateway in the background, never per connection.

/// Revocations are spread over this many keys (slots), so the list never hangs off
/// one hot slot, while a gateway still reads all of it in a handful of commands.
pub const REVOCATION_SHARDS: u32 = 16;

/// Key builder for one deployment prefix (default `sb`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// `prefix` must already be validated (`[A-Za-z0-9_-]+`).
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    /// `sb:{u:<uid>}:conns`: the user's live connections, scored by expiry (ms).
    pub fn user_conns(&self, user_id: &str) -> String {
        format!("{}:{{u:{user_id}}}:conns", self.prefix)
    }

    /// `sb:{u:<uid>}:ctx`: teams and tasks last fetched (JSON).
    pub fn user_ctx(&self, user_id: &str) -> String {
        format!("{}:{{u:{user_id}}}:ctx", self.prefix)
    }

    /// `sb:{c:<uid>:<sid>}:meta`: hash {owner, created_at}, 24 h sliding. Scoped by
    /// the owner: a session id is the client's name for one of its own sessions.
    pub fn chat_meta(&self, user_id: &str, session_id: &str) -> String {
        format!("{}:{{c:{user_id}:{session_id}}}:meta", self.prefix)
    }

    /// `sb:{c:<uid>:<sid>}:history`: list of JSON messages, 24 h sliding.
    pub fn chat_history(&self, user_id: &str, session_id: &str) -> String {
        format!("{}:{{c:{user_id}:{session_id}}}:history", self.prefix)
    }

    /// `sb:{u:<uid>}:rl:chat`: chat requests per user per window.
    pub fn rate_chat(&self, user_id: &str) -> String {
        format!("{}:{{u:{user_id}}}:rl:chat", self.prefix)
    }

    /// `sb:{rev:<n>}:revoked`: the revocation shard a token id belongs to.
    pub fn revoked(&self, jti: &str) -> String {
        self.revoked_shard(revocation_shard(jti))
    }

    /// `sb:{rev:<n>}:revoked` for shard `n` (< [`REVOCATION_SHARDS`]).
    pub fn revoked_shard(&self, shard: u32) -> String {
        format!("{}:{{rev:{shard}}}:revoked", self.prefix)
    }

    /// `sb:{ch:<ns>:<name>}:log`: the channel's stream (position, epoch, history).
    pub fn channel_log(&self, namespace: &str, name: &str) -> String {
        format!("{}:{{ch:{namespace}:{name}}}:log", self.prefix)
    }

    /// `sb:{ch:<ns>:<name>}:presence`: users by their latest connection's expiry (ms).
    pub fn channel_presence(&self, namespace: &str, name: &str) -> String {
        format!("{}:{{ch:{namespace}:{name}}}:presence", self.prefix)
    }

    /// `sb:{ch:<ns>:<name>}:presence:<uid>`: the user's connections in the channel
    /// by expiry (ms), so one user's count never reads the whole channel.
    pub fn channel_presence_user(&self, namespace: &str, name: &str, user_id: &str) -> String {
        format!(
            "{}:{{ch:{namespace}:{name}}}:presence:{user_id}",
            self.prefix
        )
    }

    /// `sb:{u:<uid>}:read`: hash channel -> last read offset.
    pub fn user_reads(&self, user_id: &str) -> String {
        format!("{}:{{u:{user_id}}}:read", self.prefix)
    }

    /// `sb:{n:<node>}:channels`: hash channel -> local subscriber count.
    pub fn node_channels(&self, node_id: &str) -> String {
        format!("{}:{{n:{node_id}}}:channels", self.prefix)
    }

    /// `sb:{n:<node>}`: hash {connections, started_at, version}, heartbeat TTL.
    pub fn node(&self, node_id: &str) -> String {
        format!("{}:{{n:{node_id}}}", self.prefix)
    }

    /// `sb:nodes`: sorted set of gateway node ids scored by heartbeat expiry (ms).
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }
}

/// Which revocation shard holds a token id: FNV-1a, stable across processes and
/// versions (std's hasher is randomly seeded).
pub fn revocation_shard(jti: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in jti.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % REVOCATION_SHARDS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_the_layout_table() {
        let k = Keys::new("sb");
        assert_eq!(k.user_conns("u1"), "sb:{u:u1}:conns");
        assert_eq!(k.user_ctx("u1"), "sb:{u:u1}:ctx");
        assert_eq!(k.chat_meta("u1", "s"), "sb:{c:u1:s}:meta");
        assert_eq!(k.chat_history("u1", "s"), "sb:{c:u1:s}:history");
        // Two users' sessions of one id are two keys.
        assert_ne!(k.chat_meta("u1", "s"), k.chat_meta("u2", "s"));
        assert_eq!(k.rate_chat("u1"), "sb:{u:u1}:rl:chat");
        assert_eq!(k.revoked_shard(3), "sb:{rev:3}:revoked");
        assert_eq!(k.node("n"), "sb:{n:n}");
        assert_eq!(k.nodes(), "sb:nodes");
        assert_eq!(k.channel_log("team", "a"), "sb:{ch:team:a}:log");
        assert_eq!(k.channel_presence("team", "a"), "sb:{ch:team:a}:presence");
        assert_eq!(
            k.channel_presence_user("team", "a", "u"),
            "sb:{ch:team:a}:presence:u"
        );
        assert_eq!(k.user_reads("u"), "sb:{u:u}:read");
        assert_eq!(k.node_channels("n"), "sb:{n:n}:channels");
    }

    /// Keys used together by one script or pipeline share their hash tag.
    #[test]
    fn keys_used_together_share_a_tag() {
        fn tag(key: &str) -> &str {
            let open = key.find('{').expect("tagged");
            let close = key[open..].find('}').expect("closed") + open;
            &key[open + 1..close]
        }
        let k = Keys::new("sb");
        assert_eq!(tag(&k.chat_meta("u", "s")), tag(&k.chat_history("u", "s")));
        assert_eq!(
            tag(&k.channel_log("team", "a")),
            tag(&k.channel_presence_user("team", "a", "u"))
        );
        assert_eq!(
            tag(&k.channel_presence("team", "a")),
            tag(&k.channel_log("team", "a"))
        );
        assert_eq!(tag(&k.user_conns("u")), tag(&k.user_reads("u")));
        assert_eq!(tag(&k.node("n")), tag(&k.node_channels("n")));
    }

    #[test]
    fn revocations_spread_over_every_shard() {
        let mut seen = [0u32; REVOCATION_SHARDS as usize];
        for i in 0..1600 {
            seen[revocation_shard(&format!("jti-{i}")) as usize] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
        assert_eq!(revocation_shard("abc"), revocation_shard("abc"));
    }
}
