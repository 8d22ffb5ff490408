//! Arbitrary bytes into the gateway's WebSocket frame decoder (the code `WsReader`
//! runs on every connection), delivered whole and in chunks. It must never panic,
//! must hand out only messages that respect the limits, must fail with one of the
//! three close codes the protocol names, must never buffer more than one frame's
//! worth of bytes, and must not care how TCP split the bytes.
#![no_main]

use gateway::transport::{FrameDecoder, Inbound, ReadError};
use libfuzzer_sys::fuzz_target;
use shared::protocol::CloseCode;

/// Longest frame header: 2 fixed bytes, 8 of extended length, 4 of mask.
const MAX_HEADER: usize = 14;
/// Longest control-frame payload (RFC 6455 section 5.5).
const MAX_CONTROL: usize = 125;
/// The gateway's default message cap, the limit production runs with.
const DEFAULT_MAX_MESSAGE: usize = 64 * 1024;

#[derive(Debug, PartialEq)]
enum Outcome {
    Message(Inbound),
    Closed(CloseCode),
}

fuzz_target!(|data: &[u8]| {
    let [limit, split, stream @ ..] = data else {
        return;
    };
    // Small caps make fragment totals and TooLarge reachable with short inputs.
    let max = if limit & 0x80 != 0 {
        DEFAULT_MAX_MESSAGE
    } else {
        usize::from(*limit) + 1
    };
    let whole = decode(max, stream, stream.len().max(1));
    let chunked = decode(max, stream, usize::from(*split) % 17 + 1);
    assert_eq!(
        whole, chunked,
        "the result depends on how the bytes were split"
    );
});

fn decode(max: usize, stream: &[u8], chunk: usize) -> Vec<Outcome> {
    let mut decoder = FrameDecoder::new(max);
    let mut out = Vec::new();
    for piece in stream.chunks(chunk) {
        decoder.push(piece);
        loop {
            match decoder.parse() {
                Ok(Some(msg)) => {
                    check_message(max, &msg);
                    out.push(Outcome::Message(msg));
                }
                Ok(None) => {
                    assert!(
                        decoder.buffered() < MAX_HEADER + max.max(MAX_CONTROL),
                        "{} bytes buffered with a {max}-byte cap",
                        decoder.buffered()
                    );
                    break;
                }
                Err(e) => {
                    out.push(Outcome::Closed(close_code(&e)));
                    return out;
                }
            }
        }
    }
    out
}

fn check_message(max: usize, msg: &Inbound) {
    match msg {
        Inbound::Text(b) => {
            assert!(b.len() <= max);
            assert!(std::str::from_utf8(b).is_ok(), "text message is not UTF-8");
        }
        Inbound::Binary(b) => assert!(b.len() <= max),
        Inbound::Ping(p) => assert!(p.len() <= MAX_CONTROL),
        Inbound::Pong => {}
        Inbound::Close(code, reason) => {
            assert!(reason.len() <= MAX_CONTROL - 2);
            if let Some(c) = code {
                assert!(matches!(c, 1000..=1003 | 1007..=1013 | 3000..=4999), "{c}");
            } else {
                assert!(reason.is_empty());
            }
        }
    }
}

fn close_code(e: &ReadError) -> CloseCode {
    let code = e
        .close_code()
        .expect("the decoder never reports a vanished peer");
    let expected = match e {
        ReadError::Protocol(_) => CloseCode::ProtocolError,
        ReadError::InvalidUtf8 => CloseCode::InvalidPayload,
        ReadError::TooLarge(_) => CloseCode::TooLarge,
        ReadError::Eof | ReadError::Io(_) => unreachable!("no I/O in the decoder"),
    };
    assert_eq!(code, expected);
    code
}
