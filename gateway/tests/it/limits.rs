//! Limits: per-user connections cluster-wide, message rate, connect rate per address,
//! and the per-node connection cap.

use futures_util::SinkExt;
use serde_json::json;
use testkit::tokens;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

#[tokio::test]
async fn per_user_limit_holds_across_two_nodes() {
    let deps = Deps::start();
    let a = gateway(&deps, |c| c.max_connections_per_user = Some(3)).await;
    let b = gateway(&deps, |c| c.max_connections_per_user = Some(3)).await;
    let mut held = Vec::new();
    for gw in [&a, &b, &a] {
        held.push(authed(gw, "frank").await.0);
    }
    for gw in [&b, &a] {
        let (mut ws, _) = connect(&gw.url(), Hs::bearer(&tokens::token("frank", 600)))
            .await
            .unwrap();
        expect_refusal(&mut ws, 4509, "CONNECTION_LIMIT").await;
    }
    // Another user is unaffected; a closed connection frees its slot cluster-wide.
    authed(&b, "grace").await;
    let mut first = held.remove(0);
    first.close(None).await.unwrap();
    let _ = until_close(&mut first).await;
    eventually("slot freed", || async {
        let (mut ws, _) = connect(&b.url(), Hs::bearer(&tokens::token("frank", 600)))
            .await
            .unwrap();
        next_json(&mut ws).await["type"] == "authenticated"
    })
    .await;
}

#[tokio::test]
async fn message_flood_gets_rate_limited_then_4029() {
    let deps = Deps::start();
    let gw = gateway(&deps, |c| {
        c.message_rate = Some(5);
        c.message_burst = Some(5);
    })
    .await;
    let (mut ws, _) = authed(&gw, "hank").await;
    for i in 0..200 {
        if ws
            .send(Message::text(json!({"type": "ping", "id": i}).to_string()))
            .await
            .is_err()
        {
            break;
        }
    }
    let (frames, code) = until_close(&mut ws).await;
    let pongs = frames.iter().filter(|f| f["type"] == "pong").count();
    let limited: Vec<_> = frames
        .iter()
        .filter(|f| f["code"] == "RATE_LIMITED")
        .collect();
    assert!((5..=7).contains(&pongs), "pongs: {pongs}");
    assert!(
        limited.len() >= 10,
        "rate-limited errors: {}",
        limited.len()
    );
    assert!(
        limited
            .iter()
            .all(|f| f["retry_after_ms"].as_u64().unwrap() > 0)
    );
    assert_eq!(code, Some(4029));
}

#[tokio::test]
async fn connect_rate_per_address_then_flood_429() {
    let deps = Deps::start();
    let gw = gateway(&deps, |c| {
        c.connect_rate_per_ip = Some(1);
        c.connect_burst_per_ip = Some(2);
    })
    .await;
    let t = tokens::token("ivan", 600);
    let mut saw_4029 = false;
    let mut saw_429 = false;
    for _ in 0..30 {
        match connect(&gw.url(), Hs::bearer(&t)).await {
            Ok((mut ws, _)) => {
                let (frames, code) = until_close_or_auth(&mut ws).await;
                if code == Some(4029) {
                    assert_eq!(frames[0]["code"], "RATE_LIMITED");
                    assert!(frames[0]["retry_after_ms"].as_u64().unwrap() > 0);
                    saw_4029 = true;
                }
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 429);
                assert!(r.headers().get("retry-after").is_some());
                saw_429 = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(saw_4029 && saw_429, "4029: {saw_4029}, 429: {saw_429}");
}

async fn until_close_or_auth(ws: &mut Ws) -> (Vec<serde_json::Value>, Option<u16>) {
    let first = next_json(ws).await;
    if first["type"] == "authenticated" {
        return (vec![first], None);
    }
    let (mut rest, code) = until_close(ws).await;
    rest.insert(0, first);
    (rest, code)
}

#[tokio::test]
async fn full_node_answers_1013() {
    let deps = Deps::start();
    let gw = gateway(&deps, |c| c.max_connections = Some(2)).await;
    let _a = authed(&gw, "judy").await;
    let _b = authed(&gw, "kim").await;
    let (mut ws, _) = connect(&gw.url(), Hs::bearer(&tokens::token("leo", 600)))
        .await
        .unwrap();
    expect_refusal(&mut ws, 1013, "OVERLOADED").await;
}

/// Failed api key attempts are limited per client address: past the burst every
/// request from that address, right key or not, is HTTP 429 with `Retry-After` and a
/// JSON body, and each failure is counted in a metric. Other addresses (here behind a
/// trusted proxy, in another IPv6 /64) are not affected.
#[tokio::test]
async fn failed_api_key_attempts_are_limited_per_address() {
    use gateway::limits::API_KEY_FAILURE_BURST;
    let deps = Deps::start();
    let gw = gateway(&deps, |c| c.trusted_proxies = Some("127.0.0.1/32".into())).await;
    let get = |key: &str, client: &str| {
        api()
            .get(gw.http("/v1/nodes"))
            .bearer_auth(key)
            .header("x-forwarded-for", client)
            .send()
    };
    let attacker = "2001:db8:1:2::10";
    for i in 0..API_KEY_FAILURE_BURST {
        let r = get(&format!("guess-{i}-0123456789abcdef"), attacker)
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "attempt {i}");
    }
    // The right key from the same /64 is refused too: no oracle past the limit.
    let r = get(API_KEY, "2001:db8:1:2::99").await.unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "RATE_LIMITED", "{body}");
    // Another client is served.
    let r = get(API_KEY, "2001:db8:1:3::10").await.unwrap();
    assert_eq!(r.status(), 200);
    let r = get(API_KEY, "198.51.100.7").await.unwrap();
    assert_eq!(r.status(), 200);
    // Metrics are process-wide and other tests fail keys too: at least ours counted.
    let m = gw.metrics().await;
    let value = |name: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        value("switchboard_api_key_failures_total ") >= f64::from(API_KEY_FAILURE_BURST),
        "{m}"
    );
    assert!(
        value("switchboard_rate_limited_total{scope=\"api_key\"} ") >= 1.0,
        "{m}"
    );
}
