//! Credential sources, subprotocol, origin, the auth frame and its deadline, token
//! expiry, refresh, and the frame-level basics.

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::json;
use testkit::tokens;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

#[tokio::test]
async fn every_credential_source_authenticates() {
    let deps = Deps::start();
    let gw = gateway(&deps, |c| {
        c.allowed_origins = Some("https://app.example.com".into())
    })
    .await;
    let t = tokens::token("alice", 3600);

    // 1. Authorization header.
    let (mut ws, resp) = connect(&gw.url(), Hs::bearer(&t)).await.unwrap();
    assert!(resp.headers().get("sec-websocket-protocol").is_none());
    let a = next_json(&mut ws).await;
    assert_eq!(a["type"], "authenticated");
    assert_eq!(a["user"]["id"], "alice");
    assert_eq!(a["node"], gw.node_id.as_str());
    assert!(a["expires_at"].as_u64().unwrap() > tokens::now());
    assert_eq!(a["degraded"], true, "no worker answers in this test");
    assert_eq!(a["teams"], json!([]));

    // 2. Subprotocol `bearer.<jwt>`: switchboard.v1 selected, the token never echoed.
    let hs = Hs {
        protocols: vec!["switchboard.v1".into(), format!("bearer.{t}")],
        origin: Some("https://app.example.com".into()),
        ..Hs::default()
    };
    let (mut ws, resp) = connect(&gw.url(), hs).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "switchboard.v1");
    assert_eq!(next_json(&mut ws).await["type"], "authenticated");

    // 3. Query parameter.
    let hs = Hs {
        query: Some(format!("token={t}")),
        ..Hs::default()
    };
    let (mut ws, _) = connect(&gw.url(), hs).await.unwrap();
    assert_eq!(next_json(&mut ws).await["user"]["id"], "alice");

    // 4. The auth frame, with the id echoed.
    let (mut ws, _) = connect(&gw.url(), Hs::default()).await.unwrap();
    send_json(&mut ws, json!({"type": "ping", "id": 1})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type": "pong", "id": 1}));
    send_json(&mut ws, json!({"type": "auth", "token": t, "id": "a1"})).await;
    let a = next_json(&mut ws).await;
    assert_eq!(a["type"], "authenticated");
    assert_eq!(a["id"], "a1");
    send_json(&mut ws, json!({"type": "ping", "id": "p"})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type": "pong", "id": "p"}));
}

#[tokio::test]
async fn header_wins_over_subprotocol_and_query() {
    let deps = Deps::start();
    let gw = gateway(&deps, |_| {}).await;
    let hs = Hs {
        bearer: Some(tokens::token("header-user", 600)),
        protocols: vec![
            "switchboard.v1".into(),
            format!("bearer.{}", tokens::token("proto-user", 600)),
        ],
        query: Some(format!("token={}", tokens::token("query-user", 600))),
        ..Hs::default()
    };
    let (mut ws, _) = connect(&gw.url(), hs).await.unwrap();
    assert_eq!(next_json(&mut ws).await["user"]["id"], "header-user");
    let hs = Hs {
        protocols: vec![
            "switchboard.v1".into(),
            format!("bearer.{}", tokens::token("proto-user", 600)),
        ],
        query: Some(format!("token={}", tokens::token("query-user", 600))),
        ..Hs::default()
    };
    let (mut ws, _) = connect(&gw.url(), hs).await.unwrap();
    assert_eq!(next_json(&mut ws).await["user"]["id"], "proto-user");
}

#[tokio::test]
async fn foreign_origin_is_403_without_upgrade() {
    let deps = Deps::start();
    let gw = gateway(&deps, |c| {
        c.allowed_origins = Some("https://app.example.com".into())
    })
    .await;
    let hs = Hs {
        origin: Some("https://evil.example.net".into()),
        ..Hs::bearer(&tokens::token("a", 60))
    };
    match connect(&gw.url(), hs).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 403);
            let body: serde_json::Value =
                serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "FORBIDDEN");
        }
        other => panic!(
            "expected HTTP 403, got {:?}",
            other.map(|(_, r)| r.status())
        ),
    }
    // No Origin (a native client) is fine.
    let (mut ws, _) = connect(&gw.url(), Hs::bearer(&tokens::token("a", 60)))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "authenticated");
}

#[tokio::test]
async fn no_auth_in_time_is_4000() {
    let deps = Deps::start();
    let gw = gateway(&deps, |c| c.auth_timeout_secs = Some(1)).await;
    let (mut ws, _) = connect(&gw.url(), Hs::default()).await.unwrap();
    // Other frames before auth are refused but do not extend the deadline.
    send_json(
        &mut ws,
        json!({"type": "subscribe", "channel": "team:x", "id": 9}),
    )
    .await;
    let e = next_json(&mut ws).await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_i64()),
        (Some("BAD_REQUEST"), Some(9))
    );
    expect_refusal(&mut ws, 4000, "AUTH_TIMEOUT").await;
}

#[tokio::test]
async fn expiry_warns_then_closes_4001_and_refresh_extends() {
    let deps = Deps::start();
    let gw = gateway(&deps, |c| c.jwt_leeway_secs = Some(0)).await;
    // Less than 60 s left: the warning comes right after `authenticated`.
    let (mut ws, _) = connect(&gw.url(), Hs::bearer(&tokens::token("bob", 2)))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "authenticated");
    let w = next_json(&mut ws).await;
    assert_eq!(w["type"], "token_expiring");
    let e = expect_refusal(&mut ws, 4001, "TOKEN_EXPIRED").await;
    assert_eq!(e["action"], "REFRESH_TOKEN");

    // A refresh for the same user keeps the connection past the first token's exp.
    let (mut ws, _) = connect(&gw.url(), Hs::bearer(&tokens::token("bob", 2)))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "authenticated");
    assert_eq!(next_json(&mut ws).await["type"], "token_expiring");
    let fresh = tokens::token("bob", 3600);
    send_json(&mut ws, json!({"type": "refresh", "token": fresh, "id": 5})).await;
    let r = next_json(&mut ws).await;
    assert_eq!(r["type"], "refreshed");
    assert_eq!(r["id"], 5);
    assert!(r["expires_at"].as_u64().unwrap() > tokens::now() + 3000);
    tokio::time::sleep(Duration::from_secs(3)).await;
    send_json(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");

    // A bad refresh token is refused without closing.
    send_json(
        &mut ws,
        json!({"type": "refresh", "token": "garbage", "id": 6}),
    )
    .await;
    let e = next_json(&mut ws).await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_i64()),
        (Some("TOKEN_INVALID"), Some(6))
    );
    // Another user's token is 4503.
    send_json(
        &mut ws,
        json!({"type": "refresh", "token": tokens::token("mallory", 600)}),
    )
    .await;
    expect_refusal(&mut ws, 4503, "FORBIDDEN").await;
}

#[tokio::test]
async fn bad_frames_get_bad_request_and_the_connection_stays() {
    let deps = Deps::start();
    let gw = gateway(&deps, |_| {}).await;
    let (mut ws, _) = authed(&gw, "carol").await;
    ws.send(Message::text("{not json")).await.unwrap();
    assert_eq!(next_json(&mut ws).await["code"], "BAD_REQUEST");
    send_json(&mut ws, json!({"type": "teleport", "id": "x"})).await;
    let e = next_json(&mut ws).await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("BAD_REQUEST"), Some("x"))
    );
    assert_eq!(e["retryable"], false);
    send_json(&mut ws, json!({"type": "auth", "token": "again"})).await;
    assert_eq!(next_json(&mut ws).await["code"], "BAD_REQUEST");
    send_json(&mut ws, json!({"type": "ping", "id": 2})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type": "pong", "id": 2}));
}

#[tokio::test]
async fn binary_is_1003_and_oversize_is_1009_even_fragmented() {
    use tokio_tungstenite::tungstenite::protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    };
    let deps = Deps::start();
    let gw = gateway(&deps, |c| c.max_message_bytes = Some(4096)).await;

    let (mut ws, _) = authed(&gw, "dan").await;
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    let (frames, code) = until_close(&mut ws).await;
    assert_eq!((frames.len(), code), (0, Some(1003)));

    let (mut ws, _) = authed(&gw, "dan").await;
    ws.send(Message::text("x".repeat(5000))).await.unwrap();
    expect_refusal(&mut ws, 1009, "TOO_LARGE").await;

    // Three fragments of 2 KiB: each under the limit, the message over it.
    let (mut ws, _) = authed(&gw, "dan").await;
    let chunk = vec![b'y'; 2048];
    ws.send(Message::Frame(Frame::message(
        chunk.clone(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .unwrap();
    ws.send(Message::Frame(Frame::message(
        chunk.clone(),
        OpCode::Data(Data::Continue),
        false,
    )))
    .await
    .unwrap();
    let _ = ws
        .send(Message::Frame(Frame::message(
            chunk,
            OpCode::Data(Data::Continue),
            true,
        )))
        .await;
    expect_refusal(&mut ws, 1009, "TOO_LARGE").await;

    // Exactly at the limit is fine.
    let (mut ws, _) = authed(&gw, "dan").await;
    let frame = json!({"type": "ping", "pad": "z".repeat(4096 - 24)}).to_string();
    assert_eq!(frame.len(), 4096);
    ws.send(Message::text(frame)).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "pong");
}

#[tokio::test]
async fn server_pings_and_idle_peers_are_closed() {
    let deps = Deps::start();
    let gw = gateway(&deps, |c| {
        c.ping_interval_secs = Some(1);
        c.idle_timeout_secs = Some(2);
    })
    .await;
    // tungstenite answers pings while we poll it: the connection stays up.
    let (mut ws, _) = authed(&gw, "erin").await;
    let mut pings = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline {
        if let Ok(Some(Ok(Message::Ping(_)))) =
            tokio::time::timeout_at(deadline, futures_util::StreamExt::next(&mut ws)).await
        {
            pings += 1;
        }
    }
    assert!(pings >= 2, "saw {pings} pings");
    send_json(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");

    // A raw TCP peer that completes the upgrade and then goes silent is dropped.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let t = tokens::token("erin", 600);
    s.write_all(format!("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {t}\r\n\r\n").as_bytes()).await.unwrap();
    let start = std::time::Instant::now();
    let mut buf = vec![0u8; 65536];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("closed in time")
        {
            Ok(0) | Err(_) => break,
            Ok(_) => continue,
        }
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "{took:?}"
    );
}
