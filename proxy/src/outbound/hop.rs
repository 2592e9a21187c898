//! Loop protection that holds whatever the addressing: every request the outbound
//! forwards carries this proxy's hop id in `weft-hop`; a request that arrives with it
//! already has come round, and is refused (508 `loop-detected`) before it can fan out.
//! The inbound strips the header towards its app. A chain longer than any real one is
//! refused too.

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::errors::{Cause, CauseError};

pub const HOP: HeaderName = HeaderName::from_static("weft-hop");

/// Longer chains of proxies than this are taken for a loop through several of them.
const MAX_HOPS: usize = 16;

/// This proxy's hop id, the same for all its shards.
#[derive(Clone, Debug)]
pub struct HopGuard {
    id: HeaderValue,
}

impl Default for HopGuard {
    fn default() -> Self {
        HopGuard {
            id: HeaderValue::from_str(&format!("{:016x}", fastrand::u64(..))).expect("hex is a valid header"),
        }
    }
}

impl HopGuard {
    /// Refuses a request that has passed through this proxy before; otherwise adds this
    /// proxy to its hops.
    pub fn pass(&self, headers: &mut HeaderMap) -> Result<(), CauseError> {
        let mut hops = 0;
        for value in headers.get_all(HOP) {
            for hop in value.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if hop == self.id.as_bytes() {
                    let msg =
                        "this request has passed through this proxy before (weft-hop): a forwarding loop; \
                               name the application, not a proxy listener";
                    return Err(CauseError::new(Cause::LoopDetected, msg));
                }
                hops += 1;
            }
        }
        if hops >= MAX_HOPS {
            let msg = format!("this request has crossed {hops} proxies (weft-hop): taken for a loop");
            return Err(CauseError::new(Cause::LoopDetected, msg));
        }
        headers.append(HOP, self.id.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_seen_before_is_refused() {
        let (a, b) = (HopGuard::default(), HopGuard::default());
        let mut h = HeaderMap::new();
        a.pass(&mut h).unwrap();
        b.pass(&mut h).unwrap();
        assert_eq!(a.pass(&mut h).unwrap_err().cause, Cause::LoopDetected);
        // Comma-joined by an intermediary: the same.
        let mut joined = HeaderMap::new();
        joined.insert(HOP, HeaderValue::from_str(&format!("x, {}", b.id.to_str().unwrap())).unwrap());
        assert!(b.pass(&mut joined).is_err());
        let mut long = HeaderMap::new();
        for i in 0..MAX_HOPS {
            long.append(HOP, HeaderValue::from(i));
        }
        assert!(a.pass(&mut long).is_err());
    }
}
