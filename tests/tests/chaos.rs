//! Short chaos runs (seconds, so CI catches regressions; bench/soak runs the long ones):
//! the control plane dies under load and comes back, and certificates renew under load,
//! with no failed request; a slow backend under a burst times out cleanly and recovers.
//! (Endpoint loss: balance.rs.) Two real sidecars over mTLS, a real backend, constant-rate
//! load from weft-load.

use std::{net::SocketAddr, process::Command, time::Duration};

use serde_json::Value;
use weft_e2e::{
    backend,
    control::Control,
    eventually, free_addr,
    mesh::{MeshFile, Service},
};

fn mesh(server_inbound: SocketAddr, extra_service: bool) -> String {
    let mut m = MeshFile::new()
        .workload("web")
        .workload("api")
        .service(Service::new("api", 80).meshed(server_inbound, "api"));
    if extra_service {
        m = m.service(Service::new("api-next", 80).meshed(server_inbound, "api"));
    }
    m.yaml()
}

/// The CA root both control planes of a test sign with (as `weft up` keeps its own).
fn root() -> (String, String) {
    let dir = std::env::temp_dir().join(format!("weft-chaos-{}-{}", std::process::id(), free_addr().port()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (dir.join("root.crt"), dir.join("root.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c.display().to_string(), k.display().to_string())
}

/// Constant-rate load through `via` to `host`, for `seconds`; its report.
fn load(via: SocketAddr, host: &str, seconds: u32) -> std::process::Child {
    Command::new(weft_e2e::bin("weft-load"))
        .args(["--addr", &via.to_string(), "--host", host, "--rate", "200", "--warmup", "0"])
        .args(["--seconds", &seconds.to_string(), "--connections", "8"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn report(load: std::process::Child) -> Value {
    serde_json::from_slice(&load.wait_with_output().unwrap().stdout).unwrap()
}

#[test]
fn the_control_plane_dies_under_load_and_comes_back() {
    let app = backend::http("api");
    let server_inbound = free_addr();
    let (cert, key) = root();
    let ca = ["--ca-cert", cert.as_str(), "--ca-key", key.as_str()];
    let mut control = Control::start(&mesh(server_inbound, false), &ca);
    let grpc = control.grpc;
    let _server = control.app_sidecar("api", app.addr, server_inbound);
    let web = control.sidecar("web", &[]);
    let running = load(web.outbound, "api:80", 5);
    eventually(Duration::from_secs(5), "load on the app", || (app.hits() > 50).then_some(()));
    // The control plane is gone: answers already held keep serving, and new connections
    // (the load opens some) keep working on them.
    let _ = control.child.kill();
    let _ = control.child.wait();
    let served = app.hits();
    eventually(Duration::from_secs(5), "requests served without a control plane", || {
        (app.hits() > served + 100).then_some(())
    });
    // It comes back on its address, with the same root; a change made after applies.
    let control = Control::start_on(grpc, &mesh(server_inbound, true), &ca);
    let g = control.generation();
    web.wait_generation("discovery", g);
    let r = report(running);
    eprintln!("control plane killed and restarted under load: {r}");
    assert_eq!(r["errors"], 0, "{r}");
    let (code, _, err) = weft_e2e::curl(&["-x", &format!("http://{}", web.outbound), "http://api-next:80/"]);
    assert_eq!(code, 200, "a service added after the restart: {err}");
}

#[test]
fn certificates_renew_under_load_without_a_failed_request() {
    let app = backend::http("api");
    let server_inbound = free_addr();
    // Leaves of 3 s: each sidecar renews about every 2 s.
    let control = Control::start(&mesh(server_inbound, false), &["--cert-ttl-secs", "3"]);
    let server = control.app_sidecar("api", app.addr, server_inbound);
    let web = control.sidecar("web", &[]);
    let ok = r#"weft_identity_certify_total{result="ok"}"#;
    let before = (web.metric(ok), server.metric(ok));
    let r = report(load(web.outbound, "api:80", 6));
    eprintln!(
        "renewals under load: {r}; certificates web {} api {}",
        web.metric(ok) - before.0,
        server.metric(ok) - before.1
    );
    assert_eq!(r["errors"], 0, "{r}");
    assert!(web.metric(ok) - before.0 >= 2.0 && server.metric(ok) - before.1 >= 2.0, "no renewal happened");
}

#[test]
fn a_slow_backend_under_many_clients_times_out_cleanly_and_recovers_at_once() {
    // 200 requests at once to a backend that takes 2 s, through a route with a 300 ms
    // timeout: each is answered 504 `timeout` by the sidecars (the deadline travels to
    // the server sidecar too), and the next request, which the backend answers at once,
    // succeeds: nothing the burst left behind stands in its way.
    let app = backend::http("api");
    let server_inbound = free_addr();
    let mesh = MeshFile::new()
        .workload("web")
        .workload("api")
        .service(Service::new("api", 80).meshed(server_inbound, "api"))
        .route("api", "api", "[{timeout: 300ms}]");
    let control = Control::start(&mesh.yaml(), &[]);
    let server = control.app_sidecar("api", app.addr, server_inbound);
    let web = control.sidecar("web", &[]);
    let proxy = format!("http://{}", web.outbound);
    let mut args = vec!["-Z", "--parallel-max", "200", "-x", &proxy, "-w", "\nstatus=%{http_code}\n"];
    args.extend(["-H", "x-burst: 1"]);
    args.extend(["http://api:80/?delay_ms=2000"; 200]);
    let (_, out, err) = weft_e2e::curl(&args);
    let statuses: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("status=")).collect();
    assert_eq!(statuses.len(), 200, "{err}");
    assert!(statuses.iter().all(|s| *s == "504"), "{statuses:?}");
    // Each 504 is the client sidecar's own timeout or, when the server sidecar's copy of
    // the deadline fires first (a race by design: both hold it), relayed from it.
    let metrics = web.metrics();
    let timeouts: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("weft_requests_total{") && l.contains(r#"direction="outbound""#))
        .filter(|l| l.contains(r#"status="504""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(timeouts, 200.0, "{metrics}");
    // The client sidecar cancelling 200 timed-out streams on its one connection is not
    // the rapid-reset attack to the server sidecar, however late each stream arrived.
    let cut = server.metric(r#"weft_tcp_errors_total{direction="inbound",cause="rapid-reset"}"#);
    assert_eq!(cut, 0.0, "{}", server.metrics());
    // The backend is fast again for the next request: answered at once.
    let (code, _, err) = weft_e2e::curl(&["-x", &proxy, "http://api:80/"]);
    assert_eq!(code, 200, "{err}");
    drop(server);
}
