//! Service discovery from the control plane: one streaming watch per authority, started
//! on first use and shared by all shards (see [`crate::control`] for reconnects).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use weft_api::v1::{discovery_client::DiscoveryClient, EndpointSet, WatchRequest};

use crate::{
    config::ControlConfig,
    control::{self, Watched},
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
        let client = DiscoveryClient::new(control::channel(cfg)?);
        let watches = Watched::new("discovery", cfg, metrics, move |authority: &String, token| {
            let mut client = client.clone();
            let req = control::authorized(WatchRequest { authority: authority.clone() }, token);
            Box::pin(async move { client.watch(req).await.map(tonic::Response::into_inner) })
        });
        Ok(Discovery { watches })
    }

    /// The endpoint set of `authority`, or `None` when the mesh does not know it (or the
    /// control plane has not answered yet): the caller then resolves it with DNS. A known
    /// service with no endpoints is waited for up to `queue_timeout`, and then returned
    /// empty (the caller fails the request with `no-endpoints`).
    pub async fn resolve(&self, authority: &str, queue_timeout: Duration) -> Option<Arc<EndpointSet>> {
        let key = authority.to_string();
        let first = self.watches.get(&key).await?;
        if !first.known {
            return None;
        }
        if !first.endpoints.is_empty() {
            return Some(first);
        }
        let ready = |s: &EndpointSet| !s.known || !s.endpoints.is_empty();
        let set = self.watches.get_when(&key, queue_timeout, ready).await?;
        set.known.then_some(set)
    }

    /// Transparent mode: the SPIFFE ID the endpoint at `addr` must prove, when the mesh
    /// knows that address as a meshed endpoint.
    pub async fn identity_at(&self, addr: SocketAddr) -> Option<Arc<str>> {
        let set = self.resolve(&addr.to_string(), Duration::ZERO).await?;
        let e = set.endpoints.iter().find(|e| e.address.parse() == Ok(addr))?;
        e.meshed.then(|| Arc::from(e.identity.as_str()))
    }
}
