//! A gateway that dies (SIGKILL: no drain, no goodbye) leaves its users' presence
//! entries behind to expire; a surviving gateway's presence sweep removes them and
//! announces `leave` to the channel's subscribers, once.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testkit::tokens;

use crate::common::*;

/// Presence TTL in this test (the gateway's minimum): a dead node's entries expire
/// within it, and the sweep runs every third of it.
const PRESENCE_TTL_SECS: u64 = 3;

fn presence(c: &mut gateway::RawConfig) {
    c.public_namespaces = Some("news".into());
    c.presence_namespaces = Some("news".into());
    c.presence_ttl_secs = Some(PRESENCE_TTL_SECS);
}

/// The gateway binary as its own process, so it can be killed like a crash (an
/// in-process gateway's background tasks outlive an aborted `run`).
struct GatewayProcess {
    child: Child,
    addr: std::net::SocketAddr,
}

impl GatewayProcess {
    async fn start(deps: &Deps) -> GatewayProcess {
        let (port, admin) = (testkit::free_port(), testkit::free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .env("SB_JWT_SECRET", tokens::TEST_SECRET)
            .env("SB_NATS_URL", deps.nats.url())
            .env("SB_REDIS_URL", deps.redis.url())
            .env("SB_REDIS_CLUSTER", deps.redis.is_cluster().to_string())
            .env("SB_LISTEN", format!("127.0.0.1:{port}"))
            .env("SB_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .env("SB_NODE_ID", format!("gwp-{port}"))
            .env("SB_PUBLIC_NAMESPACES", "news")
            .env("SB_PRESENCE_NAMESPACES", "news")
            .env("SB_PRESENCE_TTL_SECS", PRESENCE_TTL_SECS.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("gateway binary");
        eventually("gateway process ready", || async move {
            reqwest::get(format!("http://127.0.0.1:{admin}/readyz"))
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        GatewayProcess {
            child,
            addr: ([127, 0, 0, 1], port).into(),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn subscribe(ws: &mut Ws, channel: &str) {
    send_json(
        ws,
        json!({"type": "subscribe", "channel": channel, "id": channel}),
    )
    .await;
    let s = next_matching(ws, |f| f["type"] == "subscribed").await;
    assert_eq!(s["channel"], channel);
}

fn is(f: &Value, kind: &str, user: &str) -> bool {
    f["type"] == kind && f["user"] == user
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_gateways_users_leave_once_within_the_presence_ttl() {
    let deps = Deps::start();
    let gw1 = gateway(&deps, presence).await;
    let gw3 = gateway(&deps, presence).await;
    let mut gw2 = GatewayProcess::start(&deps).await;
    let (mut watcher, _) = authed(&gw1, "wat").await;
    let (mut other, _) = authed(&gw3, "oli").await;
    subscribe(&mut watcher, "news:room").await;
    subscribe(&mut other, "news:room").await;
    let (mut ghost, _) = connect(
        &format!("ws://{}/ws", gw2.addr),
        Hs::bearer(&tokens::token("gus", 600)),
    )
    .await
    .unwrap();
    assert_eq!(next_json(&mut ghost).await["type"], "authenticated");
    subscribe(&mut ghost, "news:room").await;
    next_matching(&mut watcher, |f| is(f, "join", "gus")).await;

    gw2.kill();
    let killed = Instant::now();
    next_matching(&mut watcher, |f| is(f, "leave", "gus")).await;
    let took = killed.elapsed();
    eprintln!("leave announced {took:?} after the kill");
    // Expired within the TTL, found by the next sweep (every TTL / 3).
    let bound = Duration::from_secs(PRESENCE_TTL_SECS + PRESENCE_TTL_SECS / 3 + 2);
    assert!(took < bound, "leave after {took:?}");
    // Both survivors sweep the channel; only one announces. The other subscriber saw
    // the same single leave.
    next_matching(&mut other, |f| is(f, "leave", "gus")).await;
    let quiet = tokio::time::Instant::now() + Duration::from_secs(PRESENCE_TTL_SECS);
    for ws in [&mut watcher, &mut other] {
        while let Ok(Some(Ok(m))) =
            tokio::time::timeout_at(quiet, futures_util::StreamExt::next(ws)).await
        {
            if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
                let f: Value = serde_json::from_str(&t).unwrap();
                assert!(!is(&f, "leave", "gus"), "a second leave: {f}");
            }
        }
    }
    // Presence no longer lists the dead node's user.
    send_json(
        &mut watcher,
        json!({"type": "presence", "channel": "news:room", "id": 9}),
    )
    .await;
    let p = next_matching(&mut watcher, |f| f["type"] == "presence").await;
    let users: Vec<&str> = p["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(users, vec!["oli", "wat"], "{p}");
}
