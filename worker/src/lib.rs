//! Switchboard worker: consumes chat requests from JetStream and streams the LLM's
//! replies to users over NATS, records history in Redis, and answers user-context
//! RPCs from the team backend. `main.rs` only parses config and calls [`run`]; tests
//! run the real thing in-process the same way.
#![forbid(unsafe_code)]

pub mod attachments;
pub mod backend;
pub mod backlog;
pub mod breaker;
pub mod cancel;
pub mod config;
pub mod consume;
pub mod context;
pub mod error;
pub mod history;
pub mod link;
pub mod llm;
pub mod pdf;
pub mod reply;
pub mod request;
pub mod state;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use shared::keys::Keys;
use shared::store::SessionStore;
use shared::subjects::Subjects;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::{Config, RawConfig};
pub use state::{PUBLISH_TIMEOUT, Worker};

use backend::BackendClient;
use breaker::Breaker;
use cancel::CancelRegistry;
use llm::LlmClient;

/// NATS connect attempt timeout; reconnects go on forever in the background.
pub const NATS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// NATS keepalive: detects a dead server within two intervals.
pub const NATS_PING_INTERVAL: Duration = Duration::from_secs(10);
/// Messages buffered per subscription (cancels, user-context RPCs, pull batches)
/// before the client drops them: far above what a worker receives between polls.
pub const NATS_SUBSCRIPTION_CAPACITY: usize = 4096;
/// Pending NATS commands before publishers wait: bounded, see crates.md section 3.
pub const NATS_CLIENT_CAPACITY: usize = 8192;
/// How often readiness re-checks Redis and refreshes the dependency gauges.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// Time allowed to flush NATS and stop background loops after the drain.
pub const SHUTDOWN_CLEANUP_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("SB_REDIS_URL: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("SB_NATS_URL: {0}")]
    Nats(#[from] async_nats::ConnectError),
    #[error("{0}")]
    NatsSetup(#[from] shared::nats::NatsSetupError),
    #[error("SB_LLM_BASE_URL: {0}")]
    Llm(#[from] llm::BuildError),
    #[error("SB_BACKEND_URL: {0}")]
    Backend(String),
}

/// Runs a worker until `shutdown` is cancelled, then stops pulling, lets in-flight
/// requests finish within the grace period, and returns. Dropping (aborting) the
/// returned future stops everything at once, like a crash: un-acked requests are
/// redelivered to other workers after the ack wait.
pub async fn run(
    admin: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let metrics = shared::telemetry::metrics_handle();
    let store = SessionStore::open_tls(
        shared::config::redis_target(&config.redis_url, config.redis_cluster),
        config.security.redis_tls_ca.clone(),
        Keys::new(&config.prefix),
    )?;
    let llm = LlmClient::new(&config.llm)?;
    let backend = BackendClient::new(&config.backend).map_err(StartError::Backend)?;
    let link = link::Link::default();
    let on_event = link.clone();
    let nats = shared::nats::connect_options(
        format!("worker-{}", config.node_id),
        &config.nats_servers,
        &config.security,
    )
    .await?
    .event_callback(move |event| {
        on_event.on_event(&event);
        async {}
    })
    .retry_on_initial_connect()
    .max_reconnects(None)
    .connection_timeout(NATS_CONNECT_TIMEOUT)
    .ping_interval(NATS_PING_INTERVAL)
    .subscription_capacity(NATS_SUBSCRIPTION_CAPACITY)
    .client_capacity(NATS_CLIENT_CAPACITY)
    .connect(config.nats_servers.clone())
    .await?;
    let js = async_nats::jetstream::new(nats.clone());
    tracing::info!(config = %config.summary(), "worker starting");
    if backend.is_none() {
        tracing::info!("no team backend configured (SB_BACKEND_URL): users have no teams or tasks");
    }
    metrics::gauge!(shared::metrics::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);

    let pdf = pdf::PdfReader::new(config.pdf_extractor.clone());
    let worker = Arc::new(Worker {
        pdf,
        subjects: Subjects::new(&config.prefix),
        breaker: Breaker::new(
            config.backend.breaker_failures,
            config.backend.breaker_cooldown,
        ),
        config,
        nats,
        js,
        store,
        llm,
        backend,
        cancels: CancelRegistry::default(),
        consumer_up: AtomicBool::new(false),
        redis_up: AtomicBool::new(false),
        shutting_down: AtomicBool::new(false),
        link,
        context_written: context::Written::default(),
        context_shared: context::Shared::default(),
    });

    // Owned here, so aborting `run` aborts all of it.
    let stop = CancellationToken::new();
    let rpc_stop = CancellationToken::new();
    let mut background = JoinSet::new();
    background.spawn(shared::admin::serve(
        admin,
        worker.clone() as Arc<dyn shared::admin::Health>,
        metrics.clone(),
        stop.clone(),
    ));
    background.spawn(shared::telemetry::upkeep(metrics, stop.clone()));
    background.spawn(health_loop(worker.clone(), stop.clone()));
    background.spawn(backlog::poll(worker.clone(), stop.clone()));
    background.spawn(cancel::listen(worker.clone(), stop.clone()));
    background.spawn(context::serve(worker.clone(), rpc_stop.clone()));

    let on_shutdown = async {
        shutdown.cancelled().await;
        worker.shutting_down.store(true, Ordering::Release);
        tracing::info!("shutting down: no new requests; finishing in-flight ones");
        rpc_stop.cancel();
    };
    tokio::join!(consume::run(worker.clone(), shutdown.clone()), on_shutdown);

    stop.cancel();
    worker.link.stop();
    let _ = tokio::time::timeout(SHUTDOWN_CLEANUP_TIMEOUT, async {
        let _ = worker.nats.flush().await;
        while background.join_next().await.is_some() {}
    })
    .await;
    background.abort_all();
    tracing::info!("worker stopped");
    Ok(())
}

/// Follows Redis and NATS health for readiness and the gauges.
async fn health_loop(worker: Arc<Worker>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(HEALTH_INTERVAL);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let up = worker.store.ping().await.is_ok();
        if worker.redis_up.swap(up, Ordering::AcqRel) != up {
            tracing::warn!(up, "redis availability changed");
        }
        metrics::gauge!(shared::metrics::REDIS_UP).set(if up { 1.0 } else { 0.0 });
        metrics::gauge!(shared::metrics::NATS_CONNECTED, "binary" => "worker")
            .set(if worker.nats_connected() { 1.0 } else { 0.0 });
    }
}
