//! The Kubernetes source: `weft control --source kubernetes`. Reflectors (list, then
//! watch; a watch that ends or meets `410 Gone` relists, and the stores keep serving what
//! they hold meanwhile) over Services, EndpointSlices, Pods, the Gateway API's HTTPRoutes
//! and GRPCRoutes and Weft's policies → `index` → the same `watch::channel<Arc<Mesh>>`
//! the mesh file feeds, so the gRPC API does not change shape. Identity: `tokens` checks
//! each proxy's ServiceAccount token with the TokenReview API; `ca` loads the root from
//! a Secret. Nothing here needs a leader: every replica serves from its own watches.

pub mod ca;
pub mod gateway;
pub mod index;
pub mod policy;
pub mod resources;
pub mod status;
pub mod tokens;
pub mod webhook_config;

use std::{
    fmt::Debug,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{reflector, reflector::Store, watcher, WatchStreamExt},
    Api, Client, Resource,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};

use self::resources::{GRPCRoute, HTTPRoute, InboundPolicy, TrafficPolicy};
use super::{mesh::Mesh, source::State};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot configure a Kubernetes client: {0}. In a pod, the service account is used; elsewhere set \
         KUBECONFIG or ~/.kube/config"
    )]
    Config(String),
    #[error("the Kubernetes API answered {what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Ca(#[from] ca::Error),
    #[error(transparent)]
    Tokens(#[from] tokens::Error),
}

/// A client from the pod's service account or from KUBECONFIG, with ring as the one
/// TLS provider (installed once for the process).
pub async fn client() -> Result<Client, Error> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::try_default().await.map_err(|e| Error::Config(e.to_string()))
}

/// A client for a command a person waits on (`weft check`): a 503 (an API server's proxy
/// to a pod that does not answer) is reported at once, not retried for minutes as kube's
/// default does for controllers, and no answer takes longer than 15 s.
pub async fn client_for_cli() -> Result<Client, Error> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = kube::Config::infer().await.map_err(|e| Error::Config(e.to_string()))?;
    config.default_retry = false;
    config.read_timeout = Some(std::time::Duration::from_secs(15));
    Client::try_from(config).map_err(|e| Error::Config(e.to_string()))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// Per kind: objects held, watch restarts, the time of the last event.
#[derive(Default)]
pub struct Stats {
    objects: Family<KindLabel, Gauge>,
    restarts: Family<KindLabel, Counter>,
    since_event: Family<KindLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    last_event: Mutex<Vec<(&'static str, Instant)>>,
}

impl Stats {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("kubernetes_objects", "Objects the watches hold, per kind", self.objects.clone());
        registry.register(
            "kubernetes_watch_restarts",
            "Watches that failed (410 Gone, a lost connection, an error) and were restarted, per kind",
            self.restarts.clone(),
        );
        registry.register(
            "kubernetes_seconds_since_event",
            "Seconds since a watch last delivered an event, per kind",
            self.since_event.clone(),
        );
    }

    /// Updates the time-since gauges (called before each scrape).
    pub fn refresh(&self) {
        let now = Instant::now();
        for (kind, at) in self.last_event.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            self.since_event.get_or_create(&KindLabel { kind }).set(now.duration_since(*at).as_secs_f64());
        }
    }

    fn event(&self, kind: &'static str, held: usize) {
        self.objects.get_or_create(&KindLabel { kind }).set(i64::try_from(held).unwrap_or(i64::MAX));
        let mut last = self.last_event.lock().unwrap_or_else(|e| e.into_inner());
        match last.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, at)) => *at = Instant::now(),
            None => last.push((kind, Instant::now())),
        }
    }

    fn restart(&self, kind: &'static str) {
        self.restarts.get_or_create(&KindLabel { kind }).inc();
    }
}

pub struct Options {
    pub trust_domain: String,
    /// How long the index waits after an event for more before it publishes (a burst,
    /// a relist, becomes one new state).
    pub settle: Duration,
}

/// The stores of every kind, read by the index.
struct Stores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    http_routes: Option<Store<HTTPRoute>>,
    grpc_routes: Option<Store<GRPCRoute>>,
    inbound: Option<Store<InboundPolicy>>,
    traffic: Option<Store<TrafficPolicy>>,
}

/// Starts every watch and waits for their initial lists; then publishes the first state
/// and keeps publishing as objects change. Before it returns nothing is served, so no
/// proxy ever gets an answer from a half-listed cluster.
pub async fn start(client: Client, opts: Options, stats: Arc<Stats>) -> Result<State, Error> {
    let changed = Arc::new(Notify::new());
    let services = reflect::<Service>(Api::all(client.clone()), "Service", &stats, &changed, keep_all);
    let slices =
        reflect::<EndpointSlice>(Api::all(client.clone()), "EndpointSlice", &stats, &changed, keep_all);
    let pods = reflect::<Pod>(Api::all(client.clone()), "Pod", &stats, &changed, trim_pod);
    // Custom resources may not be installed: the kinds that are not are off (with a
    // warning), since no object of theirs can exist.
    let optional = |installed: bool| installed.then_some(());
    let http_routes = optional(installed::<HTTPRoute>(&client).await?)
        .map(|()| reflect::<HTTPRoute>(Api::all(client.clone()), "HTTPRoute", &stats, &changed, keep_all));
    let grpc_routes = optional(installed::<GRPCRoute>(&client).await?)
        .map(|()| reflect::<GRPCRoute>(Api::all(client.clone()), "GRPCRoute", &stats, &changed, keep_all));
    let inbound = optional(installed::<InboundPolicy>(&client).await?).map(|()| {
        reflect::<InboundPolicy>(Api::all(client.clone()), "InboundPolicy", &stats, &changed, keep_all)
    });
    let traffic = optional(installed::<TrafficPolicy>(&client).await?).map(|()| {
        reflect::<TrafficPolicy>(Api::all(client.clone()), "TrafficPolicy", &stats, &changed, keep_all)
    });
    let stores = Stores { services, slices, pods, http_routes, grpc_routes, inbound, traffic };
    for (kind, ready) in [
        ("Service", stores.services.wait_until_ready().await),
        ("EndpointSlice", stores.slices.wait_until_ready().await),
        ("Pod", stores.pods.wait_until_ready().await),
    ] {
        ready.map_err(|_| Error::Config(format!("the {kind} watch stopped before its first list")))?;
    }
    let stopped = |kind: &str| Error::Config(format!("the {kind} watch stopped before its first list"));
    if let Some(s) = &stores.http_routes {
        s.wait_until_ready().await.map_err(|_| stopped("HTTPRoute"))?;
    }
    if let Some(s) = &stores.grpc_routes {
        s.wait_until_ready().await.map_err(|_| stopped("GRPCRoute"))?;
    }
    if let Some(s) = &stores.inbound {
        s.wait_until_ready().await.map_err(|_| stopped("InboundPolicy"))?;
    }
    if let Some(s) = &stores.traffic {
        s.wait_until_ready().await.map_err(|_| stopped("TrafficPolicy"))?;
    }
    let mut reported = Vec::new();
    let first = publishable(&opts, &stores, &mut reported, 1);
    tracing::info!(
        services = first.services.len(),
        pods = first.pods.len(),
        routes = first.routes.len(),
        "initial lists complete"
    );
    let (tx, rx) = watch::channel(Arc::new(first));
    // Route status is written by a task of its own, so that writing many (a first start
    // among thousands of routes) never holds back the next state for the proxies.
    let (problems_tx, problems) = watch::channel(reported.clone());
    tokio::spawn(write_route_status(
        client,
        stores.http_routes.clone(),
        stores.grpc_routes.clone(),
        problems,
    ));
    tokio::spawn(async move {
        loop {
            problems_tx.send_replace(reported.clone());
            changed.notified().await;
            tokio::time::sleep(opts.settle).await;
            let generation = tx.borrow().generation;
            let mut next = publishable(&opts, &stores, &mut reported, generation);
            tx.send_if_modified(|cur| {
                if **cur == next {
                    return false;
                }
                next.generation = cur.generation + 1;
                *cur = Arc::new(std::mem::take(&mut next));
                true
            });
        }
    });
    Ok(rx)
}

/// One object, by name, as it changes: RBAC that grants list and watch of a name only
/// (the CA's Secret, the webhook configuration) needs the field selector.
pub fn watch_named<K>(api: Api<K>, name: &str) -> impl futures_util::Stream<Item = Result<K, watcher::Error>>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    watcher(api, config).default_backoff().applied_objects()
}

/// The routes' status after each new state (their writes come back as events, which
/// find nothing more to write).
async fn write_route_status(
    client: Client,
    http: Option<Store<HTTPRoute>>,
    grpc: Option<Store<GRPCRoute>>,
    mut problems: watch::Receiver<Vec<String>>,
) {
    // What the entries are made from: the problems and each route's version. Most new
    // states change neither (an endpoint moved), and then no entry is rebuilt.
    let mut last: Option<(Vec<String>, Vec<Option<String>>)> = None;
    loop {
        let current = problems.borrow_and_update().clone();
        let http = http.as_ref().map(Store::state).unwrap_or_default();
        let grpc = grpc.as_ref().map(Store::state).unwrap_or_default();
        // Sorted: a store lists its objects in no set order.
        let mut versions: Vec<Option<String>> = http
            .iter()
            .map(|r| r.metadata.resource_version.clone())
            .chain(grpc.iter().map(|r| r.metadata.resource_version.clone()))
            .collect();
        versions.sort();
        if last.as_ref().is_none_or(|(p, v)| *p != current || *v != versions) {
            status::write(&client, &http, &grpc, &current).await;
            last = Some((current, versions));
        }
        if problems.changed().await.is_err() {
            return;
        }
    }
}

/// The mesh the stores hold now; problems are logged once, when they first appear.
fn publishable(opts: &Options, stores: &Stores, reported: &mut Vec<String>, generation: u64) -> Mesh {
    let objects = index::Objects {
        services: stores.services.state(),
        slices: stores.slices.state(),
        pods: stores.pods.state(),
        http_routes: stores.http_routes.as_ref().map(Store::state).unwrap_or_default(),
        grpc_routes: stores.grpc_routes.as_ref().map(Store::state).unwrap_or_default(),
        inbound_policies: stores.inbound.as_ref().map(Store::state).unwrap_or_default(),
        traffic_policies: stores.traffic.as_ref().map(Store::state).unwrap_or_default(),
    };
    let (mut mesh, problems) = index::build(&opts.trust_domain, &objects);
    for p in problems.iter().filter(|p| !reported.contains(p)) {
        tracing::warn!("ignored, the rest of the policy still applies: {p}");
    }
    *reported = problems;
    mesh.generation = generation;
    mesh
}

/// Whether the API serves a kind (a CRD may not be installed: the Gateway API's are
/// optional, and without them routes come from nowhere).
async fn installed<K>(client: &Client) -> Result<bool, Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let api: Api<K> = Api::all(client.clone());
    match api.list_metadata(&kube::api::ListParams::default().limit(1)).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            tracing::warn!(
                kind = %K::kind(&()),
                group = %K::group(&()),
                "not served by the API (is its CRD installed? Weft's are in k8s/crds/); objects of this kind \
                 are off until it is and the control plane restarts"
            );
            Ok(false)
        }
        Err(e) => Err(Error::Api { what: format!("a list of {}", K::plural(&())), source: e }),
    }
}

fn keep_all<K>(_: &mut K) {}

/// The cluster's namespaces, for the injector's opt-ins.
pub fn namespaces(client: &Client, stats: &Arc<Stats>) -> Store<Namespace> {
    let unused = Arc::new(Notify::new());
    reflect::<Namespace>(Api::all(client.clone()), "Namespace", stats, &unused, keep_all)
}

/// Whether namespace `name` has `weft.dev/inject: enabled` (a label or an annotation).
pub fn opted_in(namespaces: &Store<Namespace>, name: &str) -> bool {
    let Some(ns) = namespaces.get(&kube::runtime::reflector::ObjectRef::new(name)) else { return false };
    let meta = serde_json::to_value(&ns.metadata).unwrap_or_default();
    crate::inject::enabled(&meta) == Some(true)
}

/// A pod as the index reads it: names, labels, service account, host network, the
/// containers' names and named ports, phase and IPs. The rest (env, volumes, probes, conditions) would be
/// most of the memory the watch holds.
fn trim_pod(pod: &mut Pod) {
    pod.metadata.annotations = None;
    pod.metadata.owner_references = None;
    if let Some(spec) = &mut pod.spec {
        // Names, and the named ports (an InboundPolicy may name its port).
        let names = |cs: &mut Vec<k8s_openapi::api::core::v1::Container>| {
            for c in cs.iter_mut() {
                let ports: Vec<_> = c
                    .ports
                    .take()
                    .into_iter()
                    .flatten()
                    .filter(|p| p.name.is_some())
                    .map(|p| k8s_openapi::api::core::v1::ContainerPort {
                        name: p.name,
                        container_port: p.container_port,
                        ..Default::default()
                    })
                    .collect();
                *c = k8s_openapi::api::core::v1::Container {
                    name: std::mem::take(&mut c.name),
                    ports: (!ports.is_empty()).then_some(ports),
                    ..Default::default()
                };
            }
        };
        names(&mut spec.containers);
        if let Some(init) = &mut spec.init_containers {
            names(init);
        }
        *spec = k8s_openapi::api::core::v1::PodSpec {
            containers: std::mem::take(&mut spec.containers),
            init_containers: spec.init_containers.take(),
            service_account_name: spec.service_account_name.take(),
            host_network: spec.host_network,
            ..Default::default()
        };
    }
    if let Some(status) = &mut pod.status {
        *status = k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase.take(),
            pod_ip: status.pod_ip.take(),
            pod_ips: status.pod_ips.take(),
            ..Default::default()
        };
    }
}

/// A reflector over `api`, run in the background: its store, and a notification on every
/// event. Managed fields are dropped as objects arrive (they are most of an object's
/// size), and `trim` drops what else the index does not read.
fn reflect<K>(
    api: Api<K>,
    kind: &'static str,
    stats: &Arc<Stats>,
    changed: &Arc<Notify>,
    trim: fn(&mut K),
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let store = reader.clone();
    let (stats, changed) = (stats.clone(), changed.clone());
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(move |o: &mut K| {
            o.meta_mut().managed_fields = None;
            trim(o);
        })
        .reflect(writer);
    tokio::spawn(async move {
        let mut lists = 0u64;
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => {
                    lists += 1;
                    if lists > 1 {
                        tracing::info!(kind, "relisting, still serving what the watch held");
                    }
                }
                Ok(_) => {
                    stats.event(kind, store.len());
                    changed.notify_one();
                }
                Err(e) => {
                    stats.restart(kind);
                    tracing::warn!(kind, "watch failed, retrying with backoff: {e}");
                }
            }
        }
    });
    reader
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;

    #[test]
    fn a_trimmed_pod_keeps_what_the_index_reads() {
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-0", "namespace": "shop", "labels": {"app": "web"},
                         "annotations": {"big": "x".repeat(10_000)}},
            "spec": {"serviceAccountName": "web",
                     "initContainers": [{"name": "weft-proxy", "image": "weft", "env": [{"name": "A", "value": "1"}]}],
                     "containers": [{"name": "app", "image": "app", "args": ["--serve"],
                                     "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}, {"containerPort": 9000}]}],
                     "volumes": [{"name": "data", "emptyDir": {}}]},
            "status": {"phase": "Running", "podIP": "10.0.0.9", "podIPs": [{"ip": "10.0.0.9"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        trim_pod(&mut pod);
        let text = serde_json::to_string(&pod).unwrap();
        assert!(text.len() < 400 && !text.contains("image") && !text.contains("big"), "{text}");
        let objects = index::Objects { pods: vec![Arc::new(pod)], ..Default::default() };
        let (mesh, _) = index::build("cluster.local", &objects);
        let p = &mesh.pods[&"10.0.0.9".parse().unwrap()];
        assert_eq!(p.identity.as_deref(), Some("spiffe://cluster.local/ns/shop/sa/web"));
        assert_eq!(p.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(p.ports.iter().collect::<Vec<_>>(), [(&"http".to_string(), &8080)]);
    }
}
