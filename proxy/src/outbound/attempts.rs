//! Sending an outbound request: once, or with its rule's retries; the service's limit
//! of requests in flight over all of them; all before the earlier of the request's own
//! deadline and the rule's timeout. Each attempt gets an endpoint from the balancer (not
//! one an earlier attempt failed on), a client span, what is left of the deadline, and
//! goes out through the forwarder; `weft-attempts` on the response says how many.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use http::{HeaderValue, Request, Response};

use super::{
    balance::{Attempt, Balancers},
    discovery::Endpoint,
    in_flight::InFlight,
    plan::{Dest, Plan},
    retry::{self, Budget, Budgets, Replay},
};
use crate::{
    errors::{Cause, CauseError},
    http::{deadline, forwarder::Forwarder, observe::Exchange, Body},
    metrics::Metrics,
    trace::Tracer,
};

pub struct Attempts {
    pub forwarder: Forwarder,
    /// One balancer per service authority, for this shard.
    pub balancers: Balancers,
    /// Retry budgets per route rule, shared by all shards.
    pub budgets: Arc<Budgets>,
    /// Requests in flight per service, shared by all shards.
    pub in_flight: Arc<InFlight>,
    pub metrics: Arc<Metrics>,
    pub tracer: Option<Arc<Tracer>>,
    /// How long a request waits for a service with no endpoints to get one.
    pub queue_timeout: Duration,
}

/// Endpoints a request that never reached one is sent on to, at most.
const MAX_REROUTES: u32 = 3;

/// What holds for one attempt.
#[derive(Clone, Copy)]
struct Try {
    /// 1 for the first attempt.
    n: u32,
    upgrade: bool,
    /// The retry policy's per-attempt timeout.
    per_try: Option<Duration>,
    /// The request's deadline, re-stamped on each attempt.
    deadline: Option<Instant>,
}

impl Attempts {
    /// Sends the request: once, or with the rule's retries; all before the earlier of the
    /// request's own deadline (`asked`, from its headers) and the rule's timeout.
    pub async fn run(
        &self,
        req: Request<Body>,
        plan: &Plan,
        upgrade: bool,
        asked: Option<Instant>,
        ex: &mut Exchange,
    ) -> Result<Response<Body>, CauseError> {
        let rule = plan.rule.as_ref().map(|r| r.rule());
        let rule_deadline = rule
            .map(|r| r.timeout_ms)
            .filter(|t| *t > 0)
            .map(|ms| Instant::now() + Duration::from_millis(ms));
        let deadline = deadline::earliest(asked, rule_deadline);
        // The service's limit of requests in flight holds for all the attempts.
        let _slot = match &plan.dest {
            Dest::Service(key, set) if set.max_concurrent_requests > 0 => {
                let max = set.max_concurrent_requests;
                Some(self.in_flight.acquire(key, max).ok_or_else(|| {
                    let msg = format!("{key} already has {max} requests in flight from this proxy");
                    CauseError::new(Cause::ConcurrencyLimit, msg)
                })?)
            }
            _ => None,
        };
        let all = self.with_retries(req, plan, upgrade, deadline, ex);
        let Some(d) = deadline else { return all.await };
        deadline::within(d, all, || match rule {
            Some(r) if deadline == rule_deadline => format!("the timeout of route rule {}", r.name),
            _ => "the request's deadline (grpc-timeout or weft-timeout-ms)".to_string(),
        })
        .await
    }

    /// The endpoint for one attempt, avoiding those earlier attempts failed on.
    pub fn endpoint(&self, dest: &Dest, avoid: &[Endpoint]) -> Result<Endpoint, CauseError> {
        match dest {
            Dest::Addr(e) => Ok(e.clone()),
            Dest::Service(key, set) => self.balancers.pick(key, set, avoid, self.queue_timeout),
        }
    }

    async fn with_retries(
        &self,
        req: Request<Body>,
        plan: &Plan,
        upgrade: bool,
        deadline: Option<Instant>,
        ex: &mut Exchange,
    ) -> Result<Response<Body>, CauseError> {
        let rule = plan.rule.as_ref();
        let retry = rule
            .and_then(|r| r.rule().retry.as_ref())
            .filter(|r| r.attempts > 1 && !upgrade && (r.non_idempotent || retry::idempotent(req.method())));
        let per_try = retry.map(|r| r.per_try_timeout_ms).filter(|t| *t > 0).map(Duration::from_millis);
        let once = Try { n: 1, upgrade, per_try: None, deadline };
        let (Some(retry), Some(rule)) = (retry, rule) else {
            return self.attempt_or_reroute(req, &plan.dest, once, &mut Vec::new(), ex).await;
        };
        let (first, replay) = Replay::start(req, u64::from(retry.max_body_bytes));
        let budget = self.budgets.of(&rule.rule().name, retry);
        budget.deposit();
        let (mut t, mut tried, mut req) = (Try { per_try, upgrade: false, ..once }, Vec::new(), first);
        loop {
            let result = self.attempt_or_reroute(req, &plan.dest, t, &mut tried, ex).await;
            let again = match &result {
                Ok(rsp) => retry::retryable(retry, rsp),
                Err(e) => e.cause.blames_endpoint(),
            };
            if !again || t.n >= retry.attempts {
                return with_attempts(result, t.n);
            }
            if !budget.withdraw() {
                self.metrics.retry_budget_exhausted(rule.name());
                return with_attempts(result, t.n);
            }
            // A body still streaming, or larger than the limit, cannot be sent again.
            let Some(again) = replay.request() else { return with_attempts(result, t.n) };
            self.metrics.retried(rule.name());
            tokio::time::sleep(retry::backoff(retry, t.n)).await;
            req = again;
            t.n += 1;
        }
    }

    /// An attempt, sent again on another endpoint while it provably never reached the
    /// one chosen (refused, or its connection closed or GOAWAY'd before the request was
    /// written): safe whatever the method, and needing no route, since the upstream never
    /// saw it. This is what keeps a rollout or a scale-down from failing requests on an
    /// endpoint that is going away but still listed.
    async fn attempt_or_reroute(
        &self,
        mut req: Request<Body>,
        dest: &Dest,
        t: Try,
        tried: &mut Vec<Endpoint>,
        ex: &mut Exchange,
    ) -> Result<Response<Body>, CauseError> {
        let mut left = MAX_REROUTES;
        loop {
            let others = |tried: usize| match dest {
                Dest::Service(_, set) => left > 0 && set.endpoints.len() > tried,
                Dest::Addr(_) => false,
            };
            // A peer proxy that could not reach its app answers `upstream-refused`: the
            // request reached no app, and one without a body can go to another endpoint.
            let copy = if others(tried.len() + 1) { crate::body::bodyless_copy(&req) } else { None };
            let result = self.attempt(req, dest, t, tried, ex).await;
            let another = others(tried.len());
            if let (Ok(rsp), Some(copy)) = (&result, copy) {
                let meshed = tried.last().is_some_and(|e| e.identity.is_some());
                if meshed && peer_refused(rsp) {
                    req = copy;
                    if let Dest::Service(key, _) = dest {
                        tracing::debug!(service = %key, "the peer proxy's app refused; sending it to another endpoint");
                        self.metrics.rerouted(key);
                    }
                    left -= 1;
                    continue;
                }
            }
            match result {
                Err(mut e) if another && e.unsent.is_some() => {
                    req = *e.unsent.take().expect("checked");
                    if let Dest::Service(key, _) = dest {
                        tracing::debug!(service = %key, "{e}; sending it to another endpoint");
                        self.metrics.rerouted(key);
                    }
                    left -= 1;
                }
                Err(mut e) => {
                    e.unsent = None;
                    return Err(e);
                }
                ok => return ok,
            }
        }
    }

    /// One attempt: an endpoint (not one in `tried`, to which it is added), then the
    /// send, within the per-attempt timeout, in a client span of its own; the next hop
    /// learns what is left of the deadline.
    async fn attempt(
        &self,
        mut req: Request<Body>,
        dest: &Dest,
        t: Try,
        tried: &mut Vec<Endpoint>,
        ex: &mut Exchange,
    ) -> Result<Response<Body>, CauseError> {
        if let Some(d) = t.deadline {
            deadline::stamp(req.headers_mut(), d, Instant::now());
        }
        let endpoint = self.endpoint(dest, tried)?;
        let service = match dest {
            Dest::Service(key, _) => {
                tried.push(endpoint.clone());
                Some(key.as_str())
            }
            Dest::Addr(_) => None,
        };
        let tracer = self.tracer.as_deref();
        let span = ex.attempt(tracer, &mut req, endpoint.addr, endpoint.identity.is_some(), t.n);
        let send: Attempt<'_> = Box::pin(self.forwarder.send(req, &endpoint, t.upgrade));
        let send = match service {
            None => send,
            Some(key) => Box::pin(self.balancers.send(key, &endpoint, send, &self.metrics)),
        };
        let result = match t.per_try {
            None => send.await,
            Some(limit) => tokio::time::timeout(limit, send).await.unwrap_or_else(|_| {
                let msg = format!("no response within the attempt timeout ({limit:?})");
                Err(CauseError::new(Cause::Timeout, msg))
            }),
        };
        let result = result.map(|mut rsp| {
            ex.learn_peer(rsp.headers_mut(), endpoint.identity.as_ref(), &self.metrics);
            rsp
        });
        if let Some(span) = span {
            let outcome = result.as_ref().map_err(|e| (e.status_code().as_u16(), e.cause));
            ex.finish_attempt(tracer, span, outcome);
        }
        result
    }
}

/// Says how many attempts were made: a header on the response, or in the error's message.
fn with_attempts(result: Result<Response<Body>, CauseError>, n: u32) -> Result<Response<Body>, CauseError> {
    match result {
        Ok(mut rsp) => {
            rsp.headers_mut().insert(retry::ATTEMPTS_HEADER, HeaderValue::from(n));
            Ok(rsp)
        }
        Err(mut e) => {
            e.message = format!("{} (after {n} attempts)", e.message);
            Err(e)
        }
    }
}

/// Whether a peer proxy answered that it could not connect to its app (refused, or no
/// connection in time): what it sent never reached an app.
fn peer_refused(rsp: &Response<Body>) -> bool {
    let cause = rsp.headers().get(crate::errors::WEFT_ERROR).map(HeaderValue::as_bytes);
    matches!(
        (rsp.status().as_u16(), cause),
        (502, Some(b"upstream-refused")) | (504, Some(b"connect-timeout"))
    )
}
