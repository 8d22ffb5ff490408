//! What the store keeps per channel, as Rust values (settings, positions, history
//! pages, presence entries and their limits), and the process's memory of channel
//! epochs. Apart from `channel.rs`, which runs the Redis side, because the store's
//! handle owns the epoch memory while `channel.rs` extends that handle.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// History and offset lifetimes of one deployment.
#[derive(Debug, Clone, Copy)]
pub struct ChannelSettings {
    /// Publications kept per channel.
    pub history_size: usize,
    /// History is dropped this long after the channel's last publication.
    pub history_ttl: Duration,
    /// The offset counter outlives the history so offsets never restart while a
    /// client may still hold one (Centrifugo's `history_meta_ttl`).
    pub offset_ttl: Duration,
}

/// Where a channel's offsets stand: the epoch of its current count and its last
/// offset (0 before the first publication of the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub epoch: u64,
    pub offset: u64,
}

/// What a subscriber with `since` can be given.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelHistory {
    /// The channel's epoch when history was read.
    pub epoch: u64,
    /// The channel's last offset when history was read.
    pub top: u64,
    /// Ready frames after `since`, by offset.
    pub frames: Vec<(u64, String)>,
    /// Whether `frames` covers everything after `since` (no gap to the history's start).
    pub complete: bool,
}

impl ChannelHistory {
    /// The history a subscriber at `since` (of `epoch`, when it knows one) gets from
    /// the frames read after `since` with the channel at `top`: complete only when the
    /// frames are every offset from `since + 1` to the top of the same epoch.
    pub fn read(
        since: u64,
        epoch: Option<u64>,
        top: Position,
        frames: Vec<(u64, String)>,
    ) -> ChannelHistory {
        let complete = if epoch.is_some_and(|e| e != top.epoch) || since > top.offset {
            // The offsets the client saw belong to a count this channel no longer has
            // (its position was lost and started again).
            false
        } else if since == top.offset {
            true
        } else {
            frames.first().map(|(o, _)| *o) == Some(since + 1)
                && frames.last().map(|(o, _)| *o) == Some(top.offset)
                && frames.len() as u64 == top.offset - since
        };
        ChannelHistory {
            epoch: top.epoch,
            top: top.offset,
            frames,
            complete,
        }
    }
}

/// One user's presence in a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PresenceEntry {
    pub user_id: String,
    pub connections: u64,
}

/// Largest read offset stored: 2^53 - 1, the largest integer a Lua number (a double)
/// holds exactly. Channel offsets count publications, so a real one never gets near.
pub const MAX_READ_OFFSET: u64 = (1 << 53) - 1;

/// Read offsets are kept this long after the user's last read.
pub const READ_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Channels whose epoch one process remembers; past this the memory starts over
/// (each forgotten channel costs one slow publication to learn its epoch again).
pub const EPOCH_CACHE_MAX: usize = 65_536;
/// A channel's stream TTL is extended by a publication at most this often per
/// process: the TTL is days, so the extension costs one command per channel per
/// hour instead of one per publication.
pub const TTL_REFRESH_INTERVAL: Duration = Duration::from_secs(3600);

/// What a process knows of the channels it published to.
#[derive(Debug, Default)]
pub(crate) struct EpochCache {
    channels: Mutex<HashMap<String, Known>>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Known {
    pub(super) epoch: u64,
    pub(super) ttl_extended: Instant,
}

impl EpochCache {
    pub(super) fn get(&self, key: &str) -> Option<Known> {
        self.lock().get(key).copied()
    }

    pub(super) fn put(&self, key: &str, epoch: u64, ttl_extended: Instant) {
        let mut m = self.lock();
        if m.len() >= EPOCH_CACHE_MAX && !m.contains_key(key) {
            m.clear();
        }
        m.insert(
            key.to_owned(),
            Known {
                epoch,
                ttl_extended,
            },
        );
    }

    pub(super) fn forget(&self, key: &str) {
        self.lock().remove(key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Known>> {
        // A panic while holding it cannot leave the map inconsistent.
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }
}
