//! The node's local registry of authenticated connections and its NATS interest:
//! a node subscribes to `sb.user.<uid>` only while it holds a connection of that user
//! (reference-counted), and fans each message out to the local connections by
//! `try_send` into their bounded queues. A full queue closes that connection 4008;
//! nobody else waits for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use shared::protocol::{CloseCode, DisconnectCommand, ErrorBody, ErrorCode, ServerFrame};
use shared::subjects::Subjects;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A NATS subscribe that takes longer than this means the client is wedged; the
/// connection is refused with `UNAVAILABLE` rather than left without deliveries.
pub const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(2);

// === Closer ===

/// Why the server ends a connection, decided once by whoever gets there first.
#[derive(Debug, Clone)]
pub struct CloseReason {
    pub code: CloseCode,
    /// Sent before the close frame.
    pub frame: Option<ServerFrame>,
    /// Close frame reason text (short, for humans reading captures).
    pub text: &'static str,
}

impl CloseReason {
    pub fn new(code: CloseCode, frame: Option<ServerFrame>, text: &'static str) -> CloseReason {
        CloseReason { code, frame, text }
    }

    pub fn error(code: ErrorCode, message: &str, text: &'static str) -> CloseReason {
        CloseReason::new(
            code.close_code(),
            Some(ServerFrame::Error(ErrorBody::new(code, message))),
            text,
        )
    }
}

/// Asks a connection's task to close; the first reason wins.
#[derive(Debug, Default)]
pub struct Closer {
    token: CancellationToken,
    reason: OnceLock<CloseReason>,
}

impl Closer {
    pub fn close(&self, reason: CloseReason) {
        if self.reason.set(reason).is_ok() {
            self.token.cancel();
        }
    }

    pub async fn closed(&self) {
        self.token.cancelled().await
    }

    pub fn reason(&self) -> Option<&CloseReason> {
        self.reason.get()
    }
}

// === Hub ===

/// One authenticated local connection as the hub sees it.
#[derive(Debug, Clone)]
pub struct Member {
    pub conn_id: Arc<str>,
    pub user_id: Arc<str>,
    pub tx: mpsc::Sender<Bytes>,
    pub closer: Arc<Closer>,
}

#[derive(Default)]
struct State {
    conns: HashMap<Arc<str>, Member>,
    users: HashMap<Arc<str>, UserEntry>,
}

struct UserEntry {
    conns: Vec<Arc<str>>,
    /// Ends the user's subscription task when the last connection leaves.
    stop: CancellationToken,
}

/// The local registry; cheap to share (`Arc<Hub>`).
pub struct Hub {
    nats: async_nats::Client,
    subjects: Subjects,
    state: Mutex<State>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// Removes a connection from the hub when dropped.
pub struct Registration {
    hub: Arc<Hub>,
    conn_id: Arc<str>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.remove(&self.conn_id);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("NATS subscribe failed: {0}")]
    Subscribe(String),
    #[error("NATS subscribe timed out")]
    Timeout,
}

impl Hub {
    pub fn new(
        nats: async_nats::Client,
        subjects: Subjects,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Hub> {
        Arc::new(Hub {
            nats,
            subjects,
            state: Mutex::new(State::default()),
            tasks,
            shutdown,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the maps half-updated in a way
        // that matters more than losing every connection, so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a connection; subscribes to the user's subject if it is the user's first
    /// on this node. The subscription is queued on the NATS connection before this
    /// returns, so anything published after the client hears `authenticated` arrives.
    pub async fn register(self: &Arc<Self>, m: Member) -> Result<Registration, HubError> {
        let needs_sub = {
            let mut st = self.lock();
            st.conns.insert(m.conn_id.clone(), m.clone());
            match st.users.get_mut(&m.user_id) {
                Some(u) => {
                    u.conns.push(m.conn_id.clone());
                    None
                }
                None => {
                    let stop = self.shutdown.child_token();
                    st.users.insert(
                        m.user_id.clone(),
                        UserEntry {
                            conns: vec![m.conn_id.clone()],
                            stop: stop.clone(),
                        },
                    );
                    Some(stop)
                }
            }
        };
        let reg = Registration {
            hub: self.clone(),
            conn_id: m.conn_id.clone(),
        };
        if let Some(stop) = needs_sub {
            let subject = self.subjects.user(&m.user_id);
            let sub =
                match tokio::time::timeout(SUBSCRIBE_TIMEOUT, self.nats.subscribe(subject)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return Err(HubError::Subscribe(e.to_string())),
                    Err(_) => return Err(HubError::Timeout),
                };
            let hub = self.clone();
            let user = m.user_id.clone();
            self.tasks
                .spawn(async move { hub.forward_user(user, sub, stop).await });
        }
        Ok(reg)
    }

    fn remove(&self, conn_id: &str) {
        let mut st = self.lock();
        let Some(m) = st.conns.remove(conn_id) else {
            return;
        };
        if let Some(u) = st.users.get_mut(&m.user_id) {
            u.conns.retain(|c| &**c != conn_id);
            if u.conns.is_empty() {
                u.stop.cancel();
                st.users.remove(&m.user_id);
            }
        }
    }

    /// Delivers `sb.user.<uid>` messages to the user's local connections.
    async fn forward_user(
        &self,
        user: Arc<str>,
        mut sub: async_nats::Subscriber,
        stop: CancellationToken,
    ) {
        loop {
            let msg = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                m = sub.next() => match m {
                    Some(m) => m,
                    None => break,
                },
            };
            self.deliver_to_user(&user, msg.payload);
        }
        // Dropping the subscriber unsubscribes; say so now rather than at drop time.
        let _ = sub.unsubscribe().await;
    }

    /// Queues a ready frame for every local connection of `user`.
    pub fn deliver_to_user(&self, user: &str, payload: Bytes) {
        let st = self.lock();
        let Some(u) = st.users.get(user) else {
            return;
        };
        for id in &u.conns {
            if let Some(m) = st.conns.get(id) {
                offer(m, payload.clone());
            }
        }
    }

    /// Applies a kick from `sb.ctl.disconnect` to the local connections it names.
    pub fn disconnect(&self, cmd: &DisconnectCommand) -> usize {
        let st = self.lock();
        let code = CloseCode::from_u16(cmd.code);
        let reason = || {
            let frame = (code == CloseCode::Forbidden).then(|| {
                ServerFrame::Error(ErrorBody::new(
                    ErrorCode::Forbidden,
                    cmd.reason
                        .as_deref()
                        .unwrap_or("disconnected by the server"),
                ))
            });
            CloseReason::new(code, frame, "disconnected")
        };
        let mut n = 0;
        if let Some(c) = &cmd.conn_id
            && let Some(m) = st.conns.get(c.as_str())
            && cmd.user_id.as_deref().is_none_or(|u| u == &*m.user_id)
        {
            m.closer.close(reason());
            n += 1;
        } else if cmd.conn_id.is_none()
            && let Some(u) = cmd.user_id.as_deref().and_then(|u| st.users.get(u))
        {
            for id in &u.conns {
                if let Some(m) = st.conns.get(id) {
                    m.closer.close(reason());
                    n += 1;
                }
            }
        }
        n
    }

    /// `(conn_id, user_id)` of every local connection, for the Redis refresh.
    pub fn snapshot(&self) -> Vec<(String, String)> {
        let st = self.lock();
        st.conns
            .values()
            .map(|m| (m.conn_id.to_string(), m.user_id.to_string()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Local connection ids of a user (tests and introspection).
    pub fn user_conns(&self, user: &str) -> Vec<String> {
        let st = self.lock();
        st.users
            .get(user)
            .map(|u| u.conns.iter().map(|c| c.to_string()).collect())
            .unwrap_or_default()
    }
}

/// Offers a frame to one connection without waiting; a full queue means the client
/// does not read fast enough, and it is closed instead of slowing the fan-out.
pub fn offer(m: &Member, payload: Bytes) {
    match m.tx.try_send(payload) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            metrics::counter!(shared::metrics::SLOW_CONSUMERS).increment(1);
            m.closer.close(CloseReason::error(
                ErrorCode::SlowConsumer,
                "the client did not read fast enough",
                "slow consumer",
            ));
        }
        // The connection is closing; its frames no longer matter.
        Err(mpsc::error::TrySendError::Closed(_)) => {}
    }
}
