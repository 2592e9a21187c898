//! `weft check`: is the mesh installed and healthy, like `linkerd check`. Each check
//! prints a line, and a failure says what to do; the exit code is 0 only when none
//! failed (warnings do not fail). `--pre` checks a cluster before the install.

use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec},
    core::v1::{Pod, Secret},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{ListParams, PostParams},
    Api, Client,
};

use crate::{
    inject,
    server::kubernetes::{
        self,
        resources::{GRPCRoute, HTTPRoute, InboundPolicy, TrafficPolicy},
    },
};

/// Roots and certificates expiring sooner than this are warned about.
const SOON: time::Duration = time::Duration::days(30);
/// The oldest Kubernetes with native sidecars on by default.
const MIN_MINOR: u32 = 29;

#[derive(Default)]
struct Report {
    failed: usize,
    warned: usize,
}

impl Report {
    fn ok(&mut self, what: &str) {
        println!("√ {what}");
    }

    fn warn(&mut self, what: &str, hint: &str) {
        self.warned += 1;
        println!("‼ {what}\n    {hint}");
    }

    fn fail(&mut self, what: &str, hint: &str) {
        self.failed += 1;
        println!("× {what}\n    {hint}");
    }
}

/// Runs the checks; `Ok(false)` when one failed.
pub async fn run(pre: bool, namespace: &str) -> anyhow::Result<bool> {
    let mut r = Report::default();
    let client = match kubernetes::client_for_cli().await {
        Ok(c) => c,
        Err(e) => {
            r.fail("a Kubernetes client", &e.to_string());
            return Ok(false);
        }
    };
    match client.apiserver_version().await {
        Ok(v) => {
            let minor: u32 = v.minor.trim_end_matches('+').parse().unwrap_or(0);
            if v.major == "1" && minor >= MIN_MINOR {
                r.ok(&format!("Kubernetes {}.{} (native sidecars)", v.major, v.minor));
            } else {
                r.fail(
                    &format!("Kubernetes {}.{}", v.major, v.minor),
                    "Weft needs 1.29 or newer: its sidecar is a native sidecar (restartPolicy: Always)",
                );
            }
        }
        Err(e) => {
            r.fail("the Kubernetes API answers", &format!("{e}: check KUBECONFIG and the cluster"));
            return Ok(false);
        }
    }
    if pre {
        pre_install(&client, &mut r).await;
    } else {
        installed(&client, namespace, &mut r).await;
    }
    println!(
        "\n{}",
        match (r.failed, r.warned) {
            (0, 0) => "Status check results are √".to_string(),
            (0, w) => format!("Status check results are √ with {w} warning(s)"),
            (f, _) => format!("{f} check(s) failed"),
        }
    );
    Ok(r.failed == 0)
}

async fn may(client: &Client, verb: &str, group: &str, resource: &str) -> bool {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    api.create(&PostParams::default(), &review).await.ok().and_then(|a| a.status).is_some_and(|s| s.allowed)
}

async fn pre_install(client: &Client, r: &mut Report) {
    for (group, resource) in [
        ("", "namespaces"),
        ("apiextensions.k8s.io", "customresourcedefinitions"),
        ("rbac.authorization.k8s.io", "clusterroles"),
        ("rbac.authorization.k8s.io", "clusterrolebindings"),
        ("admissionregistration.k8s.io", "mutatingwebhookconfigurations"),
    ] {
        let what = format!("may create {resource}");
        match may(client, "create", group, resource).await {
            true => r.ok(&what),
            false => r.fail(&what, "the install needs cluster-admin rights (or these grants)"),
        }
    }
    gateway_api(client, r).await;
}

async fn gateway_api(client: &Client, r: &mut Report) {
    let lp = ListParams::default().limit(1);
    let http = Api::<HTTPRoute>::all(client.clone()).list_metadata(&lp).await.is_ok();
    let grpc = Api::<GRPCRoute>::all(client.clone()).list_metadata(&lp).await.is_ok();
    match http && grpc {
        true => r.ok("the Gateway API's HTTPRoute and GRPCRoute CRDs"),
        false => r.warn(
            "the Gateway API's HTTPRoute and GRPCRoute CRDs",
            "not installed: routes are off; install the Gateway API's standard channel",
        ),
    }
    if http && grpc {
        routes_taken(client, r).await;
    }
}

/// Routes the mesh did not take, as their status says (the control plane writes it).
async fn routes_taken(client: &Client, r: &mut Report) {
    let lp = ListParams::default();
    let http = Api::<HTTPRoute>::all(client.clone()).list(&lp).await.map(|l| l.items).unwrap_or_default();
    let grpc = Api::<GRPCRoute>::all(client.clone()).list(&lp).await.map(|l| l.items).unwrap_or_default();
    let routes = http
        .iter()
        .map(|x| ("HTTPRoute", &x.metadata, x.status.as_ref()))
        .chain(grpc.iter().map(|x| ("GRPCRoute", &x.metadata, x.status.as_ref())));
    let mut refused = 0;
    for (kind, meta, status) in routes {
        let entries = status.into_iter().flat_map(|s| &s.parents);
        let mine = entries.filter(|p| p["controllerName"] == kubernetes::status::CONTROLLER);
        let not_accepted = mine
            .flat_map(|p| p["conditions"].as_array().cloned().unwrap_or_default())
            .find(|c| c["type"] == "Accepted" && c["status"] == "False");
        if let Some(c) = not_accepted {
            refused += 1;
            let name = format!(
                "{kind} {}/{}",
                meta.namespace.as_deref().unwrap_or(""),
                meta.name.as_deref().unwrap_or("")
            );
            r.warn(
                &format!("{name} is not applied by the mesh ({})", c["reason"].as_str().unwrap_or("")),
                &format!("{}; fix the field it names", c["message"].as_str().unwrap_or("")),
            );
        }
    }
    if refused == 0 {
        r.ok("every route with a Service parent is applied by the mesh");
    }
}

async fn installed(client: &Client, ns: &str, r: &mut Report) {
    let lp = ListParams::default().limit(1);
    let weft_crds = Api::<InboundPolicy>::all(client.clone()).list_metadata(&lp).await.is_ok()
        && Api::<TrafficPolicy>::all(client.clone()).list_metadata(&lp).await.is_ok();
    match weft_crds {
        true => r.ok("Weft's CRDs (InboundPolicy, TrafficPolicy)"),
        false => r.fail("Weft's CRDs (InboundPolicy, TrafficPolicy)", "missing: kubectl apply -f k8s/crds/"),
    }
    gateway_api(client, r).await;
    let root = trust_root(client, ns, r).await;
    let pods: Api<Pod> = Api::all(client.clone());
    let all = pods.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
    let ready = |p: &Pod| {
        let conditions = p.status.as_ref().and_then(|s| s.conditions.as_ref());
        conditions.into_iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True")
    };
    let control: Vec<&Pod> = all
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(ns))
        .filter(|p| {
            p.metadata.labels.as_ref().and_then(|l| l.get("app.kubernetes.io/name")).map(String::as_str)
                == Some("weft-control")
        })
        .collect();
    let up = control.iter().filter(|p| ready(p)).count();
    match (up, control.len()) {
        (0, _) => r.fail(
            "the control plane is ready",
            &format!("no ready weft-control pod in {ns}: kubectl -n {ns} describe pods -l app.kubernetes.io/name=weft-control"),
        ),
        (1, n) if n > 1 => r.warn("the control plane is ready", "only one replica is ready: the mesh has no spare"),
        (1, _) => r.ok("the control plane is ready (1 replica)"),
        (u, _) => r.ok(&format!("the control plane is ready ({u} replicas)")),
    }
    webhook(client, ns, root.as_deref(), r).await;
    for pod in control.iter().filter(|p| ready(p)) {
        replica(client, ns, pod, r).await;
    }
    let meshed: Vec<&Pod> = all
        .iter()
        .filter(|p| {
            let spec = p.spec.as_ref();
            spec.into_iter()
                .flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten()))
                .any(|c| c.name == inject::PROXY)
        })
        .collect();
    // The proxy's own readiness (its container), not the pod's: an app that is not
    // ready is the app's business.
    let proxy_ready = |p: &Pod| {
        let status = p.status.as_ref();
        let statuses = status.into_iter().flat_map(|s| {
            s.init_container_statuses.iter().flatten().chain(s.container_statuses.iter().flatten())
        });
        statuses.filter(|c| c.name == inject::PROXY).any(|c| c.ready)
    };
    let unready: Vec<String> = meshed
        .iter()
        .filter(|p| !proxy_ready(p))
        .map(|p| {
            format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or(""),
                p.metadata.name.as_deref().unwrap_or("")
            )
        })
        .collect();
    match unready.as_slice() {
        [] => r.ok(&format!("every meshed pod's proxy is ready with a certificate ({})", meshed.len())),
        some => r.fail(
            &format!("{} meshed pod(s) not ready: {}", some.len(), some.join(", ")),
            "its proxy has no certificate or policy yet: kubectl logs POD -c weft-proxy, and its /ready says why",
        ),
    }
}

/// One control-plane replica through the API server's proxy to its pod: its webhook
/// answers an AdmissionReview (the path the API server calls it by, bar the Service),
/// and its serving certificate, as its metrics tell, is not about to expire.
async fn replica(client: &Client, ns: &str, pod: &Pod, r: &mut Report) {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let port = |wanted: &str, default: i32| {
        let ports = pod.spec.iter().flat_map(|s| &s.containers).flat_map(|c| c.ports.iter().flatten());
        ports
            .filter(|p| p.name.as_deref() == Some(wanted))
            .map(|p| p.container_port)
            .next()
            .unwrap_or(default)
    };
    let (webhook, admin) = (port("webhook", 8443), port("admin", 9990));
    let what = format!("the injector's webhook answers on {ns}/{name}");
    // A pod of Weft's own namespace: the webhook leaves it alone, so this changes nothing.
    let review = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "weft-check", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"},
                    "namespace": ns, "operation": "CREATE", "userInfo": {"username": "weft-check"},
                    "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "weft-check", "namespace": ns},
                               "spec": {"containers": [{"name": "check", "image": "check"}]}}}
    });
    let path = format!("/api/v1/namespaces/{ns}/pods/https:{name}:{webhook}/proxy/inject");
    let request = http::Request::post(path)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(&review).unwrap_or_default());
    let answer = match request {
        Ok(req) => client.request::<serde_json::Value>(req).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match answer {
        Ok(a) if a["response"]["uid"] == "weft-check" && a["response"]["allowed"] == true => r.ok(&what),
        Ok(a) => r.fail(&what, &format!("it answered {a} instead of an AdmissionReview: kubectl -n {ns} logs {name}")),
        Err(e) => r.fail(
            &what,
            &format!("{e}: pods are created without sidecars meanwhile; is --webhook-addr set and port {webhook} named `webhook`? kubectl -n {ns} logs {name}"),
        ),
    }
    let what = format!("the webhook's certificate on {ns}/{name}");
    let path = format!("/api/v1/namespaces/{ns}/pods/{name}:{admin}/proxy/metrics");
    let metrics = match http::Request::get(path).body(Vec::new()) {
        Ok(req) => client.request_text(req).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let expiry = metrics.as_deref().ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("weft_control_webhook_certificate_expiry_timestamp_seconds "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    match (metrics, expiry) {
        (Err(e), _) => r.fail(
            &what,
            &format!("its admin port {admin} does not answer ({e}): kubectl -n {ns} logs {name}"),
        ),
        (Ok(_), None) => {
            r.fail(&what, "it serves no webhook: run the control plane with --webhook-addr (k8s/base does)")
        }
        (Ok(_), Some(t)) => match webhook_certificate(t, time::OffsetDateTime::now_utc().unix_timestamp()) {
            Ok(()) => r.ok(&what),
            Err(hint) => r.fail(&what, &hint),
        },
    }
}

/// A webhook certificate that ends at `not_after` (Unix seconds), seen at `now`. It lives
/// a day and is renewed at 70 %, so less than six hours left means renewal has failed.
fn webhook_certificate(not_after: f64, now: i64) -> Result<(), String> {
    let left = not_after as i64 - now;
    match left {
        l if l <= 0 => {
            Err(format!("EXPIRED {}s ago: the API server cannot call the webhook; restart this replica", -l))
        }
        l if l < 6 * 3600 => Err(format!("expires in {}m and was not renewed: its log says why", l / 60)),
        _ => Ok(()),
    }
}

/// Checks the CA Secret; its root PEM when usable.
async fn trust_root(client: &Client, ns: &str, r: &mut Report) -> Option<String> {
    let what = "the trust root (Secret weft-identity)";
    let secret = match Api::<Secret>::namespaced(client.clone(), ns).get_opt("weft-identity").await {
        Ok(Some(s)) => s,
        Ok(None) => {
            r.fail(
                what,
                &format!(
                    "missing: weft install makes it, or kubectl -n {ns} create secret tls weft-identity ..."
                ),
            );
            return None;
        }
        Err(e) => {
            r.fail(what, &format!("cannot read it: {e}"));
            return None;
        }
    };
    let pem = secret
        .data
        .as_ref()
        .and_then(|d| d.get("tls.crt"))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned());
    let Some(pem) = pem else {
        r.fail(what, "it has no tls.crt");
        return None;
    };
    let Some(not_after) = not_after(&pem) else {
        r.fail(what, "tls.crt is not a PEM certificate");
        return None;
    };
    let left = not_after - time::OffsetDateTime::now_utc();
    if left <= time::Duration::ZERO {
        r.fail(what, &format!("EXPIRED on {not_after}: no proxy can get a certificate; rotate the root (docs/kubernetes.md)"));
    } else if left < SOON {
        r.warn(
            what,
            &format!("expires on {not_after}, in {} days: rotate it before then", left.whole_days()),
        );
    } else {
        r.ok(&format!("{what}, valid until {}", not_after.date()));
    }
    Some(pem)
}

fn not_after(pem: &str) -> Option<time::OffsetDateTime> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = p.parse_x509().ok()?;
    Some(cert.validity().not_after.to_datetime())
}

async fn webhook(client: &Client, ns: &str, root: Option<&str>, r: &mut Report) {
    let what = "the injector's webhook (MutatingWebhookConfiguration weft-injector)";
    let config = match Api::<MutatingWebhookConfiguration>::all(client.clone()).get_opt("weft-injector").await
    {
        Ok(Some(c)) => c,
        _ => return r.fail(what, "missing: apply k8s/ (weft install)"),
    };
    let bundles: Vec<String> = config
        .webhooks
        .iter()
        .flatten()
        .map(|w| {
            w.client_config
                .ca_bundle
                .as_ref()
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .unwrap_or_default()
        })
        .collect();
    let trusted = |b: &String| root.is_some_and(|root| b.contains(root.trim()));
    match (bundles.is_empty(), bundles.iter().all(trusted)) {
        (false, true) => r.ok(what),
        _ => r.fail(
            &format!("{what}: its caBundle"),
            "is not the mesh's root, so the API server cannot call it; the control plane sets it at start: restart it",
        ),
    }
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels("kubernetes.io/service-name=weft-control");
    let endpoints = slices.list(&lp).await.map(|l| l.items).unwrap_or_default();
    let ready = endpoints
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .count();
    match ready {
        0 => r.fail(
            "the webhook's Service has ready endpoints",
            "none: pods are created without sidecars (failurePolicy: Ignore)",
        ),
        n => r.ok(&format!("the webhook's Service has {n} ready endpoint(s)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_webhook_certificate_fails_once_renewal_is_overdue() {
        let now = 1_800_000_000;
        assert!(webhook_certificate((now + 20 * 3600) as f64, now).is_ok());
        let late = webhook_certificate((now + 3600) as f64, now).unwrap_err();
        assert!(late.contains("expires in 60m") && late.contains("not renewed"), "{late}");
        let gone = webhook_certificate((now - 5) as f64, now).unwrap_err();
        assert!(gone.starts_with("EXPIRED 5s ago"), "{gone}");
    }
}
