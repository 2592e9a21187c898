//! Header handling shared by every HTTP hop (RFC 9110 §7.6.1 and the mesh's own headers).

use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Version};

use crate::errors::{Cause, CauseError};

/// Set by the outbound proxy when it carries an HTTP/1 request over HTTP/2 to a peer
/// proxy; the peer's inbound restores HTTP/1 towards the application.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("weft-orig-proto");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1). `Connection`
/// can name more; those are removed too.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Refuses a request head larger than `max` bytes (`WEFT_MAX_HEADER_BYTES`).
pub fn check_head_size<B>(req: &Request<B>, max: usize) -> Result<(), crate::errors::CauseError> {
    if head_size(req) <= max {
        return Ok(());
    }
    let msg = format!("request head is larger than {max} bytes (WEFT_MAX_HEADER_BYTES)");
    Err(crate::errors::CauseError::new(crate::errors::Cause::HeaderTooLarge, msg))
}

/// Removes hop-by-hop headers before a message is forwarded. With `keep_upgrade`, an
/// upgrade request or 101 response keeps `Upgrade` and `Connection: upgrade`, which the
/// next hop needs to switch protocols.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of these; one pass over the few headers tells.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k) || k == header::TE) {
        return;
    }
    let upgrade = headers.get(header::UPGRADE).cloned();
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        // `Connection: host` must not let a client strip routing or mesh headers.
        .filter(|name| name != header::HOST && !name.as_str().starts_with("weft-"))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    // `TE: trailers` is how gRPC announces it understands trailers; anything else in TE
    // is about this hop's transfer codings.
    if headers.get(header::TE).is_some_and(|v| v != "trailers") {
        headers.remove(header::TE);
    }
    if keep_upgrade {
        if let Some(upgrade) = upgrade {
            headers.insert(header::UPGRADE, upgrade);
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
}

/// Whether an HTTP/1.1 request asks to switch protocols (WebSocket and the like).
pub fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Approximate size of the request head as the client sent it: request line plus
/// `name: value\r\n` for every header.
pub fn head_size<B>(req: &Request<B>) -> usize {
    let uri = req.uri();
    let target = uri.path_and_query().map_or(1, |pq| pq.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.scheme().map_or(0, |s| s.as_str().len() + 3);
    let line = req.method().as_str().len() + target + 12;
    req.headers().iter().fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4) + 2
}

/// The front door every request passes, both directions, before anything else: one
/// authority, consistent wherever the client wrote it.
/// - Two `Host` headers: 400 (RFC 9112 §3.2).
/// - HTTP/1 absolute form: the target's authority wins; `Host` is set to it
///   (RFC 9112 §3.2.2), so a client cannot send one authority and route by another.
/// - HTTP/2: `:authority` and `host` that differ: 400; `host` alone stands for
///   `:authority` (RFC 9113 §8.3.1).
pub fn front_door<B>(req: &mut Request<B>) -> Result<(), CauseError> {
    let bad = |msg: &str| Err(CauseError::new(Cause::BadRequest, msg.to_string()));
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next().cloned();
    if hosts.next().is_some() {
        return bad("the request has two Host headers (RFC 9112 §3.2); send one");
    }
    let Some(authority) = req.uri().authority().cloned() else {
        if let (Version::HTTP_2, Some(host)) = (req.version(), &host) {
            // h2 without :authority but with host: the same request as with it.
            let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let scheme = req.uri().scheme_str().unwrap_or("http");
            let uri = host.to_str().ok().and_then(|h| format!("{scheme}://{h}{pq}").parse().ok());
            match uri {
                Some(uri) => *req.uri_mut() = uri,
                None => return bad("the host header is not a valid authority"),
            }
        }
        return Ok(());
    };
    match (req.version(), host) {
        (Version::HTTP_2, Some(h)) if h.as_bytes() != authority.as_str().as_bytes() => {
            bad(":authority and host name different authorities; send one, or the same in both")
        }
        (Version::HTTP_2, _) => Ok(()),
        _ => {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                req.headers_mut().insert(header::HOST, v);
            }
            Ok(())
        }
    }
}

/// The authority a request is addressed to: the absolute URI's, else `Host`.
pub fn authority<B>(req: &Request<B>) -> Option<http::uri::Authority> {
    if let Some(a) = req.uri().authority() {
        return Some(a.clone());
    }
    req.headers().get(header::HOST)?.to_str().ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/").version(Version::HTTP_11);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn removes_hop_by_hop_and_connection_named_headers() {
        let mut r = req(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("proxy-authorization", "Basic Zm9v"),
            ("te", "gzip"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(r.headers_mut(), false);
        let names: Vec<_> = r.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-kept"]);
    }

    #[test]
    fn keeps_te_trailers_for_grpc() {
        let mut r = req(&[("te", "trailers")]);
        strip_hop_by_hop(r.headers_mut(), false);
        assert_eq!(r.headers()["te"], "trailers");
    }

    #[test]
    fn connection_cannot_strip_host_or_mesh_headers() {
        let mut r = req(&[
            ("connection", "host, weft-orig-proto"),
            ("host", "a:80"),
            ("weft-orig-proto", "HTTP/1.1"),
        ]);
        strip_hop_by_hop(r.headers_mut(), false);
        assert_eq!(r.headers()["host"], "a:80");
        assert!(r.headers().contains_key("weft-orig-proto"));
    }

    #[test]
    fn upgrade_survives_when_asked() {
        let mut r = req(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&r));
        strip_hop_by_hop(r.headers_mut(), true);
        assert_eq!(r.headers()["upgrade"], "websocket");
        assert_eq!(r.headers()["connection"], "upgrade");
        let mut r = req(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        strip_hop_by_hop(r.headers_mut(), false);
        assert!(r.headers().is_empty());
    }

    #[test]
    fn upgrade_needs_both_headers() {
        assert!(!wants_upgrade(&req(&[("upgrade", "websocket")])));
        assert!(!wants_upgrade(&req(&[("connection", "upgrade")])));
    }

    #[test]
    fn authority_from_uri_or_host() {
        let r = Request::get("http://a.example:8080/x").body(()).unwrap();
        assert_eq!(authority(&r).unwrap().as_str(), "a.example:8080");
        let r = req(&[("host", "b.example")]);
        assert_eq!(authority(&r).unwrap().as_str(), "b.example");
        assert!(authority(&req(&[])).is_none());
    }

    #[test]
    fn head_size_counts_headers() {
        let small = head_size(&req(&[("a", "b")]));
        let big = head_size(&req(&[("a", &"x".repeat(1000))]));
        assert_eq!(big - small, 999);
    }
}
