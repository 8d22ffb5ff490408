//! What a worker's tasks share: the consumer, the request tasks and the RPC handlers
//! all hold the same [`Worker`]. Apart from `lib.rs`, which builds it and starts the
//! tasks, so that the tasks' modules need nothing from the crate root.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use shared::bus::SharedBus;
use shared::store::SharedStore;
use shared::subjects::Subjects;

use crate::backend::BackendClient;
use crate::breaker::Breaker;
use crate::cancel::CancelRegistry;
use crate::config::Config;
use crate::llm::LlmClient;

/// A publish (chunk, RPC reply) that cannot be queued within this long fails; acks
/// have the bus's own bound (`shared::bus::nats::ACK_TIMEOUT`, the same).
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
/// State shared by the consumer, the request tasks and the RPC handlers.
pub struct Worker {
    pub config: Config,
    /// NATS in production, the memory bus in in-process tests.
    pub bus: SharedBus,
    pub store: SharedStore,
    pub subjects: Subjects,
    pub llm: LlmClient,
    /// `None`: no team backend configured.
    pub backend: Option<BackendClient>,
    pub breaker: Breaker,
    pub cancels: CancelRegistry,
    /// The chat consumer is set up and pulling.
    pub consumer_up: AtomicBool,
    /// The last Redis check succeeded (the scaffold's health loop).
    pub redis_up: Arc<AtomicBool>,
    /// SIGTERM received: no new work.
    pub shutting_down: AtomicBool,
    /// Connection losses, and echoes of replies that ended across one.
    pub link: crate::link::Link,
    /// What this worker last wrote of each user's context (see `crate::context::cache::Written`).
    pub context_written: crate::context::cache::Written,
    /// Recent fresh answers and in-flight backend calls per user (see `context`).
    pub context_shared: crate::context::cache::Shared,
    /// PDF text extraction, in bounded child processes.
    pub pdf: crate::pdf::PdfReader,
}

impl Worker {
    pub fn bus_connected(&self) -> bool {
        self.bus.connected()
    }

    /// Ready for work: the bus connected, Redis answering, consumer pulling, not stopping.
    pub fn is_ready(&self) -> bool {
        !self.shutting_down.load(Ordering::Acquire)
            && self.bus_connected()
            && self.redis_up.load(Ordering::Acquire)
            && self.consumer_up.load(Ordering::Acquire)
    }
}

impl shared::admin::Health for Worker {
    fn ready(&self) -> bool {
        self.is_ready()
    }

    fn readiness(&self) -> serde_json::Value {
        serde_json::json!({
            "ready": self.is_ready(),
            "shutting_down": self.shutting_down.load(Ordering::Acquire),
            "nats": self.bus_connected(),
            "redis": self.redis_up.load(Ordering::Acquire),
            "consumer": self.consumer_up.load(Ordering::Acquire),
            "in_flight": self.cancels.len(),
            "echoes_pending": self.link.pending(),
            "breaker": self.breaker.state().as_str(),
            "node": self.config.cluster.node_id,
        })
    }
}
