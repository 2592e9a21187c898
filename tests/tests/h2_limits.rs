//! HTTP/2 abuse from a client: the rapid-reset attack (CVE-2023-44487) and stream floods
//! must end the abusive connection without reaching the app at scale, and leave the
//! proxy serving others. The client is the `h2` crate driven by hand, because real
//! clients do not misbehave on purpose.

use std::time::Duration;

use http::Request;
use weft_e2e::{backend, curl, Proxy};

async fn h2_client(
    addr: std::net::SocketAddr,
) -> (h2::client::SendRequest<bytes::Bytes>, tokio::task::JoinHandle<Result<(), h2::Error>>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    (send, tokio::spawn(conn))
}

/// Backends own a runtime, so they live outside the one that drives the client.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

#[test]
fn rapid_reset_is_cut_off() {
    let app = backend::http("app");
    let p = Proxy::start(&[("WEFT_APP_ADDR", &app.addr.to_string())]);
    let opened = block_on(async {
        let (mut send, conn) = h2_client(p.inbound).await;
        let mut opened = 0;
        for _ in 0..5000 {
            match send.clone().ready().await {
                Ok(s) => send = s,
                Err(_) => break,
            }
            let req = Request::get(format!("http://{}/?delay_ms=50", p.inbound)).body(()).unwrap();
            let Ok((_rsp, mut stream)) = send.send_request(req, true) else { break };
            // Let the connection task put HEADERS on the wire, then cancel: the attack.
            tokio::task::yield_now().await;
            stream.send_reset(h2::Reason::CANCEL);
            opened += 1;
        }
        let res = tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("connection not closed")
            .unwrap();
        let err = res.expect_err("the proxy must end a rapid-reset connection with an error");
        assert!(err.is_go_away() || err.is_io() || err.reason().is_some(), "{err:?}");
        opened
    });
    assert!(opened < 5000, "the proxy accepted all {opened} reset streams");
    // The app saw a fraction of the streams, and the proxy still serves others.
    eprintln!("rapid reset: connection closed after {opened} streams; the app saw {}", app.hits());
    assert!(app.hits() < 1000, "app saw {} requests", app.hits());
    // Counted as the proxy's side of the connection ends, which may be just after the
    // client sees it close.
    p.wait_metric(r#"weft_tcp_errors_total{direction="inbound",cause="rapid-reset"}"#, 1.0);
    let (code, _, err) = curl(&[&format!("http://{}/after", p.inbound)]);
    assert_eq!(code, 200, "{err}");
}

/// Streams the proxy already forwards, then cancelled: Envoy's premature-reset rule.
#[test]
fn cancelled_forwarded_requests_close_the_connection() {
    let app = backend::http("app");
    let p = Proxy::start(&[("WEFT_APP_ADDR", &app.addr.to_string())]);
    let opened = block_on(async {
        let (mut send, conn) = h2_client(p.inbound).await;
        let mut opened = 0;
        for _ in 0..1000 {
            match send.clone().ready().await {
                Ok(s) => send = s,
                Err(_) => break,
            }
            let req = Request::get(format!("http://{}/?delay_ms=1000", p.inbound)).body(()).unwrap();
            let Ok((_rsp, mut stream)) = send.send_request(req, true) else { break };
            // Long enough for the proxy to accept the stream and start forwarding it.
            tokio::time::sleep(Duration::from_millis(3)).await;
            stream.send_reset(h2::Reason::CANCEL);
            opened += 1;
        }
        let res = tokio::time::timeout(Duration::from_secs(10), conn).await.expect("connection not closed");
        assert!(res.unwrap().is_err() || opened < 1000);
        opened
    });
    eprintln!("premature resets: connection closed after {opened} streams; the app saw {}", app.hits());
    assert!(opened < 300, "connection survived {opened} cancelled requests");
    assert!(app.hits() > 0, "the requests were meant to be forwarded before the reset");
    // Counted as the proxy's side of the connection ends, which may be just after the
    // client sees it close.
    p.wait_metric(r#"weft_tcp_errors_total{direction="inbound",cause="rapid-reset"}"#, 1.0);
}

#[test]
fn concurrent_streams_are_capped() {
    let app = backend::http("app");
    let p =
        Proxy::start(&[("WEFT_APP_ADDR", &app.addr.to_string()), ("WEFT_H2_MAX_CONCURRENT_STREAMS", "10")]);
    block_on(async {
        let (mut send, _conn) = h2_client(p.inbound).await;
        // After one exchange the server's SETTINGS (at most 10 streams) have arrived.
        send = send.ready().await.unwrap();
        let req = Request::get(format!("http://{}/", p.inbound)).body(()).unwrap();
        let (rsp, _) = send.send_request(req, true).unwrap();
        assert_eq!(rsp.await.unwrap().status(), 200);
        let start = std::time::Instant::now();
        let mut rsps = vec![];
        for _ in 0..30 {
            send = send.ready().await.unwrap();
            let req = Request::get(format!("http://{}/?delay_ms=200", p.inbound)).body(()).unwrap();
            let (rsp, _) = send.send_request(req, true).unwrap();
            rsps.push(rsp);
        }
        for rsp in rsps {
            assert_eq!(rsp.await.unwrap().status(), 200);
        }
        // 30 requests of 200 ms, at most 10 at a time: at least three rounds.
        assert!(start.elapsed() >= Duration::from_millis(550), "limit not applied: {:?}", start.elapsed());
    });
    assert_eq!(app.hits(), 31);
}
