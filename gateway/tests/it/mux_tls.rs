//! The subscription multiplexer over `tls://`: against a NATS server that takes TLS
//! connections only, the mux upgrades after `INFO`, verifies the server against
//! `SB_NATS_TLS_CA` and delivers, on its own and inside a gateway (which is ready
//! only once its mux is connected).

use std::sync::Arc;

use gateway::mux::{Deliver, Msg, Mux, Topic};
use serde_json::json;
use testkit::tls::TestCa;
use testkit::{Nats, TestRedis};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::common::*;

/// A NATS server that refuses plain connections.
fn tls_only_nats(ca: &TestCa) -> Nats {
    let config = format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n",
        ca.cert.display(),
        ca.key.display(),
    );
    Nats::start_with_config(&config, &[]).expect("nats-server with TLS")
}

/// Hands what the mux delivers to the test.
struct Forward(mpsc::UnboundedSender<(String, Msg)>);

impl Deliver for Forward {
    fn deliver(&self, topic: &Topic, msg: Msg) {
        let name = match topic {
            Topic::User(u) | Topic::Channel(u) => u.to_string(),
        };
        let _ = self.0.send((name, msg));
    }
}

#[tokio::test]
async fn mux_subscribes_and_receives_over_tls() {
    shared::auth::install_crypto_provider();
    let ca = TestCa::new().expect("test CA");
    let nats = tls_only_nats(&ca);
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let servers = gateway::mux::servers_from(&shared::config::parse_nats_servers(&url).unwrap())
        .expect("tls:// is spoken by the mux");
    assert!(servers[0].tls);
    let tls = gateway::mux::tls_connector(Some(&ca.ca)).expect("CA loads");
    let mux = Mux::new(servers, "mux-tls-test".into(), Some(tls));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let task = tokio::spawn(mux.clone().run(Arc::new(Forward(tx)), stop.clone()));
    mux.subscribe("t.tls".into(), Topic::Channel("t".into()));
    mux.flush(WAIT)
        .await
        .expect("the TLS server confirms the SUB");
    assert!(mux.is_connected());

    let publisher = async_nats::ConnectOptions::new()
        .add_root_certificates(ca.ca.clone())
        .require_tls(true)
        .connect(&url)
        .await
        .expect("async-nats over TLS");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Sb-Offset", "7");
    publisher
        .publish_with_headers("t.tls", headers, "over tls".into())
        .await
        .unwrap();
    publisher.flush().await.unwrap();
    let (topic, msg) = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("delivered in time")
        .expect("mux running");
    assert_eq!(topic, "t");
    assert_eq!(&msg.payload[..], b"over tls");
    assert_eq!(msg.headers.offset, Some(7));

    // Without the test CA the server's certificate is not trusted: no connection.
    let untrusted = Mux::new(
        gateway::mux::servers_from(&shared::config::parse_nats_servers(&url).unwrap()).unwrap(),
        "mux-untrusted".into(),
        Some(gateway::mux::tls_connector(Some(&ca.cert)).expect("a PEM certificate")),
    );
    let (tx2, _rx2) = mpsc::unbounded_channel();
    let t2 = tokio::spawn(untrusted.clone().run(Arc::new(Forward(tx2)), stop.clone()));
    assert!(
        untrusted
            .flush(std::time::Duration::from_millis(500))
            .await
            .is_err()
    );
    assert!(!untrusted.is_connected());
    stop.cancel();
    task.await.unwrap();
    t2.await.unwrap();
}

#[tokio::test]
async fn gateway_delivers_a_channel_publication_through_tls_only_nats() {
    let ca = TestCa::new().expect("test CA");
    let deps = Deps {
        nats: tls_only_nats(&ca),
        redis: TestRedis::start().expect("redis-server"),
    };
    // Ready means the mux is connected: its `tls://` handshake succeeded.
    let gw = gateway(&deps, |raw| {
        raw.cluster.nats_url = Some(format!("tls://127.0.0.1:{}", deps.nats.port));
        raw.cluster.nats_tls_ca = Some(ca.ca.clone());
        raw.public_namespaces = Some("news".into());
    })
    .await;
    let (mut ws, _) = authed(&gw, "tess").await;
    send_json(
        &mut ws,
        json!({"type": "subscribe", "channel": "news:tls", "id": 1}),
    )
    .await;
    next_matching(&mut ws, |f| f["type"] == "subscribed").await;
    let published = api()
        .post(gw.http("/v1/publish"))
        .bearer_auth(API_KEY)
        .json(&json!({"channel": "news:tls", "data": {"n": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(published.status(), 200, "{:?}", published.text().await);
    let msg = next_matching(&mut ws, |f| f["type"] == "message").await;
    assert_eq!(msg["channel"], "news:tls");
    assert_eq!(msg["data"], json!({"n": 1}));
    gw.stop().await;
}
