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
        let e = pick_weighted(&set.endpoints, fastrand::u64(..))?;
        Some(Endpoint { addr: e.address.parse().ok()?, identity: e.meshed.then(|| e.identity.clone()) })
    }
}

/// A random endpoint in proportion to its weight (`r` is a uniformly random number).
/// Latency-aware balancing replaces this with the traffic-management work.
fn pick_weighted(endpoints: &[weft_api::v1::Endpoint], r: u64) -> Option<&weft_api::v1::Endpoint> {
    let total: u64 = endpoints.iter().map(|e| u64::from(e.weight.max(1))).sum();
    if total == 0 {
        return None;
    }
    let mut at = r % total;
    endpoints.iter().find(|e| {
        let w = u64::from(e.weight.max(1));
        if at < w {
            return true;
        }
        at -= w;
        false
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_in_proportion_to_weight() {
        let eps: Vec<_> = [("a", 1), ("b", 3)]
            .iter()
            .map(|(a, w)| weft_api::v1::Endpoint { address: a.to_string(), weight: *w, ..Default::default() })
            .collect();
        let picks: Vec<_> = (0..8).map(|r| pick_weighted(&eps, r).unwrap().address.clone()).collect();
        assert_eq!(picks, ["a", "b", "b", "b", "a", "b", "b", "b"]);
        assert!(pick_weighted(&[], 7).is_none());
    }
}
