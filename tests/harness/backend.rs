//! Backends on real sockets, each on its own thread and runtime so tests stay plain
//! blocking code: an HTTP/1 + h2c echo server, a server-speaks-first TCP banner and a
//! TCP echo server.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

/// What a backend saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub version: String,
    pub headers: BTreeMap<String, String>,
    pub body_len: usize,
}

pub struct Backend {
    pub addr: SocketAddr,
    /// Requests (HTTP) or connections (TCP) served.
    pub hits: Arc<AtomicUsize>,
    /// Connections accepted.
    pub conns: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    _rt: tokio::runtime::Runtime,
}

impl Backend {
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    pub fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }
    pub fn last(&self) -> Seen {
        self.seen.lock().unwrap().last().cloned().expect("backend saw no request")
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// An HTTP echo server speaking HTTP/1.1 and h2c. It answers 200 with a JSON summary of
/// the request; `?delay_ms=N` waits first, `?status=N` answers with that status,
/// `?size=N` answers with N bytes of `x` instead of the summary.
pub fn http(name: &'static str) -> Backend {
    http_slow(name, Duration::ZERO)
}

/// [`http`], answering every request only after `delay`: a slow endpoint.
pub fn http_slow(name: &'static str, delay: Duration) -> Backend {
    http_with(name, delay, 0, None)
}

/// [`http`] on a chosen address (to bring an endpoint back where it was).
pub fn http_on(name: &'static str, addr: SocketAddr) -> Backend {
    http_with(name, Duration::ZERO, 0, Some(addr))
}

/// [`http`] failing `percent` % (a multiple of 10) of its requests with 503, spread out
/// so that failures rarely follow each other.
pub fn http_flaky(name: &'static str, percent: usize) -> Backend {
    http_with(name, Duration::ZERO, percent, None)
}

fn http_with(name: &'static str, delay: Duration, fail_percent: usize, at: Option<SocketAddr>) -> Backend {
    let rt = runtime();
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let listener = rt.block_on(TcpListener::bind(at.unwrap_or(([127, 0, 0, 1], 0).into()))).unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let (h, s, c) = (hits.clone(), seen.clone(), conns.clone());
    rt.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            c.fetch_add(1, Ordering::SeqCst);
            let (h, s) = (h.clone(), s.clone());
            tokio::spawn(async move {
                let svc =
                    service_fn(move |req| handle(name, (delay, fail_percent), req, h.clone(), s.clone()));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Backend { addr, hits, conns, seen, _rt: rt }
}

async fn handle(
    name: &'static str,
    (delay, fail_percent): (Duration, usize),
    req: Request<Incoming>,
    hits: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let query: BTreeMap<String, String> = crate::query_params(req.uri());
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let s = Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        version: format!("{:?}", parts.version),
        // A repeated header's values joined with ", ", as RFC 9110 allows.
        headers: parts
            .headers
            .keys()
            .map(|k| {
                let values: Vec<_> = parts
                    .headers
                    .get_all(k)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect();
                (k.to_string(), values.join(", "))
            })
            .collect(),
        body_len: body.len(),
    };
    let hit = hits.fetch_add(1, Ordering::SeqCst);
    seen.lock().unwrap().push(s.clone());
    let asked = query.get("delay_ms").and_then(|v| v.parse().ok()).map(Duration::from_millis);
    let delay = delay + asked.unwrap_or_default();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    // Failures spread out (1, 4, 7, 0, ... of every ten): never many in a row.
    const SPREAD: [usize; 10] = [1, 4, 7, 0, 3, 6, 9, 2, 5, 8];
    let fails = SPREAD[..fail_percent / 10].contains(&(hit % 10));
    let status = query.get("status").and_then(|v| v.parse().ok()).unwrap_or(if fails { 503 } else { 200 });
    let json = serde_json::json!({
        "backend": name, "method": s.method, "path": s.path, "version": s.version,
        "headers": s.headers, "body_len": s.body_len,
    });
    let body = match query.get("size").and_then(|v| v.parse().ok()) {
        Some(n) => Bytes::from(vec![b'x'; n]),
        None => Bytes::from(json.to_string()),
    };
    let mut rsp = Response::new(Full::new(body));
    *rsp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    rsp.headers_mut().insert("x-backend", name.parse().unwrap());
    Ok(rsp)
}

/// A TCP server that speaks first: it sends `banner` as soon as a client connects, then
/// echoes what it reads.
pub fn banner(banner: &'static [u8]) -> Backend {
    tcp_server(Some(banner))
}

/// A TCP echo server that answers half-close by closing its side after echoing.
pub fn echo() -> Backend {
    tcp_server(None)
}

fn tcp_server(banner: Option<&'static [u8]>) -> Backend {
    let rt = runtime();
    let hits = Arc::new(AtomicUsize::new(0));
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let h = hits.clone();
    rt.spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            h.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Some(b) = banner {
                    let _ = stream.write_all(b).await;
                }
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    Backend { addr, conns: hits.clone(), hits, seen: Arc::default(), _rt: rt }
}
