//! Bus conformance: the same checks against [`NatsBus`] on a real `nats-server -js`
//! and against [`MemoryBus`], so that in-process tests of several nodes on the
//! memory bus mean something on NATS. Each check is one `async fn` taking any
//! [`Bus`]; [`conformance!`] makes one test per backend of it.
//!
//! Checks assert what callers may rely on, not what one backend happens to do: a
//! stored message seen by a core subscriber carries JetStream's ack inbox as its
//! reply subject on NATS and none in memory, so no check looks at it; headers of
//! different names come back in no defined order from async-nats (a `HashMap`), so
//! the checks compare them per name.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use shared::bus::memory::MemoryBus;
use shared::bus::nats::NatsBus;
use shared::bus::{
    Backlog, Bus, BusError, Consumer, ConsumerSettings, Delivery, Log, Message, Stored,
    Subscription,
};
use shared::subjects::Subjects;
use switchboard_testkit::Nats;

/// Generous bound for anything expected to arrive over loopback.
const WAIT: Duration = Duration::from_secs(10);
/// How long a check waits to be sure nothing (more) arrives.
const QUIET: Duration = Duration::from_millis(300);
/// Store acknowledgement bound given to `store`.
const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// A bus under test, and what keeps it running.
struct Backend {
    bus: Box<dyn Bus>,
    subjects: Subjects,
    _nats: Option<Nats>,
}

fn memory_backend(prefix: &str) -> Backend {
    let subjects = Subjects::new(prefix);
    Backend {
        bus: Box::new(MemoryBus::new(subjects.clone())),
        subjects,
        _nats: None,
    }
}

async fn nats_backend(prefix: &str) -> Backend {
    let nats = Nats::start().expect("nats-server");
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let subjects = Subjects::new(prefix);
    Backend {
        bus: Box::new(NatsBus::new(client, subjects.clone(), 1)),
        subjects,
        _nats: Some(nats),
    }
}

/// One test per backend for each check; the prefix is the check's name, so stream
/// names differ even if the tests ever share a server. Attributes before a check
/// apply to its NATS test only (an `#[ignore]` naming a known NatsBus bug).
macro_rules! conformance {
    ($($(#[$nats_attr:meta])* $check:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $check() {
                    let b = super::memory_backend(stringify!($check));
                    super::$check(&*b.bus, &b.subjects).await;
                }
            )*
        }
        mod nats {
            $(
                #[tokio::test]
                $(#[$nats_attr])*
                async fn $check() {
                    let b = super::nats_backend(stringify!($check)).await;
                    super::$check(&*b.bus, &b.subjects).await;
                }
            )*
        }
    };
}

conformance!(
    publish_subscribe_keeps_order_and_headers,
    wildcards_match_like_nats,
    queue_group_delivers_each_message_once,
    request_reply_roundtrip,
    request_without_responders_fails_at_once,
    flush_succeeds,
    store_deduplicates_by_id,
    store_deduplicates_by_id_with_headers,
    follow_from_now_sees_only_later_messages,
    follow_from_zero_sees_everything_in_order,
    chat_requests_reach_core_subscribers_and_are_not_followed,
    core_subscriber_receives_stored_message,
    core_publish_to_stream_subject_is_stored,
    request_to_stream_subject_is_acknowledged,
    dropped_subscription_stops_delivery,
    consume_delivers_each_request_once_and_ack_removes_it,
    unacked_request_is_redelivered_after_the_ack_wait,
    nak_redelivers_after_its_delay,
    in_progress_extends_the_ack_deadline,
    max_deliver_and_term_end_redelivery,
);

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Values per header name, each name's values in order.
fn by_name(headers: &[(String, String)]) -> BTreeMap<&str, Vec<&str>> {
    let mut map: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (k, v) in headers {
        map.entry(k.as_str()).or_default().push(v.as_str());
    }
    map
}

async fn next(sub: &mut Subscription) -> Message {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("a message within WAIT")
        .expect("the subscription ended")
}

async fn assert_quiet(sub: &mut Subscription) {
    if let Ok(m) = tokio::time::timeout(QUIET, sub.next()).await {
        panic!("nothing more expected, got {m:?}");
    }
}

async fn next_stored(follow: &mut shared::bus::Follow) -> Stored {
    tokio::time::timeout(WAIT, follow.messages.next())
        .await
        .expect("a stored message within WAIT")
        .expect("the follow ended")
        .expect("the follow failed")
}

async fn assert_follow_quiet(follow: &mut shared::bus::Follow) {
    if let Ok(m) = tokio::time::timeout(QUIET, follow.messages.next()).await {
        panic!("nothing more expected, got {m:?}");
    }
}

async fn subscribe(bus: &dyn Bus, subject: &str, queue: Option<&str>) -> Subscription {
    let sub = bus
        .subscribe(subject.to_owned(), queue.map(str::to_owned))
        .await
        .expect("subscribe");
    // On NATS the subscription must reach the server before anyone publishes.
    bus.flush(WAIT).await.expect("flush");
    sub
}

async fn publish(bus: &dyn Bus, subject: &str, hs: &[(&str, &str)], payload: &str) {
    bus.publish(
        subject.to_owned(),
        headers(hs),
        Bytes::from(payload.to_owned()),
    )
    .await
    .expect("publish");
}

async fn store(bus: &dyn Bus, log: Log, subject: &str, id: &str, hs: &[(&str, &str)], p: &str) {
    bus.store(
        log,
        subject.to_owned(),
        id,
        headers(hs),
        Bytes::from(p.to_owned()),
        STORE_TIMEOUT,
    )
    .await
    .expect("store");
}

fn payload(m: &Message) -> &str {
    std::str::from_utf8(&m.payload).expect("utf-8 payload")
}

async fn publish_subscribe_keeps_order_and_headers(bus: &dyn Bus, s: &Subjects) {
    let subject = s.user("u1");
    let mut sub = subscribe(bus, &subject, None).await;
    let hs = [("A", "1"), ("B", "x"), ("A", "2"), ("A", "3")];
    for i in 0..50 {
        publish(bus, &subject, &hs, &format!("m{i}")).await;
    }
    publish(bus, &subject, &[], "plain").await;
    for i in 0..50 {
        let m = next(&mut sub).await;
        assert_eq!(m.subject, subject);
        assert_eq!(payload(&m), format!("m{i}"), "messages in publish order");
        assert_eq!(by_name(&m.headers), by_name(&headers(&hs)));
        assert_eq!(m.header("A"), Some("1"));
        assert_eq!(m.header("B"), Some("x"));
    }
    let m = next(&mut sub).await;
    assert_eq!(payload(&m), "plain");
    assert!(m.headers.is_empty(), "{:?}", m.headers);
    assert_eq!(m.reply, None);
    assert_quiet(&mut sub).await;
}

async fn wildcards_match_like_nats(bus: &dyn Bus, s: &Subjects) {
    let p = s.prefix();
    let mut star = subscribe(bus, &format!("{p}.user.*"), None).await;
    let mut rest = subscribe(bus, &format!("{p}.ch.>"), None).await;
    publish(bus, &format!("{p}.user.u1"), &[], "one").await;
    publish(bus, &format!("{p}.user.u1.deep"), &[], "not-star").await;
    publish(bus, &format!("{p}.ch"), &[], "not-rest").await;
    publish(bus, &format!("{p}.ch.team.a"), &[], "two").await;
    publish(bus, &format!("{p}.ch.team"), &[], "three").await;
    let m = next(&mut star).await;
    assert_eq!(
        (m.subject.as_str(), payload(&m)),
        (&*format!("{p}.user.u1"), "one")
    );
    assert_quiet(&mut star).await;
    let m = next(&mut rest).await;
    assert_eq!(
        (m.subject.as_str(), payload(&m)),
        (&*format!("{p}.ch.team.a"), "two")
    );
    let m = next(&mut rest).await;
    assert_eq!(payload(&m), "three");
    assert_quiet(&mut rest).await;
}

async fn queue_group_delivers_each_message_once(bus: &dyn Bus, s: &Subjects) {
    const N: usize = 64;
    let subject = s.publish_rpc();
    let mut a = subscribe(bus, &subject, Some("g")).await;
    let mut b = subscribe(bus, &subject, Some("g")).await;
    let mut plain = subscribe(bus, &subject, None).await;
    for i in 0..N {
        publish(bus, &subject, &[], &i.to_string()).await;
    }
    let mut seen = Vec::new();
    let (mut from_a, mut from_b) = (0, 0);
    while seen.len() < N {
        tokio::select! {
            m = next(&mut a) => { from_a += 1; seen.push(payload(&m).to_owned()); }
            m = next(&mut b) => { from_b += 1; seen.push(payload(&m).to_owned()); }
        }
    }
    assert_quiet(&mut a).await;
    assert_quiet(&mut b).await;
    let distinct: BTreeSet<_> = seen.iter().collect();
    assert_eq!(
        distinct.len(),
        N,
        "each message once across the group: {seen:?}"
    );
    assert!(
        from_a > 0 && from_b > 0,
        "both members served: {from_a}/{from_b}"
    );
    for i in 0..N {
        assert_eq!(
            payload(&next(&mut plain).await),
            i.to_string(),
            "plain gets all"
        );
    }
}

async fn request_reply_roundtrip(bus: &dyn Bus, s: &Subjects) {
    let subject = s.user_context_rpc();
    let mut served = subscribe(bus, &subject, Some("workers")).await;
    let responder = async {
        let m = next(&mut served).await;
        let reply = m.reply.clone().expect("a request has a reply subject");
        let answer = format!("re:{}", payload(&m));
        bus.publish(reply, headers(&[("H", "v")]), Bytes::from(answer))
            .await
            .expect("answer");
    };
    let request = bus.request(subject.clone(), Bytes::from_static(b"ping"), WAIT);
    let ((), answer) = tokio::join!(responder, request);
    let answer = answer.expect("an answer");
    assert_eq!(payload(&answer), "re:ping");
    assert_eq!(answer.header("H"), Some("v"));
}

async fn request_without_responders_fails_at_once(bus: &dyn Bus, s: &Subjects) {
    let started = tokio::time::Instant::now();
    let r = bus
        .request(s.user_context_rpc(), Bytes::new(), Duration::from_secs(5))
        .await;
    assert!(matches!(r, Err(BusError::NoResponders)), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "not at once");
    let r = bus
        .request(s.publish_rpc(), Bytes::new(), Duration::from_millis(300))
        .await;
    assert!(matches!(r, Err(BusError::NoResponders)), "{r:?}");
}

async fn flush_succeeds(bus: &dyn Bus, s: &Subjects) {
    assert!(bus.connected());
    bus.flush(WAIT).await.expect("flush, nothing sent");
    publish(bus, &s.user("u1"), &[], "x").await;
    bus.flush(WAIT).await.expect("flush after a publish");
}

async fn store_deduplicates_by_id(bus: &dyn Bus, s: &Subjects) {
    dedupe(bus, s, &[]).await;
}

/// Stores carry headers (the request id, the final mark); the id must survive them.
async fn store_deduplicates_by_id_with_headers(bus: &dyn Bus, s: &Subjects) {
    dedupe(bus, s, &[("Sb-Request", "r1"), ("Sb-Final", "1")]).await;
}

async fn dedupe(bus: &dyn Bus, s: &Subjects, hs: &[(&str, &str)]) {
    let subject = s.chat_events("u1");
    store(bus, Log::ChatEvents, &subject, "id-1", hs, "first").await;
    store(bus, Log::ChatEvents, &subject, "id-1", hs, "again").await;
    store(bus, Log::ChatEvents, &subject, "id-2", hs, "second").await;
    let mut f = bus.follow(Log::ChatEvents, Some(0)).await.expect("follow");
    assert_eq!(f.last, 2, "the duplicate was not stored");
    let a = next_stored(&mut f).await;
    let b = next_stored(&mut f).await;
    assert_eq!((a.seq, payload(&a.message)), (1, "first"));
    assert_eq!((b.seq, payload(&b.message)), (2, "second"));
    assert_eq!(a.message.subject, subject);
    // The id travels as JetStream's de-duplication header; readers see it.
    assert_eq!(a.message.header("Nats-Msg-Id"), Some("id-1"));
    for (k, v) in hs {
        assert_eq!(a.message.header(k), Some(*v));
    }
    assert_follow_quiet(&mut f).await;
}

async fn follow_from_now_sees_only_later_messages(bus: &dyn Bus, s: &Subjects) {
    let subject = s.chat_events("u1");
    store(bus, Log::ChatEvents, &subject, "a", &[], "old-1").await;
    store(bus, Log::ChatEvents, &subject, "b", &[], "old-2").await;
    let mut f = bus.follow(Log::ChatEvents, None).await.expect("follow");
    assert_eq!(f.last, 2);
    store(bus, Log::ChatEvents, &s.chat_events("u2"), "c", &[], "new").await;
    let m = next_stored(&mut f).await;
    assert_eq!((m.seq, payload(&m.message)), (3, "new"));
    assert_eq!(m.message.subject, s.chat_events("u2"));
    assert_follow_quiet(&mut f).await;
}

async fn follow_from_zero_sees_everything_in_order(bus: &dyn Bus, s: &Subjects) {
    let empty = bus.follow(Log::ChatEvents, Some(0)).await.expect("follow");
    assert_eq!(empty.last, 0);
    for i in 1..=5 {
        let subject = s.chat_events(&format!("u{i}"));
        store(
            bus,
            Log::ChatEvents,
            &subject,
            &format!("id{i}"),
            &[],
            &format!("p{i}"),
        )
        .await;
    }
    let mut f = bus.follow(Log::ChatEvents, Some(0)).await.expect("follow");
    assert_eq!(f.last, 5);
    for i in 1..=5u64 {
        let m = next_stored(&mut f).await;
        assert_eq!((m.seq, payload(&m.message)), (i, &*format!("p{i}")));
    }
    // Live ones follow the backlog, and the earlier (empty) read sees them too.
    store(bus, Log::ChatEvents, &s.chat_events("u6"), "id6", &[], "p6").await;
    let m = next_stored(&mut f).await;
    assert_eq!((m.seq, payload(&m.message)), (6, "p6"));
    let mut empty = empty;
    for i in 1..=6u64 {
        assert_eq!(next_stored(&mut empty).await.seq, i);
    }
    // From the middle.
    let mut mid = bus.follow(Log::ChatEvents, Some(4)).await.expect("follow");
    assert_eq!(mid.last, 6);
    assert_eq!(next_stored(&mut mid).await.seq, 5);
    assert_eq!(next_stored(&mut mid).await.seq, 6);
    assert_follow_quiet(&mut mid).await;
}

async fn chat_requests_reach_core_subscribers_and_are_not_followed(bus: &dyn Bus, s: &Subjects) {
    let subject = s.chat_requests();
    let mut core = subscribe(bus, &subject, None).await;
    store(
        bus,
        Log::ChatRequests,
        &subject,
        "req-1",
        &[("Sb-Request", "r1")],
        "q1",
    )
    .await;
    let m = next(&mut core).await;
    assert_eq!((payload(&m), m.header("Sb-Request")), ("q1", Some("r1")));
    // The work queue is the workers' consumer's alone.
    assert!(matches!(
        bus.follow(Log::ChatRequests, Some(0)).await,
        Err(BusError::JetStream(_))
    ));
}

async fn core_subscriber_receives_stored_message(bus: &dyn Bus, s: &Subjects) {
    let mut one = subscribe(bus, &s.chat_events("u1"), None).await;
    let mut all = subscribe(bus, &s.chat_events_all(), None).await;
    store(
        bus,
        Log::ChatEvents,
        &s.chat_events("u1"),
        "f1",
        &[("Sb-Final", "1")],
        "fin",
    )
    .await;
    for sub in [&mut one, &mut all] {
        let m = next(sub).await;
        assert_eq!(m.subject, s.chat_events("u1"));
        assert_eq!(payload(&m), "fin");
        assert_eq!(m.header("Sb-Final"), Some("1"));
    }
    assert_quiet(&mut one).await;
}

/// JetStream stores what a stream's subjects receive, however it was published.
async fn core_publish_to_stream_subject_is_stored(bus: &dyn Bus, s: &Subjects) {
    let mut f = bus.follow(Log::ChatEvents, None).await.expect("follow");
    publish(bus, &s.chat_events("u9"), &[("K", "v")], "core").await;
    let m = next_stored(&mut f).await;
    assert_eq!((m.seq, payload(&m.message)), (1, "core"));
    assert_eq!(m.message.header("K"), Some("v"));
    // Not a stream subject: not stored.
    publish(bus, &s.user("u9"), &[], "elsewhere").await;
    assert_follow_quiet(&mut f).await;
}

/// A request to a stream's subject is a JetStream publish: the stream answers.
async fn request_to_stream_subject_is_acknowledged(bus: &dyn Bus, s: &Subjects) {
    // The stream exists once the bus has touched it (NATS creates it on first use).
    let mut f = bus.follow(Log::ChatEvents, None).await.expect("follow");
    let ack = bus
        .request(
            s.chat_events("u1"),
            Bytes::from_static(b"via-request"),
            WAIT,
        )
        .await
        .expect("a JetStream acknowledgement");
    let ack: serde_json::Value = serde_json::from_slice(&ack.payload).expect("JSON ack");
    assert_eq!(ack["seq"], 1, "{ack}");
    assert_eq!(
        ack["stream"],
        shared::bus::stream::events_stream_name(s).as_str(),
        "{ack}"
    );
    let m = next_stored(&mut f).await;
    assert_eq!((m.seq, payload(&m.message)), (1, "via-request"));
}

async fn dropped_subscription_stops_delivery(bus: &dyn Bus, s: &Subjects) {
    let subject = s.ctl_disconnect();
    let mut sub = subscribe(bus, &subject, None).await;
    let mut other = subscribe(bus, &subject, None).await;
    publish(bus, &subject, &[], "before").await;
    assert_eq!(payload(&next(&mut sub).await), "before");
    drop(sub);
    publish(bus, &subject, &[], "after").await;
    bus.flush(WAIT).await.expect("flush");
    assert_eq!(payload(&next(&mut other).await), "before");
    assert_eq!(payload(&next(&mut other).await), "after");
    drop(other);
    bus.flush(WAIT).await.expect("flush");
    // Nobody listens any more: a request says so.
    let r = bus
        .request(subject.clone(), Bytes::new(), Duration::from_secs(2))
        .await;
    assert!(matches!(r, Err(BusError::NoResponders)), "{r:?}");
    publish(bus, &subject, &[], "to-nobody").await;
}

// What only the memory bus has: the outage switch, the slow-consumer drop, its bounds.

/// The consumer's settings in the checks: the ack wait is what most of them wait
/// out, so it is short (JetStream takes whole seconds well).
fn consumer_settings(ack_wait: Duration, max_deliver: i64) -> ConsumerSettings {
    ConsumerSettings {
        ack_wait,
        max_deliver,
        max_ack_pending: 1000,
    }
}

/// Everything one pull delivers: it ends after `max` deliveries or at `expires`.
async fn pull(c: &dyn Consumer, max: usize, expires: Duration) -> Vec<Delivery> {
    let mut deliveries = c.pull(max, expires).await.expect("pull");
    let mut got = Vec::new();
    tokio::time::timeout(expires + WAIT, async {
        while let Some(d) = deliveries.next().await {
            got.push(d.expect("a delivery"));
        }
    })
    .await
    .expect("the pull ends after its expiry");
    got
}

/// The first delivery within `WAIT`.
async fn pull_one(c: &dyn Consumer) -> Delivery {
    let mut got = pull(c, 1, WAIT).await;
    assert_eq!(got.len(), 1, "one delivery within WAIT");
    got.remove(0)
}

async fn store_request(bus: &dyn Bus, s: &Subjects, id: &str) {
    store(bus, Log::ChatRequests, &s.chat_requests(), id, &[], id).await;
}

/// Waits until the backlog is `want` (acks are fire and forget: JetStream applies
/// them a moment later).
async fn wait_backlog(bus: &dyn Bus, want: Backlog) {
    let start = tokio::time::Instant::now();
    loop {
        let b = bus.backlog().await.expect("backlog");
        if b == want {
            return;
        }
        assert!(start.elapsed() < WAIT, "backlog {b:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn consume_delivers_each_request_once_and_ack_removes_it(bus: &dyn Bus, s: &Subjects) {
    for id in ["r1", "r2", "r3"] {
        store_request(bus, s, id).await;
    }
    // Two workers share the one durable consumer.
    let settings = consumer_settings(Duration::from_secs(5), 3);
    let c1 = bus.consume(settings).await.expect("consume");
    let c2 = bus.consume(settings).await.expect("consume");
    wait_backlog(
        bus,
        Backlog {
            pending: 3,
            ack_pending: 0,
        },
    )
    .await;
    let mut got = pull(&*c1, 2, WAIT).await;
    assert_eq!(got.len(), 2, "no more than asked for");
    got.extend(pull(&*c2, 10, Duration::from_secs(1)).await);
    let seen: Vec<(&str, u64)> = got
        .iter()
        .map(|d| (payload(&d.message), d.delivered))
        .collect();
    assert_eq!(
        seen,
        [("r1", 1), ("r2", 1), ("r3", 1)],
        "each once, in order"
    );
    assert!(got.windows(2).all(|w| w[0].seq < w[1].seq), "{got:?}");
    assert!(
        pull(&*c1, 10, QUIET).await.is_empty(),
        "nothing while all are out"
    );
    wait_backlog(
        bus,
        Backlog {
            pending: 0,
            ack_pending: 3,
        },
    )
    .await;
    for d in &got {
        d.ack().await.expect("ack");
    }
    wait_backlog(bus, Backlog::default()).await;
    assert!(
        pull(&*c2, 10, Duration::from_secs(1)).await.is_empty(),
        "acked requests are gone"
    );
}

async fn unacked_request_is_redelivered_after_the_ack_wait(bus: &dyn Bus, s: &Subjects) {
    let ack_wait = Duration::from_secs(1);
    let c = bus
        .consume(consumer_settings(ack_wait, 5))
        .await
        .expect("consume");
    store_request(bus, s, "r1").await;
    let first = pull_one(&*c).await;
    let at = tokio::time::Instant::now();
    assert_eq!(first.delivered, 1);
    assert!(
        pull(&*c, 1, ack_wait / 2).await.is_empty(),
        "not within the ack wait"
    );
    let again = pull_one(&*c).await;
    assert!(at.elapsed() >= ack_wait * 8 / 10, "{:?}", at.elapsed());
    assert_eq!(
        (payload(&again.message), again.delivered, again.seq),
        ("r1", 2, first.seq)
    );
    again.ack().await.expect("ack");
    wait_backlog(bus, Backlog::default()).await;
}

async fn nak_redelivers_after_its_delay(bus: &dyn Bus, s: &Subjects) {
    let c = bus
        .consume(consumer_settings(Duration::from_secs(30), 5))
        .await
        .expect("consume");
    store_request(bus, s, "r1").await;
    let first = pull_one(&*c).await;
    let delay = Duration::from_secs(1);
    first.nak(Some(delay)).await.expect("nak");
    let at = tokio::time::Instant::now();
    assert!(
        pull(&*c, 1, delay / 2).await.is_empty(),
        "not before the delay"
    );
    let second = pull_one(&*c).await;
    assert!(at.elapsed() >= delay * 8 / 10, "{:?}", at.elapsed());
    assert_eq!(second.delivered, 2);
    // Without a delay: at once, long before the ack wait.
    second.nak(None).await.expect("nak");
    let third = tokio::time::timeout(Duration::from_secs(5), pull_one(&*c))
        .await
        .expect("redelivered at once");
    assert_eq!((payload(&third.message), third.delivered), ("r1", 3));
    third.ack().await.expect("ack");
    wait_backlog(bus, Backlog::default()).await;
}

async fn in_progress_extends_the_ack_deadline(bus: &dyn Bus, s: &Subjects) {
    let ack_wait = Duration::from_secs(1);
    let c = bus
        .consume(consumer_settings(ack_wait, 5))
        .await
        .expect("consume");
    store_request(bus, s, "r1").await;
    let d = pull_one(&*c).await;
    // Three ack waits long, with progress every 400 ms: never redelivered.
    for _ in 0..8 {
        assert!(
            pull(&*c, 1, Duration::from_millis(400)).await.is_empty(),
            "redelivered while in progress"
        );
        d.in_progress().await.expect("progress");
    }
    let again = pull_one(&*c).await;
    assert_eq!(again.delivered, 2, "redelivered once progress stopped");
    again.ack().await.expect("ack");
}

async fn max_deliver_and_term_end_redelivery(bus: &dyn Bus, s: &Subjects) {
    let c = bus
        .consume(consumer_settings(Duration::from_secs(30), 2))
        .await
        .expect("consume");
    store_request(bus, s, "r1").await;
    let first = pull_one(&*c).await;
    first.nak(None).await.expect("nak");
    let second = pull_one(&*c).await;
    assert_eq!(second.delivered, 2);
    second.nak(None).await.expect("nak");
    assert!(
        pull(&*c, 1, Duration::from_secs(1)).await.is_empty(),
        "no delivery beyond max_deliver"
    );
    store_request(bus, s, "r2").await;
    let d = pull_one(&*c).await;
    assert_eq!(payload(&d.message), "r2");
    d.term().await.expect("term");
    assert!(
        pull(&*c, 1, Duration::from_secs(1)).await.is_empty(),
        "a terminated request is not delivered again"
    );
}

#[tokio::test]
async fn memory_work_queue_pulls_wait_out_outages() {
    let subjects = Subjects::new("memory_work_queue_outage");
    let bus = MemoryBus::new(subjects.clone());
    let c = bus
        .consume(consumer_settings(Duration::from_secs(30), 5))
        .await
        .expect("consume");
    store_request(&bus, &subjects, "r1").await;
    bus.set_connected(false);
    assert_eq!(bus.connection_losses(), 1);
    assert!(c.pull(1, WAIT).await.is_err(), "no pull in an outage");
    bus.set_connected(true);
    let mut deliveries = c.pull(1, WAIT).await.expect("pull");
    bus.set_connected(false);
    assert!(
        tokio::time::timeout(QUIET, deliveries.next())
            .await
            .is_err(),
        "nothing delivered in an outage"
    );
    bus.set_connected(true);
    let d = tokio::time::timeout(WAIT, deliveries.next())
        .await
        .expect("delivered once the outage ends")
        .expect("a delivery")
        .expect("not an error");
    bus.set_connected(false);
    assert!(d.ack().await.is_err(), "no ack in an outage");
    bus.set_connected(true);
    d.ack().await.expect("ack");
    assert_eq!(bus.backlog().await.expect("backlog"), Backlog::default());
}

#[tokio::test]
async fn memory_outage_fails_every_call_and_delivers_nothing() {
    let s = Subjects::new("outage");
    let bus = MemoryBus::new(s.clone());
    let mut sub = subscribe(&bus, &s.user("u1"), None).await;
    store(
        &bus,
        Log::ChatEvents,
        &s.chat_events("u1"),
        "x0",
        &[],
        "backlog",
    )
    .await;
    let mut f = bus.follow(Log::ChatEvents, Some(0)).await.expect("follow");
    bus.set_connected(false);
    assert!(!bus.connected());
    let down = |r: Result<(), BusError>| {
        assert!(
            matches!(&r, Err(BusError::Nats(m)) if m == "disconnected"),
            "{r:?}"
        );
    };
    down(bus.publish(s.user("u1"), vec![], Bytes::new()).await);
    down(bus.flush(WAIT).await);
    down(bus.subscribe(s.user("u1"), None).await.map(drop));
    down(
        bus.request(s.user("u1"), Bytes::new(), WAIT)
            .await
            .map(drop),
    );
    down(bus.follow(Log::ChatEvents, Some(0)).await.map(drop));
    down(bus.prepare(Log::ChatEvents).await);
    let stored = bus
        .store(
            Log::ChatEvents,
            s.chat_events("u1"),
            "x",
            vec![],
            Bytes::new(),
            WAIT,
        )
        .await;
    down(stored);
    assert_quiet(&mut sub).await;
    assert_follow_quiet(&mut f).await;
    // Subscriptions and follows outlive the outage, as the NATS client's do.
    bus.set_connected(true);
    publish(&bus, &s.user("u1"), &[], "back").await;
    assert_eq!(payload(&next(&mut sub).await), "back");
    store(
        &bus,
        Log::ChatEvents,
        &s.chat_events("u1"),
        "y",
        &[],
        "stored",
    )
    .await;
    assert_eq!(next_stored(&mut f).await.seq, 1);
}

#[tokio::test]
async fn memory_slow_consumer_loses_messages_without_blocking() {
    let s = Subjects::new("slow");
    let bus = MemoryBus::new(s.clone());
    let mut sub = subscribe(&bus, &s.user("u1"), None).await;
    let extra = 10;
    let total = MemoryBus::SUBSCRIPTION_CAPACITY + extra;
    tokio::time::timeout(WAIT, async {
        for i in 0..total {
            publish(&bus, &s.user("u1"), &[], &i.to_string()).await;
        }
    })
    .await
    .expect("publishing never waits for a subscriber");
    assert_eq!(bus.dropped(), extra as u64);
    // The oldest are kept, in order; the overflow is gone.
    assert_eq!(payload(&next(&mut sub).await), "0");
    for _ in 1..MemoryBus::SUBSCRIPTION_CAPACITY {
        next(&mut sub).await;
    }
    assert_quiet(&mut sub).await;
}

#[tokio::test]
async fn memory_log_keeps_its_newest_entries() {
    let s = Subjects::new("bounded");
    let bus = MemoryBus::new(s.clone());
    let cap = MemoryBus::LOG_CAPACITY as u64;
    for i in 0..cap + 2 {
        let subject = s.chat_events("u1");
        bus.publish(subject, vec![], Bytes::from(i.to_string()))
            .await
            .expect("publish");
    }
    let mut f = bus.follow(Log::ChatEvents, Some(0)).await.expect("follow");
    assert_eq!(f.last, cap + 2);
    let first = next_stored(&mut f).await;
    assert_eq!(first.seq, 3, "the two oldest were dropped");
    assert_eq!(payload(&first.message), "2");
}

#[tokio::test]
async fn memory_follow_ends_with_the_bus() {
    let s = Subjects::new("gone");
    let bus = MemoryBus::new(s.clone());
    let mut f = bus.follow(Log::ChatEvents, None).await.expect("follow");
    drop(bus);
    let end = tokio::time::timeout(WAIT, f.messages.next()).await;
    assert!(matches!(end, Ok(None)), "the read ends");
}

#[tokio::test]
async fn memory_bus_is_shared_between_nodes() {
    let s = Subjects::new("nodes");
    let bus: shared::bus::SharedBus = std::sync::Arc::new(MemoryBus::new(s.clone()));
    let node_a = bus.clone();
    let node_b = bus.clone();
    let mut sub = subscribe(&*node_b, &s.user("u1"), None).await;
    let task = tokio::spawn(async move {
        node_a
            .publish(s.user("u1"), vec![], Bytes::from_static(b"hi"))
            .await
    });
    task.await.expect("join").expect("publish");
    assert_eq!(payload(&next(&mut sub).await), "hi");
}
