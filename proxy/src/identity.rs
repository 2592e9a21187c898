//! The proxy's workload identity: a key made here (it never leaves the process), a
//! certificate for it from the control plane's CA, renewed at about 70 % of its
//! lifetime, with jittered backoff when the control plane cannot be reached. The proxy
//! is not ready until the first certificate arrives. An expiring or expired certificate
//! shows in a metric and the log, never silently.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{CertificateParams, KeyPair, SanType};
use tokio::sync::watch;
use weft_api::v1::{identity_client::IdentityClient, CertifyRequest};

use crate::{config::ControlConfig, metrics::Metrics, transport::tls::Credentials};

/// Renew when this fraction of the lifetime has passed.
const RENEW_AT: f64 = 0.7;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Low, so a proxy that started while the control plane was away gets its certificate
/// within a few seconds of its return (with jitter, so a node's proxies do not ask at once).
const BACKOFF_MAX: Duration = Duration::from_secs(4);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot make a key or CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error("cannot read the token: {0}; check WEFT_TOKEN_FILE")]
    Token(std::io::Error),
    #[error("invalid WEFT_CONTROL_ADDR: {0}")]
    Addr(String),
    #[error("the control plane refused the certificate request ({code:?}): {message}")]
    Refused { code: tonic::Code, message: String },
}

pub type Current = watch::Receiver<Option<Arc<Credentials>>>;

/// Starts obtaining and renewing the certificate; the receiver sees each new one.
pub fn spawn(
    cfg: ControlConfig,
    metrics: Arc<Metrics>,
    ready: Arc<crate::ready::Ready>,
) -> Result<Current, Error> {
    let channel = crate::control::channel(&cfg, Some(Duration::from_secs(10)))
        .map_err(|e| Error::Addr(e.to_string()))?;
    let client = IdentityClient::new(channel);
    let (tx, rx) = watch::channel(None);
    tokio::spawn(renew_loop(cfg, client, tx, metrics, ready));
    Ok(rx)
}

async fn renew_loop(
    cfg: ControlConfig,
    mut client: IdentityClient<tonic::transport::Channel>,
    tx: watch::Sender<Option<Arc<Credentials>>>,
    metrics: Arc<Metrics>,
    ready: Arc<crate::ready::Ready>,
) {
    let mut backoff = BACKOFF_MIN;
    ready.waiting(format!("asking the control plane at {} for a certificate", cfg.addrs.join(",")));
    loop {
        match certify(&cfg, &mut client).await {
            Ok(creds) => {
                let lifetime = creds.not_after.duration_since(SystemTime::now()).unwrap_or_default();
                metrics.certified(true, unix(creds.not_after));
                tracing::info!(identity = %creds.identity, "certificate issued, valid for {lifetime:?}");
                tx.send_replace(Some(Arc::new(creds)));
                backoff = BACKOFF_MIN;
                tokio::time::sleep(jitter(lifetime.mul_f64(RENEW_AT), 0.05)).await;
            }
            Err(e) => {
                metrics.certified(false, 0);
                ready.waiting(format!("no certificate yet, retrying in {backoff:?}: {e}"));
                let expired = tx.borrow().as_ref().is_some_and(|c| c.not_after <= SystemTime::now());
                if expired {
                    tracing::error!(identity = %cfg.identity, "certificate EXPIRED and renewal failed: {e}");
                } else {
                    tracing::warn!(identity = %cfg.identity, control = %cfg.addrs.join(","), "certificate request failed, retrying in {backoff:?}: {e}");
                }
                tokio::time::sleep(jitter(backoff, 0.2)).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

async fn certify(
    cfg: &ControlConfig,
    client: &mut IdentityClient<tonic::transport::Channel>,
) -> Result<Credentials, Error> {
    // A new key for every certificate: a leaked key dies with its certificate.
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(cfg.identity.as_str().try_into()?)];
    let csr_pem = params.serialize_request(&key)?.pem()?;
    let token = cfg.token.read().map_err(Error::Token)?;
    let mut req = tonic::Request::new(CertifyRequest { csr_pem });
    let bearer = format!("Bearer {token}").parse().map_err(|_| {
        Error::Token(std::io::Error::other("the token contains characters not allowed in a header"))
    })?;
    req.metadata_mut().insert(weft_api::AUTHORIZATION, bearer);
    let rsp = client
        .certify(req)
        .await
        .map_err(|s| Error::Refused { code: s.code(), message: s.message().to_string() })?
        .into_inner();
    Ok(Credentials::new(
        rsp.identity,
        key.serialize_pem(),
        rsp.cert_chain_pem,
        rsp.trust_bundle_pem,
        UNIX_EPOCH + Duration::from_secs(u64::try_from(rsp.not_after_unix).unwrap_or(0)),
    ))
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// `d` ± `frac`, so a fleet of proxies does not renew or retry in lockstep.
fn jitter(d: Duration, frac: f64) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new().build_hasher().finish();
    let unit = (r as f64 / u64::MAX as f64) * 2.0 - 1.0;
    d.mul_f64(1.0 + frac * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_bounds() {
        for _ in 0..1000 {
            let j = jitter(Duration::from_secs(100), 0.05);
            assert!(j >= Duration::from_secs(95) && j <= Duration::from_secs(105), "{j:?}");
        }
    }
}
