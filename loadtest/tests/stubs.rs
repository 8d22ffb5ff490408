//! The STUB upstreams' protocol, checked against the real consumers: the `mock-llm`
//! binary, started with each of its error flags, against the worker's LLM client
//! (`worker::llm`), which must handle each the way `worker/src/llm/mod.rs` documents
//! (429 retried after `Retry-After`, 500 retried with backoff, a cut stream is an
//! error, a hang hits the idle or first-token timeout); and the `mock-backend`
//! binary's latency and failure flags against the worker's backend client.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use worker::backend::{BackendClient, BackendError, Endpoint};
use worker::config::{BackendSettings, LlmProtocol, LlmSettings};
use worker::llm::{LlmClient, LlmError, Message, TimeoutKind};

/// Longest wait for a stub binary to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A stub binary on a free port, killed when dropped.
struct Stub {
    child: Child,
    port: u16,
}

impl Drop for Stub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Stub {
    fn start(exe: &str, args: &[&str]) -> Stub {
        let port = testkit::free_port();
        let child = Command::new(exe)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the stub binary");
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < START_TIMEOUT, "{exe} never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Stub { child, port }
    }

    fn llm(args: &[&str]) -> Stub {
        Stub::start(env!("CARGO_BIN_EXE_mock-llm"), args)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// mock-llm's description of itself, with its request counters.
    async fn config(&self) -> Value {
        reqwest::get(format!("{}/stub/config", self.url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

/// LLM settings with short timeouts and a 20 ms backoff base, so that retries and
/// timeouts show up within a test's time.
fn llm_settings(stub: &Stub) -> LlmSettings {
    LlmSettings {
        base_url: format!("{}/v1", stub.url()),
        api_key: None,
        model: "stub".into(),
        system_prompt: None,
        protocol: LlmProtocol::Openai,
        max_tokens: None,
        connect_timeout: Duration::from_secs(2),
        first_token_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(5),
        total_timeout: Duration::from_secs(20),
        max_attempts: 3,
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
    }
}

/// Streams one completion: the text received and how it ended.
async fn complete(settings: &LlmSettings) -> (String, Result<(), LlmError>) {
    let client = LlmClient::new(settings).unwrap();
    let cancel = CancellationToken::new();
    let mut stream = match client.stream(&[Message::user("hi")], &cancel).await {
        Ok(s) => s,
        Err(e) => return (String::new(), Err(e)),
    };
    let mut text = String::new();
    loop {
        match stream.next().await {
            Ok(Some(t)) => text.push_str(&t),
            Ok(None) => return (text, Ok(())),
            Err(e) => return (text, Err(e)),
        }
    }
}

#[tokio::test]
async fn mock_llm_streams_its_reply_and_describes_itself() {
    let stub = Stub::llm(&[
        "--first-token-ms",
        "150",
        "--tokens-per-sec",
        "100",
        "--reply-tokens",
        "12",
    ]);
    let config = stub.config().await;
    assert_eq!(config["stub"], "mock-llm");
    assert_eq!(config["first_token_ms"], 150);
    assert_eq!(config["stream_ms"], 110, "11 token gaps of 10 ms");
    assert_eq!(config["requests"], 0, "reading the config is not a request");
    let started = Instant::now();
    let (text, end) = complete(&llm_settings(&stub)).await;
    end.expect("a whole reply");
    let took = started.elapsed();
    assert!(text.starts_with("This is a stubbed reply"), "{text}");
    assert_eq!(text.split(' ').count(), 12, "{text}");
    assert!(
        took >= Duration::from_millis(150 + 110) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // The loadtest reads the same figures.
    let timing = switchboard_loadtest::chat::LlmTiming::from_stub(&stub.url())
        .await
        .unwrap();
    assert_eq!((timing.first_token_ms, timing.stream_ms), (150, 110));
    assert_eq!(stub.config().await["completed"], 1);
}

#[tokio::test]
async fn a_429_is_retried_after_its_retry_after() {
    let stub = Stub::llm(&["--p-429", "1", "--retry-after", "1"]);
    let mut settings = llm_settings(&stub);
    settings.max_attempts = 2;
    let started = Instant::now();
    let (_, end) = complete(&settings).await;
    let took = started.elapsed();
    match end {
        Err(LlmError::Status {
            code: 429,
            retry_after,
            ..
        }) => assert_eq!(retry_after, Some(Duration::from_secs(1))),
        other => panic!("expected a 429 after the retries: {other:?}"),
    }
    // The retry waited the server's second, not the 20 ms backoff.
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    assert_eq!(stub.config().await["requests"], 2);
}

#[tokio::test]
async fn a_500_is_retried_with_backoff_then_reported() {
    let stub = Stub::llm(&["--p-500", "1"]);
    let settings = llm_settings(&stub);
    let (_, end) = complete(&settings).await;
    match end {
        Err(e @ LlmError::Status { code: 500, .. }) => assert!(e.retryable()),
        other => panic!("expected a 500: {other:?}"),
    }
    assert_eq!(stub.config().await["requests"], 3, "three attempts");
}

#[tokio::test]
async fn a_truncated_stream_is_an_error_after_its_text() {
    let stub = Stub::llm(&[
        "--p-truncate",
        "1",
        "--reply-tokens",
        "10",
        "--first-token-ms",
        "0",
    ]);
    let (text, end) = complete(&llm_settings(&stub)).await;
    match end {
        Err(LlmError::Interrupted(why)) => assert!(why.contains("before the reply"), "{why}"),
        other => panic!("a cut stream must be an error: {other:?}"),
    }
    assert_eq!(
        text, "This is a stubbed reply",
        "the first half came through"
    );
    assert_eq!(
        stub.config().await["requests"],
        1,
        "text was sent: no retry"
    );
}

#[tokio::test]
async fn a_hanging_stream_hits_the_idle_timeout() {
    let stub = Stub::llm(&[
        "--p-hang",
        "1",
        "--reply-tokens",
        "10",
        "--first-token-ms",
        "0",
    ]);
    let mut settings = llm_settings(&stub);
    settings.idle_timeout = Duration::from_millis(300);
    let started = Instant::now();
    let (text, end) = complete(&settings).await;
    assert!(
        matches!(end, Err(LlmError::Timeout(TimeoutKind::Idle))),
        "{end:?}"
    );
    assert_eq!(text, "This is a stubbed reply");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // The client went away: the stub sees its stream abandoned.
    let start = Instant::now();
    while stub.config().await["disconnects"] != 1 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the stub never saw the client leave"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_slow_first_token_hits_the_first_token_timeout_without_retry() {
    let stub = Stub::llm(&["--first-token-ms", "3000"]);
    let mut settings = llm_settings(&stub);
    settings.first_token_timeout = Duration::from_millis(300);
    let started = Instant::now();
    let (_, end) = complete(&settings).await;
    assert!(
        matches!(end, Err(LlmError::Timeout(TimeoutKind::FirstToken))),
        "{end:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        stub.config().await["requests"],
        1,
        "timeouts are not retried"
    );
}

#[test]
fn mock_llm_refuses_bad_flags() {
    for args in [&["--p-500", "2"][..], &["--tokens-per-sec", "0"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_mock-llm"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
}

fn backend(stub: &Stub, timeout: Duration) -> BackendClient {
    BackendClient::new(&BackendSettings {
        url: Some(stub.url()),
        token: Some("service-token".into()),
        timeout,
        breaker_failures: 5,
        breaker_cooldown: Duration::from_secs(1),
        max_in_flight: 8,
    })
    .unwrap()
    .unwrap()
}

#[tokio::test]
async fn mock_backend_serves_lists_with_its_latency() {
    let stub = Stub::start(env!("CARGO_BIN_EXE_mock-backend"), &["--latency-ms", "300"]);
    let started = Instant::now();
    let teams = backend(&stub, Duration::from_secs(2))
        .list("u1", "", Endpoint::Teams)
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(teams.len(), 1);
    assert_eq!(teams[0]["id"], "team-1");
    let tasks = backend(&stub, Duration::from_secs(2))
        .list("u1", "", Endpoint::Tasks)
        .await
        .unwrap();
    assert_eq!(tasks[0]["id"], "task-1");
    // Slower than the client's deadline: a timeout.
    let e = backend(&stub, Duration::from_millis(100))
        .list("u1", "", Endpoint::Teams)
        .await
        .unwrap_err();
    assert!(matches!(e, BackendError::Timeout(_)), "{e:?}");
    assert!(e.is_outage());
}

#[tokio::test]
async fn mock_backend_fails_on_request() {
    let stub = Stub::start(env!("CARGO_BIN_EXE_mock-backend"), &["--fail-rate", "1"]);
    let e = backend(&stub, Duration::from_secs(2))
        .list("u1", "", Endpoint::Teams)
        .await
        .unwrap_err();
    assert!(matches!(e, BackendError::Status(503)), "{e:?}");
    assert!(e.is_outage(), "a 503 counts for the breaker");
}
