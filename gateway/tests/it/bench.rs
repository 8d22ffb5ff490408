//! Measurement, not a check (ignored by default): the chat path's overhead as a
//! client sees it, through a gateway, JetStream, a worker and back: time from sending
//! `chat.send` to the first `chat.chunk`, minus the stub LLM's own first-token delay,
//! for 100 and 1,000 concurrent streams. Run with
//! `cargo test --release -p switchboard-gateway --test it bench -- --ignored --nocapture`.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use testkit::backend::BackendStub;
use testkit::llm::{LlmStub, Reply, Script};
use testkit::tokens;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::common::*;

/// The stub's own time to first token, subtracted from what the client sees.
const FIRST_TOKEN_DELAY: Duration = Duration::from_millis(200);

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn chat_first_chunk_overhead() {
    let deps = Deps::start();
    let llm = LlmStub::start().await;
    llm.set_default(Script::Reply(
        Reply::numbered(5)
            .first_token_delay(FIRST_TOKEN_DELAY)
            .token_delay(Duration::from_millis(20)),
    ));
    let backend = BackendStub::start().await;
    let raw = worker::RawConfig {
        cluster: shared::config::ClusterArgs {
            node_id: Some("bench-w".into()),
            nats_url: Some(deps.nats.url()),
            redis_url: Some(deps.redis.url()),
            redis_cluster: Some(deps.redis.is_cluster()),
            ..Default::default()
        },
        llm_base_url: Some(llm.base_url()),
        backend_url: Some(backend.url()),
        max_in_flight: Some(1000),
        ack_wait_secs: Some(30),
        ..worker::RawConfig::default()
    };
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stop = CancellationToken::new();
    let s2 = stop.clone();
    tokio::spawn(async move {
        worker::run(admin, raw.validate().unwrap(), s2)
            .await
            .unwrap()
    });
    let gw = gateway(&deps, |c| {
        c.connect_rate_per_ip = Some(1_000_000);
        c.connect_burst_per_ip = Some(1_000_000);
    })
    .await;

    for n in [100usize, 1000] {
        let mut clients = Vec::with_capacity(n);
        for i in 0..n {
            let t = tokens::token(&format!("bench-{n}-{i}"), 3600);
            let (mut ws, _) = connect(&gw.url(), Hs::bearer(&t)).await.unwrap();
            next_json(&mut ws).await;
            clients.push(ws);
        }
        let start = Instant::now();
        let runs = clients.into_iter().map(|mut ws| async move {
            let sent = Instant::now();
            ws.send(Message::text(
                json!({"type": "chat.send", "message": "hi"}).to_string(),
            ))
            .await
            .unwrap();
            let mut ack = None;
            loop {
                let m = tokio::time::timeout(Duration::from_secs(60), ws.next())
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap();
                let Message::Text(t) = m else { continue };
                let f: Value = serde_json::from_str(&t).unwrap();
                match f["type"].as_str() {
                    Some("ack") => ack = Some(sent.elapsed()),
                    Some("chat.chunk") => return (ack.unwrap_or_default(), sent.elapsed()),
                    _ => {}
                }
            }
        });
        let results = futures_util::future::join_all(runs).await;
        let wall = start.elapsed();
        let mut acks: Vec<f64> = results
            .iter()
            .map(|(a, _)| a.as_secs_f64() * 1000.0)
            .collect();
        let mut over: Vec<f64> = results
            .iter()
            .map(|(_, f)| (f.saturating_sub(FIRST_TOKEN_DELAY)).as_secs_f64() * 1000.0)
            .collect();
        acks.sort_by(f64::total_cmp);
        over.sort_by(f64::total_cmp);
        println!(
            "{n} concurrent streams: first-chunk overhead p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; ack p50 {:.1} ms, p99 {:.1} ms; wall {:.2} s",
            pct(&over, 0.5),
            pct(&over, 0.99),
            over[over.len() - 1],
            pct(&acks, 0.5),
            pct(&acks, 0.99),
            wall.as_secs_f64()
        );
    }
    stop.cancel();
}
