//! `weft stat`: the golden signals of a running local mesh, per workload, from its
//! sidecars' metrics. It finds the mesh in `weft up`'s state file, scrapes each
//! sidecar's admin port twice, `interval` apart, and prints what the workload served
//! (its sidecar's inbound side) in between: success rate, requests per second,
//! latency percentiles, and TCP connections open now.

use std::{collections::BTreeMap, net::SocketAddr, path::Path, time::Duration};

use super::{http_client::Client, up::State};

/// One scrape of what a sidecar's inbound side counted.
#[derive(Clone, Debug, Default, PartialEq)]
struct Sample {
    requests: f64,
    /// Responses with status 500 and above, the proxy's own error answers included.
    failures: f64,
    /// Cumulative latency histogram: (upper bound in seconds, count).
    buckets: Vec<(f64, f64)>,
    tcp_open: f64,
}

#[derive(Debug, PartialEq)]
pub struct Row {
    pub workload: String,
    /// `None` when nothing was served in the interval.
    pub success: Option<f64>,
    pub rps: f64,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    pub tcp_open: f64,
}

/// Reads the inbound series of a weft-proxy metrics page.
fn parse(text: &str) -> Sample {
    let mut s = Sample::default();
    let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        if !series.contains("direction=\"inbound\"") {
            continue;
        }
        let label = |name: &str| {
            let start = series.find(&format!("{name}=\""))? + name.len() + 2;
            Some(&series[start..start + series[start..].find('"')?])
        };
        if series.starts_with("weft_requests_total{") {
            s.requests += value;
            if label("status").and_then(|v| v.parse::<u16>().ok()).is_some_and(|c| c >= 500) {
                s.failures += value;
            }
        } else if series.starts_with("weft_request_duration_seconds_bucket{") {
            let le =
                label("le").map(|v| if v == "+Inf" { f64::INFINITY } else { v.parse().unwrap_or(f64::NAN) });
            if let Some(le) = le.filter(|v| !v.is_nan()) {
                // Summed over the series' other labels (status class, route, peer).
                buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += value;
            }
        } else if series.starts_with("weft_tcp_open_connections{") {
            s.tcp_open += value;
        }
    }
    s.buckets = buckets.into_values().collect();
    s.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    s
}

/// The bucket bound below which `q` of the interval's requests fell (an upper bound on
/// the percentile, as Prometheus' histogram_quantile gives without interpolation).
fn quantile(before: &Sample, after: &Sample, q: f64) -> Option<f64> {
    let count = |s: &Sample, le: f64| s.buckets.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1);
    let total = after.buckets.last().map_or(0.0, |b| b.1 - count(before, b.0));
    if total <= 0.0 {
        return None;
    }
    after
        .buckets
        .iter()
        .map(|(le, n)| (*le, n - count(before, *le)))
        .find(|(_, n)| *n >= q * total)
        .map(|b| b.0)
}

fn row(workload: &str, before: &Sample, after: &Sample, secs: f64) -> Row {
    let requests = after.requests - before.requests;
    let failures = after.failures - before.failures;
    Row {
        workload: workload.to_string(),
        success: (requests > 0.0).then(|| 1.0 - failures / requests),
        rps: requests / secs,
        p50: quantile(before, after, 0.50),
        p95: quantile(before, after, 0.95),
        p99: quantile(before, after, 0.99),
        tcp_open: after.tcp_open,
    }
}

async fn scrape(client: &Client, admin: SocketAddr) -> Sample {
    match client.get(&format!("http://{admin}/metrics")).await {
        Ok(r) if r.status == 200 => parse(&r.body),
        _ => Sample::default(),
    }
}

/// One table's worth: every workload's signals over `interval`.
pub async fn measure(state: &State, interval: Duration) -> Vec<Row> {
    let client = Client::direct();
    let mut before = Vec::new();
    for w in &state.workloads {
        before.push(scrape(&client, w.admin).await);
    }
    tokio::time::sleep(interval).await;
    let mut rows = Vec::new();
    for (w, b) in state.workloads.iter().zip(&before) {
        let after = scrape(&client, w.admin).await;
        rows.push(row(&w.name, b, &after, interval.as_secs_f64()));
    }
    rows
}

pub fn render(rows: &[Row]) -> String {
    let ms = |v: Option<f64>| match v {
        Some(s) if s.is_infinite() => "> 30s".to_string(),
        Some(s) => format!("{}ms", s * 1e3),
        None => "-".into(),
    };
    let mut out = format!(
        "{:<16} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9}\n",
        "WORKLOAD", "SUCCESS", "RPS", "P50", "P95", "P99", "TCP_CONN"
    );
    for r in rows {
        let success = r.success.map_or("-".into(), |s| format!("{:.2}%", s * 100.0));
        out.push_str(&format!(
            "{:<16} {:>8} {:>8.1} {:>9} {:>9} {:>9} {:>9}\n",
            r.workload,
            success,
            r.rps,
            ms(r.p50),
            ms(r.p95),
            ms(r.p99),
            r.tcp_open
        ));
    }
    out
}

pub async fn run(state_file: &Path, interval: Duration, watch: bool) -> anyhow::Result<()> {
    loop {
        let state = State::read(state_file)?;
        let rows = measure(&state, interval).await;
        if watch {
            // Clear the screen and go home, as `watch` does.
            print!("\x1b[2J\x1b[H");
        }
        println!("{}", render(&rows));
        if !watch {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"# TYPE weft_requests counter
weft_requests_total{direction="inbound",protocol="h2",status="200",cause=""} 10
weft_requests_total{direction="outbound",protocol="http1",status="200",cause=""} 99
weft_request_duration_seconds_bucket{le="0.001",direction="inbound"} 5
weft_request_duration_seconds_bucket{le="0.01",direction="inbound"} 10
weft_request_duration_seconds_bucket{le="+Inf",direction="inbound"} 10
weft_tcp_open_connections{direction="inbound"} 1
"#;
    const AFTER: &str = r#"weft_requests_total{direction="inbound",protocol="h2",status="200",cause=""} 100
weft_requests_total{direction="inbound",protocol="h2",status="503",cause="no-endpoints"} 10
weft_request_duration_seconds_bucket{le="0.001",direction="inbound"} 70
weft_request_duration_seconds_bucket{le="0.01",direction="inbound"} 118
weft_request_duration_seconds_bucket{le="+Inf",direction="inbound"} 120
weft_tcp_open_connections{direction="inbound"} 2
"#;

    #[test]
    fn signals_over_the_interval() {
        let r = row("api", &parse(BEFORE), &parse(AFTER), 2.0);
        assert_eq!(r.rps, 50.0);
        assert_eq!(r.success, Some(0.9));
        assert_eq!(r.p50, Some(0.001));
        assert_eq!(r.p95, Some(0.01));
        assert_eq!(r.p99, Some(f64::INFINITY));
        assert_eq!(r.tcp_open, 2.0);
        let idle = row("idle", &parse(AFTER), &parse(AFTER), 1.0);
        assert_eq!((idle.success, idle.p50), (None, None));
        assert!(render(&[r, idle]).contains("90.00%"));
    }
}
