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
