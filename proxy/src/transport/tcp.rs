//! Opaque TCP: connect to the target and copy bytes both ways.
//!
//! Half-close is preserved (one side's EOF becomes a write shutdown on the other while
//! the reverse direction keeps flowing); a connection with no traffic either way for the
//! idle timeout is closed; bytes are counted towards the client.

use std::{net::SocketAddr, sync::atomic::Ordering, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::io::{Activity, MeteredIo};
use crate::{
    errors::{Cause, CauseError},
    metrics::{Direction, Label, Metrics},
};

/// The timeouts of an opaque connection.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// To establish the upstream connection (and its mTLS handshake).
    pub connect: Duration,
    /// With no bytes either way for this long, the connection is closed.
    pub idle: Duration,
}

/// Who an opaque stream's bytes are counted under: the direction and the mesh peer's
/// SPIFFE ID (the client's inbound, the upstream's outbound).
#[derive(Clone, Debug)]
pub struct Flow {
    pub dir: Direction,
    pub peer_identity: Label,
}

/// Opens a TCP connection to `addr`, failing with a classified cause.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, CauseError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(CauseError::new(Cause::from_io(&e), format!("connecting to {addr}: {e}"))),
        Err(_) => Err(CauseError::new(
            Cause::ConnectTimeout,
            format!("connecting to {addr}: no answer within {timeout:?}"),
        )),
    }
}

/// A mesh peer: the SPIFFE ID it must prove, and the TLS configuration that checks it
/// (with the ALPN that says what the connection carries).
pub struct MeshPeer {
    pub identity: Arc<str>,
    pub tls: Arc<rustls::ClientConfig>,
}

/// Any stream towards an upstream: plain TCP or mesh mTLS.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Connects to `target`, over mutual TLS when it is a mesh peer. Outbound handshakes
/// are counted; a failed one is a `tls-handshake` error naming the identity expected.
pub async fn dial(
    target: SocketAddr,
    peer: Option<&MeshPeer>,
    timeout: Duration,
    metrics: &Metrics,
) -> Result<Box<dyn Io>, CauseError> {
    let tcp = connect(target, timeout).await?;
    let Some(peer) = peer else { return Ok(Box::new(tcp)) };
    let res = tokio::time::timeout(timeout, super::tls::connect(tcp, peer.tls.clone())).await;
    metrics.tls_handshake(Direction::Outbound, matches!(res, Ok(Ok(_))));
    match res {
        Ok(Ok(tls)) => Ok(Box::new(tls)),
        Ok(Err(e)) => {
            Err(CauseError::new(Cause::TlsHandshake, format!("mTLS with {target} as {}: {e}", peer.identity)))
        }
        Err(_) => Err(CauseError::new(
            Cause::TlsHandshake,
            format!("mTLS with {target} as {}: no handshake within {timeout:?}", peer.identity),
        )),
    }
}

/// Copies between `client` and `upstream` until both sides are done or the connection
/// has been idle for `idle_timeout`. Returns (bytes from client, bytes to client);
/// `activity` sees the counts as they grow.
pub async fn copy<C, U>(
    client: C,
    mut upstream: U,
    idle_timeout: Duration,
    activity: Arc<Activity>,
) -> std::io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = MeteredIo::new(client, activity.clone());
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    loop {
        let idle_left = idle_timeout.saturating_sub(activity.idle_for());
        tokio::select! {
            res = &mut copy => return res,
            _ = tokio::time::sleep(idle_left) => {
                if activity.idle_for() >= idle_timeout {
                    return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "idle timeout"));
                }
            }
        }
    }
}

/// Forwards an accepted connection (with any bytes already read replayed by `client`)
/// to `target` as opaque TCP, inside mutual TLS when `target` is a mesh peer, recording
/// bytes and errors. `flow.peer_identity` is the client's SPIFFE ID on an inbound mesh
/// connection; outbound to a mesh peer, the peer's is used.
pub async fn forward<C>(
    client: C,
    target: SocketAddr,
    peer: Option<&MeshPeer>,
    mut flow: Flow,
    metrics: &Arc<Metrics>,
    timeouts: Timeouts,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    match dial(target, peer, timeouts.connect, metrics).await {
        Ok(upstream) => {
            if let Some(p) = peer {
                flow.peer_identity = Some(p.identity.clone());
            }
            splice(client, upstream, timeouts.idle, flow, metrics).await
        }
        Err(e) => metrics.closed(flow.dir, e.cause, format_args!("{target}: {e}")),
    }
}

/// [`copy`] with the client's bytes counted in metrics when the connection ends.
pub async fn splice<C, U>(client: C, upstream: U, idle_timeout: Duration, flow: Flow, metrics: &Metrics)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::new();
    match copy(client, upstream, idle_timeout, activity.clone()).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            tracing::debug!("closing connection idle for {idle_timeout:?}");
        }
        Err(e) => tracing::debug!("connection ended: {e}"),
    }
    let (read, written) = (activity.read.load(Ordering::Relaxed), activity.written.load(Ordering::Relaxed));
    metrics.tcp_bytes(flow.dir, flow.peer_identity, read, written);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn half_close_keeps_the_other_direction() {
        let (client, mut client_peer) = tokio::io::duplex(1024);
        let (upstream, mut upstream_peer) = tokio::io::duplex(1024);
        let task = tokio::spawn(copy(client, upstream, Duration::from_secs(5), Activity::new()));
        client_peer.write_all(b"request").await.unwrap();
        client_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");
        // The upstream answers after the client's half-close.
        upstream_peer.write_all(b"reply").await.unwrap();
        drop(upstream_peer);
        let mut got = Vec::new();
        client_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"reply");
        assert_eq!(task.await.unwrap().unwrap(), (7, 5));
    }

    #[tokio::test]
    async fn idle_connections_are_closed() {
        let (client, _client_peer) = tokio::io::duplex(1024);
        let (upstream, _upstream_peer) = tokio::io::duplex(1024);
        let err = copy(client, upstream, Duration::from_millis(50), Activity::new()).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn refused_connect_is_classified() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = connect(addr, Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(e.cause, Cause::UpstreamRefused);
    }
}
