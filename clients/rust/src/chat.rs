//! Chat requests in flight: drops repeated chunks and finals, notices a redelivery,
//! and decides which sessions to read from `history` when live frames were missed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use protocol::HistoryMessage;

use crate::event::{ChatEvent, Delivery};

/// One request without its final frame yet.
struct Live {
    session_id: String,
    /// The next `seq` of the current delivery.
    next_seq: u64,
    /// Sent by this client (acked): only these are looked up in `history`.
    own: bool,
    last_event: Instant,
    asked_history: Option<Instant>,
}

pub(crate) struct Chats {
    live: HashMap<String, Live>,
    finished: HashSet<String>,
    finished_order: VecDeque<String>,
    max_finished: usize,
}

impl Chats {
    pub(crate) fn new(max_finished: usize) -> Chats {
        Chats {
            live: HashMap::new(),
            finished: HashSet::new(),
            finished_order: VecDeque::new(),
            max_finished: max_finished.max(1),
        }
    }

    /// `chat.send` was acked: the request is ours to see through.
    pub(crate) fn acked(&mut self, session_id: &str, request_id: &str, now: Instant) {
        if self.finished.contains(request_id) {
            return;
        }
        let live = self.live.entry(request_id.to_owned()).or_insert(Live {
            session_id: session_id.to_owned(),
            next_seq: 0,
            own: true,
            last_event: now,
            asked_history: None,
        });
        live.own = true;
    }

    /// A `chat.chunk`: the events it yields (none for a repeat).
    pub(crate) fn chunk(
        &mut self,
        session_id: String,
        request_id: String,
        seq: u64,
        content: String,
        now: Instant,
    ) -> Vec<ChatEvent> {
        if self.finished.contains(&request_id) {
            return Vec::new();
        }
        let live = self.live.entry(request_id.clone()).or_insert(Live {
            session_id: session_id.clone(),
            next_seq: 0,
            own: false,
            last_event: now,
            asked_history: None,
        });
        live.last_event = now;
        let mut out = Vec::new();
        if seq < live.next_seq {
            if seq != 0 {
                return out;
            }
            // Chunks start again at 0 only when another worker took the request over.
            out.push(ChatEvent::Restarted {
                session_id: session_id.clone(),
                request_id: request_id.clone(),
            });
        }
        live.next_seq = seq + 1;
        out.push(ChatEvent::Chunk {
            session_id,
            request_id,
            seq,
            content,
        });
        out
    }

    /// A final frame (`chat.complete`, `chat.error`): true the first time only.
    pub(crate) fn finish(&mut self, request_id: &str) -> bool {
        if self.finished.contains(request_id) {
            return false;
        }
        self.live.remove(request_id);
        self.finished.insert(request_id.to_owned());
        self.finished_order.push_back(request_id.to_owned());
        while self.finished_order.len() > self.max_finished {
            if let Some(old) = self.finished_order.pop_front() {
                self.finished.remove(&old);
            }
        }
        true
    }

    /// Sessions to read from `history`: after a reconnect every session with an own
    /// request in flight; on a live link those silent for `silence` (once per
    /// `silence`).
    pub(crate) fn due_for_history(
        &mut self,
        now: Instant,
        reconnected: bool,
        silence: Duration,
    ) -> Vec<String> {
        let mut sessions = Vec::new();
        for live in self.live.values_mut().filter(|l| l.own) {
            let silent = now.duration_since(live.last_event) >= silence;
            let asked_recently = live
                .asked_history
                .is_some_and(|t| now.duration_since(t) < silence);
            if reconnected || (silent && !asked_recently) {
                live.asked_history = Some(now);
                if !sessions.contains(&live.session_id) {
                    sessions.push(live.session_id.clone());
                }
            }
        }
        sessions
    }

    /// A `history` answer for `session_id`: the replies of requests in flight that it
    /// already holds.
    pub(crate) fn fill(
        &mut self,
        session_id: &str,
        messages: &[HistoryMessage],
        delivery: Delivery,
    ) -> Vec<ChatEvent> {
        let mut out = Vec::new();
        for m in messages.iter().filter(|m| m.role == "assistant") {
            let Some(rid) = m.request_id.as_deref() else {
                continue;
            };
            let ours = self
                .live
                .get(rid)
                .is_some_and(|l| l.own && l.session_id == session_id);
            if ours && self.finish(rid) {
                out.push(ChatEvent::Complete {
                    session_id: session_id.to_owned(),
                    request_id: rid.to_owned(),
                    content: m.content.clone(),
                    usage: None,
                    delivery,
                });
            }
        }
        out
    }

    /// Own requests silent for `limit`: they end as `TimedOut`.
    pub(crate) fn expired(&mut self, now: Instant, limit: Duration) -> Vec<ChatEvent> {
        let ids: Vec<String> = self
            .live
            .iter()
            .filter(|(_, l)| l.own && now.duration_since(l.last_event) >= limit)
            .map(|(id, _)| id.clone())
            .collect();
        let mut out = Vec::new();
        for id in ids {
            if let Some(l) = self.live.get(&id) {
                let session_id = l.session_id.clone();
                self.finish(&id);
                out.push(ChatEvent::TimedOut {
                    session_id,
                    request_id: id,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(c: &mut Chats, rid: &str, seq: u64) -> Vec<ChatEvent> {
        c.chunk(
            "s".into(),
            rid.into(),
            seq,
            format!("{seq}"),
            Instant::now(),
        )
    }

    #[test]
    fn repeated_chunks_are_dropped_and_a_redelivery_restarts() {
        let mut c = Chats::new(4);
        assert_eq!(chunk(&mut c, "r", 0).len(), 1);
        assert_eq!(chunk(&mut c, "r", 1).len(), 1);
        assert!(chunk(&mut c, "r", 1).is_empty());
        let again = chunk(&mut c, "r", 0);
        assert!(matches!(again[0], ChatEvent::Restarted { .. }));
        assert!(matches!(again[1], ChatEvent::Chunk { seq: 0, .. }));
        assert!(c.finish("r"));
        assert!(!c.finish("r"));
        assert!(chunk(&mut c, "r", 2).is_empty());
    }

    #[test]
    fn history_fills_only_own_requests_of_that_session_once() {
        let mut c = Chats::new(4);
        let now = Instant::now();
        c.acked("s", "mine", now);
        chunk(&mut c, "other", 0);
        assert_eq!(
            c.due_for_history(now, true, Duration::from_secs(10)),
            vec!["s"]
        );
        let msgs = |rid: &str| HistoryMessage {
            role: "assistant".into(),
            content: "hi".into(),
            ts: 1,
            request_id: Some(rid.into()),
        };
        let filled = c.fill(
            "s",
            &[msgs("mine"), msgs("other")],
            Delivery::AfterReconnect,
        );
        assert_eq!(filled.len(), 1);
        assert!(
            c.fill("s", &[msgs("mine")], Delivery::AfterReconnect)
                .is_empty()
        );
    }

    #[test]
    fn the_finished_set_is_bounded() {
        let mut c = Chats::new(2);
        for r in ["a", "b", "c"] {
            assert!(c.finish(r));
        }
        assert!(c.finish("a"), "the oldest was forgotten");
        assert!(!c.finish("c"));
    }

    #[test]
    fn silent_own_requests_are_checked_once_per_period_then_expire() {
        let mut c = Chats::new(4);
        let t0 = Instant::now();
        c.acked("s", "r", t0);
        let silence = Duration::from_secs(10);
        assert!(c.due_for_history(t0, false, silence).is_empty());
        let t1 = t0 + silence;
        assert_eq!(c.due_for_history(t1, false, silence), vec!["s"]);
        assert!(
            c.due_for_history(t1 + Duration::from_secs(1), false, silence)
                .is_empty()
        );
        let gone = c.expired(t0 + Duration::from_secs(180), Duration::from_secs(180));
        assert!(matches!(gone[0], ChatEvent::TimedOut { .. }));
    }
}
