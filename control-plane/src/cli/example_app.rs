//! The demo's apps, built into `weft` so `weft up examples/demo.yaml` needs nothing else:
//! `backend` answers with its workload's name, `frontend` calls its backends and joins
//! their answers, `load` sends steady traffic and prints what came back. They are plain
//! apps that know nothing of the mesh: they listen on `LISTEN_ADDR` and call out through
//! `http_proxy`, both set by `weft up`.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::cli::http_client::Client;

pub enum App {
    /// Answers every request with `<workload>: <message>`, failing `fail_percent` % of
    /// them at random with 503 (a flaky service, for retries to hide), each after `delay`
    /// (a slow one).
    Backend { message: String, fail_percent: u32, delay: Duration },
    /// Answers with its own name and the answers of every URL in `calls`.
    Frontend { calls: Vec<String> },
    /// Sends `rate` GET requests per second to `target` and reports every `every`.
    Load { target: String, rate: u32, every: Duration },
}

pub async fn run(app: App) -> anyhow::Result<()> {
    let name = std::env::var(weft_api::env::WORKLOAD).unwrap_or_else(|_| "app".into());
    match app {
        App::Backend { message, fail_percent, delay } => {
            let answer = Bytes::from(format!("{name}: {message}\n"));
            let failure =
                Bytes::from(format!("{name}: failing on purpose (--fail-percent {fail_percent})\n"));
            serve(move |_req| {
                let (answer, failure) = (answer.clone(), failure.clone());
                async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    if fastrand::u32(0..100) < fail_percent {
                        (StatusCode::SERVICE_UNAVAILABLE, failure)
                    } else {
                        (StatusCode::OK, answer)
                    }
                }
            })
            .await
        }
        App::Frontend { calls } => {
            let client = Arc::new(Client::from_env()?);
            let calls = Arc::new(calls);
            serve(move |req: Request<Incoming>| {
                let (client, calls, name) = (client.clone(), calls.clone(), name.clone());
                let trace = trace_headers(req.headers());
                async move { frontend(&client, &calls, &name, &trace).await }
            })
            .await
        }
        App::Load { target, rate, every } => load(&target, rate, every).await,
    }
}

/// The trace context of a request, which an app passes on to the calls it makes for
/// that request (what an OpenTelemetry or Zipkin library does), so the mesh's spans of
/// both hops join one trace.
fn trace_headers(headers: &http::HeaderMap) -> http::HeaderMap {
    const NAMES: [&str; 7] =
        ["traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-flags"];
    let mut out = http::HeaderMap::new();
    for name in NAMES {
        if let Some(v) = headers.get(name) {
            out.insert(name, v.clone());
        }
    }
    out
}

async fn frontend(
    client: &Client,
    calls: &[String],
    name: &str,
    trace: &http::HeaderMap,
) -> (StatusCode, Bytes) {
    let mut body = format!("{name}: calling {} backends\n", calls.len());
    for url in calls {
        match client.request(http::Method::GET, url, trace, Bytes::new()).await {
            Ok(r) if r.status == 200 => body.push_str(&r.body),
            Ok(r) => {
                let msg = format!("{name}: {url} answered {}: {}\n", r.status, r.body.trim());
                return (StatusCode::BAD_GATEWAY, Bytes::from(msg));
            }
            Err(e) => return (StatusCode::BAD_GATEWAY, Bytes::from(format!("{name}: {url}: {e:#}\n"))),
        }
    }
    (StatusCode::OK, Bytes::from(body))
}

/// Serves HTTP/1 on `LISTEN_ADDR`, answering each request with `handler`.
async fn serve<F, Fut>(handler: F) -> anyhow::Result<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = (StatusCode, Bytes)> + Send,
{
    let addr: SocketAddr = std::env::var("LISTEN_ADDR")
        .context("LISTEN_ADDR is not set: run the demo apps with `weft up`, or set LISTEN_ADDR=ip:port")?
        .parse()
        .context("LISTEN_ADDR must be ip:port")?;
    let listener = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    println!("listening on {addr}");
    loop {
        let (stream, _) = listener.accept().await?;
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let handler = handler.clone();
                async move {
                    let (status, body) = handler(req).await;
                    let mut rsp = Response::new(Full::new(body));
                    *rsp.status_mut() = status;
                    Ok::<_, Infallible>(rsp)
                }
            });
            let _ =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

#[derive(Default)]
struct Window {
    ok: u64,
    failed: u64,
    latencies_us: Vec<u64>,
    /// Who answered: the `<workload>:` at the start of each line of the answers.
    answered_by: BTreeMap<String, u64>,
    last_error: Option<String>,
}

async fn load(target: &str, rate: u32, every: Duration) -> anyhow::Result<()> {
    if rate == 0 {
        bail!("--rate must be at least 1 request per second");
    }
    let client = Arc::new(Client::from_env()?);
    let window = Arc::new(Mutex::new(Window::default()));
    let mut report = tokio::time::interval(every);
    report.tick().await;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    println!("sending {rate} requests per second to {target}");
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let (client, window, target) = (client.clone(), window.clone(), target.to_string());
                tokio::spawn(async move {
                    let start = Instant::now();
                    let res = client.get(&target).await;
                    window.lock().unwrap_or_else(std::sync::PoisonError::into_inner).record(res, start.elapsed());
                });
            }
            _ = report.tick() => {
                let w = std::mem::take(&mut *window.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
                println!("{}", w.summary(every));
            }
        }
    }
}

impl Window {
    fn record(&mut self, res: anyhow::Result<crate::cli::http_client::Reply>, took: Duration) {
        match res {
            Ok(r) if r.status == 200 => {
                self.ok += 1;
                self.latencies_us.push(took.as_micros() as u64);
                for line in r.body.lines() {
                    if let Some((who, _)) = line.split_once(':') {
                        *self.answered_by.entry(who.to_string()).or_default() += 1;
                    }
                }
            }
            Ok(r) => {
                self.failed += 1;
                self.last_error = Some(format!("HTTP {}: {}", r.status, r.body.trim()));
            }
            Err(e) => {
                self.failed += 1;
                self.last_error = Some(format!("{e:#}"));
            }
        }
    }

    fn summary(mut self, every: Duration) -> String {
        self.latencies_us.sort_unstable();
        let lat = &self.latencies_us;
        let pct = |p: f64| {
            lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
                .map_or("-".into(), |us| format!("{:.1}ms", *us as f64 / 1000.0))
        };
        let by: Vec<String> = self.answered_by.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let mut s = format!(
            "last {}s: {} ok, {} failed, p50 {}, p99 {} | answered by: {}",
            every.as_secs(),
            self.ok,
            self.failed,
            pct(0.5),
            pct(0.99),
            if by.is_empty() { "-".into() } else { by.join(", ") }
        );
        if let Some(e) = self.last_error {
            s.push_str(&format!(" | last error: {e}"));
        }
        s
    }
}
