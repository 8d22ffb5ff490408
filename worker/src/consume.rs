//! The chat request consumer: the durable pull consumer on the `SB_CHAT` work queue
//! shared by all workers ([`shared::bus::Bus::consume`]). Pulls only as many
//! messages as there are free in-flight slots (so nothing waits inside the worker
//! while its ack timer runs), sends
//! progress acks while a reply streams, and acks, naks or terminates each message as
//! its [`Outcome`] says.
//!
//! Delivery limits: the consumer's `max_deliver` is `SB_MAX_DELIVER + 1`. The extra
//! delivery is never processed; it only tells the user `chat.error {retryable: false}`
//! and terminates the message, so the user hears of it even when every earlier
//! delivery died with its worker.
//!
//! NATS restarts: pull errors are not terminal. The loop re-creates (create-or-update)
//! stream and consumer with backoff and pulls again.
//!
//! Shutdown: stop pulling at once; in-flight requests get the grace period; those
//! still running after it are nak'd (no delay) for another worker.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use shared::bus::{AckKind, BusError, Consumer, ConsumerSettings, Delivery, Log};
use shared::protocol::{ChatRequest, valid_name};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::request::{self, Disposition, Job, Outcome};
use crate::state::Worker;

/// A pull request waits this long on the server for messages before it is renewed;
/// short, so a pull lost in a NATS restart is replaced quickly.
pub const PULL_EXPIRES: Duration = Duration::from_secs(3);
/// Messages requested per pull at most (also bounded by free in-flight slots).
pub const MAX_BATCH: usize = 256;
/// Un-acked requests across all workers: far above what a cluster streams at once,
/// bounded so a flood of requests never piles up as delivered-but-unhandled.
pub const MAX_ACK_PENDING: i64 = 20_000;
/// Setup and pull retry backoff after errors.
pub const RETRY_MIN: Duration = Duration::from_millis(100);
/// Capped at a second: a JetStream leader election (a NATS node died) takes a few
/// seconds, and pulls retried each second find the new leader within a second of
/// it (the fault suite's `nats-node-kill` measured 14 s with a 5 s cap).
pub const RETRY_MAX: Duration = Duration::from_secs(1);

/// After the grace period: time given to abandoned requests to nak before they are
/// dropped (un-acked, redelivered after the ack wait).
pub const ABANDON_TIMEOUT: Duration = Duration::from_secs(2);
/// Progress acks are never sent more often than this.
pub const MIN_PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Consumes chat requests until `shutdown`, then drains.
pub async fn run(worker: Arc<Worker>, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(worker.config.max_in_flight));
    let abandon = CancellationToken::new();
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut failures: u32 = 0;
    'setup: while !shutdown.is_cancelled() {
        if failures > 0 {
            set_up(&worker, false);
            let delay = RETRY_MIN
                .saturating_mul(1 << failures.min(8))
                .min(RETRY_MAX);
            tokio::select! {
                _ = shutdown.cancelled() => break 'setup,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        let consumer = match setup(&worker).await {
            Ok(c) => c,
            Err(e) => {
                failures += 1;
                metrics::counter!(shared::metrics::WORKER_CONSUMER_ERRORS, "op" => "setup")
                    .increment(1);
                tracing::warn!(error = %e, "cannot set up the chat consumer; retrying");
                continue;
            }
        };
        set_up(&worker, true);
        loop {
            while let Some(r) = tasks.try_join_next() {
                reap(r);
            }
            let first = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break 'setup,
                Some(r) = tasks.join_next(), if !tasks.is_empty() => { reap(r); continue; }
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break 'setup,
                },
            };
            let mut permits = vec![first];
            while permits.len() < MAX_BATCH {
                match slots.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let pull = consumer.pull(permits.len(), PULL_EXPIRES);
            let mut batch = tokio::select! {
                _ = shutdown.cancelled() => break 'setup,
                // Bounded by the bus (JetStream's API timeout on NATS).
                r = pull => match r {
                    Ok(b) => b,
                    Err(e) => {
                        pull_failed(&mut failures, &e.to_string());
                        continue 'setup;
                    }
                },
            };
            loop {
                let next = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break 'setup,
                    Some(r) = tasks.join_next(), if !tasks.is_empty() => { reap(r); continue; }
                    m = batch.next() => m,
                };
                match next {
                    None => break,
                    Some(Err(e)) => {
                        pull_failed(&mut failures, &e.to_string());
                        continue 'setup;
                    }
                    Some(Ok(msg)) => {
                        failures = 0;
                        let Some(permit) = permits.pop() else {
                            // More than asked for: give it back at once.
                            send(&msg, AckKind::Nak(None), "nak").await;
                            continue;
                        };
                        tasks.spawn(process(worker.clone(), msg, permit, abandon.clone()));
                    }
                }
            }
        }
    }
    set_up(&worker, false);
    drain(&worker, tasks, &abandon).await;
}

fn set_up(worker: &Worker, up: bool) {
    worker.consumer_up.store(up, Ordering::Release);
    metrics::gauge!(shared::metrics::WORKER_CONSUMER_UP).set(if up { 1.0 } else { 0.0 });
}

fn pull_failed(failures: &mut u32, error: &str) {
    *failures += 1;
    metrics::counter!(shared::metrics::WORKER_CONSUMER_ERRORS, "op" => "pull").increment(1);
    tracing::warn!(
        error,
        "pulling chat requests failed; re-creating the consumer"
    );
}

fn reap(r: Result<(), tokio::task::JoinError>) {
    if let Err(e) = r
        && e.is_panic()
    {
        tracing::error!(error = %e, "a chat request task panicked");
    }
}

/// Ensures the streams and the durable consumer (create-or-update).
async fn setup(worker: &Worker) -> Result<Box<dyn Consumer>, BusError> {
    // Final frames are stored there before a request is acked (see `reply`).
    worker.bus.prepare(Log::ChatEvents).await?;
    worker
        .bus
        .consume(ConsumerSettings {
            ack_wait: worker.config.ack_wait,
            max_deliver: worker.config.max_deliver + 1,
            max_ack_pending: MAX_ACK_PENDING,
        })
        .await
}

/// Waits for in-flight requests up to the grace period, then gives the rest back.
async fn drain(worker: &Worker, mut tasks: JoinSet<()>, abandon: &CancellationToken) {
    let grace = worker.config.shutdown_grace;
    let all = async {
        while let Some(r) = tasks.join_next().await {
            reap(r);
        }
    };
    if tokio::time::timeout(grace, all).await.is_ok() {
        return;
    }
    tracing::warn!(
        in_flight = tasks.len(),
        "shutdown grace over; giving unfinished chat requests back for redelivery"
    );
    abandon.cancel();
    let rest = async {
        while let Some(r) = tasks.join_next().await {
            reap(r);
        }
    };
    if tokio::time::timeout(ABANDON_TIMEOUT, rest).await.is_err() {
        tasks.abort_all();
    }
}

/// Handles one message: progress acks while it runs, then its disposition.
async fn process(
    worker: Arc<Worker>,
    msg: Delivery,
    permit: OwnedSemaphorePermit,
    abandon: CancellationToken,
) {
    let _permit = permit;
    let _gauge = InFlight::new();
    let started = Instant::now();
    let delivered = i64::try_from(msg.delivered).unwrap_or(i64::MAX);
    if delivered > 1 {
        metrics::counter!(shared::metrics::WORKER_REDELIVERIES).increment(1);
    }
    let parsed = serde_json::from_slice::<ChatRequest>(&msg.message.payload)
        .map_err(|e| e.to_string())
        .and_then(|r| {
            // Ids become subject tokens and key parts: never trust the publisher.
            let ok = [&r.user_id, &r.session_id, &r.request_id]
                .iter()
                .all(|id| valid_name(id));
            if ok {
                Ok(r)
            } else {
                Err("user, session or request id is not [A-Za-z0-9_-]{1,128}".to_owned())
            }
        });
    let outcome = match parsed {
        Ok(request) => {
            let job = Job { request, delivered };
            let work = request::handle(&worker, &job, &abandon);
            tokio::pin!(work);
            let period = (worker.config.ack_wait / 3).max(MIN_PROGRESS_INTERVAL);
            let mut tick = tokio::time::interval_at(Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    o = &mut work => break o,
                    _ = tick.tick() => send(&msg, AckKind::Progress, "progress").await,
                }
            }
        }
        Err(e) => {
            // Nobody can be told (no user id to trust): drop it for good.
            tracing::warn!(error = %e, "malformed chat request; terminating it");
            Outcome::term("malformed")
        }
    };
    match outcome.disposition {
        Disposition::Ack => send(&msg, AckKind::Ack, "ack").await,
        Disposition::Nak(d) if d.is_zero() => send(&msg, AckKind::Nak(None), "nak").await,
        Disposition::Nak(d) => send(&msg, AckKind::Nak(Some(d)), "nak").await,
        Disposition::Term => send(&msg, AckKind::Term, "term").await,
    }
    metrics::counter!(shared::metrics::WORKER_REQUESTS, "outcome" => outcome.label).increment(1);
    metrics::histogram!(shared::metrics::WORKER_REQUEST_SECONDS)
        .record(started.elapsed().as_secs_f64());
}

async fn send(msg: &Delivery, kind: AckKind, op: &'static str) {
    // Bounded by the bus; a lost ack only means a redelivery after the ack wait.
    if let Err(e) = msg.ack_with(kind).await {
        metrics::counter!(shared::metrics::WORKER_CONSUMER_ERRORS, "op" => op).increment(1);
        tracing::debug!(error = %e, op, "ack failed");
    }
}

/// Keeps the in-flight gauge right even when a task is aborted.
struct InFlight;

impl InFlight {
    fn new() -> InFlight {
        metrics::gauge!(shared::metrics::WORKER_IN_FLIGHT).increment(1.0);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(shared::metrics::WORKER_IN_FLIGHT).decrement(1.0);
    }
}
