//! Distributed tracing: trace context in and out of every request, and spans exported
//! over OTLP.
//!
//! Per request, the HTTP path asks the [`Tracer`] for a span ([`Tracer::start`]), puts
//! the span's context on the request it forwards ([`context::inject`]), and hands the
//! finished span back ([`Tracer::finish`]). Finishing never waits: spans go into a
//! bounded [`Queue`] that [`export`] drains in batches on the proxy's main thread, and a
//! full queue drops the span and counts it (`weft_trace_spans_dropped_total`).
//! The exporter is woken once per full batch, not per span: a wake-up is a cross-thread
//! futex and context switch, which per span cost more than the span itself.
//! The span records are plain data; conversion to OTLP happens in the exporter.

pub mod context;
pub mod export;
mod otlp;

use std::{
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use tokio::sync::Notify;

pub use self::context::{B3Style, Incoming, SpanContext, SpanId, TraceId};
use crate::{config::Sampler, metrics::Metrics};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Server,
    Client,
    Internal,
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    Static(&'static str),
    /// Shared by the spans of a request or connection (a peer's identity, say).
    Shared(Arc<str>),
    /// Formatted only when exported.
    Ip(std::net::IpAddr),
    Int(i64),
}

impl From<&'static str> for Value {
    fn from(s: &'static str) -> Self {
        Value::Static(s)
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}

/// A span being recorded. Its context is what the next hop sees as its parent.
#[derive(Debug)]
pub struct Span {
    pub ctx: SpanContext,
    pub parent: Option<SpanId>,
    pub kind: Kind,
    pub name: String,
    start: SystemTime,
    started: Instant,
    pub attributes: Vec<(&'static str, Value)>,
    /// OpenTelemetry's span status: `Some(message)` is an error.
    pub error: Option<String>,
}

impl Span {
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        self.attributes.push((key, value.into()));
    }
}

/// A finished span, as the exporter receives it.
#[derive(Debug)]
pub struct SpanData {
    pub span: Span,
    pub end: SystemTime,
}

/// Where a request stands in its trace: its sampled span, or the context to pass on
/// unchanged when it is not sampled.
#[derive(Debug)]
pub enum Traced {
    Recording(Span),
    /// Not sampled: the caller's context goes on unsampled, in both formats; `None` when
    /// the tracer is off and the request carried no context.
    Passing(Option<SpanContext>),
}

impl Traced {
    /// The context the next hop should see.
    pub fn context(&self) -> Option<&SpanContext> {
        match self {
            Traced::Recording(s) => Some(&s.ctx),
            Traced::Passing(c) => c.as_ref(),
        }
    }

    pub fn trace_id(&self) -> Option<&TraceId> {
        self.context().map(|c| &c.trace_id)
    }

    pub fn span_mut(&mut self) -> Option<&mut Span> {
        match self {
            Traced::Recording(s) => Some(s),
            Traced::Passing(_) => None,
        }
    }
}

/// Finished spans waiting for export, shared by the shards and the exporter.
pub struct Queue {
    spans: Mutex<Vec<SpanData>>,
    /// Signalled when a full batch is waiting.
    pub ready: Notify,
    max: usize,
    batch: usize,
}

impl Queue {
    pub fn new(max: usize, batch: usize) -> Arc<Queue> {
        Arc::new(Queue { spans: Mutex::new(Vec::with_capacity(max)), ready: Notify::new(), max, batch })
    }

    /// Adds a span; `false` (the span dropped) when the queue is full.
    fn push(&self, span: SpanData) -> bool {
        let mut spans = self.spans.lock().expect("span queue lock");
        if spans.len() >= self.max {
            return false;
        }
        spans.push(span);
        if spans.len() == self.batch {
            self.ready.notify_one();
        }
        true
    }

    /// Takes up to a batch of the oldest spans.
    pub fn take(&self) -> Vec<SpanData> {
        let mut spans = self.spans.lock().expect("span queue lock");
        let n = spans.len().min(self.batch);
        spans.drain(..n).collect()
    }
}

pub struct Tracer {
    sampler: Sampler,
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
}

impl Tracer {
    /// A tracer filling `queue`, which [`export::run`] drains.
    pub fn new(sampler: Sampler, queue: Arc<Queue>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Tracer { sampler, queue, metrics })
    }

    /// Starts a span under `parent`, or a new trace when there is none, if sampling says so.
    pub fn start(
        &self,
        parent: Option<&SpanContext>,
        deny: bool,
        kind: Kind,
        name: impl FnOnce() -> String,
    ) -> Traced {
        let trace_id = parent.map_or_else(new_trace_id, |p| p.trace_id);
        let sampled = match parent {
            Some(p) if self.sampler.parent_based => p.sampled,
            None if deny && self.sampler.parent_based => false,
            _ => ratio_sampled(self.sampler.ratio, &trace_id),
        };
        if !sampled {
            // The decision travels on, so the next hops agree not to sample this trace.
            let ctx = match parent {
                Some(p) => SpanContext { sampled: false, ..p.clone() },
                None => SpanContext { trace_id, span_id: new_span_id(), sampled: false, trace_state: None },
            };
            return Traced::Passing(Some(ctx));
        }
        Traced::Recording(Span {
            ctx: SpanContext {
                trace_id,
                span_id: new_span_id(),
                sampled: true,
                trace_state: parent.and_then(|p| p.trace_state.clone()),
            },
            parent: parent.map(|p| p.span_id),
            kind,
            name: name(),
            start: SystemTime::now(),
            started: Instant::now(),
            attributes: Vec::with_capacity(12),
            error: None,
        })
    }

    /// A child of `parent` (a span of this proxy), always recorded: its parent was.
    pub fn child(&self, parent: &Span, kind: Kind, name: String) -> Span {
        Span {
            ctx: SpanContext { span_id: new_span_id(), ..parent.ctx.clone() },
            parent: Some(parent.ctx.span_id),
            kind,
            name,
            start: SystemTime::now(),
            started: Instant::now(),
            attributes: Vec::with_capacity(12),
            error: None,
        }
    }

    /// Queues a finished span for export; drops it (counted) when the queue is full.
    pub fn finish(&self, span: Span) {
        let end = span.start + span.started.elapsed();
        if !self.queue.push(SpanData { span, end }) {
            self.metrics.span_dropped(1);
        }
    }
}

fn new_trace_id() -> TraceId {
    loop {
        let id = fastrand::u128(..).to_be_bytes();
        if id != [0; 16] {
            return id;
        }
    }
}

fn new_span_id() -> SpanId {
    loop {
        let id = fastrand::u64(..).to_be_bytes();
        if id != [0; 8] {
            return id;
        }
    }
}

/// OpenTelemetry's TraceIdRatioBased rule: the trace id's low 8 bytes against the ratio,
/// so every proxy on the path decides the same for the same trace.
fn ratio_sampled(ratio: f64, trace_id: &TraceId) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let bound = (ratio * (1u64 << 63) as f64) as u64;
    let low = u64::from_be_bytes(trace_id[8..].try_into().expect("8 bytes")) >> 1;
    low < bound
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracer(ratio: f64, parent_based: bool) -> Arc<Tracer> {
        Tracer::new(Sampler { ratio, parent_based }, Queue::new(4, 4), Metrics::new())
    }

    fn parent(sampled: bool) -> SpanContext {
        SpanContext { trace_id: [7; 16], span_id: [9; 8], sampled, trace_state: None }
    }

    #[test]
    fn parent_based_follows_the_caller() {
        let t = tracer(0.0, true);
        let Traced::Recording(s) = t.start(Some(&parent(true)), false, Kind::Server, String::new) else {
            panic!("a sampled parent is followed")
        };
        assert_eq!((s.ctx.trace_id, s.parent), ([7; 16], Some([9; 8])));
        assert_ne!(s.ctx.span_id, [9; 8]);
        let passing = tracer(1.0, true).start(Some(&parent(false)), false, Kind::Server, String::new);
        assert_eq!(passing.context(), Some(&parent(false)));
        let denied = tracer(1.0, true).start(None, true, Kind::Server, String::new);
        assert!(matches!(denied, Traced::Passing(Some(SpanContext { sampled: false, .. }))));
    }

    #[test]
    fn ratio_samples_about_that_share_of_new_traces() {
        let t = tracer(0.25, true);
        let n = (0..4000)
            .filter(|_| matches!(t.start(None, false, Kind::Server, String::new), Traced::Recording(_)))
            .count();
        assert!((800..1200).contains(&n), "{n} of 4000 sampled at 0.25");
        assert!(ratio_sampled(0.5, &[0; 16]));
        assert!(!ratio_sampled(0.5, &[0xff; 16]));
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let metrics = Metrics::new();
        let queue = Queue::new(3, 2);
        let t = Tracer::new(Sampler { ratio: 1.0, parent_based: true }, queue.clone(), metrics.clone());
        for _ in 0..5 {
            let Traced::Recording(s) = t.start(None, false, Kind::Server, || "GET".into()) else { panic!() };
            t.finish(s);
        }
        assert!(metrics.encode().contains("weft_trace_spans_dropped_total 2"), "{}", metrics.encode());
        // A full batch was signalled; batches come oldest first.
        assert_eq!(queue.take().len(), 2);
        assert_eq!(queue.take().len(), 1);
        assert!(queue.take().is_empty());
    }
}
