//! `weft-otlp-sink`: the live collector of bench/run's tracing target. It accepts OTLP/gRPC
//! exports the way a collector does (decodes every request) and keeps only a count, so
//! the benchmark measures the proxies' tracing cost and not a collector's storage.
//!
//!   weft-otlp-sink 127.0.0.1:4317     # prints the spans received on SIGTERM/Ctrl-C

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

#[derive(Default)]
struct Sink {
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let addr: std::net::SocketAddr = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: weft-otlp-sink ADDR (e.g. 127.0.0.1:4317)"))?
        .parse()?;
    let sink = Sink::default();
    let spans = sink.spans.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(sink))
        .serve_with_shutdown(addr, stop)
        .await?;
    println!("{}", spans.load(Ordering::Relaxed));
    Ok(())
}
