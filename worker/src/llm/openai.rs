//! The OpenAI-compatible Chat Completions dialect: the streaming request body and the
//! meaning of each SSE event, tolerant of how real servers differ
//! (docs/DESIGN.md#llm-streaming): `delta.content` absent, null or empty, the
//! usage chunk with `choices` empty, null or missing, `error` objects or strings in a
//! 200 stream.

use serde_json::{Value, json};
use shared::protocol::Usage;

use super::message::{LlmError, LlmEvent, Message};
use super::sse::SseEvent;

/// The request body: streaming, with the final usage chunk asked for.
pub fn request_body(model: &str, messages: &[Message], max_tokens: Option<u32>) -> Value {
    let mut body = json!({
        "model": model,
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(n) = max_tokens {
        body["max_tokens"] = json!(n);
    }
    body
}

/// Turns one SSE event into stream events.
pub fn interpret(ev: &SseEvent, out: &mut Vec<LlmEvent>) -> Result<(), LlmError> {
    if ev.event.as_deref() == Some("error") {
        let detail = serde_json::from_str::<Value>(&ev.data)
            .map(|v| error_message(v.get("error").unwrap_or(&v)))
            .unwrap_or_else(|_| truncate(&ev.data));
        return Err(LlmError::Upstream(detail));
    }
    let data = ev.data.trim();
    if data.starts_with("[DONE]") {
        out.push(LlmEvent::Done);
        return Ok(());
    }
    if data.is_empty() {
        return Ok(());
    }
    let v: Value = serde_json::from_str(data)
        .map_err(|e| LlmError::Protocol(format!("chunk is not JSON: {e}")))?;
    interpret_chunk(&v, out)
}

/// One `chat.completion.chunk` object (or, for a server that ignored `stream`, a
/// whole `chat.completion`).
pub fn interpret_chunk(v: &Value, out: &mut Vec<LlmEvent>) -> Result<(), LlmError> {
    if let Some(err) = v.get("error").filter(|e| truthy(e)) {
        return Err(LlmError::Upstream(error_message(err)));
    }
    if !v.is_object() {
        return Err(LlmError::Protocol("chunk is not a JSON object".into()));
    }
    if let Some(choices) = v.get("choices").and_then(Value::as_array) {
        for choice in choices {
            // n > 1 is never asked for; only the first choice is the reply.
            if choice.get("index").and_then(Value::as_u64).unwrap_or(0) != 0 {
                continue;
            }
            let text = choice
                .get("delta")
                .or_else(|| choice.get("message"))
                .and_then(|d| d.get("content"))
                .and_then(Value::as_str);
            if let Some(t) = text.filter(|t| !t.is_empty()) {
                out.push(LlmEvent::Content(t.to_owned()));
            }
            if let Some(r) = choice.get("finish_reason").and_then(Value::as_str) {
                out.push(LlmEvent::Finish(r.to_owned()));
            }
        }
    }
    if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
        out.push(LlmEvent::Usage(usage(u)));
    }
    Ok(())
}

fn usage(u: &Value) -> Usage {
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let (prompt, completion) = (n("prompt_tokens"), n("completion_tokens"));
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: u
            .get("total_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(prompt + completion),
    }
}

fn truthy(v: &Value) -> bool {
    !matches!(v, Value::Null | Value::Bool(false))
        && !v.as_str().is_some_and(str::is_empty)
        && !v.as_object().is_some_and(|o| o.is_empty())
}

/// A readable message from any of the error shapes servers send: `{"message": ..}`,
/// a bare string, `{"detail": ..}`, or anything else as compact JSON.
pub fn error_message(v: &Value) -> String {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Object(o) => o
            .get("message")
            .or_else(|| o.get("detail"))
            .or_else(|| o.get("error").filter(|e| e.is_string()))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string()),
        other => other.to_string(),
    };
    truncate(&text)
}

/// Error texts end up in logs and `chat.error` messages: keep them short.
pub fn truncate(s: &str) -> String {
    const MAX: usize = 300;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(MAX).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(data: &str) -> Result<Vec<LlmEvent>, LlmError> {
        let mut out = Vec::new();
        interpret(
            &SseEvent {
                event: None,
                data: data.into(),
            },
            &mut out,
        )?;
        Ok(out)
    }

    #[test]
    fn deltas_of_every_server_shape() {
        // OpenAI / vLLM first chunk, llama.cpp null content, llama-cpp-python no content.
        assert_eq!(
            run(r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#).unwrap(),
            []
        );
        assert_eq!(
            run(r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":null}}],"usage":null}"#).unwrap(),
            []
        );
        assert_eq!(
            run(r#"{"choices":[{"delta":{"role":"assistant"}}]}"#).unwrap(),
            []
        );
        assert_eq!(
            run(r#"{"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}"#)
                .unwrap(),
            [LlmEvent::Content("Hel".into())]
        );
        assert_eq!(
            run(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#).unwrap(),
            [LlmEvent::Finish("stop".into())]
        );
    }

    #[test]
    fn usage_only_chunks_with_empty_null_or_missing_choices() {
        let want = [LlmEvent::Usage(Usage {
            prompt_tokens: 3,
            completion_tokens: 5,
            total_tokens: 8,
        })];
        for c in [r#""choices":[],"#, r#""choices":null,"#, ""] {
            let data = format!(r#"{{{c}"usage":{{"prompt_tokens":3,"completion_tokens":5}}}}"#);
            assert_eq!(run(&data).unwrap(), want, "{data}");
        }
    }

    #[test]
    fn done_and_errors() {
        assert_eq!(run("[DONE]").unwrap(), [LlmEvent::Done]);
        let e =
            run(r#"{"error":{"message":"boom","type":"server_error","code":500}}"#).unwrap_err();
        assert!(
            matches!(e, LlmError::Upstream(ref m) if m == "boom"),
            "{e:?}"
        );
        let e = run(r#"{"error":"Unauthorized"}"#).unwrap_err();
        assert!(matches!(e, LlmError::Upstream(ref m) if m == "Unauthorized"));
        assert!(matches!(run("{nope"), Err(LlmError::Protocol(_))));
        // `error: null` on a normal chunk is not an error.
        assert_eq!(
            run(r#"{"error":null,"choices":[{"delta":{"content":"x"}}]}"#).unwrap(),
            [LlmEvent::Content("x".into())]
        );
        let mut out = Vec::new();
        let e = interpret(
            &SseEvent {
                event: Some("error".into()),
                data: r#"{"code":400,"message":"too long"}"#.into(),
            },
            &mut out,
        )
        .unwrap_err();
        assert!(matches!(e, LlmError::Upstream(ref m) if m == "too long"));
    }

    #[test]
    fn request_body_asks_for_a_stream_with_usage() {
        let b = request_body("m", &[Message::user("hi")], Some(16));
        assert_eq!(b["stream"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["max_tokens"], 16);
        assert_eq!(b["messages"][0]["role"], "user");
    }
}
