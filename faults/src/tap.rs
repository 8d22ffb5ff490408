//! The LLM tap: a recording HTTP proxy between the workers and the STUB `mock-llm`.
//! It notes when each completion request arrived, which chat it belongs to (the
//! marker in the last user message) and what status the LLM answered, so the suite
//! can check from outside the workers that retries honour `Retry-After` and that no
//! request is silently dropped. The body is streamed back untouched. While mock-llm
//! is down (a restart) the tap answers 502, as a real gateway in front of an LLM does.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::net::TcpListener;

/// Requests remembered; a soak run sends far fewer.
const MAX_RECORDS: usize = 200_000;
/// The upstream must answer (headers) within this; mock-llm answers at once.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// One completion request seen by the tap.
#[derive(Debug, Clone)]
pub struct TapRecord {
    pub at: Instant,
    /// The chat marker found in the last user message (`[m:<session id>]`).
    pub marker: Option<String>,
    /// The LLM's status; 502 when mock-llm could not be reached.
    pub status: u16,
}

type Body = Either<Incoming, Full<Bytes>>;

pub struct LlmTap {
    records: Arc<Mutex<Vec<TapRecord>>>,
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LlmTap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LlmTap {
    /// Listens on 127.0.0.1:`port`, forwarding to 127.0.0.1:`upstream`.
    pub async fn start(port: u16, upstream: u16) -> Result<LlmTap> {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("LLM tap on port {port}"))?;
        let records = Arc::new(Mutex::new(Vec::new()));
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let recs = records.clone();
        let task = testkit::server::serve(listener, move |req| {
            forward(client.clone(), recs.clone(), upstream, req)
        });
        Ok(LlmTap {
            records,
            port,
            task,
        })
    }

    /// Where the workers send their requests.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn records(&self) -> Vec<TapRecord> {
        lock(&self.records).clone()
    }
}

/// The marker of a chat: the suite writes `[m:<session id>]` into every message.
pub fn marker_of(text: &str) -> Option<String> {
    let start = text.find("[m:")? + 3;
    let end = text[start..].find(']')? + start;
    Some(text[start..end].to_owned())
}

fn marker_in_body(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let last_user = v["messages"]
        .as_array()?
        .iter()
        .rev()
        .find(|m| m["role"] == "user")?;
    marker_of(last_user["content"].as_str()?)
}

async fn forward(
    client: Client<HttpConnector, Full<Bytes>>,
    records: Arc<Mutex<Vec<TapRecord>>>,
    upstream: u16,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let at = Instant::now();
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let marker = marker_in_body(&body);
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let mut out = Request::builder()
        .method(parts.method)
        .uri(format!("http://127.0.0.1:{upstream}{path}"));
    for (k, v) in &parts.headers {
        if k != hyper::header::HOST {
            out = out.header(k, v);
        }
    }
    let answer = match out.body(Full::new(body)) {
        Ok(r) => tokio::time::timeout(UPSTREAM_TIMEOUT, client.request(r))
            .await
            .ok()
            .and_then(Result::ok),
        Err(_) => None,
    };
    let (status, resp) = match answer {
        Some(r) => (r.status().as_u16(), r.map(Either::Left)),
        None => {
            let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(
                br#"{"error":{"message":"LLM unreachable (fault-injection tap)"}}"#,
            ))));
            *r.status_mut() = StatusCode::BAD_GATEWAY;
            (502, r)
        }
    };
    let mut recs = lock(&records);
    if recs.len() >= MAX_RECORDS {
        recs.drain(..MAX_RECORDS / 2);
    }
    recs.push(TapRecord { at, marker, status });
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_found_in_the_last_user_message() {
        assert_eq!(marker_of("hello [m:s-1_a] there").as_deref(), Some("s-1_a"));
        assert_eq!(marker_of("no marker"), None);
        let body = br#"{"messages":[{"role":"user","content":"[m:old]"},{"role":"assistant","content":"x"},{"role":"user","content":"q [m:new]"}]}"#;
        assert_eq!(marker_in_body(body).as_deref(), Some("new"));
        assert_eq!(marker_in_body(b"not json"), None);
    }
}
