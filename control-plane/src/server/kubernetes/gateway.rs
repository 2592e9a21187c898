//! Gateway API routes attached to Services (GAMMA) → the mesh's route rules. A route in
//! another namespace than its parent Service is a consumer route: it applies to its own
//! namespace's clients only. What Weft cannot honour (a regular-expression match, an
//! unsupported filter, a parent or backend it does not know) makes the whole route be
//! ignored, with a problem naming the object and the field: never half of a route.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use weft_api::duration::Setting;

use super::resources::{BackendRef, Filter, GRPCRoute, HTTPRoute, HttpRouteRule, ParentRef, ValueMatch};
use crate::server::routes::{self, GrpcMatch, HeaderChanges, Match, PathMatch, Route, Rule};

/// Ports of a Service (`namespace`, `name`), empty when there is no such Service.
pub type Ports<'a> = &'a dyn Fn(&str, &str) -> Vec<u16>;

/// Why an object was ignored: `kind namespace/name: field: what`.
pub type Problem = String;

/// The routes an HTTPRoute makes, one per parent Service port.
pub fn http_route(r: &HTTPRoute, ports: Ports<'_>) -> Result<Vec<Route>, Problem> {
    let (ns, name) =
        (r.metadata.namespace.clone().unwrap_or_default(), r.metadata.name.clone().unwrap_or_default());
    let at = |field: String, msg: String| format!("HTTPRoute {ns}/{name}: {field}: {msg}");
    let annotated = annotated_retry(&r.metadata, false).map_err(|(f, m)| at(f, m))?;
    let mut rules = Vec::new();
    for (i, rule) in r.spec.rules.iter().enumerate() {
        let mut out = http_rule(rule, &ns, ports).map_err(|(f, m)| at(format!("spec.rules[{i}].{f}"), m))?;
        if out.retry.is_none() {
            out.retry = annotated.clone();
        }
        rules.push(out);
    }
    attach(&ns, &name, &r.spec.parent_refs, rules, ports).map_err(|(f, m)| at(f, m))
}

/// Retries from the route's `retry.weft.dev/*` annotations, for every rule without the
/// Gateway API's own `retry` (GRPCRoute has none): `limit` (retries after the first
/// attempt, default 1), `http` (statuses: `5xx,429`), `grpc` (codes: `unavailable`),
/// `timeout` (each attempt). On a GRPCRoute the listed codes are retried for every call:
/// gRPC calls are all POSTs, and only the codes that say a call was not processed belong
/// there.
fn annotated_retry(meta: &ObjectMeta, grpc: bool) -> Result<Option<routes::Retry>, Bad> {
    let Some(annotations) = &meta.annotations else { return Ok(None) };
    let get = |key: &str| annotations.get(&format!("retry.weft.dev/{key}")).map(|v| v.trim());
    let (limit, http, codes, timeout) = (get("limit"), get("http"), get("grpc"), get("timeout"));
    if limit.is_none() && http.is_none() && codes.is_none() {
        return Ok(None);
    }
    let field = |key: &str| format!("metadata.annotations[retry.weft.dev/{key}]");
    let retries = match limit {
        None => 1,
        Some(l) => {
            l.parse::<u32>().map_err(|_| (field("limit"), format!("{l:?} is not a number of retries")))?
        }
    };
    let list = |v: Option<&str>| -> Vec<String> {
        v.map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
            .unwrap_or_default()
    };
    let statuses = list(http).into_iter().map(routes::StatusSpec::Class).collect();
    let per_try_timeout =
        timeout.map(|t| gateway_duration(t).map(Setting).map_err(|e| (field("timeout"), e))).transpose()?;
    Ok(Some(routes::Retry {
        attempts: retries.saturating_add(1),
        statuses,
        grpc_codes: list(codes),
        non_idempotent: grpc,
        per_try_timeout,
        max_body_bytes: 64 * 1024,
        backoff: None,
        budget: None,
    }))
}

/// The routes a GRPCRoute makes, one per parent Service port.
pub fn grpc_route(r: &GRPCRoute, ports: Ports<'_>) -> Result<Vec<Route>, Problem> {
    let (ns, name) =
        (r.metadata.namespace.clone().unwrap_or_default(), r.metadata.name.clone().unwrap_or_default());
    let at = |field: String, msg: String| format!("GRPCRoute {ns}/{name}: {field}: {msg}");
    let annotated = annotated_retry(&r.metadata, true).map_err(|(f, m)| at(f, m))?;
    let mut rules = Vec::new();
    for (i, rule) in r.spec.rules.iter().enumerate() {
        let field = |f: String, m: String| at(format!("spec.rules[{i}].{f}"), m);
        let mut out = Rule::default();
        for (k, m) in rule.matches.iter().enumerate() {
            let (headers, header_regex) =
                header_values(&m.headers).map_err(|e| field(format!("matches[{k}].headers"), e))?;
            let mut matched = Match { headers, header_regex, ..Match::default() };
            if let Some(method) = &m.method {
                if method.kind.as_deref().is_some_and(|t| t != "Exact") {
                    return Err(field(format!("matches[{k}].method.type"), "only Exact is supported".into()));
                }
                match &method.service {
                    Some(service) => {
                        matched.grpc =
                            Some(GrpcMatch { service: service.clone(), method: method.method.clone() })
                    }
                    None if method.method.is_some() => {
                        return Err(field(
                            format!("matches[{k}].method"),
                            "a method needs its service".into(),
                        ))
                    }
                    None => {}
                }
            }
            out.matches.push(matched);
        }
        filters(&rule.filters, &mut out).map_err(|(f, m)| field(f, m))?;
        out.backends = backends(&rule.backend_refs, &ns, ports).map_err(|(f, m)| field(f, m))?;
        out.retry = annotated.clone();
        rules.push(out);
    }
    attach(&ns, &name, &r.spec.parent_refs, rules, ports).map_err(|(f, m)| at(f, m))
}

type Bad = (String, String);

fn http_rule(rule: &HttpRouteRule, ns: &str, ports: Ports<'_>) -> Result<Rule, Bad> {
    let mut out = Rule::default();
    for (k, m) in rule.matches.iter().enumerate() {
        let f = |field: &str| format!("matches[{k}].{field}");
        let path = match &m.path {
            None => None,
            Some(p) => {
                let value = p.value.clone().unwrap_or_else(|| "/".into());
                match p.kind.as_deref().unwrap_or("PathPrefix") {
                    "Exact" => Some(PathMatch { exact: Some(value), ..PathMatch::default() }),
                    "PathPrefix" => Some(PathMatch { prefix: Some(value), ..PathMatch::default() }),
                    "RegularExpression" => Some(PathMatch { regex: Some(value), ..PathMatch::default() }),
                    other => {
                        return Err((
                            f("path.type"),
                            format!(
                            "{other} is not a path match type; use Exact, PathPrefix or RegularExpression"
                        ),
                        ))
                    }
                }
            }
        };
        let (query, query_regex) = values(&m.query_params).map_err(|e| (f("queryParams"), e))?;
        let (headers, header_regex) = header_values(&m.headers).map_err(|e| (f("headers"), e))?;
        out.matches.push(Match {
            path,
            method: m.method.clone(),
            headers,
            query,
            header_regex,
            query_regex,
            grpc: None,
        });
    }
    filters(&rule.filters, &mut out)?;
    out.backends = backends(&rule.backend_refs, ns, ports)?;
    let duration = |field: &str, d: &Option<String>| -> Result<Option<Setting>, Bad> {
        d.as_deref().map(|d| gateway_duration(d).map(Setting).map_err(|e| (field.to_string(), e))).transpose()
    };
    let request = duration("timeouts.request", &rule.timeouts.as_ref().and_then(|t| t.request.clone()))?;
    let backend =
        duration("timeouts.backendRequest", &rule.timeouts.as_ref().and_then(|t| t.backend_request.clone()))?;
    out.timeout = request;
    if let Some(retry) = &rule.retry {
        let statuses = retry.codes.iter().map(|c| routes::StatusSpec::Code(*c)).collect();
        out.retry = Some(routes::Retry {
            attempts: retry.attempts.unwrap_or(1).saturating_add(1),
            statuses,
            grpc_codes: Vec::new(),
            non_idempotent: false,
            per_try_timeout: backend,
            max_body_bytes: 64 * 1024,
            backoff: duration("retry.backoff", &retry.backoff)?,
            budget: None,
        });
    } else if backend.is_some() {
        // One attempt: its timeout bounds the request too.
        out.timeout = match (request, backend) {
            (Some(r), Some(b)) => Some(r.min(b)),
            (r, b) => r.or(b),
        };
    }
    Ok(out)
}

type Values = BTreeMap<String, String>;

/// Header or query matches: (exact ones, regular-expression ones), by name.
fn values(matches: &[ValueMatch]) -> Result<(Values, Values), String> {
    let (mut exact, mut regex) = (BTreeMap::new(), BTreeMap::new());
    for v in matches {
        let into = match v.kind.as_deref().unwrap_or("Exact") {
            "Exact" => &mut exact,
            "RegularExpression" => &mut regex,
            other => {
                return Err(format!(
                    "{}: {other} is not a match type; use Exact or RegularExpression",
                    v.name
                ))
            }
        };
        into.insert(v.name.clone(), v.value.clone());
    }
    Ok((exact, regex))
}

/// Header names are case-insensitive: lowercased.
fn header_values(matches: &[ValueMatch]) -> Result<(Values, Values), String> {
    let lower = |m: Values| m.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect();
    let (exact, regex) = values(matches)?;
    Ok((lower(exact), lower(regex)))
}

fn filters(filters: &[Filter], out: &mut Rule) -> Result<(), Bad> {
    for (k, f) in filters.iter().enumerate() {
        let changes = |m: &Option<super::resources::HeaderModifier>| -> Result<HeaderChanges, Bad> {
            let m = m.as_ref().ok_or_else(|| {
                (format!("filters[{k}]"), format!("{} filter without its settings", f.kind))
            })?;
            let pairs = |h: &[super::resources::Header]| {
                h.iter().map(|h| (h.name.clone(), h.value.clone())).collect()
            };
            Ok(HeaderChanges { set: pairs(&m.set), add: pairs(&m.add), remove: m.remove.clone() })
        };
        match f.kind.as_str() {
            "RequestHeaderModifier" => out.request_headers = changes(&f.request_header_modifier)?,
            "ResponseHeaderModifier" => out.response_headers = changes(&f.response_header_modifier)?,
            "RequestRedirect" => {
                let missing =
                    || (format!("filters[{k}]"), "RequestRedirect filter without its settings".to_string());
                let r = f.request_redirect.as_ref().ok_or_else(missing)?;
                let path =
                    path_change(&r.path).map_err(|e| (format!("filters[{k}].requestRedirect.path"), e))?;
                out.redirect = Some(routes::Redirect {
                    scheme: r.scheme.clone(),
                    hostname: r.hostname.clone(),
                    port: r.port,
                    path,
                    status: r.status_code,
                });
            }
            "URLRewrite" => {
                let missing =
                    || (format!("filters[{k}]"), "URLRewrite filter without its settings".to_string());
                let r = f.url_rewrite.as_ref().ok_or_else(missing)?;
                let path = path_change(&r.path).map_err(|e| (format!("filters[{k}].urlRewrite.path"), e))?;
                out.rewrite = Some(routes::Rewrite { hostname: r.hostname.clone(), path });
            }
            other => {
                return Err((
                    format!("filters[{k}].type"),
                    format!(
                        "{other} is not supported yet; use RequestHeaderModifier, ResponseHeaderModifier, \
                         RequestRedirect or URLRewrite"
                    ),
                ))
            }
        }
    }
    Ok(())
}

fn path_change(p: &Option<super::resources::PathModifier>) -> Result<Option<routes::PathChange>, String> {
    let Some(p) = p else { return Ok(None) };
    match p.kind.as_str() {
        "ReplaceFullPath" => Ok(Some(routes::PathChange { full: p.replace_full_path.clone(), prefix: None })),
        "ReplacePrefixMatch" => {
            Ok(Some(routes::PathChange { full: None, prefix: p.replace_prefix_match.clone() }))
        }
        other => Err(format!("{other} is not a path modifier; use ReplaceFullPath or ReplacePrefixMatch")),
    }
}

fn backends(refs: &[BackendRef], ns: &str, ports: Ports<'_>) -> Result<Vec<routes::BackendRef>, Bad> {
    let mut out = Vec::new();
    for (k, b) in refs.iter().enumerate() {
        let field = format!("backendRefs[{k}]");
        if b.group.as_deref().is_some_and(|g| !g.is_empty())
            || b.kind.as_deref().is_some_and(|k| k != "Service")
        {
            return Err((field, "only Services are supported as backends".into()));
        }
        let bns = b.namespace.as_deref().unwrap_or(ns);
        let known = ports(bns, &b.name);
        let port = match (b.port, known.as_slice()) {
            (_, []) => return Err((field, format!("no Service {bns}/{}", b.name))),
            (Some(p), known) if known.contains(&p) => p,
            (Some(p), _) => {
                return Err((format!("{field}.port"), format!("Service {bns}/{} has no port {p}", b.name)))
            }
            (None, [only]) => *only,
            (None, _) => {
                return Err((format!("{field}.port"), "the Service has several ports: name one".into()))
            }
        };
        out.push(routes::BackendRef {
            service: format!("{}.{bns}:{port}", b.name),
            weight: b.weight.unwrap_or(1),
        });
    }
    Ok(out)
}

/// One route per Service port the parents name, each keeping the rules in order.
fn attach(
    ns: &str,
    name: &str,
    parents: &[ParentRef],
    rules: Vec<Rule>,
    ports: Ports<'_>,
) -> Result<Vec<Route>, Bad> {
    let mut out = Vec::new();
    for (k, p) in parents.iter().enumerate() {
        let field = format!("spec.parentRefs[{k}]");
        let is_service = p.kind.as_deref() == Some("Service") && p.group.as_deref().is_none_or(str::is_empty);
        if !is_service {
            // A Gateway's route: not the mesh's (another implementation serves it).
            continue;
        }
        let pns = p.namespace.as_deref().unwrap_or(ns);
        let known = ports(pns, &p.name);
        if known.is_empty() {
            return Err((field, format!("no Service {pns}/{}", p.name)));
        }
        let chosen: Vec<u16> = match p.port {
            Some(port) if known.contains(&port) => vec![port],
            Some(port) => {
                return Err((format!("{field}.port"), format!("Service {pns}/{} has no port {port}", p.name)))
            }
            None => known,
        };
        for port in chosen {
            out.push(Route {
                name: format!("{ns}/{name}"),
                service: format!("{}.{pns}:{port}", p.name),
                rules: rules.clone(),
                consumer_namespace: (pns != ns).then(|| ns.to_string()),
            });
        }
    }
    Ok(out)
}

/// The Gateway API's duration: up to four `<number><unit>` parts, `1h30m`, `500ms`.
fn gateway_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{s:?} is not a Gateway API duration like 10s, 500ms or 1h30m");
    let mut total = std::time::Duration::ZERO;
    let mut rest = s;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let unit_len = if rest[digits..].starts_with("ms") { 2 } else { 1 };
        let (part, tail) = rest.split_at(digits + unit_len);
        total += weft_api::duration::parse(part).map_err(|_| bad())?;
        rest = tail;
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err(bad());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_durations() {
        assert_eq!(gateway_duration("1h30m").unwrap().as_secs(), 5400);
        assert_eq!(gateway_duration("500ms").unwrap().as_millis(), 500);
        assert!(gateway_duration("").is_err());
        assert!(gateway_duration("10").is_err());
        assert!(gateway_duration("1d").is_err());
    }
}
