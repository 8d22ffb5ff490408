//! This node's records in the store: its heartbeat (and per-channel subscriber
//! counts), the refresh that keeps its connections' records alive, and its removal
//! after a clean shutdown. A node that dies stops refreshing and its records expire.

use shared::store::{NodeRecord, now_ms};

use crate::node::Node;

/// A node missing this many heartbeats is gone (30 s by default, well inside the
/// 90 s promise).
pub const HEARTBEATS_TO_EXPIRE: u32 = 3;

fn record(node: &Node) -> NodeRecord {
    NodeRecord {
        node: node.config.cluster.node_id.clone(),
        connections: node.hub.len() as u64,
        started_at: node.life.started_at,
        heartbeat_at: now_ms(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// Announces the node (and its channel counts) every `SB_HEARTBEAT_SECS` until it
/// stops.
pub async fn heartbeat_loop(node: &Node) {
    let ttl = node.config.heartbeat * HEARTBEATS_TO_EXPIRE;
    let mut tick = tokio::time::interval(node.config.heartbeat);
    loop {
        tokio::select! {
            biased;
            _ = node.life.stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Err(e) = node.store.node_heartbeat(&record(node), ttl).await {
            metrics::counter!(shared::metrics::REDIS_ERRORS, "op" => "heartbeat").increment(1);
            tracing::warn!(error = %e, "node heartbeat failed");
        }
        let counts = node.hub.channel_counts();
        if let Err(e) = node
            .store
            .node_channels(&node.config.cluster.node_id, &counts, ttl)
            .await
        {
            metrics::counter!(shared::metrics::REDIS_ERRORS, "op" => "heartbeat").increment(1);
            tracing::debug!(error = %e, "channel counts not written");
        }
    }
}

/// Keeps this node's connection records alive in the store.
pub async fn refresh_loop(node: &Node) {
    let period = shared::store::CONN_REFRESH_INTERVAL;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            biased;
            _ = node.life.stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let conns = node.hub.snapshot();
        if let Err(e) = node.store.refresh_conns(&conns).await {
            metrics::counter!(shared::metrics::REDIS_ERRORS, "op" => "refresh").increment(1);
            tracing::warn!(error = %e, conns = conns.len(), "connection refresh failed");
        }
    }
}

/// Forgets this node in the store after a clean shutdown.
pub async fn deregister(node: &Node) {
    if let Err(e) = node.store.remove_node(&node.config.cluster.node_id).await {
        tracing::warn!(error = %e, "could not remove node record");
    }
}
