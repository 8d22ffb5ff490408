//! The scenarios, one module each, and the run clock they share: every worker counts
//! time from the same epoch (passed to worker processes with `--epoch-ms`), so their
//! per-second series line up when the parent merges them.

pub mod broadcast;
pub mod connect;

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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

/// Starts one task per index in `range`, at most `concurrency` holding a permit at
/// once, paced to `rate` starts per second (0 = as fast as permits allow), until
/// `stop` is cancelled. Returns how many were started; closes `tracker`.
pub(crate) async fn dispatch<F, Fut>(
    range: Range<u64>,
    rate: f64,
    concurrency: u64,
    stop: CancellationToken,
    tracker: TaskTracker,
    task: F,
) -> u64
where
    F: Fn(u64, OwnedSemaphorePermit) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(
        usize::try_from(concurrency)
            .unwrap_or(Semaphore::MAX_PERMITS)
            .min(Semaphore::MAX_PERMITS),
    ));
    let start = Instant::now();
    let mut started = 0u64;
    for index in range {
        if stop.is_cancelled() {
            break;
        }
        if rate > 0.0 {
            let due = start + Duration::from_secs_f64(started as f64 / rate);
            if due > Instant::now() {
                tokio::select! {
                    () = tokio::time::sleep_until(due) => {}
                    () = stop.cancelled() => break,
                }
            }
        }
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break, // never closed
            },
            () = stop.cancelled() => break,
        };
        tracker.spawn(task(index, permit));
        started += 1;
    }
    tracker.close();
    started
}

/// The smaller of two optional values, or whichever is set.
pub(crate) fn min_some(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

pub(crate) fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn drop_one(a: &AtomicU64) {
    a.fetch_sub(1, Ordering::Relaxed);
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
