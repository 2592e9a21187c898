//! `weft check` against a fake Kubernetes API server (no cluster runs here; the fake
//! speaks the API's list, get, version, SelfSubjectAccessReview and the proxy to a pod's
//! port as the real one does) and a real `weft control --source kubernetes` with its
//! webhook, whose replicas the check reaches through that proxy: it passes on a healthy
//! mesh and names the problem, with what to do, on an expired trust root, a missing CRD,
//! a proxy without a certificate, a replica whose webhook does not answer and a cluster
//! too old.

use std::process::Command;

use base64::Engine;
use serde_json::{json, Value};
use weft_e2e::{control::Control, kube::FakeApi, log_field};

struct Mesh {
    api: FakeApi,
    _control: Control,
}

/// What `weft install` and a running mesh leave in the cluster, with one real replica of
/// the control plane (webhook on) behind the pod `weft/weft-control-0`.
fn healthy() -> Mesh {
    let api = FakeApi::start();
    let root = api.identity_secret();
    let bundle = base64::engine::general_purpose::STANDARD.encode(&root);
    api.apply(json!({"kind": "MutatingWebhookConfiguration", "metadata": {"name": "weft-injector"},
        "webhooks": [{"name": "inject.weft.dev", "clientConfig": {"caBundle": bundle,
                      "service": {"name": "weft-control", "namespace": "weft", "path": "/inject"}}}]}));
    let control = Control::kubernetes(&api, &["--webhook-addr", "127.0.0.1:0"]);
    let line = control.logs().lines().find(|l| l.contains("webhook=")).unwrap().to_string();
    let webhook = log_field(&line, "webhook").unwrap();
    api.apply(replica("weft-control-0", webhook.port(), control.admin.port()));
    api.apply(json!({"kind": "EndpointSlice",
        "metadata": {"name": "weft-control-x", "namespace": "weft", "labels": {"kubernetes.io/service-name": "weft-control"}},
        "addressType": "IPv4", "ports": [{"name": "webhook", "port": 8443}],
        "endpoints": [{"addresses": ["10.0.0.2"], "conditions": {"ready": true}}]}));
    api.apply(pod("shop", "web-0", json!({"app": "web"}), "weft-proxy", true));
    Mesh { api, _control: control }
}

/// A control-plane pod at 127.0.0.1 whose named ports are the running replica's.
fn replica(name: &str, webhook: u16, admin: u16) -> Value {
    let mut p = pod("weft", name, json!({"app.kubernetes.io/name": "weft-control"}), "weft", true);
    p["spec"]["containers"][0]["ports"] =
        json!([{"name": "webhook", "containerPort": webhook}, {"name": "admin", "containerPort": admin}]);
    p["status"]["podIP"] = json!("127.0.0.1");
    p
}

fn pod(ns: &str, name: &str, labels: Value, container: &str, ready: bool) -> Value {
    json!({"kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
           "spec": {"containers": [{"name": "app"}], "initContainers": [{"name": container, "restartPolicy": "Always"}]},
           "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                      "initContainerStatuses": [{"name": container, "ready": ready, "restartCount": 0, "image": "x", "imageID": ""}]}})
}

fn check(api: &FakeApi, args: &[&str]) -> (bool, String) {
    let out = Command::new(weft_e2e::bin("weft"))
        .arg("check")
        .args(args)
        .env("KUBECONFIG", api.kubeconfig())
        .output()
        .unwrap();
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
fn a_healthy_mesh_passes() {
    let Mesh { api, _control } = healthy();
    // A route the mesh cannot take (a pattern that does not compile): a warning, from
    // the status the control plane writes; the good one beside it is not named.
    api.apply(json!({"kind": "Service", "metadata": {"name": "words", "namespace": "shop"},
                     "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}}));
    for (name, path) in [
        ("good", json!({"type": "PathPrefix", "value": "/"})),
        ("bad", json!({"type": "RegularExpression", "value": "/x("})),
    ] {
        api.apply(json!({"kind": "HTTPRoute", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"parentRefs": [{"kind": "Service", "name": "words", "port": 80}],
                     "rules": [{"matches": [{"path": path}]}]}}));
    }
    weft_e2e::eventually(std::time::Duration::from_secs(10), "the routes' status", || {
        let written =
            |n: &str| api.get("HTTPRoute", "shop", n).is_some_and(|r| r["status"]["parents"].is_array());
        (written("good") && written("bad")).then_some(())
    });
    let (ok, out) = check(&api, &[]);
    assert!(out.contains("‼ HTTPRoute shop/bad is not applied by the mesh (UnsupportedValue)"), "{out}");
    assert!(out.contains("path.regex") && !out.contains("shop/good"), "{out}");
    assert!(ok, "{out}");
    for line in [
        "√ Kubernetes 1.33",
        "√ Weft's CRDs",
        "√ the trust root",
        "√ the control plane is ready (1 replica)",
        "√ the injector's webhook",
        "√ the injector's webhook answers on weft/weft-control-0",
        "√ the webhook's certificate on weft/weft-control-0",
        "√ every meshed pod's proxy is ready with a certificate (1)",
    ] {
        assert!(out.contains(line), "no {line:?} in:\n{out}");
    }
    let (ok, out) = check(&api, &["--pre"]);
    assert!(ok && out.contains("√ may create customresourcedefinitions"), "{out}");
}

#[test]
fn problems_are_named_with_what_to_do() {
    let mesh = healthy();
    let api = &mesh.api;
    // A proxy without a certificate: its container is not ready.
    api.apply(pod("shop", "web-1", json!({"app": "web"}), "weft-proxy", false));
    // A second replica whose webhook and admin port do not answer.
    api.apply(replica("weft-control-1", 1, 1));
    let (ok, out) = check(api, &[]);
    assert!(
        !ok && out.contains("1 meshed pod(s) not ready: shop/web-1") && out.contains("kubectl logs"),
        "{out}"
    );
    assert!(out.contains("√ the injector's webhook answers on weft/weft-control-0"), "{out}");
    assert!(
        out.contains("× the injector's webhook answers on weft/weft-control-1")
            && out.contains("pods are created without sidecars meanwhile")
            && out.contains("× the webhook's certificate on weft/weft-control-1"),
        "{out}"
    );

    drop(mesh);

    // An expired trust root.
    let Mesh { api, _control } = healthy();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let cert = params.self_signed(&key).unwrap();
    api.apply(json!({"kind": "Secret", "metadata": {"name": "weft-identity", "namespace": "weft"},
                     "stringData": {"tls.crt": cert.pem(), "tls.key": key.serialize_pem()}}));
    let (ok, out) = check(&api, &[]);
    assert!(!ok && out.contains("EXPIRED") && out.contains("rotate the root"), "{out}");
    // The webhook's caBundle no longer matches the root either.
    assert!(out.contains("caBundle"), "{out}");

    // A missing CRD.
    let Mesh { api, _control } = healthy();
    api.without("inboundpolicies");
    let (ok, out) = check(&api, &[]);
    assert!(!ok && out.contains("× Weft's CRDs") && out.contains("kubectl apply -f k8s/crds/"), "{out}");

    // Too old a cluster, and no rights, before the install.
    let Mesh { api, _control } = healthy();
    api.version(28);
    api.allow_token_reviews(false);
    let (ok, out) = check(&api, &["--pre"]);
    assert!(!ok && out.contains("1.29 or newer") && out.contains("× may create namespaces"), "{out}");
}
