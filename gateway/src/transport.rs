//! The WebSocket transport: RFC 6455 framing for the gateway's connections (and the
//! Autobahn echo harness, which runs on exactly this code). fastwebsockets answers
//! the upgrade handshake; framing is ours, because the gateway needs what the crate
//! does not give (docs/DESIGN.md#crate-pins-and-traps): an aggregate cap on
//! fragmented messages checked before their bytes are buffered, a close frame with
//! the right code on every protocol error, refusal of unmasked client frames,
//! control-frame checks, incremental UTF-8 validation of fragments, cancel-safe
//! reads and writes, and no buffer held by an idle connection (the crate keeps 8 KiB
//! per connection, twice). Reads wait for readiness and then take what the socket
//! has; writes queue frames in a buffer flushed without blocking, so a burst becomes
//! one syscall and a slow peer never stalls its session.

use std::io;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use shared::protocol::CloseCode;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::close::CloseCause;
use crate::error::SessionError;

/// A write that cannot complete in this time means the peer stopped reading; the
/// connection is dead weight and is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// After sending a close frame, how long to wait for the peer's close before dropping
/// TCP: long enough for a round trip on a slow mobile link, short enough for drains.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Longest control-frame payload (RFC 6455 section 5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;
/// An emptied write buffer larger than this is released, so an idle connection that
/// once sent a big message does not keep its buffer.
const KEEP_BUFFER_BYTES: usize = 4096;
/// Bytes taken from the socket per read: a typical client frame is far smaller, and
/// the scratch space lives on the thread's stack, not in the connection.
const READ_CHUNK: usize = 16 * 1024;

/// Why reading stopped; each maps to the close code the server sends.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("invalid UTF-8 in a text message")]
    InvalidUtf8,
    #[error("message larger than {0} bytes")]
    TooLarge(usize),
    #[error("connection closed without a close frame")]
    Eof,
    #[error("i/o: {0}")]
    Io(io::Error),
}

impl ReadError {
    /// Why the server closes after this, or `None` when the peer is gone and nothing
    /// can be sent.
    pub fn close_cause(&self) -> Option<CloseCause> {
        match self {
            ReadError::Protocol(_) => Some(CloseCause::ProtocolViolation),
            ReadError::InvalidUtf8 => Some(CloseCause::InvalidUtf8),
            ReadError::TooLarge(n) => Some(SessionError::TooLarge(*n).into()),
            ReadError::Eof | ReadError::Io(_) => None,
        }
    }

    /// The close code the server sends for this (see [`ReadError::close_cause`]).
    pub fn close_code(&self) -> Option<CloseCode> {
        self.close_cause().map(|c| c.signal().code)
    }
}

/// One complete message or control frame from the peer.
#[derive(Debug, PartialEq)]
pub enum Inbound {
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong,
    /// The peer's close frame: code and reason, if it sent any.
    Close(Option<u16>, String),
}

/// A message being reassembled from fragments.
struct Partial {
    text: bool,
    buf: BytesMut,
    /// Bytes of `buf` already known to be valid UTF-8 (text only), so each fragment
    /// is validated once and invalid text fails as soon as it arrives.
    valid_up_to: usize,
}

/// Reads complete messages, enforcing `max_message` across fragments. `next` is
/// cancel-safe: bytes leave the socket only into the decoder's buffer, and that
/// buffer is parsed only synchronously.
pub struct WsReader {
    stream: OwnedReadHalf,
    decoder: FrameDecoder,
    eof: bool,
}

/// The framing rules without the socket: bytes in, messages or the protocol error
/// out. [`WsReader`] feeds it from TCP; the fuzz targets and property tests feed it
/// arbitrary bytes, so what they check is exactly what the gateway runs.
pub struct FrameDecoder {
    /// Bytes read and not yet parsed; empty (no allocation) between messages.
    buf: BytesMut,
    max_message: usize,
    partial: Option<Partial>,
}

/// Encodes frames into a buffer and writes it to the socket. `queue_*` never block;
/// `try_flush` writes what the socket takes now; `flush` waits (bounded) until all is
/// written. Every method is cancel-safe: bytes leave the buffer only once written.
pub struct WsWriter {
    stream: OwnedWriteHalf,
    buf: BytesMut,
    closed: bool,
}

/// Completes a server-side upgrade and splits the socket. The hyper connection must
/// have been served over `TokioIo<TcpStream>` (the gateway's listener does this), so
/// the upgraded stream can be taken apart without a lock per poll.
pub async fn accept(
    fut: fastwebsockets::upgrade::UpgradeFut,
    max_message: usize,
) -> io::Result<(WsReader, WsWriter)> {
    let ws = fut.await.map_err(io::Error::other)?;
    let upgraded: Upgraded = ws.into_inner().into_inner();
    let parts = upgraded
        .downcast::<TokioIo<TcpStream>>()
        .map_err(|_| io::Error::other("upgraded stream is not a TCP stream"))?;
    Ok(split(parts.io.into_inner(), parts.read_buf, max_message))
}

/// Splits an already-upgraded server-side TCP stream; `read_buf` holds bytes the HTTP
/// layer read past the handshake.
pub fn split(stream: TcpStream, read_buf: Bytes, max_message: usize) -> (WsReader, WsWriter) {
    let (r, w) = stream.into_split();
    (
        WsReader {
            stream: r,
            decoder: FrameDecoder {
                buf: BytesMut::from(&read_buf[..]),
                max_message,
                partial: None,
            },
            eof: false,
        },
        WsWriter {
            stream: w,
            buf: BytesMut::new(),
            closed: false,
        },
    )
}

/// A frame header, parsed.
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Header bytes, mask included.
    len: usize,
    payload: usize,
}

impl WsReader {
    /// The next complete message or control frame. Cancel-safe.
    pub async fn next(&mut self) -> Result<Inbound, ReadError> {
        loop {
            if let Some(msg) = self.decoder.parse()? {
                return Ok(msg);
            }
            if self.eof {
                return Err(ReadError::Eof);
            }
            self.stream.readable().await.map_err(ReadError::Io)?;
            self.fill()?;
        }
    }

    /// Takes what the socket has now into the decoder (through stack scratch space, so
    /// an idle connection holds no buffer).
    fn fill(&mut self) -> Result<(), ReadError> {
        let mut scratch = [0u8; READ_CHUNK];
        loop {
            match self.stream.try_read(&mut scratch) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    self.decoder.push(&scratch[..n]);
                    if n < scratch.len() {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }
}

impl FrameDecoder {
    /// A decoder holding no bytes, for messages of at most `max_message` bytes.
    pub fn new(max_message: usize) -> FrameDecoder {
        FrameDecoder {
            buf: BytesMut::new(),
            max_message,
            partial: None,
        }
    }

    /// Appends bytes received from the peer.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes pushed and not yet consumed by a complete frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Parses frames out of `buf` until one completes a message (or `buf` runs dry).
    /// After an error the stream is unusable: the connection is closed.
    pub fn parse(&mut self) -> Result<Option<Inbound>, ReadError> {
        loop {
            let Some(h) = self.header()? else {
                return Ok(None);
            };
            if self.buf.len() < h.len + h.payload {
                // Reserve once for the whole frame (bounded by the checks above).
                self.buf.reserve(h.len + h.payload - self.buf.len());
                return Ok(None);
            }
            self.buf.advance(h.len);
            let mut payload = self.buf.split_to(h.payload);
            if self.buf.is_empty() {
                // Let go of the allocation the payload shares, so nothing is kept
                // once the message is handled.
                self.buf = BytesMut::new();
            }
            unmask(&mut payload, h.mask);
            if let Some(msg) = self.on_frame(h.fin, h.opcode, payload)? {
                return Ok(Some(msg));
            }
        }
    }

    /// Parses and checks the header at the front of `buf`, before its payload is
    /// waited for: oversized and malformed frames fail without being buffered.
    fn header(&self) -> Result<Option<Header>, ReadError> {
        let b = &self.buf[..];
        if b.len() < 2 {
            return Ok(None);
        }
        let fin = b[0] & 0x80 != 0;
        if b[0] & 0x70 != 0 {
            return Err(ReadError::Protocol("reserved bits set"));
        }
        let opcode = b[0] & 0x0f;
        if b[1] & 0x80 == 0 {
            return Err(ReadError::Protocol("unmasked client frame"));
        }
        let (ext, short) = match b[1] & 0x7f {
            126 => (2, None),
            127 => (8, None),
            n => (0, Some(usize::from(n))),
        };
        let len = 2 + ext + 4;
        if b.len() < len {
            return Ok(None);
        }
        let payload = match (short, ext) {
            (Some(n), _) => n,
            (None, 2) => usize::from(u16::from_be_bytes([b[2], b[3]])),
            _ => {
                let n = u64::from_be_bytes([b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9]]);
                if n >> 63 != 0 {
                    return Err(ReadError::Protocol("payload length out of range"));
                }
                usize::try_from(n).map_err(|_| ReadError::TooLarge(self.max_message))?
            }
        };
        match opcode {
            0x8..=0xa => {
                if !fin {
                    return Err(ReadError::Protocol("fragmented control frame"));
                }
                if payload > MAX_CONTROL_PAYLOAD {
                    return Err(ReadError::Protocol("control frame too large"));
                }
            }
            0x0..=0x2 => {
                let so_far = self.partial.as_ref().map_or(0, |p| p.buf.len());
                if opcode != 0 || self.partial.is_some() {
                    if so_far.saturating_add(payload) > self.max_message {
                        return Err(ReadError::TooLarge(self.max_message));
                    }
                } else {
                    return Err(ReadError::Protocol("continuation without a message"));
                }
            }
            _ => return Err(ReadError::Protocol("reserved opcode")),
        }
        let mask = [b[len - 4], b[len - 3], b[len - 2], b[len - 1]];
        Ok(Some(Header {
            fin,
            opcode,
            mask,
            len,
            payload,
        }))
    }

    /// Folds one frame into the message being assembled; returns a message when complete.
    fn on_frame(
        &mut self,
        fin: bool,
        opcode: u8,
        payload: BytesMut,
    ) -> Result<Option<Inbound>, ReadError> {
        match opcode {
            0x1 | 0x2 => {
                if self.partial.is_some() {
                    return Err(ReadError::Protocol("new message inside a fragmented one"));
                }
                let text = opcode == 0x1;
                if fin {
                    if text && simdutf8::basic::from_utf8(&payload).is_err() {
                        return Err(ReadError::InvalidUtf8);
                    }
                    let b = payload.freeze();
                    return Ok(Some(if text {
                        Inbound::Text(b)
                    } else {
                        Inbound::Binary(b)
                    }));
                }
                let mut p = Partial {
                    text,
                    buf: payload,
                    valid_up_to: 0,
                };
                check_utf8_prefix(&mut p)?;
                self.partial = Some(p);
                Ok(None)
            }
            0x0 => {
                let Some(mut p) = self.partial.take() else {
                    return Err(ReadError::Protocol("continuation without a message"));
                };
                p.buf.extend_from_slice(&payload);
                if !fin {
                    check_utf8_prefix(&mut p)?;
                    self.partial = Some(p);
                    return Ok(None);
                }
                if p.text && simdutf8::basic::from_utf8(&p.buf[p.valid_up_to..]).is_err() {
                    return Err(ReadError::InvalidUtf8);
                }
                let b = p.buf.freeze();
                Ok(Some(if p.text {
                    Inbound::Text(b)
                } else {
                    Inbound::Binary(b)
                }))
            }
            0x9 => Ok(Some(Inbound::Ping(payload.freeze()))),
            0xa => Ok(Some(Inbound::Pong)),
            _ => parse_close(&payload).map(Some),
        }
    }
}

/// XORs the payload with the client's mask, eight bytes at a time.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    let rest = chunks.into_remainder();
    for (i, b) in rest.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// Validates what arrived of a fragmented text message, leaving an incomplete
/// trailing code point for the next fragment.
fn check_utf8_prefix(p: &mut Partial) -> Result<(), ReadError> {
    if !p.text {
        return Ok(());
    }
    match simdutf8::compat::from_utf8(&p.buf[p.valid_up_to..]) {
        Ok(_) => {
            p.valid_up_to = p.buf.len();
            Ok(())
        }
        Err(e) if e.error_len().is_none() => {
            p.valid_up_to += e.valid_up_to();
            Ok(())
        }
        Err(_) => Err(ReadError::InvalidUtf8),
    }
}

fn parse_close(payload: &[u8]) -> Result<Inbound, ReadError> {
    match payload.len() {
        0 => Ok(Inbound::Close(None, String::new())),
        1 => Err(ReadError::Protocol("close frame with a 1-byte payload")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !valid_close_code(code) {
                return Err(ReadError::Protocol("invalid close code"));
            }
            let reason = simdutf8::basic::from_utf8(&payload[2..])
                .map_err(|_| ReadError::InvalidUtf8)?
                .to_owned();
            Ok(Inbound::Close(Some(code), reason))
        }
    }
}

/// Close codes a peer may send (RFC 6455 section 7.4 and the IANA registry; 1004-1006,
/// 1014-1015 are reserved or not for endpoints, 1016-2999 unassigned).
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1013 | 3000..=4999)
}

impl WsWriter {
    /// Appends one frame to the buffer (RFC 6455 section 5.2, server side: no mask).
    fn queue(&mut self, opcode: u8, payload: &[u8]) {
        let len = payload.len();
        self.buf.reserve(len + 10);
        self.buf.put_u8(0x80 | opcode);
        if len < 126 {
            self.buf.put_u8(len as u8);
        } else if len <= usize::from(u16::MAX) {
            self.buf.put_u8(126);
            self.buf.put_u16(len as u16);
        } else {
            self.buf.put_u8(127);
            self.buf.put_u64(len as u64);
        }
        self.buf.extend_from_slice(payload);
    }

    pub fn queue_text(&mut self, payload: &[u8]) {
        if !self.closed {
            self.queue(0x1, payload);
        }
    }

    pub fn queue_ping(&mut self, payload: &[u8]) {
        if !self.closed {
            self.queue(0x9, &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)]);
        }
    }

    pub fn queue_pong(&mut self, payload: &[u8]) {
        if !self.closed {
            self.queue(0xA, &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)]);
        }
    }

    /// Queues a close frame once; nothing is queued after it.
    pub fn queue_close(&mut self, code: u16, reason: &str) {
        if self.closed {
            return;
        }
        self.closed = true;
        // Reasons are ours and short; cut defensively to the control-frame limit.
        let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let mut payload = Vec::with_capacity(2 + end);
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(&reason.as_bytes()[..end]);
        self.queue(0x8, &payload);
    }

    /// Bytes queued but not yet written.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Writes what the socket accepts now. `Ok(true)` when the buffer is empty.
    pub fn try_flush(&mut self) -> io::Result<bool> {
        while !self.buf.is_empty() {
            match self.stream.try_write(&self.buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    let _ = self.buf.split_to(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        if self.buf.capacity() > KEEP_BUFFER_BYTES {
            self.buf = BytesMut::new();
        }
        Ok(true)
    }

    /// Waits until the socket can take more bytes (cancel-safe).
    pub async fn writable(&self) -> io::Result<()> {
        self.stream.writable().await
    }

    /// Writes everything queued, waiting at most [`WRITE_TIMEOUT`].
    pub async fn flush(&mut self) -> io::Result<()> {
        let done = tokio::time::timeout(WRITE_TIMEOUT, async {
            while !self.try_flush()? {
                self.writable().await?;
            }
            Ok::<_, io::Error>(())
        })
        .await;
        done.unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")))
    }

    pub async fn send_text(&mut self, payload: &[u8]) -> io::Result<()> {
        self.queue_text(payload);
        self.flush().await
    }

    pub async fn send_binary(&mut self, payload: &[u8]) -> io::Result<()> {
        if !self.closed {
            self.queue(0x2, payload);
        }
        self.flush().await
    }

    pub async fn send_pong(&mut self, payload: &[u8]) -> io::Result<()> {
        self.queue_pong(payload);
        self.flush().await
    }

    pub async fn send_close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        self.queue_close(code, reason);
        self.flush().await
    }
}

/// Sends our close frame and waits briefly for the peer's, so the peer sees a clean
/// close instead of a reset (a browser would report 1006).
pub async fn close(reader: &mut WsReader, writer: &mut WsWriter, code: u16, reason: &str) {
    if writer.send_close(code, reason).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        loop {
            match reader.next().await {
                Ok(Inbound::Close(..)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// Answers the peer's close frame with the same code (RFC 6455 section 5.5.1).
pub async fn echo_close(writer: &mut WsWriter, code: Option<u16>) {
    let _ = writer.send_close(code.unwrap_or(1000), "").await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair(max: usize) -> (WsReader, WsWriter, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let (r, w) = split(server, Bytes::new(), max);
        (r, w, client)
    }

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut v = vec![first];
        match payload.len() {
            n if n < 126 => v.push(0x80 | n as u8),
            n if n < 65536 => {
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

    #[tokio::test]
    async fn reassembles_fragments_and_caps_the_total() {
        let (mut r, _w, mut c) = pair(10).await;
        c.write_all(&masked(0x01, b"hello")).await.unwrap();
        c.write_all(&masked(0x80, b" you")).await.unwrap();
        assert_eq!(
            r.next().await.unwrap(),
            Inbound::Text(Bytes::from_static(b"hello you"))
        );
        // Each fragment is under the cap, the sum is not.
        c.write_all(&masked(0x01, b"123456")).await.unwrap();
        c.write_all(&masked(0x80, b"78901")).await.unwrap();
        assert!(matches!(r.next().await, Err(ReadError::TooLarge(10))));
    }

    #[tokio::test]
    async fn a_frame_of_exactly_the_limit_is_accepted() {
        let (mut r, _w, mut c) = pair(10).await;
        c.write_all(&masked(0x81, b"0123456789")).await.unwrap();
        assert!(matches!(r.next().await, Ok(Inbound::Text(b)) if b.len() == 10));
        c.write_all(&masked(0x81, b"0123456789a")).await.unwrap();
        assert!(matches!(r.next().await, Err(ReadError::TooLarge(_))));
    }

    #[tokio::test]
    async fn unmasked_frames_are_a_protocol_error() {
        let (mut r, _w, mut c) = pair(100).await;
        c.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
        let e = r.next().await.unwrap_err();
        assert_eq!(e.close_code(), Some(CloseCode::ProtocolError), "{e}");
    }

    #[tokio::test]
    async fn invalid_utf8_in_fragments_fails_fast() {
        let (mut r, _w, mut c) = pair(100).await;
        c.write_all(&masked(0x01, &[0xce, 0xba, 0xe1]))
            .await
            .unwrap();
        c.write_all(&masked(0x00, &[0xbd, 0xb9])).await.unwrap();
        c.write_all(&masked(0x00, &[0xff])).await.unwrap();
        assert!(matches!(r.next().await, Err(ReadError::InvalidUtf8)));
    }

    #[tokio::test]
    async fn bad_close_frames_and_continuations() {
        let (mut r, _w, mut c) = pair(100).await;
        c.write_all(&masked(0x88, &1004u16.to_be_bytes()))
            .await
            .unwrap();
        assert!(matches!(r.next().await, Err(ReadError::Protocol(_))));
        let (mut r, _w, mut c) = pair(100).await;
        c.write_all(&masked(0x80, b"x")).await.unwrap();
        assert!(matches!(r.next().await, Err(ReadError::Protocol(_))));
        let (mut r, _w, mut c) = pair(100).await;
        let mut p = 1000u16.to_be_bytes().to_vec();
        p.extend_from_slice(b"bye");
        c.write_all(&masked(0x88, &p)).await.unwrap();
        assert_eq!(
            r.next().await.unwrap(),
            Inbound::Close(Some(1000), "bye".into())
        );
    }
}
