//! The request wrapper both directions share: from hyper's request to the answer the
//! client gets. A direction ([`Forward`]) decides where a request goes and sends it;
//! this wraps it in what every request gets whatever happens: the rapid-reset count, the
//! span, a proxy-made error answer with `weft-error` (through [`crate::errors`]), the
//! request metrics and the access log line.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Instant};

use http::{header, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;

use super::{headers, observe::Exchange, resets::ResetWatch, Body};
use crate::{
    errors::{Cause, CauseError},
    metrics::{Direction, Metrics, Peer},
    trace::Tracer,
};

/// What a direction does with one request.
pub trait Forward: Send + Sync + 'static {
    /// What this direction knows about a connection before its first request.
    type Meta: Send + Sync + 'static;

    fn common(&self) -> &Common;

    /// Before the request is checked: what it says of its peer (inbound).
    fn begin(&self, _conn: &Conn<Self::Meta>, _req: &mut Request<Body>, _ex: &mut Exchange) {}

    /// The upstream's response, or why the proxy answers instead.
    fn forward(
        &self,
        req: Request<Body>,
        conn: &Conn<Self::Meta>,
        ex: &mut Exchange,
    ) -> impl Future<Output = Result<Response<Body>, CauseError>> + Send;

    /// The answer, whoever made it, before it goes back to the client.
    fn answered(&self, _conn: &Conn<Self::Meta>, _rsp: &mut Response<Body>) {}
}

/// What every direction's service holds for the wrapper.
pub struct Common {
    pub dir: Direction,
    pub metrics: Arc<Metrics>,
    /// Span recording and export; `None` when tracing is off.
    pub tracer: Option<Arc<Tracer>>,
    pub access_log: bool,
}

/// One client connection, as the service sees it.
pub struct Conn<M> {
    pub client: SocketAddr,
    /// `http1` or `h2`, as the client speaks it.
    pub protocol: &'static str,
    pub resets: std::sync::Arc<ResetWatch>,
    /// HTTP/1: what the connection's first request head said of its framing.
    pub first_head: Option<std::sync::Arc<super::first_head::FirstHead>>,
    /// The direction's own knowledge of the connection.
    pub meta: M,
    /// The connection's drain watch, for what outlives its requests (an upgraded or
    /// `CONNECT` tunnel holds it, so a drain waits for it too).
    pub drain: Option<crate::drain::Watch>,
}

impl<M> Conn<M> {
    pub fn new(client: SocketAddr, protocol: &'static str, meta: M) -> Self {
        Conn { client, protocol, resets: Default::default(), first_head: None, meta, drain: None }
    }
}

/// The hyper service entry point: never fails, errors become responses.
pub async fn handle<F: Forward>(
    svc: Arc<F>,
    req: Request<Incoming>,
    conn: Arc<Conn<F::Meta>>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let common = svc.common();
    // Cheap clones (shared bytes) kept for the log line, formatted only if one is written.
    let (method, uri, host) =
        (req.method().clone(), req.uri().clone(), req.headers().get(header::HOST).cloned());
    let mut req = req.map(client_body);
    let tracer = common.tracer.as_deref();
    let mut ex = Exchange::begin(tracer, common.dir, &mut req);
    ex.stream = Some(conn.resets.started());
    svc.begin(&conn, &mut req, &mut ex);

    let both_lengths = conn.first_head.as_ref().is_some_and(|h| h.take_both_lengths());
    let checked = match both_lengths {
        true => Err(CauseError::new(
            Cause::BadRequest,
            "the request has both Content-Length and Transfer-Encoding (RFC 9112 §6.3); send one",
        )),
        false => headers::front_door(&mut req),
    };
    let forwarded = match checked {
        Ok(()) => svc.forward(req, &conn, &mut ex).await,
        Err(e) => Err(e),
    };
    let (mut rsp, cause) = match forwarded {
        Ok(rsp) => (rsp, None),
        Err(e) => {
            let (authority, path) = log_target(&uri, host.as_ref());
            tracing::info!(
                direction = common.dir.as_str(), cause = e.cause.as_str(), client = %conn.client,
                %method, authority, path, "proxy error: {}", e.message
            );
            (e.respond(), Some(e.cause))
        }
    };
    svc.answered(&conn, &mut rsp);
    let elapsed = start.elapsed();
    let status = rsp.status().as_u16();
    let peer = Peer {
        route: ex.route.clone(),
        workload: ex.peer_workload.clone(),
        identity: ex.peer_identity.clone(),
    };
    common.metrics.response(common.dir, conn.protocol, status, cause, peer, elapsed.as_secs_f64());
    let trace_id = if common.access_log { ex.trace_id() } else { None };
    ex.finish(common.tracer.as_ref(), cause, &mut rsp);
    if common.access_log {
        let (authority, path) = log_target(&uri, host.as_ref());
        let bytes = rsp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).unwrap_or("-");
        tracing::info!(
            target: "weft::access",
            direction = common.dir.as_str(), client = %conn.client, %method, authority, path,
            status = rsp.status().as_u16(), duration_ms = elapsed.as_secs_f64() * 1e3,
            bytes, cause = cause.map(Cause::as_str).unwrap_or("-"),
            trace_id = trace_id.as_deref().unwrap_or("-"),
        );
    }
    ex.settled();
    Ok(rsp)
}

/// The client's request body: a failure reading it (a malformed chunk, a client gone
/// mid-body) is the client's fault, a 400 that never blames the endpoint it was going to.
fn client_body(body: Incoming) -> Body {
    use http_body_util::BodyExt;
    body.map_err(|e| -> crate::body::BoxError {
        Box::new(CauseError::new(Cause::BadRequest, format!("the request body from the client failed: {e}")))
    })
    .boxed()
}

/// Authority and path of a request for log lines; never a query string, which may hold secrets.
fn log_target<'a>(uri: &'a Uri, host: Option<&'a HeaderValue>) -> (&'a str, &'a str) {
    let authority =
        uri.authority().map(|a| a.as_str()).or_else(|| host.and_then(|h| h.to_str().ok())).unwrap_or("-");
    (authority, uri.path())
}
