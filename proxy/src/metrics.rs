//! Prometheus metrics of the proxy, served on the admin port.
//!
//! Labels stay bounded: direction, status code and class, the `weft-error` cause word,
//! the route rule (bounded by the mesh file), the peer's workload and SPIFFE ID (bounded
//! by the mesh's workloads), the detection outcome. No paths, addresses or request ids
//! become labels.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, PoisonError},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use crate::errors::Cause;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DirLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    direction: &'static str,
    /// `http1` or `h2`, as the client spoke it.
    protocol: &'static str,
    status: u16,
    /// `2xx` … `5xx`.
    status_class: &'static str,
    /// The `weft-error` cause when the proxy made the response; empty otherwise.
    cause: &'static str,
    route: Label,
    peer_workload: Label,
    peer_identity: Label,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TcpLabels {
    direction: &'static str,
    /// The mesh peer's SPIFFE ID; empty outside the mesh.
    peer_identity: Label,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LatencyLabels {
    direction: &'static str,
    status_class: &'static str,
    route: Label,
    peer_workload: Label,
    peer_identity: Label,
}

/// A label value learnt once (when the route, peer or endpoint became known) and shared
/// by every request after it: recording a request allocates no label strings. Empty
/// when absent.
pub type Label = Option<Arc<str>>;

/// Who a request went to (outbound) or came from (inbound), and by which route rule.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub route: Label,
    pub workload: Label,
    pub identity: Label,
}

fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DetectLabels {
    direction: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CauseLabels {
    direction: &'static str,
    cause: &'static str,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<LatencyLabels, Histogram>,
    detect: Family<DetectLabels, Counter>,
    tcp_open: Family<DirLabels, Gauge>,
    tcp_accepted: Family<DirLabels, Counter>,
    tcp_read_bytes: Family<TcpLabels, Counter>,
    tcp_write_bytes: Family<TcpLabels, Counter>,
    tcp_errors: Family<CauseLabels, Counter>,
    certify: Family<ResultLabels, Counter>,
    tls_handshakes: Family<TlsLabels, Counter>,
    denied: Family<DeniedLabels, Counter>,
    cert_expiry: Gauge,
    retries: Family<RouteLabels, Counter>,
    retry_budget_exhausted: Family<RouteLabels, Counter>,
    ejections: Family<ServiceLabels, Counter>,
    rerouted: Family<ServiceLabels, Counter>,
    listener_refused: Family<ListenerLabels, Counter>,
    restored: Family<ServiceLabels, Counter>,
    spans_exported: Counter,
    spans_dropped: Counter,
    span_export_failures: Counter,
    control_generation: Family<KindLabels, Gauge>,
    control_watches: Family<KindLabels, Gauge>,
    control_evictions: Family<KindLabels, Counter>,
    interned: Mutex<HashSet<Arc<str>>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    /// `discovery`, `policy` or `routes`.
    kind: &'static str,
}

/// Label values the interner keeps; past this (a peer sending ever new names), values
/// are still recorded, just allocated per use.
const MAX_INTERNED: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServiceLabels {
    /// The service authority the balancer serves: bounded by the mesh's services.
    service: Arc<str>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    /// `<route>/<rule index>` from the mesh file: bounded by its routes.
    route: Arc<str>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DeniedLabels {
    /// The client's SPIFFE ID; empty for plaintext clients. Bounded by the mesh's workloads.
    client_identity: Label,
    /// `http` (answered 403) or `tcp` (closed).
    protocol: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TlsLabels {
    direction: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Latency buckets from 100 µs to ~30 s: a proxy hop is sub-millisecond, an app may not be.
fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        10.0, 30.0,
    ])
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("weft");
        let requests = Family::default();
        registry.register(
            "requests",
            "HTTP responses sent to clients, by status and proxy error cause",
            requests.clone(),
        );
        let request_duration = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "request_duration",
            "Time from request head received to response head sent",
            Unit::Seconds,
            request_duration.clone(),
        );
        let detect = Family::default();
        registry.register("detect", "Protocol detection outcomes of accepted connections", detect.clone());
        let tcp_open = Family::default();
        registry.register("tcp_open_connections", "Client connections currently open", tcp_open.clone());
        let tcp_accepted = Family::default();
        registry.register("tcp_accepted", "Client connections accepted", tcp_accepted.clone());
        let tcp_read_bytes = Family::default();
        registry.register_with_unit(
            "tcp_read",
            "Bytes read from clients on opaque TCP, CONNECT and upgraded connections, counted at close",
            Unit::Bytes,
            tcp_read_bytes.clone(),
        );
        let tcp_write_bytes = Family::default();
        registry.register_with_unit(
            "tcp_write",
            "Bytes written to clients on opaque TCP, CONNECT and upgraded connections, counted at close",
            Unit::Bytes,
            tcp_write_bytes.clone(),
        );
        let tcp_errors = Family::default();
        registry.register(
            "tcp_errors",
            "Connections closed by the proxy because of an error",
            tcp_errors.clone(),
        );
        let certify = Family::default();
        registry.register(
            "identity_certify",
            "Certificate requests to the control plane, by result",
            certify.clone(),
        );
        let cert_expiry = Gauge::default();
        registry.register(
            "identity_cert_expiry_timestamp_seconds",
            "When the proxy's current certificate expires (Unix time); 0 before the first one",
            cert_expiry.clone(),
        );
        let tls_handshakes = Family::default();
        registry.register("tls_handshakes", "Mesh mTLS handshakes, by result", tls_handshakes.clone());
        let denied = Family::default();
        registry.register(
            "inbound_denied",
            "Inbound requests and connections refused by policy",
            denied.clone(),
        );
        let retries = Family::default();
        registry.register("retries", "Retried attempts, by route rule", retries.clone());
        let retry_budget_exhausted = Family::default();
        registry.register(
            "retry_budget_exhausted",
            "Retries not made because the rule's retry budget was spent",
            retry_budget_exhausted.clone(),
        );
        let ejections = Family::default();
        registry.register(
            "outlier_ejections",
            "Endpoints ejected from a service's balancer after failures in a row",
            ejections.clone(),
        );
        let listener_refused = Family::default();
        registry.register(
            "listener_refused",
            "Connections closed because their listener had its maximum open: the one idle longest makes room",
            listener_refused.clone(),
        );
        let rerouted = Family::default();
        registry.register(
            "rerouted",
            "Requests sent again on another endpoint because they provably never reached the first \
             (refused, or its connection closed or GOAWAY'd before they were written), whatever the method",
            rerouted.clone(),
        );
        let restored = Family::default();
        registry.register(
            "outlier_restored",
            "Ejected endpoints brought back by a successful probe",
            restored.clone(),
        );
        let spans_exported = Counter::default();
        registry.register(
            "trace_spans_exported",
            "Spans accepted by the OTLP collector",
            spans_exported.clone(),
        );
        let spans_dropped = Counter::default();
        registry.register(
            "trace_spans_dropped",
            "Spans dropped because the export queue was full or the collector failed",
            spans_dropped.clone(),
        );
        let span_export_failures = Counter::default();
        registry.register(
            "trace_export_failures",
            "Span batches the OTLP collector did not accept (unreachable, refused or too slow)",
            span_export_failures.clone(),
        );
        let control_generation = Family::default();
        registry.register(
            "control_generation",
            "The newest control-plane state generation among the answers received, by kind",
            control_generation.clone(),
        );
        let control_watches = Family::default();
        registry.register(
            "control_watches",
            "Control-plane watches held (one per authority or port in use), by kind",
            control_watches.clone(),
        );
        let control_evictions = Family::default();
        registry.register(
            "control_watch_evictions",
            "Watches closed because their key was not used for a while, or to stay under the cap, by kind",
            control_evictions.clone(),
        );
        Arc::new(Metrics {
            control_generation,
            control_watches,
            control_evictions,
            interned: Mutex::default(),
            spans_exported,
            spans_dropped,
            span_export_failures,
            ejections,
            rerouted,
            listener_refused,
            restored,
            retries,
            retry_budget_exhausted,
            denied,
            tls_handshakes,
            certify,
            cert_expiry,
            registry,
            requests,
            request_duration,
            detect,
            tcp_open,
            tcp_accepted,
            tcp_read_bytes,
            tcp_write_bytes,
            tcp_errors,
        })
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// `s` as a shared label value: the same `Arc` for the same string.
    pub fn intern(&self, s: &str) -> Arc<str> {
        let mut interned = self.interned.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(v) = interned.get(s) {
            return v.clone();
        }
        let v: Arc<str> = Arc::from(s);
        if interned.len() < MAX_INTERNED {
            interned.insert(v.clone());
        }
        v
    }

    /// A control-plane answer of `kind` made from state `generation` arrived.
    /// How many watches of `kind` are held, and how many were just evicted.
    pub fn control_watches(&self, kind: &'static str, held: usize, evicted: usize) {
        let labels = KindLabels { kind };
        self.control_watches.get_or_create(&labels).set(i64::try_from(held).unwrap_or(i64::MAX));
        if evicted > 0 {
            self.control_evictions.get_or_create(&labels).inc_by(evicted as u64);
        }
    }

    pub fn control_generation(&self, kind: &'static str, generation: u64) {
        let gauge = self.control_generation.get_or_create(&KindLabels { kind });
        let generation = i64::try_from(generation).unwrap_or(i64::MAX);
        // Shards race only upwards; the newest wins.
        if generation > gauge.get() {
            gauge.set(generation);
        }
    }

    /// An endpoint ejected by outlier detection (`ejected`), or brought back.
    pub fn outlier(&self, service: &str, ejected: bool) {
        let labels = ServiceLabels { service: self.intern(service) };
        match ejected {
            true => self.ejections.get_or_create(&labels).inc(),
            false => self.restored.get_or_create(&labels).inc(),
        };
    }

    /// A connection `listener` closed at once: it had its maximum open.
    pub fn listener_refused(&self, listener: &'static str) {
        self.listener_refused.get_or_create(&ListenerLabels { listener }).inc();
    }

    /// A request that never reached its endpoint, sent to another of `service`'s.
    pub fn rerouted(&self, service: &str) {
        self.rerouted.get_or_create(&ServiceLabels { service: self.intern(service) }).inc();
    }

    pub fn retried(&self, route: &Arc<str>) {
        self.retries.get_or_create(&RouteLabels { route: route.clone() }).inc();
    }

    pub fn retry_budget_exhausted(&self, route: &Arc<str>) {
        self.retry_budget_exhausted.get_or_create(&RouteLabels { route: route.clone() }).inc();
    }

    pub fn response(
        &self,
        dir: Direction,
        protocol: &'static str,
        status: u16,
        cause: Option<Cause>,
        peer: Peer,
        secs: f64,
    ) {
        let cause = cause.map(Cause::as_str).unwrap_or("");
        let latency = LatencyLabels {
            direction: dir.as_str(),
            status_class: status_class(status),
            route: peer.route,
            peer_workload: peer.workload,
            peer_identity: peer.identity,
        };
        self.request_duration.get_or_create(&latency).observe(secs);
        let LatencyLabels { direction, status_class, route, peer_workload, peer_identity } = latency;
        self.requests
            .get_or_create(&RequestLabels {
                direction,
                protocol,
                status,
                status_class,
                cause,
                route,
                peer_workload,
                peer_identity,
            })
            .inc();
    }

    pub fn spans_exported(&self, n: u64) {
        self.spans_exported.inc_by(n);
    }

    pub fn span_dropped(&self, n: u64) {
        self.spans_dropped.inc_by(n);
    }

    pub fn span_export_failed(&self) {
        self.span_export_failures.inc();
    }

    /// A protocol detection outcome (`transport::detect::Outcome::as_str`).
    pub fn detected(&self, dir: Direction, outcome: &'static str) {
        self.detect.get_or_create(&DetectLabels { direction: dir.as_str(), outcome }).inc();
    }

    /// Counts an accepted connection; the returned guard marks it closed when dropped.
    pub fn conn_open(self: &Arc<Self>, dir: Direction) -> OpenConn {
        let labels = DirLabels { direction: dir.as_str() };
        self.tcp_accepted.get_or_create(&labels).inc();
        self.tcp_open.get_or_create(&labels).inc();
        OpenConn { metrics: self.clone(), dir }
    }

    pub fn tcp_bytes(&self, dir: Direction, peer_identity: Label, read: u64, written: u64) {
        let labels = TcpLabels { direction: dir.as_str(), peer_identity };
        self.tcp_read_bytes.get_or_create(&labels).inc_by(read);
        self.tcp_write_bytes.get_or_create(&labels).inc_by(written);
    }

    pub fn denied(&self, client_identity: Label, protocol: &'static str) {
        self.denied.get_or_create(&DeniedLabels { client_identity, protocol }).inc();
    }

    pub fn tls_handshake(&self, dir: Direction, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.tls_handshakes.get_or_create(&TlsLabels { direction: dir.as_str(), result }).inc();
    }

    /// A certificate request's result; `not_after` is the new certificate's expiry.
    pub fn certified(&self, ok: bool, not_after: i64) {
        self.certify.get_or_create(&ResultLabels { result: if ok { "ok" } else { "error" } }).inc();
        if ok {
            self.cert_expiry.set(not_after);
        }
    }

    /// The one place a connection the proxy closes because of `cause` is recorded: a log
    /// line with the cause word and why, and the `tcp_errors` metric.
    pub fn closed(&self, dir: Direction, cause: Cause, why: std::fmt::Arguments<'_>) {
        tracing::info!(direction = dir.as_str(), cause = cause.as_str(), "closing connection: {why}");
        self.tcp_errors.get_or_create(&CauseLabels { direction: dir.as_str(), cause: cause.as_str() }).inc();
    }
}

pub struct OpenConn {
    metrics: Arc<Metrics>,
    dir: Direction,
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.metrics.tcp_open.get_or_create(&DirLabels { direction: self.dir.as_str() }).dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_exposition_has_labels() {
        let m = Metrics::new();
        let peer = Peer {
            route: None,
            workload: Some("frontend".into()),
            identity: Some(m.intern("spiffe://t/ns/a/sa/f")),
        };
        m.response(Direction::Inbound, "http1", 502, Some(Cause::UpstreamRefused), peer, 0.001);
        m.detected(Direction::Outbound, "silent");
        {
            let _c = m.conn_open(Direction::Inbound);
        }
        let text = m.encode();
        assert!(text.contains(
            r#"weft_requests_total{direction="inbound",protocol="http1",status="502",status_class="5xx",cause="upstream-refused",route="",peer_workload="frontend",peer_identity="spiffe://t/ns/a/sa/f"} 1"#
        ), "{text}");
        assert!(text.contains(r#"weft_detect_total{direction="outbound",outcome="silent"} 1"#), "{text}");
        assert!(text.contains(r#"weft_tcp_open_connections{direction="inbound"} 0"#), "{text}");
        assert!(text.contains("weft_request_duration_seconds_bucket"), "{text}");
    }
}
