//! Arbitrary `X-Forwarded-For` and `Forwarded` lines into the client-address walk.
//! It must never panic; a peer outside the trusted networks is always its own
//! client address whatever it sends; and an address is always reported in its
//! canonical form (IPv4-mapped IPv6 as IPv4), so one host has one rate-limit bucket.
#![no_main]

use std::net::IpAddr;

use gateway::proxy::{ForwardedHeader, TrustedProxies, client_ip};
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

const PEERS: [&str; 6] = [
    "10.0.0.1",
    "203.0.113.7",
    "::ffff:10.0.0.2",
    "::ffff:198.51.100.1",
    "2001:db8::1",
    "2001:db9::1",
];

#[derive(Arbitrary, Debug)]
struct Input {
    peer: u8,
    rfc7239: bool,
    lines: Vec<(bool, Vec<u8>)>,
}

fuzz_target!(|input: Input| {
    let trusted = TrustedProxies::new(
        ["10.0.0.0/8", "127.0.0.0/8", "2001:db8::/32"]
            .iter()
            .map(|n| n.parse().expect("CIDR"))
            .collect(),
    )
    .with_header(if input.rfc7239 {
        ForwardedHeader::Forwarded
    } else {
        ForwardedHeader::XForwardedFor
    });
    let peer: IpAddr = PEERS[usize::from(input.peer) % PEERS.len()]
        .parse()
        .expect("address");
    let mut headers = HeaderMap::new();
    for (forwarded, line) in &input.lines {
        let name = if *forwarded {
            HeaderName::from_static("forwarded")
        } else {
            HeaderName::from_static("x-forwarded-for")
        };
        if let Ok(v) = HeaderValue::from_bytes(line) {
            headers.append(name, v);
        }
    }
    let ip = client_ip(peer, &headers, &trusted);
    assert_eq!(ip, ip.to_canonical());
    if !trusted.contains(peer) {
        assert_eq!(ip, peer.to_canonical());
    }
});
