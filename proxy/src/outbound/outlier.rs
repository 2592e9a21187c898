//! Outlier detection (circuit breaking) for one endpoint: after a number of failures in
//! a row it is ejected from its balancer for a while; when the time is up it gets one
//! probe request, and only a successful probe brings it back (a failed one ejects it
//! again for twice as long, up to a maximum). The balancer never leaves a service
//! without endpoints: when every endpoint is ejected, it uses them all.

use std::time::{Duration, Instant};

use weft_api::v1::OutlierDetection;

#[derive(Debug, Default)]
pub struct Health {
    failures: u32,
    /// How many times in a row it has been ejected (the backoff exponent).
    ejections: u32,
    state: State,
}

#[derive(Debug, Default, PartialEq)]
enum State {
    #[default]
    Healthy,
    Ejected {
        until: Instant,
    },
    /// Its ejection is over and one probe request is on its way.
    Probing,
}

/// What a result changed, for metrics and logs.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Ejected(Duration),
    Restored,
}

impl Health {
    /// Whether the balancer may pick it now; an ejection that is over turns into
    /// one probe, which `picked` claims.
    pub fn available(&self, now: Instant) -> bool {
        match self.state {
            State::Healthy => true,
            State::Ejected { until } => now >= until,
            State::Probing => false,
        }
    }

    /// The balancer picked it: an endpoint whose ejection is over is now being probed.
    pub fn picked(&mut self, now: Instant) {
        if matches!(self.state, State::Ejected { until } if now >= until) {
            self.state = State::Probing;
        }
    }

    pub fn record(&mut self, ok: bool, now: Instant, cfg: &OutlierDetection) -> Option<Event> {
        if cfg.consecutive_failures == 0 {
            return None;
        }
        if ok {
            self.failures = 0;
            match self.state {
                State::Healthy => return None,
                // A request sent before the ejection that answers late proves nothing
                // about the endpoint now: only the probe after the ejection time does.
                State::Ejected { .. } => return None,
                State::Probing => {
                    self.state = State::Healthy;
                    self.ejections = 0;
                    return Some(Event::Restored);
                }
            }
        }
        self.failures += 1;
        let probe_failed = self.state == State::Probing;
        if !probe_failed && (self.failures < cfg.consecutive_failures || self.state != State::Healthy) {
            return None;
        }
        let base = Duration::from_millis(cfg.base_ejection_ms);
        let time =
            base.saturating_mul(1 << self.ejections.min(16)).min(Duration::from_millis(cfg.max_ejection_ms));
        self.ejections += 1;
        self.failures = 0;
        self.state = State::Ejected { until: now + time };
        Some(Event::Ejected(time))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OutlierDetection {
        OutlierDetection { consecutive_failures: 3, base_ejection_ms: 1000, max_ejection_ms: 3000 }
    }

    #[test]
    fn ejected_after_failures_in_a_row_then_probed() {
        let (mut h, t0) = (Health::default(), Instant::now());
        assert_eq!(h.record(false, t0, &cfg()), None);
        assert_eq!(h.record(true, t0, &cfg()), None, "a success resets the count");
        assert_eq!(h.record(false, t0, &cfg()), None);
        assert_eq!(h.record(false, t0, &cfg()), None);
        assert_eq!(h.record(false, t0, &cfg()), Some(Event::Ejected(Duration::from_secs(1))));
        assert!(!h.available(t0));
        let t1 = t0 + Duration::from_secs(1);
        assert!(h.available(t1));
        h.picked(t1);
        assert!(!h.available(t1), "one probe at a time");
        // A failed probe ejects it again, for twice as long.
        assert_eq!(h.record(false, t1, &cfg()), Some(Event::Ejected(Duration::from_secs(2))));
        let t2 = t1 + Duration::from_secs(2);
        h.picked(t2);
        assert_eq!(h.record(true, t2, &cfg()), Some(Event::Restored));
        assert!(h.available(t2));
    }

    #[test]
    fn a_late_success_of_a_request_sent_before_the_ejection_does_not_restore() {
        let (mut h, t0) = (Health::default(), Instant::now());
        for _ in 0..3 {
            h.record(false, t0, &cfg());
        }
        assert!(!h.available(t0));
        // A slow request dispatched before the ejection succeeds 0.5 s later.
        let t_half = t0 + Duration::from_millis(500);
        assert_eq!(h.record(true, t_half, &cfg()), None);
        assert!(!h.available(t_half), "still ejected until its time is up");
        // Only the probe after the ejection time brings it back.
        let t1 = t0 + Duration::from_secs(1);
        assert!(h.available(t1));
        h.picked(t1);
        assert_eq!(h.record(true, t1, &cfg()), Some(Event::Restored));
    }

    #[test]
    fn ejection_time_is_capped_and_zero_disables() {
        let (mut h, t) = (Health::default(), Instant::now());
        let mut last = None;
        for _ in 0..6 {
            h.picked(t + Duration::from_secs(3600));
            last = h.record(false, t, &OutlierDetection { consecutive_failures: 1, ..cfg() });
        }
        assert_eq!(last, Some(Event::Ejected(Duration::from_secs(3))));
        let mut off = Health::default();
        for _ in 0..10 {
            assert_eq!(off.record(false, t, &OutlierDetection::default()), None);
        }
    }
}
