//! Keeps the fault-injection harness from rotting inside the normal test run: builds
//! the binaries it drives (debug profile, a no-op when the workspace build made them),
//! then runs one real scenario (a gateway killed under load, the one that touches
//! HAProxy, reconnects, channel recovery, chat gap fill and history) at a reduced
//! size, and requires every check to pass. Needs nats-server, redis-server and
//! haproxy installed (scripts/faults and scripts/test install them).

use std::path::PathBuf;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_kill_scenario_passes_at_reduced_size() {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let status = Command::new(env!("CARGO"))
        .args(["build", "--locked", "-q"])
        .args(["-p", "switchboard-gateway", "-p", "switchboard-worker"])
        .args(["-p", "switchboard-loadtest"])
        .status()
        .expect("cargo runs");
    assert!(
        status.success(),
        "building gateway, worker and the stubs failed"
    );

    let report = tempfile::tempdir().expect("temp dir");
    let cli = faults::cli::Cli {
        size: faults::plan::Size::Ci,
        scenario: vec!["gateway-kill".into()],
        report: report.path().to_path_buf(),
        bin_dir: target.join("debug"),
        soak_secs: None,
        users: Some(60),
    };
    let pass = faults::run(cli).await.expect("the suite runs");
    let md = std::fs::read_to_string(report.path().join("report.md")).unwrap_or_default();
    assert!(pass, "gateway-kill failed:\n{md}");
    assert!(md.contains("| gateway-kill |"), "{md}");
}
