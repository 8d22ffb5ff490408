//! The WebSocket transport: RFC 6455 framing on top of fastwebsockets, with what the
//! crate leaves out (see `../shared/research/crates.md` section 2): an aggregate cap on
//! fragmented messages, close frames with the right code on every protocol error,
//! refusal of unmasked client frames, control-frame size checks, and incremental
//! UTF-8 validation of fragmented text. Writing is our own small buffered encoder
//! (server frames are unmasked and trivial to frame): frames queue in a buffer that is
//! flushed without blocking, so a connection can batch many frames per syscall, keep
//! serving its other duties while a slow peer drains, and never corrupts the stream
//! by cancelling a write half-way. The gateway's connections and the Autobahn echo
//! harness both run on exactly this code.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::BufMut;
use bytes::{Bytes, BytesMut};
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocketError, WebSocketRead};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use shared::protocol::CloseCode;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

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
    /// The close code to send, or `None` when the peer is gone and nothing can be sent.
    pub fn close_code(&self) -> Option<CloseCode> {
        match self {
            ReadError::Protocol(_) => Some(CloseCode::ProtocolError),
            ReadError::InvalidUtf8 => Some(CloseCode::InvalidPayload),
            ReadError::TooLarge(_) => Some(CloseCode::TooLarge),
            ReadError::Eof | ReadError::Io(_) => None,
        }
    }

    fn from_ws(e: WebSocketError, max: usize) -> ReadError {
        match e {
            WebSocketError::InvalidUTF8 => ReadError::InvalidUtf8,
            WebSocketError::FrameTooLarge => ReadError::TooLarge(max),
            WebSocketError::ReservedBitsNotZero => ReadError::Protocol("reserved bits set"),
            WebSocketError::ControlFrameFragmented => {
                ReadError::Protocol("fragmented control frame")
            }
            WebSocketError::PingFrameTooLarge => ReadError::Protocol("control frame too large"),
            WebSocketError::InvalidValue => ReadError::Protocol("reserved opcode"),
            WebSocketError::UnexpectedEOF => ReadError::Eof,
            WebSocketError::IoError(e) if MaskCheck::is_unmasked_error(&e) => {
                ReadError::Protocol("unmasked client frame")
            }
            WebSocketError::IoError(e) => ReadError::Io(e),
            _ => ReadError::Protocol("malformed frame"),
        }
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

/// Reads complete messages, enforcing `max_message` across fragments.
pub struct WsReader {
    inner: WebSocketRead<MaskCheck>,
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
    // Only the read half of fastwebsockets is used; `WsWriter` does the writing.
    let (mut rd, _) = fastwebsockets::after_handshake_split(
        MaskCheck::new(r, read_buf),
        tokio::io::sink(),
        Role::Server,
    );
    // We answer pings and closes ourselves (after validating them), so the library
    // never needs the split-mode callback.
    rd.set_auto_close(false);
    rd.set_auto_pong(false);
    // The crate rejects frames with `len >= max`: +1 makes `max` itself acceptable.
    rd.set_max_message_size(max_message.saturating_add(1));
    (
        WsReader {
            inner: rd,
            max_message,
            partial: None,
        },
        WsWriter {
            stream: w,
            buf: BytesMut::new(),
            closed: false,
        },
    )
}

async fn never_called(_: Frame<'_>) -> Result<(), io::Error> {
    Ok(())
}

impl WsReader {
    /// The next complete message or control frame. Cancel-unsafe: a dropped call may
    /// lose a partly read frame, so only drop it when the connection ends.
    pub async fn next(&mut self) -> Result<Inbound, ReadError> {
        loop {
            let frame = self
                .inner
                .read_frame(&mut never_called)
                .await
                .map_err(|e| ReadError::from_ws(e, self.max_message))?;
            if let Some(msg) = on_frame(&mut self.partial, self.max_message, frame)? {
                return Ok(msg);
            }
        }
    }
}

/// Folds one frame into the message being assembled; returns a message when complete.
fn on_frame(
    partial: &mut Option<Partial>,
    max_message: usize,
    frame: Frame<'_>,
) -> Result<Option<Inbound>, ReadError> {
    let fin = frame.fin;
    match frame.opcode {
        OpCode::Text | OpCode::Binary => {
            if partial.is_some() {
                return Err(ReadError::Protocol("new message inside a fragmented one"));
            }
            let text = frame.opcode == OpCode::Text;
            let buf = payload_bytes(frame.payload);
            if fin {
                // Unfragmented text was UTF-8-checked by the crate already.
                let b = buf.freeze();
                return Ok(Some(if text {
                    Inbound::Text(b)
                } else {
                    Inbound::Binary(b)
                }));
            }
            let mut p = Partial {
                text,
                buf,
                valid_up_to: 0,
            };
            check_utf8_prefix(&mut p)?;
            *partial = Some(p);
            Ok(None)
        }
        OpCode::Continuation => {
            let Some(mut p) = partial.take() else {
                return Err(ReadError::Protocol("continuation without a message"));
            };
            if p.buf.len() + frame.payload.len() > max_message {
                return Err(ReadError::TooLarge(max_message));
            }
            p.buf.extend_from_slice(&frame.payload);
            if !fin {
                check_utf8_prefix(&mut p)?;
                *partial = Some(p);
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
        OpCode::Ping => Ok(Some(Inbound::Ping(payload_bytes(frame.payload).freeze()))),
        OpCode::Pong => {
            if frame.payload.len() > MAX_CONTROL_PAYLOAD {
                return Err(ReadError::Protocol("control frame too large"));
            }
            Ok(Some(Inbound::Pong))
        }
        OpCode::Close => parse_close(&frame.payload).map(Some),
    }
}

fn payload_bytes(p: Payload<'_>) -> BytesMut {
    match p {
        Payload::Bytes(b) => b,
        other => BytesMut::from(&other[..]),
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
        n if n > MAX_CONTROL_PAYLOAD => Err(ReadError::Protocol("control frame too large")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !fastwebsockets::CloseCode::from(code).is_allowed() {
                return Err(ReadError::Protocol("invalid close code"));
            }
            let reason = simdutf8::basic::from_utf8(&payload[2..])
                .map_err(|_| ReadError::InvalidUtf8)?
                .to_owned();
            Ok(Inbound::Close(Some(code), reason))
        }
    }
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

// === impl MaskCheck ===

/// Read side of the socket that follows frame boundaries and fails on a client frame
/// without the mask bit (RFC 6455 section 5.1: the server MUST close), which
/// fastwebsockets accepts. Also replays bytes the HTTP layer read past the handshake.
pub struct MaskCheck {
    inner: OwnedReadHalf,
    prefix: Bytes,
    state: FrameCursor,
}

/// Where in the frame stream the next byte falls.
enum FrameCursor {
    /// Collecting a header; `len` bytes of `buf` are filled.
    Header { buf: [u8; 14], len: usize },
    /// Skipping payload bytes.
    Payload(u64),
}

const UNMASKED: &str = "unmasked client frame";

impl MaskCheck {
    fn new(inner: OwnedReadHalf, prefix: Bytes) -> MaskCheck {
        MaskCheck {
            inner,
            prefix,
            state: FrameCursor::Header {
                buf: [0; 14],
                len: 0,
            },
        }
    }

    fn is_unmasked_error(e: &io::Error) -> bool {
        e.kind() == io::ErrorKind::InvalidData && e.to_string() == UNMASKED
    }

    /// Advances the cursor over bytes handed to the frame parser.
    fn observe(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            match &mut self.state {
                FrameCursor::Payload(left) => {
                    let n = (*left).min(data.len() as u64) as usize;
                    *left -= n as u64;
                    data = &data[n..];
                    if *left == 0 {
                        self.state = FrameCursor::Header {
                            buf: [0; 14],
                            len: 0,
                        };
                    }
                }
                FrameCursor::Header { buf, len } => {
                    buf[*len] = data[0];
                    *len += 1;
                    data = &data[1..];
                    if *len < 2 {
                        continue;
                    }
                    if buf[1] & 0x80 == 0 {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, UNMASKED));
                    }
                    let ext = match buf[1] & 0x7f {
                        126 => 2,
                        127 => 8,
                        _ => 0,
                    };
                    if *len < 2 + ext + 4 {
                        continue;
                    }
                    let payload = match ext {
                        0 => u64::from(buf[1] & 0x7f),
                        2 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
                        _ => u64::from_be_bytes([
                            buf[2], buf[3], buf[4], buf[5], buf[6], buf[7], buf[8], buf[9],
                        ]),
                    };
                    self.state = if payload == 0 {
                        FrameCursor::Header {
                            buf: [0; 14],
                            len: 0,
                        }
                    } else {
                        FrameCursor::Payload(payload)
                    };
                }
            }
        }
        Ok(())
    }
}

impl AsyncRead for MaskCheck {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            let chunk = this.prefix.split_to(n);
            this.observe(&chunk)?;
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        this.observe(&buf.filled()[before..])?;
        Poll::Ready(Ok(()))
    }
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
