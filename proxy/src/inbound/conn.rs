//! One inbound connection: opaque port → TCP; else detect the protocol: HTTP to the
//! inbound service, a peer proxy's mTLS to `mesh`, anything else as opaque TCP, each
//! after the port's policy.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{
    mesh,
    policy::{admitted, Policies},
    service::{Inbound, Meta},
};
use crate::{
    config::Config,
    drain, http,
    http::service::Conn,
    metrics::Direction,
    transport::{
        self,
        detect::{Outcome, Protocol},
        io::PrefixedIo,
        tcp::{self, Flow},
    },
};

const DIR: Direction = Direction::Inbound;

pub async fn serve(
    stream: TcpStream,
    client: SocketAddr,
    target: SocketAddr,
    inbound: Arc<Inbound>,
    cfg: Arc<Config>,
    drain: drain::Watch,
) {
    let metrics = inbound.common.metrics.clone();
    let _open = metrics.conn_open(DIR);
    let policies = inbound.policies.as_deref();
    let plain = Flow { dir: DIR, peer_identity: None };
    if cfg.opaque_ports.contains(&target.port()) {
        metrics.detected(DIR, Outcome::OpaquePort.as_str());
        if admitted(policies, target, None, &metrics).await {
            let io = PrefixedIo::new(Default::default(), stream);
            tcp::forward(io, target, None, plain, &metrics, inbound.tcp).await
        }
        return;
    }
    let timeouts = (cfg.detect_timeout, cfg.http.header_read_timeout);
    let Some((protocol, io)) = transport::detect_protocol(stream, DIR, &metrics, timeouts).await else {
        return;
    };
    match protocol {
        proto @ (Protocol::Http1 | Protocol::Http2) => {
            let protocol = if proto == Protocol::Http2 { "h2" } else { "http1" };
            let policy = Policies::of(policies, target).await;
            let conn = Conn::new(client, protocol, Meta { target, peer_identity: None, policy });
            http::server::serve(io, conn, inbound, &cfg.http, drain).await
        }
        Protocol::Tls { mesh: true, .. } if inbound.identity.is_some() => {
            mesh::serve(io, client, target, inbound, cfg, drain).await
        }
        Protocol::Tls { sni, .. } => {
            tracing::debug!(%client, %target, sni = sni.as_deref().unwrap_or("-"), "forwarding TLS as opaque TCP");
            if admitted(policies, target, None, &metrics).await {
                tcp::forward(io, target, None, plain, &metrics, inbound.tcp).await
            }
        }
        Protocol::Opaque => {
            if admitted(policies, target, None, &metrics).await {
                tcp::forward(io, target, None, plain, &metrics, inbound.tcp).await
            }
        }
    }
}
