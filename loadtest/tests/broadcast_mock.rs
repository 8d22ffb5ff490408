//! End-to-end checks of the `broadcast` scenario against a scripted gateway in this
//! process (no real gateway, NATS or Redis): WebSocket listeners that authenticate,
//! answer `subscribe` and fan publications out with per-channel offsets, and an HTTP
//! listener for `POST /v1/publish`, all sharing one hub, so that two WebSocket
//! listeners behave like two gateway nodes. Each token names how the server treats
//! that subscriber (`dup*`, `skip*`, `slow*`, `forbid*`; anything else is well
//! served), so gaps, duplicates, slow-consumer closes and refused subscriptions can be
//! provoked on purpose; the real `loadtest` binary runs with worker processes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{
    Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const API_KEY: &str = "mock-api-key-0123456789";

/// Channels with their last offset and subscribers.
#[derive(Default)]
struct Hub {
    channels: Mutex<HashMap<String, Channel>>,
}

#[derive(Default)]
struct Channel {
    top: u64,
    subscribers: Vec<mpsc::UnboundedSender<(u64, String)>>,
}

impl Hub {
    /// Stores a publication and fans it out, as the gateway builds it.
    fn publish(&self, channel: &str, data: &Value, from: &str) -> u64 {
        let mut channels = self.channels.lock().unwrap();
        let ch = channels.entry(channel.to_owned()).or_default();
        ch.top += 1;
        let frame = format!(
            r#"{{"type":"message","channel":{},"offset":{},"data":{},"from":{}}}"#,
            json!(channel),
            ch.top,
            data,
            json!(from)
        );
        ch.subscribers
            .retain(|tx| tx.send((ch.top, frame.clone())).is_ok());
        ch.top
    }

    fn subscribe(&self, channel: &str) -> (u64, mpsc::UnboundedReceiver<(u64, String)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut channels = self.channels.lock().unwrap();
        let ch = channels.entry(channel.to_owned()).or_default();
        ch.subscribers.push(tx);
        (ch.top, rx)
    }
}

struct Mock {
    ws: Vec<SocketAddr>,
    api: SocketAddr,
    /// Connections accepted per WebSocket listener.
    accepted: Vec<Arc<AtomicU64>>,
}

async fn mock(ws_listeners: usize) -> Mock {
    let hub = Arc::new(Hub::default());
    // Offsets of earlier "runs" must not matter: start every channel at 100.
    for k in 0..4 {
        hub.channels.lock().unwrap().insert(
            format!("bench:{k}"),
            Channel {
                top: 100,
                subscribers: Vec::new(),
            },
        );
    }
    let mut ws = Vec::new();
    let mut accepted = Vec::new();
    for _ in 0..ws_listeners {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        ws.push(listener.local_addr().unwrap());
        let count = Arc::new(AtomicU64::new(0));
        accepted.push(Arc::clone(&count));
        let hub = Arc::clone(&hub);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(ws_connection(stream, Arc::clone(&hub)));
            }
        });
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    testkit::server::serve(listener, move |req| {
        let hub = Arc::clone(&hub);
        async move { Ok::<_, Infallible>(api_request(req, &hub).await) }
    });
    Mock { ws, api, accepted }
}

async fn api_request(req: Request<hyper::body::Incoming>, hub: &Hub) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: Value| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    };
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {API_KEY}"));
    if req.uri().path() != "/v1/publish" {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"error": {"code": "NOT_FOUND", "message": "no"}}),
        );
    }
    if !authorized {
        return reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": {"code": "UNAUTHORIZED", "message": "api key"}}),
        );
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    let offset = hub.publish(v["channel"].as_str().unwrap(), &v["data"], "server");
    reply(StatusCode::OK, json!({ "offset": offset }))
}

async fn ws_connection(stream: tokio::net::TcpStream, hub: Arc<Hub>) {
    let token = Arc::new(Mutex::new(String::new()));
    let token2 = Arc::clone(&token);
    #[allow(clippy::result_large_err)]
    let callback = move |req: &WsRequest, mut resp: WsResponse| {
        *token2.lock().unwrap() = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("")
            .to_owned();
        resp.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("switchboard.v1"),
        );
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    let token = token.lock().unwrap().clone();
    let authenticated = r#"{"type":"authenticated","user":{"id":"u"},"expires_at":0,"teams":[],"tasks":[],"degraded":false,"node":"mock","conn_id":"c"}"#;
    if ws.send(Message::text(authenticated)).await.is_err() {
        return;
    }
    let mut feed: Option<(u64, mpsc::UnboundedReceiver<(u64, String)>)> = None;
    let mut delivered = 0u64;
    loop {
        let next = async {
            match feed.as_mut() {
                Some((_, rx)) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = ws.next() => {
                let Some(Ok(msg)) = msg else { return };
                let Message::Text(text) = msg else { continue };
                let frame: Value = serde_json::from_str(text.as_str()).unwrap();
                match frame["type"].as_str() {
                    Some("subscribe") => {
                        let channel = frame["channel"].as_str().unwrap().to_owned();
                        if token.starts_with("forbid") {
                            let _ = ws.send(Message::text(json!({"type": "error", "code": "FORBIDDEN",
                                "message": "no access", "retryable": false, "id": frame["id"]}).to_string())).await;
                            continue;
                        }
                        let (top, rx) = hub.subscribe(&channel);
                        feed = Some((top, rx));
                        let _ = ws.send(Message::text(json!({"type": "subscribed", "channel": channel,
                            "offset": top, "recovered": false, "id": frame["id"]}).to_string())).await;
                    }
                    Some("publish") => {
                        let offset = hub.publish(frame["channel"].as_str().unwrap(), &frame["data"], "u");
                        let _ = ws.send(Message::text(json!({"type": "ack", "offset": offset, "id": frame["id"]}).to_string())).await;
                    }
                    _ => {}
                }
            }
            item = next => {
                let Some((offset, frame)) = item else { return };
                let top = feed.as_ref().map_or(0, |f| f.0);
                if token.starts_with("skip") && offset == top + 2 {
                    continue;
                }
                if ws.send(Message::text(frame.clone())).await.is_err() {
                    return;
                }
                if token.starts_with("dup") && offset % 3 == 0 {
                    let _ = ws.send(Message::text(frame)).await;
                }
                delivered += 1;
                if token.starts_with("slow") && delivered == 2 {
                    let _ = ws.send(Message::text(r#"{"type":"error","code":"SLOW_CONSUMER","message":"slow","retryable":true}"#)).await;
                    let _ = ws.send(Message::Close(Some(CloseFrame { code: CloseCode::from(4008), reason: "slow consumer".into() }))).await;
                    while let Some(Ok(_)) = ws.next().await {}
                    return;
                }
            }
        }
    }
}

fn run_binary(args: Vec<String>) -> (i32, Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let html = dir.path().join("report.html");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(&args)
        .arg("--json")
        .arg(&json)
        .arg("--html")
        .arg(&html)
        .env_remove("SB_JWT_SECRET")
        .env_remove("SB_API_KEY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let report: Value = match std::fs::read(&json) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap(),
        Err(e) => panic!("no report ({e}); stderr:\n{stderr}"),
    };
    assert!(std::fs::read_to_string(&html).unwrap().contains("</html>"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (output.status.code().unwrap_or(-1), report, stdout + &stderr)
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_publishing_over_two_nodes_and_two_processes_meets_its_goal() {
    let m = mock(2).await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "ok-1\nok-2\n").unwrap();
    let mut a = args(&[
        "broadcast",
        "--subscribers",
        "40",
        "--channels",
        "2",
        "--rate",
        "40",
        "--duration",
        "2",
        "--processes",
        "2",
        "--payload-bytes",
        "120",
        "--api-key",
        API_KEY,
        "--pid",
        &std::process::id().to_string(),
    ]);
    for url in &m.ws {
        a.extend(args(&["--url", &format!("ws://{url}/ws")]));
    }
    a.extend(args(&["--api-url", &format!("http://{}", m.api)]));
    a.extend(args(&["--token-file", tokens.to_str().unwrap()]));
    let (code, report, output) = tokio::task::spawn_blocking(move || run_binary(a))
        .await
        .unwrap();
    assert_eq!(code, 0, "{report:#}\n{output}");
    assert_eq!(report["goal_met"], true);
    assert_eq!(report["subscribers"]["subscribed"], 40);
    assert_eq!(report["config"]["processes"], 2);
    let acked = report["publications"]["acked"].as_u64().unwrap();
    assert_eq!(acked, 80, "40/s for 2 s");
    // Every publication reached the 20 subscribers of its channel, once.
    assert_eq!(report["deliveries"]["total"], acked * 20);
    assert_eq!(report["deliveries"]["expected"], acked * 20);
    assert_eq!(report["latency_histogram_us"]["count"], acked * 20);
    assert_eq!(report["offsets"]["missing"], 0);
    assert_eq!(report["offsets"]["duplicates"], 0);
    assert_eq!(report["offsets"]["streams"], 40);
    assert_eq!(report["deliveries"]["drained"], true);
    // The mock's channels started at offset 100: offsets continue from there.
    let channels = report["publications"]["channels"].as_array().unwrap();
    assert_eq!(channels[0]["first_offset"], 101);
    assert_eq!(channels[0]["last_offset"], 140);
    assert_eq!(channels[1]["acked"], 40);
    // Subscribers were spread over both "nodes" (the API added none).
    for count in &m.accepted {
        assert_eq!(count.load(Ordering::Relaxed), 20);
    }
    let cpu = &report["cpu"];
    assert_eq!(cpu["processes"][0]["pid"], std::process::id());
    assert!(
        cpu["loadtest_workers"]["user"].as_f64().is_some(),
        "{cpu:#}"
    );
    assert!(output.contains("Deliveries"), "{output}");
    assert!(output.contains("publishing"), "no progress line: {output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_duplicates_closes_and_refusals_are_reported_and_exit_1() {
    let m = mock(1).await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    // Ten subscribers, two of each behaviour; the publisher takes token 10 (`ok`).
    std::fs::write(&tokens, "ok\ndup\nskip\nslow\nforbid\n").unwrap();
    let mut a = args(&[
        "broadcast",
        "--subscribers",
        "10",
        "--rate",
        "20",
        "--duration",
        "1",
        "--publish-via",
        "client",
        "--publishers",
        "1",
        "--drain",
        "2",
        "--url",
        &format!("ws://{}/ws", m.ws[0]),
    ]);
    a.extend(args(&["--token-file", tokens.to_str().unwrap()]));
    let (code, report, output) = tokio::task::spawn_blocking(move || run_binary(a))
        .await
        .unwrap();
    assert_eq!(code, 1, "{report:#}\n{output}");
    assert_eq!(report["goal_met"], false);
    assert_eq!(report["publications"]["acked"], 20);
    assert_eq!(report["publications"]["failed"], 0);
    assert_eq!(report["subscribers"]["subscribed"], 8);
    assert_eq!(report["subscribers"]["failed"], 2);
    assert_eq!(
        report["subscribers"]["failures"][0]["reason"],
        "subscribe refused: FORBIDDEN"
    );
    assert_eq!(report["subscribers"]["unexpected_closes"], 2);
    assert_eq!(
        report["subscribers"]["closes"][0]["reason"],
        "close 4008 SLOW_CONSUMER"
    );
    // `skip` subscribers miss one offset each; `dup` subscribers get offsets divisible
    // by 3 twice (7 of 101..=120).
    assert_eq!(report["offsets"]["missing"], 2);
    assert_eq!(report["offsets"]["duplicates"], 14);
    assert_eq!(report["offsets"]["streams_with_problems"], 4);
    assert!(!report["offsets"]["examples"].as_array().unwrap().is_empty());
    let limits: Vec<&str> = report["stopped_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["limit"].as_str().unwrap())
        .collect();
    for l in ["duplicates", "gaps", "slow_consumer", "channel_forbidden"] {
        assert!(limits.contains(&l), "{limits:?}");
    }
    // Two well-served subscribers got all 20.
    assert_eq!(
        report["deliveries"]["per_subscriber"]["max_per_s"]
            .as_f64()
            .map(|v| v > 0.0),
        Some(true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_api_key_fails_every_publication() {
    let m = mock(1).await;
    let a = args(&[
        "broadcast",
        "--subscribers",
        "3",
        "--rate",
        "5",
        "--duration",
        "1",
        "--secret",
        "0123456789abcdef0123456789abcdef",
        "--api-key",
        "not-the-key-at-all",
        "--url",
        &format!("ws://{}/ws", m.ws[0]),
        "--api-url",
        &format!("http://{}", m.api),
    ]);
    let (code, report, output) = tokio::task::spawn_blocking(move || run_binary(a))
        .await
        .unwrap();
    assert_eq!(code, 1, "{output}");
    assert_eq!(report["publications"]["acked"], 0);
    assert_eq!(report["publications"]["failed"], 5);
    assert_eq!(
        report["publications"]["failures"][0]["reason"],
        "http 401 UNAUTHORIZED"
    );
    assert_eq!(report["stopped_by"][0]["limit"], "publish_failed");
    assert_eq!(report["deliveries"]["total"], 0);
}

#[test]
fn binary_refuses_bad_broadcast_flags() {
    for (extra, message) in [
        (
            &["--api-url", "http://192.0.2.1:8080"][..],
            "only loopback targets",
        ),
        (&["--api-url", "http://127.0.0.1:1"][..], "--api-key"),
        (&[][..], "--api-url"),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_loadtest"))
            .args(["broadcast", "--secret", "0123456789abcdef0123456789abcdef"])
            .args(extra)
            .env_remove("SB_API_KEY")
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(message), "{extra:?}: {stderr}");
    }
}
