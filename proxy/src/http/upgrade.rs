//! Connections that stop being HTTP: protocol upgrades (WebSocket) and `CONNECT` tunnels.
//! Once switched, they are opaque TCP: idle timeout, half-close and byte counts apply.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::Body;
use crate::{
    errors::CauseError,
    metrics::{Direction, Metrics},
    tcp::{self, MeshPeer},
};

/// Once both sides have switched protocols, copies bytes between them.
pub fn splice(
    client: OnUpgrade,
    upstream: OnUpgrade,
    idle_timeout: Duration,
    (dir, peer_identity): (Direction, Option<String>),
    metrics: Arc<Metrics>,
) {
    tokio::spawn(async move {
        match tokio::try_join!(client, upstream) {
            Ok((client, upstream)) => {
                let (client, upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                tcp::splice(client, upstream, idle_timeout, (dir, peer_identity.as_deref()), &metrics).await
            }
            Err(e) => tracing::debug!("upgrade did not complete: {e}"),
        }
    });
}

/// Explicit-mode `CONNECT host:port`: dial the target (inside mutual TLS when it is a
/// mesh peer), answer 200, then tunnel bytes.
pub async fn tunnel(
    mut req: Request<Body>,
    target: SocketAddr,
    peer: Option<MeshPeer>,
    (connect_timeout, idle_timeout): (Duration, Duration),
    dir: Direction,
    metrics: Arc<Metrics>,
) -> Result<Response<Body>, CauseError> {
    let upstream = tcp::dial(target, peer.as_ref(), connect_timeout, &metrics).await?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let flow = (dir, peer.as_ref().map(|p| p.identity.as_str()));
        match on_upgrade.await {
            Ok(client) => tcp::splice(TokioIo::new(client), upstream, idle_timeout, flow, &metrics).await,
            Err(e) => tracing::debug!(%target, "CONNECT upgrade failed: {e}"),
        }
    });
    Ok(Response::new(Empty::new().map_err(|n| match n {}).boxed()))
}
