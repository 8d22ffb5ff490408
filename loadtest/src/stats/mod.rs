//! The load generator's own statistics: latency histograms, time series and rates,
//! counts by reason, offset gap/duplicate detection, sharded recording and growth
//! trends. Everything that crosses processes merges, so a worker process can ship its
//! state to the parent and the parent can sum them.

pub mod histogram;
pub mod offsets;
pub mod series;
pub mod shards;
pub mod tally;
pub mod trend;

pub use histogram::Histogram;
pub use offsets::{GapSummary, OffsetTracker};
pub use series::{EventSeries, GaugeSeries, HistogramSeries};
pub use shards::Shards;
pub use tally::Tally;
pub use trend::Trend;

use std::sync::atomic::{AtomicU64, Ordering};

/// One more of a live count (open connections, streams in flight).
pub(crate) fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// One fewer of a live count.
pub(crate) fn drop_one(a: &AtomicU64) {
    a.fetch_sub(1, Ordering::Relaxed);
}
