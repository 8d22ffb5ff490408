//! `chat.cancel`: every worker hears every cancel (`sb.chat.cancel`, core NATS) and
//! stops the stream if it holds that request for that user. A cancel for a request
//! this worker does not hold yet is remembered for a while (bounded), so a request
//! pulled just after its cancel went by is stopped at once too.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use shared::bus::SharedBus;
use shared::protocol::ChatCancel;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Cancels remembered for requests not (yet) held here: enough for every cancel of
/// several minutes at a busy cluster's rate, bounded so a flood cannot grow it.
pub const RECENT_CAPACITY: usize = 4096;
/// A request not pulled within this long after its cancel is not coming.
pub const RECENT_TTL: Duration = Duration::from_secs(600);
/// Pause before re-subscribing after the subscription ended.
pub const RESUBSCRIBE_DELAY: Duration = Duration::from_secs(1);

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// A stream of this worker was stopped.
    Stopped,
    /// The request is held here for another user: ignored.
    WrongUser,
    /// Not held here: remembered.
    Remembered,
}

struct Active {
    user_id: String,
    generation: u64,
    token: CancellationToken,
}

#[derive(Default)]
struct Inner {
    active: HashMap<String, Active>,
    recent: HashMap<String, (String, Instant)>,
    order: VecDeque<(String, Instant)>,
    next_generation: u64,
}

/// The requests this worker holds, by request id.
#[derive(Default, Clone)]
pub struct CancelRegistry {
    inner: Arc<Mutex<Inner>>,
}

/// A held request; dropping it forgets the request.
pub struct Registration {
    registry: CancelRegistry,
    request_id: String,
    generation: u64,
    pub token: CancellationToken,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut inner = self.registry.lock();
        if inner
            .active
            .get(&self.request_id)
            .is_some_and(|a| a.generation == self.generation)
        {
            inner.active.remove(&self.request_id);
        }
    }
}

impl CancelRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds a request; its token is already cancelled if a cancel came first.
    pub fn register(&self, request_id: &str, user_id: &str) -> Registration {
        let token = CancellationToken::new();
        let mut inner = self.lock();
        if inner
            .recent
            .get(request_id)
            .is_some_and(|(u, at)| u == user_id && at.elapsed() < RECENT_TTL)
        {
            token.cancel();
        }
        inner.next_generation += 1;
        let generation = inner.next_generation;
        inner.active.insert(
            request_id.to_owned(),
            Active {
                user_id: user_id.to_owned(),
                generation,
                token: token.clone(),
            },
        );
        Registration {
            registry: self.clone(),
            request_id: request_id.to_owned(),
            generation,
            token,
        }
    }

    /// Applies a cancel.
    pub fn cancel(&self, c: &ChatCancel) -> CancelOutcome {
        let mut inner = self.lock();
        if let Some(a) = inner.active.get(&c.request_id) {
            if a.user_id != c.user_id {
                return CancelOutcome::WrongUser;
            }
            a.token.cancel();
            return CancelOutcome::Stopped;
        }
        let now = Instant::now();
        while inner.order.len() >= RECENT_CAPACITY
            || inner
                .order
                .front()
                .is_some_and(|(_, at)| now.duration_since(*at) >= RECENT_TTL)
        {
            let Some((id, at)) = inner.order.pop_front() else {
                break;
            };
            if inner.recent.get(&id).is_some_and(|(_, t)| *t == at) {
                inner.recent.remove(&id);
            }
        }
        inner
            .recent
            .insert(c.request_id.clone(), (c.user_id.clone(), now));
        inner.order.push_back((c.request_id.clone(), now));
        CancelOutcome::Remembered
    }

    /// Requests held now.
    pub fn len(&self) -> usize {
        self.lock().active.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Applies cancels from every gateway until `stop`.
pub async fn listen(
    bus: SharedBus,
    subject: String,
    registry: CancelRegistry,
    stop: CancellationToken,
) {
    loop {
        let mut sub = match bus.subscribe(subject.clone(), None).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to chat cancels");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(RESUBSCRIBE_DELAY) => continue,
                }
            }
        };
        loop {
            let msg = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                m = sub.next() => m,
            };
            let Some(msg) = msg else { break };
            match serde_json::from_slice::<ChatCancel>(&msg.payload) {
                Ok(c) => {
                    let outcome = registry.cancel(&c);
                    if outcome == CancelOutcome::WrongUser {
                        tracing::warn!("chat cancel from a user who does not own the request");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "malformed chat cancel"),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RESUBSCRIBE_DELAY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cancel(r: &str, u: &str) -> ChatCancel {
        ChatCancel {
            request_id: r.into(),
            user_id: u.into(),
        }
    }

    #[test]
    fn cancels_only_the_owners_request() {
        let reg = CancelRegistry::default();
        let h = reg.register("r1", "alice");
        assert_eq!(
            reg.cancel(&cancel("r1", "mallory")),
            CancelOutcome::WrongUser
        );
        assert!(!h.token.is_cancelled());
        assert_eq!(reg.cancel(&cancel("r1", "alice")), CancelOutcome::Stopped);
        assert!(h.token.is_cancelled());
        drop(h);
        assert!(reg.is_empty());
    }

    #[test]
    fn an_early_cancel_is_remembered_for_the_same_user() {
        let reg = CancelRegistry::default();
        assert_eq!(reg.cancel(&cancel("r2", "bob")), CancelOutcome::Remembered);
        assert!(reg.register("r2", "bob").token.is_cancelled());
        assert!(!reg.register("r2", "eve").token.is_cancelled());
        assert!(!reg.register("r3", "bob").token.is_cancelled());
    }

    #[test]
    fn remembered_cancels_are_bounded() {
        let reg = CancelRegistry::default();
        for i in 0..RECENT_CAPACITY + 10 {
            reg.cancel(&cancel(&format!("r{i}"), "u"));
        }
        let inner = reg.lock();
        assert!(inner.recent.len() <= RECENT_CAPACITY);
        assert!(inner.order.len() <= RECENT_CAPACITY);
    }

    #[test]
    fn a_stale_registration_does_not_remove_a_newer_one() {
        let reg = CancelRegistry::default();
        let old = reg.register("r", "u");
        let new = reg.register("r", "u");
        drop(old);
        assert_eq!(reg.cancel(&cancel("r", "u")), CancelOutcome::Stopped);
        assert!(new.token.is_cancelled());
    }
}
