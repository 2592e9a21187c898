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
    pub ready: Arc<crate::ready::Ready>,
    pub log: LogHandle,
    pub shutdown: mpsc::Sender<()>,
}

pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else { continue };
        let admin = admin.clone();
        tokio::spawn(async move {
            // A shutdown asked on this connection starts once its answer has been written
            // (the connection is closed after it): with nothing to drain the process
            // exits at once, and the caller must still get its 202.
            let asked = Arc::new(AtomicBool::new(false));
            let (svc_admin, svc_asked) = (admin.clone(), asked.clone());
            let svc = service_fn(move |req| {
                let (admin, asked) = (svc_admin.clone(), svc_asked.clone());
                async move { Ok::<_, Infallible>(admin.route(req, peer, &asked).await) }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            if asked.load(Ordering::Acquire) {
                let _ = admin.shutdown.try_send(());
            }
        });
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
