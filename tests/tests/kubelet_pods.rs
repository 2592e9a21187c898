//! The injected pod actually runs. `weft inject`'s output for a Deployment and a Job is
//! run as a kubelet would run it (tests/harness/kubelet.rs: from the spec itself, in
//! network-namespace pods, init containers in order, the native sidecar's startup probe
//! polled before the app starts), against `weft control --source kubernetes` and a fake
//! API server in the node namespace (no cluster or kubelet can run here). Meshed traffic
//! flows over mTLS, the kubelet's readiness probe passes a strict policy that refuses
//! every other plaintext request, and a Job-shaped pod completes: its app exits, the
//! kubelet stops the sidecar, which exits with code 0 at once.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde_json::{json, Value};
use weft_e2e::{bin, eventually, kube::FakeApi, kubelet::Kubelet, metric_value, netns::Net};

const MANIFESTS: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: words, namespace: shop}
spec:
  selector: {matchLabels: {app: words}}
  template:
    metadata: {labels: {app: words}}
    spec:
      serviceAccountName: words
      containers:
        - name: app
          image: ghcr.io/weft-mesh/weft:v0.1.0
          args: [example-app, backend, --message, hello]
          env: [{name: LISTEN_ADDR, value: "0.0.0.0:8080"}, {name: WEFT_WORKLOAD, value: words}]
          ports: [{containerPort: 8080, name: http}]
          readinessProbe: {httpGet: {path: /healthz, port: http}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      serviceAccountName: web
      containers: [{name: app, image: "busybox:1", args: [infinity]}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: report, namespace: shop}
spec:
  template:
    spec:
      serviceAccountName: web
      restartPolicy: Never
      containers:
        - name: report
          image: curlimages/curl:8
          # -f: a failed call fails the Job (the body goes to stdout, which is not kept).
          args: [-sSf, --max-time, "5", "http://10.96.0.10/"]
"#;

/// The pod templates of `weft inject`'s output, by the owning object's name.
fn injected() -> Vec<(String, Value)> {
    let mut child = Command::new(bin("weft"))
        .args([
            "inject",
            "-",
            "--control-addr",
            "10.77.0.1:8090",
            "--proxy-image",
            "ghcr.io/weft-mesh/weft-proxy:test",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(MANIFESTS.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .map(|o| {
            let mut pod = o["spec"]["template"].clone();
            pod["metadata"]["namespace"] = o["metadata"]["namespace"].clone();
            (o["metadata"]["name"].as_str().unwrap().to_string(), pod)
        })
        .collect()
}

#[test]
fn the_injected_pods_run_meshed_and_a_job_completes() {
    weft_e2e::netns::available().unwrap_or_else(|e| panic!("these tests need root: {e}"));
    let mut net = Net::new(3);
    let api = FakeApi::start_in(&net.node, "10.77.0.1:6443".parse().unwrap());
    api.identity_secret();
    let pods = injected();
    // The API objects a cluster would have: the pods (with their IPs), the Service, its slice.
    let ips: Vec<String> = net.pods.iter().map(|p| p.ip.to_string()).collect();
    for (i, (name, pod)) in pods.iter().enumerate() {
        let pod_name = format!("{name}-0");
        let sa = pod["spec"]["serviceAccountName"].as_str().unwrap();
        api.token(&format!("{pod_name}-token"), "shop", sa, Some(&pod_name));
        let mut object = pod.clone();
        object["kind"] = json!("Pod");
        object["metadata"]["name"] = json!(pod_name);
        object["status"] = json!({"phase": "Running", "podIP": ips[i], "podIPs": [{"ip": ips[i]}]});
        api.apply(object);
    }
    api.apply(json!({"kind": "Service", "metadata": {"name": "words", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}));
    api.apply(json!({"kind": "EndpointSlice",
        "metadata": {"name": "words-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "words"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": [ips[0]], "conditions": {"ready": true},
                       "targetRef": {"kind": "Pod", "name": "words-0", "namespace": "shop"}}]}));
    // words' port is strict and open to web's service account only: the kubelet's probe
    // (plaintext, no identity) must still reach the app, and nothing else of it.
    api.apply(json!({"kind": "InboundPolicy", "metadata": {"name": "words", "namespace": "shop"},
        "spec": {"podSelector": {"matchLabels": {"app": "words"}}, "port": "http", "mode": "strict",
                 "allow": {"serviceAccounts": [{"name": "web"}]}}}));
    let weft = bin("weft");
    let log = std::env::temp_dir().join(format!("{}-control.log", net.node));
    let kubeconfig = api.kubeconfig();
    let args = [
        weft.to_str().unwrap(),
        "control",
        "--source",
        "kubernetes",
        "--namespace",
        "weft",
        "--grpc-addr",
        "10.77.0.1:8090",
        "--admin-addr",
        "10.77.0.1:9990",
    ];
    net.spawn_node(&args, &[("KUBECONFIG", kubeconfig.to_str().unwrap())], &log);
    eventually(Duration::from_secs(20), "weft control /ready", || {
        net.node_try_exec(&["curl", "-sf", "http://10.77.0.1:9990/ready"]).ok()
    });

    let kubelet = Kubelet::new(&[
        ("ghcr.io/weft-mesh/weft-proxy", bin("weft-proxy")),
        ("ghcr.io/weft-mesh/weft", bin("weft")),
        ("busybox", "/bin/sleep".into()),
        ("curlimages/curl", "/usr/bin/curl".into()),
    ]);
    let words = kubelet.run(&mut net, 0, "words-0", &pods[0].1, "words-0-token");
    assert_eq!(words.started, ["weft-init", "weft-proxy", "app"], "the app starts after its ready proxy");
    let _web = kubelet.run(&mut net, 1, "web-0", &pods[1].1, "web-0-token");
    eventually(Duration::from_secs(10), "the words app", || {
        net.try_exec(0, &["curl", "-sf", "http://127.0.0.1:8080/"]).ok()
    });

    // The kubelet probes from the node: its readiness path passes the strict policy (the
    // injector told the proxy), any other path is refused.
    let probe = |path: &str| {
        let url = format!("http://{}:8080{path}", ips[0]);
        net.node_try_exec(&["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", &url])
            .unwrap_or_default()
    };
    assert_eq!(probe("/healthz"), "200", "{}", kubelet.log("words-0", "weft-proxy"));
    assert_eq!(probe("/"), "403");
    assert_eq!(probe("/healthz?all=1"), "403");

    // Meshed traffic: the web pod calls the Service's ClusterIP; mTLS between the pods.
    let body = net.exec(1, &["curl", "-sS", "--fail", "--max-time", "5", "http://10.96.0.10/"]);
    assert_eq!(body, "words: hello\n");
    let m = net.exec(0, &["curl", "-sS", "http://127.0.0.1:4191/metrics"]);
    let from_web = m.lines().any(|l| {
        l.starts_with("weft_requests_total{direction=\"inbound\"")
            && l.contains("peer_identity=\"spiffe://cluster.local/ns/shop/sa/web\"")
            && metric_value(l, l.split(' ').next().unwrap()) >= 1.0
    });
    assert!(
        from_web,
        "words' inbound did not see web's identity:\n{m}\n{}",
        kubelet.log("words-0", "weft-proxy")
    );

    // A Job: its app runs once the sidecar is ready, calls words, exits 0; then the
    // kubelet stops the native sidecar, which must exit 0 promptly so the Job completes.
    let job = kubelet.run(&mut net, 2, "report-0", &pods[2].1, "report-0-token");
    assert_eq!(job.started, ["weft-init", "weft-proxy", "report"]);
    let app = job.processes["report"];
    let status = eventually(Duration::from_secs(10), "the Job's app to exit", || net.try_wait(app));
    assert!(status.success(), "the Job's request failed: {}", kubelet.log("report-0", "report"));
    let sidecar = job.processes["weft-proxy"];
    let stopping = Instant::now();
    net.terminate(sidecar);
    let status =
        eventually(Duration::from_secs(2), "the sidecar to exit after SIGTERM", || net.try_wait(sidecar));
    eprintln!("Job: app exited 0; sidecar exited {status} {:?} after SIGTERM", stopping.elapsed());
    assert!(status.success(), "{status}");
}
