//! Connection-level parts, below HTTP: accepting, the original destination, protocol
//! detection, mesh mTLS, dialling and copying opaque TCP, and IO wrappers. Nothing here
//! knows about requests or directions' policies.

pub mod detect;
pub mod io;
pub mod orig_dst;
pub mod tcp;
pub mod tls;

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};

use self::{detect::Protocol, io::PrefixedIo};
use crate::{
    drain,
    metrics::{Direction, Metrics},
};

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
        tokio::spawn(handle(stream, orig_dst::canonical(peer), drain.clone()));
    }
}

/// Detects an accepted connection's protocol (see [`detect::detect`]) and counts the
/// outcome; the bytes read for it are replayed by the returned stream. `None`: the
/// connection failed meanwhile.
pub async fn detect_protocol(
    mut stream: TcpStream,
    dir: Direction,
    metrics: &Metrics,
    (first_byte_timeout, complete_timeout): (Duration, Duration),
) -> Option<(Protocol, PrefixedIo<TcpStream>)> {
    match detect::detect(&mut stream, first_byte_timeout, complete_timeout).await {
        Ok(d) => {
            metrics.detected(dir, d.outcome.as_str());
            Some((d.protocol, PrefixedIo::new(d.buffered, stream)))
        }
        Err(e) => {
            tracing::debug!("connection failed during detection: {e}");
            None
        }
    }
}
