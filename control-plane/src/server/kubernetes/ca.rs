//! The CA's root from the cluster: a Secret with the root certificate and key
//! (`tls.crt`, `tls.key`, as `kubectl create secret tls` writes them) and the trust bundle
//! from the Secret's `ca.crt` or a ConfigMap's `ca-bundle.crt` (several roots during a
//! rotation). Every replica loads the same root, so any of them can sign. Both objects
//! are watched: an edit takes effect without a restart (new certificates, the webhook's
//! and the proxies' at their next renewal, come from it), and an edit that does not load
//! is logged and the last good root kept.

use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};

use crate::server::ca::{self, Ca};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "Secret {ns}/{name} not found: the control plane signs with the root it holds; create it with \
         `kubectl -n {ns} create secret tls {name} --cert=root.crt --key=root.key`"
    )]
    NoSecret { ns: String, name: String },
    #[error(
        "Secret {ns}/{name} has no {key}: it needs tls.crt (the root certificate) and tls.key (its key)"
    )]
    MissingKey { ns: String, name: String, key: &'static str },
    #[error(
        "ConfigMap {ns}/{name} not found, or it has no ca-bundle.crt: it holds the trust bundle (PEM roots)"
    )]
    NoBundle { ns: String, name: String },
    #[error(
        "cannot read {what} {ns}/{name}: {source} (check the control plane's RBAC: get on {what}s in {ns})"
    )]
    Read {
        what: &'static str,
        ns: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {ns}/{name}: {msg}")]
    Invalid { ns: String, name: String, msg: String },
}

/// Where the root comes from.
#[derive(Clone)]
pub struct Source {
    pub namespace: String,
    pub secret: String,
    /// A ConfigMap with `ca-bundle.crt`; without it, the Secret's `ca.crt` if present.
    pub bundle_config_map: Option<String>,
}

/// The CA from `from`, then kept current as its objects change.
pub async fn shared(client: &Client, trust_domain: &str, from: Source) -> Result<ca::Shared, Error> {
    let first = load(client, trust_domain, &from).await?;
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(first));
    tokio::spawn(follow(client.clone(), trust_domain.to_string(), from, tx));
    Ok(rx)
}

/// Loads the CA again whenever the Secret or the ConfigMap changes; sends it when it
/// differs.
async fn follow(client: Client, trust_domain: String, from: Source, tx: tokio::sync::watch::Sender<Arc<Ca>>) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &from.namespace);
    let secret = super::watch_named(secrets, &from.secret).map(|e| e.map(drop));
    let mut changes = match &from.bundle_config_map {
        Some(cm) => {
            let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &from.namespace);
            let map = super::watch_named(maps, cm).map(|e| e.map(drop));
            futures_util::stream::select(secret, map).boxed()
        }
        None => secret.boxed(),
    };
    while let Some(change) = changes.next().await {
        if let Err(e) = change {
            tracing::warn!("watching the CA's Secret or ConfigMap in {}: {e}", from.namespace);
            continue;
        }
        match load(&client, &trust_domain, &from).await {
            Ok(ca) if ca.same_as(&tx.borrow()) => {}
            Ok(ca) => {
                tracing::info!(secret = %from.secret, "CA root or trust bundle changed: signing with it now");
                tx.send_replace(Arc::new(ca));
            }
            Err(e) => {
                tracing::error!("the CA's objects changed but do not load; kept the last good root: {e}")
            }
        }
    }
}

pub async fn load(client: &Client, trust_domain: &str, from: &Source) -> Result<Ca, Error> {
    let ns = from.namespace.clone();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &from.namespace);
    let name = from.secret.clone();
    let secret = secrets
        .get_opt(&from.secret)
        .await
        .map_err(|source| Error::Read { what: "Secret", ns: ns.clone(), name: name.clone(), source })?
        .ok_or_else(|| Error::NoSecret { ns: ns.clone(), name: name.clone() })?;
    let data = secret.data.unwrap_or_default();
    let text = |key: &'static str| {
        data.get(key).map(|b| String::from_utf8_lossy(&b.0).into_owned()).filter(|s| !s.trim().is_empty())
    };
    let missing = |key| Error::MissingKey { ns: ns.clone(), name: name.clone(), key };
    let cert = text("tls.crt").ok_or_else(|| missing("tls.crt"))?;
    let key = text("tls.key").ok_or_else(|| missing("tls.key"))?;
    let bundle = match &from.bundle_config_map {
        Some(cm) => {
            let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &from.namespace);
            let no_bundle = || Error::NoBundle { ns: ns.clone(), name: cm.to_string() };
            let map = maps
                .get_opt(cm)
                .await
                .map_err(|source| Error::Read {
                    what: "ConfigMap",
                    ns: ns.clone(),
                    name: cm.to_string(),
                    source,
                })?
                .ok_or_else(no_bundle)?;
            map.data.and_then(|d| d.get("ca-bundle.crt").cloned()).ok_or_else(no_bundle)?
        }
        None => text("ca.crt").unwrap_or_default(),
    };
    // The bundle usually holds the signing root too; it is trusted once.
    let extra: String = pem_blocks(&bundle).filter(|b| b.trim() != cert.trim()).collect();
    Ca::from_pem(trust_domain, &cert, &key, &extra).map_err(|e| Error::Invalid {
        ns,
        name,
        msg: e.to_string(),
    })
}

/// The PEM blocks of a bundle, each with its trailing newline.
fn pem_blocks(bundle: &str) -> impl Iterator<Item = String> + '_ {
    bundle
        .split_inclusive("-----END CERTIFICATE-----")
        .filter(|b| b.contains("-----BEGIN"))
        .map(|b| format!("{}\n", b.trim()))
}
