//! The names of the proxy's `WEFT_*` settings that other parts set: `weft up` and the
//! Kubernetes injector configure sidecars with them, and weft-proxy's config reads them.
//! docs/config.md describes each.

pub const INBOUND_ADDR: &str = "WEFT_INBOUND_ADDR";
pub const OUTBOUND_ADDR: &str = "WEFT_OUTBOUND_ADDR";
pub const ADMIN_ADDR: &str = "WEFT_ADMIN_ADDR";
pub const APP_ADDR: &str = "WEFT_APP_ADDR";
pub const CONTROL_ADDR: &str = "WEFT_CONTROL_ADDR";
pub const IDENTITY: &str = "WEFT_IDENTITY";
pub const TOKEN: &str = "WEFT_TOKEN";
pub const TOKEN_FILE: &str = "WEFT_TOKEN_FILE";
pub const WORKLOAD: &str = "WEFT_WORKLOAD";
pub const ACCESS_LOG: &str = "WEFT_ACCESS_LOG";
pub const LOG: &str = "WEFT_LOG";
pub const INBOUND_PORTS: &str = "WEFT_INBOUND_PORTS";
pub const DEFAULT_INBOUND_POLICY: &str = "WEFT_DEFAULT_INBOUND_POLICY";
pub const OPAQUE_PORTS: &str = "WEFT_OPAQUE_PORTS";
pub const INBOUND_PROBES: &str = "WEFT_INBOUND_PROBES";
pub const PROXY_UID: &str = "WEFT_PROXY_UID";
pub const INIT_SKIP_INBOUND_PORTS: &str = "WEFT_INIT_SKIP_INBOUND_PORTS";
pub const INIT_SKIP_OUTBOUND_PORTS: &str = "WEFT_INIT_SKIP_OUTBOUND_PORTS";
pub const OTEL_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub const OTEL_SAMPLER: &str = "OTEL_TRACES_SAMPLER";
pub const OTEL_SAMPLER_ARG: &str = "OTEL_TRACES_SAMPLER_ARG";

/// The path the kubelet's gRPC probes call.
pub const GRPC_HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
