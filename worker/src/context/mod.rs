//! The user-context RPC (`sb.rpc.user_context`, queue group `workers`): a gateway
//! authenticating a user asks for the user's teams and tasks. Fresh from the team
//! backend when it answers (then kept in Redis, written only when it changed);
//! otherwise the kept value, or empty lists, marked `degraded: true`. A circuit
//! breaker keeps a dead backend from being called for every login.
//!
//! A backend 401, 403 or 404 for the user is a denial: no teams, no tasks, not
//! degraded, and the kept copy is overwritten with that (an old copy must not hand
//! back teams the user lost). Only outages (5xx, 429, timeouts, connection errors,
//! invalid bodies) are answered from the kept copy.
//!
//! Concurrent requests for one user share one backend call, and a fresh answer is
//! shared for [`CONTEXT_SHARE_FOR`] with requests that do not ask for `fresh`: a
//! burst of connects and token refreshes of one user costs one call per worker.

pub mod cache;

use std::sync::Arc;

use futures_util::StreamExt;
use shared::protocol::{UserContext, UserContextRequest, valid_name};
use shared::subjects::WORKER_QUEUE_GROUP;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use cache::{
    CONTEXT_REWRITE_AFTER, CONTEXT_SHARE_FOR, CONTEXT_SHARED_MAX, CONTEXT_WRITTEN_MAX, Shared,
    Written,
};

use crate::backend::{BackendError, Endpoint};
use crate::state::Worker;

/// Whether a backend error says "this user has no access" rather than "the backend
/// is unwell": the user's teams are then none, not the last kept ones.
fn is_denial(e: &BackendError) -> bool {
    matches!(e, BackendError::Status(401 | 403 | 404))
}

/// Pause before re-subscribing after the subscription failed.
pub const RESUBSCRIBE_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// Answers user-context requests until `stop`; in-flight answers finish first.
pub async fn serve(worker: Arc<Worker>, stop: CancellationToken) {
    let limit = Arc::new(Semaphore::new(worker.config.backend.max_in_flight));
    let mut tasks = JoinSet::new();
    'subscribe: loop {
        let mut sub = match worker
            .bus
            .subscribe(
                worker.subjects.user_context_rpc(),
                Some(WORKER_QUEUE_GROUP.to_owned()),
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
                    // Leave the queue group at once so other workers get new requests
                    // (dropping a subscription unsubscribes).
                    drop(sub);
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
                    crate::state::PUBLISH_TIMEOUT,
                    worker.bus.publish(reply, Vec::new(), body.into()),
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

/// The context for one user: a recent shared answer (unless `fresh`), else fresh
/// from the backend (one call per user at a time), else cached, else empty.
pub async fn answer(worker: &Worker, req: &UserContextRequest) -> UserContext {
    if worker.backend.is_none() {
        metrics::counter!(shared::metrics::WORKER_CONTEXT_REPLIES, "result" => "none").increment(1);
        return UserContext::default();
    }
    if !req.fresh
        && let Some(ctx) = worker.context_shared.recent(&req.user_id)
    {
        metrics::counter!(shared::metrics::WORKER_CONTEXT_REPLIES, "result" => "shared")
            .increment(1);
        return ctx;
    }
    worker
        .context_shared
        .flights
        .run((req.user_id.clone(), req.fresh), || fetch(worker, req))
        .await
}

/// One backend round for a user (both lists), with the cache as the fallback.
async fn fetch(worker: &Worker, req: &UserContextRequest) -> UserContext {
    let Some(backend) = &worker.backend else {
        return UserContext::default();
    };
    if let Some(permit) = worker.breaker.try_call(Instant::now()) {
        let (teams, tasks) = tokio::join!(
            backend.list(
                &req.user_id,
                req.token.as_deref().unwrap_or(""),
                Endpoint::Teams
            ),
            backend.list(
                &req.user_id,
                req.token.as_deref().unwrap_or(""),
                Endpoint::Tasks
            ),
        );
        let outcome = match (teams, tasks) {
            (Ok(teams), Ok(tasks)) => {
                permit.success();
                Some((
                    UserContext {
                        teams,
                        tasks,
                        degraded: false,
                    },
                    "fresh",
                ))
            }
            (Err(e), _) | (_, Err(e)) if is_denial(&e) => {
                // The backend is up and says this user has no access.
                permit.success();
                tracing::debug!(error = %e, "team backend denied the user");
                Some((UserContext::default(), "denied"))
            }
            (Err(e), _) | (_, Err(e)) => {
                if e.is_outage() {
                    permit.failure(Instant::now());
                } else {
                    // The backend is up; it refused the request for another reason.
                    permit.success();
                }
                tracing::debug!(error = %e, "team backend call failed");
                None
            }
        };
        if let Some((ctx, result)) = outcome {
            if worker.context_written.needs_write(&req.user_id, &ctx) {
                match worker.store.cache_context(&req.user_id, &ctx).await {
                    Ok(()) => worker.context_written.wrote(&req.user_id, &ctx),
                    Err(e) => {
                        metrics::counter!(shared::metrics::REDIS_ERRORS, "op" => "cache_context")
                            .increment(1);
                        tracing::debug!(error = %e, "cannot cache user context");
                    }
                }
            }
            worker.context_shared.remember(&req.user_id, &ctx);
            metrics::counter!(shared::metrics::WORKER_CONTEXT_REPLIES, "result" => result)
                .increment(1);
            return ctx;
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
