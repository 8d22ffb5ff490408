//! The HTTP API beside the socket (PROTOCOL.md section 5), behind the api key:
//! cluster-wide kick, and the ops introspection of live nodes and a user's connections.
//! Every error body is `{"error": {"code", "message"}}`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;
use shared::admin::{Body, json_response};
use subtle::ConstantTimeEq;

use shared::protocol::{CloseCode, DisconnectCommand, valid_name};

use crate::close::DEFAULT_KICK_CODE;
use crate::error::ApiError;
use crate::node::Node;

/// Largest API request body: commands are tiny; anything bigger is a mistake.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// A body trickled slower than this holds a socket for nothing: 64 KiB arrive in
/// milliseconds from any real client.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Publishing the kick must not hang the HTTP request when NATS is away.
const PUBLISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

pub fn error_response(e: &ApiError) -> Response<Body> {
    let (status, code) = e.status_and_code();
    let mut r = json_response(
        status,
        &json!({"error": {"code": code, "message": e.to_string()}}),
    );
    if let ApiError::TooManyRequests(d) | ApiError::TooManyKeyFailures(d) = e {
        r.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from(d.as_secs().max(1)),
        );
    }
    r
}

/// Routes `/v1/*`; `peer` is the TCP (or PROXY header) peer, for the limit on failed
/// api key attempts.
pub async fn handle(node: Arc<Node>, req: Request<Incoming>, peer: IpAddr) -> Response<Body> {
    match dispatch(&node, req, peer).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

async fn dispatch(
    node: &Node,
    req: Request<Incoming>,
    peer: IpAddr,
) -> Result<Response<Body>, ApiError> {
    let ip = crate::proxy::client_ip(peer, req.headers(), &node.config.trusted_proxies);
    authorize(node, &req, ip, Instant::now())?;
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
    match (req.method().clone(), segments.as_slice()) {
        (Method::POST, ["disconnect"]) => disconnect(node, req).await,
        (Method::POST, ["revoke"]) => revoke(node, req).await,
        (Method::POST, ["publish"]) => {
            let body = read_body(req).await?;
            let offset = publish_body(node, &body).await?;
            Ok(json_response(StatusCode::OK, &json!({ "offset": offset })))
        }
        (Method::GET, ["channels"]) => {
            let channels = node.store.channels().await.map_err(|e| {
                tracing::warn!(error = %e, "cannot list channels");
                ApiError::Unavailable("session store")
            })?;
            let list: Vec<_> = channels
                .into_iter()
                .map(|(channel, subscribers)| json!({"channel": channel, "subscribers": subscribers}))
                .collect();
            Ok(json_response(StatusCode::OK, &json!({ "channels": list })))
        }
        (Method::GET, ["channels", channel, "presence"]) => {
            let ch = shared::protocol::Channel::parse(channel).map_err(ApiError::BadRequest)?;
            let users = crate::channels::presence_users(node, &ch)
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "cannot read presence");
                    ApiError::Unavailable("session store")
                })?;
            Ok(json_response(
                StatusCode::OK,
                &json!({ "channel": ch.to_string(), "users": users }),
            ))
        }
        (Method::GET, ["nodes"]) => nodes(node).await,
        (Method::GET, ["users", user, "connections"]) => user_connections(node, user).await,
        (Method::POST, ["users", user, "refresh-context"]) => refresh_context(node, user).await,
        (_, ["disconnect"])
        | (_, ["publish"])
        | (_, ["revoke"])
        | (_, ["users", _, "refresh-context"]) => {
            Err(ApiError::MethodNotAllowed("use POST".into()))
        }
        (_, ["nodes"])
        | (_, ["users", _, "connections"])
        | (_, ["channels"])
        | (_, ["channels", _, "presence"]) => Err(ApiError::MethodNotAllowed("use GET".into())),
        _ => Err(ApiError::NotFound(format!("no route for {path}"))),
    }
}

/// Checks the api key, after the address's failed attempts: an address past
/// [`crate::limits::API_KEY_FAILURE_BURST`] failures gets 429 whatever key it sends,
/// so the right key in a list of guesses is not told apart from the wrong ones.
fn authorize<B>(node: &Node, req: &Request<B>, ip: IpAddr, now: Instant) -> Result<(), ApiError> {
    if let Err(wait) = node.limits.api_key_failures.check(ip, now) {
        metrics::counter!(shared::metrics::RATE_LIMITED, "scope" => "api_key").increment(1);
        return Err(ApiError::TooManyKeyFailures(wait));
    }
    let ok = node
        .config
        .api_key
        .as_deref()
        .is_some_and(|expected| key_matches(req, expected));
    if ok {
        Ok(())
    } else {
        metrics::counter!(shared::metrics::API_KEY_FAILURES).increment(1);
        node.limits.api_key_failures.failed(ip, now);
        tracing::debug!(%ip, "api request with a missing or wrong key");
        Err(ApiError::Unauthorized)
    }
}

/// Constant-time comparison of the presented api key.
fn key_matches<B>(req: &Request<B>, expected: &str) -> bool {
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    // Padded to the expected length: `ct_eq` returns early on a length mismatch, and
    // the time taken must not tell an attacker how long the key is.
    let padded: Vec<u8> = (presented.bytes().chain(std::iter::repeat(0)))
        .take(expected.len())
        .collect();
    let same_len = (presented.len() as u64).ct_eq(&(expected.len() as u64));
    (same_len & padded.ct_eq(expected.as_bytes())).into()
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let collect = Limited::new(req.into_body(), MAX_BODY_BYTES).collect();
    Ok(tokio::time::timeout(BODY_TIMEOUT, collect)
        .await
        .map_err(|_| ApiError::BodyTimeout(BODY_TIMEOUT))?
        .map_err(|e| ApiError::BadRequest(format!("cannot read body: {e}")))?
        .to_bytes())
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

async fn read_json<T: for<'de> Deserialize<'de>>(req: Request<Incoming>) -> Result<T, ApiError> {
    parse_json(&read_body(req).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    channel: String,
    data: serde_json::Value,
}

/// Server-side publish (`POST /v1/publish` and `sb.rpc.publish`): any valid channel,
/// `from: "server"`. Returns the offset.
pub async fn publish_body(node: &Node, body: &[u8]) -> Result<u64, ApiError> {
    let b: PublishBody = parse_json(body)?;
    let ch = shared::protocol::Channel::parse(&b.channel).map_err(ApiError::BadRequest)?;
    crate::channels::publish(node, &ch, &b.data, "server", "api")
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "server publish failed");
            ApiError::Unavailable("session store")
        })
}

/// Serves `sb.rpc.publish` for backends that speak NATS: the same as
/// `POST /v1/publish` (offset, history, fan-out), one gateway per request.
pub async fn publish_rpc_loop(node: &Node) {
    use futures_util::StreamExt;
    let subject = node.subjects.publish_rpc();
    let queue = Some(shared::subjects::GATEWAY_QUEUE_GROUP);
    let Some(mut sub) =
        crate::control::subscribe_until_stopped(&*node.bus, subject, queue, &node.life.stop).await
    else {
        return;
    };
    loop {
        let msg = tokio::select! {
            biased;
            _ = node.life.stop.cancelled() => break,
            m = sub.next() => match m { Some(m) => m, None => break },
        };
        let reply = publish_body(node, &msg.payload).await;
        if let Some(to) = msg.reply {
            let body = match reply {
                Ok(offset) => serde_json::json!({ "offset": offset }),
                Err(e) => {
                    let (_, code) = e.status_and_code();
                    serde_json::json!({"error": {"code": code, "message": e.to_string()}})
                }
            };
            let _ = node
                .bus
                .publish(to, Vec::new(), body.to_string().into())
                .await;
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    user_id: Option<String>,
    conn_id: Option<String>,
    code: Option<u16>,
    reason: Option<String>,
}

async fn disconnect(node: &Node, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let b: DisconnectBody = read_json(req).await?;
    if b.user_id.is_none() && b.conn_id.is_none() {
        return Err(ApiError::BadRequest("give `user_id` or `conn_id`".into()));
    }
    for v in [&b.user_id, &b.conn_id].into_iter().flatten() {
        if !valid_name(v) {
            return Err(ApiError::BadRequest(format!("{v:?} is not a valid id")));
        }
    }
    let code = b.code.unwrap_or(DEFAULT_KICK_CODE.as_u16());
    if !CloseCode::is_valid_kick_code(code) {
        return Err(ApiError::BadRequest(
            "`code` must be 1000, 1012 or within 4000-4999".into(),
        ));
    }
    let cmd = DisconnectCommand {
        user_id: b.user_id,
        conn_id: b.conn_id,
        code,
        reason: b.reason.map(|r| r.chars().take(200).collect()),
    };
    let payload = serde_json::to_vec(&cmd).unwrap_or_default();
    let published = tokio::time::timeout(
        PUBLISH_TIMEOUT,
        node.bus
            .publish(node.subjects.ctl_disconnect(), Vec::new(), payload.into()),
    )
    .await;
    match published {
        Ok(Ok(())) => Ok(json_response(StatusCode::OK, &json!({"ok": true}))),
        _ => {
            metrics::counter!(shared::metrics::NATS_ERRORS, "op" => "disconnect").increment(1);
            Err(ApiError::Unavailable("message bus"))
        }
    }
}

/// `POST /v1/revoke {"jti", "exp"}`: refuses the token id at connect and refresh on
/// every gateway until `exp`. Stored first (nodes that miss the notice read it within
/// `revocations::SYNC_INTERVAL`), then told to every gateway over NATS.
async fn revoke(node: &Node, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let r: crate::revocations::Revocation = read_json(req).await?;
    if r.jti.is_empty() || r.jti.len() > MAX_JTI_BYTES {
        return Err(ApiError::BadRequest(format!(
            "`jti` must be 1 to {MAX_JTI_BYTES} bytes"
        )));
    }
    node.store.revoke(&r.jti, r.exp).await.map_err(|e| {
        tracing::warn!(error = %e, "cannot store a revocation");
        ApiError::Unavailable("session store")
    })?;
    node.revocations.add(r.clone());
    let payload = serde_json::to_vec(&r).unwrap_or_default();
    let told = tokio::time::timeout(
        PUBLISH_TIMEOUT,
        node.bus
            .publish(node.subjects.revocations(), Vec::new(), payload.into()),
    )
    .await;
    if !matches!(told, Ok(Ok(()))) {
        // Stored: the other gateways read it within their sync interval.
        metrics::counter!(shared::metrics::NATS_ERRORS, "op" => "revoke").increment(1);
    }
    Ok(json_response(StatusCode::OK, &json!({"ok": true})))
}

/// `POST /v1/users/<id>/refresh-context`: every gateway holding connections of the
/// user fetches the user's context again, bypassing caches, and applies it (channels
/// the user lost end with `unsubscribed {reason: FORBIDDEN}`; each connection gets a
/// `context` frame). Answers once the command is on the bus to every gateway.
async fn refresh_context(node: &Node, user: &str) -> Result<Response<Body>, ApiError> {
    if !valid_name(user) {
        return Err(ApiError::BadRequest(format!(
            "{user:?} is not a valid user id"
        )));
    }
    let cmd = shared::protocol::RefreshContextCommand {
        user_id: user.to_owned(),
    };
    let payload = serde_json::to_vec(&cmd).unwrap_or_default();
    // Published and flushed: every gateway subscribed to the subject gets it.
    let published = tokio::time::timeout(PUBLISH_TIMEOUT, async {
        node.bus
            .publish(
                node.subjects.ctl_refresh_context(),
                Vec::new(),
                payload.into(),
            )
            .await?;
        node.bus.flush(PUBLISH_TIMEOUT).await
    })
    .await;
    match published {
        Ok(Ok(())) => Ok(json_response(StatusCode::OK, &json!({"ok": true}))),
        _ => {
            metrics::counter!(shared::metrics::NATS_ERRORS, "op" => "refresh_context").increment(1);
            Err(ApiError::Unavailable("message bus"))
        }
    }
}

/// A token id longer than this is not one any issuer makes.
const MAX_JTI_BYTES: usize = 256;

async fn nodes(node: &Node) -> Result<Response<Body>, ApiError> {
    let nodes = node.store.nodes().await.map_err(|e| {
        tracing::warn!(error = %e, "cannot list nodes");
        ApiError::Unavailable("session store")
    })?;
    Ok(json_response(StatusCode::OK, &json!({ "nodes": nodes })))
}

async fn user_connections(node: &Node, user: &str) -> Result<Response<Body>, ApiError> {
    if !valid_name(user) {
        return Err(ApiError::BadRequest(format!(
            "{user:?} is not a valid user id"
        )));
    }
    let conns = node.store.user_connections(user).await.map_err(|e| {
        tracing::warn!(error = %e, "cannot list connections");
        ApiError::Unavailable("session store")
    })?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "user_id": user, "connections": conns }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_key_matches() {
        let req = |auth: Option<&str>| {
            let mut b = Request::builder();
            if let Some(a) = auth {
                b = b.header(AUTHORIZATION, a);
            }
            b.body(()).unwrap()
        };
        assert!(key_matches(&req(Some("Bearer s3cret")), "s3cret"));
        assert!(key_matches(&req(Some("Bearer  s3cret ")), "s3cret"));
        for wrong in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3cretx"),
            Some("Bearer s3creT"),
            Some("s3cret"),
        ] {
            assert!(!key_matches(&req(wrong), "s3cret"), "{wrong:?}");
        }
    }
}
