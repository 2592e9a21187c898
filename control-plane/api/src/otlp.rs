//! What both sides accept as an OTLP trace collector address (the proxy from
//! `OTEL_EXPORTER_OTLP_*`, `weft up` from the mesh file's `tracing:`).

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidOtlp {
    #[error("{0:?} is not an http:// URL like http://127.0.0.1:4317 (run a collector beside the proxy; https is not supported)")]
    Endpoint(String),
    #[error("{0:?}: expected grpc or http/protobuf")]
    Protocol(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

/// An `http://host[:port][/path]` collector URL.
pub fn endpoint(url: &str) -> Result<http::Uri, InvalidOtlp> {
    let uri: http::Uri = url.parse().map_err(|_| InvalidOtlp::Endpoint(url.to_string()))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none_or(str::is_empty) {
        return Err(InvalidOtlp::Endpoint(url.to_string()));
    }
    Ok(uri)
}

pub fn protocol(s: &str) -> Result<Protocol, InvalidOtlp> {
    match s {
        "grpc" => Ok(Protocol::Grpc),
        "http/protobuf" => Ok(Protocol::HttpProtobuf),
        other => Err(InvalidOtlp::Protocol(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_urls_and_known_protocols() {
        assert!(endpoint("http://127.0.0.1:4317").is_ok());
        assert!(endpoint("http://jaeger:4318/v1/traces").is_ok());
        for bad in ["127.0.0.1:4317", "https://c:4317", "http://", "grpc://c:4317"] {
            assert!(endpoint(bad).is_err(), "{bad}");
        }
        assert_eq!(protocol("grpc"), Ok(Protocol::Grpc));
        assert!(protocol("http/json").is_err());
    }
}
