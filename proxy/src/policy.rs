//! Inbound policy from the control plane: per app port, whether plaintext is accepted
//! (`permissive`) or mTLS is required (`strict`), and which client identities may connect.
//! One watch per port, shared by all shards; the last answer keeps serving while the
//! control plane is away.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;
use weft_api::v1::{policy_client::PolicyClient, InboundPolicy, InboundRequest, Mode};

use crate::config::{ControlConfig, TokenSource};

/// How long a first connection waits for the port's policy before the default applies.
const FIRST_ANSWER: Duration = Duration::from_secs(1);

/// Why a client was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// A plaintext client on a port that requires mTLS or names its clients.
    Plaintext,
    /// An mTLS client whose identity the policy does not allow.
    Identity,
}

/// Whether `peer` (its SPIFFE ID, `None` for plaintext) may use a port with `policy`.
pub fn check(policy: &InboundPolicy, peer: Option<&str>) -> Result<(), Denied> {
    match peer {
        Some(id) if policy.allow_all_meshed || policy.allowed_identities.iter().any(|a| a == id) => Ok(()),
        Some(_) => Err(Denied::Identity),
        None if policy.mode == Mode::Permissive as i32 && policy.allow_all_meshed => Ok(()),
        None => Err(Denied::Plaintext),
    }
}

/// The policy when the control plane has not answered: what the mesh file's default is.
pub fn default_policy(port: u16) -> InboundPolicy {
    InboundPolicy {
        port: u32::from(port),
        mode: Mode::Permissive as i32,
        allowed_identities: vec![],
        allow_all_meshed: true,
    }
}

type Answer = Option<Arc<InboundPolicy>>;

pub struct Policies {
    client: PolicyClient<tonic::transport::Channel>,
    token: TokenSource,
    watches: Mutex<HashMap<u16, watch::Receiver<Answer>>>,
}

impl Policies {
    pub fn new(cfg: &ControlConfig) -> anyhow::Result<Self> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", cfg.addr))?
            .connect_timeout(Duration::from_secs(3));
        Ok(Policies {
            client: PolicyClient::new(endpoint.connect_lazy()),
            token: cfg.token.clone(),
            watches: Mutex::default(),
        })
    }

    /// The current policy of `port`.
    pub async fn get(&self, port: u16) -> Arc<InboundPolicy> {
        let mut rx = {
            let mut watches = self.watches.lock().expect("policy lock");
            watches.entry(port).or_insert_with(|| self.start(port)).clone()
        };
        let answer = match tokio::time::timeout(FIRST_ANSWER, rx.wait_for(Option::is_some)).await {
            Ok(Ok(answer)) => answer.clone(),
            _ => None,
        };
        answer.unwrap_or_else(|| {
            tracing::warn!(port, "no policy from the control plane yet; using the default (permissive)");
            Arc::new(default_policy(port))
        })
    }

    fn start(&self, port: u16) -> watch::Receiver<Answer> {
        let (tx, rx) = watch::channel(None);
        let (mut client, token) = (self.client.clone(), self.token.clone());
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                let mut req = tonic::Request::new(InboundRequest { port: u32::from(port) });
                if let Ok(Ok(v)) = token.read().map(|t| format!("Bearer {t}").parse()) {
                    req.metadata_mut().insert(weft_api::AUTHORIZATION, v);
                }
                match client.watch_inbound(req).await {
                    Ok(rsp) => {
                        let mut stream = rsp.into_inner();
                        while let Ok(Some(policy)) = stream.message().await {
                            backoff = Duration::from_millis(200);
                            tx.send_replace(Some(Arc::new(policy)));
                        }
                    }
                    Err(status) => {
                        tracing::info!(port, "policy watch failed ({}): {}", status.code(), status.message())
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "spiffe://weft.local/ns/default/sa/web";

    fn policy(mode: Mode, allow: Option<&[&str]>) -> InboundPolicy {
        InboundPolicy {
            port: 8080,
            mode: mode as i32,
            allow_all_meshed: allow.is_none(),
            allowed_identities: allow.unwrap_or_default().iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn strict_refuses_plaintext() {
        assert_eq!(check(&policy(Mode::Strict, None), None), Err(Denied::Plaintext));
        assert_eq!(check(&policy(Mode::Strict, None), Some(WEB)), Ok(()));
        assert_eq!(check(&policy(Mode::Permissive, None), None), Ok(()));
    }

    #[test]
    fn allow_lists_name_their_clients() {
        let p = policy(Mode::Permissive, Some(&["spiffe://weft.local/ns/default/sa/admin"]));
        assert_eq!(check(&p, Some(WEB)), Err(Denied::Identity));
        assert_eq!(check(&p, Some("spiffe://weft.local/ns/default/sa/admin")), Ok(()));
        // With a named list, unauthenticated clients are not on it.
        assert_eq!(check(&p, None), Err(Denied::Plaintext));
    }
}
