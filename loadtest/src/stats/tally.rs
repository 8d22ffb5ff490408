//! Counts by label (failure reasons, close codes, limits hit), mergeable across workers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Most distinct labels kept: reasons come from a small fixed vocabulary plus codes, so
/// more means something is generating unbounded labels; the rest are folded together.
pub const MAX_LABELS: usize = 256;
/// Label that collects counts once [`MAX_LABELS`] is reached.
pub const OVERFLOW_LABEL: &str = "(other)";

/// Occurrences per label.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Tally {
    counts: BTreeMap<String, u64>,
}

impl Tally {
    pub fn new() -> Tally {
        Tally::default()
    }

    pub fn add(&mut self, label: &str, n: u64) {
        if n == 0 {
            return;
        }
        let key = if self.counts.contains_key(label) || self.counts.len() < MAX_LABELS {
            label
        } else {
            OVERFLOW_LABEL
        };
        match self.counts.get_mut(key) {
            Some(c) => *c = c.saturating_add(n),
            None => {
                self.counts.insert(key.to_owned(), n);
            }
        }
    }

    pub fn merge(&mut self, other: &Tally) {
        for (label, n) in &other.counts {
            self.add(label, *n);
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    pub fn get(&self, label: &str) -> u64 {
        self.counts.get(label).copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Labels by descending count (ties by label).
    pub fn by_count(&self) -> Vec<(&str, u64)> {
        let mut v: Vec<(&str, u64)> = self.counts.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_merge_and_sort() {
        let mut a = Tally::new();
        a.add("close 1013", 2);
        a.add("http 429", 5);
        a.add("ignored", 0);
        let mut b = Tally::new();
        b.add("close 1013", 4);
        a.merge(&b);
        assert_eq!(a.get("close 1013"), 6);
        assert_eq!(a.total(), 11);
        assert_eq!(a.by_count(), vec![("close 1013", 6), ("http 429", 5)]);
        assert_eq!(a.get("ignored"), 0);
    }

    #[test]
    fn labels_are_bounded() {
        let mut t = Tally::new();
        for i in 0..(MAX_LABELS + 10) {
            t.add(&format!("reason {i}"), 1);
        }
        assert_eq!(t.get(OVERFLOW_LABEL), 10);
        assert_eq!(t.total(), (MAX_LABELS + 10) as u64);
    }
}
