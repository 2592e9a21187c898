//! Outbound routes from the control plane: one Policy.WatchRoutes stream per service
//! authority (shared by all shards, see [`crate::control`]), the first rule whose match
//! fits a request, and the weighted choice among the rule's backends.

use std::sync::Arc;

use http::Request;
use weft_api::v1::{policy_client::PolicyClient, Backend, Match, RouteSet, Rule, WatchRequest};

use crate::{
    config::ControlConfig,
    control::{self, Watched},
    metrics::Metrics,
};

/// A service's routes as the control plane sent them, with each rule's name ready to
/// be a metric label (made once per answer, not per request).
pub struct Routes {
    pub set: RouteSet,
    pub names: Vec<Arc<str>>,
}

impl From<RouteSet> for Routes {
    fn from(set: RouteSet) -> Self {
        let names = set.rules.iter().map(|r| Arc::from(r.name.as_str())).collect();
        Routes { set, names }
    }
}

pub struct RouteWatch {
    watches: Watched<String, RouteSet, Routes>,
}

impl RouteWatch {
    pub fn new(cfg: &ControlConfig, metrics: Arc<Metrics>) -> Result<Self, control::Error> {
        let client = PolicyClient::new(control::channel(cfg, None)?);
        let watches = Watched::new("routes", cfg, metrics, move |authority: &String, token| {
            let mut client = client.clone();
            let req = control::authorized(WatchRequest { authority: authority.clone() }, token);
            Box::pin(async move { client.watch_routes(req).await.map(tonic::Response::into_inner) })
        })
        .with_limits(cfg.watches);
        Ok(RouteWatch { watches })
    }

    /// The routes of `authority`; `None` until the control plane has answered.
    pub async fn get(&self, authority: &str) -> Option<Arc<Routes>> {
        self.watches.get(&authority.to_string()).await
    }
}

/// The index of the first rule a request matches.
pub fn matching<B>(set: &RouteSet, req: &Request<B>) -> Option<usize> {
    set.rules.iter().position(|r| r.matches.is_empty() || r.matches.iter().any(|m| fits(m, req)))
}

fn fits<B>(m: &Match, req: &Request<B>) -> bool {
    let path = req.uri().path();
    if !m.path_exact.is_empty() && path != m.path_exact {
        return false;
    }
    if !m.path_prefix.is_empty() && !prefix_matches(path, &m.path_prefix) {
        return false;
    }
    if !m.method.is_empty() && req.method().as_str() != m.method {
        return false;
    }
    let headers_fit = m
        .headers
        .iter()
        .all(|h| req.headers().get_all(h.name.as_str()).iter().any(|v| v.as_bytes() == h.value.as_bytes()));
    if !headers_fit {
        return false;
    }
    let query = req.uri().query().unwrap_or("");
    let query_fits = m.query.iter().all(|q| {
        query.split('&').filter_map(|kv| kv.split_once('=')).any(|(k, v)| k == q.name && v == q.value)
    });
    if !query_fits {
        return false;
    }
    if !m.grpc_service.is_empty() {
        // gRPC calls are POST /<package.Service>/<Method>.
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let (service, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if service != m.grpc_service || (!m.grpc_method.is_empty() && method != m.grpc_method) {
            return false;
        }
    }
    true
}

/// Gateway API prefix matching is by path segment: `/api` matches `/api` and `/api/x`,
/// not `/apiary`.
pub fn prefix_matches(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    prefix.is_empty() || path == prefix || path.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'))
}

/// A backend of `rule` in proportion to the weights (`r` uniformly random); `None`
/// when the rule has none (the parent service serves).
pub fn pick_backend(rule: &Rule, r: u64) -> Option<&Backend> {
    let total: u64 = rule.backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut at = r % total;
    rule.backends.iter().find(|b| {
        let w = u64::from(b.weight);
        if at < w {
            return true;
        }
        at -= w;
        false
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::v1::KeyValue;

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn kv(name: &str, value: &str) -> KeyValue {
        KeyValue { name: name.into(), value: value.into() }
    }

    #[test]
    fn first_matching_rule_wins() {
        let set = RouteSet {
            authority: "words:8080".into(),
            rules: vec![
                Rule {
                    matches: vec![Match { headers: vec![kv("x-canary", "1")], ..Default::default() }],
                    ..Default::default()
                },
                Rule {
                    matches: vec![
                        Match { path_prefix: "/api".into(), method: "GET".into(), ..Default::default() },
                        Match { query: vec![kv("debug", "1")], ..Default::default() },
                    ],
                    ..Default::default()
                },
                Rule {
                    matches: vec![Match {
                        grpc_service: "pkg.Words".into(),
                        grpc_method: "Get".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ],
            generation: 1,
        };
        assert_eq!(matching(&set, &req("GET", "/api/x", &[("x-canary", "1")])), Some(0));
        assert_eq!(matching(&set, &req("GET", "/api/x", &[])), Some(1));
        assert_eq!(matching(&set, &req("GET", "/api", &[])), Some(1));
        assert_eq!(matching(&set, &req("GET", "/apiary", &[])), None);
        assert_eq!(matching(&set, &req("POST", "/api/x", &[])), None);
        assert_eq!(matching(&set, &req("POST", "/other?a=2&debug=1", &[])), Some(1));
        assert_eq!(matching(&set, &req("POST", "/pkg.Words/Get", &[])), Some(2));
        assert_eq!(matching(&set, &req("POST", "/pkg.Words/Put", &[])), None);
    }

    #[test]
    fn backends_by_weight() {
        let rule = Rule {
            backends: vec![
                Backend { authority: "v1".into(), weight: 9 },
                Backend { authority: "v2".into(), weight: 1 },
            ],
            ..Default::default()
        };
        let v2 = (0..100).filter(|r| pick_backend(&rule, *r).unwrap().authority == "v2").count();
        assert_eq!(v2, 10);
        assert!(pick_backend(&Rule::default(), 3).is_none());
    }
}
