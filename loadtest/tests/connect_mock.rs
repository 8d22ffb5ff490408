//! End-to-end checks of the `connect` scenario against a scripted WebSocket server in
//! this process (no gateway, NATS or Redis needed): each token names what the server
//! does with that connection, so every failure class can be provoked on purpose, and
//! the real `loadtest` binary is run with several worker processes.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use switchboard_loadtest::client::{self, Failure, Stage};
use switchboard_loadtest::target::Target;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

/// What the scripted server saw.
#[derive(Default)]
struct Seen {
    pongs: AtomicU64,
    normal_closes: AtomicU64,
    sources: Mutex<Vec<IpAddr>>,
}

/// Starts the scripted server. Tokens: `ok*` authenticate (then a ping), `limit` gets
/// an error frame and close 4509, `busy` gets HTTP 429, `drop*` authenticates and is
/// then dropped without a close frame, `silent` is upgraded and never answered.
async fn scripted_server() -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let seen2 = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            seen2.sources.lock().unwrap().push(peer.ip());
            let seen = Arc::clone(&seen2);
            tokio::spawn(async move {
                let token = Arc::new(Mutex::new(String::new()));
                let token2 = Arc::clone(&token);
                // The signature is tungstenite's `Callback`; its error type is theirs.
                #[allow(clippy::result_large_err)]
                let callback = move |req: &Request, mut resp: Response| {
                    let bearer = req
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "))
                        .unwrap_or("")
                        .to_owned();
                    if bearer == "busy" {
                        let mut e = ErrorResponse::new(Some("slow down".into()));
                        *e.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                        return Err(e);
                    }
                    *token2.lock().unwrap() = bearer;
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
                if token == "limit" {
                    let _ = ws
                        .send(Message::text(
                            r#"{"type":"error","code":"CONNECTION_LIMIT","message":"too many","retryable":false}"#,
                        ))
                        .await;
                    let _ = ws
                        .send(Message::Close(Some(CloseFrame {
                            code: CloseCode::from(4509),
                            reason: "limit".into(),
                        })))
                        .await;
                    while let Some(Ok(_)) = ws.next().await {}
                } else if token.starts_with("drop") {
                    let _ = ws.send(Message::text(authenticated)).await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    drop(ws); // no close frame
                } else if token == "silent" {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                } else {
                    let _ = ws.send(Message::text(authenticated)).await;
                    let _ = ws.send(Message::Ping("hi".into())).await;
                    while let Some(Ok(msg)) = ws.next().await {
                        match msg {
                            Message::Pong(_) => {
                                seen.pongs.fetch_add(1, Ordering::Relaxed);
                            }
                            Message::Close(Some(f)) if f.code == CloseCode::Normal => {
                                seen.normal_closes.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {}
                        }
                    }
                }
            });
        }
    });
    (addr, seen)
}

fn target(addr: SocketAddr) -> Target {
    Target::parse(&format!("ws://{addr}/ws")).unwrap()
}

#[tokio::test]
async fn authenticated_connection_answers_pings_and_closes_normally() {
    let (addr, seen) = scripted_server().await;
    let auth = client::connect(&target(addr), None, "ok", Duration::from_secs(5))
        .await
        .unwrap_or_else(|f| panic!("{f}"));
    assert!(auth.latency > Duration::ZERO);
    let stop = CancellationToken::new();
    let stopper = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stopper.cancel();
    });
    client::hold(auth.ws, &stop).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(seen.pongs.load(Ordering::Relaxed), 1);
    assert_eq!(seen.normal_closes.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn every_failure_is_classified() {
    let (addr, _) = scripted_server().await;
    let t = target(addr);
    let timeout = Duration::from_secs(5);
    let f = client::connect(&t, None, "limit", timeout)
        .await
        .err()
        .unwrap();
    assert_eq!(
        f,
        Failure::Closed {
            code: 4509,
            error: Some("CONNECTION_LIMIT".into())
        }
    );
    let f = client::connect(&t, None, "busy", timeout)
        .await
        .err()
        .unwrap();
    assert_eq!(f, Failure::Http(429));
    let f = client::connect(&t, None, "silent", Duration::from_millis(300))
        .await
        .err()
        .unwrap();
    assert_eq!(f, Failure::Timeout(Stage::Authenticated));

    let auth = client::connect(&t, None, "drop", timeout).await.unwrap();
    let held = client::hold(auth.ws, &CancellationToken::new()).await;
    assert!(
        matches!(
            held,
            Err(Failure::Dropped {
                stage: Stage::Holding,
                ..
            })
        ),
        "{held:?}"
    );

    // Nothing listens on the port of a listener we just closed.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let f = client::connect(&target(dead), None, "ok", timeout)
        .await
        .err()
        .unwrap();
    assert_eq!(f.limit(), client::Limit::Refused, "{f}");
}

/// Runs the binary with `args` and `--json` off the runtime (the scripted server
/// keeps serving); its exit code and report.
async fn run_binary(args: &[&str]) -> (i32, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_loadtest"));
    command.args(args).arg("--json").arg(&json);
    command.env_remove("SB_JWT_SECRET");
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    let report: serde_json::Value = match std::fs::read(&json) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap(),
        Err(e) => panic!(
            "no report ({e}); stderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ),
    };
    (output.status.code().unwrap_or(-1), report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_with_worker_processes_meets_its_goal() {
    let (addr, seen) = scripted_server().await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "ok-1\nok-2\n").unwrap();
    let url = format!("ws://{addr}/ws");
    let (code, report) = run_binary(&[
        "connect",
        "--url",
        &url,
        "--connections",
        "40",
        "--hold",
        "1",
        "--processes",
        "2",
        "--source-ips",
        "127.0.0.2-127.0.0.3",
        "--token-file",
        tokens.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["goal_met"], true);
    assert_eq!(report["connections"]["ok"], 40);
    assert_eq!(report["config"]["processes"], 2);
    assert_eq!(report["latency_histogram_us"]["count"], 40);
    assert_eq!(report["hold"]["open_at_end"], 40);
    let sources = seen.sources.lock().unwrap().clone();
    assert_eq!(sources.len(), 40);
    for ip in ["127.0.0.2", "127.0.0.3"] {
        let ip: IpAddr = ip.parse().unwrap();
        assert_eq!(sources.iter().filter(|s| **s == ip).count(), 20);
    }
    assert_eq!(seen.pongs.load(Ordering::Relaxed), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_reports_failures_by_reason_and_exits_1() {
    let (addr, _) = scripted_server().await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    // Eight connections: two of each behaviour.
    std::fs::write(&tokens, "ok\nlimit\nbusy\ndrop\n").unwrap();
    let url = format!("ws://{addr}/ws");
    let (code, report) = run_binary(&[
        "connect",
        "--url",
        &url,
        "--connections",
        "8",
        "--hold",
        "1",
        "--processes",
        "2",
        "--token-file",
        tokens.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 1);
    assert_eq!(report["goal_met"], false);
    assert_eq!(report["connections"]["ok"], 4);
    assert_eq!(report["connections"]["failed"], 4);
    assert_eq!(report["hold"]["unexpected_closes"], 2);
    let reasons: Vec<(String, u64)> = report["connections"]["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["reason"].as_str().unwrap().to_owned(),
                r["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(
        reasons.contains(&("close 4509 CONNECTION_LIMIT".to_owned(), 2)),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&("http 429 Too Many Requests".to_owned(), 2)),
        "{reasons:?}"
    );
    let limits: Vec<&str> = report["stopped_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["limit"].as_str().unwrap())
        .collect();
    for l in ["per_user_limit", "rate_limited", "dropped"] {
        assert!(limits.contains(&l), "{limits:?}");
    }
}

#[test]
fn binary_refuses_non_loopback_targets() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args([
            "connect",
            "--url",
            "ws://192.0.2.1:8080/ws",
            "--secret",
            "0123456789abcdef0123456789abcdef",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("only loopback targets"));
}
