//! Rate limits: the per-connection message bucket (with a strike bucket that decides
//! when a client is abusive rather than bursty), the per-address connect limiter of
//! this node, and the per-address limiter of failed API-key attempts.
//!
//! Per-address limits key IPv6 clients by their /64 ([`address_key`]): one host
//! usually holds a whole /64 and can pick a fresh address in it per connection.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
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

/// Prefix length that names one IPv6 client: a /64 is the smallest block a site or a
/// device is normally given (RFC 6177), so every address inside it is one client.
pub const IPV6_CLIENT_PREFIX: u32 = 64;
/// Failed API-key attempts one address may make at once: an operator who mistypes
/// a key or rotates it across a few scripts never meets the limit.
pub const API_KEY_FAILURE_BURST: u32 = 10;
/// Failed attempts forgiven per second after the burst (one per 6 s, ten a minute):
/// guessing a 16-character key at that rate is hopeless, and a locked-out operator
/// waits at most a minute for the full burst back.
pub const API_KEY_FAILURE_REFILL_PER_SEC: f64 = 1.0 / 6.0;

/// The address a per-address limit counts under: IPv4 as is (an IPv4-mapped IPv6
/// address as its IPv4 address), IPv6 cut to its /64.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mask = u128::MAX << (128 - IPV6_CLIENT_PREFIX);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        },
    }
}

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
        let ip = address_key(ip);
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

/// Failed API-key attempts per address on this node. An address that used up its
/// failures is refused before its key is even compared, so guessing goes no faster
/// with the right key in the list: past the limit every attempt is a 429.
#[derive(Debug)]
pub struct FailureLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl FailureLimiter {
    pub fn new(per_sec: f64, burst: u32) -> FailureLimiter {
        FailureLimiter {
            per_sec,
            burst: f64::from(burst),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The limiter of failed API-key attempts with the default limits.
    pub fn api_key() -> FailureLimiter {
        FailureLimiter::new(API_KEY_FAILURE_REFILL_PER_SEC, API_KEY_FAILURE_BURST)
    }

    /// `Err(wait)` when the address has no failures left.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let ip = address_key(ip);
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(&ip) {
            Some(b) => {
                b.refill(now);
                if b.tokens >= 1.0 {
                    Ok(())
                } else {
                    Err(b.wait_time().max(Duration::from_secs(1)))
                }
            }
            None => Ok(()),
        }
    }

    /// Counts one failed attempt.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let ip = address_key(ip);
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_TRACKED_ADDRESSES && !map.contains_key(&ip) {
            map.retain(|_, b| !b.is_full(now));
        }
        let b = map
            .entry(ip)
            .or_insert_with(|| Bucket::new(self.per_sec, self.burst, now));
        b.try_take(now);
    }

    /// Drops addresses whose failures are all forgiven.
    pub fn sweep(&self, now: Instant) {
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, b| !b.is_full(now));
    }
}

/// The node's per-address limiters.
pub struct NodeLimits {
    /// New connections per client address.
    pub connect: ConnectLimiter,
    /// Failed API-key attempts per client address (`api::authorize`).
    pub api_key_failures: FailureLimiter,
}

impl NodeLimits {
    pub fn new(connect_rate: u32, connect_burst: u32) -> NodeLimits {
        NodeLimits {
            connect: ConnectLimiter::new(connect_rate, connect_burst),
            api_key_failures: FailureLimiter::api_key(),
        }
    }

    /// Forgets idle addresses.
    pub fn sweep(&self, now: Instant) {
        self.connect.sweep(now);
        self.api_key_failures.sweep(now);
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

    #[test]
    fn ipv6_clients_share_one_bucket_per_64() {
        let t0 = Instant::now();
        let l = ConnectLimiter::new(5, 5);
        // Five connects from five addresses of one /64 use up its burst ...
        for i in 1..=5u16 {
            let ip = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, i, i, i, i));
            assert_eq!(l.check(ip, t0), ConnectVerdict::Allow, "{ip}");
        }
        let fresh: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:fffe".parse().unwrap();
        assert!(matches!(l.check(fresh, t0), ConnectVerdict::Limited(_)));
        // ... while the neighbouring /64 has its own.
        let neighbour: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(l.check(neighbour, t0), ConnectVerdict::Allow);
        assert_eq!(l.buckets.lock().unwrap().len(), 2);
        // IPv4 and IPv4-mapped IPv6 are one client; distinct IPv4 addresses are not.
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(address_key(mapped), v4);
        assert_eq!(address_key(v4), v4);
        assert_ne!(address_key("192.0.2.2".parse().unwrap()), v4);
        assert_eq!(
            address_key("2001:db8:1:2:a:b:c:d".parse().unwrap()),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn failure_limiter_refuses_after_the_burst_and_forgives() {
        let t0 = Instant::now();
        let l = FailureLimiter::new(1.0 / 6.0, 3);
        let ip: IpAddr = "198.51.100.9".parse().unwrap();
        let other: IpAddr = "198.51.100.10".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(l.check(ip, t0), Ok(()));
            l.failed(ip, t0);
        }
        let wait = l.check(ip, t0).expect_err("burst used up");
        assert!(
            wait >= Duration::from_secs(1) && wait <= Duration::from_secs(6),
            "{wait:?}"
        );
        assert_eq!(l.check(other, t0), Ok(()));
        // Another address of the same IPv6 /64 is the same client.
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::2".parse().unwrap();
        for _ in 0..3 {
            l.failed(a, t0);
        }
        assert!(l.check(b, t0).is_err());
        // One failure is forgiven every 6 s.
        assert_eq!(l.check(ip, t0 + Duration::from_secs(7)), Ok(()));
        l.sweep(t0 + Duration::from_secs(60));
        assert!(l.buckets.lock().unwrap().is_empty());
    }
}
