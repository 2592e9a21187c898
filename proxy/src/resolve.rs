//! Name resolution for explicit-mode requests (`curl -x`, `CONNECT host:port`).
//!
//! hickory-resolver with the system configuration (resolv.conf and /etc/hosts), so the
//! proxy resolves names the way the application would.

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::TokioResolver;

use crate::errors::{Cause, CauseError};

#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read /etc/resolv.conf: {0}; the proxy resolves names as the app does and needs it")]
    Config(String),
    #[error("cannot build the DNS resolver: {0}")]
    Build(String),
}

impl Resolver {
    pub fn from_system() -> Result<Self, Error> {
        let inner = TokioResolver::builder_tokio()
            .map_err(|e| Error::Config(e.to_string()))?
            .build()
            .map_err(|e| Error::Build(e.to_string()))?;
        Ok(Self { inner })
    }

    /// Resolves `host` (a name or an IP literal, IPv6 in brackets or not) to an address.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<SocketAddr, CauseError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, port));
        }
        let lookup = self
            .inner
            .lookup_ip(bare)
            .await
            .map_err(|e| CauseError::new(Cause::ResolveFailed, format!("cannot resolve {bare}: {e}")))?;
        // IPv4 first, as Envoy's V4_PREFERRED: `localhost` names both 127.0.0.1 and ::1,
        // and most apps listen on IPv4.
        let ip = lookup
            .iter()
            .find(IpAddr::is_ipv4)
            .or_else(|| lookup.iter().next())
            .ok_or_else(|| CauseError::new(Cause::ResolveFailed, format!("{bare} has no addresses")))?;
        Ok(SocketAddr::new(ip, port))
    }
}
