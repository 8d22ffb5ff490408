//! The gateway node: the services every connection and endpoint shares (config, JWT
//! validator, bus, store, hub, limits, user contexts, revocations, sockets) and the
//! loops that tie the hub to the bus and store (kicks, context refreshes, catch-up
//! after a resubscription, the chat stream at start-up). The node's records are
//! `membership`'s, the dependency health loop is the scaffold's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shared::auth::Validator;
use shared::bus::{Log, SharedBus};
use shared::scaffold::Scaffold;
use shared::store::SharedStore;
use shared::subjects::Subjects;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::contexts::Contexts;
use crate::control;
use crate::hub::Hub;
use crate::lifecycle::Lifecycle;
use crate::limits::NodeLimits;
use crate::sockets::Sockets;

/// How often idle per-address limiter entries are swept.
pub const LIMITER_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Shared state of one gateway node.
pub struct Node {
    pub config: Config,
    pub validator: Validator,
    pub store: SharedStore,
    pub bus: SharedBus,
    pub subjects: Subjects,
    pub hub: Arc<Hub>,
    /// Per-address connect and failed-API-key limiters.
    pub limits: NodeLimits,
    /// Users' teams and tasks (asked of workers, cached, coalesced) and the queue of
    /// users to fetch again.
    pub contexts: Contexts,
    /// Revoked token ids, kept in memory (see `revocations`).
    pub revocations: crate::revocations::Revocations,
    /// Every upgraded socket and the per-node cap.
    pub sockets: Arc<Sockets>,
    /// Shutdown, stop, task trackers and the readiness state.
    pub life: Lifecycle,
}

/// Channels whose last publication is read at once after a resubscription.
const CATCH_UP_CONCURRENCY: usize = 32;

impl Node {
    pub fn new(
        config: Config,
        validator: Validator,
        store: SharedStore,
        bus: SharedBus,
        wire: crate::hub::Wire,
        shutdown: CancellationToken,
        scaffold: &Scaffold,
    ) -> Arc<Node> {
        let subjects = Subjects::new(&config.cluster.prefix);
        let life = Lifecycle::new(shutdown, scaffold);
        let hub = Hub::new(
            bus.clone(),
            wire,
            subjects.clone(),
            life.background.clone(),
            life.stop.clone(),
        );
        let contexts = Contexts::new(
            bus.clone(),
            store.clone(),
            subjects.clone(),
            config.user_context_timeout,
            config.forward_user_token,
        );
        Arc::new(Node {
            contexts,
            sockets: Sockets::new(config.max_connections),
            limits: NodeLimits::new(config.connect_rate_per_ip, config.connect_burst_per_ip),
            config,
            validator,
            store,
            revocations: Default::default(),
            bus,
            subjects,
            hub,
            life,
        })
    }

    pub fn is_draining(&self) -> bool {
        self.life.is_draining()
    }

    pub fn nats_connected(&self) -> bool {
        self.bus.connected() && self.hub.wire_connected()
    }

    /// Ready to take connections: not draining, NATS connected, Redis answering.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.nats_connected() && self.life.redis_up()
    }

    /// Creates or updates the chat stream at start-up, retrying while NATS or
    /// JetStream is not there yet.
    async fn chat_stream_loop(&self) {
        loop {
            match self.bus.prepare(Log::ChatRequests).await {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, "chat stream not ready yet"),
            }
            tokio::select! {
                _ = self.life.stop.cancelled() => return,
                _ = tokio::time::sleep(self.config.heartbeat) => {}
            }
        }
    }

    /// Starts the node's background loops; each ends when `shutdown` is cancelled.
    pub fn spawn_background(self: &Arc<Self>) {
        let node = self.clone();
        self.life
            .background
            .spawn(async move { node.sweep_loop().await });
        let node = self.clone();
        self.life
            .background
            .spawn(async move { node.control_loop().await });
        let node = self.clone();
        self.life
            .background
            .spawn(async move { node.chat_stream_loop().await });
        let node = self.clone();
        self.life
            .background
            .spawn(async move { node.catch_up_loop().await });
        let node = self.clone();
        self.life
            .background
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
                _ = self.life.stop.cancelled() => break,
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
                _ = self.life.stop.cancelled() => None,
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

    async fn sweep_loop(&self) {
        let mut tick = tokio::time::interval(LIMITER_SWEEP_INTERVAL);
        loop {
            tokio::select! {
                biased;
                _ = self.life.stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            self.limits.sweep(Instant::now());
        }
    }

    /// Applies `sb.ctl.disconnect` kicks to local connections. The subscription is
    /// re-sent by the client after NATS reconnects.
    async fn control_loop(&self) {
        control::messages(
            &*self.bus,
            self.subjects.ctl_disconnect(),
            "disconnect command",
            &self.life.stop,
            |cmd: shared::protocol::DisconnectCommand| {
                let n = self.hub.disconnect(&cmd);
                tracing::info!(closed = n, code = cmd.code, "disconnect command");
            },
        )
        .await;
    }

    /// Takes `sb.ctl.refresh_context` commands: users with connections here get their
    /// context fetched again (see `revalidate`).
    async fn refresh_context_loop(&self) {
        control::messages(
            &*self.bus,
            self.subjects.ctl_refresh_context(),
            "refresh-context command",
            &self.life.stop,
            |cmd: shared::protocol::RefreshContextCommand| {
                if self.hub.token_of(&cmd.user_id).is_some() {
                    self.contexts.refresher.push(cmd.user_id.into());
                }
            },
        )
        .await;
    }
}
