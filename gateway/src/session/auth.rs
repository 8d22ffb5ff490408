//! Authentication frames: the handshake (credentials from the upgrade or an `auth`
//! frame) that turns an unauthenticated connection into an [`Authed`] one, and
//! `refresh`, which replaces the token of an authenticated one.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shared::auth::Claims;
use shared::metrics as m;
use shared::protocol::{FrameId, ServerFrame, UserInfo};
use shared::store::{Admission, ConnRecord, now_ms};

use super::state::{Authed, Ctx, EXPIRY_WARNING, REFRESH_BURST, REFRESH_PER_SEC, Reply};
use crate::channels::{self, Perms, SubscribeOptions, Subscriptions, USER_NAMESPACE};
use crate::credentials::Source;
use crate::error::SessionError;
use crate::hub::{Closer, Member, Outbound, TokenSlot};
use crate::limits::Bucket;
use crate::node::Node;
use crate::outbox::Outbox;

/// What the handshake needs of the connection: who it is, and how the hub reaches
/// it once registered.
pub(super) struct Handshake<'a> {
    pub node: &'a Node,
    pub conn_id: &'a Arc<str>,
    pub ip: IpAddr,
    pub outbox: &'a Arc<Outbox<Outbound>>,
    pub closer: &'a Arc<Closer>,
    /// When the TCP connection was accepted (handshake latency).
    pub started: Instant,
}

/// Validates a token, checks revocation and the per-user limit, fetches the user's
/// context and joins the hub. Returns the authenticated state and the
/// `authenticated` answer.
pub(super) async fn authenticate(
    hs: &Handshake<'_>,
    token: String,
    source: Source,
    id: Option<FrameId>,
) -> Result<(Authed, ServerFrame), SessionError> {
    let node = hs.node;
    let claims = node.validator.validate(&token).map_err(|e| {
        metrics::counter!(m::AUTH_FAILURES, "reason" => e.reason()).increment(1);
        SessionError::Auth(e)
    })?;
    check_revoked(node, &claims)?;

    let rec = ConnRecord {
        conn_id: hs.conn_id.to_string(),
        user_id: claims.user_id.clone(),
        node: node.config.cluster.node_id.clone(),
        ip: hs.ip.to_string(),
        connected_at: now_ms(),
    };
    match node
        .store
        .register_conn(&rec, node.config.max_connections_per_user)
        .await
    {
        Ok(Admission::Admitted) => {}
        Ok(Admission::OverLimit) => return Err(SessionError::ConnectionLimit),
        Err(e) => {
            metrics::counter!(m::REDIS_ERRORS, "op" => "register").increment(1);
            tracing::warn!(error = %e, "cannot register connection");
            return Err(SessionError::AuthUnavailable("session store"));
        }
    }
    // From here on the Redis record exists: the session's `finish` removes it on
    // every path once the state is authenticated; before that, this function does.
    let registry: Arc<str> = rec.member().into();
    let token_slot: TokenSlot = Arc::new(std::sync::Mutex::new(token.as_str().into()));
    let user: Arc<str> = claims.user_id.as_str().into();
    let registration = match node
        .hub
        .register(Member {
            conn_id: hs.conn_id.clone(),
            user_id: user,
            outbox: hs.outbox.clone(),
            closer: hs.closer.clone(),
            registry: registry.clone(),
            token: token_slot.clone(),
        })
        .await
    {
        Ok(r) => r,
        Err(e) => {
            metrics::counter!(m::NATS_ERRORS, "op" => "subscribe").increment(1);
            tracing::warn!(error = %e, "cannot subscribe user subject");
            unregister(node, &claims.user_id, &registry).await;
            return Err(SessionError::AuthUnavailable("message bus"));
        }
    };
    let ctx = node.contexts.get(&claims.user_id, &token, false).await;
    tracing::Span::current().record("user", claims.user_id.as_str());

    let (expires, warn_at) = timers_for(node, claims.exp);
    let perms = Perms::new(&claims.user_id, &ctx);
    let degraded = ctx.degraded;
    let frame = ServerFrame::Authenticated {
        user: UserInfo {
            id: claims.user_id.clone(),
            email: claims.email.clone(),
            role: claims.role.clone(),
        },
        expires_at: claims.exp,
        teams: ctx.teams,
        tasks: ctx.tasks,
        degraded,
        node: node.config.cluster.node_id.clone(),
        conn_id: hs.conn_id.to_string(),
        id,
    };
    let own = format!("{USER_NAMESPACE}:{}", claims.user_id);
    let mut authed = Authed {
        claims,
        token: token_slot,
        refreshes: Bucket::new(REFRESH_PER_SEC, REFRESH_BURST, Instant::now()),
        expires,
        warn_at,
        perms,
        subs: Subscriptions::default(),
        _registration: registration,
        registry,
    };
    // Every connection is subscribed to its own `user:` channel.
    let (perms, subs) = (&authed.perms, &mut authed.subs);
    let hidden = SubscribeOptions::default();
    if let Err(e) = channels::subscribe(node, hs.conn_id, perms, subs, &own, hidden).await {
        tracing::warn!(error = %e, "own user channel not subscribed");
    }
    metrics::gauge!(m::CONNECTIONS_PENDING).decrement(1.0);
    metrics::gauge!(m::CONNECTIONS).increment(1.0);
    metrics::counter!(m::CONNECTS, "result" => "ok").increment(1);
    metrics::histogram!(m::HANDSHAKE_SECONDS).record(hs.started.elapsed().as_secs_f64());
    tracing::debug!(source = source.label(), degraded, "authenticated");
    Ok((authed, frame))
}

/// Replaces the token of a live connection (same user only).
pub(super) async fn refresh(
    cx: &Ctx<'_>,
    a: &mut Authed,
    token: String,
) -> Result<Reply, SessionError> {
    if !a.refreshes.try_take(Instant::now()) {
        metrics::counter!(m::RATE_LIMITED, "scope" => "refresh").increment(1);
        return Err(SessionError::RefreshRateLimited(a.refreshes.wait_time()));
    }
    let claims = cx.node.validator.validate(&token).map_err(|e| {
        metrics::counter!(m::AUTH_FAILURES, "reason" => e.reason()).increment(1);
        SessionError::RefreshRejected(e)
    })?;
    if claims.user_id != a.claims.user_id {
        metrics::counter!(m::AUTH_FAILURES, "reason" => "wrong_user").increment(1);
        return Err(SessionError::WrongUser);
    }
    check_revoked(cx.node, &claims)?;
    let (expires, warn_at) = timers_for(cx.node, claims.exp);
    let exp = claims.exp;
    // The user's teams may have changed: refresh them, and drop subscriptions
    // to teams the user left.
    let ctx = cx.node.contexts.get(&claims.user_id, &token, false).await;
    a.claims = claims;
    *a.token.lock().unwrap_or_else(|p| p.into_inner()) = token.into();
    a.expires = expires;
    a.warn_at = warn_at;
    let mut revoked = Vec::new();
    if !ctx.degraded {
        a.perms.teams = channels::teams_of(&ctx);
        revoked = channels::revoke_lost(cx.node, cx.conn_id, &a.perms, &mut a.subs).await;
    }
    let refreshed = ServerFrame::Refreshed {
        expires_at: exp,
        id: cx.id.clone(),
    };
    Ok(Reply::FrameThen(refreshed, revoked))
}

fn check_revoked(node: &Node, claims: &Claims) -> Result<(), SessionError> {
    let Some(jti) = &claims.jti else {
        return Ok(());
    };
    match node.revocations.is_revoked(jti) {
        Ok(false) => Ok(()),
        Ok(true) => {
            metrics::counter!(m::AUTH_FAILURES, "reason" => "revoked").increment(1);
            Err(SessionError::Revoked)
        }
        Err(crate::revocations::NotSynced) => {
            // The list was never read (Redis down since start): nothing to vouch
            // for the token with.
            metrics::counter!(m::REDIS_ERRORS, "op" => "revoked").increment(1);
            Err(SessionError::AuthUnavailable("session store"))
        }
    }
}

/// Removes the connection's record from the user's Redis registry.
pub(super) async fn unregister(node: &Node, user_id: &str, registry: &str) {
    if let Err(e) = node.store.unregister_conn(user_id, registry).await {
        metrics::counter!(m::REDIS_ERRORS, "op" => "unregister").increment(1);
        // The record expires by itself within the connection TTL.
        tracing::debug!(error = %e, "cannot unregister connection");
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Close and warning instants for a token's `exp`: the connection lives until
/// exp + leeway, the same leeway the validator granted, so a token that was just
/// accepted is never closed at once (closing at `exp` would close 4001 a token
/// accepted within the leeway, and the client would reconnect with it in a loop).
fn timers_for(node: &Node, exp: u64) -> (Instant, Option<Instant>) {
    let now = Instant::now();
    let left = Duration::from_secs((exp + node.config.jwt.leeway_secs).saturating_sub(unix_now()));
    let expires = now + left;
    let warn_at = Some(
        now + Duration::from_secs(exp.saturating_sub(unix_now())).saturating_sub(EXPIRY_WARNING),
    );
    (expires, warn_at)
}
