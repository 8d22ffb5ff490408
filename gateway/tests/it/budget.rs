//! The Redis budget per operation, counted exactly with `INFO commandstats` (which
//! counts every command a script runs, so this measures Redis work, not round
//! trips). Budgets (docs/benchmarks.md "Redis budget"): a connection lifecycle (open
//! and close, per-user limit and registry included) at most 6 commands, a channel
//! publication at most 2; a chat request's cost is stated and held exactly.
//!
//! Background loops run meanwhile; their commands are told apart by name and left
//! out: health checks (`PING`, every second) and the revocation sync
//! (`ZRANGEBYSCORE`, every 5 s); on a cluster also `CLUSTER` topology reads. Heartbeats, the connection refresh and the presence
//! refresh are slower than the measured windows (heartbeat set to 300 s here).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use testkit::backend::BackendStub;
use testkit::llm::{LlmStub, Reply, Script};

use crate::common::*;
use crate::e2e_chat::worker;
use shared::store::ConnStore;

/// The budgets this test holds the product to.
const LIFECYCLE_BUDGET: u64 = 6;
const PUBLICATION_BUDGET: u64 = 2;
/// Users per measured round: enough that a stray command would show.
const USERS: usize = 40;

/// Background commands, left out by name (see the module docs), and the reset itself.
const BACKGROUND: &[&str] = &["ping", "zrangebyscore", "config|resetstat"];

fn calls(deps: &Deps) -> BTreeMap<String, u64> {
    deps.redis
        .command_stats()
        .expect("commandstats")
        .into_iter()
        // Topology reads (the cluster client's, and this harness's own) are not work
        // of an operation.
        .filter(|(cmd, _)| !BACKGROUND.contains(&cmd.as_str()) && !cmd.starts_with("cluster|"))
        .map(|(cmd, (calls, _))| (cmd, calls))
        .collect()
}

fn reset(deps: &Deps) {
    match &deps.redis {
        testkit::TestRedis::Single(r) => {
            r.command(&["CONFIG", "RESETSTAT"]).unwrap();
        }
        testkit::TestRedis::Cluster(c) => {
            for n in &c.nodes {
                n.command(&["CONFIG", "RESETSTAT"]).unwrap();
            }
        }
    }
}

fn total(m: &BTreeMap<String, u64>) -> u64 {
    m.values().sum()
}

/// Opens and closes one connection per user, waiting until each close has left
/// Redis (the user's registry is empty again).
/// Sends one chat request and waits for its `chat.complete`; returns the session.
async fn chat(ws: &mut Ws, sid: Option<String>) -> String {
    let msg = match sid {
        Some(s) => json!({"type": "chat.send", "message": "hi", "session_id": s}),
        None => json!({"type": "chat.send", "message": "hi"}),
    };
    send_json(ws, msg).await;
    let ack = next_matching(ws, |f| f["type"] == "ack").await;
    next_matching(ws, |f| f["type"] == "chat.complete").await;
    ack["session_id"].as_str().unwrap().to_owned()
}

async fn lifecycles(deps: &Deps, gw: &Gw, users: &[String]) {
    for u in users {
        let (ws, a) = authed(gw, u).await;
        assert_eq!(a["degraded"], false, "context from the backend: {a}");
        drop(ws);
    }
    let store = deps.store();
    for u in users {
        eventually("registry emptied", || async {
            store.user_connections(u).await.unwrap().is_empty()
        })
        .await;
    }
}

#[tokio::test]
async fn redis_commands_per_operation_stay_within_budget() {
    let deps = Deps::start();
    let llm = LlmStub::start().await;
    llm.set_default(Script::Reply(Reply::numbered(5)));
    let backend = BackendStub::start().await;
    backend.set_teams(json!([{"id": "t1", "name": "Core"}]));
    let _w = worker(&deps, &llm, &backend).await;
    let gw = gateway(&deps, |c| {
        c.heartbeat_secs = Some(300);
        c.connect_rate_per_ip = Some(10_000);
        c.connect_burst_per_ip = Some(10_000);
    })
    .await;
    // Scripts are loaded and the node's first writes are done before counting.
    lifecycles(&deps, &gw, &["warm".to_owned()]).await;

    // Connection lifecycles of new users: the registry, and the context the worker
    // keeps for degraded mode.
    let users: Vec<String> = (0..USERS).map(|i| format!("budget-{i}")).collect();
    reset(&deps);
    lifecycles(&deps, &gw, &users).await;
    let first = calls(&deps);
    let per_new = total(&first) as f64 / USERS as f64;

    // The same users again: their context is unchanged, so only the registry works.
    reset(&deps);
    lifecycles(&deps, &gw, &users).await;
    let again = calls(&deps);
    let per_again = total(&again) as f64 / USERS as f64;

    // Channel publications: the node learns the channel's epoch once, then each
    // publication is one XADD.
    let publish = |n: u64| {
        let gw = &gw;
        async move {
            let r = api()
                .post(gw.http("/v1/publish"))
                .bearer_auth(API_KEY)
                .json(&json!({"channel": "news:budget", "data": {"n": n}}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    publish(0).await;
    reset(&deps);
    for n in 1..=USERS as u64 {
        publish(n).await;
    }
    let pubs = calls(&deps);
    let per_pub = total(&pubs) as f64 / USERS as f64;

    // One chat request, from `chat.send` to `chat.complete` (a session that exists).
    let (mut ws, _) = authed(&gw, "chatter").await;
    let sid = chat(&mut ws, None).await;
    reset(&deps);
    chat(&mut ws, Some(sid)).await;
    // The worker records history before `chat.complete`; nothing trails it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let chat_cost = calls(&deps);

    println!("Redis budget (commands; INFO commandstats, background PING/ZRANGEBYSCORE left out)");
    println!("connection lifecycle, new user: {per_new:.2}  {first:?}");
    println!("connection lifecycle, known user: {per_again:.2}  {again:?}");
    println!("channel publication: {per_pub:.2}  {pubs:?}");
    println!(
        "chat request (existing session): {}  {chat_cost:?}",
        total(&chat_cost)
    );

    assert!(
        per_new <= LIFECYCLE_BUDGET as f64,
        "a new user's connection lifecycle costs {per_new} commands: {first:?}"
    );
    assert!(
        per_again <= (LIFECYCLE_BUDGET - 1) as f64,
        "a known user's lifecycle costs {per_again}: {again:?}"
    );
    assert!(
        per_pub <= PUBLICATION_BUDGET as f64,
        "a publication costs {per_pub}: {pubs:?}"
    );
    assert_eq!(
        pubs.get("xadd").copied(),
        Some(USERS as u64),
        "one XADD per publication: {pubs:?}"
    );
    assert!(
        total(&chat_cost) <= CHAT_BUDGET,
        "a chat request costs {}: {chat_cost:?}",
        total(&chat_cost)
    );
}

/// A chat request in an existing session, as measured (docs/benchmarks.md): the
/// per-user rate limit and session claim at the gateway, the history read, the
/// recorded-reply check and the exactly-once append at the worker.
const CHAT_BUDGET: u64 = 16;
