//! Logs and metrics setup: the process-wide Prometheus recorder (installed once, with
//! the upkeep the exporter needs) and the tracing subscriber (JSON in production).

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use crate::metrics as m;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Log output format.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line (production).
    Json,
    /// Human-readable lines (local development).
    Text,
}

/// Histogram samples are buffered until upkeep drains them; without it memory grows
/// while nobody scrapes: a recorder installed without the exporter's HTTP listener
/// gets no upkeep task of its own (docs/DESIGN.md#crate-pins-and-traps).
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's metrics handle, installing the recorder on first call. Several
/// gateways in one test process share it.
pub fn metrics_handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            // Full-name matchers win over suffix ones (metrics-exporter-prometheus).
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), m::LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(m::WORKER_REQUEST_SECONDS.into()),
                        m::DURATION_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(m::WORKER_FIRST_TOKEN_SECONDS.into()),
                        m::DURATION_BUCKETS,
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(h) => h,
                // Another recorder is installed (an embedding test): render an empty one.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// Runs exporter upkeep and refreshes process gauges until shutdown.
pub async fn upkeep(handle: PrometheusHandle, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        handle.run_upkeep();
        if let Some(rss) = m::process_rss_bytes() {
            metrics::gauge!(m::PROCESS_RSS_BYTES).set(rss as f64);
        }
    }
}

/// Installs the tracing subscriber for a binary. `SB_LOG` (or `RUST_LOG`) sets the
/// filter; async-nats logs every connection event at info, so it is kept at warn.
pub fn init_tracing(format: LogFormat) {
    let filter = std::env::var("SB_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info,async_nats=warn".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        // Colours only on a terminal: logs written to files stay plain text.
        LogFormat::Text => builder
            .with_ansi(std::io::stdout().is_terminal())
            .try_init(),
    };
}
