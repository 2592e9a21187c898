//! Real application protocols through the proxy with the clients users run: Python
//! grpcio (unary, server streaming, bidi streaming, trailers, error status) and a
//! WebSocket echo with the `websockets` library.

use std::process::Command;

use weft_e2e::{free_port, py_client, py_script, python, Proxy, PyServer};

#[test]
fn grpc_unary_and_streaming_through_inbound() {
    let port = free_port();
    let _server = PyServer::start("grpc_echo.py", port);
    let p = Proxy::start(&[("WEFT_APP_ADDR", &format!("127.0.0.1:{port}"))]);
    py_client("grpc_echo.py", &p.inbound.to_string(), &[]);
    assert!(
        p.metric(r#"weft_requests_total{direction="inbound",protocol="h2",status="200",cause=""}"#) >= 4.0
    );
}

#[test]
fn grpc_through_two_proxies() {
    // App → outbound (explicit, routed by :authority) → inbound → gRPC server.
    let port = free_port();
    let _server = PyServer::start("grpc_echo.py", port);
    let server_side = Proxy::start(&[("WEFT_APP_ADDR", &format!("127.0.0.1:{port}"))]);
    let client_side = Proxy::start(&[]);
    // grpcio talks to the outbound listener with :authority naming the server's
    // sidecar; the outbound routes each HTTP/2 request by it.
    let target = server_side.inbound.to_string();
    let out = weft_e2e::run(Command::new(python()).arg(py_script("grpc_echo.py")).args([
        "client",
        &client_side.outbound.to_string(),
        &target,
    ]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        client_side
            .metric(r#"weft_requests_total{direction="outbound",protocol="h2",status="200",cause=""}"#)
            >= 4.0
    );
    // And the way most apps reach a proxy: `grpc_proxy`, an HTTP CONNECT tunnel.
    py_client("grpc_echo.py", &target, &[("grpc_proxy", &format!("http://{}", client_side.outbound))]);
    assert!(
        server_side.metric(r#"weft_requests_total{direction="inbound",protocol="h2",status="200",cause=""}"#)
            >= 8.0
    );
}

#[test]
fn websocket_echo_through_inbound() {
    let port = free_port();
    let _server = PyServer::start("ws_echo.py", port);
    let p = Proxy::start(&[("WEFT_APP_ADDR", &format!("127.0.0.1:{port}"))]);
    py_client("ws_echo.py", &format!("ws://{}/chat", p.inbound), &[]);
    assert_eq!(
        p.metric(r#"weft_requests_total{direction="inbound",protocol="http1",status="101",cause=""}"#),
        1.0
    );
}
