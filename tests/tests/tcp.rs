//! Opaque TCP through the proxy: server-speaks-first protocols, half-close, byte
//! counters, configured opaque ports, and TLS forwarded untouched.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    time::{Duration, Instant},
};

use weft_e2e::{backend, Proxy};

fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn server_speaks_first_answers_within_200ms() {
    let banner = backend::banner(b"220 smtp.test ESMTP ready\r\n");
    let p = Proxy::start(&[("WEFT_APP_ADDR", &banner.addr.to_string())]);
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let start = Instant::now();
        let mut s = TcpStream::connect(p.inbound).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let got = read_n(&mut s, 27);
        worst = worst.max(start.elapsed());
        assert_eq!(&got, b"220 smtp.test ESMTP ready\r\n");
        // The connection is a normal opaque one after the banner.
        s.write_all(b"EHLO me\r\n").unwrap();
        assert_eq!(read_n(&mut s, 9), b"EHLO me\r\n");
    }
    eprintln!("server-speaks-first: slowest banner through the proxy took {worst:?}");
    assert!(worst < Duration::from_millis(200), "banner took {worst:?}");
    assert_eq!(p.metric(r#"weft_detect_total{direction="inbound",outcome="silent"}"#), 5.0);
}

#[test]
fn opaque_ports_skip_detection() {
    let banner = backend::banner(b"+OK\r\n");
    let port = banner.addr.port().to_string();
    let p = Proxy::start(&[("WEFT_APP_ADDR", &banner.addr.to_string()), ("WEFT_OPAQUE_PORTS", &port)]);
    let mut s = TcpStream::connect(p.inbound).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(read_n(&mut s, 5), b"+OK\r\n");
    assert_eq!(p.metric(r#"weft_detect_total{direction="inbound",outcome="opaque-port"}"#), 1.0);
}

#[test]
fn half_close_and_byte_counts() {
    let echo = backend::echo();
    let p = Proxy::start(&[("WEFT_APP_ADDR", &echo.addr.to_string())]);
    let mut s = TcpStream::connect(p.inbound).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let payload = b"\x00\x01\x02 not a known protocol \xff".repeat(1000);
    s.write_all(&payload).unwrap();
    // Half-close: the echo server sees EOF, finishes echoing, then closes.
    s.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, payload);
    drop(s);
    let n = payload.len() as f64;
    // Bytes are counted when the connection ends, after the client has closed it.
    p.wait_metric(r#"weft_tcp_read_bytes_total{direction="inbound"}"#, n);
    assert_eq!(p.metric(r#"weft_tcp_read_bytes_total{direction="inbound"}"#), n);
    assert_eq!(p.metric(r#"weft_tcp_write_bytes_total{direction="inbound"}"#), n);
    assert_eq!(p.metric(r#"weft_detect_total{direction="inbound",outcome="opaque"}"#), 1.0);
    assert_eq!(p.metric(r#"weft_tcp_open_connections{direction="inbound"}"#), 0.0);
}

#[test]
fn idle_tcp_connections_are_closed() {
    let echo = backend::echo();
    let p = Proxy::start(&[("WEFT_APP_ADDR", &echo.addr.to_string()), ("WEFT_TCP_IDLE_TIMEOUT", "300ms")]);
    let mut s = TcpStream::connect(p.inbound).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"\x01ping").unwrap();
    assert_eq!(read_n(&mut s, 5), b"\x01ping");
    let start = Instant::now();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(start.elapsed() < Duration::from_secs(4), "idle connection not closed");
}

#[test]
fn tls_is_forwarded_opaque() {
    // The app echoes, so curl's ClientHello comes back unchanged: the handshake fails,
    // but the bytes crossed the proxy untouched and detection recorded TLS.
    let echo = backend::echo();
    let p = Proxy::start(&[("WEFT_APP_ADDR", &echo.addr.to_string()), ("WEFT_LOG", "weft_proxy=debug")]);
    let port = p.inbound.port();
    let _ = weft_e2e::curl(&[
        "-k",
        "--max-time",
        "3",
        "--resolve",
        &format!("svc.example.test:{port}:127.0.0.1"),
        &format!("https://svc.example.test:{port}/"),
    ]);
    assert_eq!(p.metric(r#"weft_detect_total{direction="inbound",outcome="tls"}"#), 1.0);
    assert_eq!(echo.hits(), 1);
    assert!(p.logs().contains("svc.example.test"), "SNI is recorded in the log");
}

#[test]
fn outbound_refuses_non_http_without_destination() {
    let p = Proxy::start(&[]);
    let mut s = TcpStream::connect(p.outbound).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"\x00\x00binary").unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty());
    assert_eq!(p.metric(r#"weft_tcp_errors_total{direction="outbound",cause="protocol-unknown"}"#), 1.0);
}
