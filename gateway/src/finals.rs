//! One final frame per chat request, even across NATS outages.
//!
//! Workers publish a request's frames on core NATS (`sb.user.<uid>`) and store its
//! final frame (`chat.complete` or `chat.error`) in the `SB_CHAT_EVENTS` stream too.
//! Core NATS loses what is published while this node's subscription connection is
//! away (a NATS node dying, a restart); the stream keeps it. Each gateway follows the
//! stream with an ordered consumer that starts at "now" and, after any interruption,
//! resumes after the last message it saw, so a final published while this node was
//! cut off arrives once it is back.
//!
//! The same final can thus arrive twice (core and stream, or again from a redelivered
//! request, or the worker's echo). `RecentFinals` remembers the requests whose final
//! this node delivered (`recent_finals.rs`), so local connections get exactly one,
//! and chunks of a finished request arriving late are dropped.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::StreamExt;
use shared::bus::Log;

use crate::node::Node;

/// How often the follower looks at the NATS connection: after a reconnect it starts a
/// new consumer at once rather than waiting for async-nats to notice missed
/// heartbeats (its re-creation backs off to 10 s between attempts).
pub const LINK_CHECK_INTERVAL: Duration = Duration::from_millis(200);
/// A final read from the stream waits this long before it is delivered: the live
/// copy follows the request's last chunks on the subscription connection, while the
/// stream's copy comes over another connection and can overtake them. Delivered
/// first, it would end the stream on the client and make those chunks late.
pub const STORED_FINAL_GRACE: Duration = Duration::from_secs(1);
/// Stored finals waiting out their grace at most; past it they go at once (a node
/// coming back from an outage with a backlog of finals).
pub const MAX_WAITING_FINALS: usize = 10_000;
/// Retry backoff of the follower after errors (JetStream away, no stream yet).
pub const FOLLOW_RETRY_MIN: Duration = Duration::from_millis(200);
pub const FOLLOW_RETRY_MAX: Duration = Duration::from_secs(5);

/// Why following the stream stopped (it is then started again).
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("{0}")]
    Bus(#[from] shared::bus::BusError),
    #[error("the stream's read ended")]
    Ended,
    #[error("NATS reconnected")]
    Reconnected,
}

/// Follows `SB_CHAT_EVENTS` until the node stops, handing each final to the hub.
pub async fn follow_loop(node: &Node) {
    // The last stream sequence handled; `None` until the stream was first seen, when
    // following starts at its end ("now": older finals were delivered before this
    // node existed).
    let mut after: Option<u64> = None;
    let mut failures: u32 = 0;
    let mut waiting = Waiting::new();
    loop {
        if failures > 0 {
            let backoff = FOLLOW_RETRY_MIN
                .saturating_mul(1 << failures.min(5))
                .min(FOLLOW_RETRY_MAX);
            tokio::select! {
                _ = node.life.stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
        }
        let r = tokio::select! {
            _ = node.life.stop.cancelled() => return,
            r = follow(node, &mut after, &mut failures, &mut waiting) => r,
        };
        // Between consumers nothing is read: what waited goes now rather than later.
        for (_, user, request, payload) in waiting.drain(..) {
            node.hub.deliver_stored_final(&user, &request, payload);
        }
        match r {
            Ok(()) => return,
            // Not a failure: resume on a fresh consumer right away.
            Err(FollowError::Reconnected) => {
                tracing::debug!("NATS reconnected; following chat finals again");
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                metrics::counter!(shared::metrics::NATS_ERRORS, "op" => "chat_events").increment(1);
                tracing::warn!(error = %e, "following chat finals failed; starting again");
            }
        }
    }
}

/// Stored finals waiting out [`STORED_FINAL_GRACE`], oldest first: due time, user,
/// request id, frame.
type Waiting = VecDeque<(tokio::time::Instant, String, String, bytes::Bytes)>;

async fn follow(
    node: &Node,
    after: &mut Option<u64>,
    failures: &mut u32,
    waiting: &mut Waiting,
) -> Result<(), FollowError> {
    let follow = node.bus.follow(Log::ChatEvents, *after).await?;
    after.get_or_insert(follow.last);
    let mut messages = follow.messages;
    *failures = 0;
    let mut link = tokio::time::interval(LINK_CHECK_INTERVAL);
    let mut was_down = false;
    loop {
        let due = waiting.front().map(|w| w.0);
        let msg = tokio::select! {
            _ = node.life.stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                if let Some((_, user, request, payload)) = waiting.pop_front() {
                    node.hub.deliver_stored_final(&user, &request, payload);
                }
                continue;
            }
            _ = link.tick() => {
                let up = node.bus.connected();
                if !up {
                    was_down = true;
                } else if was_down {
                    return Err(FollowError::Reconnected);
                }
                continue;
            }
            m = messages.next() => m,
        };
        let msg = match msg {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(FollowError::Bus(e)),
            None => return Err(FollowError::Ended),
        };
        let seq = msg.seq;
        if after.is_some_and(|a| seq <= a) {
            continue;
        }
        *after = Some(seq);
        let msg = msg.message;
        let user = node.subjects.chat_events_user(&msg.subject);
        let request = msg
            .header(shared::bus::stream::HEADER_REQUEST)
            .map(str::to_owned);
        if let (Some(user), Some(request)) = (user, request) {
            if waiting.len() >= MAX_WAITING_FINALS
                && let Some((_, u, r, p)) = waiting.pop_front()
            {
                node.hub.deliver_stored_final(&u, &r, p);
            }
            waiting.push_back((
                tokio::time::Instant::now() + STORED_FINAL_GRACE,
                user.to_owned(),
                request,
                msg.payload.clone(),
            ));
        }
    }
}
