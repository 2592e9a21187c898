//! weft-proxy's identity with the real control plane: the proxy makes its key, gets a
//! certificate before it reports ready, renews it, and stays not-ready (loudly) when it
//! cannot get one.

use weft_e2e::{
    control::Control,
    free_addr, http_get,
    mesh::{token, MeshFile},
    Proxy,
};

fn mesh() -> String {
    MeshFile::new().workload("web").yaml()
}
const WEB: &str = "spiffe://weft.local/ns/default/sa/web";

fn proxy_env(control: std::net::SocketAddr, token: &str) -> Vec<(&'static str, String)> {
    vec![
        ("WEFT_CONTROL_ADDR", control.to_string()),
        ("WEFT_IDENTITY", WEB.to_string()),
        ("WEFT_TOKEN", token.to_string()),
    ]
}

fn spawn(env: &[(&'static str, String)]) -> Proxy {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Proxy::spawn(&env)
}

fn now_unix() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

#[test]
fn certificate_before_ready_then_renewed() {
    let control = Control::start(&mesh(), &["--cert-ttl-secs", "3"]);
    let mut p = spawn(&proxy_env(control.grpc, &token("web")));
    p.wait_ready();
    assert!(p.metric(r#"weft_identity_certify_total{result="ok"}"#) >= 1.0);
    let expiry = p.metric("weft_identity_cert_expiry_timestamp_seconds");
    assert!((expiry - now_unix() - 3.0).abs() < 3.0, "expiry {expiry}");
    // Renewed at ~70 % of 3 s.
    p.wait_metric_at_least(r#"weft_identity_certify_total{result="ok"}"#, 3.0);
    assert!(p.metric("weft_identity_cert_expiry_timestamp_seconds") > expiry);
}

#[test]
fn a_bad_token_keeps_the_proxy_unready_and_says_why() {
    let control = Control::start(&mesh(), &[]);
    let p = spawn(&proxy_env(control.grpc, "stolen-token-0123456789"));
    // Refused, and still refused on the retry: never ready.
    p.wait_metric_at_least(r#"weft_identity_certify_total{result="error"}"#, 2.0);
    assert_eq!(http_get(p.admin, "/ready").map(|(s, _)| s), Some(503));
    assert_eq!(http_get(p.admin, "/live").map(|(s, _)| s), Some(200));
    assert!(p.logs().contains("unknown token"), "{}", p.logs());
    // The probe's answer says why, as `kubectl describe pod` shows it.
    let (_, body) = http_get(p.admin, "/ready").unwrap();
    assert!(body.contains("no certificate yet") && body.contains("unknown token"), "{body}");
}

#[test]
fn a_late_control_plane_is_waited_for() {
    let grpc = free_addr();
    let mut p = spawn(&proxy_env(grpc, &token("web")));
    p.wait_metric_at_least(r#"weft_identity_certify_total{result="error"}"#, 1.0);
    assert_eq!(http_get(p.admin, "/ready").map(|(s, _)| s), Some(503));
    let _control = Control::start_on(grpc, &mesh(), &[]);
    p.wait_ready();
}
