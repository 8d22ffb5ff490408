//! A node's life from start to exit: the shutdown signal that starts the drain, the
//! stop that ends the background, the trackers both wait on, and the state
//! readiness reports (draining, Redis reachable).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use shared::scaffold::Scaffold;
use shared::store::now_ms;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The node's lifecycle; one per node.
pub struct Lifecycle {
    /// Set once the drain started: readiness fails, nothing new is accepted.
    pub draining: AtomicBool,
    /// The scaffold's Redis health, for readiness.
    pub redis_up: Arc<AtomicBool>,
    /// Unix milliseconds.
    pub started_at: u64,
    /// Cancelled on SIGTERM: starts the drain (accepting stops, readiness fails).
    pub shutdown: CancellationToken,
    /// The scaffold's: cancelled after the drain, ends background loops and
    /// subscriptions.
    pub stop: CancellationToken,
    /// HTTP and WebSocket connection tasks, awaited during the drain.
    pub tasks: TaskTracker,
    /// The scaffold's background tracker: loops and subscription tasks, awaited last.
    pub background: TaskTracker,
}

impl Lifecycle {
    pub fn new(shutdown: CancellationToken, scaffold: &Scaffold) -> Lifecycle {
        Lifecycle {
            draining: AtomicBool::new(false),
            redis_up: scaffold.redis_up.clone(),
            started_at: now_ms(),
            shutdown,
            stop: scaffold.stop.clone(),
            tasks: TaskTracker::new(),
            background: scaffold.background.clone(),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn redis_up(&self) -> bool {
        self.redis_up.load(Ordering::Acquire)
    }
}
