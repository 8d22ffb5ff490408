//! The states of a connection and what its frame handlers share: the
//! unauthenticated and authenticated state, the handler context and the reply a
//! handler gives. Kept apart from the session loop so the handler modules depend on
//! these types, not on the loop that calls them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use shared::auth::Claims;
use shared::protocol::{FrameId, ServerFrame};

use crate::channels::{Perms, Subscriptions};
use crate::hub::{Registration, TokenSlot};
use crate::limits::Bucket;
use crate::node::Node;

/// `token_expiring` is sent this long before `exp` (PROTOCOL.md: about 60 s).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(60);
/// `refresh` frames a connection may send at once: a client retrying a refresh a
/// couple of times is fine; each costs a token check and a context fetch.
pub const REFRESH_BURST: f64 = 3.0;
/// Sustained `refresh` frames per second per connection: tokens live minutes to
/// hours, so one every 30 s is far more than any client needs.
pub const REFRESH_PER_SEC: f64 = 1.0 / 30.0;

/// A connection that has not authenticated yet.
pub(super) struct Unauthed {
    /// Close 4000 at this instant unless credentials arrive.
    pub(super) deadline: Instant,
}

/// An authenticated identity on this connection.
pub(super) struct Authed {
    pub(super) claims: Claims,
    /// The current token, shared with the hub (context re-checks use it).
    pub(super) token: TokenSlot,
    /// Allowance of `refresh` frames.
    pub(super) refreshes: Bucket,
    /// Close 4001 at this instant (exp + leeway).
    pub(super) expires: Instant,
    /// Send `token_expiring` at this instant, once.
    pub(super) warn_at: Option<Instant>,
    pub(super) perms: Perms,
    pub(super) subs: Subscriptions,
    pub(super) _registration: Registration,
    /// This connection's member of the user's Redis registry (`ConnRecord::member`).
    pub(super) registry: Arc<str>,
}

/// Where the connection is in its life.
// Not boxed: nearly every connection lives authenticated, and a box would cost each
// one an allocation for the sake of the short unauthenticated phase.
#[allow(clippy::large_enum_variant)]
pub(super) enum State {
    Unauthed(Unauthed),
    Authed(Authed),
}

/// What a frame handler of an authenticated connection may use besides its state.
pub(super) struct Ctx<'a> {
    pub(super) node: &'a Node,
    pub(super) conn_id: &'a str,
    /// The id of the frame being answered, echoed in the answer.
    pub(super) id: Option<FrameId>,
}

/// What a frame handler answers; the session writes it.
pub(super) enum Reply {
    /// Nothing (`typing` is fire-and-forget).
    Nothing,
    Frame(ServerFrame),
    /// A frame, then encoded frames after it (`refreshed`, then the `unsubscribed`
    /// of channels the user lost).
    FrameThen(ServerFrame, Vec<Bytes>),
    /// A history replay and its `subscribed`, written at the peer's pace.
    Paced(Vec<Bytes>),
}
