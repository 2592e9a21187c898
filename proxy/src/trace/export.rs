//! OTLP export of finished spans, over gRPC or HTTP/protobuf (what Jaeger, Tempo and the
//! OpenTelemetry Collector ingest natively).
//!
//! One task drains the tracer's bounded queue in batches of up to
//! `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` spans, sent when full or every
//! `OTEL_BSP_SCHEDULE_DELAY`, one export at a time, each abandoned after
//! `OTEL_EXPORTER_OTLP_TIMEOUT`. While a collector is slow or absent the queue fills and
//! the request path drops spans instead of waiting: memory stays at one queue and one
//! batch. We batch here rather than with opentelemetry_sdk's BatchSpanProcessor because
//! that one neither counts its drops where metrics can see them nor runs on our runtime,
//! and encode in [`super::otlp`] because the SDK's and opentelemetry-proto's types cost
//! an allocation per attribute (measured in bench/); tests decode our bytes with
//! opentelemetry-proto.

use std::{sync::Arc, time::Duration};

use bytes::{Buf, BufMut, Bytes};
use http::{header, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use super::{otlp, Queue, Value};
use crate::{
    config::{OtlpProtocol, TraceConfig},
    metrics::Metrics,
};

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the OTLP collector at {endpoint}: {source}; check OTEL_EXPORTER_OTLP_ENDPOINT and that the collector runs")]
    Connect { endpoint: Uri, source: std::io::Error },
    #[error("the OTLP collector at {endpoint} refused the spans: {reason}")]
    Refused { endpoint: Uri, reason: String },
    #[error(
        "no answer from the OTLP collector at {endpoint} within {timeout:?} (OTEL_EXPORTER_OTLP_TIMEOUT)"
    )]
    Timeout { endpoint: Uri, timeout: Duration },
}

/// Runs the exporter until `flush` is asked: a batch whenever one is full, and what is
/// waiting every `OTEL_BSP_SCHEDULE_DELAY`.
pub async fn run(
    cfg: TraceConfig,
    queue: Arc<Queue>,
    mut flush: oneshot::Receiver<oneshot::Sender<()>>,
    metrics: Arc<Metrics>,
) {
    let encoder = otlp::Encoder::new(&[
        ("service.name", Value::Str(cfg.service_name.clone())),
        ("telemetry.sdk.name", Value::Static("weft-proxy")),
        ("telemetry.sdk.language", Value::Static("rust")),
        ("telemetry.sdk.version", Value::Static(env!("CARGO_PKG_VERSION"))),
    ]);
    let mut exporter = Exporter::new(&cfg);
    let mut failing = false;
    loop {
        let stopping = tokio::select! {
            _ = queue.ready.notified() => None,
            _ = tokio::time::sleep(cfg.schedule_delay) => None,
            ack = &mut flush => Some(ack),
        };
        // Everything waiting (at most the queue's size), a batch at a time.
        let waiting = queue.take();
        for (n, spans) in waiting.batches(cfg.max_batch) {
            export(&mut exporter, &cfg, encoder.request(spans), n as u64, &metrics, &mut failing).await;
        }
        if let Some(ack) = stopping {
            if let Ok(ack) = ack {
                let _ = ack.send(());
            }
            return;
        }
    }
}

async fn export(
    exporter: &mut Exporter,
    cfg: &TraceConfig,
    request: Vec<u8>,
    n: u64,
    metrics: &Metrics,
    failing: &mut bool,
) {
    let request = Bytes::from(request);
    let result = match tokio::time::timeout(cfg.export_timeout, exporter.send(request)).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout { endpoint: cfg.endpoint.clone(), timeout: cfg.export_timeout }),
    };
    match result {
        Ok(()) => {
            metrics.spans_exported(n);
            if std::mem::take(failing) {
                tracing::info!(endpoint = %cfg.endpoint, "span export works again");
            }
        }
        Err(e) => {
            metrics.span_dropped(n);
            metrics.span_export_failed();
            // Once per outage, not once per batch; the metrics count the rest.
            if !std::mem::replace(failing, true) {
                tracing::warn!("span export failed, dropping spans until it works: {e}");
            }
        }
    }
}

enum Exporter {
    Grpc { client: tonic::client::Grpc<tonic::transport::Channel>, endpoint: Uri },
    Http { endpoint: Uri, conn: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> },
}

impl Exporter {
    fn new(cfg: &TraceConfig) -> Self {
        match cfg.protocol {
            OtlpProtocol::Grpc => {
                let channel = tonic::transport::Channel::builder(cfg.endpoint.clone())
                    .connect_timeout(cfg.export_timeout)
                    .connect_lazy();
                Exporter::Grpc { client: tonic::client::Grpc::new(channel), endpoint: cfg.endpoint.clone() }
            }
            OtlpProtocol::HttpProtobuf => Exporter::Http { endpoint: cfg.endpoint.clone(), conn: None },
        }
    }

    /// Sends one encoded `ExportTraceServiceRequest`.
    async fn send(&mut self, body: Bytes) -> Result<(), Error> {
        match self {
            Exporter::Grpc { client, endpoint } => {
                let status = |s: tonic::Status| refused(endpoint, format!("{}: {}", s.code(), s.message()));
                client.ready().await.map_err(|e| refused(endpoint, e))?;
                let path = http::uri::PathAndQuery::from_static(EXPORT_PATH);
                client.unary(tonic::Request::new(body), path, Encoded).await.map_err(status)?;
                Ok(())
            }
            Exporter::Http { endpoint, conn } => {
                let mut sender = match conn.take().filter(|c| !c.is_closed()) {
                    Some(c) => c,
                    None => connect(endpoint).await?,
                };
                sender.ready().await.map_err(|e| refused(endpoint, e))?;
                let path = endpoint.path_and_query().map_or("/v1/traces", |p| p.as_str());
                let req = Request::post(path)
                    .header(header::HOST, endpoint.authority().map_or("", |a| a.as_str()))
                    .header(header::CONTENT_TYPE, "application/x-protobuf")
                    .body(Full::new(body))
                    .expect("a valid request");
                let rsp = sender.send_request(req).await.map_err(|e| refused(endpoint, e))?;
                let status = rsp.status();
                // Read the answer whole so the connection can carry the next batch.
                let _ = rsp.into_body().collect().await;
                if !status.is_success() {
                    return Err(refused(endpoint, format!("HTTP {status}")));
                }
                *conn = Some(sender);
                Ok(())
            }
        }
    }
}

fn refused(endpoint: &Uri, reason: impl std::fmt::Display) -> Error {
    Error::Refused { endpoint: endpoint.clone(), reason: reason.to_string() }
}

async fn connect(endpoint: &Uri) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, Error> {
    let io_err = |source| Error::Connect { endpoint: endpoint.clone(), source };
    let host = endpoint.host().unwrap_or("localhost").trim_start_matches('[').trim_end_matches(']');
    let port = endpoint.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host, port)).await.map_err(io_err)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| io_err(std::io::Error::other(e)))?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A gRPC codec for messages encoded beforehand; the answer (an empty
/// `ExportTraceServiceResponse`, or a partial-success note) is read and ignored.
#[derive(Clone, Copy, Default)]
struct Encoded;

impl Codec for Encoded {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = Encoded;
    type Decoder = Encoded;

    fn encoder(&mut self) -> Self::Encoder {
        Encoded
    }

    fn decoder(&mut self) -> Self::Decoder {
        Encoded
    }
}

impl Encoder for Encoded {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Encoded {
    type Item = ();
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Self::Error> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}
