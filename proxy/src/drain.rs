//! Graceful shutdown shared by every listener and connection.
//!
//! On SIGTERM or `POST /shutdown` the proxy stops accepting, lets in-flight requests and
//! connections finish until the grace period ends, then exits. Listeners and connection
//! tasks hold a [`Watch`]; [`Signal::drain`] tells them to stop and waits for every
//! `Watch` to be dropped.

use std::time::Duration;

use tokio::sync::watch;

/// Held by the code that decides to shut down.
pub struct Signal {
    tx: watch::Sender<bool>,
}

/// Held by every listener and connection task.
#[derive(Clone)]
pub struct Watch {
    rx: watch::Receiver<bool>,
}

pub fn channel() -> (Signal, Watch) {
    let (tx, rx) = watch::channel(false);
    (Signal { tx }, Watch { rx })
}

impl Signal {
    /// Asks every watcher to drain and waits until all are gone or `grace` passes.
    /// Returns whether everything finished in time.
    pub async fn drain(self, grace: Duration) -> bool {
        let _ = self.tx.send(true);
        tokio::time::timeout(grace, self.tx.closed()).await.is_ok()
    }
}

impl Watch {
    /// Resolves once draining has begun.
    pub async fn signaled(&self) {
        let mut rx = self.rx.clone();
        // An error means the signal was dropped without draining: treat it as a drain.
        let _ = rx.wait_for(|d| *d).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.rx.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_watchers() {
        let (signal, watch) = channel();
        let w = watch.clone();
        drop(watch);
        let task = tokio::spawn(async move {
            w.signaled().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(w);
        });
        assert!(signal.drain(Duration::from_secs(5)).await);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn drain_gives_up_after_grace() {
        let (signal, watch) = channel();
        let _held = watch;
        assert!(!signal.drain(Duration::from_millis(20)).await);
    }
}
