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
