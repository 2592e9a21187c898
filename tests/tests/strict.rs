//! Untrusted bytes from clients: smuggling attempts, oversize and slow request heads.
//! Each must be refused with a 4xx (or neutralised as RFC 9112 §6.3 requires) and never
//! reach the application as something other than what the proxy saw.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use weft_e2e::{backend, metric_value, parse_status, raw_request, Proxy};

fn proxy_for(app: &backend::Backend, extra: &[(&str, &str)]) -> Proxy {
    let addr = app.addr.to_string();
    let mut env = vec![("WEFT_APP_ADDR", addr.as_str())];
    env.extend_from_slice(extra);
    Proxy::start(&env)
}

#[test]
fn conflicting_content_lengths_are_rejected() {
    let app = backend::http("app");
    let p = proxy_for(&app, &[]);
    let req = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 30\r\n\r\nhello";
    let rsp = raw_request(p.inbound, req, Duration::from_secs(5)).unwrap();
    assert_eq!(parse_status(&rsp), Some(400), "{rsp}");
    assert_eq!(app.hits(), 0, "the app must not see a request with two lengths");
    p.wait_metric(
        r#"weft_requests_total{direction="inbound",protocol="http1",status="400",cause="bad-request"}"#,
        1.0,
    );
}

#[test]
fn cl_te_smuggling_is_neutralised() {
    // The classic CL.TE attack: a front end trusting Content-Length would forward the
    // chunked terminator plus `GET /smuggled` as the body; a back end trusting
    // Transfer-Encoding would then see a second request. A request with both is refused
    // (400, as nginx does), and the connection is closed after the response, so the
    // tail is never parsed as a request (RFC 9112 §6.3).
    let app = backend::http("app");
    let p = proxy_for(&app, &[]);
    let req = "POST /front HTTP/1.1\r\nHost: a\r\nContent-Length: 48\r\nTransfer-Encoding: chunked\r\n\r\n\
               0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\nX: ";
    let rsp = raw_request(p.inbound, req, Duration::from_secs(3)).unwrap();
    assert_eq!(rsp.matches("HTTP/1.1 ").count(), 1, "exactly one response: {rsp}");
    assert_eq!(parse_status(&rsp), Some(400), "{rsp}");
    assert!(rsp.contains("weft-error: bad-request"), "{rsp}");
    assert!(rsp.to_lowercase().contains("connection: close"), "{rsp}");
    assert!(app.seen.lock().unwrap().is_empty(), "the app saw a request");
}

#[test]
fn malformed_framing_is_rejected() {
    let app = backend::http("app");
    let p = proxy_for(&app, &[]);
    for req in [
        // Transfer-Encoding is not allowed in HTTP/1.0.
        "POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        // chunked must be the final coding.
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
        // Whitespace before the colon (RFC 9112 §5.1).
        "GET / HTTP/1.1\r\nHost: a\r\nContent-Length : 0\r\n\r\n",
        // Non-numeric length.
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n",
    ] {
        let rsp = raw_request(p.inbound, req, Duration::from_secs(3)).unwrap();
        assert_eq!(parse_status(&rsp), Some(400), "{req:?} → {rsp}");
    }
    assert_eq!(app.hits(), 0);
}

#[test]
fn oversize_headers_get_431() {
    let app = backend::http("app");
    let p = proxy_for(&app, &[("WEFT_MAX_HEADER_BYTES", "8192")]);
    // Just over the limit: the proxy's own check answers, with its cause.
    let big = "x".repeat(9000);
    let rsp = raw_request(
        p.inbound,
        &format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n"),
        Duration::from_secs(3),
    )
    .unwrap();
    assert_eq!(parse_status(&rsp), Some(431), "{rsp}");
    assert!(rsp.contains("weft-error: header-too-large"), "{rsp}");
    // Far over: the codec's hard limit cuts the head off before it is buffered whole.
    let huge = "x".repeat(100_000);
    let rsp = raw_request(
        p.inbound,
        &format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {huge}\r\n\r\n"),
        Duration::from_secs(3),
    )
    .unwrap();
    assert_eq!(parse_status(&rsp), Some(431), "{rsp}");
    assert_eq!(app.hits(), 0);
    let series =
        r#"weft_requests_total{direction="inbound",protocol="http1",status="431",cause="header-too-large"}"#;
    p.wait_metric(series, 2.0);
    let m = p.metrics();
    assert_eq!(
        metric_value(
            &m,
            r#"weft_requests_total{direction="inbound",protocol="http1",status="431",cause="header-too-large"}"#
        ),
        2.0,
        "{m}"
    );
}

#[test]
fn slow_headers_get_408() {
    let app = backend::http("app");
    let p = proxy_for(&app, &[("WEFT_HEADER_READ_TIMEOUT", "500ms")]);
    let mut s = TcpStream::connect(p.inbound).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let start = Instant::now();
    // A slowloris client: part of a head, then nothing.
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ").unwrap();
    let mut rsp = String::new();
    let _ = s.read_to_string(&mut rsp);
    assert_eq!(parse_status(&rsp), Some(408), "{rsp:?}");
    assert!(rsp.contains("weft-error: header-timeout"), "{rsp}");
    assert!(start.elapsed() >= Duration::from_millis(400), "timed out too early: {:?}", start.elapsed());
    assert_eq!(app.hits(), 0);
    // A client that stalls inside the request line meets the same timeout.
    let mut s = TcpStream::connect(p.inbound).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GE").unwrap();
    let mut rsp = String::new();
    let _ = s.read_to_string(&mut rsp);
    assert_eq!(parse_status(&rsp), Some(408), "{rsp:?}");
    assert_eq!(
        p.metric(
            r#"weft_requests_total{direction="inbound",protocol="http1",status="408",cause="header-timeout"}"#
        ),
        2.0
    );
}

#[test]
fn idle_keepalive_connection_is_closed_without_a_response() {
    let app = backend::http("app");
    let p = proxy_for(&app, &[("WEFT_HEADER_READ_TIMEOUT", "300ms")]);
    let mut s = TcpStream::connect(p.inbound).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    let mut rsp = Vec::new();
    let _ = s.read_to_end(&mut rsp);
    let rsp = String::from_utf8_lossy(&rsp);
    // One 200, then a silent close: no stray 408 for a request never started.
    assert_eq!(rsp.matches("HTTP/1.1 ").count(), 1, "{rsp}");
    assert_eq!(parse_status(&rsp), Some(200));
}
