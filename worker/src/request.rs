//! One chat request, start to end (docs/DESIGN.md#chat-request-end-to-end): check the
//! attachments, load the history window, answer a request that already completed
//! from history, else stream the LLM's reply as coalesced chunks, record user message
//! and reply once, publish `chat.complete`. The caller acks according to the returned
//! [`Outcome`]; nothing here acks.
//!
//! Choices the client protocol leaves open (docs/PROTOCOL.md, "Chat in detail"):
//! - Cancel: the stream stops, the text generated so far is recorded in history and
//!   sent as `chat.complete` (possibly empty), so every connection and history agree.
//! - A failure after text reached the user: `chat.error {retryable: true}` and ack;
//!   nothing is recorded (the user retries with a new request).
//! - Infrastructure failures (Redis, NATS) before the reply is recorded: nak with a
//!   growing delay; a later delivery does the work again.
//! - The user message goes to history as typed; attachment text is used for this
//!   turn only.

use std::time::Duration;

use shared::protocol::{ChatRequest, HistoryMessage};
use shared::store::now_ms;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::attachments;
use crate::error::UserError;
use crate::history;
use crate::llm::LlmError;
use crate::reply::{Coalescer, Reply};
use crate::state::Worker;

/// First nak delay after an infrastructure failure; doubles per delivery.
pub const NAK_DELAY_BASE: Duration = Duration::from_secs(1);
/// Nak delays stop growing here: Redis or NATS outages are usually shorter.
pub const NAK_DELAY_MAX: Duration = Duration::from_secs(30);

/// What to tell JetStream about the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Done (completed, or the user was told why not).
    Ack,
    /// Deliver again after this delay.
    Nak(Duration),
    /// Never deliver again.
    Term,
}

/// How a request ended: the disposition and the metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub disposition: Disposition,
    pub label: &'static str,
}

impl Outcome {
    fn ack(label: &'static str) -> Outcome {
        Outcome {
            disposition: Disposition::Ack,
            label,
        }
    }
    pub fn term(label: &'static str) -> Outcome {
        Outcome {
            disposition: Disposition::Term,
            label,
        }
    }
    fn nak(delivered: i64) -> Outcome {
        let exp = delivered.clamp(1, 16) as u32 - 1;
        Outcome {
            disposition: Disposition::Nak(
                NAK_DELAY_BASE.saturating_mul(1 << exp).min(NAK_DELAY_MAX),
            ),
            label: "retry_later",
        }
    }
    fn abandoned() -> Outcome {
        Outcome {
            disposition: Disposition::Nak(Duration::ZERO),
            label: "abandoned",
        }
    }
}

/// A delivered request.
#[derive(Debug, Clone)]
pub struct Job {
    pub request: ChatRequest,
    /// JetStream's delivery count, 1 for the first delivery.
    pub delivered: i64,
}

enum End {
    Complete,
    Cancelled,
    Abandoned,
    Failed(LlmError),
}

/// Processes one request. `abandon` is cancelled when the shutdown grace is over:
/// the request is then given back (nak) for another worker.
pub async fn handle(worker: &Worker, job: &Job, abandon: &CancellationToken) -> Outcome {
    let req = &job.request;
    let mut reply = Reply::new(worker, &req.user_id, &req.session_id, &req.request_id);
    if job.delivered > worker.config.max_deliver {
        let e = UserError::exhausted(worker.config.max_deliver);
        tracing::warn!(request_id = %req.request_id, deliveries = job.delivered, "giving up on a chat request");
        let _ = reply.error(e.code, e.message, e.retryable).await;
        return Outcome::term("exhausted");
    }
    let registration = worker.cancels.register(&req.request_id, &req.user_id);
    let cancel = registration.token.clone();

    let files = match attachments::prepare(&req.files, worker.config.files, &worker.pdf).await {
        Ok(f) => f,
        Err(e) => {
            let e = UserError::from_attachment(&e);
            return match reply.error(e.code, e.message, e.retryable).await {
                Ok(()) => Outcome::ack("bad_request"),
                Err(_) => Outcome::nak(job.delivered),
            };
        }
    };

    let history = match worker
        .store
        .history(&req.user_id, &req.session_id, worker.config.history_window)
        .await
    {
        Ok(h) => h,
        Err(e) => {
            redis_error("history", &e);
            return Outcome::nak(job.delivered);
        }
    };
    let mut recorded = history
        .iter()
        .find(|m| m.role == "assistant" && m.request_id.as_deref() == Some(&req.request_id))
        .cloned();
    if recorded.is_none() && job.delivered > 1 {
        match worker
            .store
            .recorded_reply(&req.user_id, &req.session_id, &req.request_id)
            .await
        {
            Ok(r) => recorded = r,
            Err(e) => {
                redis_error("recorded_reply", &e);
                return Outcome::nak(job.delivered);
            }
        }
    }
    if let Some(done) = recorded {
        // Completed before (the worker died before its ack): only tell the user again.
        return match reply.complete(done.content, None).await {
            Ok(()) => Outcome::ack("republished"),
            Err(_) => Outcome::nak(job.delivered),
        };
    }

    let user_text = attachments::inline(&req.message, &files);
    let prompt = history::build_prompt(
        worker.config.llm.system_prompt.as_deref(),
        &history,
        &req.request_id,
        &user_text,
        worker.config.token_budget,
    );
    drop(history);

    let started = Instant::now();
    let started_stream = tokio::select! {
        biased;
        _ = abandon.cancelled() => return Outcome::abandoned(),
        r = worker.llm.stream(&prompt, &cancel) => r,
    };
    let mut stream = match started_stream {
        Ok(s) => s,
        Err(LlmError::Cancelled) => {
            return finish(worker, job, &reply, String::new(), None, "cancelled").await;
        }
        Err(e) => {
            llm_error(&req.request_id, &e);
            return fail(job, &reply, &e, false).await;
        }
    };
    metrics::histogram!(shared::metrics::WORKER_FIRST_TOKEN_SECONDS)
        .record(started.elapsed().as_secs_f64());

    let mut text = String::new();
    let mut chunks = Coalescer::new(worker.config.chunk_chars, worker.config.chunk_interval);
    let end = loop {
        let due = chunks.deadline();
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break End::Cancelled,
            _ = abandon.cancelled() => break End::Abandoned,
            _ = tokio::time::sleep_until(due.unwrap_or(started)), if due.is_some() => {
                if let Some(c) = chunks.take(Instant::now()) {
                    reply.chunk(c).await;
                }
            }
            r = stream.next() => match r {
                Ok(Some(t)) => {
                    text.push_str(&t);
                    let now = Instant::now();
                    if chunks.push(&t, now)
                        && let Some(c) = chunks.take(now)
                    {
                        reply.chunk(c).await;
                    }
                }
                Ok(None) => break End::Complete,
                Err(e) => break End::Failed(e),
            },
        }
    };
    let usage = stream.usage().cloned();
    // Dropping the stream closes the upstream connection: the LLM stops generating.
    drop(stream);
    if matches!(end, End::Abandoned) {
        return Outcome::abandoned();
    }
    if let Some(c) = chunks.take(Instant::now()) {
        reply.chunk(c).await;
    }
    match end {
        End::Complete => finish(worker, job, &reply, text, usage, "completed").await,
        End::Cancelled => finish(worker, job, &reply, text, usage, "cancelled").await,
        End::Failed(e) => {
            llm_error(&req.request_id, &e);
            fail(job, &reply, &e, true).await
        }
        End::Abandoned => Outcome::abandoned(),
    }
}

/// Records the turn (once, whoever gets there first) and publishes `chat.complete`.
async fn finish(
    worker: &Worker,
    job: &Job,
    reply: &Reply,
    text: String,
    usage: Option<shared::protocol::Usage>,
    label: &'static str,
) -> Outcome {
    let req = &job.request;
    let request_id = Some(req.request_id.clone());
    let turn = [
        HistoryMessage {
            role: "user".into(),
            content: req.message.clone(),
            ts: if req.created_at > 0 {
                req.created_at
            } else {
                now_ms()
            },
            request_id: request_id.clone(),
        },
        HistoryMessage {
            role: "assistant".into(),
            content: text.clone(),
            ts: now_ms(),
            request_id,
        },
    ];
    let appended = match worker
        .store
        .append_history(
            &req.session_id,
            &req.user_id,
            &req.request_id,
            &turn,
            worker.config.history_window,
        )
        .await
    {
        Ok(a) => a,
        Err(e) => {
            redis_error("append_history", &e);
            return Outcome::nak(job.delivered);
        }
    };
    let (content, usage) = if appended {
        (text, usage)
    } else {
        // Another delivery recorded its reply first: that one is the reply.
        match worker
            .store
            .recorded_reply(&req.user_id, &req.session_id, &req.request_id)
            .await
        {
            Ok(Some(m)) => (m.content, None),
            Ok(None) => (text, usage),
            Err(e) => {
                redis_error("recorded_reply", &e);
                return Outcome::nak(job.delivered);
            }
        }
    };
    match reply.complete(content, usage).await {
        Ok(()) => Outcome::ack(label),
        Err(e) => {
            // Recorded: the next delivery only republishes `chat.complete`.
            tracing::warn!(error = %e, "cannot publish chat.complete");
            Outcome::nak(job.delivered)
        }
    }
}

/// Tells the user the request failed; acks (the user decides whether to retry).
async fn fail(job: &Job, reply: &Reply, e: &LlmError, mid_stream: bool) -> Outcome {
    let u = UserError::from_llm(e, mid_stream);
    match reply.error(u.code, u.message, u.retryable).await {
        Ok(()) => Outcome::ack("llm_error"),
        Err(_) => Outcome::nak(job.delivered),
    }
}

fn llm_error(request_id: &str, e: &LlmError) {
    metrics::counter!(shared::metrics::WORKER_LLM_ERRORS, "kind" => e.kind()).increment(1);
    tracing::warn!(%request_id, kind = e.kind(), error = %e, "LLM request failed");
}

fn redis_error(op: &'static str, e: &shared::store::StoreError) {
    metrics::counter!(shared::metrics::REDIS_ERRORS, "op" => op).increment(1);
    tracing::warn!(error = %e, op, "redis failed while handling a chat request");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nak_delays_grow_and_cap() {
        assert_eq!(
            Outcome::nak(1).disposition,
            Disposition::Nak(Duration::from_secs(1))
        );
        assert_eq!(
            Outcome::nak(3).disposition,
            Disposition::Nak(Duration::from_secs(4))
        );
        assert_eq!(
            Outcome::nak(50).disposition,
            Disposition::Nak(NAK_DELAY_MAX)
        );
        assert_eq!(
            Outcome::abandoned().disposition,
            Disposition::Nak(Duration::ZERO)
        );
    }
}
