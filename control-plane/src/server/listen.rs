//! What keeps the control plane's listeners (gRPC, webhook, admin) from being held open
//! by whoever can reach them: each holds at most so many connections (beyond, a
//! connection is closed as it arrives and counted), and the gRPC one closes a connection
//! that has not sent HTTP/2's preface within the handshake timeout. Silent and half-sent
//! connections cannot pile up and take the descriptors the proxies' watches need.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::Stream;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Descriptors kept back from the gRPC listener: the admin port, the webhook, the
/// Kubernetes API's connections, logs.
const FD_RESERVE: usize = 256;

/// The gRPC listener's default cap: the descriptors left after the reserve, at least 64.
/// Each proxy holds one or a few connections, so this is how many proxies one replica
/// serves.
pub fn default_max_connections() -> usize {
    weft_api::accept::open_files_limit().saturating_sub(FD_RESERVE).max(64)
}

/// Connections closed as they arrived or before they spoke gRPC
/// (`weft_control_connections_refused_total{listener, reason}`).
#[derive(Clone, Default)]
pub struct Refused(Family<RefusedLabels, Counter>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    listener: &'static str,
    /// `full`: the listener held its cap; `silent`: no preface within the handshake
    /// timeout; `not-http2`: the first bytes were not HTTP/2's preface.
    reason: &'static str,
}

impl Refused {
    pub fn register(registry: &mut Registry) -> Refused {
        let refused = Refused::default();
        registry.register(
            "connections_refused",
            "Connections closed as they arrived (the listener was full) or before they spoke (silent, or not HTTP/2)",
            refused.0.clone(),
        );
        refused
    }

    pub fn count(&self, listener: &'static str, reason: &'static str) {
        self.0.get_or_create(&RefusedLabels { listener, reason }).inc();
    }
}

/// A listener's cap on open connections; `admit` closes what is beyond it.
#[derive(Clone)]
pub struct Cap {
    name: &'static str,
    open: Arc<Semaphore>,
    refused: Refused,
}

impl Cap {
    pub fn new(name: &'static str, max: usize, refused: Refused) -> Cap {
        Cap { name, open: Arc::new(Semaphore::new(max)), refused }
    }

    /// A share of the cap for one accepted connection, held while it lives; `None` (and
    /// counted): the listener is full, and dropping the connection closes it.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.open.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.refused.count(self.name, "full");
        }
        permit
    }
}

/// The gRPC listener's connections for tonic: capped, with `TCP_NODELAY` (answers are
/// small and latency-bound: Nagle's algorithm meeting delayed ACKs would hold each for
/// 40 ms), each handed over once it has sent HTTP/2's preface within `handshake`.
pub fn grpc(
    listener: TcpListener,
    cap: Cap,
    handshake: Duration,
) -> impl Stream<Item = io::Result<Conn>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<Conn>(64);
    tokio::spawn(async move {
        let mut acceptor = weft_api::accept::Acceptor::new("grpc");
        loop {
            let (stream, peer) = acceptor.accept(&listener).await;
            let Some(permit) = cap.admit() else { continue };
            let _ = stream.set_nodelay(true);
            let (tx, refused) = (tx.clone(), cap.refused.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(handshake, preface(&stream)).await {
                    Ok(Ok(())) => {
                        let _ = tx.send(Conn { stream, _permit: permit }).await;
                    }
                    Ok(Err(Some(reason))) => {
                        tracing::debug!(%peer, "gRPC connection closed: {reason}");
                        refused.count("grpc", reason);
                    }
                    Ok(Err(None)) => {}
                    Err(_) => {
                        tracing::debug!(%peer, "gRPC connection closed: no HTTP/2 preface within {handshake:?}");
                        refused.count("grpc", "silent");
                    }
                }
            });
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (Ok(c), rx)) })
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits, without consuming them, for the connection's first bytes to be HTTP/2's
/// preface. `Err(Some(reason))`: they are something else; `Err(None)`: it closed.
async fn preface(stream: &TcpStream) -> Result<(), Option<&'static str>> {
    let mut buf = [0u8; PREFACE.len()];
    loop {
        let n = stream.peek(&mut buf).await.map_err(|_| None)?;
        if n == 0 {
            return Err(None);
        }
        if buf[..n] != PREFACE[..n] {
            return Err(Some("not-http2"));
        }
        if n == PREFACE.len() {
            return Ok(());
        }
        // Part of it: the rest is a packet away. Peeking again at once would spin on the
        // bytes already here.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An accepted gRPC connection holding its share of the cap.
pub struct Conn {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
