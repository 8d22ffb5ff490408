//! The service scaffold both binaries run in between start-up and exit: the metrics
//! handle and build gauge, the admin port, the Redis/NATS health loop behind
//! readiness, the tracker of background tasks, and the shutdown that stops them.
//! Each binary adds only what is its own (the gateway's drain, the worker's consumer).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Health;
use crate::bus::Bus;
use crate::store::SharedStore;

/// How often readiness re-checks Redis and refreshes the dependency gauges: fast
/// enough that `/readyz` follows an outage within a couple of seconds.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// Time allowed to flush NATS, clean up and stop background loops after the drain.
pub const SHUTDOWN_CLEANUP_TIMEOUT: Duration = Duration::from_secs(3);

/// What one running binary shares with its background tasks.
pub struct Scaffold {
    /// `gateway` or `worker`: the `binary` label and the name in the log lines.
    binary: &'static str,
    pub metrics: PrometheusHandle,
    /// Cancelled at the end of the shutdown (or when the scaffold is dropped): ends
    /// background loops and subscriptions.
    pub stop: CancellationToken,
    /// Background loops, awaited last.
    pub background: TaskTracker,
    /// The last Redis check succeeded; shared with the binary's readiness.
    pub redis_up: Arc<AtomicBool>,
    /// The scaffold's own tasks, aborted if the scaffold is dropped before
    /// [`Scaffold::finish`]: dropping a binary's `run` is then like a crash.
    owned: Mutex<Vec<AbortHandle>>,
}

impl Scaffold {
    /// Sets up metrics and the build gauge for `binary`.
    pub fn new(binary: &'static str) -> Scaffold {
        let metrics = crate::telemetry::metrics_handle();
        metrics::gauge!(crate::metrics::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"))
            .set(1.0);
        Scaffold {
            binary,
            metrics,
            stop: CancellationToken::new(),
            background: TaskTracker::new(),
            redis_up: Arc::new(AtomicBool::new(false)),
            owned: Mutex::new(Vec::new()),
        }
    }

    pub fn redis_up(&self) -> bool {
        self.redis_up.load(Ordering::Acquire)
    }

    /// Runs `task` as a background task: tracked, and aborted with the scaffold.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = self.background.spawn(task).abort_handle();
        self.owned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
    }

    /// Serves `/healthz`, `/readyz` and `/metrics` until [`Scaffold::stop`]; the
    /// metric gauges' upkeep runs alongside.
    pub fn serve_admin(&self, listener: TcpListener, health: Arc<dyn Health>) {
        self.spawn(crate::admin::serve(
            listener,
            health,
            self.metrics.clone(),
            self.stop.clone(),
        ));
        self.spawn(crate::telemetry::upkeep(
            self.metrics.clone(),
            self.stop.clone(),
        ));
    }

    /// Follows Redis (a PING every [`HEALTH_INTERVAL`]) and NATS (`nats_connected`)
    /// for readiness and the gauges, until [`Scaffold::stop`].
    pub fn watch_health(
        &self,
        store: SharedStore,
        nats_connected: impl Fn() -> bool + Send + 'static,
    ) {
        self.spawn(health_loop(
            self.binary,
            store,
            nats_connected,
            self.redis_up.clone(),
            self.stop.clone(),
        ));
    }

    /// Ends the background: stops the loops, then within
    /// [`SHUTDOWN_CLEANUP_TIMEOUT`] runs `cleanup`, flushes NATS and waits for the
    /// loops; what is still running after that is aborted.
    pub async fn finish(self, bus: &dyn Bus, cleanup: impl Future<Output = ()>) {
        self.stop.cancel();
        self.background.close();
        let _ = tokio::time::timeout(SHUTDOWN_CLEANUP_TIMEOUT, async {
            cleanup.await;
            let _ = bus.flush(SHUTDOWN_CLEANUP_TIMEOUT).await;
            self.background.wait().await;
        })
        .await;
        tracing::info!("{} stopped", self.binary);
    }
}

impl Drop for Scaffold {
    fn drop(&mut self) {
        self.stop.cancel();
        for task in self
            .owned
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

async fn health_loop(
    binary: &'static str,
    store: SharedStore,
    nats_connected: impl Fn() -> bool,
    redis_up: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(HEALTH_INTERVAL);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let up = store.ping().await.is_ok();
        match (redis_up.swap(up, Ordering::AcqRel), up) {
            (true, false) => tracing::warn!("redis unreachable"),
            (false, true) => tracing::info!("redis reachable"),
            _ => {}
        }
        metrics::gauge!(crate::metrics::REDIS_UP).set(if up { 1.0 } else { 0.0 });
        metrics::gauge!(crate::metrics::NATS_CONNECTED, "binary" => binary)
            .set(if nats_connected() { 1.0 } else { 0.0 });
    }
}
