//! Connection-pooled HTTP client towards upstreams.
//!
//! Requests go to a socket address chosen by the caller (the original destination, the
//! app, or a resolved authority), independent of the request's own authority, which is
//! forwarded untouched. HTTP/1 keeps a pool of keep-alive connections per address;
//! HTTP/2 keeps one multiplexed connection per address. Each proxy shard has its own
//! client, so the pool is never contended.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http::{Request, Response, Uri};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::Body;
use crate::{
    config::HttpConfig,
    errors::{Cause, CauseError},
    tcp,
};

type H2Slot = Arc<tokio::sync::Mutex<Option<http2::SendRequest<Body>>>>;

pub struct Client {
    h1: Mutex<H1Pool>,
    h2: Mutex<HashMap<SocketAddr, H2Slot>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
}

#[derive(Default)]
struct H1Pool {
    conns: HashMap<SocketAddr, Vec<Pooled>>,
    /// When expired connections to every address were last closed.
    swept: Option<Instant>,
}

/// An HTTP/1 connection in the pool. It may still be reading its last response body;
/// hyper reports it ready only once that exchange is over.
struct Pooled {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

impl Client {
    pub fn new(cfg: &HttpConfig, connect_timeout: Duration) -> Self {
        Self {
            h1: Mutex::default(),
            h2: Mutex::default(),
            connect_timeout,
            idle_timeout: cfg.pool_idle_timeout,
            max_idle: cfg.pool_max_idle_per_host,
        }
    }

    /// Sends an HTTP/1 request to `target`, in origin form; `Host` must already be set.
    pub async fn send_h1(
        &self,
        target: SocketAddr,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, CauseError> {
        // Origin form (`/path?q`); CONNECT keeps its authority form.
        if req.method() != http::Method::CONNECT {
            let pq = req.uri().path_and_query().cloned();
            *req.uri_mut() = pq.map(Uri::from).unwrap_or_else(|| Uri::from_static("/"));
        }
        *req.version_mut() = http::Version::HTTP_11;
        loop {
            let (mut sender, pooled) = match self.checkout(target) {
                Some(sender) => (sender, true),
                None => (self.connect_h1(target).await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(rsp) => {
                    self.checkin(target, sender);
                    return Ok(rsp);
                }
                Err(mut e) => match e.take_message() {
                    // A pooled connection the upstream had closed: nothing was sent,
                    // so the request can go on a fresh connection.
                    Some(unsent) if pooled => req = unsent,
                    _ => {
                        let e = e.into_error();
                        let msg = format!("forwarding to {target}: {}", chain(&e));
                        return Err(CauseError::new(Cause::classify(&e), msg));
                    }
                },
            }
        }
    }

    /// An idle, ready connection to `target`; drops closed and expired ones on the way.
    fn checkout(&self, target: SocketAddr) -> Option<http1::SendRequest<Body>> {
        let mut pool = self.h1.lock().expect("h1 pool lock");
        // Closed by the upstream, or idle (ready) for longer than the idle timeout.
        let expired = |c: &Pooled| {
            c.sender.is_closed() || (c.sender.is_ready() && c.since.elapsed() > self.idle_timeout)
        };
        // Now and then, close expired connections to addresses no longer used.
        if pool.swept.is_none_or(|t| t.elapsed() > self.idle_timeout / 2) {
            pool.swept = Some(Instant::now());
            pool.conns.retain(|_, conns| {
                conns.retain(|c| !expired(c));
                !conns.is_empty()
            });
        }
        let conns = pool.conns.get_mut(&target)?;
        conns.retain(|c| !expired(c));
        let i = conns.iter().position(|c| c.sender.is_ready())?;
        Some(conns.swap_remove(i).sender)
    }

    fn checkin(&self, target: SocketAddr, sender: http1::SendRequest<Body>) {
        let mut pool = self.h1.lock().expect("h1 pool lock");
        let conns = pool.conns.entry(target).or_default();
        // Over the limit, the connection finishes its current response and closes.
        if conns.len() < self.max_idle {
            conns.push(Pooled { sender, since: Instant::now() });
        }
    }

    async fn connect_h1(&self, target: SocketAddr) -> Result<http1::SendRequest<Body>, CauseError> {
        let io = tcp::connect(target, self.connect_timeout).await?;
        let (sender, conn) = http1::Builder::new().handshake(TokioIo::new(io)).await.map_err(|e| {
            CauseError::new(Cause::UpstreamReset, format!("HTTP/1 connection to {target}: {e}"))
        })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%target, "HTTP/1 upstream connection ended: {e}");
            }
        });
        Ok(sender)
    }

    /// Sends an HTTP/2 request to `target` over a shared connection, opening it if needed.
    /// The URI (scheme and authority) is sent as-is as `:scheme` and `:authority`.
    pub async fn send_h2(
        &self,
        target: SocketAddr,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, CauseError> {
        *req.version_mut() = http::Version::HTTP_2;
        let mut sender = self.h2_sender(target).await?;
        sender.ready().await.map_err(|e| {
            CauseError::new(Cause::UpstreamReset, format!("HTTP/2 connection to {target}: {e}"))
        })?;
        sender.send_request(req).await.map_err(|e| {
            CauseError::new(Cause::classify(&e), format!("forwarding to {target}: {}", chain(&e)))
        })
    }

    async fn h2_sender(&self, target: SocketAddr) -> Result<http2::SendRequest<Body>, CauseError> {
        let slot = self.h2.lock().expect("h2 pool lock").entry(target).or_default().clone();
        let mut slot = slot.lock().await;
        if let Some(sender) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(sender.clone());
        }
        let io = tcp::connect(target, self.connect_timeout).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .adaptive_window(true)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| {
                CauseError::new(Cause::UpstreamReset, format!("HTTP/2 handshake with {target}: {e}"))
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%target, "HTTP/2 upstream connection ended: {e}");
            }
        });
        *slot = Some(sender.clone());
        Ok(sender)
    }
}

/// Joins an error and its sources into one line for logs and error bodies.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        let msg = err.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = err.source();
    }
    s
}
