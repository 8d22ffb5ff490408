//! The Rust client of Switchboard (docs/PROTOCOL.md), with the rules of the
//! JavaScript client (`clients/js`): authentication in the first frame, reconnects
//! by the close-code table (1012 at once with jitter, 4001 with a new token, never
//! after 45xx, backoff otherwise), token refresh on `token_expiring`, channels that
//! resume with `since` without gaps or duplicates, and chat replies whose final
//! event comes exactly once, read from `history` when the live frame was missed.
//!
//! ```no_run
//! # async fn demo() -> Result<(), switchboard_client::ClientError> {
//! use switchboard_client::{Event, Options, connect};
//!
//! let (client, mut events) = connect(Options::new("ws://127.0.0.1:8080/ws", |_reason| async {
//!     Ok("<a JWT from your sign-in>".to_owned())
//! }));
//! let info = client.ready().await?;
//! client.subscribe("team:demo").await?;
//! client.publish("team:demo", serde_json::json!({"text": "hello"})).await?;
//! let ack = client.chat_send("Summarise my tasks", None).await?;
//! while let Some(event) = events.recv().await {
//!     if let Event::Chat(c) = event {
//!         println!("{c:?}");
//!     }
//! }
//! # let _ = (info, ack); Ok(()) }
//! ```

mod backoff;
mod chat;
mod connection;
mod error;
mod event;
mod options;
mod stats;
mod subscription;
mod tls;

use std::time::{Duration, Instant};

use protocol::{ClientFrame, FileAttachment, HistoryMessage, PresenceUser, ServerFrame};
use serde_json::Value;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

pub use error::{ClientError, TokenError};
pub use event::{ChatEvent, Delivery, Event, Info, Status};
pub use options::{Options, TokenFuture, TokenReason, TokenSource};
pub use protocol;
pub use stats::Stats;

use connection::{Command, Connection};

/// Commands in flight from the handles to the connection task.
const COMMAND_QUEUE: usize = 64;
/// `close` waits this long for the client to stop: the close handshake itself is
/// bounded by 1 s, the rest is the connection task getting to it.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Starts a client: it connects at once and keeps reconnecting by the rules until
/// closed. Events arrive in order on the returned queue.
pub fn connect(opts: Options) -> (Client, Events) {
    assert!(!opts.urls.is_empty(), "Options::urls is empty");
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
    let (ev_tx, ev_rx) = mpsc::channel(opts.event_queue.max(1));
    let (status_tx, status_rx) = watch::channel(Status::Connecting { attempt: 0 });
    let request_timeout = opts.request_timeout;
    let counters = Arc::new(stats::Counters::default());
    tokio::spawn(Connection::new(opts, cmd_rx, ev_tx, status_tx, counters.clone()).run());
    (
        Client {
            cmds: cmd_tx,
            status: status_rx,
            request_timeout,
            counters,
        },
        Events(ev_rx),
    )
}

/// The application's events, in the order they happened.
pub struct Events(mpsc::Receiver<Event>);

impl Events {
    /// The next event; `None` once the client stopped and every event was read.
    pub async fn recv(&mut self) -> Option<Event> {
        self.0.recv().await
    }
}

/// A cheap, cloneable handle. The client stops when [`Client::close`] is called or
/// every handle is dropped.
#[derive(Clone)]
pub struct Client {
    cmds: mpsc::Sender<Command>,
    status: watch::Receiver<Status>,
    request_timeout: Duration,
    counters: Arc<stats::Counters>,
}

/// `subscribed`, as the request's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscribed {
    pub channel: String,
    pub offset: u64,
    pub epoch: String,
    pub recovered: bool,
    pub read_offset: Option<u64>,
}

/// `chat.send`'s ack: the request's events carry these ids.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatAck {
    pub session_id: String,
    pub request_id: String,
}

impl Client {
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// The server's repeats this client dropped so far.
    pub fn stats(&self) -> Stats {
        self.counters.snapshot()
    }

    /// Waits until authenticated; an error once the client stopped.
    pub async fn ready(&self) -> Result<Info, ClientError> {
        let mut rx = self.status.clone();
        loop {
            match &*rx.borrow_and_update() {
                Status::Authenticated(info) => return Ok((**info).clone()),
                Status::Stopped(why) => {
                    return Err(ClientError::Stopped(
                        why.clone().unwrap_or_else(|| "closed".into()),
                    ));
                }
                _ => {}
            }
            if rx.changed().await.is_err() {
                return Err(ClientError::Stopped("the client task ended".into()));
            }
        }
    }

    /// Subscribes (or answers again for a channel already held). The subscription
    /// outlives reconnects: the client resumes it from its last offset.
    pub async fn subscribe(&self, channel: &str) -> Result<Subscribed, ClientError> {
        self.subscribe_from(channel, None, None).await
    }

    /// Subscribes from a known offset (`epoch` from the `subscribed` it counts in):
    /// what the channel's history holds after `since` comes first.
    pub async fn subscribe_from(
        &self,
        channel: &str,
        since: Option<u64>,
        epoch: Option<String>,
    ) -> Result<Subscribed, ClientError> {
        let frame = ClientFrame::Subscribe {
            channel: channel.to_owned(),
            since,
            epoch,
        };
        match self.request(frame).await? {
            ServerFrame::Subscribed {
                channel,
                offset,
                epoch,
                recovered,
                read_offset,
                ..
            } => Ok(Subscribed {
                channel,
                offset,
                epoch,
                recovered,
                read_offset,
            }),
            other => Err(unexpected(other)),
        }
    }

    pub async fn unsubscribe(&self, channel: &str) -> Result<(), ClientError> {
        let frame = ClientFrame::Unsubscribe {
            channel: channel.to_owned(),
        };
        self.request(frame).await.map(|_| ())
    }

    /// Publishes; the channel's offset of the message.
    pub async fn publish(&self, channel: &str, data: Value) -> Result<u64, ClientError> {
        let frame = ClientFrame::Publish {
            channel: channel.to_owned(),
            data,
        };
        match self.request(frame).await? {
            ServerFrame::Ack {
                offset: Some(o), ..
            } => Ok(o),
            other => Err(unexpected(other)),
        }
    }

    /// Sends a chat message (a new session without `session_id`); the reply comes
    /// as [`ChatEvent`]s with the ack's `request_id`.
    pub async fn chat_send(
        &self,
        message: &str,
        session_id: Option<&str>,
    ) -> Result<ChatAck, ClientError> {
        self.chat_send_files(message, session_id, Vec::new()).await
    }

    pub async fn chat_send_files(
        &self,
        message: &str,
        session_id: Option<&str>,
        files: Vec<FileAttachment>,
    ) -> Result<ChatAck, ClientError> {
        let frame = ClientFrame::ChatSend {
            message: message.to_owned(),
            session_id: session_id.map(str::to_owned),
            files,
        };
        match self.request(frame).await? {
            ServerFrame::Ack {
                session_id: Some(session_id),
                request_id: Some(request_id),
                ..
            } => Ok(ChatAck {
                session_id,
                request_id,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Stops a reply; its `Complete` then carries the text so far.
    pub async fn chat_cancel(&self, request_id: &str) -> Result<(), ClientError> {
        let frame = ClientFrame::ChatCancel {
            request_id: request_id.to_owned(),
        };
        self.request(frame).await.map(|_| ())
    }

    pub async fn history(
        &self,
        session_id: &str,
        limit: Option<u32>,
    ) -> Result<Vec<HistoryMessage>, ClientError> {
        let frame = ClientFrame::History {
            session_id: session_id.to_owned(),
            limit,
        };
        match self.request(frame).await? {
            ServerFrame::History { messages, .. } => Ok(messages),
            other => Err(unexpected(other)),
        }
    }

    pub async fn presence(&self, channel: &str) -> Result<Vec<PresenceUser>, ClientError> {
        let frame = ClientFrame::Presence {
            channel: channel.to_owned(),
        };
        match self.request(frame).await? {
            ServerFrame::Presence { users, .. } => Ok(users),
            other => Err(unexpected(other)),
        }
    }

    /// Marks a channel read up to `offset`; the stored (highest) read offset.
    pub async fn read(&self, channel: &str, offset: u64) -> Result<u64, ClientError> {
        let frame = ClientFrame::Read {
            channel: channel.to_owned(),
            offset,
        };
        match self.request(frame).await? {
            ServerFrame::Ack {
                offset: Some(o), ..
            } => Ok(o),
            other => Err(unexpected(other)),
        }
    }

    /// Tells the channel's other users that this one types (no reply; dropped while
    /// disconnected).
    pub async fn typing(&self, channel: &str) -> Result<(), ClientError> {
        let frame = ClientFrame::Typing {
            channel: channel.to_owned(),
        };
        self.cmds
            .send(Command::Send { frame })
            .await
            .map_err(|_| stopped())
    }

    /// A `ping` round trip.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let start = Instant::now();
        self.request(ClientFrame::Ping {}).await?;
        Ok(start.elapsed())
    }

    /// Stops reading the socket for `d`, as a stuck application would: frames back
    /// up, and the server's slow-consumer rule (4008) may end the connection.
    pub async fn hold_reads(&self, d: Duration) -> Result<(), ClientError> {
        self.cmds
            .send(Command::Hold(d))
            .await
            .map_err(|_| stopped())
    }

    /// Closes the socket with 1000, stays away for `d` (an application sent to the
    /// background), then connects again, resuming subscriptions and chats.
    pub async fn disconnect_for(&self, d: Duration) -> Result<(), ClientError> {
        self.cmds
            .send(Command::Away(d))
            .await
            .map_err(|_| stopped())
    }

    /// Closes the socket with 1000 and stops the client; returns once it stopped, or
    /// after [`CLOSE_TIMEOUT`] when the client cannot get to it (an application that
    /// stopped reading a full event queue: the client then stops when the queue has
    /// room or its receiver is dropped).
    pub async fn close(&self) {
        let mut rx = self.status.clone();
        let stopped = async {
            let _ = self.cmds.send(Command::Close).await;
            let _ = rx.wait_for(|s| matches!(s, Status::Stopped(_))).await;
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, stopped).await;
    }

    /// Any client frame with a direct reply, for what the typed methods do not
    /// cover; the reply frame, or `ClientError::Server` for an `error` answer.
    pub async fn request(&self, frame: ClientFrame) -> Result<ServerFrame, ClientError> {
        let (tx, rx) = oneshot::channel();
        let cmd = Command::Request { frame, reply: tx };
        let answer = async {
            self.cmds.send(cmd).await.map_err(|_| stopped())?;
            rx.await.map_err(|_| stopped())?
        };
        tokio::time::timeout(self.request_timeout, answer)
            .await
            .map_err(|_| ClientError::Timeout(self.request_timeout))?
    }
}

fn stopped() -> ClientError {
    ClientError::Stopped("the client task ended".into())
}

fn unexpected(frame: ServerFrame) -> ClientError {
    ClientError::Unexpected(format!("{frame:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An application that never reads its events still gets `close` back.
    #[tokio::test]
    async fn close_returns_when_the_event_queue_is_full_and_unread() {
        let mut opts = Options::with_token("ws://127.0.0.1:9/ws", "t");
        opts.event_queue = 1;
        opts.backoff_base = Duration::from_millis(1);
        opts.backoff_cap = Duration::from_millis(2);
        let (client, _events) = connect(opts);
        // Nothing listens on port 9: attempts fail and fill the one-event queue.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let start = Instant::now();
        client.close().await;
        assert!(start.elapsed() <= CLOSE_TIMEOUT + Duration::from_millis(500));
    }
}
