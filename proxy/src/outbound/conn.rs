//! One outbound connection. Redirected (`dest` is the original destination): opaque
//! ports and anything not HTTP go as TCP, inside mTLS when discovery knows the address
//! as a mesh peer; a client silent through the detect window meets the destination, and
//! whichever speaks first decides. Explicit mode (`dest` is `None`): only HTTP, each
//! request routed; there is no server-first protocol to wait for, so the client gets the
//! header-read timeout to start.

use std::{net::SocketAddr, sync::Arc};

use bytes::BytesMut;
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
        detect::{Limits, Outcome, Protocol},
        io::PrefixedIo,
        tcp::{self, Flow, MeshPeer},
        tls, Speaker,
    },
};

const DIR: Direction = Direction::Outbound;

pub async fn serve(
    mut stream: TcpStream,
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
    let header_read = cfg.http.header_read_timeout;
    let first_byte = if dest.is_some() { cfg.detect_timeout } else { header_read };
    let mut limits = Limits { first_byte, complete: header_read, max_head: cfg.http.max_header_bytes };
    let Some((mut protocol, mut buffered)) =
        transport::detect_protocol(&mut stream, DIR, &metrics, limits).await
    else {
        return;
    };
    if let (Protocol::Silent, Some(target)) = (&protocol, dest) {
        let peer = match mesh_peer(&outbound, target, &target_identity) {
            Ok(peer) => peer,
            Err(()) => return,
        };
        let upstream = match tcp::dial(target, peer.as_ref(), outbound.tcp.connect, &metrics).await {
            Ok(upstream) => upstream,
            Err(e) => return metrics.closed(DIR, e.cause, format_args!("{target}: {e}")),
        };
        match transport::first_speaker(&stream, upstream, header_read).await {
            Some(Speaker::Client) => {}
            Some(Speaker::Server(upstream)) => {
                metrics.detected(DIR, Outcome::Silent.as_str());
                let flow = Flow { dir: DIR, peer_identity: peer.map(|p| p.identity) };
                let client = PrefixedIo::new(BytesMut::new(), stream);
                return tcp::splice(client, upstream, outbound.tcp.idle, flow, &metrics).await;
            }
            None => return metrics.detected(DIR, Outcome::Silent.as_str()),
        }
        limits.first_byte = header_read;
        (protocol, buffered) = match transport::detect_protocol(&mut stream, DIR, &metrics, limits).await {
            Some(detected) => detected,
            None => return,
        };
    }
    let io = PrefixedIo::new(buffered, stream);
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
        (Protocol::Silent, _) => {}
        (_, None) => {
            let why = format_args!("{client}: not HTTP and not redirected, so it has no destination");
            metrics.closed(DIR, Cause::ProtocolUnknown, why)
        }
    }
}

/// The mTLS peer `target` is, if discovery says it is meshed; `Err` (closed and
/// counted) when it cannot be reached safely: no discovery answer, or no certificate.
fn mesh_peer(
    outbound: &Outbound,
    target: SocketAddr,
    identity: &Result<Option<Arc<str>>, NoAnswer>,
) -> Result<Option<MeshPeer>, ()> {
    let metrics = &outbound.common.metrics;
    let identity = match identity {
        Ok(identity) => identity,
        Err(e) => {
            metrics.closed(DIR, Cause::NoDiscovery, format_args!("{}", e.error()));
            return Err(());
        }
    };
    let forwarder = &outbound.attempts.forwarder;
    identity.as_ref().map(|id| forwarder.mesh_peer(id, tls::ALPN_TCP)).transpose().map_err(|e| {
        metrics.closed(DIR, e.cause, format_args!("{target}: {}", e.message));
    })
}

async fn forward_tcp(
    outbound: &Outbound,
    io: PrefixedIo<TcpStream>,
    target: SocketAddr,
    identity: Result<Option<Arc<str>>, NoAnswer>,
) {
    let Ok(peer) = mesh_peer(outbound, target, &identity) else { return };
    let flow = Flow { dir: DIR, peer_identity: None };
    tcp::forward(io, target, peer.as_ref(), flow, &outbound.common.metrics, outbound.tcp).await
}
