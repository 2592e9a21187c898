//! Service discovery from the control plane: one streaming watch per authority, started
//! on first use and shared by all shards (see [`crate::control`] for reconnects).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use weft_api::v1::{discovery_client::DiscoveryClient, EndpointSet, WatchRequest};

use crate::{
    config::ControlConfig,
    control::{self, Watched},
    errors::{Cause, CauseError},
    metrics::Metrics,
};

/// Where a request to a discovered service goes: its address and, for meshed
/// endpoints, the SPIFFE ID it must present.
pub use crate::http::forwarder::Target as Endpoint;

pub struct Discovery {
    watches: Watched<String, EndpointSet>,
}

impl Discovery {
    pub fn new(cfg: &ControlConfig, metrics: Arc<Metrics>) -> Result<Self, control::Error> {
        let client = DiscoveryClient::new(control::channel(cfg, None)?);
        let watches = Watched::new("discovery", cfg, metrics, move |authority: &String, token| {
            let mut client = client.clone();
            let req = control::authorized(WatchRequest { authority: authority.clone() }, token);
            Box::pin(async move { client.watch(req).await.map(tonic::Response::into_inner) })
        })
        .with_limits(cfg.watches);
        Ok(Discovery { watches })
    }

    /// What the mesh knows of `authority`. A known service with no endpoints is waited for
    /// up to `queue_timeout`, and then returned empty (the caller fails the request with
    /// `no-endpoints`). The last answer keeps serving while the control plane is away.
    pub async fn resolve(&self, authority: &str, queue_timeout: Duration) -> Resolved {
        let key = authority.to_string();
        let Some(first) = self.watches.get(&key).await else { return Resolved::NoAnswer };
        if !first.known {
            return Resolved::NotInMesh;
        }
        if !first.endpoints.is_empty() {
            return Resolved::Service(first);
        }
        let ready = |s: &EndpointSet| !s.known || !s.endpoints.is_empty();
        match self.watches.get_when(&key, queue_timeout, ready).await {
            Some(set) if set.known => Resolved::Service(set),
            Some(_) => Resolved::NotInMesh,
            None => Resolved::NoAnswer,
        }
    }

    /// Transparent mode: what the address the app dialled is. A service's virtual address
    /// (a Kubernetes ClusterIP) is that service; any other address is one endpoint, with
    /// the SPIFFE ID it must prove when the mesh knows it as meshed.
    pub async fn destination(&self, addr: SocketAddr) -> Result<Destination, NoAnswer> {
        let key = addr.to_string();
        let Some(set) = self.watches.get(&key).await else { return Err(NoAnswer(key)) };
        if set.known && set.service {
            return Ok(Destination::Service(key));
        }
        let e = set.endpoints.iter().find(|e| e.address.parse() == Ok(addr));
        Ok(Destination::Endpoint(e.filter(|e| e.meshed).map(|e| Arc::from(e.identity.as_str()))))
    }
}

/// What a redirected connection's original destination is.
#[derive(Clone, Debug)]
pub enum Destination {
    /// A service, by the key discovery knows it by (its `ip:port`): balanced over its
    /// endpoints with its routes, as its name would be.
    Service(String),
    /// One endpoint; the SPIFFE ID it must prove when it is meshed.
    Endpoint(Option<Arc<str>>),
}

/// What discovery says of a destination: three states, so that not knowing is never
/// taken for "not meshed" (which would send a mesh peer's traffic in plaintext).
pub enum Resolved {
    /// A service of the mesh, with its endpoints.
    Service(Arc<EndpointSet>),
    /// The control plane answered that the mesh does not know it: DNS, plaintext.
    NotInMesh,
    /// No answer yet (the control plane is unreachable and never answered for it).
    NoAnswer,
}

/// Discovery has not answered for a destination.
#[derive(Clone, Debug)]
pub struct NoAnswer(pub String);

impl NoAnswer {
    pub fn error(&self) -> CauseError {
        let msg = format!(
            "discovery has not answered for {} yet, and the proxy never guesses that a destination is \
             outside the mesh; check WEFT_CONTROL_ADDR and the control plane",
            self.0
        );
        CauseError::new(Cause::NoDiscovery, msg)
    }
}
