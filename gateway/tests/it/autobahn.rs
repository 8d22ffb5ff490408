//! RFC 6455 conformance: Autobahn cases 1-10 (12 and 13 are compression, which the
//! gateway does not negotiate) run by `kosoku` against an echo server built from the
//! gateway's own transport: the same upgrade, reader, writer, size caps and close
//! handling its connections use.

use std::convert::Infallible;
use std::path::PathBuf;

use bytes::Bytes;
use gateway::transport::{self, Inbound};
use http_body_util::Empty;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Autobahn's largest cases send 16 MiB messages.
const ECHO_MAX_MESSAGE: usize = 16 * 1024 * 1024 + 1024;

fn kosoku() -> PathBuf {
    if let Ok(p) = std::env::var("SB_KOSOKU") {
        return p.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/kosoku");
    if venv.is_file() {
        return venv;
    }
    panic!(
        "kosoku not found: run scripts/test (it installs it into .venv), or \
         `python3 -m venv .venv && .venv/bin/pip install kosoku`, or set SB_KOSOKU"
    );
}

async fn echo(fut: fastwebsockets::upgrade::UpgradeFut) {
    let Ok((mut reader, mut writer)) = transport::accept(fut, ECHO_MAX_MESSAGE).await else {
        return;
    };
    loop {
        let r = match reader.next().await {
            Ok(Inbound::Text(t)) => writer.send_text(&t).await,
            Ok(Inbound::Binary(b)) => writer.send_binary(&b).await,
            Ok(Inbound::Ping(p)) => writer.send_pong(&p).await,
            Ok(Inbound::Pong) => Ok(()),
            Ok(Inbound::Close(code, _)) => {
                transport::echo_close(&mut writer, code).await;
                return;
            }
            Err(e) => {
                if let Some(code) = e.close_code() {
                    transport::close(&mut reader, &mut writer, code.as_u16(), "").await;
                }
                return;
            }
        };
        if r.is_err() {
            return;
        }
    }
}

async fn serve(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc = service_fn(
                |mut req: hyper::Request<hyper::body::Incoming>| async move {
                    let (resp, fut) =
                        fastwebsockets::upgrade::upgrade(&mut req).expect("upgrade request");
                    tokio::spawn(echo(fut));
                    Ok::<_, Infallible>(resp.map(|_: Empty<Bytes>| Empty::<Bytes>::new()))
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autobahn_cases_1_to_10_pass() {
    let bin = kosoku();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener));
    let out = tempfile::tempdir().unwrap();
    let status = tokio::process::Command::new(&bin)
        .arg(addr.to_string())
        .args(["-x", "12.*", "-x", "13.*", "-p", "4", "-o"])
        .arg(out.path())
        .status()
        .await
        .expect("run kosoku");
    let index = std::fs::read_to_string(out.path().join("index.json")).expect("kosoku report");
    let report: serde_json::Value = serde_json::from_str(&index).unwrap();
    let mut failed = Vec::new();
    let mut total = 0;
    let mut tally = std::collections::BTreeMap::<String, usize>::new();
    for cases in report.as_object().unwrap().values() {
        for (case, result) in cases.as_object().unwrap() {
            total += 1;
            let behavior = result["behavior"].as_str().unwrap_or("?");
            let close = result["behaviorClose"].as_str().unwrap_or("?");
            *tally.entry(format!("{behavior}/{close}")).or_default() += 1;
            let ok = |b: &str| matches!(b, "OK" | "NON-STRICT" | "INFORMATIONAL");
            if !ok(behavior) || !ok(close) {
                failed.push(format!("{case}: {behavior}/{close}"));
            }
        }
    }
    eprintln!("autobahn verdicts (behavior/close): {tally:?}");
    assert!(total >= 290, "only {total} cases ran");
    assert!(failed.is_empty(), "failed cases: {failed:#?}");
    assert!(status.success(), "kosoku exit status {status}");
}
