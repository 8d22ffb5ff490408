//! One simulated chat user (the `chat` and `soak` scenarios): on an authenticated
//! connection it sends `chat.send`, follows the stream (`ack`, `chat.chunk` seq 0..,
//! then `chat.complete` or `chat.error`), waits (think time, or an open-loop schedule)
//! and sends again, in one session per user. Every stream's ack, first-chunk and
//! complete latencies, its chunk sequence (gaps, duplicates, and whether the chunks add
//! up to the completed text) and every way it can fail are recorded into mergeable
//! [`ChatTallies`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

use crate::client::{self, Failure, Stage, Ws};
use crate::clock::Clock;
use crate::stats::{EventSeries, GapSummary, GaugeSeries, Histogram, HistogramSeries};
use crate::stats::{OffsetTracker, Shards, Tally};
use crate::stats::{bump, drop_one};
use crate::target;

/// Path of mock-llm's description of itself (first-token delay, token rate).
pub const STUB_CONFIG_PATH: &str = "/stub/config";
/// Deadline for reading the stub's configuration.
const STUB_CONFIG_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest stub configuration read.
const MAX_STUB_CONFIG_BYTES: usize = 64 * 1024;
/// Frames of our stream that may arrive before its `ack` (the worker can be faster
/// than the gateway's ack): kept until the ack names the request; more are stray.
const MAX_EARLY_FRAMES: usize = 256;
/// Chunks of one stream kept to compare with the completed text; a longer stream is
/// checked for gaps only.
const MAX_KEPT_CHUNKS: usize = 4096;
/// Longest wait a `RATE_LIMITED` answer can impose on a user: the gateway's window is
/// one minute.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// A scheduled message sent later than this (its user was still streaming) is late.
const LATE_MS: u64 = 100;
/// Key of the chunk-sequence tracker (one stream, one sequence).
const SEQ: &str = "seq";
/// Error code the gateway answers when a user sends too fast.
const RATE_LIMITED: &str = "RATE_LIMITED";

/// What the LLM stub was told to do, so that the chat path's own share of the latency
/// can be told apart from the model's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LlmTiming {
    /// The stub's delay before its first token, ms.
    pub first_token_ms: u64,
    /// From the stub's first token to its last, ms.
    pub stream_ms: u64,
}

impl LlmTiming {
    /// From the first token's request to the last token: what a stream takes with no
    /// chat-path overhead at all.
    pub fn expected_ms(&self) -> u64 {
        self.first_token_ms + self.stream_ms
    }

    /// Reads mock-llm's `GET /stub/config` at the server root of `url` (its OpenAI
    /// base URL or its root; loopback only).
    pub async fn from_stub(url: &str) -> Result<LlmTiming> {
        let mut u = target::check_http_url("--llm-stub", url)?;
        u.set_path(STUB_CONFIG_PATH);
        u.set_query(None);
        let client = reqwest::Client::builder()
            .timeout(STUB_CONFIG_TIMEOUT)
            .no_proxy()
            .build()
            .context("building the HTTP client")?;
        let response = client
            .get(u.clone())
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .with_context(|| format!("--llm-stub: GET {u}"))?;
        let body = response
            .bytes()
            .await
            .with_context(|| format!("--llm-stub: reading {u}"))?;
        if body.len() > MAX_STUB_CONFIG_BYTES {
            bail!("--llm-stub: {u} answered more than {MAX_STUB_CONFIG_BYTES} bytes");
        }
        serde_json::from_slice(&body).with_context(|| {
            format!("--llm-stub: {u} did not describe a stub (first_token_ms, stream_ms)")
        })
    }
}

/// When users send.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pacing {
    /// Each user waits about this long (uniformly 0.5x to 1.5x) after a stream ends.
    Think(Duration),
    /// An open-loop schedule of this many streams per second over all users: stream
    /// `j` is due `j / rate` seconds into the window and goes to user `j mod users`;
    /// a user still streaming sends late.
    Rate(f64),
}

/// How every chat user of a run behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    pub pacing: Pacing,
    /// Chat users in the run (over every worker).
    pub users: u64,
    /// Connection index of chat user 0 (chat users come after subscribers).
    pub first_index: u64,
    /// With [`Pacing::Think`], first messages are spread evenly over this, so that
    /// users do not move in lockstep.
    pub ramp: Duration,
    /// Messages per user; `None`: until the window ends.
    pub messages: Option<u64>,
    /// Size of each `chat.send` message, bytes.
    pub message_bytes: usize,
    /// Longest wait for the `ack`, the first chunk, and between frames of a stream.
    pub timeout: Duration,
    pub llm: Option<LlmTiming>,
}

impl Settings {
    /// When user `u` sends its first message, from the window's start.
    fn first_due(&self, u: u64) -> Duration {
        match self.pacing {
            Pacing::Think(_) => self.ramp.mul_f64(u as f64 / self.users.max(1) as f64),
            Pacing::Rate(rate) => Duration::from_secs_f64(u as f64 / rate),
        }
    }

    /// When user `u` sends message `k` (0-based) under a rate schedule, from the
    /// window's start.
    fn scheduled(&self, u: u64, k: u64, rate: f64) -> Duration {
        let j = u as f64 + k as f64 * self.users.max(1) as f64;
        Duration::from_secs_f64(j / rate)
    }
}

/// The text of a `chat.send` message of `bytes` bytes (at least one character).
pub fn message_text(bytes: usize) -> String {
    const HEAD: &str = "load test message ";
    let mut s: String = HEAD.chars().take(bytes.max(1)).collect();
    s.extend(std::iter::repeat_n('x', bytes.saturating_sub(s.len())));
    s
}

/// A `chat.send` frame with a numeric `id` (echoed by its `ack` or `error`).
pub fn send_frame(id: u64, message: &str, session_id: Option<&str>) -> String {
    let mut frame = serde_json::json!({"type": "chat.send", "id": id, "message": message});
    if let Some(s) = session_id {
        frame["session_id"] = serde_json::Value::from(s);
    }
    frame.to_string()
}

/// A deterministic number in [0, 1) from `seed` (splitmix64): think-time jitter
/// without a random-number dependency, and the same in every run.
fn unit(seed: u64) -> f64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

// === what is measured ===

/// Live counters of a worker's chat users.
#[derive(Debug, Default)]
pub struct Counters {
    pub in_flight: AtomicU64,
    pub sent: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    /// Users whose conversation is over (messages done, connection lost or never
    /// made).
    pub finished_users: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> ChatProgress {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ChatProgress {
            in_flight: get(&self.in_flight),
            sent: get(&self.sent),
            completed: get(&self.completed),
            failed: get(&self.failed),
            finished_users: get(&self.finished_users),
            window: None,
        }
    }
}

/// A worker's chat counters, about once a second.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatProgress {
    pub in_flight: u64,
    pub sent: u64,
    pub completed: u64,
    pub failed: u64,
    pub finished_users: u64,
    /// First-chunk latency in the last complete one-second slot: `(slot, histogram)`.
    pub window: Option<(u64, Histogram)>,
}

impl ChatProgress {
    /// Adds another worker's counters (not its window).
    pub fn add(&mut self, o: &ChatProgress) {
        self.in_flight += o.in_flight;
        self.sent += o.sent;
        self.completed += o.completed;
        self.failed += o.failed;
        self.finished_users += o.finished_users;
    }
}

/// Everything measured about chat streams; merged across users and workers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatTallies {
    /// `chat.send` frames sent.
    pub sent: u64,
    pub acked: u64,
    /// Streams that ended with `chat.complete`.
    pub completed: u64,
    /// Streams that ended any other way (refused, `chat.error`, timeout, connection
    /// lost), by reason in `errors`.
    pub failed: u64,
    pub errors: Tally,
    /// Streams still running when the run ended (neither failed nor completed).
    pub unfinished: u64,
    /// `chat.send` to `ack`, microseconds.
    pub ack_us: Histogram,
    /// `chat.send` to the first `chat.chunk`, microseconds, per one-second slot.
    pub first_chunk_us: HistogramSeries,
    /// `chat.send` to `chat.complete`, microseconds.
    pub complete_us: Histogram,
    /// With the stub's timing known: first-chunk latency minus its first-token delay,
    /// and complete latency minus its first-token delay and token stream,
    /// microseconds (recorded directly, so that the overhead keeps the histogram's
    /// 0.4 % precision of its own size, not of the whole latency's).
    pub first_overhead_us: Histogram,
    pub complete_overhead_us: Histogram,
    /// First chunks that came sooner than the stub's configured first-token delay
    /// (the configured delay is wrong, or the stub was restarted with another).
    pub early: u64,
    /// Chunk sequences of finished streams: one stream each, seq 0 up to the highest.
    pub chunks: GapSummary,
    /// Completed streams whose chunks, without a gap or duplicate, did not add up to
    /// the `chat.complete` text.
    pub content_mismatches: u64,
    /// Chat frames for no stream of ours (late frames of a stream that timed out).
    pub stray_frames: u64,
    /// Scheduled sends that went out over 100 ms late (the user was still streaming).
    pub late: u64,
    pub max_lag_ms: u64,
    pub sent_series: EventSeries,
    pub completed_series: EventSeries,
    pub failed_series: EventSeries,
    /// Streams in flight, sampled at each second.
    pub in_flight: GaugeSeries,
}

impl ChatTallies {
    pub fn merge(&mut self, o: &ChatTallies) {
        self.sent += o.sent;
        self.acked += o.acked;
        self.completed += o.completed;
        self.failed += o.failed;
        self.errors.merge(&o.errors);
        self.unfinished += o.unfinished;
        self.ack_us.merge(&o.ack_us);
        self.first_chunk_us.merge(&o.first_chunk_us);
        self.complete_us.merge(&o.complete_us);
        self.first_overhead_us.merge(&o.first_overhead_us);
        self.complete_overhead_us.merge(&o.complete_overhead_us);
        self.early += o.early;
        self.chunks.merge(&o.chunks);
        self.content_mismatches += o.content_mismatches;
        self.stray_frames += o.stray_frames;
        self.late += o.late;
        self.max_lag_ms = self.max_lag_ms.max(o.max_lag_ms);
        self.sent_series.merge(&o.sent_series);
        self.completed_series.merge(&o.completed_series);
        self.failed_series.merge(&o.failed_series);
        self.in_flight.merge(&o.in_flight);
    }

    /// Records a failed stream.
    pub fn fail(&mut self, at_ms: u64, reason: &str) {
        self.failed += 1;
        self.errors.add(reason, 1);
        self.failed_series.record(at_ms, 1);
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

// === the conversation ===

/// The fields of a server frame a chat user looks at.
#[derive(Debug, Deserialize)]
struct ChatFrame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    retry_after_ms: Option<u64>,
}

/// What a stream is waiting for, for its timeout's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Ack,
    FirstChunk,
    NextFrame,
}

impl Wait {
    fn timeout_reason(self) -> &'static str {
        match self {
            Wait::Ack => "timeout: waiting for ack",
            Wait::FirstChunk => "timeout: waiting for the first chunk",
            Wait::NextFrame => "timeout: stream stalled",
        }
    }
}

/// How one stream ended.
#[derive(Debug, PartialEq)]
enum StreamEnd {
    /// Completed, or failed with the connection still usable.
    Over,
    /// Refused `RATE_LIMITED`: the next message waits this long.
    RetryAfter(Duration),
    /// The run ended first.
    Aborted,
    /// The connection ended.
    Lost(Failure),
}

/// One stream in progress.
struct Stream {
    id: u64,
    started: Instant,
    request_id: Option<String>,
    wait: Wait,
    seqs: OffsetTracker,
    parts: BTreeMap<u64, String>,
    /// More chunks than [`MAX_KEPT_CHUNKS`]: the text is not compared.
    overflow: bool,
    early: Vec<String>,
}

/// One chat user and what it records into.
pub struct User<'a> {
    /// Connection index (chat users are numbered after the subscribers).
    pub index: u64,
    pub settings: &'a Settings,
    pub clock: Clock,
    pub counters: &'a Counters,
    pub tallies: &'a Shards<ChatTallies>,
}

impl User<'_> {
    fn record<R>(&self, f: impl FnOnce(&mut ChatTallies) -> R) -> R {
        self.tallies.with(self.index, f)
    }

    fn fail(&self, reason: &str) {
        bump(&self.counters.failed);
        let at = self.clock.now_ms();
        self.record(|t| t.fail(at, reason));
    }

    /// Chats from `window` (an instant) until `stop_sending` (the stream in flight
    /// is finished first), its messages are sent, or `stop` (the stream in flight is
    /// abandoned). The failure if the server ended the connection.
    pub async fn converse(
        &self,
        ws: &mut Ws,
        window: Instant,
        stop_sending: &CancellationToken,
        stop: &CancellationToken,
    ) -> Result<(), Failure> {
        let s = self.settings;
        let u = self.index.saturating_sub(s.first_index);
        let text = message_text(s.message_bytes);
        let mut session: Option<String> = None;
        let mut error_code: Option<String> = None;
        let mut k = 0u64;
        let mut due = window + s.first_due(u);
        loop {
            if s.messages.is_some_and(|m| k >= m) || stop_sending.is_cancelled() {
                break;
            }
            tokio::select! {
                biased;
                () = stop_sending.cancelled() => break,
                () = tokio::time::sleep_until(due) => {}
                msg = ws.next() => {
                    if let Some(f) = self.between_streams(msg, &mut error_code) {
                        return Err(f);
                    }
                    continue;
                }
            }
            if let Pacing::Rate(_) = s.pacing {
                let lag_ms = u64::try_from(due.elapsed().as_millis()).unwrap_or(u64::MAX);
                self.record(|t| {
                    t.max_lag_ms = t.max_lag_ms.max(lag_ms);
                    if lag_ms > LATE_MS {
                        t.late += 1;
                    }
                });
            }
            let frame = send_frame(k, &text, session.as_deref());
            let end = self
                .stream(ws, k, frame, &mut session, &mut error_code, stop)
                .await;
            k += 1;
            let now = Instant::now();
            let next = match s.pacing {
                Pacing::Think(think) => now + think.mul_f64(0.5 + unit(self.index ^ (k << 32))),
                Pacing::Rate(rate) => window + s.scheduled(u, k, rate),
            };
            due = match end {
                StreamEnd::Over => next,
                StreamEnd::RetryAfter(wait) => next.max(now + wait),
                StreamEnd::Aborted => return Ok(()),
                StreamEnd::Lost(f) => return Err(f),
            };
        }
        Ok(())
    }

    /// A frame between streams: chat frames are stray; the failure if the connection
    /// ended.
    fn between_streams(
        &self,
        msg: Option<Result<Message, WsError>>,
        error_code: &mut Option<String>,
    ) -> Option<Failure> {
        if let Some(Ok(Message::Text(text))) = &msg
            && let Ok(f) = serde_json::from_str::<ChatFrame>(text.as_str())
            && f.kind.starts_with("chat.")
        {
            self.record(|t| t.stray_frames += 1);
            return None;
        }
        client::ended(msg, Stage::Chatting, error_code)
    }

    /// Sends one message and follows its stream to the end.
    async fn stream(
        &self,
        ws: &mut Ws,
        id: u64,
        frame: String,
        session: &mut Option<String>,
        error_code: &mut Option<String>,
        stop: &CancellationToken,
    ) -> StreamEnd {
        let c = self.counters;
        let started = Instant::now();
        let at = self.clock.now_ms();
        bump(&c.sent);
        bump(&c.in_flight);
        self.record(|t| {
            t.sent += 1;
            t.sent_series.record(at, 1);
        });
        let end = match ws.send(Message::text(frame)).await {
            Err(e) => {
                let f = Failure::from_ws(e, Stage::Chatting, error_code.take());
                self.fail(&format!("connection lost: {f}"));
                StreamEnd::Lost(f)
            }
            Ok(()) => {
                let mut st = Stream {
                    id,
                    started,
                    request_id: None,
                    wait: Wait::Ack,
                    seqs: OffsetTracker::new(),
                    parts: BTreeMap::new(),
                    overflow: false,
                    early: Vec::new(),
                };
                st.seqs.expect(SEQ, Some(0), None);
                self.follow(ws, &mut st, session, error_code, stop).await
            }
        };
        drop_one(&c.in_flight);
        end
    }

    /// Reads until the stream ends.
    async fn follow(
        &self,
        ws: &mut Ws,
        st: &mut Stream,
        session: &mut Option<String>,
        error_code: &mut Option<String>,
        stop: &CancellationToken,
    ) -> StreamEnd {
        let timeout = self.settings.timeout;
        let mut deadline = st.started + timeout;
        loop {
            let msg = tokio::select! {
                biased;
                () = stop.cancelled() => {
                    self.record(|t| t.unfinished += 1);
                    return StreamEnd::Aborted;
                }
                () = tokio::time::sleep_until(deadline) => {
                    self.fail(st.wait.timeout_reason());
                    return StreamEnd::Over;
                }
                msg = ws.next() => msg,
            };
            let text = match msg {
                Some(Ok(Message::Text(text))) => text,
                other => match client::ended(other, Stage::Chatting, error_code) {
                    Some(f) => {
                        self.fail(&format!("connection lost: {f}"));
                        return StreamEnd::Lost(f);
                    }
                    None => continue,
                },
            };
            let Ok(frame) = serde_json::from_str::<ChatFrame>(text.as_str()) else {
                continue;
            };
            if let Some(end) = self.on_frame(st, frame, text.as_str(), session, error_code) {
                return end;
            }
            if st.wait != Wait::Ack {
                // Every frame of the stream resets its stall deadline.
                deadline = Instant::now() + timeout;
            }
        }
    }

    /// One frame during a stream; `Some` when it ends the stream.
    fn on_frame(
        &self,
        st: &mut Stream,
        f: ChatFrame,
        raw: &str,
        session: &mut Option<String>,
        error_code: &mut Option<String>,
    ) -> Option<StreamEnd> {
        let ours = f.id.as_ref().and_then(serde_json::Value::as_u64) == Some(st.id);
        match f.kind.as_str() {
            "ack" if ours && st.wait == Wait::Ack => {
                let latency = st.started.elapsed();
                let Some(request_id) = f.request_id else {
                    self.fail("protocol: ack without request_id");
                    return Some(StreamEnd::Over);
                };
                if f.session_id.is_some() {
                    *session = f.session_id;
                }
                self.record(|t| {
                    t.acked += 1;
                    t.ack_us.record(micros(latency));
                });
                st.request_id = Some(request_id);
                st.wait = Wait::FirstChunk;
                // Frames of this request that overtook the ack.
                for early in std::mem::take(&mut st.early) {
                    if let Ok(frame) = serde_json::from_str::<ChatFrame>(&early)
                        && let Some(end) = self.on_frame(st, frame, &early, session, error_code)
                    {
                        return Some(end);
                    }
                }
                None
            }
            "error" if ours && st.wait == Wait::Ack => {
                let code = f.code.unwrap_or_else(|| "UNKNOWN".to_owned());
                self.fail(&format!("send refused: {code}"));
                if code == RATE_LIMITED {
                    let wait = Duration::from_millis(f.retry_after_ms.unwrap_or(0));
                    return Some(StreamEnd::RetryAfter(wait.min(MAX_RETRY_AFTER)));
                }
                Some(StreamEnd::Over)
            }
            "error" => {
                *error_code = f.code;
                None
            }
            "chat.chunk" | "chat.complete" | "chat.error" => {
                match (&st.request_id, &f.request_id) {
                    (None, Some(_)) if st.early.len() < MAX_EARLY_FRAMES => {
                        st.early.push(raw.to_owned());
                        None
                    }
                    (Some(mine), Some(theirs)) if mine == theirs => self.on_chat(st, f),
                    _ => {
                        self.record(|t| t.stray_frames += 1);
                        None
                    }
                }
            }
            _ => None,
        }
    }

    /// A chat frame of our request.
    fn on_chat(&self, st: &mut Stream, f: ChatFrame) -> Option<StreamEnd> {
        match f.kind.as_str() {
            "chat.chunk" => {
                let seq = f.seq.unwrap_or(u64::MAX);
                if st.wait == Wait::FirstChunk {
                    let latency = st.started.elapsed();
                    let at = self.clock.now_ms();
                    let stub = self
                        .settings
                        .llm
                        .map(|l| Duration::from_millis(l.first_token_ms));
                    self.record(|t| {
                        t.first_chunk_us.record(at, micros(latency));
                        if let Some(stub) = stub {
                            t.early += u64::from(latency < stub);
                            t.first_overhead_us
                                .record(micros(latency.saturating_sub(stub)));
                        }
                    });
                    st.wait = Wait::NextFrame;
                }
                st.seqs.record(SEQ, seq);
                if st.parts.len() < MAX_KEPT_CHUNKS {
                    st.parts.insert(seq, f.content.unwrap_or_default());
                } else {
                    st.overflow = true;
                }
                None
            }
            "chat.complete" => {
                let latency = st.started.elapsed();
                let at = self.clock.now_ms();
                let gaps = st.seqs.summary();
                let checkable = gaps.missing == 0 && gaps.duplicates == 0 && !st.overflow;
                let mismatch = checkable && {
                    let joined: String = st.parts.values().map(String::as_str).collect();
                    joined != f.content.unwrap_or_default()
                };
                bump(&self.counters.completed);
                let stub = self
                    .settings
                    .llm
                    .map(|l| Duration::from_millis(l.expected_ms()));
                self.record(|t| {
                    t.completed += 1;
                    t.completed_series.record(at, 1);
                    t.complete_us.record(micros(latency));
                    if let Some(stub) = stub {
                        t.complete_overhead_us
                            .record(micros(latency.saturating_sub(stub)));
                    }
                    t.chunks.merge(&gaps);
                    t.content_mismatches += u64::from(mismatch);
                });
                Some(StreamEnd::Over)
            }
            _ => {
                let code = f.code.unwrap_or_else(|| "UNKNOWN".to_owned());
                let gaps = st.seqs.summary();
                self.record(|t| t.chunks.merge(&gaps));
                self.fail(&format!("chat.error {code}"));
                Some(StreamEnd::Over)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pacing: Pacing) -> Settings {
        Settings {
            pacing,
            users: 4,
            first_index: 10,
            ramp: Duration::from_secs(2),
            messages: None,
            message_bytes: 64,
            timeout: Duration::from_secs(1),
            llm: None,
        }
    }

    #[test]
    fn frames_and_messages_are_well_formed() {
        assert_eq!(message_text(64).len(), 64);
        assert_eq!(message_text(0), "l");
        assert_eq!(message_text(5), "load ");
        let f: serde_json::Value = serde_json::from_str(&send_frame(7, "hi", None)).unwrap();
        assert_eq!(
            f,
            serde_json::json!({"type": "chat.send", "id": 7, "message": "hi"})
        );
        let f: serde_json::Value =
            serde_json::from_str(&send_frame(8, "a\"b", Some("s-1"))).unwrap();
        assert_eq!(f["session_id"], "s-1");
        assert_eq!(f["message"], "a\"b");
    }

    #[test]
    fn schedules_spread_users() {
        let s = settings(Pacing::Think(Duration::from_millis(500)));
        assert_eq!(s.first_due(0), Duration::ZERO);
        assert_eq!(s.first_due(2), Duration::from_secs(1));
        let s = settings(Pacing::Rate(8.0));
        // Stream j = u + 4k is due at j / 8 s.
        assert_eq!(s.first_due(3), Duration::from_millis(375));
        assert_eq!(s.scheduled(1, 2, 8.0), Duration::from_millis(1125));
        let jitters: Vec<f64> = (0..1000).map(unit).collect();
        assert!(jitters.iter().all(|j| (0.0..1.0).contains(j)));
        let mean = jitters.iter().sum::<f64>() / 1000.0;
        assert!((0.45..0.55).contains(&mean), "{mean}");
    }

    #[test]
    fn tallies_merge_and_survive_the_pipe() {
        let mut a = ChatTallies {
            sent: 3,
            acked: 2,
            ..ChatTallies::default()
        };
        a.fail(1_500, "chat.error UNAVAILABLE");
        a.first_chunk_us.record(1_200, 250_000);
        a.in_flight.sample(0, 3);
        let mut b = ChatTallies {
            sent: 1,
            completed: 1,
            max_lag_ms: 40,
            ..ChatTallies::default()
        };
        b.fail(2_100, "timeout: waiting for ack");
        b.complete_us.record(1_000_000);
        b.in_flight.sample(0, 2);
        a.merge(&b);
        assert_eq!((a.sent, a.acked, a.completed, a.failed), (4, 2, 1, 2));
        assert_eq!(a.errors.get("timeout: waiting for ack"), 1);
        assert_eq!(a.failed_series.counts(), &[0, 1, 1]);
        assert_eq!(a.in_flight.levels(), vec![5]);
        assert_eq!(a.max_lag_ms, 40);
        let back: ChatTallies = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back.first_chunk_us, a.first_chunk_us);
        assert_eq!(back.errors, a.errors);
    }

    #[test]
    fn progress_adds_up() {
        let c = Counters::default();
        bump(&c.sent);
        bump(&c.in_flight);
        let mut p = c.snapshot();
        p.add(&c.snapshot());
        assert_eq!((p.sent, p.in_flight, p.completed), (2, 2, 0));
    }
}
