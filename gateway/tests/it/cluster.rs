//! Several nodes on one NATS and Redis: kicks, delivery to a user on every node,
//! the ops API.

use serde_json::{Value, json};
use testkit::tokens;

use crate::common::*;

#[tokio::test]
async fn kick_closes_a_users_sockets_on_every_node() {
    let deps = Deps::start();
    let a = gateway(&deps, |_| {}).await;
    let b = gateway(&deps, |_| {}).await;
    let (mut w1, _) = authed(&a, "mona").await;
    let (mut w2, _) = authed(&b, "mona").await;
    let (mut other, _) = authed(&b, "ned").await;

    let r = api()
        .post(a.http("/v1/disconnect"))
        .bearer_auth(API_KEY)
        .json(&json!({"user_id": "mona"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    expect_refusal(&mut w1, 4503, "FORBIDDEN").await;
    expect_refusal(&mut w2, 4503, "FORBIDDEN").await;
    send_json(&mut other, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut other).await["type"], "pong");

    // One connection by id, with a custom reconnect code.
    let (mut w3, auth) = authed(&a, "mona").await;
    let (mut w4, _) = authed(&b, "mona").await;
    let conn_id = auth["conn_id"].as_str().unwrap();
    let r = api()
        .post(b.http("/v1/disconnect"))
        .bearer_auth(API_KEY)
        .json(&json!({"conn_id": conn_id, "code": 4000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, code) = until_close(&mut w3).await;
    assert_eq!(code, Some(4000));
    send_json(&mut w4, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut w4).await["type"], "pong");
}

#[tokio::test]
async fn api_refuses_bad_keys_and_bodies() {
    let deps = Deps::start();
    let gw = gateway(&deps, |_| {}).await;
    let c = api();
    for key in [None, Some("wrong-key-wrong-key")] {
        let mut req = c
            .post(gw.http("/v1/disconnect"))
            .json(&json!({"user_id": "x"}));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "UNAUTHORIZED");
    }
    for body in [
        "{",
        "{}",
        r#"{"user_id":"a.b"}"#,
        r#"{"user_id":"a","code":1006}"#,
        r#"{"user_id":"a","bogus":1}"#,
    ] {
        let r = c
            .post(gw.http("/v1/disconnect"))
            .bearer_auth(API_KEY)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "BAD_REQUEST");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    let r = c
        .get(gw.http("/v1/nope"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c.get(gw.http("/elsewhere")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .get(gw.http("/v1/disconnect"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn nodes_and_user_connections_are_listed() {
    let deps = Deps::start();
    let a = gateway(&deps, |_| {}).await;
    let b = gateway(&deps, |_| {}).await;
    let (_w1, _) = authed(&a, "olga").await;
    let (_w2, _) = authed(&b, "olga").await;
    let (_w3, _) = authed(&b, "pete").await;
    eventually("both nodes with counts", || async {
        let v: Value = api_get(&a, "/v1/nodes").await;
        let nodes = v["nodes"].as_array().unwrap().clone();
        let count = |id: &str| {
            nodes
                .iter()
                .find(|n| n["node"] == id)
                .map(|n| n["connections"].as_u64().unwrap())
        };
        count(&a.node_id) == Some(1) && count(&b.node_id) == Some(2)
    })
    .await;
    let v: Value = api_get(&b, "/v1/users/olga/connections").await;
    let conns = v["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 2, "{v}");
    let nodes: Vec<_> = conns
        .iter()
        .map(|c| c["node"].as_str().unwrap().to_owned())
        .collect();
    assert!(nodes.contains(&a.node_id) && nodes.contains(&b.node_id));
    assert!(
        conns
            .iter()
            .all(|c| c["connected_at"].as_u64().unwrap() > 0 && c["ip"] == "127.0.0.1")
    );

    // A node that stops cleanly leaves the list at once.
    let b_id = b.node_id.clone();
    b.stop().await;
    let v: Value = api_get(&a, "/v1/nodes").await;
    assert!(
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["node"] != b_id.as_str()),
        "{v}"
    );
    let v: Value = api_get(&a, "/v1/users/olga/connections").await;
    assert_eq!(v["connections"].as_array().unwrap().len(), 1, "{v}");
}

#[tokio::test]
async fn user_subject_reaches_every_connection_of_the_user() {
    let deps = Deps::start();
    let a = gateway(&deps, |_| {}).await;
    let b = gateway(&deps, |_| {}).await;
    let (mut w1, _) = authed(&a, "quinn").await;
    let (mut w2, _) = authed(&b, "quinn").await;
    let (mut other, _) = authed(&b, "rita").await;
    let nats = async_nats::connect(deps.nats.url()).await.unwrap();
    let frame = json!({"type": "chat.chunk", "session_id": "s", "request_id": "r", "seq": 0, "content": "hi"});
    nats.publish("sb.user.quinn", frame.to_string().into())
        .await
        .unwrap();
    nats.flush().await.unwrap();
    assert_eq!(next_json(&mut w1).await, frame);
    assert_eq!(next_json(&mut w2).await, frame);
    send_json(&mut other, json!({"type": "ping"})).await;
    assert_eq!(
        next_json(&mut other).await["type"],
        "pong",
        "rita got nothing else first"
    );
    let _ = tokens::now();
}

/// A revocation made through one gateway is refused on every other one at once (NATS
/// notice), and one that only reached Redis (a node that missed the notice) within the
/// sync interval; neither costs Redis a command per connect.
#[tokio::test]
async fn a_revocation_reaches_every_gateway() {
    let deps = Deps::start();
    let a = gateway(&deps, |_| {}).await;
    let b = gateway(&deps, |_| {}).await;
    let exp = tokens::now() + 600;
    let claims = |jti: &str| json!({"sub": "rita", "exp": exp, "iat": tokens::now(), "jti": jti});
    let sign = |jti: &str| tokens::hs256(tokens::TEST_SECRET, &claims(jti));
    // Valid before.
    let (mut ws, _) = connect(&b.url(), Hs::bearer(&sign("t-1"))).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "authenticated");
    drop(ws);
    let r = api()
        .post(a.http("/v1/revoke"))
        .bearer_auth(API_KEY)
        .json(&json!({"jti": "t-1", "exp": exp}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    refused_within(
        &b,
        &sign("t-1"),
        std::time::Duration::from_secs(2),
        "the notice",
    )
    .await;

    // Written to Redis only (as a node that missed the notice sees it).
    let key = shared::keys::Keys::new("sb").revoked("t-2");
    deps.redis
        .command(&["ZADD", &key, &exp.to_string(), "t-2"])
        .unwrap();
    let bound = gateway::revocations::SYNC_INTERVAL + std::time::Duration::from_secs(3);
    refused_within(&a, &sign("t-2"), bound, "the background read").await;
    let bad = api()
        .post(a.http("/v1/revoke"))
        .bearer_auth(API_KEY)
        .json(&json!({"jti": "", "exp": exp}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

/// Connects with `token` until the gateway refuses it `TOKEN_INVALID`, within `bound`.
async fn refused_within(gw: &Gw, token: &str, bound: std::time::Duration, via: &str) {
    let deadline = std::time::Instant::now() + bound;
    loop {
        let (mut ws, _) = connect(&gw.url(), Hs::bearer(token)).await.unwrap();
        let f = next_json(&mut ws).await;
        if f["type"] == "error" {
            assert_eq!(f["code"], "TOKEN_INVALID");
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not refused within {bound:?} ({via})"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
