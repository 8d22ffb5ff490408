//! Ollama's native `POST /api/chat` dialect (docs/DESIGN.md#llm-streaming): one JSON
//! object per line (NDJSON), `message.content` carries text, the last line has
//! `done: true` with token counts, and an `{"error": ".."}` line reports a failure
//! after output has started.

use serde_json::{Value, json};
use shared::protocol::Usage;

use super::message::{LlmError, LlmEvent, Message};
use super::openai::error_message;

/// The request body: streaming (Ollama's default, said explicitly).
pub fn request_body(model: &str, messages: &[Message], max_tokens: Option<u32>) -> Value {
    let mut body = json!({
        "model": model,
        "messages": messages,
        "stream": true,
    });
    if let Some(n) = max_tokens {
        body["options"] = json!({"num_predict": n});
    }
    body
}

/// Turns one NDJSON line into stream events. Blank lines are ignored.
pub fn interpret_line(line: &str, out: &mut Vec<LlmEvent>) -> Result<(), LlmError> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(());
    }
    let v: Value = serde_json::from_str(line)
        .map_err(|e| LlmError::Protocol(format!("line is not JSON: {e}")))?;
    interpret_object(&v, out)
}

/// One response object.
pub fn interpret_object(v: &Value, out: &mut Vec<LlmEvent>) -> Result<(), LlmError> {
    if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
        return Err(LlmError::Upstream(error_message(err)));
    }
    if !v.is_object() {
        return Err(LlmError::Protocol("line is not a JSON object".into()));
    }
    let text = v
        .get("message")
        .and_then(|m| m.get("content"))
        .or_else(|| v.get("response"))
        .and_then(Value::as_str);
    if let Some(t) = text.filter(|t| !t.is_empty()) {
        out.push(LlmEvent::Content(t.to_owned()));
    }
    if v.get("done").and_then(Value::as_bool) == Some(true) {
        let n = |k: &str| v.get(k).and_then(Value::as_u64);
        if let (Some(p), Some(c)) = (n("prompt_eval_count"), n("eval_count")) {
            out.push(LlmEvent::Usage(Usage {
                prompt_tokens: p,
                completion_tokens: c,
                total_tokens: p + c,
            }));
        }
        let reason = v
            .get("done_reason")
            .and_then(Value::as_str)
            .unwrap_or("stop");
        out.push(LlmEvent::Finish(reason.to_owned()));
        out.push(LlmEvent::Done);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::lines::LineSplitter;

    fn run(body: &[&str]) -> Result<Vec<LlmEvent>, LlmError> {
        let mut lines = Vec::new();
        let mut s = LineSplitter::new(1024);
        for p in body {
            s.feed(p.as_bytes(), &mut lines).unwrap();
        }
        s.finish(&mut lines);
        let mut out = Vec::new();
        for l in &lines {
            interpret_line(l, &mut out)?;
        }
        Ok(out)
    }

    #[test]
    fn a_stream_split_anywhere() {
        let body = concat!(
            r#"{"model":"m","message":{"role":"assistant","content":"Hel"},"done":false}"#,
            "\n",
            r#"{"model":"m","message":{"role":"assistant","content":"lo"},"done":false}"#,
            "\r\n\n",
            r#"{"model":"m","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","prompt_eval_count":10,"eval_count":2}"#
        );
        let want = vec![
            LlmEvent::Content("Hel".into()),
            LlmEvent::Content("lo".into()),
            LlmEvent::Usage(Usage {
                prompt_tokens: 10,
                completion_tokens: 2,
                total_tokens: 12,
            }),
            LlmEvent::Finish("stop".into()),
            LlmEvent::Done,
        ];
        for cut in 1..body.len() {
            let (a, b) = body.split_at(cut);
            assert_eq!(run(&[a, b]).unwrap(), want, "cut at {cut}");
        }
    }

    #[test]
    fn errors_and_malformed_lines() {
        let e = run(&["{\"message\":{\"content\":\"x\"}}\n{\"error\":\"model not found\"}\n"])
            .unwrap_err();
        assert!(matches!(e, LlmError::Upstream(ref m) if m == "model not found"));
        assert!(matches!(run(&["nope\n"]), Err(LlmError::Protocol(_))));
        assert!(matches!(run(&["[1]\n"]), Err(LlmError::Protocol(_))));
    }

    #[test]
    fn request_body_maps_max_tokens() {
        let b = request_body("llama3.2", &[Message::user("hi")], Some(8));
        assert_eq!(b["options"]["num_predict"], 8);
        assert_eq!(b["stream"], true);
    }
}
