//! SIGTERM on the real binary: readiness fails at once, every client gets `reconnect`
//! then 1012, the process exits 0.

use std::process::Stdio;
use std::time::{Duration, Instant};

use testkit::{free_port, tokens};

use crate::common::*;

#[tokio::test]
async fn sigterm_drains_every_client_and_exits_zero() {
    let deps = Deps::start();
    let (port, admin) = (free_port(), free_port());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SB_LISTEN", format!("127.0.0.1:{port}"))
        .env("SB_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("SB_NODE_ID", "drain-test")
        .env("SB_NATS_URL", deps.nats.url())
        .env("SB_REDIS_URL", deps.redis.url())
        .env("SB_REDIS_CLUSTER", deps.redis.is_cluster().to_string())
        .env("SB_JWT_SECRET", tokens::TEST_SECRET)
        .env("SB_DRAIN_SECS", "2")
        .env("SB_LOG_FORMAT", "text")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let readyz = format!("http://127.0.0.1:{admin}/readyz");
    eventually("binary ready", || async {
        reqwest::get(&readyz)
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    })
    .await;

    let url = format!("ws://127.0.0.1:{port}/ws");
    let mut clients = Vec::new();
    for i in 0..6 {
        let (mut ws, _) = connect(&url, Hs::bearer(&tokens::token(&format!("d{i}"), 600)))
            .await
            .unwrap();
        assert_eq!(next_json(&mut ws).await["type"], "authenticated");
        clients.push(ws);
    }
    let start = Instant::now();
    let pid = child.id().unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    eventually("readyz 503 during the drain", || async {
        reqwest::get(&readyz)
            .await
            .map(|r| r.status() == 503)
            .unwrap_or(true)
    })
    .await;
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "readiness must fail at once"
    );

    // Read every client at once: the drain closes them in its own order.
    let waits = clients.iter_mut().map(|ws| async move {
        let (frames, code) = until_close(ws).await;
        assert_eq!(code, Some(1012));
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(frames[0]["type"], "reconnect");
        assert!(frames[0]["retry_after_ms"].as_u64().is_some());
        start.elapsed()
    });
    let mut closed_at = futures_util::future::join_all(waits).await;
    // Spread over the window rather than all at once.
    closed_at.sort();
    let spread = *closed_at.last().unwrap() - closed_at[0];
    assert!(
        spread >= Duration::from_millis(1000),
        "closes spread over {spread:?}"
    );
    let status = tokio::time::timeout(WAIT * 2, child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn check_config_validates_and_names_bad_keys() {
    let bin = env!("CARGO_BIN_EXE_gateway");
    let run = |envs: &[(&str, &str)]| {
        let mut c = std::process::Command::new(bin);
        c.env_clear().arg("--check-config");
        for (k, v) in envs {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let ok = run(&[("SB_JWT_SECRET", tokens::TEST_SECRET)]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(!String::from_utf8_lossy(&ok.stdout).contains(tokens::TEST_SECRET));
    let bad = run(&[
        ("SB_JWT_SECRET", tokens::TEST_SECRET),
        ("SB_MAX_MESSAGE_BYTES", "nope"),
    ]);
    assert_eq!(bad.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("SB_MAX_MESSAGE_BYTES"));
    let typo = run(&[
        ("SB_JWT_SECRET", tokens::TEST_SECRET),
        ("SB_JWT_SECRE", "x"),
    ]);
    assert_eq!(typo.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&typo.stderr).contains("SB_JWT_SECRE"));
    let dir = tempfile_dir();
    let file = dir.join("gw.toml");
    std::fs::write(
        &file,
        format!(
            "jwt_secret = \"{}\"\nmax_mesage_bytes = 5\n",
            tokens::TEST_SECRET
        ),
    )
    .unwrap();
    let f = run(&[("SB_CONFIG", file.to_str().unwrap())]);
    assert_eq!(f.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&f.stderr).contains("max_mesage_bytes"),
        "{}",
        String::from_utf8_lossy(&f.stderr)
    );
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sbgw-{}", free_port()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
