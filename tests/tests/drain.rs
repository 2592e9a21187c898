//! Graceful shutdown: SIGTERM or `POST /shutdown` stops accepting, lets in-flight
//! requests finish within the grace period, then exits 0.

use std::{
    net::TcpStream,
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use weft_e2e::{backend, parse_status, raw_request, Proxy};

fn sigterm(p: &Proxy) {
    let ok = Command::new("kill").args(["-TERM", &p.child.id().to_string()]).status().unwrap().success();
    assert!(ok);
}

fn wait_exit(p: &mut Proxy, within: Duration) -> std::process::ExitStatus {
    let logs = p.log.clone();
    weft_e2e::eventually(within, &format!("weft-proxy to exit; its log: {}", logs.display()), || {
        p.child.try_wait().unwrap()
    })
}

#[test]
fn drain_under_load_loses_no_in_flight_request() {
    let app = backend::http("app");
    let mut p = Proxy::start(&[("WEFT_APP_ADDR", &app.addr.to_string()), ("WEFT_DRAIN_GRACE", "20s")]);
    const N: usize = 40;
    let (tx, rx) = mpsc::channel();
    for i in 0..N {
        let (tx, addr) = (tx.clone(), p.inbound);
        std::thread::spawn(move || {
            let req = format!("GET /slow{i}?delay_ms=1000 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
            tx.send(raw_request(addr, &req, Duration::from_secs(10)).and_then(|r| parse_status(&r))).unwrap();
        });
    }
    // Every request has reached the app and is in flight.
    weft_e2e::eventually(Duration::from_secs(5), "every request at the app", || {
        (app.hits() >= N).then_some(())
    });
    sigterm(&p);
    let statuses: Vec<_> = (0..N).map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap()).collect();
    assert!(statuses.iter().all(|s| *s == Some(200)), "lost requests during drain: {statuses:?}");
    let status = wait_exit(&mut p, Duration::from_secs(5));
    assert!(status.success(), "exit status {status}");
    assert!(TcpStream::connect(p.inbound).is_err(), "listener still accepting after exit");
}

#[test]
fn listeners_close_when_draining_starts() {
    let app = backend::http("app");
    let mut p = Proxy::start(&[("WEFT_APP_ADDR", &app.addr.to_string())]);
    let addr = p.inbound;
    let slow = std::thread::spawn(move || {
        raw_request(
            addr,
            "GET /?delay_ms=1500 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            Duration::from_secs(10),
        )
    });
    weft_e2e::eventually(Duration::from_secs(5), "the request at the app", || {
        (app.hits() >= 1).then_some(())
    });
    sigterm(&p);
    // Draining: readiness is withdrawn so Kubernetes stops sending traffic, new
    // connections are refused, and the in-flight request is still running.
    weft_e2e::eventually(Duration::from_secs(5), "listeners closed", || {
        TcpStream::connect(addr).is_err().then_some(())
    });
    assert!(p.child.try_wait().unwrap().is_none());
    assert_eq!(weft_e2e::http_get(p.admin, "/ready").map(|(s, _)| s), Some(503));
    assert_eq!(weft_e2e::http_get(p.admin, "/live").map(|(s, _)| s), Some(200));
    assert_eq!(parse_status(&slow.join().unwrap().unwrap()), Some(200));
    assert!(wait_exit(&mut p, Duration::from_secs(5)).success());
}

#[test]
fn shutdown_endpoint_ends_the_sidecar() {
    let mut p = Proxy::start(&[]);
    let (code, body, _) = weft_e2e::curl(&["-X", "POST", &format!("http://{}/shutdown", p.admin)]);
    assert_eq!(code, 202, "{body}");
    assert!(wait_exit(&mut p, Duration::from_secs(5)).success());
    assert!(p.logs().contains("POST /shutdown"));
}

#[test]
fn grace_period_bounds_the_drain() {
    let app = backend::http("app");
    let mut p = Proxy::start(&[("WEFT_APP_ADDR", &app.addr.to_string()), ("WEFT_DRAIN_GRACE", "300ms")]);
    let addr = p.inbound;
    std::thread::spawn(move || {
        raw_request(addr, "GET /?delay_ms=10000 HTTP/1.1\r\nHost: a\r\n\r\n", Duration::from_secs(15))
    });
    weft_e2e::eventually(Duration::from_secs(5), "the request at the app", || {
        (app.hits() >= 1).then_some(())
    });
    sigterm(&p);
    let status = wait_exit(&mut p, Duration::from_secs(5));
    assert!(status.success(), "exit status {status}");
    assert!(p.logs().contains("grace period"), "{}", p.logs());
}

#[test]
fn a_job_s_sidecar_exits_promptly_with_code_0_when_its_app_is_done() {
    // What the kubelet does to a native sidecar once a Job's app has exited: SIGTERM. The
    // app's last keep-alive connections may still be open and idle, inbound and outbound.
    let app = backend::http("app");
    let mut p = Proxy::start(&[("WEFT_APP_ADDR", &app.addr.to_string())]);
    let mut idle_in = std::net::TcpStream::connect(p.inbound).unwrap();
    let mut idle_out = std::net::TcpStream::connect(p.outbound).unwrap();
    use std::io::{Read, Write};
    idle_in.write_all(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n").unwrap();
    let out_req = format!("GET http://{}/ HTTP/1.1\r\nHost: {}\r\n\r\n", app.addr, app.addr);
    idle_out.write_all(out_req.as_bytes()).unwrap();
    let mut buf = [0u8; 1024];
    for s in [&mut idle_in, &mut idle_out] {
        let n = s.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    }
    let start = Instant::now();
    sigterm(&p);
    let status = wait_exit(&mut p, Duration::from_secs(2));
    eprintln!("sidecar exit after SIGTERM with idle keep-alive connections: {:?}, {status}", start.elapsed());
    assert!(status.success(), "{status}");
}

#[test]
fn a_drain_waits_for_a_connect_tunnel_and_then_exits() {
    use std::io::{Read, Write};
    let echo = backend::echo();
    let mut p = Proxy::start(&[("WEFT_DRAIN_GRACE", "20s")]);
    let mut tunnel = TcpStream::connect(p.outbound).unwrap();
    write!(tunnel, "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", echo.addr).unwrap();
    let mut buf = [0u8; 256];
    let n = tunnel.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    let mut echoed = |msg: &[u8]| {
        tunnel.write_all(msg).unwrap();
        let mut got = vec![0u8; msg.len()];
        tunnel.read_exact(&mut got).unwrap();
        got
    };
    assert_eq!(echoed(b"ping"), b"ping");
    sigterm(&p);
    weft_e2e::eventually(Duration::from_secs(5), "listeners closed", || {
        TcpStream::connect(p.outbound).is_err().then_some(())
    });
    // Draining: the tunnel keeps working and the proxy waits for it.
    assert_eq!(echoed(b"still here"), b"still here");
    assert!(p.child.try_wait().unwrap().is_none(), "the proxy exited under a live tunnel");
    drop(tunnel);
    assert!(wait_exit(&mut p, Duration::from_secs(5)).success());
}
