//! The Kubernetes objects the control plane watches → the [`Mesh`] every answer is made
//! from. Plain code, no API calls: the source hands it what its reflectors hold, tests
//! hand it objects.
//!
//! - A Service becomes one mesh service per TCP port, answering to its DNS names and to
//!   `ClusterIP:port` (every ClusterIP, for dual-stack); headless and ExternalName
//!   Services have no virtual address.
//! - Its endpoints come from its EndpointSlices (by the `kubernetes.io/service-name`
//!   label, ports matched by name): `ready` ones get traffic; when none is ready,
//!   `serving` ones that are terminating do (what kube-proxy does), so a rollout's last
//!   endpoints are not dropped; the rest get none.
//! - A pod is meshed when it runs the `weft-proxy` container; its identity is
//!   `spiffe://<trust domain>/ns/<ns>/sa/<service account>`.
//! - HTTPRoutes and GRPCRoutes attached to Services (`gateway`), InboundPolicies and
//!   TrafficPolicies (`policy`) become the mesh's routes and policies; an object Weft
//!   cannot honour is left out whole and reported as a [`Problem`] naming it and the field.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use k8s_openapi::{
    api::{
        core::v1::{Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::{
    gateway::{self, Problem},
    policy::{self, order},
    resources::{GRPCRoute, HTTPRoute, InboundPolicy, TrafficPolicy},
};
use crate::server::{mesh, routes};

/// The name of the proxy container that marks a pod as meshed.
pub const PROXY_CONTAINER: &str = "weft-proxy";

/// Everything the index is built from.
#[derive(Default)]
pub struct Objects {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    pub pods: Vec<Arc<Pod>>,
    pub http_routes: Vec<Arc<HTTPRoute>>,
    pub grpc_routes: Vec<Arc<GRPCRoute>>,
    pub inbound_policies: Vec<Arc<InboundPolicy>>,
    pub traffic_policies: Vec<Arc<TrafficPolicy>>,
}

/// The mesh the objects describe, and what had to be left out.
pub fn build(trust_domain: &str, objects: &Objects) -> (mesh::Mesh, Vec<Problem>) {
    let mut problems = Vec::new();
    let pods = pods(trust_domain, &objects.pods);
    let by_name: HashMap<(&str, &str), &mesh::Pod> =
        pods.values().map(|p| ((p.namespace.as_str(), p.name.as_str()), p)).collect();
    let mut slices: HashMap<(String, String), Vec<&EndpointSlice>> = HashMap::new();
    for s in &objects.slices {
        let service = s.metadata.labels.as_ref().and_then(|l| l.get("kubernetes.io/service-name"));
        if let (Some(service), Some(ns)) = (service, &s.metadata.namespace) {
            slices.entry((ns.clone(), service.clone())).or_default().push(s);
        }
    }
    let traffic = policy::traffic_policies(&objects.traffic_policies, &mut problems);
    let mut services = Vec::new();
    for svc in &objects.services {
        let (Some(name), Some(ns)) = (&svc.metadata.name, &svc.metadata.namespace) else { continue };
        let Some(spec) = &svc.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let ips: Vec<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse().ok())
            .fold(Vec::new(), |mut v, ip| {
                if !v.contains(&ip) {
                    v.push(ip);
                }
                v
            });
        let own_slices = slices.get(&(ns.clone(), name.clone())).map(Vec::as_slice).unwrap_or_default();
        for port in spec.ports.iter().flatten() {
            if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
                continue;
            }
            let Ok(number) = u16::try_from(port.port) else { continue };
            let mut service = mesh::Service {
                name: name.clone(),
                namespace: ns.clone(),
                port: number,
                aliases: ips.iter().map(|ip| SocketAddr::new(*ip, number).to_string()).collect(),
                endpoints: endpoints(own_slices, port.name.as_deref().unwrap_or(""), ips.first(), &by_name),
                balancer: mesh::Balancer::default(),
                outlier_detection: mesh::OutlierDetection::default(),
                max_concurrent_requests: None,
            };
            if let Some(t) = traffic.get(&(ns.clone(), name.clone())).and_then(|t| t.for_port(number)) {
                t.apply(&mut service);
            }
            services.push(service);
        }
    }
    let ports = |ns: &str, name: &str| -> Vec<u16> {
        services.iter().filter(|s| s.namespace == ns && s.name == name).map(|s| s.port).collect()
    };
    let mut all_routes = Vec::new();
    let mut ordered: Vec<(&ObjectMeta, Result<Vec<routes::Route>, Problem>)> = Vec::new();
    for r in &objects.http_routes {
        ordered.push((&r.metadata, gateway::http_route(r, &ports)));
    }
    for r in &objects.grpc_routes {
        ordered.push((&r.metadata, gateway::grpc_route(r, &ports)));
    }
    ordered.sort_by_key(|(meta, _)| order(meta));
    for (_, converted) in ordered {
        match converted {
            Ok(routes) => all_routes.extend(routes),
            Err(p) => problems.push(p),
        }
    }
    policy::add_faults(&traffic, &services, &mut all_routes);
    policy::add_budgets(&traffic, &services, &mut all_routes);
    let policies = policy::inbound_policies(trust_domain, &objects.inbound_policies, &mut problems);
    let mut m = mesh::Mesh::default();
    (m.trust_domain, m.services, m.routes, m.policies, m.pods) =
        (trust_domain.to_string(), services, all_routes, policies, pods);
    m.selects_pods = true;
    m.gateway_precedence = true;
    // Rules that do not convert (a bad header name, say) fail the whole route.
    let keep: Vec<bool> = m
        .routes
        .iter()
        .map(|r| {
            let services =
                |name: &str| m.services.iter().find(|s| s.authority() == name).map(mesh::Service::authority);
            let check = routes::Route { consumer_namespace: None, ..r.clone() };
            match routes::validate(std::slice::from_ref(&check), &services) {
                Ok(()) => true,
                Err(e) => {
                    problems.push(format!("route {}: {}", r.name, e.msg));
                    false
                }
            }
        })
        .collect();
    let mut keep = keep.into_iter();
    m.routes.retain(|_| keep.next().unwrap_or(false));
    problems.sort();
    problems.dedup();
    (m.index(), problems)
}

fn pods(trust_domain: &str, pods: &[Arc<Pod>]) -> BTreeMap<IpAddr, mesh::Pod> {
    let mut out = BTreeMap::new();
    for pod in pods {
        let (Some(spec), Some(status)) = (&pod.spec, &pod.status) else { continue };
        if spec.host_network == Some(true) || matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
        {
            continue;
        }
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let meshed = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| c.name == PROXY_CONTAINER);
        let sa = spec.service_account_name.as_deref().unwrap_or("default");
        let p = mesh::Pod {
            namespace: ns.clone(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            identity: meshed.then(|| format!("spiffe://{trust_domain}/ns/{ns}/sa/{sa}")),
            ports: spec
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|p| Some((p.name.clone()?, u16::try_from(p.container_port).ok()?)))
                .collect(),
        };
        let ips = status.pod_ips.iter().flatten().map(|i| i.ip.as_str()).chain(status.pod_ip.as_deref());
        for ip in ips.filter_map(|ip| ip.parse::<IpAddr>().ok()) {
            out.insert(ip, p.clone());
        }
    }
    out
}

/// The endpoints of a Service port (`port_name`, "" when unnamed) over its slices. A
/// dual-stack Service has a slice per family listing the same pods: only the family of
/// its primary ClusterIP (`primary`) is taken, so each pod is one endpoint; a headless
/// Service (no ClusterIP), or one whose primary family has no slice, takes all.
fn endpoints(
    slices: &[&EndpointSlice],
    port_name: &str,
    primary: Option<&IpAddr>,
    pods: &HashMap<(&str, &str), &mesh::Pod>,
) -> Vec<mesh::Endpoint> {
    let family = primary.map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" });
    let has_family = |f: &str| slices.iter().any(|s| s.address_type == f);
    let wanted = |t: &str| match family.filter(|f| has_family(f)) {
        Some(f) => t == f,
        None => matches!(t, "IPv4" | "IPv6"),
    };
    let (mut ready, mut serving) = (Vec::new(), Vec::new());
    for slice in slices {
        if !wanted(slice.address_type.as_str()) {
            continue;
        }
        let port = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == port_name)
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok());
        let Some(port) = port else { continue };
        let ns = slice.metadata.namespace.as_deref().unwrap_or("");
        for e in &slice.endpoints {
            let c = e.conditions.clone().unwrap_or_default();
            // Unset `ready` means ready (the API's own rule); `serving` defaults to it.
            let is_ready = c.ready.unwrap_or(true) && !c.terminating.unwrap_or(false);
            let is_serving = c.serving.unwrap_or(is_ready);
            let pod = e.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod")).and_then(|r| {
                pods.get(&(r.namespace.as_deref().unwrap_or(ns), r.name.as_deref().unwrap_or("")))
            });
            for ip in e.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                let endpoint = mesh::Endpoint {
                    address: SocketAddr::new(ip, port),
                    workload: None,
                    weight: 1,
                    // Pod labels are not sent: no proxy reads them, and they would be copied
                    // into every answer for every endpoint.
                    labels: BTreeMap::new(),
                    identity: pod.and_then(|p| p.identity.clone()),
                    zone: e.zone.clone(),
                };
                if is_ready {
                    ready.push(endpoint);
                } else if is_serving {
                    serving.push(endpoint);
                }
            }
        }
    }
    let mut chosen = if ready.is_empty() { serving } else { ready };
    chosen.sort_by_key(|e| e.address);
    chosen.dedup_by_key(|e| e.address);
    chosen
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::server::{identity::Caller, watch};

    fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn pod(name: &str, ip: &str, sa: &str, meshed: bool, labels: serde_json::Value) -> Arc<Pod> {
        let mut containers = vec![json!({"name": "app"})];
        if meshed {
            containers.push(json!({"name": PROXY_CONTAINER}));
        }
        obj(json!({
            "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {"serviceAccountName": sa, "containers": containers},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
        }))
    }

    fn endpoint(ip: &str, pod: &str, ready: bool, serving: bool, terminating: bool) -> serde_json::Value {
        json!({
            "addresses": [ip],
            "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
            "targetRef": {"kind": "Pod", "name": pod, "namespace": "default"},
            "zone": "zone-a"
        })
    }

    /// words: two ports, dual-stack, four endpoints in two IPv4 slices of which two are
    /// ready, and an IPv6 slice of the same pods.
    fn cluster() -> Objects {
        let service = obj(json!({
            "metadata": {"name": "words", "namespace": "default"},
            "spec": {
                "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
                "ports": [{"name": "http", "port": 8080, "targetPort": 8081}, {"name": "grpc", "port": 9090}]
            }
        }));
        let v4 = obj(json!({
            "metadata": {"name": "words-v4", "namespace": "default", "labels": {"kubernetes.io/service-name": "words"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8081}, {"name": "grpc", "port": 9091}],
            "endpoints": [
                endpoint("10.0.0.1", "a", true, true, false),
                endpoint("10.0.0.2", "b", false, false, false),
                endpoint("10.0.0.3", "c", false, true, true),
            ]
        }));
        let v4b = obj(json!({
            "metadata": {"name": "words-v4b", "namespace": "default", "labels": {"kubernetes.io/service-name": "words"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8081}],
            "endpoints": [endpoint("10.0.0.4", "d", true, true, false)]
        }));
        // The same pods over IPv6: not endpoints of a Service whose first ClusterIP is IPv4.
        let v6 = obj(json!({
            "metadata": {"name": "words-v6", "namespace": "default", "labels": {"kubernetes.io/service-name": "words"}},
            "addressType": "IPv6",
            "ports": [{"name": "http", "port": 8081}],
            "endpoints": [endpoint("fd00::1", "a", true, true, false), endpoint("fd00::4", "d", true, true, false)]
        }));
        Objects {
            services: vec![service],
            slices: vec![v4, v4b, v6],
            pods: vec![
                pod("a", "10.0.0.1", "words", true, json!({"app": "words"})),
                pod("b", "10.0.0.2", "words", true, json!({"app": "words"})),
                pod("c", "10.0.0.3", "words", true, json!({"app": "words"})),
                pod("d", "10.0.0.4", "words", false, json!({"app": "words"})),
                pod("web", "10.0.0.9", "web", true, json!({"app": "web"})),
            ],
            ..Objects::default()
        }
    }

    fn addresses(set: &weft_api::v1::EndpointSet) -> Vec<&str> {
        set.endpoints.iter().map(|e| e.address.as_str()).collect()
    }

    #[test]
    fn services_answer_by_name_cluster_ip_and_pod_ip_with_ready_endpoints() {
        let (mesh, problems) = build("cluster.local", &cluster());
        assert!(problems.is_empty(), "{problems:?}");
        for authority in [
            "words.default.svc.cluster.local:8080",
            "words.default:8080",
            "10.96.0.10:8080",
            "[fd00::10]:8080",
        ] {
            let set = watch::endpoint_set(&mesh, authority, "other");
            assert!(set.known && set.service, "{authority}");
            // Ports by name: the slice's http port; only ready endpoints.
            assert_eq!(addresses(&set), ["10.0.0.1:8081", "10.0.0.4:8081"], "{authority}");
        }
        let set = watch::endpoint_set(&mesh, "words.default:8080", "default");
        let a = &set.endpoints[0];
        assert!(a.meshed && a.identity == "spiffe://cluster.local/ns/default/sa/words" && a.zone == "zone-a");
        assert!(!set.endpoints[1].meshed && set.endpoints[1].identity.is_empty());
        // `name:port` from the client's own namespace only.
        assert!(watch::endpoint_set(&mesh, "words:8080", "default").known);
        assert!(!watch::endpoint_set(&mesh, "words:8080", "other").known);
        // The grpc port is only in the first slice.
        assert_eq!(addresses(&watch::endpoint_set(&mesh, "10.96.0.10:9090", "default")), ["10.0.0.1:9091"]);
        // A pod's own address: that pod, not a service.
        let set = watch::endpoint_set(&mesh, "10.0.0.9:80", "default");
        assert!(set.known && !set.service && set.endpoints[0].meshed, "{set:?}");
        assert_eq!(set.endpoints[0].identity, "spiffe://cluster.local/ns/default/sa/web");
        assert!(!watch::endpoint_set(&mesh, "10.1.2.3:80", "default").known);
        // IPv6 first: its slice's endpoints instead.
        let mut v6_first = cluster();
        let mut svc = (*v6_first.services[0]).clone();
        svc.spec.as_mut().unwrap().cluster_ips = Some(vec!["fd00::10".into(), "10.96.0.10".into()]);
        svc.spec.as_mut().unwrap().cluster_ip = Some("fd00::10".into());
        v6_first.services = vec![Arc::new(svc)];
        let (mesh, _) = build("cluster.local", &v6_first);
        let set = watch::endpoint_set(&mesh, "10.96.0.10:8080", "default");
        assert_eq!(addresses(&set), ["[fd00::1]:8081", "[fd00::4]:8081"]);
    }

    #[test]
    fn terminating_endpoints_serve_only_when_none_is_ready() {
        let mut objects = cluster();
        objects.slices.truncate(1);
        let (mut mesh, _) = build("cluster.local", &objects);
        assert_eq!(addresses(&watch::endpoint_set(&mesh, "10.96.0.10:8080", "default")), ["10.0.0.1:8081"]);
        let v4: serde_json::Value = serde_json::to_value(&*objects.slices[0]).unwrap();
        let mut v4 = v4;
        v4["endpoints"][0]["conditions"] = json!({"ready": false, "serving": true, "terminating": true});
        objects.slices = vec![obj(v4)];
        (mesh, _) = build("cluster.local", &objects);
        let set = watch::endpoint_set(&mesh, "10.96.0.10:8080", "default");
        assert_eq!(addresses(&set), ["10.0.0.1:8081", "10.0.0.3:8081"]);
    }

    fn http_route(ns: &str, name: &str, spec: serde_json::Value) -> Arc<HTTPRoute> {
        obj(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}))
    }

    fn with_versions(mut objects: Objects) -> Objects {
        for v in ["words-v1", "words-v2"] {
            objects.services.push(obj(json!({
                "metadata": {"name": v, "namespace": "default"},
                "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 8080}]}
            })));
        }
        objects
    }

    #[test]
    fn http_routes_become_rules_and_bad_ones_are_left_out_whole() {
        let mut objects = with_versions(cluster());
        let parent = json!([{"group": "", "kind": "Service", "name": "words", "port": 8080}]);
        objects.http_routes = vec![
            http_route(
                "default",
                "split",
                json!({
                    "parentRefs": parent,
                    "rules": [{
                        "matches": [{"path": {"type": "PathPrefix", "value": "/api"}, "headers": [{"name": "X-Canary", "value": "1"}]}],
                        "filters": [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {"set": [{"name": "x-route", "value": "split"}]}}],
                        "backendRefs": [{"name": "words-v1", "port": 8080, "weight": 90}, {"name": "words-v2", "port": 8080, "weight": 10}],
                        "timeouts": {"request": "2s"},
                        "retry": {"codes": [503], "attempts": 2, "backoff": "100ms"}
                    }]
                }),
            ),
            http_route(
                "default",
                "regex",
                json!({
                    "parentRefs": parent,
                    "rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "/x("}}]}]
                }),
            ),
            http_route(
                "default",
                "mixed",
                json!({
                    "parentRefs": parent,
                    "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/v"}, "headers": [{"name": "x-v", "value": "1"}, {"name": "X-Tenant", "type": "RegularExpression", "value": "team-.*"}]}]}]
                }),
            ),
            http_route(
                "default",
                "bad-type",
                json!({
                    "parentRefs": parent,
                    "rules": [{"matches": [{"path": {"type": "Suffix", "value": "/x"}}]}]
                }),
            ),
            // A consumer route: the `shop` namespace's clients only.
            http_route(
                "shop",
                "mine",
                json!({
                    "parentRefs": [{"kind": "Service", "name": "words", "namespace": "default", "port": 8080}],
                    "rules": [{"backendRefs": [{"name": "words-v2", "namespace": "default", "port": 8080}]}]
                }),
            ),
        ];
        let (mesh, problems) = build("cluster.local", &objects);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].contains("HTTPRoute default/bad-type")
                && problems[0]
                    .contains("spec.rules[0].matches[0].path.type: Suffix is not a path match type"),
            "{problems:?}"
        );
        assert!(
            problems[1].contains("route default/regex")
                && problems[1].contains("matches[0].path.regex: \"/x(\""),
            "{problems:?}"
        );
        let set = mesh.route_set("10.96.0.10:8080", "default");
        assert_eq!(set.rules.len(), 2, "{set:?}");
        // `/api` plus one header outranks `/v` plus two (a longer prefix first).
        let mixed = &set.rules[1].matches[0];
        assert_eq!(
            (mixed.headers[0].name.as_str(), mixed.header_regex[0].name.as_str()),
            ("x-v", "x-tenant")
        );
        assert_eq!(mixed.header_regex[0].value, "team-.*");
        let rule = &set.rules[0];
        assert_eq!(rule.name, "default/split/0");
        assert_eq!(rule.matches[0].path_prefix, "/api");
        assert_eq!(rule.matches[0].headers[0].name, "x-canary");
        let weights: Vec<_> = rule.backends.iter().map(|b| (b.authority.as_str(), b.weight)).collect();
        assert_eq!(weights, [("words-v1.default:8080", 90), ("words-v2.default:8080", 10)]);
        assert_eq!(rule.set_response_headers[0].value, "split");
        assert_eq!(rule.timeout_ms, 2000);
        let retry = rule.retry.as_ref().unwrap();
        assert_eq!((retry.attempts, retry.statuses.as_slice(), retry.backoff_ms), (3, &[503u32][..], 100));
        let theirs = mesh.route_set("words.default:8080", "shop");
        assert_eq!(theirs.rules.len(), 1);
        assert_eq!(theirs.rules[0].backends[0].authority, "words-v2.default:8080");
        // The split's backends are services too, answered by name.
        assert!(watch::endpoint_set(&mesh, "words-v1.default:8080", "default").known);
    }

    #[test]
    fn rules_of_all_routes_rank_by_how_specific_their_matches_are() {
        let mut objects = with_versions(cluster());
        let parent = json!([{"kind": "Service", "name": "words", "port": 8080}]);
        let to = |v: &str| json!([{"name": v, "port": 8080}]);
        let created = |r: &mut Arc<HTTPRoute>, at: &str| {
            Arc::make_mut(r).metadata.creation_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at.parse().unwrap()));
        };
        let mut old = http_route(
            "default",
            "catch-all",
            json!({"parentRefs": parent, "rules": [
                {"backendRefs": to("words-v1")},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}], "backendRefs": to("words-v1")}
            ]}),
        );
        created(&mut old, "2026-01-01T00:00:00Z");
        let mut new = http_route(
            "default",
            "login",
            json!({"parentRefs": parent, "rules": [{
                "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}, {"path": {"type": "Exact", "value": "/login"}}],
                "backendRefs": to("words-v2")
            }]}),
        );
        created(&mut new, "2026-02-01T00:00:00Z");
        objects.http_routes = vec![new, old];
        let (mesh, problems) = build("cluster.local", &objects);
        assert!(problems.is_empty(), "{problems:?}");
        let order: Vec<String> = mesh
            .route_set("10.96.0.10:8080", "default")
            .rules
            .iter()
            .map(|r| {
                let m = r.matches.first().cloned().unwrap_or_default();
                format!("{} {}{}", r.name, m.path_exact, m.path_prefix)
            })
            .collect();
        // The exact path first though its route is newer; of the equal `/api` prefixes
        // the older route's; the rule without matches (`/`) last though listed first.
        assert_eq!(
            order,
            [
                "default/login/0 /login",
                "default/catch-all/1 /api",
                "default/login/0 /api",
                "default/catch-all/0 "
            ]
        );
    }

    #[test]
    fn redirect_rewrite_and_grpc_routes_convert() {
        let mut objects = with_versions(cluster());
        let parent = json!([{"kind": "Service", "name": "words", "port": 8080}]);
        objects.http_routes = vec![http_route(
            "default",
            "moves",
            json!({
                "parentRefs": parent,
                "rules": [
                    {"matches": [{"path": {"value": "/old"}}],
                     "filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "statusCode": 301,
                                  "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}}]},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                     "filters": [{"type": "URLRewrite", "urlRewrite": {"hostname": "internal",
                                  "path": {"type": "ReplaceFullPath", "replaceFullPath": "/v2"}}}]}
                ]
            }),
        )];
        objects.grpc_routes = vec![obj(
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
            "metadata": {"name": "rpc", "namespace": "default", "creationTimestamp": "2030-01-01T00:00:00Z"},
            "spec": {"parentRefs": [{"kind": "Service", "name": "words", "port": 9090}],
                     "rules": [{"matches": [{"method": {"service": "pkg.Words", "method": "Get"},
                                             "headers": [{"name": "X-Tenant", "value": "a"}]}],
                                "backendRefs": [{"name": "words-v2", "port": 8080}]},
                               {"matches": [{"method": {"type": "RegularExpression", "service": "pkg.*"}}]}]}}),
        )];
        let (mesh, problems) = build("cluster.local", &objects);
        // The GRPCRoute's second rule cannot be honoured: the whole route is left out.
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("GRPCRoute default/rpc: spec.rules[1].matches[0].method.type"),
            "{problems:?}"
        );
        let set = mesh.route_set("words.default:8080", "default");
        let redirect = set.rules[0].redirect.as_ref().unwrap();
        assert_eq!((redirect.scheme.as_str(), redirect.status), ("https", 301));
        let rewrite = set.rules[1].rewrite.as_ref().unwrap();
        assert_eq!(rewrite.hostname, "internal");
        assert!(mesh.route_set("words.default:9090", "default").rules.is_empty());
        // Without its bad rule, the GRPCRoute converts.
        let mut good = (*objects.grpc_routes[0]).clone();
        good.spec.rules.truncate(1);
        objects.grpc_routes = vec![Arc::new(good)];
        let (mesh, problems) = build("cluster.local", &objects);
        assert!(problems.is_empty(), "{problems:?}");
        let rule = &mesh.route_set("10.96.0.10:9090", "default").rules[0];
        assert_eq!(
            (rule.matches[0].grpc_service.as_str(), rule.matches[0].grpc_method.as_str()),
            ("pkg.Words", "Get")
        );
        assert_eq!(rule.matches[0].headers[0].name, "x-tenant");
        assert_eq!(rule.backends[0].authority, "words-v2.default:8080");
        assert!(rule.retry.is_none());

        // Retries from annotations: every call of a GRPCRoute (they are all POSTs).
        let mut annotated = (*objects.grpc_routes[0]).clone();
        annotated.metadata.annotations = Some(
            [
                ("retry.weft.dev/grpc", "unavailable, resource-exhausted"),
                ("retry.weft.dev/limit", "2"),
                ("retry.weft.dev/timeout", "300ms"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        );
        objects.grpc_routes = vec![Arc::new(annotated.clone())];
        let (mesh, problems) = build("cluster.local", &objects);
        assert!(problems.is_empty(), "{problems:?}");
        let retry = mesh.route_set("10.96.0.10:9090", "default").rules[0].retry.clone().unwrap();
        assert_eq!(
            (retry.attempts, retry.grpc_codes.as_slice(), retry.non_idempotent),
            (3, &[14, 8][..], true)
        );
        assert_eq!(retry.per_try_timeout_ms, 300);
        // A code the mesh does not know: the route is left out, named.
        annotated.metadata.annotations.as_mut().unwrap().insert("retry.weft.dev/grpc".into(), "down".into());
        objects.grpc_routes = vec![Arc::new(annotated)];
        let (_, problems) = build("cluster.local", &objects);
        assert!(
            problems.len() == 1 && problems[0].contains("default/rpc") && problems[0].contains("\"down\""),
            "{problems:?}"
        );
    }

    /// The demo's custom resources (k8s/examples/demo/) are what the control plane reads:
    /// they parse into its types and make routes and policies with no problem.
    #[test]
    fn the_demo_manifests_custom_resources_apply_cleanly() {
        use serde::Deserialize;
        let text = include_str!("../../../../k8s/examples/demo/demo.yaml");
        let mut objects = Objects::default();
        for doc in serde_yaml_ng::Deserializer::from_str(text) {
            let v = serde_json::Value::deserialize(doc).unwrap();
            match v["kind"].as_str().unwrap() {
                "Service" => {
                    let mut v = v.clone();
                    let n = objects.services.len();
                    v["spec"]["clusterIP"] = json!(format!("10.96.1.{n}"));
                    objects.services.push(obj(v));
                }
                "HTTPRoute" => objects.http_routes.push(obj(v)),
                "InboundPolicy" => objects.inbound_policies.push(obj(v)),
                _ => {}
            }
        }
        assert_eq!(
            (objects.services.len(), objects.http_routes.len(), objects.inbound_policies.len()),
            (5, 2, 1)
        );
        let (mesh, problems) = build("cluster.local", &objects);
        assert!(problems.is_empty(), "{problems:?}");
        let canary = mesh.route_set("words.demo:8080", "demo");
        assert_eq!(canary.rules.len(), 2);
        assert_eq!(canary.rules[1].backends.len(), 2);
        let numbers = mesh.route_set("numbers.demo:8080", "demo");
        assert_eq!(numbers.rules[0].retry.as_ref().map(|r| r.attempts), Some(5));
        assert_eq!(mesh.policies.len(), 1);
    }

    #[test]
    fn inbound_policies_select_pods_and_name_clients() {
        let mut objects = cluster();
        objects.inbound_policies = vec![obj(json!({
            "apiVersion": "policy.weft.dev/v1alpha1", "kind": "InboundPolicy",
            "metadata": {"name": "words-strict", "namespace": "default"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "words"}},
                "port": 8081,
                "mode": "strict",
                "allow": {"serviceAccounts": [{"name": "web"}], "namespaces": ["ops"]},
                "rateLimit": {"requestsPerSecond": 100, "perIdentity": 10}
            }
        }))];
        let (mesh, problems) = build("cluster.local", &objects);
        assert!(problems.is_empty(), "{problems:?}");
        let caller = |pod: &str| Caller {
            identity: "spiffe://cluster.local/ns/default/sa/words".parse().unwrap(),
            namespace: "default".into(),
            workload: pod.into(),
        };
        let p = watch::inbound_policy(&mesh, &caller("a"), 8081).unwrap();
        assert_eq!(p.mode, weft_api::v1::Mode::Strict as i32);
        assert!(!p.allow_all_meshed);
        assert_eq!(
            p.allowed_identities,
            ["spiffe://cluster.local/ns/default/sa/web", "spiffe://cluster.local/ns/ops/sa/*"]
        );
        assert_eq!(p.rate_limit.unwrap().per_identity, 10);
        // Another port, or a pod the selector does not pick: the default.
        assert!(watch::inbound_policy(&mesh, &caller("a"), 9091).unwrap().allow_all_meshed);
        assert!(watch::inbound_policy(&mesh, &caller("web"), 8081).unwrap().allow_all_meshed);
        // A pod the watches do not know yet (or a token bound to no pod): no answer, so
        // its proxy keeps its fail-closed default instead of the permissive one.
        assert!(watch::inbound_policy(&mesh, &caller("not-yet-seen"), 8081).is_none());
    }

    #[test]
    fn inbound_policies_take_match_expressions_and_named_ports() {
        let mut objects = cluster();
        let pod = |name: &str, ip: &str, tier: Option<&str>, port: u16| -> Arc<Pod> {
            let labels = match tier {
                Some(t) => json!({"app": "shop", "tier": t}),
                None => json!({"app": "shop"}),
            };
            obj(json!({
                "metadata": {"name": name, "namespace": "default", "labels": labels},
                "spec": {"serviceAccountName": "shop", "containers": [
                    {"name": "app", "ports": [{"name": "web", "containerPort": port}]},
                    {"name": PROXY_CONTAINER}
                ]},
                "status": {"phase": "Running", "podIP": ip}
            }))
        };
        objects.pods = vec![
            pod("gold", "10.0.1.1", Some("gold"), 8000),
            pod("gold-9000", "10.0.1.2", Some("gold"), 9000),
            pod("silver", "10.0.1.3", Some("silver"), 8000),
            pod("plain", "10.0.1.4", None, 8000),
        ];
        let policy = |name: &str, selector: serde_json::Value, port: serde_json::Value| {
            obj::<InboundPolicy>(json!({
                "apiVersion": "policy.weft.dev/v1alpha1", "kind": "InboundPolicy",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"podSelector": selector, "port": port, "mode": "strict"}
            }))
        };
        let tier = |op: &str, values: serde_json::Value| json!({"matchLabels": {"app": "shop"}, "matchExpressions": [{"key": "tier", "operator": op, "values": values}]});
        objects.inbound_policies = vec![
            policy("gold-web", tier("In", json!(["gold"])), json!("web")),
            policy("not-gold", tier("NotIn", json!(["gold"])), json!(8000)),
            // Each bad one is left out alone, named with its field.
            policy("no-values", tier("In", json!([])), json!(8000)),
            policy("bad-op", tier("Matches", json!(["g.*"])), json!(8000)),
            policy("bad-name", json!({}), json!("Web_Port")),
            policy("too-big", json!({}), json!(70000)),
        ];
        let (mesh, problems) = build("cluster.local", &objects);
        let named = |p: &str| problems.iter().any(|x| x.contains(p));
        assert!(problems.len() == 4, "{problems:?}");
        assert!(named("default/no-values: spec.podSelector.matchExpressions[0].values: In needs values"));
        assert!(named("default/bad-op: spec.podSelector.matchExpressions[0].operator"));
        assert!(named("default/bad-name: spec.port") && named("default/too-big: spec.port"), "{problems:?}");
        let strict = |pod: &str, port: u16| {
            let caller = Caller {
                identity: "spiffe://cluster.local/ns/default/sa/shop".parse().unwrap(),
                namespace: "default".into(),
                workload: pod.into(),
            };
            watch::inbound_policy(&mesh, &caller, port).unwrap().mode == weft_api::v1::Mode::Strict as i32
        };
        // `web` is 8000 in one gold pod and 9000 in the other.
        assert!(strict("gold", 8000) && !strict("gold", 9000));
        assert!(strict("gold-9000", 9000) && !strict("gold-9000", 8000));
        // NotIn selects the silver pod and the one without the label, as Kubernetes does.
        assert!(strict("silver", 8000) && strict("plain", 8000));
    }

    #[test]
    fn traffic_policies_set_the_services_balancing_and_faults() {
        let mut objects = cluster();
        objects.traffic_policies = vec![obj(json!({
            "apiVersion": "policy.weft.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": "words", "namespace": "default"},
            "spec": {
                "targetRef": {"name": "words", "port": 8080},
                "balancer": "round-robin",
                "outlierDetection": {"consecutiveFailures": 3, "ejectionTime": "10s"},
                "maxConcurrentRequests": 50,
                "fault": {"abort": {"percent": 5, "status": 503}},
                "retryBudget": {"percent": 5, "minRetriesPerSecond": 2}
            }
        }))];
        objects.http_routes = vec![http_route(
            "default",
            "retrying",
            json!({
                "parentRefs": [{"kind": "Service", "name": "words", "port": 8080}],
                "rules": [{"retry": {"codes": [503], "attempts": 1}}]
            }),
        )];
        let (mesh, problems) = build("cluster.local", &objects);
        assert!(problems.is_empty(), "{problems:?}");
        let set = watch::endpoint_set(&mesh, "words.default:8080", "default");
        assert_eq!(set.balancer, weft_api::v1::Balancer::RoundRobin as i32);
        assert_eq!(set.max_concurrent_requests, 50);
        let o = set.outlier_detection.unwrap();
        assert_eq!((o.consecutive_failures, o.base_ejection_ms), (3, 10_000));
        let routes = mesh.route_set("words.default:8080", "default");
        // The route's rule gets the fault and the budget; a last rule faults the rest.
        assert_eq!(routes.rules.len(), 2, "{routes:?}");
        assert!(routes.rules.iter().all(|r| r.fault.as_ref().unwrap().abort_permille == 50));
        let retry = routes.rules[0].retry.as_ref().unwrap();
        assert_eq!((retry.budget_permille, retry.budget_min_per_second), (50, 2));
        // The other port is untouched.
        let grpc = watch::endpoint_set(&mesh, "words.default:9090", "default");
        assert_eq!(grpc.balancer, weft_api::v1::Balancer::PeakEwma as i32);
        assert!(mesh.route_set("words.default:9090", "default").rules.is_empty());
    }
}
