//! The install manifests in k8s/: each kustomization renders (with `kubectl kustomize`
//! where kubectl is installed, else by following its `resources` lists, which is all
//! these use), and every object validates strictly against the Kubernetes 1.29 and 1.37
//! schemas (custom resources are checked by the control plane's own tests, against its
//! types). No cluster runs here.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn k8s() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../k8s")
}

/// The YAML a kustomization renders to.
fn render(dir: &Path) -> String {
    if let Ok(out) = Command::new("kubectl").arg("kustomize").arg(dir).output() {
        assert!(
            out.status.success(),
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        return String::from_utf8(out.stdout).unwrap();
    }
    let text = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    let mut docs = Vec::new();
    if text.contains("configMapGenerator:") {
        docs.push(config_map(dir, &text));
    }
    let mut in_resources = false;
    for line in text.lines() {
        if !line.starts_with(' ') && !line.starts_with('-') {
            in_resources = line.starts_with("resources:");
            continue;
        }
        let Some(item) = line.trim().strip_prefix("- ").filter(|_| in_resources) else { continue };
        let path = dir.join(item.trim());
        if path.is_dir() {
            docs.push(render(&path));
        } else {
            docs.push(std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
        }
    }
    docs.join("\n---\n")
}

/// The ConfigMap a `configMapGenerator` (one, with `files`) makes, as JSON.
fn config_map(dir: &Path, text: &str) -> String {
    let field = |key: &str| {
        text.lines().find_map(|l| l.trim().strip_prefix(key)).map(|v| v.trim().trim_matches('"').to_string())
    };
    let files: Vec<String> = text
        .lines()
        .skip_while(|l| !l.trim().starts_with("files:"))
        .skip(1)
        .map_while(|l| l.trim().strip_prefix("- ").map(str::to_string))
        .collect();
    let data: serde_json::Map<String, serde_json::Value> = files
        .iter()
        .map(|f| (f.clone(), serde_json::Value::String(std::fs::read_to_string(dir.join(f)).unwrap())))
        .collect();
    serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": field("- name:").unwrap(), "namespace": field("namespace:")}, "data": data})
    .to_string()
}

#[test]
fn every_kustomization_renders_and_validates_against_kubernetes_1_29_and_1_37() {
    let dir = std::env::temp_dir().join(format!("weft-manifests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for (name, path) in
        [("base", k8s()), ("jaeger", k8s().join("addons/jaeger")), ("demo", k8s().join("examples/demo"))]
    {
        let rendered = render(&path);
        assert!(rendered.contains("kind:") || rendered.contains("\"kind\""), "{name} rendered nothing");
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, rendered).unwrap();
        files.push(file);
    }
    // `weft install`'s output, as `weft install | kubectl apply -f -` applies it.
    let out = Command::new(weft_e2e::bin("weft")).arg("install").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let install = String::from_utf8(out.stdout).unwrap();
    assert!(install.contains("kind: Secret") && install.contains("BEGIN CERTIFICATE"));
    let file = dir.join("install.yaml");
    std::fs::write(&file, install).unwrap();
    files.push(file);
    let base = std::fs::read_to_string(&files[0]).unwrap();
    for kind in [
        "Namespace",
        "CustomResourceDefinition",
        "ClusterRole",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "MutatingWebhookConfiguration",
    ] {
        assert!(base.contains(&format!("kind: {kind}")), "the base has no {kind}");
    }
    // The webhook can never block the cluster.
    assert!(base.contains("failurePolicy: Ignore") && base.contains("timeoutSeconds: 10"));
    let webhook = &base[base.find("kind: MutatingWebhookConfiguration").unwrap()..];
    assert!(webhook.contains("NotIn"), "{webhook}");
    for ns in ["kube-system", "kube-public", "kube-node-lease", "weft"] {
        assert!(webhook.contains(ns), "the webhook does not exclude {ns}");
    }
    for version in ["1.29", "1.37"] {
        let out = Command::new(weft_e2e::python().with_file_name("kubernetes-validate"))
            .args(["--strict", "--quiet", "-k", version])
            .args(&files)
            .output()
            .unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        // Custom resources only warn (no schema); everything else must pass.
        assert!(out.status.success() && !text.contains("ERROR"), "Kubernetes {version}:\n{text}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
