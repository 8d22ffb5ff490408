//! The admin port, kept off the public load balancer: `/healthz` (the process
//! answers), `/readyz` (NATS and Redis reachable and not draining), `/metrics`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Slowloris guard for the admin port.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub type Body = Full<Bytes>;

/// A JSON response with a status.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// What the admin endpoints report on; implemented by the gateway node and the worker.
pub trait Health: Send + Sync + 'static {
    /// Ready for traffic.
    fn ready(&self) -> bool;
    /// Details for the `/readyz` body.
    fn readiness(&self) -> serde_json::Value;
}

/// Serves the admin port until `shutdown`. It keeps answering during a drain so
/// orchestrators see `/readyz` 503 rather than a refused connection.
pub async fn serve(
    listener: TcpListener,
    health: Arc<dyn Health>,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let health = health.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let r = route(&req, &*health, &metrics);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn route(
    req: &Request<Incoming>,
    health: &dyn Health,
    metrics: &PrometheusHandle,
) -> Response<Body> {
    match req.uri().path() {
        "/healthz" => json_response(StatusCode::OK, &json!({"status": "ok"})),
        "/readyz" => {
            let status = if health.ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json_response(status, &health.readiness())
        }
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(metrics.render())));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        p => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": {"code": "NOT_FOUND", "message": format!("no route for {p}")}}),
        ),
    }
}
