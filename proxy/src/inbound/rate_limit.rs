//! The inbound port's local rate limit: token buckets, one for the port and one per
//! client identity so that no client can take the whole port; shared by the shards.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::Instant,
};

use weft_api::v1::RateLimit;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
}

impl Bucket {
    fn new(rate: u32, burst: u32, now: Instant) -> Bucket {
        let burst = f64::from(burst.max(1));
        Bucket { tokens: burst, last: now, rate: f64::from(rate), burst }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }
}

/// The rate limit of one inbound port.
pub struct RateLimiter {
    pub cfg: RateLimit,
    buckets: Mutex<(Bucket, HashMap<String, Bucket>)>,
}

impl RateLimiter {
    pub fn new(cfg: RateLimit) -> RateLimiter {
        let now = Instant::now();
        let total = Bucket::new(cfg.requests_per_second, cfg.burst, now);
        RateLimiter { cfg, buckets: Mutex::new((total, HashMap::new())) }
    }

    /// Takes a token for a request from `identity` (`None`: plaintext clients, who share
    /// one bucket); false when the port or this client is over its rate.
    pub fn admit(&self, identity: Option<&str>, now: Instant) -> bool {
        let mut guard = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let (total, per) = &mut *guard;
        total.refill(now);
        if total.tokens < 1.0 {
            return false;
        }
        if self.cfg.per_identity > 0 {
            let cap = self.cfg.per_identity;
            let mine =
                per.entry(identity.unwrap_or("").to_string()).or_insert_with(|| Bucket::new(cap, cap, now));
            mine.refill(now);
            if mine.tokens < 1.0 {
                return false;
            }
            mine.tokens -= 1.0;
        }
        total.tokens -= 1.0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_port_and_each_identity_have_their_buckets() {
        let rl = RateLimiter::new(RateLimit { requests_per_second: 10, burst: 10, per_identity: 4 });
        let t = Instant::now();
        let greedy = (0..10).filter(|_| rl.admit(Some("spiffe://d/ns/a/sa/greedy"), t)).count();
        assert_eq!(greedy, 4, "one identity is capped at its own rate");
        let other = (0..10).filter(|_| rl.admit(Some("spiffe://d/ns/a/sa/other"), t)).count();
        assert_eq!(other, 4, "another identity still gets its share");
        let plain = (0..10).filter(|_| rl.admit(None, t)).count();
        assert_eq!(plain, 2, "the port's bucket is empty after 10");
        // Tokens come back at the rate.
        let later = t + Duration::from_millis(500);
        assert!(rl.admit(Some("spiffe://d/ns/a/sa/third"), later));
    }
}
