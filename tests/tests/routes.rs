//! Route rules from the mesh file, applied by the outbound proxy with the real control
//! plane: weighted splits and header matches, retries that hide a flaky backend for
//! idempotent requests only and stay within their budget, bodies that cannot be
//! replayed, request timeouts and fault injection.

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

/// Services `api` (its own endpoint: `base`), `api-v1`, `api-v2`, and the route rules
/// of `api` in YAML (indented for `rules:`).
fn mesh(base: SocketAddr, v1: SocketAddr, v2: SocketAddr, rules: &str) -> String {
    MeshFile::new()
        .workload("web")
        .service(Service::new("api", 80).endpoint(base))
        .service(Service::new("api-v1", 80).endpoint(v1))
        .service(Service::new("api-v2", 80).endpoint(v2))
        .route("api", "api", rules)
        .yaml()
}

fn send(web: &Proxy, clients: usize, n: usize, url: &str, extra: &[&str]) -> BTreeMap<String, usize> {
    weft_e2e::tally(web.outbound, clients, n, url, extra)
}

#[test]
fn a_90_10_split_lands_near_90_10_and_a_header_match_overrides_it() {
    let (base, v1, v2) = (backend::http("base"), backend::http("v1"), backend::http("v2"));
    let rules = "      - matches: [{headers: {x-canary: \"1\"}}]
        backends: [{service: api-v2}]
      - matches: [{path: {prefix: /}}]
        backends: [{service: api-v1, weight: 90}, {service: api-v2, weight: 10}]
";
    let control = Control::start(&mesh(base.addr, v1.addr, v2.addr, rules), &[]);
    let web = control.sidecar("web", &[]);
    let split = send(&web, 4, 2000, "http://api:80/", &[]);
    let share = split["v2"] as f64 / 2000.0;
    eprintln!("90/10 split over 2,000 requests: {split:?} (v2 {share:.3})");
    assert_eq!(split["v1"] + split["v2"], 2000, "{split:?}");
    assert!((0.07..=0.13).contains(&share), "{split:?}");
    let canary = send(&web, 1, 50, "http://api:80/", &["-H", "x-canary: 1"]);
    assert_eq!(canary.get("v2"), Some(&50), "{canary:?}");
    assert_eq!(base.hits(), 0, "no request should reach the parent's own endpoint");
}

#[test]
fn retries_hide_a_flaky_backend_for_get_but_not_for_post() {
    let flaky = backend::http_flaky("flaky", 30);
    let (v1, v2) = (backend::http("v1"), backend::http("v2"));
    let rules =
        |extra: &str| format!("      - retry: {{attempts: 3, statuses: [503], backoff: 5ms{extra}}}\n");
    let control = Control::start(&mesh(flaky.addr, v1.addr, v2.addr, &rules("")), &[]);
    let web = control.sidecar("web", &[]);
    let gets = send(&web, 1, 200, "http://api:80/", &[]);
    assert_eq!(gets.get("status 200"), Some(&200), "a GET failed despite retries: {gets:?}");
    let retries = web.metric(r#"weft_retries_total{route="api/0"}"#);
    eprintln!(
        "200 GETs over a 30 % flaky backend: all 200, {retries} retries, {} upstream attempts",
        flaky.hits()
    );
    assert!((40.0..=120.0).contains(&retries), "{retries}");
    assert_eq!(flaky.hits() as f64, 200.0 + retries);

    // The response says how many attempts it took.
    let (_, head, _) = curl(&[
        "-s",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-x",
        &format!("http://{}", web.outbound),
        "http://api:80/",
    ]);
    assert!(head.to_ascii_lowercase().contains("weft-attempts: "), "{head}");

    // POST is not idempotent: its 503s reach the client.
    let posts = send(&web, 1, 100, "http://api:80/", &["-d", "x=1"]);
    assert!((20..=40).contains(posts.get("status 503").unwrap_or(&0)), "{posts:?}");
    // Unless the rule says so.
    let generation = control.apply(&mesh(flaky.addr, v1.addr, v2.addr, &rules(", nonIdempotent: true")));
    web.wait_generation("routes", generation);
    let posts = send(&web, 1, 100, "http://api:80/", &["-d", "x=1"]);
    assert_eq!(posts.get("status 200"), Some(&100), "{posts:?}");
}

#[test]
fn bodies_that_cannot_be_replayed_are_not_retried() {
    let flaky = backend::http("always-503");
    let (v1, v2) = (backend::http("v1"), backend::http("v2"));
    let rules =
        "      - retry: {attempts: 3, statuses: [503], nonIdempotent: true, maxBodyBytes: 16, backoff: 1ms}\n";
    let control = Control::start(&mesh(flaky.addr, v1.addr, v2.addr, rules), &[]);
    let web = control.sidecar("web", &[]);
    let proxy = format!("http://{}", web.outbound);
    let url = "http://api:80/?status=503";
    // Small: replayed, three attempts.
    curl(&["-x", &proxy, "-d", "small", url]);
    assert_eq!(flaky.hits(), 3);
    // Larger than maxBodyBytes: one attempt.
    curl(&["-x", &proxy, "-d", &"x".repeat(100), url]);
    assert_eq!(flaky.hits(), 4);
    // A stream (chunked, no length) larger than maxBodyBytes: one attempt.
    curl(&["-x", &proxy, "-H", "Transfer-Encoding: chunked", "-d", &"y".repeat(100), url]);
    assert_eq!(flaky.hits(), 5);
    // A stream that ended within the limit was recorded as it went: replayed.
    curl(&["-x", &proxy, "-H", "Transfer-Encoding: chunked", "-d", "tiny", url]);
    assert_eq!(flaky.hits(), 8);
}

#[test]
fn the_retry_budget_caps_extra_load_during_an_outage() {
    let down = backend::http("down");
    let (v1, v2) = (backend::http("v1"), backend::http("v2"));
    let rules = "      - retry: {attempts: 5, statuses: [503], backoff: 1ms}\n";
    let control = Control::start(&mesh(down.addr, v1.addr, v2.addr, rules), &[]);
    let web = control.sidecar("web", &[]);
    let out = send(&web, 4, 400, "http://api:80/?status=503", &[]);
    assert_eq!(out.get("status 503"), Some(&400), "{out:?}");
    let attempts = down.hits();
    let exhausted = web.metric(r#"weft_retry_budget_exhausted_total{route="api/0"}"#);
    eprintln!("outage: 400 requests, {attempts} upstream attempts (5 each would be 2,000), budget exhausted {exhausted} times");
    // 20 % of requests plus the 10-per-second floor over the budget's 10 s window.
    assert!(attempts <= 400 + 80 + 100 + 20, "{attempts}");
    assert!(exhausted > 0.0);
}

#[test]
fn request_timeouts_and_fault_injection() {
    let (base, v1, v2) = (backend::http("base"), backend::http("v1"), backend::http("v2"));
    let rules = "      - matches: [{path: {prefix: /slow}}]
        timeout: 300ms
      - matches: [{path: {prefix: /teapot}}]
        fault: {abort: {percent: 100, status: 418}}
      - matches: [{path: {prefix: /delayed}}]
        fault: {delay: {percent: 100, duration: 400ms}}
      - matches: [{path: {prefix: /headers}}]
        requestHeaders: {set: {x-route: one}, add: {x-tag: added}, remove: [x-secret]}
";
    let control = Control::start(&mesh(base.addr, v1.addr, v2.addr, rules), &[]);
    let web = control.sidecar("web", &[]);
    let proxy = format!("http://{}", web.outbound);
    let (code, body, _) = curl(&["-i", "-x", &proxy, "http://api:80/slow?delay_ms=2000"]);
    assert_eq!(code, 504, "{body}");
    assert!(body.contains("weft-error: timeout"), "{body}");
    let (code, body, _) = curl(&["-i", "-x", &proxy, "http://api:80/teapot"]);
    assert_eq!(code, 418, "{body}");
    assert!(body.contains("weft-error: fault-injected"), "{body}");
    assert_eq!(base.hits(), 1, "only the timed-out request reached the backend");
    let start = Instant::now();
    let (code, _, _) = curl(&["-x", &proxy, "http://api:80/delayed"]);
    assert_eq!(code, 200);
    assert!(start.elapsed() >= Duration::from_millis(400), "the injected delay was not applied");
    let series =
        r#"weft_requests_total{direction="outbound",protocol="http1",status="418",cause="fault-injected"}"#;
    assert_eq!(web.metric(series), 1.0);
    // Header changes: set replaces, add appends, remove removes.
    let args = ["-x", &proxy, "-H", "x-route: client", "-H", "x-tag: mine", "-H", "x-secret: s"];
    let (code, body, _) = curl(&[&args[..], &["http://api:80/headers"]].concat());
    assert_eq!(code, 200, "{body}");
    let seen = base.last();
    assert_eq!(seen.headers.get("x-route").map(String::as_str), Some("one"), "{:?}", seen.headers);
    assert_eq!(seen.headers.get("x-tag").map(String::as_str), Some("mine, added"), "{:?}", seen.headers);
    assert!(!seen.headers.contains_key("x-secret"), "{:?}", seen.headers);
}

#[test]
fn a_deadline_shrinks_hop_by_hop() {
    let app = backend::http("api-app");
    let api_inbound = weft_e2e::free_addr();
    let mesh = MeshFile::new()
        .workload("web")
        .workload("api")
        .service(Service::new("api", 80).meshed(api_inbound, "api"))
        .yaml();
    let control = Control::start(&mesh, &[]);
    let _api = control.app_sidecar("api", app.addr, api_inbound);
    let web = control.sidecar("web", &[]);
    let proxy = format!("http://{}", web.outbound);
    // Client -> web's outbound -> mTLS -> api's inbound -> app: the app sees what is left.
    let (code, body, _) =
        curl(&["-x", &proxy, "-H", "weft-timeout-ms: 300", "-H", "grpc-timeout: 300m", "http://api:80/"]);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let left: u64 = v["headers"]["weft-timeout-ms"].as_str().unwrap().parse().unwrap();
    let grpc = v["headers"]["grpc-timeout"].as_str().unwrap();
    eprintln!("a 300 ms deadline arrived at the app as weft-timeout-ms {left}, grpc-timeout {grpc}");
    assert!(left < 300 && left > 100, "{left}");
    assert!(grpc != "300m", "{grpc}");
    // An app slower than the deadline: the client gets 504 at the deadline, not later.
    let start = Instant::now();
    let (code, body, _) =
        curl(&["-i", "-x", &proxy, "-H", "weft-timeout-ms: 300", "http://api:80/?delay_ms=2000"]);
    assert_eq!(code, 504, "{body}");
    assert!(body.contains("weft-error: timeout"), "{body}");
    assert!(start.elapsed() < Duration::from_millis(1500), "{:?}", start.elapsed());
}

#[test]
fn grpc_rules_match_the_service_and_retry_listed_codes() {
    // The parent's own endpoint is dead: only a matching gRPC rule reaches the server.
    let port = weft_e2e::free_port();
    let _server = weft_e2e::PyServer::start("grpc_echo.py", port);
    let rules = "[{matches: [{grpc: {service: weft.test.Echo}}], backends: [{service: echo-v2}], \
                 retry: {attempts: 3, grpcCodes: [failed-precondition], nonIdempotent: true, backoff: 1ms}}]";
    let mesh = MeshFile::new()
        .workload("web")
        .service(Service::new("echo", 80).endpoint("127.0.0.1:1"))
        .service(Service::new("echo-v2", 80).endpoint(format!("127.0.0.1:{port}")))
        .route("echo", "echo", rules)
        .yaml();
    let control = Control::start(&mesh, &[]);
    let web = control.sidecar("web", &[]);
    // grpcio's unary, streaming and bidi calls, and a call that fails with FAILED_PRECONDITION.
    let out = weft_e2e::run(
        std::process::Command::new(weft_e2e::python()).arg(weft_e2e::py_script("grpc_echo.py")).args([
            "client",
            &web.outbound.to_string(),
            "echo:80",
        ]),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ok = r#"weft_requests_total{direction="outbound",protocol="h2",status="200",cause=""}"#;
    assert_eq!(web.metric(ok), 4.0, "{}", web.metrics());
    // Only the failing call was retried (twice): its status is in the response head.
    assert_eq!(web.metric(r#"weft_retries_total{route="echo/0"}"#), 2.0, "{}", web.metrics());
}

#[test]
fn redirects_are_answered_by_the_proxy_and_rewrites_change_what_the_upstream_sees() {
    let (base, v1, v2) = (backend::http("base"), backend::http("v1"), backend::http("v2"));
    let rules = "      - matches: [{path: {prefix: /old}}]
        redirect: {scheme: https, path: {prefix: /new}, status: 301}
      - matches: [{path: {prefix: /api}}]
        rewrite: {hostname: internal.example, path: {prefix: /v2}}
        responseHeaders: {set: {x-rewritten: \"yes\"}}
        backends: [{service: api-v1}]
";
    let control = Control::start(&mesh(base.addr, v1.addr, v2.addr, rules), &[]);
    let web = control.sidecar("web", &[]);
    let proxy = format!("http://{}", web.outbound);
    let (code, _, head) =
        curl(&["-x", &proxy, "-D", "/dev/stderr", "-o", "/dev/null", "http://api:80/old/page?q=1"]);
    assert_eq!(code, 301, "{head}");
    assert!(head.to_ascii_lowercase().contains("location: https://api/new/page?q=1"), "{head}");
    assert_eq!(base.hits() + v1.hits() + v2.hits(), 0, "a redirect must not reach any upstream");
    let (code, body, head) = curl(&["-x", &proxy, "-D", "/dev/stderr", "http://api:80/api/items?id=3"]);
    assert_eq!(code, 200, "{body}");
    let seen = v1.last();
    assert_eq!(seen.path, "/v2/items", "{seen:?}");
    assert_eq!(seen.headers.get("host").map(String::as_str), Some("internal.example"), "{seen:?}");
    assert!(head.to_ascii_lowercase().contains("x-rewritten: yes"), "{head}");
}

#[test]
fn regular_expressions_match_whole_paths_headers_and_query_values() {
    let (base, v1, v2) = (backend::http("base"), backend::http("v1"), backend::http("v2"));
    let rules = "      - matches: [{path: {regex: \"/users/[0-9]+\"}}]
        backends: [{service: api-v1}]
      - matches: [{headerRegex: {x-tenant: \"team-(a|b)\"}}, {queryRegex: {v: \"[0-9]{2}\"}}]
        backends: [{service: api-v2}]
";
    let control = Control::start(&mesh(base.addr, v1.addr, v2.addr, rules), &[]);
    let web = control.sidecar("web", &[]);
    let one = |path: &str, extra: &[&str]| {
        // The backend that answered (the tally also counts statuses).
        let got = send(&web, 1, 1, &format!("http://api:80{path}"), extra);
        got.into_keys().find(|k| !k.starts_with("status ")).unwrap_or_default()
    };
    assert_eq!(one("/users/42", &[]), "v1");
    // The whole path: neither a longer one nor one with the digits elsewhere.
    assert_eq!(one("/users/42/orders", &[]), "base");
    assert_eq!(one("/x/users/42", &[]), "base");
    assert_eq!(one("/any", &["-H", "x-tenant: team-b"]), "v2");
    assert_eq!(one("/any", &["-H", "x-tenant: team-bb"]), "base");
    assert_eq!(one("/any?a=1&v=42", &[]), "v2");
    assert_eq!(one("/any?v=420", &[]), "base");

    // A pattern that does not compile is refused with its field named; the last good
    // rules keep applying.
    let bad = mesh(base.addr, v1.addr, v2.addr, "      - matches: [{path: {regex: \"/users/(\"}}]\n");
    control.rewrite(&bad);
    weft_e2e::eventually(Duration::from_secs(10), "the bad regex refused", || {
        control.logs().contains("path.regex").then_some(())
    });
    assert_eq!(one("/users/7", &[]), "v1");
}
