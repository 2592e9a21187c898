//! `weft control --source kubernetes` end to end. No Kubernetes API server can be
//! installed on these machines, so a fake one stands in for it (tests/harness/kube.rs: a
//! loopback HTTP server that speaks list, watch with resourceVersions, bookmarks and 410
//! Gone, status merge patches, TokenReview and SelfSubjectAccessReview as the real one
//! does). Everything else
//! is real: the `weft` and `weft-proxy` binaries, their sockets, mTLS and curl.

use std::{net::SocketAddr, time::Duration};

use serde_json::{json, Value};
use weft_e2e::{
    backend::{self, Backend},
    control::Control,
    eventually, http_get,
    kube::FakeApi,
    metric_value, Proxy,
};

const WEB_TOKEN: &str = "web-projected-token";

fn service(name: &str, cluster_ip: &str, port: u16) -> Value {
    json!({"kind": "Service", "metadata": {"name": name, "namespace": "default"},
           "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ports": [{"name": "http", "port": port}]}})
}

/// One slice per backend: a slice has one port per name, and local backends differ by port.
fn slice(name: &str, service: &str, backend: SocketAddr, ready: bool) -> Value {
    slice_with(name, service, backend, json!({"ready": ready}))
}

fn slice_with(name: &str, service: &str, backend: SocketAddr, conditions: Value) -> Value {
    json!({"kind": "EndpointSlice",
           "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4",
           "ports": [{"name": "http", "port": backend.port()}],
           "endpoints": [{"addresses": [backend.ip().to_string()], "conditions": conditions}]})
}

/// An API with the CA's Secret and the web workload's token.
fn api() -> FakeApi {
    let api = FakeApi::start();
    api.identity_secret();
    api.token(WEB_TOKEN, "default", "web", Some("web-0"));
    api
}

fn client(control: &Control) -> Proxy {
    let grpc = control.grpc.to_string();
    Proxy::start(&[
        ("WEFT_CONTROL_ADDR", grpc.as_str()),
        ("WEFT_IDENTITY", "spiffe://cluster.local/ns/default/sa/web"),
        ("WEFT_TOKEN", WEB_TOKEN),
    ])
}

/// `curl -x` through the client proxy; the backend's name, or the status.
fn get(proxy: &Proxy, url: &str) -> Result<String, u16> {
    let rsp = weft_e2e::raw_request(
        proxy.outbound,
        &format!("GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        Duration::from_secs(5),
    )
    .unwrap_or_default();
    let status = weft_e2e::parse_status(&rsp).unwrap_or(0);
    let backend = rsp.lines().find_map(|l| l.strip_prefix("x-backend: ")).map(str::to_string);
    match (status, backend) {
        (200, Some(b)) => Ok(b),
        _ => Err(status),
    }
}

fn control_metric(control: &Control, series: &str) -> f64 {
    metric_value(&http_get(control.admin, "/metrics").map(|(_, b)| b).unwrap_or_default(), series)
}

fn two_backends() -> (Backend, Backend) {
    let a = backend::http_on("a", "127.0.0.1:0".parse().unwrap());
    let b = backend::http_on("b", "127.0.0.2:0".parse().unwrap());
    (a, b)
}

#[test]
fn services_and_endpoint_slices_become_discovery_and_follow_changes() {
    let api = api();
    let (a, b) = two_backends();
    api.apply(service("words", "10.96.0.10", 8080));
    api.apply(slice("words-a", "words", a.addr, true));
    api.apply(slice("words-b", "words", b.addr, true));
    api.apply(slice("words-c", "words", "127.0.0.3:1".parse().unwrap(), false));
    let control = Control::kubernetes(&api, &[]);
    assert!(control_metric(&control, r#"weft_control_kubernetes_objects{kind="EndpointSlice"}"#) >= 3.0);
    let proxy = client(&control);
    // Balanced over the two ready endpoints; never the not-ready one (it would refuse).
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..40 {
        *seen.entry(get(&proxy, "http://words.default.svc.cluster.local:8080/").unwrap()).or_insert(0) += 1;
    }
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["a", "b"], "{seen:?}");
    // `name:port` from the client's own namespace.
    assert!(get(&proxy, "http://words:8080/").is_ok());

    // Scaling down: b's endpoint goes; traffic moves within the generation's arrival.
    api.delete("EndpointSlice", "default", "words-b");
    let g = eventually(Duration::from_secs(5), "a new generation", || {
        Some(control.generation()).filter(|g| *g > 1)
    });
    proxy.wait_generation("discovery", g);
    for _ in 0..20 {
        assert_eq!(get(&proxy, "http://words.default:8080/"), Ok("a".to_string()));
    }

    // 410 Gone: every watch relists; the state proxies have is kept and requests succeed.
    let restarts =
        control_metric(&control, r#"weft_control_kubernetes_watch_restarts_total{kind="EndpointSlice"}"#);
    api.expire_watches();
    eventually(Duration::from_secs(10), "the watches to relist", || {
        let now =
            control_metric(&control, r#"weft_control_kubernetes_watch_restarts_total{kind="EndpointSlice"}"#);
        (now > restarts).then_some(())
    });
    for _ in 0..20 {
        assert_eq!(get(&proxy, "http://words.default:8080/"), Ok("a".to_string()));
    }
    // And changes after the relist still arrive: the endpoints move from a to b.
    api.apply(slice("words-b", "words", b.addr, true));
    api.delete("EndpointSlice", "default", "words-a");
    eventually(Duration::from_secs(10), "traffic to move to b after the relist", || {
        (0..10).all(|_| get(&proxy, "http://words.default:8080/") == Ok("b".into())).then_some(())
    });

    // The API server restarts: nothing is dropped; watches resume and follow changes.
    let mut api = api;
    api.restart();
    for _ in 0..20 {
        assert_eq!(get(&proxy, "http://words.default:8080/"), Ok("b".to_string()));
    }
    api.apply(slice("words-a", "words", a.addr, true));
    api.delete("EndpointSlice", "default", "words-b");
    eventually(Duration::from_secs(20), "traffic to move to a after the API server's restart", || {
        (0..10).all(|_| get(&proxy, "http://words.default:8080/") == Ok("a".into())).then_some(())
    });
    assert_eq!(http_get(control.admin, "/ready").map(|(s, _)| s), Some(200));
}

#[test]
fn the_control_plane_refuses_to_start_without_its_root_or_token_review_rights() {
    let api = FakeApi::start();
    let kubeconfig = api.kubeconfig().display().to_string();
    let args: Vec<String> = [
        "--source",
        "kubernetes",
        "--namespace",
        "weft",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let exits = |expect: &str| {
        let (mut child, log) = Control::launch(&args, &[("KUBECONFIG", &kubeconfig)]);
        let status =
            eventually(Duration::from_secs(10), "weft control to exit", || child.try_wait().unwrap());
        let text = std::fs::read_to_string(log).unwrap();
        assert!(!status.success(), "{text}");
        assert!(text.contains(expect), "expected {expect:?} in:\n{text}");
    };
    exits("Secret weft/weft-identity not found");
    api.apply(json!({"kind": "Secret", "metadata": {"name": "weft-identity", "namespace": "weft"}, "stringData": {"tls.crt": "x"}}));
    exits("has no tls.key");
    api.identity_secret();
    api.allow_token_reviews(false);
    exits("tokenreviews.authentication.k8s.io");
}

#[test]
fn token_review_decides_who_gets_a_certificate_and_answers() {
    let api = api();
    // Without the Gateway API's CRDs the control plane still starts (routes are off).
    api.without("httproutes");
    api.without("grpcroutes");
    let control = Control::kubernetes(&api, &[]);
    assert!(control.logs().contains("not served by the API"), "{}", control.logs());
    let good = client(&control);
    assert!(good.metric(r#"weft_identity_certify_total{result="ok"}"#) >= 1.0);
    // A token TokenReview does not authenticate: refused, never ready.
    let grpc = control.grpc.to_string();
    let bad = Proxy::spawn(&[
        ("WEFT_CONTROL_ADDR", grpc.as_str()),
        ("WEFT_IDENTITY", "spiffe://cluster.local/ns/default/sa/web"),
        ("WEFT_TOKEN", "forged-token"),
    ]);
    bad.wait_metric_at_least(r#"weft_identity_certify_total{result="error"}"#, 1.0);
    assert_eq!(http_get(bad.admin, "/ready").map(|(s, _)| s), Some(503));
    assert!(bad.logs().contains("token refused"), "{}", bad.logs());
    // A genuine token for another service account cannot get web's identity.
    api.token("payments-token", "default", "payments", None);
    let thief = Proxy::spawn(&[
        ("WEFT_CONTROL_ADDR", grpc.as_str()),
        ("WEFT_IDENTITY", "spiffe://cluster.local/ns/default/sa/web"),
        ("WEFT_TOKEN", "payments-token"),
    ]);
    thief.wait_metric_at_least(r#"weft_identity_certify_total{result="error"}"#, 1.0);
    assert_eq!(http_get(thief.admin, "/ready").map(|(s, _)| s), Some(503));
    assert!(api.requests("tokenreviews") >= 3);
}

#[test]
fn a_rotated_token_file_is_read_again() {
    let api = api();
    let control = Control::kubernetes(&api, &["--cert-ttl-secs", "3"]);
    let dir = std::env::temp_dir().join(format!("weft-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, WEB_TOKEN).unwrap();
    let grpc = control.grpc.to_string();
    let proxy = Proxy::start(&[
        ("WEFT_CONTROL_ADDR", grpc.as_str()),
        ("WEFT_IDENTITY", "spiffe://cluster.local/ns/default/sa/web"),
        ("WEFT_TOKEN_FILE", file.to_str().unwrap()),
    ]);
    // The kubelet writes a new token and the old one stops being accepted; renewals
    // (at ~70 % of 3 s) go on with the new one.
    api.token("web-rotated-token", "default", "web", Some("web-0"));
    std::fs::write(&file, "web-rotated-token").unwrap();
    api.revoke(WEB_TOKEN);
    let ok = r#"weft_identity_certify_total{result="ok"}"#;
    let before = proxy.metric(ok);
    proxy.wait_metric_at_least(ok, before + 2.0);
    assert_eq!(proxy.metric(r#"weft_identity_certify_total{result="error"}"#), 0.0, "{}", proxy.logs());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_terminating_endpoint_finishes_its_requests_and_gets_no_new_ones() {
    let api = api();
    let (a, b) = two_backends();
    api.apply(service("words", "10.96.0.10", 8080));
    api.apply(slice("words-a", "words", a.addr, true));
    // Round robin: were the terminating endpoint still a candidate, every other request
    // would go to it (peak-EWMA would avoid it anyway, for its request in flight).
    api.apply(json!({"kind": "TrafficPolicy", "metadata": {"name": "words", "namespace": "default"},
                     "spec": {"targetRef": {"name": "words"}, "balancer": "round-robin"}}));
    let control = Control::kubernetes(&api, &[]);
    let proxy = client(&control);
    assert_eq!(get(&proxy, "http://words.default:8080/"), Ok("a".to_string()));
    std::thread::scope(|scope| {
        // A slow request in flight on a when a starts terminating (a rollout) and b is ready.
        let slow = scope.spawn(|| get(&proxy, "http://words.default:8080/?delay_ms=1500"));
        eventually(Duration::from_secs(5), "the slow request at a", || (a.hits() >= 2).then_some(()));
        let before = control.generation();
        let terminating = json!({"ready": false, "serving": true, "terminating": true});
        api.apply(slice_with("words-a", "words", a.addr, terminating));
        api.apply(slice("words-b", "words", b.addr, true));
        let g = eventually(Duration::from_secs(5), "both changes published", || {
            let g = control.generation();
            (g > before && get(&proxy, "http://words.default:8080/") == Ok("b".into())).then_some(g)
        });
        proxy.wait_generation("discovery", g);
        // No new request goes to the terminating endpoint; the one in flight finishes.
        for _ in 0..20 {
            assert_eq!(get(&proxy, "http://words.default:8080/"), Ok("b".to_string()));
        }
        assert_eq!(slow.join().unwrap(), Ok("a".to_string()));
    });
}

#[test]
fn a_pod_the_control_plane_has_not_seen_gets_no_permissive_policy() {
    // A strict policy selects app=words; the pod's proxy starts before the Pod reaches
    // the control plane's watch (or with a token bound to no pod).
    let api = api();
    api.token("words-token", "default", "words", Some("words-0"));
    let app = backend::http("words");
    let port = app.addr.port();
    api.apply(json!({"kind": "InboundPolicy", "metadata": {"name": "words", "namespace": "default"},
                     "spec": {"podSelector": {"matchLabels": {"app": "words"}}, "port": port, "mode": "strict"}}));
    let control = Control::kubernetes(&api, &[]);
    let grpc = control.grpc.to_string();
    let (app_addr, ports) = (app.addr.to_string(), port.to_string());
    let proxy = Proxy::spawn(&[
        ("WEFT_CONTROL_ADDR", grpc.as_str()),
        ("WEFT_IDENTITY", "spiffe://cluster.local/ns/default/sa/words"),
        ("WEFT_TOKEN", "words-token"),
        ("WEFT_APP_ADDR", app_addr.as_str()),
        ("WEFT_INBOUND_PORTS", ports.as_str()),
    ]);
    // Certified, but no policy answer for its port: not ready, and plaintext is refused
    // (the default before an answer is deny), never let through as "permissive".
    proxy.wait_metric_at_least(r#"weft_identity_certify_total{result="ok"}"#, 1.0);
    assert_eq!(http_get(proxy.admin, "/ready").map(|(s, _)| s), Some(503));
    let inbound = format!("http://{}/", proxy.inbound);
    let (code, _, _) = weft_e2e::curl(&[&inbound]);
    assert_ne!(code, 200, "plaintext reached the app before the pod's policy was known");
    assert_eq!(app.hits(), 0);
    // The Pod arrives: the strict policy is answered, and the proxy becomes ready.
    api.apply(json!({"kind": "Pod", "metadata": {"name": "words-0", "namespace": "default", "labels": {"app": "words"}},
                     "spec": {"serviceAccountName": "words", "containers": [{"name": "app"}, {"name": "weft-proxy"}]},
                     "status": {"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}}));
    eventually(Duration::from_secs(10), "the proxy to become ready", || {
        (http_get(proxy.admin, "/ready").map(|(s, _)| s) == Some(200)).then_some(())
    });
    let (code, _, _) = weft_e2e::curl(&[&inbound]);
    assert_ne!(code, 200, "strict: plaintext is still refused");
    assert_eq!(app.hits(), 0);
}

#[test]
fn a_rollout_costs_no_request_at_200_per_second() {
    // Two pods behind words; one goes away the hard way: its app stops while it is still
    // listed (the kubelet killed it before the endpoints caught up), then its endpoint
    // turns terminating, then the slice drops it. A client at 200 req/s, no route, no
    // retry policy: every request must succeed.
    let api = api();
    let (a, b) = two_backends();
    api.apply(service("words", "10.96.0.10", 8080));
    api.apply(slice("words-a", "words", a.addr, true));
    api.apply(slice("words-b", "words", b.addr, true));
    let control = Control::kubernetes(&api, &[]);
    let proxy = client(&control);
    let load = std::process::Command::new(weft_e2e::bin("weft-load"))
        .args(["--addr", &proxy.outbound.to_string(), "--host", "words.default:8080", "--rate", "200"])
        .args(["--seconds", "4", "--warmup", "0", "--connections", "8"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(5), "load on both pods", || {
        (a.hits() > 20 && b.hits() > 20).then_some(())
    });
    let a_addr = a.addr;
    drop(a);
    eventually(Duration::from_secs(5), "a refusing connections", || {
        std::net::TcpStream::connect(a_addr).is_err().then_some(())
    });
    let terminating = json!({"ready": false, "serving": false, "terminating": true});
    api.apply(slice_with("words-a", "words", a_addr, terminating));
    let g = eventually(Duration::from_secs(5), "the change published", || {
        Some(control.generation()).filter(|g| *g > 1)
    });
    proxy.wait_generation("discovery", g);
    api.delete("EndpointSlice", "default", "words-a");
    let out = load.wait_with_output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("rollout under load: {report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert!(report["ok"].as_u64().unwrap() >= 600, "{report}");
    eprintln!("rerouted: {}", proxy.metric(r#"weft_rerouted_total{service="words.default:8080"}"#));
}

#[test]
fn a_draining_sidecar_still_listed_costs_no_request() {
    // What was measured on main with `weft up` (22 of 12,001 requests failed): a pod's
    // sidecar drains (SIGTERM) while the pod is still listed as an endpoint. Its listener
    // closes and its idle connections are closed under the client's proxy; requests on
    // their way there never reached it, and go to the other pod.
    let api = api();
    let (a, b) = two_backends();
    let a_sidecar = Proxy::start(&[("WEFT_APP_ADDR", &a.addr.to_string()), ("WEFT_DRAIN_GRACE", "5s")]);
    let b_sidecar = Proxy::start(&[("WEFT_APP_ADDR", &b.addr.to_string())]);
    api.apply(service("words", "10.96.0.10", 8080));
    api.apply(slice("words-a", "words", a_sidecar.inbound, true));
    api.apply(slice("words-b", "words", b_sidecar.inbound, true));
    let control = Control::kubernetes(&api, &[]);
    let proxy = client(&control);
    let load = std::process::Command::new(weft_e2e::bin("weft-load"))
        .args(["--addr", &proxy.outbound.to_string(), "--host", "words.default:8080", "--rate", "200"])
        .args(["--seconds", "3", "--warmup", "0", "--connections", "8"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(5), "load on both pods", || {
        (a.hits() > 20 && b.hits() > 20).then_some(())
    });
    let ok = std::process::Command::new("kill").args(["-TERM", &a_sidecar.child.id().to_string()]).status();
    assert!(ok.unwrap().success());
    let out = load.wait_with_output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rerouted = proxy.metric(r#"weft_rerouted_total{service="words.default:8080"}"#);
    eprintln!("a sidecar draining while listed, under 200 req/s: {report}; rerouted {rerouted}");
    assert_eq!(report["errors"], 0, "{report}");
    assert!(report["ok"].as_u64().unwrap() >= 590, "{report}");
}

#[test]
fn routes_get_a_status_that_says_whether_the_mesh_took_them() {
    let api = api();
    api.apply(service("words", "10.96.0.10", 80));
    api.apply(service("words-v2", "10.96.0.11", 80));
    let route = |name: &str, parent: &str, rules: Value| {
        json!({"kind": "HTTPRoute", "metadata": {"name": name, "namespace": "default", "generation": 1},
               "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent, "port": 80},
                                        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"}],
                        "rules": rules}})
    };
    // A Gateway implementation's own entry, which the mesh must keep.
    let mut good = route("canary", "words", json!([{"backendRefs": [{"name": "words-v2", "port": 80}]}]));
    good["status"] = json!({"parents": [{"parentRef": {"name": "edge", "kind": "Gateway"},
        "controllerName": "example.com/gateway", "conditions": []}]});
    api.apply(good);
    api.apply(route(
        "regex",
        "words",
        json!([{"matches": [{"path": {"type": "RegularExpression", "value": "/x("}}]}]),
    ));
    api.apply(route("orphan", "nope", json!([{"backendRefs": [{"name": "words-v2", "port": 80}]}])));
    api.apply(route("lost", "words", json!([{"backendRefs": [{"name": "words-v3", "port": 80}]}])));
    let _control = Control::kubernetes(&api, &[]);

    let conditions = |name: &str| -> Option<Vec<(String, String, String)>> {
        let r = api.get("HTTPRoute", "default", name)?;
        let mine = r["status"]["parents"]
            .as_array()?
            .iter()
            .find(|p| p["controllerName"] == "weft.dev/mesh")?
            .clone();
        assert_eq!(mine["parentRef"]["kind"], "Service");
        let cs = mine["conditions"].as_array()?;
        Some(
            cs.iter()
                .map(|c| {
                    let s = |k: &str| c[k].as_str().unwrap_or("").to_string();
                    (s("type"), s("status"), s("reason"))
                })
                .collect(),
        )
    };
    let c = |t: &str, s: &str, r: &str| (t.to_string(), s.to_string(), r.to_string());
    let want = [
        ("canary", [c("Accepted", "True", "Accepted"), c("ResolvedRefs", "True", "ResolvedRefs")]),
        ("regex", [c("Accepted", "False", "UnsupportedValue"), c("ResolvedRefs", "True", "ResolvedRefs")]),
        ("orphan", [c("Accepted", "False", "NoMatchingParent"), c("ResolvedRefs", "True", "ResolvedRefs")]),
        ("lost", [c("Accepted", "False", "UnsupportedValue"), c("ResolvedRefs", "False", "BackendNotFound")]),
    ];
    for (name, expected) in &want {
        eventually(Duration::from_secs(10), &format!("{name}'s status"), || {
            conditions(name).filter(|got| got.as_slice() == expected.as_slice())
        });
    }
    let canary = api.get("HTTPRoute", "default", "canary").unwrap();
    let parents = canary["status"]["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 2, "the Gateway's entry is kept: {parents:?}");
    assert_eq!(parents[1]["conditions"][0]["observedGeneration"], 1);
    let written = canary["metadata"]["resourceVersion"].clone();
    // Fixing the lost backend flips it to accepted.
    api.apply(service("words-v3", "10.96.0.12", 80));
    eventually(Duration::from_secs(10), "lost accepted once its backend exists", || {
        conditions("lost").filter(|got| got[0].1 == "True" && got[1].1 == "True")
    });
    // Writes settle instead of feeding on the events they cause: canary, unchanged,
    // was not written again through all the rounds since (a write would bump its
    // version; a refused retry on a stale read does not).
    let canary = api.get("HTTPRoute", "default", "canary").unwrap();
    assert_eq!(canary["metadata"]["resourceVersion"], written, "canary's status was written again");
    eprintln!("{} status writes (refused ones included)", api.requests("/status"));
}
