//! Sidecar injection checked as Kubernetes would: `weft inject`'s output for every
//! workload kind validates against the Kubernetes 1.29 and 1.37 schemas (PyPI
//! `kubernetes-validate`, strict: unknown fields refused), and the admission webhook
//! answers real AdmissionReview requests over HTTPS. No cluster runs here; the schemas
//! and the fake API server stand in for one.

use std::{path::PathBuf, process::Command};

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../control-plane/testdata/inject")
}

/// Validates manifests with the Kubernetes schemas of `version`, strictly.
pub fn kubernetes_validate(version: &str, files: &[PathBuf]) -> Result<(), String> {
    let validator = weft_e2e::python().with_file_name("kubernetes-validate");
    let out = Command::new(validator)
        .args(["--strict", "--quiet", "-k", version])
        .args(files)
        .output()
        .expect("kubernetes-validate runs (tests/run installs it in the test venv)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() && !text.contains("ERROR") {
        Ok(())
    } else {
        Err(text)
    }
}

#[test]
fn weft_inject_output_validates_against_kubernetes_1_29_and_1_37() {
    let dir = std::env::temp_dir().join(format!("weft-inject-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for entry in std::fs::read_dir(testdata()).unwrap() {
        let input = entry.unwrap().path();
        let name = input.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".yaml") || name.ends_with(".injected.yaml") {
            continue;
        }
        // The real binary, as a user runs it.
        let out = Command::new(weft_e2e::bin("weft")).arg("inject").arg(&input).output().unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        // kubernetes-validate needs a name, which a generateName pod lacks until created.
        let text = String::from_utf8(out.stdout).unwrap().replace("generateName: words-", "name: words-x1");
        let path = dir.join(&name);
        std::fs::write(&path, text).unwrap();
        files.push(path);
    }
    assert!(files.len() >= 9, "{files:?}");
    for version in ["1.29", "1.37"] {
        kubernetes_validate(version, &files).unwrap_or_else(|e| panic!("Kubernetes {version}: {e}"));
    }
    // From stdin too, with the report on stderr.
    let mut child = Command::new(weft_e2e::bin("weft"))
        .args(["inject", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&std::fs::read(testdata().join("job.yaml")).unwrap()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("Job report: injected"), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("restartPolicy: Always"));
    let _ = std::fs::remove_dir_all(dir);
}

mod webhook {
    use base64::Engine;
    use serde_json::{json, Value};
    use weft_e2e::{control::Control, kube::FakeApi, log_field};

    struct Hook {
        _api: FakeApi,
        control: Control,
        addr: std::net::SocketAddr,
        ca: std::path::PathBuf,
    }

    /// The control plane with its webhook, against a fake API server (no cluster here)
    /// holding an opted-in namespace `shop`, a plain one and the webhook configuration.
    fn start() -> Hook {
        let api = FakeApi::start();
        let root = api.identity_secret();
        api.apply(json!({"kind": "Namespace", "metadata": {"name": "shop", "labels": {"weft.dev/inject": "enabled"}}}));
        api.apply(json!({"kind": "Namespace", "metadata": {"name": "plain"}}));
        api.apply(json!({"kind": "MutatingWebhookConfiguration", "metadata": {"name": "weft-injector"},
            "webhooks": [{"name": "inject.weft.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                          "clientConfig": {"service": {"name": "weft-control", "namespace": "weft", "path": "/inject", "port": 8443}}}]}));
        let control =
            Control::kubernetes(&api, &["--webhook-addr", "127.0.0.1:0", "--proxy-image", "weft-proxy:test"]);
        let line = control
            .logs()
            .lines()
            .find(|l| l.contains("listening") && l.contains("webhook="))
            .unwrap()
            .to_string();
        let addr = log_field(&line, "webhook").unwrap();
        // The control plane set the configuration's caBundle to the mesh's root.
        let config = api.get("MutatingWebhookConfiguration", "", "weft-injector").unwrap();
        let bundle = config["webhooks"][0]["clientConfig"]["caBundle"].as_str().unwrap();
        let bundle =
            String::from_utf8(base64::engine::general_purpose::STANDARD.decode(bundle).unwrap()).unwrap();
        assert_eq!(bundle.trim(), root.trim());
        let ca =
            std::env::temp_dir().join(format!("weft-webhook-ca-{}-{}.pem", std::process::id(), addr.port()));
        std::fs::write(&ca, root).unwrap();
        Hook { _api: api, control, addr, ca }
    }

    fn pod(ns: &str, meta: Value, spec: Value) -> Value {
        let mut meta = meta;
        meta["namespace"] = json!(ns);
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec})
    }

    fn app() -> Value {
        json!({"containers": [{"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}]}]})
    }

    /// Sends an AdmissionReview for creating `pod` over HTTPS, verifying the webhook's
    /// certificate against the mesh's root under the Service's DNS name; the response.
    fn review(hook: &Hook, pod: &Value) -> Value {
        let ns = pod["metadata"]["namespace"].as_str().unwrap();
        let body = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": pod["metadata"]["name"].as_str().unwrap_or(""),
            "namespace": ns, "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod, "oldObject": null, "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}}});
        let host = "weft-control.weft.svc";
        let resolve = format!("{host}:{}:127.0.0.1", hook.addr.port());
        let url = format!("https://{host}:{}/inject", hook.addr.port());
        let (code, out, err) = weft_e2e::curl(&[
            "--cacert",
            hook.ca.to_str().unwrap(),
            "--resolve",
            &resolve,
            "-H",
            "content-type: application/json",
            "-d",
            &body.to_string(),
            &url,
        ]);
        assert_eq!(code, 200, "{out} {err}\n{}", hook.control.logs());
        let review: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(review["response"]["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        review["response"].clone()
    }

    /// The pod after the response's JSONPatch.
    fn patched(pod: &Value, response: &Value) -> Option<Value> {
        let patch = response["patch"].as_str()?;
        assert_eq!(response["patchType"], "JSONPatch");
        let ops: json_patch::Patch =
            serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(patch).unwrap())
                .unwrap();
        let mut out = pod.clone();
        json_patch::patch(&mut out, &ops).unwrap();
        Some(out)
    }

    fn init_names(pod: &Value) -> Vec<String> {
        pod["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn admission_reviews_over_https_inject_exactly_the_pods_that_ask() {
        let hook = start();
        // Opted in by its namespace; a generateName pod with its own init container.
        let own_init = json!({"initContainers": [{"name": "migrate", "image": "app:1"}],
                              "containers": [{"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}]}]});
        let p = pod("shop", json!({"generateName": "web-", "labels": {"app": "web"}}), own_init);
        let rsp = review(&hook, &p);
        assert_eq!(rsp["allowed"], true);
        let meshed = patched(&p, &rsp).unwrap_or_else(|| panic!("no patch: {rsp}\n{}", hook.control.logs()));
        assert_eq!(init_names(&meshed), ["weft-init", "weft-proxy", "migrate"]);
        let proxy = &meshed["spec"]["initContainers"][1];
        assert_eq!(
            (proxy["restartPolicy"].as_str(), proxy["image"].as_str()),
            (Some("Always"), Some("weft-proxy:test"))
        );
        assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(proxy["securityContext"]["runAsUser"], 2102);
        assert!(meshed["spec"]["volumes"].as_array().unwrap().iter().any(|v| v["name"] == "weft-token"));
        assert_eq!(meshed["metadata"]["annotations"]["weft.dev/proxy-version"], env!("CARGO_PKG_VERSION"));
        // The result is a valid Pod for Kubernetes 1.29 and 1.37.
        let mut named = meshed.clone();
        named["metadata"]["name"] = json!("web-x1");
        let file = std::env::temp_dir().join(format!("weft-webhook-pod-{}.json", std::process::id()));
        std::fs::write(&file, named.to_string()).unwrap();
        for version in ["1.29", "1.37"] {
            super::kubernetes_validate(version, std::slice::from_ref(&file))
                .unwrap_or_else(|e| panic!("{version}: {e}"));
        }
        // Injecting it again: nothing to do.
        assert!(patched(&meshed, &review(&hook, &meshed)).is_none());

        // Opted in by the pod itself, in a plain namespace.
        let p = pod("plain", json!({"name": "a", "annotations": {"weft.dev/inject": "enabled"}}), app());
        assert!(patched(&p, &review(&hook, &p)).is_some());
        // Left alone: not asked, opted out, host network, the control plane's namespace.
        for p in [
            pod("plain", json!({"name": "b"}), app()),
            pod("shop", json!({"name": "c", "annotations": {"weft.dev/inject": "disabled"}}), app()),
            pod(
                "shop",
                json!({"name": "d"}),
                json!({"hostNetwork": true, "containers": [{"name": "agent"}]}),
            ),
            pod("weft", json!({"name": "e", "annotations": {"weft.dev/inject": "enabled"}}), app()),
        ] {
            let rsp = review(&hook, &p);
            assert_eq!(rsp["allowed"], true, "{rsp}");
            assert!(patched(&p, &rsp).is_none(), "{} was injected", p["metadata"]["name"]);
        }
        // A setting that cannot work: refused with the annotation named.
        let p =
            pod("shop", json!({"name": "f", "annotations": {"weft.dev/proxy-memory-limit": "lots"}}), app());
        let rsp = review(&hook, &p);
        assert_eq!(rsp["allowed"], false);
        let msg = rsp["status"]["message"].as_str().unwrap();
        assert!(msg.contains("weft.dev/proxy-memory-limit") && msg.contains("64Mi"), "{msg}");
    }

    #[test]
    fn the_webhook_refuses_what_is_not_an_admission_review_and_checks_its_name() {
        let hook = start();
        let host = "weft-control.weft.svc";
        let resolve = format!("{host}:{}:127.0.0.1", hook.addr.port());
        let url = format!("https://{host}:{}/inject", hook.addr.port());
        let ca = hook.ca.to_str().unwrap();
        let (code, out, _) =
            weft_e2e::curl(&["--cacert", ca, "--resolve", &resolve, "-d", "{\"kind\": 1", &url]);
        assert_eq!(code, 400, "{out}");
        assert!(out.contains("not an AdmissionReview"), "{out}");
        let (code, _, _) =
            weft_e2e::curl(&["--cacert", ca, "--resolve", &resolve, &url.replace("/inject", "/")]);
        assert_eq!(code, 404);
        // The certificate is for the Service's names only.
        let other = format!("evil.example:{}:127.0.0.1", hook.addr.port());
        let (code, _, err) = weft_e2e::curl(&[
            "--cacert",
            ca,
            "--resolve",
            &other,
            &format!("https://evil.example:{}/inject", hook.addr.port()),
        ]);
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("certificate") || err.contains("SSL"), "{err}");
    }

    /// The webhook configuration's caBundle, decoded.
    fn bundle_of(api: &FakeApi) -> Option<String> {
        let config = api.get("MutatingWebhookConfiguration", "", "weft-injector")?;
        let b = config["webhooks"][0]["clientConfig"]["caBundle"].as_str()?.to_string();
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).ok()?).ok()
    }

    #[test]
    fn a_webhook_configuration_applied_again_without_its_ca_bundle_gets_it_back() {
        let hook = start();
        let root = std::fs::read_to_string(&hook.ca).unwrap();
        // `kubectl replace` of the manifests (or an uninstall and install while the
        // control plane runs): the configuration comes back without a caBundle.
        hook._api.apply(json!({"kind": "MutatingWebhookConfiguration", "metadata": {"name": "weft-injector"},
            "webhooks": [{"name": "inject.weft.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                          "clientConfig": {"service": {"name": "weft-control", "namespace": "weft", "path": "/inject", "port": 8443}}}]}));
        weft_e2e::eventually(std::time::Duration::from_secs(10), "the caBundle set again", || {
            bundle_of(&hook._api).filter(|b| b.trim() == root.trim())
        });
        // Logged once the API server has answered the patch, which may be after the read above.
        weft_e2e::eventually(std::time::Duration::from_secs(10), "the second caBundle log line", || {
            (hook.control.logs().matches("caBundle set to the mesh's roots").count() >= 2).then_some(())
        });
    }

    #[test]
    fn a_new_root_in_the_secret_is_used_without_a_restart_and_a_broken_one_is_not() {
        let hook = start();
        let old = std::fs::read_to_string(&hook.ca).unwrap();
        let api = &hook._api;
        // A rotation's first step: a new signing root, the old one still trusted.
        let new = api.rotate_identity_secret(&old);
        weft_e2e::eventually(std::time::Duration::from_secs(10), "both roots in the caBundle", || {
            bundle_of(api).filter(|b| b.contains(old.trim()) && b.contains(new.trim()))
        });
        // The webhook's certificate now comes from the new root alone.
        let new_only = hook.ca.with_extension("new.pem");
        std::fs::write(&new_only, &new).unwrap();
        let host = "weft-control.weft.svc";
        let resolve = format!("{host}:{}:127.0.0.1", hook.addr.port());
        let url = format!("https://{host}:{}/", hook.addr.port());
        let answers_with = |root: &std::path::Path| {
            weft_e2e::curl(&["--cacert", root.to_str().unwrap(), "--resolve", &resolve, &url]).0 == 404
        };
        weft_e2e::eventually(std::time::Duration::from_secs(10), "a certificate from the new root", || {
            answers_with(&new_only).then_some(())
        });
        assert!(hook.control.logs().contains("CA root or trust bundle changed"));
        // A broken edit (a key that is not one) is refused; the new root keeps serving.
        api.apply(json!({"kind": "Secret", "metadata": {"name": "weft-identity", "namespace": "weft"},
                         "stringData": {"tls.crt": new, "tls.key": "not a key"}}));
        weft_e2e::eventually(std::time::Duration::from_secs(10), "the broken edit logged", || {
            hook.control.logs().contains("kept the last good root").then_some(())
        });
        assert!(answers_with(&new_only));
        assert!(bundle_of(api).is_some_and(|b| b.contains(new.trim())));
        let _ = std::fs::remove_file(new_only);
    }
}
