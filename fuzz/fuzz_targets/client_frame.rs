//! Arbitrary bytes into the client frame parser (every text message a connection
//! receives goes through it). It must never panic; what it accepts is a known frame
//! type with a bounded id; what it refuses carries a message for the `BAD_REQUEST`
//! error frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::protocol::{CLIENT_FRAME_TYPES, ClientMessage, FrameId, MAX_ID_CHARS};

fuzz_target!(|data: &[u8]| {
    let id = match ClientMessage::parse(data) {
        Ok(msg) => {
            assert!(CLIENT_FRAME_TYPES.contains(&msg.frame.kind()));
            msg.id
        }
        Err(e) => {
            assert!(!e.message.is_empty(), "a refusal without a reason");
            e.id
        }
    };
    if let Some(FrameId::Str(s)) = id {
        assert!(s.chars().count() <= MAX_ID_CHARS);
    }
});
