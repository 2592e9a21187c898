//! One attempt of one request to one address, over the right hop: plain HTTP/1 or
//! HTTP/2, HTTP/1 carried over HTTP/2 between proxies, or mutual TLS to a mesh peer.
//! Both directions send through a `Forwarder` (each shard and direction has its own, so
//! its pools are never contended); what comes before (policy, routes, balancing,
//! retries) is the direction's.

use std::{net::SocketAddr, sync::Arc};

use http::{header, HeaderValue, Request, Response, Uri, Version};
use ipnet::IpNet;

use super::{headers, observe, pool::Pool, Body};
use crate::{
    errors::{Cause, CauseError},
    identity,
    transport::{tcp::MeshPeer, tls},
};

/// Where one attempt goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub addr: SocketAddr,
    /// The SPIFFE ID the peer must prove when it is a mesh peer; `None` outside the mesh.
    pub identity: Option<Arc<str>>,
}

/// How a request travels to its upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    /// To a peer proxy over mutual TLS; HTTP/1 rides HTTP/2 as in `H1OverH2`.
    Mesh,
    /// An upgrade to a peer proxy: HTTP/1 over mutual TLS on a connection of its own.
    MeshH1,
    H2,
    H1,
    /// An HTTP/1 request carried over HTTP/2 to a peer proxy, marked with `weft-orig-proto`.
    H1OverH2,
}

/// What the hop choice looks at.
#[derive(Clone, Copy, Debug)]
pub struct HopInput {
    pub h2: bool,
    /// The request came from a peer proxy over HTTP/2 marked `weft-orig-proto: HTTP/1.1`.
    pub carried_h1: bool,
    pub mesh_peer: bool,
    pub upgrade: bool,
    /// The target is in `WEFT_MESH_NETWORKS` (peer proxies without a control plane).
    pub mesh_network: bool,
}

/// The hop for a request: mesh peers get mTLS (upgrades on a connection of their own);
/// a carried HTTP/1 request is restored; HTTP/1 to a peer network rides HTTP/2.
pub fn choose(i: HopInput) -> Hop {
    match i {
        HopInput { mesh_peer: true, upgrade: false, .. } => Hop::Mesh,
        HopInput { mesh_peer: true, upgrade: true, .. } => Hop::MeshH1,
        HopInput { h2: true, carried_h1: true, .. } => Hop::H1,
        HopInput { h2: true, .. } => Hop::H2,
        HopInput { upgrade: false, mesh_network: true, .. } => Hop::H1OverH2,
        _ => Hop::H1,
    }
}

pub struct Forwarder {
    pool: Pool,
    /// Outbound: networks of peer proxies reached over HTTP/2 without mTLS
    /// (`WEFT_MESH_NETWORKS`). Inbound: none, the app is not a proxy.
    mesh_networks: Vec<IpNet>,
    /// This proxy's certificate, when it has a control plane.
    identity: Option<identity::Current>,
    /// This proxy's workload, as told to mesh peers in `weft-peer-workload`.
    workload: Option<HeaderValue>,
}

impl Forwarder {
    pub fn new(
        pool: Pool,
        mesh_networks: Vec<IpNet>,
        identity: Option<identity::Current>,
        workload: Option<HeaderValue>,
    ) -> Self {
        Forwarder { pool, mesh_networks, identity, workload }
    }

    /// A mesh peer that must prove `identity`, for a connection carrying `alpn`.
    pub fn mesh_peer(&self, identity: &Arc<str>, alpn: &'static [u8]) -> Result<MeshPeer, CauseError> {
        let creds = self.identity.as_ref().and_then(|c| c.borrow().clone()).ok_or_else(|| {
            CauseError::new(
                Cause::NoIdentity,
                "this proxy has no certificate yet; check WEFT_CONTROL_ADDR and its log",
            )
        })?;
        let tls = creds
            .client_config(identity, alpn)
            .map_err(|e| CauseError::new(Cause::TlsHandshake, e.to_string()))?;
        Ok(MeshPeer { identity: identity.clone(), tls })
    }

    pub fn hop(&self, req: &Request<Body>, target: &Target, upgrade: bool) -> Hop {
        choose(HopInput {
            h2: req.version() == Version::HTTP_2,
            carried_h1: req.headers().get(headers::ORIG_PROTO).is_some_and(|v| v == "HTTP/1.1"),
            mesh_peer: target.identity.is_some(),
            upgrade,
            mesh_network: self.mesh_networks.iter().any(|n| n.contains(&target.addr.ip())),
        })
    }

    /// Sends `req` to `target` once.
    pub async fn send(
        &self,
        mut req: Request<Body>,
        target: &Target,
        upgrade: bool,
    ) -> Result<Response<Body>, CauseError> {
        let hop = self.hop(&req, target, upgrade);
        let addr = target.addr;
        let peer = match (hop, &target.identity) {
            (Hop::Mesh, Some(id)) => Some(self.mesh_peer(id, tls::ALPN_HTTP)?),
            (Hop::MeshH1, Some(id)) => Some(self.mesh_peer(id, tls::ALPN_H1)?),
            _ => None,
        };
        if peer.is_some() {
            match &self.workload {
                Some(w) => req.headers_mut().insert(observe::PEER_WORKLOAD, w.clone()),
                None => req.headers_mut().remove(observe::PEER_WORKLOAD),
            };
        }
        // Only the hop choice above reads it; it never travels further.
        req.headers_mut().remove(headers::ORIG_PROTO);
        match (hop, peer) {
            (Hop::Mesh, Some(peer)) => {
                if req.version() != Version::HTTP_2 {
                    carry_h1_over_h2(&mut req, addr)?;
                }
                self.pool.send_h2(addr, Some(&peer), req).await
            }
            (Hop::MeshH1, Some(peer)) => {
                set_host(&mut req, addr)?;
                self.pool.send_h1_mesh(addr, &peer, req).await
            }
            (Hop::H2, _) => self.pool.send_h2(addr, None, req).await,
            (Hop::H1OverH2, _) => {
                carry_h1_over_h2(&mut req, addr)?;
                self.pool.send_h2(addr, None, req).await
            }
            _ => {
                set_host(&mut req, addr)?;
                self.pool.send_h1(addr, req).await
            }
        }
    }
}

/// Rewrites an HTTP/1 request for an HTTP/2 hop between proxies: the authority moves
/// into the URI and `weft-orig-proto` tells the peer to restore HTTP/1.
fn carry_h1_over_h2(req: &mut Request<Body>, target: SocketAddr) -> Result<(), CauseError> {
    let authority = authority_or(req, target);
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let s = format!("http://{authority}{pq}");
    *req.uri_mut() = Uri::try_from(&s)
        .map_err(|e| CauseError::new(Cause::BadRequest, format!("invalid request target {s:?}: {e}")))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> HopInput {
        HopInput { h2: false, carried_h1: false, mesh_peer: false, upgrade: false, mesh_network: false }
    }

    #[test]
    fn hop_choice() {
        assert_eq!(choose(input()), Hop::H1);
        assert_eq!(choose(HopInput { h2: true, ..input() }), Hop::H2);
        // A peer proxy carried an HTTP/1 request: the app gets HTTP/1 back.
        assert_eq!(choose(HopInput { h2: true, carried_h1: true, ..input() }), Hop::H1);
        // Mesh peers: mTLS, whatever the client spoke; upgrades on their own connection.
        assert_eq!(choose(HopInput { mesh_peer: true, ..input() }), Hop::Mesh);
        assert_eq!(choose(HopInput { mesh_peer: true, h2: true, ..input() }), Hop::Mesh);
        assert_eq!(choose(HopInput { mesh_peer: true, upgrade: true, ..input() }), Hop::MeshH1);
        // Plaintext peer networks: HTTP/1 rides HTTP/2, except upgrades.
        assert_eq!(choose(HopInput { mesh_network: true, ..input() }), Hop::H1OverH2);
        assert_eq!(choose(HopInput { mesh_network: true, upgrade: true, ..input() }), Hop::H1);
        assert_eq!(choose(HopInput { mesh_network: true, h2: true, ..input() }), Hop::H2);
    }

    #[test]
    fn forwarder_reads_the_hop_from_the_request() {
        let metrics = crate::metrics::Metrics::new();
        let cfg = crate::config::Config::from_env(&std::collections::HashMap::<&str, &str>::new()).unwrap();
        let pool = Pool::new(&cfg.http, cfg.connect_timeout, metrics);
        let fwd = Forwarder::new(pool, vec!["10.0.0.0/8".parse().unwrap()], None, None);
        let peer = Target { addr: "10.1.2.3:80".parse().unwrap(), identity: None };
        let app = Target { addr: "127.0.0.1:80".parse().unwrap(), identity: None };
        let req = Request::builder().uri("/").body(crate::body::empty()).unwrap();
        assert_eq!(fwd.hop(&req, &peer, false), Hop::H1OverH2);
        assert_eq!(fwd.hop(&req, &app, false), Hop::H1);
        let carried = Request::builder()
            .version(Version::HTTP_2)
            .header(headers::ORIG_PROTO, "HTTP/1.1")
            .body(crate::body::empty())
            .unwrap();
        assert_eq!(fwd.hop(&carried, &app, false), Hop::H1);
    }

    #[test]
    fn http1_rides_http2_with_its_authority_in_the_uri() {
        let mut req = Request::builder()
            .uri("/words?n=2")
            .header(header::HOST, "words.default:8080")
            .body(crate::body::empty())
            .unwrap();
        carry_h1_over_h2(&mut req, "10.0.0.5:4143".parse().unwrap()).unwrap();
        assert_eq!(req.uri(), "http://words.default:8080/words?n=2");
        assert!(req.headers().get(header::HOST).is_none());
        assert_eq!(req.headers()[headers::ORIG_PROTO], "HTTP/1.1");
        // No authority at all: the target names it.
        let mut req = Request::builder().uri("/").body(crate::body::empty()).unwrap();
        carry_h1_over_h2(&mut req, "10.0.0.5:4143".parse().unwrap()).unwrap();
        assert_eq!(req.uri(), "http://10.0.0.5:4143/");
    }
}
