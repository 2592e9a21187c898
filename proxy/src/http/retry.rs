//! Retries of a route rule: which requests may be retried (idempotent methods unless the
//! rule says otherwise, bodies small enough to keep), which outcomes are retried
//! (proxy-side failures to reach an endpoint, and the rule's statuses and gRPC codes),
//! exponential backoff with jitter, and a budget per rule (tower's `TpsBudget`: retries
//! stay under 20 % of requests plus 10 per second), so retries cannot multiply load
//! during an outage.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Full};
pub use tower::retry::budget::{Budget, TpsBudget};
use weft_api::v1::Retry;

use super::Body;
use crate::errors::{Cause, CauseError};

/// How many attempts a response says were made.
pub const ATTEMPTS_HEADER: &str = "weft-attempts";
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// GET, HEAD, OPTIONS, TRACE, PUT and DELETE may be sent twice (RFC 9110 §9.2.2).
pub fn idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// A request kept whole so it can be sent again.
pub struct Replayable {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
}

impl Replayable {
    /// Reads the body if it is known to be at most `max` bytes; otherwise hands the
    /// request back untouched (it will not be retried).
    pub async fn keep(req: Request<Body>, max: u64) -> Result<Result<Replayable, Request<Body>>, CauseError> {
        let fits = req.body().is_end_stream() || req.body().size_hint().upper().is_some_and(|n| n <= max);
        if !fits {
            return Ok(Err(req));
        }
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| CauseError::new(Cause::BadRequest, format!("reading the request body: {e}")))?
            .to_bytes();
        Ok(Ok(Replayable {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: parts.headers,
            body,
        }))
    }

    pub fn request(&self) -> Request<Body> {
        let mut req = Request::new(Full::new(self.body.clone()).map_err(|never| match never {}).boxed());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// Whether the rule retries this response: a listed status, or a listed gRPC code in
/// the response head (how servers send immediate errors: trailers-only responses).
pub fn retryable(retry: &Retry, rsp: &Response<Body>) -> bool {
    if retry.statuses.contains(&u32::from(rsp.status().as_u16())) {
        return true;
    }
    let code = rsp.headers().get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<u32>().ok());
    code.is_some_and(|c| retry.grpc_codes.contains(&c))
}

/// Whether a failure to get a response may be retried: anything but having no identity
/// (no endpoint can fix that).
pub fn retryable_error(e: &CauseError) -> bool {
    !matches!(e.cause, Cause::NoIdentity | Cause::BadRequest | Cause::FaultInjected)
}

/// Backoff before retry `n` (1 for the first): `base × 2^(n-1)`, capped, with full jitter.
pub fn backoff(retry: &Retry, n: u32) -> Duration {
    let base = Duration::from_millis(retry.backoff_ms);
    let ceiling = base.saturating_mul(1 << (n.saturating_sub(1)).min(16)).min(BACKOFF_MAX);
    ceiling.mul_f64(fastrand::f64())
}

/// One retry budget per rule, shared by the proxy's shards.
#[derive(Default)]
pub struct Budgets {
    budgets: Mutex<HashMap<String, Arc<TpsBudget>>>,
}

impl Budgets {
    pub fn of(&self, rule: &str) -> Arc<TpsBudget> {
        let mut budgets = self.budgets.lock().expect("budgets lock");
        budgets
            .entry(rule.to_string())
            .or_insert_with(|| Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rsp(status: u16, grpc: Option<&str>) -> Response<Body> {
        let mut r = Response::new(http_body_util::Empty::new().map_err(|never| match never {}).boxed());
        *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
        if let Some(g) = grpc {
            r.headers_mut().insert("grpc-status", g.parse().unwrap());
        }
        r
    }

    #[test]
    fn statuses_and_grpc_codes() {
        let retry = Retry { statuses: vec![503], grpc_codes: vec![14], ..Default::default() };
        assert!(retryable(&retry, &rsp(503, None)));
        assert!(!retryable(&retry, &rsp(500, None)));
        assert!(retryable(&retry, &rsp(200, Some("14"))));
        assert!(!retryable(&retry, &rsp(200, Some("5"))));
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let retry = Retry { backoff_ms: 100, ..Default::default() };
        for _ in 0..50 {
            assert!(backoff(&retry, 1) <= Duration::from_millis(100));
            assert!(backoff(&retry, 3) <= Duration::from_millis(400));
            assert!(backoff(&retry, 30) <= BACKOFF_MAX);
        }
    }

    #[test]
    fn the_budget_caps_retries() {
        let budget = TpsBudget::new(Duration::from_secs(10), 0, 0.2);
        for _ in 0..100 {
            budget.deposit();
        }
        let allowed = (0..100).filter(|_| budget.withdraw()).count();
        assert!((19..=21).contains(&allowed), "{allowed}");
    }

    #[tokio::test]
    async fn small_bodies_are_kept_and_large_ones_are_not() {
        let small = Request::post("/").body(Full::new(Bytes::from("hello")).map_err(|n| match n {}).boxed());
        let kept = Replayable::keep(small.unwrap(), 16).await.unwrap().ok().unwrap();
        let again = kept.request().into_body().collect().await.unwrap().to_bytes();
        assert_eq!(again, "hello");
        let large =
            Request::post("/").body(Full::new(Bytes::from(vec![0; 64])).map_err(|n| match n {}).boxed());
        assert!(Replayable::keep(large.unwrap(), 16).await.unwrap().is_err());
    }
}
