//! Keeping live connections' permissions in step with the team backend
//! (docs/PROTOCOL.md, "Context changes"), refresh limits and context coalescing, and
//! history replays within the outbound budget (docs/PROTOCOL.md, "Channels in detail").

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use testkit::backend::BackendStub;
use testkit::llm::LlmStub;
use testkit::tokens;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::common::*;
use crate::e2e_chat::worker;

async fn subscribe(ws: &mut Ws, channel: &str) {
    send_json(
        ws,
        json!({"type": "subscribe", "channel": channel, "id": "s"}),
    )
    .await;
    let f = next_matching(ws, |f| f["id"] == "s").await;
    assert_eq!(f["type"], "subscribed", "{f}");
}

fn team_ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Context changes: `POST /v1/users/<id>/refresh-context` reaches the user's connections on
/// every node: the team channel the user lost ends with `unsubscribed {reason:
/// FORBIDDEN}`, each connection gets the new context, and publishing there is
/// refused. The worker holds a recent answer from the connect: the refresh bypasses it.
#[tokio::test]
async fn refresh_context_ends_lost_team_channels_on_every_node() {
    let deps = Deps::start();
    let (llm, backend) = (LlmStub::start().await, BackendStub::start().await);
    let _w = worker(&deps, &llm, &backend).await;
    let gw1 = gateway(&deps, |_| {}).await;
    let gw2 = gateway(&deps, |_| {}).await;
    let (mut a, auth) = authed(&gw1, "leaver").await;
    assert_eq!(team_ids(&auth["teams"]), ["team-1"], "{auth}");
    let (mut b, _) = authed(&gw2, "leaver").await;
    subscribe(&mut a, "team:team-1").await;
    subscribe(&mut b, "team:team-1").await;

    backend.set_teams(json!([{"id": "team-2", "name": "Two"}]));
    let r = api()
        .post(gw1.http("/v1/users/leaver/refresh-context"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"ok": true}));

    for ws in [&mut a, &mut b] {
        let u = next_matching(ws, |f| f["type"] == "unsubscribed").await;
        assert_eq!(
            u,
            json!({"type": "unsubscribed", "channel": "team:team-1", "reason": "FORBIDDEN"})
        );
        let c = next_matching(ws, |f| f["type"] == "context").await;
        assert_eq!(team_ids(&c["teams"]), ["team-2"], "{c}");
        assert_eq!(c["degraded"], false);
        assert!(c["tasks"].is_array());
        send_json(
            ws,
            json!({"type": "publish", "channel": "team:team-1", "data": 1, "id": "p"}),
        )
        .await;
        let e = next_matching(ws, |f| f["id"] == "p").await;
        assert_eq!(e["code"], "FORBIDDEN", "{e}");
    }
    // The new team is open to them now.
    subscribe(&mut a, "team:team-2").await;

    let r = api()
        .post(gw1.http("/v1/users/no.such/refresh-context"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = api()
        .post(gw1.http("/v1/users/leaver/refresh-context"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// Context changes: without anyone calling the API, the periodic re-check finds that the
/// backend now denies the user (403: a denial, not an outage served from the cache)
/// and ends the team channel. The user's two connections on one node share one fetch.
#[tokio::test]
async fn the_periodic_recheck_applies_a_backend_denial() {
    let deps = Deps::start();
    let (llm, backend) = (LlmStub::start().await, BackendStub::start().await);
    let _w = worker(&deps, &llm, &backend).await;
    let gw = gateway(&deps, |c| c.context_revalidate_secs = Some(1)).await;
    let (mut a, _) = authed(&gw, "removed").await;
    let (mut b, _) = authed(&gw, "removed").await;
    subscribe(&mut a, "team:team-1").await;
    subscribe(&mut b, "team:team-1").await;

    backend.set_status(403);
    for ws in [&mut a, &mut b] {
        let u = next_matching(ws, |f| f["type"] == "unsubscribed").await;
        assert_eq!(u["channel"], "team:team-1");
        assert_eq!(u["reason"], "FORBIDDEN");
        let c = next_matching(ws, |f| f["type"] == "context").await;
        assert_eq!(
            c,
            json!({"type": "context", "teams": [], "tasks": [], "degraded": false})
        );
    }
    let m = gw.metrics().await;
    assert!(
        m.contains("switchboard_context_revalidations_total{result=\"applied\"}"),
        "{m}"
    );
}

/// Refresh limits: a burst of `refresh` frames is limited per connection (`RATE_LIMITED`
/// with `retry_after_ms`, the connection stays), and the refreshes that pass share
/// context fetches across the user's connections and nodes: 4 connections x 40
/// refreshes cost at most two backend rounds, not 320 calls.
#[tokio::test]
async fn refresh_bursts_are_limited_and_share_backend_calls() {
    let deps = Deps::start();
    let (llm, backend) = (LlmStub::start().await, BackendStub::start().await);
    backend.set_latency(Duration::from_millis(200));
    let _w = worker(&deps, &llm, &backend).await;
    let gw1 = gateway(&deps, |_| {}).await;
    let gw2 = gateway(&deps, |_| {}).await;
    let mut conns = Vec::new();
    for gw in [&gw1, &gw1, &gw1, &gw2] {
        conns.push(authed(gw, "refresher").await.0);
    }
    let before = backend.calls();
    let token = tokens::token("refresher", 3600);
    for ws in conns.iter_mut() {
        for i in 0..40 {
            send_json(ws, json!({"type": "refresh", "token": token, "id": i})).await;
        }
    }
    for ws in conns.iter_mut() {
        let (mut ok, mut limited) = (0, 0);
        for _ in 0..40 {
            let f = next_matching(ws, |f| f.get("id").is_some()).await;
            match f["type"].as_str() {
                Some("refreshed") => ok += 1,
                Some("error") => {
                    assert_eq!(f["code"], "RATE_LIMITED", "{f}");
                    assert!(f["retry_after_ms"].as_u64().unwrap() > 0, "{f}");
                    limited += 1;
                }
                _ => panic!("unexpected {f}"),
            }
        }
        assert_eq!((ok, limited), (3, 37));
    }
    let during = backend.calls() - before;
    assert!(during <= 4, "{during} backend calls for the refreshes");
    // Still open and serving (after the message-rate bucket refills a little: the
    // burst used all 40 frames of it).
    tokio::time::sleep(Duration::from_millis(200)).await;
    send_json(&mut conns[0], json!({"type": "ping", "id": "x"})).await;
    assert_eq!(
        next_matching(&mut conns[0], |f| f["id"] == "x").await["type"],
        "pong"
    );
}

/// Outbound budget: a client that never reads subscribes with `since: 0` to a channel
/// with a large history. The replay goes out only within the outbound budget; the
/// client is closed 4008 (`SLOW_CONSUMER`) and never got more than a fraction of the
/// history.
#[tokio::test]
async fn a_replay_to_a_client_that_does_not_read_is_closed_4008() {
    const PUBLICATIONS: usize = 150;
    const SIZE: usize = 60_000;
    let deps = Deps::start();
    let gw = gateway(&deps, |c| {
        c.public_namespaces = Some("news".into());
        c.history_size = Some(PUBLICATIONS);
    })
    .await;
    let blob = "x".repeat(SIZE);
    for _ in 0..PUBLICATIONS {
        let r = api()
            .post(gw.http("/v1/publish"))
            .bearer_auth(API_KEY)
            .json(&json!({"channel": "news:big", "data": blob}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let history = PUBLICATIONS * SIZE;

    // A socket with a small receive window, so the kernel buffers do not take the
    // replay in for the client.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(gw.addr).await.unwrap();
    let mut req = gw.url().into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", tokens::token("hoarder", 3600))).unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    let a = next_json(&mut ws).await;
    assert_eq!(a["type"], "authenticated");
    futures_util::SinkExt::send(
        &mut ws,
        Message::text(json!({"type": "subscribe", "channel": "news:big", "since": 0}).to_string()),
    )
    .await
    .unwrap();

    let slow = || async {
        gw.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix("switchboard_slow_consumer_closes_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let start = std::time::Instant::now();
    while slow().await < 1.0 {
        assert!(
            start.elapsed() < WAIT * 3,
            "never closed as a slow consumer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Now read: what was queued, then the error and the close.
    let (mut received, mut close, mut error) = (0usize, None, None);
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("close in time")
        {
            Some(Ok(Message::Text(t))) => {
                received += t.len();
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "error" {
                    error = Some(v);
                }
            }
            Some(Ok(Message::Close(f))) => {
                close = f.map(|f| u16::from(f.code));
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break,
        }
    }
    assert_eq!(close, Some(4008), "received {received} bytes");
    assert_eq!(error.expect("an error frame")["code"], "SLOW_CONSUMER");
    assert!(
        received < history / 2,
        "{received} of {history} bytes were queued for a client that does not read"
    );
}

/// No raw token on NATS unless the deployment's backend needs it: by default the
/// user-context request carries the user id only (the backend is called without the
/// user's token), and with `SB_FORWARD_USER_TOKEN` the token reaches the backend.
#[tokio::test]
async fn the_users_token_crosses_nats_only_when_forwarding_is_on() {
    let deps = Deps::start();
    let llm = LlmStub::start().await;
    let backend = BackendStub::start().await;
    backend.set_teams(json!([{"id": "t1", "name": "Core"}]));
    let _w = worker(&deps, &llm, &backend).await;

    // What crosses NATS, seen by a listener on the request subject.
    let spy = async_nats::connect(deps.nats.url()).await.unwrap();
    let mut requests = spy.subscribe("sb.rpc.user_context").await.unwrap();
    spy.flush().await.unwrap();

    let plain = gateway(&deps, |_| {}).await;
    let (_ws, a) = authed(&plain, "tina").await;
    assert_eq!(a["degraded"], false);
    let seen = tokio::time::timeout(WAIT, requests.next())
        .await
        .unwrap()
        .unwrap();
    let body: Value = serde_json::from_slice(&seen.payload).unwrap();
    assert_eq!(body["user_id"], "tina");
    assert!(body.get("token").is_none(), "a token crossed NATS: {body}");
    assert!(
        backend.authorizations().iter().all(Option::is_none),
        "{:?}",
        backend.authorizations()
    );

    let forwarding = gateway(&deps, |c| c.forward_user_token = Some(true)).await;
    let token = tokens::token("uma", 600);
    let (mut ws, _) = connect(&forwarding.url(), Hs::bearer(&token))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "authenticated");
    let seen = tokio::time::timeout(WAIT, requests.next())
        .await
        .unwrap()
        .unwrap();
    let body: Value = serde_json::from_slice(&seen.payload).unwrap();
    assert_eq!(body["token"], token.as_str());
    assert!(
        backend
            .authorizations()
            .contains(&Some(format!("Bearer {token}"))),
        "{:?}",
        backend.authorizations()
    );
}
