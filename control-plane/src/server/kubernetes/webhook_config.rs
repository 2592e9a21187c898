//! The injector's MutatingWebhookConfiguration: its `caBundle` must hold the mesh's roots,
//! or the API server cannot call the webhook and pods start without a sidecar
//! (`failurePolicy: Ignore`). The control plane sets it at start and watches the one
//! object, so a configuration applied later, re-applied or replaced without it (an
//! upgrade, an uninstall and install while replicas run) is mended within moments; and
//! sets it again when the CA's trust bundle changes.

use base64::Engine;
use futures_util::StreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::{Api, Client, ResourceExt};

use crate::server::ca;

/// Sets every webhook's `caBundle` in the configuration `name` to the CA's bundle
/// (returning once it has tried), then, in a task of its own, sets it again whenever the
/// configuration differs or the CA changes.
pub async fn keep_ca_bundle(client: Client, name: String, mut ca: ca::Shared) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let bundle = |ca: &ca::Shared| ca.borrow().trust_bundle_pem().to_string();
    match api.get_opt(&name).await {
        Ok(Some(c)) if !holds(&c, &bundle(&ca)) => set(&api, &c, &bundle(&ca)).await,
        Ok(Some(_)) => {}
        Ok(None) => tracing::warn!(
            "MutatingWebhookConfiguration {name} not found: no pod is injected until it is applied (k8s/)"
        ),
        Err(e) => tracing::warn!("cannot read MutatingWebhookConfiguration {name}: {e}"),
    }
    let mut events = super::watch_named(api.clone(), &name).boxed();
    tokio::spawn(async move {
        let mut last: Option<MutatingWebhookConfiguration> = None;
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(Ok(c)) if c.name_any() == name => last = Some(c),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        tracing::warn!("watching MutatingWebhookConfiguration {name}: {e}");
                        continue;
                    }
                    None => return,
                },
                // A CA that never changes ends this branch for good.
                Ok(()) = ca.changed() => {}
            }
            if let Some(c) = last.as_ref().filter(|c| !holds(c, &bundle(&ca))) {
                set(&api, c, &bundle(&ca)).await;
            }
        }
    });
}

/// Whether every webhook of `c` trusts exactly `bundle`.
fn holds(c: &MutatingWebhookConfiguration, bundle: &str) -> bool {
    c.webhooks
        .iter()
        .flatten()
        .all(|w| w.client_config.ca_bundle.as_ref().is_some_and(|b| b.0 == bundle.as_bytes()))
}

async fn set(api: &Api<MutatingWebhookConfiguration>, c: &MutatingWebhookConfiguration, bundle: &str) {
    let name = c.name_any();
    let encoded = base64::engine::general_purpose::STANDARD.encode(bundle);
    let ops: Vec<serde_json::Value> = (0..c.webhooks.as_ref().map_or(0, Vec::len))
        .map(|i| serde_json::json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": encoded}))
        .collect();
    let patch: json_patch::Patch = match serde_json::from_value(serde_json::Value::Array(ops)) {
        Ok(p) => p,
        Err(e) => return tracing::error!("caBundle patch: {e}"),
    };
    match api.patch(&name, &kube::api::PatchParams::default(), &kube::api::Patch::<()>::Json(patch)).await {
        Ok(_) => tracing::info!("MutatingWebhookConfiguration {name}: caBundle set to the mesh's roots"),
        Err(e) => tracing::warn!("cannot set the caBundle of MutatingWebhookConfiguration {name}: {e}"),
    }
}
