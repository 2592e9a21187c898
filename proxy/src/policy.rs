//! Inbound policy from the control plane: per app port, whether plaintext is accepted
//! (`permissive`) or mTLS is required (`strict`), and which client identities may connect.
//! One watch per port, shared by all shards (see [`crate::control`] for reconnects).

use std::sync::Arc;

use weft_api::v1::{policy_client::PolicyClient, InboundPolicy, InboundRequest, Mode};

use crate::{
    config::{ControlConfig, TokenSource},
    control::{self, Watches},
    limits::RateLimiter,
};

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
        rate_limit: None,
    }
}

pub struct Policies {
    client: PolicyClient<tonic::transport::Channel>,
    token: TokenSource,
    watches: Watches<u16, InboundPolicy>,
    /// Rate limiters by port, kept while the port's limit stays the same.
    limiters: std::sync::Mutex<std::collections::HashMap<u16, Arc<RateLimiter>>>,
}

impl Policies {
    pub fn new(cfg: &ControlConfig) -> anyhow::Result<Self> {
        Ok(Policies {
            client: PolicyClient::new(control::channel(cfg)?),
            token: cfg.token.clone(),
            watches: Watches::default(),
            limiters: Default::default(),
        })
    }

    /// The rate limiter of the port `policy` is for, when it has a limit; shared by all
    /// shards, and renewed when the limit changes.
    pub fn rate_limiter(&self, policy: &InboundPolicy) -> Option<Arc<RateLimiter>> {
        let cfg = policy.rate_limit?;
        let port = u16::try_from(policy.port).ok()?;
        let mut limiters = self.limiters.lock().expect("limiters lock");
        let limiter = limiters.entry(port).or_insert_with(|| Arc::new(RateLimiter::new(cfg)));
        if limiter.cfg != cfg {
            *limiter = Arc::new(RateLimiter::new(cfg));
        }
        Some(limiter.clone())
    }

    /// The current policy of `port`; the default until the control plane has answered.
    pub async fn get(&self, port: u16) -> Arc<InboundPolicy> {
        let (client, token) = (self.client.clone(), self.token.clone());
        let open = move || {
            let (mut client, req) =
                (client.clone(), control::authorized(InboundRequest { port: u32::from(port) }, &token));
            async move { client.watch_inbound(req).await.map(tonic::Response::into_inner) }
        };
        let answer = self.watches.get(port, format!("policy of port {port}"), open).await;
        answer.unwrap_or_else(|| {
            tracing::warn!(port, "no policy from the control plane yet; using the default (permissive)");
            Arc::new(default_policy(port))
        })
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
            rate_limit: None,
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
