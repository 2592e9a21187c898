//! The outbound HTTP service: one request from this pod's app to its upstream. The
//! head size, then the plan (the fixed destination of a redirected connection, or the
//! request's own authority: discovery, routes), `CONNECT` tunnels, the rule's redirect
//! (answered here), header changes, fault and rewrite, then the attempts, then the rule's
//! response header changes.

use std::net::SocketAddr;

use http::{Method, Request, Response};

use super::{
    attempts::Attempts,
    discovery::{Destination, NoAnswer},
    hop::HopGuard,
    plan::{self, Plan, Planner},
    rewrite,
};
use crate::{
    errors::CauseError,
    http::{
        deadline, headers,
        observe::Exchange,
        service::{Common, Conn, Forward},
        upgrade, Body,
    },
    transport::{
        tcp::{Flow, Timeouts},
        tls,
    },
};

pub struct Outbound {
    pub common: Common,
    pub hop: HopGuard,
    pub planner: Planner,
    pub attempts: Attempts,
    pub max_header_bytes: usize,
    pub tcp: Timeouts,
}

/// What an outbound connection knows before its first request.
pub struct Meta {
    /// Where every request goes on a redirected connection; `None`: route each request
    /// by its authority (explicit proxy mode).
    pub target: Option<SocketAddr>,
    /// What discovery says `target` is (a service's virtual address, or one endpoint and
    /// the SPIFFE ID it must prove); an error when discovery has not answered (every
    /// request is refused, 503).
    pub destination: Result<Destination, NoAnswer>,
}

impl Outbound {
    /// Transparent mode: what the original destination `target` is (see [`Destination`]).
    pub async fn destination(&self, target: SocketAddr) -> Result<Destination, NoAnswer> {
        match self.planner.discovery.as_deref() {
            Some(discovery) => discovery.destination(target).await,
            None => Ok(Destination::Endpoint(None)),
        }
    }
}

impl Forward for Outbound {
    type Meta = Meta;

    fn common(&self) -> &Common {
        &self.common
    }

    fn begin(&self, _conn: &Conn<Meta>, req: &mut Request<Body>, _ex: &mut Exchange) {
        // Only a peer proxy may ask for HTTP/1 to be restored (inbound); an app cannot.
        req.headers_mut().remove(headers::ORIG_PROTO);
    }

    async fn forward(
        &self,
        mut req: Request<Body>,
        conn: &Conn<Meta>,
        ex: &mut Exchange,
    ) -> Result<Response<Body>, CauseError> {
        headers::check_head_size(&req, self.max_header_bytes)?;
        self.hop.pass(req.headers_mut())?;
        let plan = match (conn.meta.target, &conn.meta.destination) {
            (None, _) => self.planner.plan(&req).await?,
            (Some(_), Err(e)) => return Err(e.error()),
            (Some(t), Ok(Destination::Service(key))) => self.planner.plan_service(key, t, &req).await?,
            (Some(t), Ok(Destination::Endpoint(identity))) => Plan::fixed(t, identity.clone()),
        };
        let is_connect = req.method() == Method::CONNECT;
        if is_connect && conn.meta.target.is_none() {
            return self.tunnel(req, &plan, conn.drain.clone()).await;
        }
        if let Some(rule) = &plan.rule {
            ex.route = Some(rule.name().clone());
            if let Some(r) = &rule.rule().redirect {
                return Ok(rewrite::redirect(r, rule.rule(), &req));
            }
            plan::apply_rule(rule.rule(), &mut req).await?;
            if let Some(r) = &rule.rule().rewrite {
                rewrite::rewrite(r, rule.rule(), &mut req);
            }
        }
        let upgrade = upgrade::wanted(&req);
        let client_upgrade = upgrade::prepare(&mut req, upgrade);
        let asked = if upgrade { None } else { deadline::from_headers_now(req.headers()) };
        ex.asked(asked);
        let mut rsp = self.attempts.run(req, &plan, upgrade, asked, ex).await?;
        if let Some(rule) = &plan.rule {
            plan::apply_to_response(rule.rule(), &mut rsp);
        }
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
}

impl Outbound {
    /// Explicit-mode `CONNECT`: a tunnel to one endpoint; to a mesh peer it is one
    /// opaque stream inside mutual TLS.
    async fn tunnel(
        &self,
        req: Request<Body>,
        plan: &Plan,
        drain: Option<crate::drain::Watch>,
    ) -> Result<Response<Body>, CauseError> {
        let endpoint = self.attempts.endpoint(&plan.dest, &[])?;
        let forwarder = &self.attempts.forwarder;
        let mesh = endpoint.identity.as_ref().map(|id| forwarder.mesh_peer(id, tls::ALPN_TCP)).transpose()?;
        let flow = Flow { dir: self.common.dir, peer_identity: None };
        upgrade::tunnel(req, endpoint.addr, mesh, self.tcp, flow, self.common.metrics.clone(), drain).await
    }
}
