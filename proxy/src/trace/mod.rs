//! Distributed tracing: trace context in and out of every request, and spans exported
//! over OTLP.
//!
//! Per request, the HTTP path asks the [`Tracer`] for a span ([`Tracer::start`]), puts
//! the span's context on the request it forwards ([`context::inject`]), and hands the
//! finished span back ([`Tracer::finish`]). Finishing never waits: the span is encoded
//! to OTLP protobuf right there, on the request's own thread, and its bytes appended to
//! a bounded [`Queue`] that [`export`] drains in batches on the proxy's main thread; a
//! full queue drops the span and counts it (`weft_trace_spans_dropped_total`).
//! Measured in bench/, and why it is built this way: the exporter is woken once per
//! full batch, not per span (a wake-up is a cross-thread futex and context switch); the
//! lock is held only to copy bytes in or swap the buffer out, so a preempted holder
//! cannot stall a shard for long; and a span's allocations are freed on the thread that
//! made them (glibc frees from another thread contend on the owner's arena lock).

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

/// Where a request stands in its trace: its sampled span, or the context to pass on
/// unchanged when it is not sampled.
#[derive(Debug)]
pub enum Traced {
    Recording(Span),
    /// Not recorded (not sampled, or tracing off): the context goes on as it is.
    Passing(SpanContext),
}

impl Traced {
    /// The context the next hop should see.
    pub fn context(&self) -> &SpanContext {
        match self {
            Traced::Recording(s) => &s.ctx,
            Traced::Passing(c) => c,
        }
    }

    pub fn span_mut(&mut self) -> Option<&mut Span> {
        match self {
            Traced::Recording(s) => Some(s),
            Traced::Passing(_) => None,
        }
    }
}

/// Finished spans waiting for export, encoded, shared by the shards and the exporter.
pub struct Queue {
    inner: Mutex<Encoded>,
    /// Signalled when a full batch is waiting.
    pub ready: Notify,
    max_spans: usize,
    max_bytes: usize,
    batch: usize,
}

/// Encoded spans (each a `ScopeSpans.spans` field) one after the other, and where each ends.
#[derive(Default)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub ends: Vec<usize>,
}

impl Encoded {
    fn with_capacity(spans: usize) -> Self {
        Encoded { bytes: Vec::with_capacity(spans * 512), ends: Vec::with_capacity(spans) }
    }

    /// The spans in groups of at most `n`, as byte ranges.
    pub fn batches(&self, n: usize) -> impl Iterator<Item = (usize, &[u8])> {
        self.ends.chunks(n).scan(0, move |start, ends| {
            let (from, to) = (*start, *ends.last().expect("chunks are never empty"));
            *start = to;
            Some((ends.len(), &self.bytes[from..to]))
        })
    }
}

impl Queue {
    /// Room for `max_spans` spans, and at most 1 KiB each on average.
    pub fn new(max_spans: usize, batch: usize) -> Arc<Queue> {
        Arc::new(Queue {
            inner: Mutex::new(Encoded::with_capacity(batch)),
            ready: Notify::new(),
            max_spans,
            max_bytes: max_spans * 1024,
            batch,
        })
    }

    /// Adds an encoded span; `false` (the span dropped) when the queue is full.
    fn push(&self, span: &[u8]) -> bool {
        let mut q = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if q.ends.len() >= self.max_spans || q.bytes.len() + span.len() > self.max_bytes {
            return false;
        }
        q.bytes.extend_from_slice(span);
        let end = q.bytes.len();
        q.ends.push(end);
        if q.ends.len() == self.batch {
            self.ready.notify_one();
        }
        true
    }

    /// Takes every waiting span, leaving an empty buffer.
    pub fn take(&self) -> Encoded {
        let fresh = Encoded::with_capacity(self.batch);
        std::mem::replace(&mut *self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner), fresh)
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
            return Traced::Passing(ctx);
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
        thread_local! {
            static SCRATCH: std::cell::RefCell<(Vec<u8>, String)> = Default::default();
        }
        let queued = SCRATCH.with_borrow_mut(|(buf, text)| {
            buf.clear();
            otlp::span_entry(buf, &span, end, text) && self.queue.push(buf)
        });
        if !queued {
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
        assert_eq!(passing.context(), &parent(false));
        let denied = tracer(1.0, true).start(None, true, Kind::Server, String::new);
        assert!(matches!(denied, Traced::Passing(SpanContext { sampled: false, .. })));
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
        let taken = queue.take();
        let sizes: Vec<usize> = taken.batches(2).map(|(n, _)| n).collect();
        assert_eq!(sizes, [2, 1]);
        assert!(queue.take().ends.is_empty());
    }
}
