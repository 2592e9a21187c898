//! Connections that stop being HTTP: protocol upgrades (WebSocket) and `CONNECT` tunnels.

use std::{net::SocketAddr, time::Duration};

use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::Body;
use crate::{errors::CauseError, io::Activity, tcp};

/// Once both sides have switched protocols, copies bytes between them as opaque TCP.
pub fn splice(client: OnUpgrade, upstream: OnUpgrade, idle_timeout: Duration) {
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!("upgrade did not complete: {e}");
                return;
            }
        };
        if let Err(e) =
            tcp::copy(TokioIo::new(client), TokioIo::new(upstream), idle_timeout, Activity::new()).await
        {
            tracing::debug!("upgraded connection ended: {e}");
        }
    });
}

/// Explicit-mode `CONNECT host:port`: dial the target, answer 200, then tunnel bytes.
pub async fn tunnel(
    mut req: Request<Body>,
    target: SocketAddr,
    connect_timeout: Duration,
    idle_timeout: Duration,
) -> Result<Response<Body>, CauseError> {
    let upstream = tcp::connect(target, connect_timeout).await?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(client) => {
                if let Err(e) = tcp::copy(TokioIo::new(client), upstream, idle_timeout, Activity::new()).await
                {
                    tracing::debug!(%target, "CONNECT tunnel ended: {e}");
                }
            }
            Err(e) => tracing::debug!(%target, "CONNECT upgrade failed: {e}"),
        }
    });
    Ok(Response::new(Empty::new().map_err(|n| match n {}).boxed()))
}
