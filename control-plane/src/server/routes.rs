//! Routes in the mesh file: HTTPRoute-style rules for a service (Gateway API, as GAMMA
//! uses it for mesh traffic) — matches on path, method, headers, query or gRPC method;
//! weighted backends (canary and blue/green splits); request header changes; timeouts;
//! retries; fault injection. Validation names the route, rule and field; [`route_set`]
//! turns them into what the proxies receive.

use std::collections::BTreeMap;

use serde::Deserialize;
use weft_api::duration::Setting;
use weft_api::v1 as api;

/// Finds a service by the name a route uses (`name`, namespace `default`, or
/// `name.namespace`) and answers its canonical authority `name.namespace:port`. The mesh
/// file (or any other source) provides it, so routes need not know where services live.
pub type Services<'a> = &'a dyn Fn(&str) -> Option<String>;

/// A route the mesh cannot serve: where (route, rule, field) and why.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {msg}")]
pub struct Invalid {
    pub path: String,
    pub msg: String,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Route {
    pub name: String,
    /// The parent service: `name` or `name.namespace`.
    pub service: String,
    pub rules: Vec<Rule>,
    /// Set by sources with consumer routes (Kubernetes: a route in another namespace than
    /// its service): the route applies to that namespace's clients only.
    #[serde(skip)]
    pub consumer_namespace: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rule {
    /// Any one must match; none: every request.
    #[serde(default)]
    pub matches: Vec<Match>,
    /// Weighted split; none: the parent service.
    #[serde(default)]
    pub backends: Vec<BackendRef>,
    #[serde(default)]
    pub request_headers: HeaderChanges,
    /// Changes to the response before the client sees it.
    #[serde(default)]
    pub response_headers: HeaderChanges,
    /// The whole request, retries included, e.g. `2s`.
    pub timeout: Option<Setting>,
    pub retry: Option<Retry>,
    pub fault: Option<Fault>,
    /// Answer with a redirect instead of sending the request.
    pub redirect: Option<Redirect>,
    /// Change the host and path the upstream sees.
    pub rewrite: Option<Rewrite>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Redirect {
    /// `http` or `https`; default: the request's.
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathChange>,
    /// 301 or 302 (the default).
    pub status: Option<u16>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathChange>,
}

/// Exactly one: the whole path, or the prefix the rule's match matched.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathChange {
    pub full: Option<String>,
    pub prefix: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Match {
    pub path: Option<PathMatch>,
    pub method: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// Headers and query parameters whose whole value must match a regular expression.
    #[serde(default)]
    pub header_regex: BTreeMap<String, String>,
    #[serde(default)]
    pub query_regex: BTreeMap<String, String>,
    pub grpc: Option<GrpcMatch>,
}

/// Exactly one of the three; `regex` must match the whole path (RE2 syntax).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcMatch {
    pub service: String,
    pub method: Option<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendRef {
    /// `name` or `name.namespace` of a service in the file.
    pub service: String,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderChanges {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Retry {
    /// Attempts in all, the first included.
    #[serde(default = "three")]
    pub attempts: u32,
    /// Statuses retried: codes like 503, or classes like "5xx".
    #[serde(default)]
    pub statuses: Vec<StatusSpec>,
    /// gRPC codes retried, by name: `unavailable`, `resource-exhausted`, ...
    #[serde(default)]
    pub grpc_codes: Vec<String>,
    /// Also retry non-idempotent methods (POST, PATCH).
    #[serde(default)]
    pub non_idempotent: bool,
    pub per_try_timeout: Option<Setting>,
    /// Bodies up to this size are kept for replay; larger ones are not retried.
    #[serde(default = "max_body")]
    pub max_body_bytes: u32,
    /// The first backoff; it doubles per retry, with jitter.
    pub backoff: Option<Setting>,
    /// Retries at most `percent` of the rule's requests plus `minPerSecond`; default 20 %
    /// and 10 per second.
    pub budget: Option<RetryBudget>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryBudget {
    pub percent: f64,
    #[serde(default)]
    pub min_per_second: u32,
}

fn three() -> u32 {
    3
}

fn max_body() -> u32 {
    64 * 1024
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum StatusSpec {
    Code(u16),
    Class(String),
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultDelay {
    pub percent: f64,
    pub duration: Setting,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultAbort {
    pub percent: f64,
    pub status: u16,
}

/// gRPC status codes by the names routes use.
const GRPC_CODES: [(&str, u32); 16] = [
    ("cancelled", 1),
    ("unknown", 2),
    ("invalid-argument", 3),
    ("deadline-exceeded", 4),
    ("not-found", 5),
    ("already-exists", 6),
    ("permission-denied", 7),
    ("resource-exhausted", 8),
    ("failed-precondition", 9),
    ("aborted", 10),
    ("out-of-range", 11),
    ("unimplemented", 12),
    ("internal", 13),
    ("unavailable", 14),
    ("data-loss", 15),
    ("unauthenticated", 16),
];

fn statuses(specs: &[StatusSpec]) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for s in specs {
        match s {
            StatusSpec::Code(c) if (100..=599).contains(c) => out.push(u32::from(*c)),
            StatusSpec::Class(c) if c.len() == 3 && c.ends_with("xx") => {
                let d = c[..1].parse::<u32>().ok().filter(|d| (1..=5).contains(d));
                let d = d.ok_or_else(|| format!("status class {c:?} must be 1xx to 5xx"))?;
                out.extend(d * 100..d * 100 + 100);
            }
            StatusSpec::Class(c) if c.parse::<u16>().is_ok() => {
                out.extend(statuses(&[StatusSpec::Code(c.parse().expect("checked"))])?)
            }
            other => return Err(format!("status {other:?} must be a code like 503 or a class like \"5xx\"")),
        }
    }
    Ok(out)
}

/// Checks every route; errors name the route, rule and field.
pub fn validate(routes: &[Route], services: Services<'_>) -> Result<(), Invalid> {
    let invalid = |path: &str, msg: String| Invalid { path: path.to_string(), msg };
    let mut names = std::collections::HashSet::new();
    let mut parents = std::collections::HashSet::new();
    for (i, r) in routes.iter().enumerate() {
        let at = format!("routes[{i}] ({})", r.name);
        if !names.insert(&r.name) {
            return Err(invalid(&at, "duplicate route name".into()));
        }
        let parent = services(&r.service).ok_or_else(|| {
            invalid(&at, format!("unknown service {:?}; name a service of this file", r.service))
        })?;
        if !parents.insert(parent) {
            let msg = format!("service {:?} already has a route; put all its rules in one", r.service);
            return Err(invalid(&at, msg));
        }
        if r.rules.is_empty() {
            return Err(invalid(&at, "a route needs at least one rule".into()));
        }
        for (j, rule) in r.rules.iter().enumerate() {
            convert_rule(services, r, j, rule).map_err(|e| invalid(&format!("{at}.rules[{j}]"), e))?;
        }
    }
    Ok(())
}

/// A route's rules as the proxies receive them (rules that do not convert are left
/// out; validation refused them before).
pub fn rules(route: &Route, services: Services<'_>) -> Vec<api::Rule> {
    route
        .rules
        .iter()
        .enumerate()
        .filter_map(|(j, rule)| convert_rule(services, route, j, rule).ok())
        .collect()
}

fn kv(m: &BTreeMap<String, String>) -> Vec<api::KeyValue> {
    m.iter().map(|(k, v)| api::KeyValue { name: k.to_ascii_lowercase(), value: v.clone() }).collect()
}

fn header_name(n: &str) -> Result<(), String> {
    http::HeaderName::from_bytes(n.as_bytes())
        .map(drop)
        .map_err(|_| format!("{n:?} is not a valid header name"))
}

fn convert_rule(services: Services<'_>, route: &Route, j: usize, rule: &Rule) -> Result<api::Rule, String> {
    let mut matches = Vec::new();
    for (k, m) in rule.matches.iter().enumerate() {
        let at = format!("matches[{k}]");
        let mut out = api::Match::default();
        if let Some(path) = &m.path {
            match (&path.exact, &path.prefix, &path.regex) {
                (Some(p), None, None) | (None, Some(p), None) if !p.starts_with('/') => {
                    return Err(format!("{at}.path: {p:?} must start with '/'"))
                }
                (Some(p), None, None) => out.path_exact = p.clone(),
                (None, Some(p), None) => out.path_prefix = p.clone(),
                (None, None, Some(r)) => {
                    weft_api::pattern::compile(r).map_err(|e| format!("{at}.path.regex: {e}"))?;
                    out.path_regex = r.clone();
                }
                _ => return Err(format!("{at}.path: give exactly one of exact, prefix or regex")),
            }
        }
        if let Some(method) = &m.method {
            http::Method::from_bytes(method.as_bytes())
                .map_err(|_| format!("{at}.method: {method:?} is not an HTTP method"))?;
            out.method = method.clone();
        }
        for name in m.headers.keys() {
            header_name(name).map_err(|e| format!("{at}.headers: {e}"))?;
        }
        out.headers = kv(&m.headers);
        out.query =
            m.query.iter().map(|(k, v)| api::KeyValue { name: k.clone(), value: v.clone() }).collect();
        for (name, pattern) in &m.header_regex {
            header_name(name).map_err(|e| format!("{at}.headerRegex: {e}"))?;
            weft_api::pattern::compile(pattern).map_err(|e| format!("{at}.headerRegex[{name}]: {e}"))?;
        }
        for (name, pattern) in &m.query_regex {
            weft_api::pattern::compile(pattern).map_err(|e| format!("{at}.queryRegex[{name}]: {e}"))?;
        }
        out.header_regex = kv(&m.header_regex);
        out.query_regex =
            m.query_regex.iter().map(|(k, v)| api::KeyValue { name: k.clone(), value: v.clone() }).collect();
        if let Some(g) = &m.grpc {
            if g.service.is_empty() || g.service.contains('/') {
                return Err(format!(
                    "{at}.grpc.service: {:?} must be a package-qualified service like pkg.Svc",
                    g.service
                ));
            }
            out.grpc_service = g.service.clone();
            out.grpc_method = g.method.clone().unwrap_or_default();
        }
        matches.push(out);
    }
    let mut backends = Vec::new();
    for (k, b) in rule.backends.iter().enumerate() {
        let authority =
            services(&b.service).ok_or_else(|| format!("backends[{k}]: unknown service {:?}", b.service))?;
        backends.push(api::Backend { authority, weight: b.weight });
    }
    if !backends.is_empty() && backends.iter().all(|b| b.weight == 0) {
        return Err("backends: at least one weight must be above 0".into());
    }
    for (field, changes) in
        [("requestHeaders", &rule.request_headers), ("responseHeaders", &rule.response_headers)]
    {
        for name in changes.set.keys().chain(changes.add.keys()).chain(&changes.remove) {
            header_name(name).map_err(|e| format!("{field}: {e}"))?;
        }
        for (name, value) in changes.set.iter().chain(&changes.add) {
            http::HeaderValue::from_str(value)
                .map_err(|_| format!("{field}: the value of {name} is not a valid header value"))?;
        }
    }
    let ms = |d: &Option<Setting>| d.map_or(0, Setting::millis);
    let permille = |p: f64, field: &str| -> Result<u32, String> {
        if (0.0..=100.0).contains(&p) {
            Ok((p * 10.0).round() as u32)
        } else {
            Err(format!("{field}: {p} must be a percentage between 0 and 100"))
        }
    };
    let retry = match &rule.retry {
        None => None,
        Some(r) => {
            if !(1..=10).contains(&r.attempts) {
                return Err("retry.attempts: must be between 1 and 10".into());
            }
            if r.budget.as_ref().is_some_and(|b| b.percent <= 0.0 && b.min_per_second == 0) {
                return Err(
                    "retry.budget: allows no retries; give a percent above 0 or remove the retry".into()
                );
            }
            let mut grpc_codes = Vec::new();
            for name in &r.grpc_codes {
                let code = GRPC_CODES.iter().find(|(n, _)| n == name).map(|(_, c)| *c).ok_or_else(|| {
                    format!("retry.grpcCodes: unknown code {name:?}; use names like unavailable or resource-exhausted")
                })?;
                grpc_codes.push(code);
            }
            Some(api::Retry {
                attempts: r.attempts,
                statuses: statuses(&r.statuses).map_err(|e| format!("retry.statuses: {e}"))?,
                grpc_codes,
                non_idempotent: r.non_idempotent,
                per_try_timeout_ms: ms(&r.per_try_timeout),
                max_body_bytes: r.max_body_bytes,
                backoff_ms: r.backoff.map_or(25, Setting::millis),
                budget_permille: match &r.budget {
                    None => 0,
                    Some(b) => permille(b.percent, "retry.budget.percent")?,
                },
                budget_min_per_second: r.budget.as_ref().map_or(0, |b| b.min_per_second),
            })
        }
    };
    let fault = match &rule.fault {
        None => None,
        Some(f) => {
            let mut out = api::Fault::default();
            if let Some(d) = &f.delay {
                out.delay_permille = permille(d.percent, "fault.delay.percent")?;
                out.delay_ms = d.duration.millis();
            }
            if let Some(a) = &f.abort {
                out.abort_permille = permille(a.percent, "fault.abort.percent")?;
                if !(200..=599).contains(&a.status) {
                    return Err(format!("fault.abort.status: {} must be an HTTP status 200-599", a.status));
                }
                out.abort_status = u32::from(a.status);
            }
            Some(out)
        }
    };
    let path_change = |field: &str, p: &Option<PathChange>| -> Result<Option<api::PathChange>, String> {
        use api::path_change::Change;
        let Some(p) = p else { return Ok(None) };
        let change = match (&p.full, &p.prefix) {
            (Some(f), None) if f.starts_with('/') => Change::Full(f.clone()),
            (Some(f), None) => return Err(format!("{field}.full: {f:?} must start with '/'")),
            (None, Some(_))
                if !rule.matches.iter().any(|m| m.path.as_ref().is_some_and(|p| p.prefix.is_some())) =>
            {
                return Err(format!("{field}.prefix: the rule needs a match on a path prefix to replace"))
            }
            (None, Some(prefix)) => Change::Prefix(prefix.clone()),
            _ => return Err(format!("{field}: give exactly one of full or prefix")),
        };
        Ok(Some(api::PathChange { change: Some(change) }))
    };
    let redirect = match &rule.redirect {
        None => None,
        Some(r) => {
            if r.scheme.as_deref().is_some_and(|s| s != "http" && s != "https") {
                return Err(format!(
                    "redirect.scheme: {:?} must be http or https",
                    r.scheme.as_deref().unwrap_or("")
                ));
            }
            let status = r.status.unwrap_or(302);
            if status != 301 && status != 302 {
                return Err(format!("redirect.status: {status} must be 301 or 302"));
            }
            Some(api::Redirect {
                scheme: r.scheme.clone().unwrap_or_default(),
                hostname: r.hostname.clone().unwrap_or_default(),
                port: r.port.map_or(0, u32::from),
                path: path_change("redirect.path", &r.path)?,
                status: u32::from(status),
            })
        }
    };
    let rewrite = match &rule.rewrite {
        None => None,
        Some(_) if redirect.is_some() => return Err("give redirect or rewrite, not both".into()),
        Some(r) => Some(api::Rewrite {
            hostname: r.hostname.clone().unwrap_or_default(),
            path: path_change("rewrite.path", &r.path)?,
        }),
    };
    for host in [
        rule.redirect.as_ref().and_then(|r| r.hostname.as_ref()),
        rule.rewrite.as_ref().and_then(|r| r.hostname.as_ref()),
    ]
    .into_iter()
    .flatten()
    {
        if host.parse::<http::uri::Authority>().is_err() || host.contains(':') {
            return Err(format!("hostname {host:?} is not a host name"));
        }
    }
    Ok(api::Rule {
        name: format!("{}/{j}", route.name),
        redirect,
        rewrite,
        matches,
        backends,
        set_request_headers: kv(&rule.request_headers.set),
        add_request_headers: kv(&rule.request_headers.add),
        remove_request_headers: rule.request_headers.remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
        set_response_headers: kv(&rule.response_headers.set),
        add_response_headers: kv(&rule.response_headers.add),
        remove_response_headers: rule
            .response_headers
            .remove
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        timeout_ms: ms(&rule.timeout),
        retry,
        fault,
    })
}

#[cfg(test)]
mod tests {
    use crate::server::mesh::Mesh;

    const MESH: &str = r#"
workloads:
  - name: web
    token: web-token-0123456789
services:
  - {name: words, port: 8080}
  - {name: words-v1, port: 8080}
  - {name: words-v2, port: 8080}
routes:
  - name: words-split
    service: words
    rules:
      - matches: [{headers: {X-Canary: "1"}}]
        backends: [{service: words-v2}]
      - matches: [{path: {prefix: /api}, method: GET}, {grpc: {service: pkg.Words}}]
        backends: [{service: words-v1, weight: 90}, {service: words-v2, weight: 10}]
        timeout: 2s
        retry: {attempts: 3, statuses: ["5xx", 429], grpcCodes: [unavailable], perTryTimeout: 300ms}
        fault: {abort: {percent: 12.5, status: 503}}
"#;

    #[test]
    fn rules_become_what_proxies_receive() {
        let mesh = Mesh::parse("m", MESH).unwrap();
        let set = mesh.route_set("words:8080", "default");
        assert_eq!(set.rules.len(), 2);
        assert_eq!(set.rules[0].matches[0].headers[0].name, "x-canary");
        assert_eq!(set.rules[0].backends[0].authority, "words-v2.default:8080");
        let r = &set.rules[1];
        assert_eq!(r.name, "words-split/1");
        assert_eq!(r.matches[0].path_prefix, "/api");
        assert_eq!(r.matches[1].grpc_service, "pkg.Words");
        assert_eq!(r.timeout_ms, 2000);
        let retry = r.retry.as_ref().unwrap();
        assert_eq!(retry.statuses.len(), 101);
        assert!(retry.statuses.contains(&429) && retry.statuses.contains(&503));
        assert_eq!(
            (retry.grpc_codes.as_slice(), retry.per_try_timeout_ms, retry.backoff_ms),
            (&[14][..], 300, 25)
        );
        assert_eq!(r.fault.as_ref().unwrap().abort_permille, 125);
        assert!(mesh.route_set("words-v1:8080", "default").rules.is_empty());
    }

    fn err(text: &str) -> String {
        Mesh::parse("m", text).unwrap_err().to_string()
    }

    #[test]
    fn bad_routes_are_named() {
        let e = err(&MESH.replace("backends: [{service: words-v2}]", "backends: [{service: nope}]"));
        assert!(
            e.contains("routes[0] (words-split).rules[0]") && e.contains("unknown service \"nope\""),
            "{e}"
        );
        // Its line, though validation sees parsed values: line 14 names the backend.
        assert!(e.contains("m: line 14: "), "{e}");
        let e = err(&MESH.replace("timeout: 2s", "timeout: soon"));
        assert!(
            e.contains("rules[1]") && e.contains("\"soon\"") && e.contains("300ms") && e.contains("line"),
            "{e}"
        );
        let e = err(&MESH.replace("status: 503", "status: 42"));
        assert!(e.contains("fault.abort.status"), "{e}");
        let e = err(&MESH.replace("percent: 12.5", "percent: 120"));
        assert!(e.contains("fault.abort.percent"), "{e}");
        let e = err(&MESH.replace("grpcCodes: [unavailable]", "grpcCodes: [down]"));
        assert!(e.contains("unknown code \"down\""), "{e}");
        let e = err(&MESH.replace("prefix: /api", "prefix: api"));
        assert!(e.contains("must start with '/'"), "{e}");
        let with = |extra: &str| {
            MESH.replace("        timeout: 2s\n", &format!("        timeout: 2s\n        {extra}\n"))
        };
        let e = err(&with("redirect: {status: 307}"));
        assert!(e.contains("rules[1]") && e.contains("redirect.status"), "{e}");
        let e = err(&with("redirect: {scheme: ftp}"));
        assert!(e.contains("redirect.scheme"), "{e}");
        let e = err(&with("rewrite: {path: {full: /a, prefix: /b}}"));
        assert!(e.contains("rewrite.path") && e.contains("exactly one"), "{e}");
        let e = err(&with("redirect: {hostname: x}\n        rewrite: {hostname: y}"));
        assert!(e.contains("not both"), "{e}");
        let e = err(&MESH.replace("backends: [{service: words-v2}]", "rewrite: {path: {prefix: /x}}"));
        assert!(e.contains("rules[0]") && e.contains("match on a path prefix"), "{e}");
        let e = err(&with("rewrite: {hostname: \"a b\"}"));
        assert!(e.contains("not a host name"), "{e}");
        let e = err(&MESH.replace("service: words\n", "service: letters\n"));
        assert!(e.contains("unknown service \"letters\""), "{e}");
        let e = err(&MESH.replace("attempts: 3", "attempts: 0"));
        assert!(e.contains("retry.attempts"), "{e}");
    }
}
