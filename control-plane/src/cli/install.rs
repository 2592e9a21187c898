//! `weft install` prints everything a cluster needs, so that
//! `weft install | kubectl apply -f -` is the whole install: the manifests of k8s/ (the
//! same files `kubectl apply -k k8s/` applies) and the CA's Secret with a freshly made
//! root, or one given as files. `weft uninstall` prints the same objects for
//! `kubectl delete -f -`.

use anyhow::Context;
use serde_json::json;

use crate::server::ca::Ca;

/// The manifests of k8s/, in the order they apply.
const MANIFESTS: [(&str, &str); 6] = [
    ("k8s/base/namespace.yaml", include_str!("../../../k8s/base/namespace.yaml")),
    (
        "k8s/crds/inboundpolicies.policy.weft.dev.yaml",
        include_str!("../../../k8s/crds/inboundpolicies.policy.weft.dev.yaml"),
    ),
    (
        "k8s/crds/trafficpolicies.policy.weft.dev.yaml",
        include_str!("../../../k8s/crds/trafficpolicies.policy.weft.dev.yaml"),
    ),
    ("k8s/base/rbac.yaml", include_str!("../../../k8s/base/rbac.yaml")),
    ("k8s/base/control-plane.yaml", include_str!("../../../k8s/base/control-plane.yaml")),
    ("k8s/base/webhook.yaml", include_str!("../../../k8s/base/webhook.yaml")),
];

/// Where the root comes from.
pub struct Root {
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
    pub trust_domain: String,
    /// A generated root's lifetime.
    pub days: i64,
}

/// The install manifests with the CA Secret (after the namespace, before the rest).
pub fn install(root: &Root) -> anyhow::Result<String> {
    let (cert, key) = match (&root.cert, &root.key) {
        (Some(c), Some(k)) => {
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
            };
            let (cert, key) = (read(c)?, read(k)?);
            // Refuse a pair that cannot sign, here rather than in the cluster.
            Ca::from_pem(&root.trust_domain, &cert, &key, "").context("--root-cert/--root-key")?;
            (cert, key)
        }
        (None, None) => Ca::new_root(&root.trust_domain, time::Duration::days(root.days))?,
        _ => anyhow::bail!("give both --root-cert and --root-key, or neither to generate a root"),
    };
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "weft-identity", "namespace": "weft", "labels": {"app.kubernetes.io/part-of": "weft"}},
        "stringData": {"tls.crt": cert, "tls.key": key},
    });
    let mut docs: Vec<String> = Vec::new();
    for (i, (path, text)) in MANIFESTS.iter().enumerate() {
        docs.push(format!("# {path}\n{}", text.trim_start_matches("---\n").trim_end()));
        if i == 0 {
            docs.push(format!(
                "# The CA root: the mesh's trust anchor; keep the key safe.\n{}",
                serde_yaml_ng::to_string(&secret)?.trim_end()
            ));
        }
    }
    Ok(docs.join("\n---\n") + "\n")
}

/// What `weft install` made, for `kubectl delete -f -` (the namespace takes the Secret).
pub fn uninstall() -> String {
    let docs: Vec<String> =
        MANIFESTS.iter().rev().map(|(path, text)| format!("# {path}\n{}", text.trim_end())).collect();
    docs.join("\n---\n") + "\n"
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    fn docs(text: &str) -> Vec<serde_json::Value> {
        serde_yaml_ng::Deserializer::from_str(text)
            .map(|d| serde_json::Value::deserialize(d).unwrap())
            .collect()
    }

    #[test]
    fn the_install_carries_a_root_the_control_plane_can_sign_with() {
        let root = Root { cert: None, key: None, trust_domain: "cluster.local".into(), days: 10 };
        let installed = docs(&install(&root).unwrap());
        let kinds: Vec<&str> = installed.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        assert_eq!(&kinds[..2], ["Namespace", "Secret"], "the namespace, then its Secret, first");
        assert!(kinds.contains(&"MutatingWebhookConfiguration") && kinds.contains(&"Deployment"));
        let secret = &installed[1];
        let (cert, key) = (
            secret["stringData"]["tls.crt"].as_str().unwrap(),
            secret["stringData"]["tls.key"].as_str().unwrap(),
        );
        let ca = Ca::from_pem("cluster.local", cert, key, "").unwrap();
        assert_eq!(ca.cert_pem(), cert);
        // A given root is used as given; half of one is refused.
        let dir = std::env::temp_dir().join(format!("weft-install-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("root.crt"), cert).unwrap();
        std::fs::write(dir.join("root.key"), key).unwrap();
        let given = Root { cert: Some(dir.join("root.crt")), key: Some(dir.join("root.key")), ..root };
        assert!(install(&given).unwrap().contains(cert.lines().nth(1).unwrap()));
        let half = Root { key: None, ..given };
        assert!(install(&half).unwrap_err().to_string().contains("--root-key"));
        let _ = std::fs::remove_dir_all(dir);
        // Uninstall: the same objects, the namespace last.
        let gone = docs(&uninstall());
        assert_eq!(gone.last().and_then(|d| d["kind"].as_str()), Some("Namespace"));
    }

    /// Images, users and ports agree between the Dockerfiles, the manifests and what the
    /// injector writes (no container engine runs here to build the images).
    #[test]
    fn dockerfiles_manifests_and_injector_agree() {
        let proxy_df = include_str!("../../../docker/weft-proxy.Dockerfile");
        let weft_df = include_str!("../../../docker/weft.Dockerfile");
        let control = include_str!("../../../k8s/base/control-plane.yaml");
        let demo = include_str!("../../../k8s/examples/demo/demo.yaml");
        let version = env!("CARGO_PKG_VERSION");
        let line = |df: &str, prefix: &str| {
            df.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix}")).to_string()
        };
        let exposed = |df: &str| -> Vec<u16> {
            line(df, "EXPOSE ").split_whitespace().skip(1).map(|p| p.parse().unwrap()).collect()
        };
        // The proxy image: its name, the injector's default, the control plane's flag.
        let injector = crate::inject::Config::default();
        assert!(proxy_df.starts_with("# ghcr.io/weft-mesh/weft-proxy:"));
        assert_eq!(injector.proxy_image, format!("ghcr.io/weft-mesh/weft-proxy:v{version}"));
        assert!(control.contains(&format!("--proxy-image={}", injector.proxy_image)), "{control}");
        let uid = crate::inject::PROXY_UID;
        assert_eq!(line(proxy_df, "USER "), format!("USER {uid}:{uid}"));
        let ports = exposed(proxy_df);
        for p in [crate::inject::ADMIN_PORT, crate::inject::INBOUND_PORT, 4140] {
            assert!(ports.contains(&p), "weft-proxy.Dockerfile does not expose {p}");
        }
        // The control plane's image, user and ports.
        assert!(weft_df.starts_with("# ghcr.io/weft-mesh/weft:"));
        let image = format!("image: ghcr.io/weft-mesh/weft:v{version}");
        assert!(control.contains(&image) && demo.contains(&image), "manifests must use {image}");
        let user = line(weft_df, "USER ");
        let uid = user.trim_start_matches("USER ").split(':').next().unwrap();
        assert!(control.contains(&format!("runAsUser: {uid}")), "the Deployment must run as {uid}");
        let ports = exposed(weft_df);
        for p in [8090, 8443, 9990] {
            assert!(ports.contains(&p), "weft.Dockerfile does not expose {p}");
            assert!(
                control.contains(&format!("containerPort: {p}")),
                "control-plane.yaml does not declare {p}"
            );
        }
    }
}
