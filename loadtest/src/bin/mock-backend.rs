//! `mock-backend`: a STUB team backend for local runs, tests and benchmarks. It
//! answers `GET /api/users/<id>/teams` and `/tasks` with fixed JSON lists, with a
//! configurable latency and failure rate (HTTP 503).

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use testkit::backend::BackendStub;

#[derive(Parser, Debug)]
#[command(name = "mock-backend", about = "STUB team backend (teams and tasks)")]
struct Args {
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1:18091")]
    listen: String,
    /// Added latency per call, ms.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Share of calls answered 503.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Teams every user gets (JSON array of objects with `id`).
    #[arg(long, default_value = r#"[{"id":"team-1","name":"Team One"}]"#)]
    teams: String,
    /// Tasks every user gets (JSON array of objects with `id`).
    #[arg(long, default_value = r#"[{"id":"task-1","title":"Write tests"}]"#)]
    tasks: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    anyhow::ensure!(
        (0.0..=1.0).contains(&a.fail_rate),
        "--fail-rate must be between 0 and 1"
    );
    let teams: serde_json::Value = serde_json::from_str(&a.teams).context("--teams is not JSON")?;
    let tasks: serde_json::Value = serde_json::from_str(&a.tasks).context("--tasks is not JSON")?;
    anyhow::ensure!(
        teams.is_array() && tasks.is_array(),
        "--teams and --tasks must be JSON arrays"
    );
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("--listen {}", a.listen))?;
    let stub = BackendStub::start_on(listener);
    stub.set_teams(teams);
    stub.set_tasks(tasks);
    stub.set_latency(Duration::from_millis(a.latency_ms));
    stub.set_fail_rate(a.fail_rate);
    println!(
        "mock-backend (a STUB team backend) listening on {}",
        stub.url()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
