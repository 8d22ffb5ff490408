//! The user-context RPC (`sb.rpc.user_context`, queue group `workers`): a gateway
//! authenticating a user asks for the user's teams and tasks. Fresh from the team
//! backend when it answers (then cached in Redis for 60 s); otherwise the cached
//! value, or empty lists, marked `degraded: true`. A circuit breaker keeps a dead
//! backend from being called for every login.

use std::sync::Arc;

use futures_util::StreamExt;
use shared::protocol::{UserContext, UserContextRequest, valid_name};
use shared::subjects::WORKER_QUEUE_GROUP;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Worker;
use crate::backend::Endpoint;

/// Pause before re-subscribing after the subscription failed.
pub const RESUBSCRIBE_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// Answers user-context requests until `stop`; in-flight answers finish first.
pub async fn serve(worker: Arc<Worker>, stop: CancellationToken) {
    let limit = Arc::new(Semaphore::new(worker.config.backend.max_in_flight));
    let mut tasks = JoinSet::new();
    'subscribe: loop {
        let mut sub = match worker
            .nats
            .queue_subscribe(
                worker.subjects.user_context_rpc(),
                WORKER_QUEUE_GROUP.to_owned(),
            )
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to user-context requests");
                tokio::select! {
                    _ = stop.cancelled() => break 'subscribe,
                    _ = tokio::time::sleep(RESUBSCRIBE_DELAY) => continue 'subscribe,
                }
            }
        };
        loop {
            let msg = tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    // Leave the queue group at once so other workers get new requests.
                    let _ = tokio::time::timeout(crate::PUBLISH_TIMEOUT, sub.unsubscribe()).await;
                    break 'subscribe;
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                m = sub.next() => match m {
                    Some(m) => m,
                    // The client closed the subscription: subscribe again, gently.
                    None => {
                        tokio::select! {
                            _ = stop.cancelled() => break 'subscribe,
                            _ = tokio::time::sleep(RESUBSCRIBE_DELAY) => continue 'subscribe,
                        }
                    }
                },
            };
            let Some(reply) = msg.reply.clone() else {
                continue;
            };
            let permit = tokio::select! {
                biased;
                _ = stop.cancelled() => break 'subscribe,
                p = limit.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break 'subscribe,
                },
            };
            let worker = worker.clone();
            tasks.spawn(async move {
                let _permit = permit;
                let ctx = match serde_json::from_slice::<UserContextRequest>(&msg.payload) {
                    Ok(req) if valid_name(&req.user_id) => answer(&worker, &req).await,
                    Ok(_) => {
                        tracing::warn!("user-context request with an invalid user id");
                        UserContext {
                            degraded: true,
                            ..UserContext::default()
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "malformed user-context request");
                        UserContext {
                            degraded: true,
                            ..UserContext::default()
                        }
                    }
                };
                let body = serde_json::to_vec(&ctx).unwrap_or_default();
                if let Err(e) = tokio::time::timeout(
                    crate::PUBLISH_TIMEOUT,
                    worker.nats.publish(reply, body.into()),
                )
                .await
                .map_err(|_| "timeout".to_owned())
                .and_then(|r| r.map_err(|e| e.to_string()))
                {
                    tracing::warn!(error = %e, "cannot send user-context reply");
                }
            });
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// The context for one user: fresh, else cached, else empty.
pub async fn answer(worker: &Worker, req: &UserContextRequest) -> UserContext {
    let Some(backend) = &worker.backend else {
        metrics::counter!(shared::metrics::WORKER_CONTEXT_REPLIES, "result" => "none").increment(1);
        return UserContext::default();
    };
    if let Some(permit) = worker.breaker.try_call(Instant::now()) {
        let (teams, tasks) = tokio::join!(
            backend.list(&req.user_id, &req.token, Endpoint::Teams),
            backend.list(&req.user_id, &req.token, Endpoint::Tasks),
        );
        match (teams, tasks) {
            (Ok(teams), Ok(tasks)) => {
                permit.success();
                let ctx = UserContext {
                    teams,
                    tasks,
                    degraded: false,
                };
                if let Err(e) = worker.store.cache_context(&req.user_id, &ctx).await {
                    metrics::counter!(shared::metrics::REDIS_ERRORS, "op" => "cache_context")
                        .increment(1);
                    tracing::debug!(error = %e, "cannot cache user context");
                }
                metrics::counter!(shared::metrics::WORKER_CONTEXT_REPLIES, "result" => "fresh")
                    .increment(1);
                return ctx;
            }
            (Err(e), _) | (_, Err(e)) => {
                if e.is_outage() {
                    permit.failure(Instant::now());
                } else {
                    // The backend is up; it refused this user or token.
                    permit.success();
                }
                tracing::debug!(error = %e, "team backend call failed");
            }
        }
    }
    let cached = match worker.store.cached_context(&req.user_id).await {
        Ok(c) => c,
        Err(e) => {
            metrics::counter!(shared::metrics::REDIS_ERRORS, "op" => "cached_context").increment(1);
            tracing::debug!(error = %e, "cached user context unavailable");
            None
        }
    };
    let result = if cached.is_some() { "cached" } else { "empty" };
    metrics::counter!(shared::metrics::WORKER_CONTEXT_REPLIES, "result" => result).increment(1);
    UserContext {
        degraded: true,
        ..cached.unwrap_or_default()
    }
}
