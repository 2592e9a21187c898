//! A peer proxy's mutual-TLS connection: terminate it, learn the client's SPIFFE ID,
//! then serve the HTTP/2 (or HTTP/1 upgrade) or opaque TCP stream inside it towards
//! the app, under the port's policy for that identity.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{
    policy::{admitted, Policies},
    service::{Inbound, Meta},
};
use crate::{
    config::Config,
    drain,
    errors::Cause,
    http::{self, service::Conn},
    metrics::Direction,
    transport::{
        io::PrefixedIo,
        tcp::{self, Flow},
        tls,
    },
};

const DIR: Direction = Direction::Inbound;

pub async fn serve(
    io: PrefixedIo<TcpStream>,
    client: SocketAddr,
    target: SocketAddr,
    inbound: Arc<Inbound>,
    cfg: Arc<Config>,
    drain: drain::Watch,
) {
    let metrics = inbound.common.metrics.clone();
    let creds = inbound.identity.as_ref().and_then(|c| c.borrow().clone());
    let Some(creds) = creds else {
        let why = format_args!("mesh connection from {client}: no certificate yet");
        return metrics.closed(DIR, Cause::NoIdentity, why);
    };
    let server_cfg = match creds.server_config() {
        Ok(c) => c,
        Err(e) => return tracing::error!("cannot build the TLS server configuration: {e}"),
    };
    let accept = tokio_rustls::TlsAcceptor::from(server_cfg).accept(io);
    let tls = match tokio::time::timeout(cfg.http.header_read_timeout, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            metrics.tls_handshake(DIR, false);
            return metrics.closed(DIR, Cause::TlsHandshake, format_args!("mesh TLS from {client}: {e}"));
        }
        Err(_) => {
            metrics.tls_handshake(DIR, false);
            let why = format_args!(
                "mesh TLS from {client}: no handshake within {:?}",
                cfg.http.header_read_timeout
            );
            return metrics.closed(DIR, Cause::TlsHandshake, why);
        }
    };
    metrics.tls_handshake(DIR, true);
    let peer = tls::peer_identity(tls.get_ref().1).map(|id| metrics.intern(&id));
    tracing::debug!(%client, peer = peer.as_deref().unwrap_or("-"), "mesh connection");
    let protocol = match tls.get_ref().1.alpn_protocol() {
        Some(tls::ALPN_HTTP) => "h2",
        Some(tls::ALPN_H1) => "http1",
        _ => {
            let policies = inbound.policies.as_deref();
            if admitted(policies, target, peer.clone(), &metrics).await {
                let flow = Flow { dir: DIR, peer_identity: peer };
                tcp::forward(tls, target, None, flow, &metrics, inbound.tcp).await
            }
            return;
        }
    };
    let policy = Policies::of(inbound.policies.as_deref(), target).await;
    let conn = Conn::new(client, protocol, Meta { target, peer_identity: peer, policy });
    Box::pin(http::server::serve(tls, conn, inbound, &cfg.http, drain)).await
}
