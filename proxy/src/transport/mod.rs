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

use crate::drain;

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
