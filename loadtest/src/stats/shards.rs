//! Statistics many tasks record into at once: one value per shard, each behind its own
//! lock, a task picking its shard by a key (its connection index), so that the
//! runtime's threads rarely wait on one another; readers merge the shards.

use std::sync::{Mutex, MutexGuard};

/// `n` independently locked values of `T`.
#[derive(Debug)]
pub struct Shards<T> {
    shards: Vec<Mutex<T>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking recorder leaves numbers, not broken invariants: keep them.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T: Default> Shards<T> {
    /// `n` shards (at least one).
    pub fn new(n: usize) -> Shards<T> {
        Shards {
            shards: (0..n.max(1)).map(|_| Mutex::new(T::default())).collect(),
        }
    }

    /// Runs `f` on the shard of `key`.
    pub fn with<R>(&self, key: u64, f: impl FnOnce(&mut T) -> R) -> R {
        let i = (key % self.shards.len() as u64) as usize;
        f(&mut lock(&self.shards[i]))
    }

    /// Folds every shard into `acc` with `f`, without emptying them.
    pub fn fold<A>(&self, mut acc: A, mut f: impl FnMut(&mut A, &T)) -> A {
        for s in &self.shards {
            f(&mut acc, &lock(s));
        }
        acc
    }

    /// Empties every shard, returning what they held.
    pub fn take_all(&self) -> Vec<T> {
        self.shards
            .iter()
            .map(|s| std::mem::take(&mut *lock(s)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_spread_and_everything_is_folded_and_taken() {
        let s: Shards<Vec<u64>> = Shards::new(4);
        for key in 0..10u64 {
            s.with(key, |v| v.push(key));
        }
        assert_eq!(s.with(5, |v| v.clone()), vec![1, 5, 9]);
        let total = s.fold(0u64, |acc, v| *acc += v.iter().sum::<u64>());
        assert_eq!(total, 45);
        let taken = s.take_all();
        assert_eq!(taken.iter().map(Vec::len).sum::<usize>(), 10);
        assert_eq!(s.fold(0usize, |acc, v| *acc += v.len()), 0);
        assert_eq!(Shards::<u64>::new(0).take_all().len(), 1);
    }
}
