//! The mesh file: services, their endpoints, workloads (identities and tokens) and
//! inbound policies, in YAML. This is the local source of the control plane's world;
//! [`Mesh::parse`] validates everything, so a file either applies whole or not at all.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde::Deserialize;
use weft_api::duration::Setting;

use super::{
    ca::SpiffeId,
    precedence,
    routes::{self, Invalid},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{file}: {msg}")]
    Syntax { file: String, msg: String },
    #[error("{file}: {}{path}: {msg}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
    Invalid { file: String, line: Option<usize>, path: String, msg: String },
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Mesh {
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub policies: Vec<InboundPolicy>,
    /// Outbound routing of services (see [`crate::server::routes`]).
    #[serde(default)]
    pub routes: Vec<routes::Route>,
    /// Where the sidecars (and apps) of a local mesh send spans; `weft up` passes it on
    /// as the standard `OTEL_*` variables.
    pub tracing: Option<Tracing>,
    /// Which accepted state this is (1 and up), set by the source, not the file; answers
    /// carry it (see the API's Generations).
    #[serde(skip)]
    pub generation: u64,
    /// Pods by address, from sources that know them (Kubernetes): direct calls to a pod
    /// and the labels inbound policies select on. The mesh file has none.
    #[serde(skip)]
    pub pods: BTreeMap<IpAddr, Pod>,
    /// Whether inbound policies select pods (Kubernetes): a caller whose pod is not in
    /// `pods` gets no policy answer until it is.
    #[serde(skip)]
    pub selects_pods: bool,
    /// Whether a service's rules are ranked as the Gateway API ranks them (Kubernetes)
    /// instead of tried in the order they are listed (the mesh file).
    #[serde(skip)]
    pub gateway_precedence: bool,
    /// Authority → index in `services`, made by [`Mesh::index`] so that a lookup does not
    /// scan every service (a change is answered to every watcher at once).
    #[serde(skip)]
    by_authority: HashMap<String, usize>,
}

/// A pod a source knows (Kubernetes).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The SPIFFE ID its proxy proves, when it is meshed.
    pub identity: Option<String>,
    /// Its containers' named ports.
    pub ports: BTreeMap<String, u16>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Tracing {
    /// The OTLP collector, `http://host:port`.
    pub endpoint: String,
    /// `grpc` (Jaeger's 4317) or `http/protobuf` (4318).
    #[serde(default = "default_otlp_protocol")]
    pub protocol: String,
    /// Share of new traces sampled; a caller's decision is followed.
    #[serde(default = "default_sampling")]
    pub sampling: f64,
    /// A collector for `weft up` to run first and stop last (Jaeger all-in-one, say).
    #[serde(default)]
    pub collector: Vec<String>,
}

fn default_otlp_protocol() -> String {
    "grpc".into()
}

fn default_sampling() -> f64 {
    1.0
}

impl Tracing {
    /// The `OTEL_*` settings of a workload named `service`.
    pub fn env(&self, service: &str) -> Vec<(&'static str, String)> {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", self.endpoint.clone()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", self.protocol.clone()),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".into()),
            ("OTEL_TRACES_SAMPLER_ARG", self.sampling.to_string()),
            ("OTEL_SERVICE_NAME", service.to_string()),
        ]
    }

    fn validate(&self) -> Result<(), Invalid> {
        let invalid = |path: &str, msg: String| Invalid { path: path.into(), msg };
        weft_api::otlp::endpoint(&self.endpoint).map_err(|e| invalid("tracing.endpoint", e.to_string()))?;
        weft_api::otlp::protocol(&self.protocol).map_err(|e| invalid("tracing.protocol", e.to_string()))?;
        if !(0.0..=1.0).contains(&self.sampling) {
            return Err(invalid("tracing.sampling", format!("{}: expected 0 to 1", self.sampling)));
        }
        Ok(())
    }
}

fn default_trust_domain() -> String {
    "weft.local".into()
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Workload {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Defaults to the workload's name.
    pub service_account: Option<String>,
    /// The token its proxy presents to the control plane.
    pub token: String,
    /// Local mesh only: where the workload's app listens; its sidecar forwards inbound
    /// traffic there, and inbound policies name this port. `weft up` picks a free port
    /// when it is absent.
    pub app: Option<SocketAddr>,
    /// Local mesh only: the command `weft up` runs for this workload.
    #[serde(default)]
    pub command: Vec<String>,
    /// Local mesh only: environment for the command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

fn default_namespace() -> String {
    "default".into()
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub port: u16,
    /// Other names the service answers to (e.g. `backend:8080`).
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// How proxies spread requests over the endpoints.
    #[serde(default)]
    pub balancer: Balancer,
    #[serde(default)]
    pub outlier_detection: OutlierDetection,
    /// Requests in flight from one proxy to this service at most (503 beyond).
    pub max_concurrent_requests: Option<u32>,
}

/// Circuit breaking per endpoint (see docs/mesh-file.md).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Failures in a row that eject an endpoint; 0 turns ejection off.
    #[serde(default = "five")]
    pub consecutive_failures: u32,
    #[serde(default = "five_secs")]
    pub ejection_time: Setting,
    #[serde(default = "one_minute")]
    pub max_ejection_time: Setting,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: 5,
            ejection_time: five_secs(),
            max_ejection_time: one_minute(),
        }
    }
}

fn five() -> u32 {
    5
}

fn five_secs() -> Setting {
    Setting(Duration::from_secs(5))
}

fn one_minute() -> Setting {
    Setting(Duration::from_secs(60))
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Balancer {
    /// Power of two choices over peak-EWMA latency, candidates drawn by weight.
    #[default]
    PeakEwma,
    /// Smooth weighted round robin.
    RoundRobin,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Endpoint {
    pub address: SocketAddr,
    /// The workload behind it; meshed endpoints name one, plain ones do not.
    pub workload: Option<String>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The SPIFFE ID, for sources that know it directly (Kubernetes: the pod's service
    /// account); the mesh file names a `workload` instead.
    #[serde(skip)]
    pub identity: Option<String>,
    /// The endpoint's zone, when its source knows it (an EndpointSlice's `zone`).
    #[serde(skip)]
    pub zone: Option<String>,
}

fn default_weight() -> u32 {
    1
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Strict,
    Permissive,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InboundPolicy {
    pub workload: String,
    pub port: u16,
    #[serde(default)]
    pub mode: Mode,
    /// SPIFFE IDs allowed to connect; absent means every meshed identity.
    pub allow: Option<Vec<String>>,
    pub rate_limit: Option<RateLimit>,
    /// Sources that select pods by label (Kubernetes) set this in place of `workload`.
    #[serde(skip)]
    pub pods: Option<PodSelector>,
    /// Kubernetes: the port by the name a selected pod's container gives it, in place of
    /// `port` (pods may number a name differently).
    #[serde(skip)]
    pub port_name: Option<String>,
}

impl InboundPolicy {
    /// Whether this is the policy of `port` of the pod `me` (when known).
    pub fn is_for_port(&self, port: u16, me: Option<&Pod>) -> bool {
        match &self.port_name {
            None => self.port == port,
            Some(name) => me.and_then(|me| me.ports.get(name)) == Some(&port),
        }
    }
}

/// Pods of one namespace whose labels include all of `labels` and meet every one of
/// `expressions` (a Kubernetes label selector).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodSelector {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub expressions: Vec<(String, LabelOp)>,
}

/// A `matchExpressions` requirement on one label key.
#[derive(Clone, Debug, PartialEq)]
pub enum LabelOp {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

impl PodSelector {
    pub fn selects(&self, pod: &Pod) -> bool {
        pod.namespace == self.namespace
            && self.labels.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
            && self.expressions.iter().all(|(key, op)| {
                let value = pod.labels.get(key);
                match op {
                    LabelOp::In(values) => value.is_some_and(|v| values.contains(v)),
                    // As in Kubernetes: a pod without the label is not in the set.
                    LabelOp::NotIn(values) => value.is_none_or(|v| !values.contains(v)),
                    LabelOp::Exists => value.is_some(),
                    LabelOp::DoesNotExist => value.is_none(),
                }
            })
    }
}

/// A local rate limit of HTTP requests on an inbound port (429 beyond).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimit {
    pub requests_per_second: u32,
    /// Requests allowed at once above the rate; default: one second's worth.
    pub burst: Option<u32>,
    /// At most this many per second for any one client identity.
    pub per_identity: Option<u32>,
}

impl Mesh {
    /// Parses and validates a mesh file. Errors name the file, the line or the field,
    /// and what to change.
    pub fn parse(file: &str, text: &str) -> Result<Mesh, Error> {
        let mesh: Mesh = serde_yaml_ng::from_str(text).map_err(|e| {
            let at = syntax_error_at(text, &e)
                .map(|(line, column)| format!("line {line}, column {column}: "))
                .unwrap_or_default();
            Error::Syntax { file: file.into(), msg: format!("{at}{e}") }
        })?;
        mesh.validate(file).map_err(|e| match e {
            Error::Invalid { file, path, msg, .. } => {
                let line = line_of(text, &path, &msg);
                Error::Invalid { file, line, path, msg }
            }
            other => other,
        })?;
        Ok(mesh.index())
    }

    /// Makes the authority index; sources call it once a state is complete.
    pub fn index(mut self) -> Mesh {
        let mut by_authority = HashMap::new();
        for (i, s) in self.services.iter().enumerate() {
            for a in self.authorities(s) {
                by_authority.entry(a).or_insert(i);
            }
        }
        self.by_authority = by_authority;
        self
    }

    fn validate(&self, file: &str) -> Result<(), Error> {
        let invalid = |path: String, msg: String| Error::Invalid { file: file.into(), line: None, path, msg };
        let mut names = HashSet::new();
        let mut tokens = HashSet::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let path = format!("workloads[{i}] ({})", w.name);
            if !names.insert((&w.namespace, &w.name)) {
                return Err(invalid(path, "duplicate workload name in its namespace".into()));
            }
            if w.token.len() < 16 {
                return Err(invalid(path, "token must be at least 16 characters".into()));
            }
            if !tokens.insert(&w.token) {
                return Err(invalid(
                    path,
                    "token is used by another workload; each workload needs its own".into(),
                ));
            }
            self.identity_of(w)
                .parse::<SpiffeId>()
                .map_err(|e| invalid(path, format!("{e}; names may use letters, digits, '-', '.', '_'")))?;
        }
        let known = |name: &str| self.workloads.iter().any(|w| w.name == name);
        let mut authorities = HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            let path = format!("services[{i}] ({})", s.name);
            for a in self.authorities(s) {
                if !authorities.insert(a.clone()) {
                    return Err(invalid(path, format!("authority {a} is claimed by another service")));
                }
            }
            for (j, e) in s.endpoints.iter().enumerate() {
                if let Some(w) = &e.workload {
                    if !known(w) {
                        return Err(invalid(
                            format!("{path}.endpoints[{j}]"),
                            format!("unknown workload {w:?}"),
                        ));
                    }
                }
                if e.weight == 0 {
                    return Err(invalid(
                        format!("{path}.endpoints[{j}]"),
                        "weight must be at least 1".into(),
                    ));
                }
            }
        }
        for (i, p) in self.policies.iter().enumerate() {
            let path = format!("policies[{i}]");
            if !known(&p.workload) {
                return Err(invalid(path, format!("unknown workload {:?}", p.workload)));
            }
            for id in p.allow.iter().flatten() {
                id.parse::<SpiffeId>().map_err(|e| invalid(path.clone(), e.to_string()))?;
            }
            if p.rate_limit.as_ref().is_some_and(|r| r.requests_per_second == 0) {
                return Err(invalid(path, "rateLimit.requestsPerSecond must be at least 1".into()));
            }
        }
        if let Some(t) = &self.tracing {
            t.validate().map_err(|e| invalid(e.path, e.msg))?;
        }
        let services = |name: &str| self.service_named(name).map(Service::authority);
        routes::validate(&self.routes, &services).map_err(|e| invalid(e.path, e.msg))
    }

    pub fn identity_of(&self, w: &Workload) -> String {
        let sa = w.service_account.as_deref().unwrap_or(&w.name);
        format!("spiffe://{}/ns/{}/sa/{}", self.trust_domain, w.namespace, sa)
    }

    /// Every authority a service answers to from any namespace:
    /// `name.namespace.svc.cluster.local:port`, `name.namespace:port` and its aliases
    /// (Kubernetes: its ClusterIPs). `name:port` is answered to clients of its own
    /// namespace only (see [`Mesh::service_for`]), as cluster DNS does.
    pub fn authorities(&self, s: &Service) -> Vec<String> {
        let mut out = vec![
            format!("{}.{}.svc.cluster.local:{}", s.name, s.namespace, s.port),
            format!("{}.{}:{}", s.name, s.namespace, s.port),
        ];
        out.extend(s.aliases.iter().cloned());
        out
    }

    /// Token → identity, for the Identity service.
    pub fn tokens(&self) -> HashMap<String, SpiffeId> {
        self.workloads
            .iter()
            .filter_map(|w| Some((w.token.clone(), self.identity_of(w).parse().ok()?)))
            .collect()
    }

    /// The service `authority` names for a client in namespace `client_ns`: one of its
    /// [`authorities`](Mesh::authorities), or `name:port` in the client's namespace.
    pub fn service_for(&self, authority: &str, client_ns: &str) -> Option<&Service> {
        let found = |a: &str| match self.by_authority.is_empty() {
            true => self.services.iter().find(|s| self.authorities(s).iter().any(|x| x == a)),
            false => self.by_authority.get(a).map(|&i| &self.services[i]),
        };
        found(authority).or_else(|| {
            let (host, port) = authority.rsplit_once(':')?;
            if host.contains(['.', '[', ']']) || host.is_empty() {
                return None;
            }
            found(&format!("{host}.{client_ns}:{port}"))
        })
    }

    /// `name` (namespace `default`) or `name.namespace`, as routes name services, with
    /// `:port` for a service that has several.
    fn service_named(&self, name: &str) -> Option<&Service> {
        let (name, port) = match name.rsplit_once(':') {
            Some((name, port)) => (name, port.parse::<u16>().ok()),
            None => (name, None),
        };
        let (name, ns) = name.split_once('.').unwrap_or((name, "default"));
        self.services.iter().find(|s| s.name == name && s.namespace == ns && port.is_none_or(|p| p == s.port))
    }

    /// The rules for a client in `client_ns` of the service `authority` names, as the
    /// proxies receive them: the routes in the client's own namespace when it has some
    /// for the service (Kubernetes consumer routes), else the service's own ones.
    pub fn route_set(&self, authority: &str, client_ns: &str) -> weft_api::v1::RouteSet {
        let services = |name: &str| self.service_named(name).map(Service::authority);
        let rules = match self.service_for(authority, client_ns) {
            None => Vec::new(),
            Some(s) => {
                let of_service = |r: &&routes::Route| self.service_named(&r.service) == Some(s);
                let consumer =
                    |r: &&routes::Route| r.consumer_namespace.as_deref().is_some_and(|ns| ns == client_ns);
                let producer = |r: &&routes::Route| r.consumer_namespace.is_none();
                let mine: Vec<_> = self.routes.iter().filter(of_service).filter(consumer).collect();
                let chosen = match mine.is_empty() {
                    true => self.routes.iter().filter(of_service).filter(producer).collect(),
                    false => mine,
                };
                let rules = chosen.into_iter().flat_map(|r| routes::rules(r, &services)).collect();
                match self.gateway_precedence {
                    true => precedence::sort(rules),
                    false => rules,
                }
            }
        };
        weft_api::v1::RouteSet { authority: authority.into(), rules, generation: 0 }
    }
}

/// Where to look for a YAML error. An unclosed quote or bracket is noticed only at the
/// end of the file, after the last line; the line to fix is the one that opened it, which
/// the parser names as its context (`..., while scanning a quoted scalar at line 3
/// column 12`).
fn syntax_error_at(text: &str, e: &serde_yaml_ng::Error) -> Option<(usize, usize)> {
    let at = e.location().map(|l| (l.line(), l.column()))?;
    if at.0 <= text.lines().count() {
        return Some(at);
    }
    let msg = e.to_string();
    let context = || {
        let context = &msg[msg.find(", while ")?..];
        let rest = &context[context.find(" at line ")? + " at line ".len()..];
        let (line, rest) = rest.split_once(" column ")?;
        let column = rest.split(|c: char| !c.is_ascii_digit()).next()?;
        Some((line.parse().ok()?, column.parse().ok()?))
    };
    context().or(Some(at))
}

/// The line a validation error is about, found in the text: the first line, at or after
/// the entry the path names (`routes[0] (words-split)` → the line naming `words-split`),
/// that holds the value the message quotes (`unknown service "nope"`). Validation works on
/// parsed values, which have no positions; the text still does.
fn line_of(text: &str, path: &str, msg: &str) -> Option<usize> {
    let quoted = |s: &str| s.split('"').nth(1).map(str::to_string).filter(|v| !v.is_empty());
    let named = path.split_once('(').and_then(|(_, rest)| rest.split_once(')')).map(|(n, _)| n.to_string());
    let lines: Vec<&str> = text.lines().collect();
    let start = named
        .as_deref()
        .and_then(|n| lines.iter().position(|l| l.contains(&format!("name: {n}"))))
        .unwrap_or(0);
    let value = quoted(msg)?;
    lines.iter().skip(start).position(|l| l.contains(value.as_str())).map(|i| start + i + 1)
}

impl Service {
    /// `name.namespace:port`: the authority backends and routes are keyed by.
    pub fn authority(&self) -> String {
        format!("{}.{}:{}", self.name, self.namespace, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
trustDomain: weft.local
workloads:
  - name: frontend
    token: frontend-token-0123456789
  - name: backend-v1
    serviceAccount: backend
    token: backend-token-0123456789
services:
  - name: backend
    port: 8080
    endpoints:
      - address: 127.0.0.1:9001
        workload: backend-v1
        labels: {zone: a}
      - address: 127.0.0.1:9002
policies:
  - workload: backend-v1
    port: 9001
    mode: permissive
    allow: [spiffe://weft.local/ns/default/sa/frontend]
"#;

    #[test]
    fn parses_a_good_file() {
        let m = Mesh::parse("mesh.yaml", GOOD).unwrap();
        assert_eq!(m.identity_of(&m.workloads[1]), "spiffe://weft.local/ns/default/sa/backend");
        let s = m.service_for("backend.default.svc.cluster.local:8080", "default").unwrap();
        assert_eq!(s.endpoints.len(), 2);
        assert!(m.service_for("backend:8080", "default").is_some());
        // `name:port` is relative to the client's namespace, as cluster DNS makes it.
        assert!(m.service_for("backend:8080", "other").is_none());
        assert!(m.service_for("backend.default:8080", "other").is_some());
        assert_eq!(m.policies[0].mode, Mode::Permissive);
        assert_eq!(m.tokens().len(), 2);
    }

    #[test]
    fn the_documented_example_and_the_demo_are_valid() {
        let doc = include_str!("../../../docs/mesh-file.md");
        let yaml = doc.split("```yaml\n").nth(1).and_then(|b| b.split("```").next()).unwrap();
        let m = Mesh::parse("docs/mesh-file.md", yaml).unwrap();
        assert_eq!(m.services[0].balancer, Balancer::PeakEwma);
        Mesh::parse("examples/demo.yaml", include_str!("../../../examples/demo.yaml")).unwrap();
    }

    fn err(text: &str) -> String {
        Mesh::parse("mesh.yaml", text).unwrap_err().to_string()
    }

    #[test]
    fn tracing_settings_are_checked_and_become_otel_variables() {
        let with = |t: &str| format!("{GOOD}\ntracing:\n{t}");
        let m = Mesh::parse("mesh.yaml", &with("  endpoint: http://127.0.0.1:4317\n")).unwrap();
        let env = m.tracing.unwrap().env("frontend");
        assert!(env.contains(&("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317".into())), "{env:?}");
        assert!(env.contains(&("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into())), "{env:?}");
        assert!(env.contains(&("OTEL_TRACES_SAMPLER_ARG", "1".into())), "{env:?}");
        assert!(env.contains(&("OTEL_SERVICE_NAME", "frontend".into())), "{env:?}");
        let e = err(&with("  endpoint: 127.0.0.1:4317\n"));
        assert!(e.contains("tracing.endpoint") && e.contains("http://"), "{e}");
        let e = err(&with("  endpoint: http://c:4317\n  protocol: http/json\n"));
        assert!(e.contains("tracing.protocol"), "{e}");
        let e = err(&with("  endpoint: http://c:4317\n  sampling: 5\n"));
        assert!(e.contains("tracing.sampling"), "{e}");
        let e = err(&with("  endpont: http://c:4317\n"));
        assert!(e.contains("endpont"), "{e}");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = err("workloads:\n  - name: a\n    token: [unclosed\n");
        assert!(e.contains("mesh.yaml") && e.contains("line"), "{e}");
        let e = err("workloads:\n  - name: a\n    tokn: x\n");
        assert!(e.contains("unknown field `tokn`") && e.contains("line 3"), "{e}");
        // An unclosed quote is found at the end of the file; the error leads with the line
        // that opened it.
        let e = err("workloads:\n  - name: a\n    token: \"x\n  - name: b\n");
        assert!(e.starts_with("mesh.yaml: line 3, column 12: "), "{e}");
        // Anything else keeps the parser's own position.
        let e = err("workloads:\n  - name: a\n\ttoken: x\n");
        assert!(e.starts_with("mesh.yaml: line 3, column 1: ") && e.contains("tab"), "{e}");
        // An unclosed bracket with no context named: still a line, the end of the file.
        let e = err("workloads: []\nservices: [\n");
        assert!(e.starts_with("mesh.yaml: line 3, column 1: "), "{e}");
    }

    #[test]
    fn invalid_references_are_named() {
        let e =
            err(&GOOD.replace("workload: backend-v1\n        labels", "workload: nobody\n        labels"));
        assert!(e.contains("services[0] (backend).endpoints[0]") && e.contains("nobody"), "{e}");
        let e = err(&GOOD.replace("backend-token-0123456789", "frontend-token-0123456789"));
        assert!(e.contains("token is used by another workload"), "{e}");
        let e = err(&GOOD.replace("backend-token-0123456789", "short"));
        assert!(e.contains("at least 16"), "{e}");
        let e =
            err(&GOOD.replace("allow: [spiffe://weft.local/ns/default/sa/frontend]", "allow: [frontend]"));
        assert!(e.contains("policies[0]") && e.contains("SPIFFE"), "{e}");
        let e = err(&GOOD.replace("address: 127.0.0.1:9002", "address: nowhere"));
        assert!(e.contains("line"), "{e}");
        let e = err(&GOOD.replace(
            "    mode: permissive\n",
            "    mode: permissive\n    rateLimit: {requestsPerSecond: 0}\n",
        ));
        assert!(e.contains("policies[0]") && e.contains("requestsPerSecond"), "{e}");
        let e =
            err(&GOOD
                .replace("    port: 8080\n", "    port: 8080\n    outlierDetection: {ejectionTime: soon}\n"));
        // Durations are parsed as the file is read: the error points at the line.
        assert!(e.contains("outlierDetection") && e.contains("\"soon\"") && e.contains("line 12"), "{e}");
        let e = err(&GOOD.replace("    port: 8080\n", "    port: 8080\n    balancer: random\n"));
        assert!(e.contains("balancer") && e.contains("peak-ewma"), "{e}");
    }
}
