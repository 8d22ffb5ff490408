//! The gateway's half of chat: requests reach JetStream before the `ack`, sessions
//! belong to their creator, history is read from Redis, the chat rate is cluster-wide,
//! JetStream being away is `UNAVAILABLE`.

use std::time::Duration;

use async_nats::jetstream;
use futures_util::StreamExt;
use serde_json::{Value, json};
use shared::protocol::HistoryMessage;

use crate::common::*;

async fn consumer(deps: &Deps) -> jetstream::consumer::Consumer<jetstream::consumer::pull::Config> {
    let js = jetstream::new(async_nats::connect(deps.nats.url()).await.unwrap());
    let stream = js
        .get_stream("SB_CHAT")
        .await
        .expect("the gateway created SB_CHAT");
    stream
        .get_or_create_consumer(
            "test",
            jetstream::consumer::pull::Config {
                durable_name: Some("test".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn chat_send_is_stored_in_jetstream_before_the_ack() {
    let deps = Deps::start();
    let gw = gateway(&deps, |_| {}).await;
    let (mut ws, _) = authed(&gw, "alice").await;
    send_json(
        &mut ws,
        json!({"type": "chat.send", "message": "hello there", "id": 1}),
    )
    .await;
    let ack = next_json(&mut ws).await;
    assert_eq!(
        (ack["type"].as_str(), ack["id"].as_i64()),
        (Some("ack"), Some(1)),
        "{ack}"
    );
    let sid = ack["session_id"].as_str().unwrap().to_owned();
    let rid = ack["request_id"].as_str().unwrap().to_owned();

    let c = consumer(&deps).await;
    let mut batch = c
        .fetch()
        .max_messages(10)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    let msg = batch.next().await.expect("stored request").unwrap();
    let req: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(req["request_id"], rid.as_str());
    assert_eq!(req["session_id"], sid.as_str());
    assert_eq!(req["user_id"], "alice");
    assert_eq!(req["message"], "hello there");
    let headers = msg.headers.as_ref().expect("headers");
    assert_eq!(
        headers.get("Nats-Msg-Id").map(|v| v.as_str()),
        Some(rid.as_str())
    );
    msg.ack().await.unwrap();

    // The same session again: owned, accepted.
    send_json(
        &mut ws,
        json!({"type": "chat.send", "message": "more", "session_id": sid}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["session_id"], sid.as_str());
    // Another user sending the same id gets a session of its own under that id:
    // nothing of alice's session reaches it.
    let recorded = HistoryMessage {
        role: "assistant".into(),
        content: "alice's secret".into(),
        ts: 1,
        request_id: Some(rid.clone()),
    };
    let store = deps.store();
    assert!(
        store
            .append_history(&sid, "alice", &rid, &[recorded], 100)
            .await
            .unwrap()
    );
    let (mut other, _) = authed(&gw, "bob").await;
    send_json(
        &mut other,
        json!({"type": "history", "session_id": sid, "id": "h0"}),
    )
    .await;
    assert_eq!(next_json(&mut other).await["code"], "NOT_FOUND");
    send_json(
        &mut other,
        json!({"type": "chat.send", "message": "hijack", "session_id": sid, "id": "h"}),
    )
    .await;
    let ack = next_json(&mut other).await;
    assert_eq!(
        (
            ack["type"].as_str(),
            ack["session_id"].as_str(),
            ack["id"].as_str()
        ),
        (Some("ack"), Some(sid.as_str()), Some("h")),
        "{ack}"
    );
    send_json(&mut other, json!({"type": "history", "session_id": sid})).await;
    let h = next_json(&mut other).await;
    assert_eq!(
        (h["type"].as_str(), &h["messages"]),
        (Some("history"), &json!([])),
        "{h}"
    );
    send_json(&mut ws, json!({"type": "history", "session_id": sid})).await;
    let h = next_json(&mut ws).await;
    assert_eq!(h["messages"][0]["content"], "alice's secret", "{h}");
}

/// Session squatting: a user who sends a `session_id` first (guessed, or seen in a
/// shared screen or log) used to own it, and its real owner then got `FORBIDDEN` for
/// its own session. Sessions are per user now: both work, separately.
#[tokio::test]
async fn a_session_id_taken_first_by_another_user_does_not_block_its_owner() {
    let deps = Deps::start();
    let gw = gateway(&deps, |_| {}).await;
    let (mut mallory, _) = authed(&gw, "mallory").await;
    let (mut alice, _) = authed(&gw, "alice").await;
    for ws in [&mut mallory, &mut alice] {
        send_json(
            ws,
            json!({"type": "chat.send", "message": "hi", "session_id": "plan-2025", "id": "s"}),
        )
        .await;
        let ack = next_json(ws).await;
        assert_eq!(
            (ack["type"].as_str(), ack["session_id"].as_str()),
            (Some("ack"), Some("plan-2025")),
            "{ack}"
        );
    }
    let store = deps.store();
    assert_eq!(
        store
            .session_owner("alice", "plan-2025")
            .await
            .unwrap()
            .as_deref(),
        Some("alice")
    );
    assert_eq!(
        store
            .session_owner("mallory", "plan-2025")
            .await
            .unwrap()
            .as_deref(),
        Some("mallory")
    );
    // The requests name the same wire id; each reaches its own user's session.
    let c = consumer(&deps).await;
    let mut batch = c
        .fetch()
        .max_messages(10)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    let mut users = Vec::new();
    while let Some(Ok(msg)) = batch.next().await {
        let req: Value = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(req["session_id"], "plan-2025");
        users.push(req["user_id"].as_str().unwrap().to_owned());
        msg.ack().await.unwrap();
    }
    users.sort();
    assert_eq!(users, ["alice", "mallory"]);
}

#[tokio::test]
async fn history_reads_the_session_oldest_first() {
    let deps = Deps::start();
    let gw = gateway(&deps, |_| {}).await;
    let (mut ws, _) = authed(&gw, "carol").await;
    send_json(
        &mut ws,
        json!({"type": "history", "session_id": "nope", "id": 1}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["code"], "NOT_FOUND");
    send_json(&mut ws, json!({"type": "chat.send", "message": "q1"})).await;
    let sid = next_json(&mut ws).await["session_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let store = deps.store();
    let m = |role: &str, content: &str, rid: &str| HistoryMessage {
        role: role.into(),
        content: content.into(),
        ts: 1,
        request_id: Some(rid.into()),
    };
    assert!(
        store
            .append_history(
                &sid,
                "carol",
                "r1",
                &[m("user", "q1", "r1"), m("assistant", "a1", "r1")],
                100
            )
            .await
            .unwrap()
    );
    assert!(
        !store
            .append_history(
                &sid,
                "carol",
                "r1",
                &[m("user", "q1", "r1"), m("assistant", "a1", "r1")],
                100
            )
            .await
            .unwrap()
    );
    assert!(
        store
            .append_history(
                &sid,
                "carol",
                "r2",
                &[m("user", "q2", "r2"), m("assistant", "a2", "r2")],
                100
            )
            .await
            .unwrap()
    );

    send_json(
        &mut ws,
        json!({"type": "history", "session_id": sid, "id": 2}),
    )
    .await;
    let h = next_json(&mut ws).await;
    assert_eq!(h["type"], "history");
    assert_eq!(h["id"], 2);
    let contents: Vec<_> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(contents, ["q1", "a1", "q2", "a2"]);
    send_json(
        &mut ws,
        json!({"type": "history", "session_id": sid, "limit": 1}),
    )
    .await;
    let h = next_json(&mut ws).await;
    assert_eq!(
        h["messages"],
        json!([{"role": "assistant", "content": "a2", "ts": 1, "request_id": "r2"}])
    );
}

#[tokio::test]
async fn bad_chat_frames_are_bad_requests() {
    let deps = Deps::start();
    let gw = gateway(&deps, |_| {}).await;
    let (mut ws, _) = authed(&gw, "dave").await;
    let cases = [
        json!({"type": "chat.send", "message": ""}),
        json!({"type": "chat.send", "message": "x".repeat(50_001)}),
        json!({"type": "chat.send", "message": "hi", "session_id": "a.b"}),
        json!({"type": "chat.send", "message": "hi", "files": [{"name": "x.exe", "type": "application/octet-stream", "data": "AA=="}]}),
        json!({"type": "chat.send"}),
        json!({"type": "chat.cancel", "request_id": "no/such"}),
        json!({"type": "history"}),
    ];
    for (i, frame) in cases.into_iter().enumerate() {
        let mut f = frame;
        f["id"] = json!(i);
        send_json(&mut ws, f).await;
        let e = next_json(&mut ws).await;
        assert_eq!(
            (e["code"].as_str(), e["id"].as_u64()),
            (Some("BAD_REQUEST"), Some(i as u64)),
            "{e}"
        );
    }
    // The file error names the file.
    send_json(&mut ws, json!({"type": "chat.send", "message": "hi", "files": [{"name": "tool.exe", "type": "application/x-msdownload", "data": ""}]})).await;
    assert!(
        next_json(&mut ws).await["message"]
            .as_str()
            .unwrap()
            .contains("tool.exe")
    );
}

#[tokio::test]
async fn chat_rate_is_per_user_across_nodes() {
    let deps = Deps::start();
    let a = gateway(&deps, |c| c.chat_rate_per_minute = Some(2)).await;
    let b = gateway(&deps, |c| c.chat_rate_per_minute = Some(2)).await;
    let (mut wa, _) = authed(&a, "erin").await;
    let (mut wb, _) = authed(&b, "erin").await;
    for ws in [&mut wa, &mut wb] {
        send_json(ws, json!({"type": "chat.send", "message": "hi"})).await;
        assert_eq!(next_json(ws).await["type"], "ack");
    }
    send_json(
        &mut wa,
        json!({"type": "chat.send", "message": "third", "id": 3}),
    )
    .await;
    let e = next_json(&mut wa).await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_i64()),
        (Some("RATE_LIMITED"), Some(3))
    );
    let wait = e["retry_after_ms"].as_u64().unwrap();
    assert!(wait > 0 && wait <= 60_000, "{wait}");
    let (mut other, _) = authed(&b, "frank").await;
    send_json(&mut other, json!({"type": "chat.send", "message": "hi"})).await;
    assert_eq!(next_json(&mut other).await["type"], "ack");
}

#[tokio::test]
async fn cancel_reaches_every_worker_and_jetstream_down_is_unavailable() {
    let mut deps = Deps::start();
    let gw = gateway(&deps, |_| {}).await;
    let (mut ws, _) = authed(&gw, "gina").await;
    let nats = async_nats::connect(deps.nats.url()).await.unwrap();
    let mut cancels = subscribe_ready(&nats, "sb.chat.cancel").await;
    send_json(
        &mut ws,
        json!({"type": "chat.cancel", "request_id": "r123", "id": 7}),
    )
    .await;
    let ack = next_json(&mut ws).await;
    assert_eq!(
        (ack["type"].as_str(), ack["id"].as_i64()),
        (Some("ack"), Some(7))
    );
    let c = tokio::time::timeout(WAIT, cancels.next())
        .await
        .unwrap()
        .unwrap();
    let c: Value = serde_json::from_slice(&c.payload).unwrap();
    assert_eq!(c, json!({"request_id": "r123", "user_id": "gina"}));

    deps.nats.stop();
    gw.wait_ready(false).await;
    send_json(
        &mut ws,
        json!({"type": "chat.send", "message": "anyone?", "id": 8}),
    )
    .await;
    let e = next_json(&mut ws).await;
    assert_eq!(
        (
            e["code"].as_str(),
            e["retryable"].as_bool(),
            e["id"].as_i64()
        ),
        (Some("UNAVAILABLE"), Some(true), Some(8))
    );
    // Still connected.
    send_json(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");
}

/// A reply recorded after Redis lost the session's owner record (it restarted empty
/// while the request was in flight) claims the session for the request's user again,
/// so the owner can read its history and nobody else can.
#[tokio::test]
async fn recording_a_reply_reclaims_a_lost_session_for_its_user() {
    let deps = Deps::start();
    let gw = gateway(&deps, |_| {}).await;
    let store = deps.store();
    let msg = HistoryMessage {
        role: "assistant".into(),
        content: "kept".into(),
        ts: 1,
        request_id: Some("r-lost".into()),
    };
    assert!(
        store
            .append_history("sess-lost", "dave", "r-lost", &[msg], 100)
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .session_owner("dave", "sess-lost")
            .await
            .unwrap()
            .as_deref(),
        Some("dave")
    );
    let (mut dave, _) = authed(&gw, "dave").await;
    send_json(
        &mut dave,
        json!({"type": "history", "session_id": "sess-lost", "id": 1}),
    )
    .await;
    let h = next_json(&mut dave).await;
    assert_eq!(h["type"], "history", "{h}");
    assert_eq!(h["messages"][0]["content"], "kept");
    let (mut eve, _) = authed(&gw, "eve").await;
    send_json(
        &mut eve,
        json!({"type": "history", "session_id": "sess-lost", "id": 2}),
    )
    .await;
    assert_eq!(next_json(&mut eve).await["code"], "NOT_FOUND");
}
