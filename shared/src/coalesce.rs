//! Request coalescing ("single flight"): concurrent callers asking for the same key
//! share one in-flight computation and all get its result. Used for user-context
//! fetches, so a burst of connects or refreshes of one user costs one call.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

/// In-flight computations by key. The map holds only keys being computed right now,
/// so it is bounded by the number of concurrent callers.
#[derive(Debug)]
pub struct Coalescer<K, V> {
    inflight: Mutex<HashMap<K, Arc<OnceCell<V>>>>,
}

impl<K, V> Default for Coalescer<K, V> {
    fn default() -> Self {
        Coalescer {
            inflight: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Coalescer<K, V> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Arc<OnceCell<V>>>> {
        // A panic while holding it cannot leave the map half-updated.
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` for `key` unless a computation for it is already in flight, in which
    /// case this waits for that one's result. If the caller running `f` is cancelled,
    /// a waiting caller runs its own `f` instead, so nobody waits on nothing.
    pub async fn run<F, Fut>(&self, key: K, f: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let cell = self.lock().entry(key.clone()).or_default().clone();
        let v = cell.get_or_init(f).await.clone();
        // Forget the result at once: later callers compute afresh. No await between
        // the result and this removal, so a finished entry is never left behind.
        let mut map = self.lock();
        if map.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            map.remove(&key);
        }
        v
    }

    /// Keys in flight (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_computation() {
        let c = Arc::new(Coalescer::<&str, usize>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (c, runs) = (c.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                c.run("u", || async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    runs.fetch_add(1, Ordering::SeqCst) + 1
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 1);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(c.is_empty(), "nothing left in flight");
        // The next call computes afresh.
        assert_eq!(c.run("u", || async { 7 }).await, 7);
    }
}
