//! The chat pipeline end to end: clients on gateways, workers in process, a stub
//! LLM and team backend. A reply streams to every connection of the user on every
//! node; a worker dying mid-stream is replaced and history holds the reply once.

use std::time::Duration;

use serde_json::{Value, json};
use testkit::backend::BackendStub;
use testkit::llm::{LlmStub, Reply, Script};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::common::*;

pub struct Worker {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

pub async fn worker(deps: &Deps, llm: &LlmStub, backend: &BackendStub) -> Worker {
    let raw = worker::RawConfig {
        cluster: shared::config::ClusterArgs {
            node_id: Some(format!("w-{}", testkit::free_port())),
            nats_url: Some(deps.nats.url()),
            redis_url: Some(deps.redis.url()),
            redis_cluster: Some(deps.redis.is_cluster()),
            ..Default::default()
        },
        llm_base_url: Some(llm.base_url()),
        llm_idle_timeout_ms: Some(2000),
        backend_url: Some(backend.url()),
        ack_wait_secs: Some(2),
        max_deliver: Some(3),
        shutdown_grace_secs: Some(5),
        ..worker::RawConfig::default()
    };
    let config = raw.validate().expect("worker config");
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let s2 = shutdown.clone();
    let task =
        tokio::spawn(async move { worker::run(admin, config, s2).await.expect("worker run") });
    eventually("worker ready", || async {
        reqwest::get(format!("http://{admin_addr}/readyz"))
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    })
    .await;
    Worker { shutdown, task }
}

/// Collects one request's stream: chunk contents by seq (duplicates must agree) and
/// the completion.
async fn collect(ws: &mut Ws, request_id: &str) -> (Vec<String>, Value) {
    let mut chunks: Vec<Option<String>> = Vec::new();
    loop {
        let f = next_json(ws).await;
        if f["request_id"] != request_id {
            continue;
        }
        match f["type"].as_str() {
            Some("chat.chunk") => {
                let seq = f["seq"].as_u64().unwrap() as usize;
                let content = f["content"].as_str().unwrap().to_owned();
                if chunks.len() <= seq {
                    chunks.resize(seq + 1, None);
                }
                if let Some(prev) = &chunks[seq] {
                    assert_eq!(prev, &content, "a repeated seq carries the same content");
                }
                chunks[seq] = Some(content);
            }
            Some("chat.complete") => {
                let got: Vec<String> = chunks
                    .into_iter()
                    .map(|c| c.expect("no seq missing"))
                    .collect();
                return (got, f);
            }
            _ => panic!("unexpected {f}"),
        }
    }
}

#[tokio::test]
async fn a_reply_streams_to_every_connection_of_the_user() {
    let deps = Deps::start();
    let llm = LlmStub::start().await;
    llm.set_default(Script::Reply(
        Reply::numbered(30).token_delay(Duration::from_millis(5)),
    ));
    let backend = BackendStub::start().await;
    backend.set_teams(json!([{"id": "t1", "name": "Core"}]));
    backend.set_tasks(json!([{"id": "k1", "title": "ship it"}]));
    let _w = worker(&deps, &llm, &backend).await;
    let a = gateway(&deps, |_| {}).await;
    let b = gateway(&deps, |_| {}).await;

    let (mut wa, auth) = authed(&a, "alice").await;
    assert_eq!(
        auth["teams"],
        json!([{"id": "t1", "name": "Core"}]),
        "teams from the backend via a worker"
    );
    assert_eq!(auth["degraded"], false);
    let (mut wb, _) = authed(&b, "alice").await;
    send_json(
        &mut wa,
        json!({"type": "chat.send", "message": "count for me", "id": 1}),
    )
    .await;
    let ack = next_json(&mut wa).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let (sid, rid) = (
        ack["session_id"].as_str().unwrap().to_owned(),
        ack["request_id"].as_str().unwrap().to_owned(),
    );

    let (chunks_a, done_a) = collect(&mut wa, &rid).await;
    let (chunks_b, done_b) = collect(&mut wb, &rid).await;
    let expected = Reply::numbered(30).text();
    assert_eq!(chunks_a.concat(), expected);
    assert_eq!(chunks_a, chunks_b, "both nodes see the same stream");
    assert_eq!(done_a["content"], expected.as_str());
    assert_eq!(done_a, done_b);
    assert_eq!(done_a["session_id"], sid.as_str());

    // History, read from the other node, holds the exchange once.
    send_json(
        &mut wb,
        json!({"type": "history", "session_id": sid, "id": 2}),
    )
    .await;
    let h = next_matching(&mut wb, |f| f["type"] == "history").await;
    let roles: Vec<_> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_owned(),
                m["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        roles,
        [
            ("user".to_owned(), "count for me".to_owned()),
            ("assistant".to_owned(), expected)
        ]
    );
}

#[tokio::test]
async fn a_worker_killed_mid_stream_is_replaced_and_history_holds_the_reply_once() {
    let deps = Deps::start();
    let llm = LlmStub::start().await;
    llm.set_default(Script::Reply(
        Reply::numbered(40).token_delay(Duration::from_millis(25)),
    ));
    let backend = BackendStub::start().await;
    let doomed = worker(&deps, &llm, &backend).await;
    let gw = gateway(&deps, |_| {}).await;
    let (mut ws, _) = authed(&gw, "bob").await;
    send_json(&mut ws, json!({"type": "chat.send", "message": "long one"})).await;
    let ack = next_json(&mut ws).await;
    let (sid, rid) = (
        ack["session_id"].as_str().unwrap().to_owned(),
        ack["request_id"].as_str().unwrap().to_owned(),
    );
    // The first chunks arrive, then the worker dies like a crash (no grace).
    let first = next_matching(&mut ws, |f| f["type"] == "chat.chunk").await;
    assert_eq!(first["seq"], 0);
    doomed.task.abort();
    let _ = doomed.shutdown;
    let _survivor = worker(&deps, &llm, &backend).await;

    let (chunks, done) = collect(&mut ws, &rid).await;
    let expected = Reply::numbered(40).text();
    assert_eq!(
        done["content"],
        expected.as_str(),
        "the redelivered request completed"
    );
    assert_eq!(chunks.concat(), expected);
    send_json(&mut ws, json!({"type": "history", "session_id": sid})).await;
    let h = next_matching(&mut ws, |f| f["type"] == "history").await;
    let replies = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "assistant")
        .count();
    assert_eq!(replies, 1, "{h}");
    assert!(
        llm.request_count() >= 2,
        "the request was sent to the LLM again"
    );
}

#[tokio::test]
async fn cancel_from_another_node_stops_the_stream() {
    let deps = Deps::start();
    let llm = LlmStub::start().await;
    llm.set_default(Script::Reply(
        Reply::numbered(200).token_delay(Duration::from_millis(20)),
    ));
    let backend = BackendStub::start().await;
    let _w = worker(&deps, &llm, &backend).await;
    let a = gateway(&deps, |_| {}).await;
    let b = gateway(&deps, |_| {}).await;
    let (mut wa, _) = authed(&a, "cy").await;
    let (mut wb, _) = authed(&b, "cy").await;
    send_json(
        &mut wa,
        json!({"type": "chat.send", "message": "go on forever"}),
    )
    .await;
    let rid = next_json(&mut wa).await["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    next_matching(&mut wb, |f| f["type"] == "chat.chunk").await;
    send_json(
        &mut wb,
        json!({"type": "chat.cancel", "request_id": rid, "id": "c"}),
    )
    .await;
    let end = next_matching(&mut wa, |f| {
        f["request_id"] == rid.as_str()
            && (f["type"] == "chat.complete" || f["type"] == "chat.error")
    })
    .await;
    let full = Reply::numbered(200).text();
    if end["type"] == "chat.complete" {
        assert!(
            end["content"].as_str().unwrap().len() < full.len(),
            "stopped early: {end}"
        );
    }
    eventually("upstream closed", || async {
        llm.disconnects() >= 1 || llm.active() == 0
    })
    .await;
}

/// Core NATS loses what is published while a gateway is not subscribed: a reply that
/// ends during a NATS restart has its `chat.complete` flushed by the worker before the
/// gateway re-subscribed. The final frame also goes through the `SB_CHAT_EVENTS`
/// stream, so a raw client (none of the JS client's de-duplication, no `history`
/// read) still sees the reply complete, exactly once, although the worker's echo and
/// the stream both deliver it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_ending_during_a_nats_restart_completes_exactly_once_for_a_raw_client() {
    let mut deps = Deps::start();
    let llm = LlmStub::start().await;
    // About 2 s of streaming: it ends while NATS is down.
    let reply = Reply::numbered(40).token_delay(Duration::from_millis(50));
    llm.set_default(Script::Reply(reply.clone()));
    let backend = BackendStub::start().await;
    let _w = worker(&deps, &llm, &backend).await;
    let gw = gateway(&deps, |_| {}).await;
    let (mut ws, _) = authed(&gw, "ola").await;
    send_json(
        &mut ws,
        json!({"type": "chat.send", "message": "talk through the outage", "id": 1}),
    )
    .await;
    let ack = next_matching(&mut ws, |f| f["type"] == "ack").await;
    let rid = ack["request_id"].as_str().unwrap().to_owned();
    let first = next_matching(&mut ws, |f| f["type"] == "chat.chunk").await;
    assert_eq!(first["request_id"], rid.as_str());

    deps.nats.stop();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let restarted = std::time::Instant::now();
    deps.nats.start_again().unwrap();

    let mut completes = Vec::new();
    let mut chunks_after = 0;
    // Long enough for the reconnects, the stream's consumer resuming, the worker's
    // echo (3 s after its link is back) and a redelivery after the ack wait.
    let until = tokio::time::Instant::now() + Duration::from_secs(15);
    while let Ok(Some(Ok(m))) =
        tokio::time::timeout_at(until, futures_util::StreamExt::next(&mut ws)).await
    {
        let tokio_tungstenite::tungstenite::Message::Text(t) = m else {
            continue;
        };
        let f: Value = serde_json::from_str(&t).unwrap();
        if f["request_id"] != rid.as_str() {
            continue;
        }
        match f["type"].as_str() {
            Some("chat.complete") => {
                if completes.is_empty() {
                    eprintln!(
                        "chat.complete {:?} after NATS restarted",
                        restarted.elapsed()
                    );
                }
                completes.push(f);
            }
            Some("chat.chunk") if !completes.is_empty() => chunks_after += 1,
            Some("chat.chunk") => {}
            _ => panic!("unexpected {f}"),
        }
    }
    assert_eq!(
        completes.len(),
        1,
        "exactly one chat.complete: {completes:?}"
    );
    assert_eq!(completes[0]["content"], reply.text());
    assert_eq!(chunks_after, 0, "no chunk after the final frame");
    let m = gw.metrics().await;
    eprintln!(
        "{}",
        m.lines()
            .filter(|l| l.starts_with("switchboard_chat_"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The gateway's half of the stored finals, without a worker: a final frame found
/// only in `SB_CHAT_EVENTS` (its live copy lost) reaches the user's connections, also
/// after a NATS restart; a second copy of the same request's final, and chunks after
/// it, are dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finals_stored_in_jetstream_reach_clients_once() {
    let mut deps = Deps::start();
    let gw = gateway(&deps, |_| {}).await;
    let (mut ws, _) = authed(&gw, "fay").await;
    let subjects = shared::subjects::Subjects::new("sb");
    let final_frame = |rid: &str| {
        json!({"type": "chat.complete", "session_id": "s", "request_id": rid, "content": "done"})
            .to_string()
    };
    let headers = |rid: &str, last: bool| {
        let mut h = async_nats::HeaderMap::new();
        h.insert(shared::bus::stream::HEADER_REQUEST, rid);
        if last {
            h.insert(shared::bus::stream::HEADER_FINAL, "1");
        }
        h
    };
    let nats_url = deps.nats.url();
    let store = |rid: String| {
        let url = nats_url.clone();
        let subjects = subjects.clone();
        let body = final_frame(&rid);
        let h = headers(&rid, true);
        async move {
            let nc = async_nats::connect(url).await.unwrap();
            let js = async_nats::jetstream::new(nc);
            js.publish_with_headers(subjects.chat_events("fay"), h, body.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };

    // Only in the stream: delivered.
    store("r1".into()).await;
    let f = next_matching(&mut ws, |f| f["type"] == "chat.complete").await;
    assert_eq!(f["request_id"], "r1");
    // The live copy, late, and a chunk after the final: dropped. A marker frame
    // without headers shows they would have arrived by now.
    let nc = async_nats::connect(deps.nats.url()).await.unwrap();
    nc.publish_with_headers("sb.user.fay", headers("r1", true), final_frame("r1").into())
        .await
        .unwrap();
    let chunk = json!({"type": "chat.chunk", "session_id": "s", "request_id": "r1", "seq": 9, "content": "x"});
    nc.publish_with_headers(
        "sb.user.fay",
        headers("r1", false),
        chunk.to_string().into(),
    )
    .await
    .unwrap();
    let marker = json!({"type": "chat.error", "session_id": "s", "request_id": "marker", "code": "INTERNAL", "message": "m", "retryable": false});
    nc.publish("sb.user.fay", marker.to_string().into())
        .await
        .unwrap();
    nc.flush().await.unwrap();
    let next = next_matching(&mut ws, |f| f["type"] != "pong").await;
    assert_eq!(
        next["request_id"], "marker",
        "the repeats were dropped: {next}"
    );

    // After a NATS restart the gateway follows the stream again.
    deps.nats.stop();
    gw.wait_ready(false).await;
    deps.nats.start_again().unwrap();
    gw.wait_ready(true).await;
    let restarted = std::time::Instant::now();
    store("r2".into()).await;
    let f = next_matching(&mut ws, |f| f["type"] == "chat.complete").await;
    assert_eq!(f["request_id"], "r2");
    eprintln!(
        "stored final delivered {:?} after NATS was back",
        restarted.elapsed()
    );
    let m = gw.metrics().await;
    assert!(
        m.contains("switchboard_chat_finals_from_stream_total 2"),
        "{m}"
    );
    assert!(
        m.contains(r#"switchboard_chat_frames_dropped_total{kind="final"} 1"#),
        "{m}"
    );
}
