//! Spans to OTLP protobuf bytes (`ExportTraceServiceRequest`), written directly.
//!
//! The generated prost types of opentelemetry-proto need an owned `String` for every
//! attribute key and value: about twenty allocations per span, which bench/ measured as
//! most of the exporter's cost. This writes the same wire format from the span records
//! as they are; a unit test decodes the result with opentelemetry-proto's own types.

use std::fmt::Write as _;

use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};

use super::{Kind, Span, Value};

/// Field numbers of opentelemetry/proto/{collector/trace,trace,common,resource}/v1.
mod field {
    pub const REQUEST_RESOURCE_SPANS: u32 = 1;
    pub const RESOURCE_SPANS_RESOURCE: u32 = 1;
    pub const RESOURCE_SPANS_SCOPE_SPANS: u32 = 2;
    pub const RESOURCE_ATTRIBUTES: u32 = 1;
    pub const SCOPE_SPANS_SCOPE: u32 = 1;
    pub const SCOPE_SPANS_SPANS: u32 = 2;
    pub const SCOPE_NAME: u32 = 1;
    pub const SCOPE_VERSION: u32 = 2;
    pub const SPAN_TRACE_ID: u32 = 1;
    pub const SPAN_SPAN_ID: u32 = 2;
    pub const SPAN_TRACE_STATE: u32 = 3;
    pub const SPAN_PARENT_SPAN_ID: u32 = 4;
    pub const SPAN_NAME: u32 = 5;
    pub const SPAN_KIND: u32 = 6;
    pub const SPAN_START: u32 = 7;
    pub const SPAN_END: u32 = 8;
    pub const SPAN_ATTRIBUTES: u32 = 9;
    pub const SPAN_STATUS: u32 = 15;
    pub const SPAN_FLAGS: u32 = 16;
    pub const STATUS_MESSAGE: u32 = 2;
    pub const STATUS_CODE: u32 = 3;
    pub const KEY_VALUE_KEY: u32 = 1;
    pub const KEY_VALUE_VALUE: u32 = 2;
    pub const ANY_VALUE_STRING: u32 = 1;
    pub const ANY_VALUE_INT: u32 = 3;
}

/// SpanKind and Status.StatusCode values.
const KIND_INTERNAL: u64 = 1;
const KIND_SERVER: u64 = 2;
const KIND_CLIENT: u64 = 3;
const STATUS_ERROR: u64 = 2;

/// Wraps encoded spans into requests, with the resource and scope encoded once.
pub struct Encoder {
    resource: Vec<u8>,
    scope: Vec<u8>,
}

impl Encoder {
    pub fn new(resource_attributes: &[(&'static str, Value)]) -> Self {
        let mut text = String::new();
        let mut resource = Vec::new();
        for (k, v) in resource_attributes {
            attribute(&mut resource, field::RESOURCE_ATTRIBUTES, k, v, &mut text);
        }
        let mut scope = Vec::new();
        string(&mut scope, field::SCOPE_NAME, "weft-proxy");
        string(&mut scope, field::SCOPE_VERSION, env!("CARGO_PKG_VERSION"));
        Encoder { resource, scope }
    }

    /// One `ExportTraceServiceRequest` holding `spans`, a run of [`span_entry`]s.
    pub fn request(&self, spans: &[u8]) -> Vec<u8> {
        let scope_field = 1 + encoded_len_varint(self.scope.len() as u64) + self.scope.len();
        let scope_spans_len = scope_field + spans.len();
        let resource_field = 1 + encoded_len_varint(self.resource.len() as u64) + self.resource.len();
        let resource_spans_len =
            resource_field + 1 + encoded_len_varint(scope_spans_len as u64) + scope_spans_len;
        let mut out = Vec::with_capacity(resource_spans_len + 2 * 11);
        encode_key(field::REQUEST_RESOURCE_SPANS, WireType::LengthDelimited, &mut out);
        encode_varint(resource_spans_len as u64, &mut out);
        message(&mut out, field::RESOURCE_SPANS_RESOURCE, &self.resource);
        encode_key(field::RESOURCE_SPANS_SCOPE_SPANS, WireType::LengthDelimited, &mut out);
        encode_varint(scope_spans_len as u64, &mut out);
        message(&mut out, field::SCOPE_SPANS_SCOPE, &self.scope);
        out.extend_from_slice(spans);
        out
    }
}

/// Appends `s` as a `ScopeSpans.spans` field (tag, length, span) to `out`; `false`
/// (nothing appended) for a span over 2 MiB, which no request under the header size
/// limit makes.
pub fn span_entry(out: &mut Vec<u8>, s: &Span, end: std::time::SystemTime, text: &mut String) -> bool {
    // The span is written after room for its length, which is then filled in.
    let start = out.len();
    encode_key(field::SCOPE_SPANS_SPANS, WireType::LengthDelimited, out);
    let at = out.len();
    out.extend_from_slice(&[0; LEN_BYTES]);
    span(out, s, end, text);
    let len = out.len() - at - LEN_BYTES;
    if len >= 1 << (7 * LEN_BYTES) {
        out.truncate(start);
        return false;
    }
    write_padded_varint(&mut out[at..at + LEN_BYTES], len);
    true
}

/// A span's length is written as a fixed-size varint (padded with continuation bytes,
/// which protobuf allows) so it can be filled in after the span is written.
const LEN_BYTES: usize = 3;

fn write_padded_varint(slot: &mut [u8], mut v: usize) {
    for (i, b) in slot.iter_mut().enumerate() {
        *b = (v & 0x7f) as u8 | if i + 1 < LEN_BYTES { 0x80 } else { 0 };
        v >>= 7;
    }
}

fn span(buf: &mut Vec<u8>, s: &Span, end: std::time::SystemTime, text: &mut String) {
    bytes(buf, field::SPAN_TRACE_ID, &s.ctx.trace_id);
    bytes(buf, field::SPAN_SPAN_ID, &s.ctx.span_id);
    if let Some(state) = s.ctx.trace_state.as_ref().and_then(|v| v.to_str().ok()) {
        string(buf, field::SPAN_TRACE_STATE, state);
    }
    if let Some(parent) = &s.parent {
        bytes(buf, field::SPAN_PARENT_SPAN_ID, parent);
    }
    string(buf, field::SPAN_NAME, &s.name);
    let kind = match s.kind {
        Kind::Internal => KIND_INTERNAL,
        Kind::Server => KIND_SERVER,
        Kind::Client => KIND_CLIENT,
    };
    varint(buf, field::SPAN_KIND, kind);
    fixed64(buf, field::SPAN_START, nanos(s.start));
    fixed64(buf, field::SPAN_END, nanos(end));
    for (k, v) in &s.attributes {
        attribute(buf, field::SPAN_ATTRIBUTES, k, v, text);
    }
    if let Some(message_text) = &s.error {
        let mut status = Vec::with_capacity(message_text.len() + 4);
        string(&mut status, field::STATUS_MESSAGE, message_text);
        varint(&mut status, field::STATUS_CODE, STATUS_ERROR);
        message(buf, field::SPAN_STATUS, &status);
    }
    // W3C trace flags: sampled (every exported span is).
    encode_key(field::SPAN_FLAGS, WireType::ThirtyTwoBit, buf);
    buf.extend_from_slice(&1u32.to_le_bytes());
}

fn nanos(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// A `KeyValue` as field `tag` of the enclosing message.
fn attribute(buf: &mut Vec<u8>, tag: u32, key: &str, value: &Value, text: &mut String) {
    let (s, int): (&str, Option<i64>) = match value {
        Value::Str(s) => (s, None),
        Value::Static(s) => (s, None),
        Value::Ip(ip) => {
            text.clear();
            let _ = write!(text, "{ip}");
            (text, None)
        }
        Value::Int(i) => ("", Some(*i)),
    };
    let any_value_len = match int {
        Some(i) => 1 + encoded_len_varint(i as u64),
        None => 1 + encoded_len_varint(s.len() as u64) + s.len(),
    };
    let kv_len = key_len(key) + 1 + encoded_len_varint(any_value_len as u64) + any_value_len;
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(kv_len as u64, buf);
    string(buf, field::KEY_VALUE_KEY, key);
    encode_key(field::KEY_VALUE_VALUE, WireType::LengthDelimited, buf);
    encode_varint(any_value_len as u64, buf);
    match int {
        Some(i) => varint(buf, field::ANY_VALUE_INT, i as u64),
        None => string(buf, field::ANY_VALUE_STRING, s),
    }
}

fn key_len(key: &str) -> usize {
    1 + encoded_len_varint(key.len() as u64) + key.len()
}

fn message(buf: &mut Vec<u8>, tag: u32, body: &[u8]) {
    bytes(buf, tag, body);
}

fn bytes(buf: &mut Vec<u8>, tag: u32, b: &[u8]) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(b.len() as u64, buf);
    buf.extend_from_slice(b);
}

fn string(buf: &mut Vec<u8>, tag: u32, s: &str) {
    bytes(buf, tag, s.as_bytes());
}

fn varint(buf: &mut Vec<u8>, tag: u32, v: u64) {
    encode_key(tag, WireType::Varint, buf);
    encode_varint(v, buf);
}

fn fixed64(buf: &mut Vec<u8>, tag: u32, v: u64) {
    encode_key(tag, WireType::SixtyFourBit, buf);
    buf.extend_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::{
        collector::trace::v1::ExportTraceServiceRequest,
        common::v1::any_value::Value as Any,
        trace::v1::{span::SpanKind, status::StatusCode},
    };
    use prost::Message;

    use super::*;
    use crate::{
        config::Sampler,
        metrics::Metrics,
        trace::{Queue, Traced, Tracer},
    };

    #[test]
    fn opentelemetry_proto_decodes_what_is_written() {
        let t = Tracer::new(Sampler { ratio: 1.0, parent_based: true }, Queue::new(8, 8), Metrics::new());
        let Traced::Recording(mut server) = t.start(None, false, Kind::Server, || "GET".into()) else {
            panic!()
        };
        server.set("http.request.method", "GET");
        server.set("url.path", "/a/b".to_string());
        server.set("http.response.status_code", 503i64);
        server.set("client.address", Value::Ip("10.0.0.7".parse().unwrap()));
        server.set("weft.peer.identity", "spiffe://t/ns/a/sa/b".to_string());
        server.error = Some("HTTP 503".into());
        let mut client = t.child(&server, Kind::Client, "GET".into());
        client.set("http.request.resend_count", 1i64);
        client.set("network.peer.port", 4143i64);
        let (client_ctx, server_ctx) = (client.ctx.clone(), server.ctx.clone());
        t.finish(client);
        t.finish(server);
        let queued = t.queue.take();
        let enc = Encoder::new(&[("service.name", Value::Str("shop".into()))]);
        let bytes = enc.request(&queued.bytes);

        let req = ExportTraceServiceRequest::decode(bytes.as_slice()).expect("valid OTLP");
        let rs = &req.resource_spans[0];
        let res = &rs.resource.as_ref().unwrap().attributes[0];
        assert_eq!(res.key, "service.name");
        assert_eq!(res.value.as_ref().unwrap().value, Some(Any::StringValue("shop".into())));
        let ss = &rs.scope_spans[0];
        assert_eq!(ss.scope.as_ref().unwrap().name, "weft-proxy");
        let [c, s] = &ss.spans[..] else { panic!("two spans: {ss:?}") };
        assert_eq!(
            (c.trace_id.as_slice(), c.span_id.as_slice()),
            (&client_ctx.trace_id[..], &client_ctx.span_id[..])
        );
        assert_eq!(c.parent_span_id, server_ctx.span_id.to_vec());
        assert!(s.parent_span_id.is_empty());
        assert_eq!((c.kind, s.kind), (SpanKind::Client as i32, SpanKind::Server as i32));
        assert_eq!((c.name.as_str(), c.flags), ("GET", 1));
        assert!(
            s.end_time_unix_nano >= s.start_time_unix_nano
                && s.start_time_unix_nano > 1_600_000_000_000_000_000
        );
        let attr = |span: &opentelemetry_proto::tonic::trace::v1::Span, k: &str| {
            span.attributes.iter().find(|a| a.key == k).and_then(|a| a.value.clone()?.value)
        };
        assert_eq!(attr(s, "url.path"), Some(Any::StringValue("/a/b".into())));
        assert_eq!(attr(s, "http.response.status_code"), Some(Any::IntValue(503)));
        assert_eq!(attr(s, "client.address"), Some(Any::StringValue("10.0.0.7".into())));
        assert_eq!(attr(s, "weft.peer.identity"), Some(Any::StringValue("spiffe://t/ns/a/sa/b".into())));
        assert_eq!(attr(c, "http.request.resend_count"), Some(Any::IntValue(1)));
        let status = s.status.as_ref().unwrap();
        assert_eq!((status.code, status.message.as_str()), (StatusCode::Error as i32, "HTTP 503"));
        assert!(c.status.is_none());
    }
}
