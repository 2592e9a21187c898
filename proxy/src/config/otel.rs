//! Span export settings from OpenTelemetry's standard `OTEL_*` variables.

use std::time::Duration;

use super::env::{err, parse, Env, Error};

// OpenTelemetry's standard variables (the SDK environment specification), so a proxy
// is configured for tracing exactly as the apps beside it are.
pub const OTEL_SDK_DISABLED: &str = "OTEL_SDK_DISABLED";
pub const OTEL_TRACES_EXPORTER: &str = "OTEL_TRACES_EXPORTER";
pub const OTEL_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub const OTEL_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
pub const OTEL_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
pub const OTEL_TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
pub const OTEL_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TIMEOUT";
pub const OTEL_SAMPLER: &str = "OTEL_TRACES_SAMPLER";
pub const OTEL_SAMPLER_ARG: &str = "OTEL_TRACES_SAMPLER_ARG";
pub const OTEL_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
pub const OTEL_BSP_MAX_QUEUE_SIZE: &str = "OTEL_BSP_MAX_QUEUE_SIZE";
pub const OTEL_BSP_SCHEDULE_DELAY: &str = "OTEL_BSP_SCHEDULE_DELAY";
pub const OTEL_BSP_MAX_EXPORT_BATCH_SIZE: &str = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE";

/// Span export over OTLP, from the `OTEL_*` variables.
#[derive(Clone, Debug)]
pub struct TraceConfig {
    /// `service.name` of the spans: `OTEL_SERVICE_NAME`, else the workload.
    pub service_name: String,
    /// `http://host:port`; for HTTP/protobuf the full URL spans are POSTed to.
    pub endpoint: http::Uri,
    pub protocol: OtlpProtocol,
    pub sampler: Sampler,
    /// Spans waiting for export; more are dropped (and counted).
    pub max_queue: usize,
    pub max_batch: usize,
    /// How long a span may wait for its batch to fill.
    pub schedule_delay: Duration,
    /// Longest an export may take before it is abandoned (its spans dropped).
    pub export_timeout: Duration,
}

pub use weft_api::otlp::Protocol as OtlpProtocol;

/// `OTEL_TRACES_SAMPLER`: sampling of new traces, and whether a caller's decision wins.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampler {
    /// Fraction of new traces sampled, 0 to 1.
    pub ratio: f64,
    pub parent_based: bool,
}

/// Tracing is on when an OTLP endpoint is set and neither `OTEL_SDK_DISABLED=true` nor
/// `OTEL_TRACES_EXPORTER=none` turns it off.
pub(super) fn trace_config(env: &dyn Env, workload: &str) -> Result<Option<TraceConfig>, Error> {
    let get = |name| env.get(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    if get(OTEL_SDK_DISABLED).is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    match get(OTEL_TRACES_EXPORTER).as_deref() {
        None | Some("otlp") => {}
        Some("none") => return Ok(None),
        Some(other) => return Err(err(OTEL_TRACES_EXPORTER, other, "otlp or none")),
    }
    let (protocol_var, protocol) = match get(OTEL_TRACES_PROTOCOL) {
        Some(p) => (OTEL_TRACES_PROTOCOL, p),
        None => (OTEL_PROTOCOL, get(OTEL_PROTOCOL).unwrap_or_else(|| "grpc".into())),
    };
    let protocol = weft_api::otlp::protocol(&protocol)
        .map_err(|_| err(protocol_var, &protocol, "grpc or http/protobuf (http/json is not supported)"))?;
    const URL: &str =
        "an http:// URL like http://jaeger:4317 (https is not supported: use a local collector)";
    // The signal-specific variable is the URL itself; the general one is a base to which
    // HTTP/protobuf appends /v1/traces.
    let (name, url, append) = match (get(OTEL_TRACES_ENDPOINT), get(OTEL_ENDPOINT)) {
        (Some(u), _) => (OTEL_TRACES_ENDPOINT, u, false),
        (None, Some(u)) => (OTEL_ENDPOINT, u, protocol == OtlpProtocol::HttpProtobuf),
        (None, None) => return Ok(None),
    };
    let full = if append { format!("{}/v1/traces", url.trim_end_matches('/')) } else { url.clone() };
    let endpoint = weft_api::otlp::endpoint(&full).map_err(|_| err(name, &url, URL))?;
    let sampler_name = get(OTEL_SAMPLER).unwrap_or_else(|| "parentbased_always_on".into());
    let arg = || -> Result<f64, Error> {
        match get(OTEL_SAMPLER_ARG) {
            None => Ok(1.0),
            Some(a) => a
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| err(OTEL_SAMPLER_ARG, &a, "a ratio from 0 to 1, like 0.1")),
        }
    };
    let sampler = match sampler_name.as_str() {
        "always_on" => Sampler { ratio: 1.0, parent_based: false },
        "always_off" => Sampler { ratio: 0.0, parent_based: false },
        "traceidratio" => Sampler { ratio: arg()?, parent_based: false },
        "parentbased_always_on" => Sampler { ratio: 1.0, parent_based: true },
        "parentbased_always_off" => Sampler { ratio: 0.0, parent_based: true },
        "parentbased_traceidratio" => Sampler { ratio: arg()?, parent_based: true },
        other => {
            return Err(err(
                OTEL_SAMPLER,
                other,
                "always_on, always_off, traceidratio or their parentbased_ forms",
            ))
        }
    };
    let millis = |name, default: &str| -> Result<Duration, Error> {
        let ms: u64 = parse(env, name, default, "milliseconds, like 5000")?;
        Ok(Duration::from_millis(ms))
    };
    let max_queue: usize = parse(env, OTEL_BSP_MAX_QUEUE_SIZE, "2048", "a span count like 2048")?;
    let max_batch: usize = parse(env, OTEL_BSP_MAX_EXPORT_BATCH_SIZE, "512", "a span count like 512")?;
    if max_queue == 0 || max_batch == 0 || max_batch > max_queue {
        return Err(err(
            OTEL_BSP_MAX_EXPORT_BATCH_SIZE,
            &max_batch.to_string(),
            "1 to OTEL_BSP_MAX_QUEUE_SIZE",
        ));
    }
    Ok(Some(TraceConfig {
        service_name: get(OTEL_SERVICE_NAME).unwrap_or_else(|| workload.to_string()),
        endpoint,
        protocol,
        sampler,
        max_queue,
        max_batch,
        schedule_delay: millis(OTEL_BSP_SCHEDULE_DELAY, "5000")?,
        export_timeout: millis(OTEL_TIMEOUT, "10000")?,
    }))
}
