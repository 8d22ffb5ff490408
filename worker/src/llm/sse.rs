//! Server-Sent Events decoding (the WHATWG rules, as openai-python applies them):
//! events end at a blank line, `data:` lines of one event are joined with `\n`, one
//! leading space after the colon is dropped, `:` lines are comments (keep-alives),
//! unknown fields are ignored. Two extras for LLM servers (docs/DESIGN.md#llm-streaming):
//! llama.cpp builds before 2025-09 sent errors as a non-standard `error:`
//! field, which becomes an `error` event, and an event left open at EOF is still
//! dispatched (some servers omit the blank line after `[DONE]`).

use super::lines::{LineSplitter, LineTooLong};

/// A data line this long is not a chat chunk.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;
/// Nor is an event this large.
pub const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, when given (`error` for errors).
    pub event: Option<String>,
    pub data: String,
}

/// Why a stream could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error(transparent)]
    LineTooLong(#[from] LineTooLong),
    #[error("event larger than {0} bytes")]
    EventTooLarge(usize),
}

/// Incremental decoder: feed it body bytes as they arrive.
#[derive(Debug)]
pub struct SseDecoder {
    lines: LineSplitter,
    scratch: Vec<String>,
    data: String,
    has_data: bool,
    event: Option<String>,
}

impl Default for SseDecoder {
    fn default() -> Self {
        SseDecoder::new()
    }
}

impl SseDecoder {
    pub fn new() -> SseDecoder {
        SseDecoder {
            lines: LineSplitter::new(MAX_LINE_BYTES),
            scratch: Vec::new(),
            data: String::new(),
            has_data: false,
            event: None,
        }
    }

    /// Decodes `bytes`; every event they complete is pushed to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        let mut lines = std::mem::take(&mut self.scratch);
        let r = self.lines.feed(bytes, &mut lines);
        for line in lines.drain(..) {
            self.line(&line, out)?;
        }
        self.scratch = lines;
        r.map_err(SseError::from)
    }

    /// End of the body: dispatches an event that was not closed by a blank line.
    pub fn finish(&mut self, out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        let mut lines = Vec::new();
        self.lines.finish(&mut lines);
        for line in lines {
            self.line(&line, out)?;
        }
        self.dispatch(out);
        Ok(())
    }

    fn line(&mut self, line: &str, out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if line.is_empty() {
            self.dispatch(out);
            return Ok(());
        }
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => self.push_data(value)?,
            "event" => self.event = Some(value.to_owned()),
            // Legacy llama.cpp: `error: {...}` instead of `data: {"error": ...}`.
            "error" => {
                self.event = Some("error".to_owned());
                self.push_data(value)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn push_data(&mut self, value: &str) -> Result<(), SseError> {
        if self.data.len() + value.len() + 1 > MAX_EVENT_BYTES {
            return Err(SseError::EventTooLarge(MAX_EVENT_BYTES));
        }
        if self.has_data {
            self.data.push('\n');
        }
        self.data.push_str(value);
        self.has_data = true;
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let is_error = self.event.as_deref() == Some("error");
        if self.has_data || is_error {
            out.push(SseEvent {
                event: self.event.take(),
                data: std::mem::take(&mut self.data),
            });
        }
        self.data.clear();
        self.has_data = false;
        self.event = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(parts: &[&str]) -> Vec<SseEvent> {
        let mut d = SseDecoder::new();
        let mut out = Vec::new();
        for p in parts {
            d.feed(p.as_bytes(), &mut out).unwrap();
        }
        d.finish(&mut out).unwrap();
        out
    }

    fn data(s: &str) -> SseEvent {
        SseEvent {
            event: None,
            data: s.to_owned(),
        }
    }

    #[test]
    fn events_end_at_blank_lines_with_any_line_end() {
        assert_eq!(
            decode(&["data: a\n\ndata: b\r\n\r\ndata: c\r\rdata: d\n\n"]),
            [data("a"), data("b"), data("c"), data("d")]
        );
    }

    #[test]
    fn fragmented_input_reassembles() {
        let whole = "data: {\"x\":\"héllo\"}\r\n\r\ndata: [DONE]\r\n\r\n";
        let bytes = whole.as_bytes();
        for cut in 1..bytes.len() {
            let mut d = SseDecoder::new();
            let mut out = Vec::new();
            d.feed(&bytes[..cut], &mut out).unwrap();
            d.feed(&bytes[cut..], &mut out).unwrap();
            d.finish(&mut out).unwrap();
            assert_eq!(
                out,
                [data("{\"x\":\"héllo\"}"), data("[DONE]")],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn comments_and_unknown_fields_are_skipped() {
        assert_eq!(
            decode(&[
                ":\n\n: ping - 2025-01-01\n\nid: 7\nretry: 10\ndata: x\n\n: OPENROUTER PROCESSING\n\n"
            ]),
            [data("x")]
        );
    }

    #[test]
    fn multi_line_data_is_joined() {
        assert_eq!(
            decode(&["data: a\ndata:b\ndata:  c\n\n"]),
            [data("a\nb\n c")]
        );
        assert_eq!(decode(&["data\n\n"]), [data("")]);
    }

    #[test]
    fn error_events_and_the_legacy_error_field() {
        assert_eq!(
            decode(&["event: error\ndata: {\"message\":\"x\"}\n\n"]),
            [SseEvent {
                event: Some("error".into()),
                data: "{\"message\":\"x\"}".into()
            }]
        );
        assert_eq!(
            decode(&["error: {\"code\":400}\n\ndata: [DONE]\n\n"]),
            [
                SseEvent {
                    event: Some("error".into()),
                    data: "{\"code\":400}".into()
                },
                data("[DONE]")
            ]
        );
    }

    #[test]
    fn an_unterminated_last_event_is_flushed_at_eof() {
        assert_eq!(
            decode(&["data: x\n\ndata: [DONE]"]),
            [data("x"), data("[DONE]")]
        );
        assert_eq!(decode(&["data: [DONE]\n"]), [data("[DONE]")]);
    }

    #[test]
    fn oversized_lines_fail() {
        let mut d = SseDecoder::new();
        let big = vec![b'a'; MAX_LINE_BYTES + 1];
        let mut out = Vec::new();
        assert!(d.feed(&big, &mut out).is_err());
    }
}
