//! Route regular expressions (Gateway API `RegularExpression` matches): one meaning for
//! the control plane, which refuses a bad one with its error, and the proxy, which
//! matches with it. The `regex` crate runs in time linear in the input, whatever the
//! pattern (no backtracking for a client's path to exploit), and its syntax is RE2's,
//! as Envoy's and Go's implementations use. A pattern must match the whole value, as
//! Envoy's `safe_regex` does.

use regex::{Regex, RegexBuilder};

/// Compiled patterns above this size are refused (a route is not a place for a
/// megabyte automaton).
const SIZE_LIMIT: usize = 64 * 1024;

/// `pattern` anchored at both ends, compiled.
pub fn compile(pattern: &str) -> Result<Regex, String> {
    RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(SIZE_LIMIT)
        .build()
        .map_err(|e| format!("{pattern:?} is not a regular expression Weft can use: {e}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn whole_values_only_and_bad_patterns_named() {
        let r = super::compile("/api/v[0-9]+").unwrap();
        assert!(r.is_match("/api/v2"));
        assert!(!r.is_match("/api/v2/x") && !r.is_match("/x/api/v2"));
        let alternation = super::compile("/a|/b").unwrap();
        assert!(alternation.is_match("/b") && !alternation.is_match("/bc"));
        assert!(super::compile("/x(").unwrap_err().contains("\"/x(\""));
        assert!(super::compile("(a{1000}){1000}").is_err(), "too large");
    }
}
