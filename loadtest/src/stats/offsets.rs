//! Gap and duplicate detection over channel offsets, for the broadcast scenarios: one
//! tracker per subscriber connection records every offset it receives per channel (in
//! any order) and reports the offsets never seen and those seen more than once.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Most gap ranges listed per channel in a report; the totals always count them all.
pub const MAX_LISTED_GAPS: usize = 100;

/// Whether an offset was new to its channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    New,
    Duplicate,
}

/// Received offsets of one channel as disjoint, non-adjacent inclusive ranges.
#[derive(Debug, Clone, Default)]
struct ChannelOffsets {
    /// start -> end (inclusive); ranges never touch (they are merged when they do).
    ranges: BTreeMap<u64, u64>,
    received: u64,
    duplicates: u64,
    /// First offset the subscriber should have seen (e.g. from `subscribed.offset`).
    expected_first: Option<u64>,
    /// Last offset the subscriber should have seen (the publisher's last offset).
    expected_last: Option<u64>,
}

impl ChannelOffsets {
    fn record(&mut self, offset: u64) -> Seen {
        self.received += 1;
        if let Some((_, &end)) = self.ranges.range(..=offset).next_back()
            && end >= offset
        {
            self.duplicates += 1;
            return Seen::Duplicate;
        }
        // Join the range ending just before `offset` and/or the one starting just after.
        let before = offset
            .checked_sub(1)
            .and_then(|p| self.ranges.range(..=p).next_back().map(|(&s, &e)| (s, e)))
            .filter(|&(_, e)| e + 1 == offset)
            .map(|(s, _)| s);
        let after = offset
            .checked_add(1)
            .and_then(|n| self.ranges.get(&n).map(|&e| (n, e)));
        let start = before.unwrap_or(offset);
        let end = match after {
            Some((next_start, next_end)) => {
                self.ranges.remove(&next_start);
                next_end
            }
            None => offset,
        };
        self.ranges.insert(start, end);
        Seen::New
    }

    fn report(&self) -> ChannelReport {
        let first_seen = self.ranges.first_key_value().map(|(&s, _)| s);
        let last_seen = self.ranges.last_key_value().map(|(_, &e)| e);
        let lower = match (self.expected_first, first_seen) {
            (Some(x), Some(f)) => Some(x.min(f)),
            (x, f) => x.or(f),
        };
        let upper = match (self.expected_last, last_seen) {
            (Some(x), Some(l)) => Some(x.max(l)),
            (x, l) => x.or(l),
        };
        let mut gaps = Vec::new();
        let mut missing = 0u64;
        if let (Some(lower), Some(upper)) = (lower, upper) {
            // The lowest offset not yet accounted for; `None` once past u64::MAX.
            let mut next_expected = Some(lower);
            for (&start, &end) in &self.ranges {
                if let Some(n) = next_expected
                    && start > n
                {
                    push_gap(&mut gaps, &mut missing, n, start - 1);
                }
                // Ranges ascend and never touch, and `lower` is at most the first
                // start, so everything up to `end` is now accounted for.
                next_expected = end.checked_add(1);
            }
            if let Some(n) = next_expected
                && n <= upper
            {
                push_gap(&mut gaps, &mut missing, n, upper);
            }
        }
        let gap_count = gaps.len() as u64;
        ChannelReport {
            received: self.received,
            distinct: self.received - self.duplicates,
            duplicates: self.duplicates,
            missing,
            gap_count,
            first: first_seen,
            last: last_seen,
            gaps,
        }
    }
}

fn push_gap(gaps: &mut Vec<(u64, u64)>, missing: &mut u64, from: u64, to: u64) {
    *missing = missing.saturating_add(to - from + 1);
    gaps.push((from, to));
}

/// What one channel looked like to one subscriber.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelReport {
    /// Messages received, duplicates included.
    pub received: u64,
    /// Distinct offsets received.
    pub distinct: u64,
    /// Receipts of an offset already received.
    pub duplicates: u64,
    /// Offsets in the expected span never received.
    pub missing: u64,
    /// Number of missing ranges.
    pub gap_count: u64,
    pub first: Option<u64>,
    pub last: Option<u64>,
    /// Missing ranges (inclusive), at most [`MAX_LISTED_GAPS`] of them.
    pub gaps: Vec<(u64, u64)>,
}

/// Offsets received by one subscriber, per channel.
#[derive(Debug, Clone, Default)]
pub struct OffsetTracker {
    channels: BTreeMap<String, ChannelOffsets>,
}

impl OffsetTracker {
    pub fn new() -> OffsetTracker {
        OffsetTracker::default()
    }

    /// Records a received `offset` on `channel`.
    pub fn record(&mut self, channel: &str, offset: u64) -> Seen {
        match self.channels.get_mut(channel) {
            Some(c) => c.record(offset),
            None => self
                .channels
                .entry(channel.to_owned())
                .or_default()
                .record(offset),
        }
    }

    /// Declares the span of offsets `channel` should have delivered (either end may be
    /// unknown); offsets outside what was received but inside this span count as gaps.
    pub fn expect(&mut self, channel: &str, first: Option<u64>, last: Option<u64>) {
        let c = self.channels.entry(channel.to_owned()).or_default();
        if first.is_some() {
            c.expected_first = first;
        }
        if last.is_some() {
            c.expected_last = last;
        }
    }

    /// One report per channel.
    pub fn report(&self) -> BTreeMap<String, ChannelReport> {
        self.channels
            .iter()
            .map(|(name, c)| {
                let mut r = c.report();
                r.gaps.truncate(MAX_LISTED_GAPS);
                (name.clone(), r)
            })
            .collect()
    }

    /// Totals over every channel, ready to merge with other subscribers' totals.
    pub fn summary(&self) -> GapSummary {
        let mut s = GapSummary::default();
        for r in self.report().values() {
            s.add(r);
        }
        s
    }
}

/// Totals of gaps and duplicates over many subscribers and channels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GapSummary {
    pub streams: u64,
    pub received: u64,
    pub duplicates: u64,
    pub missing: u64,
    pub gap_count: u64,
    /// Streams with at least one gap or duplicate.
    pub streams_with_problems: u64,
}

impl GapSummary {
    pub fn add(&mut self, r: &ChannelReport) {
        self.streams += 1;
        self.received += r.received;
        self.duplicates += r.duplicates;
        self.missing += r.missing;
        self.gap_count += r.gap_count;
        if r.duplicates > 0 || r.missing > 0 {
            self.streams_with_problems += 1;
        }
    }

    pub fn merge(&mut self, other: &GapSummary) {
        self.streams += other.streams;
        self.received += other.received;
        self.duplicates += other.duplicates;
        self.missing += other.missing;
        self.gap_count += other.gap_count;
        self.streams_with_problems += other.streams_with_problems;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream_has_no_gaps() {
        let mut t = OffsetTracker::new();
        for o in 1..=1000 {
            assert_eq!(t.record("c:a", o), Seen::New);
        }
        let r = &t.report()["c:a"];
        assert_eq!(
            (r.received, r.distinct, r.duplicates, r.missing),
            (1000, 1000, 0, 0)
        );
        assert_eq!((r.first, r.last), (Some(1), Some(1000)));
        assert!(r.gaps.is_empty());
        // Contiguous receipt collapses into a single range.
        assert_eq!(t.channels["c:a"].ranges.len(), 1);
    }

    #[test]
    fn gaps_and_duplicates_are_found() {
        let mut t = OffsetTracker::new();
        for o in [1, 2, 3, 5, 6, 9, 3, 6, 6] {
            t.record("c:a", o);
        }
        let r = &t.report()["c:a"];
        assert_eq!(r.received, 9);
        assert_eq!(r.duplicates, 3);
        assert_eq!(r.distinct, 6);
        assert_eq!(r.gaps, vec![(4, 4), (7, 8)]);
        assert_eq!((r.missing, r.gap_count), (3, 2));
    }

    #[test]
    fn out_of_order_arrival_fills_gaps() {
        let mut t = OffsetTracker::new();
        for o in [5, 3, 1, 4, 2] {
            assert_eq!(t.record("c", o), Seen::New);
        }
        assert_eq!(t.record("c", 4), Seen::Duplicate);
        let r = &t.report()["c"];
        assert!(r.gaps.is_empty());
        assert_eq!(t.channels["c"].ranges.len(), 1);
    }

    #[test]
    fn expected_span_reveals_leading_and_trailing_gaps() {
        let mut t = OffsetTracker::new();
        t.expect("c", Some(10), Some(20));
        for o in [12, 13, 18] {
            t.record("c", o);
        }
        let r = &t.report()["c"];
        assert_eq!(r.gaps, vec![(10, 11), (14, 17), (19, 20)]);
        assert_eq!(r.missing, 8);

        // A channel expected but never received is one big gap.
        let mut silent = OffsetTracker::new();
        silent.expect("d", Some(1), Some(5));
        assert_eq!(silent.report()["d"].gaps, vec![(1, 5)]);
    }

    #[test]
    fn channels_are_independent_and_summaries_merge() {
        let mut a = OffsetTracker::new();
        a.record("x", 1);
        a.record("x", 3);
        a.record("y", 7);
        a.record("y", 7);
        let mut b = OffsetTracker::new();
        b.record("x", 1);
        b.record("x", 2);
        let mut total = a.summary();
        assert_eq!(total.streams, 2);
        assert_eq!(total.missing, 1);
        assert_eq!(total.duplicates, 1);
        assert_eq!(total.streams_with_problems, 2);
        total.merge(&b.summary());
        assert_eq!(total.streams, 3);
        assert_eq!(total.received, 6);
        assert_eq!(total.streams_with_problems, 2);
    }

    #[test]
    fn extreme_offsets_do_not_overflow() {
        let mut t = OffsetTracker::new();
        t.record("c", 0);
        t.record("c", u64::MAX);
        t.record("c", u64::MAX);
        let r = &t.report()["c"];
        assert_eq!(r.duplicates, 1);
        assert_eq!(r.gaps, vec![(1, u64::MAX - 1)]);
    }

    #[test]
    fn gap_listing_is_bounded() {
        let mut t = OffsetTracker::new();
        for o in (0..1000).map(|i| i * 2) {
            t.record("c", o);
        }
        let r = &t.report()["c"];
        assert_eq!(r.gap_count, 999);
        assert_eq!(r.gaps.len(), MAX_LISTED_GAPS);
    }
}
