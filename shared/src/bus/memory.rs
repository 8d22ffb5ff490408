//! The bus in process memory: the same contract as [`super::NatsBus`], for
//! in-process tests of several nodes sharing one bus.
//!
//! It mirrors what a NATS server does rather than what would be convenient: a full
//! subscriber queue loses messages (a slow consumer), a request nobody can hear fails
//! at once, a core publish to a stream's subject is stored, a request to one is
//! answered with a JetStream acknowledgement. Code that passes on it should behave
//! the same on NATS.
//!
//! The chat work queue has the workers' durable consumer as on JetStream: each
//! request out to one consumer at a time, redelivered after the ack wait or a nak
//! (and its delay), dropped after `max_deliver` deliveries, removed by an ack or a
//! term; progress restarts the ack wait.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::stream::{
    CHAT_EVENTS_MAX_AGE, CHAT_MAX_AGE, DUPLICATE_WINDOW, events_stream_name, stream_name,
};
use super::{
    AckKind, Acker, Backlog, Bus, BusError, Consumer, ConsumerSettings, Deliveries, Delivery,
    Follow, Log, Message, Stored, Subscription, subject_matches,
};
use crate::subjects::Subjects;

/// Stored messages a follower copies per lock: a far-behind reader must not hold
/// the bus lock while it copies a whole log.
const FOLLOW_BATCH: usize = 256;
/// The header JetStream de-duplicates by (what `store` sets on NATS too).
const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// A NATS server in memory (share it as `Arc<MemoryBus>` between simulated nodes).
pub struct MemoryBus {
    shared: Arc<Shared>,
}

/// Kept apart from [`MemoryBus`] so that followers can hold it weakly: a read ends
/// when the bus is gone instead of keeping it alive.
struct Shared {
    subjects: Subjects,
    connected: AtomicBool,
    /// Messages lost to full subscriber queues.
    dropped: AtomicU64,
    next_inbox: AtomicU64,
    state: Mutex<State>,
    /// Per log: its last sequence, for followers waiting for more (or for the end
    /// of an outage); the work queue's also changes whenever a request may have
    /// become deliverable (an ack, a nak), for pulls waiting.
    appended: [watch::Sender<u64>; 2],
    /// Times the outage switch went from connected to disconnected.
    losses: AtomicU64,
}

#[derive(Default)]
struct State {
    subs: Vec<Sub>,
    /// Per queue group: the next member's turn. NATS groups members by queue name
    /// across every matching pattern, so this does too.
    turns: HashMap<String, usize>,
    logs: [LogState; 2],
    queue: WorkQueue,
}

/// The workers' durable consumer of the chat work queue.
#[derive(Default)]
struct WorkQueue {
    /// `None` until the first [`Bus::consume`].
    settings: Option<ConsumerSettings>,
    /// Per request delivered at least once and still in the log, by sequence.
    out: HashMap<u64, Out>,
}

/// A request delivered at least once and not acked.
struct Out {
    delivered: u64,
    /// Not to be delivered again before this: the ack deadline, or a nak's delay
    /// (`None`: deliverable now).
    until: Option<Instant>,
}

struct Sub {
    pattern: String,
    queue: Option<String>,
    tx: mpsc::Sender<Message>,
}

#[derive(Default)]
struct LogState {
    /// Ascending sequences, with when each was stored for the age limit. Contiguous
    /// in the events log (only the oldest are ever dropped), which followers rely on;
    /// the work queue also loses acked requests from the middle.
    entries: VecDeque<(Instant, Stored)>,
    last: u64,
    /// Message ids stored within the duplicate window, and when.
    ids: HashMap<String, Instant>,
    /// The same ids oldest first, to expire them; an id stored again after it
    /// expired appears twice, and only its newest entry counts.
    id_order: VecDeque<(Instant, String)>,
}

/// What became of a message offered to a log.
struct Appended {
    seq: u64,
    duplicate: bool,
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBus")
            .field("subjects", &self.shared.subjects)
            .field("connected", &self.connected())
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl MemoryBus {
    /// Messages queued per subscription before later ones are dropped: the capacity
    /// the NATS client is given (`crate::nats::NATS_SUBSCRIPTION_CAPACITY`), so a
    /// test sees slow-consumer losses where production would.
    pub const SUBSCRIPTION_CAPACITY: usize = 4096;
    /// Messages a log keeps at most, the oldest dropped first: bounds a long test's
    /// memory (the real streams allow more, which no in-process test needs).
    pub const LOG_CAPACITY: usize = 100_000;

    /// A bus whose logs capture the subjects of `subjects`, as the streams of a
    /// deployment with that prefix do.
    pub fn new(subjects: Subjects) -> MemoryBus {
        MemoryBus {
            shared: Arc::new(Shared {
                subjects,
                connected: AtomicBool::new(true),
                dropped: AtomicU64::new(0),
                next_inbox: AtomicU64::new(0),
                state: Mutex::new(State::default()),
                appended: [watch::Sender::new(0), watch::Sender::new(0)],
                losses: AtomicU64::new(0),
            }),
        }
    }

    /// Simulates a NATS outage (`false`) and its end (`true`): meanwhile every call
    /// fails and nothing is delivered, not even a follower's backlog. Subscriptions
    /// and follows survive it, as the client's do across a reconnect.
    pub fn set_connected(&self, connected: bool) {
        let was = self.shared.connected.swap(connected, Ordering::AcqRel);
        if was && !connected {
            self.shared.losses.fetch_add(1, Ordering::AcqRel);
        }
        for appended in &self.shared.appended {
            // Wakes followers paused by the outage (the sequence is unchanged).
            appended.send_modify(|_| {});
        }
    }

    /// Messages lost so far because a subscriber's queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    fn up(&self) -> Result<(), BusError> {
        if self.connected() {
            Ok(())
        } else {
            Err(BusError::Nats("disconnected".to_owned()))
        }
    }
}

fn slot(log: Log) -> usize {
    match log {
        Log::ChatRequests => 0,
        Log::ChatEvents => 1,
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The log whose stream captures `subject`, if any.
    fn log_of(&self, subject: &str) -> Option<Log> {
        if subject_matches(&self.subjects.chat_requests(), subject) {
            Some(Log::ChatRequests)
        } else if subject_matches(&self.subjects.chat_events_all(), subject) {
            Some(Log::ChatEvents)
        } else {
            None
        }
    }

    fn stream_name(&self, log: Log) -> String {
        match log {
            Log::ChatRequests => stream_name(&self.subjects),
            Log::ChatEvents => events_stream_name(&self.subjects),
        }
    }

    /// What a NATS server does with a message: stores it if a stream captures its
    /// subject (acknowledging a request), hands it to core subscribers. Returns how
    /// many would answer a request (subscribers, queue groups, the stream).
    fn route(&self, state: &mut State, message: Message) -> usize {
        let mut responders = 0;
        if let Some(log) = self.log_of(&message.subject) {
            let id = message.header(MSG_ID_HEADER).map(str::to_owned);
            let appended = self.append(state, log, message.clone(), id.as_deref());
            if let Some(reply) = &message.reply {
                let ack = serde_json::json!({
                    "stream": self.stream_name(log),
                    "seq": appended.seq,
                    "duplicate": appended.duplicate,
                });
                let ack = Message {
                    subject: reply.clone(),
                    payload: Bytes::from(ack.to_string()),
                    ..Message::default()
                };
                self.deliver(state, &ack);
            }
            responders += 1;
        }
        responders + self.deliver(state, &message)
    }

    /// Hands `message` to every matching plain subscriber and to one member of each
    /// matching queue group; returns how many subscribers and groups matched.
    fn deliver(&self, state: &mut State, message: &Message) -> usize {
        // Dropped subscriptions go here: a closed queue is a dropped stream.
        state.subs.retain(|s| !s.tx.is_closed());
        let mut matched = 0;
        let mut groups: Vec<(&str, Vec<&Sub>)> = Vec::new();
        for sub in &state.subs {
            if !subject_matches(&sub.pattern, &message.subject) {
                continue;
            }
            match &sub.queue {
                None => {
                    matched += 1;
                    self.send(sub, message);
                }
                Some(q) => match groups.iter_mut().find(|(name, _)| name == q) {
                    Some((_, members)) => members.push(sub),
                    None => groups.push((q, vec![sub])),
                },
            }
        }
        for (name, members) in groups {
            matched += 1;
            let turn = state.turns.entry(name.to_owned()).or_default();
            let member = members[*turn % members.len()];
            *turn = turn.wrapping_add(1);
            self.send(member, message);
        }
        matched
    }

    /// Never waits: a full queue loses the message, as NATS drops messages for a
    /// slow consumer rather than slow down the publisher.
    fn send(&self, sub: &Sub, message: &Message) {
        if let Err(mpsc::error::TrySendError::Full(_)) = sub.tx.try_send(message.clone()) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Appends to `log` unless `id` was stored within the duplicate window; drops
    /// what the stream's limits (age, count) no longer keep.
    fn append(&self, state: &mut State, log: Log, message: Message, id: Option<&str>) -> Appended {
        let now = Instant::now();
        let max_age = match log {
            Log::ChatRequests => CHAT_MAX_AGE,
            Log::ChatEvents => CHAT_EVENTS_MAX_AGE,
        };
        let window = DUPLICATE_WINDOW.min(max_age);
        let l = &mut state.logs[slot(log)];
        while let Some((at, id)) = l.id_order.front() {
            if now.duration_since(*at) < window && l.id_order.len() <= MemoryBus::LOG_CAPACITY {
                break;
            }
            if l.ids.get(id) == Some(at) {
                l.ids.remove(id);
            }
            l.id_order.pop_front();
        }
        if let Some(id) = id {
            if l.ids.contains_key(id) {
                // JetStream acknowledges a duplicate with the sequence of the first.
                let seq = l
                    .entries
                    .iter()
                    .rev()
                    .find(|(_, s)| s.message.header(MSG_ID_HEADER) == Some(id))
                    .map_or(l.last, |(_, s)| s.seq);
                return Appended {
                    seq,
                    duplicate: true,
                };
            }
            l.ids.insert(id.to_owned(), now);
            l.id_order.push_back((now, id.to_owned()));
        }
        l.last += 1;
        let seq = l.last;
        // A stored message is not a request: followers see no reply subject.
        let message = Message {
            reply: None,
            ..message
        };
        l.entries.push_back((now, Stored { seq, message }));
        while l.entries.len() > MemoryBus::LOG_CAPACITY
            || l.entries
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) >= max_age)
        {
            if let Some((_, dropped)) = l.entries.pop_front()
                && log == Log::ChatRequests
            {
                state.queue.out.remove(&dropped.seq);
            }
        }
        self.appended[slot(log)].send_replace(seq);
        Appended {
            seq,
            duplicate: false,
        }
    }
}

impl Shared {
    /// Hands out up to `max` deliverable requests of the work queue, oldest first,
    /// and drops those delivered `max_deliver` times. Also returns when the next one
    /// held back (un-acked, or nak'd with a delay) becomes deliverable.
    fn take(
        &self,
        me: &Weak<Shared>,
        max: usize,
        now: Instant,
    ) -> (Vec<Delivery>, Option<Instant>) {
        let mut state = self.lock();
        let State { logs, queue, .. } = &mut *state;
        let Some(settings) = queue.settings else {
            return (Vec::new(), None);
        };
        let log = &mut logs[slot(Log::ChatRequests)];
        let unlimited = |n: i64| u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(u64::MAX);
        let max_deliver = unlimited(settings.max_deliver);
        let max_ack_pending = unlimited(settings.max_ack_pending);
        let held = |o: &Out| o.until.is_some_and(|t| t > now);
        let mut ack_pending = queue.out.values().filter(|o| held(o)).count() as u64;
        let mut got = Vec::new();
        let mut exhausted = Vec::new();
        for (_, stored) in &log.entries {
            if got.len() >= max || ack_pending >= max_ack_pending {
                break;
            }
            let delivered = match queue.out.get(&stored.seq) {
                Some(o) if held(o) => continue,
                Some(o) => o.delivered,
                None => 0,
            };
            if delivered >= max_deliver {
                exhausted.push(stored.seq);
                continue;
            }
            let delivered = delivered + 1;
            queue.out.insert(
                stored.seq,
                Out {
                    delivered,
                    until: Some(now + settings.ack_wait),
                },
            );
            ack_pending += 1;
            got.push(Delivery::new(
                stored.message.clone(),
                delivered,
                stored.seq,
                Box::new(MemoryAcker {
                    shared: me.clone(),
                    seq: stored.seq,
                    delivered,
                }),
            ));
        }
        for seq in exhausted {
            remove_request(log, &mut queue.out, seq);
        }
        let next = queue
            .out
            .values()
            .filter_map(|o| o.until.filter(|&t| t > now))
            .min();
        (got, next)
    }

    /// Wakes pulls waiting for a request to become deliverable.
    fn queue_changed(&self) {
        self.appended[slot(Log::ChatRequests)].send_modify(|_| {});
    }
}

/// Takes request `seq` out of the work queue for good.
fn remove_request(log: &mut LogState, out: &mut HashMap<u64, Out>, seq: u64) {
    out.remove(&seq);
    if let Ok(i) = log.entries.binary_search_by_key(&seq, |(_, s)| s.seq) {
        log.entries.remove(i);
    }
}

/// A handle on the work queue's consumer; holds the bus weakly, like a follower.
struct MemoryConsumer {
    shared: Weak<Shared>,
}

/// One pull's place: what it may still take, until when, what it took.
struct Pull {
    shared: Weak<Shared>,
    left: usize,
    deadline: Instant,
    /// Changes whenever a request may have become deliverable.
    wake: watch::Receiver<u64>,
    ready: VecDeque<Delivery>,
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn pull(&self, max: usize, expires: Duration) -> Result<Deliveries, BusError> {
        let Some(shared) = self.shared.upgrade() else {
            return Err(BusError::Nats("the bus is gone".to_owned()));
        };
        if !shared.connected.load(Ordering::Acquire) {
            return Err(BusError::Nats("disconnected".to_owned()));
        }
        let pull = Pull {
            shared: self.shared.clone(),
            left: max,
            deadline: Instant::now() + expires,
            wake: shared.appended[slot(Log::ChatRequests)].subscribe(),
            ready: VecDeque::new(),
        };
        drop(shared);
        let deliveries = futures_util::stream::unfold(pull, |mut p| async move {
            loop {
                if let Some(d) = p.ready.pop_front() {
                    return Some((Ok(d), p));
                }
                let now = Instant::now();
                if p.left == 0 || now >= p.deadline {
                    return None;
                }
                // Marked seen before looking, so a change after the look wakes us.
                p.wake.borrow_and_update();
                let mut until = p.deadline;
                {
                    let shared = p.shared.upgrade()?;
                    // In an outage nothing is delivered; the pull just expires.
                    if shared.connected.load(Ordering::Acquire) {
                        let (got, next) = shared.take(&p.shared, p.left, now);
                        p.left -= got.len();
                        p.ready.extend(got);
                        if let Some(next) = next {
                            until = until.min(next);
                        }
                    }
                }
                if !p.ready.is_empty() {
                    continue;
                }
                tokio::select! {
                    changed = p.wake.changed() => changed.ok()?,
                    _ = tokio::time::sleep_until(until) => {}
                }
            }
        })
        .boxed();
        Ok(deliveries)
    }
}

/// Acknowledges one delivery of the work queue.
struct MemoryAcker {
    shared: Weak<Shared>,
    seq: u64,
    /// Which delivery this is: a nak or progress of an earlier one (redelivered
    /// since) changes nothing.
    delivered: u64,
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn send(&self, kind: AckKind) -> Result<(), BusError> {
        let Some(shared) = self.shared.upgrade() else {
            return Err(BusError::Nats("the bus is gone".to_owned()));
        };
        if !shared.connected.load(Ordering::Acquire) {
            return Err(BusError::Nats("disconnected".to_owned()));
        }
        let now = Instant::now();
        {
            let mut state = shared.lock();
            let State { logs, queue, .. } = &mut *state;
            let ack_wait = queue.settings.map(|s| s.ack_wait).unwrap_or_default();
            let current = queue
                .out
                .get_mut(&self.seq)
                .filter(|o| o.delivered == self.delivered);
            match (kind, current) {
                (AckKind::Ack | AckKind::Term, _) => {
                    remove_request(&mut logs[slot(Log::ChatRequests)], &mut queue.out, self.seq)
                }
                (AckKind::Nak(delay), Some(o)) => o.until = delay.map(|d| now + d),
                (AckKind::Progress, Some(o)) => o.until = Some(now + ack_wait),
                _ => {}
            }
        }
        shared.queue_changed();
        Ok(())
    }
}

#[async_trait]
impl Bus for MemoryBus {
    fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }

    async fn publish(
        &self,
        subject: String,
        headers: Vec<(String, String)>,
        payload: Bytes,
    ) -> Result<(), BusError> {
        self.up()?;
        let message = Message {
            subject,
            reply: None,
            headers,
            payload,
        };
        let mut state = self.shared.lock();
        self.shared.route(&mut state, message);
        Ok(())
    }

    async fn subscribe(
        &self,
        subject: String,
        queue: Option<String>,
    ) -> Result<Subscription, BusError> {
        self.up()?;
        let (tx, mut rx) = mpsc::channel(MemoryBus::SUBSCRIPTION_CAPACITY);
        let mut state = self.shared.lock();
        state.subs.retain(|s| !s.tx.is_closed());
        state.subs.push(Sub {
            pattern: subject,
            queue,
            tx,
        });
        Ok(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed())
    }

    async fn request(
        &self,
        subject: String,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, BusError> {
        self.up()?;
        let n = self.shared.next_inbox.fetch_add(1, Ordering::Relaxed);
        let inbox = format!("_INBOX.{n}");
        // One answer is all a request takes; later ones find the queue full or
        // closed, as they find no interest on NATS.
        let (tx, mut rx) = mpsc::channel(1);
        {
            let mut state = self.shared.lock();
            state.subs.push(Sub {
                pattern: inbox.clone(),
                queue: None,
                tx,
            });
            let message = Message {
                subject,
                reply: Some(inbox),
                headers: Vec::new(),
                payload,
            };
            if self.shared.route(&mut state, message) == 0 {
                return Err(BusError::NoResponders);
            }
        }
        match tokio::time::timeout(timeout, rx.recv()).await {
            Ok(Some(answer)) => Ok(answer),
            Ok(None) | Err(_) => Err(BusError::Timeout(timeout)),
        }
    }

    async fn flush(&self, _timeout: Duration) -> Result<(), BusError> {
        // Every call above delivered before it returned: nothing is in flight.
        self.up()
    }

    async fn store(
        &self,
        log: Log,
        subject: String,
        id: &str,
        mut headers: Vec<(String, String)>,
        payload: Bytes,
        _timeout: Duration,
    ) -> Result<(), BusError> {
        self.up()?;
        if self.shared.log_of(&subject) != Some(log) {
            // On NATS the publish would reach another stream or none: a caller bug
            // either way, better found here.
            return Err(BusError::JetStream(format!(
                "subject {subject} is not in stream {}",
                self.shared.stream_name(log)
            )));
        }
        // On NATS the id travels as a header, so readers see it there too.
        headers.retain(|(k, _)| k != MSG_ID_HEADER);
        headers.push((MSG_ID_HEADER.to_owned(), id.to_owned()));
        let message = Message {
            subject,
            reply: None,
            headers,
            payload,
        };
        let mut state = self.shared.lock();
        self.shared.route(&mut state, message);
        Ok(())
    }

    async fn prepare(&self, _log: Log) -> Result<(), BusError> {
        // The logs always exist; only an outage fails this, as it fails on NATS.
        self.up()
    }

    async fn follow(&self, log: Log, after: Option<u64>) -> Result<Follow, BusError> {
        self.up()?;
        if log == Log::ChatRequests {
            // As on NATS: a work queue takes only the workers' consumer.
            return Err(BusError::JetStream(
                "the chat work queue is read by the workers' consumer only".into(),
            ));
        }
        let i = slot(log);
        let last = {
            let state = self.shared.lock();
            state.logs[i].last
        };
        let reader = Reader {
            shared: Arc::downgrade(&self.shared),
            slot: i,
            next: after.unwrap_or(last) + 1,
            wake: self.shared.appended[i].subscribe(),
            batch: VecDeque::new(),
        };
        let messages = futures_util::stream::unfold(reader, |mut r| async move {
            loop {
                // Marked seen before looking, so a change after the look wakes us.
                r.wake.borrow_and_update();
                match r.step() {
                    Step::Ready(stored) => return Some((Ok(stored), r)),
                    Step::Wait => r.wake.changed().await.ok()?,
                    Step::Gone => return None,
                }
            }
        })
        .boxed();
        Ok(Follow { last, messages })
    }

    async fn consume(&self, settings: ConsumerSettings) -> Result<Box<dyn Consumer>, BusError> {
        self.up()?;
        self.shared.lock().queue.settings = Some(settings);
        // New limits may let waiting pulls take more.
        self.shared.queue_changed();
        Ok(Box::new(MemoryConsumer {
            shared: Arc::downgrade(&self.shared),
        }))
    }

    async fn backlog(&self) -> Result<Backlog, BusError> {
        self.up()?;
        let state = self.shared.lock();
        if state.queue.settings.is_none() {
            return Err(BusError::JetStream("consumer not found".to_owned()));
        }
        let stored = state.logs[slot(Log::ChatRequests)].entries.len() as u64;
        let ack_pending = state.queue.out.len() as u64;
        Ok(Backlog {
            pending: stored.saturating_sub(ack_pending),
            ack_pending,
        })
    }

    fn connection_losses(&self) -> u64 {
        self.shared.losses.load(Ordering::Acquire)
    }
}

/// One follower's place in a log.
struct Reader {
    shared: Weak<Shared>,
    slot: usize,
    next: u64,
    /// Changes on every append to the log and every switch of the outage.
    wake: watch::Receiver<u64>,
    batch: VecDeque<Stored>,
}

/// What a follower can do now.
enum Step {
    Ready(Stored),
    /// Nothing new, or an outage: nothing is delivered until it ends.
    Wait,
    /// The bus is gone, and with it the log.
    Gone,
}

impl Reader {
    fn step(&mut self) -> Step {
        let Some(shared) = self.shared.upgrade() else {
            return Step::Gone;
        };
        if !shared.connected.load(Ordering::Acquire) {
            return Step::Wait;
        }
        if self.batch.is_empty() {
            self.fill(&shared);
        }
        match self.batch.pop_front() {
            Some(stored) => Step::Ready(stored),
            None => Step::Wait,
        }
    }

    /// Copies the next stored messages into `batch`.
    fn fill(&mut self, shared: &Shared) {
        let state = shared.lock();
        let log = &state.logs[self.slot];
        let Some((_, first)) = log.entries.front() else {
            return;
        };
        // What the limits dropped is skipped, as a JetStream consumer skips it.
        let next = self.next.max(first.seq);
        let start = usize::try_from(next - first.seq)
            .unwrap_or(usize::MAX)
            .min(log.entries.len());
        self.batch.extend(
            log.entries
                .range(start..)
                .take(FOLLOW_BATCH)
                .map(|(_, s)| s.clone()),
        );
        if let Some(s) = self.batch.back() {
            self.next = s.seq + 1;
        }
    }
}
