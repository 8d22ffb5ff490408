//! Client address resolution behind load balancers: decides which IP per-IP limits and logs use.
//!
//! # Trust model
//!
//! Forwarding information — `Forwarded` (RFC 7239), `X-Forwarded-For`, or a PROXY protocol
//! header — is honoured **only** when the direct TCP peer is in the trusted-proxy CIDR list
//! (`SB_TRUSTED_PROXIES`). For any other peer the socket address is the client address and
//! whatever forwarding headers it sends change nothing, so a client cannot pick the IP its
//! limits are counted against.
//!
//! When the peer is trusted, [`client_ip`] walks the forwarding chain from the right (nearest
//! hop first), skipping hops that are themselves trusted proxies; the first untrusted hop is the
//! client. Everything left of that hop was written by the client or by proxies we know nothing
//! about, so it is never consulted. An entry that is not an address (garbage, `unknown`, an
//! obfuscated `_identifier`) ends the walk at the last trusted hop, because whatever lies left
//! of it has no trustworthy origin.
//!
//! Only one header is read, the one the trusted proxies maintain (`SB_FORWARDED_HEADER`,
//! default `X-Forwarded-For`). The walk is only sound for a header the proxies append to
//! (or strip): reading both would let a client-supplied `Forwarded` header, passed through
//! untouched by a balancer that only appends `X-Forwarded-For`, choose the client address.
//!
//! # PROXY protocol
//!
//! With the PROXY protocol enabled, the accept loop reads the header *before* handing the stream
//! to HTTP, and only from trusted peers — an untrusted peer's bytes go straight to the HTTP
//! parser, which rejects a `PROXY ...` preamble as a malformed request:
//!
//! ```text
//! let (mut stream, socket_peer) = listener.accept().await?;
//! let peer = if proxy_protocol_enabled && trusted.contains(socket_peer.ip()) {
//!     match read_proxy_header(&mut stream, header_timeout).await {
//!         Ok(Some(source)) => source,  // the client as seen by the load balancer
//!         Ok(None) => socket_peer,      // LOCAL / UNKNOWN: the balancer's own health check
//!         Err(err) => {
//!             // The stream position is unspecified after an error: drop the connection.
//!             tracing::debug!(%err, %socket_peer, "rejecting connection");
//!             continue;
//!         }
//!     }
//! } else {
//!     socket_peer
//! };
//! // per request:
//! let ip = client_ip(peer.ip(), request.headers(), &trusted);
//! ```
//!
//! The address carried by the PROXY header becomes the effective peer for [`client_ip`], so
//! forwarding headers are honoured only if that address is itself a trusted proxy (for example
//! an internal reverse proxy sitting behind a TCP load balancer).

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use http::HeaderMap;
use http::header::FORWARDED;
use ipnet::IpNet;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Which forwarding header the trusted proxies maintain. Only that one is read: a
/// balancer that appends `X-Forwarded-For` but passes a client's own `Forwarded`
/// through would otherwise let the client choose its address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For` (HAProxy `option forwardfor`, nginx, most cloud balancers).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded`.
    Forwarded,
}

impl std::str::FromStr for ForwardedHeader {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "x-forwarded-for" | "xff" => Ok(ForwardedHeader::XForwardedFor),
            "forwarded" => Ok(ForwardedHeader::Forwarded),
            other => Err(format!("{other:?} is not x-forwarded-for or forwarded")),
        }
    }
}

/// Trusted proxy networks (CIDR) and the header they maintain. Empty = trust nobody.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
    header: ForwardedHeader,
}

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> Self {
        Self {
            nets,
            header: ForwardedHeader::default(),
        }
    }

    /// Reads `header` instead of the default `X-Forwarded-For`.
    pub fn with_header(mut self, header: ForwardedHeader) -> Self {
        self.header = header;
        self
    }

    /// Whether `ip` lies in a trusted network.
    ///
    /// An IPv4 address and its IPv4-mapped IPv6 form (`::ffff:a.b.c.d`, what a dual-stack
    /// listener reports for IPv4 clients) are the same host, so either form matches nets written
    /// in either family.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let mapped = match ip {
            IpAddr::V4(v4) => Some(IpAddr::V6(v4.to_ipv6_mapped())),
            IpAddr::V6(_) => None,
        };
        self.nets
            .iter()
            .any(|net| net.contains(&ip) || mapped.is_some_and(|m| net.contains(&m)))
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }
}

/// Client address for a request whose direct peer is `peer`.
///
/// IPv4-mapped IPv6 addresses are returned as IPv4 so that one host has one identity in limits
/// and logs regardless of how it reached us.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &TrustedProxies) -> IpAddr {
    let peer = peer.to_canonical();
    if !trusted.contains(peer) {
        return peer;
    }

    let hops = match trusted.header {
        ForwardedHeader::XForwardedFor => x_forwarded_for_hops(headers),
        ForwardedHeader::Forwarded => forwarded_hops(headers),
    };

    // `last_trusted` starts at the peer: with no usable hops, the peer is the answer.
    let mut last_trusted = peer;
    for hop in hops.into_iter().rev() {
        match hop.map(|ip| ip.to_canonical()) {
            Some(ip) if trusted.contains(ip) => last_trusted = ip,
            Some(ip) => return ip,
            None => return last_trusted,
        }
    }
    last_trusted
}

/// `for=` values of every `Forwarded` line, left to right. `None` marks an entry that is not an
/// address.
fn forwarded_hops(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let mut hops = Vec::new();
    for line in headers.get_all(FORWARDED) {
        match line.to_str() {
            Ok(line) => parse_forwarded_line(line, &mut hops),
            // Undecodable bytes could hide any number of hops; one opaque entry stops the walk
            // at the right place.
            Err(_) => hops.push(None),
        }
    }
    hops
}

fn parse_forwarded_line(line: &str, hops: &mut Vec<Option<IpAddr>>) {
    for element in split_unquoted(line, b',') {
        // RFC 9110 list syntax: empty elements are allowed and carry nothing.
        if element.trim().is_empty() {
            continue;
        }
        match forwarded_element_for(element) {
            ForParam::Absent => {}
            ForParam::Present(node) => hops.push(node),
            // Whatever `for=` a broken element holds cannot be trusted to be a real hop.
            ForParam::Malformed => hops.push(None),
        }
    }
}

/// The `for=` parameter of one `Forwarded` element.
enum ForParam {
    /// The element describes a hop without disclosing its client (e.g. only `proto=`).
    Absent,
    /// The node, or `None` if it is not an address.
    Present(Option<IpAddr>),
    /// The element violates the grammar.
    Malformed,
}

fn forwarded_element_for(element: &str) -> ForParam {
    let mut node = ForParam::Absent;
    for pair in split_unquoted(element, b';') {
        let pair = pair.trim();
        if pair.is_empty() {
            continue;
        }
        let Some((name, value)) = pair.split_once('=') else {
            return ForParam::Malformed;
        };
        let name = name.trim();
        if name.is_empty() {
            return ForParam::Malformed;
        }
        if !name.eq_ignore_ascii_case("for") {
            continue;
        }
        // Two `for=` in one element is forbidden and would make the hop ambiguous.
        if matches!(node, ForParam::Present(_)) {
            return ForParam::Malformed;
        }
        let Some(value) = unquote(value.trim()) else {
            return ForParam::Malformed;
        };
        node = ForParam::Present(parse_forwarded_node(&value));
    }
    node
}

/// RFC 7239 node: `unknown` and obfuscated `_identifiers` are deliberately not addresses.
fn parse_forwarded_node(node: &str) -> Option<IpAddr> {
    if node.eq_ignore_ascii_case("unknown") || node.starts_with('_') {
        return None;
    }
    parse_node(node)
}

/// Splits on `sep` outside double-quoted strings, so `for="[::1]:80";proto=https` keeps its
/// quoted value intact. Unterminated quotes swallow the rest of the input, which then fails to
/// unquote and is treated as malformed.
fn split_unquoted(s: &str, sep: u8) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, &b) in s.as_bytes().iter().enumerate() {
        if escaped {
            escaped = false;
        } else if in_quotes && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            in_quotes = !in_quotes;
        } else if b == sep && !in_quotes {
            // `sep` is ASCII, so `i` and `i + 1` are char boundaries.
            parts.push(&s[start..i]);
            start = i + 1;
        }
    }
    parts.push(&s[start..]);
    parts
}

/// Value of a `token` or `quoted-string`; `None` if the quoting is broken.
fn unquote(value: &str) -> Option<Cow<'_, str>> {
    let Some(inner) = value.strip_prefix('"') else {
        return (!value.contains('"')).then_some(Cow::Borrowed(value));
    };
    let inner = inner.strip_suffix('"')?;
    if !inner.contains(['\\', '"']) {
        return Some(Cow::Borrowed(inner));
    }
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(Cow::Owned(out))
}

/// Every `X-Forwarded-For` line joined in order. `None` marks an entry that is not an address.
fn x_forwarded_for_hops(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let mut hops = Vec::new();
    for line in headers.get_all("x-forwarded-for") {
        let Ok(line) = line.to_str() else {
            hops.push(None);
            continue;
        };
        hops.extend(
            line.split(',')
                .map(str::trim)
                .filter(|entry| !entry.is_empty())
                .map(parse_node),
        );
    }
    hops
}

/// An address with an optional port: `192.0.2.1`, `192.0.2.1:8080`, `2001:db8::1`,
/// `[2001:db8::1]`, `[2001:db8::1]:4711`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = node.strip_prefix('[') {
        let (addr, after) = rest.split_once(']')?;
        if !after.is_empty() && !is_port(after.strip_prefix(':')?) {
            return None;
        }
        return addr.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    // A bare IPv6 address with a port is ambiguous, so only IPv4 may carry one unbracketed.
    let (addr, port) = node.rsplit_once(':')?;
    if !is_port(port) {
        return None;
    }
    addr.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

/// Decimal port, or an RFC 7239 obfuscated port (`_` followed by `ALPHA / DIGIT / "." / "_" / "-"`).
fn is_port(port: &str) -> bool {
    match port.strip_prefix('_') {
        Some(obfuscated) => {
            !obfuscated.is_empty()
                && obfuscated
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        }
        None => port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("timed out waiting for the PROXY protocol header")]
    Timeout,
    #[error("I/O error while reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid PROXY protocol header: {0}")]
    Invalid(String),
}

/// Longest v1 header the specification allows, CRLF included.
const V1_MAX_LEN: usize = 107;
const V1_PREFIX: &[u8] = b"PROXY ";
/// v2 signature (12 bytes), version/command, family/protocol and a 16-bit length.
const V2_FIXED_LEN: usize = 16;
/// Room for the largest address block (UNIX, 216 bytes) plus TLVs; balancers send far less, and
/// the cap keeps a hostile length field from making us buffer up to 64 KiB.
const V2_MAX_LEN: usize = V2_FIXED_LEN + 536;

/// Reads a PROXY protocol v1 or v2 header from a freshly accepted stream, bounded by `timeout`.
///
/// Consumes exactly the header bytes: the length is found with [`TcpStream::peek`] and only that
/// many bytes are read, so the HTTP request that follows stays in the socket for hyper.
///
/// Returns the source address the header carries, or `None` when it carries no client: v1
/// `UNKNOWN` and v2 `LOCAL` (the balancer's own health checks), and v2 UNIX or datagram headers.
///
/// # Errors
///
/// [`ProxyHeaderError::Timeout`] if the header is not complete within `timeout`,
/// [`ProxyHeaderError::Io`] on a socket error or if the peer closes mid-header, and
/// [`ProxyHeaderError::Invalid`] if the bytes are not a well-formed header within the size
/// limits (v1: 107 bytes, v2: 16 + 536 bytes). The stream may have been partly consumed by then
/// and should be closed.
pub async fn read_proxy_header(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    tokio::time::timeout(timeout, read_header(stream))
        .await
        .map_err(|_| ProxyHeaderError::Timeout)?
}

async fn read_header(stream: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut buf = [0u8; V2_MAX_LEN];
    // Bytes already taken off the socket; all of them are known to belong to the header.
    let mut consumed = 0;
    let len = loop {
        let peeked = stream.peek(&mut buf[consumed..]).await?;
        if peeked == 0 {
            return Err(ProxyHeaderError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before the PROXY protocol header was complete",
            )));
        }
        let available = consumed + peeked;
        match frame(&buf[..available])? {
            Framing::Complete(len) => break len,
            Framing::Incomplete => {
                // Peek keeps returning the same bytes without waiting while they sit in the
                // socket buffer. Taking them out (they are all header) makes the next peek
                // block until the sender delivers more, instead of spinning.
                stream.read_exact(&mut buf[consumed..available]).await?;
                consumed = available;
            }
        }
    };
    // `frame` reported Incomplete for `consumed` bytes, so `len > consumed`; checked anyway so a
    // framing bug cannot turn into a panic.
    let rest = buf
        .get_mut(consumed..len)
        .ok_or_else(|| ProxyHeaderError::Invalid("inconsistent header framing".into()))?;
    stream.read_exact(rest).await?;
    parse_header(&buf[..len])
}

/// What [`read_proxy_header`] makes of bytes already in memory, without the socket:
/// `Ok(None)` while they are a valid prefix, else the header length and the source
/// address it carries. For the fuzz targets and property tests.
pub fn decode_proxy_header(
    buf: &[u8],
) -> Result<Option<(usize, Option<SocketAddr>)>, ProxyHeaderError> {
    match frame(&buf[..buf.len().min(V2_MAX_LEN)])? {
        Framing::Incomplete => Ok(None),
        Framing::Complete(len) => parse_header(&buf[..len]).map(|source| Some((len, source))),
    }
}

#[derive(Debug, PartialEq)]
enum Framing {
    /// The header is this many bytes long and all of them have been seen.
    Complete(usize),
    /// Everything seen so far is a valid header prefix; more bytes are needed.
    Incomplete,
}

/// Finds the header length from its first bytes without parsing it, rejecting anything that
/// cannot become a header within the size limits as early as possible.
fn frame(buf: &[u8]) -> Result<Framing, ProxyHeaderError> {
    let signature = ppp::v2::PROTOCOL_PREFIX;
    if is_prefix_compatible(buf, signature) {
        let Some(&[hi, lo]) = buf.get(V2_FIXED_LEN - 2..V2_FIXED_LEN) else {
            return Ok(Framing::Incomplete);
        };
        let declared = usize::from(u16::from_be_bytes([hi, lo]));
        let total = V2_FIXED_LEN + declared;
        if total > V2_MAX_LEN {
            return Err(ProxyHeaderError::Invalid(format!(
                "v2 header declares {declared} bytes of address data, more than the {} allowed",
                V2_MAX_LEN - V2_FIXED_LEN
            )));
        }
        return Ok(if buf.len() >= total {
            Framing::Complete(total)
        } else {
            Framing::Incomplete
        });
    }

    if is_prefix_compatible(buf, V1_PREFIX) {
        let too_long = || {
            ProxyHeaderError::Invalid(format!(
                "v1 header is not terminated by CRLF within {V1_MAX_LEN} bytes"
            ))
        };
        let window = &buf[..buf.len().min(V1_MAX_LEN)];
        return match window.iter().position(|&b| b == b'\r') {
            Some(cr) => match window.get(cr + 1) {
                Some(b'\n') => Ok(Framing::Complete(cr + 2)),
                Some(_) => Err(ProxyHeaderError::Invalid(
                    "v1 header contains CR not followed by LF".into(),
                )),
                None if cr + 1 >= V1_MAX_LEN => Err(too_long()),
                None => Ok(Framing::Incomplete),
            },
            None if buf.len() >= V1_MAX_LEN => Err(too_long()),
            None => Ok(Framing::Incomplete),
        };
    }

    Err(ProxyHeaderError::Invalid(
        "stream does not start with a v1 or v2 signature".into(),
    ))
}

/// Whether `buf` and `prefix` agree on their common length, i.e. `buf` may still turn out to
/// start with `prefix` once more bytes arrive.
fn is_prefix_compatible(buf: &[u8], prefix: &[u8]) -> bool {
    let n = buf.len().min(prefix.len());
    buf[..n] == prefix[..n]
}

/// Parses an exactly framed header.
fn parse_header(header: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    if header.starts_with(ppp::v2::PROTOCOL_PREFIX) {
        use ppp::v2::{Addresses, Command, Header, Protocol};

        let header =
            Header::try_from(header).map_err(|e| ProxyHeaderError::Invalid(format!("v2: {e}")))?;
        // LOCAL connections come from the balancer itself; their address block is meaningless.
        if header.command == Command::Local || header.protocol != Protocol::Stream {
            return Ok(None);
        }
        Ok(match header.addresses {
            Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            Addresses::Unspecified | Addresses::Unix(_) => None,
        })
    } else {
        use ppp::v1::{Addresses, Header};

        let header =
            Header::try_from(header).map_err(|e| ProxyHeaderError::Invalid(format!("v1: {e}")))?;
        Ok(match header.addresses {
            Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            Addresses::Unknown => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn trusted(nets: &[&str]) -> TrustedProxies {
        TrustedProxies::new(nets.iter().map(|n| n.parse().unwrap()).collect())
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn lb() -> TrustedProxies {
        trusted(&["10.0.0.0/8", "2001:db8:ffff::/48"])
    }

    fn lb_fwd() -> TrustedProxies {
        lb().with_header(ForwardedHeader::Forwarded)
    }

    #[test]
    fn untrusted_peer_ignores_spoofed_headers() {
        let h = headers(&[("x-forwarded-for", "1.2.3.4"), ("forwarded", "for=5.6.7.8")]);
        assert_eq!(client_ip(ip("198.51.100.7"), &h, &lb()), ip("198.51.100.7"));
        assert_eq!(
            client_ip(ip("198.51.100.7"), &h, &TrustedProxies::default()),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn untrusted_mapped_peer_is_normalised() {
        let h = headers(&[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(
            client_ip(ip("::ffff:198.51.100.7"), &h, &lb()),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn trusted_peer_without_headers_is_the_client() {
        assert_eq!(
            client_ip(ip("10.0.0.1"), &HeaderMap::new(), &lb()),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn xff_single_hop() {
        let h = headers(&[("x-forwarded-for", "203.0.113.9")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &lb()), ip("203.0.113.9"));
    }

    #[test]
    fn xff_multi_hop_skips_trusted_middle_hop() {
        // The client forged 1.1.1.1; 203.0.113.9 is the address our outer proxy saw.
        let h = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.9, 10.1.2.3")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &lb()), ip("203.0.113.9"));
    }

    #[test]
    fn xff_multiple_lines_are_joined_in_order() {
        let h = headers(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", " 203.0.113.9 ,10.1.2.3"),
        ]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &lb()), ip("203.0.113.9"));
    }

    #[test]
    fn xff_ports_and_brackets_are_tolerated() {
        let h = headers(&[("x-forwarded-for", "203.0.113.9:5555")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &lb()), ip("203.0.113.9"));
        let h = headers(&[("x-forwarded-for", "[2001:db8::7]:443, 10.9.9.9")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &lb()), ip("2001:db8::7"));
        let h = headers(&[("x-forwarded-for", "2001:db8::7")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &lb()), ip("2001:db8::7"));
        let h = headers(&[("x-forwarded-for", "::ffff:203.0.113.9")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &lb()), ip("203.0.113.9"));
    }

    #[test]
    fn all_trusted_chain_returns_leftmost() {
        let h = headers(&[("x-forwarded-for", "10.3.3.3, 10.2.2.2, 2001:db8:ffff::1")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &lb()), ip("10.3.3.3"));
    }

    #[test]
    fn garbage_stops_the_walk_at_the_last_trusted_hop() {
        let h = headers(&[("x-forwarded-for", "203.0.113.9, not-an-ip, 10.2.2.2")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &lb()), ip("10.2.2.2"));
        let h = headers(&[("x-forwarded-for", "203.0.113.9, 300.1.1.1")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &lb()), ip("10.0.0.1"));
        let h = headers(&[("x-forwarded-for", "1.2.3.4:99999")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &lb()), ip("10.0.0.1"));
    }

    #[test]
    fn garbage_left_of_the_client_is_irrelevant() {
        let h = headers(&[("x-forwarded-for", "junk, 203.0.113.9, 10.2.2.2")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &lb()), ip("203.0.113.9"));
    }

    #[test]
    fn undecodable_header_line_counts_as_garbage() {
        let mut h = headers(&[("x-forwarded-for", "203.0.113.9")]);
        h.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"\xff1.2.3.4").unwrap(),
        );
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &lb()), ip("10.0.0.1"));
    }

    #[test]
    fn forwarded_quoted_ipv6_with_port() {
        let h = headers(&[("forwarded", r#"for="[2001:db8:cafe::17]:4711""#)]);
        assert_eq!(
            client_ip(ip("10.0.0.1"), &h, &lb_fwd()),
            ip("2001:db8:cafe::17")
        );
        let h = headers(&[("forwarded", r#"For="192.0.2.1:8080";proto=https"#)]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &lb_fwd()), ip("192.0.2.1"));
        let h = headers(&[("forwarded", r#"for="[2001:db8:cafe::17]:_hidden""#)]);
        assert_eq!(
            client_ip(ip("10.0.0.1"), &h, &lb_fwd()),
            ip("2001:db8:cafe::17")
        );
    }

    #[test]
    fn forwarded_multiple_elements_and_lines() {
        let h = headers(&[(
            "forwarded",
            r#"for=1.1.1.1, for=203.0.113.9;proto=https;by="[2001:db8:ffff::9]", FOR=10.2.2.2"#,
        )]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &lb_fwd()), ip("203.0.113.9"));

        let h = headers(&[
            ("forwarded", "for=1.1.1.1, for=203.0.113.9"),
            ("forwarded", r#"proto=http, for="[2001:db8:ffff::2]""#),
        ]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &lb_fwd()), ip("203.0.113.9"));
    }

    #[test]
    fn forwarded_unknown_and_obfuscated_are_not_addresses() {
        let h = headers(&[("forwarded", "for=203.0.113.9, for=unknown, for=10.2.2.2")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &lb_fwd()), ip("10.2.2.2"));
        let h = headers(&[("forwarded", "for=_hidden")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &lb_fwd()), ip("10.0.0.1"));
        let h = headers(&[("forwarded", "for=UNKNOWN")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &lb_fwd()), ip("10.0.0.1"));
    }

    #[test]
    fn forwarded_malformed_elements_are_garbage() {
        for value in [
            r#"for="203.0.113.9"#,              // unterminated quote
            "for=203.0.113.9;nonsense",         // pair without '='
            "for=203.0.113.9;for=198.51.100.1", // duplicate for
            r#"for="[2001:db8::1]:80"junk"#,    // text after the closing quote
        ] {
            let h = headers(&[("forwarded", value)]);
            assert_eq!(
                client_ip(ip("10.0.0.1"), &h, &lb_fwd()),
                ip("10.0.0.1"),
                "{value}"
            );
        }
    }

    #[test]
    fn forwarded_quoted_separators_do_not_split() {
        let h = headers(&[(
            "forwarded",
            r#"for=203.0.113.9;host="a,b;c\"d", for=10.2.2.2"#,
        )]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &lb_fwd()), ip("203.0.113.9"));
    }

    #[test]
    fn only_the_configured_header_counts() {
        let h = headers(&[
            ("x-forwarded-for", "198.51.100.1"),
            ("forwarded", "for=203.0.113.9"),
        ]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &lb()), ip("198.51.100.1"));
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &lb_fwd()), ip("203.0.113.9"));
        let h = headers(&[("forwarded", "proto=https;host=example.com")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &lb_fwd()), ip("10.0.0.1"));
        assert_eq!("Forwarded".parse(), Ok(ForwardedHeader::Forwarded));
        assert!("via".parse::<ForwardedHeader>().is_err());
    }

    #[test]
    fn ipv4_mapped_peer_matches_ipv4_cidr() {
        let t = trusted(&["10.0.0.0/8"]);
        assert!(t.contains(ip("::ffff:10.1.2.3")));
        assert!(!t.contains(ip("::ffff:11.1.2.3")));
        let h = headers(&[("x-forwarded-for", "203.0.113.9")]);
        assert_eq!(client_ip(ip("::ffff:10.1.2.3"), &h, &t), ip("203.0.113.9"));
    }

    #[test]
    fn ipv4_peer_matches_mapped_ipv6_cidr() {
        let t = trusted(&["::ffff:10.0.0.0/104"]);
        assert!(t.contains(ip("10.1.2.3")));
        assert!(!t.contains(ip("11.1.2.3")));
    }

    #[test]
    fn empty_list_trusts_nobody() {
        let t = TrustedProxies::default();
        assert!(t.is_empty());
        assert!(!t.contains(ip("127.0.0.1")));
        assert!(!lb().is_empty());
    }

    #[test]
    fn framing_limits() {
        let mut v2 = ppp::v2::PROTOCOL_PREFIX.to_vec();
        v2.extend([0x21, 0x11, 0x02, 0x29]); // 553 bytes of payload: one too many
        assert!(matches!(frame(&v2), Err(ProxyHeaderError::Invalid(_))));

        let v1 = format!("PROXY TCP4 {}\r\n", "1".repeat(100));
        assert!(matches!(
            frame(v1.as_bytes()),
            Err(ProxyHeaderError::Invalid(_))
        ));
        assert!(matches!(
            frame(b"PROXY TCP4\rX"),
            Err(ProxyHeaderError::Invalid(_))
        ));
        assert_eq!(frame(b"PRO").unwrap(), Framing::Incomplete);
        assert_eq!(frame(b"\r\n\r\n\0").unwrap(), Framing::Incomplete);
        assert_eq!(frame(b"PROXY UNKNOWN\r").unwrap(), Framing::Incomplete);
        assert_eq!(
            frame(b"PROXY UNKNOWN\r\nGET").unwrap(),
            Framing::Complete(15)
        );
    }

    const TAIL: &[u8] = b"GET / HTTP/1.1\r\n";
    const TIMEOUT: Duration = Duration::from_secs(5);

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    /// Sends `header` followed by an HTTP request line in one write, reads the header, and
    /// returns what remains readable afterwards.
    async fn exchange(header: &[u8]) -> (Result<Option<SocketAddr>, ProxyHeaderError>, Vec<u8>) {
        let (mut client, mut server) = pair().await;
        client.write_all(&[header, TAIL].concat()).await.unwrap();
        client.shutdown().await.unwrap();
        let result = read_proxy_header(&mut server, TIMEOUT).await;
        let mut rest = Vec::new();
        if result.is_ok() {
            server.read_to_end(&mut rest).await.unwrap();
        }
        (result, rest)
    }

    fn v2(command: u8, family_protocol: u8, payload: &[u8]) -> Vec<u8> {
        let mut header = ppp::v2::PROTOCOL_PREFIX.to_vec();
        header.push(0x20 | command);
        header.push(family_protocol);
        header.extend(u16::try_from(payload.len()).unwrap().to_be_bytes());
        header.extend(payload);
        header
    }

    const V2_IPV4_PAYLOAD: [u8; 12] = [192, 0, 2, 1, 10, 0, 0, 1, 0x12, 0x34, 0x01, 0xbb];

    #[tokio::test]
    async fn v1_tcp4() {
        let (result, rest) = exchange(b"PROXY TCP4 192.0.2.1 10.0.0.1 56324 443\r\n").await;
        assert_eq!(result.unwrap(), Some("192.0.2.1:56324".parse().unwrap()));
        assert_eq!(rest, TAIL);
    }

    #[tokio::test]
    async fn v1_tcp6() {
        let (result, rest) = exchange(b"PROXY TCP6 2001:db8::1 2001:db8::2 4711 443\r\n").await;
        assert_eq!(result.unwrap(), Some("[2001:db8::1]:4711".parse().unwrap()));
        assert_eq!(rest, TAIL);
    }

    #[tokio::test]
    async fn v1_unknown() {
        let (result, rest) = exchange(b"PROXY UNKNOWN\r\n").await;
        assert_eq!(result.unwrap(), None);
        assert_eq!(rest, TAIL);
    }

    #[tokio::test]
    async fn v2_ipv4_proxy() {
        let (result, rest) = exchange(&v2(0x1, 0x11, &V2_IPV4_PAYLOAD)).await;
        assert_eq!(result.unwrap(), Some("192.0.2.1:4660".parse().unwrap()));
        assert_eq!(rest, TAIL);
    }

    #[tokio::test]
    async fn v2_ipv4_with_tlvs() {
        let mut payload = V2_IPV4_PAYLOAD.to_vec();
        payload.extend([0x04, 0x00, 0x03, 1, 2, 3]); // NOOP TLV
        let (result, rest) = exchange(&v2(0x1, 0x11, &payload)).await;
        assert_eq!(result.unwrap(), Some("192.0.2.1:4660".parse().unwrap()));
        assert_eq!(rest, TAIL);
    }

    #[tokio::test]
    async fn v2_at_size_limit_is_accepted() {
        let mut payload = V2_IPV4_PAYLOAD.to_vec();
        payload.extend([0x04, 0x02, 0x09]); // NOOP TLV, 521 bytes: 536 in total
        payload.extend([0; 521]);
        let (result, rest) = exchange(&v2(0x1, 0x11, &payload)).await;
        assert_eq!(result.unwrap(), Some("192.0.2.1:4660".parse().unwrap()));
        assert_eq!(rest, TAIL);
    }

    #[tokio::test]
    async fn v2_ipv6_proxy() {
        let mut payload = Vec::new();
        payload.extend("2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        payload.extend("2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        payload.extend([0x12, 0x67, 0x01, 0xbb]);
        let (result, rest) = exchange(&v2(0x1, 0x21, &payload)).await;
        assert_eq!(result.unwrap(), Some("[2001:db8::1]:4711".parse().unwrap()));
        assert_eq!(rest, TAIL);
    }

    #[tokio::test]
    async fn v2_local() {
        let (result, rest) = exchange(&v2(0x0, 0x00, &[])).await;
        assert_eq!(result.unwrap(), None);
        assert_eq!(rest, TAIL);
    }

    #[tokio::test]
    async fn v2_udp_and_unix_carry_no_client() {
        let (result, rest) = exchange(&v2(0x1, 0x12, &V2_IPV4_PAYLOAD)).await;
        assert_eq!(result.unwrap(), None);
        assert_eq!(rest, TAIL);
        let (result, rest) = exchange(&v2(0x1, 0x31, &[0; 216])).await;
        assert_eq!(result.unwrap(), None);
        assert_eq!(rest, TAIL);
    }

    #[tokio::test]
    async fn invalid_headers_are_rejected() {
        let oversized = v2(0x1, 0x11, &[0; 537]);
        let short_addresses = v2(0x1, 0x11, &[0; 4]);
        let bad_version = {
            let mut h = v2(0x1, 0x11, &V2_IPV4_PAYLOAD);
            h[12] = 0x31;
            h
        };
        let cases: [&[u8]; 6] = [
            b"GET / HTTP/1.1\r\n",
            b"PROXY TCP4 999.0.2.1 10.0.0.1 1 2\r\n",
            b"PROXY TCP5 192.0.2.1 10.0.0.1 1 2\r\n",
            &oversized,
            &short_addresses,
            &bad_version,
        ];
        for case in cases {
            let (result, _) = exchange(case).await;
            assert!(
                matches!(result, Err(ProxyHeaderError::Invalid(_))),
                "{case:?}: {result:?}"
            );
        }
    }

    #[tokio::test]
    async fn slow_sender_split_header() {
        let header = b"PROXY TCP4 192.0.2.1 10.0.0.1 56324 443\r\n";
        let v2_header = v2(0x1, 0x11, &V2_IPV4_PAYLOAD);
        // Split v1 mid-address and v2 inside the fixed 16-byte part.
        let cases = [
            (&header[..], 15, "192.0.2.1:56324"),
            (&v2_header[..], 10, "192.0.2.1:4660"),
        ];
        for (whole, at, expected) in cases {
            let (mut client, mut server) = pair().await;
            let (first, second) = whole.split_at(at);
            let (first, second) = (first.to_vec(), [second, TAIL].concat());
            let writer = tokio::spawn(async move {
                client.write_all(&first).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
                client.write_all(&second).await.unwrap();
                client.shutdown().await.unwrap();
            });
            let result = read_proxy_header(&mut server, TIMEOUT).await;
            assert_eq!(result.unwrap(), Some(expected.parse().unwrap()));
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest, TAIL);
            writer.await.unwrap();
        }
    }

    #[tokio::test]
    async fn timeout_when_nothing_is_sent() {
        let (_client, mut server) = pair().await;
        let result = read_proxy_header(&mut server, Duration::from_millis(100)).await;
        assert!(
            matches!(result, Err(ProxyHeaderError::Timeout)),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn eof_mid_header_is_an_io_error() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"PROXY TCP4 192.0.2.1").await.unwrap();
        client.shutdown().await.unwrap();
        let result = read_proxy_header(&mut server, TIMEOUT).await;
        assert!(matches!(result, Err(ProxyHeaderError::Io(_))), "{result:?}");
    }
}
