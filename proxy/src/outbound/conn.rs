//! One outbound connection. Redirected (`dest` is the original destination): opaque
//! ports and anything not HTTP go as TCP, inside mTLS when discovery knows the address
//! as a mesh peer. Explicit mode (`dest` is `None`): only HTTP, each request routed.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{
    discovery::NoAnswer,
    service::{Meta, Outbound},
};
use crate::{
    config::Config,
    drain,
    errors::Cause,
    http::{self, service::Conn},
    metrics::Direction,
    transport::{
        self,
        detect::{Outcome, Protocol},
        io::PrefixedIo,
        tcp::{self, Flow},
        tls,
    },
};

const DIR: Direction = Direction::Outbound;

pub async fn serve(
    stream: TcpStream,
    client: SocketAddr,
    dest: Option<SocketAddr>,
    outbound: Arc<Outbound>,
    cfg: Arc<Config>,
    drain: drain::Watch,
) {
    let metrics = outbound.common.metrics.clone();
    let _open = metrics.conn_open(DIR);
    // Transparent mode to an endpoint discovery knows as meshed: mutual TLS.
    let target_identity = match dest {
        Some(target) => outbound.identity_at(target).await,
        None => Ok(None),
    };
    if let Some(target) = dest.filter(|t| cfg.opaque_ports.contains(&t.port())) {
        metrics.detected(DIR, Outcome::OpaquePort.as_str());
        let io = PrefixedIo::new(Default::default(), stream);
        return forward_tcp(&outbound, io, target, target_identity).await;
    }
    let timeouts = (cfg.detect_timeout, cfg.http.header_read_timeout);
    let Some((protocol, io)) = transport::detect_protocol(stream, DIR, &metrics, timeouts).await else {
        return;
    };
    match (protocol, dest) {
        (proto @ (Protocol::Http1 | Protocol::Http2), _) => {
            let protocol = if proto == Protocol::Http2 { "h2" } else { "http1" };
            let conn = Conn::new(client, protocol, Meta { target: dest, target_identity });
            http::server::serve(io, conn, outbound, &cfg.http, drain).await
        }
        (Protocol::Tls { sni, .. }, Some(target)) => {
            tracing::debug!(%client, %target, sni = sni.as_deref().unwrap_or("-"), "forwarding TLS as opaque TCP");
            forward_tcp(&outbound, io, target, target_identity).await
        }
        (Protocol::Opaque, Some(target)) => forward_tcp(&outbound, io, target, target_identity).await,
        (_, None) => {
            let why = format_args!("{client}: not HTTP and not redirected, so it has no destination");
            metrics.closed(DIR, Cause::ProtocolUnknown, why)
        }
    }
}

async fn forward_tcp(
    outbound: &Outbound,
    io: PrefixedIo<TcpStream>,
    target: SocketAddr,
    identity: Result<Option<Arc<str>>, NoAnswer>,
) {
    let metrics = &outbound.common.metrics;
    let identity = match identity {
        Ok(identity) => identity,
        Err(e) => return metrics.closed(DIR, Cause::NoDiscovery, format_args!("{}", e.error())),
    };
    let forwarder = &outbound.attempts.forwarder;
    let peer = match identity.map(|id| forwarder.mesh_peer(&id, tls::ALPN_TCP)).transpose() {
        Ok(peer) => peer,
        Err(e) => return metrics.closed(DIR, e.cause, format_args!("{target}: {}", e.message)),
    };
    let flow = Flow { dir: DIR, peer_identity: None };
    tcp::forward(io, target, peer.as_ref(), flow, metrics, outbound.tcp).await
}
