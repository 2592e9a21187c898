//! Workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
//! the one form the CA signs, the proxy is configured with and the policy names.

use std::{fmt, str::FromStr};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid SPIFFE ID {0:?}: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
pub struct InvalidSpiffeId(pub String);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, InvalidSpiffeId> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl FromStr for SpiffeId {
    type Err = InvalidSpiffeId;
    fn from_str(s: &str) -> Result<Self, InvalidSpiffeId> {
        let bad = || InvalidSpiffeId(s.to_string());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let mut parts = rest.split('/');
        let (td, ns_kw, ns, sa_kw, sa) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next());
        let valid =
            |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        match (td, ns_kw, ns, sa_kw, sa, parts.next()) {
            (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None)
                if valid(td) && valid(ns) && valid(sa) =>
            {
                Ok(SpiffeId { trust_domain: td.into(), namespace: ns.into(), service_account: sa.into() })
            }
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_strictly() {
        let s = "spiffe://weft.local/ns/shop/sa/frontend";
        let id: SpiffeId = s.parse().unwrap();
        assert_eq!((id.namespace.as_str(), id.service_account.as_str()), ("shop", "frontend"));
        assert_eq!(id.to_string(), s);
        for bad in [
            "spiffe://weft.local/ns/shop",
            "spiffe://weft.local/ns/shop/sa/frontend/extra",
            "http://weft.local/ns/shop/sa/frontend",
            "spiffe://weft.local/ns//sa/x",
            "spiffe://weft.local/namespace/a/sa/b",
            "spiffe://weft local/ns/a/sa/b",
        ] {
            assert_eq!(bad.parse::<SpiffeId>(), Err(InvalidSpiffeId(bad.into())), "{bad}");
        }
    }
}
