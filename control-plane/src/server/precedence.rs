//! The Gateway API's order of route matches. The proxies take the first rule that
//! matches; the mesh file lists rules in the order they are tried, but the Gateway API
//! ranks every match of every route of a Service by how specific it is, so that a
//! `PathPrefix /` rule does not hide an `Exact /login` rule listed after it or in a newer
//! route. From the HTTPRoute spec, across all routes of the Service, a match ranks higher
//! for, in turn:
//!
//! an `Exact` path; a longer `PathPrefix`; a method; more header matches; more query
//! matches (a `RegularExpression` path, whose place the spec leaves open, ranks after
//! exact paths and before prefixes, as in Envoy Gateway); and ties keep the order they came in (oldest route first, then namespace/name, then
//! the rule's place in its route), which is the order the source lists them. A GRPCRoute
//! match is a path match: service and method is the exact path `/service/method`, a
//! service alone the prefix `/service/`, which ranks them as the GRPCRoute spec does
//! wherever two can match the same call.

use weft_api::v1 as api;

/// `rules` with each match its own rule (the rule's name, and so its metrics label, kept),
/// ordered most specific first.
pub fn sort(rules: Vec<api::Rule>) -> Vec<api::Rule> {
    let mut split: Vec<(Rank, api::Rule)> = Vec::new();
    for rule in rules {
        if rule.matches.len() <= 1 {
            let rank = rule.matches.first().map_or(Rank::EVERYTHING, rank);
            split.push((rank, rule));
            continue;
        }
        let mut rule = rule;
        for m in std::mem::take(&mut rule.matches) {
            split.push((rank(&m), api::Rule { matches: vec![m], ..rule.clone() }));
        }
    }
    // Stable: equal ranks keep the source's order.
    split.sort_by_key(|(rank, _)| std::cmp::Reverse(*rank));
    split.into_iter().map(|(_, r)| r).collect()
}

/// Compared field by field, higher first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    exact: bool,
    /// A `RegularExpression` path; the spec leaves its place to implementations: after
    /// exact paths and before prefixes, longer patterns first, as Envoy Gateway does.
    regex: bool,
    /// Of the exact path, the pattern or the prefix.
    len: usize,
    method: bool,
    headers: usize,
    query: usize,
}

impl Rank {
    /// A match without a path is `PathPrefix /` (the Gateway API's default).
    const EVERYTHING: Rank = Rank { exact: false, regex: false, len: 1, method: false, headers: 0, query: 0 };
}

fn rank(m: &api::Match) -> Rank {
    let (exact, regex, len) = if !m.path_exact.is_empty() {
        (true, false, m.path_exact.len())
    } else if !m.grpc_service.is_empty() && !m.grpc_method.is_empty() {
        (true, false, m.grpc_service.len() + m.grpc_method.len() + 2)
    } else if !m.path_regex.is_empty() {
        (false, true, m.path_regex.len())
    } else if !m.grpc_service.is_empty() {
        (false, false, m.grpc_service.len() + 2)
    } else if !m.path_prefix.is_empty() {
        (false, false, m.path_prefix.len())
    } else {
        (false, false, 1)
    };
    Rank {
        exact,
        regex,
        len,
        method: !m.method.is_empty(),
        headers: m.headers.len() + m.header_regex.len(),
        query: m.query.len() + m.query_regex.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, matches: Vec<api::Match>) -> api::Rule {
        api::Rule { name: name.into(), matches, ..api::Rule::default() }
    }

    fn prefix(p: &str) -> api::Match {
        api::Match { path_prefix: p.into(), ..api::Match::default() }
    }

    fn kv(n: &str) -> api::KeyValue {
        api::KeyValue { name: n.into(), value: "1".into() }
    }

    fn order(rules: Vec<api::Rule>) -> Vec<String> {
        sort(rules)
            .iter()
            .map(|r| {
                let m = r.matches.first().cloned().unwrap_or_default();
                format!("{} {}{}{}", r.name, m.path_exact, m.path_prefix, m.grpc_service)
            })
            .collect()
    }

    #[test]
    fn specific_matches_come_first_and_ties_keep_their_order() {
        let exact = api::Match { path_exact: "/login".into(), ..api::Match::default() };
        let with_method = api::Match { method: "POST".into(), ..prefix("/api") };
        let with_header = api::Match { headers: vec![kv("x-canary")], ..prefix("/api") };
        let two_headers = api::Match { headers: vec![kv("a"), kv("b")], ..prefix("/api") };
        let with_query = api::Match { query: vec![kv("q")], ..prefix("/api") };
        let got = order(vec![
            rule("old/0", vec![]),
            rule("old/1", vec![prefix("/"), prefix("/api/v2")]),
            rule("old/2", vec![prefix("/api")]),
            rule("new/0", vec![with_query, with_header, exact]),
            rule("new/1", vec![two_headers, with_method]),
            rule("new/2", vec![prefix("/api")]),
        ]);
        assert_eq!(
            got,
            [
                "new/0 /login",
                "old/1 /api/v2",
                "new/1 /api", // the method
                "new/1 /api", // two headers
                "new/0 /api", // one header
                "new/0 /api", // a query parameter
                "old/2 /api", // the older of two equal ones
                "new/2 /api",
                "old/0 ", // everything, listed first among equals
                "old/1 /",
            ]
        );
        let names: Vec<String> = sort(vec![rule(
            "r/0",
            vec![
                api::Match { method: "POST".into(), ..prefix("/api") },
                api::Match { headers: vec![kv("a"), kv("b")], ..prefix("/api") },
            ],
        )])
        .iter()
        .map(|r| format!("{:?}", r.matches[0].method))
        .collect();
        assert_eq!(names, ["\"POST\"", "\"\""]);
    }

    #[test]
    fn regular_expressions_rank_between_exact_paths_and_prefixes() {
        let exact = api::Match { path_exact: "/users/me".into(), ..api::Match::default() };
        let regex = api::Match { path_regex: "/users/[0-9]+".into(), ..api::Match::default() };
        let got = order(vec![
            rule("a/0", vec![prefix("/users")]),
            rule("a/1", vec![regex]),
            rule("a/2", vec![exact]),
        ]);
        assert_eq!(got, ["a/2 /users/me", "a/1 ", "a/0 /users"]);
    }

    #[test]
    fn grpc_methods_rank_above_their_service() {
        let service = api::Match { grpc_service: "helloworld.Greeter".into(), ..api::Match::default() };
        let method = api::Match { grpc_method: "SayHello".into(), ..service.clone() };
        let got = order(vec![rule("a/0", vec![]), rule("a/1", vec![service]), rule("b/0", vec![method])]);
        assert_eq!(got, ["b/0 helloworld.Greeter", "a/1 helloworld.Greeter", "a/0 "]);
    }
}
