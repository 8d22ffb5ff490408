//! Arbitrary `Authorization` and `Sec-WebSocket-Protocol` header values and query
//! strings into the handshake credential extraction. It must never panic and must
//! keep the precedence of PROTOCOL.md section 1: the header wins whenever present
//! (a malformed one is an error, never a fall-through), then a `bearer.` entry,
//! then `?token=`; an accepted token is never empty; `switchboard.v1` is selected
//! exactly when offered.
#![no_main]

use gateway::credentials::{Source, extract};
use http::header::{AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    authorization: Vec<Vec<u8>>,
    protocols: Vec<Vec<u8>>,
    query: Option<String>,
}

fuzz_target!(|input: Input| {
    let mut headers = HeaderMap::new();
    for v in &input.authorization {
        if let Ok(v) = HeaderValue::from_bytes(v) {
            headers.append(AUTHORIZATION, v);
        }
    }
    for v in &input.protocols {
        if let Ok(v) = HeaderValue::from_bytes(v) {
            headers.append(SEC_WEBSOCKET_PROTOCOL, v);
        }
    }
    let hs = extract(&headers, input.query.as_deref());

    let items: Vec<&str> = headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|list| list.split(',').map(str::trim))
        .collect();
    assert_eq!(
        hs.select_subprotocol,
        items.contains(&"switchboard.v1"),
        "{items:?}"
    );
    let bearer_entry = items.iter().any(|i| i.starts_with("bearer."));
    let query_token = input
        .query
        .as_deref()
        .is_some_and(|q| q.split('&').any(|p| p.split('=').next() == Some("token")));

    match &hs.token {
        Some(Ok((token, source))) => {
            assert!(!token.is_empty());
            let expected = if headers.contains_key(AUTHORIZATION) {
                Source::Header
            } else if bearer_entry {
                Source::Subprotocol
            } else {
                Source::Query
            };
            assert_eq!(*source, expected);
            if *source == Source::Query {
                assert!(query_token);
            }
        }
        Some(Err(why)) => assert!(!why.is_empty()),
        None => {
            assert!(!headers.contains_key(AUTHORIZATION));
            assert!(!bearer_entry);
            assert!(!query_token);
        }
    }
});
