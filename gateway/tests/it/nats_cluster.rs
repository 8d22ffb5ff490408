//! Against a real three-node NATS cluster with JetStream streams replicated three
//! times (`SB_JETSTREAM_REPLICAS=3`), `SB_NATS_URL` listing every node: a gateway
//! whose NATS node dies moves to another without dropping its clients, and chat
//! requests acknowledged before the kill still complete.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testkit::llm::{LlmStub, Reply, Script};
use testkit::{NatsCluster, Redis};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::common::*;

/// Replicas of every stream in these tests: one per node.
const REPLICAS: usize = 3;
/// Bound on a gateway moving to another node and delivering again: the mux retries
/// within 2 s, async-nats within its reconnect delay, JetStream re-elects stream
/// leaders in a few seconds.
const FAILOVER_BOUND: Duration = Duration::from_secs(15);

struct Cluster {
    nats: NatsCluster,
    redis: Redis,
}

impl Cluster {
    async fn start() -> Cluster {
        let nats = tokio::task::spawn_blocking(|| NatsCluster::start().expect("nats cluster"))
            .await
            .unwrap();
        Cluster {
            nats,
            redis: Redis::start().expect("redis-server"),
        }
    }

    async fn gateway(&self, tweak: impl FnOnce(&mut gateway::RawConfig)) -> Gw {
        let mut raw = gateway::RawConfig {
            cluster: shared::config::ClusterArgs {
                nats_url: Some(self.nats.url_list()),
                redis_url: Some(self.redis.url()),
                node_id: Some(format!("gw-{}", testkit::free_port())),
                ..Default::default()
            },
            jwt_secret: Some(testkit::tokens::TEST_SECRET.into()),
            api_key: Some(API_KEY.into()),
            drain_secs: Some(1),
            jetstream_replicas: Some(REPLICAS),
            public_namespaces: Some("news".into()),
            ..gateway::RawConfig::default()
        };
        tweak(&mut raw);
        start_gateway(raw).await
    }

    async fn worker(&self, llm: &LlmStub) -> (String, CancellationToken) {
        let node_id = format!("w-{}", testkit::free_port());
        let raw = worker::RawConfig {
            cluster: shared::config::ClusterArgs {
                node_id: Some(node_id.clone()),
                nats_url: Some(self.nats.url_list()),
                redis_url: Some(self.redis.url()),
                ..Default::default()
            },
            llm_base_url: Some(llm.base_url()),
            llm_idle_timeout_ms: Some(3000),
            ack_wait_secs: Some(3),
            max_deliver: Some(5),
            shutdown_grace_secs: Some(5),
            jetstream_replicas: Some(REPLICAS),
            ..worker::RawConfig::default()
        };
        let config = raw.validate().expect("worker config");
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let s2 = shutdown.clone();
        tokio::spawn(async move { worker::run(admin, config, s2).await.expect("worker run") });
        eventually("worker ready", || async {
            reqwest::get(format!("http://{admin_addr}/readyz"))
                .await
                .map(|r| r.status() == 200)
                .unwrap_or(false)
        })
        .await;
        (format!("worker-{node_id}"), shutdown)
    }

    /// The node holding the client connection named exactly `name`.
    fn node_of(&self, name: &str) -> Option<usize> {
        self.nats.node_of_client(name)
    }

    async fn kill(&mut self, i: usize) {
        self.nats.kill(i);
    }

    async fn start_again(&mut self, i: usize) {
        let nats = &mut self.nats;
        tokio::task::block_in_place(|| nats.start_again(i)).expect("node starts again");
    }
}

/// Publishes `n` to `news:live` from `publisher` until `subscriber` receives it (the
/// whole path: Redis offset, NATS publish, the subscription connection, fan-out);
/// returns how long that took. Acks, errors and older messages are skipped.
async fn delivery_works(publisher: &mut Ws, subscriber: &mut Ws, n: u64) -> Duration {
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < FAILOVER_BOUND,
            "no delivery within {FAILOVER_BOUND:?}"
        );
        send_json(
            publisher,
            json!({"type": "publish", "channel": "news:live", "data": {"n": n}}),
        )
        .await;
        let deadline = Instant::now() + Duration::from_millis(500);
        while let Ok(Some(f)) =
            tokio::time::timeout_at(deadline.into(), next_text(subscriber)).await
        {
            if f["type"] == "message" && f["data"]["n"] == n {
                return start.elapsed();
            }
        }
        // Drain the publisher's acks (or UNAVAILABLE errors while NATS moves).
        while let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_millis(1), next_text(publisher)).await
        {}
    }
}

/// The next text frame, `None` when the socket closed (a test failure here).
async fn next_text(ws: &mut Ws) -> Option<Value> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).ok(),
            Some(Ok(Message::Close(f))) => panic!("the server closed the socket: {f:?}"),
            Some(Ok(_)) => continue,
            other => panic!("the socket dropped: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_nats_node_dies_moves_to_another_without_dropping_clients() {
    let mut c = Cluster::start().await;
    let gw = c.gateway(|_| {}).await;
    let (mut publisher, _) = authed(&gw, "pam").await;
    let (mut subscriber, _) = authed(&gw, "sid").await;
    send_json(
        &mut subscriber,
        json!({"type": "subscribe", "channel": "news:live", "id": 1}),
    )
    .await;
    let s = next_matching(&mut subscriber, |f| f["type"] == "subscribed").await;
    assert_eq!(s["channel"], "news:live");
    delivery_works(&mut publisher, &mut subscriber, 0).await;

    // Kill the node of the subscription connection, then (after it is back) the node
    // of the client connection that publishes and holds JetStream.
    let mut n = 1;
    for name in [
        format!("gateway-{}-subs", gw.node_id),
        format!("gateway-{}", gw.node_id),
    ] {
        let i = c
            .node_of(&name)
            .unwrap_or_else(|| panic!("{name} is connected"));
        let killed = Instant::now();
        c.kill(i).await;
        let took = delivery_works(&mut publisher, &mut subscriber, n).await;
        n += 1;
        eventually("the connection is on another node", || async {
            c.node_of(&name).is_some_and(|j| j != i)
        })
        .await;
        gw.wait_ready(true).await;
        eprintln!(
            "{name}: node {i} killed; delivery again after {took:?}, ready after {:?}",
            killed.elapsed()
        );
        // The clients' sockets stayed open throughout: they still talk.
        for ws in [&mut publisher, &mut subscriber] {
            send_json(ws, json!({"type": "ping", "id": "p"})).await;
            let pong = next_matching(ws, |f| f["type"] == "pong").await;
            assert_eq!(pong["id"], "p");
        }
        c.start_again(i).await;
    }
    delivery_works(&mut publisher, &mut subscriber, n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_requests_acked_before_a_nats_node_dies_complete_exactly_once() {
    let mut c = Cluster::start().await;
    let llm = LlmStub::start().await;
    // About 2 s of streaming per reply: the kill lands mid-stream.
    let reply = Reply::numbered(40).token_delay(Duration::from_millis(50));
    llm.set_default(Script::Reply(reply.clone()));
    let (worker_name, worker_stop) = c.worker(&llm).await;
    let gw = c.gateway(|_| {}).await;
    let (mut ws, _) = authed(&gw, "cal").await;

    let mut requests = Vec::new();
    for id in 0..3 {
        send_json(
            &mut ws,
            json!({"type": "chat.send", "message": format!("count {id}"), "id": id}),
        )
        .await;
        let ack = next_matching(&mut ws, |f| f["type"] == "ack").await;
        requests.push(ack["request_id"].as_str().unwrap().to_owned());
    }
    // Every request is acked (stored in the R3 stream): kill the node the gateway's
    // subscriptions are on, mid-stream.
    let subs = format!("gateway-{}-subs", gw.node_id);
    let i = c.node_of(&subs).expect("gateway connected");
    eprintln!(
        "killing node {i}: gateway subs there, gateway client on {:?}, worker on {:?}",
        c.node_of(&format!("gateway-{}", gw.node_id)),
        c.node_of(&worker_name)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = Instant::now();
    c.kill(i).await;

    let mut completes: std::collections::HashMap<String, usize> = Default::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while completes.len() < requests.len() {
        let f = tokio::time::timeout_at(deadline.into(), next_text(&mut ws))
            .await
            .unwrap_or_else(|_| panic!("completions in time; have {completes:?}"))
            .unwrap();
        match f["type"].as_str() {
            Some("chat.complete") => {
                assert_eq!(f["content"], reply.text(), "{f}");
                *completes
                    .entry(f["request_id"].as_str().unwrap().to_owned())
                    .or_default() += 1;
            }
            Some("chat.error") => panic!("a request failed: {f}"),
            _ => {}
        }
    }
    eprintln!("every reply complete {:?} after the kill", killed.elapsed());
    // Nothing more: one `chat.complete` per request, even after redeliveries.
    let quiet = Instant::now() + Duration::from_secs(4);
    while let Ok(f) = tokio::time::timeout_at(quiet.into(), next_text(&mut ws)).await {
        let f = f.unwrap();
        if f["type"] == "chat.complete" {
            *completes
                .entry(f["request_id"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    for r in &requests {
        assert_eq!(completes.get(r), Some(&1), "{completes:?}");
    }
    let m = gw.metrics().await;
    eprintln!(
        "{}",
        m.lines()
            .filter(|l| l.starts_with("switchboard_chat_"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    worker_stop.cancel();
}
