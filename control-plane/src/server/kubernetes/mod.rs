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
pub mod resources;
pub mod tokens;

use std::{
    fmt::Debug,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use k8s_openapi::api::{
    core::v1::{Pod, Service},
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
    inbound: Store<InboundPolicy>,
    traffic: Store<TrafficPolicy>,
}

/// Starts every watch and waits for their initial lists; then publishes the first state
/// and keeps publishing as objects change. Before it returns nothing is served, so no
/// proxy ever gets an answer from a half-listed cluster.
pub async fn start(client: Client, opts: Options, stats: Arc<Stats>) -> Result<State, Error> {
    let changed = Arc::new(Notify::new());
    let services = reflect::<Service>(Api::all(client.clone()), "Service", &stats, &changed);
    let slices = reflect::<EndpointSlice>(Api::all(client.clone()), "EndpointSlice", &stats, &changed);
    let pods = reflect::<Pod>(Api::all(client.clone()), "Pod", &stats, &changed);
    let http_routes = match installed::<HTTPRoute>(&client).await? {
        true => Some(reflect::<HTTPRoute>(Api::all(client.clone()), "HTTPRoute", &stats, &changed)),
        false => None,
    };
    let grpc_routes = match installed::<GRPCRoute>(&client).await? {
        true => Some(reflect::<GRPCRoute>(Api::all(client.clone()), "GRPCRoute", &stats, &changed)),
        false => None,
    };
    let inbound = reflect::<InboundPolicy>(Api::all(client.clone()), "InboundPolicy", &stats, &changed);
    let traffic = reflect::<TrafficPolicy>(Api::all(client.clone()), "TrafficPolicy", &stats, &changed);
    let stores = Stores { services, slices, pods, http_routes, grpc_routes, inbound, traffic };
    for (kind, ready) in [
        ("Service", stores.services.wait_until_ready().await),
        ("EndpointSlice", stores.slices.wait_until_ready().await),
        ("Pod", stores.pods.wait_until_ready().await),
        ("InboundPolicy", stores.inbound.wait_until_ready().await),
        ("TrafficPolicy", stores.traffic.wait_until_ready().await),
    ] {
        ready.map_err(|_| Error::Config(format!("the {kind} watch stopped before its first list")))?;
    }
    for store in [&stores.http_routes].into_iter().flatten() {
        let _ = store.wait_until_ready().await;
    }
    for store in [&stores.grpc_routes].into_iter().flatten() {
        let _ = store.wait_until_ready().await;
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
    tokio::spawn(async move {
        loop {
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

/// The mesh the stores hold now; problems are logged once, when they first appear.
fn publishable(opts: &Options, stores: &Stores, reported: &mut Vec<String>, generation: u64) -> Mesh {
    let objects = index::Objects {
        services: stores.services.state(),
        slices: stores.slices.state(),
        pods: stores.pods.state(),
        http_routes: stores.http_routes.as_ref().map(Store::state).unwrap_or_default(),
        grpc_routes: stores.grpc_routes.as_ref().map(Store::state).unwrap_or_default(),
        inbound_policies: stores.inbound.state(),
        traffic_policies: stores.traffic.state(),
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
                "not served by the API (is its CRD installed?); routes of this kind are off until it is and the \
                 control plane restarts"
            );
            Ok(false)
        }
        Err(e) => Err(Error::Api { what: format!("a list of {}", K::plural(&())), source: e }),
    }
}

/// A reflector over `api`, run in the background: its store, and a notification on every
/// event. Managed fields are dropped as objects arrive; they are most of an object's size.
fn reflect<K>(api: Api<K>, kind: &'static str, stats: &Arc<Stats>, changed: &Arc<Notify>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let store = reader.clone();
    let (stats, changed) = (stats.clone(), changed.clone());
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|o: &mut K| o.meta_mut().managed_fields = None)
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
