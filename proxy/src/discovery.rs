//! Service discovery from the control plane: one streaming watch per authority, started
//! on first use and shared by all shards (see [`crate::control`] for reconnects).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use weft_api::v1::{discovery_client::DiscoveryClient, EndpointSet, WatchRequest};

use crate::{
    config::{ControlConfig, TokenSource},
    control::{self, Watches},
};

/// Where a request to a discovered service goes.
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The SPIFFE ID the peer must present; `None` for endpoints outside the mesh.
    pub identity: Option<String>,
}

pub struct Discovery {
    client: DiscoveryClient<tonic::transport::Channel>,
    token: TokenSource,
    watches: Watches<String, EndpointSet>,
}

impl Discovery {
    pub fn new(cfg: &ControlConfig) -> anyhow::Result<Self> {
        Ok(Discovery {
            client: DiscoveryClient::new(control::channel(cfg)?),
            token: cfg.token.clone(),
            watches: Watches::default(),
        })
    }

    /// The endpoint set of `authority`, or `None` when the mesh does not know it (or the
    /// control plane has not answered yet): the caller then resolves it with DNS. A known
    /// service with no endpoints is waited for up to `queue_timeout`, and then returned
    /// empty (the caller fails the request with `no-endpoints`).
    pub async fn resolve(&self, authority: &str, queue_timeout: Duration) -> Option<Arc<EndpointSet>> {
        let (client, token, auth) = (self.client.clone(), self.token.clone(), authority.to_string());
        let open = move || {
            let (mut client, req) =
                (client.clone(), control::authorized(WatchRequest { authority: auth.clone() }, &token));
            async move { client.watch(req).await.map(tonic::Response::into_inner) }
        };
        let what = format!("discovery of {authority}");
        let first = self.watches.get(authority.to_string(), what.clone(), open.clone()).await?;
        if !first.known {
            return None;
        }
        if !first.endpoints.is_empty() {
            return Some(first);
        }
        let ready = |s: &EndpointSet| !s.known || !s.endpoints.is_empty();
        let set = self.watches.get_when(authority.to_string(), what, open, queue_timeout, ready).await?;
        set.known.then_some(set)
    }

    /// Transparent mode: the SPIFFE ID the endpoint at `addr` must prove, when the mesh
    /// knows that address as a meshed endpoint.
    pub async fn identity_at(&self, addr: SocketAddr) -> Option<String> {
        let set = self.resolve(&addr.to_string(), Duration::ZERO).await?;
        let e = set.endpoints.iter().find(|e| e.address.parse() == Ok(addr))?;
        e.meshed.then(|| e.identity.clone())
    }
}
