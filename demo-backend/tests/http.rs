//! The stand-in backend over real HTTP: login, the worker's backend client against the
//! teams and tasks routes, static files (content types, traversal), shutdown.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use demo_backend::config::LogFormat;
use serde_json::{Value, json};
use shared::auth::{JwtAlgorithm, JwtSettings, KeySource, Validator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use worker::backend::{BackendClient, BackendError, Endpoint};
use worker::config::BackendSettings;

const SECRET: &str = "demo-backend-test-secret-0123456789abcdef";
const TTL_SECS: u64 = 120;

struct Server {
    base: String,
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), demo_backend::ServerError>>,
    _dir: tempfile::TempDir,
}

/// A static directory shaped like `clients/`, plus a secret file next to it.
fn static_tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("clients");
    std::fs::create_dir_all(root.join("demo")).unwrap();
    std::fs::create_dir_all(root.join("js")).unwrap();
    std::fs::write(
        root.join("demo/index.html"),
        "<!doctype html><title>demo</title>",
    )
    .unwrap();
    std::fs::write(root.join("demo/app.css"), "body{}").unwrap();
    std::fs::write(root.join("demo/logo.svg"), "<svg/>").unwrap();
    std::fs::write(root.join("demo/app.mjs"), "export {}").unwrap();
    std::fs::write(
        root.join("js/switchboard.js"),
        "export class Switchboard {}",
    )
    .unwrap();
    std::fs::write(root.join("js/.hidden"), "no").unwrap();
    std::fs::write(dir.path().join("secret.txt"), "outside").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret.txt"), root.join("demo/link.txt")).unwrap();
    dir
}

async fn start() -> Server {
    let dir = static_tree();
    let args = demo_backend::Args {
        listen: "127.0.0.1:0".into(),
        jwt_secret: Some(SECRET.into()),
        token_ttl_secs: TTL_SECS,
        static_dir: dir.path().join("clients"),
        log_format: LogFormat::Text,
    };
    let config = args.validate().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(demo_backend::run(listener, config, shutdown.clone()));
    Server {
        base: format!("http://{addr}"),
        addr,
        shutdown,
        task,
        _dir: dir,
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn validator() -> Validator {
    Validator::new(&JwtSettings::new(
        JwtAlgorithm::Hs256,
        KeySource::Secret(SECRET.as_bytes().to_vec()),
    ))
    .unwrap()
}

async fn login(s: &Server, body: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/api/auth/login", s.base))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn backend_client(s: &Server) -> BackendClient {
    BackendClient::new(&BackendSettings {
        url: Some(s.base.clone()),
        token: None,
        timeout: Duration::from_secs(2),
        breaker_failures: 5,
        breaker_cooldown: Duration::from_secs(1),
        max_in_flight: 4,
    })
    .unwrap()
    .unwrap()
}

/// One raw HTTP/1.1 request, so paths reach the server exactly as written (HTTP
/// clients normalise `..` away).
async fn raw_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut c = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    c.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

#[tokio::test]
async fn login_issues_a_token_the_gateway_accepts() {
    let s = start().await;
    let (status, body) = login(&s, r#"{"user":"alice"}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user"], "alice");
    let token = body["token"].as_str().unwrap();
    let claims = validator().validate(token).unwrap();
    assert_eq!(claims.user_id, "alice");
    assert_eq!(body["expires_at"].as_u64().unwrap(), claims.exp);
    let left = claims.exp.saturating_sub(now());
    assert!(
        (TTL_SECS - 5..=TTL_SECS).contains(&left),
        "expires in {left} s"
    );
    assert!(claims.jti.is_some());
    // Another name, another subject; the same name twice, two tokens.
    let (_, again) = login(&s, r#"{"user":"alice"}"#).await;
    assert_ne!(again["token"], body["token"]);
}

#[tokio::test]
async fn login_refuses_bad_input_with_a_clear_error() {
    let s = start().await;
    for (body, needle) in [
        ("not json", "expected a JSON object"),
        ("{}", "missing field `user`"),
        (r#"{"user":7}"#, "invalid type"),
        (r#"{"user":""}"#, "empty"),
        (r#"{"user":"a b"}"#, "may only contain"),
        (r#"{"user":"../etc"}"#, "may only contain"),
    ] {
        let (status, v) = login(&s, body).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["error"]["code"], "BAD_REQUEST", "{body}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    let long = json!({"user": "a".repeat(65)}).to_string();
    assert_eq!(login(&s, &long).await.0, 400);
    let huge = json!({"user": "a".repeat(10_000)}).to_string();
    let (status, v) = login(&s, &huge).await;
    assert_eq!(status, 413, "{v}");

    let r = reqwest::get(format!("{}/api/auth/login", s.base))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(r.headers()["allow"], "POST");
}

#[tokio::test]
async fn teams_and_tasks_fit_the_worker_client() {
    let s = start().await;
    let (_, a) = login(&s, r#"{"user":"alice"}"#).await;
    let (_, b) = login(&s, r#"{"user":"bob"}"#).await;
    let alice = a["token"].as_str().unwrap();
    let bob = b["token"].as_str().unwrap();
    let client = backend_client(&s);

    let teams = client.list("alice", alice, Endpoint::Teams).await.unwrap();
    let ids: Vec<&str> = teams.iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["demo", "home-alice"]);
    let bob_teams = client.list("bob", bob, Endpoint::Teams).await.unwrap();
    assert_eq!(bob_teams[0]["id"], "demo", "both users share team:demo");

    let tasks = client.list("alice", alice, Endpoint::Tasks).await.unwrap();
    assert_eq!(tasks.len(), 3);
    assert!(tasks.iter().all(|t| t["title"].is_string()));
    let again = client.list("alice", alice, Endpoint::Tasks).await.unwrap();
    assert_eq!(tasks, again, "deterministic per user");

    // A real backend checks who asks: no token, a forged one, or someone else's.
    let err = client.list("alice", "", Endpoint::Teams).await.unwrap_err();
    assert!(matches!(err, BackendError::Status(401)), "{err}");
    let err = client
        .list("alice", "e30.e30.c2ln", Endpoint::Teams)
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::Status(401)), "{err}");
    let err = client
        .list("alice", bob, Endpoint::Tasks)
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::Status(403)), "{err}");
    assert!(
        !err.is_outage(),
        "a refusal must not open the worker's breaker"
    );

    let r = reqwest::get(format!("{}/api/users/alice/friends", s.base))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

async fn get(s: &Server, path: &str) -> reqwest::Response {
    reqwest::get(format!("{}{path}", s.base)).await.unwrap()
}

#[tokio::test]
async fn static_files_with_content_types() {
    let s = start().await;
    for (path, ctype, body) in [
        (
            "/",
            "text/html; charset=utf-8",
            "<!doctype html><title>demo</title>",
        ),
        (
            "/demo/index.html",
            "text/html; charset=utf-8",
            "<!doctype html><title>demo</title>",
        ),
        ("/demo/app.css", "text/css; charset=utf-8", "body{}"),
        ("/demo/logo.svg", "image/svg+xml", "<svg/>"),
        (
            "/demo/app.mjs",
            "text/javascript; charset=utf-8",
            "export {}",
        ),
        (
            "/js/switchboard.js",
            "text/javascript; charset=utf-8",
            "export class Switchboard {}",
        ),
    ] {
        let r = get(&s, path).await;
        assert_eq!(r.status().as_u16(), 200, "{path}");
        assert_eq!(r.headers()["content-type"], ctype, "{path}");
        assert_eq!(r.headers()["cache-control"], "no-cache", "{path}");
        assert_eq!(r.text().await.unwrap(), body, "{path}");
    }
    assert_eq!(get(&s, "/demo/missing.js").await.status().as_u16(), 404);
    assert_eq!(get(&s, "/nowhere").await.status().as_u16(), 404);
    let h = get(&s, "/healthz").await;
    assert_eq!(h.status().as_u16(), 200);
}

#[tokio::test]
async fn static_files_never_leave_the_directory() {
    let s = start().await;
    for path in [
        "/demo/../../secret.txt",
        "/js/../demo/index.html",
        "/demo/%2e%2e/%2e%2e/secret.txt",
        "/demo/..%2f..%2fsecret.txt",
        "/js/.hidden",
        "/demo/link.txt",
        "/demo//index.html",
    ] {
        let resp = raw_get(s.addr, path).await;
        let status = resp.split(' ').nth(1).unwrap_or("");
        assert!(
            status == "400" || status == "404",
            "{path} answered {status}"
        );
        assert!(!resp.contains("outside"), "{path} leaked the file");
        assert!(!resp.ends_with("no"), "{path} served a hidden file");
    }
    let ok = raw_get(s.addr, "/demo/index.html").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
}

#[tokio::test]
async fn stops_on_shutdown() {
    let s = start().await;
    assert_eq!(get(&s, "/healthz").await.status().as_u16(), 200);
    s.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), s.task)
        .await
        .expect("run returns after shutdown")
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(s.addr).await.is_err(), "listener closed");
}
