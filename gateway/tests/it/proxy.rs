//! Client addresses behind load balancers: forwarding headers and PROXY headers count
//! only from trusted peers.

use serde_json::Value;
use testkit::tokens;
use tokio::io::AsyncWriteExt;

use crate::common::*;

async fn ip_of(gw: &Gw, user: &str) -> String {
    let v: Value = api_get(gw, &format!("/v1/users/{user}/connections")).await;
    v["connections"][0]["ip"].as_str().unwrap().to_owned()
}

fn xff(user: &str, value: &str) -> Hs {
    Hs {
        headers: vec![("x-forwarded-for".into(), value.into())],
        ..Hs::bearer(&tokens::token(user, 600))
    }
}

#[tokio::test]
async fn forwarded_for_counts_only_from_trusted_peers() {
    let deps = Deps::start();
    let trusting = gateway(&deps, |c| c.trusted_proxies = Some("127.0.0.0/8".into())).await;
    let (mut ws, _) = connect(&trusting.url(), xff("yara", "203.0.113.7"))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "authenticated");
    assert_eq!(ip_of(&trusting, "yara").await, "203.0.113.7");

    let wary = gateway(&deps, |c| c.trusted_proxies = Some("10.0.0.0/8".into())).await;
    let (mut ws, _) = connect(&wary.url(), xff("zack", "203.0.113.7"))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "authenticated");
    assert_eq!(ip_of(&wary, "zack").await, "127.0.0.1");

    // The per-address connect limit follows the resolved address: a spoofed header
    // from an untrusted peer does not buy a fresh bucket.
    let strict = gateway(&deps, |c| {
        c.connect_rate_per_ip = Some(1);
        c.connect_burst_per_ip = Some(1);
    })
    .await;
    let (mut ws, _) = connect(&strict.url(), xff("amy", "198.51.100.1"))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "authenticated");
    let (mut ws, _) = connect(&strict.url(), xff("amy", "198.51.100.2"))
        .await
        .unwrap();
    expect_refusal(&mut ws, 4029, "RATE_LIMITED").await;
}

#[tokio::test]
async fn proxy_protocol_header_from_a_trusted_balancer() {
    let deps = Deps::start();
    let gw = gateway(&deps, |c| {
        c.trusted_proxies = Some("127.0.0.1/32".into());
        c.proxy_protocol = Some(true);
    })
    .await;
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(b"PROXY TCP4 198.51.100.9 127.0.0.1 5555 8080\r\n")
        .await
        .unwrap();
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(gw.url())
            .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", tokens::token("bea", 600))
            .parse()
            .unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    let a = next_json(&mut ws).await;
    assert_eq!(a["type"], "authenticated");
    // The API port expects PROXY headers too now, so read the record from Redis.
    let conn_id = a["conn_id"].as_str().unwrap();
    let reply = deps
        .redis
        .command(&["ZRANGE", "sb:{u:bea}:conns", "0", "-1"])
        .unwrap();
    assert!(
        reply.contains(&format!("{conn_id}|")) && reply.contains("|198.51.100.9"),
        "{reply}"
    );

    // A trusted peer without a PROXY header is dropped before HTTP.
    let plain = connect(&gw.url(), Hs::bearer(&tokens::token("bea", 600))).await;
    assert!(plain.is_err());
}
