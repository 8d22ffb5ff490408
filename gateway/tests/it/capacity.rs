//! Measurement, not a check (ignored by default): the Redis side of the capacity
//! model (docs/capacity.md). Drives the session store directly, as many gateways
//! would, with connection lifecycles (register + unregister, the Redis work of a
//! connect and a close) and channel publications, against one Redis server and
//! against a 3-primary Redis Cluster, and reports throughput, Redis CPU per
//! operation (`INFO commandstats` usec) and how commands and keys spread over the
//! shards. Run with
//! `cargo test --release -p switchboard-gateway --test it capacity -- --ignored --nocapture`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shared::keys::Keys;
use shared::protocol::Channel;
use shared::store::{ChannelSettings, ConnRecord, RedisStore};
use shared::store::{ChannelStore, ConnStore};
use testkit::{Redis, RedisCluster};

/// Operations in flight at once: about what a few busy gateways keep outstanding.
const CONCURRENCY: usize = 256;
/// Each phase runs this long.
const PHASE: Duration = Duration::from_secs(8);
/// Distinct channels published to (keys spread over slots by their hash tags).
const CHANNELS: u64 = 1000;

fn stats(nodes: &[Redis]) -> Vec<(u64, u64)> {
    nodes
        .iter()
        .map(|n| {
            n.command_stats()
                .unwrap()
                .iter()
                .filter(|(c, _)| {
                    !c.starts_with("cluster")
                        && c.as_str() != "info"
                        && c.as_str() != "config|resetstat"
                })
                .fold((0, 0), |(a, b), (_, (c, u))| (a + c, b + u))
        })
        .collect()
}

fn reset(nodes: &[Redis]) {
    for n in nodes {
        n.command(&["CONFIG", "RESETSTAT"]).unwrap();
    }
}

async fn phase<F, Fut>(nodes: &[Redis], what: &str, name: &str, op: F)
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    reset(nodes);
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..CONCURRENCY as u64 {
        let (op, done) = (op.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while start.elapsed() < PHASE {
                op(i).await;
                done.fetch_add(1, Ordering::Relaxed);
                i += CONCURRENCY as u64;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    let per_node = stats(nodes);
    let calls: u64 = per_node.iter().map(|s| s.0).sum();
    let usec: u64 = per_node.iter().map(|s| s.1).sum();
    let spread: Vec<String> = per_node
        .iter()
        .map(|(c, _)| format!("{:.0}%", 100.0 * *c as f64 / calls.max(1) as f64))
        .collect();
    println!(
        "| {name} | {what} | {:.0}/s | {:.2} | {:.1} µs | {} |",
        n as f64 / secs,
        calls as f64 / n.max(1) as f64,
        usec as f64 / n.max(1) as f64,
        spread.join(" / "),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn redis_one_server_and_three_primaries() {
    let single = Redis::start().unwrap();
    let cluster = RedisCluster::start().unwrap();
    let one = RedisStore::new(&single.url(), Keys::new("sb")).unwrap();
    let three = RedisStore::open(
        shared::config::redis_target(&cluster.urls(), true),
        Keys::new("sb"),
    )
    .unwrap();
    let singles = [single];
    let targets: [(&str, RedisStore, &[Redis]); 2] = [
        ("1 server", one, &singles),
        ("3 primaries", three, &cluster.nodes),
    ];
    println!(
        "| target | operation | throughput | Redis commands/op | Redis CPU/op | command spread over shards |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, store, nodes) in targets {
        let lifecycle_store = store.clone();
        phase(nodes, "connection lifecycle", name, move |i| {
            let store = lifecycle_store.clone();
            async move {
                let rec = ConnRecord {
                    conn_id: format!("c{i}"),
                    user_id: format!("u{}", i % 100_000),
                    node: "bench".into(),
                    ip: "127.0.0.1".into(),
                    connected_at: i,
                };
                store.register_conn(&rec, 10).await.unwrap();
                store
                    .unregister_conn(&rec.user_id, &rec.member())
                    .await
                    .unwrap();
            }
        })
        .await;
        let settings = ChannelSettings {
            history_size: 100,
            history_ttl: Duration::from_secs(600),
            offset_ttl: Duration::from_secs(7 * 24 * 3600),
        };
        phase(nodes, "channel publication", name, move |i| {
            let store = store.clone();
            async move {
                let ch = Channel::parse(&format!("room:c{}", i % CHANNELS)).unwrap();
                store
                    .publish_channel(&ch, r#"{"offset":"#, r#","data":"x"}"#, &settings)
                    .await
                    .unwrap();
            }
        })
        .await;
        let keys: Vec<String> = nodes
            .iter()
            .filter_map(|n| n.command(&["DBSIZE"]).ok())
            .map(|r| r.trim().trim_start_matches(':').to_owned())
            .collect();
        println!(
            "| {} | keys per shard after the run | {} | | | |",
            name,
            keys.join(" / ")
        );
    }
}

/// The NATS side: one nats-server node carrying channel-sized messages from one
/// publisher connection to one subscriber connection (each gateway holds one of each),
/// as fast as the client can publish. Messages per second through one node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn nats_one_node_messages_per_second() {
    use futures_util::StreamExt;
    let nats = testkit::Nats::start().unwrap();
    let publisher = async_nats::connect(nats.url()).await.unwrap();
    let subscriber = async_nats::connect(nats.url()).await.unwrap();
    let mut sub = subscriber.subscribe("sb.ch.room.bench").await.unwrap();
    subscriber.flush().await.unwrap();
    let payload = bytes::Bytes::from(vec![b'x'; 200]);
    let received = Arc::new(AtomicU64::new(0));
    let r2 = received.clone();
    let reader = tokio::spawn(async move {
        while sub.next().await.is_some() {
            r2.fetch_add(1, Ordering::Relaxed);
        }
    });
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < PHASE {
        for _ in 0..1000 {
            publisher
                .publish("sb.ch.room.bench", payload.clone())
                .await
                .unwrap();
        }
        sent += 1000;
        // Stay within what the subscriber takes: a slow consumer would be dropped.
        while sent - received.load(Ordering::Relaxed) > 50_000 {
            tokio::task::yield_now().await;
        }
    }
    publisher.flush().await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = received.load(Ordering::Relaxed);
    reader.abort();
    println!(
        "| 1 NATS node | 200-byte messages, 1 publisher -> 1 subscriber | {:.0}/s delivered ({sent} sent, {got} received) |",
        got as f64 / secs
    );
}
