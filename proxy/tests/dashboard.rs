//! The shipped Grafana dashboard (k8s/addons/grafana) only queries metric families this
//! proxy's registry exposes, filtered and grouped by labels those families have.

use weft_proxy::{
    errors::Cause,
    metrics::{Direction, Metrics, Peer},
};

#[test]
fn the_grafana_dashboard_queries_what_the_proxy_exposes() {
    let dash: serde_json::Value =
        serde_json::from_str(include_str!("../../k8s/addons/grafana/weft-dashboard.json"))
            .expect("valid JSON");
    assert_eq!(dash["uid"], "weft-mesh");
    // One of everything, so every family shows in the exposition.
    let m = Metrics::new();
    let peer = Peer {
        route: Some("r/0".into()),
        workload: Some("w".into()),
        identity: Some("spiffe://t/ns/a/sa/w".into()),
    };
    m.response(Direction::Outbound, "h2", 200, None, peer, 0.001);
    m.detected(Direction::Inbound, "silent");
    let _open = m.conn_open(Direction::Inbound);
    m.tcp_bytes(Direction::Inbound, Some("spiffe://t/ns/a/sa/w".into()), 1, 1);
    m.closed(Direction::Inbound, Cause::UpstreamReset, format_args!("test"));
    m.denied(Some("spiffe://t/ns/a/sa/x".into()), "http");
    m.tls_handshake(Direction::Inbound, true);
    m.certified(true, 1);
    m.retried(&"r/0".into());
    m.retry_budget_exhausted(&"r/0".into());
    m.outlier("svc:80", false);
    m.outlier("svc:80", true);
    m.spans_exported(1);
    m.span_dropped(1);
    m.span_export_failed();
    let text = m.encode();

    // Family → the labels of its samples.
    let mut families: std::collections::HashMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            families.entry(rest.split(' ').next().unwrap().to_string()).or_default();
        }
    }
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, rest)) = line.split_once('{') else { continue };
        let family = families.keys().filter(|f| series.starts_with(f.as_str())).max_by_key(|f| f.len());
        let family = family.cloned().unwrap_or_else(|| panic!("{line} has no family"));
        let names = rest.split(',').filter_map(|kv| kv.split_once('=')).map(|(k, _)| k.to_string());
        families.get_mut(&family).unwrap().extend(names);
    }
    // `namespace` and `pod` come from Prometheus' Kubernetes discovery.
    let scrape = ["namespace", "pod", "le"];
    let mut checked = 0;
    for target in dash["panels"].as_array().unwrap().iter().flat_map(|p| p["targets"].as_array()).flatten() {
        let expr = target["expr"].as_str().unwrap();
        for (start, _) in expr.match_indices("weft_") {
            let name: String =
                expr[start..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            let family = ["_total", "_bucket", "_count", "_sum", ""]
                .iter()
                .filter_map(|s| name.strip_suffix(s))
                .find(|f| families.contains_key(*f))
                .unwrap_or_else(|| panic!("{name} in {expr:?} is not a weft-proxy metric:\n{text}"));
            let known = &families[family];
            let selector = expr[start + name.len()..].strip_prefix('{').map(|s| s.split('}').next().unwrap());
            for used in selector.into_iter().flat_map(|s| s.split(',')) {
                let label = used.split(['=', '!']).next().unwrap().trim();
                assert!(scrape.contains(&label) || known.contains(label), "{expr}: {family} has no {label}");
            }
            checked += 1;
        }
        for group in expr.split("by (").skip(1) {
            for label in group.split(')').next().unwrap().split(',').map(str::trim) {
                let exists = scrape.contains(&label) || families.values().any(|l| l.contains(label));
                assert!(exists, "{expr}: no weft metric has the label {label}");
            }
        }
    }
    assert!(checked >= 25, "only {checked} metric references checked");
}
