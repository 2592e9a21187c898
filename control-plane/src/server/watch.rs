//! The Discovery and Policy gRPC services: streaming watches that push a new message
//! whenever the answer for the caller changes, starting with the current one.

use std::{pin::Pin, sync::Arc};

use futures_util::Stream;
use tonic::{Request, Response, Status};
use weft_api::v1::{
    discovery_server::Discovery, policy_server::Policy, Endpoint, EndpointSet, InboundPolicy, InboundRequest,
    Mode, RouteSet, WatchRequest,
};

use super::{
    identity::{bearer, Authenticator, Caller},
    mesh::{self, Mesh},
    source::State,
};

type Watch<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// An answer stamped with the state generation it was made from.
trait Stamped {
    fn stamp(&mut self, generation: u64);
}

impl Stamped for EndpointSet {
    fn stamp(&mut self, generation: u64) {
        self.generation = generation;
    }
}

impl Stamped for RouteSet {
    fn stamp(&mut self, generation: u64) {
        self.generation = generation;
    }
}

impl Stamped for InboundPolicy {
    fn stamp(&mut self, generation: u64) {
        self.generation = generation;
    }
}

/// Watch streams open now, all kinds (the admin port's `weft_control_watches`): how many
/// proxies' watches the control plane is serving.
pub static OPEN: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// Counts one open stream while it lives.
struct Open;

impl Open {
    fn new() -> Open {
        OPEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Open
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Streams `answer(mesh)` now and after every state change that changes it (a new
/// generation alone is not a change), stamped with the generation it was made from.
/// `None` is no answer yet: nothing is sent until there is one (the caller keeps what it
/// had, or its fail-closed default).
fn watch_answers<T, F>(state: State, answer: F) -> Watch<T>
where
    T: Clone + PartialEq + Stamped + Send + Sync + 'static,
    F: Fn(&Mesh) -> Option<T> + Send + 'static,
{
    let init = (state, None::<T>, answer, false, Open::new());
    Box::pin(futures_util::stream::unfold(init, |(mut state, last, answer, mut started, open)| async move {
        loop {
            if started && state.changed().await.is_err() {
                return None;
            }
            started = true;
            let (next, generation) = {
                let mesh = state.borrow_and_update();
                (answer(&mesh), mesh.generation)
            };
            if let Some(next) = next.filter(|n| last.as_ref() != Some(n)) {
                let mut sent = next.clone();
                sent.stamp(generation);
                return Some((Ok(sent), (state, Some(next), answer, started, open)));
            }
        }
    }))
}

/// Who the request's token proves the caller is.
async fn caller<T>(auth: &dyn Authenticator, req: &Request<T>) -> Result<Caller, Status> {
    auth.authenticate(bearer(req)?).await
}

pub struct DiscoveryService {
    pub state: State,
    pub auth: Arc<dyn Authenticator>,
}

/// The endpoints of the service `authority` names for a client in `client_ns`. An
/// `ip:port` that is no service's authority but an endpoint's or a pod's address
/// (transparent mode asks by the address the app dialled) is answered with that one
/// endpoint, so the proxy learns whether it is meshed and which identity it must prove.
pub fn endpoint_set(mesh: &Mesh, authority: &str, client_ns: &str) -> EndpointSet {
    let (mut balancer, mut outlier) = (mesh::Balancer::PeakEwma, mesh::OutlierDetection::default());
    let mut max_concurrent_requests = 0;
    let service = mesh.service_for(authority, client_ns);
    let endpoints: Vec<Endpoint> = match service {
        Some(service) => {
            (balancer, outlier) = (service.balancer, service.outlier_detection.clone());
            max_concurrent_requests = service.max_concurrent_requests.unwrap_or(0);
            service.endpoints.iter().map(|e| endpoint(mesh, e)).collect()
        }
        None => match authority.parse::<std::net::SocketAddr>().ok().and_then(|a| at_address(mesh, a)) {
            Some(e) => vec![e],
            None => return EndpointSet { authority: authority.into(), ..Default::default() },
        },
    };
    let balancer = match balancer {
        mesh::Balancer::PeakEwma => weft_api::v1::Balancer::PeakEwma,
        mesh::Balancer::RoundRobin => weft_api::v1::Balancer::RoundRobin,
    };
    let outlier_detection = Some(weft_api::v1::OutlierDetection {
        consecutive_failures: outlier.consecutive_failures,
        base_ejection_ms: outlier.ejection_time.millis(),
        max_ejection_ms: outlier.max_ejection_time.millis(),
    });
    EndpointSet {
        authority: authority.into(),
        known: true,
        endpoints,
        balancer: balancer as i32,
        outlier_detection,
        max_concurrent_requests,
        generation: 0,
        service: service.is_some(),
    }
}

/// The one endpoint at `addr`: a service's endpoint, or a pod the source knows.
fn at_address(mesh: &Mesh, addr: std::net::SocketAddr) -> Option<Endpoint> {
    let mut all = mesh.services.iter().flat_map(|s| &s.endpoints);
    if let Some(e) = all.find(|e| e.address == addr) {
        return Some(endpoint(mesh, e));
    }
    let pod = mesh.pods.get(&addr.ip())?;
    Some(Endpoint {
        address: addr.to_string(),
        weight: 1,
        identity: pod.identity.clone().unwrap_or_default(),
        meshed: pod.identity.is_some(),
        ..Default::default()
    })
}

fn endpoint(mesh: &Mesh, e: &mesh::Endpoint) -> Endpoint {
    let workload = e.workload.as_ref().and_then(|w| mesh.workloads.iter().find(|x| &x.name == w));
    let identity = e.identity.clone().or_else(|| workload.map(|w| mesh.identity_of(w)));
    Endpoint {
        address: e.address.to_string(),
        weight: e.weight,
        meshed: identity.is_some(),
        identity: identity.unwrap_or_default(),
        labels: e.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        zone: e.zone.clone().unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type WatchStream = Watch<EndpointSet>;

    async fn watch(&self, req: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let ns = caller(&*self.auth, &req).await?.namespace;
        let authority = req.into_inner().authority;
        if authority.is_empty() {
            return Err(Status::invalid_argument("authority is empty: send host:port"));
        }
        Ok(Response::new(watch_answers(self.state.clone(), move |m| Some(endpoint_set(m, &authority, &ns)))))
    }
}

pub struct PolicyService {
    pub state: State,
    pub auth: Arc<dyn Authenticator>,
}

/// The policy of the caller's inbound `port`: the first that names its workload (mesh
/// file) or selects its pod (Kubernetes), or permissive and open to every meshed identity.
/// `None` while a source that selects by pod does not know the caller's pod (a pod the
/// watch has not delivered yet, or a token not bound to a pod): the proxy keeps its
/// fail-closed default rather than get a permissive answer its policy would not give.
pub fn inbound_policy(mesh: &Mesh, caller: &Caller, port: u16) -> Option<InboundPolicy> {
    let me = mesh.pods.values().find(|x| x.name == caller.workload && x.namespace == caller.namespace);
    if mesh.selects_pods && me.is_none() {
        return None;
    }
    let applies = |p: &mesh::InboundPolicy| match &p.pods {
        None => p.workload == caller.workload,
        Some(selector) => me.is_some_and(|me| selector.selects(me)),
    };
    let rule = mesh.policies.iter().filter(|p| p.is_for_port(port, me)).find(|p| applies(p));
    let mode = match rule.map(|r| r.mode).unwrap_or(mesh::Mode::Permissive) {
        mesh::Mode::Strict => Mode::Strict,
        mesh::Mode::Permissive => Mode::Permissive,
    };
    let allow = rule.and_then(|r| r.allow.clone());
    let rate_limit = rule.and_then(|r| r.rate_limit.as_ref()).map(|r| weft_api::v1::RateLimit {
        requests_per_second: r.requests_per_second,
        burst: r.burst.unwrap_or(r.requests_per_second),
        per_identity: r.per_identity.unwrap_or(0),
    });
    Some(InboundPolicy {
        port: u32::from(port),
        mode: mode as i32,
        allow_all_meshed: allow.is_none(),
        allowed_identities: allow.unwrap_or_default(),
        rate_limit,
        generation: 0,
    })
}

#[tonic::async_trait]
impl Policy for PolicyService {
    type WatchInboundStream = Watch<InboundPolicy>;

    async fn watch_inbound(
        &self,
        req: Request<InboundRequest>,
    ) -> Result<Response<Self::WatchInboundStream>, Status> {
        let caller = caller(&*self.auth, &req).await?;
        let port = u16::try_from(req.into_inner().port)
            .map_err(|_| Status::invalid_argument("port must be between 1 and 65535"))?;
        Ok(Response::new(watch_answers(self.state.clone(), move |m| inbound_policy(m, &caller, port))))
    }

    type WatchRoutesStream = Watch<RouteSet>;

    async fn watch_routes(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchRoutesStream>, Status> {
        let ns = caller(&*self.auth, &req).await?.namespace;
        let authority = req.into_inner().authority;
        if authority.is_empty() {
            return Err(Status::invalid_argument("authority is empty: send host:port"));
        }
        Ok(Response::new(watch_answers(self.state.clone(), move |m| Some(m.route_set(&authority, &ns)))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::sync::Arc;

    const MESH: &str = "workloads:\n  - name: web\n    token: web-token-0123456789\nservices:\n  - name: api\n    port: 80\n    endpoints:\n      - address: 127.0.0.1:9001\n        workload: web\n";

    #[tokio::test]
    async fn pushes_the_current_set_then_only_changes() {
        let mesh = Mesh::parse("m", MESH).unwrap();
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(mesh.clone()));
        let mut s = watch_answers(rx, |m| Some(endpoint_set(m, "api:80", "default")));
        let first = s.next().await.unwrap().unwrap();
        assert!(first.known);
        assert_eq!(first.endpoints[0].identity, "spiffe://weft.local/ns/default/sa/web");
        // An unrelated change is not pushed; a change to the set is.
        let mut other = mesh.clone();
        other.policies.push(mesh::InboundPolicy {
            workload: "web".into(),
            port: 1,
            mode: mesh::Mode::Strict,
            allow: None,
            rate_limit: None,
            pods: None,
            port_name: None,
        });
        tx.send(Arc::new(other)).unwrap();
        let mut moved = mesh.clone();
        moved.services[0].endpoints[0].address = "127.0.0.1:9002".parse().unwrap();
        tx.send(Arc::new(moved)).unwrap();
        let next = tokio::time::timeout(std::time::Duration::from_secs(1), s.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(next.endpoints[0].address, "127.0.0.1:9002");
        assert!(!endpoint_set(&mesh, "nope:80", "default").known);
    }

    #[test]
    fn an_endpoint_address_is_answered_with_that_endpoint() {
        let mesh = Mesh::parse("m", MESH).unwrap();
        let set = endpoint_set(&mesh, "127.0.0.1:9001", "default");
        assert!(set.known && set.endpoints.len() == 1 && set.endpoints[0].meshed);
        assert_eq!(set.endpoints[0].identity, "spiffe://weft.local/ns/default/sa/web");
        assert!(!endpoint_set(&mesh, "127.0.0.1:9002", "default").known);
    }

    #[test]
    fn policy_defaults_to_permissive_for_all_meshed() {
        let mesh = Mesh::parse("m", MESH).unwrap();
        let web = Caller {
            identity: "spiffe://weft.local/ns/default/sa/web".parse().unwrap(),
            namespace: "default".into(),
            workload: "web".into(),
        };
        let p = inbound_policy(&mesh, &web, 9001).unwrap();
        assert_eq!(p.mode, Mode::Permissive as i32);
        assert!(p.allow_all_meshed && p.allowed_identities.is_empty());
    }
}
