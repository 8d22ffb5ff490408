//! Switchboard gateway: holds authenticated WebSocket connections, enforces limits,
//! and connects them to the cluster through NATS and Redis. `main.rs` only parses
//! config and calls [`run`]; tests start the real thing on port 0 the same way.
#![forbid(unsafe_code)]

pub mod api;
pub mod channels;
pub mod chat;
pub mod close;
pub mod config;
pub mod contexts;
pub mod control;
pub mod credentials;
pub mod drain;
pub mod error;
pub mod finals;
pub mod headers;
pub mod hub;
pub mod lifecycle;
pub mod limits;
pub mod membership;
pub mod mux;
pub mod node;
pub mod outbox;
pub mod proxy;
pub mod recent_finals;
pub mod refresher;
pub mod revalidate;
pub mod revocations;
pub mod server;
pub mod session;
pub mod sockets;
pub mod transport;

use std::sync::Arc;

use shared::auth::Validator;
use shared::bus::SharedBus;
use shared::bus::nats::NatsBus;
use shared::scaffold::Scaffold;
use shared::store::SharedStore;
use shared::subjects::Subjects;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{Config, RawConfig};
pub use hub::Wire;
use mux::Mux;
use node::Node;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("JWT configuration: {0}")]
    Jwt(#[from] shared::auth::KeyError),
    #[error("SB_REDIS_URL: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    Nats(#[from] shared::nats::NatsStartError),
    #[error("SB_NATS_TLS_CA: {0}")]
    MuxTls(#[from] mux::MuxError),
}

/// The two ports a gateway serves.
pub struct Listeners {
    /// WebSocket and API.
    pub public: TcpListener,
    /// Health, readiness, metrics.
    pub admin: TcpListener,
}

/// The backends a node works with: NATS and Redis in production
/// ([`Backends::connect`]); the in-memory pair in in-process tests, several nodes
/// sharing one.
pub struct Backends {
    pub bus: SharedBus,
    pub store: SharedStore,
    /// How the hub subscribes: the multiplexer on NATS, else per subject on the bus.
    pub wire: Wire,
}

impl Backends {
    /// Connects to the NATS and Redis of the configuration (Redis lazily).
    pub async fn connect(config: &Config) -> Result<Backends, StartError> {
        let store = config.cluster.redis_store()?;
        let nats = shared::nats::connect(
            format!("gateway-{}", config.cluster.node_id),
            &config.cluster.nats_servers,
            &config.cluster.security,
            |options| options.request_timeout(Some(config.user_context_timeout)),
        )
        .await?;
        // The multiplexer speaks `nats://` and `tls://` with URL credentials; `.creds`
        // (nkey signatures) stay with async-nats.
        let mux_servers = match config.cluster.security.nats_creds {
            Some(_) => None,
            None => mux::servers_from(&config.cluster.nats_servers),
        };
        let wire = match mux_servers {
            Some(servers) => {
                let tls = if servers.iter().any(|s| s.tls) {
                    Some(mux::tls_connector(
                        config.cluster.security.nats_tls_ca.as_deref(),
                    )?)
                } else {
                    None
                };
                Wire::Mux(Mux::new(
                    servers,
                    format!("gateway-{}-subs", config.cluster.node_id),
                    tls,
                ))
            }
            None => Wire::Bus,
        };
        let bus = NatsBus::new(
            nats,
            Subjects::new(&config.cluster.prefix),
            config.jetstream_replicas,
        );
        Ok(Backends {
            bus: Arc::new(bus),
            store: Arc::new(store),
            wire,
        })
    }

    /// A node on a given bus and store, such as the in-memory pair
    /// (`shared::bus::memory::MemoryBus`, `shared::store::MemoryStore`) shared by the nodes of
    /// an in-process test; the hub subscribes per subject on the bus.
    pub fn on(bus: SharedBus, store: SharedStore) -> Backends {
        Backends {
            bus,
            store,
            wire: Wire::Bus,
        }
    }
}

/// Runs a gateway node on NATS and Redis until `shutdown` is cancelled, then drains
/// and returns.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    shared::auth::install_crypto_provider();
    let backends = Backends::connect(&config).await?;
    run_on(listeners, config, backends, shutdown).await
}

/// Runs a gateway node on the given backends until `shutdown` is cancelled, then
/// drains and returns.
pub async fn run_on(
    listeners: Listeners,
    config: Config,
    backends: Backends,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    shared::auth::install_crypto_provider();
    let scaffold = Scaffold::new("gateway");
    let validator = Validator::new(&config.jwt)?;
    let drain_window = config.drain;
    tracing::info!(config = %config.summary(), "gateway starting");
    let node = Node::new(
        config,
        validator,
        backends.store,
        backends.bus,
        backends.wire,
        shutdown.clone(),
        &scaffold,
    );
    node.hub.start();
    // Before the first connection: a token is checked against the list in memory.
    node.revocations.sync(&*node.store).await;
    node.spawn_background();
    let n = node.clone();
    node.life
        .background
        .spawn(async move { membership::heartbeat_loop(&n).await });
    let n = node.clone();
    node.life
        .background
        .spawn(async move { membership::refresh_loop(&n).await });
    let n = node.clone();
    node.life.background.spawn(async move {
        n.revocations.sync_loop(&*n.store, &n.life.stop).await;
    });
    let n = node.clone();
    node.life.background.spawn(async move {
        let subject = n.subjects.revocations();
        n.revocations
            .notice_loop(&*n.bus, subject, &n.life.stop)
            .await;
    });
    // The loops that reach into other modules start here, at the top, so that the
    // node's module depends on none of the modules that depend on it.
    let n = node.clone();
    node.life
        .background
        .spawn(async move { channels::presence_loop(&n).await });
    let n = node.clone();
    node.life
        .background
        .spawn(async move { api::publish_rpc_loop(&n).await });
    let n = node.clone();
    node.life
        .background
        .spawn(async move { finals::follow_loop(&n).await });
    node.life.background.spawn(revalidate::run(node.clone()));
    node.life.background.spawn(revalidate::wheel(node.clone()));
    let health = node.clone();
    scaffold.watch_health(node.store.clone(), move || health.nats_connected());
    scaffold.serve_admin(
        listeners.admin,
        node.clone() as Arc<dyn shared::admin::Health>,
    );
    let accept = tokio::spawn(server::accept_loop(node.clone(), listeners.public));

    shutdown.cancelled().await;
    drain::begin(&node);
    let _ = accept.await;
    drain::run(node.clone(), drain_window).await;
    node.life.tasks.close();
    if tokio::time::timeout(drain::FINISH_GRACE, node.life.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain window; closing anyway");
    }
    scaffold
        .finish(&*node.bus, membership::deregister(&node))
        .await;
    Ok(())
}

impl shared::admin::Health for Node {
    fn ready(&self) -> bool {
        self.is_ready()
    }

    fn readiness(&self) -> serde_json::Value {
        serde_json::json!({
            "ready": self.is_ready(),
            "draining": self.is_draining(),
            "nats": self.nats_connected(),
            "redis": self.life.redis_up(),
            "node": self.config.cluster.node_id,
        })
    }
}
