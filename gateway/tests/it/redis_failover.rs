//! A Redis Cluster primary killed (`kill -9`) under live gateways: its replica is
//! promoted, and the redis crate's cluster client finds it. Connects and
//! publications whose keys lived on the dead primary work again within a bound;
//! connected clients stay connected throughout.

use std::time::{Duration, Instant};

use serde_json::json;
use testkit::{Nats, RedisCluster, TestRedis};

use crate::common::*;

/// Detection (`cluster-node-timeout`, 2 s in tests), the replica's election, and the
/// client's slot-map refresh together; measured at 4.5 s here.
const RECOVERY_BOUND: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_killed_primary_is_replaced_and_connects_and_publications_recover() {
    let mut deps = Deps {
        nats: Nats::start().expect("nats-server"),
        redis: TestRedis::Cluster(RedisCluster::start_with(3, 1).expect("redis cluster")),
    };
    let news = |c: &mut gateway::RawConfig| c.public_namespaces = Some("news".into());
    let gw = gateway(&deps, news).await;
    let other = gateway(&deps, news).await;
    let keys = shared::keys::Keys::new("sb");

    // A client on the other node, subscribed to a channel on the doomed primary.
    let TestRedis::Cluster(cluster) = &deps.redis else {
        unreachable!()
    };
    let victim = cluster
        .primary_for(&keys.user_conns("vic"))
        .expect("a primary serves the key");
    let channel = (0..200)
        .map(|i| format!("room{i}"))
        .find(|c| cluster.primary_for(&keys.channel_log("news", c)) == Some(victim))
        .expect("a channel on the same primary");
    let (mut keeper, _) = authed(&other, "keeper").await;
    send_json(
        &mut keeper,
        json!({"type": "subscribe", "channel": format!("news:{channel}"), "id": 1}),
    )
    .await;
    assert_eq!(
        next_matching(&mut keeper, |f| f["type"] == "subscribed").await["offset"],
        0
    );
    let (ws, _) = authed(&gw, "vic").await;
    drop(ws);

    let TestRedis::Cluster(cluster) = &mut deps.redis else {
        unreachable!()
    };
    cluster.nodes[victim].kill();
    let killed = Instant::now();

    // Connects of a user whose registry lived there come back.
    let connect_back = loop {
        let (mut ws, _) = connect(&gw.url(), Hs::bearer(&testkit::tokens::token("vic", 600)))
            .await
            .unwrap();
        let t = Instant::now();
        let f = loop {
            use futures_util::StreamExt;
            let m = tokio::time::timeout(RECOVERY_BOUND, ws.next())
                .await
                .expect("an answer");
            if let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) = m {
                break serde_json::from_str::<serde_json::Value>(&t).unwrap();
            }
        };
        eprintln!("{:?} after {:?}: {f}", killed.elapsed(), t.elapsed());
        if f["type"] == "authenticated" {
            break killed.elapsed();
        }
        assert_eq!(f["code"], "UNAVAILABLE", "{f}");
        assert!(
            killed.elapsed() < RECOVERY_BOUND,
            "connects never came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Publications to the channel come back, and reach the subscriber.
    let publish_back = loop {
        let r = api()
            .post(gw.http("/v1/publish"))
            .bearer_auth(API_KEY)
            .json(&json!({"channel": format!("news:{channel}"), "data": "after"}))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break killed.elapsed();
        }
        assert_eq!(r.status(), 503);
        assert!(
            killed.elapsed() < RECOVERY_BOUND,
            "publications never came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let m = next_matching(&mut keeper, |f| f["type"] == "message").await;
    assert_eq!(m["data"], "after");
    // The subscriber was connected the whole time.
    send_json(&mut keeper, json!({"type": "ping"})).await;
    assert_eq!(
        next_matching(&mut keeper, |f| f["type"] == "pong").await["type"],
        "pong"
    );
    println!(
        "primary killed: connects back after {connect_back:?}, publications after {publish_back:?}"
    );
    let TestRedis::Cluster(cluster) = &deps.redis else {
        unreachable!()
    };
    cluster.wait_ok(RECOVERY_BOUND).expect("cluster ok again");
}
