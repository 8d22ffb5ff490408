//! Switchboard worker: consumes chat requests from JetStream and streams the LLM's
//! replies to users over NATS, records history in Redis, and answers user-context
//! RPCs from the team backend. `main.rs` only parses config and calls [`run`]; tests
//! run the real thing in-process the same way, or with [`run_on`] on the in-memory
//! bus and store.
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

use shared::bus::SharedBus;
use shared::bus::nats::{Losses, NatsBus};
use shared::scaffold::Scaffold;
use shared::store::SharedStore;
use shared::subjects::Subjects;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{Config, RawConfig};
pub use state::{PUBLISH_TIMEOUT, Worker};

use backend::BackendClient;
use breaker::Breaker;
use cancel::CancelRegistry;
use llm::LlmClient;

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("SB_REDIS_URL: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    Nats(#[from] shared::nats::NatsStartError),
    #[error("SB_LLM_BASE_URL: {0}")]
    Llm(#[from] llm::BuildError),
    #[error("SB_BACKEND_URL: {0}")]
    Backend(String),
}

/// What a worker runs on: NATS and Redis in production ([`Backends::connect`]); the
/// in-memory pair in in-process tests, shared with the gateways there.
pub struct Backends {
    pub bus: SharedBus,
    pub store: SharedStore,
}

impl Backends {
    /// Connects to the NATS and Redis of the configuration (Redis lazily). The bus
    /// counts the connection's losses, which replies need (see `link`).
    pub async fn connect(config: &Config) -> Result<Backends, StartError> {
        let store = config.cluster.redis_store()?;
        let losses = Losses::default();
        let on_event = losses.clone();
        let nats = shared::nats::connect(
            format!("worker-{}", config.cluster.node_id),
            &config.cluster.nats_servers,
            &config.cluster.security,
            |options| {
                options.event_callback(move |event| {
                    on_event.on_event(&event);
                    async {}
                })
            },
        )
        .await?;
        let bus = NatsBus::new(
            nats,
            Subjects::new(&config.cluster.prefix),
            config.jetstream_replicas,
        )
        .with_losses(losses);
        Ok(Backends {
            bus: Arc::new(bus),
            store: Arc::new(store),
        })
    }

    /// A worker on a given bus and store, such as the in-memory pair
    /// (`shared::bus::memory::MemoryBus`, `shared::store::memory::MemoryStore`).
    pub fn on(bus: SharedBus, store: SharedStore) -> Backends {
        Backends { bus, store }
    }
}

/// Runs a worker on NATS and Redis until `shutdown` is cancelled (see [`run_on`]).
pub async fn run(
    admin: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let backends = Backends::connect(&config).await?;
    run_on(admin, config, backends, shutdown).await
}

/// Runs a worker on the given backends until `shutdown` is cancelled, then stops
/// pulling, lets in-flight requests finish within the grace period, and returns.
/// Dropping (aborting) the returned future stops everything at once, like a crash:
/// un-acked requests are redelivered to other workers after the ack wait.
pub async fn run_on(
    admin: TcpListener,
    config: Config,
    backends: Backends,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let scaffold = Scaffold::new("worker");
    let llm = LlmClient::new(&config.llm)?;
    let backend = BackendClient::new(&config.backend).map_err(StartError::Backend)?;
    tracing::info!(config = %config.summary(), "worker starting");
    if backend.is_none() {
        tracing::info!("no team backend configured (SB_BACKEND_URL): users have no teams or tasks");
    }

    let pdf = pdf::PdfReader::new(config.pdf_extractor.clone());
    let worker = Arc::new(Worker {
        pdf,
        subjects: Subjects::new(&config.cluster.prefix),
        breaker: Breaker::new(
            config.backend.breaker_failures,
            config.backend.breaker_cooldown,
        ),
        config,
        link: link::Link::new(backends.bus.clone()),
        bus: backends.bus,
        store: backends.store,
        llm,
        backend,
        cancels: CancelRegistry::default(),
        consumer_up: AtomicBool::new(false),
        redis_up: scaffold.redis_up.clone(),
        shutting_down: AtomicBool::new(false),
        context_written: context::Written::default(),
        context_shared: context::Shared::default(),
    });

    // Owned here, so aborting `run` aborts all of it (the scaffold aborts its tasks
    // when dropped).
    let stop = scaffold.stop.clone();
    let rpc_stop = stop.child_token();
    scaffold.serve_admin(admin, worker.clone() as Arc<dyn shared::admin::Health>);
    let health = worker.clone();
    scaffold.watch_health(worker.store.clone(), move || health.bus_connected());
    scaffold.spawn(backlog::poll(worker.clone(), stop.clone()));
    scaffold.spawn(cancel::listen(
        worker.bus.clone(),
        worker.subjects.chat_cancel(),
        worker.cancels.clone(),
        stop.clone(),
    ));
    scaffold.spawn(context::serve(worker.clone(), rpc_stop.clone()));

    let on_shutdown = async {
        shutdown.cancelled().await;
        worker.shutting_down.store(true, Ordering::Release);
        tracing::info!("shutting down: no new requests; finishing in-flight ones");
        rpc_stop.cancel();
    };
    tokio::join!(consume::run(worker.clone(), shutdown.clone()), on_shutdown);

    worker.link.stop();
    scaffold.finish(&*worker.bus, async {}).await;
    Ok(())
}
