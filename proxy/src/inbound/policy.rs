//! Inbound policy from the control plane: per app port, whether plaintext is accepted
//! (`permissive`) or mTLS is required (`strict`), and which client identities may connect.
//! One watch per port, shared by all shards (see [`crate::control`] for reconnects).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use weft_api::v1::{policy_client::PolicyClient, InboundPolicy, InboundRequest, Mode};

use super::rate_limit::RateLimiter;
use crate::{
    config::{ControlConfig, DefaultPolicy},
    control::{self, Watched},
    errors::Cause,
    metrics::{Direction, Label, Metrics},
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
        Some(id) if policy.allow_all_meshed || policy.allowed_identities.iter().any(|a| allows(a, id)) => {
            Ok(())
        }
        Some(_) => Err(Denied::Identity),
        None if policy.mode == Mode::Permissive as i32 && policy.allow_all_meshed => Ok(()),
        None => Err(Denied::Plaintext),
    }
}

/// Whether the allowed entry `allowed` names `id`: exactly, or as a prefix ending in `/*`
/// (every service account of a namespace).
fn allows(allowed: &str, id: &str) -> bool {
    match allowed.strip_suffix('*') {
        Some(prefix) if prefix.ends_with('/') => id.starts_with(prefix) && !id[prefix.len()..].contains('/'),
        _ => allowed == id,
    }
}

/// The policy of a port the control plane has not answered for
/// (`WEFT_DEFAULT_INBOUND_POLICY`). Its generation is 0: no answer made it.
pub fn default_policy(port: u16, default: DefaultPolicy) -> InboundPolicy {
    let (mode, allow_all_meshed) = match default {
        DefaultPolicy::Deny => (Mode::Strict, false),
        DefaultPolicy::Strict => (Mode::Strict, true),
        DefaultPolicy::Permissive => (Mode::Permissive, true),
    };
    InboundPolicy { port: u32::from(port), mode: mode as i32, allow_all_meshed, ..Default::default() }
}

/// Why `peer` is refused by `policy`, for the log and the client.
pub fn refusal(policy: &InboundPolicy, peer: Option<&str>, denied: Denied) -> String {
    let who = peer.unwrap_or("a plaintext client");
    match policy.generation {
        0 => format!(
            "no policy from the control plane for port {} yet; WEFT_DEFAULT_INBOUND_POLICY does not admit {who}",
            policy.port
        ),
        _ => format!("port {}'s policy does not admit {who} ({denied:?})", policy.port),
    }
}

pub struct Policies {
    watches: Watched<u16, InboundPolicy>,
    default: DefaultPolicy,
    /// Rate limiters by port, kept while the port's limit stays the same.
    limiters: Mutex<HashMap<u16, Arc<RateLimiter>>>,
}

impl Policies {
    pub fn new(cfg: &ControlConfig, metrics: Arc<Metrics>) -> Result<Self, control::Error> {
        let client = PolicyClient::new(control::channel(cfg, None)?);
        let watches = Watched::new("policy", cfg, metrics, move |port: &u16, token| {
            let mut client = client.clone();
            let req = control::authorized(InboundRequest { port: u32::from(*port) }, token);
            Box::pin(async move { client.watch_inbound(req).await.map(tonic::Response::into_inner) })
        });
        Ok(Policies { watches, default: cfg.default_inbound_policy, limiters: Mutex::default() })
    }

    /// The rate limiter of the port `policy` is for, when it has a limit; shared by all
    /// shards, and renewed when the limit changes.
    pub fn rate_limiter(&self, policy: &InboundPolicy) -> Option<Arc<RateLimiter>> {
        let cfg = policy.rate_limit?;
        let port = u16::try_from(policy.port).ok()?;
        let mut limiters = self.limiters.lock().unwrap_or_else(PoisonError::into_inner);
        let limiter = limiters.entry(port).or_insert_with(|| Arc::new(RateLimiter::new(cfg)));
        if limiter.cfg != cfg {
            *limiter = Arc::new(RateLimiter::new(cfg));
        }
        Some(limiter.clone())
    }

    /// The current policy of `port`; `WEFT_DEFAULT_INBOUND_POLICY` until the control plane
    /// has answered (it keeps serving its last answer if it goes away).
    pub async fn get(&self, port: u16) -> Arc<InboundPolicy> {
        self.watches.get(&port).await.unwrap_or_else(|| {
            let default = self.default;
            tracing::warn!(
                port,
                ?default,
                "no policy from the control plane yet; using WEFT_DEFAULT_INBOUND_POLICY"
            );
            Arc::new(default_policy(port, default))
        })
    }

    /// Returns once the control plane has answered for `port` (readiness).
    pub async fn answered(&self, port: u16) {
        self.watches.first(&port).await
    }

    /// The policy of the app port `target` names, when the proxy has a control plane.
    pub async fn of(policies: Option<&Policies>, target: SocketAddr) -> Option<Arc<InboundPolicy>> {
        Some(policies?.get(target.port()).await)
    }
}

/// Whether `target`'s port admits plaintext opaque streams at all (no side effects: no
/// denial is counted, no rate-limit token taken).
pub async fn admits_plaintext(policies: Option<&Policies>, target: SocketAddr) -> bool {
    match Policies::of(policies, target).await {
        None => true,
        Some(policy) => check(&policy, None).is_ok(),
    }
}

/// For an opaque connection to `target`: whether the port's policy admits the client
/// (`peer`, its SPIFFE ID; `None` for plaintext). A refused one is counted and its
/// connection closed.
pub async fn admitted(
    policies: Option<&Policies>,
    target: SocketAddr,
    peer: Label,
    metrics: &Metrics,
) -> bool {
    let Some(policy) = Policies::of(policies, target).await else { return true };
    match check(&policy, peer.as_deref()) {
        // An opaque connection is one request to the port's rate limit.
        Ok(()) => match policies.and_then(|p| p.rate_limiter(&policy)) {
            Some(limiter) if !limiter.admit(peer.as_deref(), std::time::Instant::now()) => {
                let why = format_args!("port {} is over its rate limit (an opaque connection)", policy.port);
                metrics.closed(Direction::Inbound, Cause::RateLimited, why);
                false
            }
            _ => true,
        },
        Err(denied) => {
            metrics.denied(peer.clone(), "tcp");
            let why = refusal(&policy, peer.as_deref(), denied);
            metrics.closed(Direction::Inbound, Cause::Unauthorized, format_args!("{why}"));
            false
        }
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
            ..Default::default()
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

    #[test]
    fn a_namespace_entry_allows_its_service_accounts_only() {
        let p = policy(Mode::Strict, Some(&["spiffe://weft.local/ns/default/sa/*"]));
        assert_eq!(check(&p, Some(WEB)), Ok(()));
        assert_eq!(check(&p, Some("spiffe://weft.local/ns/defaultx/sa/web")), Err(Denied::Identity));
        assert_eq!(check(&p, Some("spiffe://weft.local/ns/other/sa/web")), Err(Denied::Identity));
        assert_eq!(check(&p, Some("spiffe://weft.local/ns/default/sa/web/x")), Err(Denied::Identity));
        // A star anywhere but a whole last segment is a literal.
        let p = policy(Mode::Strict, Some(&["spiffe://weft.local/ns/default/sa/w*"]));
        assert_eq!(check(&p, Some(WEB)), Err(Denied::Identity));
    }
}
