//! The URL changes a route rule can ask for (Gateway API `RequestRedirect` and
//! `URLRewrite`): a redirect the proxy answers itself, without sending the request; a
//! rewrite of the host and path the upstream sees.

use http::{header, uri::PathAndQuery, HeaderValue, Request, Response, StatusCode, Uri};
use weft_api::v1::{path_change::Change, PathChange, Redirect, Rewrite, Rule};

use super::routes;
use crate::http::{headers, Body};

/// The redirect response for `req`.
pub fn redirect<B>(r: &Redirect, rule: &Rule, req: &Request<B>) -> Response<Body> {
    let authority = headers::authority(req);
    let scheme = match r.scheme.as_str() {
        "" => req.uri().scheme_str().unwrap_or("http").to_string(),
        s => s.to_string(),
    };
    let host = match r.hostname.as_str() {
        "" => authority.as_ref().map(|a| a.host().to_string()).unwrap_or_default(),
        h => h.to_string(),
    };
    // Gateway API: the scheme's well-known port when the redirect names a scheme, else
    // the request's; a well-known port is left out of the Location.
    let port = match (r.port, r.scheme.is_empty()) {
        (0, false) => None,
        (0, true) => authority.as_ref().and_then(|a| a.port_u16()),
        (p, _) => u16::try_from(p).ok(),
    };
    let well_known = |p: u16| (scheme == "http" && p == 80) || (scheme == "https" && p == 443);
    let port = port.filter(|p| !well_known(*p)).map(|p| format!(":{p}")).unwrap_or_default();
    let path = changed_path(r.path.as_ref(), rule, req.uri());
    let location = format!("{scheme}://{host}{port}{path}");
    let status = match r.status {
        301 => StatusCode::MOVED_PERMANENTLY,
        _ => StatusCode::FOUND,
    };
    let mut rsp = Response::new(crate::body::empty());
    *rsp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(&location) {
        rsp.headers_mut().insert(header::LOCATION, v);
    }
    rsp
}

/// Changes `req`'s host and path as the rule says.
pub fn rewrite<B>(r: &Rewrite, rule: &Rule, req: &mut Request<B>) {
    if r.path.as_ref().and_then(|p| p.change.as_ref()).is_some() {
        let path = changed_path(r.path.as_ref(), rule, req.uri());
        if let Ok(pq) = path.parse::<PathAndQuery>() {
            let mut parts = req.uri().clone().into_parts();
            parts.path_and_query = Some(pq);
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
    if !r.hostname.is_empty() {
        let port = headers::authority(req).and_then(|a| a.port_u16());
        let host = match port {
            Some(p) => format!("{}:{p}", r.hostname),
            None => r.hostname.clone(),
        };
        if let Ok(v) = HeaderValue::from_str(&host) {
            req.headers_mut().insert(header::HOST, v);
        }
        if req.uri().authority().is_some() {
            let mut parts = req.uri().clone().into_parts();
            parts.authority = host.parse().ok();
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
}

/// The path (and query) after `change`: replaced whole, or the prefix the rule's match
/// matched replaced, by whole segments.
fn changed_path(change: Option<&PathChange>, rule: &Rule, uri: &Uri) -> String {
    let path = uri.path();
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let new = match change.and_then(|c| c.change.as_ref()) {
        None => path.to_string(),
        Some(Change::Full(full)) => full.clone(),
        Some(Change::Prefix(replacement)) => {
            let matched = rule
                .matches
                .iter()
                .map(|m| m.path_prefix.trim_end_matches('/'))
                .find(|p| !p.is_empty() && routes::prefix_matches(path, p))
                .unwrap_or("");
            let rest = &path[matched.len()..];
            let replacement = replacement.trim_end_matches('/');
            match (replacement.is_empty(), rest.is_empty()) {
                (true, true) => "/".to_string(),
                (true, false) => rest.to_string(),
                (false, _) => format!("{replacement}{rest}"),
            }
        }
    };
    format!("{new}{query}")
}

#[cfg(test)]
mod tests {
    use weft_api::v1::Match;

    use super::*;

    fn rule(prefix: &str) -> Rule {
        Rule {
            matches: vec![Match { path_prefix: prefix.into(), ..Default::default() }],
            ..Default::default()
        }
    }

    fn prefix(p: &str) -> Option<PathChange> {
        Some(PathChange { change: Some(Change::Prefix(p.into())) })
    }

    fn req(uri: &str, host: &str) -> Request<()> {
        Request::builder().uri(uri).header("host", host).body(()).unwrap()
    }

    fn location(r: &Redirect, rule: &Rule, uri: &str, host: &str) -> String {
        let rsp = redirect(r, rule, &req(uri, host));
        rsp.headers()[header::LOCATION].to_str().unwrap().to_string()
    }

    #[test]
    fn redirects_keep_what_they_do_not_change() {
        let r = Redirect { scheme: "https".into(), status: 301, ..Default::default() };
        assert_eq!(location(&r, &rule(""), "/a?x=1", "words:8080"), "https://words/a?x=1");
        assert_eq!(redirect(&r, &rule(""), &req("/", "w")).status(), 301);
        let r = Redirect { hostname: "new.example".into(), ..Default::default() };
        assert_eq!(location(&r, &rule(""), "/a", "words:8080"), "http://new.example:8080/a");
        let r = Redirect { port: 443, scheme: "https".into(), path: prefix("/v2"), ..Default::default() };
        assert_eq!(location(&r, &rule("/v1"), "/v1/items", "w"), "https://w/v2/items");
        assert_eq!(redirect(&r, &rule("/v1"), &req("/", "w")).status(), 302);
    }

    #[test]
    fn prefix_rewrites_replace_whole_segments() {
        let mut q = req("/api/items?id=3", "words:8080");
        let r = Rewrite { hostname: "backend".into(), path: prefix("/v2") };
        rewrite(&r, &rule("/api"), &mut q);
        assert_eq!(q.uri(), "/v2/items?id=3");
        assert_eq!(q.headers()["host"], "backend:8080");
        let mut q = req("/api", "w");
        rewrite(&Rewrite { path: prefix("/"), ..Default::default() }, &rule("/api/"), &mut q);
        assert_eq!(q.uri(), "/");
        let mut q = req("/api/x", "w");
        rewrite(&Rewrite { path: prefix(""), ..Default::default() }, &rule("/api"), &mut q);
        assert_eq!(q.uri(), "/x");
        let mut q = req("http://w:80/old?q", "w:80");
        let full = Some(PathChange { change: Some(Change::Full("/new".into())) });
        rewrite(&Rewrite { hostname: "n".into(), path: full }, &rule(""), &mut q);
        assert_eq!(q.uri().to_string(), "http://n:80/new?q");
    }
}
