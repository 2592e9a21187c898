//! Route status, as GAMMA implementations write it: every HTTPRoute and GRPCRoute with a
//! Service parent gets, per such parent, an entry with `controllerName: weft.dev/mesh`
//! and the conditions `Accepted` (applied, or why not: `NoMatchingParent` for a Service
//! that does not exist, `UnsupportedValue` for what Weft cannot honour) and
//! `ResolvedRefs` (`BackendNotFound` for a missing backend). `kubectl get httproute -o
//! yaml` then says whether the mesh took a route, as Linkerd and Istio do.
//!
//! No leader is needed: every replica computes the same entries from the same objects
//! and writes only when the route's entries differ (times aside), with the route's
//! resourceVersion as a precondition, so replicas converge instead of taking turns.
//! Other controllers' entries (a Gateway's) are kept.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{api::PatchParams, Api, Client};
use serde_json::{json, Value};

use super::{
    gateway::Problem,
    resources::{GRPCRoute, HTTPRoute, ParentRef, RouteStatus},
};

pub const CONTROLLER: &str = "weft.dev/mesh";

/// The entries this controller wants on a route: one per Service parent.
pub fn entries(
    kind: &str,
    meta: &ObjectMeta,
    parents: &[ParentRef],
    problems: &[Problem],
    old: Option<&RouteStatus>,
    now: &str,
) -> Vec<Value> {
    let (ns, name) = (meta.namespace.as_deref().unwrap_or(""), meta.name.as_deref().unwrap_or(""));
    // Problems name the object (conversion) or its mesh route `ns/name` (validation).
    let mine = [format!("{kind} {ns}/{name}: "), format!("route {ns}/{name}: ")];
    let problem = problems.iter().find(|p| mine.iter().any(|m| p.starts_with(m.as_str())));
    let (accepted, resolved) = conditions(problem.map(String::as_str));
    let generation = meta.generation;
    let previous: Vec<&Value> = old
        .map(|s| s.parents.iter().filter(|p| p["controllerName"] == CONTROLLER).collect())
        .unwrap_or_default();
    parents
        .iter()
        .filter(|p| p.kind.as_deref() == Some("Service") && p.group.as_deref().is_none_or(str::is_empty))
        .map(|p| {
            let parent_ref = parent_json(p);
            let before = previous.iter().find(|e| e["parentRef"] == parent_ref);
            let condition = |(kind, status, reason, message): (&str, bool, &str, String)| {
                let status = if status { "True" } else { "False" };
                // The time it last changed: kept while its status stays.
                let since = before
                    .and_then(|e| e["conditions"].as_array())
                    .and_then(|cs| cs.iter().find(|c| c["type"] == kind && c["status"] == status))
                    .and_then(|c| c["lastTransitionTime"].as_str())
                    .unwrap_or(now)
                    .to_string();
                json!({"type": kind, "status": status, "reason": reason, "message": message,
                       "observedGeneration": generation, "lastTransitionTime": since})
            };
            json!({
                "parentRef": parent_ref,
                "controllerName": CONTROLLER,
                "conditions": [condition(accepted.clone()), condition(resolved.clone())],
            })
        })
        .collect()
}

type Condition = (&'static str, bool, &'static str, String);

/// `Accepted` and `ResolvedRefs` for a route kept out by `problem`, or applied.
fn conditions(problem: Option<&str>) -> (Condition, Condition) {
    let resolved_ok = ("ResolvedRefs", true, "ResolvedRefs", "every backend is a known Service".to_string());
    let Some(p) = problem else {
        return (("Accepted", true, "Accepted", "applied to the Service's clients".into()), resolved_ok);
    };
    let why = format!("not applied: {p}");
    if p.contains("parentRefs") {
        (("Accepted", false, "NoMatchingParent", why), resolved_ok)
    } else if p.contains("backendRefs") {
        let reason = if p.contains("only Services") { "InvalidKind" } else { "BackendNotFound" };
        (("Accepted", false, "UnsupportedValue", why.clone()), ("ResolvedRefs", false, reason, why))
    } else {
        (("Accepted", false, "UnsupportedValue", why), resolved_ok)
    }
}

/// The parent as the route names it, with only the fields it sets.
fn parent_json(p: &ParentRef) -> Value {
    let mut v = json!({"group": p.group.clone().unwrap_or_default(), "kind": "Service", "name": p.name});
    if let Some(ns) = &p.namespace {
        v["namespace"] = json!(ns);
    }
    if let Some(port) = p.port {
        v["port"] = json!(port);
    }
    v
}

/// Whether two lists of this controller's entries say the same, times aside.
fn same(a: &[&Value], b: &[Value]) -> bool {
    let strip = |e: &Value| {
        let mut e = e.clone();
        for c in e["conditions"].as_array_mut().into_iter().flatten() {
            c.as_object_mut().map(|c| c.remove("lastTransitionTime"));
        }
        e
    };
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| strip(x) == strip(y))
}

/// Writes the status of every route whose entries differ from what it holds.
pub async fn write(
    client: &Client,
    http: &[std::sync::Arc<HTTPRoute>],
    grpc: &[std::sync::Arc<GRPCRoute>],
    problems: &[Problem],
) {
    let now = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let routes = http
        .iter()
        .map(|r| ("HTTPRoute", &r.metadata, &r.spec.parent_refs, r.status.as_ref()))
        .chain(grpc.iter().map(|r| ("GRPCRoute", &r.metadata, &r.spec.parent_refs, r.status.as_ref())));
    for (kind, meta, parents, old) in routes {
        let wanted = entries(kind, meta, parents, problems, old, &now);
        let ns = meta.namespace.as_deref().unwrap_or("");
        match kind {
            "HTTPRoute" => {
                patch(&Api::<HTTPRoute>::namespaced(client.clone(), ns), kind, meta, old, wanted).await
            }
            _ => patch(&Api::<GRPCRoute>::namespaced(client.clone(), ns), kind, meta, old, wanted).await,
        }
    }
}

async fn patch<K>(api: &Api<K>, kind: &str, meta: &ObjectMeta, old: Option<&RouteStatus>, wanted: Vec<Value>)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let held: Vec<&Value> = old
        .map(|s| s.parents.iter().filter(|p| p["controllerName"] == CONTROLLER).collect())
        .unwrap_or_default();
    if same(&held, &wanted) {
        return;
    }
    let others = old
        .map(|s| s.parents.iter().filter(|p| p["controllerName"] != CONTROLLER).cloned().collect::<Vec<_>>())
        .unwrap_or_default();
    let name = meta.name.as_deref().unwrap_or("");
    let body = json!({
        // A precondition: another writer's change since our read fails this one (409),
        // and the watch brings the object back for another round.
        "metadata": {"resourceVersion": meta.resource_version},
        "status": {"parents": others.into_iter().chain(wanted).collect::<Vec<_>>()},
    });
    match api.patch_status(name, &PatchParams::default(), &kube::api::Patch::Merge(&body)).await {
        Ok(_) => tracing::debug!("{kind} {}/{name}: status written", meta.namespace.as_deref().unwrap_or("")),
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
        Err(e) => tracing::warn!(
            "cannot write the status of {kind} {}/{name}: {e} (the control plane needs patch on {}/status)",
            meta.namespace.as_deref().unwrap_or(""),
            if kind == "HTTPRoute" { "httproutes" } else { "grpcroutes" }
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ObjectMeta {
        ObjectMeta {
            name: Some("canary".into()),
            namespace: Some("shop".into()),
            generation: Some(3),
            ..ObjectMeta::default()
        }
    }

    fn service(name: &str) -> ParentRef {
        ParentRef {
            kind: Some("Service".into()),
            group: Some(String::new()),
            name: name.into(),
            ..ParentRef::default()
        }
    }

    #[test]
    fn entries_per_service_parent_with_reasons_and_kept_times() {
        let gateway = ParentRef {
            kind: Some("Gateway".into()),
            group: Some("gateway.networking.k8s.io".into()),
            name: "gw".into(),
            ..ParentRef::default()
        };
        let parents = [service("words"), gateway];
        let ok = entries("HTTPRoute", &meta(), &parents, &[], None, "2026-11-30T20:00:00Z");
        assert_eq!(ok.len(), 1, "the Gateway's parent is not the mesh's");
        assert_eq!(ok[0]["parentRef"], json!({"group": "", "kind": "Service", "name": "words"}));
        assert_eq!(ok[0]["conditions"][0]["status"], "True");
        assert_eq!(ok[0]["conditions"][0]["observedGeneration"], 3);
        let problem =
            "HTTPRoute shop/canary: spec.rules[0].backendRefs[1]: no Service shop/words-v3".to_string();
        let old = RouteStatus { parents: ok.clone() };
        let bad = entries("HTTPRoute", &meta(), &parents, &[problem], Some(&old), "2026-11-30T21:00:00Z");
        let c = &bad[0]["conditions"];
        assert_eq!(
            (c[0]["status"].as_str(), c[0]["reason"].as_str()),
            (Some("False"), Some("UnsupportedValue"))
        );
        assert_eq!(
            (c[1]["status"].as_str(), c[1]["reason"].as_str()),
            (Some("False"), Some("BackendNotFound"))
        );
        assert!(c[1]["message"].as_str().unwrap().contains("no Service shop/words-v3"));
        // Accepted changed: a new time; nothing changed: the old time, and no write.
        assert_eq!(c[0]["lastTransitionTime"], "2026-11-30T21:00:00Z");
        let again = entries("HTTPRoute", &meta(), &parents, &[], Some(&old), "2026-11-30T22:00:00Z");
        assert_eq!(again[0]["conditions"][0]["lastTransitionTime"], "2026-11-30T20:00:00Z");
        assert!(same(&old.parents.iter().collect::<Vec<_>>(), &again));
        assert!(!same(&old.parents.iter().collect::<Vec<_>>(), &bad));
        let parent = "HTTPRoute shop/canary: spec.parentRefs[0]: no Service shop/words".to_string();
        let orphan = entries("HTTPRoute", &meta(), &parents, &[parent], None, "2026-11-30T20:00:00Z");
        assert_eq!(orphan[0]["conditions"][0]["reason"], "NoMatchingParent");
        assert_eq!(orphan[0]["conditions"][1]["status"], "True");
    }
}
