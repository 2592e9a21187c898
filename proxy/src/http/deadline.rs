//! Deadline propagation. A request's deadline is the earliest of its `grpc-timeout`, its
//! `weft-timeout-ms` (set by the previous proxy, or by a client that wants one) and the
//! route rule's timeout. The proxy enforces it, and before every attempt rewrites both
//! headers with the time that is left, so the budget shrinks hop by hop and the app
//! behind the last proxy sees what remains. Relative timeouts, as gRPC uses, need no
//! synchronised clocks.

use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue};

use crate::errors::{Cause, CauseError};

pub const WEFT_TIMEOUT_MS: &str = "weft-timeout-ms";
const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The deadline the request's headers ask for, from `now`.
pub fn from_headers(headers: &HeaderMap, now: Instant) -> Option<Instant> {
    timeout_in(headers).map(|t| now + t)
}

/// The deadline the request's headers ask for, from the moment this is called; no
/// clock read when they ask for none (most requests).
pub fn from_headers_now(headers: &HeaderMap) -> Option<Instant> {
    timeout_in(headers).map(|t| Instant::now() + t)
}

/// The time the request's headers give it, the smaller of the two when both do.
fn timeout_in(headers: &HeaderMap) -> Option<Duration> {
    let grpc = headers.get(GRPC_TIMEOUT).and_then(|v| parse_grpc_timeout(v.to_str().ok()?));
    let weft = headers
        .get(WEFT_TIMEOUT_MS)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
        .map(Duration::from_millis);
    match (grpc, weft) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `work`, or a `timeout` error naming `why` (the deadline's source) if `deadline`
/// passes first.
pub async fn within<T>(
    deadline: Instant,
    work: impl std::future::Future<Output = Result<T, CauseError>>,
    why: impl FnOnce() -> String,
) -> Result<T, CauseError> {
    let start = Instant::now();
    tokio::time::timeout_at(deadline.into(), work).await.unwrap_or_else(|_| {
        let waited = Instant::now().saturating_duration_since(start);
        Err(CauseError::new(Cause::Timeout, format!("no response within {}: waited {waited:?}", why())))
    })
}

/// The earlier of two optional deadlines.
pub fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Writes what is left of `deadline` into the headers: always `weft-timeout-ms`, and
/// `grpc-timeout` when the request carries one.
pub fn stamp(headers: &mut HeaderMap, deadline: Instant, now: Instant) {
    let left = deadline.saturating_duration_since(now);
    headers.insert(WEFT_TIMEOUT_MS, HeaderValue::from(left.as_millis() as u64));
    if headers.contains_key(GRPC_TIMEOUT) {
        if let Ok(v) = HeaderValue::try_from(format_grpc_timeout(left)) {
            headers.insert(GRPC_TIMEOUT, v);
        }
    }
}

/// gRPC's `TimeoutValue TimeoutUnit`: up to 8 digits and one of H M S m u n.
fn parse_grpc_timeout(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The most precise unit that fits gRPC's 8 digits.
fn format_grpc_timeout(d: Duration) -> String {
    let candidates = [
        (d.as_nanos(), "n"),
        (d.as_micros(), "u"),
        (d.as_millis(), "m"),
        (u128::from(d.as_secs()), "S"),
        (u128::from(d.as_secs() / 60), "M"),
    ];
    for (n, unit) in candidates {
        if n < 100_000_000 {
            return format!("{n}{unit}");
        }
    }
    format!("{}H", (d.as_secs() / 3600).min(99_999_999))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("300m"), Some(Duration::from_millis(300)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("123456789m"), None, "more than 8 digits");
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(format_grpc_timeout(Duration::from_millis(250)), "250000u");
        assert_eq!(format_grpc_timeout(Duration::from_secs(200)), "200000m");
        assert_eq!(
            parse_grpc_timeout(&format_grpc_timeout(Duration::from_millis(1234))),
            Some(Duration::from_millis(1234))
        );
    }

    #[test]
    fn the_earliest_header_wins_and_stamps_shrink() {
        let now = Instant::now();
        let mut h = HeaderMap::new();
        h.insert(GRPC_TIMEOUT, HeaderValue::from_static("300m"));
        h.insert(WEFT_TIMEOUT_MS, HeaderValue::from_static("200"));
        let d = from_headers(&h, now).unwrap();
        assert_eq!(d - now, Duration::from_millis(200));
        stamp(&mut h, d, now + Duration::from_millis(50));
        assert_eq!(h[WEFT_TIMEOUT_MS], "150");
        assert_eq!(h[GRPC_TIMEOUT], "150000u");
        assert!(from_headers(&HeaderMap::new(), now).is_none());
    }
}
