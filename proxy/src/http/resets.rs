//! Envoy's premature-reset rule against HTTP/2 rapid reset (CVE-2023-44487): a client
//! that cancels at least half of its first hundred or more requests before they are
//! answered is abusing the connection, which is then closed. h2's own limit only
//! counts streams reset before they were accepted; this also covers streams the proxy
//! had already started forwarding.

use std::sync::atomic::{AtomicU32, Ordering};

/// One connection's count of streams and of streams dropped before their answer.
#[derive(Debug, Default)]
pub struct ResetWatch {
    streams: AtomicU32,
    premature: AtomicU32,
    /// Notified once the connection counts as abusive.
    pub abusive: tokio::sync::Notify,
}

const RESET_MIN_STREAMS: u32 = 100;

impl ResetWatch {
    /// Counts a stream; mark the guard `answered` when its response is ready.
    pub fn started(&self) -> StreamGuard<'_> {
        self.streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard { watch: self, answered: false }
    }
}

/// Dropped with `answered == false` when hyper drops the request future: the client
/// reset the stream (or went away) before the proxy answered.
pub struct StreamGuard<'a> {
    watch: &'a ResetWatch,
    pub answered: bool,
}

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        if self.answered {
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

    fn abusive(w: &ResetWatch) -> bool {
        use std::future::Future;
        let notified = w.abusive.notified();
        tokio::pin!(notified);
        notified.poll(&mut std::task::Context::from_waker(std::task::Waker::noop())).is_ready()
    }

    #[test]
    fn a_client_cancelling_half_of_a_hundred_streams_is_abusive() {
        let w = ResetWatch::default();
        for i in 0..100 {
            let mut g = w.started();
            g.answered = i % 2 == 0;
        }
        assert!(abusive(&w));
    }

    #[test]
    fn few_streams_or_few_cancels_are_not() {
        let w = ResetWatch::default();
        for _ in 0..99 {
            drop(w.started());
        }
        assert!(!abusive(&w), "99 streams is below the minimum");
        let w = ResetWatch::default();
        for i in 0..200 {
            let mut g = w.started();
            g.answered = i % 3 != 0;
        }
        assert!(!abusive(&w), "a third cancelled is not abuse");
    }
}
