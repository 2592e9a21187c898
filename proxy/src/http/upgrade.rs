//! Connections that stop being HTTP: protocol upgrades (WebSocket) and `CONNECT` tunnels.
//! Once switched, they are opaque TCP: idle timeout, half-close and byte counts apply.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::{Method, Request, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::{headers, Body};
use crate::{
    body,
    errors::CauseError,
    metrics::Metrics,
    transport::tcp::{self, Flow, MeshPeer, Timeouts},
};

/// A request that asks to switch protocols (`Upgrade`, or `CONNECT`).
pub fn wanted(req: &Request<Body>) -> bool {
    headers::wants_upgrade(req) || req.method() == Method::CONNECT
}

/// Prepares a request for the next hop: hop-by-hop headers go (an upgrade keeps what the
/// next hop needs to switch), and an upgrade's client side is taken for later.
pub fn prepare(req: &mut Request<Body>, upgrade: bool) -> Option<OnUpgrade> {
    headers::strip_hop_by_hop(req.headers_mut(), upgrade);
    upgrade.then(|| hyper::upgrade::on(req))
}

/// The response for the client. When the upstream switched protocols (101, or 2xx to a
/// `CONNECT`), both sides are spliced as opaque TCP and the client gets the head alone.
pub fn finish(
    mut rsp: Response<Body>,
    client: Option<OnUpgrade>,
    is_connect: bool,
    idle_timeout: Duration,
    flow: Flow,
    metrics: &Arc<Metrics>,
    drain: Option<crate::drain::Watch>,
) -> Response<Body> {
    let switched =
        rsp.status() == StatusCode::SWITCHING_PROTOCOLS || (is_connect && rsp.status().is_success());
    let Some(client) = client.filter(|_| switched) else {
        headers::strip_hop_by_hop(rsp.headers_mut(), false);
        return rsp;
    };
    let upstream = hyper::upgrade::on(&mut rsp);
    let metrics = metrics.clone();
    tokio::spawn(async move {
        // Held while the tunnel lasts: a drain waits for it (within its grace period).
        let _drain = drain;
        match tokio::try_join!(client, upstream) {
            Ok((client, upstream)) => {
                let (client, upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                tcp::splice(client, upstream, idle_timeout, flow, &metrics).await
            }
            Err(e) => tracing::debug!("upgrade did not complete: {e}"),
        }
    });
    let (mut parts, _) = rsp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, true);
    Response::from_parts(parts, body::empty())
}

/// Explicit-mode `CONNECT host:port`: dial the target (inside mutual TLS when it is a
/// mesh peer), answer 200, then tunnel bytes.
pub async fn tunnel(
    mut req: Request<Body>,
    target: SocketAddr,
    peer: Option<MeshPeer>,
    timeouts: Timeouts,
    mut flow: Flow,
    metrics: Arc<Metrics>,
    drain: Option<crate::drain::Watch>,
) -> Result<Response<Body>, CauseError> {
    let upstream = tcp::dial(target, peer.as_ref(), timeouts.connect, &metrics).await?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    if let Some(p) = &peer {
        flow.peer_identity = Some(p.identity.clone());
    }
    tokio::spawn(async move {
        let _drain = drain;
        match on_upgrade.await {
            Ok(client) => tcp::splice(TokioIo::new(client), upstream, timeouts.idle, flow, &metrics).await,
            Err(e) => tracing::debug!(%target, "CONNECT upgrade failed: {e}"),
        }
    });
    Ok(Response::new(body::empty()))
}
