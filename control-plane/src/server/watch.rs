//! The Discovery and Policy gRPC services: streaming watches that push a new message
//! whenever the answer for the caller changes, starting with the current one.

use std::pin::Pin;

use futures_util::Stream;
use tonic::{Request, Response, Status};
use weft_api::v1::{
    discovery_server::Discovery, policy_server::Policy, Endpoint, EndpointSet, InboundPolicy, InboundRequest,
    Mode, RouteSet, WatchRequest,
};

use super::{
    identity::bearer,
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

/// Streams `answer(mesh)` now and after every state change that changes it (a new
/// generation alone is not a change), stamped with the generation it was made from.
fn watch_answers<T, F>(state: State, answer: F) -> Watch<T>
where
    T: Clone + PartialEq + Stamped + Send + Sync + 'static,
    F: Fn(&Mesh) -> T + Send + 'static,
{
    let init = (state, None::<T>, answer);
    Box::pin(futures_util::stream::unfold(init, |(mut state, last, answer)| async move {
        loop {
            if last.is_some() && state.changed().await.is_err() {
                return None;
            }
            let (next, generation) = {
                let mesh = state.borrow_and_update();
                (answer(&mesh), mesh.generation)
            };
            if last.as_ref() != Some(&next) {
                let mut sent = next.clone();
                sent.stamp(generation);
                return Some((Ok(sent), (state, Some(next), answer)));
            }
        }
    }))
}

/// The workload whose token the request carries, in the current state.
fn caller<T>(state: &State, req: &Request<T>) -> Result<mesh::Workload, Status> {
    let token = bearer(req)?;
    state
        .borrow()
        .workloads
        .iter()
        .find(|w| w.token == token)
        .cloned()
        .ok_or_else(|| Status::unauthenticated("unknown token: check the workload's token in the mesh file"))
}

pub struct DiscoveryService {
    pub state: State,
}

/// The endpoints of the service `authority` names. An `ip:port` that is no service's
/// authority but an endpoint's address (transparent mode asks by the address the app
/// dialled) is answered with that endpoint alone, so the proxy learns whether it is
/// meshed and which identity it must prove.
pub fn endpoint_set(mesh: &Mesh, authority: &str) -> EndpointSet {
    let (mut balancer, mut outlier) = (mesh::Balancer::PeakEwma, mesh::OutlierDetection::default());
    let mut max_concurrent_requests = 0;
    let endpoints: Vec<&mesh::Endpoint> = match mesh.service_for(authority) {
        Some(service) => {
            (balancer, outlier) = (service.balancer, service.outlier_detection.clone());
            max_concurrent_requests = service.max_concurrent_requests.unwrap_or(0);
            service.endpoints.iter().collect()
        }
        None => {
            let addr = authority.parse::<std::net::SocketAddr>().ok();
            let all = || mesh.services.iter().flat_map(|s| &s.endpoints);
            match addr.and_then(|a| all().find(|e| e.address == a)) {
                Some(e) => vec![e],
                None => return EndpointSet { authority: authority.into(), ..Default::default() },
            }
        }
    };
    let endpoints = endpoints.into_iter().map(|e| endpoint(mesh, e)).collect();
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
    }
}

fn endpoint(mesh: &Mesh, e: &mesh::Endpoint) -> Endpoint {
    let workload = e.workload.as_ref().and_then(|w| mesh.workloads.iter().find(|x| &x.name == w));
    Endpoint {
        address: e.address.to_string(),
        weight: e.weight,
        identity: workload.map(|w| mesh.identity_of(w)).unwrap_or_default(),
        meshed: workload.is_some(),
        labels: e.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type WatchStream = Watch<EndpointSet>;

    async fn watch(&self, req: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        caller(&self.state, &req)?;
        let authority = req.into_inner().authority;
        if authority.is_empty() {
            return Err(Status::invalid_argument("authority is empty: send host:port"));
        }
        Ok(Response::new(watch_answers(self.state.clone(), move |m| endpoint_set(m, &authority))))
    }
}

pub struct PolicyService {
    pub state: State,
}

/// The policy of `workload`'s inbound `port`: what the mesh file says, or permissive and
/// open to every meshed identity.
pub fn inbound_policy(mesh: &Mesh, workload: &str, port: u16) -> InboundPolicy {
    let rule = mesh.policies.iter().find(|p| p.workload == workload && p.port == port);
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
    InboundPolicy {
        port: u32::from(port),
        mode: mode as i32,
        allow_all_meshed: allow.is_none(),
        allowed_identities: allow.unwrap_or_default(),
        rate_limit,
        generation: 0,
    }
}

#[tonic::async_trait]
impl Policy for PolicyService {
    type WatchInboundStream = Watch<InboundPolicy>;

    async fn watch_inbound(
        &self,
        req: Request<InboundRequest>,
    ) -> Result<Response<Self::WatchInboundStream>, Status> {
        let workload = caller(&self.state, &req)?.name;
        let port = u16::try_from(req.into_inner().port)
            .map_err(|_| Status::invalid_argument("port must be between 1 and 65535"))?;
        Ok(Response::new(watch_answers(self.state.clone(), move |m| inbound_policy(m, &workload, port))))
    }

    type WatchRoutesStream = Watch<RouteSet>;

    async fn watch_routes(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchRoutesStream>, Status> {
        caller(&self.state, &req)?;
        let authority = req.into_inner().authority;
        if authority.is_empty() {
            return Err(Status::invalid_argument("authority is empty: send host:port"));
        }
        Ok(Response::new(watch_answers(self.state.clone(), move |m| m.route_set(&authority))))
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
        let mut s = watch_answers(rx, |m| endpoint_set(m, "api:80"));
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
        assert!(!endpoint_set(&mesh, "nope:80").known);
    }

    #[test]
    fn an_endpoint_address_is_answered_with_that_endpoint() {
        let mesh = Mesh::parse("m", MESH).unwrap();
        let set = endpoint_set(&mesh, "127.0.0.1:9001");
        assert!(set.known && set.endpoints.len() == 1 && set.endpoints[0].meshed);
        assert_eq!(set.endpoints[0].identity, "spiffe://weft.local/ns/default/sa/web");
        assert!(!endpoint_set(&mesh, "127.0.0.1:9002").known);
    }

    #[test]
    fn policy_defaults_to_permissive_for_all_meshed() {
        let mesh = Mesh::parse("m", MESH).unwrap();
        let p = inbound_policy(&mesh, "web", 9001);
        assert_eq!(p.mode, Mode::Permissive as i32);
        assert!(p.allow_all_meshed && p.allowed_identities.is_empty());
    }
}
