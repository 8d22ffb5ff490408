//! Time series in fixed slots since a shared run epoch: event counts (connects,
//! failures, drops) from which rates over any window are derived, sampled gauges
//! (open connections), and a histogram per slot (delivery latency second by second).
//! All merge across workers slot by slot.

use serde::{Deserialize, Serialize};

use super::histogram::Histogram;

/// Slot width of every series: one second, the resolution of the progress line and
/// of the report's plots.
pub const SLOT_MS: u64 = 1000;
/// Longest series kept (one day of one-second slots): bounds memory and what a worker
/// can make the parent allocate.
pub const MAX_SLOTS: usize = 86_400;

/// Index of the slot holding `elapsed_ms`, capped at the last slot.
fn slot_of(elapsed_ms: u64) -> usize {
    usize::try_from(elapsed_ms / SLOT_MS).map_or(MAX_SLOTS - 1, |s| s.min(MAX_SLOTS - 1))
}

/// Counts of events per slot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventSeries {
    counts: Vec<u64>,
}

impl EventSeries {
    pub fn new() -> EventSeries {
        EventSeries::default()
    }

    /// Records `n` events at `elapsed_ms` since the run epoch.
    pub fn record(&mut self, elapsed_ms: u64, n: u64) {
        let slot = slot_of(elapsed_ms);
        if self.counts.len() <= slot {
            self.counts.resize(slot + 1, 0);
        }
        self.counts[slot] = self.counts[slot].saturating_add(n);
    }

    /// Adds `other` slot by slot.
    pub fn merge(&mut self, other: &EventSeries) {
        let other_len = other.counts.len().min(MAX_SLOTS);
        if self.counts.len() < other_len {
            self.counts.resize(other_len, 0);
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine = mine.saturating_add(*theirs);
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Events per slot.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// Average rate in events per second over the slots `[from, to)`.
    pub fn rate(&self, from: usize, to: usize) -> f64 {
        if to <= from {
            return 0.0;
        }
        let end = to.min(self.counts.len());
        let events: u64 = self.counts.get(from..end).map_or(0, |s| s.iter().sum());
        events as f64 * 1000.0 / ((to - from) as f64 * SLOT_MS as f64)
    }

    /// Highest average rate (events per second) over any `window` consecutive slots.
    pub fn peak_rate(&self, window: usize) -> f64 {
        let window = window.max(1);
        if self.counts.is_empty() {
            return 0.0;
        }
        if self.counts.len() <= window {
            return self.rate(0, window);
        }
        let mut sum: u64 = self.counts[..window].iter().sum();
        let mut best = sum;
        for i in window..self.counts.len() {
            sum = sum + self.counts[i] - self.counts[i - window];
            best = best.max(sum);
        }
        best as f64 * 1000.0 / (window as f64 * SLOT_MS as f64)
    }

    /// The first and last slot holding events, if any.
    pub fn active_span(&self) -> Option<(usize, usize)> {
        let first = self.counts.iter().position(|&c| c > 0)?;
        let last = self.counts.iter().rposition(|&c| c > 0)?;
        Some((first, last))
    }
}

/// A sampled level per slot: the level at the slot's start, i.e. the first sample taken
/// in the slot (samplers tick on slot boundaries). Slots without a sample carry the
/// previous level forward; before the first sample the level is 0.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GaugeSeries {
    samples: Vec<Option<u64>>,
}

impl GaugeSeries {
    pub fn new() -> GaugeSeries {
        GaugeSeries::default()
    }

    /// Records the level `value` at `elapsed_ms`, unless its slot already has one.
    pub fn sample(&mut self, elapsed_ms: u64, value: u64) {
        let slot = slot_of(elapsed_ms);
        if self.samples.len() <= slot {
            self.samples.resize(slot + 1, None);
        }
        self.samples[slot].get_or_insert(value);
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The level in every slot, gaps filled forward.
    pub fn levels(&self) -> Vec<u64> {
        let mut last = 0;
        self.samples
            .iter()
            .map(|s| {
                if let Some(v) = s {
                    last = *v;
                }
                last
            })
            .collect()
    }

    /// The highest level seen.
    pub fn peak(&self) -> u64 {
        self.samples.iter().flatten().copied().max().unwrap_or(0)
    }

    /// Adds the levels of two series (for additive gauges such as open connections held
    /// by several workers): each side's level, gaps filled forward, past its end its
    /// last level.
    pub fn merge(&mut self, other: &GaugeSeries) {
        let len = self.samples.len().max(other.samples.len()).min(MAX_SLOTS);
        let mine = extend_forward(self.levels(), len);
        let theirs = extend_forward(other.levels(), len);
        self.samples = mine
            .iter()
            .zip(&theirs)
            .map(|(a, b)| Some(a.saturating_add(*b)))
            .collect();
    }
}

/// A histogram per slot: the distribution of values recorded in each second (delivery
/// latency), from which per-second percentiles, per-second counts and the distribution
/// over any window follow. Slots without values hold an empty histogram.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HistogramSeries {
    slots: Vec<Histogram>,
}

impl HistogramSeries {
    pub fn new() -> HistogramSeries {
        HistogramSeries::default()
    }

    fn slot_mut(&mut self, elapsed_ms: u64) -> &mut Histogram {
        let slot = slot_of(elapsed_ms);
        if self.slots.len() <= slot {
            self.slots.resize_with(slot + 1, Histogram::new);
        }
        &mut self.slots[slot]
    }

    /// Records `value` at `elapsed_ms` since the run epoch.
    pub fn record(&mut self, elapsed_ms: u64, value: u64) {
        self.slot_mut(elapsed_ms).record(value);
    }

    /// Adds a whole histogram of values recorded at `elapsed_ms`.
    pub fn add(&mut self, elapsed_ms: u64, values: &Histogram) {
        if !values.is_empty() {
            self.slot_mut(elapsed_ms).merge(values);
        }
    }

    /// Adds `other` slot by slot.
    pub fn merge(&mut self, other: &HistogramSeries) {
        let other_len = other.slots.len().min(MAX_SLOTS);
        if self.slots.len() < other_len {
            self.slots.resize_with(other_len, Histogram::new);
        }
        for (mine, theirs) in self.slots.iter_mut().zip(&other.slots) {
            mine.merge(theirs);
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The histogram of slot `index` (empty past the end).
    pub fn slot(&self, index: usize) -> Histogram {
        self.slots.get(index).cloned().unwrap_or_default()
    }

    /// Everything recorded, in one histogram.
    pub fn total(&self) -> Histogram {
        self.window(0, self.slots.len())
    }

    /// Everything recorded in slots `[from, to)`.
    pub fn window(&self, from: usize, to: usize) -> Histogram {
        let mut h = Histogram::new();
        for s in self.slots.iter().take(to).skip(from) {
            h.merge(s);
        }
        h
    }

    /// Values recorded per slot, as an event series.
    pub fn counts(&self) -> EventSeries {
        EventSeries {
            counts: self.slots.iter().map(Histogram::count).collect(),
        }
    }

    /// Quantile `q` of each slot (`None` for a slot without values).
    pub fn quantiles(&self, q: f64) -> Vec<Option<u64>> {
        self.slots.iter().map(|h| h.quantile(q)).collect()
    }
}

fn extend_forward(mut levels: Vec<u64>, len: usize) -> Vec<u64> {
    let last = levels.last().copied().unwrap_or(0);
    levels.resize(len, last);
    levels.truncate(len);
    levels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_land_in_their_slots() {
        let mut s = EventSeries::new();
        s.record(0, 1);
        s.record(999, 1);
        s.record(1000, 5);
        s.record(3500, 2);
        assert_eq!(s.counts(), &[2, 5, 0, 2]);
        assert_eq!(s.total(), 9);
        assert_eq!(s.active_span(), Some((0, 3)));
    }

    #[test]
    fn rates_over_windows() {
        let mut s = EventSeries::new();
        for slot in 0..10u64 {
            s.record(slot * 1000, 100 * (slot + 1)); // 100, 200, ..., 1000 per second
        }
        assert_eq!(s.rate(0, 10), 550.0);
        assert_eq!(s.rate(9, 10), 1000.0);
        assert_eq!(s.rate(8, 12), 475.0); // slots past the end count as empty
        assert_eq!(s.rate(5, 5), 0.0);
        assert_eq!(s.peak_rate(1), 1000.0);
        assert_eq!(s.peak_rate(2), 950.0);
        assert_eq!(s.peak_rate(100), 55.0);
        assert_eq!(EventSeries::new().peak_rate(1), 0.0);
    }

    #[test]
    fn event_series_merge_adds_slotwise() {
        let mut a = EventSeries::new();
        a.record(0, 1);
        let mut b = EventSeries::new();
        b.record(0, 2);
        b.record(2000, 3);
        a.merge(&b);
        assert_eq!(a.counts(), &[3, 0, 3]);
    }

    #[test]
    fn far_future_events_are_capped() {
        let mut s = EventSeries::new();
        s.record(u64::MAX, 1);
        assert_eq!(s.counts().len(), MAX_SLOTS);
        assert_eq!(s.total(), 1);
    }

    #[test]
    fn histogram_series_keeps_each_second_apart() {
        let mut a = HistogramSeries::new();
        a.record(100, 1_000);
        a.record(900, 3_000);
        a.record(2_500, 50_000);
        assert_eq!(a.len(), 3);
        assert_eq!(a.counts().counts(), &[2, 0, 1]);
        assert_eq!(a.quantiles(1.0), vec![Some(3_000), None, Some(50_000)]);
        assert_eq!(a.slot(1).count(), 0);
        assert_eq!(a.slot(99).count(), 0);

        let mut b = HistogramSeries::new();
        let mut burst = Histogram::new();
        burst.record_n(2_000, 4);
        b.add(1_200, &burst);
        b.add(1_300, &Histogram::new());
        b.record(4_000, 7);
        a.merge(&b);
        assert_eq!(a.counts().counts(), &[2, 4, 1, 0, 1]);
        let total = a.total();
        assert_eq!(total.count(), 8);
        assert_eq!((total.min(), total.max()), (Some(7), Some(50_000)));
        assert_eq!(a.window(1, 2).count(), 4);
        assert_eq!(a.window(3, 100).count(), 1);

        // It survives the trip from a worker process.
        let back: HistogramSeries =
            serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn histogram_series_is_capped() {
        let mut s = HistogramSeries::new();
        s.record(u64::MAX, 1);
        assert_eq!(s.len(), MAX_SLOTS);
        assert_eq!(s.total().count(), 1);
    }

    #[test]
    fn gauges_fill_forward_and_merge_additively() {
        let mut a = GaugeSeries::new();
        a.sample(0, 10);
        a.sample(2000, 30);
        assert_eq!(a.levels(), vec![10, 10, 30]);
        let mut b = GaugeSeries::new();
        b.sample(1000, 5);
        b.sample(1500, 7); // the first sample in a slot wins
        b.sample(4000, 0);
        a.merge(&b);
        // a: 10 10 30 30 30 (last level held); b: 0 5 5 5 0
        assert_eq!(a.levels(), vec![10, 15, 35, 35, 30]);
        assert_eq!(a.peak(), 35);
    }
}
