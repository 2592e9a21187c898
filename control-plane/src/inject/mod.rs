//! Sidecar injection: one function turns a pod (a Pod's or a pod template's `metadata`
//! and `spec`) into its meshed form. The admission webhook (`server::webhook`) and
//! `weft inject` (`cli::inject`) both call [`pod`]; `manifests` finds the pods in
//! workloads and YAML documents.
//!
//! A meshed pod gets, and nothing else changes:
//! - `initContainers[0]` `weft-init`: `weft-proxy init` installs the iptables rules; it
//!   runs as root with NET_ADMIN and NET_RAW only, and exits;
//! - `initContainers[1]` `weft-proxy`, a native sidecar (`restartPolicy: Always`) whose
//!   startup probe is `/ready`: the kubelet starts the pod's own init containers and the
//!   app only once the proxy holds its certificate and its ports' policies, and stops it
//!   after the app (so Jobs complete); uid 2102, no capabilities, read-only root;
//! - a projected ServiceAccount token (audience `weft`) for the identity request;
//! - the app's HTTP and gRPC probes, told to the proxy (`probes`) so the kubelet's
//!   plaintext probes pass whatever the ports' policies;
//! - the annotation `weft.dev/proxy-version`.
//!
//! Settings come from `weft.dev/*` annotations on the pod (see [`ANNOTATIONS`]).

pub mod manifests;
mod probes;

use serde_json::{json, Map, Value};

/// The annotation (or label) that opts a namespace or a pod in (`enabled`) or out (`disabled`).
pub const INJECT: &str = "weft.dev/inject";
/// Records the injected proxy's version; its presence means "already injected".
pub const VERSION: &str = "weft.dev/proxy-version";
pub const PROXY: &str = "weft-proxy";
pub const INIT: &str = "weft-init";
pub const PROXY_UID: u32 = 2102;
pub const ADMIN_PORT: u16 = 4191;
pub const INBOUND_PORT: u16 = 4143;
const TOKEN_DIR: &str = "/var/run/secrets/weft.dev/serviceaccount";
const TOKEN_VOLUME: &str = "weft-token";

/// The pod annotations the injector reads: `(annotation, what it sets)`.
pub const ANNOTATIONS: [(&str, &str); 11] = [
    ("weft.dev/proxy-cpu-request", "the proxy container's CPU request (default 100m)"),
    ("weft.dev/proxy-cpu-limit", "its CPU limit (default: none)"),
    ("weft.dev/proxy-memory-request", "its memory request (default 32Mi)"),
    ("weft.dev/proxy-memory-limit", "its memory limit (default 256Mi)"),
    ("weft.dev/proxy-log-level", "WEFT_LOG, e.g. debug or info,weft_proxy=debug"),
    ("weft.dev/opaque-ports", "WEFT_OPAQUE_PORTS: ports forwarded as TCP without detection"),
    ("weft.dev/skip-inbound-ports", "ports whose inbound traffic bypasses the proxy"),
    ("weft.dev/skip-outbound-ports", "ports whose outbound traffic bypasses the proxy"),
    (
        "weft.dev/default-inbound-policy",
        "WEFT_DEFAULT_INBOUND_POLICY before the control plane answers: deny, strict or permissive",
    ),
    ("weft.dev/trace-sampling", "share of new traces sampled, 0 to 1 (OTEL_TRACES_SAMPLER_ARG)"),
    ("weft.dev/trace-endpoint", "the OTLP collector, e.g. http://jaeger.tracing:4317"),
];

/// What the injector puts in a pod.
#[derive(Clone, Debug)]
pub struct Config {
    /// The weft-proxy image (the init container runs the same image's `init`).
    pub proxy_image: String,
    /// `weft control`'s gRPC address, as the proxies reach it.
    pub control_addr: String,
    pub trust_domain: String,
    pub token_audience: String,
    pub version: String,
    /// The control plane's namespace: its own pods are never injected.
    pub control_namespace: String,
}

impl Default for Config {
    fn default() -> Self {
        let version = env!("CARGO_PKG_VERSION").to_string();
        Config {
            proxy_image: format!("ghcr.io/weft-mesh/weft-proxy:v{version}"),
            control_addr: "weft-control.weft.svc.cluster.local:8090".into(),
            trust_domain: "cluster.local".into(),
            token_audience: "weft".into(),
            version,
            control_namespace: "weft".into(),
        }
    }
}

/// What happened to a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    Skipped(Skip),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// `weft.dev/inject: disabled` on the pod.
    OptedOut,
    /// Neither the pod nor its namespace asked for it.
    NotOptedIn,
    AlreadyInjected,
    HostNetwork,
    /// A pod of the control plane's own namespace.
    ControlPlane,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Skip::OptedOut => "weft.dev/inject: disabled",
            Skip::NotOptedIn => "neither the pod nor its namespace has weft.dev/inject: enabled",
            Skip::AlreadyInjected => "already injected",
            Skip::HostNetwork => "hostNetwork pods share the node's network and are never injected",
            Skip::ControlPlane => "a pod of the control plane's namespace",
        })
    }
}

/// A pod that cannot be injected as written.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {msg}")]
pub struct Invalid {
    pub field: String,
    pub msg: String,
}

/// Whether `value` (an annotation or label value) opts in.
pub fn enabled(meta: &Value) -> Option<bool> {
    let of = |key: &str| meta.get(key).and_then(|m| m.get(INJECT)).and_then(Value::as_str);
    match of("annotations").or_else(|| of("labels")) {
        Some("enabled") => Some(true),
        Some("disabled") => Some(false),
        _ => None,
    }
}

/// Meshes `pod` (an object with `metadata` and `spec`) in place. `namespace` is where it
/// runs; `opted_in` whether its namespace (or the caller, for `weft inject`) asks for
/// it; the pod's own `weft.dev/inject` annotation decides over both.
pub fn pod(
    pod: &mut Value,
    namespace: Option<&str>,
    opted_in: bool,
    cfg: &Config,
) -> Result<Outcome, Invalid> {
    let meta = pod.get("metadata").cloned().unwrap_or(Value::Null);
    let spec = pod.get("spec").cloned().unwrap_or(Value::Null);
    match enabled(&meta) {
        Some(false) => return Ok(Outcome::Skipped(Skip::OptedOut)),
        None if !opted_in => return Ok(Outcome::Skipped(Skip::NotOptedIn)),
        _ => {}
    }
    let containers = |key: &str| spec.get(key).and_then(Value::as_array).cloned().unwrap_or_default();
    let names: Vec<String> = containers("containers")
        .iter()
        .chain(containers("initContainers").iter())
        .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_string))
        .collect();
    if meta.get("annotations").and_then(|a| a.get(VERSION)).is_some() || names.iter().any(|n| n == PROXY) {
        return Ok(Outcome::Skipped(Skip::AlreadyInjected));
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Outcome::Skipped(Skip::HostNetwork));
    }
    if namespace == Some(cfg.control_namespace.as_str()) {
        return Ok(Outcome::Skipped(Skip::ControlPlane));
    }
    if containers("containers").is_empty() {
        return Err(Invalid {
            field: "spec.containers".into(),
            msg: "a pod needs at least one container".into(),
        });
    }
    let annotations = meta.get("annotations").cloned().unwrap_or(Value::Null);
    let setting =
        |key: &str| annotations.get(key).and_then(Value::as_str).map(str::trim).filter(|v| !v.is_empty());
    let app_ports = app_ports(&containers("containers"));
    let init = init_container(cfg, &setting)?;
    let probes = probes::of(&containers("containers"));
    let proxy = proxy_container(cfg, &setting, &app_ports, &probes)?;

    let spec = object(pod, "spec");
    let mut inits = vec![init, proxy];
    inits.extend(spec.get("initContainers").and_then(Value::as_array).cloned().unwrap_or_default());
    spec.insert("initContainers".into(), Value::Array(inits));
    let volumes = spec.entry("volumes").or_insert_with(|| json!([]));
    if let Some(v) = volumes.as_array_mut() {
        v.push(json!({"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
            "audience": cfg.token_audience, "expirationSeconds": 3600, "path": "token"}}]}}));
    }
    let meta = object(pod, "metadata");
    let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
    if let Some(a) = annotations.as_object_mut() {
        a.insert(VERSION.into(), json!(cfg.version));
    }
    Ok(Outcome::Injected)
}

/// `value[key]` as an object, made when absent.
fn object<'a>(value: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    if !value.get(key).is_some_and(Value::is_object) {
        value[key] = json!({});
    }
    value[key].as_object_mut().expect("just made an object")
}

/// The TCP ports the app's containers declare: the proxy is ready only once the control
/// plane has answered the policy of each.
fn app_ports(containers: &[Value]) -> Vec<u16> {
    let mut ports: Vec<u16> = containers
        .iter()
        .flat_map(|c| c.get("ports").and_then(Value::as_array).cloned().unwrap_or_default())
        .filter(|p| p.get("protocol").and_then(Value::as_str).is_none_or(|p| p == "TCP"))
        .filter_map(|p| p.get("containerPort").and_then(Value::as_u64).and_then(|n| u16::try_from(n).ok()))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

type Setting<'a> = dyn Fn(&str) -> Option<&'a str> + 'a;

/// A comma-separated port list from an annotation, checked.
fn ports(setting: &Setting<'_>, key: &str) -> Result<Option<String>, Invalid> {
    let Some(v) = setting(key) else { return Ok(None) };
    for p in v.split(',').map(str::trim) {
        let ok = match p.split_once('-') {
            Some((a, b)) => a.parse::<u16>().is_ok() && b.parse::<u16>().is_ok(),
            None => p.parse::<u16>().is_ok_and(|n| n > 0),
        };
        if !ok {
            let msg = format!("{v:?}: expected ports like 25,3306 or a range like 8000-8100");
            return Err(Invalid { field: format!("metadata.annotations[{key}]"), msg });
        }
    }
    Ok(Some(v.to_string()))
}

fn env(name: &str, value: impl Into<String>) -> Value {
    json!({"name": name, "value": value.into()})
}

fn field_env(name: &str, path: &str) -> Value {
    json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}})
}

fn init_container(cfg: &Config, setting: &Setting<'_>) -> Result<Value, Invalid> {
    let mut envs = vec![env(weft_api::env::PROXY_UID, PROXY_UID.to_string())];
    if let Some(p) = ports(setting, "weft.dev/skip-inbound-ports")? {
        envs.push(env(weft_api::env::INIT_SKIP_INBOUND_PORTS, p));
    }
    if let Some(p) = ports(setting, "weft.dev/skip-outbound-ports")? {
        envs.push(env(weft_api::env::INIT_SKIP_OUTBOUND_PORTS, p));
    }
    Ok(json!({
        "name": INIT,
        "image": cfg.proxy_image,
        "args": ["init"],
        "env": envs,
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        // Root for iptables, with the two capabilities it needs and nothing else.
        "securityContext": {
            "runAsUser": 0, "runAsNonRoot": false, "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true, "privileged": false,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
        },
    }))
}

fn proxy_container(
    cfg: &Config,
    setting: &Setting<'_>,
    app_ports: &[u16],
    probes: &[String],
) -> Result<Value, Invalid> {
    let mut envs = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("WEFT_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        env(weft_api::env::CONTROL_ADDR, cfg.control_addr.clone()),
        // Kubernetes expands $(VAR) from the variables above.
        env(
            weft_api::env::IDENTITY,
            format!("spiffe://{}/ns/$(POD_NAMESPACE)/sa/$(WEFT_SERVICE_ACCOUNT)", cfg.trust_domain),
        ),
        env(weft_api::env::TOKEN_FILE, format!("{TOKEN_DIR}/token")),
        env(weft_api::env::WORKLOAD, "$(POD_NAME)"),
    ];
    if !app_ports.is_empty() {
        let list: Vec<String> = app_ports.iter().map(u16::to_string).collect();
        envs.push(env(weft_api::env::INBOUND_PORTS, list.join(",")));
    }
    if !probes.is_empty() {
        envs.push(env(weft_api::env::INBOUND_PROBES, probes.join(",")));
    }
    if let Some(level) = setting("weft.dev/proxy-log-level") {
        envs.push(env(weft_api::env::LOG, level));
    }
    if let Some(p) = ports(setting, "weft.dev/opaque-ports")? {
        envs.push(env(weft_api::env::OPAQUE_PORTS, p));
    }
    if let Some(p) = setting("weft.dev/default-inbound-policy") {
        if !matches!(p, "deny" | "strict" | "permissive") {
            return Err(Invalid {
                field: "metadata.annotations[weft.dev/default-inbound-policy]".into(),
                msg: format!("{p:?}: expected deny, strict or permissive"),
            });
        }
        envs.push(env(weft_api::env::DEFAULT_INBOUND_POLICY, p));
    }
    if let Some(endpoint) = setting("weft.dev/trace-endpoint") {
        weft_api::otlp::endpoint(endpoint).map_err(|e| Invalid {
            field: "metadata.annotations[weft.dev/trace-endpoint]".into(),
            msg: e.to_string(),
        })?;
        envs.push(env(weft_api::env::OTEL_ENDPOINT, endpoint));
    }
    if let Some(share) = setting("weft.dev/trace-sampling") {
        if !share.parse::<f64>().is_ok_and(|s| (0.0..=1.0).contains(&s)) {
            return Err(Invalid {
                field: "metadata.annotations[weft.dev/trace-sampling]".into(),
                msg: format!("{share:?}: expected a share from 0 to 1"),
            });
        }
        envs.push(env(weft_api::env::OTEL_SAMPLER, "parentbased_traceidratio"));
        envs.push(env(weft_api::env::OTEL_SAMPLER_ARG, share));
    }
    let quantities = [
        ("cpu-request", setting("weft.dev/proxy-cpu-request").unwrap_or("100m")),
        ("memory-request", setting("weft.dev/proxy-memory-request").unwrap_or("32Mi")),
        ("memory-limit", setting("weft.dev/proxy-memory-limit").unwrap_or("256Mi")),
    ];
    for (key, q) in
        quantities.iter().chain(setting("weft.dev/proxy-cpu-limit").map(|c| ("cpu-limit", c)).iter())
    {
        quantity(&format!("weft.dev/proxy-{key}"), q)?;
    }
    let requests = json!({"cpu": quantities[0].1, "memory": quantities[1].1});
    let mut limits = json!({"memory": quantities[2].1});
    if let Some(cpu) = setting("weft.dev/proxy-cpu-limit") {
        limits["cpu"] = json!(cpu);
    }
    let probe = |path: &str, period: u32, failures: u32| json!({"httpGet": {"path": path, "port": ADMIN_PORT}, "periodSeconds": period, "failureThreshold": failures});
    Ok(json!({
        "name": PROXY,
        "image": cfg.proxy_image,
        // A native sidecar: started before the app, stopped after it.
        "restartPolicy": "Always",
        "ports": [{"name": "weft-admin", "containerPort": ADMIN_PORT}, {"name": "weft-inbound", "containerPort": INBOUND_PORT}],
        "env": envs,
        // The app and the pod's own init containers wait for this: certificate and policies in.
        "startupProbe": probe("/ready", 1, 120),
        "livenessProbe": probe("/live", 10, 3),
        "readinessProbe": probe("/ready", 5, 3),
        "resources": {"requests": requests, "limits": limits},
        "securityContext": {
            "runAsUser": PROXY_UID, "runAsGroup": PROXY_UID, "runAsNonRoot": true,
            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "privileged": false,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true}],
    }))
}

/// A Kubernetes quantity like `100m`, `0.5`, `64Mi`.
fn quantity(key: &str, q: &str) -> Result<(), Invalid> {
    let digits = q.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &q[digits.len()..];
    let known = ["", "m", "k", "M", "G", "T", "Ki", "Mi", "Gi", "Ti"].contains(&suffix);
    if !digits.is_empty() && digits.parse::<f64>().is_ok_and(|n| n >= 0.0) && known {
        return Ok(());
    }
    Err(Invalid {
        field: format!("metadata.annotations[{key}]"),
        msg: format!("{q:?} is not a quantity like 100m, 0.5, 64Mi or 1Gi"),
    })
}
