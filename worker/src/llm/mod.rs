//! The LLM client: one streaming chat completion per call, OpenAI-compatible SSE or
//! Ollama NDJSON, with the timeouts and retry rules of docs/DESIGN.md#llm-streaming.
//!
//! - Retries (429, 5xx, connection errors, a stream that breaks) happen only before the
//!   first generated text: once text reached the user, a retry would repeat it.
//! - Timeouts: connect (in the HTTP client), first token (per attempt, from sending the
//!   request; keep-alive comments do not count as tokens), idle (after the first token,
//!   reset by every byte, pings included), total (the whole call, retries included).
//! - Cancelling means dropping the [`LlmStream`]: the response body is dropped mid-read,
//!   which closes the connection, and every server we know stops generating.

pub mod lines;
pub mod message;
pub mod ollama;
pub mod openai;
pub mod retry;
pub mod sse;

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use shared::protocol::Usage;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;

use crate::config::{LlmProtocol, LlmSettings};
use lines::LineSplitter;
pub use message::{LlmError, LlmEvent, Message, Role, TimeoutKind};
use sse::SseDecoder;

/// Error bodies are read up to this size: enough for any JSON error.
pub const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;
/// A non-streamed (whole JSON) reply larger than this is refused.
pub const MAX_WHOLE_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Reading an error body never takes longer than this.
pub const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle connections to the LLM are kept this long for the next request.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// After `[DONE]`, the rest of the body (the chunked terminator) is read in the
/// background for at most this long, so the connection can be reused (a TLS
/// handshake saved per request); otherwise it is closed.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Streaming chat completions against one configured server.
#[derive(Clone)]
pub struct LlmClient {
    http: reqwest::Client,
    url: reqwest::Url,
    settings: LlmSettings,
}

impl fmt::Debug for LlmClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The settings hold the API key: never print them.
        f.debug_struct("LlmClient")
            .field("url", &self.url.as_str())
            .finish_non_exhaustive()
    }
}

/// The client could not be built (bad TLS setup or URL).
#[derive(Debug, thiserror::Error)]
#[error("LLM client: {0}")]
pub struct BuildError(String);

impl LlmClient {
    pub fn new(settings: &LlmSettings) -> Result<LlmClient, BuildError> {
        let path = match settings.protocol {
            LlmProtocol::Openai => "/chat/completions",
            LlmProtocol::Ollama => "/api/chat",
        };
        let url = reqwest::Url::parse(&format!("{}{path}", settings.base_url))
            .map_err(|e| BuildError(e.to_string()))?;
        let http = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| BuildError(e.to_string()))?;
        Ok(LlmClient {
            http,
            url,
            settings: settings.clone(),
        })
    }

    fn body(&self, messages: &[Message]) -> Bytes {
        let s = &self.settings;
        let v = match s.protocol {
            LlmProtocol::Openai => openai::request_body(&s.model, messages, s.max_tokens),
            LlmProtocol::Ollama => ollama::request_body(&s.model, messages, s.max_tokens),
        };
        Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
    }

    /// Starts a completion and returns once the first text (or the end of an empty
    /// reply) arrived, retrying failures before that point. `cancel` aborts at once.
    pub async fn stream(
        &self,
        messages: &[Message],
        cancel: &CancellationToken,
    ) -> Result<LlmStream, LlmError> {
        let s = &self.settings;
        let body = self.body(messages);
        let total = Instant::now() + s.total_timeout;
        let mut attempt: u32 = 1;
        loop {
            let first = (Instant::now() + s.first_token_timeout).min(total);
            let r = tokio::select! {
                biased;
                _ = cancel.cancelled() => Err(LlmError::Cancelled),
                r = self.attempt(body.clone(), first, total) => r,
            };
            let e = match r {
                Ok(stream) => return Ok(stream),
                Err(e) => e,
            };
            if attempt >= s.max_attempts || !e.retryable() {
                return Err(e);
            }
            let delay = match e.retry_after() {
                Some(d) if d > retry::MAX_RETRY_AFTER => return Err(e),
                Some(d) if !d.is_zero() => d,
                _ => retry::backoff(attempt, s.backoff_base, s.backoff_max, rand::random()),
            };
            if Instant::now() + delay >= total {
                return Err(e);
            }
            metrics::counter!(shared::metrics::WORKER_LLM_RETRIES, "reason" => e.retry_reason())
                .increment(1);
            tracing::debug!(error = %e, attempt, delay_ms = delay.as_millis() as u64, "retrying LLM request");
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(LlmError::Cancelled),
                _ = tokio::time::sleep(delay) => {}
            }
            attempt += 1;
        }
    }

    /// One HTTP request, read until the first text.
    async fn attempt(
        &self,
        body: Bytes,
        first: Instant,
        total: Instant,
    ) -> Result<LlmStream, LlmError> {
        let first_kind = if first < total {
            TimeoutKind::FirstToken
        } else {
            TimeoutKind::Total
        };
        let mut req = self
            .http
            .post(self.url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(body);
        if self.settings.protocol == LlmProtocol::Openai {
            req = req.header(ACCEPT, HeaderValue::from_static("text/event-stream"));
        }
        if let Some(key) = &self.settings.api_key {
            req = req.bearer_auth(key);
        }
        let resp = match timeout_at(first, req.send()).await {
            Err(_) => return Err(LlmError::Timeout(first_kind)),
            Ok(Err(e)) if e.is_connect() => return Err(LlmError::Connect(error_chain(&e))),
            Ok(Err(e)) => return Err(LlmError::Interrupted(error_chain(&e))),
            Ok(Ok(r)) => r,
        };
        if !resp.status().is_success() {
            return Err(status_error(resp).await);
        }
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let decoder = Decoder::for_response(&content_type, self.settings.protocol);
        let mut stream = LlmStream {
            response: Some(resp),
            decoder,
            pending: VecDeque::new(),
            scratch: Vec::new(),
            usage: None,
            finish_reason: None,
            error: None,
            done: false,
            eof: false,
            idle: self.settings.idle_timeout,
            total,
        };
        if let Some(text) = stream.next_within(Some((first, first_kind))).await? {
            stream.pending.push_front(LlmEvent::Content(text));
        }
        Ok(stream)
    }
}

/// The error chain of a reqwest error in one line (its Display omits the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    openai::truncate(&s)
}

/// A non-2xx answer: status, the server's message, and its retry hints.
async fn status_error(mut resp: reqwest::Response) -> LlmError {
    let code = resp.status().as_u16();
    let retry_after = retry::retry_after(resp.headers(), SystemTime::now());
    let should_retry = retry::should_retry_header(resp.headers());
    let mut body = Vec::new();
    let deadline = Instant::now() + ERROR_BODY_TIMEOUT;
    while body.len() < MAX_ERROR_BODY_BYTES {
        match timeout_at(deadline, resp.chunk()).await {
            Ok(Ok(Some(b))) => body.extend_from_slice(&b),
            _ => break,
        }
    }
    let message = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(v) => {
            let inner = v.get("error").unwrap_or(&v);
            let mut m = openai::error_message(inner);
            // Keep the machine-readable code where it decides on retries.
            if let Some(c) = inner.get("code").and_then(|c| c.as_str())
                && !m.contains(c)
            {
                m = format!("{m} ({c})");
            }
            m
        }
        Err(_) => openai::truncate(String::from_utf8_lossy(&body).trim()),
    };
    LlmError::Status {
        code,
        message,
        retry_after,
        should_retry,
    }
}

/// Body decoding by what the server actually sent.
enum Decoder {
    Sse(SseDecoder),
    Ndjson(LineSplitter),
    /// A server that ignored `stream: true` and sent one JSON document.
    Whole(Vec<u8>, LlmProtocol),
}

impl Decoder {
    fn for_response(content_type: &str, protocol: LlmProtocol) -> Decoder {
        if content_type.starts_with("text/event-stream") {
            Decoder::Sse(SseDecoder::new())
        } else if content_type.starts_with("application/x-ndjson")
            || content_type.starts_with("application/ndjson")
        {
            Decoder::Ndjson(LineSplitter::new(sse::MAX_LINE_BYTES))
        } else if content_type.starts_with("application/json") {
            Decoder::Whole(Vec::new(), protocol)
        } else {
            match protocol {
                LlmProtocol::Openai => Decoder::Sse(SseDecoder::new()),
                LlmProtocol::Ollama => Decoder::Ndjson(LineSplitter::new(sse::MAX_LINE_BYTES)),
            }
        }
    }

    fn feed(
        &mut self,
        bytes: &[u8],
        scratch: &mut Vec<LlmEvent>,
        eof: bool,
    ) -> Result<(), LlmError> {
        match self {
            Decoder::Sse(d) => {
                let mut events = Vec::new();
                let r = if eof {
                    d.finish(&mut events)
                } else {
                    d.feed(bytes, &mut events)
                };
                for ev in &events {
                    openai::interpret(ev, scratch)?;
                }
                r.map_err(|e| LlmError::Protocol(e.to_string()))
            }
            Decoder::Ndjson(lines) => {
                let mut out = Vec::new();
                let r = if eof {
                    lines.finish(&mut out);
                    Ok(())
                } else {
                    lines.feed(bytes, &mut out)
                };
                for l in &out {
                    ollama::interpret_line(l, scratch)?;
                }
                r.map_err(|e| LlmError::Protocol(e.to_string()))
            }
            Decoder::Whole(buf, protocol) => {
                if buf.len() + bytes.len() > MAX_WHOLE_BODY_BYTES {
                    return Err(LlmError::Protocol("reply body too large".into()));
                }
                buf.extend_from_slice(bytes);
                if eof {
                    let v: serde_json::Value = serde_json::from_slice(buf)
                        .map_err(|e| LlmError::Protocol(format!("reply is not JSON: {e}")))?;
                    match protocol {
                        LlmProtocol::Openai => openai::interpret_chunk(&v, scratch)?,
                        LlmProtocol::Ollama => ollama::interpret_object(&v, scratch)?,
                    }
                    scratch.push(LlmEvent::Done);
                }
                Ok(())
            }
        }
    }
}

/// A completion being streamed. Dropping it closes the upstream connection.
pub struct LlmStream {
    response: Option<reqwest::Response>,
    decoder: Decoder,
    pending: VecDeque<LlmEvent>,
    scratch: Vec<LlmEvent>,
    usage: Option<Usage>,
    finish_reason: Option<String>,
    /// A failure met while decoding, reported after the text before it.
    error: Option<LlmError>,
    done: bool,
    eof: bool,
    idle: Duration,
    total: Instant,
}

impl LlmStream {
    /// The next piece of text; `None` once the reply is complete.
    pub async fn next(&mut self) -> Result<Option<String>, LlmError> {
        self.next_within(None).await
    }

    /// Token usage, when the server reported it (after the stream ended).
    pub fn usage(&self) -> Option<&Usage> {
        self.usage.as_ref()
    }

    /// Why the model stopped, when it said.
    pub fn finish_reason(&self) -> Option<&str> {
        self.finish_reason.as_deref()
    }

    async fn next_within(
        &mut self,
        deadline: Option<(Instant, TimeoutKind)>,
    ) -> Result<Option<String>, LlmError> {
        loop {
            while let Some(ev) = self.pending.pop_front() {
                match ev {
                    LlmEvent::Content(t) => return Ok(Some(t)),
                    LlmEvent::Usage(u) => self.usage = Some(u),
                    LlmEvent::Finish(r) => self.finish_reason = Some(r),
                    LlmEvent::Done => {
                        self.done = true;
                        if let Some(mut resp) = self.response.take() {
                            // Nothing more is needed; read the body's end off the
                            // request path so the connection returns to the pool.
                            tokio::spawn(async move {
                                let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
                                    while let Ok(Some(_)) = resp.chunk().await {}
                                })
                                .await;
                            });
                        }
                    }
                }
                if self.done {
                    self.pending.clear();
                }
            }
            if self.done {
                return Ok(None);
            }
            if let Some(e) = self.error.take() {
                self.response = None;
                return Err(e);
            }
            if self.eof {
                // Ended without [DONE]: whole if the model said why it stopped
                // (the usage chunk may be lost, the text is not), otherwise cut short.
                if self.finish_reason.is_some() {
                    self.done = true;
                    self.response = None;
                    return Ok(None);
                }
                self.response = None;
                return Err(LlmError::Interrupted(
                    "stream ended before the reply was complete".into(),
                ));
            }
            let (at, kind) = match deadline {
                Some((d, k)) if d < self.total => (d, k),
                Some(_) => (self.total, TimeoutKind::Total),
                None => {
                    let idle = Instant::now() + self.idle;
                    if idle < self.total {
                        (idle, TimeoutKind::Idle)
                    } else {
                        (self.total, TimeoutKind::Total)
                    }
                }
            };
            let Some(resp) = self.response.as_mut() else {
                return Ok(None);
            };
            let chunk = match timeout_at(at, resp.chunk()).await {
                Err(_) => return Err(LlmError::Timeout(kind)),
                Ok(Err(e)) => return Err(LlmError::Interrupted(error_chain(&e))),
                Ok(Ok(c)) => c,
            };
            let mut scratch = std::mem::take(&mut self.scratch);
            let r = match &chunk {
                Some(b) => self.decoder.feed(b, &mut scratch, false),
                None => {
                    self.eof = true;
                    self.decoder.feed(&[], &mut scratch, true)
                }
            };
            // Text decoded before a failure in the same read still goes out first.
            self.pending.extend(scratch.drain(..));
            self.scratch = scratch;
            if let Err(e) = r {
                self.error = Some(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_and_retryability() {
        let status = |code, message: &str| LlmError::Status {
            code,
            message: message.into(),
            retry_after: None,
            should_retry: None,
        };
        assert!(status(429, "slow down").retryable());
        assert!(!status(429, "You exceeded your current quota (insufficient_quota)").retryable());
        assert!(status(503, "Loading model").retryable());
        assert!(!status(400, "too long").retryable());
        assert!(LlmError::Connect("refused".into()).retryable());
        assert!(!LlmError::Timeout(TimeoutKind::FirstToken).retryable());
        let forced = LlmError::Status {
            code: 500,
            message: String::new(),
            retry_after: None,
            should_retry: Some(false),
        };
        assert!(!forced.retryable());
        assert_eq!(LlmError::Timeout(TimeoutKind::Idle).kind(), "timeout_idle");
    }

    #[test]
    fn decoders_follow_the_content_type() {
        let mut out = Vec::new();
        let mut d = Decoder::for_response("application/json", LlmProtocol::Openai);
        d.feed(
            br#"{"choices":[{"index":0,"message":{"content":"whole"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
            &mut out,
            false,
        )
        .unwrap();
        d.feed(&[], &mut out, true).unwrap();
        assert_eq!(out[0], LlmEvent::Content("whole".into()));
        assert_eq!(out.last(), Some(&LlmEvent::Done));
        let mut out = Vec::new();
        let mut d = Decoder::for_response("application/x-ndjson", LlmProtocol::Openai);
        d.feed(b"{\"message\":{\"content\":\"a\"}}\n", &mut out, false)
            .unwrap();
        assert_eq!(out, [LlmEvent::Content("a".into())]);
    }
}
