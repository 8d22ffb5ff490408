//! Measurement, not a check (ignored by default): the worker's share of the time to
//! the first chunk, for 100 and 1,000 concurrent streams. Run with
//! `cargo test -p switchboard-worker --release --test it bench -- --ignored --nocapture`.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use testkit::llm::{Reply, Script};
use tokio::time::Instant;

use crate::common::*;

/// The stub's own time to first token, subtracted from what the client sees.
const FIRST_TOKEN_DELAY: Duration = Duration::from_millis(200);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn first_chunk_overhead() {
    let env = Env::start().await;
    env.llm.set_default(Script::Reply(
        Reply::numbered(10)
            .first_token_delay(FIRST_TOKEN_DELAY)
            .token_delay(Duration::from_millis(20)),
    ));
    let _w = env
        .worker(|c| {
            c.max_in_flight = Some(1000);
            c.ack_wait_secs = Some(30);
        })
        .await;
    let mut sub = env.nc.subscribe(env.subjects.user("*")).await.unwrap();
    env.nc.flush().await.unwrap();
    for n in [100usize, 1000] {
        let reqs: Vec<_> = (0..n)
            .map(|_| {
                let mut r = request(&unique("u"), "");
                r.message = r.request_id.clone();
                r
            })
            .collect();
        let seen_before = env.llm.request_count();
        let mut sent: HashMap<String, Instant> = HashMap::new();
        let js = env.js();
        let mut acks = Vec::new();
        for r in &reqs {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", r.request_id.as_str());
            sent.insert(r.request_id.clone(), Instant::now());
            acks.push(
                js.publish_with_headers(
                    env.subjects.chat_requests(),
                    headers,
                    serde_json::to_vec(r).unwrap().into(),
                )
                .await
                .unwrap(),
            );
        }
        for a in acks {
            a.await.unwrap();
        }
        let mut first: HashMap<String, Duration> = HashMap::new();
        let mut done = 0;
        while done < n {
            let m = tokio::time::timeout(Duration::from_secs(60), sub.next())
                .await
                .expect("frames keep coming")
                .unwrap();
            let f: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            let rid = f["request_id"].as_str().unwrap().to_owned();
            match f["type"].as_str() {
                Some("chat.chunk") => {
                    first
                        .entry(rid.clone())
                        .or_insert_with(|| sent[&rid].elapsed());
                }
                Some("chat.complete") => done += 1,
                other => panic!("{other:?}: {f}"),
            }
        }
        let over: Vec<f64> = first
            .values()
            .map(|d| d.saturating_sub(FIRST_TOKEN_DELAY).as_secs_f64() * 1000.0)
            .collect();
        // Split: publish -> LLM request arrives at the stub (before the LLM).
        let arrivals: Vec<f64> = env.llm.requests()[seen_before..]
            .iter()
            .map(|r| {
                let rid = r.messages().last().unwrap()["content"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                r.at.saturating_duration_since(sent[&rid].into_std())
                    .as_secs_f64()
                    * 1000.0
            })
            .collect();
        println!(
            "{n} concurrent streams: first-chunk overhead {}; of which publish -> LLM request {}",
            summary(over),
            summary(arrivals)
        );
    }
}

fn summary(mut v: Vec<f64>) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        q(0.5),
        q(0.99),
        q(1.0)
    )
}
