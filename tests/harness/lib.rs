//! Test harness for Weft's end-to-end tests: real `weft-proxy` processes, in-process
//! backends on real sockets, and the real clients a user would run (curl, grpcio,
//! websockets). `netns` runs pods as network namespaces for transparent mode.

pub mod backend;
pub mod control;
pub mod kube;
pub mod kubelet;
pub mod mesh;
pub mod netns;
pub mod otlp;

use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::Ordering::SeqCst,
    time::{Duration, Instant},
};

/// A request's query parameters (`a=1&b=2`), undecoded.
pub fn query_params<C: FromIterator<(String, String)>>(uri: &http::Uri) -> C {
    let query = uri.query().unwrap_or("");
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A binary built from this workspace (`cargo build --workspace` runs before the tests).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>; a binary (the benchmarks')
    // is in target/<profile> itself.
    let dir = exe.parent().expect("target dir");
    let dir = if dir.ends_with("deps") { dir.parent().expect("target dir") } else { dir };
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace` before the tests", path.display());
    path
}

/// A port that is free on 127.0.0.1, for an address a test must know before the process
/// that binds it starts (a mesh file naming a sidecar's inbound). Taken below the
/// kernel's ephemeral range (32768 and up on Linux), so no process binding port 0 and no
/// outgoing connection can take it in the meantime; consecutive within a test process,
/// so two tests never pick the same one. Everything else binds port 0 and reports what
/// it got (`Proxy::spawn`, `Control::start`).
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    const LOW: u16 = 20_000;
    const SPAN: u16 = 12_000;
    let _ = NEXT.compare_exchange(0, (std::process::id() % u32::from(SPAN)) as u16 + 1, SeqCst, SeqCst);
    loop {
        let port = LOW + NEXT.fetch_add(1, SeqCst) % SPAN;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// `n` distinct free addresses (see [`free_port`]).
pub fn free_addrs<const N: usize>() -> [SocketAddr; N] {
    std::array::from_fn(|_| free_addr())
}

/// A running `weft-proxy` in explicit mode on loopback; killed when dropped.
pub struct Proxy {
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub child: Child,
    pub log: PathBuf,
}

impl Proxy {
    /// Starts a proxy with the given extra `WEFT_*` settings and waits until it is ready.
    pub fn start(env: &[(&str, &str)]) -> Proxy {
        let mut p = Proxy::spawn(env);
        p.wait_ready();
        p
    }

    /// Starts a proxy without waiting for it to be ready. Its listeners bind port 0 unless
    /// `env` names an address; the addresses it got are read from its `listening` log line.
    pub fn spawn(env: &[(&str, &str)]) -> Proxy {
        Self::spawn_via(&[], env)
    }

    /// Like `spawn`, run through `wrapper` (e.g. `prlimit --nofile=256:256 --`).
    pub fn spawn_via(wrapper: &[&str], env: &[(&str, &str)]) -> Proxy {
        let log = std::env::temp_dir().join(format!(
            "weft-proxy-{}-{}.log",
            std::process::id(),
            LOGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin("weft-proxy"));
                c
            }
            None => Command::new(bin("weft-proxy")),
        };
        cmd.env("WEFT_INBOUND_ADDR", "127.0.0.1:0")
            .env("WEFT_OUTBOUND_ADDR", "127.0.0.1:0")
            .env("WEFT_ADMIN_ADDR", "127.0.0.1:0")
            .env("WEFT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start weft-proxy");
        let read = || std::fs::read_to_string(&log).unwrap_or_default();
        let line = eventually(Duration::from_secs(10), "weft-proxy's listening line", || {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("weft-proxy exited with {status} before listening:\n{}", read());
            }
            read().lines().find(|l| l.contains("listening") && l.contains("admin")).map(str::to_string)
        });
        let addr =
            |key: &str| log_field(&line, key).unwrap_or_else(|| panic!("no {key} address in {line:?}"));
        Proxy { inbound: addr("inbound"), outbound: addr("outbound"), admin: addr("admin"), child, log }
    }

    pub fn wait_ready(&mut self) {
        let ready = within(Duration::from_secs(10), || {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("weft-proxy exited with {status} before ready:\n{}", self.logs());
            }
            http_get(self.admin, "/ready").filter(|(status, _)| *status == 200).map(drop)
        });
        assert!(ready.is_some(), "weft-proxy not ready after 10s:\n{}", self.logs());
    }

    /// Waits until the series that `series` selects adds up to `value` (the proxy records
    /// some outcomes after the client has its answer).
    pub fn wait_metric(&self, series: &str, value: f64) {
        eventually(Duration::from_secs(5), series, || (self.metric(series) == value).then_some(()));
    }

    /// Waits until the series adds up to at least `value` (counters that keep growing).
    pub fn wait_metric_at_least(&self, series: &str, value: f64) {
        eventually(Duration::from_secs(10), series, || (self.metric(series) >= value).then_some(()));
    }

    /// Waits until this proxy holds a control-plane answer of `kind` (`discovery`,
    /// `policy`, `routes`) made from state `generation` or later (see `Control::apply`).
    pub fn wait_generation(&self, kind: &str, generation: u64) {
        let series = format!("weft_control_generation{{kind=\"{kind}\"}}");
        eventually(Duration::from_secs(5), &series, || {
            (self.metric(&series) >= generation as f64).then_some(())
        });
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").map(|(_, b)| b).unwrap_or_default()
    }

    /// The sum of the series that `series` selects (see [`metric_value`]), 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics(), series)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- weft-proxy log ({}) ---\n{}", self.log.display(), self.logs());
        }
    }
}

/// The sum of every series named as in `series` whose labels include all the labels
/// `series` gives (`name{a="x"}` sums over the other labels, as PromQL's `sum` would);
/// 0 when none matches.
pub fn metric_value(text: &str, series: &str) -> f64 {
    let (name, want) = split_series(series);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(s, _)| {
            let (n, labels) = split_series(s);
            n == name && want.iter().all(|w| labels.contains(w))
        })
        .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
        .sum()
}

/// `name{a="x",b="y"}` → (`name`, [`a="x"`, `b="y"`]). Label values here never hold `",`.
fn split_series(s: &str) -> (&str, Vec<&str>) {
    match s.split_once('{') {
        None => (s, vec![]),
        Some((name, rest)) => {
            let inner = rest.trim_end_matches('}');
            (name, inner.split("\",").map(|l| l.trim_end_matches('"')).filter(|l| !l.is_empty()).collect())
        }
    }
}

/// A minimal blocking HTTP/1.0 GET for admin endpoints: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    raw_request(addr, &format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n"), Duration::from_secs(5))
        .and_then(|rsp| parse_status(&rsp).map(|s| (s, body_of(&rsp))))
}

/// Writes `request` on a fresh connection and reads until the server closes it or
/// `timeout` passes. Returns what was read.
pub fn raw_request(addr: SocketAddr, request: &str, timeout: Duration) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    Some(String::from_utf8_lossy(&out).into_owned())
}

pub fn parse_status(rsp: &str) -> Option<u16> {
    rsp.split_whitespace().nth(1)?.parse().ok()
}

pub fn body_of(rsp: &str) -> String {
    rsp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

/// Runs a command to completion, failing the test with its output if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// `curl` with the given arguments; returns (status code, stdout, stderr).
/// `-w` appends the status code on the last line of stdout.
pub fn curl(args: &[&str]) -> (u16, String, String) {
    let out = run(Command::new("curl").args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"]).args(args));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    (code.trim().parse().unwrap_or(0), body.to_string(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The Python of the test venv (made by tests/run), with grpcio and websockets.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("WEFT_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/venv/bin/python");
    assert!(p.exists(), "{} is missing: run tests/run, which creates the test venv", p.display());
    p
}

/// A Python helper script from tests/py/.
pub fn py_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py").join(name)
}

/// A Python helper server from tests/py/ (`script server PORT`), killed on drop.
pub struct PyServer(Child);

impl PyServer {
    /// Starts it and waits for its `ready` line.
    pub fn start(script: &str, port: u16) -> PyServer {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(python())
            .arg(py_script(script))
            .args(["server", &port.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "{script} did not start");
        PyServer(child)
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the client side of a tests/py/ helper (`script client TARGET`) and asserts it succeeds.
pub fn py_client(script: &str, target: &str, env: &[(&str, &str)]) {
    let out =
        run(Command::new(python()).arg(py_script(script)).args(["client", target]).envs(env.iter().copied()));
    assert!(
        out.status.success(),
        "{script} client failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sends `n` requests for `url` through the HTTP proxy at `via`, split over `clients`
/// concurrent curls (each sequential, on one connection; `extra` curl arguments first),
/// and counts what came back: `"status <code>"` per response, and the name of the test
/// backend (`backend::http`) that answered each.
pub fn tally(
    via: SocketAddr,
    clients: usize,
    n: usize,
    url: &str,
    extra: &[&str],
) -> std::collections::BTreeMap<String, usize> {
    let proxy = format!("http://{via}");
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (proxy, url) = (proxy.clone(), url.to_string());
            let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
            std::thread::spawn(move || {
                let mut args: Vec<&str> = extra.iter().map(String::as_str).collect();
                args.extend(["-x", proxy.as_str(), "-w", "\nstatus=%{http_code}\n"]);
                args.extend(vec![url.as_str(); n / clients]);
                curl(&args).1
            })
        })
        .collect();
    let mut counts = std::collections::BTreeMap::new();
    for t in threads {
        let out = t.join().unwrap();
        for part in out.split("\"backend\":\"").skip(1) {
            *counts.entry(part.split('"').next().unwrap().to_string()).or_insert(0) += 1;
        }
        for line in out.lines().filter_map(|l| l.strip_prefix("status=")) {
            *counts.entry(format!("status {line}")).or_insert(0) += 1;
        }
    }
    counts
}

/// Numbers the proxies' log files of this test process.
static LOGS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A socket address field of a log line, text (`key=addr`) or JSON (`"key":"addr"`); a
/// wildcard address becomes loopback, where a test connects.
pub fn log_field(line: &str, key: &str) -> Option<SocketAddr> {
    let rest = [format!(" {key}="), format!("\"{key}\":\"")]
        .iter()
        .find_map(|k| line.split_once(k.as_str()).map(|(_, r)| r.to_string()))?;
    let value: String = rest.chars().take_while(|c| !matches!(c, ' ' | '"' | ',' | '}')).collect();
    let addr: SocketAddr = value.parse().ok()?;
    Some(match addr.ip().is_unspecified() {
        true => SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port()),
        false => addr,
    })
}

/// Polls `check` until it gives a value, or panics naming `what` after `timeout`: tests
/// wait for a signal (a metric, a log line, an answer), never for a fixed time.
pub fn eventually<T>(timeout: Duration, what: &str, check: impl FnMut() -> Option<T>) -> T {
    within(timeout, check).unwrap_or_else(|| panic!("not within {timeout:?}: {what}"))
}

/// Polls `check` until it gives a value, or `None` after `timeout` (for a caller that
/// says more on failure than [`eventually`] can).
pub fn within<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
