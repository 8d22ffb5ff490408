//! A connection's bounded outbound queue. Unlike a channel, it allocates nothing
//! while empty (an idle connection's queue costs a few words, where tokio's mpsc
//! allocates a 32-slot block up front), and it never blocks a producer: the hub
//! offers, and a full queue is the slow-consumer signal.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

/// Capacity kept after the queue drains; more is released so a burst does not pin
/// memory for the rest of the connection's life.
const KEEP_CAPACITY: usize = 8;

/// Why an item was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferError {
    /// The queue holds `capacity` items: the consumer is too slow.
    Full,
    /// The connection is gone.
    Closed,
}

/// A bounded multi-producer, single-consumer queue.
#[derive(Debug)]
pub struct Outbox<T> {
    state: Mutex<State<T>>,
    ready: Notify,
    capacity: usize,
}

#[derive(Debug)]
struct State<T> {
    items: VecDeque<T>,
    closed: bool,
}

impl<T> Outbox<T> {
    pub fn new(capacity: usize) -> Outbox<T> {
        Outbox {
            state: Mutex::new(State {
                items: VecDeque::new(),
                closed: false,
            }),
            ready: Notify::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an item without waiting.
    pub fn offer(&self, item: T) -> Result<(), OfferError> {
        {
            let mut st = self.lock();
            if st.closed {
                return Err(OfferError::Closed);
            }
            if st.items.len() >= self.capacity {
                return Err(OfferError::Full);
            }
            st.items.push_back(item);
        }
        // A stored permit wakes the consumer even if it is not waiting yet.
        self.ready.notify_one();
        Ok(())
    }

    /// Takes the next item if there is one.
    pub fn try_take(&self) -> Option<T> {
        let mut st = self.lock();
        let item = st.items.pop_front();
        if st.items.is_empty() && st.items.capacity() > KEEP_CAPACITY {
            st.items = VecDeque::new();
        }
        item
    }

    /// Waits for the next item. Cancel-safe: an item is only removed when returned.
    pub async fn take(&self) -> T {
        loop {
            if let Some(item) = self.try_take() {
                return item;
            }
            self.ready.notified().await;
        }
    }

    /// Refuses further items (the connection is closing).
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.items.clear();
    }

    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn bounded_ordered_and_closable() {
        let q = Arc::new(Outbox::new(2));
        assert_eq!(q.offer(1), Ok(()));
        assert_eq!(q.offer(2), Ok(()));
        assert_eq!(q.offer(3), Err(OfferError::Full));
        assert_eq!(q.take().await, 1);
        assert_eq!(q.try_take(), Some(2));
        assert_eq!(q.try_take(), None);
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.take().await });
        tokio::task::yield_now().await;
        q.offer(9).unwrap();
        assert_eq!(waiter.await.unwrap(), 9);
        q.close();
        assert_eq!(q.offer(4), Err(OfferError::Closed));
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn a_wakeup_before_waiting_is_not_lost() {
        let q = Outbox::new(4);
        q.offer(1).unwrap();
        assert_eq!(q.try_take(), Some(1));
        // The permit from that offer is still stored; take() must not return early
        // with nothing, and must see the next item.
        q.offer(2).unwrap();
        assert_eq!(q.take().await, 2);
    }
}
