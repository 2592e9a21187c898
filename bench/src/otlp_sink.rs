//! `weft-otlp-sink`: the live collector of bench/run's tracing target. It answers
//! OTLP/gRPC exports as a collector does (`TraceService/Export` over h2c, a gRPC
//! response with `grpc-status: 0`) and walks each request's protobuf framing to count
//! the spans, without building them: the benchmark shares two cores between everything,
//! and a collector that allocates per attribute would bill its own work to the proxies.
//! The end-to-end tests check what the spans hold with opentelemetry-proto's decoder.
//!
//!   weft-otlp-sink 127.0.0.1:4317     # prints the spans received on SIGTERM/Ctrl-C

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use bytes::{Buf, Bytes};
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};

const EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let addr: std::net::SocketAddr = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: weft-otlp-sink ADDR (e.g. 127.0.0.1:4317)"))?
        .parse()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let spans = Arc::new(AtomicU64::new(0));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let spans = spans.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| export(req, spans.clone()));
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
    println!("{}", spans.load(Ordering::Relaxed));
    Ok(())
}

type Body = StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

async fn export(req: Request<Incoming>, spans: Arc<AtomicU64>) -> Result<Response<Body>, Infallible> {
    let path_ok = req.uri().path() == EXPORT;
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    // A gRPC message: 1 byte "compressed" flag, 4 bytes length, the protobuf.
    let status = match (path_ok, body.len() >= 5 && body[0] == 0) {
        (true, true) => match count_spans(body.slice(5..)) {
            Some(n) => {
                spans.fetch_add(n, Ordering::Relaxed);
                "0"
            }
            None => "3", // INVALID_ARGUMENT
        },
        (false, _) => "12", // UNIMPLEMENTED
        (true, false) => "3",
    };
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", status.parse().expect("digits"));
    // An empty ExportTraceServiceResponse.
    let frames = vec![Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))), Ok(Frame::trailers(trailers))];
    let rsp = Response::builder()
        .header("content-type", "application/grpc")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .expect("a valid response");
    Ok(rsp)
}

/// Spans in an ExportTraceServiceRequest: resource_spans (1) → scope_spans (2) → spans (2).
fn count_spans(request: Bytes) -> Option<u64> {
    let mut n = 0;
    for resource_spans in fields(request, 1)? {
        for scope_spans in fields(resource_spans, 2)? {
            n += fields(scope_spans, 2)?.len() as u64;
        }
    }
    Some(n)
}

/// The length-delimited fields numbered `tag` of a message; `None` if it is malformed.
fn fields(mut msg: Bytes, tag: u32) -> Option<Vec<Bytes>> {
    use prost::encoding::{decode_varint, WireType};
    let mut out = vec![];
    while msg.has_remaining() {
        let key = decode_varint(&mut msg).ok()?;
        let (field, wire) = ((key >> 3) as u32, WireType::try_from(key & 7).ok()?);
        let len = match wire {
            WireType::Varint => {
                decode_varint(&mut msg).ok()?;
                continue;
            }
            WireType::SixtyFourBit => 8,
            WireType::ThirtyTwoBit => 4,
            WireType::LengthDelimited => decode_varint(&mut msg).ok()? as usize,
            WireType::StartGroup | WireType::EndGroup => return None,
        };
        if len > msg.remaining() {
            return None;
        }
        let value = msg.split_to(len);
        if field == tag && wire == WireType::LengthDelimited {
            out.push(value);
        }
    }
    Some(out)
}
