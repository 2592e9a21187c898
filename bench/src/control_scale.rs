//! weft-control-scale: the control plane at cluster scale. A fake Kubernetes API server
//! (tests/harness/kube.rs; no real one can run on these machines) holds `--services`
//! Services with `--endpoints` endpoints each (and a meshed pod per endpoint); the real
//! `weft control --source kubernetes` (release build) serves them; `--watchers` discovery
//! watches, each on its own connection as proxies would be, watch `--spread` distinct
//! Services (1: every watcher on the Service that changes). Then `--updates` changes of
//! that Service's EndpointSlice, one at a time. Reports, as JSON: the time from each
//! change to each affected watcher having it (p50, p99, max), the control plane's RSS
//! before and with the watchers (per watcher), and its CPU per update.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use clap::Parser;
use serde_json::json;
use tokio::sync::mpsc;
use weft_api::v1::{discovery_client::DiscoveryClient, WatchRequest};
use weft_e2e::{control::Control, kube::FakeApi};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    services: usize,
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// Distinct Services the watchers watch (watcher i: Service i % spread).
    #[arg(long, default_value_t = 1)]
    spread: usize,
    #[arg(long, default_value_t = 20)]
    updates: usize,
    /// Where to append the result line.
    #[arg(long)]
    out: Option<PathBuf>,
}

const TOKEN: &str = "bench-watcher-token";

fn ip(i: usize) -> String {
    format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256)
}

fn slice(api: &FakeApi, s: usize, endpoints: usize, first_endpoint: usize) {
    let eps: Vec<serde_json::Value> = (0..endpoints)
        .map(|e| {
            let n = first_endpoint + e;
            json!({"addresses": [ip(n)], "conditions": {"ready": true}, "zone": "zone-a",
                   "targetRef": {"kind": "Pod", "name": format!("pod-{n}"), "namespace": "default"}})
        })
        .collect();
    api.apply(json!({"kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{s}"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": format!("svc-{s}")}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": eps}));
}

fn populate(api: &FakeApi, args: &Args) {
    api.identity_secret();
    api.token(TOKEN, "default", "bench", Some("bench-0"));
    for s in 0..args.services {
        api.apply(
            json!({"kind": "Service", "metadata": {"name": format!("svc-{s}"), "namespace": "default"},
            "spec": {"clusterIP": format!("10.96.{}.{}", s / 256, s % 256),
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
        );
        for e in 0..args.endpoints {
            let n = s * args.endpoints + e;
            api.apply(json!({"kind": "Pod", "metadata": {"name": format!("pod-{n}"), "namespace": "default",
                "labels": {"app": format!("svc-{s}")}},
                "spec": {"serviceAccountName": format!("svc-{s}"), "containers": [{"name": "app"}, {"name": "weft-proxy"}]},
                "status": {"phase": "Running", "podIP": ip(n), "podIPs": [{"ip": ip(n)}]}}));
        }
        slice(api, s, args.endpoints, s * args.endpoints);
    }
}

/// `(VmRSS KiB, utime + stime ticks)` of a process.
fn usage(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks = fields.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    (rss, ticks)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let api = FakeApi::start();
    let t = Instant::now();
    populate(&api, &args);
    eprintln!("fake API populated in {:?}", t.elapsed());
    let t = Instant::now();
    let control = Control::kubernetes(&api, &[]);
    eprintln!("weft control ready in {:?}", t.elapsed());
    let pid = control.child.id();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (rss_before, _) = usage(pid);
    // Every watcher reports (watcher, endpoints in the answer, when it arrived).
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, usize, Instant)>();
    let grpc = control.grpc;
    let retries = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    rt.block_on(async {
        for w in 0..args.watchers {
            let tx = tx.clone();
            let authority = format!("svc-{}.default.svc.cluster.local:80", w % args.spread);
            let retries = retries.clone();
            tokio::spawn(async move {
                // As a proxy does: a failed connection or call is retried after a pause.
                loop {
                    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
                        .unwrap()
                        .tcp_nodelay(true)
                        .connect()
                        .await;
                    let mut req = tonic::Request::new(WatchRequest { authority: authority.clone() });
                    req.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
                    let stream = match channel {
                        Ok(channel) => {
                            DiscoveryClient::new(channel).watch(req).await.map_err(|e| e.to_string())
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    match stream {
                        Ok(stream) => {
                            let mut stream = stream.into_inner();
                            while let Ok(Some(set)) = stream.message().await {
                                let _ = tx.send((w, set.endpoints.len(), Instant::now()));
                            }
                        }
                        Err(e) => eprintln!("watcher {w}: {e}; retrying"),
                    }
                    retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
        let mut first = vec![false; args.watchers];
        let mut have = 0;
        while have < args.watchers {
            let got = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await;
            let Ok(Some((w, _, _))) = got else {
                panic!("only {have} of {} watchers got a first answer within 30 s", args.watchers)
            };
            if !std::mem::replace(&mut first[w], true) {
                have += 1;
            }
        }
    });
    let (rss_with, ticks_before) = usage(pid);
    let affected: Vec<usize> = (0..args.watchers).filter(|w| w % args.spread == 0).collect();
    let mut latencies = Vec::new();
    let start = Instant::now();
    for u in 0..args.updates {
        // svc-0 alternates between its endpoints and one more.
        let n = args.endpoints + (u + 1) % 2;
        let changed = Instant::now();
        slice(&api, 0, n, 0);
        let mut pending: std::collections::HashSet<usize> = affected.iter().copied().collect();
        rt.block_on(async {
            while !pending.is_empty() {
                let (w, len, at) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                    .await
                    .expect("every affected watcher gets the change within 30 s")
                    .expect("watchers");
                if len == n && pending.remove(&w) {
                    latencies.push(at.duration_since(changed).as_secs_f64() * 1000.0);
                }
            }
        });
    }
    let elapsed = start.elapsed();
    let (_, ticks_after) = usage(pid);
    let clk = 100.0; // USER_HZ on Linux
    latencies.sort_by(|a, b| a.total_cmp(b));
    let result = json!({
        "services": args.services, "endpoints": args.services * args.endpoints, "watchers": args.watchers,
        "spread": args.spread, "updates": args.updates,
        "latency_ms": {"p50": percentile(&latencies, 0.5), "p99": percentile(&latencies, 0.99),
                       "max": latencies.last().copied().unwrap_or(0.0)},
        "rss_kib": {"before_watchers": rss_before, "with_watchers": rss_with,
                    "per_watcher": (rss_with as f64 - rss_before as f64) / args.watchers as f64},
        "cpu_ms_per_update": (ticks_after - ticks_before) as f64 / clk * 1000.0 / args.updates as f64,
        "updates_wall_s": elapsed.as_secs_f64(),
        "watch_retries": retries.load(std::sync::atomic::Ordering::Relaxed),
    });
    println!("{result}");
    if let Some(out) = &args.out {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(out)?;
        writeln!(f, "{result}")?;
    }
    Ok(())
}
