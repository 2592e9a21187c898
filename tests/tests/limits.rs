//! Load shedding with the real control plane: an inbound port's rate limit answers 429
//! `rate-limited` and keeps a share for every client identity; a service's limit of
//! requests in flight answers 503 `concurrency-limit`.

use std::time::Duration;

use weft_e2e::{
    backend,
    control::Control,
    curl,
    mesh::{MeshFile, Service},
};

#[test]
fn the_rate_limit_answers_429_and_keeps_a_share_for_each_identity() {
    let app = backend::http("api-app");
    let api_inbound = weft_e2e::free_addr();
    let port = app.addr.port();
    let mesh = MeshFile::new()
        .workload("web")
        .workload("admin")
        .workload("api")
        .service(Service::new("api", 80).meshed(api_inbound, "api"))
        .policy("api", port, "mode: permissive, rateLimit: {requestsPerSecond: 2, burst: 10, perIdentity: 5}")
        .yaml();
    let control = Control::start(&mesh, &[]);
    let api = control.app_sidecar("api", app.addr, api_inbound);
    let (web, admin) = (control.sidecar("web", &[]), control.sidecar("admin", &[]));
    let burst = |proxy: &weft_e2e::Proxy, n: usize| -> (usize, usize) {
        let counts = weft_e2e::tally(proxy.outbound, 1, n, "http://api:80/", &[]);
        let count = |s: &str| counts.get(s).copied().unwrap_or(0);
        (count("status 200"), count("status 429"))
    };
    // web alone may not take the port: its share is 5 a second of the burst of 10 (a
    // slow run may see one more token come back).
    let (web_ok, web_limited) = burst(&web, 12);
    assert!((5..=6).contains(&web_ok) && web_ok + web_limited == 12, "{web_ok} {web_limited}");
    // admin still gets its own share.
    let (admin_ok, admin_limited) = burst(&admin, 6);
    assert!(admin_ok >= 4 && admin_limited >= 1, "{admin_ok} {admin_limited}");
    assert_eq!(app.hits(), web_ok + admin_ok);
    let limited =
        r#"weft_requests_total{direction="inbound",protocol="h2",status="429",cause="rate-limited"}"#;
    assert_eq!(api.metric(limited) as usize, web_limited + admin_limited, "{}", api.metrics());
    let (code, body, _) = curl(&["-i", "-x", &format!("http://{}", web.outbound), "http://api:80/"]);
    assert_eq!(code, 429, "{body}");
    assert!(body.contains("weft-error: rate-limited"), "{body}");
}

#[test]
fn a_service_at_its_concurrency_limit_sheds_with_503() {
    let slow = backend::http_slow("slow", Duration::from_millis(800));
    let mesh = MeshFile::new()
        .workload("web")
        .service(Service::new("api", 80).with("maxConcurrentRequests: 2").endpoint(slow.addr))
        .yaml();
    let control = Control::start(&mesh, &[]);
    let web = control.sidecar("web", &[]);
    let via = format!("http://{}", web.outbound);
    let clients: Vec<_> = (0..5)
        .map(|_| {
            let via = via.clone();
            std::thread::spawn(move || curl(&["-i", "-x", &via, "http://api:80/"]))
        })
        .collect();
    let results: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let shed: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    assert_eq!((ok, shed.len()), (2, 3), "{results:?}");
    assert!(shed.iter().all(|r| r.1.contains("weft-error: concurrency-limit")), "{shed:?}");
    assert_eq!(slow.hits(), 2);
}

#[test]
fn a_flooded_admin_port_leaves_the_data_path_its_file_descriptors() {
    // 256 descriptors, as a tight pod might have; 300 connections to the admin port
    // that never send a request (a scraper gone wrong, or an attacker).
    let app = weft_e2e::backend::http("app");
    let app_addr = app.addr.to_string();
    let mut p = weft_e2e::Proxy::spawn_via(
        &["prlimit", "--nofile=256:256", "--"],
        &[("WEFT_APP_ADDR", app_addr.as_str()), ("WEFT_ADMIN_MAX_CONNECTIONS", "16")],
    );
    p.wait_ready();
    let idle: Vec<std::net::TcpStream> =
        (0..300).filter_map(|_| std::net::TcpStream::connect(p.admin).ok()).collect();
    assert!(idle.len() >= 250, "{}", idle.len());
    let t = std::time::Instant::now();
    p.wait_metric_at_least(r#"weft_listener_refused_total{listener="admin"}"#, 200.0);
    // Probes still get in: an idle connection makes room for them at once.
    assert_eq!(weft_e2e::http_get(p.admin, "/ready").map(|(s, _)| s), Some(200));
    eprintln!("admin flood: 300 idle connections; a scrape answered within {:?}", t.elapsed());
    // The data path still has descriptors: requests in and out succeed.
    for _ in 0..20 {
        let (code, body, err) = weft_e2e::curl(&[&format!("http://{}/", p.inbound)]);
        assert_eq!(code, 200, "{body}{err}\n{}", p.logs());
    }
    let (code, _, _) =
        weft_e2e::curl(&["-x", &format!("http://{}", p.outbound), &format!("http://{}/", app.addr)]);
    assert_eq!(code, 200);
    assert!(!p.logs().contains("Too many open files"), "{}", p.logs());
    drop(idle);
}

#[test]
fn watches_for_authorities_clients_choose_are_capped_and_closed_when_idle() {
    use weft_e2e::{control::Control, mesh::MeshFile};
    // Every distinct authority a client names opens a discovery watch; a client naming
    // 500 (all refused here: nothing listens) must not leave 500 open.
    let control = Control::start(&MeshFile::new().workload("web").yaml(), &[]);
    let web = control.sidecar("web", &[("WEFT_WATCH_IDLE_TIMEOUT", "1s"), ("WEFT_MAX_WATCHES", "200")]);
    let served = || {
        let text = weft_e2e::http_get(control.admin, "/metrics").map(|(_, b)| b).unwrap_or_default();
        weft_e2e::metric_value(&text, "weft_control_watches")
    };
    let before = served();
    let urls: Vec<String> = (0..500).map(|i| format!("http://127.0.0.1:{}/", 41000 + i)).collect();
    let mut args =
        vec!["-x".to_string(), format!("http://{}", web.outbound), "-o".into(), "/dev/null".into()];
    for u in &urls {
        args.push(u.clone());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    weft_e2e::curl(&refs);
    let held = r#"weft_control_watches{kind="discovery"}"#;
    let evicted = r#"weft_control_watch_evictions_total{kind="discovery"}"#;
    assert!(web.metric(held) <= 200.0, "over the cap:\n{}", web.metrics());
    assert!(web.metric(evicted) >= 300.0, "{}", web.metrics());
    // Unused for the idle timeout, they are all closed, on the control plane too.
    web.wait_metric(held, 0.0);
    weft_e2e::eventually(Duration::from_secs(5), "the control plane's watch streams to close", || {
        (served() <= before).then_some(())
    });
    eprintln!(
        "500 authorities: at most 200 watches held, {} evicted, none left once idle",
        web.metric(evicted)
    );
}

#[test]
fn a_flooded_inbound_leaves_the_outbound_and_the_admin_port_their_descriptors() {
    // 256 descriptors and no setting: the default cap (a quarter of what is left after
    // the reserve, at least 64) applies to each direction.
    let app = weft_e2e::backend::http("app");
    let app_addr = app.addr.to_string();
    let mut p = weft_e2e::Proxy::spawn_via(
        &["prlimit", "--nofile=256:256", "--"],
        &[("WEFT_APP_ADDR", app_addr.as_str())],
    );
    p.wait_ready();
    // 300 connections to the inbound that send nothing.
    let idle: Vec<std::net::TcpStream> =
        (0..300).filter_map(|_| std::net::TcpStream::connect(p.inbound).ok()).collect();
    assert!(idle.len() >= 250, "{}", idle.len());
    p.wait_metric_at_least(r#"weft_listener_refused_total{listener="inbound"}"#, 150.0);
    // The other direction and the probes still work.
    for _ in 0..10 {
        let (code, _, err) =
            weft_e2e::curl(&["-x", &format!("http://{}", p.outbound), &format!("http://{}/", app.addr)]);
        assert_eq!(code, 200, "{err}\n{}", p.logs());
    }
    assert_eq!(weft_e2e::http_get(p.admin, "/ready").map(|(s, _)| s), Some(200));
    assert!(!p.logs().contains("Too many open files"), "{}", p.logs());
    drop(idle);
}

#[test]
fn the_control_planes_grpc_port_closes_silent_connections_and_holds_a_cap() {
    use std::io::{Read, Write};
    let control = Control::start(
        &MeshFile::new().workload("web").yaml(),
        &["--max-connections", "20", "--handshake-timeout", "1s"],
    );
    let refused = |reason: &str| {
        let text = weft_e2e::http_get(control.admin, "/metrics").map(|(_, b)| b).unwrap_or_default();
        let name = format!(r#"weft_control_connections_refused_total{{listener="grpc",reason="{reason}"}}"#);
        weft_e2e::metric_value(&text, &name)
    };
    // 50 connections that never speak: 20 are held until the handshake timeout, the rest
    // closed as they arrive.
    let mut silent: Vec<std::net::TcpStream> =
        (0..50).map(|_| std::net::TcpStream::connect(control.grpc).unwrap()).collect();
    weft_e2e::eventually(Duration::from_secs(5), "30 connections refused as the port is full", || {
        (refused("full") >= 30.0).then_some(())
    });
    weft_e2e::eventually(Duration::from_secs(5), "the 20 silent ones closed", || {
        (refused("silent") >= 20.0).then_some(())
    });
    for s in &mut silent {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(s.read(&mut [0u8; 16]).unwrap_or(0), 0, "a silent connection must be closed");
    }
    // Something that is not HTTP/2 is closed at once.
    let mut http1 = std::net::TcpStream::connect(control.grpc).unwrap();
    http1.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    http1.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(http1.read(&mut [0u8; 16]).unwrap_or(0), 0);
    weft_e2e::eventually(Duration::from_secs(5), "the HTTP/1 connection counted", || {
        (refused("not-http2") >= 1.0).then_some(())
    });
    // With the flood gone, a proxy gets its certificate and policy as usual (ready).
    drop(silent);
    let _web = control.sidecar("web", &[]);
}
