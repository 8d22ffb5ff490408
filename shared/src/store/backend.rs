//! The Redis connection behind the store: one server through `redis`'s reconnecting
//! `ConnectionManager`, or a Redis Cluster through the crate's cluster client, which
//! follows MOVED/ASK redirections, refreshes the slot map after a slot migration or a
//! replica promotion, and reconnects per node. Nothing here routes by hand.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use tokio::sync::OnceCell;

use super::error::StoreError;

/// Connect timeout: a healthy Redis on the same network answers in milliseconds;
/// two seconds keeps auth latency bounded when it is down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Command timeout: longer than any command we send takes on a healthy server (the
/// crate's 500 ms default trips on a loaded Redis), short enough to fail fast.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnect backoff ceiling after Redis went away.
pub const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(2);
/// Redirections and reconnects the cluster client tries per command: a failover
/// (replica promotion after `cluster-node-timeout`) takes a few seconds, and the
/// operation timeout bounds the whole anyway.
const CLUSTER_RETRIES: u32 = 6;
/// Single-slot pipelines of one batch in flight at once on a cluster: enough to
/// keep every primary busy, few enough not to queue far behind one slow node.
const CLUSTER_BATCH_CONCURRENCY: usize = 64;
/// Items per pipeline on a single server: amortises round trips without stalling the
/// multiplexed connection for other commands.
const SINGLE_BATCH: usize = 512;

/// Where the store's data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One Redis server (`redis://`, `rediss://`, `unix://`).
    Single(String),
    /// A Redis Cluster, reached through any of these seed nodes.
    Cluster(Vec<String>),
}

/// A connection of either kind; clones share one multiplexed connection.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Opens the connection once, on first use, and hands out clones.
pub(crate) struct Backend {
    target: Target,
    /// PEM roots for `rediss://` (`SB_REDIS_TLS_CA`); `None` trusts the system's.
    tls_ca: Option<Vec<u8>>,
    conn: OnceCell<Conn>,
}

fn certs(ca: &[u8]) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(ca.to_vec()),
    }
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // URLs may carry a password: never print them.
        let kind = match &self.target {
            Target::Single(_) => "single",
            Target::Cluster(_) => "cluster",
        };
        f.debug_struct("Backend").field("kind", &kind).finish()
    }
}

impl Backend {
    /// Checks the URLs; does not connect.
    pub(crate) fn new(
        target: Target,
        tls_ca: Option<Vec<u8>>,
    ) -> Result<Arc<Backend>, redis::RedisError> {
        let backend = Backend {
            target,
            tls_ca,
            conn: OnceCell::new(),
        };
        match &backend.target {
            Target::Single(url) => {
                backend.client(url)?;
            }
            Target::Cluster(seeds) => {
                backend.cluster_builder(seeds).build()?;
            }
        }
        Ok(Arc::new(backend))
    }

    fn client(&self, url: &str) -> Result<redis::Client, redis::RedisError> {
        match &self.tls_ca {
            Some(ca) => redis::Client::build_with_tls(url, certs(ca)),
            None => redis::Client::open(url),
        }
    }

    fn cluster_builder(&self, seeds: &[String]) -> ClusterClientBuilder {
        let b = ClusterClientBuilder::new(seeds.iter().map(String::as_str))
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .retries(CLUSTER_RETRIES)
            .max_retry_wait(RECONNECT_MAX_DELAY.as_millis() as u64);
        match &self.tls_ca {
            Some(ca) => b.certs(certs(ca)),
            None => b,
        }
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    /// The shared connection. While Redis is down each caller waits at most
    /// [`CONNECT_TIMEOUT`]; initialisation is serialised, so an outage is not
    /// answered with a storm of connection attempts.
    pub(crate) async fn conn(&self) -> Result<Conn, StoreError> {
        let c = self
            .conn
            .get_or_try_init(|| async {
                let open = async {
                    match &self.target {
                        Target::Single(url) => {
                            let config = ConnectionManagerConfig::new()
                                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                                .set_response_timeout(Some(RESPONSE_TIMEOUT))
                                .set_max_delay(RECONNECT_MAX_DELAY)
                                .set_number_of_retries(usize::MAX);
                            let client = self.client(url)?;
                            ConnectionManager::new_with_config(client, config)
                                .await
                                .map(Conn::Single)
                        }
                        Target::Cluster(seeds) => {
                            let client =
                                ClusterClientBuilder::new(seeds.iter().map(String::as_str))
                                    .connection_timeout(CONNECT_TIMEOUT)
                                    .response_timeout(RESPONSE_TIMEOUT)
                                    .retries(CLUSTER_RETRIES)
                                    .max_retry_wait(RECONNECT_MAX_DELAY.as_millis() as u64)
                                    .build()?;
                            client.get_async_connection().await.map(Conn::Cluster)
                        }
                    }
                };
                // The cluster client's first connect can hang on an unreachable seed
                // (redis-rs#1953): the timeout is ours.
                match tokio::time::timeout(CONNECT_TIMEOUT + RESPONSE_TIMEOUT, open).await {
                    Ok(r) => r.map_err(StoreError::from),
                    Err(_) => Err(StoreError::Timeout(CONNECT_TIMEOUT)),
                }
            })
            .await?;
        Ok(c.clone())
    }

    /// Runs one pipeline per item group, where each group's commands touch one slot
    /// (one user, one channel): on one server they share pipelines of
    /// [`SINGLE_BATCH`] groups; on a cluster each group is its own pipeline, many in
    /// flight, so no pipeline ever crosses slots.
    pub(crate) async fn batch<T>(
        &self,
        items: &[T],
        add: impl Fn(&mut Pipeline, &T),
    ) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        match &c {
            Conn::Single(_) => {
                for chunk in items.chunks(SINGLE_BATCH) {
                    let mut p = redis::pipe();
                    for item in chunk {
                        add(&mut p, item);
                    }
                    let _: () = p.query_async(&mut c).await?;
                }
                Ok(())
            }
            Conn::Cluster(_) => {
                let pipes: Vec<Pipeline> = items
                    .iter()
                    .map(|item| {
                        let mut p = redis::pipe();
                        add(&mut p, item);
                        p
                    })
                    .collect();
                let mut results = futures_util::stream::iter(pipes)
                    .map(|p| {
                        let mut c = c.clone();
                        async move { p.query_async::<()>(&mut c).await }
                    })
                    .buffer_unordered(CLUSTER_BATCH_CONCURRENCY);
                let mut first_error = None;
                while let Some(r) = results.next().await {
                    if let Err(e) = r {
                        first_error.get_or_insert(e);
                    }
                }
                match first_error {
                    Some(e) => Err(e.into()),
                    None => Ok(()),
                }
            }
        }
    }

    /// Runs one single-key command per item and returns the replies in item order:
    /// one pipeline on a single server, concurrent commands on a cluster (the keys
    /// may live on different slots).
    pub(crate) async fn query_each<T, R: redis::FromRedisValue>(
        &self,
        items: &[T],
        cmd: impl Fn(&T) -> Cmd,
    ) -> Result<Vec<R>, StoreError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn().await?;
        match &c {
            Conn::Single(_) => {
                let mut p = redis::pipe();
                for item in items {
                    p.add_command(cmd(item));
                }
                Ok(p.query_async(&mut c).await?)
            }
            Conn::Cluster(_) => {
                let replies: Vec<Result<R, redis::RedisError>> =
                    futures_util::stream::iter(items.iter().map(&cmd))
                        .map(|cmd| {
                            let mut c = c.clone();
                            async move { cmd.query_async::<R>(&mut c).await }
                        })
                        .buffered(CLUSTER_BATCH_CONCURRENCY)
                        .collect()
                        .await;
                replies
                    .into_iter()
                    .collect::<Result<Vec<R>, _>>()
                    .map_err(StoreError::from)
            }
        }
    }
}
