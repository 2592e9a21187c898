//! Retries of a route rule: which requests may be retried (idempotent methods unless the
//! rule says otherwise; bodies recorded while they stream, up to a limit), which
//! outcomes are retried
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

use crate::body::Body;

/// How many attempts a response says were made.
pub const ATTEMPTS_HEADER: &str = "weft-attempts";
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// GET, HEAD, OPTIONS, TRACE, PUT and DELETE may be sent twice (RFC 9110 §9.2.2).
pub fn idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// A request that may be sent again: its head, and its body as the first attempt sent
/// it, recorded up to a limit while it streamed through (nothing waits for the body).
pub struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    recorded: Arc<Mutex<Recorded>>,
}

#[derive(Default)]
struct Recorded {
    chunks: Vec<Bytes>,
    size: u64,
    /// The body ended (and fitted): it can be sent again.
    complete: bool,
    /// Larger than the limit, or with trailers: it cannot.
    given_up: bool,
}

pin_project_lite::pin_project! {
    /// Passes a body through, keeping a copy of its data for a retry.
    struct Recording {
        #[pin]
        inner: Body,
        recorded: Arc<Mutex<Recorded>>,
        max: u64,
    }
}

impl http_body::Body for Recording {
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        let mut rec = this.recorded.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) if !rec.given_up => match frame.data_ref() {
                Some(data) if rec.size + data.len() as u64 <= *this.max => {
                    rec.size += data.len() as u64;
                    rec.chunks.push(data.clone());
                }
                _ => {
                    rec.given_up = true;
                    rec.chunks.clear();
                }
            },
            std::task::Poll::Ready(None) => rec.complete = !rec.given_up,
            std::task::Poll::Ready(Some(Err(_))) => rec.given_up = true,
            _ => {}
        }
        // Senders stop polling once a body says it has ended.
        if this.inner.is_end_stream() && !rec.given_up {
            rec.complete = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Replay {
    /// The first attempt's request, recording its body if it may fit in `max` bytes.
    pub fn start(req: Request<Body>, max: u64) -> (Request<Body>, Replay) {
        let (parts, body) = req.into_parts();
        let recorded = Arc::new(Mutex::new(Recorded::default()));
        let replay = Replay {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            recorded: recorded.clone(),
        };
        let body = if body.is_end_stream() {
            recorded.lock().unwrap_or_else(std::sync::PoisonError::into_inner).complete = true;
            body
        } else if body.size_hint().lower() > max {
            recorded.lock().unwrap_or_else(std::sync::PoisonError::into_inner).given_up = true;
            body
        } else {
            Recording { inner: body, recorded, max }.boxed()
        };
        (Request::from_parts(parts, body), replay)
    }

    /// The request again, when the first attempt sent its whole body and it fitted; a
    /// body still streaming, or larger than the limit, is not replayed.
    pub fn request(&self) -> Option<Request<Body>> {
        let rec = self.recorded.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !rec.complete {
            return None;
        }
        let body: Bytes = match rec.chunks.len() {
            0 => Bytes::new(),
            1 => rec.chunks[0].clone(),
            _ => rec.chunks.concat().into(),
        };
        let mut req = Request::new(Full::new(body).map_err(|never| match never {}).boxed());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        Some(req)
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

/// Backoff before retry `n` (1 for the first): `base × 2^(n-1)`, capped, with full jitter.
pub fn backoff(retry: &Retry, n: u32) -> Duration {
    let base = Duration::from_millis(retry.backoff_ms);
    let ceiling = base.saturating_mul(1 << (n.saturating_sub(1)).min(16)).min(BACKOFF_MAX);
    ceiling.mul_f64(fastrand::f64())
}

/// One retry budget per rule, shared by the proxy's shards.
#[derive(Default)]
pub struct Budgets {
    budgets: Mutex<HashMap<String, RuleBudget>>,
}

/// A rule's budget and the settings (‰, minimum per second) it was made with.
type RuleBudget = ((u32, u32), Arc<TpsBudget>);

/// Retries per deposited request, and per second at least, when the rule says nothing.
const DEFAULT_BUDGET: (u32, u32) = (200, 10);

impl Budgets {
    /// The budget of `rule` with `retry`'s settings; a new one when they changed.
    pub fn of(&self, rule: &str, retry: &Retry) -> Arc<TpsBudget> {
        let wanted = match (retry.budget_permille, retry.budget_min_per_second) {
            (0, 0) => DEFAULT_BUDGET,
            set => set,
        };
        let mut budgets = self.budgets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let make = || {
            let ratio = f32::from(u16::try_from(wanted.0.min(1000)).unwrap_or(1000)) / 1000.0;
            Arc::new(TpsBudget::new(Duration::from_secs(10), wanted.1, ratio))
        };
        match budgets.get(rule) {
            Some((settings, budget)) if *settings == wanted => budget.clone(),
            _ => {
                let budget = make();
                budgets.insert(rule.to_string(), (wanted, budget.clone()));
                budget
            }
        }
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
    fn a_rule_s_budget_follows_its_settings() {
        let budgets = Budgets::default();
        let default = Retry::default();
        let a = budgets.of("r/0", &default);
        assert!(Arc::ptr_eq(&a, &budgets.of("r/0", &default)), "one budget per rule");
        // 0 ‰ and 1 per second: one retry per second, whatever the traffic.
        let tight = Retry { budget_permille: 0, budget_min_per_second: 1, ..Retry::default() };
        let b = budgets.of("r/0", &tight);
        assert!(!Arc::ptr_eq(&a, &b), "new settings make a new budget");
        for _ in 0..100 {
            b.deposit();
        }
        let allowed = (0..100).filter(|_| b.withdraw()).count();
        assert!((1..=10).contains(&allowed), "{allowed}");
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
    async fn bodies_are_recorded_while_they_stream_up_to_the_limit() {
        let body = |b: &'static str| Full::new(Bytes::from(b)).map_err(|n| match n {}).boxed();
        let (first, replay) = Replay::start(Request::post("/").body(body("hello")).unwrap(), 16);
        assert!(replay.request().is_none(), "nothing is replayable before the first attempt sent it");
        first.into_body().collect().await.unwrap();
        let again = replay.request().unwrap().into_body().collect().await.unwrap().to_bytes();
        assert_eq!(again, "hello");
        let long = "x".repeat(64).leak();
        let (first, replay) = Replay::start(Request::post("/").body(body(long)).unwrap(), 16);
        first.into_body().collect().await.unwrap();
        assert!(replay.request().is_none(), "larger than the limit");
        // A body of unknown length (a stream) that fits is replayable once it ended.
        let frames = futures_util::stream::iter(vec![
            Ok::<_, crate::body::BoxError>(http_body::Frame::data(Bytes::from("ab"))),
            Ok(http_body::Frame::data(Bytes::from("cd"))),
        ]);
        let streamed = http_body_util::StreamBody::new(frames).boxed();
        let (first, replay) = Replay::start(Request::post("/").body(streamed).unwrap(), 16);
        first.into_body().collect().await.unwrap();
        assert_eq!(replay.request().unwrap().into_body().collect().await.unwrap().to_bytes(), "abcd");
    }
}
