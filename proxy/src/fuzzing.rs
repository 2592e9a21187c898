//! Entry points for the fuzz targets (fuzz/, cargo-fuzz on nightly) and for the stable
//! test that replays their corpora (proxy/tests/fuzz_corpus.rs): each takes arbitrary
//! bytes, must never panic, and checks what must hold whatever the input.

use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body_util::BodyExt;

use crate::{
    body,
    http::headers,
    outbound::routes,
    trace::context,
    transport::detect::{self, Outcome, Protocol},
};

/// Protocol detection on arbitrary first bytes: a verdict on a prefix is the verdict on
/// the whole.
pub fn detect(data: &[u8]) {
    const MAX: usize = 4096;
    let Some(full) = detect::verdict(data, MAX) else { return };
    for cut in 1..data.len() {
        if let Some((p, _)) = detect::verdict(&data[..cut], MAX) {
            assert_eq!(std::mem::discriminant(&p), std::mem::discriminant(&full.0), "{data:?} at {cut}");
            break;
        }
    }
    if full.1 == Outcome::Http2 {
        assert_eq!(full.0, Protocol::Http2);
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"))
}

/// A request's bytes through the HTTP/1 server side (hyper with the proxy's limits) and
/// the front door, on an in-memory stream: every answer is a well-formed response.
pub fn http1(data: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let data = data.to_vec();
    runtime().block_on(async move {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
            let mut req = req.map(body::boxed);
            let status =
                match headers::front_door(&mut req).and_then(|()| headers::check_head_size(&req, 8192)) {
                    Ok(()) => {
                        // Read the body as forwarding would; a broken one is the client's.
                        match req.into_body().collect().await {
                            Ok(_) => 200,
                            Err(_) => 400,
                        }
                    }
                    Err(e) => e.status_code().as_u16(),
                };
            let mut rsp = Response::new(body::empty());
            *rsp.status_mut() = http::StatusCode::from_u16(status).expect("a status");
            Ok::<_, std::convert::Infallible>(rsp)
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .max_header_size(16384)
            .serve_connection(hyper_util::rt::TokioIo::new(server), svc)
            .with_upgrades();
        let serve = tokio::spawn(conn);
        let _ = client.write_all(&data).await;
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        let _ = client.read_to_end(&mut out).await;
        let _ = serve.await;
        if !out.is_empty() {
            assert!(out.starts_with(b"HTTP/1."), "{:?}", String::from_utf8_lossy(&out));
        }
    });
}

/// Header lines (`name: value`, one per line) from arbitrary bytes.
fn header_map(data: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }
    headers
}

/// Trace context (W3C, B3) from untrusted headers: what is extracted and injected again
/// parses back to the same trace.
pub fn trace_context(data: &[u8]) {
    let incoming = context::extract(&header_map(data));
    if let Some(parent) = &incoming.parent {
        let mut out = HeaderMap::new();
        context::inject(&mut out, parent, incoming.b3);
        let again = context::extract(&out);
        let back = again.parent.expect("an injected context parses");
        assert_eq!(back.trace_id, parent.trace_id);
    }
}

/// A request built from arbitrary bytes against route rules decoded from arbitrary bytes.
pub fn route_match(data: &[u8]) {
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let (rules, request) = data.split_at(split);
    let Ok(set) = <weft_api::v1::RouteSet as prost::Message>::decode(rules) else { return };
    let mut lines = request.splitn(2, |&b| b == b'\n');
    let first = lines.next().unwrap_or_default();
    let target = String::from_utf8_lossy(first).replace(|c: char| c.is_whitespace(), "");
    let Ok(mut req) = Request::builder().method("POST").uri(format!("/{target}")).body(()) else { return };
    *req.headers_mut() = header_map(lines.next().unwrap_or_default());
    let linear = routes::matching(&set, &req);
    assert_eq!(
        routes::Routes::from(set.clone()).matching(&req),
        linear,
        "the index and the first match differ"
    );
    if let Some(i) = linear {
        assert!(i < set.rules.len());
        if let Some(b) = routes::pick_backend(&set.rules[i], u64::from(data.len() as u32)) {
            assert!(set.rules[i].backends.iter().any(|x| x.authority == b.authority));
        }
    }
}

/// The control plane's messages as a proxy receives them: decoding arbitrary bytes never
/// panics, and what decodes encodes back to the same message.
pub fn control_proto(data: &[u8]) {
    use prost::Message;
    fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) {
        if let Ok(m) = M::decode(data) {
            assert_eq!(M::decode(m.encode_to_vec().as_slice()).as_ref(), Ok(&m));
        }
    }
    round_trip::<weft_api::v1::EndpointSet>(data);
    round_trip::<weft_api::v1::RouteSet>(data);
    round_trip::<weft_api::v1::InboundPolicy>(data);
    round_trip::<weft_api::v1::CertifyResponse>(data);
}
