//! What a request leaves behind: its spans and the labels of its metrics.
//!
//! An [`Exchange`] follows one request through `http::service` and a direction:
//! it holds the request's span (a server span inbound; outbound, a logical span with a
//! client span per attempt under it, as OpenTelemetry's HTTP conventions model retries)
//! and what forwarding learnt (route rule, peer workload and identity).
//!
//! Peer workloads travel as `weft-peer-workload`, set by each proxy on requests and
//! responses it sends over mesh mTLS, as Istio's metadata exchange does: a value is
//! believed only from an authenticated peer and never reaches an app.

use std::{net::SocketAddr, sync::Arc};

use http::{header::CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Version};

use super::Body;
use crate::{
    body::{self, End, OnEnd, Watched},
    errors::Cause,
    metrics::{Direction, Label, Metrics},
    trace::{context, B3Style, Kind, Span, Traced, Tracer, Value},
};

pub const PEER_WORKLOAD: HeaderName = HeaderName::from_static("weft-peer-workload");

/// One request's observations.
#[derive(Debug, Default)]
pub struct Exchange {
    /// `None` when tracing is off.
    pub traced: Option<Traced>,
    /// The B3 style the request came with, if any.
    b3: Option<B3Style>,
    /// `<route>/<rule>` that matched, outbound.
    pub route: Label,
    pub peer_workload: Label,
    pub peer_identity: Label,
    /// The stream's place in the rapid-reset count, when its connection is watched.
    pub stream: Option<super::resets::StreamGuard>,
}

impl Exchange {
    /// Starts the request's span from the context it carries. Inbound, the app sees the
    /// server span as its parent; outbound, each attempt puts its own span on the request.
    pub fn begin(tracer: Option<&Tracer>, dir: Direction, req: &mut Request<Body>) -> Self {
        let Some(tracer) = tracer else {
            // Tracing off: no spans, but a context that came in one format still goes on
            // in both, so apps using either join their trace.
            let incoming = context::extract(req.headers());
            if let Some(p) = &incoming.parent {
                context::inject(req.headers_mut(), p, for_app(incoming.b3));
            }
            return Exchange { traced: incoming.parent.map(Traced::Passing), ..Exchange::default() };
        };
        let incoming = context::extract(req.headers());
        let kind = match dir {
            Direction::Inbound => Kind::Server,
            Direction::Outbound => Kind::Internal,
        };
        let mut traced = tracer.start(incoming.parent.as_ref(), incoming.deny, kind, || span_name(req));
        if let Some(span) = traced.span_mut() {
            request_attributes(span, req);
        }
        let ex = Exchange { b3: incoming.b3, ..Exchange::default() };
        // Inbound, or not sampled: the context is final now. Sampled outbound requests get
        // theirs per attempt.
        let ctx = traced.context();
        if dir == Direction::Inbound || !ctx.sampled {
            context::inject(req.headers_mut(), ctx, for_app(ex.b3));
        }
        Exchange { traced: Some(traced), ..ex }
    }

    /// Outbound: a client span for one attempt, under the logical span, on the request.
    /// To a mesh peer (`to_mesh`), whose proxy writes both formats for its app, W3C
    /// alone carries the context unless B3 came in.
    pub fn attempt(
        &self,
        tracer: Option<&Tracer>,
        req: &mut Request<Body>,
        target: SocketAddr,
        to_mesh: bool,
        n: u32,
    ) -> Option<Span> {
        let (tracer, Some(Traced::Recording(logical))) = (tracer?, &self.traced) else { return None };
        if logical.kind != Kind::Internal {
            return None;
        }
        let mut span = tracer.child(logical, Kind::Client, req.method().to_string());
        span.set("http.request.method", method_str(req.method()));
        if let Some(a) = super::headers::authority(req) {
            span.set("server.address", a.host().to_string());
        }
        span.set("network.peer.address", Value::Ip(target.ip()));
        span.set("network.peer.port", i64::from(target.port()));
        if n > 1 {
            span.set("http.request.resend_count", i64::from(n - 1));
        }
        context::inject(req.headers_mut(), &span.ctx, if to_mesh { self.b3 } else { for_app(self.b3) });
        Some(span)
    }

    /// Reads and removes a peer's `weft-peer-workload`; believed only from `identity`,
    /// an authenticated mesh peer. Workload names are interned: they are metric labels.
    pub fn learn_peer(&mut self, headers: &mut HeaderMap, identity: Option<&Arc<str>>, metrics: &Metrics) {
        let claimed = headers.remove(PEER_WORKLOAD);
        let Some(identity) = identity else { return };
        self.peer_identity = Some(identity.clone());
        if let Some(w) = claimed.as_ref().and_then(|v| v.to_str().ok()).filter(|w| valid_workload(w)) {
            self.peer_workload = Some(metrics.intern(w));
        }
    }

    /// The deadline the request's headers ask for: a cancel near it is a timeout, not a
    /// premature reset. Set by the service that reads the headers anyway.
    pub fn asked(&mut self, deadline: Option<std::time::Instant>) {
        if let Some(g) = self.stream.as_mut() {
            g.deadline = deadline;
        }
    }

    /// The request is answered: it no longer counts as a possible premature reset.
    pub fn settled(&mut self) {
        if let Some(g) = self.stream.as_mut() {
            g.settled = true;
        }
    }

    /// The trace id to print in the access log line.
    pub fn trace_id(&self) -> Option<String> {
        self.traced.as_ref().map(|t| context::trace_id_string(&t.context().trace_id))
    }

    /// Ends the request's span with its answer. A gRPC answer whose status comes in
    /// trailers keeps its span open until the body ends, to record that status (and
    /// the whole of a streaming call).
    pub fn finish(&mut self, tracer: Option<&Arc<Tracer>>, cause: Option<Cause>, rsp: &mut Response<Body>) {
        let (Some(tracer), Some(Traced::Recording(span))) = (tracer, self.traced.take()) else { return };
        let mut span = span;
        if let Some(route) = &self.route {
            span.set("weft.route", route.to_string());
        }
        end(&mut span, rsp.status().as_u16(), cause, rsp.headers());
        self.peer_attributes(&mut span);
        let grpc =
            rsp.headers().get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if grpc && !rsp.headers().contains_key(GRPC_STATUS) {
            let inner = std::mem::replace(rsp.body_mut(), body::empty());
            *rsp.body_mut() = body::boxed(Watched::new(inner, Trailers { span, tracer: tracer.clone() }));
        } else {
            tracer.finish(span);
        }
    }

    /// Ends an attempt's span.
    pub fn finish_attempt(
        &self,
        tracer: Option<&Tracer>,
        mut span: Span,
        result: Result<&Response<Body>, (u16, Cause)>,
    ) {
        let Some(tracer) = tracer else { return };
        match result {
            Ok(rsp) => end(&mut span, rsp.status().as_u16(), None, rsp.headers()),
            Err((status, cause)) => end(&mut span, status, Some(cause), &HeaderMap::new()),
        }
        self.peer_attributes(&mut span);
        tracer.finish(span);
    }

    fn peer_attributes(&self, span: &mut Span) {
        if let Some(id) = &self.peer_identity {
            span.set("weft.peer.identity", id.to_string());
        }
        if let Some(w) = &self.peer_workload {
            span.set("weft.peer.workload", w.to_string());
        }
    }
}

const GRPC_STATUS: &str = "grpc-status";

/// `rpc.grpc.status_code` from a head or trailers; a code other than OK is an error.
fn grpc_status(span: &mut Span, headers: &HeaderMap) {
    if let Some(code) = headers.get(GRPC_STATUS).and_then(|v| v.to_str().ok()?.parse::<i64>().ok()) {
        span.set("rpc.grpc.status_code", code);
        if code != 0 && span.error.is_none() {
            span.error = Some(format!("gRPC status {code}"));
        }
    }
}

/// Ends a gRPC server span when its response body ends: with the status of its
/// trailers, or as an error when the body fails or the client goes away first.
struct Trailers {
    span: Span,
    tracer: Arc<Tracer>,
}

impl OnEnd for Trailers {
    fn ended(self, end: End<'_>) {
        let Trailers { mut span, tracer } = self;
        match end {
            End::Complete(Some(trailers)) => grpc_status(&mut span, trailers),
            End::Complete(None) => {}
            End::Failed(Some(e)) => span.error = Some(format!("response body failed: {e}")),
            End::Failed(None) => {
                span.error.get_or_insert_with(|| "the response did not finish".to_string());
            }
        }
        tracer.finish(span);
    }
}

/// Towards an app, B3 always goes too: in the style that came, else multi-header.
fn for_app(b3: Option<B3Style>) -> Option<B3Style> {
    Some(b3.unwrap_or_default())
}

/// Workload names as Kubernetes allows them; anything else from a peer is ignored, so a
/// peer cannot blow up the metrics' label sets.
fn valid_workload(w: &str) -> bool {
    !w.is_empty()
        && w.len() <= 63
        && w.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

/// `{method}` for HTTP, `{service}/{method}` for gRPC (OpenTelemetry's span names).
fn span_name(req: &Request<Body>) -> String {
    match grpc_method(req) {
        Some((service, method)) => format!("{service}/{method}"),
        None => method_str(req.method()).to_string(),
    }
}

fn grpc_method(req: &Request<Body>) -> Option<(&str, &str)> {
    let is_grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let (service, method) = req.uri().path().strip_prefix('/')?.split_once('/')?;
    is_grpc.then_some((service, method))
}

/// The method, or `_OTHER` for methods outside RFC 9110 (unbounded values stay out).
fn method_str(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

fn request_attributes(span: &mut Span, req: &Request<Body>) {
    span.set("http.request.method", method_str(req.method()));
    span.set("url.path", req.uri().path().to_string());
    span.set("url.scheme", "http");
    let version = match req.version() {
        Version::HTTP_2 => "2",
        Version::HTTP_10 => "1.0",
        _ => "1.1",
    };
    span.set("network.protocol.version", version);
    if let Some(a) = super::headers::authority(req) {
        span.set("server.address", a.host().to_string());
        if let Some(p) = a.port_u16() {
            span.set("server.port", i64::from(p));
        }
    }
    if let Some((service, method)) = grpc_method(req) {
        span.set("rpc.system", "grpc");
        span.set("rpc.service", service.to_string());
        span.set("rpc.method", method.to_string());
    }
}

/// Status attributes; an error status for 5xx (and for 4xx the proxy made), as the
/// HTTP conventions set it for server spans.
fn end(span: &mut Span, status: u16, cause: Option<Cause>, rsp: &HeaderMap) {
    span.set("http.response.status_code", i64::from(status));
    grpc_status(span, rsp);
    if let Some(c) = cause {
        span.set("weft.error", c.as_str());
        span.set("error.type", c.as_str());
        span.error = Some(c.as_str().to_string());
    } else if status >= 500 {
        span.set("error.type", status.to_string());
        span.error = Some(format!("HTTP {status}"));
    }
}

/// This proxy's workload as a header value, checked once at startup.
pub fn workload_header(workload: &str) -> Option<HeaderValue> {
    valid_workload(workload).then(|| HeaderValue::from_str(workload).ok()).flatten()
}
