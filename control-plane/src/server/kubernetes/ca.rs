//! The CA's root from the cluster: a Secret with the root certificate and key
//! (`tls.crt`, `tls.key`, as `kubectl create secret tls` writes them) and the trust bundle
//! from the Secret's `ca.crt` or a ConfigMap's `ca-bundle.crt` (several roots during a
//! rotation). Every replica loads the same root, so any of them can sign.

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};

use crate::server::ca::Ca;

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
pub struct Source<'a> {
    pub namespace: &'a str,
    pub secret: &'a str,
    /// A ConfigMap with `ca-bundle.crt`; without it, the Secret's `ca.crt` if present.
    pub bundle_config_map: Option<&'a str>,
}

pub async fn load(client: &Client, trust_domain: &str, from: Source<'_>) -> Result<Ca, Error> {
    let ns = from.namespace.to_string();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), from.namespace);
    let name = from.secret.to_string();
    let secret = secrets
        .get_opt(from.secret)
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
    let bundle = match from.bundle_config_map {
        Some(cm) => {
            let maps: Api<ConfigMap> = Api::namespaced(client.clone(), from.namespace);
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
