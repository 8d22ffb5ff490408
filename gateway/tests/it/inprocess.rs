//! Several gateway nodes in this process on one in-memory bus and store
//! (`shared::bus::memory::MemoryBus`, `shared::store::MemoryStore`): the protocol logic
//! across nodes (fan-out, recovery, presence, read offsets, kicks, revocations, the
//! per-user limit, chat delivery, outages) without NATS or Redis. The same
//! behaviours on the real servers are in `channels`, `cluster`, `chat` and `faults`;
//! these run in milliseconds and can set up states the servers make hard to reach.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use shared::bus::memory::MemoryBus;
use shared::bus::{Log, SharedBus};
use shared::protocol::{ChatRequest, ServerFrame};
use shared::store::memory::MemoryStore;
use shared::subjects::Subjects;
use testkit::tokens;

use crate::common::*;

/// Nodes sharing one bus and one store.
struct Cluster {
    bus: Arc<MemoryBus>,
    store: Arc<MemoryStore>,
    nodes: Vec<Gw>,
}

/// A configuration whose NATS and Redis addresses are never dialled: the backends
/// are given.
fn config() -> gateway::RawConfig {
    gateway::RawConfig {
        cluster: shared::config::ClusterArgs {
            nats_url: Some("nats://127.0.0.1:1".into()),
            redis_url: Some("redis://127.0.0.1:1".into()),
            node_id: Some(format!("mem-{}", testkit::free_port())),
            ..Default::default()
        },
        jwt_secret: Some(tokens::TEST_SECRET.into()),
        api_key: Some(API_KEY.into()),
        drain_secs: Some(1),
        public_namespaces: Some("news".into()),
        message_rate: Some(10_000),
        message_burst: Some(10_000),
        // Every test client comes from 127.0.0.1.
        connect_rate_per_ip: Some(10_000),
        connect_burst_per_ip: Some(10_000),
        ..gateway::RawConfig::default()
    }
}

impl Cluster {
    async fn start(n: usize, tweak: impl Fn(&mut gateway::RawConfig)) -> Cluster {
        let bus = Arc::new(MemoryBus::new(Subjects::new("sb")));
        let store = Arc::new(MemoryStore::new());
        let mut nodes = Vec::new();
        for _ in 0..n {
            let mut raw = config();
            tweak(&mut raw);
            let backends = gateway::Backends::on(bus.clone(), store.clone());
            nodes.push(start_gateway_on(raw, Some(backends)).await);
        }
        Cluster { bus, store, nodes }
    }

    fn shared_bus(&self) -> SharedBus {
        self.bus.clone()
    }
}

/// Users' teams as the stand-in workers answer them; tests change them.
type Teams = Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<String>>>>;

/// Stands in for workers on the user-context RPC: every user is in the teams listed
/// for them (changed through the returned map).
async fn context_responder(bus: SharedBus, teams: &[(&str, &[&str])]) -> Teams {
    let map: Teams = Arc::new(std::sync::Mutex::new(
        teams
            .iter()
            .map(|(u, t)| (u.to_string(), t.iter().map(|s| s.to_string()).collect()))
            .collect(),
    ));
    let mut sub = bus
        .subscribe(
            Subjects::new("sb").user_context_rpc(),
            Some("workers".into()),
        )
        .await
        .unwrap();
    let answers = map.clone();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let req: Value = serde_json::from_slice(&msg.payload).unwrap_or_default();
            let user = req["user_id"].as_str().unwrap_or_default();
            let teams: Vec<Value> = answers
                .lock()
                .unwrap()
                .get(user)
                .into_iter()
                .flatten()
                .map(|id| json!({"id": id, "name": id}))
                .collect();
            let body = json!({"teams": teams, "tasks": [], "degraded": false});
            if let Some(reply) = msg.reply {
                let _ = bus
                    .publish(reply, Vec::new(), body.to_string().into())
                    .await;
            }
        }
    });
    map
}

/// Stands in for workers on the chat queue: each request is answered with two chunks
/// on the user's subject and a final frame, live and stored, as workers publish them.
async fn chat_worker(bus: SharedBus) {
    let subjects = Subjects::new("sb");
    // Core subscribers of the queue's subject see each request as it is stored.
    let mut requests = bus.subscribe(subjects.chat_requests(), None).await.unwrap();
    tokio::spawn(async move {
        while let Some(msg) = requests.next().await {
            let req: ChatRequest = serde_json::from_slice(&msg.payload).unwrap();
            let headers = |last: bool| {
                let mut h = vec![(
                    shared::bus::stream::HEADER_REQUEST.to_owned(),
                    req.request_id.clone(),
                )];
                if last {
                    h.push((shared::bus::stream::HEADER_FINAL.to_owned(), "1".to_owned()));
                }
                h
            };
            for (seq, content) in ["echo: ", &req.message].into_iter().enumerate() {
                let chunk = ServerFrame::ChatChunk {
                    session_id: req.session_id.clone(),
                    request_id: req.request_id.clone(),
                    seq: seq as u64,
                    content: content.to_owned(),
                };
                let _ = bus
                    .publish(
                        subjects.user(&req.user_id),
                        headers(false),
                        chunk.to_bytes(),
                    )
                    .await;
            }
            let complete = ServerFrame::ChatComplete {
                session_id: req.session_id.clone(),
                request_id: req.request_id.clone(),
                content: format!("echo: {}", req.message),
                usage: None,
            }
            .to_bytes();
            let _ = bus
                .publish(subjects.user(&req.user_id), headers(true), complete.clone())
                .await;
            bus.store(
                Log::ChatEvents,
                subjects.chat_events(&req.user_id),
                &req.request_id,
                headers(true),
                complete,
                Duration::from_secs(1),
            )
            .await
            .unwrap();
        }
    });
}

/// Waits out the stored final's grace (`finals`), then checks that nothing but the
/// answer to a ping arrives on each connection.
async fn no_second_final(connections: [&mut Ws; 2]) {
    tokio::time::sleep(gateway::finals::STORED_FINAL_GRACE + Duration::from_millis(300)).await;
    for ws in connections {
        send_json(ws, json!({"type": "ping"})).await;
        assert_eq!(next_json(ws).await["type"], "pong", "exactly one final");
    }
}

#[tokio::test]
async fn publications_reach_every_node_in_order() {
    let c = Cluster::start(3, |_| {}).await;
    let (mut publisher, _) = authed(&c.nodes[0], "pat").await;
    let mut subscribers = Vec::new();
    for (node, user) in [(1, "sue"), (2, "sid"), (2, "sal")] {
        let (mut ws, _) = authed(&c.nodes[node], user).await;
        let s = subscribe(&mut ws, "news:live", None).await;
        assert_eq!(
            (s["recovered"].as_bool(), s["offset"].as_u64()),
            (Some(false), Some(0))
        );
        subscribers.push(ws);
    }
    for i in 0..50 {
        send_json(
            &mut publisher,
            json!({"type": "publish", "channel": "news:live", "data": {"n": i}, "id": i}),
        )
        .await;
    }
    for i in 1..=50u64 {
        let ack = next_json(&mut publisher).await;
        assert_eq!(
            (ack["type"].as_str(), ack["offset"].as_u64()),
            (Some("ack"), Some(i))
        );
    }
    for ws in &mut subscribers {
        for i in 0..50u64 {
            let m = next_json(ws).await;
            assert_eq!(
                (
                    m["type"].as_str(),
                    m["offset"].as_u64(),
                    &m["data"],
                    &m["from"]
                ),
                (
                    Some("message"),
                    Some(i + 1),
                    &json!({"n": i}),
                    &json!("pat")
                )
            );
        }
    }
}

#[tokio::test]
async fn recovery_on_another_node_replays_exactly_what_was_missed() {
    let c = Cluster::start(2, |_| {}).await;
    let (mut ws, _) = authed(&c.nodes[0], "rick").await;
    subscribe(&mut ws, "news:stream", None).await;
    let (mut publisher, _) = authed(&c.nodes[1], "pub").await;
    let publish = |n: u64| json!({"type": "publish", "channel": "news:stream", "data": n, "id": n});
    for n in 1..=10 {
        send_json(&mut publisher, publish(n)).await;
        next_matching(&mut publisher, |f| f["type"] == "ack").await;
    }
    let mut last = 0;
    while last < 10 {
        last = next_json(&mut ws).await["offset"].as_u64().unwrap();
    }
    drop(ws);
    for n in 11..=25 {
        send_json(&mut publisher, publish(n)).await;
        next_matching(&mut publisher, |f| f["type"] == "ack").await;
    }
    let (mut ws, _) = authed(&c.nodes[1], "rick").await;
    send_json(
        &mut ws,
        json!({"type": "subscribe", "channel": "news:stream", "since": last, "id": "s"}),
    )
    .await;
    let mut got = Vec::new();
    let subscribed = loop {
        let f = next_json(&mut ws).await;
        match f["type"].as_str() {
            Some("message") => got.push(f["offset"].as_u64().unwrap()),
            Some("subscribed") => break f,
            _ => panic!("unexpected {f}"),
        }
    };
    assert_eq!(subscribed["recovered"], true, "{subscribed}");
    assert_eq!(
        got,
        (11..=25).collect::<Vec<_>>(),
        "contiguous, no duplicates"
    );
    // Past the history bound, or in another epoch: not recovered.
    let (mut ws, _) = authed(&c.nodes[0], "rick").await;
    send_json(
        &mut ws,
        json!({"type": "subscribe", "channel": "news:stream", "since": 3, "epoch": "1", "id": "e"}),
    )
    .await;
    let s = next_matching(&mut ws, |f| {
        f["type"] == "subscribed" || f["type"] == "error"
    })
    .await;
    assert_eq!(
        (s["recovered"].as_bool(), s["offset"].as_u64()),
        (Some(false), Some(25)),
        "{s}"
    );
}

#[tokio::test]
async fn presence_typing_and_read_offsets_span_the_nodes() {
    let c = Cluster::start(2, |_| {}).await;
    context_responder(c.shared_bus(), &[("ann", &["t1"]), ("ben", &["t1"])]).await;
    let (mut ben, _) = authed(&c.nodes[1], "ben").await;
    subscribe(&mut ben, "team:t1", None).await;
    let (mut ann, _) = authed(&c.nodes[0], "ann").await;
    let s = subscribe(&mut ann, "team:t1", None).await;
    assert_eq!(s["type"], "subscribed", "{s}");
    assert_eq!(
        next_json(&mut ben).await,
        json!({"type": "join", "channel": "team:t1", "user": "ann"})
    );
    send_json(
        &mut ben,
        json!({"type": "presence", "channel": "team:t1", "id": 1}),
    )
    .await;
    let p = next_matching(&mut ben, |f| f["type"] == "presence").await;
    assert_eq!(
        p["users"],
        json!([{"user_id": "ann", "connections": 1}, {"user_id": "ben", "connections": 1}])
    );
    // Typing reaches the others only.
    send_json(&mut ann, json!({"type": "typing", "channel": "team:t1"})).await;
    let t = next_matching(&mut ben, |f| f["type"] == "typing").await;
    assert_eq!(t["user"], "ann");
    send_json(&mut ann, json!({"type": "ping"})).await;
    assert_eq!(
        next_json(&mut ann).await["type"],
        "pong",
        "no echo of one's own typing"
    );
    // A read offset set on one node is the user's on the other.
    send_json(
        &mut ann,
        json!({"type": "publish", "channel": "team:t1", "data": "hi", "id": "p"}),
    )
    .await;
    next_matching(&mut ann, |f| f["type"] == "ack").await;
    next_matching(&mut ben, |f| f["type"] == "message").await;
    send_json(
        &mut ben,
        json!({"type": "read", "channel": "team:t1", "offset": 1, "id": "r"}),
    )
    .await;
    next_matching(&mut ben, |f| f["type"] == "ack").await;
    drop(ben);
    let (mut ben, _) = authed(&c.nodes[0], "ben").await;
    let s = subscribe(&mut ben, "team:t1", None).await;
    assert_eq!(s["read_offset"], 1, "{s}");
    // The last connection leaving a channel is a `leave` for the others.
    send_json(
        &mut ben,
        json!({"type": "unsubscribe", "channel": "team:t1"}),
    )
    .await;
    let l = next_matching(&mut ann, |f| f["type"] == "leave").await;
    assert_eq!(l["user"], "ben");
}

#[tokio::test]
async fn kicks_revocations_and_the_user_limit_hold_across_nodes() {
    let c = Cluster::start(2, |raw| raw.max_connections_per_user = Some(2)).await;
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let (mut w1, _) = authed(a, "mona").await;
    let (mut w2, _) = authed(b, "mona").await;
    // The third connection of the user, on either node, is over the limit.
    let (mut w3, _) = connect(&a.url(), Hs::bearer(&tokens::token("mona", 600)))
        .await
        .unwrap();
    expect_refusal(&mut w3, 4509, "CONNECTION_LIMIT").await;
    let (status, _) = api_post(a, "/v1/disconnect", &json!({"user_id": "mona"})).await;
    assert_eq!(status, 200);
    expect_refusal(&mut w1, 4503, "FORBIDDEN").await;
    expect_refusal(&mut w2, 4503, "FORBIDDEN").await;
    // Both slots are free again once the kicked sockets are gone.
    let mut kept = Vec::new();
    for gw in [a, b] {
        let token = tokens::token("mona", 600);
        let start = std::time::Instant::now();
        loop {
            let (mut ws, _) = connect(&gw.url(), Hs::bearer(&token)).await.unwrap();
            if next_json(&mut ws).await["type"] == "authenticated" {
                kept.push(ws);
                break;
            }
            assert!(
                start.elapsed() < WAIT,
                "the kicked connections' slots stay taken"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let exp = tokens::now() + 600;
    let token = tokens::hs256(
        tokens::TEST_SECRET,
        &json!({"sub": "rita", "exp": exp, "iat": tokens::now(), "jti": "t-1"}),
    );
    let (mut ws, _) = connect(&b.url(), Hs::bearer(&token)).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "authenticated");
    let (status, _) = api_post(a, "/v1/revoke", &json!({"jti": "t-1", "exp": exp})).await;
    assert_eq!(status, 200);
    // The notice reaches the other node at once: no wait for its background read.
    let (mut ws, _) = connect(&b.url(), Hs::bearer(&token)).await.unwrap();
    let f = next_json(&mut ws).await;
    assert_eq!(
        (f["type"].as_str(), f["code"].as_str()),
        (Some("error"), Some("TOKEN_INVALID"))
    );
    let conns = api_get(a, "/v1/users/mona/connections").await;
    assert_eq!(
        conns["connections"].as_array().map(Vec::len),
        Some(2),
        "{conns}"
    );
}

#[tokio::test]
async fn a_chat_reply_reaches_every_connection_of_the_user_once() {
    let c = Cluster::start(2, |_| {}).await;
    chat_worker(c.shared_bus()).await;
    let (mut here, _) = authed(&c.nodes[0], "alice").await;
    let (mut there, _) = authed(&c.nodes[1], "alice").await;
    send_json(
        &mut here,
        json!({"type": "chat.send", "message": "hello", "id": 1}),
    )
    .await;
    let ack = next_matching(&mut here, |f| f["type"] == "ack").await;
    let request = ack["request_id"].as_str().unwrap().to_owned();
    for ws in [&mut here, &mut there] {
        let mut text = String::new();
        let complete = loop {
            let f = next_json(ws).await;
            assert_eq!(f["request_id"], request.as_str(), "{f}");
            match f["type"].as_str() {
                Some("chat.chunk") => text.push_str(f["content"].as_str().unwrap()),
                Some("chat.complete") => break f,
                _ => panic!("unexpected {f}"),
            }
        };
        assert_eq!(
            (text.as_str(), complete["content"].as_str()),
            ("echo: hello", Some("echo: hello"))
        );
    }
    // The stored copy of the final (read from the events log a second later) is not
    // delivered again.
    no_second_final([&mut here, &mut there]).await;
}

#[tokio::test]
async fn outages_of_the_bus_and_the_store_are_reported_not_fatal() {
    let c = Cluster::start(2, |_| {}).await;
    let (mut ws, _) = authed(&c.nodes[0], "olga").await;
    subscribe(&mut ws, "news:x", None).await;

    c.store.set_down(true);
    send_json(
        &mut ws,
        json!({"type": "publish", "channel": "news:x", "data": 1, "id": "p"}),
    )
    .await;
    let e = next_matching(&mut ws, |f| f["type"] == "error").await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("UNAVAILABLE"), Some("p")),
        "{e}"
    );
    for gw in &c.nodes {
        gw.wait_ready(false).await;
    }
    c.store.set_down(false);
    for gw in &c.nodes {
        gw.wait_ready(true).await;
    }
    send_json(
        &mut ws,
        json!({"type": "publish", "channel": "news:x", "data": 2, "id": "q"}),
    )
    .await;
    let ack = next_matching(&mut ws, |f| f["type"] == "ack").await;
    assert_eq!(ack["offset"], 1);

    c.bus.set_connected(false);
    for gw in &c.nodes {
        gw.wait_ready(false).await;
    }
    c.bus.set_connected(true);
    for gw in &c.nodes {
        gw.wait_ready(true).await;
    }
    // The connection lived through both.
    send_json(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(
        next_matching(&mut ws, |f| f["type"] == "pong").await["type"],
        "pong"
    );
}

#[tokio::test]
async fn a_store_back_empty_starts_a_new_epoch_that_subscribers_are_told_of() {
    let c = Cluster::start(2, |_| {}).await;
    let (mut ws, _) = authed(&c.nodes[1], "eve").await;
    let first = subscribe(&mut ws, "news:epoch", None).await;
    let old_epoch: u64 = first["epoch"].as_str().unwrap().parse().unwrap();
    let (mut publisher, _) = authed(&c.nodes[0], "pub").await;
    let publish = |n: u64| json!({"type": "publish", "channel": "news:epoch", "data": n, "id": n});
    for n in 1..=3 {
        send_json(&mut publisher, publish(n)).await;
        next_matching(&mut publisher, |f| f["type"] == "ack").await;
        next_matching(&mut ws, |f| f["type"] == "message").await;
    }
    // Redis restarted without persistence: offsets count from 1 again.
    c.store.flush_all();
    send_json(&mut publisher, publish(4)).await;
    let ack = next_matching(&mut publisher, |f| f["type"] == "ack").await;
    assert_eq!(ack["offset"], 1);
    let reset = next_json(&mut ws).await;
    assert_eq!(
        (
            reset["type"].as_str(),
            reset["offset"].as_u64(),
            reset["recovered"].as_bool()
        ),
        (Some("subscribed"), Some(0), Some(false)),
        "{reset}"
    );
    let new_epoch: u64 = reset["epoch"].as_str().unwrap().parse().unwrap();
    assert!(new_epoch > old_epoch);
    let m = next_json(&mut ws).await;
    assert_eq!(
        (m["offset"].as_u64(), m["data"].as_u64()),
        (Some(1), Some(4))
    );
}

#[tokio::test]
async fn chat_rate_and_context_refreshes_hold_across_nodes() {
    let c = Cluster::start(2, |raw| raw.chat_rate_per_minute = Some(2)).await;
    let teams = context_responder(c.shared_bus(), &[("erin", &["t1"])]).await;
    let (mut wa, _) = authed(&c.nodes[0], "erin").await;
    let (mut wb, _) = authed(&c.nodes[1], "erin").await;
    for ws in [&mut wa, &mut wb] {
        send_json(ws, json!({"type": "chat.send", "message": "hi", "id": "c"})).await;
        assert_eq!(next_matching(ws, |f| f["id"] == "c").await["type"], "ack");
    }
    send_json(
        &mut wa,
        json!({"type": "chat.send", "message": "third", "id": 3}),
    )
    .await;
    let e = next_matching(&mut wa, |f| f["id"] == 3).await;
    assert_eq!(e["code"], "RATE_LIMITED", "{e}");

    for ws in [&mut wa, &mut wb] {
        assert_eq!(subscribe(ws, "team:t1", None).await["type"], "subscribed");
    }
    teams
        .lock()
        .unwrap()
        .insert("erin".into(), vec!["t2".into()]);
    let (status, _) = api_post(&c.nodes[1], "/v1/users/erin/refresh-context", &json!({})).await;
    assert_eq!(status, 200);
    for ws in [&mut wa, &mut wb] {
        let u = next_matching(ws, |f| f["type"] == "unsubscribed").await;
        assert_eq!(
            u,
            json!({"type": "unsubscribed", "channel": "team:t1", "reason": "FORBIDDEN"})
        );
        let ctx = next_matching(ws, |f| f["type"] == "context").await;
        assert_eq!(ctx["teams"][0]["id"], "t2", "{ctx}");
    }
}

#[tokio::test]
async fn a_draining_node_hands_its_clients_to_the_others() {
    let mut c = Cluster::start(2, |_| {}).await;
    let (mut ws, _) = authed(&c.nodes[0], "dora").await;
    subscribe(&mut ws, "news:drain", None).await;
    let (mut publisher, _) = authed(&c.nodes[1], "pub").await;
    send_json(
        &mut publisher,
        json!({"type": "publish", "channel": "news:drain", "data": 1, "id": 1}),
    )
    .await;
    next_matching(&mut ws, |f| f["type"] == "message").await;
    let draining = c.nodes.remove(0);
    let ((), (frames, code)) = tokio::join!(draining.stop(), until_close(&mut ws));
    assert_eq!(code, Some(1012));
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0]["type"], "reconnect");
    send_json(
        &mut publisher,
        json!({"type": "publish", "channel": "news:drain", "data": 2, "id": 2}),
    )
    .await;
    next_matching(&mut publisher, |f| f["id"] == 2).await;
    // On the other node the client resumes where it was.
    let (mut ws, _) = authed(&c.nodes[0], "dora").await;
    let mut frames = Vec::new();
    send_json(
        &mut ws,
        json!({"type": "subscribe", "channel": "news:drain", "since": 1, "id": "s"}),
    )
    .await;
    loop {
        let f = next_json(&mut ws).await;
        let done = f["type"] == "subscribed";
        frames.push(f);
        if done {
            break;
        }
    }
    assert_eq!(frames[0]["offset"], 2, "{frames:?}");
    assert_eq!(frames[1]["recovered"], true, "{frames:?}");
}

/// The real worker (`worker::run_on`) on the nodes' bus and store, answering from a
/// stub LLM; stops when dropped (like a crash: nothing more is acked).
struct RealWorker {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RealWorker {
    async fn start(c: &Cluster, llm: &testkit::llm::LlmStub) -> RealWorker {
        let raw = worker::RawConfig {
            cluster: shared::config::ClusterArgs {
                // Never dialled: the backends are given.
                nats_url: Some("nats://127.0.0.1:1".into()),
                redis_url: Some("redis://127.0.0.1:1".into()),
                node_id: Some(format!("mem-w-{}", testkit::free_port())),
                ..Default::default()
            },
            llm_base_url: Some(llm.base_url()),
            llm_connect_timeout_ms: Some(1000),
            llm_first_token_timeout_ms: Some(3000),
            llm_idle_timeout_ms: Some(1000),
            llm_total_timeout_ms: Some(15_000),
            ack_wait_secs: Some(2),
            shutdown_grace_secs: Some(1),
            ..worker::RawConfig::default()
        };
        let config = raw.validate().expect("valid worker config");
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let backends = worker::Backends::on(c.bus.clone(), c.store.clone());
        let stop = tokio_util::sync::CancellationToken::new();
        let s2 = stop.clone();
        let task = tokio::spawn(async move {
            worker::run_on(admin, config, backends, s2)
                .await
                .expect("worker run");
        });
        // Ready means pulling from the queue.
        let start = std::time::Instant::now();
        loop {
            let ready = reqwest::get(format!("http://{admin_addr}/readyz"))
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready {
                break;
            }
            assert!(start.elapsed() < WAIT, "the worker never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        RealWorker { stop, task }
    }
}

impl Drop for RealWorker {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

#[tokio::test]
async fn a_real_worker_answers_chat_across_nodes_in_process() {
    let c = Cluster::start(2, |_| {}).await;
    let llm = testkit::llm::LlmStub::start().await;
    let _worker = RealWorker::start(&c, &llm).await;
    let (mut here, _) = authed(&c.nodes[0], "wendy").await;
    let (mut there, _) = authed(&c.nodes[1], "wendy").await;
    send_json(
        &mut here,
        json!({"type": "chat.send", "message": "hello", "id": 1}),
    )
    .await;
    let ack = next_matching(&mut here, |f| f["type"] == "ack").await;
    let request = ack["request_id"].as_str().unwrap().to_owned();
    let session = ack["session_id"].as_str().unwrap().to_owned();
    for ws in [&mut here, &mut there] {
        let mut text = String::new();
        let mut seqs = Vec::new();
        let complete = loop {
            let f = next_json(ws).await;
            assert_eq!(f["request_id"], request.as_str(), "{f}");
            match f["type"].as_str() {
                Some("chat.chunk") => {
                    seqs.push(f["seq"].as_u64().unwrap());
                    text.push_str(f["content"].as_str().unwrap());
                }
                Some("chat.complete") => break f,
                _ => panic!("unexpected {f}"),
            }
        };
        assert!(!seqs.is_empty(), "streamed in chunks");
        assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
        assert_eq!(
            (text.as_str(), complete["content"].as_str()),
            ("Hello, world!", Some("Hello, world!"))
        );
    }
    // The stored copy of the final (read from the events log a second later) is not
    // delivered again.
    no_second_final([&mut here, &mut there]).await;
    send_json(
        &mut there,
        json!({"type": "history", "session_id": session, "id": "h"}),
    )
    .await;
    let h = next_matching(&mut there, |f| f["type"] == "history").await;
    let turns: Vec<(&str, &str)> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    assert_eq!(
        turns,
        [("user", "hello"), ("assistant", "Hello, world!")],
        "{h}"
    );
    assert_eq!(llm.request_count(), 1, "answered once");
    // The request left the queue: acked, not waiting for a redelivery.
    let start = std::time::Instant::now();
    while shared::bus::Bus::backlog(&*c.bus).await.unwrap() != shared::bus::Backlog::default() {
        assert!(start.elapsed() < WAIT, "the request was never acked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
