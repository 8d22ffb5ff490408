//! The `broadcast` publisher: publications on an open-loop schedule (publication j
//! is due at `j / rate` seconds, to channel `j mod C`), sent through `POST /v1/publish`
//! over a few keep-alive HTTP/1.1 connections, or as `publish` frames pipelined on a
//! few authenticated WebSocket connections. Each publication's `data` carries its send
//! time; its acknowledgement carries the channel offset, so that subscribers can be
//! told which offsets they should have received.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::PublishVia;
use crate::client;
use crate::clock::Clock;
use crate::payload;
use crate::stats::{EventSeries, Histogram, Tally};
use crate::target::{self, Target};
use crate::tokens::TokenSource;

/// Publications pipelined on one WebSocket publisher before it waits for acks: the
/// gateway handles a connection's frames one after the other, so a deeper pipeline
/// only queues in its socket buffer.
pub const CLIENT_WINDOW: usize = 64;
/// Largest acknowledgement body read from `POST /v1/publish` (`{"offset":N}`).
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Path of the publish endpoint under `--api-url`.
const PUBLISH_PATH: &str = "/v1/publish";

/// The publish endpoint for an `--api-url` (a base URL, or the endpoint itself).
pub fn publish_url(base: &str) -> Result<reqwest::Url> {
    let mut url = target::check_http_url("--api-url", base)?;
    if !url.path().ends_with(PUBLISH_PATH) {
        let path = format!("{}{PUBLISH_PATH}", url.path().trim_end_matches('/'));
        url.set_path(&path);
    }
    Ok(url)
}

/// How publications leave.
#[derive(Clone)]
pub enum Route {
    Api {
        urls: Vec<reqwest::Url>,
        key: String,
    },
    Client {
        targets: Vec<Target>,
        tokens: TokenSource,
        /// Token index of the first publisher connection (after the subscribers').
        first_token: u64,
    },
}

impl Route {
    pub fn via(&self) -> PublishVia {
        match self {
            Route::Api { .. } => PublishVia::Api,
            Route::Client { .. } => PublishVia::Client,
        }
    }
}

/// What to publish.
#[derive(Clone)]
pub struct Schedule {
    pub route: Route,
    pub channels: Vec<String>,
    pub rate: f64,
    pub duration: Duration,
    pub payload_bytes: usize,
    pub publishers: u32,
    /// Deadline of one request (HTTP) or of an ack once sent (client), and of a
    /// publisher connection's handshake.
    pub timeout: Duration,
}

/// Live counters for the progress line.
#[derive(Debug, Default)]
pub struct Live {
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub failed: AtomicU64,
}

/// Everything the publisher measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PublishTallies {
    /// Publications the schedule asked for within the duration.
    pub scheduled: u64,
    pub sent: u64,
    pub acked: u64,
    pub failed: u64,
    pub failures: Tally,
    /// Send to acknowledgement (HTTP answer or `ack` frame), microseconds.
    pub ack_latency_us: Histogram,
    pub sent_series: EventSeries,
    pub acked_series: EventSeries,
    /// Per channel index: lowest and highest acknowledged offset, and how many.
    pub channel_first: Vec<Option<u64>>,
    pub channel_last: Vec<Option<u64>>,
    pub channel_acked: Vec<u64>,
    /// Run-epoch milliseconds of the first and last send.
    pub first_sent_ms: Option<u64>,
    pub last_sent_ms: Option<u64>,
    /// Most the sends fell behind their schedule (all publisher connections busy).
    pub max_lag_ms: u64,
    /// Publications sent more than 100 ms after they were due.
    pub late: u64,
    /// WebSocket publisher connections the gateway ended, by reason.
    pub connection_ends: Tally,
}

/// Lag beyond which a publication counts as late.
const LATE_MS: u64 = 100;

impl PublishTallies {
    fn new(channels: usize) -> PublishTallies {
        PublishTallies {
            channel_first: vec![None; channels],
            channel_last: vec![None; channels],
            channel_acked: vec![0; channels],
            ..PublishTallies::default()
        }
    }

    fn sent(&mut self, at_ms: u64) {
        self.sent += 1;
        self.sent_series.record(at_ms, 1);
        self.first_sent_ms.get_or_insert(at_ms);
        self.last_sent_ms = Some(at_ms);
    }

    fn acked(&mut self, at_ms: u64, channel: usize, offset: u64, latency: Duration) {
        self.acked += 1;
        self.acked_series.record(at_ms, 1);
        self.ack_latency_us
            .record(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
        if let Some(first) = self.channel_first.get_mut(channel) {
            *first = Some(first.map_or(offset, |f| f.min(offset)));
        }
        if let Some(last) = self.channel_last.get_mut(channel) {
            *last = Some(last.map_or(offset, |l| l.max(offset)));
        }
        if let Some(n) = self.channel_acked.get_mut(channel) {
            *n += 1;
        }
    }

    fn failed(&mut self, reason: &str) {
        self.failed += 1;
        self.failures.add(reason, 1);
    }
}

/// State shared by the scheduler and the senders.
struct Shared {
    clock: Clock,
    live: Arc<Live>,
    tallies: Mutex<PublishTallies>,
    payload_bytes: usize,
}

impl Shared {
    fn with<T>(&self, f: impl FnOnce(&mut PublishTallies) -> T) -> T {
        let mut t = self.tallies.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut t)
    }

    fn record_sent(&self) {
        self.live.sent.fetch_add(1, Ordering::Relaxed);
        let at = self.clock.now_ms();
        self.with(|t| t.sent(at));
    }

    fn record_ack(&self, channel: usize, offset: u64, latency: Duration) {
        self.live.acked.fetch_add(1, Ordering::Relaxed);
        let at = self.clock.now_ms();
        self.with(|t| t.acked(at, channel, offset, latency));
    }

    fn record_failure(&self, reason: &str) {
        self.live.failed.fetch_add(1, Ordering::Relaxed);
        self.with(|t| t.failed(reason));
    }
}

/// One publication on its way.
struct Job {
    index: u64,
    channel: usize,
    _permit: OwnedSemaphorePermit,
}

/// Runs the schedule to its end (or `stop`), waits for the answers (each bounded by
/// the schedule's timeout), and returns what happened.
pub async fn run(
    schedule: Schedule,
    clock: Clock,
    live: Arc<Live>,
    stop: CancellationToken,
) -> Result<PublishTallies> {
    if !(schedule.rate.is_finite() && schedule.rate > 0.0) {
        bail!("the publication rate must be positive");
    }
    if schedule.channels.is_empty() || schedule.publishers == 0 {
        bail!("nothing to publish to");
    }
    let shared = Arc::new(Shared {
        clock,
        live,
        tallies: Mutex::new(PublishTallies::new(schedule.channels.len())),
        payload_bytes: schedule.payload_bytes,
    });
    let channels: Arc<[String]> = schedule.channels.clone().into();
    let publishers = schedule.publishers as usize;
    let tracker = TaskTracker::new();
    let (permits, senders) = match &schedule.route {
        Route::Api { urls, key } => {
            let client = reqwest::Client::builder()
                .no_proxy() // loopback only, never via a proxy from the environment
                .http1_only()
                .tcp_nodelay(true)
                .pool_max_idle_per_host(publishers)
                .timeout(schedule.timeout)
                .build()
                .context("building the HTTP client")?;
            let api = Arc::new(Api {
                client,
                urls: urls.clone(),
                key: key.clone(),
            });
            (Semaphore::new(publishers), Senders::Api(api))
        }
        Route::Client {
            targets,
            tokens,
            first_token,
        } => {
            let mut txs = Vec::new();
            for p in 0..publishers {
                let target = targets[p % targets.len()].clone();
                let token = tokens
                    .token_for(first_token + p as u64)
                    .context("a publisher's token")?;
                let ws = client::connect(&target, None, &token, schedule.timeout)
                    .await
                    .map_err(|f| anyhow::anyhow!("publisher connection {p}: {f}"))?;
                let (tx, rx) = mpsc::channel::<Job>(CLIENT_WINDOW);
                tracker.spawn(client_publisher(
                    ws.ws,
                    rx,
                    Arc::clone(&shared),
                    Arc::clone(&channels),
                    schedule.timeout,
                ));
                txs.push(tx);
            }
            (
                Semaphore::new(publishers * CLIENT_WINDOW),
                Senders::Client(txs),
            )
        }
    };
    let permits = Arc::new(permits);

    let start = Instant::now();
    let mut index = 0u64;
    loop {
        let due_in = Duration::from_secs_f64(index as f64 / schedule.rate);
        if due_in >= schedule.duration {
            break;
        }
        let due = start + due_in;
        tokio::select! {
            () = tokio::time::sleep_until(due) => {}
            () = stop.cancelled() => break,
        }
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = stop.cancelled() => break,
        };
        let lag_ms = u64::try_from(due.elapsed().as_millis()).unwrap_or(u64::MAX);
        shared.with(|t| {
            t.scheduled += 1;
            t.max_lag_ms = t.max_lag_ms.max(lag_ms);
            if lag_ms > LATE_MS {
                t.late += 1;
            }
        });
        let job = Job {
            index,
            channel: (index % channels.len() as u64) as usize,
            _permit: permit,
        };
        match &senders {
            Senders::Api(api) => {
                let api = Arc::clone(api);
                let shared = Arc::clone(&shared);
                let channel = channels[job.channel].clone();
                tracker.spawn(async move { api.publish(job, &channel, &shared).await });
            }
            Senders::Client(txs) => {
                let tx = &txs[(index % txs.len() as u64) as usize];
                if tx.send(job).await.is_err() {
                    shared.record_failure("not sent: its publisher connection had ended");
                }
            }
        }
        index += 1;
    }
    // The schedule is over: connections finish what they have in flight and end.
    drop(senders);
    tracker.close();
    tracker.wait().await;
    let tallies = shared.with(std::mem::take);
    Ok(tallies)
}

enum Senders {
    Api(Arc<Api>),
    Client(Vec<mpsc::Sender<Job>>),
}

struct Api {
    client: reqwest::Client,
    urls: Vec<reqwest::Url>,
    key: String,
}

#[derive(serde::Deserialize)]
struct OffsetAnswer {
    offset: u64,
}

#[derive(serde::Deserialize)]
struct ErrorAnswer {
    error: ErrorDetail,
}

#[derive(serde::Deserialize)]
struct ErrorDetail {
    code: String,
}

impl Api {
    async fn publish(&self, job: Job, channel: &str, shared: &Shared) {
        let url = self.urls[(job.index % self.urls.len() as u64) as usize].clone();
        let data = payload::data(payload::unix_micros(), shared.payload_bytes);
        let body = payload::api_body(channel, &data);
        let started = Instant::now();
        let request = self
            .client
            .post(url)
            .bearer_auth(&self.key)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send();
        shared.record_sent();
        let outcome = match request.await {
            Err(e) => Err(http_error(&e)),
            Ok(response) => {
                let status = response.status();
                match response.bytes().await {
                    Err(e) => Err(http_error(&e)),
                    Ok(bytes) if bytes.len() > MAX_ANSWER_BYTES => {
                        Err(format!("http {}: answer too large", status.as_u16()))
                    }
                    Ok(bytes) if status.is_success() => {
                        match serde_json::from_slice::<OffsetAnswer>(&bytes) {
                            Ok(a) => Ok(a.offset),
                            Err(_) => {
                                Err(format!("http {}: no offset in the answer", status.as_u16()))
                            }
                        }
                    }
                    Ok(bytes) => {
                        let code = serde_json::from_slice::<ErrorAnswer>(&bytes)
                            .map(|a| format!(" {}", a.error.code))
                            .unwrap_or_default();
                        Err(format!("http {}{code}", status.as_u16()))
                    }
                }
            }
        };
        match outcome {
            Ok(offset) => shared.record_ack(job.channel, offset, started.elapsed()),
            Err(reason) => shared.record_failure(&reason),
        }
    }
}

/// A short, bounded label for a failed HTTP request.
fn http_error(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect failed"
    } else if e.is_body() || e.is_decode() {
        "reading the answer failed"
    } else {
        "request failed"
    };
    format!("http: {kind}")
}

/// One WebSocket publisher: sends the jobs it is given as `publish` frames (each with
/// the job's index as `id`), matches `ack`/`error` replies by id, and ends when the
/// scheduler is done and every publication is answered (or `ack_timeout` passed).
async fn client_publisher(
    mut ws: client::Ws,
    mut jobs: mpsc::Receiver<Job>,
    shared: Arc<Shared>,
    channels: Arc<[String]>,
    ack_timeout: Duration,
) {
    // id -> (job, send time)
    let mut pending: HashMap<u64, (Job, Instant)> = HashMap::new();
    let mut scheduling = true;
    let mut closed: Option<String> = None;
    let mut error_code: Option<String> = None;
    let mut deadline = None;
    loop {
        if !scheduling && pending.is_empty() {
            break;
        }
        let until = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
        tokio::select! {
            job = jobs.recv(), if scheduling => match job {
                Some(job) => {
                    let data = payload::data(payload::unix_micros(), shared.payload_bytes);
                    let frame = payload::publish_frame(job.index, &channels[job.channel], &data);
                    let sent_at = Instant::now();
                    shared.record_sent();
                    if let Err(e) = ws.send(Message::text(frame)).await {
                        let f = client::Failure::from_ws(e, client::Stage::Holding, None);
                        closed = Some(format!("publisher connection lost: {f}"));
                        shared.record_failure(closed.as_deref().unwrap_or_default());
                        break;
                    }
                    pending.insert(job.index, (job, sent_at));
                }
                None => {
                    scheduling = false;
                    deadline = Some(Instant::now() + ack_timeout);
                }
            },
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    if let payload::Frame::Other(o) = payload::parse(text.as_str()) {
                        let id = o.id.as_ref().and_then(serde_json::Value::as_u64);
                        match (o.kind.as_str(), id.and_then(|id| pending.remove(&id))) {
                            ("ack", Some((job, sent_at))) => match o.offset {
                                Some(offset) => shared.record_ack(job.channel, offset, sent_at.elapsed()),
                                None => shared.record_failure("ack without offset"),
                            },
                            ("error", Some(_)) => {
                                let code = o.code.unwrap_or_else(|| "UNKNOWN".to_owned());
                                shared.record_failure(&format!("error {code}"));
                            }
                            ("error", None) => error_code = o.code,
                            (_, Some((job, sent_at))) => {
                                // Not an answer after all: keep waiting for it.
                                pending.insert(job.index, (job, sent_at));
                            }
                            _ => {}
                        }
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let f = client::Failure::Closed {
                        code: frame.map_or(1005, |f| u16::from(f.code)),
                        error: error_code.take(),
                    };
                    closed = Some(format!("publisher closed: {f}"));
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    let f = client::Failure::from_ws(e, client::Stage::Holding, None);
                    closed = Some(format!("publisher connection lost: {f}"));
                    break;
                }
                None => {
                    closed = Some("publisher connection lost".to_owned());
                    break;
                }
            },
            () = tokio::time::sleep_until(until), if deadline.is_some() => break,
        }
    }
    if let Some(end) = &closed {
        shared.with(|t| t.connection_ends.add(end, 1));
    }
    let reason = closed.unwrap_or_else(|| "no ack within --timeout".to_owned());
    for _ in pending.drain() {
        shared.record_failure(&reason);
    }
    // Jobs still queued for a dead connection never left.
    jobs.close();
    while jobs.recv().await.is_some() {
        shared.record_failure(&reason);
    }
    client::close(ws).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_urls_are_completed_and_checked() {
        assert_eq!(
            publish_url("http://127.0.0.1:8080").unwrap().as_str(),
            "http://127.0.0.1:8080/v1/publish"
        );
        assert_eq!(
            publish_url("http://127.0.0.1:8080/").unwrap().as_str(),
            "http://127.0.0.1:8080/v1/publish"
        );
        assert_eq!(
            publish_url("http://localhost:8080/v1/publish")
                .unwrap()
                .as_str(),
            "http://localhost:8080/v1/publish"
        );
        assert!(publish_url("http://10.0.0.1:8080").is_err());
        assert!(publish_url("https://127.0.0.1:8080").is_err());
    }

    #[test]
    fn tallies_track_offsets_per_channel() {
        let mut t = PublishTallies::new(2);
        t.sent(0);
        t.sent(1500);
        t.acked(10, 0, 7, Duration::from_millis(1));
        t.acked(1510, 0, 5, Duration::from_millis(3));
        t.failed("http 503 UNAVAILABLE");
        assert_eq!((t.sent, t.acked, t.failed), (2, 2, 1));
        assert_eq!(t.channel_first, vec![Some(5), None]);
        assert_eq!(t.channel_last, vec![Some(7), None]);
        assert_eq!(t.channel_acked, vec![2, 0]);
        assert_eq!((t.first_sent_ms, t.last_sent_ms), (Some(0), Some(1500)));
        assert_eq!(t.sent_series.counts(), &[1, 1]);
        assert_eq!(t.ack_latency_us.count(), 2);
        assert_eq!(t.failures.get("http 503 UNAVAILABLE"), 1);
    }
}
