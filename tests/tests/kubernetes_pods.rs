//! Weft on Kubernetes, as a cluster's pods see it: pods are network namespaces with the
//! init container's iptables rules and a sidecar each; the app calls a Service by its
//! ClusterIP, an address no pod owns. No Kubernetes API server can be installed on
//! these machines, so a fake one (tests/harness/kube.rs) runs inside the pod network's
//! node namespace and `weft control --source kubernetes` runs beside it; everything else
//! is real (iptables interception, mTLS between the pods' proxies, curl in the pods).

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use weft_e2e::{bin, eventually, kube::FakeApi, metric_value, netns::Net};

const PROXY_UID: &str = "2102";
const API: &str = "10.77.0.1:6443";

/// A pod's name, service account and whether it runs a sidecar; index = pod number.
const PODS: [(&str, &str, bool); 4] = [
    ("web-0", "web", true),
    ("words-a", "words", true),
    ("words-b", "words-b", true),
    ("outsider", "default", false),
];

/// An HTTP app on 8080 and a TCP banner on 7000 that both answer the pod's name.
const APP: &str = r#"
import http.server, socket, sys, threading
name = sys.argv[1].encode()
def banner():
    s = socket.create_server(('0.0.0.0', 7000))
    while True:
        c, _ = s.accept(); c.sendall(name + b'\n'); c.close()
threading.Thread(target=banner, daemon=True).start()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header('content-length', str(len(name))); self.end_headers()
        self.wfile.write(name)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(('0.0.0.0', 8080), H).serve_forever()
"#;

struct Cluster {
    net: Net,
    api: FakeApi,
    /// The control planes' processes in `net`.
    replicas: Vec<usize>,
}

fn control_addr(replica: usize) -> String {
    format!("10.77.0.1:{}", 8090 + replica)
}

fn admin_addr(replica: usize) -> String {
    format!("10.77.0.1:{}", 9990 + replica)
}

fn service(name: &str, ip: &str) -> Value {
    json!({"kind": "Service", "metadata": {"name": name, "namespace": "default"},
           "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [
               {"name": "http", "port": 80, "targetPort": 8080},
               {"name": "tcp", "port": 7000, "targetPort": 7000}]}})
}

impl Cluster {
    fn start(replicas: usize) -> Cluster {
        weft_e2e::netns::available().unwrap_or_else(|e| panic!("these tests need root: {e}"));
        let net = Net::new(PODS.len());
        let api = FakeApi::start_in(&net.node, API.parse().unwrap());
        api.identity_secret();
        for (i, (name, sa, meshed)) in PODS.iter().enumerate() {
            let mut containers = vec![json!({"name": "app"})];
            if *meshed {
                containers.push(json!({"name": "weft-proxy"}));
                api.token(&format!("{name}-token"), "default", sa, Some(name));
            }
            let ip = net.pods[i].ip.to_string();
            api.apply(json!({"kind": "Pod", "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
                "spec": {"serviceAccountName": sa, "containers": containers},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}));
        }
        api.apply(service("words", "10.96.0.10"));
        api.apply(service("words-v1", "10.96.0.11"));
        api.apply(service("words-v2", "10.96.0.12"));
        let mut c = Cluster { net, api, replicas: Vec::new() };
        c.slice("words", &[1, 2]);
        c.slice("words-v1", &[1]);
        c.slice("words-v2", &[2]);
        // Round robin, so that sequential requests show the spread exactly.
        c.api.apply(json!({"kind": "TrafficPolicy", "metadata": {"name": "words", "namespace": "default"},
            "spec": {"targetRef": {"name": "words"}, "balancer": "round-robin"}}));
        c.control_planes(replicas);
        c.pods(replicas);
        c
    }

    /// `replicas` control planes on the node, at CONTROL's port and the next ones.
    fn control_planes(&mut self, replicas: usize) {
        let weft = bin("weft");
        let kubeconfig = self.api.kubeconfig();
        for r in 0..replicas {
            let (grpc, admin) = (control_addr(r), admin_addr(r));
            let log = std::env::temp_dir().join(format!("{}-control{r}.log", self.net.node));
            let args = [
                weft.to_str().unwrap(),
                "control",
                "--source",
                "kubernetes",
                "--namespace",
                "weft",
                "--grpc-addr",
                &grpc,
                "--admin-addr",
                &admin,
            ];
            let child = self.net.spawn_node(&args, &[("KUBECONFIG", kubeconfig.to_str().unwrap())], &log);
            self.replicas.push(child);
            eventually(Duration::from_secs(20), "weft control /ready", || {
                self.net.node_try_exec(&["curl", "-sf", &format!("http://{admin}/ready")]).ok()
            });
        }
    }

    /// The apps, and the sidecars with every replica's address.
    fn pods(&mut self, replicas: usize) {
        let control: Vec<String> = (0..replicas).map(control_addr).collect();
        let control = control.join(",");
        let proxy = bin("weft-proxy");
        let proxy = proxy.to_str().unwrap();
        let app = std::env::temp_dir().join(format!("{}-app.py", self.net.node));
        std::fs::write(&app, APP).unwrap();
        for (i, (name, sa, meshed)) in PODS.iter().enumerate() {
            if i > 0 {
                let log = std::env::temp_dir().join(format!("{}-app.log", self.net.pods[i].ns));
                self.net.spawn(i, &["/usr/bin/python3", app.to_str().unwrap(), name], &[], &log);
            }
            if !meshed {
                continue;
            }
            self.net.exec(i, &[proxy, "init"]);
            let id = format!("spiffe://cluster.local/ns/default/sa/{sa}");
            let token = format!("{name}-token");
            let env = [
                ("WEFT_LOG", "info"),
                ("WEFT_ADMIN_ADDR", "0.0.0.0:4191"),
                ("WEFT_CONTROL_ADDR", control.as_str()),
                ("WEFT_IDENTITY", id.as_str()),
                ("WEFT_TOKEN", token.as_str()),
                ("WEFT_INBOUND_PORTS", "8080,7000"),
            ];
            let log = std::env::temp_dir().join(format!("{}-proxy.log", self.net.pods[i].ns));
            self.net.spawn(
                i,
                &["setpriv", "--reuid", PROXY_UID, "--regid", PROXY_UID, "--clear-groups", proxy],
                &env,
                &log,
            );
        }
        for i in 0..3 {
            eventually(Duration::from_secs(20), "the sidecar /ready", || {
                self.curl(i, &["-f", "http://127.0.0.1:4191/ready"]).ok()
            });
        }
        for i in 1..4 {
            eventually(Duration::from_secs(10), "the app", || {
                self.net.try_exec(i, &["curl", "-sf", "http://127.0.0.1:8080/"]).ok()
            });
        }
    }

    fn slice(&self, service: &str, pods: &[usize]) {
        let endpoints: Vec<Value> = pods
            .iter()
            .map(|&i| {
                json!({"addresses": [self.net.pods[i].ip.to_string()], "conditions": {"ready": true},
                              "targetRef": {"kind": "Pod", "name": PODS[i].0, "namespace": "default"}})
            })
            .collect();
        self.api.apply(json!({"kind": "EndpointSlice",
            "metadata": {"name": service, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "tcp", "port": 7000}],
            "endpoints": endpoints}));
    }

    fn curl(&self, pod: usize, args: &[&str]) -> Result<String, String> {
        let mut a = vec!["curl", "-sS", "--max-time", "5"];
        a.extend_from_slice(args);
        self.net.try_exec(pod, &a)
    }

    /// `n` requests from pod `pod` to `url` on one connection: the answering pods' names.
    fn names(&self, pod: usize, url: &str, n: usize) -> Vec<String> {
        let urls = vec![url; n];
        let mut args = vec!["-w", "\n", "--fail"];
        args.extend(urls);
        let out = self.curl(pod, &args).unwrap_or_else(|e| panic!("{e}"));
        out.lines().map(str::to_string).collect()
    }

    fn metrics(&self, pod: usize) -> String {
        self.curl(pod, &["http://127.0.0.1:4191/metrics"]).unwrap_or_default()
    }

    fn control_generation(&self) -> u64 {
        let m = self
            .net
            .node_try_exec(&["curl", "-sS", &format!("http://{}/metrics", admin_addr(0))])
            .unwrap_or_default();
        metric_value(&m, "weft_control_mesh_generation") as u64
    }

    /// Waits for the control plane to publish a change, then for pod `pod`'s proxy to
    /// have `kind` answers from it.
    fn wait_applied(&self, before: u64, pod: usize, kind: &str) -> u64 {
        let g = eventually(Duration::from_secs(10), "the control plane to publish the change", || {
            Some(self.control_generation()).filter(|g| *g > before)
        });
        let series = format!(r#"weft_control_generation{{kind="{kind}"}}"#);
        eventually(Duration::from_secs(10), "the proxy to have the change", || {
            (metric_value(&self.metrics(pod), &series) >= g as f64).then_some(g)
        })
    }
}

fn count(names: &[String], name: &str) -> usize {
    names.iter().filter(|n| *n == name).count()
}

#[test]
fn a_cluster_ip_is_balanced_routed_and_policed_over_mtls() {
    let c = Cluster::start(1);
    // The ClusterIP, which no pod owns: balanced over both pods (round robin).
    let names = c.names(0, "http://10.96.0.10/", 20);
    assert_eq!((count(&names, "words-a"), count(&names, "words-b")), (10, 10), "{names:?}");
    // Over mTLS: the servers' inbound saw the client's identity.
    let a = c.metrics(1);
    let from_web = a.lines().any(|l| {
        l.starts_with("weft_requests_total{direction=\"inbound\"")
            && l.contains("status=\"200\"")
            && l.contains("peer_identity=\"spiffe://cluster.local/ns/default/sa/web\"")
    });
    assert!(from_web, "pod a's inbound did not see web's identity:\n{a}");
    // Opaque TCP to the ClusterIP: a pod per connection, both of them over a few.
    let tcp: Vec<String> = (0..6)
        .map(|_| c.curl(0, &["telnet://10.96.0.10:7000"]).unwrap_or_default().trim().to_string())
        .collect();
    let (a, b) = (count(&tcp, "words-a"), count(&tcp, "words-b"));
    assert!(a + b == 6 && a > 0 && b > 0, "{tcp:?}");

    // Scaling the slice down moves the traffic.
    let before = c.control_generation();
    let start = Instant::now();
    c.slice("words", &[1]);
    c.wait_applied(before, 0, "discovery");
    eprintln!("endpoint slice change reached the client proxy in {:?}", start.elapsed());
    let names = c.names(0, "http://10.96.0.10/", 10);
    assert_eq!(count(&names, "words-a"), 10, "{names:?}");
    c.slice("words", &[1, 2]);

    // An HTTPRoute on the Service: a 90/10 split between versions.
    let before = c.control_generation();
    c.api.apply(json!({"kind": "HTTPRoute", "metadata": {"name": "words-canary", "namespace": "default"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "words", "port": 80}],
                 "rules": [{"backendRefs": [{"name": "words-v1", "port": 80, "weight": 90},
                                            {"name": "words-v2", "port": 80, "weight": 10}],
                            "filters": [{"type": "ResponseHeaderModifier",
                                         "responseHeaderModifier": {"set": [{"name": "x-canary", "value": "on"}]}}]}]}}));
    c.wait_applied(before, 0, "routes");
    let names = c.names(0, "http://10.96.0.10/", 200);
    let v2 = count(&names, "words-b");
    eprintln!("HTTPRoute 90/10 split through the ClusterIP: {} to v1, {v2} to v2 of 200", 200 - v2);
    // Binomial(200, 0.1): mean 20, sd 4.2; 5 to 40 is beyond 3.5 sd either way.
    assert!((5..=40).contains(&v2) && count(&names, "words-a") == 200 - v2, "v2 got {v2} of 200");
    let head = c.curl(0, &["-D", "-", "-o", "/dev/null", "http://10.96.0.10/"]).unwrap();
    assert!(head.to_ascii_lowercase().contains("x-canary: on"), "{head}");

    // A strict policy on words-a's 8080 that allows web only.
    let before = c.control_generation();
    c.api.apply(json!({"kind": "InboundPolicy", "metadata": {"name": "words-a", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "words-a"}}, "port": 8080, "mode": "strict",
                 "allow": {"serviceAccounts": [{"name": "web"}]}}}));
    c.wait_applied(before, 1, "policy");
    let a = format!("http://{}:8080/", c.net.pods[1].ip);
    assert_eq!(c.curl(0, &["-f", &a]).as_deref(), Ok("words-a"));
    // Plaintext from a pod without a sidecar: refused.
    assert!(c.curl(3, &["-f", &a]).is_err(), "plaintext got through a strict port");
    // mTLS from a meshed pod whose service account is not allowed: refused.
    let other = c.curl(2, &["-o", "/dev/null", "-w", "%{http_code}", &a]);
    assert!(other.as_deref() != Ok("200"), "words-b's identity got through: {other:?}");
    let m = c.metrics(1);
    assert!(m.contains("spiffe://cluster.local/ns/default/sa/words-b"), "no denial of words-b counted:\n{m}");
}

#[test]
fn killing_one_of_two_control_plane_replicas_costs_no_request() {
    let c = Cluster::start(2);
    let load = || {
        // The body (a pod's name), then the status, per line.
        let mut args = vec!["-w", "%{http_code}\n"];
        args.extend(std::iter::repeat_n("http://10.96.0.10/", 400));
        c.curl(0, &args).unwrap_or_else(|e| e)
    };
    let codes = std::thread::scope(|scope| {
        let running = scope.spawn(load);
        // Under load, the first replica goes away (each proxy's watches and certificate
        // requests are spread over both).
        eventually(Duration::from_secs(10), "load on the server pods", || {
            let served = |pod| metric_value(&c.metrics(pod), r#"weft_requests_total{direction="inbound""#);
            (served(1) + served(2) > 20.0).then_some(())
        });
        c.net.kill(c.replicas[0]);
        // A change made while one replica is gone reaches the client through the other.
        c.slice("words", &[2]);
        let admin = admin_addr(1);
        let g = eventually(Duration::from_secs(10), "the surviving replica to publish", || {
            let m =
                c.net.node_try_exec(&["curl", "-sS", &format!("http://{admin}/metrics")]).unwrap_or_default();
            Some(metric_value(&m, "weft_control_mesh_generation") as u64).filter(|g| *g > 1)
        });
        eventually(Duration::from_secs(10), "the client's proxy to get the change", || {
            (metric_value(&c.metrics(0), r#"weft_control_generation{kind="discovery"}"#) >= g as f64)
                .then_some(())
        });
        running.join().unwrap()
    });
    let failed: Vec<&str> = codes.lines().filter(|l| !l.ends_with("200")).collect();
    assert!(failed.is_empty() && codes.lines().count() == 400, "{failed:?} of {}", codes.lines().count());
    let names = c.names(0, "http://10.96.0.10/", 10);
    assert_eq!(count(&names, "words-b"), 10, "{names:?}");
}
