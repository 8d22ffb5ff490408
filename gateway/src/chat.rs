//! The gateway's half of chat: validates `chat.send`, claims the session, applies the
//! cluster-wide chat rate, and hands the request to JetStream, answering `ack` only
//! after JetStream stored it; `chat.cancel` tells every worker; `history` reads the
//! session from Redis. Workers do the rest (`worker/`).

use std::time::Duration;

use shared::bus::Log;
use shared::protocol::{
    ChatCancel, ChatRequest, FileAttachment, FrameId, MAX_CHAT_MESSAGE_CHARS, ServerFrame,
    valid_name,
};
use shared::store::{RateDecision, SessionAccess, now_ms};

use crate::error::SessionError;
use crate::node::Node;

/// JetStream must confirm a stored request within this time, or the client is told
/// `UNAVAILABLE` (and may retry; the request id de-duplicates).
pub const PUBLISH_ACK_TIMEOUT: Duration = Duration::from_secs(3);
/// `history` without `limit` (PROTOCOL.md section 6).
pub const DEFAULT_HISTORY_LIMIT: usize = 50;
/// Largest `limit` honoured: the window a session keeps.
pub const MAX_HISTORY_LIMIT: usize = shared::store::DEFAULT_HISTORY_WINDOW;
/// Content types inlined into the prompt; PDFs have their text extracted by workers.
pub const ACCEPTED_FILE_TYPES: &[&str] = &[
    "text/",
    "application/json",
    "application/xml",
    "application/x-yaml",
    "application/yaml",
    "application/pdf",
];

/// Handles `chat.send`; returns the `ack`.
pub async fn send(
    node: &Node,
    user_id: &str,
    message: String,
    session_id: Option<String>,
    files: Vec<FileAttachment>,
    id: Option<FrameId>,
) -> Result<ServerFrame, SessionError> {
    let chars = message.chars().count();
    if chars == 0 || chars > MAX_CHAT_MESSAGE_CHARS {
        return Err(SessionError::BadRequest(format!(
            "`message` must be 1 to {MAX_CHAT_MESSAGE_CHARS} characters"
        )));
    }
    check_files(&files, node.config.max_files, node.config.max_files_bytes)?;
    if let Some(s) = &session_id
        && !valid_name(s)
    {
        return Err(SessionError::BadRequest(
            "`session_id` must match [A-Za-z0-9_-]{1,128}".into(),
        ));
    }

    let store = &node.store;
    match store
        .chat_rate(
            user_id,
            node.config.chat_rate_per_minute,
            Duration::from_secs(60),
        )
        .await
    {
        Ok(RateDecision::Allowed) => {}
        Ok(RateDecision::Limited(wait)) => {
            metrics::counter!(shared::metrics::RATE_LIMITED, "scope" => "chat").increment(1);
            return Err(SessionError::RateLimited(wait));
        }
        Err(e) => return Err(redis_down("chat_rate", e)),
    }
    let session_id = session_id.unwrap_or_else(new_id);
    match store.claim_session(&session_id, user_id).await {
        Ok(SessionAccess::Created | SessionAccess::Owned) => {}
        Ok(SessionAccess::Forbidden) => {
            return Err(SessionError::Forbidden(
                "this chat session belongs to another user".into(),
            ));
        }
        Err(e) => return Err(redis_down("claim_session", e)),
    }

    let request_id = new_id();
    let req = ChatRequest {
        request_id: request_id.clone(),
        session_id: session_id.clone(),
        user_id: user_id.to_owned(),
        message,
        files,
        created_at: now_ms(),
        node: node.config.cluster.node_id.clone(),
    };
    publish(node, &req).await?;
    Ok(ServerFrame::Ack {
        offset: None,
        session_id: Some(session_id),
        request_id: Some(request_id),
        id,
    })
}

/// Stores the request in JetStream and waits for its acknowledgement.
async fn publish(node: &Node, req: &ChatRequest) -> Result<(), SessionError> {
    let payload = serde_json::to_vec(req).unwrap_or_default();
    let stored = node
        .bus
        .store(
            Log::ChatRequests,
            node.subjects.chat_requests(),
            &req.request_id,
            Vec::new(),
            payload.into(),
            PUBLISH_ACK_TIMEOUT,
        )
        .await;
    match stored {
        Ok(()) => Ok(()),
        Err(e) => {
            metrics::counter!(shared::metrics::NATS_ERRORS, "op" => "chat_publish").increment(1);
            tracing::warn!(error = %e, "chat request not stored");
            Err(SessionError::Unavailable("chat queue"))
        }
    }
}

/// Handles `chat.cancel`: every worker hears it; the one holding the request (of
/// this user) stops it.
pub async fn cancel(
    node: &Node,
    user_id: &str,
    request_id: &str,
    id: Option<FrameId>,
) -> Result<ServerFrame, SessionError> {
    if !valid_name(request_id) {
        return Err(SessionError::BadRequest(
            "`request_id` is not a request id".into(),
        ));
    }
    let body = serde_json::to_vec(&ChatCancel {
        request_id: request_id.to_owned(),
        user_id: user_id.to_owned(),
    })
    .unwrap_or_default();
    let sent = tokio::time::timeout(
        PUBLISH_ACK_TIMEOUT,
        node.bus
            .publish(node.subjects.chat_cancel(), Vec::new(), body.into()),
    )
    .await;
    match sent {
        Ok(Ok(())) => Ok(ServerFrame::Ack {
            offset: None,
            session_id: None,
            request_id: Some(request_id.to_owned()),
            id,
        }),
        _ => {
            metrics::counter!(shared::metrics::NATS_ERRORS, "op" => "chat_cancel").increment(1);
            Err(SessionError::Unavailable("message bus"))
        }
    }
}

/// Handles `history`: the session's last messages, oldest first.
pub async fn history(
    node: &Node,
    user_id: &str,
    session_id: &str,
    limit: Option<u32>,
    id: Option<FrameId>,
) -> Result<ServerFrame, SessionError> {
    if !valid_name(session_id) {
        return Err(SessionError::BadRequest(
            "`session_id` must match [A-Za-z0-9_-]{1,128}".into(),
        ));
    }
    let limit = limit
        .map(|l| (l as usize).clamp(1, MAX_HISTORY_LIMIT))
        .unwrap_or(DEFAULT_HISTORY_LIMIT);
    // Sessions are keyed by owner: another user's session of this id is not found
    // here, exactly like one that never existed (no oracle for other users' ids).
    match node.store.session_owner(user_id, session_id).await {
        Ok(Some(owner)) if owner == user_id => {}
        Ok(Some(_)) => {
            return Err(SessionError::Forbidden(
                "this chat session belongs to another user".into(),
            ));
        }
        Ok(None) => {
            return Err(SessionError::NotFound(format!(
                "no chat session {session_id}"
            )));
        }
        Err(e) => return Err(redis_down("session_owner", e)),
    }
    let messages = node
        .store
        .history(user_id, session_id, limit)
        .await
        .map_err(|e| redis_down("history", e))?;
    Ok(ServerFrame::History {
        session_id: session_id.to_owned(),
        messages,
        id,
    })
}

fn redis_down(op: &'static str, e: shared::store::StoreError) -> SessionError {
    metrics::counter!(shared::metrics::REDIS_ERRORS, "op" => op).increment(1);
    tracing::warn!(error = %e, op, "session store unavailable");
    SessionError::Unavailable("session store")
}

fn new_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Early checks of attachments (workers check again): count, decoded size, type.
fn check_files(
    files: &[FileAttachment],
    max_files: usize,
    max_bytes: usize,
) -> Result<(), SessionError> {
    if files.len() > max_files {
        return Err(SessionError::BadRequest(format!(
            "at most {max_files} files per message"
        )));
    }
    let mut total = 0usize;
    for f in files {
        if f.name.is_empty() || f.name.len() > 255 {
            return Err(SessionError::BadRequest(
                "a file needs a name of 1 to 255 bytes".into(),
            ));
        }
        let ty = f.content_type.to_ascii_lowercase();
        if !ACCEPTED_FILE_TYPES
            .iter()
            .any(|a| ty == *a || (a.ends_with('/') && ty.starts_with(a)))
        {
            return Err(SessionError::BadRequest(format!(
                "file {:?}: type {:?} is not supported (text or PDF)",
                f.name, f.content_type
            )));
        }
        // Base64 decodes to three bytes per four characters.
        total += f.data.trim_end_matches('=').len() * 3 / 4;
        if total > max_bytes {
            return Err(SessionError::BadRequest(format!(
                "files exceed {max_bytes} bytes in total"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, ty: &str, data: &str) -> FileAttachment {
        FileAttachment {
            name: name.into(),
            content_type: ty.into(),
            data: data.into(),
        }
    }

    #[test]
    fn files_are_checked_early() {
        assert!(check_files(&[file("a.txt", "text/plain", "aGk=")], 5, 100).is_ok());
        assert!(check_files(&[file("a.pdf", "application/pdf", "aGk=")], 5, 100).is_ok());
        let e = check_files(&[file("x.exe", "application/octet-stream", "aGk=")], 5, 100);
        assert!(matches!(e, Err(SessionError::BadRequest(m)) if m.contains("x.exe")));
        assert!(check_files(&[file("a.txt", "text/plain", &"A".repeat(200))], 5, 100).is_err());
        let many: Vec<_> = (0..6)
            .map(|i| file(&format!("{i}"), "text/plain", ""))
            .collect();
        assert!(check_files(&many, 5, 100).is_err());
    }
}
