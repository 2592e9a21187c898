//! Service discovery from the control plane: one streaming watch per authority, started
//! on first use and kept for the life of the shard. If the control plane goes away the
//! last answer keeps serving (static stability) and the watch reconnects with backoff.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;
use weft_api::v1::{discovery_client::DiscoveryClient, EndpointSet, WatchRequest};

use crate::config::{ControlConfig, TokenSource};

/// How long a first request waits for the control plane's first answer before falling
/// back to DNS.
const FIRST_ANSWER: Duration = Duration::from_secs(1);

/// Where a request to a discovered service goes.
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The SPIFFE ID the peer must present; `None` for endpoints outside the mesh.
    pub identity: Option<String>,
}

type Answer = Option<Arc<EndpointSet>>;

pub struct Discovery {
    client: DiscoveryClient<tonic::transport::Channel>,
    token: TokenSource,
    watches: Mutex<HashMap<String, watch::Receiver<Answer>>>,
}

impl Discovery {
    pub fn new(cfg: &ControlConfig) -> anyhow::Result<Self> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", cfg.addr))?
            .connect_timeout(Duration::from_secs(3));
        Ok(Discovery {
            client: DiscoveryClient::new(endpoint.connect_lazy()),
            token: cfg.token.clone(),
            watches: Mutex::default(),
        })
    }

    /// An endpoint for `authority`, or `None` when the mesh does not know it (or the
    /// control plane has not answered yet): the caller then resolves it with DNS.
    pub async fn resolve(&self, authority: &str) -> Option<Endpoint> {
        let mut rx = {
            let mut watches = self.watches.lock().expect("discovery lock");
            watches.entry(authority.to_string()).or_insert_with(|| self.start(authority)).clone()
        };
        let set = match tokio::time::timeout(FIRST_ANSWER, rx.wait_for(Option::is_some)).await {
            Ok(Ok(answer)) => answer.clone()?,
            _ => return None,
        };
        if !set.known {
            return None;
        }
        // Balancing comes with the traffic-management work; until then the first endpoint.
        let e = set.endpoints.first()?;
        Some(Endpoint { addr: e.address.parse().ok()?, identity: e.meshed.then(|| e.identity.clone()) })
    }

    fn start(&self, authority: &str) -> watch::Receiver<Answer> {
        let (tx, rx) = watch::channel(None);
        let (mut client, token, authority) = (self.client.clone(), self.token.clone(), authority.to_string());
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                let mut req = tonic::Request::new(WatchRequest { authority: authority.clone() });
                if let Ok(Ok(v)) = token.read().map(|t| format!("Bearer {t}").parse()) {
                    req.metadata_mut().insert(weft_api::AUTHORIZATION, v);
                }
                match client.watch(req).await {
                    Ok(rsp) => {
                        let mut stream = rsp.into_inner();
                        while let Ok(Some(set)) = stream.message().await {
                            backoff = Duration::from_millis(200);
                            tx.send_replace(Some(Arc::new(set)));
                        }
                        tracing::info!(%authority, "discovery watch ended; keeping the last answer and reconnecting");
                    }
                    Err(status) => {
                        tracing::info!(%authority, "discovery watch failed ({}): {}", status.code(), status.message())
                    }
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                // Capped low: a restarted control plane must reach every proxy within a second.
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        });
        rx
    }
}
