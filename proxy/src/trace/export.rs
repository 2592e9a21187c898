//! OTLP export of finished spans, over gRPC or HTTP/protobuf (what Jaeger, Tempo and the
//! OpenTelemetry Collector ingest natively).
//!
//! One task drains the tracer's bounded queue in batches of up to
//! `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` spans, sent when full or every
//! `OTEL_BSP_SCHEDULE_DELAY`, one export at a time, each abandoned after
//! `OTEL_EXPORTER_OTLP_TIMEOUT`. While a collector is slow or absent the queue fills and
//! the request path drops spans instead of waiting: memory stays at one queue and one
//! batch. We batch here rather than with opentelemetry_sdk's BatchSpanProcessor because
//! that one neither counts its drops where metrics can see them nor runs on our runtime;
//! the wire types are the official ones from opentelemetry-proto.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{trace_service_client::TraceServiceClient, ExportTraceServiceRequest},
    common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue},
    resource::v1::Resource,
    trace::v1::{span::SpanKind, status::StatusCode, ResourceSpans, ScopeSpans, Span, Status},
};
use prost::Message;
use tokio::sync::oneshot;

use super::{Kind, Queue, SpanData, Value};
use crate::{
    config::{OtlpProtocol, TraceConfig},
    metrics::Metrics,
};

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

/// Asks the exporter to send what it holds and stop; answered when done.
pub type Flush = oneshot::Sender<oneshot::Sender<()>>;

/// Runs the exporter until `flush` is asked: a batch whenever one is full, and what is
/// waiting every `OTEL_BSP_SCHEDULE_DELAY`.
pub async fn run(
    cfg: TraceConfig,
    queue: Arc<Queue>,
    mut flush: oneshot::Receiver<oneshot::Sender<()>>,
    metrics: Arc<Metrics>,
) {
    let resource = Resource {
        attributes: vec![
            kv("service.name", Value::Str(cfg.service_name.clone())),
            kv("telemetry.sdk.name", Value::Static("weft-proxy")),
            kv("telemetry.sdk.language", Value::Static("rust")),
            kv("telemetry.sdk.version", Value::Static(env!("CARGO_PKG_VERSION"))),
        ],
        ..Default::default()
    };
    let mut exporter = Exporter::new(&cfg);
    let mut failing = false;
    loop {
        let stopping = tokio::select! {
            _ = queue.ready.notified() => None,
            _ = tokio::time::sleep(cfg.schedule_delay) => None,
            ack = &mut flush => Some(ack),
        };
        // Everything waiting, a batch at a time (at most the queue's size).
        loop {
            let batch = queue.take();
            let full = batch.len() == cfg.max_batch;
            export(&mut exporter, &cfg, &resource, batch, &metrics, &mut failing).await;
            if !full {
                break;
            }
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
    resource: &Resource,
    batch: Vec<SpanData>,
    metrics: &Metrics,
    failing: &mut bool,
) {
    if batch.is_empty() {
        return;
    }
    let n = batch.len() as u64;
    let request = to_request(resource, batch.into_iter());
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
    Grpc { client: TraceServiceClient<tonic::transport::Channel>, endpoint: Uri },
    Http { endpoint: Uri, conn: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> },
}

impl Exporter {
    fn new(cfg: &TraceConfig) -> Self {
        match cfg.protocol {
            OtlpProtocol::Grpc => {
                let channel = tonic::transport::Channel::builder(cfg.endpoint.clone())
                    .connect_timeout(cfg.export_timeout)
                    .connect_lazy();
                Exporter::Grpc { client: TraceServiceClient::new(channel), endpoint: cfg.endpoint.clone() }
            }
            OtlpProtocol::HttpProtobuf => Exporter::Http { endpoint: cfg.endpoint.clone(), conn: None },
        }
    }

    async fn send(&mut self, request: ExportTraceServiceRequest) -> Result<(), Error> {
        match self {
            Exporter::Grpc { client, endpoint } => match client.export(request).await {
                Ok(_) => Ok(()),
                Err(status) => Err(refused(endpoint, format!("{}: {}", status.code(), status.message()))),
            },
            Exporter::Http { endpoint, conn } => {
                let body = Bytes::from(request.encode_to_vec());
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

fn to_request(resource: &Resource, spans: impl Iterator<Item = SpanData>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "weft-proxy".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans: spans.map(to_span).collect(),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

fn to_span(data: SpanData) -> Span {
    let SpanData { span, end } = data;
    let nanos =
        |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let kind = match span.kind {
        Kind::Server => SpanKind::Server,
        Kind::Client => SpanKind::Client,
        Kind::Internal => SpanKind::Internal,
    };
    Span {
        trace_id: span.ctx.trace_id.to_vec(),
        span_id: span.ctx.span_id.to_vec(),
        trace_state: span.ctx.trace_state.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("").into(),
        parent_span_id: span.parent.map(|p| p.to_vec()).unwrap_or_default(),
        // W3C trace flags: sampled.
        flags: 1,
        name: span.name,
        kind: kind as i32,
        start_time_unix_nano: nanos(span.start),
        end_time_unix_nano: nanos(end),
        attributes: span.attributes.into_iter().map(|(k, v)| kv(k, v)).collect(),
        status: Some(match span.error {
            Some(message) => Status { message, code: StatusCode::Error as i32 },
            None => Status { message: String::new(), code: StatusCode::Unset as i32 },
        }),
        ..Default::default()
    }
}

fn kv(key: &'static str, value: Value) -> KeyValue {
    let value = match value {
        Value::Str(s) => any_value::Value::StringValue(s),
        Value::Static(s) => any_value::Value::StringValue(s.to_string()),
        Value::Int(i) => any_value::Value::IntValue(i),
    };
    KeyValue { key: key.to_string(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}
