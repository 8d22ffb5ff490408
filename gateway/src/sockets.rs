//! The node's upgraded sockets: the per-node cap (`SB_MAX_CONNECTIONS`, counted from
//! the upgrade, authenticated or not) and the registry the drain reaches them all
//! through, since hyper forgets a socket once it is upgraded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::hub::Closer;

/// Every upgraded socket of the node; cheap to share (`Arc<Sockets>`).
pub struct Sockets {
    max: u64,
    open: AtomicU64,
    next: AtomicU64,
    closers: Mutex<HashMap<u64, Arc<Closer>>>,
}

/// Keeps a socket in the registry, and its slot taken, while alive.
pub struct SocketGuard {
    sockets: Arc<Sockets>,
    id: u64,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.sockets.lock().remove(&self.id);
        self.sockets.release();
    }
}

impl Sockets {
    pub fn new(max: u64) -> Arc<Sockets> {
        Arc::new(Sockets {
            max,
            open: AtomicU64::new(0),
            next: AtomicU64::new(1),
            closers: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Closer>>> {
        self.closers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves a slot against the cap; `false` when the node is full.
    pub fn reserve(&self) -> bool {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Takes a slot past the cap: a refused socket still upgrades, so its client
    /// learns 1013 and backs off, and is released like any other.
    pub fn reserve_over_cap(&self) {
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    /// Releases a slot reserved by [`Sockets::reserve`] that never became a socket.
    pub fn release(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Registers an upgraded socket on its reserved slot; the guard gives both back.
    pub fn track(self: &Arc<Self>, closer: Arc<Closer>) -> SocketGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, closer);
        SocketGuard {
            sockets: self.clone(),
            id,
        }
    }

    /// Upgraded sockets plus reservations in progress.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Closers of every live socket, for the drain.
    pub fn all(&self) -> Vec<Arc<Closer>> {
        self.lock().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_counts_reservations_and_guards_give_them_back() {
        let s = Sockets::new(2);
        assert!(s.reserve() && s.reserve());
        assert!(!s.reserve(), "full");
        let g = s.track(Arc::new(Closer::default()));
        assert_eq!((s.open(), s.all().len()), (2, 1));
        drop(g);
        assert_eq!((s.open(), s.all().len()), (1, 0));
        s.release();
        assert_eq!(s.open(), 0);
        assert!(s.reserve());
    }
}
