//! Harness: real NATS and Redis per test, real gateways on port 0, a real WebSocket
//! client (tokio-tungstenite).

pub use shared::store::{ChannelStore, ChatStore, ConnStore};
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gateway::{Listeners, RawConfig};
use serde_json::Value;
use testkit::{Nats, TestRedis, tokens};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Message, handshake::client::Response};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub const API_KEY: &str = "test-api-key-0123456789";
/// Generous bound for anything a test waits for over loopback.
pub const WAIT: Duration = Duration::from_secs(10);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct Deps {
    pub nats: Nats,
    /// One server, or a Redis Cluster under `SB_TEST_REDIS=cluster`.
    pub redis: TestRedis,
}

impl Deps {
    pub fn start() -> Deps {
        Deps {
            nats: Nats::start().expect("nats-server"),
            redis: TestRedis::start().expect("redis-server"),
        }
    }

    /// A store on the same Redis as the gateways (single server or cluster).
    pub fn store(&self) -> shared::store::RedisStore {
        shared::store::RedisStore::open(
            shared::config::redis_target(&self.redis.url(), self.redis.is_cluster()),
            shared::keys::Keys::new("sb"),
        )
        .expect("store")
    }
}

pub struct Gw {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub node_id: String,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub fn base_config(deps: &Deps) -> RawConfig {
    RawConfig {
        cluster: shared::config::ClusterArgs {
            nats_url: Some(deps.nats.url()),
            redis_url: Some(deps.redis.url()),
            redis_cluster: Some(deps.redis.is_cluster()),
            node_id: Some(format!("gw-{}", testkit::free_port())),
            ..Default::default()
        },
        jwt_secret: Some(tokens::TEST_SECRET.into()),
        api_key: Some(API_KEY.into()),
        drain_secs: Some(1),
        ..RawConfig::default()
    }
}

/// Starts a gateway in this process on port 0; waits until it is ready.
pub async fn gateway(deps: &Deps, tweak: impl FnOnce(&mut RawConfig)) -> Gw {
    let mut raw = base_config(deps);
    tweak(&mut raw);
    start_gateway(raw).await
}

/// Starts a gateway with exactly this configuration; waits until it is ready.
pub async fn start_gateway(raw: RawConfig) -> Gw {
    start_gateway_on(raw, None).await
}

/// As [`start_gateway`], on the given backends (NATS and Redis of the configuration
/// when `None`).
pub async fn start_gateway_on(raw: RawConfig, backends: Option<gateway::Backends>) -> Gw {
    let config = raw.validate().expect("valid config");
    let node_id = config.cluster.node_id.clone();
    let public = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, admin_addr) = (public.local_addr().unwrap(), admin.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let s2 = shutdown.clone();
    let task = tokio::spawn(async move {
        let listeners = Listeners { public, admin };
        match backends {
            Some(b) => gateway::run_on(listeners, config, b, s2).await,
            None => gateway::run(listeners, config, s2).await,
        }
        .expect("gateway run");
    });
    let gw = Gw {
        addr,
        admin: admin_addr,
        node_id,
        shutdown,
        task: Some(task),
    };
    gw.wait_ready(true).await;
    gw
}

impl Gw {
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn readyz(&self) -> u16 {
        reqwest::get(format!("http://{}/readyz", self.admin))
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn wait_ready(&self, want: bool) {
        let code = if want { 200 } else { 503 };
        let start = std::time::Instant::now();
        while self.readyz().await != code {
            assert!(start.elapsed() < WAIT * 2, "readyz never became {code}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Triggers the drain and waits for `run` to return.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(WAIT * 2, t)
                .await
                .expect("gateway stops")
                .unwrap();
        }
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// How a client presents its token in the handshake.
#[derive(Default, Clone)]
pub struct Hs {
    pub bearer: Option<String>,
    pub protocols: Vec<String>,
    pub query: Option<String>,
    pub origin: Option<String>,
    pub headers: Vec<(String, String)>,
}

impl Hs {
    pub fn bearer(token: &str) -> Hs {
        Hs {
            bearer: Some(token.into()),
            ..Hs::default()
        }
    }
}

pub async fn connect(
    url: &str,
    hs: Hs,
) -> Result<(Ws, Response), tokio_tungstenite::tungstenite::Error> {
    let url = match &hs.query {
        Some(q) => format!("{url}?{q}"),
        None => url.to_owned(),
    };
    let mut req = url.into_client_request().unwrap();
    let h = req.headers_mut();
    if let Some(t) = &hs.bearer {
        h.insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
        );
    }
    if !hs.protocols.is_empty() {
        h.insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(&hs.protocols.join(", ")).unwrap(),
        );
    }
    if let Some(o) = &hs.origin {
        h.insert("origin", HeaderValue::from_str(o).unwrap());
    }
    for (k, v) in &hs.headers {
        h.insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    tokio_tungstenite::connect_async(req).await
}

/// Next JSON frame; pings/pongs skipped. Panics on close or timeout.
pub async fn next_json<S>(ws: &mut WebSocketStream<S>) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("frame in time");
        match m {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).expect("json frame"),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Reads until the close frame; returns its code. Text frames before it are returned too.
pub async fn until_close(ws: &mut Ws) -> (Vec<Value>, Option<u16>) {
    let mut frames = Vec::new();
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("close in time");
        match m {
            Some(Ok(Message::Text(t))) => frames.push(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(f))) => {
                return (frames, f.map(|f| u16::from(f.code)));
            }
            Some(Ok(_)) => continue,
            // The peer dropped TCP without a close frame: 1006 in a browser.
            Some(Err(_)) | None => return (frames, None),
        }
    }
}

/// Expects exactly one `error` frame then a close with `code`; returns the error frame.
pub async fn expect_refusal(ws: &mut Ws, code: u16, error: &str) -> Value {
    let (frames, close) = until_close(ws).await;
    assert_eq!(close, Some(code), "close code; frames: {frames:?}");
    assert_eq!(frames.len(), 1, "exactly one error frame: {frames:?}");
    assert_eq!(frames[0]["type"], "error");
    assert_eq!(frames[0]["code"], error, "{frames:?}");
    frames[0].clone()
}

pub async fn send_json(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// Connects with a header token and expects `authenticated`.
pub async fn authed(gw: &Gw, user: &str) -> (Ws, Value) {
    let (mut ws, _) = connect(&gw.url(), Hs::bearer(&tokens::token(user, 3600)))
        .await
        .unwrap();
    let a = next_json(&mut ws).await;
    assert_eq!(a["type"], "authenticated", "{a}");
    (ws, a)
}

pub fn api() -> reqwest::Client {
    reqwest::Client::new()
}

/// GET on a gateway's API with the API key; the JSON body, whatever the status.
pub async fn api_get(gw: &Gw, path: &str) -> Value {
    api()
        .get(gw.http(path))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// POST on a gateway's API with the API key: the status and the JSON body.
pub async fn api_post(gw: &Gw, path: &str, body: &Value) -> (u16, Value) {
    let r = api()
        .post(gw.http(path))
        .bearer_auth(API_KEY)
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json::<Value>().await.unwrap())
}

pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while !f().await {
        assert!(start.elapsed() < WAIT * 2, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Subscribes and waits until the server has the interest: `flush` only empties the
/// client's buffer, so a publish from another connection could still miss it. A probe
/// published on the same connection arrives only after the SUB was processed.
pub async fn subscribe_ready(nats: &async_nats::Client, subject: &str) -> async_nats::Subscriber {
    let mut sub = nats.subscribe(subject.to_owned()).await.unwrap();
    nats.publish(subject.to_owned(), "probe".into())
        .await
        .unwrap();
    let probe = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut sub)).await;
    assert!(matches!(probe, Ok(Some(m)) if &m.payload[..] == b"probe"));
    sub
}

/// Stands in for workers on `sb.rpc.user_context`: answers every user with the teams
/// listed for them (none otherwise).
pub async fn context_responder(
    deps: &Deps,
    teams: &[(&str, &[&str])],
) -> tokio::task::JoinHandle<()> {
    let map: std::collections::HashMap<String, Vec<String>> = teams
        .iter()
        .map(|(u, t)| (u.to_string(), t.iter().map(|s| s.to_string()).collect()))
        .collect();
    let nats = async_nats::connect(deps.nats.url()).await.unwrap();
    let mut sub = nats
        .queue_subscribe("sb.rpc.user_context", "workers".into())
        .await
        .unwrap();
    // A request on the same connection proves the SUB is in place before tests start.
    let _ = nats.request("sb.rpc.barrier-for-tests", "".into()).await;
    tokio::spawn(async move {
        while let Some(msg) = futures_util::StreamExt::next(&mut sub).await {
            let req: Value = serde_json::from_slice(&msg.payload).unwrap_or_default();
            let user = req["user_id"].as_str().unwrap_or_default();
            let teams: Vec<Value> = map
                .get(user)
                .map(|t| {
                    t.iter()
                        .map(|id| serde_json::json!({"id": id, "name": id}))
                        .collect()
                })
                .unwrap_or_default();
            let body = serde_json::json!({"teams": teams, "tasks": [], "degraded": false});
            if let Some(reply) = msg.reply {
                let _ = nats.publish(reply, body.to_string().into()).await;
            }
        }
    })
}

/// Subscribes (from `since` when given); the `subscribed` or `error` answer.
pub async fn subscribe(ws: &mut Ws, channel: &str, since: Option<u64>) -> Value {
    let mut f = serde_json::json!({"type": "subscribe", "channel": channel, "id": channel});
    if let Some(s) = since {
        f["since"] = serde_json::json!(s);
    }
    send_json(ws, f).await;
    next_matching(ws, |f| f["type"] == "subscribed" || f["type"] == "error").await
}

/// Reads frames until one satisfies `pred`; returns it (others are skipped).
pub async fn next_matching(ws: &mut Ws, pred: impl Fn(&Value) -> bool) -> Value {
    loop {
        let f = next_json(ws).await;
        if pred(&f) {
            return f;
        }
    }
}
