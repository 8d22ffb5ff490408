//! A circuit breaker for the team backend: closed (calls go through) until
//! `failures` calls in a row fail, then open (no calls) for `cooldown`, then
//! half-open: exactly one probe call; its success closes the breaker, its failure
//! opens it for another cooldown. Time is passed in, so the rules are unit-tested
//! without sleeping.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// The breaker's state, as the metrics gauge reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// Gauge value: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::Open => 1.0,
            BreakerState::HalfOpen => 2.0,
        }
    }
}

#[derive(Debug)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

/// Shared breaker; cheap to clone.
#[derive(Debug, Clone)]
pub struct Breaker {
    inner: Arc<Mutex<Inner>>,
    threshold: u32,
    cooldown: Duration,
}

/// Permission for one call. Report its outcome with [`Permit::success`] or
/// [`Permit::failure`]; a permit dropped without either (the call was abandoned)
/// counts as a failure, so a half-open probe can never wedge the breaker.
#[derive(Debug)]
pub struct Permit {
    breaker: Breaker,
    probe: bool,
    reported: bool,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        let b = Breaker {
            inner: Arc::new(Mutex::new(Inner::Closed { failures: 0 })),
            threshold: threshold.max(1),
            cooldown,
        };
        b.publish(BreakerState::Closed);
        b
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen => BreakerState::HalfOpen,
        }
    }

    /// A permit to call the backend now, or `None` while open (or while the
    /// half-open probe is out).
    pub fn try_call(&self, now: Instant) -> Option<Permit> {
        let mut inner = self.lock();
        let probe = match *inner {
            Inner::Closed { .. } => false,
            Inner::Open { until } if now >= until => {
                *inner = Inner::HalfOpen;
                true
            }
            Inner::Open { .. } | Inner::HalfOpen => return None,
        };
        drop(inner);
        if probe {
            self.publish(BreakerState::HalfOpen);
        }
        Some(Permit {
            breaker: self.clone(),
            probe,
            reported: false,
        })
    }

    fn on_success(&self) {
        let mut inner = self.lock();
        let was_closed = matches!(*inner, Inner::Closed { .. });
        *inner = Inner::Closed { failures: 0 };
        drop(inner);
        if !was_closed {
            tracing::info!("team backend recovered; circuit breaker closed");
            self.publish(BreakerState::Closed);
        }
    }

    fn on_failure(&self, probe: bool, now: Instant) {
        let mut inner = self.lock();
        let open = match *inner {
            Inner::Closed { failures } if failures + 1 >= self.threshold => true,
            Inner::Closed { failures } => {
                *inner = Inner::Closed {
                    failures: failures + 1,
                };
                false
            }
            // Only the probe's failure re-opens; stragglers from before do not extend it.
            Inner::HalfOpen => probe,
            Inner::Open { .. } => false,
        };
        if open {
            *inner = Inner::Open {
                until: now + self.cooldown,
            };
        }
        drop(inner);
        if open {
            tracing::warn!(
                cooldown_ms = self.cooldown.as_millis() as u64,
                "team backend failing; circuit breaker open"
            );
            self.publish(BreakerState::Open);
        }
    }

    fn publish(&self, state: BreakerState) {
        metrics::gauge!(shared::metrics::WORKER_BREAKER_STATE).set(state.gauge());
    }
}

impl Permit {
    pub fn success(mut self) {
        self.reported = true;
        self.breaker.on_success();
    }

    pub fn failure(mut self, now: Instant) {
        self.reported = true;
        self.breaker.on_failure(self.probe, now);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.reported {
            self.breaker.on_failure(self.probe, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOL: Duration = Duration::from_secs(10);

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = Breaker::new(3, COOL);
        let t = Instant::now();
        b.try_call(t).unwrap().failure(t);
        b.try_call(t).unwrap().failure(t);
        b.try_call(t).unwrap().success();
        b.try_call(t).unwrap().failure(t);
        b.try_call(t).unwrap().failure(t);
        assert_eq!(b.state(), BreakerState::Closed);
        b.try_call(t).unwrap().failure(t);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.try_call(t + COOL / 2).is_none());
    }

    #[test]
    fn half_open_lets_one_probe_through() {
        let b = Breaker::new(1, COOL);
        let t = Instant::now();
        b.try_call(t).unwrap().failure(t);
        let later = t + COOL;
        let probe = b.try_call(later).expect("probe after cooldown");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.try_call(later).is_none(), "only one probe");
        probe.failure(later);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.try_call(later + COOL / 2).is_none());
        let probe = b.try_call(later + COOL).unwrap();
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.try_call(later + COOL).is_some());
    }

    #[test]
    fn an_abandoned_probe_counts_as_failure() {
        let b = Breaker::new(1, COOL);
        let t = Instant::now();
        b.try_call(t).unwrap().failure(t);
        drop(b.try_call(t + COOL).unwrap());
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn late_failures_from_before_the_open_do_not_extend_it() {
        let b = Breaker::new(1, COOL);
        let t = Instant::now();
        let straggler = b.try_call(t).unwrap();
        b.try_call(t).unwrap().failure(t);
        straggler.failure(t + COOL / 2);
        // Still opens at t + COOL, not t + 1.5 COOL.
        assert!(b.try_call(t + COOL).is_some());
    }
}
