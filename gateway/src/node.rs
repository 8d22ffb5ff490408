//! The gateway node: the state every connection and endpoint shares (config, JWT
//! validator, NATS, Redis, hub, limits, the socket registry used by the drain) and
//! the node's background loops (heartbeat, connection refresh, presence); the
//! dependency health loop is the scaffold's (`shared::scaffold`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shared::auth::Validator;
use shared::keys::Keys;
use shared::protocol::{UserContext, UserContextRequest};
use shared::scaffold::Scaffold;
use shared::store::{NodeRecord, SessionStore, now_ms};
use shared::subjects::Subjects;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::hub::{Closer, Hub};
use crate::limits::{ConnectLimiter, FailureLimiter};

/// A node missing this many heartbeats is gone (30 s by default, well inside the
/// 90 s promise).
pub const HEARTBEATS_TO_EXPIRE: u32 = 3;
/// The scaffold's readiness interval, here also the pause between subscription
/// retries.
pub use shared::scaffold::HEALTH_INTERVAL;
/// How often idle per-address limiter entries are swept.
pub const LIMITER_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Shared state of one gateway node.
pub struct Node {
    pub config: Config,
    pub validator: Validator,
    pub store: SessionStore,
    pub nats: async_nats::Client,
    pub jetstream: async_nats::jetstream::Context,
    /// Whether the chat stream is known to exist; reset when a publish fails so the
    /// next one re-creates it (JetStream may have lost its store).
    chat_stream_ok: AtomicBool,
    chat_stream_lock: tokio::sync::Mutex<()>,
    pub subjects: Subjects,
    pub hub: Arc<Hub>,
    pub connect_limiter: ConnectLimiter,
    /// Failed API-key attempts per client address (`api::authorize`).
    pub api_key_failures: FailureLimiter,
    /// User-context fetches in flight, by (user, fresh): concurrent connects and
    /// refreshes of one user on this node share one request.
    context_flights: shared::coalesce::Coalescer<(String, bool), UserContext>,
    /// Users whose context is to be fetched again for their live connections.
    pub refresher: crate::refresher::Refresher,
    /// Revoked token ids, kept in memory (see `revocations`).
    pub revocations: crate::revocations::Revocations,
    /// Every upgraded socket (authenticated or not), so the drain can reach them all;
    /// hyper forgets sockets once they are upgraded.
    sockets: Mutex<HashMap<u64, Arc<Closer>>>,
    next_socket: AtomicU64,
    /// Upgraded sockets, authenticated or not (the per-node cap counts these).
    pub open_sockets: AtomicU64,
    pub draining: AtomicBool,
    /// The scaffold's Redis health, for readiness.
    pub redis_up: Arc<AtomicBool>,
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

/// Channels whose last publication is read at once after a resubscription.
const CATCH_UP_CONCURRENCY: usize = 32;

/// Keeps a socket in the drain registry while alive.
pub struct SocketGuard {
    node: Arc<Node>,
    id: u64,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.node.lock_sockets().remove(&self.id);
        self.node.open_sockets.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Node {
    pub fn new(
        config: Config,
        validator: Validator,
        store: SessionStore,
        nats: async_nats::Client,
        wire: crate::hub::Wire,
        shutdown: CancellationToken,
        scaffold: &Scaffold,
    ) -> Arc<Node> {
        let subjects = Subjects::new(&config.cluster.prefix);
        let stop = scaffold.stop.clone();
        let background = scaffold.background.clone();
        let hub = Hub::new(
            nats.clone(),
            wire,
            subjects.clone(),
            background.clone(),
            stop.clone(),
        );
        Arc::new(Node {
            connect_limiter: ConnectLimiter::new(
                config.connect_rate_per_ip,
                config.connect_burst_per_ip,
            ),
            api_key_failures: FailureLimiter::api_key(),
            config,
            validator,
            store,
            revocations: Default::default(),
            context_flights: Default::default(),
            refresher: Default::default(),
            jetstream: async_nats::jetstream::new(nats.clone()),
            chat_stream_ok: AtomicBool::new(false),
            chat_stream_lock: tokio::sync::Mutex::new(()),
            nats,
            subjects,
            hub,
            sockets: Mutex::new(HashMap::new()),
            next_socket: AtomicU64::new(1),
            open_sockets: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            redis_up: scaffold.redis_up.clone(),
            started_at: now_ms(),
            shutdown,
            stop,
            tasks: TaskTracker::new(),
            background,
        })
    }

    pub fn keys(&self) -> &Keys {
        self.store.keys()
    }

    fn lock_sockets(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Closer>>> {
        self.sockets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers an upgraded socket for the drain.
    pub fn track_socket(self: &Arc<Self>, closer: Arc<Closer>) -> SocketGuard {
        let id = self.next_socket.fetch_add(1, Ordering::Relaxed);
        self.lock_sockets().insert(id, closer);
        SocketGuard {
            node: self.clone(),
            id,
        }
    }

    /// Reserves a slot against the per-node cap; `false` when the node is full.
    pub fn reserve_socket(&self) -> bool {
        let max = self.config.max_connections;
        self.open_sockets
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Releases a slot reserved by [`reserve_socket`] that never became a socket.
    pub fn release_socket(&self) {
        self.open_sockets.fetch_sub(1, Ordering::Relaxed);
    }

    /// Closers of every live socket, for the drain.
    pub fn all_sockets(&self) -> Vec<Arc<Closer>> {
        self.lock_sockets().values().cloned().collect()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn nats_connected(&self) -> bool {
        self.nats.connection_state() == async_nats::connection::State::Connected
            && self.hub.wire_connected()
    }

    /// Ready to take connections: not draining, NATS connected, Redis answering.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.nats_connected() && self.redis_up.load(Ordering::Acquire)
    }

    /// Makes sure the chat work-queue stream exists (created or updated once, again
    /// after a failure).
    pub async fn chat_stream_ready(&self) -> Result<(), String> {
        if self.chat_stream_ok.load(Ordering::Acquire) {
            return Ok(());
        }
        let _guard = self.chat_stream_lock.lock().await;
        if self.chat_stream_ok.load(Ordering::Acquire) {
            return Ok(());
        }
        shared::bus::ensure_chat_stream(
            &self.jetstream,
            &self.subjects,
            self.config.jetstream_replicas,
        )
        .await
        .map_err(|e| e.to_string())?;
        self.chat_stream_ok.store(true, Ordering::Release);
        Ok(())
    }

    /// Creates or updates the chat stream at start-up, retrying while NATS or
    /// JetStream is not there yet.
    async fn chat_stream_loop(&self) {
        loop {
            match self.chat_stream_ready().await {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, "chat stream not ready yet"),
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(self.config.heartbeat) => {}
            }
        }
    }

    /// Forgets that the chat stream exists, after a failed publish.
    pub fn chat_stream_failed(&self) {
        self.chat_stream_ok.store(false, Ordering::Release);
    }

    /// Teams and tasks from a worker over NATS; on timeout or no responders, the last
    /// cached context (or nothing), marked degraded. Concurrent calls for the same
    /// user (and `fresh`) share one request. `fresh` asks the worker to call the team
    /// backend even when it holds a recent answer.
    pub async fn user_context(&self, user_id: &str, token: &str, fresh: bool) -> UserContext {
        self.context_flights
            .run((user_id.to_owned(), fresh), || {
                self.fetch_user_context(user_id, token, fresh)
            })
            .await
    }

    async fn fetch_user_context(&self, user_id: &str, token: &str, fresh: bool) -> UserContext {
        let timeout = self.config.user_context_timeout;
        if self.nats_connected() {
            let body = serde_json::to_vec(&UserContextRequest {
                user_id: user_id.to_owned(),
                token: self.config.forward_user_token.then(|| token.to_owned()),
                fresh,
            })
            .unwrap_or_default();
            let req = async_nats::Request::new()
                .payload(body.into())
                .timeout(Some(timeout));
            let reply = tokio::time::timeout(
                timeout + Duration::from_millis(100),
                self.nats
                    .send_request(self.subjects.user_context_rpc(), req),
            )
            .await;
            match reply {
                Ok(Ok(msg)) => match serde_json::from_slice::<UserContext>(&msg.payload) {
                    Ok(ctx) => return ctx,
                    Err(e) => tracing::warn!(error = %e, "malformed user context reply"),
                },
                Ok(Err(e)) => {
                    metrics::counter!(shared::metrics::NATS_ERRORS, "op" => "user_context")
                        .increment(1);
                    tracing::debug!(error = %e, "user context request failed");
                }
                Err(_) => {
                    metrics::counter!(shared::metrics::NATS_ERRORS, "op" => "user_context")
                        .increment(1);
                }
            }
        }
        let cached = match self.store.cached_context(user_id).await {
            Ok(c) => c,
            Err(e) => {
                metrics::counter!(shared::metrics::REDIS_ERRORS, "op" => "cached_context")
                    .increment(1);
                tracing::debug!(error = %e, "cached context unavailable");
                None
            }
        };
        UserContext {
            degraded: true,
            ..cached.unwrap_or_default()
        }
    }

    fn node_record(&self) -> NodeRecord {
        NodeRecord {
            node: self.config.cluster.node_id.clone(),
            connections: self.hub.len() as u64,
            started_at: self.started_at,
            heartbeat_at: now_ms(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    /// Starts the node's background loops; each ends when `shutdown` is cancelled.
    pub fn spawn_background(self: &Arc<Self>) {
        let node = self.clone();
        self.background
            .spawn(async move { node.heartbeat_loop().await });
        let node = self.clone();
        self.background
            .spawn(async move { node.refresh_loop().await });
        let node = self.clone();
        self.background
            .spawn(async move { node.sweep_loop().await });
        let node = self.clone();
        self.background
            .spawn(async move { node.control_loop().await });
        let node = self.clone();
        self.background
            .spawn(async move { node.chat_stream_loop().await });
        let node = self.clone();
        self.background
            .spawn(async move { node.catch_up_loop().await });
        let node = self.clone();
        self.background
            .spawn(async move { node.revocation_sync_loop().await });
        let node = self.clone();
        self.background
            .spawn(async move { node.revocation_notice_loop().await });
        let node = self.clone();
        self.background
            .spawn(async move { node.refresh_context_loop().await });
    }

    /// After the subscription connection came back (a NATS restart or node loss),
    /// hands every channel's last publication to its local subscribers: one that
    /// missed publications made meanwhile then sees the gap and repairs it from
    /// history, even when the channel has gone quiet and no later publication would
    /// have shown it. A subscriber that missed nothing drops it as a duplicate.
    async fn catch_up_loop(&self) {
        use futures_util::StreamExt;
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                _ = self.hub.resubscribed.notified() => {}
            }
            // The server has the subscriptions once it answered a PING sent after
            // them: what is read from Redis after that cannot also be missed live.
            if self.hub.barrier().await.is_err() {
                continue;
            }
            let channels: Vec<shared::protocol::Channel> = self
                .hub
                .channel_counts()
                .into_keys()
                .filter_map(|c| shared::protocol::Channel::parse(&c).ok())
                // A connection's own `user:` channel is mostly a hidden subscription
                // that has not read its position: the last publication would reach
                // the client as news.
                .filter(|c| c.namespace != crate::hub::USER_NAMESPACE)
                .collect();
            let mut tops = futures_util::stream::iter(channels)
                .map(|ch| async move {
                    let top = self.store.channel_top(&ch).await;
                    (ch, top)
                })
                .buffer_unordered(CATCH_UP_CONCURRENCY);
            while let Some((ch, top)) = tokio::select! {
                biased;
                _ = self.stop.cancelled() => None,
                t = tops.next() => t,
            } {
                match top {
                    Ok(Some((at, frame))) => {
                        let headers = crate::mux::Headers {
                            offset: Some(at.offset),
                            epoch: Some(at.epoch),
                            ..Default::default()
                        };
                        self.hub.deliver_to_channel(
                            &ch.to_string().into(),
                            crate::mux::Msg {
                                payload: frame.into(),
                                headers,
                            },
                        );
                    }
                    Ok(None) => {}
                    Err(e) => {
                        metrics::counter!(shared::metrics::REDIS_ERRORS, "op" => "catch_up")
                            .increment(1);
                        tracing::debug!(error = %e, channel = %ch, "channel not caught up");
                    }
                }
            }
        }
    }

    /// Reads the whole revocation list every [`revocations::SYNC_INTERVAL`]: what a
    /// node that missed a NATS notice learns late, it learns within that bound.
    ///
    /// [`revocations::SYNC_INTERVAL`]: crate::revocations::SYNC_INTERVAL
    async fn revocation_sync_loop(&self) {
        let mut tick = tokio::time::interval(crate::revocations::SYNC_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            self.sync_revocations().await;
        }
    }

    /// Reads the revocation list once (bounded by the store's operation timeout).
    pub async fn sync_revocations(&self) {
        match self.store.revocations().await {
            Ok(list) => self.revocations.replace(list),
            Err(e) => {
                metrics::counter!(shared::metrics::REDIS_ERRORS, "op" => "revocations")
                    .increment(1);
                tracing::debug!(error = %e, "revocation list not read");
            }
        }
    }

    /// Takes revocations told over NATS at once.
    async fn revocation_notice_loop(&self) {
        self.control_messages(self.subjects.revocations(), "revocation notice", |r| {
            self.revocations.add(r)
        })
        .await;
    }

    async fn heartbeat_loop(&self) {
        let ttl = self.config.heartbeat * HEARTBEATS_TO_EXPIRE;
        let mut tick = tokio::time::interval(self.config.heartbeat);
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.store.node_heartbeat(&self.node_record(), ttl).await {
                metrics::counter!(shared::metrics::REDIS_ERRORS, "op" => "heartbeat").increment(1);
                tracing::warn!(error = %e, "node heartbeat failed");
            }
            let counts = self.hub.channel_counts();
            if let Err(e) = self
                .store
                .node_channels(&self.config.cluster.node_id, &counts, ttl)
                .await
            {
                metrics::counter!(shared::metrics::REDIS_ERRORS, "op" => "heartbeat").increment(1);
                tracing::debug!(error = %e, "channel counts not written");
            }
        }
    }

    /// Keeps this node's connection records alive in Redis; a node that dies stops
    /// refreshing and its records expire.
    async fn refresh_loop(&self) {
        let period = shared::store::CONN_REFRESH_INTERVAL;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let conns = self.hub.snapshot();
            if let Err(e) = self.store.refresh_conns(&conns).await {
                metrics::counter!(shared::metrics::REDIS_ERRORS, "op" => "refresh").increment(1);
                tracing::warn!(error = %e, conns = conns.len(), "connection refresh failed");
            }
        }
    }

    async fn sweep_loop(&self) {
        let mut tick = tokio::time::interval(LIMITER_SWEEP_INTERVAL);
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            self.connect_limiter.sweep(Instant::now());
            self.api_key_failures.sweep(Instant::now());
        }
    }

    /// Subscribes (in a queue group when given), retrying while NATS refuses, until
    /// the node stops. The client re-sends the subscription after reconnects.
    pub(crate) async fn subscribe_until_stopped(
        &self,
        subject: String,
        queue: Option<&str>,
    ) -> Option<async_nats::Subscriber> {
        loop {
            let r = match queue {
                Some(q) => {
                    self.nats
                        .queue_subscribe(subject.clone(), q.to_owned())
                        .await
                }
                None => self.nats.subscribe(subject.clone()).await,
            };
            match r {
                Ok(s) => return Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, subject, "cannot subscribe; retrying");
                    tokio::select! {
                        _ = self.stop.cancelled() => return None,
                        _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
                    }
                }
            }
        }
    }

    /// Applies `sb.ctl.disconnect` kicks to local connections. The subscription is
    /// re-sent by the client after NATS reconnects.
    async fn control_loop(&self) {
        self.control_messages(
            self.subjects.ctl_disconnect(),
            "disconnect command",
            |cmd: shared::protocol::DisconnectCommand| {
                let n = self.hub.disconnect(&cmd);
                tracing::info!(closed = n, code = cmd.code, "disconnect command");
            },
        )
        .await;
    }

    /// Hands each JSON message of a control subject to `apply` until the node stops;
    /// a malformed one is logged and skipped.
    async fn control_messages<T: serde::de::DeserializeOwned>(
        &self,
        subject: String,
        what: &'static str,
        apply: impl Fn(T),
    ) {
        use futures_util::StreamExt;
        let Some(mut sub) = self.subscribe_until_stopped(subject, None).await else {
            return;
        };
        loop {
            let msg = tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                m = sub.next() => match m { Some(m) => m, None => break },
            };
            match serde_json::from_slice::<T>(&msg.payload) {
                Ok(v) => apply(v),
                Err(e) => tracing::warn!(error = %e, what, "malformed control message"),
            }
        }
    }

    /// Takes `sb.ctl.refresh_context` commands: users with connections here get their
    /// context fetched again (see `revalidate`).
    async fn refresh_context_loop(&self) {
        self.control_messages(
            self.subjects.ctl_refresh_context(),
            "refresh-context command",
            |cmd: shared::protocol::RefreshContextCommand| {
                if self.hub.token_of(&cmd.user_id).is_some() {
                    self.refresher.push(cmd.user_id.into());
                }
            },
        )
        .await;
    }

    /// Forgets this node in Redis after a clean shutdown.
    pub async fn deregister(&self) {
        if let Err(e) = self.store.remove_node(&self.config.cluster.node_id).await {
            tracing::warn!(error = %e, "could not remove node record");
        }
    }
}
