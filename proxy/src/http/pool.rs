//! Connection pools towards upstreams.
//!
//! Requests go to a socket address chosen by the caller (the original destination, the
//! app, or a resolved authority), independent of the request's own authority, which is
//! forwarded untouched. HTTP/1 keeps a pool of keep-alive connections per address;
//! HTTP/2 keeps one multiplexed connection per address. Each proxy shard has its own
//! client, so the pool is never contended.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use http::{Request, Response, Uri};
use http_body::Body as _;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::Body;
use crate::{
    body::{self, End, OnEnd, Watched},
    config::HttpConfig,
    errors::{Cause, CauseError},
    metrics::Metrics,
    transport::tcp::{self, MeshPeer},
};

/// An address and, for a mesh peer, the identity it must prove.
type H2Key = (SocketAddr, Option<Arc<str>>);
type H2Slot = Arc<tokio::sync::Mutex<Option<http2::SendRequest<Body>>>>;

pub struct Pool {
    h1: SharedPool,
    /// Keyed by address and, for mesh peers, the identity they must prove.
    h2: Mutex<HashMap<H2Key, H2Slot>>,
    connect_timeout: Duration,
    metrics: Arc<Metrics>,
}

type SharedPool = Arc<Mutex<H1Pool>>;

/// A pool's lock: its critical sections cannot panic half-way, so a poisoned lock
/// still holds a consistent pool.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Idle HTTP/1 connections by address. A connection comes back only once its response
/// has been read to the end, so checking out is a pop.
struct H1Pool {
    conns: HashMap<SocketAddr, Vec<Pooled>>,
    /// When expired connections to every address were last closed.
    swept: Instant,
    idle_timeout: Duration,
    max_idle: usize,
    /// Whether a task closes idle connections on time (started with the first one).
    sweeping: bool,
}

struct Pooled {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

impl Pooled {
    /// Open, and idle for no longer than `idle_timeout`.
    fn fresh(&self, idle_timeout: Duration) -> bool {
        !self.sender.is_closed() && self.since.elapsed() <= idle_timeout
    }
}

impl H1Pool {
    fn checkout(&mut self, target: SocketAddr) -> Option<http1::SendRequest<Body>> {
        let idle_timeout = self.idle_timeout;
        let usable = |c: &Pooled| c.fresh(idle_timeout);
        // Now and then, close expired connections to addresses no longer used.
        if self.swept.elapsed() > idle_timeout / 2 {
            self.swept = Instant::now();
            self.conns.retain(|_, conns| {
                conns.retain(usable);
                !conns.is_empty()
            });
        }
        let conns = self.conns.get_mut(&target)?;
        // Most recently used first: its socket is the warmest.
        while let Some(c) = conns.pop() {
            if usable(&c) {
                return Some(c.sender);
            }
        }
        None
    }

    fn checkin(&mut self, target: SocketAddr, sender: http1::SendRequest<Body>) {
        let conns = self.conns.entry(target).or_default();
        // Over the limit, the connection is dropped, which closes it.
        if !sender.is_closed() && conns.len() < self.max_idle {
            conns.push(Pooled { sender, since: Instant::now() });
        }
    }
}

impl Pool {
    pub fn new(cfg: &HttpConfig, connect_timeout: Duration, metrics: Arc<Metrics>) -> Self {
        let pool = H1Pool {
            conns: HashMap::new(),
            swept: Instant::now(),
            idle_timeout: cfg.pool_idle_timeout,
            max_idle: cfg.pool_max_idle_per_host,
            sweeping: false,
        };
        Self { h1: Arc::new(Mutex::new(pool)), h2: Mutex::default(), connect_timeout, metrics }
    }

    /// Sends an HTTP/1 request to `target`, in origin form; `Host` must already be set.
    pub async fn send_h1(
        &self,
        target: SocketAddr,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, CauseError> {
        let is_connect = origin_form(&mut req);
        loop {
            let pooled = lock(&self.h1).checkout(target);
            let (mut sender, pooled) = match pooled {
                // The connection may take a moment to be ready after its last response.
                Some(mut s) => match s.ready().await {
                    Ok(()) => (s, true),
                    Err(_) => continue,
                },
                None => match self.connect_h1(target).await {
                    Ok(sender) => (sender, false),
                    Err(e) => return Err(e.unsent(req)),
                },
            };
            // A reused connection the upstream closes as the request goes out (it was idle,
            // and the upstream let it go, or is draining) ends with no answer at all: an
            // idempotent request without a body is then sent again on a fresh connection,
            // as browsers and Go's client do (RFC 9110 §9.2.2).
            let mut again = match pooled && idempotent(req.method()) {
                true => body::bodyless_copy(&req),
                false => None,
            };
            match sender.try_send_request(req).await {
                Ok(rsp) => {
                    let upgraded = rsp.status() == http::StatusCode::SWITCHING_PROTOCOLS
                        || (is_connect && rsp.status().is_success());
                    if upgraded {
                        // The connection now belongs to the tunnel.
                        return Ok(rsp.map(body::boxed));
                    }
                    if rsp.body().is_end_stream() {
                        checkin(&self.h1, target, sender);
                        return Ok(rsp.map(body::boxed));
                    }
                    let checkin = Checkin { pool: self.h1.clone(), target, sender };
                    return Ok(rsp.map(|inner| body::boxed(Watched::new(inner, checkin))));
                }
                Err(mut e) => match e.take_message() {
                    // A pooled connection the upstream had closed: nothing was sent,
                    // so the request can go on a fresh connection.
                    Some(unsent) if pooled => req = unsent,
                    None if again.is_some() && e.error().is_incomplete_message() => {
                        req = again.take().expect("checked");
                    }
                    unsent => {
                        let e = e.into_error();
                        let msg = format!("forwarding to {target}: {}", chain(&e));
                        let err = CauseError::new(Cause::classify(&e), msg);
                        return Err(match unsent {
                            Some(req) => err.unsent(req),
                            None => err,
                        });
                    }
                },
            }
        }
    }

    /// Sends an HTTP/1 request to a mesh peer over mutual TLS on a connection of its own:
    /// upgrades (WebSocket) take over their connection, so they cannot share HTTP/2.
    pub async fn send_h1_mesh(
        &self,
        target: SocketAddr,
        peer: &MeshPeer,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, CauseError> {
        origin_form(&mut req);
        let io = match tcp::dial(target, Some(peer), self.connect_timeout, &self.metrics).await {
            Ok(io) => io,
            Err(e) => return Err(e.unsent(req)),
        };
        let mut sender = match handshake_h1(io, target).await {
            Ok(s) => s,
            Err(e) => return Err(e.unsent(req)),
        };
        sender
            .try_send_request(req)
            .await
            .map(|rsp| rsp.map(body::boxed))
            .map_err(|e| unsent_error(e, target))
    }

    async fn connect_h1(&self, target: SocketAddr) -> Result<http1::SendRequest<Body>, CauseError> {
        handshake_h1(tcp::connect(target, self.connect_timeout).await?, target).await
    }

    /// Sends an HTTP/2 request to `target` over a shared connection, opening it if needed.
    /// The URI (scheme and authority) is sent as-is as `:scheme` and `:authority`.
    pub async fn send_h2(
        &self,
        target: SocketAddr,
        mesh: Option<&MeshPeer>,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, CauseError> {
        *req.version_mut() = http::Version::HTTP_2;
        let mut sender = match self.h2_sender(target, mesh).await {
            Ok(s) => s,
            Err(e) => return Err(e.unsent(req)),
        };
        if let Err(e) = sender.ready().await {
            let err = CauseError::new(Cause::UpstreamReset, format!("HTTP/2 connection to {target}: {e}"));
            return Err(err.unsent(req));
        }
        sender
            .try_send_request(req)
            .await
            .map(|rsp| rsp.map(body::boxed))
            .map_err(|e| unsent_error(e, target))
    }

    async fn h2_sender(
        &self,
        target: SocketAddr,
        mesh: Option<&MeshPeer>,
    ) -> Result<http2::SendRequest<Body>, CauseError> {
        let key = (target, mesh.map(|m| m.identity.clone()));
        let slot = {
            let mut h2 = lock(&self.h2);
            if !h2.contains_key(&key) {
                // Connections to endpoints that went away: their slots go with them, so
                // the map follows the endpoints in use, not every one ever used.
                h2.retain(|_, slot| {
                    slot.try_lock().map_or(true, |s| s.as_ref().is_some_and(|c| !c.is_closed()))
                });
            }
            h2.entry(key).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if let Some(sender) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(sender.clone());
        }
        let io = tcp::dial(target, mesh, self.connect_timeout, &self.metrics).await?;
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

/// Returns an HTTP/1 connection to the pool once its response has been read to the
/// end. Dropped earlier, the connection is dropped too: it is mid-response.
struct Checkin {
    pool: SharedPool,
    target: SocketAddr,
    sender: http1::SendRequest<Body>,
}

impl OnEnd for Checkin {
    fn ended(self, end: End<'_>) {
        if let End::Complete(_) = end {
            checkin(&self.pool, self.target, self.sender);
        }
    }
}

/// GET, HEAD, OPTIONS, TRACE, PUT or DELETE (RFC 9110 §9.2.2).
fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Puts a connection back in the pool; the first one starts the task that closes idle
/// connections when their time is up, whether or not another request ever comes (the
/// upstream's connection count must fall back when traffic stops).
fn checkin(pool: &SharedPool, target: SocketAddr, sender: http1::SendRequest<Body>) {
    let mut p = lock(pool);
    p.checkin(target, sender);
    if !p.sweeping {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            p.sweeping = true;
            rt.spawn(sweep(Arc::downgrade(pool), p.idle_timeout));
        }
    }
}

/// Closes expired idle connections every tenth of the idle timeout, until the pool is
/// gone: a connection is closed at most 10 % past its time (a sweep is one pass over the
/// idle connections, cheap next to holding hundreds of them half a timeout too long).
async fn sweep(pool: std::sync::Weak<Mutex<H1Pool>>, idle_timeout: Duration) {
    let every = (idle_timeout / 10).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else { return };
        let mut p = lock(&pool);
        p.swept = Instant::now();
        p.conns.retain(|_, conns| {
            conns.retain(|c| c.fresh(idle_timeout));
            !conns.is_empty()
        });
    }
}

/// Rewrites a request for an HTTP/1 upstream: origin form (`/path?q`), except CONNECT,
/// which keeps its authority form. Returns whether it is a CONNECT.
fn origin_form(req: &mut Request<Body>) -> bool {
    let is_connect = req.method() == http::Method::CONNECT;
    if !is_connect {
        let pq = req.uri().path_and_query().cloned();
        *req.uri_mut() = pq.map(Uri::from).unwrap_or_else(|| Uri::from_static("/"));
    }
    *req.version_mut() = http::Version::HTTP_11;
    is_connect
}

async fn handshake_h1<I>(io: I, target: SocketAddr) -> Result<http1::SendRequest<Body>, CauseError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| CauseError::new(Cause::UpstreamReset, format!("HTTP/1 connection to {target}: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(%target, "HTTP/1 upstream connection ended: {e}");
        }
    });
    Ok(sender)
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

/// A failed send, with the request when hyper gives it back (it was never written: the
/// connection closed, or an HTTP/2 GOAWAY came, first).
fn unsent_error(mut e: hyper::client::conn::TrySendError<Request<Body>>, target: SocketAddr) -> CauseError {
    let unsent = e.take_message();
    let e = e.into_error();
    let err = CauseError::new(Cause::classify(&e), format!("forwarding to {target}: {}", chain(&e)));
    match unsent {
        Some(req) => err.unsent(req),
        None => err,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic while the pool's lock is held (in some request's task) poisons it; the
    /// shard's other requests must keep using the pool, not panic in turn.
    #[tokio::test]
    async fn a_panic_under_the_pool_lock_leaves_the_pool_working() {
        let cfg = crate::config::Config::from_env(&std::collections::HashMap::<&str, &str>::new()).unwrap();
        let pool = Pool::new(&cfg.http, Duration::from_secs(1), Metrics::new());
        let h1 = pool.h1.clone();
        let poisoned = std::thread::spawn(move || {
            let _guard = h1.lock().unwrap();
            panic!("a request's task panics while holding the pool");
        })
        .join();
        assert!(poisoned.is_err() && pool.h1.is_poisoned());
        // The pool still answers: a checkout of an unknown address is simply empty, and a
        // request to a closed port fails as a request, not as a panic.
        assert!(lock(&pool.h1).checkout("127.0.0.1:9".parse().unwrap()).is_none());
        let req = Request::get("/").body(crate::body::empty()).unwrap();
        let err = pool.send_h1("127.0.0.1:9".parse().unwrap(), req).await.unwrap_err();
        assert_eq!(err.cause, Cause::UpstreamRefused);
    }
}
