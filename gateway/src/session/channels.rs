//! Channel frames of an authenticated connection: `subscribe`, `unsubscribe`,
//! `publish`, `presence`, `typing` and `read`, checked against the connection's
//! permissions and subscriptions.

use serde_json::Value;

use super::state::{Authed, Ctx, Reply};
use crate::channels::{self, Announce, SubscribeOptions};
use crate::error::SessionError;

/// A replay (with `since`) and the `subscribed` after it; the session writes them at
/// the peer's pace.
pub(super) async fn subscribe(
    cx: &Ctx<'_>,
    a: &mut Authed,
    channel: &str,
    since: Option<u64>,
    epoch: Option<&str>,
) -> Result<Reply, SessionError> {
    let opts = SubscribeOptions {
        since,
        epoch,
        announce: Some(Announce { id: cx.id.clone() }),
    };
    let frames =
        channels::subscribe(cx.node, cx.conn_id, &a.perms, &mut a.subs, channel, opts).await?;
    Ok(Reply::Paced(frames))
}

pub(super) async fn unsubscribe(
    cx: &Ctx<'_>,
    a: &mut Authed,
    channel: &str,
) -> Result<Reply, SessionError> {
    let (perms, subs) = (&a.perms, &mut a.subs);
    let frame =
        channels::unsubscribe(cx.node, cx.conn_id, perms, subs, channel, cx.id.clone()).await?;
    Ok(Reply::Frame(frame))
}

pub(super) async fn publish(
    cx: &Ctx<'_>,
    a: &Authed,
    channel: &str,
    data: &Value,
) -> Result<Reply, SessionError> {
    let frame = channels::client_publish(cx.node, &a.perms, channel, data, cx.id.clone()).await?;
    Ok(Reply::Frame(frame))
}

pub(super) async fn presence(
    cx: &Ctx<'_>,
    a: &Authed,
    channel: &str,
) -> Result<Reply, SessionError> {
    let frame = channels::presence(cx.node, &a.perms, channel, cx.id.clone()).await?;
    Ok(Reply::Frame(frame))
}

/// Typing indicators are fire-and-forget: nothing is answered.
pub(super) async fn typing(cx: &Ctx<'_>, a: &Authed, channel: &str) -> Result<Reply, SessionError> {
    channels::typing(cx.node, &a.perms, &a.subs, channel).await?;
    Ok(Reply::Nothing)
}

pub(super) async fn read(
    cx: &Ctx<'_>,
    a: &Authed,
    channel: &str,
    offset: u64,
) -> Result<Reply, SessionError> {
    let frame = channels::read(cx.node, &a.perms, channel, offset, cx.id.clone()).await?;
    Ok(Reply::Frame(frame))
}
