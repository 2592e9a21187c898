//! From an accepted socket to a proxied connection: accept loop, then detect the
//! protocol and hand the connection to the HTTP server or the opaque TCP forwarder.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};

use crate::{
    config::Config,
    detect::{self, Outcome, Protocol},
    drain,
    errors::Cause,
    http::{
        self,
        proxy::{ConnCtx, HttpProxy},
    },
    io::PrefixedIo,
    metrics::Direction,
    tcp,
};

/// Where a connection's traffic goes.
#[derive(Clone, Copy, Debug)]
pub enum Dest {
    /// A fixed address: the original destination, or the app in explicit inbound mode.
    Fixed(SocketAddr),
    /// Each HTTP request names its destination (explicit outbound proxy mode).
    PerRequest,
}

/// Accepts connections until draining starts; each runs in its own task holding a
/// drain watch, so the drain waits for it.
pub async fn accept_loop<F, Fut>(listener: TcpListener, drain: drain::Watch, handle: F)
where
    F: Fn(TcpStream, SocketAddr, drain::Watch) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let (stream, peer) = tokio::select! {
            _ = drain.signaled() => return,
            res = listener.accept() => match res {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(handle(stream, crate::orig_dst::canonical(peer), drain.clone()));
    }
}

/// A peer proxy's mutual-TLS connection: terminate it, learn the client's identity, then
/// serve the HTTP/2 or opaque TCP stream inside it towards the app.
async fn serve_mesh(
    io: PrefixedIo<TcpStream>,
    client: SocketAddr,
    target: SocketAddr,
    proxy: Arc<HttpProxy>,
    cfg: Arc<Config>,
    drain: drain::Watch,
) {
    let dir = proxy.dir;
    let creds = proxy.identity.as_ref().and_then(|c| c.borrow().clone());
    let Some(creds) = creds else {
        tracing::info!(%client, cause = Cause::NoIdentity.as_str(), "closing mesh connection: no certificate yet");
        return proxy.metrics.tcp_error(dir, Cause::NoIdentity);
    };
    let server_cfg = match creds.server_config() {
        Ok(c) => c,
        Err(e) => return tracing::error!("cannot build the TLS server configuration: {e}"),
    };
    let tls = match tokio::time::timeout(
        cfg.http.header_read_timeout,
        tokio_rustls::TlsAcceptor::from(server_cfg).accept(io),
    )
    .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(%client, cause = Cause::TlsHandshake.as_str(), "mesh TLS handshake failed: {e}");
            proxy.metrics.tls_handshake(dir, false);
            return proxy.metrics.tcp_error(dir, Cause::TlsHandshake);
        }
        Err(_) => {
            proxy.metrics.tls_handshake(dir, false);
            return proxy.metrics.tcp_error(dir, Cause::TlsHandshake);
        }
    };
    proxy.metrics.tls_handshake(dir, true);
    let peer = crate::tls::peer_identity(tls.get_ref().1);
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    tracing::debug!(%client, peer = peer.as_deref().unwrap_or("-"), "mesh connection");
    let protocol = match alpn.as_deref() {
        Some(crate::tls::ALPN_HTTP) => "h2",
        Some(crate::tls::ALPN_H1) => "http1",
        _ => {
            if admitted(&proxy, target, peer.as_deref()).await {
                let timeouts = (cfg.connect_timeout, cfg.tcp_idle_timeout);
                tcp::forward(tls, target, (None, peer.as_deref()), dir, &proxy.metrics, timeouts).await
            }
            return;
        }
    };
    let policy = policy_for(&proxy, target).await;
    let ctx = ConnCtx {
        client,
        target: Some(target),
        protocol,
        peer_identity: peer,
        target_identity: None,
        policy,
        resets: Default::default(),
    };
    http::server::serve(tls, ctx, proxy, &cfg.http, drain).await
}

/// The policy of the app port `target` names, when the proxy has a control plane.
async fn policy_for(proxy: &HttpProxy, target: SocketAddr) -> Option<Arc<weft_api::v1::InboundPolicy>> {
    Some(proxy.policies.as_ref()?.get(target.port()).await)
}

/// For opaque TCP: whether the port's policy admits the client; a refused one is
/// counted, logged, and its connection closed.
async fn admitted(proxy: &HttpProxy, target: SocketAddr, peer: Option<&str>) -> bool {
    let Some(policy) = policy_for(proxy, target).await else { return true };
    match crate::policy::check(&policy, peer) {
        Ok(()) => true,
        Err(denied) => {
            tracing::info!(
                port = target.port(),
                client_identity = peer.unwrap_or("-"),
                cause = Cause::Unauthorized.as_str(),
                "closing connection refused by policy ({denied:?})"
            );
            proxy.metrics.denied(peer, "tcp");
            proxy.metrics.tcp_error(proxy.dir, Cause::Unauthorized);
            false
        }
    }
}

/// Detects the protocol of one connection and proxies it to `dest`.
pub async fn serve(
    stream: TcpStream,
    client: SocketAddr,
    dest: Dest,
    proxy: Arc<HttpProxy>,
    cfg: Arc<Config>,
    drain: drain::Watch,
) {
    let dir = proxy.dir;
    let metrics = proxy.metrics.clone();
    let _open = metrics.conn_open(dir);
    // Transparent outbound to an endpoint discovery knows as meshed: mutual TLS.
    let target_identity = match dest {
        Dest::Fixed(target) => proxy.mesh_identity_of(target).await,
        Dest::PerRequest => None,
    };
    let forward_tcp = |io, target| {
        let (proxy, metrics, cfg, identity) = (&proxy, &metrics, &cfg, target_identity.as_deref());
        async move {
            let peer = match identity.map(|id| proxy.mesh_peer(id, crate::tls::ALPN_TCP)).transpose() {
                Ok(peer) => peer,
                Err(e) => {
                    tracing::info!(cause = e.cause.as_str(), %target, "closing connection: {}", e.message);
                    return metrics.tcp_error(dir, e.cause);
                }
            };
            let timeouts = (cfg.connect_timeout, cfg.tcp_idle_timeout);
            tcp::forward(io, target, (peer.as_ref(), None), dir, metrics, timeouts).await
        }
    };

    if let Dest::Fixed(target) = dest {
        if cfg.opaque_ports.contains(&target.port()) {
            metrics.detected(dir, Outcome::OpaquePort);
            if !admitted(&proxy, target, None).await {
                return;
            }
            return forward_tcp(PrefixedIo::new(Default::default(), stream), target).await;
        }
    }
    let mut stream = stream;
    let detected = match detect::detect(&mut stream, cfg.detect_timeout, cfg.http.header_read_timeout).await {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(%client, "connection failed during detection: {e}");
            return;
        }
    };
    metrics.detected(dir, detected.outcome);
    let io = PrefixedIo::new(detected.buffered, stream);
    let fixed = match dest {
        Dest::Fixed(t) => Some(t),
        Dest::PerRequest => None,
    };
    match (detected.protocol, fixed) {
        (proto @ (Protocol::Http1 | Protocol::Http2), _) => {
            let protocol = if proto == Protocol::Http2 { "h2" } else { "http1" };
            let policy = match fixed {
                Some(target) => policy_for(&proxy, target).await,
                None => None,
            };
            let ctx = ConnCtx {
                client,
                target: fixed,
                protocol,
                peer_identity: None,
                target_identity: target_identity.clone(),
                policy,
                resets: Default::default(),
            };
            http::server::serve(io, ctx, proxy, &cfg.http, drain).await
        }
        (Protocol::Tls { mesh: true, .. }, Some(target))
            if dir == Direction::Inbound && proxy.identity.is_some() =>
        {
            serve_mesh(io, client, target, proxy, cfg, drain).await
        }
        (Protocol::Tls { sni, .. }, Some(target)) => {
            tracing::debug!(%client, %target, sni = sni.as_deref().unwrap_or("-"), "forwarding TLS as opaque TCP");
            if admitted(&proxy, target, None).await {
                forward_tcp(io, target).await
            }
        }
        (Protocol::Opaque, Some(target)) => {
            if admitted(&proxy, target, None).await {
                forward_tcp(io, target).await
            }
        }
        (_, None) => {
            tracing::info!(
                direction = dir.as_str(), %client, cause = Cause::ProtocolUnknown.as_str(),
                "closing connection: not HTTP and not redirected, so it has no destination"
            );
            metrics.tcp_error(dir, Cause::ProtocolUnknown);
        }
    }
}
