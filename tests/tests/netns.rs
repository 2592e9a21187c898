//! Transparent mode as in Kubernetes: each pod is a network namespace, `weft-proxy init`
//! installs the iptables rules (as the init container would), the proxy runs under the
//! uid the rules exempt, and the app in pod A calls pod B by IP without knowing about
//! the mesh. Needs root, iproute2 and iptables (tests/run installs them).
//!
//! These tests share the fixed pod subnet inside their own private namespaces, so they
//! can run in parallel with each other and with anything on the host.

use std::time::Duration;

use weft_e2e::mesh::token;
use weft_e2e::{
    bin,
    mesh::{MeshFile, Service},
    metric_value,
    netns::Net,
};

const PROXY_UID: &str = "2102";

/// Two pods, each with rules installed, a sidecar running as the proxy uid, and in pod 1
/// an HTTP app on port 8080 and a TCP echo on 7000.
fn mesh(client_env: &[(&str, &str)]) -> Net {
    weft_e2e::netns::available().unwrap_or_else(|e| panic!("transparent-mode tests need root: {e}"));
    pods(Net::new(2), [client_env, &[]])
}

/// Starts the sidecars (with `envs[i]` for pod i) and the apps of [`mesh`] in `net`.
fn pods(mut net: Net, envs: [&[(&str, &str)]; 2]) -> Net {
    let proxy = bin("weft-proxy");
    let proxy = proxy.to_str().unwrap();
    let logs = std::env::temp_dir();
    for (i, pod_env) in envs.iter().enumerate() {
        net.exec(i, &[proxy, "init"]);
        let log = logs.join(format!("{}-proxy.log", net.pods[i].ns));
        let mut env = vec![("WEFT_LOG", "info"), ("WEFT_ADMIN_ADDR", "0.0.0.0:4191")];
        env.extend_from_slice(pod_env);
        let args = ["setpriv", "--reuid", PROXY_UID, "--regid", PROXY_UID, "--clear-groups", proxy];
        net.spawn(i, &args, &env, &log);
    }
    let app = logs.join(format!("{}-app.log", net.pods[1].ns));
    // `--bind ::` listens on IPv4 and IPv6.
    net.spawn(1, &["/usr/bin/python3", "-m", "http.server", "8080", "--bind", "::"], &[], &app);
    let echo = logs.join(format!("{}-echo.log", net.pods[1].ns));
    let script = "import socket\ns=socket.create_server(('0.0.0.0',7000))\nwhile True:\n c,_=s.accept()\n c.sendall(b'hello from pod b\\n')\n c.close()";
    net.spawn(1, &["/usr/bin/python3", "-c", script], &[], &echo);
    for i in 0..2 {
        wait_for(&net, i, "http://127.0.0.1:4191/ready");
    }
    wait_for(&net, 1, "http://127.0.0.1:8080/");
    net
}

fn wait_for(net: &Net, pod: usize, url: &str) {
    weft_e2e::eventually(Duration::from_secs(10), &format!("{url} in pod {pod}"), || {
        net.try_exec(pod, &["curl", "-sf", "-o", "/dev/null", "--max-time", "1", url]).ok().map(drop)
    });
}

fn metrics(net: &Net, pod: usize) -> String {
    net.exec(pod, &["curl", "-sS", "--max-time", "5", "http://127.0.0.1:4191/metrics"])
}

/// Asserts that pod A's outbound and pod B's inbound each answered `n` requests with 200,
/// and returns both pods' metrics.
fn assert_crossed_both_sidecars(net: &Net, n: f64) -> (String, String) {
    let (a_m, b_m) = (metrics(net, 0), metrics(net, 1));
    let ok =
        |dir| format!(r#"weft_requests_total{{direction="{dir}",protocol="http1",status="200",cause=""}}"#);
    assert_eq!(metric_value(&a_m, &ok("outbound")), n, "pod A's outbound did not carry the call:\n{a_m}");
    assert_eq!(metric_value(&b_m, &ok("inbound")), n, "pod B's inbound did not carry the call:\n{b_m}");
    (a_m, b_m)
}

#[test]
fn pod_to_pod_through_both_sidecars() {
    let net = mesh(&[]);
    let b = net.pods[1].ip.to_string();
    let body = net.exec(0, &["curl", "-sS", "--max-time", "5", &format!("http://{b}:8080/")]);
    assert!(body.contains("Directory listing"), "{body}");
    // Opaque TCP (server speaks first) crosses both sidecars too.
    let banner = net.exec(0, &["curl", "-sS", "--max-time", "5", &format!("telnet://{b}:7000")]);
    assert_eq!(banner, "hello from pod b\n");

    let (a_m, b_m) = assert_crossed_both_sidecars(&net, 1.0);
    assert_eq!(metric_value(&a_m, r#"weft_detect_total{direction="outbound",outcome="silent"}"#), 1.0);
    assert_eq!(metric_value(&b_m, r#"weft_detect_total{direction="inbound",outcome="silent"}"#), 1.0);
}

#[test]
fn ipv6_pod_to_pod_through_both_sidecars() {
    let net = mesh(&[]);
    let b = net.pods[1].ip6;
    let body = net.exec(0, &["curl", "-sS", "--max-time", "5", &format!("http://[{b}]:8080/")]);
    assert!(body.contains("Directory listing"), "{body}");
    assert_crossed_both_sidecars(&net, 1.0);
}

#[test]
fn http1_crosses_as_http2_between_meshed_pods() {
    let net = mesh(&[("WEFT_MESH_NETWORKS", "10.77.0.0/24")]);
    let b = net.pods[1].ip.to_string();
    for _ in 0..3 {
        net.exec(0, &["curl", "-sS", "-o", "/dev/null", "--max-time", "5", &format!("http://{b}:8080/")]);
    }
    let b_m = metrics(&net, 1);
    assert_eq!(
        metric_value(&b_m, r#"weft_requests_total{direction="inbound",protocol="h2",status="200",cause=""}"#),
        3.0,
        "{b_m}"
    );
}

/// The mesh file of [`with_control_plane`]: pod B's HTTP app and TCP echo are endpoints
/// of workload `b`, and both ports are strict (mutual TLS only).
fn mesh_file(b: std::net::Ipv4Addr) -> String {
    MeshFile::new()
        .workload("a")
        .workload("b")
        .service(Service::new("web", 8080).meshed(format!("{b}:8080"), "b"))
        .service(Service::new("echo", 7000).meshed(format!("{b}:7000"), "b"))
        .policy("b", 8080, "mode: strict")
        .policy("b", 7000, "mode: strict")
        .yaml()
}

/// The two pods of [`mesh`] with `weft control` on the node (10.77.0.1), each sidecar
/// with its workload's identity.
fn with_control_plane() -> Net {
    weft_e2e::netns::available().unwrap_or_else(|e| panic!("transparent-mode tests need root: {e}"));
    let mut net = Net::new(2);
    let dir = std::env::temp_dir().join(format!("{}-control", net.node));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("mesh.yaml");
    std::fs::write(&file, mesh_file(net.pods[1].ip)).unwrap();
    let weft = bin("weft");
    let args = [weft.to_str().unwrap(), "control", "--mesh", file.to_str().unwrap()];
    let addrs = ["--grpc-addr", "10.77.0.1:8090", "--admin-addr", "10.77.0.1:9990"];
    net.spawn_node(&[&args[..], &addrs[..]].concat(), &[], &dir.join("control.log"));
    let control = ("WEFT_CONTROL_ADDR", "10.77.0.1:8090");
    let id = |w| format!("spiffe://weft.local/ns/default/sa/{w}");
    let (id_a, id_b) = (id("a"), id("b"));
    let (token_a, token_b) = (token("a"), token("b"));
    pods(
        net,
        [
            &[control, ("WEFT_IDENTITY", &id_a), ("WEFT_TOKEN", &token_a)],
            &[control, ("WEFT_IDENTITY", &id_b), ("WEFT_TOKEN", &token_b)],
        ],
    )
}

#[test]
fn pods_talk_over_mutual_tls_with_the_control_plane() {
    let net = with_control_plane();
    let b = net.pods[1].ip.to_string();
    // The app in pod A calls pod B by IP, unaware of the mesh; both ports are strict.
    for _ in 0..3 {
        let body = net.exec(0, &["curl", "-sS", "--max-time", "5", &format!("http://{b}:8080/")]);
        assert!(body.contains("Directory listing"), "{body}");
    }
    let banner = net.exec(0, &["curl", "-sS", "--max-time", "5", &format!("telnet://{b}:7000")]);
    assert_eq!(banner, "hello from pod b\n");

    let (a_m, b_m) = (metrics(&net, 0), metrics(&net, 1));
    // HTTP rode one mTLS HTTP/2 connection (per shard); the TCP stream its own.
    let h2_in = r#"weft_requests_total{direction="inbound",protocol="h2",status="200",cause=""}"#;
    assert_eq!(metric_value(&b_m, h2_in), 3.0, "{b_m}");
    let ok = |dir| format!(r#"weft_tls_handshakes_total{{direction="{dir}",result="ok"}}"#);
    let (out_tls, in_tls) = (metric_value(&a_m, &ok("outbound")), metric_value(&b_m, &ok("inbound")));
    assert!(out_tls >= 2.0 && out_tls == in_tls, "handshakes: A out {out_tls}, B in {in_tls}\n{a_m}\n{b_m}");

    // From the node, with no sidecar: plaintext is refused on both strict ports.
    let out =
        net.node_try_exec(&["curl", "-sS", "-i", "--max-time", "5", &format!("http://{b}:8080/")]).unwrap();
    assert!(out.starts_with("HTTP/1.1 403") && out.contains("weft-error: unauthorized"), "{out}");
    let out = net.node_try_exec(&["curl", "-sS", "--max-time", "5", &format!("telnet://{b}:7000")]);
    assert!(!out.as_deref().unwrap_or_default().contains("hello"), "{out:?}");
    let denied = r#"weft_inbound_denied_total{client_identity="",protocol="tcp"}"#;
    assert_eq!(metric_value(&metrics(&net, 1), denied), 1.0);
}

#[test]
fn a_silent_control_plane_fails_closed_in_transparent_mode() {
    let net = with_control_plane();
    // The control plane goes away before pod A has asked about pod B, or B about its ports.
    let pids = std::process::Command::new("ip").args(["netns", "pids", &net.node]).output().unwrap();
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        let _ = std::process::Command::new("kill").arg(pid).status();
    }
    let b = net.pods[1].ip.to_string();
    // A's outbound does not know whether B is meshed: it refuses instead of plaintext.
    let out = net.exec(0, &["curl", "-sS", "-i", "--max-time", "5", &format!("http://{b}:8080/")]);
    assert!(out.starts_with("HTTP/1.1 503") && out.contains("weft-error: no-discovery"), "{out}");
    let tcp = net.try_exec(0, &["curl", "-sS", "--max-time", "5", &format!("telnet://{b}:7000")]);
    assert!(!tcp.as_deref().unwrap_or_default().contains("hello"), "{tcp:?}");
    let closed = r#"weft_tcp_errors_total{direction="outbound",cause="no-discovery"}"#;
    assert_eq!(metric_value(&metrics(&net, 0), closed), 1.0);
    // B's inbound has no policy for its ports: plaintext from the node is refused.
    let out =
        net.node_try_exec(&["curl", "-sS", "-i", "--max-time", "5", &format!("http://{b}:8080/")]).unwrap();
    assert!(out.starts_with("HTTP/1.1 403") && out.contains("weft-error: unauthorized"), "{out}");
}

#[test]
fn init_is_idempotent_and_removable() {
    weft_e2e::netns::available().unwrap_or_else(|e| panic!("transparent-mode tests need root: {e}"));
    let net = Net::new(1);
    let proxy = bin("weft-proxy");
    let proxy = proxy.to_str().unwrap();
    net.exec(0, &[proxy, "init"]);
    let once = net.exec(0, &["iptables", "-t", "nat", "-S"]);
    net.exec(0, &[proxy, "init"]);
    let twice = net.exec(0, &["iptables", "-t", "nat", "-S"]);
    assert_eq!(once, twice, "running init twice changed the rules");
    assert!(once.contains("-A WEFT_INBOUND -p tcp -j REDIRECT --to-ports 4143"), "{once}");
    assert!(once.contains("--uid-owner 2102 -j RETURN"), "{once}");
    assert_eq!(once.matches("-j WEFT_OUTBOUND").count(), 1, "{once}");
    let v6 = net.exec(0, &["ip6tables", "-t", "nat", "-S"]);
    assert!(v6.contains("-A WEFT_OUTBOUND -p tcp -j REDIRECT --to-ports 4140"), "{v6}");
    net.exec(0, &[proxy, "init", "--remove"]);
    let removed = net.exec(0, &["iptables", "-t", "nat", "-S"]);
    assert!(!removed.contains("WEFT"), "{removed}");
    assert!(!net.exec(0, &["ip6tables", "-t", "nat", "-S"]).contains("WEFT"));
    // Removing twice is harmless.
    net.exec(0, &[proxy, "init", "--remove"]);
}

#[test]
fn teardown_leaves_no_namespace_even_when_a_test_fails() {
    weft_e2e::netns::available().unwrap_or_else(|e| panic!("transparent-mode tests need root: {e}"));
    let names = std::sync::Mutex::new(vec![]);
    let result = std::panic::catch_unwind(|| {
        let net = Net::new(2);
        *names.lock().unwrap() = net.names();
        panic!("a failing test");
    });
    assert!(result.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 3);
    for name in names {
        assert!(!weft_e2e::netns::exists(&name), "{name} survived the failed test");
    }
}
