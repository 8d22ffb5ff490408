//! NATS and Redis that trust nobody by default: a NATS server with TLS and the users
//! and permissions of `deploy/nats/permissions.conf`, a Redis with TLS and the ACL of
//! `deploy/redis/users.acl`. Gateways and workers work through them with their own
//! credentials; a client without credentials gets nothing from either, and the
//! gateway's user cannot read the user-context requests meant for workers.

use std::time::Duration;

use serde_json::json;
use testkit::backend::BackendStub;
use testkit::llm::{LlmStub, Reply, Script};
use testkit::tls::TestCa;
use testkit::{Nats, Redis};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::common::*;

const GATEWAY_PASSWORD: &str = "gateway-nats-password";
const WORKER_PASSWORD: &str = "worker-nats-password";
const REDIS_PASSWORD: &str = "redis-acl-password";

fn repo_file(path: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

struct Secured {
    ca: TestCa,
    nats: Nats,
    /// Kept alive for the test; reached on its TLS port.
    _redis: Redis,
    redis_tls_port: u16,
}

impl Secured {
    fn start() -> Secured {
        let ca = TestCa::new().expect("test CA");
        let config = format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\nauthorization {{\n{}\n}}\n",
            ca.cert.display(),
            ca.key.display(),
            repo_file("deploy/nats/permissions.conf"),
        );
        let nats = Nats::start_with_config(
            &config,
            &[
                ("SB_NATS_GATEWAY_PASSWORD", GATEWAY_PASSWORD),
                ("SB_NATS_WORKER_PASSWORD", WORKER_PASSWORD),
            ],
        )
        .expect("nats-server with TLS and users");
        let acl = repo_file("deploy/redis/users.acl")
            .replace(">CHANGE-ME", &format!(">{REDIS_PASSWORD}"));
        let acl_dir = tempfile::tempdir().unwrap();
        let acl_path = acl_dir.path().join("users.acl");
        std::fs::write(&acl_path, acl).unwrap();
        let redis_tls_port = testkit::free_port();
        let port = redis_tls_port.to_string();
        let redis = Redis::start_with(&[
            "--aclfile",
            acl_path.to_str().unwrap(),
            "--tls-port",
            &port,
            "--tls-cert-file",
            ca.cert.to_str().unwrap(),
            "--tls-key-file",
            ca.key.to_str().unwrap(),
            "--tls-ca-cert-file",
            ca.ca.to_str().unwrap(),
            "--tls-auth-clients",
            "no",
        ])
        .expect("redis-server with TLS and ACL");
        // The ACL file is read at start; the directory may go.
        drop(acl_dir);
        Secured {
            ca,
            nats,
            _redis: redis,
            redis_tls_port,
        }
    }

    fn nats_url(&self, user: &str, password: &str) -> String {
        format!("tls://{user}:{password}@127.0.0.1:{}", self.nats.port)
    }

    fn redis_url(&self) -> String {
        format!(
            "rediss://switchboard:{REDIS_PASSWORD}@127.0.0.1:{}",
            self.redis_tls_port
        )
    }
}

#[tokio::test]
async fn gateways_and_workers_work_through_authenticated_tls_nats_and_redis() {
    let s = Secured::start();
    let llm = LlmStub::start().await;
    llm.set_default(Script::Reply(Reply::numbered(5)));
    let backend = BackendStub::start().await;
    backend.set_teams(json!([{"id": "t1", "name": "Core"}]));

    // A worker with its own NATS user.
    let worker = worker::RawConfig {
        cluster: shared::config::ClusterArgs {
            node_id: Some(format!("w-{}", testkit::free_port())),
            nats_url: Some(s.nats_url("worker", WORKER_PASSWORD)),
            nats_tls_ca: Some(s.ca.ca.clone()),
            redis_url: Some(s.redis_url()),
            redis_tls_ca: Some(s.ca.ca.clone()),
            ..Default::default()
        },
        llm_base_url: Some(llm.base_url()),
        backend_url: Some(backend.url()),
        ack_wait_secs: Some(5),
        shutdown_grace_secs: Some(2),
        ..worker::RawConfig::default()
    }
    .validate()
    .expect("worker config");
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let stop = CancellationToken::new();
    let s2 = stop.clone();
    let w = tokio::spawn(async move { worker::run(admin, worker, s2).await.expect("worker") });
    eventually("worker ready", || async {
        reqwest::get(format!("http://{admin_addr}/readyz"))
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    })
    .await;

    // A gateway with its own NATS user.
    let raw = gateway::RawConfig {
        cluster: shared::config::ClusterArgs {
            nats_url: Some(s.nats_url("gateway", GATEWAY_PASSWORD)),
            nats_tls_ca: Some(s.ca.ca.clone()),
            redis_url: Some(s.redis_url()),
            redis_tls_ca: Some(s.ca.ca.clone()),
            node_id: Some(format!("gw-{}", testkit::free_port())),
            ..Default::default()
        },
        jwt_secret: Some(testkit::tokens::TEST_SECRET.into()),
        api_key: Some(API_KEY.into()),
        public_namespaces: Some("news".into()),
        drain_secs: Some(1),
        ..gateway::RawConfig::default()
    };
    let gw = start_gateway(raw).await;

    // Auth (Redis registry over TLS), teams from the backend through a worker (NATS
    // request/reply with both users), a chat streamed back, a channel round trip.
    let (mut ws, auth) = authed(&gw, "sam").await;
    assert_eq!(
        auth["teams"],
        json!([{"id": "t1", "name": "Core"}]),
        "{auth}"
    );
    assert_eq!(auth["degraded"], false);
    send_json(&mut ws, json!({"type": "chat.send", "message": "hi"})).await;
    assert_eq!(
        next_matching(&mut ws, |f| f["type"] == "ack").await["type"],
        "ack"
    );
    let done = next_matching(&mut ws, |f| f["type"] == "chat.complete").await;
    assert_eq!(done["content"], Reply::numbered(5).text().as_str());
    send_json(
        &mut ws,
        json!({"type": "subscribe", "channel": "news:x", "id": 1}),
    )
    .await;
    next_matching(&mut ws, |f| f["type"] == "subscribed").await;
    send_json(
        &mut ws,
        json!({"type": "publish", "channel": "news:x", "data": 1, "id": 2}),
    )
    .await;
    assert_eq!(
        next_matching(&mut ws, |f| f["type"] == "message").await["data"],
        1
    );

    // Without credentials NATS refuses the connection.
    let anon = async_nats::ConnectOptions::new()
        .add_root_certificates(s.ca.ca.clone())
        .require_tls(true)
        .connect(format!("tls://127.0.0.1:{}", s.nats.port))
        .await;
    assert!(anon.is_err(), "an anonymous NATS client was let in");
    // The gateway's user may not read what only workers may: the user-context
    // requests (user ids, and the token when forwarding is on).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let spy = async_nats::ConnectOptions::new()
        .user_and_password("gateway".into(), GATEWAY_PASSWORD.into())
        .add_root_certificates(s.ca.ca.clone())
        .require_tls(true)
        .event_callback(move |e| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(e.to_string());
            }
        })
        .connect(format!("tls://127.0.0.1:{}", s.nats.port))
        .await
        .expect("the gateway's user connects");
    let _sub = spy.subscribe("sb.rpc.user_context").await.unwrap();
    let _ = spy.flush().await;
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(e) = rx.recv().await {
            if e.to_lowercase().contains("permissions violation") {
                return e;
            }
        }
        String::new()
    })
    .await
    .expect("a permissions violation");
    assert!(refused.contains("sb.rpc.user_context"), "{refused}");

    // Redis: the default user is off, and the gateways' user has only `sb:` keys.
    let anon = redis::Client::build_with_tls(
        format!("rediss://127.0.0.1:{}", s.redis_tls_port),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(&s.ca.ca).unwrap()),
        },
    )
    .unwrap();
    let mut c = anon.get_multiplexed_async_connection().await.unwrap();
    let r: redis::RedisResult<Option<String>> =
        redis::cmd("GET").arg("sb:x").query_async(&mut c).await;
    assert!(r.is_err(), "the default user read a key");
    let user = redis::Client::build_with_tls(
        s.redis_url(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(&s.ca.ca).unwrap()),
        },
    )
    .unwrap();
    let mut c = user.get_multiplexed_async_connection().await.unwrap();
    let outside: redis::RedisResult<Option<String>> =
        redis::cmd("GET").arg("other:x").query_async(&mut c).await;
    assert!(outside.is_err(), "a key outside the prefix was readable");
    let admin: redis::RedisResult<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("dir")
        .query_async(&mut c)
        .await;
    assert!(admin.is_err(), "CONFIG was allowed");

    stop.cancel();
    let _ = w.await;
}
