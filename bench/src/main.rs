//! weft-load: sends HTTP/1.1 requests at a constant rate and reports latency percentiles
//! corrected for coordinated omission: requests are released on schedule (open loop)
//! and each one's latency counts from its release, not from when a connection became
//! free, so a stall shows up in the percentiles instead of silently lowering the offered
//! load (the method of wrk2, which Debian does not package). Release happens within one
//! timer tick of the schedule; that slack of our own timer is not counted.
//!
//! Besides the percentiles it reports, per second of measured load, how many requests
//! succeeded and failed (`timeline`), and what the failures were (`failures`: the
//! `weft-error` a proxy answered with, else the status, else `transport`), so a chaos
//! run can show when errors started and stopped.
//!
//! With `--new-connections` it measures connection setup instead: `--connections`
//! workers each open a connection (through a `CONNECT` tunnel when `--tunnel` names an
//! authority, so a mesh proxy makes one new mTLS connection per tunnel), send one
//! request, read the answer and close, as fast as they can; it reports connections per
//! second.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, Mutex};

#[derive(Parser)]
struct Args {
    /// Address to connect to.
    #[arg(long)]
    addr: SocketAddr,
    /// Host header (defaults to the address).
    #[arg(long)]
    host: Option<String>,
    #[arg(long, default_value = "/")]
    path: String,
    /// Requests per second to offer.
    #[arg(long, default_value_t = 5000)]
    rate: u32,
    /// Seconds of measured load.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Seconds of unmeasured load first.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Keep-alive connections (with --new-connections: concurrent workers).
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Measure connection setup: a new connection for every request, closed loop.
    #[arg(long)]
    new_connections: bool,
    /// With --new-connections: open each connection as a CONNECT tunnel to this authority.
    #[arg(long)]
    tunnel: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let report = if args.new_connections { rt.block_on(connections(args))? } else { rt.block_on(run(args))? };
    println!("{report}");
    Ok(())
}

struct Outcome {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
    /// Per second of measured load (when the answer came): successes and failures.
    timeline: Vec<[u64; 2]>,
    failures: BTreeMap<String, u64>,
}

impl Outcome {
    fn new() -> anyhow::Result<Outcome> {
        Ok(Outcome {
            hist: Histogram::new(3)?,
            ok: 0,
            errors: 0,
            timeline: Vec::new(),
            failures: BTreeMap::new(),
        })
    }

    fn mark(&mut self, second: usize, ok: bool) {
        if self.timeline.len() <= second {
            self.timeline.resize(second + 1, [0, 0]);
        }
        self.timeline[second][usize::from(!ok)] += 1;
    }

    fn add(&mut self, other: Outcome) -> anyhow::Result<()> {
        self.hist.add(&other.hist)?;
        self.ok += other.ok;
        self.errors += other.errors;
        if self.timeline.len() < other.timeline.len() {
            self.timeline.resize(other.timeline.len(), [0, 0]);
        }
        for (mine, theirs) in self.timeline.iter_mut().zip(other.timeline) {
            mine[0] += theirs[0];
            mine[1] += theirs[1];
        }
        for (k, v) in other.failures {
            *self.failures.entry(k).or_default() += v;
        }
        Ok(())
    }
}

async fn run(args: Args) -> anyhow::Result<serde_json::Value> {
    let host = args.host.clone().unwrap_or_else(|| args.addr.to_string());
    let period = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup);
    let (tx, rx) = mpsc::unbounded_channel::<(Instant, bool)>();
    let rx = Arc::new(Mutex::new(rx));
    let mut workers = Vec::new();
    for _ in 0..args.connections {
        let (rx, host, path, addr) = (rx.clone(), host.clone(), args.path.clone(), args.addr);
        workers.push(tokio::spawn(worker(addr, host, path, rx, measure_from)));
    }

    let end = measure_from + Duration::from_secs(args.seconds);
    let mut next = start;
    let mut sent = 0u64;
    while next < end {
        let now = Instant::now();
        while next <= now && next < end {
            tx.send((now, next >= measure_from)).ok();
            if next >= measure_from {
                sent += 1;
            }
            next += period;
        }
        tokio::time::sleep_until(next.into()).await;
    }
    drop(tx);
    let mut total = Outcome::new()?;
    for w in workers {
        total.add(w.await??)?;
    }
    let elapsed = Instant::now().saturating_duration_since(measure_from).as_secs_f64();
    let ms = |q: f64| total.hist.value_at_quantile(q) as f64 / 1e6;
    Ok(serde_json::json!({
        "rate": args.rate,
        "sent": sent,
        "ok": total.ok,
        "errors": total.errors,
        "achieved_rps": total.ok as f64 / elapsed.max(1e-9),
        "p50_ms": ms(0.5),
        "p99_ms": ms(0.99),
        "p999_ms": ms(0.999),
        "max_ms": total.hist.max() as f64 / 1e6,
        "failures": total.failures,
        "timeline": total.timeline,
    }))
}

async fn connect(addr: SocketAddr) -> anyhow::Result<http1::SendRequest<Empty<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn worker(
    addr: SocketAddr,
    host: String,
    path: String,
    rx: Arc<Mutex<mpsc::UnboundedReceiver<(Instant, bool)>>>,
    measure_from: Instant,
) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new()?;
    let mut sender = None;
    loop {
        // `dispatched` is when the scheduler released the request (within a timer tick of
        // its slot): time waiting for a free connection counts, our own timer slack does not.
        let Some((dispatched, measured)) = rx.lock().await.recv().await else { return Ok(out) };
        if sender.is_none() {
            sender = connect(addr).await.ok();
        }
        let result = match sender.as_mut() {
            None => Err("transport".to_string()),
            Some(s) => {
                let req = http::Request::get(path.as_str())
                    .header(http::header::HOST, host.as_str())
                    .body(Empty::new())
                    .expect("valid request");
                match s.send_request(req).await {
                    Ok(rsp) if rsp.status().is_success() => {
                        rsp.into_body().collect().await.map(|_| ()).map_err(|_| "transport".to_string())
                    }
                    Ok(rsp) => Err(match rsp.headers().get("weft-error").and_then(|v| v.to_str().ok()) {
                        Some(cause) => format!("{} {cause}", rsp.status().as_u16()),
                        None => rsp.status().as_u16().to_string(),
                    }),
                    Err(_) => Err("transport".to_string()),
                }
            }
        };
        let latency = dispatched.elapsed();
        let second =
            usize::try_from(Instant::now().saturating_duration_since(measure_from).as_secs()).unwrap_or(0);
        match result {
            Ok(()) if measured => {
                out.ok += 1;
                out.hist.record(latency.as_nanos().max(1) as u64)?;
                out.mark(second, true);
            }
            Ok(()) => {}
            Err(kind) => {
                // A failed answer may leave the connection usable, but not knowing, start over.
                sender = None;
                if measured {
                    out.errors += 1;
                    out.mark(second, false);
                    *out.failures.entry(kind).or_default() += 1;
                }
            }
        }
    }
}

/// Closed loop: every worker opens a connection, sends one request, closes, again.
async fn connections(args: Args) -> anyhow::Result<serde_json::Value> {
    let host = args.host.clone().unwrap_or_else(|| args.addr.to_string());
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup);
    let end = measure_from + Duration::from_secs(args.seconds);
    let mut workers = Vec::new();
    for _ in 0..args.connections {
        let (host, path, tunnel, addr) = (host.clone(), args.path.clone(), args.tunnel.clone(), args.addr);
        workers.push(tokio::spawn(async move {
            let (mut ok, mut errors) = (0u64, 0u64);
            while Instant::now() < end {
                let res = one_connection(addr, tunnel.as_deref(), &host, &path).await;
                if Instant::now() >= measure_from {
                    match res {
                        Ok(()) => ok += 1,
                        Err(_) => errors += 1,
                    }
                }
            }
            (ok, errors)
        }));
    }
    let (mut ok, mut errors) = (0, 0);
    for w in workers {
        let (o, e) = w.await?;
        ok += o;
        errors += e;
    }
    let elapsed = Instant::now().saturating_duration_since(measure_from).as_secs_f64();
    Ok(serde_json::json!({ "ok": ok, "errors": errors, "conns_per_s": ok as f64 / elapsed.max(1e-9) }))
}

async fn one_connection(
    addr: SocketAddr,
    tunnel: Option<&str>,
    host: &str,
    path: &str,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    if let Some(authority) = tunnel {
        stream
            .write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
            .await?;
        // The proxy's answer is a bare head: read until its blank line.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            if stream.read(&mut b).await? == 0 {
                anyhow::bail!("tunnel closed");
            }
            head.push(b[0]);
        }
        anyhow::ensure!(head.starts_with(b"HTTP/1.1 200"), "CONNECT refused");
    }
    let (mut sender, conn) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let req =
        http::Request::get(path).header(http::header::HOST, host).header(http::header::CONNECTION, "close");
    let rsp = sender.send_request(req.body(Empty::new())?).await?;
    anyhow::ensure!(rsp.status().is_success(), "status {}", rsp.status());
    rsp.into_body().collect().await?;
    drop(sender);
    let _ = conn.await;
    Ok(())
}
