//! A stub LLM server for tests: OpenAI-compatible `POST .../chat/completions` (SSE)
//! and Ollama's `POST /api/chat` (NDJSON), in-process on port 0. Each request follows
//! the next queued [`Script`] (or the default one): a streamed reply with configurable
//! tokens, delays, usage chunk, line endings and ending (done, cut short, hang,
//! mid-stream error), or a plain HTTP error status with `Retry-After`. The stub
//! records every request (time, path, JSON body, authorization) and counts clients
//! that went away before their stream ended.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};

/// How a stream ends once its tokens (or the first `stop_after` of them) are sent.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    /// Finish chunk, optional usage chunk, `data: [DONE]` (or `done: true`).
    Done,
    /// The body just ends: no finish reason, no `[DONE]`.
    Cut,
    /// Nothing more is sent; the connection stays open until the client leaves.
    Hang,
    /// `data: {"error": ..}` (or `{"error": ..}` in NDJSON), then the body ends.
    Error(String),
}

/// A streamed reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub tokens: Vec<String>,
    /// Before the first token (headers are sent at once).
    pub first_token_delay: Duration,
    /// Between tokens.
    pub token_delay: Duration,
    /// Send `: ping` comments every this often while waiting for the first token.
    pub keepalive: Option<Duration>,
    /// Send the final usage chunk (OpenAI `include_usage`).
    pub usage: bool,
    /// `\r\n` line ends instead of `\n`.
    pub crlf: bool,
    /// Apply `end` after this many tokens instead of after all of them.
    pub stop_after: Option<usize>,
    pub end: End,
}

impl Reply {
    pub fn new<I, S>(tokens: I) -> Reply
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Reply {
            tokens: tokens.into_iter().map(Into::into).collect(),
            first_token_delay: Duration::ZERO,
            token_delay: Duration::ZERO,
            keepalive: None,
            usage: true,
            crlf: false,
            stop_after: None,
            end: End::Done,
        }
    }

    /// `n` tokens `"t0 "`, `"t1 "`, ...
    pub fn numbered(n: usize) -> Reply {
        Reply::new((0..n).map(|i| format!("t{i} ")))
    }

    pub fn token_delay(mut self, d: Duration) -> Reply {
        self.token_delay = d;
        self
    }

    pub fn first_token_delay(mut self, d: Duration) -> Reply {
        self.first_token_delay = d;
        self
    }

    pub fn keepalive(mut self, every: Duration) -> Reply {
        self.keepalive = Some(every);
        self
    }

    pub fn usage(mut self, on: bool) -> Reply {
        self.usage = on;
        self
    }

    pub fn crlf(mut self) -> Reply {
        self.crlf = true;
        self
    }

    /// After `n` tokens, end with `end`.
    pub fn stop_after(mut self, n: usize, end: End) -> Reply {
        self.stop_after = Some(n);
        self.end = end;
        self
    }

    /// The whole text the tokens make.
    pub fn text(&self) -> String {
        self.tokens.concat()
    }
}

/// What the stub does with one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Script {
    Reply(Reply),
    /// An HTTP error with an OpenAI-shaped body.
    Status {
        code: u16,
        retry_after: Option<String>,
        message: String,
    },
}

impl Script {
    pub fn status(code: u16) -> Script {
        Script::Status {
            code,
            retry_after: None,
            message: format!("stub status {code}"),
        }
    }

    pub fn rate_limited(retry_after: &str) -> Script {
        Script::Status {
            code: 429,
            retry_after: Some(retry_after.to_owned()),
            message: "Rate limit reached for requests".into(),
        }
    }
}

/// One request the stub received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub at: Instant,
    pub path: String,
    pub body: Value,
    pub authorization: Option<String>,
}

impl Recorded {
    /// The `messages` array of the body.
    pub fn messages(&self) -> Vec<Value> {
        self.body["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

#[derive(Default)]
struct State {
    queue: Mutex<VecDeque<Script>>,
    default: Mutex<Option<Script>>,
    /// Scripts chosen at random per request, with their probabilities.
    mix: Mutex<Vec<(f64, Script)>>,
    requests: Mutex<Vec<Recorded>>,
    disconnects: AtomicUsize,
    completed: AtomicUsize,
    active: AtomicUsize,
    changed: Notify,
    /// Served at `GET /stub/config` (the `mock-llm` binary describes its settings).
    info: Mutex<Option<Value>>,
    /// Every request ever received (the recorded list is bounded).
    total: AtomicUsize,
}

/// The running stub; stops when dropped.
pub struct LlmStub {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LlmStub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LlmStub {
    /// Starts on 127.0.0.1, port 0. Default script: a short reply.
    pub async fn start() -> LlmStub {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind stub");
        LlmStub::start_on(listener)
    }

    /// Serves on a listener the caller bound (the `mock-llm` binary).
    pub fn start_on(listener: TcpListener) -> LlmStub {
        let addr = listener.local_addr().expect("stub addr");
        let state = Arc::new(State::default());
        *lock(&state.default) = Some(Script::Reply(Reply::new(["Hello", ",", " world", "!"])));
        let st = state.clone();
        let task = crate::server::serve(listener, move |req| handle(st.clone(), req));
        LlmStub { addr, state, task }
    }

    /// OpenAI-style base URL with the version path: `http://127.0.0.1:port/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Server root, as Ollama's base URL: `http://127.0.0.1:port`.
    pub fn root_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The script for every request without a queued one.
    pub fn set_default(&self, s: Script) {
        *lock(&self.state.default) = Some(s);
    }

    /// Error injection: each request without a queued script takes script `i` with
    /// probability `p_i` (the rest get the default).
    pub fn set_mix(&self, mix: Vec<(f64, Script)>) {
        *lock(&self.state.mix) = mix;
    }

    /// A JSON document served at `GET /stub/config` (not recorded as a request), so
    /// that a load generator can read the stub's delays instead of being told; the
    /// stub adds its counters (`requests`, `completed`, `disconnects`, `active`).
    pub fn set_info(&self, info: Value) {
        *lock(&self.state.info) = Some(info);
    }

    /// A script for the next request (queued in order).
    pub fn push(&self, s: Script) {
        lock(&self.state.queue).push_back(s);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state.requests).clone()
    }

    pub fn request_count(&self) -> usize {
        lock(&self.state.requests).len()
    }

    /// Streams whose client went away before the stream ended.
    pub fn disconnects(&self) -> usize {
        self.state.disconnects.load(Ordering::SeqCst)
    }

    /// Streams sent to their end.
    pub fn completed(&self) -> usize {
        self.state.completed.load(Ordering::SeqCst)
    }

    /// Streams being sent now.
    pub fn active(&self) -> usize {
        self.state.active.load(Ordering::SeqCst)
    }

    /// Waits until `f` holds (checked on every change), at most `timeout`.
    pub async fn wait_for(&self, timeout: Duration, f: impl Fn(&LlmStub) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.state.changed.notified();
            if f(self) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return f(self);
            }
        }
    }
}

/// Requests remembered for inspection.
const MAX_RECORDED: usize = 10_000;

/// Picks a script from the error-injection mix, if the dice say so.
fn roll(mix: &[(f64, Script)]) -> Option<Script> {
    let mut x: f64 = rand::random();
    for (p, s) in mix {
        if x < *p {
            return Some(s.clone());
        }
        x -= p;
    }
    None
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A response body fed by a channel: when the client goes away hyper drops it, and
/// the sender sees the channel closed.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<ChannelBody>, Infallible> {
    let path = req.uri().path().to_owned();
    if req.method() == hyper::Method::GET && path == "/stub/config" {
        let info = lock(&state.info).clone();
        return Ok(match info {
            Some(mut info) => {
                let count = |a: &AtomicUsize| json!(a.load(Ordering::SeqCst));
                info["requests"] = count(&state.total);
                info["completed"] = count(&state.completed);
                info["disconnects"] = count(&state.disconnects);
                info["active"] = count(&state.active);
                fixed(200, None, &info.to_string())
            }
            None => fixed(404, None, r#"{"error":{"message":"no stub config"}}"#),
        });
    }
    let authorization = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    state.total.fetch_add(1, Ordering::SeqCst);
    let mut requests = lock(&state.requests);
    if requests.len() >= MAX_RECORDED {
        // A long-running stub (the binary) must not grow without bound.
        requests.drain(..MAX_RECORDED / 2);
    }
    requests.push(Recorded {
        at: Instant::now(),
        path: path.clone(),
        body,
        authorization,
    });
    drop(requests);
    state.changed.notify_waiters();
    let ollama = path.ends_with("/api/chat");
    if !ollama && !path.ends_with("/chat/completions") {
        return Ok(fixed(
            404,
            None,
            r#"{"error":{"message":"File Not Found"}}"#,
        ));
    }
    let script = lock(&state.queue)
        .pop_front()
        .or_else(|| roll(&lock(&state.mix)))
        .or_else(|| lock(&state.default).clone())
        .unwrap_or(Script::status(500));
    match script {
        Script::Status {
            code,
            retry_after,
            message,
        } => {
            let body = json!({"error": {"message": message, "type": "stub_error", "param": null, "code": null}});
            Ok(fixed(code, retry_after.as_deref(), &body.to_string()))
        }
        Script::Reply(reply) => {
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(stream(state, reply, ollama, tx));
            let ct = if ollama {
                "application/x-ndjson"
            } else {
                "text/event-stream"
            };
            let mut r = Response::new(ChannelBody { rx });
            r.headers_mut()
                .insert("content-type", http::HeaderValue::from_static(ct));
            Ok(r)
        }
    }
}

fn fixed(code: u16, retry_after: Option<&str>, body: &str) -> Response<ChannelBody> {
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(Bytes::from(body.to_owned()));
    let mut r = Response::new(ChannelBody { rx });
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    if let Some(ra) = retry_after.and_then(|v| http::HeaderValue::from_str(v).ok()) {
        r.headers_mut().insert("retry-after", ra);
    }
    r
}

/// Sends one scripted stream; notes whether the client stayed to the end.
async fn stream(state: Arc<State>, reply: Reply, ollama: bool, tx: mpsc::Sender<Bytes>) {
    state.active.fetch_add(1, Ordering::SeqCst);
    let finished = send_stream(&reply, ollama, &tx).await;
    state.active.fetch_sub(1, Ordering::SeqCst);
    if finished {
        state.completed.fetch_add(1, Ordering::SeqCst);
    } else {
        state.disconnects.fetch_add(1, Ordering::SeqCst);
    }
    state.changed.notify_waiters();
}

/// `false` if the client went away first.
async fn send_stream(reply: &Reply, ollama: bool, tx: &mpsc::Sender<Bytes>) -> bool {
    let nl = if reply.crlf { "\r\n" } else { "\n" };
    let sse = |v: &Value| Bytes::from(format!("data: {v}{nl}{nl}"));
    let ndjson = |v: &Value| Bytes::from(format!("{v}{nl}"));
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0,
               "model": "stub", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    if !ollama
        && tx
            .send(sse(&chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            )))
            .await
            .is_err()
    {
        return false;
    }
    // First-token delay, with keep-alive comments if asked.
    let mut waited = Duration::ZERO;
    while waited < reply.first_token_delay {
        let step = reply
            .keepalive
            .unwrap_or(reply.first_token_delay)
            .min(reply.first_token_delay - waited);
        if !pause(tx, step).await {
            return false;
        }
        waited += step;
        if reply.keepalive.is_some()
            && !ollama
            && tx
                .send(Bytes::from(format!(": ping{nl}{nl}")))
                .await
                .is_err()
        {
            return false;
        }
    }
    let stop = reply.stop_after.unwrap_or(reply.tokens.len());
    for (i, tok) in reply.tokens.iter().take(stop).enumerate() {
        if i > 0 && !pause(tx, reply.token_delay).await {
            return false;
        }
        let frame = if ollama {
            ndjson(
                &json!({"model": "stub", "message": {"role": "assistant", "content": tok}, "done": false}),
            )
        } else {
            sse(&chunk(json!({"content": tok}), Value::Null))
        };
        if tx.send(frame).await.is_err() {
            return false;
        }
    }
    let end = if reply.stop_after.is_some() {
        reply.end.clone()
    } else {
        End::Done
    };
    match end {
        End::Done => {
            let sent = stop as u64;
            let frames: Vec<Bytes> = if ollama {
                let mut last = json!({"model": "stub", "message": {"role": "assistant", "content": ""},
                                      "done": true, "done_reason": "stop"});
                if reply.usage {
                    last["prompt_eval_count"] = json!(7);
                    last["eval_count"] = json!(sent);
                }
                vec![ndjson(&last)]
            } else {
                let mut f = vec![sse(&chunk(json!({}), json!("stop")))];
                if reply.usage {
                    f.push(sse(
                        &json!({"id": "chatcmpl-stub", "object": "chat.completion.chunk",
                        "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": sent,
                        "total_tokens": 7 + sent}}),
                    ));
                }
                f.push(Bytes::from(format!("data: [DONE]{nl}{nl}")));
                f
            };
            for f in frames {
                if tx.send(f).await.is_err() {
                    return false;
                }
            }
            true
        }
        End::Cut => true,
        End::Hang => {
            tx.closed().await;
            false
        }
        End::Error(message) => {
            let frame = if ollama {
                ndjson(&json!({"error": message}))
            } else {
                sse(&json!({"error": {"message": message, "type": "server_error", "code": 500}}))
            };
            tx.send(frame).await.is_ok()
        }
    }
}

/// Sleeps `d`; `false` if the client went away meanwhile.
async fn pause(tx: &mpsc::Sender<Bytes>, d: Duration) -> bool {
    if d.is_zero() {
        return !tx.is_closed();
    }
    tokio::select! {
        _ = tx.closed() => false,
        _ = tokio::time::sleep(d) => true,
    }
}
