//! The custom resources the Kubernetes source reads. The Gateway API kinds (HTTPRoute,
//! GRPCRoute) are the subset of fields Weft honours, declared here rather than taken from
//! the `gateway-api` crate so that kube and k8s-openapi stay on their newest versions
//! (docs/ARCHITECTURE.md); unknown fields are ignored, as a newer Gateway API may add
//! some. Weft's own kinds (`policy.weft.dev/v1alpha1`) are what the Gateway API lacks;
//! their CRDs are generated from these types into k8s/crds/.

use k8s_openapi::apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

// --- Gateway API (gateway.networking.k8s.io/v1), the GAMMA mesh profile -------------

#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "HTTPRoute",
    namespaced,
    status = "RouteStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "GRPCRoute",
    namespaced,
    status = "RouteStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

/// A route's status: an entry per parent, each written by the controller that serves it
/// (`server::kubernetes::status` writes the mesh's), kept as the API holds them.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct RouteStatus {
    #[serde(default)]
    pub parents: Vec<serde_json::Value>,
}

/// A route's parent; for mesh routes (GAMMA) a Service (`group: ""`, `kind: Service`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<u16>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default)]
    pub filters: Vec<Filter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    pub timeouts: Option<Timeouts>,
    /// Experimental channel (`HTTPRouteRetry`).
    pub retry: Option<HttpRouteRetry>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteRule {
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    #[serde(default)]
    pub filters: Vec<Filter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    pub path: Option<PathMatch>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    #[serde(default)]
    pub query_params: Vec<ValueMatch>,
    pub method: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteMatch {
    pub method: Option<GrpcMethodMatch>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PathMatch {
    /// `Exact`, `PathPrefix` (the default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub value: Option<String>,
}

/// A header or query parameter match.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ValueMatch {
    /// `Exact` (the default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcMethodMatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub service: Option<String>,
    pub method: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Filter {
    #[serde(rename = "type")]
    pub kind: String,
    pub request_header_modifier: Option<HeaderModifier>,
    pub response_header_modifier: Option<HeaderModifier>,
    pub request_redirect: Option<RequestRedirect>,
    pub url_rewrite: Option<UrlRewrite>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RequestRedirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status_code: Option<u16>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UrlRewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

/// `ReplaceFullPath` or `ReplacePrefixMatch`, with the matching field.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub kind: String,
    pub replace_full_path: Option<String>,
    pub replace_prefix_match: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HeaderModifier {
    #[serde(default)]
    pub set: Vec<Header>,
    #[serde(default)]
    pub add: Vec<Header>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct Header {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<u16>,
    pub weight: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// The whole request, retries included (Gateway API duration: `10s`, `1h30m`).
    pub request: Option<String>,
    /// Each attempt.
    pub backend_request: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRetry {
    /// Statuses retried (the Gateway API allows 500–599).
    #[serde(default)]
    pub codes: Vec<u16>,
    /// Retries after the first attempt.
    pub attempts: Option<u32>,
    pub backoff: Option<String>,
}

// --- Weft's own: policy.weft.dev/v1alpha1 ---------------------------------------------

/// Who may use a port of the selected pods, and how fast.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "policy.weft.dev",
    version = "v1alpha1",
    kind = "InboundPolicy",
    namespaced,
    shortname = "inpol",
    printcolumn = r#"{"name":"Port","type":"string","jsonPath":".spec.port"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundPolicySpec {
    /// Pods of this namespace the policy applies to (`matchLabels`, `matchExpressions`);
    /// empty selects every pod.
    #[serde(default)]
    pub pod_selector: LabelSelector,
    /// The container port the app listens on: its number, or the name a container's
    /// `ports` give it.
    pub port: IntOrString,
    #[serde(default)]
    pub mode: Mode,
    /// Clients allowed; absent: every meshed client (and plaintext ones when permissive).
    pub allow: Option<Allow>,
    pub rate_limit: Option<RateLimit>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// mTLS required.
    #[default]
    Strict,
    /// mTLS when the client offers it; plaintext accepted.
    Permissive,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Allow {
    #[serde(default)]
    pub service_accounts: Vec<ServiceAccountRef>,
    /// Every service account of these namespaces.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// SPIFFE IDs, `spiffe://<trust domain>/ns/<ns>/sa/<sa>`.
    #[serde(default)]
    pub identities: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountRef {
    pub name: String,
    /// Defaults to the policy's namespace.
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    #[schemars(range(min = 1))]
    pub requests_per_second: u32,
    /// Requests allowed at once above the rate; default one second's worth.
    pub burst: Option<u32>,
    /// At most this many per second for any one client identity (fairness).
    pub per_identity: Option<u32>,
}

/// How clients treat a Service: balancing, outlier detection, a concurrency limit and
/// fault injection.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "policy.weft.dev",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    namespaced,
    shortname = "trafpol"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    /// A Service of this namespace.
    pub target_ref: ServiceRef,
    pub balancer: Option<Balancer>,
    pub outlier_detection: Option<OutlierDetection>,
    /// Requests in flight from one proxy to the Service at most (503 beyond).
    #[schemars(range(min = 1))]
    pub max_concurrent_requests: Option<u32>,
    /// Applied to every request to the Service.
    pub fault: Option<Fault>,
    /// Caps the retries of every route rule of the Service that retries.
    pub retry_budget: Option<RetryBudget>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    /// Retries at most this share of the requests (over 10 s)...
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
    /// ...plus this many per second.
    #[serde(default)]
    pub min_retries_per_second: u32,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceRef {
    pub name: String,
    /// One port of the Service; absent: all of them.
    pub port: Option<u16>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Balancer {
    PeakEwma,
    RoundRobin,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Failures in a row that eject an endpoint; 0 turns ejection off.
    pub consecutive_failures: Option<u32>,
    /// e.g. `5s`.
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"))]
    pub ejection_time: Option<String>,
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"))]
    pub max_ejection_time: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"))]
    pub duration: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
    #[schemars(range(min = 200, max = 599))]
    pub status: u16,
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    /// The CRDs in k8s/crds/ are generated from these types; this fails when they differ.
    /// `WEFT_UPDATE_CRDS=1 cargo test -p weft-control crds` rewrites them.
    #[test]
    fn checked_in_crds_match_the_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s/crds");
        for (file, crd) in [
            ("inboundpolicies.policy.weft.dev.yaml", InboundPolicy::crd()),
            ("trafficpolicies.policy.weft.dev.yaml", TrafficPolicy::crd()),
        ] {
            let want = format!(
                "# Generated from control-plane/src/server/kubernetes/resources.rs; do not edit.\n{}",
                serde_yaml_ng::to_string(&crd).unwrap()
            );
            let path = dir.join(file);
            if std::env::var_os("WEFT_UPDATE_CRDS").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &want).unwrap();
            }
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                have == want,
                "{} differs from the Rust types; run WEFT_UPDATE_CRDS=1 cargo test -p weft-control crds",
                path.display()
            );
        }
    }
}
