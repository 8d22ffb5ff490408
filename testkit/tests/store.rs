//! The store contract, checked on both implementations: every behaviour below is one
//! `async fn check_…(&dyn Store)`, run once on `RedisStore` (its own `redis-server`,
//! or a cluster with `SB_TEST_REDIS=cluster`) and once on `MemoryStore`. Redis is
//! the reference: where the two differ, the memory store is wrong, so a test that
//! passes on the memory store says something about the product on Redis.
//!
//! Timing checks use short TTLs against long sleeps (a loaded machine stretches the
//! sleep, never the TTL), and long TTLs where a key must stay alive.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::json;
use shared::keys::Keys;
use shared::protocol::{Channel, HistoryMessage, UserContext};
use shared::store::memory::MemoryStore;
use shared::store::{
    Admission, ChannelSettings, ConnRecord, MAX_READ_OFFSET, NodeRecord, Position, PresenceEntry,
    RateDecision, RedisStore, SessionAccess, Store, now_ms,
};
use switchboard_testkit::TestRedis;

/// Long enough to outlive any test.
const LONG: Duration = Duration::from_secs(60);
/// Short enough to expire during [`PAST_SHORT`].
const SHORT: Duration = Duration::from_millis(150);
const PAST_SHORT: Duration = Duration::from_millis(450);

fn settings() -> ChannelSettings {
    ChannelSettings {
        history_size: 100,
        history_ttl: LONG,
        offset_ttl: LONG,
    }
}

fn channel(name: &str) -> Channel {
    Channel {
        namespace: "team".into(),
        name: name.into(),
    }
}

fn conn(user: &str, conn_id: &str, connected_at: u64) -> ConnRecord {
    ConnRecord {
        conn_id: conn_id.into(),
        user_id: user.into(),
        node: "node-1".into(),
        ip: "10.0.0.1".into(),
        connected_at,
    }
}

fn node(id: &str, connections: u64) -> NodeRecord {
    NodeRecord {
        node: id.into(),
        connections,
        started_at: 1_000,
        heartbeat_at: now_ms(),
        version: "1.2.3".into(),
    }
}

fn msg(role: &str, content: &str, request_id: &str) -> HistoryMessage {
    HistoryMessage {
        role: role.into(),
        content: content.into(),
        ts: 1_700_000_000_000,
        request_id: Some(request_id.into()),
    }
}

/// A request's user message and the assistant's reply.
fn exchange(request_id: &str) -> Vec<HistoryMessage> {
    vec![
        msg("user", &format!("question {request_id}"), request_id),
        msg("assistant", &format!("answer {request_id}"), request_id),
    ]
}

fn contents(h: &[HistoryMessage]) -> Vec<&str> {
    h.iter().map(|m| m.content.as_str()).collect()
}

async fn publish(store: &dyn Store, ch: &Channel, n: u64, s: &ChannelSettings) -> Vec<Position> {
    let mut out = Vec::new();
    for i in 0..n {
        let head = format!(r#"{{"type":"pub","n":{i},"offset":"#);
        out.push(
            store
                .publish_channel(ch, &head, "}", s)
                .await
                .expect("publish"),
        );
    }
    out
}

fn frame(i: u64, offset: u64) -> String {
    format!(r#"{{"type":"pub","n":{i},"offset":{offset}}}"#)
}

// === connections ===

async fn check_conn_limit(store: &dyn Store) {
    let (a, b, c) = (
        conn("u1", "c-a", 300),
        conn("u1", "c-b", 100),
        conn("u1", "c-c", 200),
    );
    assert_eq!(
        store.register_conn(&a, 2).await.unwrap(),
        Admission::Admitted
    );
    assert_eq!(
        store.register_conn(&b, 2).await.unwrap(),
        Admission::Admitted
    );
    assert_eq!(
        store.register_conn(&c, 2).await.unwrap(),
        Admission::OverLimit
    );
    // Oldest first, whatever the registration order.
    assert_eq!(
        store.user_connections("u1").await.unwrap(),
        vec![b.clone(), a.clone()]
    );
    store.unregister_conn("u1", &b.member()).await.unwrap();
    assert_eq!(
        store.register_conn(&c, 2).await.unwrap(),
        Admission::Admitted
    );
    assert_eq!(
        store.user_connections("u1").await.unwrap(),
        vec![c.clone(), a.clone()]
    );
    // 0 is no limit; other users count apart.
    assert_eq!(
        store.register_conn(&b, 0).await.unwrap(),
        Admission::Admitted
    );
    assert_eq!(store.user_connections("u1").await.unwrap().len(), 3);
    assert_eq!(
        store.register_conn(&conn("u2", "c-x", 1), 1).await.unwrap(),
        Admission::Admitted
    );
    assert!(store.user_connections("nobody").await.unwrap().is_empty());
    // An IP with the separator survives: it comes last in the member.
    let v6 = ConnRecord {
        ip: "fe80::1|x".into(),
        ..conn("u3", "c-v6", 5)
    };
    store.register_conn(&v6, 1).await.unwrap();
    assert_eq!(store.user_connections("u3").await.unwrap(), vec![v6]);
}

async fn check_refresh_does_not_resurrect(store: &dyn Store) {
    let (a, b) = (conn("u1", "c-a", 1), conn("u1", "c-b", 2));
    store.register_conn(&a, 0).await.unwrap();
    store.register_conn(&b, 0).await.unwrap();
    store.unregister_conn("u1", &a.member()).await.unwrap();
    let refresh = vec![
        ("u1".to_owned(), a.member()),
        ("u1".to_owned(), b.member()),
        // A user with no record at all is not created either.
        ("u2".to_owned(), conn("u2", "c-z", 3).member()),
    ];
    store.refresh_conns(&refresh).await.unwrap();
    assert_eq!(store.user_connections("u1").await.unwrap(), vec![b]);
    assert!(store.user_connections("u2").await.unwrap().is_empty());
    store.refresh_conns(&[]).await.unwrap();
}

// === nodes and tokens ===

async fn check_nodes(store: &dyn Store) {
    assert!(store.nodes().await.unwrap().is_empty());
    let (n2, n1, n3) = (node("n2", 7), node("n1", 3), node("n3", 1));
    store.node_heartbeat(&n2, LONG).await.unwrap();
    store.node_heartbeat(&n1, LONG).await.unwrap();
    store.node_heartbeat(&n3, SHORT).await.unwrap();
    assert_eq!(
        store.nodes().await.unwrap(),
        vec![n1.clone(), n2.clone(), n3.clone()]
    );
    tokio::time::sleep(PAST_SHORT).await;
    assert_eq!(store.nodes().await.unwrap(), vec![n1.clone(), n2.clone()]);
    // A heartbeat replaces the record.
    let n1b = NodeRecord {
        connections: 42,
        version: "1.2.4".into(),
        ..node("n1", 0)
    };
    store.node_heartbeat(&n1b, LONG).await.unwrap();
    store.remove_node("n2").await.unwrap();
    store.remove_node("never-there").await.unwrap();
    assert_eq!(store.nodes().await.unwrap(), vec![n1b]);
}

async fn check_revocations(store: &dyn Store) {
    assert!(store.revocations().await.unwrap().is_empty());
    let now_s = now_ms() / 1000;
    let exp = now_s + 3600;
    store.revoke("jti-1", exp).await.unwrap();
    store.revoke("jti-2", exp + 1).await.unwrap();
    // An `exp` already past is kept a moment (until the next second), not dropped.
    store.revoke("jti-old", 1).await.unwrap();
    let got: BTreeMap<String, u64> = store.revocations().await.unwrap().into_iter().collect();
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got["jti-1"], exp);
    assert_eq!(got["jti-2"], exp + 1);
    assert!((now_s + 1..=now_s + 2).contains(&got["jti-old"]), "{got:?}");
    // Revoking again moves `exp`.
    store.revoke("jti-1", exp + 10).await.unwrap();
    let got: BTreeMap<String, u64> = store.revocations().await.unwrap().into_iter().collect();
    assert_eq!(got["jti-1"], exp + 10);
    // The past one goes once its second is over.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let got: BTreeMap<String, u64> = store.revocations().await.unwrap().into_iter().collect();
    assert!(!got.contains_key("jti-old"), "{got:?}");
    assert_eq!(got.len(), 2);
}

async fn check_ping(store: &dyn Store) {
    store.ping().await.unwrap();
}

// === chat ===

async fn check_sessions(store: &dyn Store) {
    assert_eq!(store.session_owner("u1", "s1").await.unwrap(), None);
    assert_eq!(
        store.claim_session("s1", "u1").await.unwrap(),
        SessionAccess::Created
    );
    assert_eq!(
        store.claim_session("s1", "u1").await.unwrap(),
        SessionAccess::Owned
    );
    assert_eq!(
        store.session_owner("u1", "s1").await.unwrap().as_deref(),
        Some("u1")
    );
    // Another user's session of the same id is another session.
    assert_eq!(store.session_owner("u2", "s1").await.unwrap(), None);
    assert_eq!(
        store.claim_session("s1", "u2").await.unwrap(),
        SessionAccess::Created
    );
    assert_eq!(
        store.session_owner("u2", "s1").await.unwrap().as_deref(),
        Some("u2")
    );
}

async fn check_history(store: &dyn Store) {
    assert!(store.history("u1", "s1", 10).await.unwrap().is_empty());
    store.claim_session("s1", "u1").await.unwrap();
    assert!(
        store
            .append_history("s1", "u1", "r1", &exchange("r1"), 3)
            .await
            .unwrap()
    );
    // A redelivered request is recorded once.
    assert!(
        !store
            .append_history("s1", "u1", "r1", &exchange("r1"), 3)
            .await
            .unwrap()
    );
    assert!(
        store
            .append_history("s1", "u1", "r2", &exchange("r2"), 3)
            .await
            .unwrap()
    );
    // The window keeps the last three messages, oldest first.
    let all = store.history("u1", "s1", 10).await.unwrap();
    assert_eq!(contents(&all), ["answer r1", "question r2", "answer r2"]);
    assert_eq!(all[0], exchange("r1")[1]);
    let last = store.history("u1", "s1", 2).await.unwrap();
    assert_eq!(contents(&last), ["question r2", "answer r2"]);
    assert!(store.history("u1", "s1", 0).await.unwrap().is_empty());
    // Dedupe sees what the window kept: r1's answer is still there.
    assert!(
        !store
            .append_history("s1", "u1", "r1", &exchange("r1"), 3)
            .await
            .unwrap()
    );
    assert_eq!(
        store.recorded_reply("u1", "s1", "r1").await.unwrap(),
        Some(exchange("r1")[1].clone())
    );
    assert_eq!(
        store.recorded_reply("u1", "s1", "r2").await.unwrap(),
        Some(exchange("r2")[1].clone())
    );
    assert_eq!(store.recorded_reply("u1", "s1", "r9").await.unwrap(), None);
    // Once r1 slid out of the window, nothing remembers it.
    assert!(
        store
            .append_history("s1", "u1", "r3", &exchange("r3"), 3)
            .await
            .unwrap()
    );
    assert_eq!(store.recorded_reply("u1", "s1", "r1").await.unwrap(), None);
    assert!(
        store
            .append_history("s1", "u1", "r1", &exchange("r1"), 3)
            .await
            .unwrap()
    );
    let all = store.history("u1", "s1", 10).await.unwrap();
    assert_eq!(contents(&all), ["answer r3", "question r1", "answer r1"]);
    // Another user's session of the same id is untouched.
    assert!(store.history("u2", "s1", 10).await.unwrap().is_empty());
    // A window of 0 keeps one message.
    assert!(
        store
            .append_history("s1", "u1", "r4", &exchange("r4"), 0)
            .await
            .unwrap()
    );
    assert_eq!(
        contents(&store.history("u1", "s1", 10).await.unwrap()),
        ["answer r4"]
    );
}

async fn check_append_claims_a_lost_session(store: &dyn Store) {
    // The session record is gone (Redis restarted empty mid-request): appending
    // claims it again for the request's user.
    assert!(
        store
            .append_history("s9", "u9", "r1", &exchange("r1"), 10)
            .await
            .unwrap()
    );
    assert_eq!(
        store.session_owner("u9", "s9").await.unwrap().as_deref(),
        Some("u9")
    );
    assert_eq!(
        store.claim_session("s9", "u9").await.unwrap(),
        SessionAccess::Owned
    );
    assert_eq!(store.history("u9", "s9", 10).await.unwrap(), exchange("r1"));
    // Nothing to append still records the request's session.
    assert!(
        store
            .append_history("s8", "u9", "r1", &[], 10)
            .await
            .unwrap()
    );
    assert_eq!(
        store.session_owner("u9", "s8").await.unwrap().as_deref(),
        Some("u9")
    );
    assert!(store.history("u9", "s8", 10).await.unwrap().is_empty());
}

async fn check_chat_rate(store: &dyn Store) {
    let window = Duration::from_millis(300);
    assert_eq!(
        store.chat_rate("u1", 2, window).await.unwrap(),
        RateDecision::Allowed
    );
    assert_eq!(
        store.chat_rate("u1", 2, window).await.unwrap(),
        RateDecision::Allowed
    );
    match store.chat_rate("u1", 2, window).await.unwrap() {
        RateDecision::Limited(left) => {
            assert!(left > Duration::ZERO && left <= window, "{left:?}")
        }
        other => panic!("third request in the window: {other:?}"),
    }
    // Users count apart; a limit of 0 refuses everything.
    assert_eq!(
        store.chat_rate("u2", 2, window).await.unwrap(),
        RateDecision::Allowed
    );
    assert!(matches!(
        store.chat_rate("u3", 0, window).await.unwrap(),
        RateDecision::Limited(_)
    ));
    // A new window starts over.
    tokio::time::sleep(window + PAST_SHORT).await;
    assert_eq!(
        store.chat_rate("u1", 2, window).await.unwrap(),
        RateDecision::Allowed
    );
}

async fn check_context(store: &dyn Store) {
    assert_eq!(store.cached_context("u1").await.unwrap(), None);
    let ctx = UserContext {
        teams: vec![json!({"id": "team-1", "name": "Team One"})],
        tasks: vec![json!({"id": "task-1", "n": 1.5})],
        degraded: true,
    };
    store.cache_context("u1", &ctx).await.unwrap();
    let cached = store.cached_context("u1").await.unwrap().expect("cached");
    assert_eq!(
        cached,
        UserContext {
            degraded: false,
            ..ctx
        }
    );
    assert_eq!(store.cached_context("u2").await.unwrap(), None);
}

// === channels ===

async fn check_publish_offsets(store: &dyn Store) {
    let ch = channel("pub");
    let at = publish(store, &ch, 3, &settings()).await;
    assert_eq!(at.iter().map(|p| p.offset).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(at.iter().all(|p| p.epoch == at[0].epoch), "{at:?}");
    // The epoch is unix microseconds of the channel's start.
    let now_us = (now_ms() + 1) * 1000;
    assert!(
        at[0].epoch < now_us && at[0].epoch > now_us - 60_000_000,
        "{at:?}"
    );
    // Channels count apart.
    let other = publish(store, &channel("other"), 1, &settings()).await;
    assert_eq!(other[0].offset, 1);
}

async fn check_position(store: &dyn Store) {
    let ch = channel("pos");
    assert_eq!(store.channel_top(&ch).await.unwrap(), None);
    let start = store.channel_position(&ch, &settings()).await.unwrap();
    assert_eq!(start.offset, 0);
    assert_eq!(
        store.channel_position(&ch, &settings()).await.unwrap(),
        start
    );
    // The position marker is no publication.
    assert_eq!(store.channel_top(&ch).await.unwrap(), None);
    let at = publish(store, &ch, 2, &settings()).await;
    assert_eq!(
        at,
        [
            Position {
                epoch: start.epoch,
                offset: 1
            },
            Position {
                epoch: start.epoch,
                offset: 2
            }
        ]
    );
    assert_eq!(
        store.channel_position(&ch, &settings()).await.unwrap(),
        at[1]
    );
}

async fn check_channel_top(store: &dyn Store) {
    let ch = channel("top");
    let at = publish(store, &ch, 2, &settings()).await;
    assert_eq!(
        store.channel_top(&ch).await.unwrap(),
        Some((at[1], frame(1, 2)))
    );
    // Reading the top starts nothing.
    assert_eq!(store.channel_top(&channel("none")).await.unwrap(), None);
    assert_eq!(store.channel_top(&channel("none")).await.unwrap(), None);
}

async fn check_channel_since(store: &dyn Store) {
    let ch = channel("since");
    let s = settings();
    let at = publish(store, &ch, 3, &s).await;
    let epoch = at[0].epoch;
    let h = store.channel_since(&ch, 1, Some(epoch), &s).await.unwrap();
    assert_eq!((h.epoch, h.top), (epoch, 3));
    assert_eq!(h.frames, vec![(2, frame(1, 2)), (3, frame(2, 3))]);
    assert!(h.complete);
    let h = store.channel_since(&ch, 0, None, &s).await.unwrap();
    assert_eq!(h.frames.len(), 3);
    assert!(h.complete);
    // Nothing missed.
    let h = store.channel_since(&ch, 3, Some(epoch), &s).await.unwrap();
    assert!(h.frames.is_empty() && h.complete, "{h:?}");
    // Offsets of another epoch: the frames are this epoch's, never complete.
    let h = store
        .channel_since(&ch, 1, Some(epoch + 1), &s)
        .await
        .unwrap();
    assert_eq!((h.epoch, h.top, h.frames.len()), (epoch, 3, 2));
    assert!(!h.complete);
    // An offset beyond the top belongs to a count this channel no longer has.
    let h = store.channel_since(&ch, 5, Some(epoch), &s).await.unwrap();
    assert_eq!((h.top, h.frames.len(), h.complete), (3, 0, false));
    // A missing channel starts its position: nothing to miss at 0.
    let h = store
        .channel_since(&channel("fresh"), 0, None, &s)
        .await
        .unwrap();
    assert_eq!((h.top, h.frames.len(), h.complete), (0, 0, true));
    let started = store.channel_position(&channel("fresh"), &s).await.unwrap();
    assert_eq!(
        started,
        Position {
            epoch: h.epoch,
            offset: 0
        }
    );
}

async fn check_history_bounds(store: &dyn Store) {
    // Bounded by size: older publications are gone, so recovery from before them is
    // incomplete, from within them complete.
    let small = ChannelSettings {
        history_size: 2,
        ..settings()
    };
    let ch = channel("small");
    // A position marker counts as nothing once publications push it out.
    store.channel_position(&ch, &small).await.unwrap();
    let at = publish(store, &ch, 4, &small).await;
    assert_eq!(at[3].offset, 4);
    let h = store.channel_since(&ch, 0, None, &small).await.unwrap();
    assert_eq!(h.frames, vec![(3, frame(2, 3)), (4, frame(3, 4))]);
    assert!(!h.complete);
    let h = store.channel_since(&ch, 2, None, &small).await.unwrap();
    assert!(h.complete);
    assert_eq!(
        store.channel_range(&ch, at[0].epoch, 0, 5).await.unwrap(),
        Some(vec![(3, frame(2, 3)), (4, frame(3, 4))])
    );

    // Bounded by age: history older than `history_ttl` (after the last publication)
    // is not served, though the offsets go on.
    let short = ChannelSettings {
        history_ttl: SHORT,
        ..settings()
    };
    let ch = channel("aged");
    publish(store, &ch, 2, &short).await;
    tokio::time::sleep(PAST_SHORT).await;
    let h = store.channel_since(&ch, 0, None, &short).await.unwrap();
    assert_eq!((h.top, h.frames.len(), h.complete), (2, 0, false));
    let h = store.channel_since(&ch, 2, None, &short).await.unwrap();
    assert!(h.complete);
    let at = publish(store, &ch, 1, &short).await;
    assert_eq!(at[0].offset, 3);
    // A fresh publication brings the history back, all of it.
    let h = store.channel_since(&ch, 0, None, &short).await.unwrap();
    assert_eq!(h.frames.len(), 3);
    assert!(h.complete);
}

async fn check_channel_expiry(store: &dyn Store) {
    // The position lives `offset_ttl` after its last use; then the channel starts
    // again under a later epoch.
    let s = ChannelSettings {
        offset_ttl: SHORT,
        ..settings()
    };
    let ch = channel("expiring");
    let first = store.channel_position(&ch, &s).await.unwrap();
    tokio::time::sleep(PAST_SHORT).await;
    let again = store.channel_position(&ch, &s).await.unwrap();
    assert_eq!(again.offset, 0);
    assert!(again.epoch > first.epoch, "{first:?} then {again:?}");
    let at = publish(store, &ch, 1, &s).await;
    assert_eq!(
        at[0],
        Position {
            epoch: again.epoch,
            offset: 1
        }
    );
    tokio::time::sleep(PAST_SHORT).await;
    assert_eq!(store.channel_top(&ch).await.unwrap(), None);
    assert_eq!(store.channel_range(&ch, 0, 0, 10).await.unwrap(), None);
    let at = publish(store, &ch, 1, &s).await;
    assert_eq!(at[0].offset, 1);
    assert!(at[0].epoch > again.epoch);
}

async fn check_publish_slides_ttl_once_per_interval(store: &dyn Store) {
    // A publisher that knows the epoch slides the TTL at most once per
    // `TTL_REFRESH_INTERVAL` (an hour): with a TTL shorter than that, publications
    // alone do not keep a channel alive past its first TTL.
    let ttl = Duration::from_millis(1000);
    let s = ChannelSettings {
        offset_ttl: ttl,
        ..settings()
    };
    let ch = channel("sliding");
    let first = publish(store, &ch, 1, &s).await[0];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = publish(store, &ch, 1, &s).await[0];
    assert_eq!(
        second,
        Position {
            epoch: first.epoch,
            offset: 2
        }
    );
    // Past the first TTL, though within a TTL of the second publication.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let third = publish(store, &ch, 1, &s).await[0];
    assert_eq!(third.offset, 1);
    assert!(third.epoch > first.epoch);
    // A subscriber's read slides it every time: past the third publication's TTL,
    // within one of the read.
    tokio::time::sleep(Duration::from_millis(700)).await;
    store.channel_position(&ch, &s).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fourth = publish(store, &ch, 1, &s).await[0];
    assert_eq!(
        fourth,
        Position {
            epoch: third.epoch,
            offset: 2
        }
    );
}

async fn check_channel_range(store: &dyn Store) {
    let ch = channel("range");
    let at = publish(store, &ch, 5, &settings()).await;
    let epoch = at[0].epoch;
    let middle = vec![(2, frame(1, 2)), (3, frame(2, 3)), (4, frame(3, 4))];
    assert_eq!(
        store.channel_range(&ch, epoch, 1, 5).await.unwrap(),
        Some(middle.clone())
    );
    // Epoch 0: whatever the channel has.
    assert_eq!(
        store.channel_range(&ch, 0, 1, 5).await.unwrap(),
        Some(middle)
    );
    assert_eq!(
        store.channel_range(&ch, epoch, 3, 4).await.unwrap(),
        Some(vec![])
    );
    assert_eq!(
        store.channel_range(&ch, epoch, 4, 99).await.unwrap(),
        Some(vec![(5, frame(4, 5))])
    );
    assert_eq!(
        store.channel_range(&ch, epoch, 5, 0).await.unwrap(),
        Some(vec![])
    );
    assert_eq!(
        store.channel_range(&ch, epoch + 1, 1, 5).await.unwrap(),
        None
    );
    assert_eq!(
        store
            .channel_range(&channel("missing"), epoch, 1, 5)
            .await
            .unwrap(),
        None
    );
    // A started position without publications has a (empty) range.
    let marked = channel("marked");
    let p = store.channel_position(&marked, &settings()).await.unwrap();
    assert_eq!(
        store.channel_range(&marked, p.epoch, 0, 5).await.unwrap(),
        Some(vec![])
    );
}

/// Offsets of 15 digits and more (Lua's doubles print them as `1e+14`; the scripts
/// take them as decimal strings made in Rust) and at the ends of `u64`.
async fn check_offsets_of_fifteen_digits(store: &dyn Store) {
    let ch = channel("huge");
    let s = settings();
    for since in [99_999_999_999_998, 99_999_999_999_999, u64::MAX] {
        let h = store.channel_since(&ch, since, None, &s).await.unwrap();
        assert_eq!(
            (h.top, h.frames.len(), h.complete),
            (0, 0, false),
            "{since}"
        );
    }
    let fresh = channel("huge-fresh");
    let h = store
        .channel_since(&fresh, u64::MAX, None, &s)
        .await
        .unwrap();
    assert_eq!((h.top, h.complete), (0, false));
    assert_eq!(
        store.channel_range(&fresh, 0, 0, 1).await.unwrap(),
        Some(vec![])
    );
    publish(store, &ch, 1, &s).await;
    assert_eq!(
        store.channel_range(&ch, 0, 0, u64::MAX).await.unwrap(),
        Some(vec![(1, frame(0, 1))])
    );
    assert_eq!(
        store.channel_range(&ch, 0, u64::MAX - 1, 0).await.unwrap(),
        Some(vec![])
    );
    assert_eq!(
        store
            .channel_range(&ch, 0, 0, 100_000_000_000_000)
            .await
            .unwrap(),
        Some(vec![(1, frame(0, 1))])
    );
    let h = store
        .channel_since(&ch, 100_000_000_000_000, None, &s)
        .await
        .unwrap();
    assert_eq!((h.top, h.frames.len(), h.complete), (1, 0, false));
}

// === presence ===

fn entry(user: &str, connections: u64) -> PresenceEntry {
    PresenceEntry {
        user_id: user.into(),
        connections,
    }
}

fn touch(ch: &Channel, user: &str, conn: &str) -> (Channel, String, String) {
    (ch.clone(), user.into(), conn.into())
}

async fn check_presence(store: &dyn Store) {
    let ch = channel("room");
    assert!(store.presence(&ch).await.unwrap().is_empty());
    store.presence_touch(&[], LONG).await.unwrap();
    store
        .presence_touch(
            &[
                touch(&ch, "u2", "c3"),
                touch(&ch, "u1", "c1"),
                touch(&ch, "u1", "c2"),
                touch(&channel("elsewhere"), "u1", "c9"),
            ],
            LONG,
        )
        .await
        .unwrap();
    // Touching again counts once.
    store
        .presence_touch(&[touch(&ch, "u1", "c1")], LONG)
        .await
        .unwrap();
    assert_eq!(store.presence_count(&ch, "u1").await.unwrap(), 2);
    assert_eq!(store.presence_count(&ch, "u3").await.unwrap(), 0);
    assert_eq!(
        store.presence(&ch).await.unwrap(),
        vec![entry("u1", 2), entry("u2", 1)]
    );
    assert_eq!(store.presence_remove(&ch, "u1", "c1").await.unwrap(), 1);
    assert_eq!(store.presence_remove(&ch, "u1", "c1").await.unwrap(), 1);
    assert_eq!(store.presence_remove(&ch, "u1", "c2").await.unwrap(), 0);
    assert_eq!(store.presence_count(&ch, "u1").await.unwrap(), 0);
    assert_eq!(store.presence(&ch).await.unwrap(), vec![entry("u2", 1)]);
    assert_eq!(
        store.presence(&channel("elsewhere")).await.unwrap(),
        vec![entry("u1", 1)]
    );
    // A user who left is not swept later.
    assert!(store.presence_sweep(&[ch]).await.unwrap().is_empty());
}

async fn check_presence_expiry(store: &dyn Store) {
    let ch = channel("lobby");
    // The short one first: the channel's set lives as long as the last touch says.
    store
        .presence_touch(&[touch(&ch, "u1", "c1")], SHORT)
        .await
        .unwrap();
    store
        .presence_touch(&[touch(&ch, "u2", "c2")], LONG)
        .await
        .unwrap();
    tokio::time::sleep(PAST_SHORT).await;
    assert_eq!(store.presence_count(&ch, "u1").await.unwrap(), 0);
    // Both sweeps run at once: each expired user goes to exactly one of them.
    let (a, b) = tokio::join!(
        store.presence_sweep(std::slice::from_ref(&ch)),
        store.presence_sweep(std::slice::from_ref(&ch))
    );
    let mut swept: Vec<(Channel, Vec<String>)> = a.unwrap();
    swept.extend(b.unwrap());
    assert_eq!(swept, vec![(ch.clone(), vec!["u1".to_owned()])]);
    assert!(
        store
            .presence_sweep(std::slice::from_ref(&ch))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.presence(&ch).await.unwrap(), vec![entry("u2", 1)]);
    assert!(store.presence_sweep(&[]).await.unwrap().is_empty());
}

async fn check_presence_sweep_bounds(store: &dyn Store) {
    // One of a user's connections still alive keeps the user. (Short touches first:
    // a user's connection set lives as long as the user's last touch says.)
    let ch = channel("mixed");
    store
        .presence_touch(
            &[touch(&ch, "u1", "c-short"), touch(&ch, "u2", "c2")],
            SHORT,
        )
        .await
        .unwrap();
    store
        .presence_touch(&[touch(&ch, "u1", "c-long"), touch(&ch, "u3", "c3")], LONG)
        .await
        .unwrap();
    tokio::time::sleep(PAST_SHORT).await;
    assert_eq!(store.presence_count(&ch, "u1").await.unwrap(), 1);
    let swept = store
        .presence_sweep(&[ch.clone(), channel("empty"), ch.clone()])
        .await
        .unwrap();
    assert_eq!(swept, vec![(ch.clone(), vec!["u2".to_owned()])]);

    // Everyone expired: the channel's set expired with them, so there is nobody to
    // sweep (and nobody left to tell).
    let gone = channel("gone");
    store
        .presence_touch(&[touch(&gone, "u1", "c1")], SHORT)
        .await
        .unwrap();
    tokio::time::sleep(PAST_SHORT).await;
    assert!(store.presence_sweep(&[gone]).await.unwrap().is_empty());

    // Reading presence drops expired users: a sweep after it does not see them.
    let read = channel("read");
    store
        .presence_touch(&[touch(&read, "u1", "c1")], SHORT)
        .await
        .unwrap();
    store
        .presence_touch(&[touch(&read, "u2", "c2")], LONG)
        .await
        .unwrap();
    tokio::time::sleep(PAST_SHORT).await;
    assert_eq!(store.presence(&read).await.unwrap(), vec![entry("u2", 1)]);
    assert!(store.presence_sweep(&[read]).await.unwrap().is_empty());

    // A short touch after a long one cuts the user's connection set short, while
    // the user's entry keeps the longer expiry: the user counts no connection, is
    // not listed, and is not swept either until that expiry.
    let cut = channel("cut");
    store
        .presence_touch(&[touch(&cut, "u1", "c-long")], LONG)
        .await
        .unwrap();
    store
        .presence_touch(&[touch(&cut, "u1", "c-short")], SHORT)
        .await
        .unwrap();
    store
        .presence_touch(&[touch(&cut, "u2", "c2")], LONG)
        .await
        .unwrap();
    tokio::time::sleep(PAST_SHORT).await;
    assert_eq!(store.presence_count(&cut, "u1").await.unwrap(), 0);
    assert_eq!(store.presence(&cut).await.unwrap(), vec![entry("u2", 1)]);
    assert!(store.presence_sweep(&[cut]).await.unwrap().is_empty());
}

// === read offsets and channel counts ===

async fn check_read_offsets(store: &dyn Store) {
    assert_eq!(store.read_offset("u1", "team:a").await.unwrap(), None);
    assert_eq!(store.set_read("u1", "team:a", 5).await.unwrap(), 5);
    assert_eq!(store.set_read("u1", "team:a", 3).await.unwrap(), 5);
    assert_eq!(store.read_offset("u1", "team:a").await.unwrap(), Some(5));
    assert_eq!(store.set_read("u1", "team:a", 7).await.unwrap(), 7);
    assert_eq!(store.read_offset("u1", "team:a").await.unwrap(), Some(7));
    assert_eq!(store.read_offset("u2", "team:a").await.unwrap(), None);
    assert_eq!(store.read_offset("u1", "team:b").await.unwrap(), None);
    // A first read of 0 is no read at all.
    assert_eq!(store.set_read("u1", "team:zero", 0).await.unwrap(), 0);
    assert_eq!(store.read_offset("u1", "team:zero").await.unwrap(), None);
    // Cut to the largest exact offset.
    assert_eq!(
        store.set_read("u1", "team:max", u64::MAX).await.unwrap(),
        MAX_READ_OFFSET
    );
    assert_eq!(
        store.read_offset("u1", "team:max").await.unwrap(),
        Some(MAX_READ_OFFSET)
    );
}

async fn check_channel_counts(store: &dyn Store) {
    assert!(store.channels().await.unwrap().is_empty());
    store.node_heartbeat(&node("n1", 3), LONG).await.unwrap();
    store.node_heartbeat(&node("n2", 3), LONG).await.unwrap();
    store.node_heartbeat(&node("n4", 3), SHORT).await.unwrap();
    let counts = |pairs: &[(&str, u64)]| -> HashMap<String, u64> {
        pairs.iter().map(|(c, n)| (c.to_string(), *n)).collect()
    };
    store
        .node_channels("n1", &counts(&[("team:a", 2), ("team:b", 1)]), LONG)
        .await
        .unwrap();
    store
        .node_channels("n2", &counts(&[("team:a", 3)]), LONG)
        .await
        .unwrap();
    // Not a live node: not counted.
    store
        .node_channels("n3", &counts(&[("team:a", 100)]), LONG)
        .await
        .unwrap();
    store
        .node_channels("n4", &counts(&[("team:c", 9)]), LONG)
        .await
        .unwrap();
    let want = |pairs: &[(&str, u64)]| -> BTreeMap<String, u64> {
        pairs.iter().map(|(c, n)| (c.to_string(), *n)).collect()
    };
    assert_eq!(
        store.channels().await.unwrap(),
        want(&[("team:a", 5), ("team:b", 1), ("team:c", 9)])
    );
    tokio::time::sleep(PAST_SHORT).await;
    assert_eq!(
        store.channels().await.unwrap(),
        want(&[("team:a", 5), ("team:b", 1)])
    );
    // A node's counts are replaced, not merged.
    store
        .node_channels("n1", &counts(&[("team:b", 4)]), LONG)
        .await
        .unwrap();
    assert_eq!(
        store.channels().await.unwrap(),
        want(&[("team:a", 3), ("team:b", 4)])
    );
    store.node_channels("n1", &counts(&[]), LONG).await.unwrap();
    assert_eq!(store.channels().await.unwrap(), want(&[("team:a", 3)]));
    // Counts outlive their TTL only as long as it says.
    store
        .node_channels("n1", &counts(&[("team:d", 1)]), SHORT)
        .await
        .unwrap();
    tokio::time::sleep(PAST_SHORT).await;
    assert_eq!(store.channels().await.unwrap(), want(&[("team:a", 3)]));
    store.remove_node("n2").await.unwrap();
    assert!(store.channels().await.unwrap().is_empty());
}

// === both backends ===

/// A `RedisStore` on a fresh Redis of its own, under a prefix of its own.
fn redis_store(prefix: &str) -> (TestRedis, RedisStore) {
    let redis = TestRedis::start().expect("redis-server");
    let store = RedisStore::open(
        shared::config::redis_target(&redis.url(), redis.is_cluster()),
        Keys::new(&format!("conf-{prefix}")),
    )
    .expect("store");
    (redis, store)
}

macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod on_redis {
            $(
                #[tokio::test]
                async fn $check() {
                    let (_redis, store) = super::redis_store(stringify!($check));
                    super::$check(&store).await;
                }
            )*
        }

        mod in_memory {
            $(
                #[tokio::test]
                async fn $check() {
                    let store = super::MemoryStore::new();
                    super::$check(&store).await;
                }
            )*
        }
    };
}

conformance!(
    check_ping,
    check_conn_limit,
    check_refresh_does_not_resurrect,
    check_nodes,
    check_revocations,
    check_sessions,
    check_history,
    check_append_claims_a_lost_session,
    check_chat_rate,
    check_context,
    check_publish_offsets,
    check_position,
    check_channel_top,
    check_channel_since,
    check_history_bounds,
    check_channel_expiry,
    check_publish_slides_ttl_once_per_interval,
    check_channel_range,
    check_offsets_of_fifteen_digits,
    check_presence,
    check_presence_expiry,
    check_presence_sweep_bounds,
    check_read_offsets,
    check_channel_counts,
);

// === the memory store only ===

/// An outage fails every call and loses nothing.
#[tokio::test]
async fn memory_store_outage_fails_every_call() {
    let store = std::sync::Arc::new(MemoryStore::new());
    let shared: shared::store::SharedStore = store.clone();
    shared.register_conn(&conn("u1", "c1", 1), 0).await.unwrap();
    store.set_down(true);
    assert!(shared.ping().await.is_err());
    assert!(shared.user_connections("u1").await.is_err());
    assert!(
        shared
            .publish_channel(&channel("a"), "{", "}", &settings())
            .await
            .is_err()
    );
    assert!(shared.recorded_reply("u1", "s1", "r1").await.is_err());
    assert!(shared.channels().await.is_err());
    store.set_down(false);
    shared.ping().await.unwrap();
    assert_eq!(shared.user_connections("u1").await.unwrap().len(), 1);
    assert!(format!("{shared:?}").starts_with("MemoryStore"));
}
