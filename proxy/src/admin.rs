//! The admin port: health, metrics, log level and shutdown, on its own small runtime so
//! it answers even when the proxy's workers are saturated.
//!
//! `PUT /log-level` and `POST /shutdown` change the process, so they are only accepted
//! from loopback (the pod's own containers), as Linkerd does.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::mpsc};

use crate::{log::LogHandle, metrics::Metrics};

pub struct Admin {
    pub metrics: Arc<Metrics>,
    /// Connections open at once at most; beyond, the longest idle is closed (and counted).
    pub max_connections: usize,
    /// Time a client has to send a request head (also the idle keep-alive limit here:
    /// probes and scrapers reconnect cheaply).
    pub header_read_timeout: std::time::Duration,
    pub ready: Arc<crate::ready::Ready>,
    pub log: LogHandle,
    pub shutdown: mpsc::Sender<()>,
}

/// The admin connections open now: when the listener is full, the one that has been
/// idle longest (a connection that never sent a request first) makes room for a new
/// one, so a probe still gets in while idle connections flood the port.
#[derive(Default)]
struct Open {
    next: u64,
    conns: Vec<OpenConn>,
}

struct OpenConn {
    id: u64,
    /// When it last sent a request (or connected).
    active: Arc<std::sync::Mutex<std::time::Instant>>,
    task: tokio::task::AbortHandle,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    let mut acceptor = weft_api::accept::Acceptor::new("admin");
    let open = Arc::new(std::sync::Mutex::new(Open::default()));
    loop {
        let (stream, peer) = acceptor.accept(&listener).await;
        {
            let mut o = lock(&open);
            if o.conns.len() >= admin.max_connections.max(1) {
                let oldest = (0..o.conns.len()).min_by_key(|&i| *lock(&o.conns[i].active));
                if let Some(i) = oldest {
                    o.conns.swap_remove(i).task.abort();
                    admin.metrics.listener_refused("admin");
                }
            }
        }
        let active = Arc::new(std::sync::Mutex::new(std::time::Instant::now()));
        let admin_c = admin.clone();
        let (open_c, active_c) = (open.clone(), active.clone());
        let id = {
            let mut o = lock(&open);
            o.next += 1;
            o.next
        };
        let task = tokio::spawn(async move {
            let admin = admin_c;
            // A shutdown asked on this connection starts once its answer has been written
            // (the connection is closed after it): with nothing to drain the process
            // exits at once, and the caller must still get its 202.
            let asked = Arc::new(AtomicBool::new(false));
            let (svc_admin, svc_asked) = (admin.clone(), asked.clone());
            let svc = service_fn(move |req| {
                *lock(&active_c) = std::time::Instant::now();
                let (admin, asked) = (svc_admin.clone(), svc_asked.clone());
                async move { Ok::<_, Infallible>(admin.route(req, peer, &asked).await) }
            });
            let _ = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(admin.header_read_timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            lock(&open_c).conns.retain(|c| c.id != id);
            if asked.load(Ordering::Acquire) {
                let _ = admin.shutdown.try_send(());
            }
        });
        lock(&open).conns.push(OpenConn { id, active, task: task.abort_handle() });
    }
}

impl Admin {
    async fn route(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        shutdown: &AtomicBool,
    ) -> Response<Full<Bytes>> {
        let local = crate::transport::orig_dst::canonical(peer).ip().is_loopback();
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            (&Method::GET, "/ready") if self.ready.is_ready() => text(StatusCode::OK, "ready\n"),
            (&Method::GET, "/ready") => {
                text(StatusCode::SERVICE_UNAVAILABLE, &format!("not ready: {}\n", self.ready.why()))
            }
            (&Method::GET, "/metrics") => {
                let mut rsp = Response::new(Full::new(Bytes::from(self.metrics.encode())));
                rsp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8"
                        .parse()
                        .expect("valid header"),
                );
                rsp
            }
            (&Method::GET, "/log-level") => text(StatusCode::OK, &format!("{}\n", self.log.current())),
            (&Method::PUT, "/log-level") if local => {
                let body = match Limited::new(req.into_body(), 4096).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(_) => return text(StatusCode::BAD_REQUEST, "unreadable body\n"),
                };
                let directive = String::from_utf8_lossy(&body).trim().to_string();
                match self.log.set(&directive) {
                    Ok(()) => {
                        tracing::info!("log level set to {directive:?}");
                        text(StatusCode::OK, &format!("{directive}\n"))
                    }
                    Err(e) => text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
                }
            }
            (&Method::POST, "/shutdown") if local => {
                tracing::info!("shutdown requested on the admin port");
                shutdown.store(true, Ordering::Release);
                let mut rsp = text(StatusCode::ACCEPTED, "shutting down\n");
                rsp.headers_mut().insert(header::CONNECTION, http::HeaderValue::from_static("close"));
                rsp
            }
            (_, "/log-level") | (_, "/shutdown") if !local => {
                text(StatusCode::FORBIDDEN, "only accepted from loopback (inside the pod)\n")
            }
            (_, "/live" | "/ready" | "/metrics" | "/log-level" | "/shutdown") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => {
                text(StatusCode::NOT_FOUND, "not found; try /live, /ready, /metrics, /log-level, /shutdown\n")
            }
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body.to_string())));
    *rsp.status_mut() = status;
    rsp.headers_mut()
        .insert(header::CONTENT_TYPE, "text/plain; charset=utf-8".parse().expect("valid header"));
    rsp
}
