//! The stand-in's HTTP server: the accept loop (bounded connections, graceful stop)
//! and the routes — login, teams, tasks, the demo page's files, `/healthz`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::{Value, json};
use shared::auth::Validator;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::assets::{AssetError, Assets};
use crate::config::Config;
use crate::directory;
use crate::token::Issuer;
use crate::user::UserName;

/// Slowloris guard: a client has this long to send its request headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A login body arrives in one packet; a slow one is a stuck client.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// `{"user":"..."}` is a few dozen bytes.
pub const MAX_LOGIN_BODY_BYTES: usize = 4 * 1024;
/// Connections served at once; more wait in the listen backlog. A demo has a handful.
pub const MAX_CONNECTIONS: usize = 1024;
/// In-flight requests get this long to finish after shutdown is asked for.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Back-off after a failed `accept` (e.g. out of descriptors), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

type Body = Full<Bytes>;

/// Why the server stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("the token validator cannot be built: {0}")]
    Key(#[from] shared::auth::KeyError),
}

struct App {
    issuer: Issuer,
    validator: Validator,
    assets: Assets,
}

/// Serves on `listener` until `shutdown` is cancelled, then lets in-flight requests
/// finish (up to [`DRAIN_TIMEOUT`]).
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let app = Arc::new(App {
        issuer: Issuer::new(&config.secret, config.token_ttl),
        validator: Validator::new(&config.jwt_settings())?,
        assets: Assets::new(config.static_dir.clone()),
    });
    if !config.static_dir.is_dir() {
        tracing::warn!(dir = %config.static_dir.display(), "static directory missing: the demo page answers 404");
    }
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let app = app.clone();
        let stop = shutdown.clone();
        conns.spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(handle(&app, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN_TIMEOUT, conn).await;
                }
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
    Ok(())
}

async fn handle(app: &App, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = route(app, req).await;
    tracing::debug!(%method, %path, status = resp.status().as_u16(), "request");
    resp
}

async fn route(app: &App, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/healthz" => only(&req, &[Method::GET, Method::HEAD])
            .unwrap_or_else(|| json_response(StatusCode::OK, &json!({"status": "ok"}))),
        "/api/auth/login" => match only(&req, &[Method::POST]) {
            Some(r) => r,
            None => login(app, req).await,
        },
        p if p.starts_with("/api/") => match user_list_route(p) {
            Some((user, list)) => match only(&req, &[Method::GET]) {
                Some(r) => r,
                None => user_list(app, &req, user, list),
            },
            None => error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such API route"),
        },
        p => match app.assets.resolve(p) {
            Err(AssetError::NoRoute) => error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such route"),
            _ => match only(&req, &[Method::GET, Method::HEAD]) {
                Some(r) => r,
                None => static_file(app, p).await,
            },
        },
    }
}

/// `None` when the method is allowed, else the 405 answer.
fn only(req: &Request<Incoming>, allowed: &[Method]) -> Option<Response<Body>> {
    if allowed.contains(req.method()) {
        return None;
    }
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        &format!("{} is not allowed here", req.method()),
    );
    let list = allowed
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if let Ok(v) = HeaderValue::from_str(&list) {
        r.headers_mut().insert(header::ALLOW, v);
    }
    Some(r)
}

#[derive(Deserialize)]
struct LoginRequest {
    user: String,
}

async fn login(app: &App, req: Request<Incoming>) -> Response<Body> {
    let body = Limited::new(req.into_body(), MAX_LOGIN_BODY_BYTES);
    let bytes = match tokio::time::timeout(BODY_READ_TIMEOUT, body.collect()).await {
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "BAD_REQUEST",
                "the request body did not arrive in time",
            );
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "TOO_LARGE",
                &format!("the body is larger than {MAX_LOGIN_BODY_BYTES} bytes"),
            );
        }
        Ok(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                "the request body could not be read",
            );
        }
        Ok(Ok(c)) => c.to_bytes(),
    };
    let parsed: LoginRequest = match serde_json::from_slice(&bytes) {
        Ok(p) => p,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                &format!("expected a JSON object {{\"user\": \"<name>\"}}: {e}"),
            );
        }
    };
    let user = match UserName::parse(&parsed.user) {
        Ok(u) => u,
        Err(e) => return error(StatusCode::BAD_REQUEST, "BAD_REQUEST", &e.to_string()),
    };
    match app.issuer.issue(&user) {
        Ok(issued) => {
            tracing::info!(%user, expires_at = issued.expires_at, "demo login");
            json_response(
                StatusCode::OK,
                &json!({"token": issued.token, "user": user.as_str(), "expires_at": issued.expires_at}),
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot issue a token");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL",
                "cannot issue a token",
            )
        }
    }
}

#[derive(Clone, Copy)]
enum List {
    Teams,
    Tasks,
}

/// `/api/users/<id>/teams|tasks` → the id and the list.
fn user_list_route(path: &str) -> Option<(&str, List)> {
    let rest = path.strip_prefix("/api/users/")?;
    let (user, list) = rest.split_once('/')?;
    let list = match list {
        "teams" => List::Teams,
        "tasks" => List::Tasks,
        _ => return None,
    };
    Some((user, list))
}

/// Teams or tasks of `user`, for a bearer token of that same user (the worker forwards
/// the user's own token), as a real backend would insist.
fn user_list(app: &App, req: &Request<Incoming>, user: &str, list: List) -> Response<Body> {
    let Some(token) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return unauthorized("a bearer token is required");
    };
    let claims = match app.validator.validate(token.trim()) {
        Ok(c) => c,
        Err(e) => return unauthorized(&e.to_string()),
    };
    if claims.user_id != user {
        return error(
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
            "the token belongs to another user",
        );
    }
    let Ok(name) = UserName::parse(user) else {
        return error(StatusCode::NOT_FOUND, "NOT_FOUND", "not a demo user name");
    };
    let body = match list {
        List::Teams => directory::teams(&name),
        List::Tasks => directory::tasks(&name),
    };
    json_response(StatusCode::OK, &body)
}

async fn static_file(app: &App, path: &str) -> Response<Body> {
    match app.assets.load(path).await {
        Ok(asset) => {
            let mut r = Response::new(Full::new(asset.body));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            );
            // Files are read per request; no-cache keeps a reload in step with edits.
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            h.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            r
        }
        Err(AssetError::Refused) => {
            error(StatusCode::BAD_REQUEST, "BAD_REQUEST", "path not allowed")
        }
        Err(AssetError::NotFound | AssetError::NoRoute) => {
            error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such file")
        }
        Err(AssetError::TooLarge) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            "file too large to serve",
        ),
        Err(AssetError::Io(e)) => {
            tracing::warn!(error = %e, path, "cannot read a static file");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL",
                "cannot read the file",
            )
        }
    }
}

fn unauthorized(message: &str) -> Response<Body> {
    let mut r = error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message);
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(
        status,
        &json!({"error": {"code": code, "message": message}}),
    )
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut r = shared::admin::json_response(status, body);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
