//! The requests whose final frame this node delivered (see `finals`): the hub asks
//! it before handing a final or a late chunk to a connection. Its own module because
//! the hub owns it while the stream follower in `finals` needs the whole node.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a delivered final is remembered: as long as the stream keeps finals, so a
/// resuming consumer can never bring back one that was forgotten.
pub const FINALS_MEMORY: Duration = shared::bus::stream::CHAT_EVENTS_MAX_AGE;
/// Finals remembered at most, whatever their age: 100k ids of 32 characters cost
/// about 10 MB, and a node finishes far fewer requests for its users in ten minutes.
pub const MAX_RECENT_FINALS: usize = 100_000;
/// Request ids whose final frame this node delivered, oldest first.
#[derive(Default)]
pub struct RecentFinals {
    ids: HashMap<Arc<str>, Instant>,
    order: VecDeque<(Instant, Arc<str>)>,
}

impl RecentFinals {
    /// Records `request`'s final; `false` when it was delivered already.
    pub fn first(&mut self, request: &str, now: Instant) -> bool {
        self.expire(now);
        if self.ids.contains_key(request) {
            return false;
        }
        while self.order.len() >= MAX_RECENT_FINALS {
            self.pop();
        }
        let id: Arc<str> = request.into();
        self.ids.insert(id.clone(), now);
        self.order.push_back((now, id));
        true
    }

    /// Whether `request`'s final was delivered here.
    pub fn finished(&self, request: &str) -> bool {
        self.ids.contains_key(request)
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= FINALS_MEMORY)
        {
            self.pop();
        }
    }

    fn pop(&mut self) {
        if let Some((_, id)) = self.order.pop_front() {
            self.ids.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_final_is_delivered_once_and_forgotten_after_the_stream_would_drop_it() {
        let t = Instant::now();
        let mut f = RecentFinals::default();
        assert!(f.first("r1", t));
        assert!(!f.first("r1", t + Duration::from_secs(1)));
        assert!(f.finished("r1"));
        assert!(!f.finished("r2"));
        assert!(f.first("r2", t + Duration::from_secs(2)));
        // After the memory, the stream no longer holds it either.
        assert!(f.first("r1", t + FINALS_MEMORY + Duration::from_secs(1)));
        assert_eq!(f.len(), 2);
    }

    #[test]
    fn memory_is_bounded() {
        let t = Instant::now();
        let mut f = RecentFinals::default();
        for i in 0..MAX_RECENT_FINALS + 10 {
            assert!(f.first(&i.to_string(), t));
        }
        assert_eq!(f.len(), MAX_RECENT_FINALS);
        assert!(!f.finished("0"), "the oldest went first");
        assert!(f.finished(&(MAX_RECENT_FINALS + 9).to_string()));
    }
}
