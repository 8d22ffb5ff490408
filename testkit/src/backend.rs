//! A stub team backend for tests: `GET /api/users/{id}/teams` and `/tasks` answer
//! configurable JSON lists, with configurable latency and failure (HTTP 503), in
//! process on port 0. Counts calls and records the authorization each carried.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;

struct State {
    teams: Mutex<Value>,
    tasks: Mutex<Value>,
    failing: AtomicBool,
    /// When not 0, every call answers this HTTP status (a 403 for a removed user).
    status: AtomicU16,
    /// Probability that a call fails (503) even when not `failing`.
    fail_rate: Mutex<f64>,
    latency: Mutex<Duration>,
    calls: AtomicUsize,
    authorizations: Mutex<Vec<Option<String>>>,
    paths: Mutex<Vec<String>>,
}

/// The running stub; stops when dropped.
pub struct BackendStub {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BackendStub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Calls remembered for inspection; a long-running stub must not grow without bound.
const MAX_RECORDED: usize = 10_000;

fn bounded_push<T>(v: &mut Vec<T>, item: T) {
    if v.len() >= MAX_RECORDED {
        v.drain(..MAX_RECORDED / 2);
    }
    v.push(item);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BackendStub {
    /// Starts on 127.0.0.1, port 0, answering one team and one task.
    pub async fn start() -> BackendStub {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind stub");
        BackendStub::start_on(listener)
    }

    /// Serves on a listener the caller bound (the `mock-backend` binary).
    pub fn start_on(listener: TcpListener) -> BackendStub {
        let addr = listener.local_addr().expect("stub addr");
        let state = Arc::new(State {
            teams: Mutex::new(json!([{"id": "team-1", "name": "Team One"}])),
            tasks: Mutex::new(json!([{"id": "task-1", "title": "Write tests"}])),
            failing: AtomicBool::new(false),
            status: AtomicU16::new(0),
            fail_rate: Mutex::new(0.0),
            latency: Mutex::new(Duration::ZERO),
            calls: AtomicUsize::new(0),
            authorizations: Mutex::new(Vec::new()),
            paths: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        let task = crate::server::serve(listener, move |req| handle(st.clone(), req));
        BackendStub { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_teams(&self, v: Value) {
        *lock(&self.state.teams) = v;
    }

    pub fn set_tasks(&self, v: Value) {
        *lock(&self.state.tasks) = v;
    }

    /// While failing, every call answers 503.
    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    /// Every call answers `code` (0: back to normal answers).
    pub fn set_status(&self, code: u16) {
        self.state.status.store(code, Ordering::SeqCst);
    }

    /// Each call fails (503) with this probability.
    pub fn set_fail_rate(&self, p: f64) {
        *lock(&self.state.fail_rate) = p;
    }

    pub fn set_latency(&self, d: Duration) {
        *lock(&self.state.latency) = d;
    }

    /// Calls received (teams and tasks count separately).
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// The `Authorization` header of every call, in order.
    pub fn authorizations(&self) -> Vec<Option<String>> {
        lock(&self.state.authorizations).clone()
    }

    /// The path of every call, in order.
    pub fn paths(&self) -> Vec<String> {
        lock(&self.state.paths).clone()
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    state.calls.fetch_add(1, Ordering::SeqCst);
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    bounded_push(&mut lock(&state.authorizations), auth);
    let path = req.uri().path().to_owned();
    bounded_push(&mut lock(&state.paths), path.clone());
    let latency = *lock(&state.latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let reply = |code: u16, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        r.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/json"),
        );
        r
    };
    let unlucky = rand::random::<f64>() < *lock(&state.fail_rate);
    if state.failing.load(Ordering::SeqCst) || unlucky {
        return Ok(reply(503, r#"{"error":"backend down"}"#.into()));
    }
    let status = state.status.load(Ordering::SeqCst);
    if status != 0 {
        return Ok(reply(
            status,
            r#"{"error":"status set by the test"}"#.into(),
        ));
    }
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let body = match parts.as_slice() {
        ["api", "users", _, "teams"] => lock(&state.teams).to_string(),
        ["api", "users", _, "tasks"] => lock(&state.tasks).to_string(),
        _ => return Ok(reply(404, r#"{"error":"not found"}"#.into())),
    };
    Ok(reply(200, body))
}
