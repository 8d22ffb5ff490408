//! A log-linear latency histogram (HdrHistogram's bucket layout, no dependency):
//! constant memory, relative error under 0.4 %, exact min/max/count, mergeable and
//! serialisable so that worker processes can ship their raw data to the parent.

use serde::{Deserialize, Serialize};

/// Bits of precision per power of two: 2^(8-1) = 128 sub-buckets, so a bucket is at
/// most 1/128 of its value wide and the midpoint is within 0.4 % of any value in it.
const PRECISION_BITS: u32 = 8;
/// Sub-buckets per power of two in the logarithmic part.
const HALF: u64 = 1 << (PRECISION_BITS - 1);
/// Values below this are stored exactly, one bucket each.
const LINEAR_LIMIT: u64 = HALF * 2;
/// Number of buckets needed to cover every `u64` (the top power of two is 2^63).
pub const BUCKETS: usize = ((64 - PRECISION_BITS) as u64 * HALF + LINEAR_LIMIT) as usize;

/// Counts of `u64` values (the load generator records microseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram {
    /// Dense bucket counts, grown to the highest bucket used.
    counts: Vec<u64>,
    total: u64,
    min: u64,
    max: u64,
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

/// Index of the bucket holding `value`.
fn bucket_of(value: u64) -> usize {
    if value < LINEAR_LIMIT {
        return value as usize;
    }
    let msb = 63 - value.leading_zeros();
    let shift = msb - (PRECISION_BITS - 1);
    let mantissa = value >> shift;
    (u64::from(shift) * HALF + mantissa) as usize
}

/// Lowest and highest value that land in bucket `index` (`index < BUCKETS`).
fn bucket_bounds(index: usize) -> (u64, u64) {
    let index = index as u64;
    if index < LINEAR_LIMIT {
        return (index, index);
    }
    let shift = index / HALF - 1;
    let mantissa = index - shift * HALF;
    let low = mantissa << shift;
    (low, low + ((1u64 << shift) - 1))
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram {
            counts: Vec::new(),
            total: 0,
            min: u64::MAX,
            max: 0,
            sum: 0,
        }
    }

    /// Records one value.
    pub fn record(&mut self, value: u64) {
        self.record_n(value, 1);
    }

    /// Records `n` occurrences of `value`.
    pub fn record_n(&mut self, value: u64, n: u64) {
        if n == 0 {
            return;
        }
        let index = bucket_of(value);
        if self.counts.len() <= index {
            self.counts.resize(index + 1, 0);
        }
        self.counts[index] = self.counts[index].saturating_add(n);
        self.total = self.total.saturating_add(n);
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.sum = self.sum.saturating_add(u128::from(value) * u128::from(n));
    }

    /// Adds every value recorded in `other` (as if it had been recorded here).
    pub fn merge(&mut self, other: &Histogram) {
        if other.total == 0 {
            return;
        }
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine = mine.saturating_add(*theirs);
        }
        self.total = self.total.saturating_add(other.total);
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum = self.sum.saturating_add(other.sum);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    pub fn min(&self) -> Option<u64> {
        (self.total > 0).then_some(self.min)
    }

    pub fn max(&self) -> Option<u64> {
        (self.total > 0).then_some(self.max)
    }

    /// Exact arithmetic mean.
    pub fn mean(&self) -> Option<f64> {
        (self.total > 0).then(|| self.sum as f64 / self.total as f64)
    }

    /// The value at quantile `q` (0.0..=1.0; clamped): the smallest recorded value such
    /// that at least `q` of all values are at or below it, to within the bucket
    /// precision. `q = 0` gives the exact minimum, `q = 1` the exact maximum.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
        if q <= 0.0 {
            return Some(self.min);
        }
        if q >= 1.0 {
            return Some(self.max);
        }
        // Rank of the wanted value, 1-based: ceil(q * n), at least 1.
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0u64;
        for (index, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let (low, high) = bucket_bounds(index);
                let mid = low + (high - low) / 2;
                return Some(mid.clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }

    /// Non-empty buckets as `(lowest value, highest value, count)`, ascending.
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, &c)| {
                let (low, high) = bucket_bounds(i);
                (low, high, c)
            })
    }
}

/// Wire form: sparse `[bucket index, count]` pairs plus the exact aggregates.
#[derive(Serialize, Deserialize)]
struct HistogramData {
    /// Bucket layout version, so that a parent never merges foreign data.
    precision_bits: u32,
    count: u64,
    min: u64,
    max: u64,
    sum: u128,
    buckets: Vec<(usize, u64)>,
}

impl Serialize for Histogram {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        HistogramData {
            precision_bits: PRECISION_BITS,
            count: self.total,
            min: self.min().unwrap_or(0),
            max: self.max,
            sum: self.sum,
            buckets: self
                .counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, c)| (i, *c))
                .collect(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Histogram {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let data = HistogramData::deserialize(d)?;
        if data.precision_bits != PRECISION_BITS {
            return Err(D::Error::custom(format!(
                "histogram precision {} differs from ours ({PRECISION_BITS})",
                data.precision_bits
            )));
        }
        let mut h = Histogram::new();
        let mut total = 0u64;
        for (index, count) in data.buckets {
            if index >= BUCKETS {
                return Err(D::Error::custom(format!(
                    "histogram bucket {index} out of range"
                )));
            }
            if h.counts.len() <= index {
                h.counts.resize(index + 1, 0);
            }
            h.counts[index] = h.counts[index].saturating_add(count);
            total = total.saturating_add(count);
        }
        if total != data.count {
            return Err(D::Error::custom(format!(
                "histogram count {} does not match its buckets ({total})",
                data.count
            )));
        }
        if total > 0 {
            h.total = total;
            h.min = data.min;
            h.max = data.max;
            h.sum = data.sum;
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(actual: u64, expected: u64, rel: f64) -> bool {
        (actual as f64 - expected as f64).abs() <= expected as f64 * rel
    }

    #[test]
    fn bucket_layout_is_contiguous_and_covers_u64() {
        let mut previous_high = None;
        for index in 0..BUCKETS {
            let (low, high) = bucket_bounds(index);
            assert!(low <= high);
            if let Some(p) = previous_high {
                assert_eq!(low, p + 1, "gap before bucket {index}");
            }
            assert_eq!(bucket_of(low), index);
            assert_eq!(bucket_of(high), index);
            previous_high = Some(high);
        }
        assert_eq!(previous_high, Some(u64::MAX));
    }

    #[test]
    fn bucket_width_is_within_precision() {
        for v in [300u64, 1_000, 12_345, 1 << 20, 987_654_321, u64::MAX / 3] {
            let (low, high) = bucket_bounds(bucket_of(v));
            assert!(((high - low) as f64) <= low as f64 / HALF as f64, "{v}");
        }
    }

    #[test]
    fn empty_histogram_has_no_percentiles() {
        let h = Histogram::new();
        assert_eq!(h.quantile(0.5), None);
        assert_eq!(h.min(), None);
        assert_eq!(h.max(), None);
        assert_eq!(h.mean(), None);
    }

    #[test]
    fn small_values_are_exact() {
        let mut h = Histogram::new();
        for v in 1..=100 {
            h.record(v);
        }
        assert_eq!(h.quantile(0.5), Some(50));
        assert_eq!(h.quantile(0.9), Some(90));
        assert_eq!(h.quantile(0.99), Some(99));
        assert_eq!(h.quantile(1.0), Some(100));
        assert_eq!(h.quantile(0.0), Some(1));
        assert_eq!(h.mean(), Some(50.5));
    }

    #[test]
    fn uniform_distribution_percentiles() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v);
        }
        for (q, expected) in [
            (0.5, 50_000),
            (0.9, 90_000),
            (0.99, 99_000),
            (0.999, 99_900),
        ] {
            let got = h.quantile(q).unwrap();
            assert!(within(got, expected, 0.004), "q{q}: {got} vs {expected}");
        }
        assert_eq!(h.max(), Some(100_000));
        assert_eq!(h.count(), 100_000);
    }

    #[test]
    fn skewed_distribution_percentiles() {
        // 990 fast values at 1 ms and 10 slow ones at 1 s: p99 is fast, p99.9 is slow.
        let mut h = Histogram::new();
        h.record_n(1_000, 990);
        h.record_n(1_000_000, 10);
        assert!(within(h.quantile(0.5).unwrap(), 1_000, 0.004));
        assert!(within(h.quantile(0.99).unwrap(), 1_000, 0.004));
        assert!(within(h.quantile(0.999).unwrap(), 1_000_000, 0.004));
        assert_eq!(h.max(), Some(1_000_000));
    }

    #[test]
    fn constant_distribution_is_exact_after_clamping() {
        let mut h = Histogram::new();
        h.record_n(123_457, 1000);
        for q in [0.0, 0.5, 0.99, 1.0] {
            assert_eq!(h.quantile(q), Some(123_457));
        }
    }

    #[test]
    fn extreme_values_do_not_panic() {
        let mut h = Histogram::new();
        h.record(0);
        h.record(u64::MAX);
        assert_eq!(h.quantile(1.0), Some(u64::MAX));
        assert_eq!(h.quantile(0.0), Some(0));
        assert!(h.quantile(f64::NAN).is_some());
        assert!(h.quantile(7.0).is_some());
    }

    #[test]
    fn merge_equals_recording_everything_in_one() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        let mut all = Histogram::new();
        for v in 0..5_000u64 {
            let value = v * v % 77_777;
            if v % 3 == 0 { &mut a } else { &mut b }.record(value);
            all.record(value);
        }
        let mut merged = a.clone();
        merged.merge(&b);
        assert_eq!(merged, all);
        merged.merge(&Histogram::new());
        assert_eq!(merged, all);
        let mut empty = Histogram::new();
        empty.merge(&all);
        assert_eq!(empty, all);
    }

    #[test]
    fn serde_round_trip_and_validation() {
        let mut h = Histogram::new();
        for v in [5u64, 500, 5_000, 5_000_000] {
            h.record_n(v, 3);
        }
        let json = serde_json::to_string(&h).unwrap();
        let back: Histogram = serde_json::from_str(&json).unwrap();
        assert_eq!(back, h);
        let empty: Histogram =
            serde_json::from_str(&serde_json::to_string(&Histogram::new()).unwrap()).unwrap();
        assert_eq!(empty, Histogram::new());

        let bad_index =
            r#"{"precision_bits":8,"count":1,"min":1,"max":1,"sum":1,"buckets":[[999999,1]]}"#;
        assert!(serde_json::from_str::<Histogram>(bad_index).is_err());
        let bad_count =
            r#"{"precision_bits":8,"count":2,"min":1,"max":1,"sum":1,"buckets":[[1,1]]}"#;
        assert!(serde_json::from_str::<Histogram>(bad_count).is_err());
        let bad_precision =
            r#"{"precision_bits":3,"count":0,"min":0,"max":0,"sum":0,"buckets":[]}"#;
        assert!(serde_json::from_str::<Histogram>(bad_precision).is_err());
    }
}
