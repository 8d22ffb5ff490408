//! A latency histogram: the `hdrhistogram` crate plus the exact min, max and sum it
//! does not keep, mergeable and serialisable so that worker processes can ship their
//! raw data to the parent.

use hdrhistogram::Histogram as Hdr;
use serde::{Deserialize, Serialize};

/// Two significant digits give 256 sub-buckets per power of two: a bucket is at most
/// 1/128 of its value wide, so the midpoint is within 0.4 % of any value in it.
const SIGNIFICANT_DIGITS: u8 = 2;
/// The same layout as bits: the wire form's bucket indices and its version number.
const PRECISION_BITS: u32 = 8;
/// Sub-buckets per power of two in the logarithmic part.
const HALF: u64 = 1 << (PRECISION_BITS - 1);
/// Values below this are stored exactly, one bucket each.
const LINEAR_LIMIT: u64 = HALF * 2;
/// Number of buckets needed to cover every `u64` (the top power of two is 2^63).
const BUCKETS: usize = ((64 - PRECISION_BITS) as u64 * HALF + LINEAR_LIMIT) as usize;

/// Counts of `u64` values (the load generator records microseconds).
#[derive(Debug, Clone)]
pub struct Histogram {
    /// Auto-resizing, so memory grows only to the highest value recorded.
    hdr: Hdr<u64>,
    min: u64,
    max: u64,
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl PartialEq for Histogram {
    /// Same values recorded, whatever size each side's counts grew to.
    fn eq(&self, other: &Histogram) -> bool {
        self.count() == other.count()
            && self.min() == other.min()
            && self.max() == other.max()
            && self.sum == other.sum
            && self.buckets().eq(other.buckets())
    }
}

impl Eq for Histogram {}

/// Index of the bucket holding `value` in the wire form (HdrHistogram's counts index).
fn bucket_of(value: u64) -> usize {
    if value < LINEAR_LIMIT {
        return value as usize;
    }
    let msb = 63 - value.leading_zeros();
    let shift = msb - (PRECISION_BITS - 1);
    (u64::from(shift) * HALF + (value >> shift)) as usize
}

/// Lowest value that lands in bucket `index` (`index < BUCKETS`).
fn bucket_low(index: usize) -> u64 {
    let index = index as u64;
    if index < LINEAR_LIMIT {
        return index;
    }
    let shift = index / HALF - 1;
    (index - shift * HALF) << shift
}

/// Counts `n` at `value`, growing the counts as needed (the clamping record of the
/// crate does not grow them); past what they can ever index, the top bucket takes it.
fn count_into(hdr: &mut Hdr<u64>, value: u64, n: u64) {
    if hdr.record_n(value, n).is_err() {
        hdr.saturating_record_n(value, n);
    }
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram {
            hdr: Hdr::new(SIGNIFICANT_DIGITS).expect("2 significant digits is a valid precision"),
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
        count_into(&mut self.hdr, value, n);
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.sum = self.sum.saturating_add(u128::from(value) * u128::from(n));
    }

    /// Adds every value recorded in `other` (as if it had been recorded here).
    pub fn merge(&mut self, other: &Histogram) {
        if other.is_empty() {
            return;
        }
        for (low, _, count) in other.buckets() {
            count_into(&mut self.hdr, low, count);
        }
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum = self.sum.saturating_add(other.sum);
    }

    pub fn count(&self) -> u64 {
        self.hdr.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hdr.is_empty()
    }

    pub fn min(&self) -> Option<u64> {
        (!self.is_empty()).then_some(self.min)
    }

    pub fn max(&self) -> Option<u64> {
        (!self.is_empty()).then_some(self.max)
    }

    /// Exact arithmetic mean.
    pub fn mean(&self) -> Option<f64> {
        (!self.is_empty()).then(|| self.sum as f64 / self.count() as f64)
    }

    /// The value at quantile `q` (0.0..=1.0; clamped): the smallest recorded value such
    /// that at least `q` of all values are at or below it, to within the bucket
    /// precision (its midpoint). `q = 0` gives the exact minimum, `q = 1` the maximum.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.is_empty() {
            return None;
        }
        let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
        if q <= 0.0 {
            return Some(self.min);
        }
        if q >= 1.0 {
            return Some(self.max);
        }
        let value = self.hdr.value_at_quantile(q);
        Some(self.hdr.median_equivalent(value).clamp(self.min, self.max))
    }

    /// Non-empty buckets as `(lowest value, highest value, count)`, ascending.
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.hdr.iter_recorded().map(|v| {
            let value = v.value_iterated_to();
            (
                self.hdr.lowest_equivalent(value),
                self.hdr.highest_equivalent(value),
                v.count_at_value(),
            )
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
            count: self.count(),
            min: self.min().unwrap_or(0),
            max: self.max,
            sum: self.sum,
            buckets: self
                .buckets()
                .map(|(low, _, count)| (bucket_of(low), count))
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
        for (index, count) in data.buckets {
            if index >= BUCKETS {
                return Err(D::Error::custom(format!(
                    "histogram bucket {index} out of range"
                )));
            }
            count_into(&mut h.hdr, bucket_low(index), count);
        }
        if h.count() != data.count {
            return Err(D::Error::custom(format!(
                "histogram count {} does not match its buckets ({})",
                data.count,
                h.count()
            )));
        }
        if !h.is_empty() {
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
    fn wire_indices_match_the_buckets() {
        let mut h = Histogram::new();
        for v in [0u64, 1, 255, 256, 257, 1_000, 12_345, 1 << 20, 987_654_321] {
            h.record(v);
        }
        for (low, high, _) in h.buckets() {
            assert_eq!(bucket_low(bucket_of(low)), low);
            assert_eq!(bucket_of(high), bucket_of(low));
            assert!(((high - low) as f64) <= low as f64 / HALF as f64, "{low}");
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
