//! The inbound HTTP service: one request from a client to this pod's app. The port's
//! policy (taken when the connection was accepted) and rate limit first, then the head
//! size, the request's deadline, and one attempt to the app through the forwarder.

use std::{collections::BTreeSet, net::SocketAddr, sync::Arc, time::Instant};

use http::{HeaderValue, Request, Response};
use weft_api::v1::InboundPolicy;

use super::policy::{self, Policies};
use crate::{
    errors::{Cause, CauseError},
    http::{
        deadline,
        forwarder::{Forwarder, Target},
        headers,
        observe::{self, Exchange},
        service::{Common, Conn, Forward},
        upgrade, Body,
    },
    identity,
    metrics::Label,
    trace::Value,
    transport::tcp::{Flow, Timeouts},
};

pub struct Inbound {
    pub common: Common,
    pub forwarder: Forwarder,
    /// The control plane's policies; `None` standalone.
    pub policies: Option<Arc<Policies>>,
    /// This proxy's certificate, to terminate mesh mTLS; `None` standalone.
    pub identity: Option<identity::Current>,
    /// This proxy's workload, told to mesh clients on every answer.
    pub workload: Option<HeaderValue>,
    pub max_header_bytes: usize,
    pub tcp: Timeouts,
    /// The kubelet's probes of the app (see `Config::inbound_probes`).
    pub probes: BTreeSet<(u16, String)>,
}

/// What an inbound connection knows before its first request.
pub struct Meta {
    /// The app's address.
    pub target: SocketAddr,
    /// The client's SPIFFE ID, on mesh mTLS connections.
    pub peer_identity: Label,
    /// The port's policy when the connection was accepted; `None` standalone.
    pub policy: Option<Arc<InboundPolicy>>,
}

impl Forward for Inbound {
    type Meta = Meta;

    fn common(&self) -> &Common {
        &self.common
    }

    fn begin(&self, conn: &Conn<Meta>, req: &mut Request<Body>, ex: &mut Exchange) {
        ex.learn_peer(req.headers_mut(), conn.meta.peer_identity.as_ref(), &self.common.metrics);
        // The mesh's loop guard ends here; the app never sees it.
        req.headers_mut().remove(crate::outbound::hop::HOP);
        if let Some(span) = ex.traced.as_mut().and_then(|t| t.span_mut()) {
            span.set("client.address", Value::Ip(conn.client.ip()));
        }
    }

    async fn forward(
        &self,
        mut req: Request<Body>,
        conn: &Conn<Meta>,
        ex: &mut Exchange,
    ) -> Result<Response<Body>, CauseError> {
        self.admit(conn, &req)?;
        headers::check_head_size(&req, self.max_header_bytes)?;
        let upgrade = upgrade::wanted(&req);
        let is_connect = req.method() == http::Method::CONNECT;
        let client_upgrade = upgrade::prepare(&mut req, upgrade);
        let asked = if upgrade { None } else { deadline::from_headers_now(req.headers()) };
        ex.asked(asked);
        if let Some(d) = asked {
            deadline::stamp(req.headers_mut(), d, Instant::now());
        }
        let target = Target { addr: conn.meta.target, identity: None };
        let send = self.forwarder.send(req, &target, upgrade);
        let mut rsp = match asked {
            None => send.await?,
            Some(d) => {
                deadline::within(d, send, || {
                    "the request's deadline (grpc-timeout or weft-timeout-ms)".to_string()
                })
                .await?
            }
        };
        // Only a peer proxy may say who it is; an app cannot.
        rsp.headers_mut().remove(observe::PEER_WORKLOAD);
        let flow = Flow { dir: self.common.dir, peer_identity: ex.peer_identity.clone() };
        Ok(upgrade::finish(
            rsp,
            client_upgrade,
            is_connect,
            self.tcp.idle,
            flow,
            &self.common.metrics,
            conn.drain.clone(),
        ))
    }

    fn answered(&self, conn: &Conn<Meta>, rsp: &mut Response<Body>) {
        if let (Some(_), Some(w)) = (&conn.meta.peer_identity, &self.workload) {
            rsp.headers_mut().insert(observe::PEER_WORKLOAD, w.clone());
        }
    }
}

impl Inbound {
    /// The port's policy for this client, then its rate limit; the kubelet's probes of
    /// the app pass.
    fn admit(&self, conn: &Conn<Meta>, req: &Request<Body>) -> Result<(), CauseError> {
        let (Some(policy), Some(policies)) = (conn.meta.policy.as_deref(), self.policies.as_deref()) else {
            return Ok(());
        };
        let peer = conn.meta.peer_identity.as_deref();
        if peer.is_none() && self.is_probe(conn.meta.target.port(), req) {
            return Ok(());
        }
        if let Err(denied) = policy::check(policy, peer) {
            self.common.metrics.denied(conn.meta.peer_identity.clone(), "http");
            return Err(CauseError::new(Cause::Unauthorized, policy::refusal(policy, peer, denied)));
        }
        let Some(limiter) = policies.rate_limiter(policy) else { return Ok(()) };
        if limiter.admit(peer, Instant::now()) {
            return Ok(());
        }
        let who = peer.unwrap_or("plaintext clients");
        let msg = format!(
            "port {} is over its rate limit ({}/s, {}/s per client) for {who}; slow down and retry later",
            policy.port, limiter.cfg.requests_per_second, limiter.cfg.per_identity
        );
        Err(CauseError::new(Cause::RateLimited, msg))
    }

    /// A kubelet probe: GET or HEAD of a probe path of `port`, or the gRPC health check
    /// where it is one. Paths match exactly, query included, as the pod spec gives them.
    fn is_probe(&self, port: u16, req: &Request<Body>) -> bool {
        if self.probes.is_empty() {
            return false;
        }
        let Some(path) = req.uri().path_and_query().map(|p| p.as_str()) else { return false };
        let method_fits = match *req.method() {
            http::Method::GET | http::Method::HEAD => true,
            http::Method::POST => path == weft_api::env::GRPC_HEALTH_CHECK,
            _ => false,
        };
        // A few entries: a scan, with no key to allocate.
        method_fits && self.probes.iter().any(|(p, probe)| *p == port && probe == path)
    }
}
