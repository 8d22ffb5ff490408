//! Channels across the cluster: fan-out in order across nodes, permissions,
//! unsubscribe, slow consumers, recovery, presence, read offsets, typing, the HTTP
//! publish API.

use std::time::Duration;

use serde_json::{Value, json};
use testkit::tokens;

use crate::common::*;

fn public(c: &mut gateway::RawConfig) {
    c.public_namespaces = Some("news".into());
    // These tests publish in bursts from one connection.
    c.message_rate = Some(10_000);
    c.message_burst = Some(10_000);
}

/// The session store the gateways use, for writing behind their backs.
fn direct_store(deps: &Deps) -> (shared::store::RedisStore, shared::store::ChannelSettings) {
    let store = deps.store();
    let settings = shared::store::ChannelSettings {
        history_size: 100,
        history_ttl: Duration::from_secs(60),
        offset_ttl: Duration::from_secs(600),
    };
    (store, settings)
}

/// `POST /v1/publish`: the status and the JSON body.
async fn try_publish(gw: &Gw, channel: &str, data: &Value) -> (u16, Value) {
    api_post(
        gw,
        "/v1/publish",
        &json!({"channel": channel, "data": data}),
    )
    .await
}

async fn http_publish(gw: &Gw, channel: &str, data: Value) -> u64 {
    let (status, body) = try_publish(gw, channel, &data).await;
    assert_eq!(status, 200, "{body}");
    body["offset"].as_u64().unwrap()
}

#[tokio::test]
async fn publications_reach_every_node_in_order() {
    let deps = Deps::start();
    let (a, b, c) = (
        gateway(&deps, public).await,
        gateway(&deps, public).await,
        gateway(&deps, public).await,
    );
    let (mut pub_ws, _) = authed(&a, "pat").await;
    let (mut sb, _) = authed(&b, "sue").await;
    let (mut sc, _) = authed(&c, "sid").await;
    let (mut sc2, _) = authed(&c, "sal").await;
    for ws in [&mut sb, &mut sc, &mut sc2] {
        let s = subscribe(ws, "news:live", None).await;
        assert_eq!(
            (
                s["type"].as_str(),
                s["recovered"].as_bool(),
                s["offset"].as_u64()
            ),
            (Some("subscribed"), Some(false), Some(0))
        );
    }
    for i in 0..50 {
        send_json(
            &mut pub_ws,
            json!({"type": "publish", "channel": "news:live", "data": {"n": i}, "id": i}),
        )
        .await;
    }
    let mut acked = Vec::new();
    while acked.len() < 50 {
        let f = next_json(&mut pub_ws).await;
        assert_eq!(f["type"], "ack", "{f}");
        acked.push(f["offset"].as_u64().unwrap());
    }
    assert_eq!(acked, (1..=50).collect::<Vec<_>>());
    for ws in [&mut sb, &mut sc, &mut sc2] {
        for i in 0..50u64 {
            let m = next_json(ws).await;
            assert_eq!(m["type"], "message");
            assert_eq!(m["channel"], "news:live");
            assert_eq!(m["offset"], i + 1);
            assert_eq!(m["data"], json!({"n": i}));
            assert_eq!(m["from"], "pat");
        }
    }
    let metrics = b.metrics().await;
    assert!(
        metrics.contains("switchboard_fanout_seconds_bucket"),
        "fan-out latency recorded"
    );
}

#[tokio::test]
async fn permission_matrix() {
    let deps = Deps::start();
    let _ctx = context_responder(&deps, &[("alice", &["t1"])]).await;
    let gw = gateway(&deps, public).await;
    let (mut ws, auth) = authed(&gw, "alice").await;
    assert_eq!(auth["teams"], json!([{"id": "t1", "name": "t1"}]));
    // The own user channel is joined automatically; subscribing to it again (say,
    // with `since`) is answered like any subscribe.
    let sub_cases = [
        ("user:alice", "subscribed"),
        ("user:bob", "FORBIDDEN"),
        ("team:t1", "subscribed"),
        ("team:t2", "FORBIDDEN"),
        ("news:x", "subscribed"),
        ("secret:x", "FORBIDDEN"),
        ("bad channel", "BAD_REQUEST"),
        ("news:a.b", "BAD_REQUEST"),
    ];
    for (ch, want) in sub_cases {
        let r = subscribe(&mut ws, ch, None).await;
        let got = if r["type"] == "subscribed" {
            "subscribed"
        } else {
            r["code"].as_str().unwrap()
        };
        assert_eq!(got, want, "subscribe {ch}: {r}");
        assert_eq!(r["id"], ch);
    }
    let pub_cases = [
        ("user:bob", "FORBIDDEN"),
        ("team:t2", "FORBIDDEN"),
        ("secret:x", "FORBIDDEN"),
        ("team:t1", "ack"),
        ("news:x", "ack"),
        ("user:alice", "ack"),
    ];
    for (ch, want) in pub_cases {
        send_json(
            &mut ws,
            json!({"type": "publish", "channel": ch, "data": 1, "id": ch}),
        )
        .await;
        let r = next_matching(&mut ws, |f| f["id"] == ch).await;
        let got = if r["type"] == "ack" {
            "ack"
        } else {
            r["code"].as_str().unwrap()
        };
        assert_eq!(got, want, "publish {ch}: {r}");
    }
    // Subscribing twice answers `subscribed` again, at the connection's position,
    // replaying from `since` what the connection was given.
    let offset = http_publish(&gw, "news:x", json!("again")).await;
    next_matching(&mut ws, |f| f["type"] == "message" && f["offset"] == offset).await;
    send_json(
        &mut ws,
        json!({"type": "subscribe", "channel": "news:x", "since": offset - 1, "id": "re"}),
    )
    .await;
    let replay = next_json(&mut ws).await;
    assert_eq!(
        (replay["type"].as_str(), replay["offset"].as_u64()),
        (Some("message"), Some(offset))
    );
    let again = next_json(&mut ws).await;
    assert_eq!(
        (
            again["type"].as_str(),
            again["offset"].as_u64(),
            again["recovered"].as_bool()
        ),
        (Some("subscribed"), Some(offset), Some(true))
    );
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let deps = Deps::start();
    let gw = gateway(&deps, public).await;
    let (mut ws, _) = authed(&gw, "uli").await;
    subscribe(&mut ws, "news:a", None).await;
    subscribe(&mut ws, "news:b", None).await;
    http_publish(&gw, "news:a", json!(1)).await;
    assert_eq!(next_json(&mut ws).await["channel"], "news:a");
    send_json(
        &mut ws,
        json!({"type": "unsubscribe", "channel": "news:a", "id": 1}),
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "unsubscribed", "channel": "news:a", "id": 1})
    );
    http_publish(&gw, "news:a", json!(2)).await;
    http_publish(&gw, "news:b", json!(3)).await;
    let m = next_json(&mut ws).await;
    assert_eq!(
        (m["channel"].as_str(), m["data"].as_i64()),
        (Some("news:b"), Some(3))
    );
    send_json(
        &mut ws,
        json!({"type": "unsubscribe", "channel": "news:a", "id": 2}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["code"], "BAD_REQUEST");
}

#[tokio::test]
async fn a_slow_consumer_is_closed_alone() {
    let deps = Deps::start();
    let gw = gateway(&deps, |c| {
        public(c);
        c.outbound_queue = Some(64);
        c.max_message_bytes = Some(64 * 1024);
    })
    .await;
    let (mut slow, _) = authed(&gw, "slow").await;
    let (mut fast, _) = authed(&gw, "fast").await;
    subscribe(&mut slow, "news:firehose", None).await;
    subscribe(&mut fast, "news:firehose", None).await;
    const N: u64 = 1500;
    // The publisher stays within a window of what the fast client has read, so the
    // fast client is a client that keeps up (whatever else loads the machine) and the
    // slow one is the only one that does not.
    const WINDOW: u64 = 32;
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = progress.clone();
    let reader = tokio::spawn(async move {
        let mut last = 0;
        while last < N {
            let m = next_json(&mut fast).await;
            assert_eq!(
                m["offset"].as_u64(),
                Some(last + 1),
                "fast client misses nothing: {}",
                m.to_string().chars().take(200).collect::<String>()
            );
            last += 1;
            seen.store(last, std::sync::atomic::Ordering::Release);
        }
        fast
    });
    // The slow client starts reading as soon as the gateway has cut it off: a client
    // that reads nothing for longer than the write timeout never sees the close frame
    // (the gateway drops TCP), and on a loaded machine the fast reader can take that
    // long.
    let metrics_url = format!("http://{}/metrics", gw.admin);
    let slow_side = tokio::spawn(async move {
        eventually("slow consumer close", || async {
            match reqwest::get(&metrics_url).await {
                Ok(r) => r
                    .text()
                    .await
                    .is_ok_and(|t| t.contains("switchboard_slow_consumer_closes_total 1")),
                Err(_) => false,
            }
        })
        .await;
        until_close(&mut slow).await
    });
    let blob = "x".repeat(16 * 1024);
    let (pub_ws, _) = authed(&gw, "pub").await;
    let mut pub_ws = pub_ws;
    for i in 0..N {
        send_json(
            &mut pub_ws,
            json!({"type": "publish", "channel": "news:firehose", "data": {"i": i, "blob": blob}}),
        )
        .await;
        if i % 20 == 19 {
            next_matching(&mut pub_ws, |f| f["type"] == "ack" && f["offset"] == i + 1).await;
        }
        while i > WINDOW + progress.load(std::sync::atomic::Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let mut fast = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("fast client kept up")
        .unwrap();
    // The slow client was cut off; reading, it finds the reason at the end.
    let (frames, code) = slow_side.await.unwrap();
    assert_eq!(
        code,
        Some(4008),
        "last frames: {:?}",
        frames.iter().rev().take(1).collect::<Vec<_>>()
    );
    assert_eq!(frames.last().unwrap()["code"], "SLOW_CONSUMER");
    send_json(&mut fast, json!({"type": "ping"})).await;
    assert_eq!(
        next_matching(&mut fast, |f| f["type"] == "pong").await["type"],
        "pong"
    );
}

#[tokio::test]
async fn recovery_on_another_node_replays_exactly_what_was_missed() {
    let deps = Deps::start();
    let a = gateway(&deps, public).await;
    let b = gateway(&deps, public).await;
    const TOTAL: u64 = 300;
    let publisher = {
        let url = a.http("/v1/publish");
        tokio::spawn(async move {
            let c = api();
            for i in 0..TOTAL {
                c.post(&url)
                    .bearer_auth(API_KEY)
                    .json(&json!({"channel": "news:stream", "data": i}))
                    .send()
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    let (mut ws, _) = authed(&a, "rick").await;
    let s = subscribe(&mut ws, "news:stream", None).await;
    let mut last = s["offset"].as_u64().unwrap();
    let mut seen = Vec::new();
    while seen.len() < 40 {
        let m = next_json(&mut ws).await;
        let o = m["offset"].as_u64().unwrap();
        assert_eq!(o, last + 1);
        last = o;
        seen.push(o);
    }
    drop(ws);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (mut ws, _) = authed(&b, "rick").await;
    send_json(
        &mut ws,
        json!({"type": "subscribe", "channel": "news:stream", "since": last, "id": "s"}),
    )
    .await;
    let mut got = Vec::new();
    let mut subscribed = None;
    while got.last().copied().unwrap_or(last) < TOTAL {
        let f = next_json(&mut ws).await;
        match f["type"].as_str() {
            Some("message") => got.push(f["offset"].as_u64().unwrap()),
            Some("subscribed") => subscribed = Some(f),
            _ => panic!("unexpected {f}"),
        }
    }
    publisher.await.unwrap();
    let s = subscribed.expect("subscribed");
    assert_eq!(s["recovered"], true, "{s}");
    let expected: Vec<u64> = (last + 1..=TOTAL).collect();
    assert_eq!(got, expected, "contiguous, no duplicates");
    let m = b.metrics().await;
    assert!(
        m.contains("switchboard_recoveries_total{result=\"hit\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn recovery_past_the_history_bound_says_so() {
    let deps = Deps::start();
    let gw = gateway(&deps, |c| {
        public(c);
        c.history_size = Some(5);
    })
    .await;
    for i in 0..20 {
        http_publish(&gw, "news:old", json!(i)).await;
    }
    let (mut ws, _) = authed(&gw, "tom").await;
    let s = subscribe(&mut ws, "news:old", Some(2)).await;
    assert_eq!(
        (s["recovered"].as_bool(), s["offset"].as_u64()),
        (Some(false), Some(20))
    );
    // Within the bound it recovers.
    let (mut ws, _) = authed(&gw, "tom").await;
    send_json(
        &mut ws,
        json!({"type": "subscribe", "channel": "news:old", "since": 17}),
    )
    .await;
    let offsets: Vec<_> = [
        next_json(&mut ws).await,
        next_json(&mut ws).await,
        next_json(&mut ws).await,
    ]
    .iter()
    .map(|m| m["offset"].as_u64().unwrap())
    .collect();
    assert_eq!(offsets, [18, 19, 20]);
    let s = next_json(&mut ws).await;
    assert_eq!(
        (s["type"].as_str(), s["recovered"].as_bool()),
        (Some("subscribed"), Some(true))
    );
    // From the future (history lost): not recovered.
    let (mut ws, _) = authed(&gw, "tom").await;
    assert_eq!(
        subscribe(&mut ws, "news:old", Some(99)).await["recovered"],
        false
    );
}

#[tokio::test]
async fn presence_joins_leaves_and_expires_with_a_dead_node() {
    let deps = Deps::start();
    let _ctx = context_responder(
        &deps,
        &[("ann", &["t1"]), ("ben", &["t1"]), ("cat", &["t1"])],
    )
    .await;
    let cfg = |c: &mut gateway::RawConfig| c.presence_ttl_secs = Some(3);
    let a = gateway(&deps, cfg).await;
    let b = gateway(&deps, cfg).await;
    let (mut ben, _) = authed(&b, "ben").await;
    subscribe(&mut ben, "team:t1", None).await;
    let (mut ann, _) = authed(&a, "ann").await;
    subscribe(&mut ann, "team:t1", None).await;
    assert_eq!(
        next_json(&mut ben).await,
        json!({"type": "join", "channel": "team:t1", "user": "ann"})
    );
    send_json(
        &mut ben,
        json!({"type": "presence", "channel": "team:t1", "id": 1}),
    )
    .await;
    let p = next_json(&mut ben).await;
    assert_eq!(
        p["users"],
        json!([{"user_id": "ann", "connections": 1}, {"user_id": "ben", "connections": 1}]),
        "{p}"
    );
    send_json(
        &mut ann,
        json!({"type": "unsubscribe", "channel": "team:t1"}),
    )
    .await;
    assert_eq!(
        next_json(&mut ben).await,
        json!({"type": "leave", "channel": "team:t1", "user": "ann"})
    );

    // A node that dies without a word: its presence entries expire.
    let (port, admin) = (testkit::free_port(), testkit::free_port());
    let mut dead = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .env_clear()
        .env("SB_LISTEN", format!("127.0.0.1:{port}"))
        .env("SB_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("SB_NODE_ID", "doomed")
        .env("SB_NATS_URL", deps.nats.url())
        .env("SB_REDIS_URL", deps.redis.url())
        .env("SB_REDIS_CLUSTER", deps.redis.is_cluster().to_string())
        .env("SB_JWT_SECRET", tokens::TEST_SECRET)
        .env("SB_PRESENCE_TTL_SECS", "3")
        .env("SB_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("ws://127.0.0.1:{port}/ws");
    let cat = loop {
        if let Ok((mut ws, _)) = connect(&url, Hs::bearer(&tokens::token("cat", 600))).await {
            assert_eq!(next_json(&mut ws).await["type"], "authenticated");
            break ws;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut cat = cat;
    subscribe(&mut cat, "team:t1", None).await;
    assert_eq!(next_json(&mut ben).await["user"], "cat");
    dead.kill().await.unwrap();
    let presence_url = a.http("/v1/channels/team:t1/presence");
    eventually("cat's presence expires", || async {
        let v: Value = api()
            .get(&presence_url)
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["users"] == json!([{"user_id": "ben", "connections": 1}])
    })
    .await;
}

#[tokio::test]
async fn read_offsets_follow_the_user_to_another_node() {
    let deps = Deps::start();
    let _ctx = context_responder(&deps, &[("dan", &["t1"]), ("eve", &["t1"])]).await;
    let a = gateway(&deps, |_| {}).await;
    let b = gateway(&deps, |_| {}).await;
    // Read offsets name publications that exist.
    for i in 0..7 {
        http_publish(&a, "team:t1", json!(i)).await;
    }
    let (mut eve, _) = authed(&b, "eve").await;
    subscribe(&mut eve, "team:t1", None).await;
    let (mut dan, _) = authed(&a, "dan").await;
    let s = subscribe(&mut dan, "team:t1", None).await;
    assert!(s.get("read_offset").is_none());
    send_json(
        &mut dan,
        json!({"type": "read", "channel": "team:t1", "offset": 7, "id": "r"}),
    )
    .await;
    let ack = next_matching(&mut dan, |f| f["type"] == "ack").await;
    assert_eq!(
        (ack["offset"].as_u64(), ack["id"].as_str()),
        (Some(7), Some("r"))
    );
    let ev = next_matching(&mut eve, |f| f["type"] == "read").await;
    assert_eq!(
        ev,
        json!({"type": "read", "channel": "team:t1", "user": "dan", "offset": 7})
    );
    // An older offset does not move it back.
    send_json(
        &mut dan,
        json!({"type": "read", "channel": "team:t1", "offset": 3}),
    )
    .await;
    assert_eq!(
        next_matching(&mut dan, |f| f["type"] == "ack").await["offset"],
        7
    );
    drop(dan);
    let (mut dan, _) = authed(&b, "dan").await;
    let s = subscribe(&mut dan, "team:t1", None).await;
    assert_eq!(s["read_offset"], 7, "{s}");
}

/// A `read` past the channel's last offset is refused: a huge one used to be stored
/// as a Lua double and then made every `subscribe` to the channel `UNAVAILABLE`. A
/// value that is corrupt already (written before the fix) is ignored, never fatal.
#[tokio::test]
async fn read_offsets_past_the_channel_are_refused_and_corrupt_ones_ignored() {
    let deps = Deps::start();
    let _ctx = context_responder(&deps, &[("dan", &["t1"])]).await;
    let gw = gateway(&deps, |_| {}).await;
    for i in 0..3 {
        http_publish(&gw, "team:t1", json!(i)).await;
    }
    let (mut dan, _) = authed(&gw, "dan").await;
    let read = |channel: &str, offset: u64| json!({"type": "read", "channel": channel, "offset": offset, "id": "r"});
    for (channel, offset) in [
        ("team:t1", 123_456_789_012_345_678u64),
        ("team:t1", u64::MAX),
        ("team:t1", 4),
        ("user:dan", u64::MAX),
        ("user:dan", 1),
    ] {
        send_json(&mut dan, read(channel, offset)).await;
        let e = next_matching(&mut dan, |f| f["id"] == "r").await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some("BAD_REQUEST")),
            "{channel} {offset}: {e}"
        );
    }
    send_json(&mut dan, read("team:t1", 3)).await;
    let ack = next_matching(&mut dan, |f| f["id"] == "r").await;
    assert_eq!(ack["offset"], 3, "{ack}");
    let s = subscribe(&mut dan, "team:t1", None).await;
    assert_eq!(
        (s["type"].as_str(), s["read_offset"].as_u64()),
        (Some("subscribed"), Some(3)),
        "{s}"
    );

    // What the old code stored for those offsets: subscribe works and has no read
    // offset, the own channel still delivers, and the next `read` repairs the value.
    let key = "sb:{u:dan}:read";
    for (field, value) in [
        ("team:t1", "1.2345678901234568e+17"),
        ("user:dan", "1.8446744073709552e+19"),
    ] {
        let r = deps.redis.command(&["HSET", key, field, value]).unwrap();
        assert!(r.starts_with(':'), "{r}");
    }
    let (mut dan2, _) = authed(&gw, "dan").await;
    let s = subscribe(&mut dan2, "team:t1", None).await;
    assert_eq!(s["type"], "subscribed", "{s}");
    assert!(s.get("read_offset").is_none(), "{s}");
    let s = subscribe(&mut dan2, "user:dan", None).await;
    assert_eq!(s["type"], "subscribed", "{s}");
    assert!(s.get("read_offset").is_none(), "{s}");
    http_publish(&gw, "user:dan", json!("own")).await;
    let m = next_matching(&mut dan2, |f| f["type"] == "message").await;
    assert_eq!(
        (m["channel"].as_str(), m["data"].as_str()),
        (Some("user:dan"), Some("own"))
    );
    send_json(&mut dan2, read("team:t1", 2)).await;
    let ack = next_matching(&mut dan2, |f| f["id"] == "r").await;
    assert_eq!(
        ack["offset"], 2,
        "the corrupt value counts as no read: {ack}"
    );
    let s = subscribe(&mut dan2, "team:t1", None).await;
    assert_eq!(s["read_offset"], 2, "{s}");
}

#[tokio::test]
async fn typing_reaches_the_others_only() {
    let deps = Deps::start();
    let a = gateway(&deps, public).await;
    let b = gateway(&deps, public).await;
    let (mut fay, _) = authed(&a, "fay").await;
    let (mut fay2, _) = authed(&b, "fay").await;
    let (mut gus, _) = authed(&b, "gus").await;
    for ws in [&mut fay, &mut fay2, &mut gus] {
        subscribe(ws, "news:room", None).await;
    }
    send_json(&mut fay, json!({"type": "typing", "channel": "news:room"})).await;
    assert_eq!(
        next_json(&mut gus).await,
        json!({"type": "typing", "channel": "news:room", "user": "fay"})
    );
    // Fay's other connection does not get her own typing; the next thing it sees is this.
    http_publish(&a, "news:room", json!("after")).await;
    assert_eq!(next_json(&mut fay2).await["type"], "message");
    send_json(
        &mut gus,
        json!({"type": "typing", "channel": "news:elsewhere", "id": 1}),
    )
    .await;
    assert_eq!(
        next_matching(&mut gus, |f| f["type"] == "error").await["code"],
        "BAD_REQUEST"
    );
}

#[tokio::test]
async fn http_publish_and_channel_listing() {
    let deps = Deps::start();
    let gw = gateway(&deps, |c| {
        public(c);
        c.heartbeat_secs = Some(1);
    })
    .await;
    let c = api();
    let r = c
        .post(gw.http("/v1/publish"))
        .json(&json!({"channel": "news:x", "data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "UNAUTHORIZED"
    );
    for body in [
        "{",
        r#"{"channel":"news:x"}"#,
        r#"{"channel":"nope","data":1}"#,
        r#"{"channel":"news:x","data":1,"extra":2}"#,
    ] {
        let r = c
            .post(gw.http("/v1/publish"))
            .bearer_auth(API_KEY)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        assert_eq!(
            r.json::<Value>().await.unwrap()["error"]["code"],
            "BAD_REQUEST"
        );
    }
    let (mut ws, _) = authed(&gw, "hal").await;
    subscribe(&mut ws, "news:x", None).await;
    assert_eq!(
        http_publish(&gw, "news:x", json!({"hello": "world"})).await,
        1
    );
    let m = next_json(&mut ws).await;
    assert_eq!(
        m,
        json!({"type": "message", "channel": "news:x", "offset": 1, "data": {"hello": "world"}, "from": "server"})
    );

    // A user's own channel (joined automatically) works the same way.
    assert_eq!(http_publish(&gw, "user:hal", json!("for hal")).await, 1);
    let m = next_json(&mut ws).await;
    assert_eq!(
        (
            m["channel"].as_str(),
            m["offset"].as_u64(),
            m["data"].as_str()
        ),
        (Some("user:hal"), Some(1), Some("for hal"))
    );

    // Publishing over NATS request/reply does the same.
    let nats = async_nats::connect(deps.nats.url()).await.unwrap();
    let reply = nats
        .request(
            "sb.rpc.publish",
            json!({"channel": "news:x", "data": 2}).to_string().into(),
        )
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&reply.payload).unwrap(),
        json!({"offset": 2})
    );
    assert_eq!(next_json(&mut ws).await["offset"], 2);

    eventually("channel counts", || async {
        let v: Value = api_get(&gw, "/v1/channels").await;
        v["channels"]
            .as_array()
            .unwrap()
            .iter()
            .any(|ch| ch["channel"] == "news:x" && ch["subscribers"] == 1)
    })
    .await;
}

#[tokio::test]
async fn a_publication_lost_in_transit_is_repaired_from_history() {
    let deps = Deps::start();
    let gw = gateway(&deps, public).await;
    let (mut ws, _) = authed(&gw, "ivy").await;
    subscribe(&mut ws, "news:lossy", None).await;
    // Offset 1 reaches Redis history but never NATS, as if lost between nodes.
    let (store, settings) = direct_store(&deps);
    let ch = shared::protocol::Channel::parse("news:lossy").unwrap();
    let head = r#"{"type":"message","channel":"news:lossy","offset":"#;
    let tail = r#","data":"lost","from":"server"}"#;
    assert_eq!(
        store
            .publish_channel(&ch, head, tail, &settings)
            .await
            .unwrap()
            .offset,
        1
    );
    assert_eq!(http_publish(&gw, "news:lossy", json!("after")).await, 2);
    let first = next_json(&mut ws).await;
    assert_eq!(
        (first["offset"].as_u64(), first["data"].as_str()),
        (Some(1), Some("lost"))
    );
    let second = next_json(&mut ws).await;
    assert_eq!(
        (second["offset"].as_u64(), second["data"].as_str()),
        (Some(2), Some("after"))
    );
    assert!(
        gw.metrics()
            .await
            .contains("switchboard_gap_repairs_total 1")
    );
}

/// A new connection of `user` that subscribes with `since` and `epoch`; its first `n`
/// frames.
async fn resume(
    gw: &Gw,
    user: &str,
    channel: &str,
    since: u64,
    epoch: &str,
    n: usize,
) -> Vec<Value> {
    let (mut ws, _) = authed(gw, user).await;
    let f =
        json!({"type": "subscribe", "channel": channel, "since": since, "epoch": epoch, "id": "s"});
    send_json(&mut ws, f).await;
    let mut frames = Vec::new();
    for _ in 0..n {
        frames.push(next_json(&mut ws).await);
    }
    frames
}

/// `(type, offset, recovered)` of a frame.
fn summary(f: &Value) -> (String, Option<u64>, Option<bool>) {
    (
        f["type"].as_str().unwrap_or_default().to_owned(),
        f["offset"].as_u64(),
        f["recovered"].as_bool(),
    )
}

/// `POST /v1/publish` until the session store answers again (after a restart).
async fn publish_when_up(gw: &Gw, channel: &str, data: Value) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match try_publish(gw, channel, &data).await {
            (200, body) => return body["offset"].as_u64().unwrap(),
            (503, _) => {}
            (status, body) => panic!("{status}: {body}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn offsets_lost_with_redis_start_a_new_epoch_that_subscribers_are_told_of() {
    let mut deps = Deps::start();
    let gw = gateway(&deps, public).await;
    let (mut ws, _) = authed(&gw, "eve").await;
    let first = subscribe(&mut ws, "news:epoch", None).await;
    let old_epoch = first["epoch"]
        .as_str()
        .expect("subscribed has an epoch")
        .to_owned();
    for i in 1..=3 {
        assert_eq!(http_publish(&gw, "news:epoch", json!(i)).await, i);
        next_matching(&mut ws, |f| f["type"] == "message" && f["offset"] == i).await;
    }
    // Redis runs without persistence: it comes back empty and offsets count from 1.
    deps.redis.single().stop();
    deps.redis.single().start_again().unwrap();
    assert_eq!(publish_when_up(&gw, "news:epoch", json!("after")).await, 1);

    // The subscriber that stayed connected is told its position is gone, then gets
    // the new count from its start, instead of dropping offsets 1..=3 as repeats.
    let reset = next_matching(&mut ws, |f| f["type"] != "join").await;
    assert_eq!(
        (
            reset["type"].as_str(),
            reset["channel"].as_str(),
            reset["offset"].as_u64(),
            reset["recovered"].as_bool()
        ),
        (Some("subscribed"), Some("news:epoch"), Some(0), Some(false)),
        "{reset}"
    );
    assert!(reset.get("id").is_none(), "unsolicited: {reset}");
    let new_epoch = reset["epoch"].as_str().unwrap().to_owned();
    assert!(
        new_epoch.parse::<u64>().unwrap() > old_epoch.parse::<u64>().unwrap(),
        "epochs grow: {old_epoch} then {new_epoch}"
    );
    let m = next_json(&mut ws).await;
    assert_eq!(
        (m["offset"].as_u64(), m["data"].as_str()),
        (Some(1), Some("after"))
    );
    for i in 2..=5 {
        assert_eq!(http_publish(&gw, "news:epoch", json!(i)).await, i);
    }

    // A client coming back with a position of the old count is not "recovered", even
    // though the new count has passed its offset...
    let frames = resume(&gw, "eli", "news:epoch", 3, &old_epoch, 1).await;
    assert_eq!(
        summary(&frames[0]),
        ("subscribed".into(), Some(5), Some(false)),
        "nothing replayed: {frames:?}"
    );
    assert_eq!(frames[0]["epoch"], new_epoch.as_str());
    // ...and one with a position of the new count is.
    let frames = resume(&gw, "fay", "news:epoch", 3, &new_epoch, 3).await;
    assert_eq!(
        frames.iter().map(summary).collect::<Vec<_>>(),
        [
            ("message".into(), Some(4), None),
            ("message".into(), Some(5), None),
            ("subscribed".into(), Some(5), Some(true)),
        ]
    );
    assert!(
        gw.metrics()
            .await
            .contains("switchboard_epoch_restarts_total 1")
    );
}

#[tokio::test]
async fn gap_repair_reads_history_only_in_the_subscriptions_epoch() {
    let deps = Deps::start();
    let (store, settings) = direct_store(&deps);
    let ch = shared::protocol::Channel::parse("news:range").unwrap();
    let (head, tail) = (r#"{"offset":"#, "}");
    let mut at = None;
    for _ in 0..3 {
        at = Some(
            store
                .publish_channel(&ch, head, tail, &settings)
                .await
                .unwrap(),
        );
    }
    let at = at.unwrap();
    assert_eq!(at.offset, 3);
    let read = store.channel_position(&ch, &settings).await.unwrap();
    assert_eq!(read, at, "the position is the last publication");
    let offsets = |r: Option<Vec<(u64, String)>>| {
        r.map(|v| v.into_iter().map(|(o, _)| o).collect::<Vec<_>>())
    };
    assert_eq!(
        offsets(store.channel_range(&ch, at.epoch, 0, 3).await.unwrap()),
        Some(vec![1, 2])
    );
    assert_eq!(
        offsets(store.channel_range(&ch, at.epoch + 1, 0, 3).await.unwrap()),
        None,
        "another epoch's offsets are not these"
    );
    assert_eq!(
        offsets(store.channel_range(&ch, 0, 0, 3).await.unwrap()),
        Some(vec![1, 2]),
        "an unknown epoch reads what there is"
    );
    // A channel nobody published to gets a position (offset 0) when read, and its
    // first publication is offset 1 of that epoch.
    let quiet = shared::protocol::Channel::parse("news:quiet").unwrap();
    let made = store.channel_position(&quiet, &settings).await.unwrap();
    assert!(made.epoch > 0 && made.offset == 0, "{made:?}");
    assert_eq!(
        store.channel_position(&quiet, &settings).await.unwrap(),
        made
    );
    let first = store
        .publish_channel(&quiet, head, tail, &settings)
        .await
        .unwrap();
    assert_eq!((first.epoch, first.offset), (made.epoch, 1));
    assert_eq!(
        offsets(store.channel_range(&quiet, made.epoch, 0, 2).await.unwrap()),
        Some(vec![1])
    );
}
