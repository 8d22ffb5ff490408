//! Keeps live connections' permissions in step with the team backend: a user's
//! context is fetched again (bypassing every cache) when `POST
//! /v1/users/<id>/refresh-context` says so (`sb.ctl.refresh_context`), and for every
//! user with live connections once per `SB_CONTEXT_REVALIDATE_SECS`, spread over the
//! period. One fetch per user and node, applied to all of the user's connections
//! here (`Outbound::Context`): each drops the channels the user lost
//! (`unsubscribed {reason: FORBIDDEN}`) and gets a `context` frame.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use crate::node::Node;

/// Granularity of the periodic re-check: every tick checks the users of one slot,
/// so a period of P seconds has P slots and each user is checked once per period.
pub const REVALIDATE_TICK: Duration = Duration::from_secs(1);
/// Context fetches one node runs at once: keeps a period's worth of users (or a
/// burst of refresh-context calls) from flooding the workers.
pub const MAX_CONCURRENT_FETCHES: usize = 16;

/// Runs queued fetches, at most [`MAX_CONCURRENT_FETCHES`] at once, until the node
/// stops.
pub async fn run(node: Arc<Node>) {
    let mut tasks = JoinSet::new();
    loop {
        while tasks.len() < MAX_CONCURRENT_FETCHES {
            let Some(user) = node.contexts.refresher.pop() else {
                break;
            };
            let node = node.clone();
            tasks.spawn(async move { revalidate(&node, &user).await });
        }
        tokio::select! {
            biased;
            _ = node.life.stop.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = node.contexts.refresher.ready.notified(), if tasks.len() < MAX_CONCURRENT_FETCHES => {}
        }
    }
    tasks.shutdown().await;
}

/// Fetches one user's context (fresh) and hands it to the user's local connections.
/// A degraded answer (no worker, or the backend down) changes nothing: it would only
/// repeat what the connections already hold, or an older copy.
async fn revalidate(node: &Node, user: &str) {
    let Some(token) = node.hub.token_of(user) else {
        return;
    };
    let ctx = node.contexts.get(user, &token, true).await;
    if ctx.degraded {
        metrics::counter!(shared::metrics::CONTEXT_REVALIDATIONS, "result" => "degraded")
            .increment(1);
        return;
    }
    metrics::counter!(shared::metrics::CONTEXT_REVALIDATIONS, "result" => "applied").increment(1);
    let n = node.hub.deliver_context(user, Arc::new(ctx));
    tracing::debug!(user, connections = n, "context revalidated");
}

/// Walks the users with live connections here, one slot per [`REVALIDATE_TICK`], so
/// each is re-checked once per `SB_CONTEXT_REVALIDATE_SECS`, spread over the period.
pub async fn wheel(node: Arc<Node>) {
    let period = node.config.context_revalidate;
    let slots = (period.as_secs() / REVALIDATE_TICK.as_secs()).max(1);
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + REVALIDATE_TICK,
        REVALIDATE_TICK,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut slot = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = node.life.stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        for user in node.hub.users_in_slot(slot, slots) {
            node.contexts.refresher.push(user);
        }
        slot = (slot + 1) % slots;
    }
}
