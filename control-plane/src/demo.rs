//! `weft demo`: two apps talking through weft-proxy sidecars on this machine.
//!
//! A `hello` app gets a sidecar on its inbound side; a load generator sends requests
//! through its own sidecar's outbound listener, used as an HTTP proxy, the way an app
//! with `http_proxy` set would. The two sidecars carry the HTTP/1 traffic between them
//! over HTTP/2. Every two seconds the demo prints what the client saw and what each
//! sidecar counted on its admin port. Ctrl-C drains the sidecars through `/shutdown`.

use std::{
    net::{SocketAddr, TcpListener as StdListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

pub struct Options {
    pub rate: u32,
    pub duration: Option<Duration>,
    pub state_dir: PathBuf,
}

struct Sidecar {
    name: &'static str,
    inbound: SocketAddr,
    outbound: SocketAddr,
    admin: SocketAddr,
    child: Child,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Default)]
struct Stats {
    ok: u64,
    failed: u64,
    latencies_us: Vec<u64>,
    last_error: Option<String>,
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let proxy_bin = proxy_binary()?;
    std::fs::create_dir_all(&opts.state_dir)
        .with_context(|| format!("cannot create {}", opts.state_dir.display()))?;

    let app = TcpListener::bind("127.0.0.1:0").await?;
    let app_addr = app.local_addr()?;
    tokio::spawn(serve_hello(app));

    let server =
        start_sidecar(&proxy_bin, "hello", &opts.state_dir, &[("WEFT_APP_ADDR", app_addr.to_string())])?;
    // The client's sidecar knows loopback peers run weft-proxy, so HTTP/1 rides HTTP/2.
    let client = start_sidecar(
        &proxy_bin,
        "loadgen",
        &opts.state_dir,
        &[("WEFT_MESH_NETWORKS", "127.0.0.0/8".into())],
    )?;
    for s in [&server, &client] {
        wait_ready(s).await?;
    }

    println!("weft demo: two apps meshed by weft-proxy on this machine\n");
    println!("  hello app            http://{app_addr}/");
    for s in [&server, &client] {
        println!(
            "  {:<8} sidecar     inbound {}  outbound {}  admin http://{}/metrics",
            s.name, s.inbound, s.outbound, s.admin
        );
    }
    println!("  sidecar logs         {}/", opts.state_dir.display());
    println!(
        "\n  loadgen → {} (its sidecar, as http_proxy) → {} (hello's sidecar) → hello app",
        client.outbound, server.inbound
    );
    println!("  try it yourself:     curl -x http://{} http://{}/\n", client.outbound, server.inbound);
    println!("Ctrl-C stops the demo.\n");

    let stats = Arc::new(Mutex::new(Stats::default()));
    tokio::spawn(load(client.outbound, server.inbound, opts.rate, stats.clone()));

    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => report(&stats, &server, &client).await,
            _ = tokio::signal::ctrl_c() => break,
        }
        if opts.duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
    }
    println!("\nstopping: draining the sidecars");
    for s in [&server, &client] {
        let _ = http_request(s.admin, "POST", "/shutdown", None).await;
    }
    for mut s in [server, client] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.child.try_wait()?.is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// weft-proxy is built next to weft (`cargo build` puts both in target/<profile>/).
fn proxy_binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("WEFT_PROXY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name("weft-proxy");
    if !p.exists() {
        bail!("{} not found: build it with `cargo build --release` or set WEFT_PROXY_BIN", p.display());
    }
    Ok(p)
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn start_sidecar(
    bin: &Path,
    name: &'static str,
    dir: &Path,
    env: &[(&str, String)],
) -> anyhow::Result<Sidecar> {
    let (inbound, outbound, admin) = (free_addr()?, free_addr()?, free_addr()?);
    let log = dir.join(format!("{name}-proxy.log"));
    let mut cmd = Command::new(bin);
    cmd.env("WEFT_INBOUND_ADDR", inbound.to_string())
        .env("WEFT_OUTBOUND_ADDR", outbound.to_string())
        .env("WEFT_ADMIN_ADDR", admin.to_string())
        .env("WEFT_ACCESS_LOG", "on")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).with_context(|| format!("cannot write {}", log.display()))?);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().with_context(|| format!("cannot start {}", bin.display()))?;
    Ok(Sidecar { name, inbound, outbound, admin, child })
}

async fn wait_ready(s: &Sidecar) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok((200, _)) = http_request(s.admin, "GET", "/ready", None).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("the {} sidecar did not become ready; see its log", s.name)
}

async fn serve_hello(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let svc = service_fn(|req: Request<Incoming>| async move {
                let body =
                    format!("hello from the demo app ({} {} via weft)\n", req.method(), req.uri().path());
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(body))))
            });
            let _ =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// Sends `rate` requests per second through `proxy` to `target`, on one keep-alive
/// connection that is reopened when it fails.
async fn load(proxy: SocketAddr, target: SocketAddr, rate: u32, stats: Arc<Mutex<Stats>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    let mut sender = None;
    loop {
        tick.tick().await;
        if sender.is_none() {
            sender = connect(proxy).await.ok();
        }
        let Some(s) = sender.as_mut() else {
            stats.lock().unwrap().failed += 1;
            continue;
        };
        let req = Request::get(format!("http://{target}/hello"))
            .header("host", target.to_string())
            .body(Empty::<Bytes>::new())
            .expect("valid request");
        let start = Instant::now();
        let res = async {
            let rsp = s.send_request(req).await?;
            let status = rsp.status();
            rsp.into_body().collect().await?;
            Ok::<_, hyper::Error>(status)
        }
        .await;
        let mut st = stats.lock().unwrap();
        match res {
            Ok(status) if status.is_success() => {
                st.ok += 1;
                st.latencies_us.push(start.elapsed().as_micros() as u64);
            }
            Ok(status) => {
                st.failed += 1;
                st.last_error = Some(format!("HTTP {status}"));
            }
            Err(e) => {
                st.failed += 1;
                st.last_error = Some(e.to_string());
                sender = None;
            }
        }
    }
}

async fn connect(addr: SocketAddr) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn report(stats: &Mutex<Stats>, server: &Sidecar, client: &Sidecar) {
    let (ok, failed, mut lat, err) = {
        let mut st = stats.lock().unwrap();
        let snapshot = (st.ok, st.failed, std::mem::take(&mut st.latencies_us), st.last_error.take());
        st.ok = 0;
        st.failed = 0;
        snapshot
    };
    lat.sort_unstable();
    let pct = |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied();
    let ms =
        |v: Option<u64>| v.map(|us| format!("{:.2}ms", us as f64 / 1000.0)).unwrap_or_else(|| "-".into());
    let out = total_requests(client.admin, "outbound").await;
    let inb = total_requests(server.admin, "inbound").await;
    println!(
        "loadgen: {:>4} ok {:>3} failed  p50 {:>8} p99 {:>8} | loadgen sidecar outbound total {:>6} | hello sidecar inbound total {:>6}{}",
        ok,
        failed,
        ms(pct(0.5)),
        ms(pct(0.99)),
        out,
        inb,
        err.map(|e| format!("  last error: {e}")).unwrap_or_default()
    );
}

/// Sum of `weft_requests_total` for one direction, read from a sidecar's admin port.
async fn total_requests(admin: SocketAddr, direction: &str) -> u64 {
    let Ok((_, text)) = http_request(admin, "GET", "/metrics", None).await else { return 0 };
    let prefix = format!("weft_requests_total{{direction=\"{direction}\"");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await??;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))?;
    let rsp = sender.send_request(req).await?;
    let status = rsp.status().as_u16();
    let text = rsp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&text).into_owned()))
}
