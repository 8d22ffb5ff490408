//! `chat` and `soak` against the real thing: NATS and Redis (testkit), a gateway and a
//! worker in this process, the `mock-llm` binary as the LLM, and the real `loadtest`
//! binary. Short runs (seconds) that check the reports add up, that LLM errors reach
//! the report by code, and that `--fail-on` decides the exit code.

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::{Nats, Redis, tokens};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const API_KEY: &str = "live-api-key-0123456789";
/// Longest wait for a server of the stack to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// NATS, Redis, a gateway and a worker in this process, mock-llm beside it.
struct Stack {
    _nats: Nats,
    _redis: Redis,
    llm: Child,
    llm_url: String,
    gateway: SocketAddr,
    gateway_admin: SocketAddr,
    worker_admin: SocketAddr,
    stop: CancellationToken,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = self.llm.kill();
        let _ = self.llm.wait();
    }
}

async fn wait_ready(url: String) {
    let start = Instant::now();
    loop {
        if let Ok(r) = reqwest::get(&url).await
            && r.status() == 200
        {
            return;
        }
        assert!(start.elapsed() < READY_TIMEOUT, "{url} never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Stack {
    async fn start(llm_args: &[&str]) -> Stack {
        let nats = Nats::start().expect("nats-server");
        let redis = Redis::start().expect("redis-server");
        let llm_port = testkit::free_port();
        let llm = Command::new(env!("CARGO_BIN_EXE_mock-llm"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{llm_port}"))
            .args(llm_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mock-llm");
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", llm_port)).is_err() {
            assert!(start.elapsed() < READY_TIMEOUT, "mock-llm never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        let llm_url = format!("http://127.0.0.1:{llm_port}");
        let stop = CancellationToken::new();

        let gateway_config = gateway::RawConfig {
            cluster: shared::config::ClusterArgs {
                nats_url: Some(nats.url()),
                redis_url: Some(redis.url()),
                node_id: Some(format!("live-gw-{}", testkit::free_port())),
                ..Default::default()
            },
            jwt_secret: Some(tokens::TEST_SECRET.into()),
            api_key: Some(API_KEY.into()),
            drain_secs: Some(1),
            connect_rate_per_ip: Some(1_000_000),
            connect_burst_per_ip: Some(1_000_000),
            max_connections_per_user: Some(0),
            chat_rate_per_minute: Some(100_000),
            public_namespaces: Some("bench".into()),
            ..gateway::RawConfig::default()
        }
        .validate()
        .expect("gateway config");
        let public = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (gateway, gateway_admin) = (public.local_addr().unwrap(), admin.local_addr().unwrap());
        let s = stop.clone();
        tokio::spawn(async move {
            gateway::run(gateway::Listeners { public, admin }, gateway_config, s)
                .await
                .expect("gateway run")
        });

        let worker_config = worker::RawConfig {
            cluster: shared::config::ClusterArgs {
                node_id: Some(format!("live-w-{}", testkit::free_port())),
                nats_url: Some(nats.url()),
                redis_url: Some(redis.url()),
                ..Default::default()
            },
            llm_base_url: Some(format!("{llm_url}/v1")),
            llm_max_attempts: Some(2),
            llm_backoff_base_ms: Some(10),
            llm_backoff_max_ms: Some(20),
            max_in_flight: Some(200),
            ..worker::RawConfig::default()
        }
        .validate()
        .expect("worker config");
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let worker_admin = admin.local_addr().unwrap();
        let s = stop.clone();
        tokio::spawn(async move {
            worker::run(admin, worker_config, s)
                .await
                .expect("worker run")
        });
        wait_ready(format!("http://{gateway_admin}/readyz")).await;
        wait_ready(format!("http://{worker_admin}/readyz")).await;
        Stack {
            _nats: nats,
            _redis: redis,
            llm,
            llm_url,
            gateway,
            gateway_admin,
            worker_admin,
            stop,
        }
    }

    /// The flags every run takes: target, credentials, the stub, the probes.
    fn args(&self, scenario: &str) -> Vec<String> {
        let mut a: Vec<String> = [
            scenario,
            "--secret",
            tokens::TEST_SECRET,
            "--llm-stub",
            &self.llm_url,
            "--metrics-url",
            &format!("http://{}/metrics", self.gateway_admin),
            "--worker-metrics",
            &format!("http://{}/metrics", self.worker_admin),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push("--url".into());
        a.push(format!("ws://{}/ws", self.gateway));
        if scenario == "soak" {
            a.extend([
                "--api-url".to_owned(),
                format!("http://{}", self.gateway),
                "--api-key".to_owned(),
                API_KEY.to_owned(),
            ]);
        }
        a
    }
}

/// Runs the loadtest binary (off the runtime: the stack runs on it); exit code, JSON
/// report and stdout.
async fn loadtest(mut args: Vec<String>, extra: &[&str]) -> (i32, Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let html = dir.path().join("report.html");
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend([
        "--json".to_owned(),
        json.display().to_string(),
        "--html".to_owned(),
        html.display().to_string(),
    ]);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_loadtest"))
            .args(&args)
            .env_remove("SB_JWT_SECRET")
            .env_remove("SB_API_KEY")
            .output()
            .expect("run loadtest")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = match std::fs::read(&json) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap(),
        Err(e) => panic!("no JSON report ({e}); stdout:\n{stdout}\nstderr:\n{stderr}"),
    };
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.ends_with("</html>\n"));
    (out.status.code().unwrap_or(-1), report, stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streams_through_a_real_gateway_and_worker_meet_the_goal() {
    let stack = Stack::start(&[
        "--first-token-ms",
        "100",
        "--tokens-per-sec",
        "100",
        "--reply-tokens",
        "10",
    ])
    .await;
    let (code, r, out) = loadtest(
        stack.args("chat"),
        &["--users", "8", "--think-ms", "100", "--duration", "3"],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(r["goal_met"], true, "{out}");
    assert_eq!(r["users"]["connected"], 8);
    let s = &r["streams"];
    let completed = s["completed"].as_u64().unwrap();
    // Eight users, streams of about 200 ms plus 50..150 ms of thought, for 3 s.
    assert!((30..=200).contains(&completed), "{out}");
    assert_eq!(s["failed"], 0, "{out}");
    assert_eq!(s["sent"], s["completed"]);
    assert_eq!(s["llm"]["first_token_ms"], 100);
    assert_eq!(s["llm"]["stream_ms"], 90);
    // Ten tokens each, one chunk per token or coalesced: all in order, none missing.
    assert_eq!(s["chunks"]["streams"].as_u64(), Some(completed));
    assert_eq!(s["chunks"]["missing"], 0);
    assert_eq!(s["chunks"]["duplicates"], 0);
    assert_eq!(s["chunks"]["content_mismatches"], 0);
    // The first chunk cannot come before the stub's first token, and the chat path on
    // loopback adds well under a second.
    let first = &s["first_chunk_ms"];
    assert!(first["min"].as_f64().unwrap() >= 100.0, "{first}");
    let overhead = s["first_chunk_overhead_ms"]["p50"].as_f64().unwrap();
    assert!((0.0..1000.0).contains(&overhead), "{out}");
    assert_eq!(s["early_first_chunks"], 0);
    assert!(s["concurrency_peak"].as_u64().unwrap() >= 2, "{out}");
    assert!(out.contains("first chunk: p50"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_failures_reach_the_report_by_code_and_fail_the_run() {
    let stack = Stack::start(&["--p-500", "1", "--first-token-ms", "0"]).await;
    let (code, r, out) = loadtest(
        stack.args("chat"),
        &["--users", "3", "--messages", "2", "--think-ms", "0"],
    )
    .await;
    assert_eq!(code, 1, "{out}");
    assert_eq!(r["goal_met"], false);
    let s = &r["streams"];
    assert_eq!(
        (s["sent"].as_u64(), s["failed"].as_u64()),
        (Some(6), Some(6)),
        "{out}"
    );
    assert_eq!(s["completed"], 0);
    assert_eq!(s["errors"][0]["reason"], "chat.error UNAVAILABLE", "{out}");
    assert_eq!(s["errors"][0]["count"], 6);
    assert_eq!(r["stopped_by"][0]["limit"], "chat_unavailable", "{out}");
    // Two attempts per message (the worker's --llm-max-attempts here).
    let config: Value = reqwest::get(format!("{}/stub/config", stack.llm_url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["requests"], 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_churn_meets_its_thresholds_and_fail_on_decides_the_exit_code() {
    let stack = Stack::start(&[
        "--first-token-ms",
        "50",
        "--tokens-per-sec",
        "200",
        "--reply-tokens",
        "5",
    ])
    .await;
    let (code, r, out) = loadtest(
        stack.args("soak"),
        &[
            "--connections",
            "40",
            "--channels",
            "2",
            "--churn-rate",
            "10",
            "--rate",
            "5",
            "--chat-users",
            "3",
            "--think-ms",
            "200",
            "--duration",
            "4",
            "--warmup",
            "1",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(r["goal_met"], true, "{out}");
    let c = &r["connections"];
    let churned = c["churned"].as_u64().unwrap();
    assert!((25..=45).contains(&churned), "10/s for 4 s: {out}");
    assert_eq!(c["attempted"].as_u64(), Some(43 + churned), "{out}");
    assert_eq!(c["success_pct"], 100.0);
    assert_eq!(c["abnormal_closes"], 0);
    assert_eq!(c["unexpected_closes"], 0);
    assert_eq!(r["offsets"]["missing"], 0, "{out}");
    assert_eq!(r["offsets"]["duplicates"], 0);
    assert!(r["deliveries"]["total"].as_u64().unwrap() > 100, "{out}");
    assert!(r["chat"]["completed"].as_u64().unwrap() > 5, "{out}");
    let thresholds = r["thresholds"].as_array().unwrap();
    assert_eq!(thresholds.len(), 5);
    assert!(thresholds.iter().all(|t| t["broken"] == false), "{out}");
    // Memory was sampled from the gateway's /metrics and the worker's.
    assert!(
        r["memory"]["gateway"]["samples"].as_u64().unwrap() >= 3,
        "{out}"
    );
    assert!(
        r["memory"]["workers"][0]["samples"].as_u64().unwrap() >= 3,
        "{out}"
    );
    assert!(out.contains("Thresholds"), "{out}");

    // A threshold the run cannot meet (it expects closes) makes the exit code 1.
    let (code, r, out) = loadtest(
        stack.args("soak"),
        &[
            "--connections",
            "10",
            "--chat-users",
            "1",
            "--rate",
            "2",
            "--duration",
            "2",
            "--fail-on",
            "abnormal>0,closes<1",
        ],
    )
    .await;
    assert_eq!(code, 1, "{out}");
    assert_eq!(r["goal_met"], false);
    assert_eq!(r["thresholds"][1]["broken"], true);
    assert!(
        r["verdict"]
            .as_str()
            .unwrap()
            .contains("closes 0 (threshold closes<1)"),
        "{out}"
    );
}
