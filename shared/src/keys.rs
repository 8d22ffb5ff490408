//! Redis key names (DESIGN.md "Redis keys"). Every key is built here from one
//! configurable prefix; the seeds' bug of two services spelling a key differently
//! cannot happen when nobody spells keys by hand.

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

    /// `sb:conn:<conn_id>`: hash {user, node, connected_at}, 90 s TTL refreshed.
    pub fn conn(&self, conn_id: &str) -> String {
        format!("{}:conn:{conn_id}", self.prefix)
    }

    /// `sb:user:<uid>:conns`: sorted set of live connection ids scored by expiry (ms).
    pub fn user_conns(&self, user_id: &str) -> String {
        format!("{}:user:{user_id}:conns", self.prefix)
    }

    /// `sb:user:<uid>:ctx`: cached teams and tasks (JSON), 60 s.
    pub fn user_ctx(&self, user_id: &str) -> String {
        format!("{}:user:{user_id}:ctx", self.prefix)
    }

    /// `sb:chat:<sid>:meta`: hash {owner, created_at}, 24 h sliding.
    pub fn chat_meta(&self, session_id: &str) -> String {
        format!("{}:chat:{session_id}:meta", self.prefix)
    }

    /// `sb:chat:<sid>:history`: list of JSON messages, 24 h sliding.
    pub fn chat_history(&self, session_id: &str) -> String {
        format!("{}:chat:{session_id}:history", self.prefix)
    }

    /// `sb:rl:chat:<uid>`: chat requests per user per window.
    pub fn rate_chat(&self, user_id: &str) -> String {
        format!("{}:rl:chat:{user_id}", self.prefix)
    }

    /// `sb:revoked:<jti>`: present while a revoked token would still be valid.
    pub fn revoked(&self, jti: &str) -> String {
        format!("{}:revoked:{jti}", self.prefix)
    }

    /// `sb:ch:<ns>:<name>:position`: hash of the channel's last `offset` (counter) and
    /// its `epoch` (when the counter started), kept in one key so they are lost together.
    pub fn channel_position(&self, namespace: &str, name: &str) -> String {
        format!("{}:ch:{namespace}:{name}:position", self.prefix)
    }

    /// `sb:ch:<ns>:<name>:history`: sorted set of ready `message` frames by offset.
    pub fn channel_history(&self, namespace: &str, name: &str) -> String {
        format!("{}:ch:{namespace}:{name}:history", self.prefix)
    }

    /// `sb:ch:<ns>:<name>:presence`: sorted set of user ids by their latest
    /// connection's expiry (ms).
    pub fn channel_presence(&self, namespace: &str, name: &str) -> String {
        format!("{}:ch:{namespace}:{name}:presence", self.prefix)
    }

    /// `sb:ch:<ns>:<name>:presence:<uid>`: sorted set of the user's connection ids in
    /// the channel by expiry (ms), so one user's count never reads the whole channel.
    pub fn channel_presence_user(&self, namespace: &str, name: &str, user_id: &str) -> String {
        format!("{}:ch:{namespace}:{name}:presence:{user_id}", self.prefix)
    }

    /// `sb:user:<uid>:read`: hash channel -> last read offset.
    pub fn user_reads(&self, user_id: &str) -> String {
        format!("{}:user:{user_id}:read", self.prefix)
    }

    /// `sb:node:<node_id>:channels`: hash channel -> local subscriber count.
    pub fn node_channels(&self, node_id: &str) -> String {
        format!("{}:node:{node_id}:channels", self.prefix)
    }

    /// `sb:node:<node_id>`: hash {connections, started_at, version}, heartbeat TTL.
    pub fn node(&self, node_id: &str) -> String {
        format!("{}:node:{node_id}", self.prefix)
    }

    /// `sb:nodes`: sorted set of gateway node ids scored by heartbeat expiry (ms).
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_the_design_table() {
        let k = Keys::new("sb");
        assert_eq!(k.conn("c1"), "sb:conn:c1");
        assert_eq!(k.user_conns("u1"), "sb:user:u1:conns");
        assert_eq!(k.user_ctx("u1"), "sb:user:u1:ctx");
        assert_eq!(k.chat_meta("s"), "sb:chat:s:meta");
        assert_eq!(k.chat_history("s"), "sb:chat:s:history");
        assert_eq!(k.rate_chat("u1"), "sb:rl:chat:u1");
        assert_eq!(k.revoked("j"), "sb:revoked:j");
        assert_eq!(k.node("n"), "sb:node:n");
        assert_eq!(k.nodes(), "sb:nodes");
        assert_eq!(k.channel_position("team", "a"), "sb:ch:team:a:position");
        assert_eq!(k.channel_history("team", "a"), "sb:ch:team:a:history");
        assert_eq!(k.channel_presence("team", "a"), "sb:ch:team:a:presence");
        assert_eq!(
            k.channel_presence_user("team", "a", "u"),
            "sb:ch:team:a:presence:u"
        );
        assert_eq!(k.user_reads("u"), "sb:user:u:read");
        assert_eq!(k.node_channels("n"), "sb:node:n:channels");
    }
}
