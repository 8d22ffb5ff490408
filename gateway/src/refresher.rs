//! The queue of users whose context is to be fetched again (see `revalidate`): its
//! own module because the node owns it while `revalidate`'s loops own the node.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Users waiting for a re-check on one node; more are dropped (counted), and the
/// next period picks them up. Far above what a tick or a burst of API calls adds.
pub const MAX_QUEUED_USERS: usize = 100_000;
/// Waiting users in order, and the same users as a set (to queue each once).
type Queue = (VecDeque<Arc<str>>, HashSet<Arc<str>>);

/// Users waiting for a fresh context fetch, each at most once.
#[derive(Debug, Default)]
pub struct Refresher {
    queue: Mutex<Queue>,
    /// Woken on every push; the fetch loop (`revalidate::run`) waits on it.
    pub(crate) ready: Notify,
}

impl Refresher {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding it cannot leave the queue half-updated.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks for a fresh fetch of `user`'s context. A user already waiting is not
    /// queued twice (the pending fetch will see the same backend state).
    pub fn push(&self, user: Arc<str>) {
        {
            let mut q = self.lock();
            if q.1.contains(&user) {
                return;
            }
            if q.0.len() >= MAX_QUEUED_USERS {
                metrics::counter!(shared::metrics::CONTEXT_REVALIDATIONS, "result" => "dropped")
                    .increment(1);
                return;
            }
            q.1.insert(user.clone());
            q.0.push_back(user);
        }
        self.ready.notify_one();
    }

    /// The longest-waiting user, taken off the queue.
    pub(crate) fn pop(&self) -> Option<Arc<str>> {
        let mut q = self.lock();
        let user = q.0.pop_front()?;
        q.1.remove(&user);
        Some(user)
    }

    pub fn len(&self) -> usize {
        self.lock().0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
