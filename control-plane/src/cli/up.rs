//! `weft up`: a whole mesh on one machine from one mesh file, without root. It runs the
//! control plane, one weft-proxy sidecar per workload in explicit mode (the workload
//! calls out through `http_proxy`, and is reached through the sidecar's inbound port,
//! which is the workload's endpoint address in the file), and the workloads' own
//! commands. Logs stream with a prefix per part; the addresses of every part go to a
//! JSON state file that other `weft` commands and scripts read; Ctrl-C stops the apps,
//! drains the sidecars and stops the control plane.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener as StdListener},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::{Child, Command},
};

use weft_api::env;

use super::http_client::Client;
use crate::server::mesh::Mesh;

/// The demo mesh, used when `weft up` is given no file.
pub const DEMO_MESH: &str = include_str!("../../../examples/demo.yaml");

pub struct Options {
    /// The mesh file; `None` runs the built-in demo (examples/demo.yaml).
    pub file: Option<PathBuf>,
    pub state_file: PathBuf,
    pub duration: Option<Duration>,
    pub access_log: bool,
}

/// What `.weft/up.json` holds: where every part of a running local mesh listens.
#[derive(Debug, Serialize, Deserialize)]
pub struct State {
    /// The `weft up` process.
    pub pid: u32,
    pub mesh_file: PathBuf,
    pub control: ControlAddrs,
    pub workloads: Vec<WorkloadAddrs>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ControlAddrs {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WorkloadAddrs {
    pub name: String,
    pub identity: String,
    /// The sidecar's inbound listener: the workload's endpoint address in the mesh file.
    pub inbound: SocketAddr,
    /// The sidecar's outbound listener, the workload's `http_proxy`.
    pub outbound: SocketAddr,
    /// The sidecar's admin port: /metrics, /ready, /live.
    pub admin: SocketAddr,
    /// Where the workload's app listens.
    pub app: SocketAddr,
    /// Whether `weft up` runs the app (the workload has a command).
    pub runs_app: bool,
}

impl State {
    /// Reads the state file of a running local mesh.
    pub fn read(path: &Path) -> anyhow::Result<State> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!("cannot read {}: is a local mesh running? Start one with `weft up`", path.display())
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a weft up state file", path.display()))
    }
}

/// A child process that is killed if `weft up` fails or returns early.
struct Part {
    name: String,
    child: Child,
    exited: bool,
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let state_dir = opts.state_file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(state_dir).with_context(|| format!("cannot create {}", state_dir.display()))?;
    refuse_second_mesh(&opts.state_file).await?;

    let mesh_file = match &opts.file {
        Some(f) => f.clone(),
        None => {
            let f = state_dir.join("demo.yaml");
            std::fs::write(&f, DEMO_MESH).with_context(|| format!("cannot write {}", f.display()))?;
            f
        }
    };
    let mesh_file = std::fs::canonicalize(&mesh_file)
        .with_context(|| format!("cannot read the mesh file {}", mesh_file.display()))?;
    let text = std::fs::read_to_string(&mesh_file)
        .with_context(|| format!("cannot read the mesh file {}", mesh_file.display()))?;
    let mesh = Mesh::parse(&mesh_file.display().to_string(), &text)?;
    let state = plan(&mesh, &mesh_file)?;
    let tokens = write_tokens(&mesh, state_dir)?;
    let (root_cert, root_key) = local_root(&mesh.trust_domain, state_dir)?;
    let exe = std::env::current_exe()?;
    let proxy_bin = proxy_binary(&exe)?;
    let width = mesh.workloads.iter().map(|w| w.name.len() + 6).max().unwrap_or(7).max(7);

    let mut parts: Vec<Part> = Vec::new();
    let bin_dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if let Some(t) = mesh.tracing.as_ref().filter(|t| !t.collector.is_empty()) {
        let mut cmd = Command::new(&t.collector[0]);
        cmd.args(&t.collector[1..]).env("PATH", prepend_path(&bin_dir));
        parts.push(spawn("collector", cmd, width)?);
        wait_listening("the trace collector", &t.endpoint, &mut parts).await?;
    }
    let otel = |name: &str| mesh.tracing.as_ref().map(|t| t.env(name)).unwrap_or_default();
    let mut control = Command::new(&exe);
    control
        .arg("control")
        .arg("--mesh")
        .arg(&mesh_file)
        .args(["--grpc-addr", &state.control.grpc.to_string()])
        .args(["--admin-addr", &state.control.admin.to_string()])
        .arg("--ca-cert")
        .arg(&root_cert)
        .arg("--ca-key")
        .arg(&root_key);
    parts.push(spawn("control", control, width)?);
    wait_ready("the control plane", state.control.admin, &mut parts).await?;

    for w in &state.workloads {
        let mut cmd = Command::new(&proxy_bin);
        cmd.env(env::INBOUND_ADDR, w.inbound.to_string())
            .env(env::OUTBOUND_ADDR, w.outbound.to_string())
            .env(env::ADMIN_ADDR, w.admin.to_string())
            .env(env::APP_ADDR, w.app.to_string())
            // Ready only once the app port's policy is in: never a window of the default.
            .env(env::INBOUND_PORTS, w.app.port().to_string())
            .env(env::CONTROL_ADDR, state.control.grpc.to_string())
            .env(env::IDENTITY, &w.identity)
            .env(env::TOKEN_FILE, &tokens[&w.name])
            .env(env::WORKLOAD, &w.name)
            .env(env::ACCESS_LOG, if opts.access_log { "on" } else { "off" })
            .envs(otel(&w.name));
        parts.push(spawn(&format!("{}-proxy", w.name), cmd, width)?);
    }
    for w in &state.workloads {
        wait_ready(&format!("the {}-proxy sidecar", w.name), w.admin, &mut parts).await?;
    }

    // Servers first, so the callers' first requests find them listening.
    let mut apps: Vec<_> =
        mesh.workloads.iter().zip(&state.workloads).filter(|(w, _)| w.runs_app()).collect();
    apps.sort_by_key(|(w, _)| {
        !mesh.services.iter().flat_map(|s| &s.endpoints).any(|e| e.workload.as_ref() == Some(&w.name))
    });
    for (w, addrs) in apps {
        let mut cmd = Command::new(&w.command[0]);
        cmd.args(&w.command[1..])
            .env("PATH", prepend_path(&bin_dir))
            .env(env::WORKLOAD, &w.name)
            .env("LISTEN_ADDR", addrs.app.to_string())
            .env("PORT", addrs.app.port().to_string())
            .env("http_proxy", format!("http://{}", addrs.outbound))
            .env("HTTP_PROXY", format!("http://{}", addrs.outbound))
            // An app with an OpenTelemetry SDK sends its spans where its sidecar does.
            .envs(otel(&w.name))
            .envs(&w.env);
        parts.push(spawn(&w.name, cmd, width)?);
    }

    write_state(&opts.state_file, &state)?;
    print_summary(&mesh, &state, &opts.state_file);

    let result = supervise(&mut parts, opts.duration).await;
    println!("weft up: stopping");
    stop(&mut parts, &state).await;
    let _ = std::fs::remove_file(&opts.state_file);
    println!("weft up: stopped");
    result
}

impl crate::server::mesh::Workload {
    fn runs_app(&self) -> bool {
        !self.command.is_empty()
    }
}

/// Refuses to start over the state file of a local mesh that still answers.
async fn refuse_second_mesh(state_file: &Path) -> anyhow::Result<()> {
    let Ok(old) = State::read(state_file) else { return Ok(()) };
    if Client::direct().get(&format!("http://{}/live", old.control.admin)).await.is_ok() {
        bail!(
            "a local mesh is already running (pid {}, state in {}); stop it with Ctrl-C, or pass \
             --state-file to run a second one",
            old.pid,
            state_file.display()
        );
    }
    Ok(())
}

/// Chooses every address: the control plane's and each sidecar's free ports, the inbound
/// addresses the mesh file gives as endpoints, the apps' addresses.
fn plan(mesh: &Mesh, mesh_file: &Path) -> anyhow::Result<State> {
    // Held together while choosing, so no port is handed out twice; taken below the
    // kernel's ephemeral range, so that between now and the sidecar's bind no port-0 bind
    // or outgoing connection can take one.
    let mut held = Vec::new();
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, span) = (10_000u16, ephemeral.saturating_sub(10_000).max(1000));
    let mut next = (std::process::id() % u32::from(span)) as u16;
    let mut free = || -> anyhow::Result<SocketAddr> {
        for _ in 0..span {
            next = (next + 1) % span;
            if let Ok(l) = StdListener::bind(("127.0.0.1", low + next)) {
                let a = l.local_addr()?;
                held.push(l);
                return Ok(a);
            }
        }
        anyhow::bail!("no free port on 127.0.0.1 between {low} and {}", low + span)
    };
    let control = ControlAddrs { grpc: free()?, admin: free()? };
    let mut workloads = Vec::new();
    for w in &mesh.workloads {
        let mut endpoints = mesh
            .services
            .iter()
            .flat_map(|s| s.endpoints.iter().map(move |e| (s, e)))
            .filter(|(_, e)| e.workload.as_ref() == Some(&w.name));
        let inbound = match endpoints.next() {
            Some((s, e)) => {
                if let Some((s2, e2)) = endpoints.find(|(_, e2)| e2.address != e.address) {
                    bail!(
                        "workload {} is an endpoint at {} (service {}) and at {} (service {}); on the \
                         local mesh a workload has one sidecar, so its endpoints must share one address",
                        w.name,
                        e.address,
                        s.name,
                        e2.address,
                        s2.name
                    );
                }
                check_free(
                    e.address,
                    &format!("{}'s sidecar inbound (its endpoint in service {})", w.name, s.name),
                )?;
                e.address
            }
            None => free()?,
        };
        let app = match w.app {
            Some(a) => {
                if w.runs_app() {
                    check_free(a, &format!("{}'s app (workloads: app)", w.name))?;
                }
                a
            }
            None => free()?,
        };
        workloads.push(WorkloadAddrs {
            name: w.name.clone(),
            identity: mesh.identity_of(w),
            inbound,
            outbound: free()?,
            admin: free()?,
            app,
            runs_app: w.runs_app(),
        });
    }
    Ok(State { pid: std::process::id(), mesh_file: mesh_file.to_path_buf(), control, workloads })
}

fn check_free(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    StdListener::bind(addr).map(drop).map_err(|e| {
        anyhow!("cannot listen on {addr}, {what}: {e}; is another `weft up` running? Otherwise change the address in the mesh file")
    })
}

/// The local mesh's CA root, kept in the state folder (`.weft/ca/`) and reused, so a
/// control plane restarted by a later `weft up` signs under the same root and sidecars
/// from before and after the restart still trust each other. Made on first use, for
/// the mesh's trust domain (another trust domain makes a new one).
fn local_root(trust_domain: &str, dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = dir.join("ca").join(trust_domain);
    let (cert, key) = (dir.join("root.crt"), dir.join("root.key"));
    let usable = std::fs::read_to_string(&cert)
        .ok()
        .zip(std::fs::read_to_string(&key).ok())
        .is_some_and(|(c, k)| crate::server::ca::Ca::from_pem(trust_domain, &c, &k, "").is_ok());
    if usable {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    let (cert_pem, key_pem) = crate::server::ca::Ca::new_root(trust_domain, time::Duration::days(365))?;
    std::fs::write(&cert, cert_pem)?;
    let _ = std::fs::remove_file(&key);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&key)?;
    std::io::Write::write_all(&mut f, key_pem.as_bytes())?;
    Ok((cert, key))
}

/// Each sidecar reads its token from a file only its user can read, not from its environment.
fn write_tokens(mesh: &Mesh, dir: &Path) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = dir.join("tokens");
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    let mut out = BTreeMap::new();
    for w in &mesh.workloads {
        let path = dir.join(format!("{}.token", w.name));
        let _ = std::fs::remove_file(&path);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
        std::io::Write::write_all(&mut f, w.token.as_bytes())?;
        out.insert(w.name.clone(), path);
    }
    Ok(out)
}

/// weft-proxy is built next to weft (`cargo build` puts both in target/<profile>/).
fn proxy_binary(exe: &Path) -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("WEFT_PROXY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let p = exe.with_file_name("weft-proxy");
    if !p.exists() {
        bail!("{} not found: build it with `cargo build --release` or set WEFT_PROXY_BIN", p.display());
    }
    Ok(p)
}

fn prepend_path(dir: &Path) -> std::ffi::OsString {
    let mut paths = vec![dir.to_path_buf()];
    paths.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    std::env::join_paths(paths).unwrap_or_default()
}

/// Starts a part with its output streamed line by line behind `name | `.
fn spawn(name: &str, mut cmd: Command, width: usize) -> anyhow::Result<Part> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let program = cmd.as_std().get_program().to_string_lossy().into_owned();
    let mut child = cmd.spawn().with_context(|| format!("cannot start {name} ({program})"))?;
    let prefix = format!("{name:>width$} | ");
    if let Some(out) = child.stdout.take() {
        tokio::spawn(stream_lines(out, prefix.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(stream_lines(err, prefix));
    }
    Ok(Part { name: name.to_string(), child, exited: false })
}

async fn stream_lines(from: impl AsyncRead + Unpin, prefix: String) {
    let mut lines = BufReader::new(from).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        println!("{prefix}{line}");
    }
}

/// An error naming the part that has exited, if one has.
fn exited_while_starting(what: &str, parts: &mut [Part]) -> anyhow::Result<()> {
    match parts.iter_mut().find_map(|p| p.child.try_wait().ok().flatten().map(|s| (p.name.clone(), s))) {
        Some((name, status)) => bail!("{name} exited ({status}) while {what} was starting; its log is above"),
        None => Ok(()),
    }
}

/// Waits until something accepts TCP at `endpoint` (an http:// URL).
async fn wait_listening(what: &str, endpoint: &str, parts: &mut [Part]) -> anyhow::Result<()> {
    let uri: http::Uri = endpoint.parse()?;
    let (host, port) = (uri.host().unwrap_or("127.0.0.1").to_string(), uri.port_u16().unwrap_or(80));
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect((host.as_str(), port)).await.is_ok() {
            return Ok(());
        }
        exited_while_starting(what, parts)?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{what} does not accept connections at {endpoint} after 15 s; check tracing.collector and tracing.endpoint")
}

async fn wait_ready(what: &str, admin: SocketAddr, parts: &mut [Part]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let client = Client::direct();
    let url = format!("http://{admin}/ready");
    while Instant::now() < deadline {
        if client.get(&url).await.is_ok_and(|r| r.status == 200) {
            return Ok(());
        }
        exited_while_starting(what, parts)?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what} did not become ready within 15 s; its log is above")
}

fn write_state(path: &Path, state: &State) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(state)?)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write {}", path.display()))
}

fn print_summary(mesh: &Mesh, state: &State, state_file: &Path) {
    println!("\nweft up: the mesh of {} is running\n", state.mesh_file.display());
    println!("  control plane   grpc {}   admin http://{}/metrics", state.control.grpc, state.control.admin);
    println!(
        "\n  {:<14} {:<21} {:<21} {:<21} {:<21}",
        "workload", "inbound (endpoint)", "outbound (http_proxy)", "admin", "app"
    );
    for w in &state.workloads {
        let app = if w.runs_app { w.app.to_string() } else { format!("{} (not run)", w.app) };
        println!("  {:<14} {:<21} {:<21} {:<21} {:<21}", w.name, w.inbound, w.outbound, w.admin, app);
    }
    println!("\n  state file      {}", state_file.display());
    if let Some(t) = &mesh.tracing {
        println!(
            "  traces          OTLP {} to {} (Jaeger's UI: http://127.0.0.1:16686)",
            t.protocol, t.endpoint
        );
    }
    // A request a user can send: from a workload's sidecar to the first service.
    if let (Some(s), Some(from)) = (mesh.services.first(), state.workloads.last()) {
        println!("  try             curl -x http://{} http://{}:{}/", from.outbound, s.name, s.port);
    }
    println!("\nCtrl-C stops everything.\n");
}

/// Runs until Ctrl-C, SIGTERM, the end of `duration`, or the failure of the control
/// plane or a sidecar. An app that exits is reported; the mesh keeps running.
async fn supervise(parts: &mut [Part], duration: Option<Duration>) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let deadline = duration.map(|d| Instant::now() + d);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = tick.tick() => {}
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(());
        }
        for p in parts.iter_mut().filter(|p| !p.exited) {
            if let Ok(Some(status)) = p.child.try_wait() {
                p.exited = true;
                if p.name == "control" || p.name.ends_with("-proxy") {
                    bail!("{} exited ({status}); stopping the mesh", p.name);
                }
                println!("weft up: {} exited ({status}); the rest of the mesh keeps running", p.name);
            }
        }
    }
}

/// Apps first (SIGTERM), then the sidecars drain (admin /shutdown), then the control
/// plane; anything still running after its grace period is killed.
async fn stop(parts: &mut [Part], state: &State) {
    // The control plane and the collector go last: draining sidecars still send spans.
    let is_app = |p: &Part| !p.name.ends_with("-proxy") && p.name != "control" && p.name != "collector";
    for p in parts.iter_mut().filter(|p| is_app(p)) {
        terminate(p);
    }
    wait_exit(parts.iter_mut().filter(|p| is_app(p)), Duration::from_secs(5)).await;
    let client = Client::direct();
    for w in &state.workloads {
        let _ = client
            .request(
                http::Method::POST,
                &format!("http://{}/shutdown", w.admin),
                &Default::default(),
                Default::default(),
            )
            .await;
    }
    wait_exit(parts.iter_mut().filter(|p| p.name.ends_with("-proxy")), Duration::from_secs(10)).await;
    for p in parts.iter_mut().filter(|p| p.name == "control" || p.name == "collector") {
        terminate(p);
    }
    wait_exit(parts.iter_mut(), Duration::from_secs(5)).await;
}

fn terminate(p: &Part) {
    use nix::{sys::signal, unistd::Pid};
    if let Some(pid) = p.child.id() {
        let _ = signal::kill(Pid::from_raw(pid as i32), signal::Signal::SIGTERM);
    }
}

async fn wait_exit<'a>(parts: impl Iterator<Item = &'a mut Part>, grace: Duration) {
    for p in parts {
        if tokio::time::timeout(grace, p.child.wait()).await.is_err() {
            println!("weft up: {} did not stop within {grace:?}; killing it", p.name);
            let _ = p.child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_root_is_kept_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("weft-up-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (cert, key) = local_root("weft.local", &dir).unwrap();
        let first = std::fs::read_to_string(&cert).unwrap();
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        // A restart signs under the same root.
        let (cert2, _) = local_root("weft.local", &dir).unwrap();
        assert_eq!(std::fs::read_to_string(cert2).unwrap(), first);
        // A damaged key makes a new one rather than a control plane that cannot start.
        std::fs::write(&key, "garbage").unwrap();
        let (cert3, _) = local_root("weft.local", &dir).unwrap();
        assert_ne!(std::fs::read_to_string(cert3).unwrap(), first);
        let _ = std::fs::remove_dir_all(dir);
    }
}
