//! What one worker remembers of user contexts between requests: recent answers
//! shared with a burst of requests for the same user, and what it last wrote to
//! Redis so an unchanged context costs no write. Apart from the RPC loop so the
//! worker's state can hold these without depending on the loop that uses them.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use shared::coalesce::Coalescer;
use shared::protocol::UserContext;
use tokio::time::Instant;

/// How long a fresh answer is shared with later non-`fresh` requests for the same
/// user: covers a burst (a page load opening tabs, a refresh storm), short enough
/// that a membership change shows on the next login; `fresh` requests never use it.
pub const CONTEXT_SHARE_FOR: Duration = Duration::from_secs(2);
/// Users whose recent answer one worker keeps; past this it starts over (each
/// forgotten user costs at most one more backend call).
pub const CONTEXT_SHARED_MAX: usize = 10_000;

/// Recent answers and in-flight backend calls, per user.
#[derive(Debug, Default)]
pub struct Shared {
    recent: Mutex<HashMap<String, (Instant, UserContext)>>,
    /// Keyed by (user, fresh): a `fresh` request never joins a call that may have
    /// started before the change it is asked to see, only another fresh one.
    pub(super) flights: Coalescer<(String, bool), UserContext>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, UserContext)>> {
        // A panic while holding it cannot leave the map half-written.
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn recent(&self, user: &str) -> Option<UserContext> {
        let recent = self.lock();
        match recent.get(user) {
            Some((at, ctx)) if at.elapsed() < CONTEXT_SHARE_FOR => Some(ctx.clone()),
            _ => None,
        }
    }

    pub(super) fn remember(&self, user: &str, ctx: &UserContext) {
        let mut recent = self.lock();
        if recent.len() >= CONTEXT_SHARED_MAX && !recent.contains_key(user) {
            recent.retain(|_, (at, _)| at.elapsed() < CONTEXT_SHARE_FOR);
            if recent.len() >= CONTEXT_SHARED_MAX {
                recent.clear();
            }
        }
        recent.insert(user.to_owned(), (Instant::now(), ctx.clone()));
    }
}

/// A context this worker already wrote is written again after this long even when
/// unchanged, so the kept copy (TTL `shared::store::CONTEXT_TTL`) never lapses for a
/// user who keeps connecting.
pub const CONTEXT_REWRITE_AFTER: Duration = Duration::from_secs(1800);
/// Users whose last written context one worker remembers; past this it starts over
/// (each forgotten user costs one write).
pub const CONTEXT_WRITTEN_MAX: usize = 100_000;

/// What this worker last wrote of each user's context: a connect whose context did
/// not change costs Redis nothing.
#[derive(Debug, Default)]
pub struct Written {
    users: Mutex<HashMap<String, (u64, Instant)>>,
}

impl Written {
    /// Whether `ctx` must be written for `user` (changed, new, or due again).
    pub(super) fn needs_write(&self, user: &str, ctx: &UserContext) -> bool {
        let digest = digest(ctx);
        let users = self.lock();
        !matches!(users.get(user), Some((d, at)) if *d == digest && at.elapsed() < CONTEXT_REWRITE_AFTER)
    }

    pub(super) fn wrote(&self, user: &str, ctx: &UserContext) {
        let mut users = self.lock();
        if users.len() >= CONTEXT_WRITTEN_MAX && !users.contains_key(user) {
            users.clear();
        }
        users.insert(user.to_owned(), (digest(ctx), Instant::now()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, Instant)>> {
        // A panic while holding it cannot leave the map half-written.
        self.users.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn digest(ctx: &UserContext) -> u64 {
    let mut h = DefaultHasher::new();
    serde_json::to_string(ctx).unwrap_or_default().hash(&mut h);
    h.finish()
}
