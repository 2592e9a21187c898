//! What an attacker tried on main, each reproduced with raw bytes where a polite client
//! would not send them: requests that slipped past HTTP handling through protocol
//! detection, a front door that let two authorities or a client's broken body through,
//! the rapid-reset defence cutting the mesh's own connection, and forwarding loops.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use weft_e2e::{
    backend,
    control::Control,
    curl,
    mesh::{MeshFile, Service},
    metric_value, parse_status, raw_request, Proxy,
};

/// A standalone sidecar (permissive) in front of `app`.
fn in_front_of(app: &backend::Backend) -> Proxy {
    Proxy::start(&[("WEFT_APP_ADDR", &app.addr.to_string())])
}

/// Sends `bytes` on a fresh connection after `pause` (a slow client), reads to the end.
fn send_slowly(addr: SocketAddr, pause: Duration, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The client's own slowness is the scenario here, not synchronisation.
    std::thread::sleep(pause);
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn detection_cannot_route_a_request_around_http_handling() {
    // A permissive port with a rate limit of one request a second: every variant below
    // used to reach the app as opaque TCP, unlimited and unchecked.
    let app = backend::http("app");
    let api_inbound = weft_e2e::free_addr();
    let mesh = MeshFile::new()
        .workload("api")
        .service(Service::new("api", 80).meshed(api_inbound, "api"))
        .policy("api", app.addr.port(), "mode: permissive, rateLimit: {requestsPerSecond: 1, burst: 1}")
        .yaml();
    let control = Control::start(&mesh, &[]);
    let api = control.app_sidecar("api", app.addr, api_inbound);
    let long = format!("PROPFIND /{} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", "x".repeat(20_000));
    let variants: [(&str, Duration, String); 5] = [
        (
            "CRLF first",
            Duration::ZERO,
            "\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".into(),
        ),
        (
            "lower-case method",
            Duration::ZERO,
            "post / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
        ),
        (
            "unlisted method",
            Duration::ZERO,
            "PROPFIND / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".into(),
        ),
        ("long request line", Duration::ZERO, long),
        (
            "late first byte",
            Duration::from_millis(300),
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".into(),
        ),
    ];
    let mut statuses = vec![];
    for (name, pause, bytes) in &variants {
        let rsp = send_slowly(api_inbound, *pause, bytes.as_bytes());
        statuses.push((*name, parse_status(&rsp)));
    }
    eprintln!("{statuses:?}");
    // All were HTTP to the proxy: the rate limit let one through and answered the rest.
    let limited = statuses.iter().filter(|(_, s)| *s == Some(429)).count();
    assert_eq!(app.hits(), 1, "{statuses:?}");
    assert_eq!(limited, 4, "{statuses:?}");
    let m = api.metrics();
    assert_eq!(
        metric_value(&m, r#"weft_requests_total{direction="inbound",status="429",cause="rate-limited"}"#),
        4.0,
        "{m}"
    );
    assert_eq!(metric_value(&m, r#"weft_detect_total{direction="inbound",outcome="opaque"}"#), 0.0, "{m}");
}

#[test]
fn both_lengths_are_refused_and_nothing_is_smuggled() {
    let app = backend::http("app");
    let p = in_front_of(&app);
    // CL.TE, plain and behind empty lines (which an old detector took for opaque TCP).
    for prefix in ["", "\r\n"] {
        let attack = format!(
            "{prefix}POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
             0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
        );
        let rsp = raw_request(p.inbound, &attack, Duration::from_secs(5)).unwrap();
        assert_eq!(parse_status(&rsp), Some(400), "{rsp}");
        assert!(rsp.contains("weft-error: bad-request") && rsp.contains("Transfer-Encoding"), "{rsp}");
        assert_eq!(rsp.matches("HTTP/1.1 ").count(), 1, "{rsp}");
    }
    assert_eq!(app.hits(), 0);
    // A later request on the connection: framed by Transfer-Encoding, and the connection
    // ends after its answer, so what follows is never parsed as a request of its own.
    let later =
        "GET /first HTTP/1.1\r\nHost: a\r\n\r\nPOST /second HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\
                 Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let rsp = raw_request(p.inbound, later, Duration::from_secs(5)).unwrap();
    assert_eq!(rsp.matches("HTTP/1.1 200").count(), 2, "{rsp}");
    assert!(app.seen.lock().unwrap().iter().all(|s| s.path != "/smuggled"));
}

#[test]
fn a_server_first_protocol_still_never_stalls_and_a_slow_client_is_detected() {
    // The app speaks first: the bytes come at once, long before the client says anything.
    let banner = backend::banner(b"220 smtp.test ESMTP ready\r\n");
    let p = Proxy::start(&[("WEFT_APP_ADDR", &banner.addr.to_string())]);
    let mut s = TcpStream::connect(p.inbound).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = [0u8; 27];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"220 smtp.test ESMTP ready\r\n");
    p.wait_metric(r#"weft_detect_total{direction="inbound",outcome="silent"}"#, 1.0);
}

#[test]
fn the_explicit_outbound_waits_for_a_slow_request() {
    let app = backend::http("app");
    let p = Proxy::start(&[]);
    let req = format!("GET http://{}/ HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", app.addr, app.addr);
    let rsp = send_slowly(p.outbound, Duration::from_millis(300), req.as_bytes());
    assert_eq!(parse_status(&rsp), Some(200), "{rsp}");
}

#[test]
fn one_authority_per_request() {
    let app = backend::http("app");
    let p = in_front_of(&app);
    // Two Host headers: which one would the app believe? Neither.
    let rsp = raw_request(
        p.inbound,
        "GET / HTTP/1.1\r\nHost: a\r\nHost: evil.example\r\n\r\n",
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(parse_status(&rsp), Some(400), "{rsp}");
    assert!(rsp.contains("weft-error: bad-request"), "{rsp}");
    assert_eq!(app.hits(), 0);
    // Absolute form through the explicit outbound: the target's authority goes out as Host.
    let out = Proxy::start(&[]);
    let req =
        format!("GET http://{}/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n", app.addr);
    let rsp = raw_request(out.outbound, &req, Duration::from_secs(5)).unwrap();
    assert_eq!(parse_status(&rsp), Some(200), "{rsp}");
    assert_eq!(app.last().headers["host"], app.addr.to_string());
}

#[test]
fn http2_authority_and_host_must_agree() {
    let app = backend::http("app");
    let p = in_front_of(&app);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let statuses = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(p.inbound).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        let mut out = vec![];
        for (uri, host) in [("http://a/", Some("b")), ("/", Some("app.example")), ("http://a/", Some("a"))] {
            let mut req = http::Request::builder().uri(uri);
            if let Some(h) = host {
                req = req.header("host", h);
            }
            let (rsp, _) =
                client.clone().ready().await.unwrap().send_request(req.body(()).unwrap(), true).unwrap();
            out.push(rsp.await.unwrap().status().as_u16());
        }
        out
    });
    // Different: refused. `host` alone stands for `:authority`. The same: fine.
    assert_eq!(statuses, [400, 200, 200]);
    assert_eq!(app.last().headers["host"], "a");
}

#[test]
fn a_clients_broken_body_is_its_own_400_and_never_ejects_an_endpoint() {
    let (a, b) = (backend::http("a"), backend::http("b"));
    let api = Service::new("api", 80)
        .with("outlierDetection: {consecutiveFailures: 2, ejectionTime: 30s}")
        .endpoint(a.addr)
        .endpoint(b.addr);
    let mesh = MeshFile::new()
        .workload("web")
        .service(api)
        .route(
            "api",
            "api",
            "[{retry: {attempts: 3, statuses: [502, 503], nonIdempotent: true, backoff: 1ms}}]",
        )
        .yaml();
    let control = Control::start(&mesh, &[]);
    let web = control.sidecar("web", &[]);
    for _ in 0..12 {
        let bad = "POST http://api:80/ HTTP/1.1\r\nHost: api:80\r\nTransfer-Encoding: chunked\r\n\r\n\
                   5\r\nhello\r\nzz-not-hex\r\n\r\n";
        let rsp = raw_request(web.outbound, bad, Duration::from_secs(5)).unwrap();
        assert_eq!(parse_status(&rsp), Some(400), "{rsp}");
        assert!(rsp.contains("weft-error: bad-request"), "{rsp}");
    }
    let m = web.metrics();
    assert_eq!(metric_value(&m, r#"weft_outlier_ejections_total"#), 0.0, "{m}");
    assert_eq!(metric_value(&m, r#"weft_retries_total"#), 0.0, "{m}");
    // Both endpoints still serve.
    let counts = weft_e2e::tally(web.outbound, 1, 20, "http://api:80/", &[]);
    assert_eq!(counts.get("status 200"), Some(&20), "{counts:?}");
    assert!(counts.contains_key("a") && counts.contains_key("b"), "{counts:?}");
}

#[test]
fn hypers_own_refusals_are_counted_with_their_true_status_and_cause() {
    let app = backend::http("app");
    let p = in_front_of(&app);
    let uri = format!("/{}", "u".repeat(70_000));
    let rsp =
        raw_request(p.inbound, &format!("GET {uri} HTTP/1.1\r\nHost: a\r\n\r\n"), Duration::from_secs(5))
            .unwrap();
    assert_eq!(parse_status(&rsp), Some(414), "{rsp}");
    p.wait_metric(r#"weft_requests_total{direction="inbound",status="414",cause="uri-too-long"}"#, 1.0);
}

#[test]
fn a_continuation_flood_has_its_own_cause() {
    let app = backend::http("app");
    let p = in_front_of(&app);
    let mut s = TcpStream::connect(p.inbound).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    };
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(frame(0x4, 0, 0, &[])); // SETTINGS
                                         // HEADERS without END_HEADERS: `:method GET`, then a header name of 1,000 bytes
                                         // announced and sent a byte per CONTINUATION frame, never the last.
    bytes.extend(frame(0x1, 0, 1, &[0x82, 0x00, 0x7f, 0xe9, 0x06]));
    for _ in 0..64 {
        bytes.extend(frame(0x9, 0, 1, b"a"));
    }
    let _ = s.write_all(&bytes);
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    let flood = r#"weft_tcp_errors_total{direction="inbound",cause="continuation-flood"}"#;
    let seen = weft_e2e::within(Duration::from_secs(5), || (p.metric(flood) >= 1.0).then_some(()));
    assert!(seen.is_some(), "{}", p.logs());
    assert_eq!(p.metric(r#"weft_tcp_errors_total{cause="rapid-reset"}"#), 0.0);
}

#[test]
fn mesh_timeouts_are_not_a_rapid_reset_attack() {
    // Many requests time out together at the client sidecar's route timeout; it cancels
    // them on the proxy-to-proxy HTTP/2 connection. That connection must survive: fast
    // requests on it keep working.
    let app = backend::http("api-app");
    let api_inbound = weft_e2e::free_addr();
    let mesh = MeshFile::new()
        .workload("web")
        .workload("api")
        .service(Service::new("api", 80).meshed(api_inbound, "api"))
        .route("api", "api", "[{timeout: 1s}]")
        .yaml();
    let control = Control::start(&mesh, &[]);
    let api = control.app_sidecar("api", app.addr, api_inbound);
    let web = control.sidecar("web", &[]);
    let slow: Vec<_> = (0..150)
        .map(|_| {
            let out = web.outbound;
            std::thread::spawn(move || {
                let req =
                    "GET http://api:80/?delay_ms=2000 HTTP/1.1\r\nHost: api:80\r\nConnection: close\r\n\r\n";
                raw_request(out, req, Duration::from_secs(10)).as_deref().and_then(parse_status)
            })
        })
        .collect();
    let mut fast = vec![];
    for _ in 0..30 {
        let req = "GET http://api:80/ HTTP/1.1\r\nHost: api:80\r\nConnection: close\r\n\r\n";
        fast.push(raw_request(web.outbound, req, Duration::from_secs(10)).as_deref().and_then(parse_status));
    }
    let slow: Vec<_> = slow.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(slow.iter().all(|s| *s == Some(504)), "{slow:?}");
    // More fast requests once every slow one was cancelled.
    for _ in 0..10 {
        let req = "GET http://api:80/ HTTP/1.1\r\nHost: api:80\r\nConnection: close\r\n\r\n";
        fast.push(raw_request(web.outbound, req, Duration::from_secs(10)).as_deref().and_then(parse_status));
    }
    assert!(fast.iter().all(|s| *s == Some(200)), "{fast:?}");
    assert_eq!(api.metric(r#"weft_tcp_errors_total{cause="rapid-reset"}"#), 0.0, "{}", api.metrics());
}

/// A TCP port forward to `to` (as a NAT rule or a Service would be), for as long as the
/// test runs.
fn relay(to: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in l.incoming().flatten() {
            let Ok(upstream) = TcpStream::connect(to) else { continue };
            let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            let (mut c, mut u) = (client, upstream);
            std::thread::spawn(move || std::io::copy(&mut c2, &mut u2));
            std::thread::spawn(move || std::io::copy(&mut u, &mut c));
        }
    });
    addr
}

#[test]
fn no_request_loops_through_the_proxy() {
    let p = Proxy::start(&[]);
    let port = p.outbound.port();
    let via = format!("http://{}", p.outbound);
    for target in [format!("http://0.0.0.0:{port}/"), format!("http://[::ffff:127.0.0.1]:{port}/")] {
        let (code, body, _) = curl(&["-i", "-x", &via, &target]);
        assert_eq!(code, 508, "{target}: {body}");
        assert!(body.contains("weft-error: loop-detected"), "{body}");
    }
    // Through an address the proxy cannot know as its own: the hop guard stops it on the
    // way back.
    let around = relay(p.outbound);
    let (code, body, _) = curl(&["-i", "-x", &via, &format!("http://{around}/")]);
    assert_eq!(code, 508, "{body}");
    assert!(body.contains("weft-hop"), "{body}");
    // The proxy still serves.
    let app = backend::http("app");
    let (code, _, _) = curl(&["-x", &via, &format!("http://{}/", app.addr)]);
    assert_eq!(code, 200);
    assert!(p.metric(r#"weft_tcp_open_connections{direction="outbound"}"#) < 10.0);
}

#[test]
fn opaque_connections_count_against_the_ports_rate_limit() {
    let echo = backend::echo();
    let api_inbound = weft_e2e::free_addr();
    let mesh = MeshFile::new()
        .workload("api")
        .service(Service::new("api", 80).meshed(api_inbound, "api"))
        .policy("api", echo.addr.port(), "mode: permissive, rateLimit: {requestsPerSecond: 1, burst: 1}")
        .yaml();
    let control = Control::start(&mesh, &[]);
    let api = control.app_sidecar("api", echo.addr, api_inbound);
    // Three at once: one token in the bucket.
    let mut conns: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(api_inbound).unwrap()).collect();
    for c in &mut conns {
        c.write_all(b"\x00\x01binary").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    let echoed = conns
        .iter_mut()
        .map(|c| {
            let mut buf = [0u8; 8];
            c.read_exact(&mut buf).is_ok() && &buf == b"\x00\x01binary"
        })
        .filter(|echoed| *echoed)
        .count();
    assert_eq!(echoed, 1);
    api.wait_metric(r#"weft_tcp_errors_total{direction="inbound",cause="rate-limited"}"#, 2.0);
}
