//! The HTTP forwarding service: one request from a client to its upstream.
//!
//! Order of work per request: strict checks → pick the destination → rewrite headers
//! for the next hop (hop-by-hop removal, HTTP/1 ↔ HTTP/2 between proxies) → send →
//! hand back the response, or a proxy-made error with `weft-error`.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Instant,
};

use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use ipnet::IpNet;

use super::{
    client::Client,
    headers,
    observe::{self, Exchange},
    retry::Budgets,
    route::Plan,
    upgrade, Body,
};
use crate::{
    balance::{Attempt, Balancer},
    errors::{Cause, CauseError},
    metrics::{Direction, Metrics, Peer},
    resolve::Resolver,
    tcp::MeshPeer,
    trace::Tracer,
};

/// What a connection knows before its first request.
#[derive(Debug)]
pub struct ConnCtx {
    pub client: SocketAddr,
    /// Where every request goes, when the connection has a fixed destination
    /// (transparent mode, or inbound to the app). `None`: route each request by its
    /// authority (explicit proxy mode).
    pub target: Option<SocketAddr>,
    /// `http1` or `h2`, as the client speaks it.
    pub protocol: &'static str,
    /// The client's SPIFFE ID, on mesh mTLS connections.
    pub peer_identity: Option<String>,
    /// Outbound to a fixed target that discovery knows as a mesh peer: the SPIFFE ID
    /// that peer must prove.
    pub target_identity: Option<String>,
    /// The inbound port's policy, taken when the connection was accepted.
    pub policy: Option<Arc<weft_api::v1::InboundPolicy>>,
    pub resets: ResetWatch,
}

/// Envoy's premature-reset rule against HTTP/2 rapid reset (CVE-2023-44487): a client
/// that cancels at least half of its first hundred or more requests before they are
/// answered is abusing the connection, which is then closed. h2's own limit only
/// counts streams reset before they were accepted; this also covers streams the proxy
/// had already started forwarding.
#[derive(Debug, Default)]
pub struct ResetWatch {
    streams: AtomicU32,
    premature: AtomicU32,
    pub abusive: tokio::sync::Notify,
}

const RESET_MIN_STREAMS: u32 = 100;

impl ResetWatch {
    fn started(&self) -> StreamGuard<'_> {
        self.streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard { watch: self, answered: false }
    }
}

/// Dropped with `answered == false` when hyper drops the request future: the client
/// reset the stream (or went away) before the proxy answered.
struct StreamGuard<'a> {
    watch: &'a ResetWatch,
    answered: bool,
}

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let premature = self.watch.premature.fetch_add(1, Ordering::Relaxed) + 1;
        let streams = self.watch.streams.load(Ordering::Relaxed);
        if streams >= RESET_MIN_STREAMS && premature * 2 >= streams {
            self.watch.abusive.notify_one();
        }
    }
}

pub struct HttpProxy {
    pub dir: Direction,
    pub client: Client,
    pub resolver: Resolver,
    pub metrics: Arc<Metrics>,
    pub max_header_bytes: usize,
    pub tcp_idle_timeout: std::time::Duration,
    pub connect_timeout: std::time::Duration,
    pub mesh_networks: Vec<IpNet>,
    /// This proxy's own listeners, to refuse requests that would loop back to it.
    pub own_addrs: Vec<SocketAddr>,
    pub access_log: bool,
    /// This proxy's certificate, when it has a control plane.
    pub identity: Option<crate::identity::Current>,
    pub discovery: Option<Arc<crate::discovery::Discovery>>,
    /// Inbound only: the control plane's policies.
    pub policies: Option<Arc<crate::policy::Policies>>,
    /// Outbound: one balancer per service authority, for this shard.
    pub balancers: std::sync::Mutex<std::collections::HashMap<String, Balancer>>,
    /// How long a request waits for a service with no endpoints to get one.
    pub queue_timeout: std::time::Duration,
    /// Outbound: the control plane's routes.
    pub routes: Option<Arc<crate::routes::Routes>>,
    /// Outbound: retry budgets per route rule, shared by all shards.
    pub budgets: Arc<Budgets>,
    /// Outbound: requests in flight per service, shared by all shards.
    pub in_flight: Arc<crate::limits::InFlight>,
    /// Span recording and export; `None` when tracing is off.
    pub tracer: Option<Arc<Tracer>>,
    /// This proxy's workload, as told to mesh peers in `weft-peer-workload`.
    pub workload: Option<HeaderValue>,
}

impl HttpProxy {
    /// The hyper service entry point: never fails, errors become responses.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: Arc<ConnCtx>,
    ) -> Result<Response<Body>, Infallible> {
        let start = Instant::now();
        let mut guard = conn.resets.started();
        // Cheap clones (shared bytes) kept for the log line, formatted only if one is written.
        let (method, uri, host) =
            (req.method().clone(), req.uri().clone(), req.headers().get(header::HOST).cloned());
        let mut req = req.map(|b| b.map_err(Into::into).boxed());
        let tracer = self.tracer.as_deref();
        let mut ex = Exchange::begin(tracer, self.dir, &mut req);
        if self.dir == Direction::Inbound {
            ex.learn_peer(req.headers_mut(), conn.peer_identity.as_deref());
            if let Some(span) = ex.traced.as_mut().and_then(|t| t.span_mut()) {
                span.set("client.address", crate::trace::Value::Ip(conn.client.ip()));
            }
        }

        let result =
            match conn.policy.as_deref().map(|p| crate::policy::check(p, conn.peer_identity.as_deref())) {
                Some(Err(denied)) => {
                    self.metrics.denied(conn.peer_identity.as_deref(), "http");
                    let who = conn.peer_identity.as_deref().unwrap_or("a plaintext client");
                    Err(CauseError::new(
                        Cause::Unauthorized,
                        format!("the port's policy does not admit {who} ({denied:?})"),
                    ))
                }
                _ => match self.rate_limited(&conn) {
                    Some(e) => Err(e),
                    None => self.forward(req, &conn, &mut ex).await,
                },
            };
        let (mut rsp, cause) = match result {
            Ok(rsp) => (rsp, None),
            Err(e) => {
                let (authority, path) = log_target(&uri, host.as_ref());
                tracing::info!(
                    direction = self.dir.as_str(), cause = e.cause.as_str(), client = %conn.client,
                    %method, authority, path, "proxy error: {}", e.message
                );
                (e.respond(), Some(e.cause))
            }
        };
        if let (Direction::Inbound, Some(_), Some(w)) = (self.dir, &conn.peer_identity, &self.workload) {
            rsp.headers_mut().insert(observe::PEER_WORKLOAD, w.clone());
        }
        let elapsed = start.elapsed();
        let status = rsp.status().as_u16();
        let peer = Peer {
            route: ex.route.as_deref(),
            workload: ex.peer_workload.as_deref(),
            identity: ex.peer_identity.as_deref(),
        };
        self.metrics.response(self.dir, conn.protocol, status, cause, peer, elapsed.as_secs_f64());
        let trace_id = if self.access_log { ex.trace_id() } else { None };
        ex.finish(self.tracer.as_ref(), cause, &mut rsp);
        if self.access_log {
            let (authority, path) = log_target(&uri, host.as_ref());
            let bytes =
                rsp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).unwrap_or("-");
            tracing::info!(
                target: "weft::access",
                direction = self.dir.as_str(), client = %conn.client, %method, authority, path,
                status = rsp.status().as_u16(), duration_ms = elapsed.as_secs_f64() * 1e3,
                bytes, cause = cause.map(Cause::as_str).unwrap_or("-"),
                trace_id = trace_id.as_deref().unwrap_or("-"),
            );
        }
        guard.answered = true;
        Ok(rsp)
    }

    /// Inbound: the error when the port's rate limit refuses this request.
    fn rate_limited(&self, conn: &ConnCtx) -> Option<CauseError> {
        let (policy, policies) = (conn.policy.as_deref()?, self.policies.as_ref()?);
        let limiter = policies.rate_limiter(policy)?;
        if limiter.admit(conn.peer_identity.as_deref(), Instant::now()) {
            return None;
        }
        let who = conn.peer_identity.as_deref().unwrap_or("plaintext clients");
        let msg = format!(
            "port {} is over its rate limit ({}/s, {}/s per client) for {who}; slow down and retry later",
            policy.port, limiter.cfg.requests_per_second, limiter.cfg.per_identity
        );
        Some(CauseError::new(Cause::RateLimited, msg))
    }

    async fn forward(
        &self,
        mut req: Request<Body>,
        conn: &ConnCtx,
        ex: &mut Exchange,
    ) -> Result<Response<Body>, CauseError> {
        if headers::head_size(&req) > self.max_header_bytes {
            let msg = format!(
                "request head is larger than {} bytes (WEFT_MAX_HEADER_BYTES)",
                self.max_header_bytes
            );
            return Err(CauseError::new(Cause::HeaderTooLarge, msg));
        }
        let plan = match conn.target {
            Some(t) => Plan::fixed(t, conn.target_identity.clone()),
            None => self.plan(&req).await?,
        };
        let is_connect = req.method() == Method::CONNECT;
        if is_connect && conn.target.is_none() {
            // To a mesh peer the tunnel is one opaque stream inside mutual TLS.
            let (target, peer, _) = self.endpoint(&plan.dest, &[])?;
            let mesh = peer.as_deref().map(|id| self.mesh_peer(id, crate::tls::ALPN_TCP)).transpose()?;
            let (dir, metrics) = (self.dir, self.metrics.clone());
            let timeouts = (self.connect_timeout, self.tcp_idle_timeout);
            return upgrade::tunnel(req, target, mesh, timeouts, dir, metrics).await;
        }
        if let Some(rule) = plan.rule() {
            ex.route = Some(rule.name.clone());
            self.apply_rule(rule, &mut req).await?;
        }
        let is_upgrade = headers::wants_upgrade(&req) || is_connect;
        headers::strip_hop_by_hop(req.headers_mut(), is_upgrade);
        let client_upgrade = is_upgrade.then(|| hyper::upgrade::on(&mut req));

        let asked =
            if is_upgrade { None } else { super::deadline::from_headers(req.headers(), Instant::now()) };
        let mut rsp = self.attempts(req, &plan, is_upgrade, asked, ex).await?;

        let switched =
            rsp.status() == StatusCode::SWITCHING_PROTOCOLS || (is_connect && rsp.status().is_success());
        if let Some(client_upgrade) = client_upgrade.filter(|_| switched) {
            let upstream_upgrade = hyper::upgrade::on(&mut rsp);
            upgrade::splice(
                client_upgrade,
                upstream_upgrade,
                self.tcp_idle_timeout,
                (self.dir, ex.peer_identity.clone()),
                self.metrics.clone(),
            );
            let (mut parts, _) = rsp.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers, true);
            return Ok(Response::from_parts(
                parts,
                http_body_util::Empty::new().map_err(|n| match n {}).boxed(),
            ));
        }
        headers::strip_hop_by_hop(rsp.headers_mut(), false);
        Ok(rsp)
    }

    /// Sends a request to one endpoint over the right hop; a balanced request counts in
    /// its endpoint's load until the response head.
    pub(super) async fn send_once(
        &self,
        mut req: Request<Body>,
        (target, peer, balanced): Routed,
        is_upgrade: bool,
        ex: &mut Exchange,
    ) -> Result<Response<Body>, CauseError> {
        let hop = match &peer {
            Some(identity) if !is_upgrade => Hop::Mesh(self.mesh_peer(identity, crate::tls::ALPN_HTTP)?),
            Some(identity) => Hop::MeshH1(self.mesh_peer(identity, crate::tls::ALPN_H1)?),
            None => self.hop(&req, target, is_upgrade),
        };
        if matches!(hop, Hop::Mesh(_) | Hop::MeshH1(_)) {
            match &self.workload {
                Some(w) => req.headers_mut().insert(observe::PEER_WORKLOAD, w.clone()),
                None => req.headers_mut().remove(observe::PEER_WORKLOAD),
            };
        }
        // Only the hop choice above reads it; it never travels further.
        req.headers_mut().remove(headers::ORIG_PROTO);
        let send: Attempt<'_> = Box::pin(async move {
            match hop {
                Hop::H2 => self.client.send_h2(target, None, req).await,
                Hop::H1OverH2 => {
                    carry_h1_over_h2(&mut req, target)?;
                    self.client.send_h2(target, None, req).await
                }
                Hop::Mesh(peer) => {
                    if req.version() != Version::HTTP_2 {
                        carry_h1_over_h2(&mut req, target)?;
                    }
                    self.client.send_h2(target, Some(&peer), req).await
                }
                Hop::MeshH1(peer) => {
                    set_host(&mut req, target)?;
                    self.client.send_h1_mesh(target, &peer, req).await
                }
                Hop::H1 => {
                    set_host(&mut req, target)?;
                    self.client.send_h1(target, req).await
                }
            }
        });
        let result = match balanced {
            None => send.await,
            Some((authority, endpoint)) => self.send_balanced(send, &authority, &endpoint).await,
        };
        result.map(|mut rsp| {
            ex.learn_peer(rsp.headers_mut(), peer.as_deref());
            rsp
        })
    }

    /// `send` counted in its endpoint's load, and its outcome in outlier detection.
    async fn send_balanced(
        &self,
        send: Attempt<'_>,
        authority: &str,
        endpoint: &crate::discovery::Endpoint,
    ) -> Result<Response<Body>, CauseError> {
        let dispatched = match self.balancers.lock().expect("balancers lock").get_mut(authority) {
            Some(b) => b.dispatch(endpoint, send),
            None => send,
        };
        let result = dispatched.await;
        // Outlier detection: 5xx and failures to get a response count against the endpoint.
        let ok = match &result {
            Ok(rsp) => !rsp.status().is_server_error(),
            Err(e) => !e.cause.blames_endpoint(),
        };
        let event = self
            .balancers
            .lock()
            .expect("balancers lock")
            .get_mut(authority)
            .and_then(|b| b.record(endpoint, ok));
        if let Some(event) = event {
            tracing::info!(service = authority, endpoint = %endpoint.addr, "outlier detection: {event:?}");
            self.metrics.outlier(authority, &event);
        }
        result
    }

    /// The protocol of the next hop.
    fn hop(&self, req: &Request<Body>, target: SocketAddr, is_upgrade: bool) -> Hop {
        match (self.dir, req.version() == Version::HTTP_2) {
            // A peer proxy carried this HTTP/1 request over HTTP/2: restore HTTP/1 for the app.
            (Direction::Inbound, true)
                if req.headers().get(headers::ORIG_PROTO).is_some_and(|v| v == "HTTP/1.1") =>
            {
                Hop::H1
            }
            (_, true) => Hop::H2,
            // Between proxies, HTTP/1 rides on multiplexed HTTP/2 (upgrades cannot).
            (Direction::Outbound, false)
                if !is_upgrade && self.mesh_networks.iter().any(|n| n.contains(&target.ip())) =>
            {
                Hop::H1OverH2
            }
            (_, false) => Hop::H1,
        }
    }

    /// A mesh peer that must prove `identity`, for a connection carrying `alpn`.
    pub fn mesh_peer(&self, identity: &str, alpn: &'static [u8]) -> Result<MeshPeer, CauseError> {
        let creds = self.identity.as_ref().and_then(|c| c.borrow().clone()).ok_or_else(|| {
            CauseError::new(
                Cause::NoIdentity,
                "this proxy has no certificate yet; check WEFT_CONTROL_ADDR and its log",
            )
        })?;
        let tls = creds
            .client_config(identity, alpn)
            .map_err(|e| CauseError::new(Cause::TlsHandshake, e.to_string()))?;
        Ok(MeshPeer { identity: identity.to_string(), tls })
    }

    /// Outbound, transparent mode: the SPIFFE ID that the endpoint at `target` must
    /// prove, when discovery knows it as meshed (asked by address, as the app dialled it).
    pub async fn mesh_identity_of(&self, target: SocketAddr) -> Option<String> {
        if self.dir != Direction::Outbound {
            return None;
        }
        self.discovery.as_ref()?.identity_at(target).await
    }

    pub(super) fn is_own_addr(&self, target: SocketAddr) -> bool {
        self.own_addrs.iter().any(|own| {
            own.port() == target.port()
                && (own.ip() == target.ip() || (own.ip().is_unspecified() && target.ip().is_loopback()))
        })
    }
}

/// Where a request goes: the target, the identity it must prove when it is a mesh peer,
/// and, when a balancer chose it, the balancer's key and the endpoint.
pub type Routed = (SocketAddr, Option<String>, Option<(String, crate::discovery::Endpoint)>);

/// How a request travels to its upstream.
enum Hop {
    /// To a peer proxy over mutual TLS; HTTP/1 rides HTTP/2 as in `H1OverH2`.
    Mesh(MeshPeer),
    /// An upgrade to a peer proxy: HTTP/1 over mutual TLS on a connection of its own.
    MeshH1(MeshPeer),
    H2,
    H1,
    /// An HTTP/1 request carried over HTTP/2 to a peer proxy, marked with `weft-orig-proto`.
    H1OverH2,
}

/// Rewrites an HTTP/1 request for an HTTP/2 hop between proxies: the authority moves
/// into the URI and `weft-orig-proto` tells the peer to restore HTTP/1.
fn carry_h1_over_h2(req: &mut Request<Body>, target: SocketAddr) -> Result<(), CauseError> {
    let authority = authority_or(req, target);
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    *req.uri_mut() = uri(&format!("http://{authority}{pq}"))?;
    req.headers_mut().remove(header::HOST);
    req.headers_mut().insert(headers::ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
    Ok(())
}

/// An HTTP/1 upstream needs `Host`: the authority the client addressed, or the target.
fn set_host(req: &mut Request<Body>, target: SocketAddr) -> Result<(), CauseError> {
    if !req.headers().contains_key(header::HOST) {
        let host = HeaderValue::try_from(authority_or(req, target))
            .map_err(|_| CauseError::new(Cause::BadRequest, "request authority is not a valid Host"))?;
        req.headers_mut().insert(header::HOST, host);
    }
    Ok(())
}

/// The authority the client addressed, or the target address when it named none.
fn authority_or<B>(req: &Request<B>, target: SocketAddr) -> String {
    headers::authority(req).map_or_else(|| target.to_string(), |a| a.to_string())
}

/// Authority and path of a request for log lines; never a query string, which may hold secrets.
fn log_target<'a>(uri: &'a Uri, host: Option<&'a HeaderValue>) -> (&'a str, &'a str) {
    let authority =
        uri.authority().map(|a| a.as_str()).or_else(|| host.and_then(|h| h.to_str().ok())).unwrap_or("-");
    (authority, uri.path())
}

fn uri(s: &str) -> Result<Uri, CauseError> {
    Uri::try_from(s)
        .map_err(|e| CauseError::new(Cause::BadRequest, format!("invalid request target {s:?}: {e}")))
}
