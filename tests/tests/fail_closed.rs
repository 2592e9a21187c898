//! Fail closed: what the proxy does when the control plane has not answered. An inbound
//! port without a policy answer uses WEFT_DEFAULT_INBOUND_POLICY (deny unless said
//! otherwise), a proxy told its app's ports is ready only once each has its policy, and a
//! destination discovery has not answered for is refused (503 `no-discovery`), never sent
//! in plaintext. (Transparent mode: netns.rs.)

use std::time::Duration;

use weft_e2e::{
    backend,
    control::Control,
    curl, free_addr,
    mesh::{token, MeshFile},
    Proxy,
};

/// A sidecar whose control plane never answers (nothing listens at its address).
fn orphan(extra: &[(&str, &str)]) -> Proxy {
    let dead = free_addr().to_string();
    let web = token("web");
    let mut env = vec![
        ("WEFT_CONTROL_ADDR", dead.as_str()),
        ("WEFT_IDENTITY", "spiffe://weft.local/ns/default/sa/web"),
        ("WEFT_TOKEN", web.as_str()),
    ];
    env.extend_from_slice(extra);
    Proxy::spawn(&env)
}

#[test]
fn an_unanswered_port_denies_by_default() {
    let app = backend::http("app");
    let app_addr = app.addr.to_string();
    let p = orphan(&[("WEFT_APP_ADDR", &app_addr)]);
    let (code, body, _) = curl(&["-i", &format!("http://{}/", p.inbound)]);
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("weft-error: unauthorized") && body.contains("WEFT_DEFAULT_INBOUND_POLICY"),
        "{body}"
    );
    // Opaque TCP too: closed, never forwarded.
    let rsp = weft_e2e::raw_request(p.inbound, "\u{0}\u{1}binary", Duration::from_secs(5)).unwrap();
    assert!(rsp.is_empty(), "{rsp}");
    assert_eq!(app.hits(), 0);
    assert_eq!(app.conns(), 0);
}

#[test]
fn the_default_inbound_policy_is_configurable() {
    let app = backend::http("app");
    let app_addr = app.addr.to_string();
    let strict = orphan(&[("WEFT_APP_ADDR", &app_addr), ("WEFT_DEFAULT_INBOUND_POLICY", "strict")]);
    let (code, body, _) = curl(&["-i", &format!("http://{}/", strict.inbound)]);
    assert_eq!(code, 403, "strict refuses plaintext: {body}");
    let open = orphan(&[("WEFT_APP_ADDR", &app_addr), ("WEFT_DEFAULT_INBOUND_POLICY", "permissive")]);
    let (code, body, _) = curl(&[&format!("http://{}/", open.inbound)]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(app.hits(), 1);
    // A value that is none of them fails startup, naming the variable.
    let out = weft_e2e::run(
        std::process::Command::new(weft_e2e::bin("weft-proxy"))
            .env("WEFT_CONTROL_ADDR", "127.0.0.1:1")
            .env("WEFT_IDENTITY", "spiffe://weft.local/ns/default/sa/web")
            .env("WEFT_TOKEN", "t")
            .env("WEFT_DEFAULT_INBOUND_POLICY", "allow"),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("WEFT_DEFAULT_INBOUND_POLICY") && err.contains("deny, strict or permissive"),
        "{err}"
    );
}

#[test]
fn ready_only_once_each_app_port_has_its_policy() {
    let control = Control::start(&MeshFile::new().workload("web").workload("api").yaml(), &[]);
    let (app_a, app_b) = (backend::http("a"), backend::http("b"));
    let ports = format!("{},{}", app_a.addr.port(), app_b.addr.port());
    let p = control.sidecar("web", &[("WEFT_INBOUND_PORTS", &ports)]);
    // Ready means both answers are in, not just the certificate.
    let answered = r#"weft_control_generation{kind="policy"}"#;
    assert!(p.metric(answered) >= 1.0, "ready before the port policies arrived:\n{}", p.metrics());
    // Without a control plane to answer, the certificate alone does not make it ready.
    let orphaned = orphan(&[("WEFT_INBOUND_PORTS", &ports)]);
    orphaned.wait_metric_at_least(r#"weft_identity_certify_total{result="error"}"#, 1.0);
    assert_eq!(weft_e2e::http_get(orphaned.admin, "/ready").map(|(s, _)| s), Some(503));
}

#[test]
fn a_destination_discovery_has_not_answered_for_is_refused_not_sent_in_plaintext() {
    // The app listens in plaintext; a proxy that guessed "not meshed" would reach it.
    let app = backend::http("app");
    let p = orphan(&[]);
    let via = format!("http://{}", p.outbound);
    let (code, body, _) = curl(&["-i", "-x", &via, &format!("http://{}/", app.addr)]);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("weft-error: no-discovery"), "{body}");
    // A tunnel as well.
    let (code, _, err) = curl(&["-p", "-x", &via, &format!("http://{}/", app.addr)]);
    assert_ne!(code, 200, "{err}");
    assert_eq!(app.hits(), 0, "a request crossed without discovery's answer");
    assert_eq!(app.conns(), 0);
    let refused = r#"weft_requests_total{direction="outbound",status="503",cause="no-discovery"}"#;
    assert_eq!(p.metric(refused), 2.0, "{}", p.metrics());
}
