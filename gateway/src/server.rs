//! The public port: accepts TCP (reading a PROXY header from trusted balancers when
//! enabled), serves HTTP/1.1 with hyper, routes `/ws` to the upgrade and `/v1/*` to
//! the API, and answers everything else with a JSON 404.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{HeaderValue, ORIGIN, RETRY_AFTER, SEC_WEBSOCKET_PROTOCOL};
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use shared::admin::Body;
use shared::protocol::SUBPROTOCOL;
use tokio::net::{TcpListener, TcpStream};

use crate::credentials;
use crate::error::{ApiError, SessionError};
use crate::limits::ConnectVerdict;
use crate::node::Node;
use crate::session::{self, Upgrade};
use crate::{api, proxy};

/// Slowloris guard: the request head must arrive within this time.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted (hyper answers 431 beyond): tokens in a query or
/// subprotocol fit easily; megabyte headers are an attack.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// A trusted balancer sends its PROXY header at once; waiting longer is a stuck peer.
pub const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after an accept error (EMFILE and friends) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts connections until shutdown; each is served on its own task.
pub async fn accept_loop(node: Arc<Node>, listener: TcpListener) {
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = node.life.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        let node2 = node.clone();
        node.life
            .tasks
            .spawn(async move { serve_tcp(node2, stream, peer).await });
    }
    // Dropping the listener here refuses new connections while the drain runs.
}

async fn serve_tcp(node: Arc<Node>, mut stream: TcpStream, socket_peer: SocketAddr) {
    let accepted = Instant::now();
    let _ = stream.set_nodelay(true);
    let peer =
        if node.config.proxy_protocol && node.config.trusted_proxies.contains(socket_peer.ip()) {
            match proxy::read_proxy_header(&mut stream, PROXY_HEADER_TIMEOUT).await {
                Ok(Some(source)) => source,
                Ok(None) => socket_peer,
                Err(e) => {
                    tracing::debug!(error = %e, %socket_peer, "bad PROXY header");
                    return;
                }
            }
        } else {
            socket_peer
        };
    let svc_node = node.clone();
    let service = service_fn(move |req| {
        let node = svc_node.clone();
        async move { Ok::<_, Infallible>(route(node, req, peer, accepted).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // `max_buf_size` alone is not a head limit: hyper reads into whatever the
        // buffer has room for, and heads of about twice the size got through.
        .max_header_size(MAX_HEADER_BYTES)
        .max_buf_size(MAX_HEADER_BYTES);
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "http connection error");
            }
        }
        _ = node.life.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(HEADER_READ_TIMEOUT, conn).await;
        }
    }
}

async fn route(
    node: Arc<Node>,
    req: Request<Incoming>,
    peer: SocketAddr,
    accepted: Instant,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/ws") => ws_upgrade(node, req, peer, accepted),
        (_, "/ws") => api::error_response(&ApiError::MethodNotAllowed("use GET for /ws".into())),
        (_, p) if p.starts_with("/v1/") => api::handle(node, req, peer.ip()).await,
        _ => api::error_response(&ApiError::NotFound(format!("no route for {path}"))),
    }
}

fn ws_upgrade(
    node: Arc<Node>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    accepted: Instant,
) -> Response<Body> {
    if node.is_draining() {
        return api::error_response(&ApiError::Draining);
    }
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return api::error_response(&ApiError::BadRequest(
            "expected a WebSocket upgrade (Connection: upgrade, Upgrade: websocket)".into(),
        ));
    }
    if let Some(origin) = req.headers().get(ORIGIN) {
        let allowed = origin.to_str().is_ok_and(|o| node.config.origins.allows(o));
        if !allowed {
            metrics::counter!(shared::metrics::CONNECTS, "result" => "forbidden_origin")
                .increment(1);
            return api::error_response(&ApiError::ForbiddenOrigin);
        }
    }
    let ip = proxy::client_ip(peer.ip(), req.headers(), &node.config.trusted_proxies);
    let mut refusal = match node.limits.connect.check(ip, Instant::now()) {
        ConnectVerdict::Allow => None,
        ConnectVerdict::Limited(wait) => {
            metrics::counter!(shared::metrics::RATE_LIMITED, "scope" => "connect").increment(1);
            Some(SessionError::ConnectRateLimited(wait))
        }
        ConnectVerdict::Flood(wait) => {
            metrics::counter!(shared::metrics::RATE_LIMITED, "scope" => "connect").increment(1);
            metrics::counter!(shared::metrics::CONNECTS, "result" => "flood").increment(1);
            let mut resp = api::error_response(&ApiError::TooManyRequests(wait));
            let secs = wait.as_secs().max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(RETRY_AFTER, v);
            }
            return resp;
        }
    };
    // The slot is held from here; `session::serve` (or the failure below) releases it.
    if !node.sockets.reserve() {
        // Over capacity we still upgrade so the client learns 1013 and backs off; the
        // socket is short-lived.
        node.sockets.reserve_over_cap();
        refusal = refusal.or(Some(SessionError::Overloaded));
    }
    let hs = credentials::extract(req.headers(), req.uri().query());
    let (resp, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(x) => x,
        Err(e) => {
            node.sockets.release();
            return api::error_response(&ApiError::BadRequest(format!("bad upgrade request: {e}")));
        }
    };
    let up = Box::new(Upgrade {
        ip,
        started: accepted,
        token: hs.token,
        refusal,
    });
    let node2 = node.clone();
    node.life
        .tasks
        .spawn(async move { session::serve(node2, fut, up).await });

    let (mut parts, _) = resp.into_parts();
    if hs.select_subprotocol {
        parts.headers.insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    Response::from_parts(parts, Full::default())
}
