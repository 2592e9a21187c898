//! Observability end to end: spans exported over OTLP to a real receiver (Python,
//! opentelemetry-proto's TraceService) across several sidecars and a real app, trace
//! context converted between B3 and W3C, export that never holds requests up when the
//! collector is down or slow, and golden-signal metrics that count what was sent.

use std::{
    collections::HashMap,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use weft_e2e::{
    backend, bin,
    control::Control,
    curl, free_addr,
    mesh::{MeshFile, Service},
    otlp::Collector,
    Proxy,
};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";
/// A trace id of its own, for a request whose span marks the end of a sequence.
const SENTINEL: &str = "5cf92f3577b34da6a3ce929d0e0e4737";

fn mesh(frontend_in: std::net::SocketAddr, backend_in: std::net::SocketAddr) -> String {
    MeshFile::new()
        .workload("client")
        .workload("frontend")
        .workload("backend")
        .service(Service::new("frontend", 80).meshed(frontend_in, "frontend"))
        .service(Service::new("backend", 80).meshed(backend_in, "backend"))
        .route("backend-route", "backend", "[{matches: [{path: {prefix: /}}]}]")
        .yaml()
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn otlp_env(collector: &Collector) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{}", collector.grpc)),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
    ]
}

fn with<'a>(
    base: &'a [(&'static str, String)],
    extra: &[(&'static str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    base.iter().map(|(k, v)| (*k, v.as_str())).chain(extra.iter().copied()).collect()
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}

/// curl → client's sidecar → frontend's sidecar → the frontend app (which passes the
/// trace headers on, as an instrumented app does) → frontend's sidecar → backend's
/// sidecar → the backend app: one trace, every hop's span linked to the one before.
#[test]
fn one_trace_links_every_hop_of_a_request_across_two_workloads() {
    let collector = Collector::start();
    let app = backend::http("backend-app");
    let (frontend_in, backend_in, frontend_app) = (free_addr(), free_addr(), free_addr());
    let control = Control::start(&mesh(frontend_in, backend_in), &[]);
    let otel = otlp_env(&collector);
    let (app_addr, backend_in_s, frontend_in_s, frontend_app_s) =
        (app.addr.to_string(), backend_in.to_string(), frontend_in.to_string(), frontend_app.to_string());
    let backend = control.sidecar(
        "backend",
        &with(&otel, &[("WEFT_APP_ADDR", &app_addr), ("WEFT_INBOUND_ADDR", &backend_in_s)]),
    );
    let frontend = control.sidecar(
        "frontend",
        &with(&otel, &[("WEFT_APP_ADDR", &frontend_app_s), ("WEFT_INBOUND_ADDR", &frontend_in_s)]),
    );
    let client = control.sidecar("client", &with(&otel, &[]));
    let _frontend_app = KillOnDrop(
        Command::new(bin("weft"))
            .args(["example-app", "frontend", "--call", "http://backend:80/hello"])
            .env("LISTEN_ADDR", &frontend_app_s)
            .env("http_proxy", format!("http://{}", frontend.outbound))
            .env("WEFT_WORKLOAD", "frontend")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    weft_e2e::eventually(Duration::from_secs(10), "the frontend app listening", || {
        std::net::TcpStream::connect(frontend_app).ok().map(drop)
    });

    let (code, body, err) = curl(&["-x", &format!("http://{}", client.outbound), "http://frontend:80/"]);
    assert_eq!(code, 200, "{err}{body}\n{}\n{}", client.logs(), frontend.logs());
    let spans = collector.wait_for(6);
    assert_eq!(spans.len(), 6, "{spans:#?}");

    let trace = spans[0]["trace_id"].as_str().unwrap();
    assert!(spans.iter().all(|s| s["trace_id"] == trace), "one trace: {spans:#?}");
    let by_id: HashMap<&str, &Value> = spans.iter().map(|s| (s["span_id"].as_str().unwrap(), s)).collect();
    let roots: Vec<_> = spans.iter().filter(|s| s["parent_span_id"] == "").collect();
    assert_eq!(roots.len(), 1, "curl sent no context: one root, {spans:#?}");
    // Walk from the root down: each span has exactly one child here.
    let mut chain = vec![roots[0]];
    while let Some(child) = spans.iter().find(|s| s["parent_span_id"] == chain.last().unwrap()["span_id"]) {
        chain.push(child);
    }
    let shape: Vec<(&str, &str)> =
        chain.iter().map(|s| (s["service"].as_str().unwrap(), s["kind"].as_str().unwrap())).collect();
    assert_eq!(
        shape,
        [
            ("client", "SPAN_KIND_INTERNAL"),
            ("client", "SPAN_KIND_CLIENT"),
            ("frontend", "SPAN_KIND_SERVER"),
            ("frontend", "SPAN_KIND_INTERNAL"),
            ("frontend", "SPAN_KIND_CLIENT"),
            ("backend", "SPAN_KIND_SERVER"),
        ],
        "{spans:#?}"
    );
    assert_eq!(by_id.len(), 6, "span ids are unique");
    for s in &chain {
        assert_eq!(s["name"], "GET", "{s}");
        assert_eq!(attr(s, "http.request.method"), "GET", "{s}");
        assert_eq!(attr(s, "http.response.status_code"), 200, "{s}");
        assert_eq!(s["status"], "STATUS_CODE_UNSET", "{s}");
        assert!(s["end"].as_u64() >= s["start"].as_u64(), "{s}");
        assert_eq!(s["transport"], "grpc");
    }
    // Server spans know the caller; client spans know whom they called.
    let (frontend_server, backend_server) = (chain[2], chain[5]);
    assert_eq!(attr(frontend_server, "weft.peer.identity"), "spiffe://weft.local/ns/default/sa/client");
    assert_eq!(attr(frontend_server, "weft.peer.workload"), "client");
    assert_eq!(attr(backend_server, "weft.peer.workload"), "frontend");
    assert_eq!(attr(backend_server, "url.path"), "/hello");
    assert_eq!(attr(chain[4], "weft.peer.identity"), "spiffe://weft.local/ns/default/sa/backend");
    assert_eq!(attr(chain[4], "weft.peer.workload"), "backend");
    assert_eq!(attr(chain[4], "server.address"), "backend");
    assert_eq!(attr(chain[4], "network.peer.port"), backend_in.port());
    assert_eq!(attr(chain[3], "weft.route"), "backend-route/0");
    assert_eq!(attr(chain[0], "server.address"), "frontend");

    // The backend app got the backend server span as its parent, in both formats.
    let seen = app.last();
    let parent = chain[5]["span_id"].as_str().unwrap();
    assert_eq!(seen.headers["traceparent"], format!("00-{trace}-{parent}-01"));
    assert_eq!(seen.headers["x-b3-traceid"], trace);
    assert_eq!(seen.headers["x-b3-spanid"], parent);
    assert!(!seen.headers.contains_key("weft-peer-workload"), "peer metadata never reaches an app");
    drop(backend);
}

/// B3 in → W3C (and B3) out, W3C in → B3 out, exported over OTLP/HTTP protobuf.
#[test]
fn b3_and_w3c_contexts_are_converted_and_keep_the_trace() {
    let collector = Collector::start();
    let app = backend::http("app");
    let app_addr = app.addr.to_string();
    let endpoint = format!("http://{}", collector.http);
    let proxy = Proxy::start(&[
        ("WEFT_APP_ADDR", &app_addr),
        ("WEFT_WORKLOAD", "shop"),
        ("WEFT_ACCESS_LOG", "true"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]);
    let url = format!("http://{}/b3", proxy.inbound);

    // B3 single header in: the app sees W3C and B3 single, same trace, parent = the proxy's span.
    let (code, _, err) = curl(&["-H", &format!("b3: {TRACE}-{PARENT}-1"), &url]);
    assert_eq!(code, 200, "{err}");
    let seen = app.last().headers;
    let spans = collector.wait_for(1);
    let span = &spans[0];
    assert_eq!(span["transport"], "http");
    assert_eq!((span["trace_id"].as_str(), span["parent_span_id"].as_str()), (Some(TRACE), Some(PARENT)));
    assert_eq!((span["service"].as_str(), span["kind"].as_str()), (Some("shop"), Some("SPAN_KIND_SERVER")));
    let own = span["span_id"].as_str().unwrap();
    assert_eq!(seen["traceparent"], format!("00-{TRACE}-{own}-01"));
    assert_eq!(seen["b3"], format!("{TRACE}-{own}-1"));

    // B3 multi with a 64-bit trace id in: left-padded to W3C's 128 bits.
    let (code, _, err) = curl(&[
        "-H",
        "X-B3-TraceId: a3ce929d0e0e4736",
        "-H",
        &format!("X-B3-SpanId: {PARENT}"),
        "-H",
        "X-B3-Sampled: 1",
        &url,
    ]);
    assert_eq!(code, 200, "{err}");
    let seen = app.last().headers;
    assert!(seen["traceparent"].starts_with("00-0000000000000000a3ce929d0e0e4736-"), "{seen:?}");
    assert_eq!(seen["x-b3-traceid"], "0000000000000000a3ce929d0e0e4736");

    // W3C in (with tracestate): B3 multi out, tracestate passed on.
    let tp = format!("00-{TRACE}-{PARENT}-01");
    let (code, _, err) = curl(&["-H", &format!("traceparent: {tp}"), "-H", "tracestate: vendor=x1", &url]);
    assert_eq!(code, 200, "{err}");
    let seen = app.last().headers;
    assert_eq!(seen["x-b3-traceid"], TRACE);
    assert_eq!(seen["x-b3-sampled"], "1");
    assert_eq!(seen["tracestate"], "vendor=x1");
    let spans = collector.wait_for(3);
    let last =
        spans.iter().find(|s| s["span_id"] == seen["x-b3-spanid"].as_str()).expect("the span the app saw");
    assert_eq!(last["parent_span_id"], PARENT);
    assert_eq!(last["trace_state"], "vendor=x1");

    // An unsampled caller: no span, the decision goes on.
    let before = collector.spans().len();
    let (code, _, _) = curl(&["-H", &format!("traceparent: 00-{TRACE}-{PARENT}-00"), &url]);
    assert_eq!(code, 200);
    assert_eq!(app.last().headers["x-b3-sampled"], "0");
    // Malformed context: a new trace, not an error.
    let (code, _, _) = curl(&["-H", "traceparent: 00-zz-nonsense-01", &url]);
    assert_eq!(code, 200);
    let fresh = app.last().headers["traceparent"].clone();
    assert!(fresh.starts_with("00-") && !fresh.contains(TRACE), "{fresh}");
    // A sampled request after them: once its span is in, the spans before it are too
    // (spans are exported in the order they end).
    let (code, _, _) = curl(&["-H", &format!("traceparent: 00-{SENTINEL}-{PARENT}-01"), &url]);
    assert_eq!(code, 200);
    let spans = collector.wait_for(before + 2);
    assert_eq!(spans.len(), before + 2, "only the malformed request's new trace is recorded: {spans:#?}");
    assert_eq!(spans[before + 1]["trace_id"], SENTINEL);

    // The access log line carries the trace id; a new trace's id is the one exported.
    let logs = proxy.logs();
    assert!(logs.contains("path=\"/b3\" status=200"), "{logs}");
    let new_trace = spans[before]["trace_id"].as_str().unwrap().to_string();
    assert!(fresh.contains(&new_trace), "{fresh} vs {new_trace}");
    assert!(logs.contains(&format!("trace_id=\"{new_trace}\"")), "{logs}");
}

/// Without tracing, B3 and W3C are still converted so the apps' own traces join.
#[test]
fn contexts_are_converted_with_tracing_off() {
    let app = backend::http("app");
    let app_addr = app.addr.to_string();
    let proxy = Proxy::start(&[("WEFT_APP_ADDR", &app_addr), ("WEFT_ACCESS_LOG", "true")]);
    let (code, _, err) =
        curl(&["-H", &format!("b3: {TRACE}-{PARENT}-1"), &format!("http://{}/", proxy.inbound)]);
    assert_eq!(code, 200, "{err}");
    assert_eq!(app.last().headers["traceparent"], format!("00-{TRACE}-{PARENT}-01"));
    let line = format!("trace_id=\"{TRACE}\"");
    weft_e2e::eventually(Duration::from_secs(5), &line, || proxy.logs().contains(&line).then_some(()));
}

/// `n` GETs one after another on one keep-alive connection; their latencies.
fn sequential_gets(addr: std::net::SocketAddr, n: usize) -> Vec<Duration> {
    use http_body_util::{BodyExt, Empty};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let mut latencies = Vec::with_capacity(n);
        for _ in 0..n {
            let req =
                http::Request::get("/load").header("host", "app").body(Empty::<bytes::Bytes>::new()).unwrap();
            let t = Instant::now();
            let rsp = send.send_request(req).await.unwrap();
            assert_eq!(rsp.status(), 200);
            rsp.into_body().collect().await.unwrap();
            latencies.push(t.elapsed());
        }
        latencies
    })
}

fn rss_kib(p: &Proxy) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.child.id())).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q) as usize]
}

/// The same sustained load through three proxies, interleaved so the machine's noise hits
/// them alike: one exporting to a live collector, one whose collector is absent, one whose
/// collector answers after 10 minutes (longer than any run). Requests do not wait for export: latency and memory stay
/// with the live case, and the spans that could not go are counted as dropped.
#[test]
fn a_down_or_slow_collector_never_slows_requests_or_grows_memory() {
    let (live, slow) = (Collector::start(), Collector::start_slow(Duration::from_secs(600)));
    let absent = free_addr(); // nothing listens here
    let app = backend::http("app");
    let app_addr = app.addr.to_string();
    let start = |endpoint: String| {
        Proxy::start(&[
            ("WEFT_APP_ADDR", app_addr.as_str()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "60000"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "512"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "128"),
        ])
    };
    let proxies = [
        start(format!("http://{}", live.grpc)),
        start(format!("http://{absent}")),
        start(format!("http://{}", slow.grpc)),
    ];
    for p in &proxies {
        sequential_gets(p.inbound, 300);
    }
    let rss_before: Vec<u64> = proxies.iter().map(rss_kib).collect();
    let mut latencies = [vec![], vec![], vec![]];
    for _round in 0..8 {
        for (i, p) in proxies.iter().enumerate() {
            latencies[i].extend(sequential_gets(p.inbound, 500));
        }
    }
    let rss_after: Vec<u64> = proxies.iter().map(rss_kib).collect();
    let sent = 300.0 + 8.0 * 500.0;
    // What the exporters have done by now: the live one exported, the others dropped all
    // but a queue and a batch, and the absent collector's batches failed.
    proxies[0].wait_metric_at_least("weft_trace_spans_exported_total", 1.0);
    proxies[1].wait_metric_at_least("weft_trace_export_failures_total", 1.0);
    for (i, p) in proxies.iter().enumerate().skip(1) {
        let dropped = |p: &Proxy| p.metric("weft_trace_spans_dropped_total");
        let all =
            weft_e2e::within(Duration::from_secs(10), || (dropped(p) >= sent - 512.0 - 128.0).then_some(()));
        assert!(all.is_some(), "proxy {i} dropped {} of {sent}:\n{}", dropped(p), p.metrics());
    }
    let metric = |i: usize, name: &str| proxies[i].metric(name);
    let report: Vec<String> = (0..3)
        .map(|i| {
            let l = &mut latencies[i];
            l.sort();
            format!(
                "[{}] p50 {:?} p99 {:?} rss {} -> {} KiB, exported {}, dropped {}, failed batches {}",
                ["live", "absent", "slow"][i],
                percentile(l, 0.5),
                percentile(l, 0.99),
                rss_before[i],
                rss_after[i],
                metric(i, "weft_trace_spans_exported_total"),
                metric(i, "weft_trace_spans_dropped_total"),
                metric(i, "weft_trace_export_failures_total"),
            )
        })
        .collect();
    let report = report.join("\n");
    println!("{report}");

    assert!(metric(0, "weft_trace_spans_exported_total") > 0.0, "{report}");
    assert!(!live.spans().is_empty(), "{report}");
    for i in [1, 2] {
        assert_eq!(metric(i, "weft_trace_spans_exported_total"), 0.0, "{report}");
        // All but what fits in the queue and one batch in flight is dropped and counted.
        assert!(metric(i, "weft_trace_spans_dropped_total") >= sent - 512.0 - 128.0, "{report}");
        let (p50, p50_live) = (percentile(&latencies[i], 0.5), percentile(&latencies[0], 0.5));
        assert!(p50 <= p50_live * 2 + Duration::from_micros(500), "latency is not flat:\n{report}");
        // The queue is bounded: memory does not follow the number of spans.
        assert!(rss_after[i] <= rss_after[0] + 8 * 1024, "memory grew:\n{report}");
        assert!(rss_after[i] <= rss_before[i] + 8 * 1024, "memory grew:\n{report}");
    }
    assert!(metric(1, "weft_trace_export_failures_total") > 0.0, "{report}");
}

/// Request counts and latency histograms count exactly what was sent, per label set:
/// direction, route, peer workload and identity, status class and cause.
#[test]
fn golden_signal_metrics_count_what_was_sent_per_label_set() {
    let app = backend::http("app");
    let (frontend_in, backend_in) = (free_addr(), free_addr());
    let control = Control::start(&mesh(frontend_in, backend_in), &[]);
    let (app_addr, backend_in_s) = (app.addr.to_string(), backend_in.to_string());
    let backend =
        control.sidecar("backend", &[("WEFT_APP_ADDR", &app_addr), ("WEFT_INBOUND_ADDR", &backend_in_s)]);
    let client = control.sidecar("client", &[]);
    let via = format!("http://{}", client.outbound);
    for (path, n) in [("/ok", 7), ("/gone?status=404", 2), ("/broken?status=503", 3)] {
        for _ in 0..n {
            let (code, body, err) = curl(&["-x", &via, &format!("http://backend:80{path}")]);
            assert!([200, 404, 503].contains(&code), "{err}{body}");
        }
    }
    // An unknown port on a known host: the proxy's own error, with its cause.
    let (code, _, _) = curl(&["-x", &via, "http://127.0.0.1:1/"]);
    assert_eq!(code, 502);

    let out = r#"direction="outbound",route="backend-route/0",peer_workload="backend",peer_identity="spiffe://weft.local/ns/default/sa/backend""#;
    let inb = r#"direction="inbound",route="",peer_workload="client",peer_identity="spiffe://weft.local/ns/default/sa/client""#;
    for (proxy, labels) in [(&client, out), (&backend, inb)] {
        for (class, n) in [("2xx", 7.0), ("4xx", 2.0), ("5xx", 3.0)] {
            let count = format!(r#"weft_requests_total{{{labels},status_class="{class}",cause=""}}"#);
            assert_eq!(proxy.metric(&count), n, "{count}\n{}", proxy.metrics());
            let hist = format!(r#"weft_request_duration_seconds_count{{{labels},status_class="{class}"}}"#);
            assert_eq!(proxy.metric(&hist), n, "{hist}\n{}", proxy.metrics());
            let inf = format!(
                r#"weft_request_duration_seconds_bucket{{{labels},status_class="{class}",le="+Inf"}}"#
            );
            assert_eq!(proxy.metric(&inf), n, "{inf}");
        }
    }
    let unrouted = r#"weft_requests_total{direction="outbound",status="502",status_class="5xx",cause="upstream-refused",route="",peer_workload="",peer_identity=""}"#;
    assert_eq!(client.metric(unrouted), 1.0, "{}", client.metrics());
    // Everything the client proxy counted, it counted once.
    assert_eq!(client.metric(r#"weft_requests_total{direction="outbound"}"#), 13.0);
    assert_eq!(client.metric(r#"weft_request_duration_seconds_count{direction="outbound"}"#), 13.0);
    assert!(client.metric(r#"weft_tls_handshakes_total{direction="outbound",result="ok"}"#) >= 1.0);
    assert!(backend.metric("weft_identity_cert_expiry_timestamp_seconds") > 1e9);
}

/// gRPC calls through a traced inbound (grpcio both sides): spans named
/// `service/method` with the RPC attributes, the status read from the trailers of
/// streamed answers, and a failed call marked as an error.
#[test]
fn grpc_spans_carry_the_status_from_trailers() {
    let collector = Collector::start();
    let port = weft_e2e::free_port();
    let _server = weft_e2e::PyServer::start("grpc_echo.py", port);
    let endpoint = format!("http://{}", collector.grpc);
    let app = format!("127.0.0.1:{port}");
    let p = Proxy::start(&[
        ("WEFT_APP_ADDR", &app),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]);
    weft_e2e::py_client("grpc_echo.py", &p.inbound.to_string(), &[]);
    let spans = collector.wait_for(4);
    let by_name = |name: &str| {
        spans
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no span {name}: {spans:#?}"))
            .clone()
    };
    for method in ["Unary", "ServerStream", "Bidi"] {
        let s = by_name(&format!("weft.test.Echo/{method}"));
        assert_eq!(attr(&s, "rpc.system"), "grpc", "{s}");
        assert_eq!(attr(&s, "rpc.service"), "weft.test.Echo");
        assert_eq!(attr(&s, "rpc.method"), method);
        assert_eq!(attr(&s, "rpc.grpc.status_code"), 0, "{s}");
        assert_eq!(s["status"], "STATUS_CODE_UNSET", "{s}");
    }
    let fail = by_name("weft.test.Echo/Fail");
    assert_eq!(attr(&fail, "rpc.grpc.status_code"), 9, "FAILED_PRECONDITION: {fail}");
    assert_eq!(fail["status"], "STATUS_CODE_ERROR", "{fail}");
}

/// `weft-peer-workload` is believed only from an authenticated mesh peer: a plaintext
/// client cannot name itself into the metrics, and the header never reaches the app.
#[test]
fn a_plaintext_client_cannot_claim_a_peer_workload() {
    let app = backend::http("app");
    let app_addr = app.addr.to_string();
    let proxy = Proxy::start(&[("WEFT_APP_ADDR", &app_addr)]);
    let (code, _, err) = curl(&["-H", "weft-peer-workload: admin", &format!("http://{}/", proxy.inbound)]);
    assert_eq!(code, 200, "{err}");
    assert!(!app.last().headers.contains_key("weft-peer-workload"), "{:?}", app.last().headers);
    assert_eq!(proxy.metric(r#"weft_requests_total{direction="inbound",peer_workload=""}"#), 1.0);
    assert_eq!(proxy.metric(r#"weft_requests_total{peer_workload="admin"}"#), 0.0, "{}", proxy.metrics());
}
