//! HTTP through the real weft-proxy binary with curl: HTTP/1.1, h2c, explicit proxy mode
//! (`-x`, CONNECT), proxy-made errors, header rules, pooling, and HTTP/1 carried over
//! HTTP/2 between two proxies.

use std::time::Duration;

use weft_e2e::{backend, curl, free_addr, metric_value, raw_request, Proxy};

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[test]
fn http1_inbound_to_app() {
    let app = backend::http("app");
    let p = Proxy::start(&[("WEFT_APP_ADDR", &app.addr.to_string())]);
    let (code, body, err) = curl(&[&format!("http://{}/hello?x=1", p.inbound)]);
    assert_eq!(code, 200, "{err}");
    let v = json(&body);
    assert_eq!(v["backend"], "app");
    assert_eq!(v["path"], "/hello");
    assert_eq!(v["version"], "HTTP/1.1");
    assert_eq!(
        p.metric(r#"weft_requests_total{direction="inbound",protocol="http1",status="200",cause=""}"#),
        1.0
    );
    assert_eq!(p.metric(r#"weft_detect_total{direction="inbound",outcome="http1"}"#), 1.0);
}

#[test]
fn h2c_prior_knowledge_stays_http2() {
    let app = backend::http("app");
    let p = Proxy::start(&[("WEFT_APP_ADDR", &app.addr.to_string())]);
    let (code, body, err) = curl(&["--http2-prior-knowledge", &format!("http://{}/h2", p.inbound)]);
    assert_eq!(code, 200, "{err}");
    assert_eq!(json(&body)["version"], "HTTP/2.0");
    assert_eq!(p.metric(r#"weft_detect_total{direction="inbound",outcome="h2"}"#), 1.0);
}

#[test]
fn explicit_proxy_absolute_form_and_names() {
    let app = backend::http("app");
    let p = Proxy::start(&[]);
    let proxy = format!("http://{}", p.outbound);
    let (code, body, err) = curl(&["-x", &proxy, &format!("http://{}/abs", app.addr)]);
    assert_eq!(code, 200, "{err}");
    assert_eq!(json(&body)["path"], "/abs");
    // A name resolved through /etc/hosts by hickory.
    let (code, body, err) = curl(&["-x", &proxy, &format!("http://localhost:{}/named", app.addr.port())]);
    assert_eq!(code, 200, "{err}");
    assert_eq!(json(&body)["headers"]["host"], format!("localhost:{}", app.addr.port()));
    // http_proxy in the environment, as apps honour it.
    let out = weft_e2e::run(
        std::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", &format!("http://{}/env", app.addr)])
            .env("http_proxy", &proxy),
    );
    assert!(out.status.success());
    assert_eq!(json(&String::from_utf8_lossy(&out.stdout))["path"], "/env");
    assert_eq!(app.hits(), 3);
}

#[test]
fn explicit_proxy_connect_tunnel() {
    let app = backend::http("app");
    let p = Proxy::start(&[]);
    let (code, body, err) =
        curl(&["-p", "-x", &format!("http://{}", p.outbound), &format!("http://{}/tunnelled", app.addr)]);
    assert_eq!(code, 200, "{err}");
    assert_eq!(json(&body)["path"], "/tunnelled");
}

#[test]
fn upstream_down_answers_with_weft_error() {
    let dead = free_addr();
    let p = Proxy::start(&[("WEFT_APP_ADDR", &dead.to_string())]);
    let (code, _, _) = curl(&["-D", "/dev/stderr", &format!("http://{}/", p.inbound)]);
    assert_eq!(code, 502);
    let out =
        weft_e2e::run(std::process::Command::new("curl").args(["-si", &format!("http://{}/", p.inbound)]));
    let head = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(head.contains("weft-error: upstream-refused"), "{head}");
    assert_eq!(
        p.metric(r#"weft_requests_total{direction="inbound",protocol="http1",status="502",cause="upstream-refused"}"#),
        2.0
    );
    assert!(p.logs().contains("upstream-refused"), "the cause is in the log line");
}

#[test]
fn no_route_and_loop_are_refused() {
    let p = Proxy::start(&[]);
    // HTTP/1.0 origin-form without Host: nowhere to send it.
    let rsp = raw_request(p.outbound, "GET / HTTP/1.0\r\n\r\n", Duration::from_secs(5)).unwrap();
    assert!(rsp.starts_with("HTTP/1.0 400") || rsp.starts_with("HTTP/1.1 400"), "{rsp}");
    assert!(rsp.to_lowercase().contains("weft-error: no-route"), "{rsp}");
    // A request addressed to the proxy itself would loop.
    let (code, body, _) =
        curl(&["-x", &format!("http://{}", p.outbound), &format!("http://{}/", p.outbound)]);
    assert_eq!(code, 508, "{body}");
    assert!(body.contains("loop-detected"), "{body}");
    // Unresolvable names.
    let (code, body, _) = curl(&["-x", &format!("http://{}", p.outbound), "http://no-such-host.invalid/"]);
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("resolve-failed"), "{body}");
}

#[test]
fn hop_by_hop_headers_are_not_forwarded() {
    let app = backend::http("app");
    let p = Proxy::start(&[("WEFT_APP_ADDR", &app.addr.to_string())]);
    let (code, _, err) = curl(&[
        "-H",
        "Connection: keep-alive, X-Secret",
        "-H",
        "X-Secret: s3cret",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "Proxy-Authorization: Basic Zm9vOmJhcg==",
        "-H",
        "X-Kept: yes",
        &format!("http://{}/", p.inbound),
    ]);
    assert_eq!(code, 200, "{err}");
    let seen = app.last();
    for h in ["x-secret", "keep-alive", "proxy-authorization", "connection"] {
        assert!(!seen.headers.contains_key(h), "{h} was forwarded: {:?}", seen.headers);
    }
    assert_eq!(seen.headers["x-kept"], "yes");
}

#[test]
fn upstream_connections_are_pooled() {
    let app = backend::http("app");
    // One shard: pools are per shard thread.
    let p = Proxy::start(&[("WEFT_APP_ADDR", &app.addr.to_string()), ("WEFT_WORKER_THREADS", "1")]);
    for _ in 0..10 {
        let (code, _, _) = curl(&[&format!("http://{}/", p.inbound)]);
        assert_eq!(code, 200);
    }
    assert_eq!(app.hits(), 10);
    assert_eq!(app.conns(), 1, "ten client connections should share one pooled upstream connection");
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let app = backend::http("app");
    let p = Proxy::start(&[("WEFT_APP_ADDR", &app.addr.to_string())]);
    let req = "GET /one?delay_ms=100 HTTP/1.1\r\nHost: a\r\n\r\nGET /two HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let rsp = raw_request(p.inbound, req, Duration::from_secs(5)).unwrap();
    let one = rsp.find("\"path\":\"/one\"").expect("first response");
    let two = rsp.find("\"path\":\"/two\"").expect("second response");
    assert!(one < two, "responses out of order: {rsp}");
    assert_eq!(rsp.matches("HTTP/1.1 200").count(), 2);
}

#[test]
fn http1_rides_http2_between_proxies() {
    let app = backend::http("app");
    let server_side = Proxy::start(&[("WEFT_APP_ADDR", &app.addr.to_string())]);
    let client_side = Proxy::start(&[("WEFT_MESH_NETWORKS", "127.0.0.0/8"), ("WEFT_WORKER_THREADS", "1")]);
    let proxy = format!("http://{}", client_side.outbound);
    for i in 0..3 {
        let (code, body, err) = curl(&["-x", &proxy, &format!("http://{}/hop{i}", server_side.inbound)]);
        assert_eq!(code, 200, "{err}");
        let v = json(&body);
        assert_eq!(v["version"], "HTTP/1.1", "the app gets HTTP/1 back");
        assert_eq!(v["headers"]["host"], server_side.inbound.to_string());
        assert!(v["headers"].get("weft-orig-proto").is_none(), "mesh header leaked to the app");
    }
    let m = server_side.metrics();
    assert_eq!(
        metric_value(&m, r#"weft_requests_total{direction="inbound",protocol="h2",status="200",cause=""}"#),
        3.0
    );
    assert_eq!(
        metric_value(&m, r#"weft_tcp_accepted_total{direction="inbound"}"#),
        1.0,
        "one multiplexed connection"
    );
}

#[test]
fn admin_endpoints() {
    let p = Proxy::start(&[]);
    let get = |path: &str| weft_e2e::http_get(p.admin, path).unwrap();
    assert_eq!(get("/live").0, 200);
    assert_eq!(get("/ready").0, 200);
    let (code, body) = get("/metrics");
    assert_eq!(code, 200);
    assert!(body.ends_with("# EOF\n"), "{body}");
    let (code, _, _) = curl(&["-x", &format!("http://{}", p.outbound), "http://127.0.0.1:1/"]);
    assert_eq!(code, 502);
    let body = get("/metrics").1;
    assert!(body.contains("# TYPE weft_requests counter"), "{body}");
    assert!(body.contains("# TYPE weft_request_duration_seconds histogram"), "{body}");
    assert_eq!(get("/nope").0, 404);
    assert_eq!(get("/log-level").1.trim(), "info");
    let (code, _, _) = curl(&["-X", "PUT", "--data", "debug", &format!("http://{}/log-level", p.admin)]);
    assert_eq!(code, 200);
    assert_eq!(get("/log-level").1.trim(), "debug");
    let (code, body, _) = curl(&["-X", "PUT", "--data", "[[bad", &format!("http://{}/log-level", p.admin)]);
    assert_eq!(code, 400, "{body}");
    let (code, _, _) = curl(&["-X", "DELETE", &format!("http://{}/metrics", p.admin)]);
    assert_eq!(code, 405);
}

#[test]
fn json_logs_and_access_log() {
    let app = backend::http("app");
    let p = Proxy::start(&[
        ("WEFT_APP_ADDR", &app.addr.to_string()),
        ("WEFT_LOG_FORMAT", "json"),
        ("WEFT_ACCESS_LOG", "on"),
    ]);
    let (code, _, _) = curl(&[&format!("http://{}/logged?secret=1", p.inbound)]);
    assert_eq!(code, 200);
    let logs = weft_e2e::eventually(Duration::from_secs(5), "the access log line", || {
        let logs = p.logs();
        logs.contains("weft::access").then_some(logs)
    });
    let line = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["target"] == "weft::access")
        .unwrap_or_else(|| panic!("no access log line in {logs}"));
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/logged");
    assert_eq!(line["status"], 200);
    assert!(line["duration_ms"].as_f64().is_some());
}

#[test]
fn bad_configuration_names_the_variable() {
    let out = weft_e2e::run(
        std::process::Command::new(weft_e2e::bin("weft-proxy"))
            .env("WEFT_DETECT_TIMEOUT", "100")
            .env("WEFT_ADMIN_ADDR", "x"),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("WEFT_ADMIN_ADDR"), "{err}");
}

#[test]
fn upstream_closing_idle_keepalive_connections_is_invisible() {
    use std::io::{BufRead, BufReader, Write};
    // An app that answers with keep-alive, then closes each connection 100 ms later,
    // as servers with a short keep-alive timeout do.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app = listener.local_addr().unwrap();
    let closed_seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let closed_count = closed_seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let closed = closed_count.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                    line.clear();
                }
                let mut s = stream;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                std::thread::sleep(Duration::from_millis(100));
                drop(s);
                drop(reader);
                closed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });
    let p = Proxy::start(&[("WEFT_APP_ADDR", &app.to_string()), ("WEFT_WORKER_THREADS", "1")]);
    for i in 1..=5 {
        let (code, body, err) = curl(&[&format!("http://{}/", p.inbound)]);
        assert_eq!((code, body.as_str()), (200, "ok"), "{err}");
        // The next request finds the pooled connection already closed by the app.
        weft_e2e::eventually(Duration::from_secs(5), "the app closing its connection", || {
            (closed_seen.load(std::sync::atomic::Ordering::SeqCst) >= i).then_some(())
        });
    }
}

#[test]
fn request_bodies_cross_every_hop() {
    // 2 MB makes curl send `Expect: 100-continue`; the body crosses HTTP/1 → HTTP/2 → HTTP/1.
    let app = backend::http("app");
    let server_side = Proxy::start(&[("WEFT_APP_ADDR", &app.addr.to_string())]);
    let client_side = Proxy::start(&[("WEFT_MESH_NETWORKS", "127.0.0.0/8")]);
    let file = std::env::temp_dir().join(format!("weft-body-{}", std::process::id()));
    std::fs::write(&file, vec![b'x'; 2 << 20]).unwrap();
    let data = format!("@{}", file.display());
    let (proxy, url) =
        (format!("http://{}", client_side.outbound), format!("http://{}/upload", server_side.inbound));
    for (extra, label) in [(None, "content-length"), (Some("Transfer-Encoding: chunked"), "chunked")] {
        let mut args = vec!["-x", &proxy, "--data-binary", &data];
        if let Some(h) = extra {
            args.extend(["-H", h]);
        }
        args.push(&url);
        let (code, body, err) = curl(&args);
        assert_eq!(code, 200, "{label}: {err}");
        let v = json(&body);
        assert_eq!(v["body_len"], 2 << 20, "{label}");
        assert_eq!(v["method"], "POST");
    }
    let _ = std::fs::remove_file(file);
}

#[test]
fn a_connection_left_mid_response_is_not_reused() {
    use std::io::{Read, Write};
    let app = backend::http("app");
    // One shard, so both requests share one upstream pool.
    let p = Proxy::start(&[("WEFT_APP_ADDR", &app.addr.to_string()), ("WEFT_WORKER_THREADS", "1")]);
    // A client that reads a little of a 20 MB response and goes away.
    let mut s = std::net::TcpStream::connect(p.inbound).unwrap();
    s.write_all(b"GET /big?size=20000000 HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    let mut buf = [0u8; 4096];
    s.read_exact(&mut buf).unwrap();
    drop(s);
    // The proxy has seen the client go.
    p.wait_metric(r#"weft_tcp_open_connections{direction="inbound"}"#, 0.0);
    // The next request must get its own clean response, not the rest of the big one.
    for _ in 0..3 {
        let (code, body, err) = curl(&[&format!("http://{}/small", p.inbound)]);
        assert_eq!(code, 200, "{err}");
        assert_eq!(json(&body)["path"], "/small");
    }
    assert_eq!(app.conns(), 2, "the abandoned connection must be closed, the next one pooled");
}

#[test]
fn a_port_in_use_is_refused_not_shared() {
    // Shards use SO_REUSEPORT among themselves; a second proxy must still not get in.
    let first = Proxy::start(&[]);
    let out = weft_e2e::run(
        std::process::Command::new(weft_e2e::bin("weft-proxy"))
            .env("WEFT_INBOUND_ADDR", first.inbound.to_string())
            .env("WEFT_OUTBOUND_ADDR", "127.0.0.1:0")
            .env("WEFT_ADMIN_ADDR", "127.0.0.1:0"),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen on WEFT_INBOUND_ADDR"), "{err}");
}

/// Established TCP connections whose local port is `port` (the app's side).
fn established_to(port: u16) -> usize {
    let out = std::process::Command::new("ss")
        .args(["-Htn", "state", "established", &format!("( sport = :{port} )")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn idle_upstream_connections_close_on_time_without_more_traffic() {
    let app = weft_e2e::backend::http("app");
    let p = Proxy::start(&[("WEFT_APP_ADDR", &app.addr.to_string()), ("WEFT_POOL_IDLE_TIMEOUT", "1s")]);
    // Several connections to the app at once, then silence.
    let counts =
        weft_e2e::tally(p.inbound, 8, 80, &format!("http://{}/?delay_ms=20", p.inbound), &["--noproxy", "*"]);
    assert_eq!(counts.get("status 200"), Some(&80), "{counts:?}");
    assert!(established_to(app.addr.port()) >= 2, "the pool kept no connection");
    // Closed within the idle timeout (plus a sweep), though no request came to trigger it.
    weft_e2e::eventually(std::time::Duration::from_secs(5), "idle connections to the app to close", || {
        (established_to(app.addr.port()) == 0).then_some(())
    });
}

#[test]
fn an_idle_keep_alive_connection_outlives_the_header_timeout() {
    use std::io::{Read, Write};
    // Clients keep pooled connections idle for a minute or more (Go: 90 s); closing them
    // at the head timeout makes them race "connection closed while sending".
    let app = backend::http("app");
    let p = Proxy::start(&[
        ("WEFT_APP_ADDR", &app.addr.to_string()),
        ("WEFT_HEADER_READ_TIMEOUT", "300ms"),
        ("WEFT_KEEPALIVE_IDLE_TIMEOUT", "60s"),
    ]);
    let mut conn = std::net::TcpStream::connect(p.inbound).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let ask = |conn: &mut std::net::TcpStream| {
        conn.write_all(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n").unwrap();
        let mut buf = [0u8; 4096];
        let n = conn.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert!(ask(&mut conn).starts_with("HTTP/1.1 200"));
    // Idle for three head timeouts, on a signal of time passing: the app's clock.
    let idle_until = std::time::Instant::now() + Duration::from_millis(900);
    weft_e2e::eventually(Duration::from_secs(5), "time to pass", || {
        (std::time::Instant::now() >= idle_until).then_some(())
    });
    assert!(ask(&mut conn).starts_with("HTTP/1.1 200"), "the idle connection was closed");
    // A head that has begun still has only the head timeout.
    let mut slow = std::net::TcpStream::connect(p.inbound).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHo").unwrap();
    let mut buf = [0u8; 256];
    let n = slow.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"));
}

#[test]
fn a_reused_connection_closed_as_the_request_goes_out_is_retried_only_when_safe() {
    use std::io::{BufRead, BufReader, Read, Write};
    // An app that answers the first request on each connection and closes the connection
    // when the second one arrives, as a server does whose keep-alive timer fires just as a
    // request comes in: the request was sent, and no answer will ever come.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut s = stream;
                for n in 0.. {
                    let mut head = String::new();
                    let mut line = String::new();
                    while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                        head.push_str(&line);
                        line.clear();
                    }
                    if head.is_empty() {
                        return;
                    }
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().to_string())
                        })
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    let mut body = vec![0; len];
                    let _ = reader.read_exact(&mut body);
                    log.lock().unwrap().push(head.lines().next().unwrap_or("").to_string());
                    if n == 1 {
                        return; // closes without an answer
                    }
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                }
            });
        }
    });
    // One shard, so every request shares one upstream pool.
    let p = Proxy::start(&[("WEFT_APP_ADDR", &app.to_string()), ("WEFT_WORKER_THREADS", "1")]);
    let url = format!("http://{}/", p.inbound);
    let (code, body, err) = curl(&[&url]);
    assert_eq!((code, body.as_str()), (200, "ok"), "{err}");
    // A GET on the pooled connection meets the close and goes again on a fresh one.
    let (code, body, err) = curl(&[&url]);
    assert_eq!((code, body.as_str()), (200, "ok"), "a GET must be resent: {err}");
    assert_eq!(seen.lock().unwrap().iter().filter(|l| l.starts_with("GET")).count(), 3);
    // A POST with a body is not resent: the app may have acted on it.
    let (code, _, err) = curl(&["-i", "--data", "x=1", &url]);
    assert_eq!(code, 502, "{err}");
    let posts = seen.lock().unwrap().iter().filter(|l| l.starts_with("POST")).count();
    assert_eq!(posts, 1, "a POST must reach the app once");
}
