//! Connection-level parts, below HTTP: accepting, the original destination, protocol
//! detection, mesh mTLS, dialling and copying opaque TCP, and IO wrappers. Nothing here
//! knows about requests or directions' policies.

pub mod detect;
pub mod io;
pub mod orig_dst;
pub mod tcp;
pub mod tls;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};

use bytes::BytesMut;

use self::{detect::Protocol, io::PrefixedIo};
use crate::{
    drain,
    metrics::{Direction, Metrics},
};

/// A listener's cap on connections open at once, shared by its shards.
#[derive(Clone)]
pub struct Limit {
    pub name: &'static str,
    pub open: Arc<tokio::sync::Semaphore>,
    pub metrics: Arc<Metrics>,
}

/// Accepts connections until draining starts; each runs in its own task holding a
/// drain watch, so the drain waits for it, and a share of `limit`: beyond it, a
/// connection is closed as it arrives (and counted), so a flood of one listener cannot
/// take the descriptors the other and the admin port need.
pub async fn accept_loop<F, Fut>(limit: Limit, listener: TcpListener, drain: drain::Watch, handle: F)
where
    F: Fn(TcpStream, SocketAddr, drain::Watch) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut acceptor = weft_api::accept::Acceptor::new(limit.name);
    loop {
        let (stream, peer) = tokio::select! {
            _ = drain.signaled() => return,
            accepted = acceptor.accept(&listener) => accepted,
        };
        let Ok(permit) = limit.open.clone().try_acquire_owned() else {
            limit.metrics.listener_refused(limit.name);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = handle(stream, orig_dst::canonical(peer), drain.clone());
        tokio::spawn(async move {
            let _permit = permit;
            conn.await
        });
    }
}

/// Detects an accepted connection's protocol (see [`detect::detect`]) and counts the
/// outcome (a silent one is counted by whoever decides what it is). Returns the bytes read
/// for it, to replay; `None`: the connection failed meanwhile.
pub async fn detect_protocol(
    stream: &mut TcpStream,
    dir: Direction,
    metrics: &Metrics,
    limits: detect::Limits,
) -> Option<(Protocol, BytesMut)> {
    match detect::detect(stream, limits).await {
        Ok(d) => {
            if d.protocol != Protocol::Silent {
                metrics.detected(dir, d.outcome.as_str());
            }
            Some((d.protocol, d.buffered))
        }
        Err(e) => {
            tracing::debug!("connection failed during detection: {e}");
            None
        }
    }
}

/// Who spoke first on a connection that was silent through the detect window.
pub enum Speaker {
    /// The client: detect what it sends, as for any connection (a slow client).
    Client,
    /// The upstream (a server-first protocol): forward opaque; `upstream` replays what it
    /// sent first.
    Server(PrefixedIo<Box<dyn tcp::Io>>),
}

/// For a connection silent through the detect window: with the upstream connected, the
/// side that speaks first decides (up to `wait`, then `None`). A server-first protocol
/// never stalls, and a slow client is still detected, never forwarded unchecked.
pub async fn first_speaker(
    client: &TcpStream,
    mut upstream: Box<dyn tcp::Io>,
    wait: Duration,
) -> Option<Speaker> {
    use tokio::io::AsyncReadExt;
    let mut hello = BytesMut::with_capacity(1024);
    let raced = tokio::time::timeout(wait, async {
        tokio::select! {
            biased;
            // Readable (or closed): the client has something to say.
            r = client.readable() => r.ok().map(|_| true),
            n = upstream.read_buf(&mut hello) => n.ok().filter(|n| *n > 0).map(|_| false),
        }
    });
    match raced.await.ok().flatten()? {
        true => Some(Speaker::Client),
        false => Some(Speaker::Server(PrefixedIo::new(hello, upstream))),
    }
}
