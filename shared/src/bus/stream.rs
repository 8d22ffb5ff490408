//! JetStream layout shared by gateways (publishers) and workers (consumers): the chat
//! work-queue stream and its durable consumer. Both sides create-or-update it at
//! start-up, so whichever starts first leaves the same configuration.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};

use super::BusError;
use crate::subjects::{CHAT_CONSUMER, CHAT_EVENTS_STREAM, CHAT_STREAM, Subjects};

/// JetStream de-duplicates publishes with the same `Nats-Msg-Id` within this window:
/// long enough to cover a gateway's publish retries.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// A chat request nobody picked up within a day is worthless to its user.
pub const CHAT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Requests waiting at most: bounds the stream when every worker is down.
pub const CHAT_MAX_MESSAGES: i64 = 1_000_000;
/// A JetStream management call that takes longer means JetStream is unavailable.
pub const JETSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// Final frames are kept this long: longer than any NATS outage a gateway rides out
/// with its clients still connected (a client reconnecting later reads `history`),
/// short so the stream stays small.
pub const CHAT_EVENTS_MAX_AGE: Duration = Duration::from_secs(10 * 60);
/// Final frames kept at most: bounds the stream under a flood of short replies.
pub const CHAT_EVENTS_MAX_MESSAGES: i64 = 1_000_000;
/// NATS header on every chat frame a worker publishes (chunks and the final one):
/// the request id, so a gateway can drop frames of requests it already finished.
pub const HEADER_REQUEST: &str = "Sb-Request";
/// NATS header marking a request's final frame (`chat.complete` or `chat.error`).
pub const HEADER_FINAL: &str = "Sb-Final";

/// The `SB_CHAT` stream: a work queue of chat requests.
pub fn chat_stream_config(subjects: &Subjects, replicas: usize) -> stream::Config {
    stream::Config {
        name: stream_name(subjects),
        subjects: vec![subjects.chat_requests()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        max_age: CHAT_MAX_AGE,
        max_messages: CHAT_MAX_MESSAGES,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: DUPLICATE_WINDOW,
        num_replicas: replicas.max(1),
        ..Default::default()
    }
}

/// The stream name: `SB_CHAT` for the default prefix, prefixed otherwise so that
/// deployments sharing a NATS cluster do not share a queue.
pub fn stream_name(subjects: &Subjects) -> String {
    prefixed(subjects, CHAT_STREAM)
}

/// `SB_CHAT_EVENTS`, prefixed like [`stream_name`].
pub fn events_stream_name(subjects: &Subjects) -> String {
    prefixed(subjects, CHAT_EVENTS_STREAM)
}

fn prefixed(subjects: &Subjects, name: &str) -> String {
    if subjects.prefix() == "sb" {
        name.to_owned()
    } else {
        format!(
            "{}_{name}",
            subjects.prefix().to_ascii_uppercase().replace('-', "_")
        )
    }
}

/// The `SB_CHAT_EVENTS` stream: each request's final frame, on
/// `sb.chat.events.<uid>`, kept [`CHAT_EVENTS_MAX_AGE`]. Limits retention: every
/// gateway reads it (an ordered consumer each), nobody acks. Workers publish with
/// `Nats-Msg-Id` = request id, so a redelivered request's final is stored once.
pub fn chat_events_stream_config(subjects: &Subjects, replicas: usize) -> stream::Config {
    stream::Config {
        name: events_stream_name(subjects),
        subjects: vec![subjects.chat_events_all()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: CHAT_EVENTS_MAX_AGE,
        max_messages: CHAT_EVENTS_MAX_MESSAGES,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: DUPLICATE_WINDOW.min(CHAT_EVENTS_MAX_AGE),
        num_replicas: replicas.max(1),
        ..Default::default()
    }
}

/// The durable pull consumer shared by every worker.
pub fn chat_consumer_config(
    subjects: &Subjects,
    ack_wait: Duration,
    max_deliver: i64,
    max_ack_pending: i64,
) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(CHAT_CONSUMER.to_owned()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        max_deliver,
        max_ack_pending,
        filter_subject: subjects.chat_requests(),
        ..Default::default()
    }
}

/// Publishes `msg` to a stream's subject and waits, at most `limit`, until the stream
/// acknowledges it: stored (replicated) and deduplicated by its message id. What
/// gateways do before acking `chat.send` and workers before acking a request.
pub async fn store(
    js: &jetstream::Context,
    subject: String,
    msg: jetstream::message::PublishMessage,
    limit: Duration,
) -> Result<(), BusError> {
    let stored = tokio::time::timeout(limit, async {
        let ack = js.send_publish(subject, msg).await?;
        ack.await
    })
    .await;
    match stored {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(BusError::JetStream(e.to_string())),
        Err(_) => Err(BusError::Timeout(limit)),
    }
}

/// Creates or updates the chat stream (idempotent).
pub async fn ensure_chat_stream(
    js: &jetstream::Context,
    subjects: &Subjects,
    replicas: usize,
) -> Result<stream::Stream, BusError> {
    ensure_stream(js, chat_stream_config(subjects, replicas)).await
}

/// Creates or updates the chat events stream (idempotent).
pub async fn ensure_chat_events_stream(
    js: &jetstream::Context,
    subjects: &Subjects,
    replicas: usize,
) -> Result<stream::Stream, BusError> {
    ensure_stream(js, chat_events_stream_config(subjects, replicas)).await
}

async fn ensure_stream(
    js: &jetstream::Context,
    cfg: stream::Config,
) -> Result<stream::Stream, BusError> {
    let name = cfg.name.clone();
    match tokio::time::timeout(JETSTREAM_TIMEOUT, js.create_or_update_stream(cfg)).await {
        Ok(Ok(info)) => {
            let _ = info;
            match tokio::time::timeout(JETSTREAM_TIMEOUT, js.get_stream(name)).await {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(BusError::JetStream(e.to_string())),
                Err(_) => Err(BusError::Timeout(JETSTREAM_TIMEOUT)),
            }
        }
        Ok(Err(e)) => Err(BusError::JetStream(e.to_string())),
        Err(_) => Err(BusError::Timeout(JETSTREAM_TIMEOUT)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_follow_the_prefix() {
        assert_eq!(stream_name(&Subjects::new("sb")), "SB_CHAT");
        assert_eq!(stream_name(&Subjects::new("t-1")), "T_1_SB_CHAT");
        let c = chat_stream_config(&Subjects::new("sb"), 3);
        assert_eq!(c.subjects, vec!["sb.chat.requests".to_owned()]);
        assert_eq!(c.num_replicas, 3);
        let e = chat_events_stream_config(&Subjects::new("t-1"), 3);
        assert_eq!(e.name, "T_1_SB_CHAT_EVENTS");
        assert_eq!(e.subjects, vec!["t-1.chat.events.>".to_owned()]);
        assert!(e.duplicate_window <= e.max_age);
    }
}
