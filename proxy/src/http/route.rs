//! Outbound routing of one request in explicit mode: the destination named by the
//! request (a mesh service, or a name DNS resolves), the first rule of the service's
//! routes it matches, that rule's backend split, header changes and fault injection,
//! then the attempts: an endpoint picked per attempt, the rule's timeout over all of
//! them, retries within the rule's budget, and `weft-attempts` on the response.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use weft_api::v1::{EndpointSet, RouteSet, Rule};

use super::{
    deadline, headers,
    observe::Exchange,
    proxy::{HttpProxy, Routed},
    retry::{self, Budget, Replay},
    Body,
};
use crate::{
    discovery::Endpoint,
    errors::{Cause, CauseError},
};

/// Where a request's attempts go.
pub enum Dest {
    /// One address: transparent mode's original destination, the app, or a DNS answer;
    /// with the SPIFFE ID the peer must prove when it is a mesh peer.
    Addr(SocketAddr, Option<String>),
    /// A mesh service: each attempt gets an endpoint from the balancer of this authority.
    Service(String, Arc<EndpointSet>),
}

pub struct Plan {
    pub dest: Dest,
    /// The routes and the index of the rule that applies.
    pub rule: Option<(Arc<RouteSet>, usize)>,
}

impl Plan {
    pub fn fixed(target: SocketAddr, identity: Option<String>) -> Plan {
        Plan { dest: Dest::Addr(target, identity), rule: None }
    }

    pub fn rule(&self) -> Option<&Rule> {
        self.rule.as_ref().map(|(set, i)| &set.rules[*i])
    }
}

impl HttpProxy {
    /// Explicit mode: the destination comes from the request itself. A service the mesh
    /// knows is routed by its rules and balanced; another name goes where DNS says.
    pub(super) async fn plan(&self, req: &Request<Body>) -> Result<Plan, CauseError> {
        let authority = headers::authority(req).ok_or_else(|| {
            CauseError::new(
                Cause::NoRoute,
                "the request names no destination: send an absolute URI (curl -x http://127.0.0.1:4140 \
                 http://host:port/) or a Host header",
            )
        })?;
        let default_port =
            if req.uri().scheme() == Some(&http::uri::Scheme::HTTPS) || req.method() == Method::CONNECT {
                443
            } else {
                80
            };
        let port = authority.port_u16().unwrap_or(default_port);
        if let Some(discovery) = &self.discovery {
            let key = format!("{}:{port}", authority.host());
            if let Some(set) = discovery.resolve(&key, self.queue_timeout).await {
                let routes = match &self.routes {
                    Some(r) => r.get(&key).await,
                    None => None,
                };
                let rule = routes.and_then(|set| Some((set.clone(), crate::routes::matching(&set, req)?)));
                let backend = rule.as_ref().and_then(|(set, i)| {
                    crate::routes::pick_backend(&set.rules[*i], fastrand::u64(..))
                        .map(|b| b.authority.clone())
                });
                let dest = match backend {
                    None => Dest::Service(key, set),
                    Some(b) => match discovery.resolve(&b, self.queue_timeout).await {
                        Some(set) => Dest::Service(b, set),
                        None => return Err(crate::balance::no_endpoints(&b, self.queue_timeout)),
                    },
                };
                return Ok(Plan { dest, rule });
            }
        }
        let target = self.resolver.resolve(authority.host(), port).await?;
        if self.is_own_addr(target) {
            return Err(CauseError::new(
                Cause::LoopDetected,
                format!("{authority} is this proxy's own listener; name the application instead"),
            ));
        }
        Ok(Plan::fixed(target, None))
    }

    /// The endpoint for one attempt, avoiding those earlier attempts failed on.
    pub(super) fn endpoint(&self, dest: &Dest, avoid: &[Endpoint]) -> Result<Routed, CauseError> {
        let (key, set) = match dest {
            Dest::Addr(addr, identity) => return Ok((*addr, identity.clone(), None)),
            Dest::Service(key, set) => (key, set),
        };
        let mut balancers = self.balancers.lock().expect("balancers lock");
        let balancer = balancers.entry(key.clone()).or_default();
        balancer.update(set);
        match balancer.pick(avoid, || fastrand::u64(..)) {
            Some(e) => Ok((e.addr, e.identity.clone(), Some((key.clone(), e)))),
            None => Err(crate::balance::no_endpoints(key, self.queue_timeout)),
        }
    }

    /// The rule's header changes, then its fault: a delay, or an answer instead of the
    /// service.
    pub(super) async fn apply_rule(&self, rule: &Rule, req: &mut Request<Body>) -> Result<(), CauseError> {
        for h in &rule.remove_request_headers {
            req.headers_mut().remove(h.as_str());
        }
        for h in &rule.set_request_headers {
            if let (Ok(name), Ok(value)) = (HeaderName::try_from(&h.name), HeaderValue::try_from(&h.value)) {
                req.headers_mut().insert(name, value);
            }
        }
        for h in &rule.add_request_headers {
            if let (Ok(name), Ok(value)) = (HeaderName::try_from(&h.name), HeaderValue::try_from(&h.value)) {
                req.headers_mut().append(name, value);
            }
        }
        let Some(fault) = &rule.fault else { return Ok(()) };
        if fault.delay_permille > 0 && fastrand::u32(0..1000) < fault.delay_permille {
            tokio::time::sleep(Duration::from_millis(fault.delay_ms)).await;
        }
        if fault.abort_permille > 0 && fastrand::u32(0..1000) < fault.abort_permille {
            let status =
                StatusCode::from_u16(fault.abort_status as u16).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let msg = format!("route rule {} aborted the request (fault injection)", rule.name);
            return Err(CauseError::new(Cause::FaultInjected, msg).with_status(status));
        }
        Ok(())
    }

    /// Sends the request: once, or with the rule's retries; all before the earlier of the
    /// request's own deadline (its headers) and the rule's timeout.
    pub(super) async fn attempts(
        &self,
        req: Request<Body>,
        plan: &Plan,
        is_upgrade: bool,
        asked: Option<Instant>,
        ex: &mut Exchange,
    ) -> Result<Response<Body>, CauseError> {
        let rule = plan.rule();
        let start = Instant::now();
        let rule_deadline =
            rule.map(|r| r.timeout_ms).filter(|t| *t > 0).map(|ms| start + Duration::from_millis(ms));
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
        let all = self.with_retries(req, plan, is_upgrade, deadline, ex);
        let Some(d) = deadline else { return all.await };
        tokio::time::timeout_at(d.into(), all).await.unwrap_or_else(|_| {
            let why = if deadline == rule_deadline {
                format!("the timeout of route rule {}", rule.map_or("", |r| r.name.as_str()))
            } else {
                "the request's deadline (grpc-timeout or weft-timeout-ms)".to_string()
            };
            let waited = Instant::now().saturating_duration_since(start);
            Err(CauseError::new(Cause::Timeout, format!("no response within {why}: waited {waited:?}")))
        })
    }

    async fn with_retries(
        &self,
        req: Request<Body>,
        plan: &Plan,
        is_upgrade: bool,
        deadline: Option<Instant>,
        ex: &mut Exchange,
    ) -> Result<Response<Body>, CauseError> {
        let rule = plan.rule();
        let retry = rule.and_then(|r| r.retry.as_ref()).filter(|r| {
            r.attempts > 1 && !is_upgrade && (r.non_idempotent || retry::idempotent(req.method()))
        });
        let per_try = retry.map(|r| r.per_try_timeout_ms).filter(|t| *t > 0).map(Duration::from_millis);
        let (Some(retry), Some(rule)) = (retry, rule) else {
            return self.attempt(req, &plan.dest, is_upgrade, (None, deadline), &mut Vec::new(), ex, 1).await;
        };
        let (first, replay) = Replay::start(req, u64::from(retry.max_body_bytes));
        let budget = self.budgets.of(&rule.name);
        budget.deposit();
        let (mut n, mut tried, mut req) = (1, Vec::new(), first);
        loop {
            let result = self.attempt(req, &plan.dest, false, (per_try, deadline), &mut tried, ex, n).await;
            let again = match &result {
                Ok(rsp) => retry::retryable(retry, rsp),
                Err(e) => e.cause.blames_endpoint(),
            };
            if !again || n >= retry.attempts {
                return with_attempts(result, n);
            }
            if !budget.withdraw() {
                self.metrics.retry_budget_exhausted(&rule.name);
                return with_attempts(result, n);
            }
            // A body still streaming, or larger than the limit, cannot be sent again.
            let Some(again) = replay.request() else { return with_attempts(result, n) };
            self.metrics.retried(&rule.name);
            tokio::time::sleep(retry::backoff(retry, n)).await;
            req = again;
            n += 1;
        }
    }

    /// Attempt `n`: an endpoint (not one in `tried`, to which it is added), then the
    /// send, within the per-attempt timeout, in a client span of its own; the next hop
    /// learns what is left of the deadline.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        mut req: Request<Body>,
        dest: &Dest,
        is_upgrade: bool,
        (per_try, deadline): (Option<Duration>, Option<Instant>),
        tried: &mut Vec<Endpoint>,
        ex: &mut Exchange,
        n: u32,
    ) -> Result<Response<Body>, CauseError> {
        if let Some(d) = deadline {
            deadline::stamp(req.headers_mut(), d, Instant::now());
        }
        let routed = self.endpoint(dest, tried)?;
        if let Some((_, e)) = &routed.2 {
            tried.push(e.clone());
        }
        let tracer = self.tracer.as_deref();
        let span = ex.attempt(tracer, &mut req, (routed.0, routed.1.is_some()), n);
        let result = self.send_within(req, routed, is_upgrade, per_try, ex).await;
        if let Some(span) = span {
            let outcome = result.as_ref().map_err(|e| (e.status_code().as_u16(), e.cause));
            ex.finish_attempt(tracer, span, outcome);
        }
        result
    }

    async fn send_within(
        &self,
        req: Request<Body>,
        routed: Routed,
        is_upgrade: bool,
        per_try: Option<Duration>,
        ex: &mut Exchange,
    ) -> Result<Response<Body>, CauseError> {
        let send = self.send_once(req, routed, is_upgrade, ex);
        match per_try {
            None => send.await,
            Some(t) => tokio::time::timeout(t, send).await.unwrap_or_else(|_| {
                Err(CauseError::new(
                    Cause::Timeout,
                    format!("no response within the attempt timeout ({t:?})"),
                ))
            }),
        }
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
