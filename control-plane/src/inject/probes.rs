//! The kubelet's probes of the app, for the proxy to let through. The kubelet has no
//! mesh identity and sends plaintext to the pod's IP, which the init container's rules
//! hand to the proxy's inbound: on a port whose policy is strict or names its clients,
//! the app would never turn ready. The proxy admits exactly the probes the pod spec
//! declares (`WEFT_INBOUND_PROBES`), as Linkerd does, and nothing else changes in the
//! app's containers.

use serde_json::Value;

/// `port:path` for each HTTP or gRPC probe (liveness, readiness, startup) of the app's
/// containers, in order, without repeats. HTTPS probes are left out: the proxy cannot
/// see their path (they pass on a permissive port as TLS); so are probes to another
/// host, and paths with a comma (the list's separator).
pub fn of(containers: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in containers {
        for kind in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let Some(probe) = c.get(kind) else { continue };
            let entry = if let Some(get) = probe.get("httpGet") {
                let https = get
                    .get("scheme")
                    .and_then(Value::as_str)
                    .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"));
                let other_host = get.get("host").and_then(Value::as_str).is_some_and(|h| !h.is_empty());
                let path = get.get("path").and_then(Value::as_str).unwrap_or("/");
                match (
                    https || other_host || path.contains(',') || !path.starts_with('/'),
                    port(c, get.get("port")),
                ) {
                    (false, Some(port)) => format!("{port}:{path}"),
                    _ => continue,
                }
            } else if let Some(grpc) = probe.get("grpc") {
                match port(c, grpc.get("port")) {
                    Some(port) => format!("{port}:{}", weft_api::env::GRPC_HEALTH_CHECK),
                    None => continue,
                }
            } else {
                continue;
            };
            if !out.contains(&entry) {
                out.push(entry);
            }
        }
    }
    out
}

/// A probe's port: a number, or the name of one of the container's ports.
fn port(container: &Value, port: Option<&Value>) -> Option<u16> {
    match port? {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()).filter(|n| *n > 0),
        Value::String(s) => s.parse::<u16>().ok().or_else(|| {
            let ports = container.get("ports")?.as_array()?;
            let named = ports.iter().find(|p| p.get("name").and_then(Value::as_str) == Some(s.as_str()))?;
            named.get("containerPort")?.as_u64().and_then(|n| u16::try_from(n).ok())
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn http_and_grpc_probes_by_number_or_name_and_nothing_the_proxy_cannot_see() {
        let containers = [
            json!({"name": "app", "ports": [{"name": "http", "containerPort": 8080}],
                   "livenessProbe": {"httpGet": {"path": "/live", "port": "http"}},
                   "readinessProbe": {"httpGet": {"path": "/ready?full=1", "port": 8080}},
                   "startupProbe": {"httpGet": {"path": "/live", "port": 8080}}}),
            json!({"name": "grpc", "readinessProbe": {"grpc": {"port": 9090}},
                   "livenessProbe": {"tcpSocket": {"port": 9090}}}),
            json!({"name": "skipped",
                   "livenessProbe": {"httpGet": {"path": "/tls", "port": 8443, "scheme": "HTTPS"}},
                   "readinessProbe": {"httpGet": {"path": "/x", "port": 80, "host": "example.com"}},
                   "startupProbe": {"httpGet": {"path": "/", "port": "nameless"}}}),
            json!({"name": "exec", "livenessProbe": {"exec": {"command": ["true"]}}}),
        ];
        assert_eq!(
            super::of(&containers),
            ["8080:/live", "8080:/ready?full=1", "9090:/grpc.health.v1.Health/Check"]
        );
    }
}
