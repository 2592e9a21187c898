//! Connection-pooled HTTP client towards upstreams.
//!
//! Requests are sent to an explicit socket address chosen by the caller (the original
//! destination, the app, or a resolved authority), independent of the request's own
//! authority, which is forwarded untouched. HTTP/1 uses hyper-util's pooled client with
//! a connector that dials the address carried in the request URI; HTTP/2 keeps one
//! multiplexed connection per address.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy,
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use tokio::net::TcpStream;

use super::Body;
use crate::{
    config::HttpConfig,
    errors::{Cause, CauseError},
    tcp,
};

type H2Slot = Arc<tokio::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<Body>>>>;

pub struct Client {
    h1: legacy::Client<Connector, Body>,
    h2: Mutex<HashMap<SocketAddr, H2Slot>>,
    connect_timeout: Duration,
}

impl Client {
    pub fn new(cfg: &HttpConfig, connect_timeout: Duration) -> Self {
        let h1 = legacy::Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            // The caller sets Host from the client's request; the URI only names the socket.
            .set_host(false)
            .build(Connector { timeout: connect_timeout });
        Self { h1, h2: Mutex::default(), connect_timeout }
    }

    /// Sends an HTTP/1 request to `target`. The request URI's authority is replaced by
    /// the target address (the pool key); `Host` must already be set.
    pub async fn send_h1(
        &self,
        target: SocketAddr,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, CauseError> {
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(authority_of(target));
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        *req.uri_mut() = Uri::from_parts(parts)
            .map_err(|e| CauseError::new(Cause::BadRequest, format!("invalid request target: {e}")))?;
        *req.version_mut() = http::Version::HTTP_11;
        self.h1.request(req).await.map_err(|e| {
            let cause = Cause::classify(&e);
            CauseError::new(cause, format!("forwarding to {target}: {}", chain(&e)))
        })
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

    async fn h2_sender(
        &self,
        target: SocketAddr,
    ) -> Result<hyper::client::conn::http2::SendRequest<Body>, CauseError> {
        let slot = self.h2.lock().expect("h2 pool lock").entry(target).or_default().clone();
        let mut slot = slot.lock().await;
        if let Some(sender) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(sender.clone());
        }
        let io = tcp::connect(target, self.connect_timeout).await?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
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

/// The URI authority naming a socket address (the pool key of the HTTP/1 client).
fn authority_of(addr: SocketAddr) -> http::uri::Authority {
    http::uri::Authority::try_from(addr.to_string()).expect("a socket address is a valid authority")
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

/// Dials the socket address written in the URI's authority.
#[derive(Clone)]
struct Connector {
    timeout: Duration,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = CauseError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, CauseError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), CauseError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = self.timeout;
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| CauseError::new(Cause::NoRoute, format!("no socket address in {uri}")))?;
            Ok(TokioIo::new(tcp::connect(addr, timeout).await?))
        })
    }
}
