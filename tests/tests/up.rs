//! The README's first command: `weft up examples/demo.yaml` runs the shipped demo mesh
//! (control plane, five sidecars, five apps) and stops it cleanly. The test runs the
//! shipped file with its fixed addresses moved to free ports.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use weft_e2e::{bin, curl, free_addrs, http_get, metric_value};

/// A `weft up` that cannot outlive a failing test.
struct Up {
    child: Child,
    dir: PathBuf,
}

impl Up {
    fn start(mesh: &str, dir: &Path) -> Up {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("mesh.yaml"), mesh).unwrap();
        let child = Command::new(bin("weft"))
            .arg("up")
            .arg(dir.join("mesh.yaml"))
            .arg("--state-file")
            .arg(dir.join("up.json"))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("up.log")).unwrap())
            .stderr(std::fs::File::create(dir.join("up.err")).unwrap())
            .spawn()
            .unwrap();
        Up { child, dir: dir.to_path_buf() }
    }

    fn output(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        format!("{}{}", read("up.log"), read("up.err"))
    }

    fn state(&mut self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Ok(text) = std::fs::read_to_string(self.dir.join("up.json")) {
                return serde_json::from_str(&text).unwrap();
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("weft up exited ({status}):\n{}", self.output());
            }
            assert!(Instant::now() < deadline, "no state file after 40 s:\n{}", self.output());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn interrupt(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-INT", &pid]).status().unwrap();
        weft_e2e::eventually(Duration::from_secs(30), "weft up to stop", || self.child.try_wait().unwrap())
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- weft up output ---\n{}", self.output());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// examples/demo.yaml with every fixed port moved to a free one.
fn demo_mesh() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo.yaml");
    let mut text = std::fs::read_to_string(path).unwrap();
    let fixed = [14101, 14111, 14112, 14121, 18121];
    // (each fixed port may appear several times: every occurrence moves)
    for (port, free) in fixed.iter().zip(free_addrs::<5>()) {
        assert!(text.contains(&format!("127.0.0.1:{port}")), "examples/demo.yaml changed: update this test");
        text = text
            .replace(&format!("127.0.0.1:{port}"), &free.to_string())
            .replace(&format!("port: {port}"), &format!("port: {}", free.port()));
    }
    text.replace("--rate, \"10\"", "--rate, \"20\", --every, \"2\"")
}

fn addr(v: &serde_json::Value) -> SocketAddr {
    v.as_str().unwrap().parse().unwrap()
}

fn workload<'a>(state: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    state["workloads"].as_array().unwrap().iter().find(|w| w["name"] == name).unwrap()
}

#[test]
fn the_demo_mesh_runs_meshed_traffic_and_stops_cleanly() {
    let dir = std::env::temp_dir().join(format!("weft-up-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut up = Up::start(&demo_mesh(), &dir);
    let state = up.state();
    // The local root is kept for the next `weft up` (sidecars from before and after a
    // restart of the control plane keep trusting each other).
    assert!(dir.join("ca/weft.local/root.crt").exists() && dir.join("ca/weft.local/root.key").exists());

    // A user's request from the loadgen's sidecar reaches the frontend, which calls both
    // backends through its own sidecar. numbers fails 10 % of its requests; the route's
    // retries hide that. words is a 90/10 canary.
    let via = format!("http://{}", addr(&workload(&state, "loadgen")["outbound"]));
    let mut v1 = 0;
    for _ in 0..40 {
        let (status, body, err) = curl(&["-x", &via, "http://frontend:8080/"]);
        assert_eq!(status, 200, "{body}{err}");
        assert!(body.contains("numbers: 42"), "{body}");
        v1 += usize::from(body.contains("words-v1: hello"));
    }
    assert!(v1 >= 28, "the 90/10 canary sent only {v1} of 40 requests to words-v1");
    // The canary header always reaches v2.
    for _ in 0..5 {
        let (status, body, _) = curl(&["-x", &via, "-H", "x-canary: 1", "http://words:8080/"]);
        assert_eq!((status, body.as_str()), (200, "words-v2: bonjour\n"));
    }

    // numbers is strict and admits only the frontend: a plaintext client and the
    // loadgen's (authenticated) sidecar are both refused.
    let numbers = workload(&state, "numbers");
    let (status, body, _) = curl(&["-i", &format!("http://{}/", addr(&numbers["inbound"]))]);
    assert!(status == 403 && body.contains("weft-error: unauthorized"), "{status} {body}");
    let (status, body, _) = curl(&["-i", "-x", &via, "http://numbers:8080/"]);
    assert!(status == 403 && body.contains("weft-error: unauthorized"), "{status} {body}");
    let (_, metrics) = http_get(addr(&numbers["admin"]), "/metrics").unwrap();
    let denied = "weft_inbound_denied_total{client_identity=\"spiffe://weft.local/ns/default/sa/loadgen\",protocol=\"http\"}";
    assert_eq!(metric_value(&metrics, denied), 1.0, "{metrics}");
    assert!(metric_value(&metrics, "weft_tls_handshakes_total{direction=\"inbound\",result=\"ok\"}") >= 1.0);

    // The load generator's reports: traffic flowed, nothing failed.
    weft_e2e::eventually(Duration::from_secs(20), "two load reports from loadgen", || {
        (up.output().lines().filter(|l| l.contains("loadgen | last 2s: ")).count() >= 2).then_some(())
    });

    // `weft stat` reads the running mesh: the frontend serves the load at 100 % success.
    let stat = weft_e2e::run(
        Command::new(bin("weft")).args(["stat", "--interval", "1", "--state-file"]).arg(dir.join("up.json")),
    );
    let table = String::from_utf8_lossy(&stat.stdout);
    assert!(stat.status.success(), "{table}{}", String::from_utf8_lossy(&stat.stderr));
    let frontend: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("frontend "))
        .expect("a frontend row")
        .split_whitespace()
        .collect();
    assert_eq!(frontend[1], "100.00%", "{table}");
    assert!(frontend[2].parse::<f64>().unwrap() >= 5.0, "{table}");
    assert!(table.lines().any(|l| l.starts_with("numbers ")), "{table}");

    // A second mesh on the same state file is refused while this one runs.
    let second = weft_e2e::run(
        Command::new(bin("weft"))
            .arg("up")
            .arg(dir.join("mesh.yaml"))
            .arg("--state-file")
            .arg(dir.join("up.json")),
    );
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && err.contains("already running"), "{err}");

    let status = up.interrupt();
    assert!(status.success(), "weft up exited with {status}:\n{}", up.output());
    let out = up.output();
    for line in out.lines().filter(|l| l.contains("loadgen | last 2s: ")) {
        assert!(line.contains(" 0 failed"), "the demo's requests failed: {line}");
    }
    assert!(out.contains("frontend-proxy | ") && out.contains("drained"), "{out}");
    assert!(!dir.join("up.json").exists(), "the state file outlived the mesh");
    // Every part is gone: no sidecar admin port or app port answers.
    for name in ["frontend", "words-v1", "words-v2", "numbers", "loadgen"] {
        let w = workload(&state, name);
        for port in ["admin", "inbound", "outbound"] {
            assert!(std::net::TcpStream::connect(addr(&w[port])).is_err(), "{name} {port} still listens");
        }
    }
    assert!(std::net::TcpStream::connect(addr(&numbers["app"])).is_err(), "numbers app still listens");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_invalid_mesh_file_is_refused_with_its_line() {
    let dir = std::env::temp_dir().join(format!("weft-up-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("mesh.yaml");
    std::fs::write(&file, "workloads:\n  - name: web\n    tokn: web-token-0123456789\n").unwrap();
    let out = weft_e2e::run(
        Command::new(bin("weft")).arg("up").arg(&file).arg("--state-file").arg(dir.join("up.json")),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("line 3") && err.contains("unknown field `tokn`"), "{err}");
    assert!(!dir.join("up.json").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tracing:` in the mesh file: `weft up` starts the collector it names (here a real OTLP
/// receiver), points every sidecar at it, and stops it last, after the sidecars have sent
/// their final spans. The demo's traces then show every hop: loadgen → frontend → words
/// and numbers, one trace per request.
#[test]
fn the_demo_mesh_sends_its_traces_to_the_collector_of_the_mesh_file() {
    let dir = std::env::temp_dir().join(format!("weft-up-traces-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let [grpc, http] = free_addrs::<2>();
    let out = dir.join("spans.jsonl");
    let tracing = format!(
        "\ntracing:\n  endpoint: http://{grpc}\n  collector: [{}, {}, server, \"{}\", \"{}\", {}]\n",
        weft_e2e::python().display(),
        weft_e2e::py_script("otlp_receiver.py").display(),
        grpc.port(),
        http.port(),
        out.display()
    );
    let mut up = Up::start(&(demo_mesh() + &tracing), &dir);
    let state = up.state();
    let via = format!("http://{}", addr(&workload(&state, "loadgen")["outbound"]));
    for _ in 0..5 {
        let (status, body, err) = curl(&["-x", &via, "http://frontend:8080/"]);
        assert_eq!(status, 200, "{body}{err}");
    }
    let status = up.interrupt();
    assert!(status.success(), "weft up exited with {status}:\n{}", up.output());
    assert!(std::net::TcpStream::connect(grpc).is_err(), "the collector outlived the mesh");

    let spans: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Group by trace: a request of the load generator is seen by five sidecars.
    let mut traces: std::collections::HashMap<&str, Vec<&serde_json::Value>> = Default::default();
    for s in &spans {
        traces.entry(s["trace_id"].as_str().unwrap()).or_default().push(s);
    }
    let full = traces.values().find(|t| {
        let services: std::collections::BTreeSet<&str> =
            t.iter().map(|s| s["service"].as_str().unwrap()).collect();
        ["loadgen", "frontend", "numbers"].iter().all(|n| services.contains(n))
            && (services.contains("words-v1") || services.contains("words-v2"))
    });
    let full = full.unwrap_or_else(|| {
        panic!("no trace crosses every workload; {} spans:\n{}", spans.len(), up.output())
    });
    // Every span but the root has its parent in the same trace.
    let ids: std::collections::HashSet<&str> = full.iter().map(|s| s["span_id"].as_str().unwrap()).collect();
    let orphans = full
        .iter()
        .filter(|s| s["parent_span_id"] != "" && !ids.contains(s["parent_span_id"].as_str().unwrap()));
    assert_eq!(orphans.count(), 0, "{full:#?}");
    assert_eq!(full.iter().filter(|s| s["parent_span_id"] == "").count(), 1, "{full:#?}");
    let _ = std::fs::remove_dir_all(&dir);
}
