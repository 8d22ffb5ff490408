//! Dependencies failing under a running gateway: connected clients stay connected,
//! readiness follows, new auths that need Redis are answered UNAVAILABLE + 1013.

use std::time::Duration;

use serde_json::json;
use testkit::tokens;

use crate::common::*;

#[tokio::test]
async fn redis_outage_flips_readyz_and_refuses_new_auth_cleanly() {
    let mut deps = Deps::start();
    let gw = gateway(&deps, |_| {}).await;
    let (mut held, _) = authed(&gw, "sam").await;

    deps.redis.single().kill();
    gw.wait_ready(false).await;
    let (mut ws, _) = connect(&gw.url(), Hs::bearer(&tokens::token("tina", 600)))
        .await
        .unwrap();
    let e = expect_refusal(&mut ws, 1013, "UNAVAILABLE").await;
    assert_eq!(e["retryable"], true);
    // The connected client never noticed.
    send_json(&mut held, json!({"type": "ping", "id": 1})).await;
    assert_eq!(next_json(&mut held).await["type"], "pong");

    deps.redis.single().start_again().unwrap();
    gw.wait_ready(true).await;
    eventually("auth works again", || async {
        let (mut ws, _) = connect(&gw.url(), Hs::bearer(&tokens::token("tina", 600)))
            .await
            .unwrap();
        next_json(&mut ws).await["type"] == "authenticated"
    })
    .await;
    send_json(&mut held, json!({"type": "ping", "id": 2})).await;
    assert_eq!(next_json(&mut held).await["id"], 2);
}

#[tokio::test]
async fn nats_restart_keeps_clients_and_delivery_resumes() {
    let mut deps = Deps::start();
    let gw = gateway(&deps, |_| {}).await;
    let (mut held, _) = authed(&gw, "uma").await;

    deps.nats.stop();
    gw.wait_ready(false).await;
    send_json(&mut held, json!({"type": "ping", "id": 1})).await;
    assert_eq!(next_json(&mut held).await["type"], "pong");
    // Auth still works without NATS (Redis is up): the context is degraded.
    let (mut ws, _) = connect(&gw.url(), Hs::bearer(&tokens::token("vic", 600)))
        .await
        .unwrap();
    let a = next_json(&mut ws).await;
    assert_eq!(
        (a["type"].as_str(), a["degraded"].as_bool()),
        (Some("authenticated"), Some(true))
    );

    deps.nats.start_again().unwrap();
    gw.wait_ready(true).await;
    // The user subscription was re-sent by the client after the reconnect.
    let nats = async_nats::connect(deps.nats.url()).await.unwrap();
    let frame =
        json!({"type": "chat.complete", "session_id": "s", "request_id": "r", "content": "x"});
    let mut got = None;
    for _ in 0..50 {
        nats.publish("sb.user.uma", frame.to_string().into())
            .await
            .unwrap();
        nats.flush().await.unwrap();
        if let Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) =
            tokio::time::timeout(
                Duration::from_millis(200),
                futures_util::StreamExt::next(&mut held),
            )
            .await
        {
            got = Some(serde_json::from_str::<serde_json::Value>(&t).unwrap());
            break;
        }
    }
    assert_eq!(got, Some(frame));
}

#[tokio::test]
async fn a_worker_answer_fills_the_context_and_a_cache_serves_degraded() {
    let deps = Deps::start();
    let gw = gateway(&deps, |c| c.user_context_timeout_ms = Some(300)).await;
    let nats = async_nats::connect(deps.nats.url()).await.unwrap();
    let mut sub = nats
        .queue_subscribe("sb.rpc.user_context", "workers".into())
        .await
        .unwrap();
    let responder = nats.clone();
    let answer = tokio::spawn(async move {
        let msg = futures_util::StreamExt::next(&mut sub).await.unwrap();
        let req: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(req["user_id"], "wes");
        assert!(
            req.get("token").is_none(),
            "no token on NATS by default: {req}"
        );
        let reply = json!({"teams": [{"id": "t1", "name": "Core"}], "tasks": [{"id": "k1"}], "degraded": false});
        responder
            .publish(msg.reply.unwrap(), reply.to_string().into())
            .await
            .unwrap();
        responder.flush().await.unwrap();
    });
    nats.flush().await.unwrap();
    let (_ws, a) = authed(&gw, "wes").await;
    answer.await.unwrap();
    assert_eq!(a["teams"], json!([{"id": "t1", "name": "Core"}]));
    assert_eq!(a["tasks"], json!([{"id": "k1"}]));
    assert_eq!(a["degraded"], false);

    // Nobody answers now; the cache (written by workers) is served as degraded.
    deps.redis
        .command(&[
            "SET",
            "sb:{u:xena}:ctx",
            r#"{"teams":[{"id":"t9"}],"tasks":[]}"#,
            "EX",
            "60",
        ])
        .unwrap();
    let (_ws, a) = authed(&gw, "xena").await;
    assert_eq!(a["teams"], json!([{"id": "t9"}]));
    assert_eq!(a["degraded"], true);
}
