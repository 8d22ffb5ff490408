//! Chat frames of an authenticated connection: `chat.send`, `chat.cancel` and
//! `history`, always on behalf of the connection's own user.

use shared::protocol::FileAttachment;

use super::state::{Authed, Ctx, Reply};
use crate::error::SessionError;

pub(super) async fn send(
    cx: &Ctx<'_>,
    a: &Authed,
    message: String,
    session_id: Option<String>,
    files: Vec<FileAttachment>,
) -> Result<Reply, SessionError> {
    let user = &a.claims.user_id;
    let frame = crate::chat::send(cx.node, user, message, session_id, files, cx.id.clone()).await?;
    Ok(Reply::Frame(frame))
}

pub(super) async fn cancel(
    cx: &Ctx<'_>,
    a: &Authed,
    request_id: &str,
) -> Result<Reply, SessionError> {
    let frame = crate::chat::cancel(cx.node, &a.claims.user_id, request_id, cx.id.clone()).await?;
    Ok(Reply::Frame(frame))
}

pub(super) async fn history(
    cx: &Ctx<'_>,
    a: &Authed,
    session_id: &str,
    limit: Option<u32>,
) -> Result<Reply, SessionError> {
    let user = &a.claims.user_id;
    let frame = crate::chat::history(cx.node, user, session_id, limit, cx.id.clone()).await?;
    Ok(Reply::Frame(frame))
}
