//! The outbound limit of requests in flight to one service, shared by the shards.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex, PoisonError,
    },
};

/// Requests in flight per service authority, for this proxy.
#[derive(Default)]
pub struct InFlight {
    counts: Mutex<HashMap<String, Arc<AtomicU32>>>,
}

/// Holds one slot of a service's limit until dropped.
pub struct Slot(Arc<AtomicU32>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl InFlight {
    /// A slot for a request to `service`, or `None` when `max` are already in flight.
    pub fn acquire(&self, service: &str, max: u32) -> Option<Slot> {
        let count = self
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(service.to_string())
            .or_default()
            .clone();
        let mut now = count.load(Ordering::Acquire);
        loop {
            if now >= max {
                return None;
            }
            match count.compare_exchange(now, now + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(Slot(count)),
                Err(actual) => now = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_slots_are_capped_and_returned() {
        let limits = InFlight::default();
        let a = limits.acquire("svc:80", 2).unwrap();
        let _b = limits.acquire("svc:80", 2).unwrap();
        assert!(limits.acquire("svc:80", 2).is_none());
        assert!(limits.acquire("other:80", 2).is_some());
        drop(a);
        assert!(limits.acquire("svc:80", 2).is_some());
    }
}
