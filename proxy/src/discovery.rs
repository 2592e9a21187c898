//! Service discovery from the control plane: one streaming watch per authority, started
//! on first use and shared by all shards (see [`crate::control`] for reconnects).

use std::net::SocketAddr;

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

    /// An endpoint for `authority`, or `None` when the mesh does not know it (or the
    /// control plane has not answered yet): the caller then resolves it with DNS.
    pub async fn resolve(&self, authority: &str) -> Option<Endpoint> {
        let (client, token, auth) = (self.client.clone(), self.token.clone(), authority.to_string());
        let open = move || {
            let (mut client, req) =
                (client.clone(), control::authorized(WatchRequest { authority: auth.clone() }, &token));
            async move { client.watch(req).await.map(tonic::Response::into_inner) }
        };
        let set = self.watches.get(authority.to_string(), format!("discovery of {authority}"), open).await?;
        if !set.known {
            return None;
        }
        // Balancing comes with the traffic-management work; until then the first endpoint.
        let e = set.endpoints.first()?;
        Some(Endpoint { addr: e.address.parse().ok()?, identity: e.meshed.then(|| e.identity.clone()) })
    }
}
