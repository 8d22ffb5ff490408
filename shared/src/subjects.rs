//! NATS subject names (docs/DESIGN.md#nats-subjects). Every subject is built here, from
//! one configurable prefix, so gateways and workers can never disagree about a name.

/// JetStream stream that holds chat requests as a work queue.
pub const CHAT_STREAM: &str = "SB_CHAT";
/// JetStream stream that keeps each chat request's final frame (`chat.complete` or
/// `chat.error`) for a while, so gateways get it even when core NATS lost it.
pub const CHAT_EVENTS_STREAM: &str = "SB_CHAT_EVENTS";
/// Durable pull consumer shared by all workers.
pub const CHAT_CONSUMER: &str = "workers";
/// Queue group of workers answering RPCs.
pub const WORKER_QUEUE_GROUP: &str = "workers";
/// Queue group of gateways answering `sb.rpc.publish`.
pub const GATEWAY_QUEUE_GROUP: &str = "gateways";

/// Subject builder for one deployment prefix (default `sb`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// `prefix` must already be validated (`[A-Za-z0-9_-]+`, see `config::validate_prefix`).
    pub fn new(prefix: &str) -> Subjects {
        Subjects {
            prefix: prefix.to_owned(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `sb.chat.requests`: JetStream work queue, gateway -> one worker.
    pub fn chat_requests(&self) -> String {
        format!("{}.chat.requests", self.prefix)
    }

    /// `sb.chat.events.<uid>`: JetStream (`SB_CHAT_EVENTS`), a request's final frame,
    /// worker -> every gateway (an ordered consumer each).
    pub fn chat_events(&self, user_id: &str) -> String {
        format!("{}.chat.events.{user_id}", self.prefix)
    }

    /// `sb.chat.events.>`: every user's final frames (the stream's subject, and the
    /// gateways' filter).
    pub fn chat_events_all(&self) -> String {
        format!("{}.chat.events.>", self.prefix)
    }

    /// The user id of a `sb.chat.events.<uid>` subject.
    pub fn chat_events_user<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".chat.events.")
            .filter(|u| !u.is_empty() && !u.contains('.'))
    }

    /// `sb.chat.cancel`: core, to every worker.
    pub fn chat_cancel(&self) -> String {
        format!("{}.chat.cancel", self.prefix)
    }

    /// `sb.rpc.user_context`: core request/reply, queue group `workers`.
    pub fn user_context_rpc(&self) -> String {
        format!("{}.rpc.user_context", self.prefix)
    }

    /// `sb.user.<uid>`: ready server frames for every connection of a user.
    pub fn user(&self, user_id: &str) -> String {
        format!("{}.user.{user_id}", self.prefix)
    }

    /// `sb.ch.<ns>.<name>`: ready `message` frames for a channel's subscribers.
    pub fn channel(&self, namespace: &str, name: &str) -> String {
        format!("{}.ch.{namespace}.{name}", self.prefix)
    }

    /// `sb.rpc.publish`: server-side publish over NATS (request/reply, one gateway
    /// answers `{offset}`), for backends that speak NATS.
    pub fn publish_rpc(&self) -> String {
        format!("{}.rpc.publish", self.prefix)
    }

    /// `sb.ctl.disconnect`: kick commands to every gateway.
    pub fn ctl_disconnect(&self) -> String {
        format!("{}.ctl.disconnect", self.prefix)
    }

    /// `sb.ctl.refresh_context`: core, to every gateway: fetch these users' contexts
    /// again, bypassing caches, and apply them to their live connections.
    pub fn ctl_refresh_context(&self) -> String {
        format!("{}.ctl.refresh_context", self.prefix)
    }

    /// `sb.ctl.revoked`: core, to every gateway: a token id revoked just now.
    pub fn revocations(&self) -> String {
        format!("{}.ctl.revoked", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_match_the_design_table() {
        let s = Subjects::new("sb");
        assert_eq!(s.chat_requests(), "sb.chat.requests");
        assert_eq!(s.chat_cancel(), "sb.chat.cancel");
        assert_eq!(s.user_context_rpc(), "sb.rpc.user_context");
        assert_eq!(s.user("u1"), "sb.user.u1");
        assert_eq!(s.channel("team", "a"), "sb.ch.team.a");
        assert_eq!(s.ctl_disconnect(), "sb.ctl.disconnect");
        assert_eq!(s.ctl_refresh_context(), "sb.ctl.refresh_context");
        assert_eq!(s.chat_events("u1"), "sb.chat.events.u1");
        assert_eq!(s.chat_events_all(), "sb.chat.events.>");
        assert_eq!(s.chat_events_user("sb.chat.events.u1"), Some("u1"));
        assert_eq!(s.chat_events_user("sb.chat.events."), None);
        assert_eq!(s.chat_events_user("sb.user.u1"), None);
        assert_eq!(Subjects::new("t1").user("x"), "t1.user.x");
    }
}
