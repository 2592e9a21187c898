//! The pods of manifests: a Pod, the pod template of a Deployment, StatefulSet,
//! DaemonSet, ReplicaSet, ReplicationController or Job, the job template's of a CronJob,
//! the items of a List; several YAML documents in one text. Everything else passes
//! through unchanged, in its order (comments are not kept).

use serde::Deserialize;
use serde_json::Value;

use super::{Config, Invalid, Outcome};

/// What happened to one pod of a manifest.
#[derive(Debug)]
pub struct Report {
    /// `Kind namespace/name` of the object that holds the pod.
    pub object: String,
    pub outcome: Outcome,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("document {doc}: not YAML: {msg}")]
    Syntax { doc: usize, msg: String },
    #[error("document {doc} ({object}): {source}")]
    Invalid {
        doc: usize,
        object: String,
        #[source]
        source: Invalid,
    },
}

/// Injects every pod of the YAML documents in `text`; the documents come back in order.
pub fn inject_yaml(text: &str, cfg: &Config) -> Result<(String, Vec<Report>), Error> {
    let mut out = Vec::new();
    let mut reports = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let doc_no = i + 1;
        let mut value =
            Value::deserialize(doc).map_err(|e| Error::Syntax { doc: doc_no, msg: e.to_string() })?;
        if value.is_null() {
            continue;
        }
        inject_object(&mut value, cfg, &mut reports).map_err(|(object, source)| Error::Invalid {
            doc: doc_no,
            object,
            source,
        })?;
        out.push(
            serde_yaml_ng::to_string(&value)
                .map_err(|e| Error::Syntax { doc: doc_no, msg: e.to_string() })?,
        );
    }
    Ok((out.join("---\n"), reports))
}

/// Injects the pod(s) an object holds.
pub fn inject_object(
    obj: &mut Value,
    cfg: &Config,
    reports: &mut Vec<Report>,
) -> Result<(), (String, Invalid)> {
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("").to_string();
    if kind == "List" || kind.ends_with("List") {
        if let Some(items) = obj.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                inject_object(item, cfg, reports)?;
            }
        }
        return Ok(());
    }
    let namespace = obj.pointer("/metadata/namespace").and_then(Value::as_str).map(str::to_string);
    let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_string();
    let object =
        format!("{kind} {}{name}", namespace.as_deref().map(|n| format!("{n}/")).unwrap_or_default());
    let pointer = match kind.as_str() {
        "Pod" => "",
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "ReplicationController" | "Job" => {
            "/spec/template"
        }
        "CronJob" => "/spec/jobTemplate/spec/template",
        _ => return Ok(()),
    };
    let Some(pod) = obj.pointer_mut(pointer) else { return Ok(()) };
    let outcome = super::pod(pod, namespace.as_deref(), true, cfg).map_err(|e| (object.clone(), e))?;
    reports.push(Report { object, outcome });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::Skip;

    fn cfg() -> Config {
        Config {
            proxy_image: "ghcr.io/weft-mesh/weft-proxy:test".into(),
            version: "test".into(),
            ..Config::default()
        }
    }

    /// testdata/inject/<name>.yaml → <name>.injected.yaml, for every workload kind;
    /// `WEFT_UPDATE_GOLDEN=1 cargo test -p weft-control golden` rewrites the outputs.
    /// Injecting an injected manifest changes nothing.
    #[test]
    fn golden_manifests_and_idempotence() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/inject");
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.extension().is_some_and(|e| e == "yaml") && !p.to_string_lossy().ends_with(".injected.yaml")
            })
            .collect();
        inputs.sort();
        assert!(inputs.len() >= 9, "{inputs:?}");
        for input in inputs {
            let (out, reports) = inject_yaml(&std::fs::read_to_string(&input).unwrap(), &cfg()).unwrap();
            let golden = input.with_extension("injected.yaml");
            if std::env::var_os("WEFT_UPDATE_GOLDEN").is_some() {
                std::fs::write(&golden, &out).unwrap();
            }
            let want = std::fs::read_to_string(&golden).unwrap_or_default();
            assert!(
                out == want,
                "{} differs from {}; run WEFT_UPDATE_GOLDEN=1 cargo test -p weft-control golden",
                input.display(),
                golden.display()
            );
            assert!(!reports.is_empty(), "{}: no pod found", input.display());
            let (again, reports) = inject_yaml(&out, &cfg()).unwrap();
            assert_eq!(again, out, "{}: injecting twice differs from once", input.display());
            assert!(reports.iter().all(|r| r.outcome != Outcome::Injected), "{reports:?}");
        }
    }

    fn pod_of(out: &str) -> Value {
        let v: Value = serde_yaml_ng::from_str(out).unwrap();
        v.pointer("/spec/template/spec").or(v.get("spec")).cloned().unwrap()
    }

    #[test]
    fn the_meshed_pod_is_ordered_and_locked_down() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/inject/deployment.yaml"))
                .unwrap();
        let (out, _) = inject_yaml(&text, &cfg()).unwrap();
        let spec = pod_of(&out);
        let inits = spec["initContainers"].as_array().unwrap();
        let names: Vec<&str> = inits.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            ["weft-init", "weft-proxy", "migrate"],
            "the proxy starts before the pod's own init containers"
        );
        let (init, proxy) = (&inits[0], &inits[1]);
        assert_eq!(
            init["securityContext"]["capabilities"]["add"],
            serde_json::json!(["NET_ADMIN", "NET_RAW"])
        );
        assert_eq!(proxy["restartPolicy"], "Always");
        assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(proxy["securityContext"]["runAsUser"], 2102);
        assert_eq!(proxy["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(proxy["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]));
        let env: std::collections::BTreeMap<&str, &str> = proxy["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?)))
            .collect();
        assert_eq!(env["WEFT_INBOUND_PORTS"], "8080");
        assert_eq!(env["WEFT_OPAQUE_PORTS"], "5432,6379");
        assert_eq!(env["WEFT_DEFAULT_INBOUND_POLICY"], "strict");
        assert_eq!(env["OTEL_TRACES_SAMPLER_ARG"], "0.25");
        assert_eq!(env["WEFT_TOKEN_FILE"], "/var/run/secrets/weft.dev/serviceaccount/token");
        assert_eq!(proxy["resources"]["limits"]["cpu"], "1");
        let token = spec["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "weft-token").unwrap();
        assert_eq!(token["projected"]["sources"][0]["serviceAccountToken"]["audience"], "weft");
        // The pod's own volume is still there, first.
        assert_eq!(spec["volumes"][0]["name"], "cache");
    }

    #[test]
    fn skips_say_why_and_bad_settings_name_the_annotation() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/inject/skipped.yaml"))
                .unwrap();
        let (_, reports) = inject_yaml(&text, &cfg()).unwrap();
        let outcomes: Vec<_> = reports.iter().map(|r| r.outcome.clone()).collect();
        assert_eq!(
            outcomes,
            [Skip::OptedOut, Skip::HostNetwork, Skip::ControlPlane].map(Outcome::Skipped).to_vec()
        );
        let bad = |annotation: &str| {
            let text = format!(
                "kind: Pod\nmetadata: {{name: p, annotations: {{{annotation}}}}}\nspec: {{containers: [{{name: a}}]}}\n"
            );
            inject_yaml(&text, &cfg()).unwrap_err().to_string()
        };
        let e = bad("weft.dev/opaque-ports: \"5432,db\"");
        assert!(e.contains("document 1 (Pod p)") && e.contains("weft.dev/opaque-ports"), "{e}");
        let e = bad("weft.dev/proxy-memory-limit: lots");
        assert!(e.contains("weft.dev/proxy-memory-limit") && e.contains("64Mi"), "{e}");
        let e = bad("weft.dev/default-inbound-policy: allow");
        assert!(e.contains("deny, strict or permissive"), "{e}");
        let e = bad("weft.dev/trace-sampling: \"2\"");
        assert!(e.contains("trace-sampling"), "{e}");
        let e = inject_yaml("kind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n", &cfg())
            .unwrap_err()
            .to_string();
        assert!(e.contains("spec.containers"), "{e}");
        let e = inject_yaml("kind: Pod\n  bad: [", &cfg()).unwrap_err().to_string();
        assert!(e.contains("document 1") && e.contains("not YAML"), "{e}");
    }
}
