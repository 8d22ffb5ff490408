//! The bus on NATS: core publish, subscribe and request on the async-nats client, the
//! two JetStream streams, created (or updated) on first use and again after a store
//! fails (JetStream may have lost them), and the workers' durable pull consumer of
//! the chat work queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, PullConsumer, pull::OrderedConfig};
use async_nats::jetstream::{self, message::PublishMessage};
use async_nats::{HeaderMap, RequestErrorKind};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;

use super::stream::{
    JETSTREAM_TIMEOUT, chat_consumer_config, ensure_chat_events_stream, ensure_chat_stream,
    stream_name,
};
use super::{
    AckKind, Acker, Backlog, Bus, BusError, Consumer, ConsumerSettings, Deliveries, Delivery,
    Follow, Log, Message, Stored, Subscription,
};
use crate::subjects::{CHAT_CONSUMER, Subjects};

/// A stream read's pull expiry: its idle heartbeat is half of it, and two missed
/// heartbeats make it resume on a new consumer. Short, so finals stored while a
/// gateway was cut off arrive within seconds of its link coming back.
pub const FOLLOW_PULL_EXPIRES: Duration = Duration::from_secs(2);
/// An ack (of any kind) that cannot be queued for the server within this is given up:
/// the ack wait redelivers the request, which is what a lost ack does anyway.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// Counts a connection's losses. Fed by the client's event callback
/// (`ConnectOptions::event_callback`), which only the code that connects can set:
/// it creates one, hooks [`Losses::on_event`] in, and hands it to
/// [`NatsBus::with_losses`].
#[derive(Debug, Clone, Default)]
pub struct Losses(Arc<AtomicU64>);

impl Losses {
    /// For `ConnectOptions::event_callback`.
    pub fn on_event(&self, event: &async_nats::Event) {
        if matches!(event, async_nats::Event::Disconnected) {
            self.0.fetch_add(1, Ordering::AcqRel);
        }
    }

    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// The bus on a NATS connection (cheap to share behind an `Arc`).
pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    subjects: Subjects,
    replicas: usize,
    /// Per [`Log`]: whether its stream is known to exist.
    ready: [AtomicBool; 2],
    ensure: tokio::sync::Mutex<()>,
    /// Never counts unless the connector hooked it in ([`NatsBus::with_losses`]).
    losses: Losses,
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus")
            .field("subjects", &self.subjects)
            .finish()
    }
}

impl NatsBus {
    pub fn new(client: async_nats::Client, subjects: Subjects, replicas: usize) -> NatsBus {
        NatsBus {
            js: jetstream::new(client.clone()),
            client,
            subjects,
            replicas,
            ready: [AtomicBool::new(false), AtomicBool::new(false)],
            ensure: tokio::sync::Mutex::new(()),
            losses: Losses::default(),
        }
    }

    /// The bus counting connection losses with `losses`, which the client's event
    /// callback feeds.
    pub fn with_losses(self, losses: Losses) -> NatsBus {
        NatsBus { losses, ..self }
    }

    /// The client, for what only NATS offers (drains, tests).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    fn slot(log: Log) -> usize {
        match log {
            Log::ChatRequests => 0,
            Log::ChatEvents => 1,
        }
    }

    /// Makes sure `log`'s stream exists: created or updated once, again after a
    /// failure.
    pub async fn ensure(&self, log: Log) -> Result<jetstream::stream::Stream, BusError> {
        let _guard = self.ensure.lock().await;
        let stream = match log {
            Log::ChatRequests => ensure_chat_stream(&self.js, &self.subjects, self.replicas).await,
            Log::ChatEvents => {
                ensure_chat_events_stream(&self.js, &self.subjects, self.replicas).await
            }
        }?;
        self.ready[Self::slot(log)].store(true, Ordering::Release);
        Ok(stream)
    }
}

fn to_headers(headers: Vec<(String, String)>) -> Option<HeaderMap> {
    if headers.is_empty() {
        return None;
    }
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(k.as_str(), v.as_str());
    }
    Some(map)
}

fn from_headers(map: Option<&HeaderMap>) -> Vec<(String, String)> {
    let Some(map) = map else {
        return Vec::new();
    };
    map.iter()
        .flat_map(|(k, vs)| {
            vs.iter()
                .map(move |v| (k.to_string(), v.as_str().to_owned()))
        })
        .collect()
}

/// A NATS message as the bus hands it on.
pub fn from_nats(m: async_nats::Message) -> Message {
    Message {
        subject: m.subject.to_string(),
        reply: m.reply.map(|r| r.to_string()),
        headers: from_headers(m.headers.as_ref()),
        payload: m.payload,
    }
}

fn nats_err(e: impl std::fmt::Display) -> BusError {
    BusError::Nats(e.to_string())
}

async fn bounded<T>(
    limit: Duration,
    op: impl Future<Output = Result<T, BusError>>,
) -> Result<T, BusError> {
    tokio::time::timeout(limit, op)
        .await
        .unwrap_or(Err(BusError::Timeout(limit)))
}

#[async_trait]
impl Bus for NatsBus {
    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    async fn publish(
        &self,
        subject: String,
        headers: Vec<(String, String)>,
        payload: Bytes,
    ) -> Result<(), BusError> {
        // Queues into the client's bounded command channel: waits only when it is
        // full, which the timeout turns into an error.
        bounded(JETSTREAM_TIMEOUT, async {
            match to_headers(headers) {
                Some(h) => self.client.publish_with_headers(subject, h, payload).await,
                None => self.client.publish(subject, payload).await,
            }
            .map_err(nats_err)
        })
        .await
    }

    async fn subscribe(
        &self,
        subject: String,
        queue: Option<String>,
    ) -> Result<Subscription, BusError> {
        let sub = bounded(JETSTREAM_TIMEOUT, async {
            match queue {
                Some(q) => self.client.queue_subscribe(subject, q).await,
                None => self.client.subscribe(subject).await,
            }
            .map_err(nats_err)
        })
        .await?;
        Ok(sub.map(from_nats).boxed())
    }

    async fn request(
        &self,
        subject: String,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, BusError> {
        let req = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(timeout));
        let reply = tokio::time::timeout(
            timeout + Duration::from_millis(100),
            self.client.send_request(subject, req),
        )
        .await;
        match reply {
            Ok(Ok(m)) => Ok(from_nats(m)),
            Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => Err(BusError::NoResponders),
            Ok(Err(e)) if e.kind() == RequestErrorKind::TimedOut => Err(BusError::Timeout(timeout)),
            Ok(Err(e)) => Err(nats_err(e)),
            Err(_) => Err(BusError::Timeout(timeout)),
        }
    }

    async fn flush(&self, timeout: Duration) -> Result<(), BusError> {
        // A request to a subject nobody serves is answered "no responders" only after
        // the server read everything this connection sent before it.
        let subject = self.client.new_inbox();
        match self.request(subject, Bytes::new(), timeout).await {
            Ok(_) | Err(BusError::NoResponders) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn store(
        &self,
        log: Log,
        subject: String,
        id: &str,
        headers: Vec<(String, String)>,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<(), BusError> {
        let stored = bounded(timeout, async {
            if !self.ready[Self::slot(log)].load(Ordering::Acquire) {
                self.ensure(log).await?;
            }
            let mut msg = PublishMessage::build().payload(payload);
            if let Some(h) = to_headers(headers) {
                msg = msg.headers(h);
            }
            // After the headers: `headers` replaces the map, `message_id` adds to it.
            let msg = msg.message_id(id);
            super::stream::store(&self.js, subject, msg, timeout).await
        })
        .await;
        if let Err(BusError::JetStream(_)) = &stored {
            // The stream may be gone (JetStream lost its store): check it again
            // before the next store.
            self.ready[Self::slot(log)].store(false, Ordering::Release);
        }
        stored
    }

    async fn prepare(&self, log: Log) -> Result<(), BusError> {
        bounded(JETSTREAM_TIMEOUT, self.ensure(log)).await.map(drop)
    }

    async fn follow(&self, log: Log, after: Option<u64>) -> Result<Follow, BusError> {
        if log == Log::ChatRequests {
            // A work queue takes one consumer per subject, the workers' durable one.
            return Err(BusError::JetStream(
                "the chat work queue is read by the workers' consumer only".into(),
            ));
        }
        let stream = bounded(JETSTREAM_TIMEOUT, self.ensure(log)).await?;
        let last = stream.cached_info().state.last_sequence;
        let start = after.unwrap_or(last) + 1;
        let filter = match log {
            Log::ChatRequests => self.subjects.chat_requests(),
            Log::ChatEvents => self.subjects.chat_events_all(),
        };
        let config = OrderedConfig {
            filter_subject: filter,
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            max_expires: FOLLOW_PULL_EXPIRES,
            ..Default::default()
        };
        let consumer = bounded(JETSTREAM_TIMEOUT, async {
            stream
                .create_consumer(config)
                .await
                .map_err(|e| BusError::JetStream(e.to_string()))
        })
        .await?;
        let messages = bounded(JETSTREAM_TIMEOUT, async {
            consumer
                .messages()
                .await
                .map_err(|e| BusError::JetStream(e.to_string()))
        })
        .await?;
        let messages = messages
            .filter_map(move |m| async move {
                let m = match m {
                    Ok(m) => m,
                    Err(e) => return Some(Err(BusError::JetStream(e.to_string()))),
                };
                // A consumer re-created before it delivered anything starts from the
                // stream's beginning (async-nats): what came before `start` is skipped.
                let seq = m.info().ok()?.stream_sequence;
                if seq < start {
                    return None;
                }
                let (m, _) = m.split();
                Some(Ok(Stored {
                    seq,
                    message: from_nats(m),
                }))
            })
            .boxed();
        Ok(Follow { last, messages })
    }

    async fn consume(&self, settings: ConsumerSettings) -> Result<Box<dyn Consumer>, BusError> {
        // Create-or-update every time: after a NATS restart the stream or the
        // consumer may be gone, and this is how a worker recovers.
        let stream = bounded(JETSTREAM_TIMEOUT, self.ensure(Log::ChatRequests)).await?;
        let config = chat_consumer_config(
            &self.subjects,
            settings.ack_wait,
            settings.max_deliver,
            settings.max_ack_pending,
        );
        match tokio::time::timeout(JETSTREAM_TIMEOUT, stream.create_consumer(config)).await {
            Ok(Ok(consumer)) => Ok(Box::new(NatsConsumer { consumer })),
            Ok(Err(e)) => Err(BusError::JetStream(format!("creating the consumer: {e}"))),
            Err(_) => Err(BusError::Timeout(JETSTREAM_TIMEOUT)),
        }
    }

    async fn backlog(&self) -> Result<Backlog, BusError> {
        bounded(JETSTREAM_TIMEOUT, async {
            let stream = self
                .js
                .get_stream_no_info(stream_name(&self.subjects))
                .await
                .map_err(|e| BusError::JetStream(e.to_string()))?;
            let info = stream
                .consumer_info(CHAT_CONSUMER)
                .await
                .map_err(|e| BusError::JetStream(e.to_string()))?;
            Ok(Backlog {
                pending: info.num_pending,
                ack_pending: info.num_ack_pending as u64,
            })
        })
        .await
    }

    fn connection_losses(&self) -> u64 {
        self.losses.count()
    }
}

/// The workers' durable consumer on JetStream.
struct NatsConsumer {
    consumer: PullConsumer,
}

#[async_trait]
impl Consumer for NatsConsumer {
    async fn pull(&self, max: usize, expires: Duration) -> Result<Deliveries, BusError> {
        let batch = bounded(JETSTREAM_TIMEOUT, async {
            self.consumer
                .batch()
                .max_messages(max)
                .expires(expires)
                .messages()
                .await
                .map_err(|e| BusError::JetStream(e.to_string()))
        })
        .await?;
        Ok(batch
            .map(|m| {
                let m = m.map_err(|e| BusError::JetStream(e.to_string()))?;
                let (delivered, seq) = m
                    .info()
                    .map(|i| (u64::try_from(i.delivered).unwrap_or(1), i.stream_sequence))
                    .unwrap_or((1, 0));
                let (m, acker) = m.split();
                Ok(Delivery::new(
                    from_nats(m),
                    delivered,
                    seq,
                    Box::new(NatsAcker(acker)),
                ))
            })
            .boxed())
    }
}

struct NatsAcker(jetstream::message::Acker);

#[async_trait]
impl Acker for NatsAcker {
    async fn send(&self, kind: AckKind) -> Result<(), BusError> {
        let kind = match kind {
            AckKind::Ack => jetstream::AckKind::Ack,
            AckKind::Nak(delay) => jetstream::AckKind::Nak(delay),
            AckKind::Progress => jetstream::AckKind::Progress,
            AckKind::Term => jetstream::AckKind::Term,
        };
        bounded(ACK_TIMEOUT, async {
            self.0.ack_with(kind).await.map_err(nats_err)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_count_only_disconnections() {
        let losses = Losses::default();
        losses.on_event(&async_nats::Event::Connected);
        assert_eq!(losses.count(), 0);
        losses.on_event(&async_nats::Event::Disconnected);
        losses.on_event(&async_nats::Event::Connected);
        assert_eq!(losses.count(), 1);
    }
}
