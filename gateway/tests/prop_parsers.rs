//! Property tests for the gateway's parsers of untrusted input (docs/fuzzing.md): the
//! WebSocket frame decoder, handshake credential extraction, the PROXY protocol
//! header decoder, the forwarded-address walk and the NATS server protocol parser of
//! the subscription multiplexer. Bounded to a few seconds in CI;
//! the cargo-fuzz targets in `fuzz/` run the same surfaces for longer
//! (docs/fuzzing.md).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::BytesMut;
use gateway::credentials::{Source, extract};
use gateway::mux::{Frame, Headers, MAX_CONTROL_LINE, Msg as MuxMsg, MuxError, Parser};
use gateway::proxy::{TrustedProxies, client_ip, decode_proxy_header};
use gateway::transport::{FrameDecoder, Inbound, ReadError};
use http::header::{AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};
use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use proptest::sample::select;
use shared::protocol::CloseCode;

/// The gateway's default `SB_MAX_MESSAGE_BYTES`.
const MAX_MESSAGE: usize = 64 * 1024;
/// Longest control-frame payload (RFC 6455 section 5.5).
const MAX_CONTROL: usize = 125;
/// Longest frame header: 2 fixed bytes, 8 of extended length, 4 of mask.
const MAX_HEADER: usize = 14;

// === WebSocket frames ===

/// One client frame as RFC 6455 section 5.2 lays it out (masked, shortest length).
fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut v = vec![(u8::from(fin) << 7) | opcode];
    match payload.len() {
        n if n < 126 => v.push(0x80 | n as u8),
        n if n <= 0xffff => {
            v.push(0x80 | 126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            v.push(0x80 | 127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    v.extend_from_slice(&mask);
    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    v
}

/// A message as a client may send it: data messages split into fragments at
/// arbitrary byte positions (inside UTF-8 sequences too), optionally with a ping
/// between the first and second fragment, as RFC 6455 section 5.4 allows.
#[derive(Debug, Clone)]
enum Msg {
    Data {
        text: bool,
        payload: Vec<u8>,
        cuts: Vec<usize>,
        ping_inside: Option<Vec<u8>>,
    },
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

impl Msg {
    fn encode(&self, mask: [u8; 4], out: &mut Vec<u8>) {
        match self {
            Msg::Data {
                text,
                payload,
                cuts,
                ping_inside,
            } => {
                let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (payload.len() + 1)).collect();
                bounds.sort_unstable();
                bounds.push(payload.len());
                let mut start = 0;
                for (i, end) in bounds.iter().enumerate() {
                    let opcode = match (i, text) {
                        (0, true) => 0x1,
                        (0, false) => 0x2,
                        _ => 0x0,
                    };
                    let fin = i + 1 == bounds.len();
                    out.extend(client_frame(fin, opcode, &payload[start..*end], mask));
                    start = *end;
                    if let (0, false, Some(p)) = (i, fin, ping_inside) {
                        out.extend(client_frame(true, 0x9, p, mask));
                    }
                }
            }
            Msg::Ping(p) => out.extend(client_frame(true, 0x9, p, mask)),
            Msg::Pong(p) => out.extend(client_frame(true, 0xa, p, mask)),
            Msg::Close(None) => out.extend(client_frame(true, 0x8, &[], mask)),
            Msg::Close(Some((code, reason))) => {
                let mut p = code.to_be_bytes().to_vec();
                p.extend_from_slice(reason.as_bytes());
                out.extend(client_frame(true, 0x8, &p, mask));
            }
        }
    }

    /// What the decoder must hand out, in order.
    fn expected(&self, out: &mut Vec<Inbound>) {
        match self {
            Msg::Data {
                text,
                payload,
                cuts,
                ping_inside,
            } => {
                if let (Some(p), false) = (ping_inside, cuts.is_empty()) {
                    out.push(Inbound::Ping(p.clone().into()));
                }
                let b = bytes::Bytes::from(payload.clone());
                out.push(if *text {
                    Inbound::Text(b)
                } else {
                    Inbound::Binary(b)
                });
            }
            Msg::Ping(p) => out.push(Inbound::Ping(p.clone().into())),
            Msg::Pong(_) => out.push(Inbound::Pong),
            Msg::Close(None) => out.push(Inbound::Close(None, String::new())),
            Msg::Close(Some((code, reason))) => {
                out.push(Inbound::Close(Some(*code), reason.clone()))
            }
        }
    }
}

/// Close codes a client may send (RFC 6455 section 7.4, IANA registry).
fn valid_close_code() -> impl Strategy<Value = u16> {
    prop_oneof![1000u16..=1003, 1007u16..=1013, 3000u16..=4999]
}

/// Codes a client must not send: reserved, unassigned, or out of range.
fn invalid_close_code() -> impl Strategy<Value = u16> {
    prop_oneof![
        0u16..1000,
        1004u16..=1006,
        1014u16..3000,
        5000u16..=u16::MAX
    ]
}

/// A close reason that fits a control frame with its code: at most 123 bytes.
fn close_reason() -> impl Strategy<Value = String> {
    ".{0,40}".prop_map(|s| {
        let mut end = s.len().min(MAX_CONTROL - 2);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s[..end].to_owned()
    })
}

/// Payload lengths around the 7-bit, 16-bit and 64-bit length encodings and the cap.
fn data_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        8 => 0usize..300,
        1 => select(vec![125usize, 126, 127, 65_535, MAX_MESSAGE]),
    ]
}

fn message() -> impl Strategy<Value = Msg> {
    let control = || proptest::collection::vec(any::<u8>(), 0..=MAX_CONTROL);
    let data = prop_oneof![
        ".{0,100}".prop_map(|s| (true, s.into_bytes())),
        data_len().prop_flat_map(|n| {
            proptest::collection::vec(any::<u8>(), n).prop_map(|b| (false, b))
        }),
    ];
    prop_oneof![
        6 => (
            data,
            proptest::collection::vec(any::<usize>(), 0..4),
            proptest::option::of(control()),
        )
            .prop_map(|((text, payload), cuts, ping_inside)| Msg::Data {
                text,
                payload,
                cuts,
                ping_inside,
            }),
        1 => control().prop_map(Msg::Ping),
        1 => control().prop_map(Msg::Pong),
        1 => proptest::option::of((valid_close_code(), close_reason())).prop_map(Msg::Close),
    ]
}

/// One RFC 6455 violation appended after valid traffic, with the close code the
/// protocol says it gets (PROTOCOL.md section 2).
#[derive(Debug, Clone)]
enum Violation {
    ReservedBits(u8),
    Unmasked,
    ReservedOpcode(u8),
    ControlTooLong(usize),
    FragmentedControl,
    ContinuationFirst,
    NewMessageInsideFragmented,
    OneByteClose,
    BadCloseCode(u16),
    BadUtf8Text(usize),
    BadUtf8CloseReason,
    TooLargeFrame(u64),
    TooLargeFragments,
    LengthHighBit,
}

fn violation() -> impl Strategy<Value = Violation> {
    prop_oneof![
        (1u8..8).prop_map(|r| Violation::ReservedBits(r << 4)),
        Just(Violation::Unmasked),
        select(vec![3u8, 4, 5, 6, 7, 0xb, 0xc, 0xd, 0xe, 0xf]).prop_map(Violation::ReservedOpcode),
        (126usize..400).prop_map(Violation::ControlTooLong),
        Just(Violation::FragmentedControl),
        Just(Violation::ContinuationFirst),
        Just(Violation::NewMessageInsideFragmented),
        Just(Violation::OneByteClose),
        invalid_close_code().prop_map(Violation::BadCloseCode),
        (0usize..50).prop_map(Violation::BadUtf8Text),
        Just(Violation::BadUtf8CloseReason),
        ((MAX_MESSAGE as u64 + 1)..(1u64 << 62)).prop_map(Violation::TooLargeFrame),
        Just(Violation::TooLargeFragments),
        Just(Violation::LengthHighBit),
    ]
}

impl Violation {
    /// The offending bytes. Oversized frames are only announced: the decoder must
    /// refuse them from the header, before any payload is sent.
    fn encode(&self, mask: [u8; 4]) -> Vec<u8> {
        match self {
            Violation::ReservedBits(bits) => {
                let mut f = client_frame(true, 0x1, b"hi", mask);
                f[0] |= bits;
                f
            }
            Violation::Unmasked => vec![0x81, 0x02, b'h', b'i'],
            Violation::ReservedOpcode(op) => client_frame(true, *op, b"x", mask),
            Violation::ControlTooLong(n) => client_frame(true, 0x9, &vec![0u8; *n], mask),
            Violation::FragmentedControl => client_frame(false, 0x9, b"p", mask),
            Violation::ContinuationFirst => client_frame(true, 0x0, b"x", mask),
            Violation::NewMessageInsideFragmented => {
                let mut f = client_frame(false, 0x1, b"a", mask);
                f.extend(client_frame(true, 0x1, b"b", mask));
                f
            }
            Violation::OneByteClose => client_frame(true, 0x8, &[3], mask),
            Violation::BadCloseCode(code) => client_frame(true, 0x8, &code.to_be_bytes(), mask),
            Violation::BadUtf8Text(at) => {
                let mut p = b"valid text, then not".to_vec();
                p.insert(at % (p.len() + 1), 0xff);
                client_frame(true, 0x1, &p, mask)
            }
            Violation::BadUtf8CloseReason => {
                let mut p = 1000u16.to_be_bytes().to_vec();
                p.extend_from_slice(&[b'o', 0xc3, 0x28]);
                client_frame(true, 0x8, &p, mask)
            }
            Violation::TooLargeFrame(n) => {
                let mut f = vec![0x82, 0x80 | 127];
                f.extend_from_slice(&n.to_be_bytes());
                f.extend_from_slice(&mask);
                f
            }
            Violation::TooLargeFragments => {
                let half = vec![b'a'; MAX_MESSAGE / 2 + 1];
                let mut f = client_frame(false, 0x1, &half, mask);
                let next = client_frame(true, 0x0, &half, mask);
                // The second header alone must be enough to refuse the message.
                f.extend_from_slice(&next[..8]);
                f
            }
            Violation::LengthHighBit => {
                let mut f = vec![0x82, 0x80 | 127];
                f.extend_from_slice(&(1u64 << 63 | 5).to_be_bytes());
                f.extend_from_slice(&mask);
                f
            }
        }
    }

    fn close_code(&self) -> CloseCode {
        match self {
            Violation::BadUtf8Text(_) | Violation::BadUtf8CloseReason => CloseCode::InvalidPayload,
            Violation::TooLargeFrame(_) | Violation::TooLargeFragments => CloseCode::TooLarge,
            _ => CloseCode::ProtocolError,
        }
    }
}

/// Feeds `bytes` in pieces of the given sizes (cycled), taking every message out
/// after each piece, as `WsReader` does after each socket read. Checks on the way
/// that what waits in the buffer is never more than one frame's worth.
fn decode(max: usize, bytes: &[u8], sizes: &[usize]) -> (Vec<Inbound>, Option<ReadError>) {
    let mut decoder = FrameDecoder::new(max);
    let mut out = Vec::new();
    for piece in pieces(bytes, sizes) {
        decoder.push(piece);
        loop {
            match decoder.parse() {
                Ok(Some(msg)) => out.push(msg),
                Ok(None) => {
                    assert!(decoder.buffered() < MAX_HEADER + max.max(MAX_CONTROL));
                    break;
                }
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

/// `bytes` cut into pieces of `sizes` (cycled), as reads from a socket deliver them.
fn pieces<'a>(bytes: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = bytes;
    let mut sizes = sizes.iter().cycle();
    while !rest.is_empty() {
        let n = (*sizes.next().unwrap_or(&usize::MAX)).clamp(1, rest.len());
        out.push(&rest[..n]);
        rest = &rest[n..];
    }
    out
}

fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        Just(vec![usize::MAX]),
        proptest::collection::vec(1usize..40, 1..8),
        Just(vec![1]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Encode, then decode however TCP splits the bytes: the same messages come out.
    #[test]
    fn frames_round_trip(
        msgs in proptest::collection::vec(message(), 0..8),
        mask in any::<[u8; 4]>(),
        sizes in chunk_sizes(),
    ) {
        let mut bytes = Vec::new();
        let mut expected = Vec::new();
        for m in &msgs {
            m.encode(mask, &mut bytes);
            m.expected(&mut expected);
        }
        let (got, err) = decode(MAX_MESSAGE, &bytes, &sizes);
        prop_assert!(err.is_none(), "{err:?}");
        prop_assert_eq!(got, expected);
    }

    /// Valid traffic, then one violation: the messages before it come out, then the
    /// error with the close code of PROTOCOL.md section 2; nothing after it is read.
    #[test]
    fn violations_close_with_the_right_code(
        before in proptest::collection::vec(message(), 0..4),
        bad in violation(),
        after in proptest::collection::vec(message(), 0..3),
        mask in any::<[u8; 4]>(),
        sizes in chunk_sizes(),
    ) {
        let mut bytes = Vec::new();
        let mut expected = Vec::new();
        for m in &before {
            m.encode(mask, &mut bytes);
            m.expected(&mut expected);
        }
        bytes.extend(bad.encode(mask));
        for m in &after {
            m.encode(mask, &mut bytes);
        }
        let (got, err) = decode(MAX_MESSAGE, &bytes, &sizes);
        prop_assert_eq!(got, expected);
        let err = err.expect("the violation is an error");
        prop_assert_eq!(err.close_code(), Some(bad.close_code()), "{}", err);
    }

    /// Anything at all: no panic, limits hold, only the three protocol close codes,
    /// and the split of the bytes changes nothing.
    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        max in prop_oneof![1usize..200, Just(MAX_MESSAGE)],
        sizes in chunk_sizes(),
    ) {
        let (whole, whole_err) = decode(max, &bytes, &[usize::MAX]);
        let (split, split_err) = decode(max, &bytes, &sizes);
        prop_assert_eq!(&whole, &split);
        prop_assert_eq!(
            whole_err.as_ref().map(ReadError::close_code),
            split_err.as_ref().map(ReadError::close_code)
        );
        for m in &whole {
            match m {
                Inbound::Text(b) => {
                    prop_assert!(b.len() <= max);
                    prop_assert!(std::str::from_utf8(b).is_ok());
                }
                Inbound::Binary(b) => prop_assert!(b.len() <= max),
                Inbound::Ping(p) => prop_assert!(p.len() <= MAX_CONTROL),
                Inbound::Pong | Inbound::Close(..) => {}
            }
        }
        if let Some(e) = whole_err {
            prop_assert!(matches!(
                e.close_code(),
                Some(CloseCode::ProtocolError | CloseCode::InvalidPayload | CloseCode::TooLarge)
            ), "{}", e);
        }
    }
}

// === handshake credentials ===

/// An `Authorization` value and what extraction must make of it.
fn authorization() -> impl Strategy<Value = (String, Option<String>)> {
    let token = "[A-Za-z0-9_.-]{1,40}";
    prop_oneof![
        (
            select(vec!["Bearer", "bearer", "BEARER", "bEaReR"]),
            " {1,3}",
            token,
            " {0,2}"
        )
            .prop_map(|(s, sp, t, trail)| (format!("{s}{sp}{t}{trail}"), Some(t))),
        token.prop_map(|t| (format!("Basic {t}"), None)),
        token.prop_map(|t| (t, None)),
        Just(("Bearer".to_owned(), None)),
        Just(("Bearer    ".to_owned(), None)),
        Just((String::new(), None)),
    ]
}

/// A subprotocol list entry.
#[derive(Debug, Clone)]
enum Proto {
    V1,
    Bearer(String),
    Other(String),
}

fn proto() -> impl Strategy<Value = Proto> {
    prop_oneof![
        Just(Proto::V1),
        "[A-Za-z0-9_.-]{0,30}".prop_map(Proto::Bearer),
        "[a-z0-9.]{1,12}".prop_map(Proto::Other),
    ]
}

/// Percent-encodes some characters of `s` (upper- or lower-case hex), as a client
/// library might.
fn percent_encode(s: &str, which: &[bool]) -> String {
    s.bytes()
        .zip(which.iter().cycle())
        .map(|(b, &enc)| {
            if enc {
                format!("%{b:02x}")
            } else {
                char::from(b).to_string()
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// PROTOCOL.md section 1: Authorization header, then the first `bearer.` entry,
    /// then `?token=`; the first present wins even when it is malformed.
    #[test]
    fn credential_precedence(
        auth in proptest::option::of(authorization()),
        protos in proptest::collection::vec(proto(), 0..5),
        lines in 1usize..3,
        query_token in proptest::option::of("[A-Za-z0-9_.-]{0,40}"),
        encode in proptest::collection::vec(any::<bool>(), 1..8),
        query_noise in proptest::collection::vec("(tokenx|a|TOKEN|t)=[a-z0-9%]{0,6}", 0..3),
    ) {
        let mut headers = HeaderMap::new();
        if let Some((value, _)) = &auth {
            headers.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        }
        let items: Vec<String> = protos
            .iter()
            .map(|p| match p {
                Proto::V1 => "switchboard.v1".to_owned(),
                Proto::Bearer(t) => format!("bearer.{t}"),
                Proto::Other(o) => o.clone(),
            })
            .collect();
        for group in items.chunks(items.len().div_ceil(lines).max(1)) {
            headers.append(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_str(&group.join(", ")).unwrap());
        }
        let mut pairs = query_noise.clone();
        if let Some(t) = &query_token {
            pairs.push(format!("token={}", percent_encode(t, &encode)));
        }
        let query = (!pairs.is_empty()).then(|| pairs.join("&"));

        let hs = extract(&headers, query.as_deref());

        prop_assert_eq!(hs.select_subprotocol, protos.iter().any(|p| matches!(p, Proto::V1)));
        let first_bearer = protos.iter().find_map(|p| match p {
            Proto::Bearer(t) => Some(t.clone()),
            _ => None,
        });
        let expected: Option<Result<(String, Source), ()>> = match (&auth, first_bearer, &query_token) {
            (Some((_, Some(t))), _, _) => Some(Ok((t.clone(), Source::Header))),
            (Some((_, None)), _, _) => Some(Err(())),
            (None, Some(t), _) if t.is_empty() => Some(Err(())),
            (None, Some(t), _) => Some(Ok((t, Source::Subprotocol))),
            (None, None, Some(t)) if t.is_empty() => Some(Err(())),
            (None, None, Some(t)) => Some(Ok((t.clone(), Source::Query))),
            (None, None, None) => None,
        };
        prop_assert_eq!(hs.token.map(|r| r.map_err(|_| ())), expected);
    }

    /// Any bytes a header may hold, any query: no panic, and an accepted token is
    /// never empty.
    #[test]
    fn credential_extraction_never_panics(
        auth in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 0..3),
        protos in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 0..3),
        query in proptest::option::of(".{0,120}"),
    ) {
        let mut headers = HeaderMap::new();
        for v in auth.iter().filter_map(|v| HeaderValue::from_bytes(v).ok()) {
            headers.append(AUTHORIZATION, v);
        }
        for v in protos.iter().filter_map(|v| HeaderValue::from_bytes(v).ok()) {
            headers.append(SEC_WEBSOCKET_PROTOCOL, v);
        }
        let hs = extract(&headers, query.as_deref());
        match hs.token {
            Some(Ok((t, source))) => {
                prop_assert!(!t.is_empty());
                if headers.contains_key(AUTHORIZATION) {
                    prop_assert_eq!(source, Source::Header);
                }
            }
            Some(Err(why)) => prop_assert!(!why.is_empty()),
            None => prop_assert!(!headers.contains_key(AUTHORIZATION)),
        }
    }
}

// === PROXY protocol and forwarded addresses ===

/// v2 signature (`ppp::v2::PROTOCOL_PREFIX`).
const V2_SIGNATURE: [u8; 12] = [
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
];

fn v1_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// A v2 PROXY (command 1) TCP header with `tlv` padding bytes after the addresses.
fn v2_header(src: SocketAddr, dst: SocketAddr, tlv: &[u8]) -> Vec<u8> {
    let mut addrs = Vec::new();
    let family = match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            addrs.extend_from_slice(&s.ip().octets());
            addrs.extend_from_slice(&d.ip().octets());
            0x11
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            addrs.extend_from_slice(&s.ip().octets());
            addrs.extend_from_slice(&d.ip().octets());
            0x21
        }
        _ => unreachable!("same family"),
    };
    addrs.extend_from_slice(&src.port().to_be_bytes());
    addrs.extend_from_slice(&dst.port().to_be_bytes());
    addrs.extend_from_slice(tlv);
    let mut h = V2_SIGNATURE.to_vec();
    h.push(0x21);
    h.push(family);
    h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    h.extend(addrs);
    h
}

/// A TLV block of NOOP entries (type 0x04), as a balancer may pad with.
fn noop_tlvs(sizes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for &n in sizes {
        out.push(0x04);
        out.extend_from_slice(&u16::from(n).to_be_bytes());
        out.extend(std::iter::repeat_n(0u8, usize::from(n)));
    }
    out
}

fn addr_pair() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
    prop_oneof![
        (
            any::<[u8; 4]>(),
            any::<u16>(),
            any::<[u8; 4]>(),
            any::<u16>()
        )
            .prop_map(|(a, p, b, q)| (
                SocketAddr::from((Ipv4Addr::from(a), p)),
                SocketAddr::from((Ipv4Addr::from(b), q))
            )),
        (
            any::<[u8; 16]>(),
            any::<u16>(),
            any::<[u8; 16]>(),
            any::<u16>()
        )
            .prop_map(|(a, p, b, q)| (
                SocketAddr::from((Ipv6Addr::from(a), p)),
                SocketAddr::from((Ipv6Addr::from(b), q))
            )),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A header from a balancer decodes to its source; exactly its bytes are
    /// claimed, whatever request follows; every strict prefix waits for more.
    #[test]
    fn proxy_headers_round_trip(
        (src, dst) in addr_pair(),
        v2 in any::<bool>(),
        tlvs in proptest::collection::vec(0u8..100, 0..4),
        rest in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let header = if v2 { v2_header(src, dst, &noop_tlvs(&tlvs)) } else { v1_header(src, dst) };
        // The address block plus TLVs may exceed the gateway's cap; that is refused.
        let within_cap = header.len() <= 16 + 536;
        let mut stream = header.clone();
        stream.extend_from_slice(&rest);
        match decode_proxy_header(&stream) {
            Ok(Some((len, source))) => {
                prop_assert!(within_cap);
                prop_assert_eq!(len, header.len());
                prop_assert_eq!(source, Some(src));
            }
            other => prop_assert!(!within_cap, "{:?}", other.map_err(|e| e.to_string())),
        }
        if within_cap {
            for cut in 0..header.len() {
                prop_assert!(matches!(decode_proxy_header(&header[..cut]), Ok(None)), "cut {}", cut);
            }
        }
    }

    /// Anything a trusted peer might open with: no panic, nothing claimed beyond
    /// the input or the size limits.
    #[test]
    fn proxy_header_arbitrary_bytes(
        prefix in select(vec![&b""[..], b"PROXY ", &V2_SIGNATURE[..]]),
        bytes in proptest::collection::vec(any::<u8>(), 0..700),
    ) {
        let mut stream = prefix.to_vec();
        stream.extend(bytes);
        if let Ok(Some((len, _))) = decode_proxy_header(&stream) {
            prop_assert!(len <= stream.len() && len <= 16 + 536);
        }
    }
}

/// A hop in an `X-Forwarded-For` chain.
#[derive(Debug, Clone)]
enum Hop {
    Trusted(Ipv4Addr),
    Client(Ipv4Addr),
    Garbage(String),
}

fn hop() -> impl Strategy<Value = Hop> {
    prop_oneof![
        any::<[u8; 3]>().prop_map(|[a, b, c]| Hop::Trusted(Ipv4Addr::new(10, a, b, c))),
        any::<[u8; 3]>().prop_map(|[a, b, c]| Hop::Client(Ipv4Addr::new(198, a, b, c))),
        select(vec!["unknown", "_hidden", "not-an-ip", "1.2.3", "[::1"])
            .prop_map(|g| Hop::Garbage(g.to_owned())),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The walk of proxy.rs: from the right, skip trusted hops; the first untrusted
    /// one is the client; garbage stops at the last trusted hop; an untrusted peer
    /// is the client whatever it sends.
    #[test]
    fn forwarded_walk(
        hops in proptest::collection::vec(hop(), 0..6),
        peer_trusted in any::<bool>(),
        split in 1usize..3,
    ) {
        let trusted = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let peer: IpAddr = if peer_trusted { "10.9.9.9" } else { "203.0.113.5" }.parse().unwrap();
        let text: Vec<String> = hops
            .iter()
            .map(|h| match h {
                Hop::Trusted(ip) | Hop::Client(ip) => ip.to_string(),
                Hop::Garbage(g) => g.clone(),
            })
            .collect();
        let mut headers = HeaderMap::new();
        for group in text.chunks(text.len().div_ceil(split).max(1)) {
            headers.append("x-forwarded-for", HeaderValue::from_str(&group.join(", ")).unwrap());
        }
        let expected = if !peer_trusted {
            peer
        } else {
            let mut last = peer;
            let mut found = None;
            for h in hops.iter().rev() {
                match h {
                    Hop::Trusted(ip) => last = IpAddr::V4(*ip),
                    Hop::Client(ip) => {
                        found = Some(IpAddr::V4(*ip));
                        break;
                    }
                    Hop::Garbage(_) => break,
                }
            }
            found.unwrap_or(last)
        };
        prop_assert_eq!(client_ip(peer, &headers, &trusted), expected);
    }
}

// === NATS server protocol (the subscription multiplexer) ===

/// A frame as a NATS server sends it to a subscriber, with what the parser must
/// make of it.
fn nats_frame() -> impl Strategy<Value = (Vec<u8>, Frame)> {
    let value = "[ -~]{0,20}".prop_map(|s| s.trim().to_owned());
    let msg = (
        any::<u64>(),
        "[a-z0-9_.]{1,30}",
        proptest::option::of("_INBOX\\.[a-z0-9]{1,10}"),
        proptest::collection::vec(any::<u8>(), 0..300),
        proptest::option::of(any::<u64>()),
        proptest::option::of(value.clone()),
        any::<bool>(),
    )
        .prop_map(|(sid, subject, reply, payload, offset, channel, last)| {
            let headers = Headers {
                offset,
                channel: channel.map(Into::into),
                last,
                ..Headers::default()
            };
            let mut block = String::new();
            if headers != Headers::default() {
                block.push_str("NATS/1.0\r\n");
                if let Some(o) = offset {
                    block.push_str(&format!("Sb-Offset: {o}\r\n"));
                }
                if let Some(c) = &headers.channel {
                    block.push_str(&format!("sb-channel:{c}\r\n"));
                }
                if last {
                    block.push_str("Sb-Final: 1\r\nX-Other: ignored\r\n");
                }
                block.push_str("\r\n");
            }
            let reply = reply.map(|r| format!(" {r}")).unwrap_or_default();
            let total = block.len() + payload.len();
            let mut wire = if block.is_empty() {
                format!("MSG {subject} {sid}{reply} {total}\r\n")
            } else {
                format!("HMSG {subject} {sid}{reply} {} {total}\r\n", block.len())
            }
            .into_bytes();
            wire.extend_from_slice(block.as_bytes());
            wire.extend_from_slice(&payload);
            wire.extend_from_slice(b"\r\n");
            let frame = Frame::Msg {
                sid,
                msg: MuxMsg {
                    payload: payload.into(),
                    headers,
                },
            };
            (wire, frame)
        });
    prop_oneof![
        4 => msg,
        1 => Just((b"PING\r\n".to_vec(), Frame::Ping)),
        1 => Just((b"PONG\r\n".to_vec(), Frame::Pong)),
        1 => Just((b"+OK\r\n".to_vec(), Frame::Other)),
        1 => "[a-zA-Z ]{0,30}".prop_map(|e| (format!("-ERR '{e}'\r\n").into_bytes(), Frame::Err(e))),
    ]
}

/// Parses `bytes` fed in pieces of `sizes`, as the read loop does.
fn parse_nats(bytes: &[u8], sizes: &[usize]) -> Result<Vec<Frame>, MuxError> {
    let mut parser = Parser::new(1 << 20);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in pieces(bytes, sizes) {
        buf.extend_from_slice(piece);
        while let Some(frame) = parser.next(&mut buf)? {
            out.push(frame);
        }
    }
    assert!(buf.is_empty(), "left over: {buf:?}");
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever way TCP splits a server's bytes, the same frames come out, whole.
    #[test]
    fn nats_frames_survive_any_split(
        frames in proptest::collection::vec(nats_frame(), 1..8),
        sizes in chunk_sizes(),
    ) {
        let wire: Vec<u8> = frames.iter().flat_map(|(w, _)| w.clone()).collect();
        let expected: Vec<&Frame> = frames.iter().map(|(_, f)| f).collect();
        let got = parse_nats(&wire, &sizes).expect("valid server bytes");
        prop_assert_eq!(got.iter().collect::<Vec<_>>(), expected);
    }
}

proptest! {
    // Each case parses a 16 KiB line and the parser looks for the CRLF from the start
    // on every call: reads of a few KiB, as sockets deliver, and a few cases.
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// A control line is refused over the limit and parsed within it, however it
    /// arrives: the decision never depends on where a read ended.
    #[test]
    fn nats_control_line_limit_ignores_splits(
        extra in 0usize..3,
        under in any::<bool>(),
        sizes in proptest::collection::vec(256usize..8192, 1..4),
    ) {
        let len = if under { MAX_CONTROL_LINE - extra } else { MAX_CONTROL_LINE + 1 + extra };
        let mut line = vec![b'x'; len];
        line.extend_from_slice(b"\r\nPING\r\n");
        let got = parse_nats(&line, &sizes);
        if under {
            prop_assert_eq!(got.expect("within the limit"), vec![Frame::Other, Frame::Ping]);
        } else {
            prop_assert!(got.is_err());
        }
    }
}
