//! Per-request load balancing over a service's endpoints, as discovery announces them.
//!
//! The default is power of two choices over peak-EWMA load (Finagle's algorithm, as in
//! tower and Linkerd): two distinct candidates are drawn at random and the one with the lower
//! cost wins, cost being the latency estimate × (requests in flight + 1) ÷ weight, so
//! latency steers traffic away from slow endpoints and weights scale what an endpoint
//! is trusted with (as Envoy's weighted least-request does). Round robin (smooth
//! weighted, as nginx does it) is the alternative. tower's p2c and `PeakEwma` have no
//! weights and keep their cost opaque, so both are written here.
//!
//! A balancer lives per proxy shard and per authority. When the endpoint set changes,
//! endpoints that stay keep their load history; removed ones get no new requests while
//! their requests in flight finish on their own connections.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use http::Response;
use weft_api::v1::{Balancer as Mode, EndpointSet, OutlierDetection};

pub use super::outlier::Event;
use super::{discovery::Endpoint, outlier::Health};
use crate::{
    errors::{Cause, CauseError},
    http::Body,
    metrics::Metrics,
};

/// A lock whose critical sections cannot panic half-way: a poisoned one is still
/// consistent, and the request path never panics on it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// This shard's balancers, one per service authority, made on first use and dropped
/// once unused for [`IDLE`] (checked when another is made), so the map follows the
/// services in use, not every name ever asked for.
pub struct Balancers {
    map: Mutex<HashMap<String, Used>>,
    idle: Duration,
}

impl Default for Balancers {
    fn default() -> Balancers {
        Balancers { map: Mutex::default(), idle: IDLE }
    }
}

/// A balancer unused this long is dropped (its load history and outlier state are
/// stale by then anyway).
const IDLE: Duration = Duration::from_secs(300);

struct Used {
    balancer: Balancer,
    at: Instant,
}

impl Balancers {
    /// An endpoint of `service` (whose current set is `set`) for one attempt, not one of
    /// `avoid` while others are left.
    pub fn pick(
        &self,
        service: &str,
        set: &Arc<EndpointSet>,
        avoid: &[Endpoint],
        queue_timeout: Duration,
    ) -> Result<Endpoint, CauseError> {
        let mut balancers = lock(&self.map);
        let now = Instant::now();
        if !balancers.contains_key(service) {
            balancers.retain(|_, u| now.duration_since(u.at) < self.idle);
        }
        let used = balancers
            .entry(service.to_string())
            .or_insert_with(|| Used { balancer: Balancer::default(), at: now });
        used.at = now;
        let balancer = &mut used.balancer;
        balancer.update(set);
        balancer.pick(avoid, || fastrand::u64(..)).ok_or_else(|| no_endpoints(service, queue_timeout))
    }

    /// `attempt` counted in its endpoint's load, and its outcome in outlier detection:
    /// 5xx and failures to get a response count against the endpoint.
    pub async fn send(
        &self,
        service: &str,
        endpoint: &Endpoint,
        attempt: Attempt<'_>,
        metrics: &Metrics,
    ) -> Result<Response<Body>, CauseError> {
        let dispatched = match lock(&self.map).get_mut(service) {
            Some(u) => u.balancer.dispatch(endpoint, attempt),
            None => attempt,
        };
        let result = dispatched.await;
        let ok = match &result {
            Ok(rsp) => !rsp.status().is_server_error(),
            Err(e) => !e.cause.blames_endpoint(),
        };
        let event = lock(&self.map).get_mut(service).and_then(|u| u.balancer.record(endpoint, ok));
        if let Some(event) = event {
            tracing::info!(service, endpoint = %endpoint.addr, "outlier detection: {event:?}");
            metrics.outlier(service, matches!(event, Event::Ejected(_)));
        }
        result
    }
}

/// Before an endpoint has answered, its latency is assumed to be this.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast a latency peak decays towards the average.
const DECAY: Duration = Duration::from_secs(10);

/// One request to one endpoint, from sending to the response head.
pub type Attempt<'a> = Pin<Box<dyn Future<Output = Result<Response<Body>, CauseError>> + Send + 'a>>;

/// Peak-EWMA load of one endpoint: a latency estimate that jumps to any slower
/// observation and decays towards the average otherwise, and the requests in flight.
#[derive(Debug)]
struct Ewma {
    rtt_ns: f64,
    updated: Instant,
    pending: u32,
}

impl Ewma {
    fn new() -> Arc<Mutex<Ewma>> {
        Arc::new(Mutex::new(Ewma {
            rtt_ns: DEFAULT_RTT.as_nanos() as f64,
            updated: Instant::now(),
            pending: 0,
        }))
    }

    /// The estimate decayed to `now`: the longer since the last answer, the less a
    /// past peak weighs.
    fn decayed(&mut self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_nanos() as f64;
        let keep = (-elapsed / DECAY.as_nanos() as f64).exp();
        self.rtt_ns *= keep;
        self.updated = now;
        self.rtt_ns
    }

    fn observe(&mut self, rtt: Duration, now: Instant) {
        let sample = rtt.as_nanos() as f64;
        let elapsed = now.saturating_duration_since(self.updated).as_nanos() as f64;
        if sample > self.rtt_ns {
            self.rtt_ns = sample;
        } else {
            let keep = (-elapsed / DECAY.as_nanos() as f64).exp();
            self.rtt_ns = self.rtt_ns * keep + sample * (1.0 - keep);
        }
        self.updated = now;
    }
}

/// Counts a request in flight until dropped, then records its latency.
struct InFlight {
    load: Arc<Mutex<Ewma>>,
    sent: Instant,
}

impl InFlight {
    fn start(load: &Arc<Mutex<Ewma>>) -> InFlight {
        load.lock().unwrap_or_else(PoisonError::into_inner).pending += 1;
        InFlight { load: load.clone(), sent: Instant::now() }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut l = self.load.lock().unwrap_or_else(PoisonError::into_inner);
        l.pending -= 1;
        l.observe(now - self.sent, now);
    }
}

struct Slot {
    endpoint: Endpoint,
    weight: u32,
    load: Arc<Mutex<Ewma>>,
    health: Health,
    /// Smooth weighted round robin's running weight.
    current: i64,
}

pub struct Balancer {
    /// The endpoint set this balancer was built from.
    set: Option<Arc<EndpointSet>>,
    mode: Mode,
    slots: Vec<Slot>,
    /// Where each endpoint's slot is: recording an outcome must not scan thousands.
    index: HashMap<Endpoint, usize>,
    outlier: OutlierDetection,
}

/// Draws peak-EWMA makes for two usable candidates before it lists the usable ones: with
/// most endpoints usable a pick costs a few draws, however many endpoints there are.
const DRAWS: usize = 8;

impl Default for Balancer {
    fn default() -> Self {
        Balancer {
            set: None,
            mode: Mode::PeakEwma,
            slots: Vec::new(),
            index: HashMap::new(),
            outlier: OutlierDetection::default(),
        }
    }
}

impl Balancer {
    /// Follows a new endpoint set; endpoints that stay keep their load history.
    pub fn update(&mut self, set: &Arc<EndpointSet>) {
        if self.set.as_ref().is_some_and(|s| Arc::ptr_eq(s, set)) {
            return;
        }
        let mut old: HashMap<Endpoint, Slot> =
            std::mem::take(&mut self.slots).into_iter().map(|s| (s.endpoint.clone(), s)).collect();
        self.index.clear();
        self.outlier = set.outlier_detection.unwrap_or_default();
        for e in &set.endpoints {
            let Ok(addr) = e.address.parse::<SocketAddr>() else {
                tracing::warn!(
                    address = e.address,
                    "discovery sent an endpoint that is not ip:port; skipped"
                );
                continue;
            };
            let endpoint = Endpoint { addr, identity: e.meshed.then(|| Arc::from(e.identity.as_str())) };
            if let Some(&i) = self.index.get(&endpoint) {
                // Listed twice: one slot with both weights, the share two slots would get.
                self.slots[i].weight += e.weight.max(1);
                continue;
            }
            let (load, health) = old
                .remove(&endpoint)
                .map(|s| (s.load, s.health))
                .unwrap_or_else(|| (Ewma::new(), Health::default()));
            self.index.insert(endpoint.clone(), self.slots.len());
            self.slots.push(Slot { endpoint, weight: e.weight.max(1), load, health, current: 0 });
        }
        self.mode = Mode::try_from(set.balancer).unwrap_or(Mode::PeakEwma);
        self.set = Some(set.clone());
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The endpoint for the next request. `rand` draws uniform random numbers.
    /// Ejected endpoints are left out, unless every endpoint is ejected; so are those
    /// in `avoid` (where a retried request already failed) while others remain.
    pub fn pick(&mut self, avoid: &[Endpoint], mut rand: impl FnMut() -> u64) -> Option<Endpoint> {
        let now = Instant::now();
        if self.mode == Mode::PeakEwma {
            if let Some((a, b)) = self.two_usable(avoid, now, &mut rand) {
                let i = if self.cost(b, now) < self.cost(a, now) { b } else { a };
                self.slots[i].health.picked(now);
                return Some(self.slots[i].endpoint.clone());
            }
        }
        let available: Vec<usize> =
            (0..self.slots.len()).filter(|i| self.slots[*i].health.available(now)).collect();
        let mut usable: Vec<usize> =
            available.iter().copied().filter(|i| !avoid.contains(&self.slots[*i].endpoint)).collect();
        if usable.is_empty() {
            usable = available;
        }
        if usable.is_empty() {
            usable = (0..self.slots.len()).collect();
        }
        let i = match self.mode {
            Mode::RoundRobin => self.round_robin(&usable)?,
            Mode::PeakEwma => {
                let n = usable.len() as u64;
                match n {
                    0 => return None,
                    1 => usable[0],
                    _ => {
                        // Two distinct candidates: a slow endpoint must never win by being drawn twice.
                        let a = (rand() % n) as usize;
                        let b = (rand() % (n - 1)) as usize;
                        let (a, b) = (usable[a], usable[if b >= a { b + 1 } else { b }]);
                        if self.cost(b, now) < self.cost(a, now) {
                            b
                        } else {
                            a
                        }
                    }
                }
            }
        };
        self.slots[i].health.picked(now);
        Some(self.slots[i].endpoint.clone())
    }

    /// Records how a request to `endpoint` went (a response below 500 is a success);
    /// returns what that changed in its ejection state.
    pub fn record(&mut self, endpoint: &Endpoint, ok: bool) -> Option<Event> {
        let outlier = &self.outlier;
        let slot = &mut self.slots[*self.index.get(endpoint)?];
        slot.health.record(ok, Instant::now(), outlier)
    }

    /// Runs `attempt` against `endpoint`, counting it in the endpoint's load until the
    /// response head arrives. An endpoint that left the set meanwhile just runs it.
    pub fn dispatch<'a>(
        &mut self,
        endpoint: &Endpoint,
        attempt: Attempt<'a>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Body>, CauseError>> + Send + 'a>> {
        match self.index.get(endpoint).map(|i| &self.slots[*i]) {
            Some(slot) => {
                let in_flight = InFlight::start(&slot.load);
                Box::pin(async move {
                    let result = attempt.await;
                    drop(in_flight);
                    result
                })
            }
            None => attempt,
        }
    }

    /// Two distinct usable endpoints drawn at random (uniformly among the usable, as
    /// listing them would give), or `None` after [`DRAWS`] tries: then `pick` lists
    /// them, which also handles every endpoint being ejected or avoided.
    fn two_usable(
        &self,
        avoid: &[Endpoint],
        now: Instant,
        rand: &mut impl FnMut() -> u64,
    ) -> Option<(usize, usize)> {
        let n = self.slots.len() as u64;
        if n < 2 {
            return None;
        }
        let usable =
            |i: usize| self.slots[i].health.available(now) && !avoid.contains(&self.slots[i].endpoint);
        let mut found = None;
        for _ in 0..DRAWS {
            let i = (rand() % n) as usize;
            if !usable(i) {
                continue;
            }
            match found {
                None => found = Some(i),
                Some(a) if a != i => return Some((a, i)),
                Some(_) => {}
            }
        }
        None
    }

    /// Latency estimate × (requests in flight + 1) ÷ weight.
    fn cost(&self, i: usize, now: Instant) -> f64 {
        let slot = &self.slots[i];
        let mut l = slot.load.lock().unwrap_or_else(PoisonError::into_inner);
        l.decayed(now) * f64::from(l.pending + 1) / f64::from(slot.weight)
    }

    /// nginx's smooth weighted round robin over `usable`: weights 5,1,1 give a,a,b,a,c,a,a.
    fn round_robin(&mut self, usable: &[usize]) -> Option<usize> {
        let total: i64 = usable.iter().map(|i| i64::from(self.slots[*i].weight)).sum();
        for i in usable {
            let s = &mut self.slots[*i];
            s.current += i64::from(s.weight);
        }
        let i = *usable.iter().max_by_key(|i| (self.slots[**i].current, -(**i as i64)))?;
        self.slots[i].current -= total;
        Some(i)
    }
}

/// The error when a service has no endpoints to send to.
pub fn no_endpoints(authority: &str, waited: Duration) -> CauseError {
    CauseError::new(
        Cause::NoEndpoints,
        format!("{authority} has no endpoints (waited {waited:?}); check its endpoints in the mesh"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::v1::Endpoint as ApiEndpoint;

    fn set(weights: &[u32], mode: Mode) -> Arc<EndpointSet> {
        Arc::new(EndpointSet {
            authority: "svc:80".into(),
            known: true,
            endpoints: weights
                .iter()
                .enumerate()
                .map(|(i, w)| ApiEndpoint {
                    address: format!("127.0.0.1:{}", 9000 + i),
                    weight: *w,
                    ..Default::default()
                })
                .collect(),
            balancer: mode as i32,
            ..Default::default()
        })
    }

    fn port(e: Endpoint) -> u16 {
        e.addr.port() - 9000
    }

    #[test]
    fn balancers_unused_for_their_idle_time_are_dropped() {
        let kept = Balancers::default();
        let gone = Balancers { map: Mutex::default(), idle: Duration::ZERO };
        for b in [&kept, &gone] {
            b.pick("a:80", &set(&[1], Mode::RoundRobin), &[], Duration::ZERO).unwrap();
            b.pick("b:80", &set(&[1], Mode::RoundRobin), &[], Duration::ZERO).unwrap();
        }
        assert_eq!(lock(&kept.map).len(), 2);
        // Making `b:80` dropped `a:80`, unused since.
        assert_eq!(lock(&gone.map).keys().collect::<Vec<_>>(), ["b:80"]);
    }

    #[test]
    fn round_robin_is_smooth_and_weighted() {
        let mut b = Balancer::default();
        b.update(&set(&[5, 1, 1], Mode::RoundRobin));
        let order: Vec<u16> = (0..7).map(|_| port(b.pick(&[], || 0).unwrap())).collect();
        assert_eq!(order, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[tokio::test]
    async fn p2c_prefers_the_endpoint_with_less_load() {
        let mut b = Balancer::default();
        b.update(&set(&[1, 1], Mode::PeakEwma));
        let busy = Endpoint { addr: "127.0.0.1:9000".parse().unwrap(), identity: None };
        // A request in flight on endpoint 0 makes it cost more.
        let _in_flight = b.dispatch(&busy, Box::pin(std::future::pending()));
        for r in 0..2 {
            // Candidates (0, 1) and (1, 0): endpoint 1 either way.
            let mut draws = [r, 1 - r].into_iter();
            assert_eq!(port(b.pick(&[], || draws.next().unwrap()).unwrap()), 1);
        }
    }

    #[test]
    fn weight_divides_the_cost() {
        let mut b = Balancer::default();
        b.update(&set(&[1, 2], Mode::PeakEwma));
        let now = Instant::now();
        let (light, heavy) = (b.cost(0, now), b.cost(1, now));
        assert!((heavy * 2.0 - light).abs() < light * 0.01, "{light} {heavy}");
        // Candidates (0, 1): the weight-2 endpoint wins at equal latency.
        let mut draws = [0, 1].into_iter();
        assert_eq!(port(b.pick(&[], || draws.next().unwrap()).unwrap()), 1);
    }

    #[test]
    fn an_endpoint_listed_twice_gets_both_weights() {
        let mut twice = (*set(&[1, 1], Mode::RoundRobin)).clone();
        twice.endpoints.push(twice.endpoints[0].clone());
        let mut b = Balancer::default();
        b.update(&Arc::new(twice));
        let order: Vec<u16> = (0..6).map(|_| port(b.pick(&[], || 0).unwrap())).collect();
        assert_eq!(order.iter().filter(|p| **p == 0).count(), 4, "{order:?}");
    }

    #[test]
    fn a_pick_among_thousands_draws_a_few_numbers_not_a_list() {
        let mut b = Balancer::default();
        b.update(&set(&[1; 10_000], Mode::PeakEwma));
        let mut draws = 0u64;
        let picked = b.pick(&[], || {
            draws += 1;
            draws * 7919
        });
        assert!(picked.is_some());
        assert_eq!(draws, 2, "two candidates, two draws");
        // An endpoint to avoid is never a candidate while others remain.
        let avoid = [Endpoint { addr: "127.0.0.1:9000".parse().unwrap(), identity: None }];
        for _ in 0..100 {
            assert_ne!(port(b.pick(&avoid, || 0).unwrap()), 0);
        }
    }

    #[test]
    fn a_slow_answer_raises_the_estimate_at_once() {
        let now = Instant::now();
        let mut e = Ewma { rtt_ns: 1e6, updated: now, pending: 0 };
        e.observe(Duration::from_millis(50), now);
        assert_eq!(e.rtt_ns, 50e6);
        // Fast answers bring it down gradually.
        e.observe(Duration::from_millis(1), now + Duration::from_secs(5));
        assert!(e.rtt_ns < 50e6 && e.rtt_ns > 20e6, "{}", e.rtt_ns);
    }

    #[test]
    fn an_update_keeps_the_load_of_endpoints_that_stay() {
        let mut b = Balancer::default();
        b.update(&set(&[1, 1], Mode::PeakEwma));
        let stay = b.slots[1].endpoint.clone();
        let _in_flight = b.dispatch(&stay, Box::pin(std::future::pending()));
        let mut moved = (*set(&[1, 1, 1], Mode::PeakEwma)).clone();
        moved.endpoints.remove(0);
        b.update(&Arc::new(moved));
        assert_eq!(b.slots.len(), 2);
        assert_eq!(b.slots[0].endpoint, stay);
        let now = Instant::now();
        assert!(b.cost(1, now) < b.cost(0, now), "the in-flight request is still counted");
    }
}
