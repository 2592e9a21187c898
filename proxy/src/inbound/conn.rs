//! One inbound connection: opaque port → TCP; else detect the protocol: HTTP to the
//! inbound service, a peer proxy's mTLS to `mesh`, anything else as opaque TCP, each
//! after the port's policy. A client silent through the detect window meets the app:
//! whichever speaks first decides (server-first protocols never stall, slow clients are
//! still detected).

use std::{net::SocketAddr, sync::Arc};

use bytes::BytesMut;
use tokio::net::TcpStream;

use super::{
    mesh,
    policy::{admits_plaintext, admitted, Policies},
    service::{Inbound, Meta},
};
use crate::{
    config::Config,
    drain, http,
    http::service::Conn,
    metrics::Direction,
    transport::{
        self,
        detect::{Limits, Outcome, Protocol},
        io::PrefixedIo,
        tcp::{self, Flow},
        Speaker,
    },
};

const DIR: Direction = Direction::Inbound;

pub async fn serve(
    mut stream: TcpStream,
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
    let header_read = cfg.http.header_read_timeout;
    let mut limits =
        Limits { first_byte: cfg.detect_timeout, complete: header_read, max_head: cfg.http.max_header_bytes };
    let Some((mut protocol, mut buffered)) =
        transport::detect_protocol(&mut stream, DIR, &metrics, limits).await
    else {
        return;
    };
    if protocol == Protocol::Silent {
        // The app may speak first only where an opaque plaintext stream is allowed at all.
        let speaker = match admits_plaintext(policies, target).await {
            true => match tcp::dial(target, None, inbound.tcp.connect, &metrics).await {
                Ok(upstream) => transport::first_speaker(&stream, upstream, header_read).await,
                Err(e) => return metrics.closed(DIR, e.cause, format_args!("{target}: {e}")),
            },
            false => tokio::time::timeout(header_read, stream.readable()).await.ok().map(|_| Speaker::Client),
        };
        match speaker {
            Some(Speaker::Client) => {}
            Some(Speaker::Server(upstream)) => {
                metrics.detected(DIR, Outcome::Silent.as_str());
                if admitted(policies, target, None, &metrics).await {
                    let client = PrefixedIo::new(BytesMut::new(), stream);
                    tcp::splice(client, upstream, inbound.tcp.idle, plain, &metrics).await
                }
                return;
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
    // Each way of serving is boxed: a connection's task then holds only the one it
    // uses, not room for the largest (a keep-alive connection lives long, idle).
    match protocol {
        proto @ (Protocol::Http1 | Protocol::Http2) => {
            let protocol = if proto == Protocol::Http2 { "h2" } else { "http1" };
            let policy = Policies::of(policies, target).await;
            let conn = Conn::new(client, protocol, Meta { target, peer_identity: None, policy });
            Box::pin(http::server::serve(io, conn, inbound, &cfg.http, drain)).await
        }
        Protocol::Tls { mesh: true, .. } if inbound.identity.is_some() => {
            Box::pin(mesh::serve(io, client, target, inbound, cfg, drain)).await
        }
        Protocol::Tls { sni, .. } => {
            tracing::debug!(%client, %target, sni = sni.as_deref().unwrap_or("-"), "forwarding TLS as opaque TCP");
            if admitted(policies, target, None, &metrics).await {
                tcp::forward(io, target, None, plain, &metrics, inbound.tcp).await
            }
        }
        // Silent twice: the client never spoke.
        Protocol::Opaque | Protocol::Silent => {
            if protocol == Protocol::Opaque && admitted(policies, target, None, &metrics).await {
                tcp::forward(io, target, None, plain, &metrics, inbound.tcp).await
            }
        }
    }
}
