//! Envoy's premature-reset rule against HTTP/2 rapid reset (CVE-2023-44487): a client
//! that cancels at least half of its first hundred or more requests prematurely is
//! abusing the connection, which is then closed. h2's own limit only counts streams reset
//! before they were accepted; this also covers streams the proxy had already started
//! forwarding.
//!
//! Premature, as in Envoy, means cancelled before its answer *and* within a short
//! lifetime ([`PREMATURE`]): the attack resets streams within milliseconds of opening
//! them. A stream cancelled later is an ordinary cancellation, a client's timeout: a peer
//! proxy cancelling the requests its route's timeout gave up on is exactly that, and
//! cutting its connection would fail the unrelated requests it carries.
//!
//! A stream cancelled when its own deadline (`weft-timeout-ms`, `grpc-timeout`) was less
//! than [`PREMATURE`] away is a timeout too, however young: a peer proxy stamps what is
//! left of its route's timeout, so under load the server side may see the request late
//! and the cancel soon after. Not counting it gives an attacker nothing: a stream that
//! would have ended within that time anyway frees no more capacity by being reset than
//! by running to its deadline.

use std::{
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

/// One connection's count of streams and of streams dropped before their answer.
#[derive(Debug, Default)]
pub struct ResetWatch {
    streams: AtomicU32,
    premature: AtomicU32,
    /// Notified once the connection counts as abusive.
    pub abusive: tokio::sync::Notify,
}

const RESET_MIN_STREAMS: u32 = 100;
/// Cancelled within this of its start, a stream counts as a premature reset.
pub const PREMATURE: Duration = Duration::from_millis(250);

impl ResetWatch {
    /// Counts a stream; settle the guard once the request is answered.
    pub fn started(self: &Arc<Self>) -> StreamGuard {
        self.streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard { watch: self.clone(), settled: false, since: Instant::now(), deadline: None }
    }
}

/// Dropped unsettled when hyper drops the request future: the client reset the stream
/// (or went away) before the proxy answered it.
#[derive(Debug)]
pub struct StreamGuard {
    watch: Arc<ResetWatch>,
    pub settled: bool,
    since: Instant,
    /// The deadline the request's headers ask for, once the service has read them.
    pub deadline: Option<Instant>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.settled {
            return; // the common case: no clock read
        }
        let now = Instant::now();
        let timed_out = self.deadline.is_some_and(|d| now + PREMATURE >= d);
        if now.duration_since(self.since) >= PREMATURE || timed_out {
            return;
        }
        let premature = self.watch.premature.fetch_add(1, Ordering::Relaxed) + 1;
        let streams = self.watch.streams.load(Ordering::Relaxed);
        if streams >= RESET_MIN_STREAMS && premature * 2 >= streams {
            self.watch.abusive.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn abusive(w: &Arc<ResetWatch>) -> bool {
        use std::future::Future;
        let notified = w.abusive.notified();
        tokio::pin!(notified);
        notified.poll(&mut std::task::Context::from_waker(std::task::Waker::noop())).is_ready()
    }

    #[test]
    fn a_client_cancelling_half_of_a_hundred_streams_is_abusive() {
        let w = Arc::new(ResetWatch::default());
        for i in 0..100 {
            let mut g = w.started();
            g.settled = i % 2 == 0;
        }
        assert!(abusive(&w));
    }

    #[test]
    fn late_cancellations_are_timeouts_not_an_attack() {
        let w = Arc::new(ResetWatch::default());
        for _ in 0..200 {
            let mut g = w.started();
            g.since -= PREMATURE;
        }
        assert!(!abusive(&w));
    }

    #[test]
    fn cancellations_at_the_streams_own_deadline_are_timeouts() {
        let w = Arc::new(ResetWatch::default());
        for _ in 0..200 {
            let mut g = w.started();
            g.deadline = Some(Instant::now() + Duration::from_millis(100));
        }
        assert!(!abusive(&w), "a deadline 100 ms away explains the cancel");
        let w = Arc::new(ResetWatch::default());
        for _ in 0..200 {
            let mut g = w.started();
            g.deadline = Some(Instant::now() + Duration::from_secs(30));
        }
        assert!(abusive(&w), "a far deadline does not");
    }

    #[test]
    fn few_streams_or_few_cancels_are_not() {
        let w = Arc::new(ResetWatch::default());
        for _ in 0..99 {
            drop(w.started());
        }
        assert!(!abusive(&w), "99 streams is below the minimum");
        let w = Arc::new(ResetWatch::default());
        for i in 0..200 {
            let mut g = w.started();
            g.settled = i % 3 != 0;
        }
        assert!(!abusive(&w), "a third cancelled is not abuse");
    }
}
