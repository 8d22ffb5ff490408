//! Rate limits: the per-connection message bucket (with a strike bucket that decides
//! when a client is abusive rather than bursty) and the per-address connect limiter
//! of this node.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A client refused this many more connects than its burst, within a refill of the
/// bucket, is flooding: it gets HTTP 429 without an upgrade (PROTOCOL.md section 1).
pub const FLOOD_FACTOR: f64 = 4.0;
/// Rejected frames tolerated before a connection is closed 4029: a client that keeps
/// sending after this many `RATE_LIMITED` errors is ignoring them.
pub const STRIKES: f64 = 20.0;
/// Strikes forgiven per second, so an occasional burst never adds up to a close.
pub const STRIKE_REFILL_PER_SEC: f64 = 1.0;
/// Addresses tracked by the connect limiter before idle ones are swept: bounds memory
/// under a spoofing-free flood from many addresses.
pub const MAX_TRACKED_ADDRESSES: usize = 100_000;

/// A token bucket. `tokens` may go below zero to remember how far past the limit a
/// caller went (the connect limiter uses that debt to tell a flood from a burst).
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    capacity: f64,
    per_sec: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(per_sec: f64, capacity: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: capacity,
            capacity,
            per_sec,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.per_sec).min(self.capacity);
        self.last = now;
    }

    /// Takes one token if available.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Time until one token is available again.
    pub fn wait_time(&self) -> Duration {
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec)
        }
    }

    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.capacity
    }
}

/// What to do with one client frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageVerdict {
    Allow,
    /// Refuse this frame with `RATE_LIMITED`; retry after the given time.
    Limited(Duration),
    /// The client ignores rate-limit errors: close 4029.
    Abusive(Duration),
}

/// Per-connection frame limiter.
#[derive(Debug, Clone)]
pub struct MessageLimiter {
    frames: Bucket,
    strikes: Bucket,
}

impl MessageLimiter {
    pub fn new(rate: u32, burst: u32, now: Instant) -> MessageLimiter {
        MessageLimiter {
            frames: Bucket::new(f64::from(rate), f64::from(burst), now),
            strikes: Bucket::new(STRIKE_REFILL_PER_SEC, STRIKES, now),
        }
    }

    pub fn check(&mut self, now: Instant) -> MessageVerdict {
        if self.frames.try_take(now) {
            return MessageVerdict::Allow;
        }
        let wait = self.frames.wait_time().max(Duration::from_millis(1));
        if self.strikes.try_take(now) {
            MessageVerdict::Limited(wait)
        } else {
            MessageVerdict::Abusive(wait)
        }
    }
}

/// What to do with a new connection from one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectVerdict {
    Allow,
    /// Upgrade, send `RATE_LIMITED`, close 4029.
    Limited(Duration),
    /// Far past the limit: HTTP 429 with `Retry-After`, no upgrade.
    Flood(Duration),
}

/// Per-address connect limiter for this node.
#[derive(Debug)]
pub struct ConnectLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl ConnectLimiter {
    pub fn new(rate: u32, burst: u32) -> ConnectLimiter {
        ConnectLimiter {
            rate: f64::from(rate),
            burst: f64::from(burst),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn check(&self, ip: IpAddr, now: Instant) -> ConnectVerdict {
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_TRACKED_ADDRESSES && !map.contains_key(&ip) {
            map.retain(|_, b| !b.is_full(now));
        }
        let b = map
            .entry(ip)
            .or_insert_with(|| Bucket::new(self.rate, self.burst, now));
        if b.try_take(now) {
            return ConnectVerdict::Allow;
        }
        // Keep counting refused attempts as debt, bounded so a flood that stops is
        // forgiven within a few seconds.
        let floor = -self.burst * FLOOD_FACTOR;
        b.tokens = (b.tokens - 1.0).max(floor - 1.0);
        let wait = b.wait_time().max(Duration::from_millis(1));
        if b.tokens <= floor {
            ConnectVerdict::Flood(wait)
        } else {
            ConnectVerdict::Limited(wait)
        }
    }

    /// Drops addresses whose bucket is full again (they are indistinguishable from new).
    pub fn sweep(&self, now: Instant) {
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, b| !b.is_full(now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_limiter_limits_then_closes_abusers() {
        let t0 = Instant::now();
        let mut l = MessageLimiter::new(10, 10, t0);
        for _ in 0..10 {
            assert_eq!(l.check(t0), MessageVerdict::Allow);
        }
        let mut limited = 0;
        loop {
            match l.check(t0) {
                MessageVerdict::Limited(d) => {
                    assert!(d > Duration::ZERO);
                    limited += 1
                }
                MessageVerdict::Abusive(_) => break,
                MessageVerdict::Allow => panic!("bucket should be empty"),
            }
        }
        assert_eq!(limited, STRIKES as usize);
        // A second later the bucket has refilled.
        assert_eq!(l.check(t0 + Duration::from_secs(1)), MessageVerdict::Allow);
    }

    #[test]
    fn connect_limiter_escalates_to_flood() {
        let t0 = Instant::now();
        let l = ConnectLimiter::new(5, 5);
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let other: IpAddr = "10.1.2.4".parse().unwrap();
        for _ in 0..5 {
            assert_eq!(l.check(ip, t0), ConnectVerdict::Allow);
        }
        assert!(matches!(l.check(ip, t0), ConnectVerdict::Limited(_)));
        let mut n = 0;
        while !matches!(l.check(ip, t0), ConnectVerdict::Flood(_)) {
            n += 1;
            assert!(n < 100);
        }
        assert_eq!(l.check(other, t0), ConnectVerdict::Allow);
        // The debt is bounded: a flood that stops is forgiven.
        assert_eq!(
            l.check(ip, t0 + Duration::from_secs(10)),
            ConnectVerdict::Allow
        );
        l.sweep(t0 + Duration::from_secs(60));
        assert!(l.buckets.lock().unwrap().is_empty());
    }
}
