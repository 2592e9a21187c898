//! Where an outbound request goes, decided once per request: the destination it names
//! (a service the mesh knows, or a name DNS resolves), the first rule of the service's
//! routes it matches, that rule's backend split, then its header changes and fault.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use weft_api::v1::{EndpointSet, KeyValue, Rule};

use super::{
    balance,
    discovery::{Discovery, Endpoint, NoAnswer, Resolved},
    routes::{self, RouteWatch, Routes},
};
use crate::{
    errors::{Cause, CauseError},
    http::{headers, Body},
    resolve::Resolver,
};

/// Where a request's attempts go.
pub enum Dest {
    /// One address: transparent mode's original destination or a DNS answer, with the
    /// SPIFFE ID it must prove when it is a mesh peer.
    Addr(Endpoint),
    /// A mesh service: each attempt gets an endpoint from the balancer of this authority.
    Service(String, Arc<EndpointSet>),
}

/// The rule of a service's routes that applies to a request.
pub struct RuleRef {
    routes: Arc<Routes>,
    index: usize,
}

impl RuleRef {
    pub fn rule(&self) -> &Rule {
        &self.routes.set.rules[self.index]
    }

    /// `<route>/<rule index>`: the rule's metric label.
    pub fn name(&self) -> &Arc<str> {
        &self.routes.names[self.index]
    }
}

pub struct Plan {
    pub dest: Dest,
    pub rule: Option<RuleRef>,
}

impl Plan {
    pub fn fixed(target: SocketAddr, identity: Option<Arc<str>>) -> Plan {
        Plan { dest: Dest::Addr(Endpoint { addr: target, identity }), rule: None }
    }
}

/// What explicit mode needs to plan a request.
pub struct Planner {
    pub discovery: Option<Arc<Discovery>>,
    pub routes: Option<Arc<RouteWatch>>,
    pub resolver: Resolver,
    /// This proxy's own listeners, to refuse requests that would loop back to it.
    pub own_addrs: Arc<Vec<SocketAddr>>,
    /// How long a request waits for a service with no endpoints to get one.
    pub queue_timeout: Duration,
}

impl Planner {
    /// Explicit mode: the destination comes from the request itself. A service the mesh
    /// knows is routed by its rules and balanced; another name goes where DNS says.
    pub async fn plan(&self, req: &Request<Body>) -> Result<Plan, CauseError> {
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
            match discovery.resolve(&key, self.queue_timeout).await {
                Resolved::Service(set) => return self.routed(discovery, key, set, req).await,
                Resolved::NotInMesh => {}
                Resolved::NoAnswer => return Err(NoAnswer(key).error()),
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

    /// Transparent mode, to a service's virtual address (`key`, the original destination
    /// `target`): routed and balanced exactly as the service's name would be. Should the
    /// address have left the mesh since the connection began, it goes as dialled.
    pub async fn plan_service(
        &self,
        key: &str,
        target: SocketAddr,
        req: &Request<Body>,
    ) -> Result<Plan, CauseError> {
        let Some(discovery) = &self.discovery else { return Ok(Plan::fixed(target, None)) };
        match discovery.resolve(key, self.queue_timeout).await {
            Resolved::Service(set) => self.routed(discovery, key.to_string(), set, req).await,
            Resolved::NotInMesh => Ok(Plan::fixed(target, None)),
            Resolved::NoAnswer => Err(NoAnswer(key.to_string()).error()),
        }
    }

    /// Transparent-mode TCP to a service's virtual address: its endpoints (or `target`
    /// itself, should the address have left the mesh).
    pub async fn service_dest(&self, key: &str, target: SocketAddr) -> Result<Dest, CauseError> {
        let Some(discovery) = &self.discovery else { return Ok(Plan::fixed(target, None).dest) };
        match discovery.resolve(key, self.queue_timeout).await {
            Resolved::Service(set) => Ok(Dest::Service(key.to_string(), set)),
            Resolved::NotInMesh => Ok(Plan::fixed(target, None).dest),
            Resolved::NoAnswer => Err(NoAnswer(key.to_string()).error()),
        }
    }

    /// A service the mesh knows: the first of its rules the request matches, and that
    /// rule's backend split.
    async fn routed(
        &self,
        discovery: &Discovery,
        key: String,
        set: Arc<EndpointSet>,
        req: &Request<Body>,
    ) -> Result<Plan, CauseError> {
        let routes = match &self.routes {
            Some(r) => r.get(&key).await,
            None => None,
        };
        let rule = routes.and_then(|routes| {
            let index = routes.matching(req)?;
            Some(RuleRef { routes, index })
        });
        let backend = rule
            .as_ref()
            .and_then(|r| routes::pick_backend(r.rule(), fastrand::u64(..)).map(|b| b.authority.clone()));
        let dest = match backend {
            None => Dest::Service(key, set),
            Some(b) => match discovery.resolve(&b, self.queue_timeout).await {
                Resolved::Service(set) => Dest::Service(b, set),
                Resolved::NotInMesh => return Err(balance::no_endpoints(&b, self.queue_timeout)),
                Resolved::NoAnswer => return Err(NoAnswer(b).error()),
            },
        };
        Ok(Plan { dest, rule })
    }

    /// Whether `target` is one of this proxy's listeners, however it is written: an
    /// IPv4-mapped IPv6 address, the unspecified address (which connects to this host),
    /// or loopback for a listener on all addresses. (A listener reached through another
    /// of the host's addresses is caught by the hop guard.)
    fn is_own_addr(&self, target: SocketAddr) -> bool {
        let target = crate::transport::orig_dst::canonical(target);
        let local = |ip: std::net::IpAddr| ip.is_unspecified() || ip.is_loopback();
        self.own_addrs.iter().map(|own| crate::transport::orig_dst::canonical(*own)).any(|own| {
            own.port() == target.port()
                && (own.ip() == target.ip()
                    || target.ip().is_unspecified()
                    || (own.ip().is_unspecified() && local(target.ip())))
        })
    }
}

/// The rule's header changes, then its fault: a delay, or an answer instead of the
/// service.
pub async fn apply_rule(rule: &Rule, req: &mut Request<Body>) -> Result<(), CauseError> {
    change_headers(
        req.headers_mut(),
        &rule.remove_request_headers,
        &rule.set_request_headers,
        &rule.add_request_headers,
    );
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

/// The rule's response header changes (Gateway API `ResponseHeaderModifier`).
pub fn apply_to_response<B>(rule: &Rule, rsp: &mut http::Response<B>) {
    change_headers(
        rsp.headers_mut(),
        &rule.remove_response_headers,
        &rule.set_response_headers,
        &rule.add_response_headers,
    );
}

/// Remove, then set (replace), then add (append), in the Gateway API's order.
fn change_headers(headers: &mut http::HeaderMap, remove: &[String], set: &[KeyValue], add: &[KeyValue]) {
    for h in remove {
        headers.remove(h.as_str());
    }
    for h in set {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(&h.name), HeaderValue::try_from(&h.value)) {
            headers.insert(name, value);
        }
    }
    for h in add {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(&h.name), HeaderValue::try_from(&h.value)) {
            headers.append(name, value);
        }
    }
}
