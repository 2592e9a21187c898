//! Spans to OTLP protobuf bytes (`ExportTraceServiceRequest`), written directly.
//!
//! The generated prost types of opentelemetry-proto need an owned `String` for every
//! attribute key and value: about twenty allocations per span, which bench/ measured as
//! most of the exporter's cost. This writes the same wire format from the span records
//! as they are; a unit test decodes the result with opentelemetry-proto's own types.

use std::fmt::Write as _;

use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};

use super::{Kind, SpanData, Value};

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

/// Encodes requests, reusing its buffers from one batch to the next.
pub struct Encoder {
    /// The resource and scope, encoded once.
    resource: Vec<u8>,
    scope: Vec<u8>,
    spans: Vec<u8>,
    span: Vec<u8>,
    text: String,
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
        Encoder { resource, scope, spans: Vec::new(), span: Vec::new(), text }
    }

    /// One `ExportTraceServiceRequest` holding `batch`.
    pub fn request(&mut self, batch: &[SpanData]) -> Vec<u8> {
        self.spans.clear();
        message(&mut self.spans, field::SCOPE_SPANS_SCOPE, &self.scope);
        for data in batch {
            self.span.clear();
            span(&mut self.span, data, &mut self.text);
            message(&mut self.spans, field::SCOPE_SPANS_SPANS, &self.span);
        }
        let mut resource_spans =
            Vec::with_capacity(self.resource.len() + self.spans.len() + 2 * MAX_VARINT + 2);
        message(&mut resource_spans, field::RESOURCE_SPANS_RESOURCE, &self.resource);
        message(&mut resource_spans, field::RESOURCE_SPANS_SCOPE_SPANS, &self.spans);
        let mut out = Vec::with_capacity(resource_spans.len() + MAX_VARINT + 1);
        message(&mut out, field::REQUEST_RESOURCE_SPANS, &resource_spans);
        out
    }
}

const MAX_VARINT: usize = 10;

fn span(buf: &mut Vec<u8>, data: &SpanData, text: &mut String) {
    let s = &data.span;
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
    fixed64(buf, field::SPAN_END, nanos(data.end));
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
    let any_value_len;
    let s: &str = match value {
        Value::Str(s) => s,
        Value::Static(s) => s,
        Value::Shared(s) => s,
        Value::Ip(ip) => {
            text.clear();
            let _ = write!(text, "{ip}");
            text
        }
        Value::Int(i) => {
            any_value_len = 1 + encoded_len_varint(*i as u64);
            let kv_len = key_len(key) + 1 + encoded_len_varint(any_value_len as u64) + any_value_len;
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(kv_len as u64, buf);
            string(buf, field::KEY_VALUE_KEY, key);
            encode_key(field::KEY_VALUE_VALUE, WireType::LengthDelimited, buf);
            encode_varint(any_value_len as u64, buf);
            varint(buf, field::ANY_VALUE_INT, *i as u64);
            return;
        }
    };
    any_value_len = 1 + encoded_len_varint(s.len() as u64) + s.len();
    let kv_len = key_len(key) + 1 + encoded_len_varint(any_value_len as u64) + any_value_len;
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(kv_len as u64, buf);
    string(buf, field::KEY_VALUE_KEY, key);
    encode_key(field::KEY_VALUE_VALUE, WireType::LengthDelimited, buf);
    encode_varint(any_value_len as u64, buf);
    string(buf, field::ANY_VALUE_STRING, s);
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
        server.set("weft.peer.identity", Value::Shared("spiffe://t/ns/a/sa/b".into()));
        server.error = Some("HTTP 503".into());
        let mut client = t.child(&server, Kind::Client, "GET".into());
        client.set("http.request.resend_count", 1i64);
        client.set("network.peer.port", 4143i64);
        let (client_ctx, server_ctx) = (client.ctx.clone(), server.ctx.clone());
        t.finish(client);
        t.finish(server);
        let batch = Queue::take(&t.queue);
        let mut enc = Encoder::new(&[("service.name", Value::Str("shop".into()))]);
        let bytes = enc.request(&batch);
        // Encoding twice with the same encoder gives the same bytes (buffers are reset).
        assert_eq!(enc.request(&batch), bytes);

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
