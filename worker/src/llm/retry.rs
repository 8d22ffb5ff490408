//! When and how long to wait before retrying an LLM request, the way the OpenAI SDKs
//! do it (docs/DESIGN.md#llm-streaming): `retry-after-ms`, then `retry-after` as
//! seconds or an HTTP date; otherwise exponential backoff with jitter. Retries happen
//! only before the first token (the caller's rule).

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;

/// A server asking for a longer pause than this is not coming back within a chat
/// turn; the request fails instead (OpenAI SDKs ignore hints above 60 s).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The retry hint of a response, if it gave a usable one.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let v = get("retry-after")?;
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `x-should-retry: true|false` overrides the status-based decision.
pub fn should_retry_header(headers: &HeaderMap) -> Option<bool> {
    match headers.get("x-should-retry")?.to_str().ok()?.trim() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// Statuses worth another try: timeouts, conflicts, rate limits and server errors.
pub fn retryable_status(code: u16) -> bool {
    matches!(code, 408 | 409 | 429) || code >= 500
}

/// Backoff before retry number `retry` (1 = first retry): `base * 2^(retry-1)`, capped,
/// times a jitter factor in [0.75, 1] so that workers hit by the same outage do not
/// come back in lockstep.
pub fn backoff(retry: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << retry.saturating_sub(1).min(16));
    let capped = exp.min(max);
    capped.mul_f64(1.0 - 0.25 * jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn retry_after_in_every_form() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            retry_after(&headers(&[("retry-after", "2")]), now),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "0.5")]), now),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            retry_after(
                &headers(&[("retry-after-ms", "250"), ("retry-after", "9")]),
                now
            ),
            Some(Duration::from_millis(250))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(3));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &date)]), now),
            Some(Duration::from_secs(3))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(3));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &past)]), now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")]), now), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "-1")]), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let (base, max) = (Duration::from_millis(500), Duration::from_secs(8));
        assert_eq!(backoff(1, base, max, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(2, base, max, 0.0), Duration::from_secs(1));
        assert_eq!(backoff(10, base, max, 0.0), Duration::from_secs(8));
        assert_eq!(backoff(40, base, max, 0.0), Duration::from_secs(8));
        assert_eq!(backoff(1, base, max, 1.0), Duration::from_millis(375));
    }

    #[test]
    fn which_statuses_retry() {
        for c in [408, 409, 429, 500, 502, 503, 504] {
            assert!(retryable_status(c), "{c}");
        }
        for c in [400, 401, 403, 404, 422] {
            assert!(!retryable_status(c), "{c}");
        }
        assert_eq!(
            should_retry_header(&headers(&[("x-should-retry", "false")])),
            Some(false)
        );
    }
}
