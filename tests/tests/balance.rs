//! Per-request load balancing in the outbound proxy, with the real control plane: peak
//! EWMA steers traffic away from a slow endpoint (round robin does not), weights are
//! honoured, a service without endpoints fails fast with 503 `no-endpoints` (or succeeds
//! if one appears within the queue timeout), and a removed endpoint finishes what it
//! has in flight.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use weft_e2e::{
    backend,
    control::Control,
    curl,
    mesh::{MeshFile, Service},
    Proxy,
};

/// A mesh with the client workload `web` and the service `api:80` over `endpoints`
/// (address, weight), not meshed: the proxy talks to them directly.
fn mesh(endpoints: &[(SocketAddr, u32)], balancer: &str) -> String {
    let api = Service::new("api", 80).with(&format!("balancer: {balancer}"));
    let api = endpoints.iter().fold(api, |api, (addr, weight)| api.weighted(addr, *weight));
    MeshFile::new().workload("web").service(api).yaml()
}

/// Sends `per_client` sequential requests from each of `clients` concurrent curls
/// through `web` to `api:80`; returns how many each backend answered.
fn spread(web: &Proxy, clients: usize, per_client: usize) -> BTreeMap<String, usize> {
    let n = clients * per_client;
    let mut counts = weft_e2e::tally(web.outbound, clients, n, "http://api:80/", &[]);
    // Every request answered 200; what remains is the count per backend.
    assert_eq!(counts.remove("status 200"), Some(n), "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), n, "{counts:?}");
    counts
}

fn share(counts: &BTreeMap<String, usize>, name: &str) -> f64 {
    *counts.get(name).unwrap_or(&0) as f64 / counts.values().sum::<usize>() as f64
}

/// Four standard deviations of a share `p` measured over `n` requests: how far a share
/// may stray by chance alone (a binomial's spread), so bounds follow the sample size.
fn tolerance(p: f64, n: usize) -> f64 {
    4.0 * (p * (1.0 - p) / n as f64).sqrt()
}

#[test]
fn peak_ewma_sends_a_slow_endpoint_less_than_round_robin() {
    let (a, b) = (backend::http("fast-a"), backend::http("fast-b"));
    let slow = backend::http_slow("slow", Duration::from_millis(30));
    let eps = [(a.addr, 1), (b.addr, 1), (slow.addr, 1)];
    let control = Control::start(&mesh(&eps, "peak-ewma"), &[]);
    let web = control.sidecar("web", &[]);
    let ewma = spread(&web, 6, 60);
    let generation = control.apply(&mesh(&eps, "round-robin"));
    web.wait_generation("discovery", generation);
    let rr = spread(&web, 6, 60);
    let (ewma_slow, rr_slow) = (share(&ewma, "slow"), share(&rr, "slow"));
    eprintln!("slow endpoint's share: peak-EWMA {ewma_slow:.3} {ewma:?}; round robin {rr_slow:.3} {rr:?}");
    // Order, not exact shares: under peak-EWMA the slow endpoint gets the least, and less
    // than round robin gives it, which keeps to a third within chance.
    for fast in ["fast-a", "fast-b"] {
        assert!(ewma_slow < share(&ewma, fast), "peak-EWMA did not prefer {fast}: {ewma:?}");
    }
    let third = 1.0 / 3.0;
    assert!(
        (rr_slow - third).abs() <= tolerance(third, 360),
        "round robin gave the slow endpoint {rr_slow:.3}: {rr:?}"
    );
    assert!(
        ewma_slow < rr_slow - tolerance(third, 360),
        "peak-EWMA {ewma_slow:.3} vs round robin {rr_slow:.3}"
    );
}

#[test]
fn weights_are_honoured() {
    // Equal latencies well above scheduling noise, so weights alone make the difference.
    let same = Duration::from_millis(5);
    let (a, b, c) =
        (backend::http_slow("a", same), backend::http_slow("b", same), backend::http_slow("c", same));
    let eps = [(a.addr, 1), (b.addr, 1), (c.addr, 2)];
    // Round robin on one connection (one proxy shard): exactly in proportion.
    let control = Control::start(&mesh(&eps, "round-robin"), &[]);
    let web = control.sidecar("web", &[]);
    let rr = spread(&web, 1, 200);
    assert_eq!((rr["a"], rr["b"], rr["c"]), (50, 50, 100), "{rr:?}");
    // Peak EWMA divides an endpoint's cost by its weight (weight is capacity, as in
    // Envoy's weighted least-request): at equal latency and low concurrency the weight-2
    // endpoint wins every pair it is drawn into, about two thirds of one client's
    // sequential requests (fewer when a latency peak of its own makes it lose for a while;
    // with requests in flight, their count evens the costs out towards 1:1:2).
    let generation = control.apply(&mesh(&eps, "peak-ewma"));
    web.wait_generation("discovery", generation);
    let ewma = spread(&web, 1, 400);
    eprintln!("weights 1:1:2 under peak-EWMA: {ewma:?}");
    // Order and a floor from the sample size: the weight-2 endpoint gets at least its
    // weighted half (within chance) and more than either weight-1 endpoint, which both
    // still get traffic.
    let c = share(&ewma, "c");
    assert!(c >= 0.5 - tolerance(0.5, 400), "{ewma:?}");
    for name in ["a", "b"] {
        let s = share(&ewma, name);
        assert!(s > 0.0 && c > s, "{ewma:?}");
    }
}

#[test]
fn no_endpoints_fails_fast_and_a_late_endpoint_is_used() {
    let app = backend::http("late");
    let control = Control::start(&mesh(&[], "peak-ewma"), &[]);
    let web = control.sidecar("web", &[("WEFT_QUEUE_TIMEOUT", "300ms")]);
    let proxy = format!("http://{}", web.outbound);
    let start = Instant::now();
    let (code, body, _) = curl(&["-i", "-x", &proxy, "http://api:80/"]);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("weft-error: no-endpoints"), "{body}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "a request with no endpoints hung: {:?}",
        start.elapsed()
    );
    assert_eq!(
        web.metric(
            r#"weft_requests_total{direction="outbound",protocol="http1",status="503",cause="no-endpoints"}"#
        ),
        1.0
    );

    // With a longer queue timeout, an endpoint that appears while the request waits serves it.
    let patient = control.sidecar("web", &[("WEFT_QUEUE_TIMEOUT", "5s")]);
    let proxy = format!("http://{}", patient.outbound);
    let waiting = std::thread::spawn(move || curl(&["-x", &proxy, "http://api:80/"]));
    // The request is in: its connection accepted and the service known to have no endpoints.
    patient.wait_metric(r#"weft_tcp_accepted_total{direction="outbound"}"#, 1.0);
    patient.wait_generation("discovery", control.generation());
    control.rewrite(&mesh(&[(app.addr, 1)], "peak-ewma"));
    let (code, body, err) = waiting.join().unwrap();
    assert_eq!(code, 200, "{body}{err}");
    assert!(body.contains("\"backend\":\"late\""), "{body}");
}

#[test]
fn a_removed_endpoint_finishes_its_requests_in_flight() {
    let (old, new) = (backend::http("old"), backend::http("new"));
    let control = Control::start(&mesh(&[(old.addr, 1)], "peak-ewma"), &[]);
    let web = control.sidecar("web", &[]);
    let proxy = format!("http://{}", web.outbound);
    let in_flight = {
        let proxy = proxy.clone();
        std::thread::spawn(move || curl(&["-x", &proxy, "http://api:80/?delay_ms=1500"]))
    };
    weft_e2e::eventually(Duration::from_secs(5), "the request at the old endpoint", || {
        (old.hits() >= 1).then_some(())
    });
    let generation = control.apply(&mesh(&[(new.addr, 1)], "peak-ewma"));
    web.wait_generation("discovery", generation);
    // New requests go to the new endpoint while the old one still works on its request.
    for _ in 0..3 {
        let (code, body, _) = curl(&["-x", &proxy, "http://api:80/"]);
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("\"backend\":\"new\""), "{body}");
    }
    let (code, body, err) = in_flight.join().unwrap();
    assert_eq!(code, 200, "the in-flight request was cut: {body}{err}");
    assert!(body.contains("\"backend\":\"old\""), "{body}");
}

#[test]
fn a_killed_endpoint_is_ejected_without_client_errors_and_restored_when_back() {
    let (a, c) = (backend::http("a"), backend::http("c"));
    let b = backend::http("b");
    let b_addr = b.addr;
    let api = Service::new("api", 80)
        .with("outlierDetection: {consecutiveFailures: 3, ejectionTime: 1s}")
        .endpoint(a.addr)
        .endpoint(b_addr)
        .endpoint(c.addr);
    let mesh = MeshFile::new()
        .workload("web")
        .service(api)
        .route("api", "api", "[{retry: {attempts: 3, statuses: [502, 503], backoff: 1ms}}]")
        .yaml();
    let control = Control::start(&mesh, &[]);
    let web = control.sidecar("web", &[]);
    let proxy = format!("http://{}", web.outbound);
    // Steady load: batches of sequential GETs, every status recorded.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (proxy, stop) = (proxy.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let mut args = vec!["-x", proxy.as_str(), "-w", "\nstatus=%{http_code}\n"];
                args.extend(["http://api:80/"; 20]);
                let (_, out, _) = curl(&args);
                for s in out.lines().filter_map(|l| l.strip_prefix("status=")) {
                    if s == "200" {
                        ok += 1
                    } else {
                        failed.push(s.to_string())
                    }
                }
            }
            (ok, failed)
        })
    };
    // Load reaches every endpoint before one of them dies.
    weft_e2e::eventually(Duration::from_secs(5), "load on b", || (b.hits() >= 20).then_some(()));
    drop(b); // endpoint b dies: its port refuses connections
    let ejected = r#"weft_outlier_ejections_total{service="api:80"}"#;
    weft_e2e::eventually(Duration::from_secs(5), "b ejected", || (web.metric(ejected) >= 1.0).then_some(()));
    let b = backend::http_on("b", b_addr); // back where it was
    let restored = r#"weft_outlier_restored_total{service="api:80"}"#;
    weft_e2e::eventually(Duration::from_secs(10), "b restored and serving", || {
        (web.metric(restored) >= 1.0 && b.hits() >= 5).then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed) = load.join().unwrap();
    eprintln!(
        "endpoint killed under load: {ok} ok, {} failed; ejections {}, restorations {}, retries {}",
        failed.len(),
        web.metric(ejected),
        web.metric(restored),
        web.metric(r#"weft_retries_total{route="api/0"}"#)
    );
    assert!(failed.is_empty(), "clients saw errors: {failed:?}");
    assert!(ok > 100);
}

#[test]
fn a_request_that_never_reached_its_endpoint_goes_to_another_whatever_its_method() {
    // One endpoint refuses connections (a pod gone while still listed); no route, no
    // retry policy, and POSTs, which a retry policy would not repeat.
    let live = backend::http("live");
    let gone = weft_e2e::free_addr();
    let control = Control::start(&mesh(&[(live.addr, 1), (gone, 1)], "round-robin"), &[]);
    let web = control.sidecar("web", &[]);
    let counts = weft_e2e::tally(web.outbound, 2, 40, "http://api:80/", &["-X", "POST", "-d", "order=1"]);
    assert_eq!(counts.get("status 200"), Some(&40), "{counts:?}");
    assert_eq!(counts.get("live"), Some(&40), "{counts:?}");
    let rerouted = web.metric(r#"weft_rerouted_total{service="api:80"}"#);
    eprintln!("40 POSTs over a live and a refusing endpoint: all 200, {rerouted} rerouted");
    assert!(rerouted >= 1.0, "{}", web.metrics());
    // A request that did reach an endpoint is not sent again (that takes a route's retry).
    assert_eq!(live.hits(), 40);
}

#[test]
fn a_peer_proxy_whose_app_is_down_costs_no_bodyless_request() {
    // Two meshed endpoints; one sidecar is up but its app is gone (crashed, restarting):
    // the sidecar answers `upstream-refused`, the request reached no app, and the client
    // sidecar sends it to the other endpoint. A POST with a body is not sent twice.
    let live = backend::http("live");
    let (live_in, down_in) = (weft_e2e::free_addr(), weft_e2e::free_addr());
    let dead_app = weft_e2e::free_addr();
    let api = Service::new("api", 80).meshed(live_in, "api").meshed(down_in, "api");
    let mesh = MeshFile::new().workload("web").workload("api").service(api.with("balancer: round-robin"));
    let control = Control::start(&mesh.yaml(), &[]);
    let _live_side = control.app_sidecar("api", live.addr, live_in);
    let _down_side = control.app_sidecar("api", dead_app, down_in);
    let web = control.sidecar("web", &[]);
    // Fewer POSTs than the failures that eject an endpoint: round-robin sends half of them
    // to the one whose app is down, and they fail there.
    let posts = weft_e2e::tally(web.outbound, 1, 4, "http://api:80/", &["-X", "POST", "-d", "order=1"]);
    assert_eq!(posts.get("status 502"), Some(&2), "{posts:?}");
    assert_eq!(live.hits(), 2);
    let counts = weft_e2e::tally(web.outbound, 2, 20, "http://api:80/", &[]);
    assert_eq!(counts.get("status 200"), Some(&20), "{counts:?}");
    let rerouted = web.metric(r#"weft_rerouted_total{service="api:80"}"#);
    eprintln!("20 GETs over a live endpoint and one whose app is down: all 200, {rerouted} rerouted");
    assert!(rerouted >= 1.0, "{}", web.metrics());
}
