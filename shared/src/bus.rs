//! JetStream layout shared by gateways (publishers) and workers (consumers): the chat
//! work-queue stream and its durable consumer. Both sides create-or-update it at
//! start-up, so whichever starts first leaves the same configuration.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};

use crate::subjects::{CHAT_CONSUMER, CHAT_STREAM, Subjects};

/// JetStream de-duplicates publishes with the same `Nats-Msg-Id` within this window:
/// long enough to cover a gateway's publish retries.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// A chat request nobody picked up within a day is worthless to its user.
pub const CHAT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Requests waiting at most: bounds the stream when every worker is down.
pub const CHAT_MAX_MESSAGES: i64 = 1_000_000;
/// A JetStream management call that takes longer means JetStream is unavailable.
pub const JETSTREAM_TIMEOUT: Duration = Duration::from_secs(5);

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
    if subjects.prefix() == "sb" {
        CHAT_STREAM.to_owned()
    } else {
        format!(
            "{}_{CHAT_STREAM}",
            subjects.prefix().to_ascii_uppercase().replace('-', "_")
        )
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

/// Errors setting up JetStream.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("JetStream: {0}")]
    JetStream(String),
    #[error("JetStream did not answer within {0:?}")]
    Timeout(Duration),
}

/// Creates or updates the chat stream (idempotent).
pub async fn ensure_chat_stream(
    js: &jetstream::Context,
    subjects: &Subjects,
    replicas: usize,
) -> Result<stream::Stream, BusError> {
    let cfg = chat_stream_config(subjects, replicas);
    match tokio::time::timeout(JETSTREAM_TIMEOUT, js.create_or_update_stream(cfg)).await {
        Ok(Ok(info)) => {
            let _ = info;
            match tokio::time::timeout(JETSTREAM_TIMEOUT, js.get_stream(stream_name(subjects)))
                .await
            {
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
    }
}
