//! Revoked token ids, held in memory by every gateway: read from Redis in the
//! background and told of new ones over NATS (`POST /v1/revoke`), so checking a token
//! at connect or refresh costs no Redis command.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use shared::bus::Bus;
use shared::store::ConnStore;
use tokio_util::sync::CancellationToken;

/// How often the whole list is read again: the bound on how late a revocation takes
/// effect on a node that missed its NATS notice (16 commands per node per period).
pub const SYNC_INTERVAL: Duration = Duration::from_secs(5);

/// A revocation as told over NATS and to `POST /v1/revoke`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Revocation {
    pub jti: String,
    /// Unix seconds; the token is invalid after it anyway.
    pub exp: u64,
}

/// The set, and whether it was ever read (before that, nothing can be vouched for).
#[derive(Debug, Default)]
pub struct Revocations {
    ids: RwLock<HashMap<String, u64>>,
    synced: AtomicBool,
}

/// The list was never read from Redis: a token cannot be vouched for yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotSynced;

impl Revocations {
    /// Reads the whole list every [`SYNC_INTERVAL`] until `stop`: what a node that
    /// missed a notice learns late, it learns within that bound.
    pub async fn sync_loop(&self, store: &dyn ConnStore, stop: &CancellationToken) {
        let mut tick = tokio::time::interval(SYNC_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            self.sync(store).await;
        }
    }

    /// Reads the list once (bounded by the store's operation timeout).
    pub async fn sync(&self, store: &dyn ConnStore) {
        match store.revocations().await {
            Ok(list) => self.replace(list),
            Err(e) => {
                metrics::counter!(shared::metrics::REDIS_ERRORS, "op" => "revocations")
                    .increment(1);
                tracing::debug!(error = %e, "revocation list not read");
            }
        }
    }

    /// Takes revocations told over the bus (`subject`) at once, until `stop`.
    pub async fn notice_loop(&self, bus: &dyn Bus, subject: String, stop: &CancellationToken) {
        crate::control::messages(bus, subject, "revocation notice", stop, |r| self.add(r)).await;
    }

    pub fn is_revoked(&self, jti: &str) -> Result<bool, NotSynced> {
        if !self.synced.load(Ordering::Acquire) {
            return Err(NotSynced);
        }
        Ok(self.read().get(jti).is_some_and(|exp| *exp >= unix_now()))
    }

    /// Replaces the set with what Redis holds, keeping notices newer than the read.
    pub fn replace(&self, list: Vec<(String, u64)>) {
        let now = unix_now();
        let mut ids = self.write();
        ids.retain(|_, exp| *exp >= now);
        ids.extend(list);
        self.synced.store(true, Ordering::Release);
    }

    pub fn add(&self, r: Revocation) {
        self.write().insert(r.jti, r.exp);
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, u64>> {
        // A panic while holding the lock cannot leave the map half-written.
        self.ids.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, u64>> {
        self.ids.write().unwrap_or_else(|p| p.into_inner())
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_vouches_for_nothing_then_answers_from_memory() {
        let r = Revocations::default();
        assert_eq!(r.is_revoked("a"), Err(NotSynced));
        r.replace(vec![("a".into(), unix_now() + 60), ("old".into(), 1)]);
        assert_eq!(r.is_revoked("a"), Ok(true));
        assert_eq!(r.is_revoked("b"), Ok(false));
        assert_eq!(r.is_revoked("old"), Ok(false), "expired tokens fail anyway");
        r.add(Revocation {
            jti: "b".into(),
            exp: unix_now() + 60,
        });
        assert_eq!(r.is_revoked("b"), Ok(true));
        // A notice that arrived between the read and its reply is kept.
        r.replace(vec![]);
        assert_eq!(r.is_revoked("b"), Ok(true));
    }
}
