//! Outbound routes from the control plane: one Policy.WatchRoutes stream per service
//! authority (shared by all shards, see [`crate::control`]), the first rule whose match
//! fits a request, and the weighted choice among the rule's backends.

use std::{collections::HashMap, sync::Arc};

use http::Request;
use regex::Regex;
use weft_api::v1::{policy_client::PolicyClient, Backend, KeyValue, Match, RouteSet, Rule, WatchRequest};

use crate::{
    config::ControlConfig,
    control::{self, Watched},
    metrics::Metrics,
};

/// A service's routes as the control plane sent them, with each rule's name ready to
/// be a metric label and the matches indexed by path (made once per answer, not per
/// request).
pub struct Routes {
    pub set: RouteSet,
    pub names: Vec<Arc<str>>,
    index: PathIndex,
    /// Each match's regular expressions, compiled: `[rule][match]`.
    patterns: Vec<Vec<Patterns>>,
}

impl From<RouteSet> for Routes {
    fn from(set: RouteSet) -> Self {
        let names = set.rules.iter().map(|r| Arc::from(r.name.as_str())).collect();
        let index = PathIndex::new(&set);
        let patterns = set.rules.iter().map(|r| r.matches.iter().map(Patterns::of).collect()).collect();
        Routes { set, names, index, patterns }
    }
}

/// A match's regular expressions (`RegularExpression` matches), compiled once.
#[derive(Default)]
struct Patterns {
    path: Option<Regex>,
    headers: Vec<(String, Regex)>,
    query: Vec<(String, Regex)>,
    /// One did not compile (the control plane refuses such routes; this proxy then
    /// lets the match fit nothing rather than more than it says).
    broken: bool,
}

impl Patterns {
    fn of(m: &Match) -> Patterns {
        let mut p = Patterns::default();
        let mut compile = |pattern: &str| match weft_api::pattern::compile(pattern) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!("route match never fits: {e}");
                p.broken = true;
                None
            }
        };
        let path = (!m.path_regex.is_empty()).then(|| compile(&m.path_regex)).flatten();
        let pairs = |kvs: &[KeyValue], compile: &mut dyn FnMut(&str) -> Option<Regex>| {
            kvs.iter().filter_map(|kv| Some((kv.name.clone(), compile(&kv.value)?))).collect::<Vec<_>>()
        };
        let headers = pairs(&m.header_regex, &mut compile);
        let query = pairs(&m.query_regex, &mut compile);
        Patterns { path, headers, query, ..p }
    }

    fn fit<B>(&self, req: &Request<B>) -> bool {
        if self.broken {
            return false;
        }
        if self.path.as_ref().is_some_and(|r| !r.is_match(req.uri().path())) {
            return false;
        }
        let headers = self.headers.iter().all(|(name, r)| {
            req.headers().get_all(name.as_str()).iter().any(|v| v.to_str().is_ok_and(|v| r.is_match(v)))
        });
        let query = req.uri().query().unwrap_or("");
        headers
            && self.query.iter().all(|(name, r)| {
                query.split('&').filter_map(|kv| kv.split_once('=')).any(|(k, v)| k == name && r.is_match(v))
            })
    }
}

impl Routes {
    /// The index of the first rule the request matches, as [`matching`] finds it, but
    /// looking only at the matches its path can fit: a service with a thousand rules
    /// costs a few map lookups per request, not a thousand checks.
    pub fn matching<B>(&self, req: &Request<B>) -> Option<usize> {
        let path = req.uri().path();
        let mut best: Option<usize> = None;
        let mut consider = |candidates: &[(usize, Option<usize>)]| {
            // Each list is in rule order: its first fit is its best.
            for &(rule, m) in candidates {
                if best.is_some_and(|b| b <= rule) {
                    return;
                }
                if m.is_none_or(|m| fits(&self.set.rules[rule].matches[m], &self.patterns[rule][m], req)) {
                    best = Some(rule);
                    return;
                }
            }
        };
        consider(&self.index.anywhere);
        if let Some(c) = self.index.exact.get(path) {
            consider(c);
        }
        // Segment prefixes of the path: `/a`, `/a/b`, ..., the whole path.
        let ends = path.match_indices('/').map(|(i, _)| i).filter(|&i| i > 0).chain([path.len()]);
        for end in ends {
            if let Some(c) = self.index.prefix.get(&path[..end]) {
                consider(c);
            }
        }
        best
    }
}

/// Every (rule, match) under the one path key a fitting request must have: an exact
/// path, a segment prefix (a gRPC service is the prefix `/<service>`), or none
/// (`anywhere`: no path condition, or a rule without matches, which is `None`).
#[derive(Default)]
struct PathIndex {
    exact: HashMap<String, Vec<(usize, Option<usize>)>>,
    prefix: HashMap<String, Vec<(usize, Option<usize>)>>,
    anywhere: Vec<(usize, Option<usize>)>,
}

impl PathIndex {
    fn new(set: &RouteSet) -> Self {
        let mut index = PathIndex::default();
        for (r, rule) in set.rules.iter().enumerate() {
            if rule.matches.is_empty() {
                index.anywhere.push((r, None));
            }
            for (m, mat) in rule.matches.iter().enumerate() {
                let prefix = mat.path_prefix.trim_end_matches('/');
                let list = if !mat.path_exact.is_empty() {
                    index.exact.entry(mat.path_exact.clone()).or_default()
                } else if !prefix.is_empty() {
                    index.prefix.entry(prefix.to_string()).or_default()
                } else if !mat.grpc_service.is_empty() {
                    index.prefix.entry(format!("/{}", mat.grpc_service)).or_default()
                } else {
                    &mut index.anywhere
                };
                list.push((r, Some(m)));
            }
        }
        index
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

/// The index of the first rule a request matches, checking every rule in order: the
/// reference [`Routes::matching`] must agree with (tests and fuzzing compare them).
pub fn matching<B>(set: &RouteSet, req: &Request<B>) -> Option<usize> {
    set.rules
        .iter()
        .position(|r| r.matches.is_empty() || r.matches.iter().any(|m| fits(m, &Patterns::of(m), req)))
}

fn fits<B>(m: &Match, patterns: &Patterns, req: &Request<B>) -> bool {
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
    patterns.fit(req)
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
    fn regular_expressions_match_whole_values_and_the_index_agrees() {
        let rule = |m: Match| Rule { matches: vec![m], ..Default::default() };
        let set = RouteSet {
            authority: "words:8080".into(),
            rules: vec![
                rule(Match { path_regex: "/users/[0-9]+".into(), ..Default::default() }),
                rule(Match { header_regex: vec![kv("x-tenant", "team-(a|b)")], ..Default::default() }),
                rule(Match {
                    path_prefix: "/q".into(),
                    query_regex: vec![kv("v", "[0-9]{2}")],
                    ..Default::default()
                }),
                // Refused by the control plane; a proxy that gets it anyway fits nothing.
                rule(Match { path_regex: "/broken(".into(), ..Default::default() }),
            ],
            generation: 1,
        };
        let indexed = Routes::from(set.clone());
        for (uri, headers, want) in [
            ("/users/42", &[][..], Some(0)),
            ("/users/42/x", &[], None),
            ("/x/users/42", &[], None),
            ("/any", &[("x-tenant", "team-b")][..], Some(1)),
            ("/any", &[("x-tenant", "team-bc")], None),
            ("/q?a=1&v=42", &[], Some(2)),
            ("/q?v=420", &[], None),
            ("/broken(", &[], None),
        ] {
            let r = req("GET", uri, headers);
            assert_eq!(matching(&set, &r), want, "{uri} {headers:?}");
            assert_eq!(indexed.matching(&r), want, "index: {uri} {headers:?}");
        }
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
        let indexed = Routes::from(set.clone());
        for (method, uri, headers) in [
            ("GET", "/api/x", &[("x-canary", "1")][..]),
            ("GET", "/api/x", &[]),
            ("GET", "/api", &[]),
            ("GET", "/api/", &[]),
            ("GET", "/apiary", &[]),
            ("POST", "/other?a=2&debug=1", &[]),
            ("POST", "/pkg.Words/Get", &[]),
            ("POST", "/pkg.Words/Put", &[]),
            ("POST", "/pkg.Words", &[]),
            ("GET", "/", &[]),
        ] {
            let r = req(method, uri, headers);
            assert_eq!(indexed.matching(&r), matching(&set, &r), "{method} {uri}");
        }
    }

    #[test]
    fn the_index_agrees_with_the_first_match_across_many_rules() {
        // Exact, prefix (with and without a trailing slash), nested prefixes, gRPC,
        // header-only and catch-all rules interleaved, so first-match order is tested
        // across the index's lists.
        let mut rules = Vec::new();
        for i in 0..200 {
            let m = match i % 6 {
                0 => Match { path_exact: format!("/r{}", i % 17), ..Default::default() },
                1 => Match { path_prefix: format!("/r{}/", i % 13), ..Default::default() },
                2 => Match { path_prefix: format!("/r{}/s{}", i % 7, i % 3), ..Default::default() },
                3 => Match { grpc_service: format!("pkg.S{}", i % 5), ..Default::default() },
                4 => Match { headers: vec![kv("x-r", &format!("{}", i % 9))], ..Default::default() },
                _ => Match { path_prefix: "/".into(), method: "PUT".into(), ..Default::default() },
            };
            rules.push(Rule { matches: vec![m], ..Default::default() });
        }
        rules.push(Rule::default());
        let set = RouteSet { authority: "a:80".into(), rules, generation: 1 };
        let indexed = Routes::from(set.clone());
        for i in 0..2000 {
            let path = match i % 5 {
                0 => format!("/r{}", i % 19),
                1 => format!("/r{}/s{}", i % 11, i % 4),
                2 => format!("/r{}/s{}/t", i % 8, i % 3),
                3 => format!("/pkg.S{}/M", i % 6),
                _ => format!("/x{}", i % 3),
            };
            let method = ["GET", "PUT", "POST"][i % 3];
            let header = format!("{}", i % 10);
            let r = req(method, &path, &[("x-r", header.as_str())]);
            assert_eq!(indexed.matching(&r), matching(&set, &r), "{method} {path} x-r={header}");
        }
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
