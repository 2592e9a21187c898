//! The injector's MutatingWebhookConfiguration: its `caBundle` must hold the mesh's roots,
//! or the API server cannot call the webhook and pods start without a sidecar
//! (`failurePolicy: Ignore`). The control plane sets it at start and watches the one
//! object, so a configuration applied later, re-applied or replaced without it (an
//! upgrade, an uninstall and install while replicas run) is mended within moments.

use base64::Engine;
use futures_util::StreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api, Client, ResourceExt,
};

/// Sets every webhook's `caBundle` in the configuration `name` to `bundle` (returning
/// once it has tried), then watches it in a task of its own and sets it again whenever it
/// differs.
pub async fn keep_ca_bundle(client: Client, name: String, bundle: String) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    match api.get_opt(&name).await {
        Ok(Some(c)) if !holds(&c, &bundle) => set(&api, &c, &bundle).await,
        Ok(Some(_)) => {}
        Ok(None) => tracing::warn!(
            "MutatingWebhookConfiguration {name} not found: no pod is injected until it is applied (k8s/)"
        ),
        Err(e) => tracing::warn!("cannot read MutatingWebhookConfiguration {name}: {e}"),
    }
    // RBAC grants list and watch of this one name, which needs the field selector.
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api.clone(), config).default_backoff().applied_objects().boxed();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                Ok(c) if c.name_any() == name && !holds(&c, &bundle) => set(&api, &c, &bundle).await,
                Ok(_) => {}
                Err(e) => tracing::warn!("watching MutatingWebhookConfiguration {name}: {e}"),
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
