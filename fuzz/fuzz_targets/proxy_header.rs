//! Arbitrary bytes as the start of a connection from a trusted balancer, into the
//! PROXY protocol v1/v2 header decoder. It must never panic, never claim more bytes
//! than it was given or than the size limits allow, decide the same on exactly the
//! header's bytes, and, while it waits for more, have waited on every prefix too.
#![no_main]

use gateway::proxy::decode_proxy_header;
use libfuzzer_sys::fuzz_target;

/// v1 headers end within 107 bytes; v2 within 16 + 536 (`proxy.rs`).
const V1_MAX: usize = 107;
const V2_MAX: usize = 16 + 536;

fuzz_target!(|data: &[u8]| {
    match decode_proxy_header(data) {
        Ok(Some((len, source))) => {
            assert!(len <= data.len() && len <= V2_MAX);
            if data.starts_with(b"PROXY ") {
                assert!(len <= V1_MAX);
            }
            let exact = decode_proxy_header(&data[..len]).expect("same bytes, same answer");
            assert_eq!(exact, Some((len, source)));
        }
        Ok(None) => {
            for cut in [0, data.len() / 2, data.len().saturating_sub(1)] {
                assert!(matches!(decode_proxy_header(&data[..cut]), Ok(None)));
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
