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
    discovery::{Destination, NoAnswer},
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
    // Transparent mode: a service's virtual address is balanced and routed as the
    // service; an endpoint discovery knows as meshed gets mutual TLS.
    let destination = match dest {
        Some(target) => outbound.destination(target).await,
        None => Ok(Destination::Endpoint(None)),
    };
    if let Some(target) = dest.filter(|t| cfg.opaque_ports.contains(&t.port())) {
        metrics.detected(DIR, Outcome::OpaquePort.as_str());
        let io = PrefixedIo::new(Default::default(), stream);
        return forward_tcp(&outbound, io, target, &destination).await;
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
        let Ok((addr, peer)) = tcp_target(&outbound, target, &destination).await else { return };
        let upstream = match tcp::dial(addr, peer.as_ref(), outbound.tcp.connect, &metrics).await {
            Ok(upstream) => upstream,
            Err(e) => return metrics.closed(DIR, e.cause, format_args!("{addr}: {e}")),
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
    // Boxed, as inbound: the task holds only the way of serving it uses.
    match (protocol, dest) {
        (proto @ (Protocol::Http1 | Protocol::Http2), _) => {
            let protocol = if proto == Protocol::Http2 { "h2" } else { "http1" };
            let conn = Conn::new(client, protocol, Meta { target: dest, destination });
            Box::pin(http::server::serve(io, conn, outbound, &cfg.http, drain)).await
        }
        (Protocol::Tls { sni, .. }, Some(target)) => {
            tracing::debug!(%client, %target, sni = sni.as_deref().unwrap_or("-"), "forwarding TLS as opaque TCP");
            Box::pin(forward_tcp(&outbound, io, target, &destination)).await
        }
        (Protocol::Opaque, Some(target)) => Box::pin(forward_tcp(&outbound, io, target, &destination)).await,
        (Protocol::Silent, _) => {}
        (_, None) => {
            let why = format_args!("{client}: not HTTP and not redirected, so it has no destination");
            metrics.closed(DIR, Cause::ProtocolUnknown, why)
        }
    }
}

/// Where a TCP connection to `target` goes and the mTLS peer that must answer there: one
/// of the service's endpoints (per connection) for a service's virtual address, else
/// `target` itself. `Err` (closed and counted) when it cannot be reached safely: no
/// discovery answer, no endpoint, or no certificate.
async fn tcp_target(
    outbound: &Outbound,
    target: SocketAddr,
    destination: &Result<Destination, NoAnswer>,
) -> Result<(SocketAddr, Option<MeshPeer>), ()> {
    let metrics = &outbound.common.metrics;
    let (addr, identity) = match destination {
        Err(e) => {
            metrics.closed(DIR, Cause::NoDiscovery, format_args!("{}", e.error()));
            return Err(());
        }
        Ok(Destination::Endpoint(identity)) => (target, identity.clone()),
        Ok(Destination::Service(key)) => {
            let endpoint = match outbound.planner.service_dest(key, target).await {
                Ok(dest) => outbound.attempts.endpoint(&dest, &[]),
                Err(e) => Err(e),
            };
            match endpoint {
                Ok(e) => (e.addr, e.identity),
                Err(e) => {
                    metrics.closed(DIR, e.cause, format_args!("{target}: {}", e.message));
                    return Err(());
                }
            }
        }
    };
    let forwarder = &outbound.attempts.forwarder;
    let peer = identity.map(|id| forwarder.mesh_peer(&id, tls::ALPN_TCP)).transpose();
    let peer = peer.map_err(|e| metrics.closed(DIR, e.cause, format_args!("{addr}: {}", e.message)))?;
    Ok((addr, peer))
}

async fn forward_tcp(
    outbound: &Outbound,
    io: PrefixedIo<TcpStream>,
    target: SocketAddr,
    destination: &Result<Destination, NoAnswer>,
) {
    let Ok((addr, peer)) = tcp_target(outbound, target, destination).await else { return };
    let flow = Flow { dir: DIR, peer_identity: None };
    tcp::forward(io, addr, peer.as_ref(), flow, &outbound.common.metrics, outbound.tcp).await
}
