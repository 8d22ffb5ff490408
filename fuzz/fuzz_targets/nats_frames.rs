//! Arbitrary bytes from a NATS server into the gateway's subscription multiplexer
//! parser (`gateway::mux::Parser`, what its read loop runs), delivered whole and in
//! chunks. It must never panic, must consume something for every frame it returns,
//! must not care how TCP split the bytes, must never wait on more than one control
//! line and one message body, and every message it returns must come back unchanged
//! when written out again as `HMSG` (or `MSG`) and parsed.
#![no_main]

use bytes::BytesMut;
use gateway::mux::{Frame, Headers, MAX_CONTROL_LINE, Msg, Parser};
use libfuzzer_sys::fuzz_target;

/// The payload limit a NATS server announces by default (1 MiB).
const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;
/// The slack the parser allows above `max_payload` for the header block (`mux.rs`).
const HEADER_SLACK: usize = 64 * 1024;

#[derive(Debug, PartialEq)]
enum Outcome {
    Frame(Frame),
    Refused,
}

fuzz_target!(|data: &[u8]| {
    let [limit, split, stream @ ..] = data else {
        return;
    };
    // Small limits make the size checks reachable with short inputs.
    let max = if limit & 0x80 != 0 {
        DEFAULT_MAX_PAYLOAD
    } else {
        usize::from(*limit)
    };
    let whole = parse(max, stream, stream.len().max(1));
    let chunked = parse(max, stream, usize::from(*split) % 23 + 1);
    assert_eq!(whole, chunked, "the result depends on how the bytes were split");
    for outcome in &whole {
        if let Outcome::Frame(frame) = outcome {
            round_trip(max, frame);
        }
    }
});

fn parse(max: usize, stream: &[u8], chunk: usize) -> Vec<Outcome> {
    let mut parser = Parser::new(max);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match parser.next(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(buf.len() < before, "a frame without consuming input");
                    if let Frame::Msg { msg, .. } = &frame {
                        assert!(msg.payload.len() <= max + HEADER_SLACK);
                    }
                    out.push(Outcome::Frame(frame));
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "bytes consumed without a frame");
                    assert!(
                        buf.len() <= MAX_CONTROL_LINE + 2 + max + HEADER_SLACK + 2,
                        "{} bytes buffered with a {max}-byte limit",
                        buf.len()
                    );
                    break;
                }
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    out.push(Outcome::Refused);
                    return out;
                }
            }
        }
    }
    out
}

/// Writes a parsed frame out as a server would and parses it again.
fn round_trip(max: usize, frame: &Frame) {
    let wire = match frame {
        Frame::Msg { sid, msg } => encode_msg(*sid, msg),
        Frame::Ping => b"PING\r\n".to_vec(),
        Frame::Pong => b"PONG\r\n".to_vec(),
        Frame::Err(e) => format!("-ERR '{e}'\r\n").into_bytes(),
        Frame::Other => return,
    };
    let mut buf = BytesMut::from(&wire[..]);
    // Re-encoding can only add the header block's fixed parts: allow for them.
    let mut parser = Parser::new(max.max(wire.len()));
    match parser.next(&mut buf) {
        Ok(Some(again)) => assert_eq!(&again, frame, "{:?}", String::from_utf8_lossy(&wire)),
        other => panic!(
            "{:?} re-encoded as {:?} parsed as {other:?}",
            frame,
            String::from_utf8_lossy(&wire)
        ),
    }
    assert!(buf.is_empty(), "left over after a round trip: {buf:?}");
}

fn encode_msg(sid: u64, msg: &Msg) -> Vec<u8> {
    let block = header_block(&msg.headers);
    let total = block.len() + msg.payload.len();
    let mut out = if block.is_empty() {
        format!("MSG s.x {sid} {total}\r\n").into_bytes()
    } else {
        format!("HMSG s.x {sid} _INBOX.r {} {total}\r\n", block.len()).into_bytes()
    };
    out.extend_from_slice(&block);
    out.extend_from_slice(&msg.payload);
    out.extend_from_slice(b"\r\n");
    out
}

/// The canonical header block for what the gateway reads; empty when there is none.
fn header_block(h: &Headers) -> Vec<u8> {
    if *h == Headers::default() {
        return Vec::new();
    }
    let mut s = String::from("NATS/1.0\r\n");
    let mut put = |name: &str, value: &str| s.push_str(&format!("{name}: {value}\r\n"));
    if let Some(v) = h.offset {
        put("Sb-Offset", &v.to_string());
    }
    if let Some(v) = h.epoch {
        put("Sb-Epoch", &v.to_string());
    }
    if let Some(v) = h.ts {
        put("Sb-Ts", &v.to_string());
    }
    if let Some(v) = &h.from {
        put("Sb-From", v);
    }
    if h.skip_sender {
        put("Sb-Skip-Sender", "1");
    }
    if let Some(v) = &h.channel {
        put("Sb-Channel", v);
    }
    if let Some(v) = &h.request {
        put("Sb-Request", v);
    }
    if h.last {
        put("Sb-Final", "1");
    }
    s.push_str("\r\n");
    s.into_bytes()
}
