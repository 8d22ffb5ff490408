//! How long to wait before the next attempt, from the close code (docs/PROTOCOL.md
//! section 4) and the attempts so far.

use std::time::Duration;

use protocol::{CloseCode, ReconnectPolicy};
use rand::Rng;

/// What to do after a connection ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Next {
    /// Connect again after this delay; `expired`: with a new token.
    Retry { delay: Duration, expired: bool },
    /// Stop; the reason (`None`: a normal close).
    Stop(Option<String>),
}

/// How a connection ended, as the rules need it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ended {
    /// The server's close code; `None` when the link broke without one.
    pub code: Option<u16>,
    /// `retry_after_ms` of the last `reconnect` frame (draining node).
    pub reconnect_hint: Option<u64>,
    /// `retry_after_ms` of the last `error` frame (4029).
    pub retry_after: Option<u64>,
    pub reason: String,
}

pub(crate) struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    pub restart_jitter: Duration,
}

impl Backoff {
    /// Doubling from `base` up to `cap`, with full jitter over the upper half.
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.cap);
        let half = exp / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    pub(crate) fn next(&self, ended: &Ended, attempt: u32) -> Next {
        let Some(code) = ended.code else {
            return Next::Retry {
                delay: self.delay(attempt),
                expired: false,
            };
        };
        let close = CloseCode::from_u16(code);
        match close.policy() {
            ReconnectPolicy::None if code == 1000 => Next::Stop(None),
            ReconnectPolicy::None => Next::Stop(Some(format!(
                "closed {code} ({}): the client sent something the server refuses",
                ended.reason
            ))),
            ReconnectPolicy::Stop => Next::Stop(Some(format!("closed {code} ({})", ended.reason))),
            ReconnectPolicy::RefreshToken => Next::Retry {
                delay: Duration::ZERO,
                expired: true,
            },
            ReconnectPolicy::Immediately => {
                let ceiling = ended
                    .reconnect_hint
                    .map_or(self.restart_jitter, Duration::from_millis);
                Next::Retry {
                    delay: rand::rng().random_range(Duration::ZERO..=ceiling),
                    expired: false,
                }
            }
            ReconnectPolicy::Backoff => {
                let delay = match (close, ended.retry_after) {
                    (CloseCode::RateLimited, Some(ms)) => Duration::from_millis(ms),
                    _ => self.delay(attempt),
                };
                Next::Retry {
                    delay,
                    expired: false,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b() -> Backoff {
        Backoff {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(20),
            restart_jitter: Duration::from_secs(1),
        }
    }

    fn ended(code: Option<u16>) -> Ended {
        Ended {
            code,
            ..Ended::default()
        }
    }

    #[test]
    fn delays_double_within_jitter_and_stop_at_the_cap() {
        let b = b();
        for attempt in 0..30 {
            let exp = (Duration::from_millis(500) * 2u32.pow(attempt.min(16))).min(b.cap);
            let d = b.delay(attempt);
            assert!(d >= exp / 2 && d <= exp, "attempt {attempt}: {d:?}");
        }
    }

    #[test]
    fn every_close_code_row_of_the_protocol_table() {
        let b = b();
        assert_eq!(b.next(&ended(Some(1000)), 0), Next::Stop(None));
        for code in [1003, 1009, 4503, 4509] {
            assert!(
                matches!(b.next(&ended(Some(code)), 0), Next::Stop(Some(_))),
                "{code}"
            );
        }
        assert_eq!(
            b.next(&ended(Some(4001)), 3),
            Next::Retry {
                delay: Duration::ZERO,
                expired: true
            }
        );
        for code in [1001, 1011, 1013, 4000, 4008] {
            assert!(
                matches!(b.next(&ended(Some(code)), 0), Next::Retry { expired: false, delay } if delay <= b.base),
                "{code}"
            );
        }
        let limited = Ended {
            code: Some(4029),
            retry_after: Some(7000),
            ..Ended::default()
        };
        assert!(
            matches!(b.next(&limited, 0), Next::Retry { delay, .. } if delay == Duration::from_secs(7))
        );
        let draining = Ended {
            code: Some(1012),
            reconnect_hint: Some(50),
            ..Ended::default()
        };
        for _ in 0..50 {
            assert!(
                matches!(b.next(&draining, 5), Next::Retry { delay, .. } if delay <= Duration::from_millis(50))
            );
        }
        assert!(matches!(b.next(&ended(None), 0), Next::Retry { .. }));
    }
}
