//! The run clock: time since the run's epoch, which every worker process shares
//! (passed with `--epoch-ms`), so that their per-second series line up.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Milliseconds since the unix epoch, now.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Time since the run's epoch.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
    epoch_unix_ms: u64,
}

impl Clock {
    /// A clock whose zero is `epoch_unix_ms` (in the past or now).
    pub fn from_unix_ms(epoch_unix_ms: u64) -> Clock {
        let behind = Duration::from_millis(unix_ms().saturating_sub(epoch_unix_ms));
        let now = Instant::now();
        Clock {
            epoch: now.checked_sub(behind).unwrap_or(now),
            epoch_unix_ms,
        }
    }

    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub fn elapsed(&self) -> Duration {
        self.epoch.elapsed()
    }

    pub fn epoch_unix_ms(&self) -> u64 {
        self.epoch_unix_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_counts_from_its_epoch() {
        let c = Clock::from_unix_ms(unix_ms() - 5_000);
        let ms = c.now_ms();
        assert!((4_900..6_000).contains(&ms), "{ms}");
        let fresh = Clock::from_unix_ms(unix_ms());
        assert!(fresh.now_ms() < 1_000);
        // An epoch in the future does not underflow.
        assert!(Clock::from_unix_ms(unix_ms() + 60_000).now_ms() < 1_000);
    }
}
