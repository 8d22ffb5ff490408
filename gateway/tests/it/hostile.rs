//! Malformed traffic (docs/security.md, "Attack matrix"). While a legitimate client
//! keeps a conversation going (pings, and publishing to a channel it is subscribed
//! to), the same gateway is attacked at once with garbage before and after the
//! upgrade, half-open sockets, a handshake flood from one address, oversized headers
//! and slowloris. The gateway must stay ready, answer each attack as PROTOCOL.md
//! says, never disconnect or stall the legitimate client, still take new clients,
//! and give back every socket.
//!
//! Attackers connect from their own loopback addresses (127.0.x.y; Linux routes all
//! of 127/8 to `lo`), so only the flood shares an address and the per-address
//! connect limit is exercised exactly where it should be. Gauges and the open-file
//! count are per process: this relies on nextest running each test in its own.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use gateway::server::{HEADER_READ_TIMEOUT, MAX_HEADER_BYTES};
use rand::{Rng, SeedableRng};
use serde_json::json;
use testkit::tokens;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

/// Connect limit for the test gateway: small, so the flood reaches HTTP 429 quickly.
const CONNECT_RATE: u32 = 5;
const CONNECT_BURST: u32 = 10;
/// Short auth deadline so upgraded-but-silent sockets are closed within the test.
const AUTH_TIMEOUT_SECS: u64 = 2;
const PING_SECS: u64 = 1;
const IDLE_SECS: u64 = 3;
/// Between two rounds of the legitimate client: 2 frames per round stays well under
/// the default message rate (20/s).
const ROUND_EVERY: Duration = Duration::from_millis(150);
/// The slowest round trip the legitimate client may see while the gateway is under
/// attack. Loopback answers in about a millisecond; the bound leaves room for a
/// loaded shared CI machine, not for a gateway that stalls.
const MAX_ROUND_TRIP: Duration = Duration::from_millis(1500);
/// Time allowed, beyond a deadline the gateway enforces, to see the socket closed.
const SLACK: Duration = Duration::from_secs(3);
const CHANNEL: &str = "lobby:hostile";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_survives_malformed_traffic() {
    let deps = Deps::start();
    let gw = gateway(&deps, |c| {
        c.public_namespaces = Some("lobby".into());
        c.connect_rate_per_ip = Some(CONNECT_RATE);
        c.connect_burst_per_ip = Some(CONNECT_BURST);
        c.auth_timeout_secs = Some(AUTH_TIMEOUT_SECS);
        c.ping_interval_secs = Some(PING_SECS);
        c.idle_timeout_secs = Some(IDLE_SECS);
    })
    .await;

    let (mut legit, _) = authed(&gw, "legit").await;
    send_json(
        &mut legit,
        json!({"type": "subscribe", "channel": CHANNEL, "id": "s"}),
    )
    .await;
    let sub = next_matching(&mut legit, |f| f["id"] == "s").await;
    assert_eq!(sub["type"], "subscribed", "{sub}");
    let baseline = Resources::measure(&gw).await;
    assert_eq!(
        (baseline.connections, baseline.pending),
        (1, 0),
        "{baseline:?}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let conversation = tokio::spawn(converse(legit, stop.clone()));
    let readiness = tokio::spawn(watch_readiness(gw.admin, stop.clone()));

    let addr = gw.addr;
    let started = Instant::now();
    let (before, after, half_open, flood, oversized, slowloris) = tokio::join!(
        tokio::spawn(timed(
            "garbage before the upgrade",
            garbage_before_upgrade(addr)
        )),
        tokio::spawn(timed(
            "garbage after the upgrade",
            garbage_after_upgrade(addr)
        )),
        tokio::spawn(timed("half-open sockets", half_open_sockets(addr))),
        tokio::spawn(timed("handshake flood", handshake_flood(addr, gw.url()))),
        tokio::spawn(timed("oversized headers", oversized_headers(addr))),
        tokio::spawn(timed("slowloris", slowloris(addr))),
    );
    for (name, r) in [
        ("garbage before the upgrade", before),
        ("garbage after the upgrade", after),
        ("half-open sockets", half_open),
        ("handshake flood", flood),
        ("oversized headers", oversized),
        ("slowloris", slowloris),
    ] {
        if let Err(e) = r {
            std::panic::resume_unwind(
                e.try_into_panic()
                    .unwrap_or_else(|_| Box::new(format!("{name}: attack task cancelled"))),
            );
        }
    }
    let attack_time = started.elapsed();

    stop.store(true, Ordering::Relaxed);
    let talk = conversation.await.unwrap();
    let not_ready = readiness.await.unwrap();
    eprintln!(
        "attacks took {attack_time:?}; legitimate client: {} rounds, round trip p50 {:?}, max {:?}; readyz checks not 200: {not_ready}",
        talk.rounds,
        talk.p50(),
        talk.max()
    );
    assert!(talk.rounds >= 20, "the conversation stalled: {talk:?}");
    assert!(
        talk.max() <= MAX_ROUND_TRIP,
        "legitimate round trip up to {:?}",
        talk.max()
    );
    assert_eq!(not_ready, 0, "readyz went non-200 during the attack");
    assert_eq!(gw.readyz().await, 200);

    // A new client is served as usual.
    let (mut fresh, _) = authed(&gw, "newcomer").await;
    send_json(&mut fresh, json!({"type": "ping", "id": 1})).await;
    assert_eq!(next_json(&mut fresh).await["type"], "pong");
    fresh.close(None).await.unwrap();
    let mut legit = talk.ws;
    legit.close(None).await.unwrap();
    drop((fresh, legit));

    // Everything the attacks opened is given back: the only connection left was
    // the legitimate one, now closed too.
    let deadline = Instant::now() + WAIT * 2;
    let last = loop {
        let now = Resources::measure(&gw).await;
        if now.fds <= baseline.fds && now.connections == 0 && now.pending == 0 {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "not back to baseline: {baseline:?} then {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("baseline {baseline:?}, after {last:?}");
}

/// Runs one attack and reports how long it kept the gateway busy.
async fn timed(name: &'static str, attack: impl std::future::Future<Output = ()>) {
    let start = Instant::now();
    attack.await;
    eprintln!("{name}: done after {:?}", start.elapsed());
}

// === the legitimate client ===

#[derive(Debug)]
struct Conversation {
    ws: Ws,
    rounds: usize,
    round_trips: Vec<Duration>,
}

impl Conversation {
    fn max(&self) -> Duration {
        self.round_trips.iter().copied().max().unwrap_or_default()
    }

    fn p50(&self) -> Duration {
        let mut v = self.round_trips.clone();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or_default()
    }
}

/// Each round: a `ping` and a `publish` to the subscribed channel; both answers
/// (the `pong` and the `message` coming back) are awaited and timed. Any close or
/// error fails the test.
async fn converse(mut ws: Ws, stop: Arc<AtomicBool>) -> Conversation {
    let mut round_trips = Vec::new();
    let mut rounds = 0;
    while !stop.load(Ordering::Relaxed) {
        let n = rounds as i64;
        let sent = Instant::now();
        send_json(&mut ws, json!({"type": "ping", "id": n})).await;
        send_json(
            &mut ws,
            json!({"type": "publish", "channel": CHANNEL, "data": {"n": n}, "id": format!("p{n}")}),
        )
        .await;
        let (mut pong, mut echo, mut ack) = (false, false, false);
        while !(pong && echo && ack) {
            let f = next_json(&mut ws).await;
            match f["type"].as_str() {
                Some("pong") if f["id"] == n => pong = true,
                Some("message") if f["data"]["n"] == n => echo = true,
                Some("ack") if f["id"] == format!("p{n}") => ack = true,
                _ => panic!("unexpected frame for the legitimate client: {f}"),
            }
        }
        round_trips.push(sent.elapsed());
        rounds += 1;
        tokio::time::sleep(ROUND_EVERY).await;
    }
    Conversation {
        ws,
        rounds,
        round_trips,
    }
}

/// Polls `/readyz` until stopped; returns how many answers were not 200.
async fn watch_readiness(admin: SocketAddr, stop: Arc<AtomicBool>) -> usize {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let mut bad = 0;
    while !stop.load(Ordering::Relaxed) {
        let ok = client
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        bad += usize::from(!ok);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    bad
}

// === what the gateway holds ===

#[derive(Debug, Clone, Copy)]
struct Resources {
    /// Open file descriptors of this process (gateway and clients alike).
    fds: usize,
    connections: i64,
    pending: i64,
}

impl Resources {
    async fn measure(gw: &Gw) -> Resources {
        // Counted before the metrics request opens a socket of its own.
        let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
        let text = gw.metrics().await;
        let gauge = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
                .unwrap_or(0.0) as i64
        };
        Resources {
            fds,
            connections: gauge(shared::metrics::CONNECTIONS),
            pending: gauge(shared::metrics::CONNECTIONS_PENDING),
        }
    }
}

// === raw sockets ===

/// A TCP connection from `127.0.<group>.<n>`.
async fn connect_from(group: u8, n: u8, addr: SocketAddr) -> Raw {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::from((Ipv4Addr::new(127, 0, group, n), 0)))
        .unwrap();
    Raw {
        stream: socket.connect(addr).await.unwrap(),
        buf: Vec::new(),
    }
}

/// A client socket read by hand: response heads and server frames.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads more bytes; `false` at EOF or on a reset.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        // Nothing the gateway does waits longer than its header deadline.
        let limit = HEADER_READ_TIMEOUT + SLACK;
        match tokio::time::timeout(limit, self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(_) => panic!("the gateway said nothing for {limit:?}"),
        }
    }

    /// The status of the HTTP response head, or `None` if the socket closed first.
    async fn status(&mut self) -> Option<u16> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 4);
                return head.split(' ').nth(1).and_then(|s| s.parse().ok());
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next server frame (opcode, payload), or `None` if the socket closed.
    async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                assert_eq!(self.buf[1] & 0x80, 0, "server frames are not masked");
                let (ext, len) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => (
                        2,
                        usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
                    ),
                    127 => panic!("no server frame here is that long"),
                    n if n < 126 => (0, usize::from(n)),
                    _ => (usize::MAX, 0),
                };
                if ext != usize::MAX && self.buf.len() >= 2 + ext + len {
                    let opcode = self.buf[0] & 0x0f;
                    let payload = self.buf[2 + ext..2 + ext + len].to_vec();
                    self.buf.drain(..2 + ext + len);
                    return Some((opcode, payload));
                }
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Text frames up to the close frame, and its code (`None`: no close frame).
    async fn until_close(&mut self) -> (Vec<serde_json::Value>, Option<u16>) {
        let mut texts = Vec::new();
        while let Some((opcode, payload)) = self.frame().await {
            match opcode {
                0x1 => texts.push(serde_json::from_slice(&payload).unwrap()),
                0x8 => {
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    return (texts, code);
                }
                _ => {}
            }
        }
        (texts, None)
    }

    /// Waits until the gateway closes the socket; returns how long that took.
    async fn closed_within(&mut self, limit: Duration) -> Duration {
        let start = Instant::now();
        let mut chunk = [0u8; 4096];
        loop {
            let left = limit.saturating_sub(start.elapsed());
            match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
                Ok(Ok(_)) => {}
                Err(_) => panic!("socket still open after {limit:?}"),
            }
        }
    }
}

/// An upgrade request; `extra` is more header lines, each ending in CRLF.
fn upgrade_request(extra: &str) -> Vec<u8> {
    format!(
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .into_bytes()
}

fn bearer(user: &str) -> String {
    format!("Authorization: Bearer {}\r\n", tokens::token(user, 600))
}

/// A masked client frame.
fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut v = vec![first];
    match payload.len() {
        n if n < 126 => v.push(0x80 | n as u8),
        n => {
            v.push(0x80 | 126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    v.extend_from_slice(&mask);
    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    v
}

// === the attacks ===

/// Bytes that are not an HTTP request: answered 4xx (or just closed), and closed.
async fn garbage_before_upgrade(addr: SocketAddr) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let mut inputs: Vec<Vec<u8>> = vec![
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(), // a TLS ClientHello
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nGET /ws HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /ws HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n".to_vec(),
        b"GET /ws HTTP/1.1\r\nHost: x\r\nX: \x00\x01\x02\r\n\r\n".to_vec(),
        b"GET /ws HTTP/9.9\r\n\r\n".to_vec(),
        b"\r\n\r\n\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(),
    ];
    for _ in 0..12 {
        let n = rng.random_range(1..4096);
        // Random bytes from a non-token byte on: never a valid request line start.
        let mut g: Vec<u8> = (0..n).map(|_| rng.random()).collect();
        g[0] = 0x01;
        inputs.push(g);
    }
    let mut tasks = Vec::new();
    for (i, input) in inputs.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut c = connect_from(1, i as u8 + 1, addr).await;
            let start = Instant::now();
            // The gateway may refuse and close before all of it is written.
            let _ = c.stream.write_all(&input).await;
            let status = c.status().await;
            if let Some(status) = status {
                assert!(
                    (400..500).contains(&status),
                    "garbage {i} answered {status}"
                );
            }
            // A prefix of a request is given until the header deadline; anything
            // else is answered at once.
            c.closed_within(HEADER_READ_TIMEOUT + SLACK).await;
            (status, start.elapsed())
        }));
    }
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap());
    }
    eprintln!("garbage before the upgrade: (status, closed after) {seen:?}");
}

/// An upgrade, then frames that break RFC 6455 or the protocol: each is answered
/// with the close code of PROTOCOL.md section 2, then TCP is closed. Half come
/// before authentication, half after; one set is pipelined behind the request.
async fn garbage_after_upgrade(addr: SocketAddr) {
    let mut bad_text = b"{\"type\":\"ping\"}".to_vec();
    bad_text.insert(5, 0xff);
    let mut over = vec![0x82, 0xff];
    over.extend_from_slice(&(1u64 << 30).to_be_bytes());
    over.extend_from_slice(&[1, 2, 3, 4]);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked", vec![0x81, 0x02, b'h', b'i'], 1002),
        (
            "rsv bits",
            {
                let mut f = client_frame(0x81, b"{}");
                f[0] |= 0x40;
                f
            },
            1002,
        ),
        ("reserved opcode", client_frame(0x83, b"x"), 1002),
        ("fragmented ping", client_frame(0x09, b"p"), 1002),
        ("continuation first", client_frame(0x80, b"x"), 1002),
        (
            "bad close code",
            client_frame(0x88, &1005u16.to_be_bytes()),
            1002,
        ),
        ("invalid utf-8", client_frame(0x81, &bad_text), 1007),
        ("binary", client_frame(0x82, b"\x00\x01"), 1003),
        ("1 GiB announced", over, 1009),
    ];
    // Concurrently: a frame the gateway consumed before refusing it (binary,
    // invalid UTF-8, a bad close code) leaves it waiting CLOSE_LINGER for our close,
    // which an attacker never sends.
    let mut n = 0u8;
    let mut tasks = Vec::new();
    for authenticate in [false, true] {
        for pipelined in [false, true] {
            for (name, bytes, code) in cases.iter().cloned() {
                n += 1;
                tasks.push(tokio::spawn(async move {
                    let mut c = connect_from(2, n, addr).await;
                    let auth = if authenticate {
                        bearer(&format!("mal-{n}"))
                    } else {
                        String::new()
                    };
                    let mut request = upgrade_request(&auth);
                    if pipelined {
                        request.extend_from_slice(&bytes);
                    }
                    c.send(&request).await;
                    assert_eq!(c.status().await, Some(101), "{name}");
                    if authenticate {
                        let (op, payload) = c.frame().await.expect("authenticated frame");
                        let f: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                        assert_eq!(
                            (op, f["type"].as_str()),
                            (1, Some("authenticated")),
                            "{name}"
                        );
                    }
                    if !pipelined {
                        c.send(&bytes).await;
                    }
                    let (texts, close) = c.until_close().await;
                    assert_eq!(
                        close,
                        Some(code),
                        "{name} (auth {authenticate}, pipelined {pipelined}): {texts:?}"
                    );
                    c.closed_within(SLACK).await;
                }));
            }
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Random bytes after the upgrade: a close code (4000 when they announce a frame
    // that never completes, before authentication), then TCP closed.
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut tasks = Vec::new();
    for _ in 0..10 {
        n += 1;
        let g: Vec<u8> = (0..rng.random_range(1..2048))
            .map(|_| rng.random())
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut c = connect_from(2, n, addr).await;
            c.send(&upgrade_request("")).await;
            assert_eq!(c.status().await, Some(101));
            c.send(&g).await;
            let (_, close) = c.until_close().await;
            c.closed_within(SLACK).await;
            close
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        let close = t.await.unwrap();
        assert!(
            matches!(close, Some(1002 | 1003 | 1007 | 1009 | 4000)),
            "random bytes closed with {close:?}"
        );
        codes.push(close);
    }
    eprintln!("random bytes after the upgrade closed with {codes:?}");
}

/// Sockets that stop halfway: silent after connecting, a request cut off, the head
/// without its blank line, a keep-alive connection left idle after a request, a
/// request half-closed by the client, an upgrade that never authenticates, and an
/// authenticated socket that stops answering pings.
/// Each is closed by the deadline that covers it, not left open.
async fn half_open_sockets(addr: SocketAddr) {
    let partials: [&[u8]; 4] = [
        b"",
        b"GET /ws HTT",
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
        // A whole request (answered 404), then an idle keep-alive connection.
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n",
    ];
    let mut waits = Vec::new();
    for (i, p) in partials.iter().enumerate() {
        for j in 0..4u8 {
            let mut c = connect_from(3, (i as u8) * 10 + j + 1, addr).await;
            c.send(p).await;
            waits.push(tokio::spawn(async move {
                let took = c.closed_within(HEADER_READ_TIMEOUT + SLACK).await;
                assert!(
                    took + SLACK > HEADER_READ_TIMEOUT,
                    "closed after {took:?}, before the header deadline"
                );
            }));
        }
    }
    // The client half-closes mid-request: the gateway closes at once.
    let mut c = connect_from(3, 100, addr).await;
    c.send(b"GET /ws HTTP/1.1\r\nHost:").await;
    c.stream.shutdown().await.unwrap();
    assert!(c.closed_within(SLACK).await < SLACK);

    // Upgraded, never authenticates: AUTH_TIMEOUT and 4000.
    let mut c = connect_from(3, 101, addr).await;
    c.send(&upgrade_request("")).await;
    assert_eq!(c.status().await, Some(101));
    let (texts, close) = c.until_close().await;
    assert_eq!(close, Some(4000), "{texts:?}");
    assert_eq!(texts[0]["code"], "AUTH_TIMEOUT");

    // Authenticated, then silent (no pongs, no reads): closed as idle (1001).
    let mut c = connect_from(3, 102, addr).await;
    c.send(&upgrade_request(&bearer("silent"))).await;
    assert_eq!(c.status().await, Some(101));
    tokio::time::sleep(Duration::from_secs(IDLE_SECS) + Duration::from_secs(1)).await;
    let (_, close) = c.until_close().await;
    assert_eq!(close, Some(1001));
    c.closed_within(SLACK).await;

    for w in waits {
        w.await.unwrap();
    }
}

/// Upgrade requests as fast as one address can send them (each with a valid token
/// of its own user, so the answer tells which verdict it got): first served, then
/// refused after the upgrade (`RATE_LIMITED`, 4029), then refused with HTTP 429 and
/// `Retry-After`, without an upgrade, for as long as the flood lasts. A client from
/// another address connects normally in the middle of it.
async fn handshake_flood(addr: SocketAddr, url: String) {
    let (mut served, mut limited, mut refused) = (0u32, 0u32, 0u32);
    let mut attempts = 0u32;
    while refused < 20 {
        attempts += 1;
        assert!(attempts < 400, "no 429 after {attempts} attempts");
        let mut c = connect_from(4, 1, addr).await;
        c.send(&upgrade_request(&bearer(&format!("flood-{attempts}"))))
            .await;
        let head_end = loop {
            if let Some(p) = c.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p;
            }
            assert!(c.fill().await, "closed without an answer");
        };
        let head = String::from_utf8_lossy(&c.buf[..head_end]).to_lowercase();
        c.buf.drain(..head_end + 4);
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        match status {
            101 => {
                let (op, payload) = c.frame().await.expect("a frame after the upgrade");
                let f: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                assert_eq!(op, 1);
                if f["type"] == "authenticated" {
                    // Refill between attempts is far slower than the flood: once
                    // refused, an address is not served again while it floods.
                    assert_eq!((limited, refused), (0, 0), "served again mid-flood");
                    served += 1;
                } else {
                    assert_eq!(f["code"], "RATE_LIMITED", "{f}");
                    assert!(f["retry_after_ms"].as_u64().unwrap() > 0);
                    let (_, close) = c.until_close().await;
                    assert_eq!(close, Some(4029));
                    limited += 1;
                }
            }
            429 => {
                assert!(head.contains("retry-after:"), "{head}");
                refused += 1;
            }
            other => panic!("flood answer {other}: {head}"),
        }
        if refused == 1 && status == 429 {
            // Another address is not affected by this one's flood.
            let (mut ws, _) = connect(&url, Hs::bearer(&tokens::token("bystander", 600)))
                .await
                .unwrap();
            assert_eq!(next_json(&mut ws).await["type"], "authenticated");
            ws.close(None).await.unwrap();
            while let Some(Ok(m)) = ws.next().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        }
    }
    assert!(
        served >= CONNECT_BURST,
        "only {served} served before the limit"
    );
    assert!(limited > 0, "no 4029 before the 429s");
    eprintln!("flood: {served} served, {limited} closed 4029, {refused} answered 429");
}

/// Heads past the 64 KiB limit or with too many fields: 431 without an upgrade.
/// A long token inside the limit upgrades and is refused as a bad token.
async fn oversized_headers(addr: SocketAddr) {
    let big = format!("X-Big: {}\r\n", "a".repeat(100 * 1024));
    // Just over the limit: the whole head is read before it is judged.
    let just_over = format!("X-Big: {}\r\n", "a".repeat(MAX_HEADER_BYTES));
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let long_uri = format!(
        "GET /ws?{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "q".repeat(100 * 1024)
    );
    let cases: [(&str, Vec<u8>); 4] = [
        ("one 100 KiB header", upgrade_request(&big)),
        ("a head just over 64 KiB", upgrade_request(&just_over)),
        ("200 headers", upgrade_request(&many)),
        ("100 KiB request line", long_uri.into_bytes()),
    ];
    for (i, (name, request)) in cases.iter().enumerate() {
        let mut c = connect_from(5, i as u8 + 1, addr).await;
        // The gateway may answer and close before the whole head is written.
        let _ = c.stream.write_all(request).await;
        let status = c.status().await;
        assert!(
            matches!(status, Some(431 | 414) | None),
            "{name}: {status:?}"
        );
        eprintln!("oversized head, {name}: {status:?}");
        c.closed_within(SLACK).await;
    }
    let mut c = connect_from(5, 10, addr).await;
    c.send(&upgrade_request(&format!(
        "Authorization: Bearer {}\r\n",
        "t".repeat(60 * 1024)
    )))
    .await;
    assert_eq!(c.status().await, Some(101));
    let (texts, close) = c.until_close().await;
    assert_eq!(close, Some(4503), "{texts:?}");
    assert_eq!(texts[0]["code"], "TOKEN_INVALID");
}

/// Request heads trickled a byte at a time, forever: the gateway cuts each off at
/// its header deadline (counted from the connection, not from the last byte).
async fn slowloris(addr: SocketAddr) {
    let mut tasks = Vec::new();
    for i in 0..10u8 {
        tasks.push(tokio::spawn(async move {
            let mut c = connect_from(6, i + 1, addr).await;
            let start = Instant::now();
            c.send(b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Slow: ").await;
            let mut chunk = [0u8; 1024];
            loop {
                tokio::select! {
                    r = c.stream.read(&mut chunk) => match r {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    },
                    _ = tokio::time::sleep(Duration::from_millis(300)) => {
                        if c.stream.write_all(b"a").await.is_err() {
                            break;
                        }
                    }
                }
                assert!(
                    start.elapsed() < HEADER_READ_TIMEOUT + SLACK,
                    "slowloris socket alive after {:?}",
                    start.elapsed()
                );
            }
            let took = start.elapsed();
            assert!(
                took + SLACK > HEADER_READ_TIMEOUT,
                "closed after {took:?}: was it cut for being slow, or for nothing?"
            );
            took
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// An API body trickled slower than the body timeout is answered 408 with a JSON
/// error instead of holding the socket.
#[tokio::test]
async fn a_trickled_api_body_times_out() {
    let deps = Deps::start();
    let gw = gateway(&deps, |_| {}).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\
Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"channel\""
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        gateway::api::BODY_TIMEOUT + Duration::from_secs(5),
        s.read_to_end(&mut buf),
    )
    .await
    .expect("the gateway answers before the test gives up");
    read.unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"TIMEOUT\""), "{text}");
    assert!(started.elapsed() >= gateway::api::BODY_TIMEOUT - Duration::from_millis(500));
}
