//! Whether the proxy is ready for traffic, and while it is not, why: `/ready` answers
//! the reason in its body, so `kubectl describe pod` shows what the proxy waits for
//! (a certificate the control plane refuses, a port's policy) instead of a bare 503.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Mutex,
};

pub struct Ready {
    ok: AtomicBool,
    why: Mutex<String>,
}

impl Default for Ready {
    fn default() -> Self {
        Ready { ok: AtomicBool::new(false), why: Mutex::new("starting".into()) }
    }
}

impl Ready {
    pub fn is_ready(&self) -> bool {
        self.ok.load(Ordering::Acquire)
    }

    /// Ready now; said in the log when it becomes true (and only then).
    pub fn set_ready(&self) {
        if !self.ok.swap(true, Ordering::AcqRel) {
            tracing::info!("weft-proxy ready");
        }
    }

    /// Not ready (or no longer: draining), for this reason.
    pub fn not_ready(&self, why: impl Into<String>) {
        self.ok.store(false, Ordering::Release);
        *self.why.lock().unwrap_or_else(|e| e.into_inner()) = why.into();
    }

    /// Records what a not-ready proxy waits for; a ready one stays ready (a failed
    /// renewal while the certificate is still valid is the log's business).
    pub fn waiting(&self, why: impl Into<String>) {
        if !self.is_ready() {
            *self.why.lock().unwrap_or_else(|e| e.into_inner()) = why.into();
        }
    }

    pub fn why(&self) -> String {
        self.why.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
