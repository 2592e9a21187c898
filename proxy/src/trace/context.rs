//! Trace context on the wire: W3C Trace Context (`traceparent`, `tracestate`) and B3
//! (the single `b3` header and the `X-B3-*` headers).
//!
//! The proxy reads whichever format arrived and writes the W3C headers plus B3 in the
//! style that arrived. Towards an app it always writes B3 too (the multi-header style
//! when none arrived, as Zipkin's libraries and Envoy inject by default), so an app
//! instrumented for either format joins the trace; between proxies W3C alone carries it.
//! These are untrusted bytes: anything malformed is ignored as if absent (W3C says to
//! start a new trace then), never an error for the request.

use http::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

/// The position of a request in a trace, as the next hop should see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
    /// Vendor data of `tracestate`, passed on unchanged.
    pub trace_state: Option<HeaderValue>,
}

/// Which B3 style a request carried, to answer in kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum B3Style {
    Single,
    #[default]
    Multi,
}

/// What a request's headers say about its trace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Incoming {
    /// The caller's span; `None` when no valid context arrived.
    pub parent: Option<SpanContext>,
    /// A B3 `0`/`X-B3-Sampled: 0` without ids: the caller decided not to sample.
    pub deny: bool,
    /// The B3 style that arrived, if any.
    pub b3: Option<B3Style>,
}

/// Reads the trace context of a request: `traceparent` first, then `b3`, then `X-B3-*`.
/// Most requests carry none of them: that costs four header lookups.
pub fn extract(headers: &HeaderMap) -> Incoming {
    let traceparent = headers.get(TRACEPARENT);
    let b3 = if headers.contains_key(B3) {
        Some(B3Style::Single)
    } else if headers.contains_key(B3_TRACE_ID) || headers.contains_key(B3_SAMPLED) {
        Some(B3Style::Multi)
    } else if traceparent.is_none() {
        return Incoming::default();
    } else {
        None
    };
    if let Some(parent) = traceparent.and_then(|v| parse_traceparent(v.as_bytes())) {
        let trace_state = headers.get(TRACESTATE).filter(|v| !v.is_empty()).cloned();
        return Incoming { parent: Some(SpanContext { trace_state, ..parent }), deny: false, b3 };
    }
    if let Some(v) = headers.get(B3) {
        return match parse_b3_single(v.as_bytes()) {
            Some(B3Single::Context(c)) => Incoming { parent: Some(c), deny: false, b3 },
            Some(B3Single::Deny) => Incoming { parent: None, deny: true, b3 },
            None => Incoming { b3, ..Incoming::default() },
        };
    }
    let trace_id = headers.get(B3_TRACE_ID).and_then(|v| trace_id_hex(v.as_bytes()));
    let span_id = headers.get(B3_SPAN_ID).and_then(|v| span_id_hex(v.as_bytes()));
    let debug = headers.get(B3_FLAGS).is_some_and(|v| v == "1");
    let sampled = headers.get(B3_SAMPLED).map(|v| v == "1" || v == "true");
    match (trace_id, span_id) {
        (Some(trace_id), Some(span_id)) => Incoming {
            // Absent X-B3-Sampled defers the decision: like OTel's B3 propagator, sample.
            parent: Some(SpanContext {
                trace_id,
                span_id,
                sampled: debug || sampled.unwrap_or(true),
                trace_state: None,
            }),
            deny: false,
            b3,
        },
        _ => Incoming { parent: None, deny: sampled == Some(false) && !debug, b3 },
    }
}

/// Replaces the request's trace headers with `ctx`: W3C, and B3 in `style` if given.
pub fn inject(headers: &mut HeaderMap, ctx: &SpanContext, style: Option<B3Style>) {
    for name in [&TRACESTATE, &B3, &B3_TRACE_ID, &B3_SPAN_ID, &B3_PARENT_SPAN_ID, &B3_SAMPLED, &B3_FLAGS] {
        headers.remove(name);
    }
    let mut buf = [0u8; 55];
    headers.insert(TRACEPARENT, traceparent(ctx, &mut buf));
    if let Some(state) = &ctx.trace_state {
        headers.insert(TRACESTATE, state.clone());
    }
    let sampled = if ctx.sampled { "1" } else { "0" };
    match style {
        None => {}
        Some(B3Style::Single) => {
            let mut v = [0u8; 32 + 1 + 16 + 2];
            hex(&ctx.trace_id, &mut v[..32]);
            v[32] = b'-';
            hex(&ctx.span_id, &mut v[33..49]);
            v[49] = b'-';
            v[50] = sampled.as_bytes()[0];
            headers.insert(B3, value(&v));
        }
        Some(B3Style::Multi) => {
            let (mut t, mut s) = ([0u8; 32], [0u8; 16]);
            hex(&ctx.trace_id, &mut t);
            hex(&ctx.span_id, &mut s);
            headers.insert(B3_TRACE_ID, value(&t));
            headers.insert(B3_SPAN_ID, value(&s));
            headers.insert(B3_SAMPLED, HeaderValue::from_static(sampled));
        }
    }
}

/// The `traceparent` value of `ctx`.
fn traceparent(ctx: &SpanContext, buf: &mut [u8; 55]) -> HeaderValue {
    buf[..3].copy_from_slice(b"00-");
    hex(&ctx.trace_id, &mut buf[3..35]);
    buf[35] = b'-';
    hex(&ctx.span_id, &mut buf[36..52]);
    buf[52..].copy_from_slice(if ctx.sampled { b"-01" } else { b"-00" });
    value(&buf[..])
}

fn value(ascii_hex: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(ascii_hex).expect("hex digits and dashes are a valid header value")
}

/// `version-traceid-spanid-flags`, per W3C Trace Context level 1. Versions above 00 may
/// append fields, which are ignored; version ff and all-zero ids are invalid.
fn parse_traceparent(v: &[u8]) -> Option<SpanContext> {
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = u8_hex(&v[0..2])?;
    if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let trace_id = trace_id_hex(&v[3..35]).filter(|_| is_lower_hex(&v[3..52]))?;
    let span_id = span_id_hex(&v[36..52])?;
    let flags = u8_hex(&v[53..55])?;
    Some(SpanContext { trace_id, span_id, sampled: flags & 1 == 1, trace_state: None })
}

enum B3Single {
    Context(SpanContext),
    Deny,
}

/// `traceid-spanid[-sampled[-parentspanid]]` or a lone sampling state.
fn parse_b3_single(v: &[u8]) -> Option<B3Single> {
    let mut parts = v.split(|b| *b == b'-');
    let first = parts.next()?;
    let Some(span) = parts.next() else {
        return (first == b"0").then_some(B3Single::Deny);
    };
    let (trace_id, span_id) = (trace_id_hex(first)?, span_id_hex(span)?);
    let sampled = match parts.next() {
        None => true,
        Some(b"1" | b"d") => true,
        Some(b"0") => false,
        Some(_) => return None,
    };
    if let Some(parent) = parts.next() {
        span_id_hex(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(B3Single::Context(SpanContext { trace_id, span_id, sampled, trace_state: None }))
}

/// A 32- or 16-digit (B3's 64-bit ids, left-padded) hex trace id, not all zeros.
fn trace_id_hex(v: &[u8]) -> Option<TraceId> {
    let mut id = [0u8; 16];
    match v.len() {
        32 => unhex(v, &mut id)?,
        16 => unhex(v, &mut id[8..])?,
        _ => return None,
    }
    (id != [0; 16]).then_some(id)
}

fn span_id_hex(v: &[u8]) -> Option<SpanId> {
    let mut id = [0u8; 8];
    if v.len() != 16 {
        return None;
    }
    unhex(v, &mut id)?;
    (id != [0; 8]).then_some(id)
}

fn u8_hex(v: &[u8]) -> Option<u8> {
    let mut b = [0u8; 1];
    unhex(v, &mut b)?;
    Some(b[0])
}

fn is_lower_hex(v: &[u8]) -> bool {
    v.iter().all(|b| !b.is_ascii_uppercase())
}

fn unhex(v: &[u8], out: &mut [u8]) -> Option<()> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    for (o, pair) in out.iter_mut().zip(v.chunks_exact(2)) {
        *o = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(())
}

/// Lower-case hex of `bytes` into `out` (twice as long).
pub fn hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
}

/// A trace id as 32 hex digits, for log lines.
pub fn trace_id_string(id: &TraceId) -> String {
    let mut out = [0u8; 32];
    hex(id, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn id(s: &str) -> TraceId {
        trace_id_hex(s.as_bytes()).unwrap()
    }

    #[test]
    fn reads_traceparent_and_tracestate() {
        let got = extract(&headers(&[("traceparent", TP), ("tracestate", "congo=t61rcWkgMzE")]));
        let p = got.parent.unwrap();
        assert_eq!(p.trace_id, id("0af7651916cd43dd8448eb211c80319c"));
        assert_eq!(p.span_id, span_id_hex(b"b7ad6b7169203331").unwrap());
        assert!(p.sampled);
        assert_eq!(p.trace_state.unwrap(), "congo=t61rcWkgMzE");
    }

    #[test]
    fn refuses_malformed_traceparent() {
        for bad in [
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",
            "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
            "",
            "garbage",
        ] {
            assert_eq!(extract(&headers(&[("traceparent", bad)])).parent, None, "{bad}");
        }
        // A later version may append fields.
        let later = "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-ever";
        assert!(extract(&headers(&[("traceparent", later)])).parent.is_some());
    }

    #[test]
    fn reads_b3_single_and_multi() {
        let single = extract(&headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0")]));
        assert_eq!(single.b3, Some(B3Style::Single));
        let p = single.parent.unwrap();
        assert!(!p.sampled);
        assert_eq!(p.trace_id, id("80f198ee56343ba864fe8b2a57d3eff7"));

        // 64-bit trace ids are left-padded.
        let multi = extract(&headers(&[
            ("x-b3-traceid", "64fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "1"),
        ]));
        assert_eq!(multi.b3, Some(B3Style::Multi));
        assert_eq!(multi.parent.unwrap().trace_id, id("000000000000000064fe8b2a57d3eff7"));

        assert!(extract(&headers(&[("b3", "0")])).deny);
        assert!(extract(&headers(&[("x-b3-sampled", "0")])).deny);
        assert_eq!(extract(&headers(&[("b3", "80f198ee56343ba8-e457b5a2e4d86bd1-x")])).parent, None);
        assert_eq!(extract(&headers(&[("b3", "nonsense")])).parent, None);
    }

    #[test]
    fn traceparent_wins_over_b3() {
        let got = extract(&headers(&[("traceparent", TP), ("b3", "80f198ee56343ba8-e457b5a2e4d86bd1-1")]));
        assert_eq!(got.parent.unwrap().trace_id, id("0af7651916cd43dd8448eb211c80319c"));
        assert_eq!(got.b3, Some(B3Style::Single));
        assert_eq!(extract(&headers(&[("traceparent", TP)])).b3, None);
    }

    #[test]
    fn injects_both_formats_replacing_old_headers() {
        let ctx = SpanContext {
            trace_id: id("0af7651916cd43dd8448eb211c80319c"),
            span_id: span_id_hex(b"00f067aa0ba902b7").unwrap(),
            sampled: true,
            trace_state: Some(HeaderValue::from_static("a=b")),
        };
        let mut h = headers(&[("traceparent", TP), ("x-b3-parentspanid", "e457b5a2e4d86bd1")]);
        inject(&mut h, &ctx, Some(B3Style::Multi));
        assert_eq!(h["traceparent"], "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01");
        assert_eq!(h["tracestate"], "a=b");
        assert_eq!(h["x-b3-traceid"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(h["x-b3-spanid"], "00f067aa0ba902b7");
        assert_eq!(h["x-b3-sampled"], "1");
        assert!(!h.contains_key("x-b3-parentspanid"));

        inject(
            &mut h,
            &SpanContext { sampled: false, trace_state: None, ..ctx.clone() },
            Some(B3Style::Single),
        );
        assert_eq!(h["b3"], "0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-0");
        assert!(h["traceparent"].to_str().unwrap().ends_with("-00"));
        assert!(!h.contains_key("x-b3-traceid") && !h.contains_key("tracestate"));
        // What was written reads back the same.
        let back = extract(&h).parent.unwrap();
        assert_eq!((back.trace_id, back.span_id, back.sampled), (ctx.trace_id, ctx.span_id, false));
        // W3C alone (between proxies): no B3 left behind.
        inject(&mut h, &ctx, None);
        assert!(!h.contains_key("b3") && h.contains_key("traceparent"));
    }
}
