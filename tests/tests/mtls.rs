//! Two proxies with the real control plane: an app's request to a meshed service crosses
//! the proxy-to-proxy hop as mutual TLS (checked on the wire with tcpdump), the server
//! side learns the caller's identity, and a peer presenting the wrong identity is refused.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use weft_e2e::{
    backend,
    control::Control,
    curl,
    mesh::{MeshFile, Service},
    Proxy,
};

fn mesh(api_inbound: std::net::SocketAddr) -> String {
    mesh_file(api_inbound).yaml()
}

fn mesh_file(api_inbound: std::net::SocketAddr) -> MeshFile {
    MeshFile::new()
        .workload("web")
        .workload("api")
        .service(Service::new("api", 80).meshed(api_inbound, "api"))
        // Discovery claims the api proxy is `web`: the client side must refuse it.
        .service(Service::new("imposter", 80).meshed(api_inbound, "web"))
}

/// A capture that cannot outlive a failing test.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sidecar(control: &Control, name: &str, extra: &[(&str, &str)]) -> Proxy {
    control.sidecar(name, extra)
}

#[test]
fn meshed_calls_are_mutual_tls_on_the_wire() {
    let app = backend::http("api-app");
    // The api proxy's inbound address must be in the mesh file before it starts.
    let api_inbound = weft_e2e::free_addr();
    let control = Control::start(&mesh(api_inbound), &[]);
    let app_addr = app.addr.to_string();
    let inbound = api_inbound.to_string();
    let api = sidecar(&control, "api", &[("WEFT_APP_ADDR", &app_addr), ("WEFT_INBOUND_ADDR", &inbound)]);
    let web = sidecar(&control, "web", &[]);

    let pcap = std::env::temp_dir().join(format!("weft-mtls-{}.pcap", std::process::id()));
    let dump_log = pcap.with_extension("log");
    let dump = Command::new("tcpdump")
        .args(["-i", "lo", "-U", "--immediate-mode", "-w"])
        .arg(&pcap)
        .args(["tcp", "port", &api_inbound.port().to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&dump_log).unwrap())
        .spawn()
        .expect("tcpdump (tests/run installs it)");
    let mut dump = KillOnDrop(dump);
    weft_e2e::eventually(Duration::from_secs(5), "tcpdump listening", || {
        std::fs::read_to_string(&dump_log).ok().filter(|l| l.contains("listening on")).map(drop)
    });

    for _ in 0..3 {
        let (code, body, err) =
            curl(&["-x", &format!("http://{}", web.outbound), "http://api:80/secret-path"]);
        assert_eq!(code, 200, "{err}{body}\n{}", web.logs());
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["path"], "/secret-path");
        assert_eq!(v["version"], "HTTP/1.1", "the app gets HTTP/1 back");
    }
    // Packets are written as they come (-U, --immediate-mode); the rest is flushed on SIGINT.
    weft_e2e::eventually(Duration::from_secs(5), "packets in the capture", || {
        (std::fs::metadata(&pcap).map_or(0, |m| m.len()) > 24).then_some(())
    });
    let _ = Command::new("kill").args(["-INT", &dump.0.id().to_string()]).status();
    let _ = dump.0.wait();

    // One multiplexed connection per client shard.
    let handshakes = api.metric(r#"weft_tls_handshakes_total{direction="inbound",result="ok"}"#);
    assert!((1.0..=2.0).contains(&handshakes), "{}", api.metrics());
    let text = Command::new("tcpdump").args(["-r"]).arg(&pcap).args(["-A", "-nn"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!(".{} ", api_inbound.port()))
            || text.contains(&format!(".{}:", api_inbound.port())),
        "nothing captured:\n{text}"
    );
    assert!(!text.contains("secret-path"), "cleartext HTTP on the proxy-to-proxy hop:\n{text}");
    assert!(!text.contains("api-app"), "cleartext response on the proxy-to-proxy hop");
    let _ = std::fs::remove_file(pcap);
}

#[test]
fn a_peer_with_the_wrong_identity_is_refused() {
    let app = backend::http("api-app");
    let api_inbound = weft_e2e::free_addr();
    let control = Control::start(&mesh(api_inbound), &[]);
    let _api = control.app_sidecar("api", app.addr, api_inbound);
    let web = sidecar(&control, "web", &[]);
    let (code, body, _) = curl(&["-x", &format!("http://{}", web.outbound), "http://imposter:80/"]);
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("tls-handshake"), "{body}");
    assert_eq!(app.hits(), 0);
}

#[test]
fn traffic_survives_the_control_plane_and_picks_up_changes_when_it_returns() {
    let (app1, app2) = (backend::http("api-1"), backend::http("api-2"));
    let [in1, in2] = weft_e2e::free_addrs::<2>();
    let mut control = Control::start(&mesh(in1), &[]);
    let grpc = control.grpc;
    let (a1, i1, a2, i2) = (app1.addr.to_string(), in1.to_string(), app2.addr.to_string(), in2.to_string());
    let _api1 = sidecar(&control, "api", &[("WEFT_APP_ADDR", &a1), ("WEFT_INBOUND_ADDR", &i1)]);
    let _api2 = sidecar(&control, "api", &[("WEFT_APP_ADDR", &a2), ("WEFT_INBOUND_ADDR", &i2)]);
    let web = sidecar(&control, "web", &[]);
    let call = || {
        let (code, body, _) = curl(&["-x", &format!("http://{}", web.outbound), "http://api:80/"]);
        (
            code,
            serde_json::from_str::<serde_json::Value>(&body)
                .map(|v| v["backend"].to_string())
                .unwrap_or_default(),
        )
    };
    assert_eq!(call(), (200, "\"api-1\"".to_string()));

    // Control plane gone: the proxies keep their certificates and last endpoints.
    let _ = control.child.kill();
    let _ = control.child.wait();
    for _ in 0..20 {
        assert_eq!(call(), (200, "\"api-1\"".to_string()), "a request failed without the control plane");
    }

    // Back, with the service moved to the second instance.
    drop(control);
    let restarted = Control::start_on(grpc, &mesh(in2), &[]);
    let back = Instant::now();
    loop {
        if call() == (200, "\"api-2\"".to_string()) {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(3), "the changed endpoint never arrived");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "control plane restart: the changed endpoint set was in use {:?} after it was ready",
        back.elapsed()
    );
    assert!(back.elapsed() < Duration::from_millis(1500), "took {:?}", back.elapsed());
    drop(restarted);
}

/// `mesh()` plus a policy for the api workload's app port.
fn mesh_with_policy(api_inbound: std::net::SocketAddr, app_port: u16, policy: &str) -> String {
    mesh_file(api_inbound).policy("api", app_port, policy).yaml()
}

#[test]
fn a_strict_port_refuses_plaintext_and_admits_the_mesh() {
    let app = backend::http("api-app");
    let api_inbound = weft_e2e::free_addr();
    let control = Control::start(&mesh_with_policy(api_inbound, app.addr.port(), "mode: strict"), &[]);
    let api = control.app_sidecar("api", app.addr, api_inbound);
    let web = sidecar(&control, "web", &[]);
    // Plaintext, straight to the api sidecar: refused with its cause.
    let (code, body, _) = curl(&[&format!("http://{api_inbound}/")]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("unauthorized"), "{body}");
    // Over the mesh: admitted.
    let (code, body, _) = curl(&["-x", &format!("http://{}", web.outbound), "http://api:80/"]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(app.hits(), 1);
    assert_eq!(
        api.metric(r#"weft_inbound_denied_total{client_identity="",protocol="http"}"#),
        1.0,
        "{}",
        api.metrics()
    );
    // Plaintext opaque TCP on the strict port: closed, never forwarded.
    let conns_before = app.conns();
    let rsp = weft_e2e::raw_request(api_inbound, "\u{0}\u{1}binary", Duration::from_secs(3)).unwrap();
    assert!(rsp.is_empty(), "{rsp}");
    assert_eq!(app.conns(), conns_before);
    assert_eq!(api.metric(r#"weft_inbound_denied_total{client_identity="",protocol="tcp"}"#), 1.0);
}

#[test]
fn an_identity_off_the_allow_list_gets_403() {
    let app = backend::http("api-app");
    let api_inbound = weft_e2e::free_addr();
    let policy = "allow: [spiffe://weft.local/ns/default/sa/admin]";
    let control = Control::start(&mesh_with_policy(api_inbound, app.addr.port(), policy), &[]);
    let api = control.app_sidecar("api", app.addr, api_inbound);
    let web = sidecar(&control, "web", &[]);
    let (code, body, _) = curl(&["-x", &format!("http://{}", web.outbound), "http://api:80/"]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("unauthorized"), "{body}");
    assert_eq!(app.hits(), 0);
    let web_id = "spiffe://weft.local/ns/default/sa/web";
    let series = format!(r#"weft_inbound_denied_total{{client_identity="{web_id}",protocol="http"}}"#);
    assert_eq!(api.metric(&series), 1.0, "{}", api.metrics());
}

#[test]
fn a_permissive_port_accepts_plaintext() {
    // The port starts strict, so the control plane's answer visibly decides: plaintext is
    // refused; made permissive, the same client gets through (not the default at work).
    let app = backend::http("api-app");
    let api_inbound = weft_e2e::free_addr();
    let port = app.addr.port();
    let control = Control::start(&mesh_with_policy(api_inbound, port, "mode: strict"), &[]);
    let api = control.app_sidecar("api", app.addr, api_inbound);
    let (code, body, _) = curl(&[&format!("http://{api_inbound}/")]);
    assert_eq!(code, 403, "{body}");
    let generation = control.apply(&mesh_with_policy(api_inbound, port, "mode: permissive"));
    api.wait_generation("policy", generation);
    let (code, body, _) = curl(&[&format!("http://{api_inbound}/")]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(app.hits(), 1);
}

#[test]
fn certificate_renewal_under_load_loses_no_request() {
    let app = backend::http("api-app");
    let api_inbound = weft_e2e::free_addr();
    // 3-second certificates: each proxy renews about every 2 s during the run.
    let control = Control::start(&mesh(api_inbound), &["--cert-ttl-secs", "3"]);
    let api = control.app_sidecar("api", app.addr, api_inbound);
    let web = sidecar(&control, "web", &[]);
    let proxy = format!("http://{}", web.outbound);
    let start = Instant::now();
    let (mut ok, mut failed) = (0, 0);
    while start.elapsed() < Duration::from_secs(8) {
        // A new client connection each time; the proxies reuse or reopen mTLS as needed.
        let (code, _, _) = curl(&["-x", &proxy, "http://api:80/"]);
        if code == 200 {
            ok += 1
        } else {
            failed += 1
        }
    }
    let renewals = |p: &Proxy| p.metric(r#"weft_identity_certify_total{result="ok"}"#);
    eprintln!(
        "renewal under load: {ok} ok, {failed} failed; certificates: web {}, api {}",
        renewals(&web),
        renewals(&api)
    );
    assert_eq!(failed, 0);
    assert!(ok > 20);
    assert!(renewals(&web) >= 3.0 && renewals(&api) >= 3.0, "certificates were not renewed during the run");
}

/// Sends one masked WebSocket text frame on `s` and returns the payload of the frame
/// that comes back (RFC 6455 §5.2; short frames only).
fn ws_round_trip(s: &mut std::net::TcpStream, text: &str) -> String {
    use std::io::{Read, Write};
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x81, 0x80 | text.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&frame).unwrap();
    let mut head = [0u8; 2];
    s.read_exact(&mut head).unwrap();
    let mut payload = vec![0u8; usize::from(head[1] & 0x7f)];
    s.read_exact(&mut payload).unwrap();
    String::from_utf8(payload).unwrap()
}

#[test]
fn websocket_upgrades_and_connect_tunnels_to_a_meshed_service_ride_mutual_tls() {
    use std::io::{BufRead, BufReader, Write};
    // The api app is a WebSocket echo server behind a strict port: only mTLS gets in.
    let port = weft_e2e::free_port();
    let _ws = weft_e2e::PyServer::start("ws_echo.py", port);
    let api_inbound = weft_e2e::free_addr();
    let control = Control::start(&mesh_with_policy(api_inbound, port, "mode: strict"), &[]);
    let api = control.app_sidecar("api", std::net::SocketAddr::from(([127, 0, 0, 1], port)), api_inbound);
    let web = sidecar(&control, "web", &[]);

    // An HTTP/1 upgrade through the web sidecar used as an HTTP proxy.
    let mut s = std::net::TcpStream::connect(web.outbound).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET http://api:80/chat HTTP/1.1\r\nHost: api:80\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut head = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        head.push_str(&line);
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    assert!(head.starts_with("HTTP/1.1 101"), "{head}\n{}", web.logs());
    assert_eq!(ws_round_trip(&mut s, "hello over the mesh"), "hello over the mesh");
    // A close frame (masked, empty), answered by the server's own close.
    s.write_all(&[0x88, 0x80, 0, 0, 0, 0]).unwrap();
    let mut close = [0u8; 2];
    std::io::Read::read_exact(&mut s, &mut close).unwrap();
    assert_eq!(close[0], 0x88);
    drop((reader, s));

    // CONNECT: the websockets library itself, with http_proxy set to the web sidecar.
    let proxy = format!("http://{}", web.outbound);
    weft_e2e::py_client("ws_echo.py", "ws://api:80/chat", &[("http_proxy", &proxy)]);

    // Both crossed as mTLS (the strict port refuses anything else) and were admitted.
    let handshakes = api.metric(r#"weft_tls_handshakes_total{direction="inbound",result="ok"}"#);
    assert!(handshakes >= 2.0, "{}", api.metrics());
    assert_eq!(web.metric(r#"weft_tls_handshakes_total{direction="outbound",result="ok"}"#), handshakes);
    assert!(!api.metrics().contains("weft_inbound_denied_total{"), "{}", api.metrics());
    // The tunnelled bytes are counted against the peer on each side, once the
    // connections have closed.
    let out = r#"weft_tcp_read_bytes_total{direction="outbound",peer_identity="spiffe://weft.local/ns/default/sa/api"}"#;
    let inb = r#"weft_tcp_read_bytes_total{direction="inbound",peer_identity="spiffe://weft.local/ns/default/sa/web"}"#;
    web.wait_metric_at_least(out, 1.0);
    api.wait_metric_at_least(inb, 1.0);
}
