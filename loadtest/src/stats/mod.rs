//! The load generator's own statistics: latency histograms, time series and rates,
//! counts by reason, and offset gap/duplicate detection. Everything here merges, so a
//! worker process can ship its state to the parent and the parent can sum them.

pub mod histogram;
pub mod offsets;
pub mod series;
pub mod tally;

pub use histogram::Histogram;
pub use offsets::{GapSummary, OffsetTracker};
pub use series::{EventSeries, GaugeSeries, HistogramSeries};
pub use tally::Tally;
