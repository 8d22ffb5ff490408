//! The Rust client (`clients/rust`) against real gateways: it resumes channels on
//! another node without gaps or duplicates, follows the close-code rules (stops after
//! 45xx, a new token after 4001), refreshes its token before expiry, and sees every
//! chat reply exactly once across a reconnect.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use switchboard_client::{
    ChatEvent, Client, Delivery, Event, Events, Options, Status, TokenError, TokenReason, connect,
};
use testkit::backend::BackendStub;
use testkit::llm::{LlmStub, Reply, Script};
use testkit::tokens;

use crate::common::*;
use crate::e2e_chat::worker;

/// Fast reconnects: the tests wait for them.
fn options(urls: &[String], user: &'static str) -> Options {
    let mut o = Options::new(urls[0].clone(), move |_| async move {
        Ok(tokens::token(user, 3600))
    })
    .with_urls(urls[1..].iter().cloned());
    o.backoff_base = Duration::from_millis(50);
    o.backoff_cap = Duration::from_millis(200);
    o
}

/// The next event that `pick` takes, skipping the others.
async fn next_event<T>(events: &mut Events, mut pick: impl FnMut(Event) -> Option<T>) -> T {
    let wait = async {
        loop {
            let e = events.recv().await.expect("the client stopped");
            if let Some(t) = pick(e) {
                return t;
            }
        }
    };
    tokio::time::timeout(WAIT * 2, wait)
        .await
        .expect("event in time")
}

async fn kick(gw: &Gw, user: &str, code: u16) {
    let body = json!({"user_id": user, "code": code});
    assert_eq!(api_post(gw, "/v1/disconnect", &body).await.0, 200);
}

async fn publish(gw: &Gw, channel: &str, n: u64) {
    let body = json!({"channel": channel, "data": {"n": n}});
    assert_eq!(api_post(gw, "/v1/publish", &body).await.0, 200);
}

async fn node_of(client: &Client) -> String {
    client.ready().await.expect("authenticated").node
}

#[tokio::test]
async fn a_channel_resumes_on_another_gateway_without_gaps_or_duplicates() {
    let deps = Deps::start();
    let public = |c: &mut gateway::RawConfig| c.public_namespaces = Some("news".into());
    let (a, b) = (gateway(&deps, public).await, gateway(&deps, public).await);
    let (client, mut events) = connect(options(&[a.url(), b.url()], "rita"));
    assert_eq!(node_of(&client).await, a.node_id);
    let sub = client.subscribe("news:x").await.unwrap();
    assert_eq!(sub.offset, 0);
    for n in 1..=3 {
        publish(&a, "news:x", n).await;
    }
    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.push(
            next_event(&mut events, |e| match e {
                Event::Message { offset, .. } => Some(offset),
                _ => None,
            })
            .await,
        );
    }

    // Kicked with a "reconnect with backoff" code: the client goes to the next URL.
    kick(&a, "rita", 4000).await;
    next_event(&mut events, |e| {
        matches!(
            e,
            Event::Status(Status::Reconnecting {
                code: Some(4000),
                ..
            })
        )
        .then_some(())
    })
    .await;
    for n in 4..=6 {
        publish(&a, "news:x", n).await;
    }
    let resumed = next_event(&mut events, |e| match e {
        Event::Subscribed {
            since, recovered, ..
        } => Some((since, recovered)),
        Event::Message { offset, .. } => {
            seen.push(offset);
            None
        }
        _ => None,
    })
    .await;
    assert_eq!(
        resumed,
        (Some(3), true),
        "resumed after 3, the gap replayed"
    );
    assert_eq!(node_of(&client).await, b.node_id);
    publish(&b, "news:x", 7).await;
    while seen.len() < 7 {
        seen.push(
            next_event(&mut events, |e| match e {
                Event::Message { offset, .. } => Some(offset),
                _ => None,
            })
            .await,
        );
    }
    assert_eq!(seen, (1..=7).collect::<Vec<u64>>(), "in order, once each");
    assert_eq!(client.publish("news:x", json!("mine")).await.unwrap(), 8);
    assert_eq!(
        client.stats(),
        switchboard_client::Stats::default(),
        "no repeats"
    );
    client.close().await;
    assert_eq!(client.status(), Status::Stopped(None));
}

#[tokio::test]
async fn a_4503_stops_the_client_for_good() {
    let deps = Deps::start();
    let gw = gateway(&deps, |_| {}).await;
    let (client, mut events) = connect(options(&[gw.url()], "sam"));
    client.ready().await.unwrap();
    kick(&gw, "sam", 4503).await;
    let why = next_event(&mut events, |e| match e {
        Event::Status(Status::Stopped(why)) => Some(why),
        Event::Status(Status::Reconnecting { .. }) => panic!("no reconnect after 4503"),
        _ => None,
    })
    .await;
    assert!(why.unwrap().contains("4503"));
    assert!(client.ready().await.is_err());
    assert!(matches!(
        client.publish("user:sam", json!(1)).await,
        Err(switchboard_client::ClientError::Stopped(_))
    ));
    eventually("no connection of sam left", || async {
        api_get(&gw, "/v1/users/sam/connections").await["connections"]
            .as_array()
            .is_some_and(|c| c.is_empty())
    })
    .await;
}

#[tokio::test]
async fn tokens_are_refreshed_before_expiry_and_replaced_after_a_4001() {
    let deps = Deps::start();
    let gw = gateway(&deps, |c| c.jwt_leeway_secs = Some(0)).await;
    let asked: Arc<std::sync::Mutex<Vec<TokenReason>>> = Arc::default();
    let refreshes = Arc::new(AtomicUsize::new(0));
    let (log, count) = (asked.clone(), refreshes.clone());
    // Every token lives 2 s; the first refresh is served, later ones fail (retryable),
    // so the token runs out and the server closes 4001.
    let mut opts = Options::new(gw.url(), move |reason| {
        log.lock().unwrap().push(reason);
        let refused = reason == TokenReason::Refresh && count.fetch_add(1, Ordering::SeqCst) > 0;
        async move {
            if refused {
                Err(TokenError::retryable("sign-in service busy"))
            } else {
                Ok(tokens::token("tom", 2))
            }
        }
    });
    opts.backoff_base = Duration::from_millis(50);
    opts.refresh_retry = Duration::from_secs(60);
    let (client, mut events) = connect(opts);
    let first = client.ready().await.unwrap();
    let refreshed = next_event(&mut events, |e| match e {
        Event::Refreshed { expires_at } => Some(expires_at),
        _ => None,
    })
    .await;
    assert!(refreshed >= first.expires_at);
    let code = next_event(&mut events, |e| match e {
        Event::Status(Status::Reconnecting { code, .. }) => Some(code),
        _ => None,
    })
    .await;
    assert_eq!(code, Some(4001));
    let second = next_event(&mut events, |e| match e {
        Event::Status(Status::Authenticated(info)) => Some(info),
        _ => None,
    })
    .await;
    assert_ne!(second.conn_id, first.conn_id);
    let reasons = asked.lock().unwrap().clone();
    assert_eq!(reasons[0], TokenReason::Connect);
    assert!(reasons.contains(&TokenReason::Refresh));
    assert_eq!(
        reasons
            .iter()
            .filter(|r| **r == TokenReason::Expired)
            .count(),
        1,
        "after 4001 the source is asked for a new token once: {reasons:?}"
    );
    client.close().await;
}

#[tokio::test]
async fn a_chat_reply_arrives_exactly_once_across_a_reconnect() {
    let deps = Deps::start();
    let llm = LlmStub::start().await;
    let reply = Reply::numbered(30).token_delay(Duration::from_millis(20));
    llm.set_default(Script::Reply(reply.clone()));
    let backend = BackendStub::start().await;
    let _w = worker(&deps, &llm, &backend).await;
    let (a, b) = (gateway(&deps, |_| {}).await, gateway(&deps, |_| {}).await);
    let mut opts = options(&[a.url(), b.url()], "uma");
    // Away for 1-2 s, longer than the rest of the reply takes: the final frame is
    // missed live and must be read from history.
    opts.backoff_base = Duration::from_secs(2);
    opts.backoff_cap = Duration::from_secs(2);
    let (client, mut events) = connect(opts);
    client.ready().await.unwrap();

    // One reply streams live; the connection is cut while a second one streams.
    let first = client.chat_send("count", None).await.unwrap();
    let done = next_event(&mut events, |e| match e {
        Event::Chat(ChatEvent::Complete {
            request_id,
            content,
            delivery,
            ..
        }) if request_id == first.request_id => Some((content, delivery)),
        _ => None,
    })
    .await;
    assert_eq!(done, (reply.text(), Delivery::Live));
    let second = client
        .chat_send("count again", Some(&first.session_id))
        .await
        .unwrap();
    next_event(&mut events, |e| {
        matches!(e, Event::Chat(ChatEvent::Chunk { .. })).then_some(())
    })
    .await;
    kick(&a, "uma", 4000).await;

    let mut completes = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(8);
    while let Ok(Some(e)) = tokio::time::timeout_at(until, events.recv()).await {
        if let Event::Chat(ChatEvent::Complete {
            request_id,
            content,
            delivery,
            ..
        }) = e
        {
            completes.push((request_id, content, delivery));
        }
    }
    assert_eq!(
        completes,
        vec![(
            second.request_id.clone(),
            reply.text(),
            Delivery::AfterReconnect
        )],
        "the second reply once, from history; the first not again"
    );
    let history = client.history(&first.session_id, None).await.unwrap();
    assert_eq!(history.len(), 4, "two exchanges, each once: {history:?}");
    client.close().await;
}

/// A TLS front (what a load balancer does) for a gateway: the server certificate of
/// `ca`, every connection copied to the gateway.
async fn tls_front(gateway: std::net::SocketAddr, ca: &testkit::tls::TestCa) -> u16 {
    use tokio_rustls::rustls::ServerConfig;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&ca.cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(&ca.key).unwrap();
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Ok(mut up) = tokio::net::TcpStream::connect(gateway).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn wss_works_with_the_trusted_ca_and_fails_with_the_system_roots() {
    let deps = Deps::start();
    let gw = gateway(&deps, |_| {}).await;
    let ca = testkit::tls::TestCa::new().unwrap();
    let port = tls_front(gw.addr, &ca).await;
    let url = format!("wss://localhost:{port}/ws");

    let mut opts = options(std::slice::from_ref(&url), "vic");
    opts.tls_ca = Some(std::fs::read(&ca.ca).unwrap());
    let (client, _events) = connect(opts);
    assert_eq!(client.ready().await.unwrap().node, gw.node_id);
    assert!(client.publish("user:vic", json!("over tls")).await.unwrap() >= 1);
    client.close().await;

    // The test CA is not a system root: the handshake fails and the client says why.
    let (client, mut events) = connect(options(&[url], "vic"));
    let why = next_event(&mut events, |e| match e {
        Event::Status(Status::Reconnecting { reason, .. }) => Some(reason),
        Event::Status(Status::Authenticated(_)) => panic!("an untrusted server was accepted"),
        _ => None,
    })
    .await;
    assert!(why.contains("TLS") && why.contains("certificate"), "{why}");
    client.close().await;
}
