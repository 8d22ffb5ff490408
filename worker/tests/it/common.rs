//! Harness: real NATS (JetStream) and Redis per test, stub LLM and team backend in
//! process, workers run in process with `worker::run` on port 0. Requests are
//! published straight to JetStream; a NATS subscriber on `sb.user.<uid>` plays the
//! gateways; history is read through the session store.

pub use shared::store::ChatStore;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures_util::StreamExt;
use serde_json::Value;
use shared::keys::Keys;
use shared::protocol::{ChatCancel, ChatRequest, FileAttachment, HistoryMessage};
use shared::store::{RedisStore, now_ms};
use shared::subjects::Subjects;
use testkit::backend::BackendStub;
use testkit::llm::LlmStub;
use testkit::{Nats, TestRedis};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use worker::RawConfig;

/// Generous bound for anything a test waits for over loopback.
pub const WAIT: Duration = Duration::from_secs(10);
/// Ack wait of test workers: redelivery after a kill within a couple of seconds.
pub const ACK_WAIT_SECS: u64 = 2;
/// Deliveries before the final error, in tests.
pub const MAX_DELIVER: i64 = 3;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A unique id for requests, sessions and users.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// Everything a worker talks to, per test.
pub struct Env {
    pub nats: Nats,
    /// One server, or a Redis Cluster under `SB_TEST_REDIS=cluster`.
    pub redis: TestRedis,
    pub llm: LlmStub,
    pub backend: BackendStub,
    pub nc: async_nats::Client,
    pub store: RedisStore,
    pub subjects: Subjects,
}

impl Env {
    pub async fn start() -> Env {
        let nats = Nats::start().expect("nats-server");
        let redis = TestRedis::start().expect("redis-server");
        let nc = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(nats.url())
            .await
            .expect("nats connect");
        let store = RedisStore::open(
            shared::config::redis_target(&redis.url(), redis.is_cluster()),
            Keys::new("sb"),
        )
        .expect("store");
        Env {
            nats,
            redis,
            llm: LlmStub::start().await,
            backend: BackendStub::start().await,
            nc,
            store,
            subjects: Subjects::new("sb"),
        }
    }

    /// Test settings: short timeouts and backoffs so failures show quickly.
    pub fn config(&self) -> RawConfig {
        RawConfig {
            cluster: shared::config::ClusterArgs {
                node_id: Some(unique("w")),
                nats_url: Some(self.nats.url()),
                redis_url: Some(self.redis.url()),
                redis_cluster: Some(self.redis.is_cluster()),
                ..Default::default()
            },
            llm_base_url: Some(self.llm.base_url()),
            llm_connect_timeout_ms: Some(1000),
            llm_first_token_timeout_ms: Some(3000),
            llm_idle_timeout_ms: Some(1000),
            llm_total_timeout_ms: Some(15_000),
            llm_backoff_base_ms: Some(20),
            llm_backoff_max_ms: Some(200),
            backend_url: Some(self.backend.url()),
            backend_timeout_ms: Some(500),
            ack_wait_secs: Some(ACK_WAIT_SECS),
            max_deliver: Some(MAX_DELIVER),
            shutdown_grace_secs: Some(5),
            ..RawConfig::default()
        }
    }

    /// Starts a worker with the test settings changed by `tweak`; waits until ready.
    pub async fn worker(&self, tweak: impl FnOnce(&mut RawConfig)) -> Worker {
        let mut raw = self.config();
        tweak(&mut raw);
        start_worker(raw).await
    }

    pub fn js(&self) -> jetstream::Context {
        jetstream::new(self.nc.clone())
    }

    /// Publishes a request to JetStream as a gateway does (`Nats-Msg-Id` = request id)
    /// and waits for JetStream's ack.
    pub async fn publish(&self, req: &ChatRequest) {
        let js = self.js();
        shared::bus::stream::ensure_chat_stream(&js, &self.subjects, 1)
            .await
            .expect("chat stream");
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", req.request_id.as_str());
        js.publish_with_headers(
            self.subjects.chat_requests(),
            headers,
            serde_json::to_vec(req).unwrap().into(),
        )
        .await
        .expect("publish")
        .await
        .expect("publish ack");
    }

    pub async fn cancel(&self, request_id: &str, user_id: &str) {
        let body = serde_json::to_vec(&ChatCancel {
            request_id: request_id.into(),
            user_id: user_id.into(),
        })
        .unwrap();
        self.nc
            .publish(self.subjects.chat_cancel(), body.into())
            .await
            .unwrap();
        self.nc.flush().await.unwrap();
    }

    /// A subscriber on the user's subject, ready before anything is published.
    pub async fn frames(&self, user_id: &str) -> Frames {
        let sub = self
            .nc
            .subscribe(self.subjects.user(user_id))
            .await
            .unwrap();
        self.nc.flush().await.unwrap();
        Frames { sub }
    }

    /// The recorded history of the request's session (sessions are keyed by owner).
    pub async fn history(&self, req: &ChatRequest) -> Vec<HistoryMessage> {
        self.store
            .history(&req.user_id, &req.session_id, 1000)
            .await
            .unwrap()
    }

    /// The durable consumer as workers configure it, for tests that play a failing
    /// worker.
    pub async fn consumer(&self) -> PullConsumer {
        let stream = shared::bus::stream::ensure_chat_stream(&self.js(), &self.subjects, 1)
            .await
            .unwrap();
        stream
            .create_consumer(shared::bus::stream::chat_consumer_config(
                &self.subjects,
                Duration::from_secs(ACK_WAIT_SECS),
                MAX_DELIVER + 1,
                worker::consume::MAX_ACK_PENDING,
            ))
            .await
            .unwrap()
    }

    /// Waits until the chat consumer holds nothing: no pending, no un-acked message.
    pub async fn wait_queue_empty(&self) {
        let mut c = self.consumer().await;
        let start = Instant::now();
        loop {
            let info = c.info().await.unwrap();
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                return;
            }
            assert!(start.elapsed() < WAIT, "queue not empty: {info:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A chat request for a fresh session.
pub fn request(user_id: &str, message: &str) -> ChatRequest {
    ChatRequest {
        request_id: unique("r"),
        session_id: unique("s"),
        user_id: user_id.into(),
        message: message.into(),
        files: Vec::<FileAttachment>::new(),
        created_at: now_ms(),
        node: "test".into(),
    }
}

/// A worker running in this process.
pub struct Worker {
    pub admin: SocketAddr,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub async fn start_worker(raw: RawConfig) -> Worker {
    let mut config = raw.validate().expect("valid config");
    // In process, this test binary is the current exe: PDFs go to the real worker.
    config.pdf_extractor = Some(env!("CARGO_BIN_EXE_worker").into());
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let s2 = shutdown.clone();
    let task = tokio::spawn(async move {
        worker::run(admin, config, s2).await.expect("worker run");
    });
    let w = Worker {
        admin: admin_addr,
        shutdown,
        task: Some(task),
    };
    w.wait_ready(true).await;
    w
}

impl Worker {
    pub async fn readyz(&self) -> (u16, Value) {
        match reqwest::get(format!("http://{}/readyz", self.admin)).await {
            Ok(r) => {
                let code = r.status().as_u16();
                (code, r.json().await.unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        }
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
        let start = Instant::now();
        while self.readyz().await.0 != code {
            assert!(start.elapsed() < WAIT * 2, "readyz never became {code}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM: starts the graceful shutdown; `join` waits for it.
    pub fn terminate(&self) {
        self.shutdown.cancel();
    }

    /// Waits for `run` to return.
    pub async fn join(mut self) {
        if let Some(t) = self.task.take() {
            tokio::time::timeout(WAIT * 2, t)
                .await
                .expect("worker stops")
                .expect("worker task");
        }
    }

    /// Like a crash: everything the worker runs stops now, nothing is acked.
    pub async fn kill(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Frames published to one user.
pub struct Frames {
    sub: async_nats::Subscriber,
}

/// A stream of frames for one request as a client sees it.
#[derive(Debug, Default)]
pub struct Seen {
    pub chunks: Vec<Value>,
    /// `chat.complete` or `chat.error`.
    pub last: Value,
}

impl Seen {
    pub fn kind(&self) -> &str {
        self.last["type"].as_str().unwrap_or("")
    }

    pub fn chunk_text(&self) -> String {
        self.chunks
            .iter()
            .map(|c| c["content"].as_str().unwrap_or(""))
            .collect()
    }

    pub fn seqs(&self) -> Vec<u64> {
        self.chunks
            .iter()
            .map(|c| c["seq"].as_u64().unwrap())
            .collect()
    }
}

impl Frames {
    /// The next frame, or `None` after `timeout`.
    pub async fn next_within(&mut self, timeout: Duration) -> Option<Value> {
        match tokio::time::timeout(timeout, self.sub.next()).await {
            Ok(Some(m)) => Some(serde_json::from_slice(&m.payload).expect("json frame")),
            _ => None,
        }
    }

    pub async fn next(&mut self) -> Value {
        self.next_within(WAIT).await.expect("a frame in time")
    }

    /// Frames until `chat.complete` or `chat.error`.
    pub async fn until_end(&mut self) -> Seen {
        let mut seen = Seen::default();
        loop {
            let f = self.next().await;
            match f["type"].as_str() {
                Some("chat.chunk") => seen.chunks.push(f),
                Some("chat.complete") | Some("chat.error") => {
                    seen.last = f;
                    return seen;
                }
                other => panic!("unexpected frame {other:?}: {f}"),
            }
        }
    }

    /// Asserts nothing more arrives for `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        if let Some(f) = self.next_within(d).await {
            panic!("unexpected frame: {f}");
        }
    }
}
