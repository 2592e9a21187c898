//! The proxy's control-plane watches, one shape for all three (discovery by authority,
//! inbound policy by port, routes by authority): a lazily connected gRPC channel, the
//! bearer token on every request, and a streaming watch per key, started on first use,
//! shared by all shards, that keeps its last answer and reconnects (capped backoff)
//! while the control plane is away.

use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::sync::watch;

pub use crate::config::WatchLimits as Limits;
use crate::{
    config::{ControlConfig, TokenSource},
    metrics::Metrics,
};

/// How long a first use waits for the control plane's first answer.
pub const FIRST_ANSWER: Duration = Duration::from_secs(1);
/// Reconnects are capped low: a restarted control plane must reach every proxy within a second.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("WEFT_CONTROL_ADDR {addr} does not make a gRPC endpoint: {reason}")]
    Addr { addr: String, reason: String },
}

/// A lazily connected channel to `weft control`, balanced over its replicas when there
/// are several; `timeout` bounds each call (watches have none).
pub fn channel(cfg: &ControlConfig, timeout: Option<Duration>) -> Result<tonic::transport::Channel, Error> {
    let mut endpoints = Vec::new();
    for addr in &cfg.addrs {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::Addr { addr: addr.clone(), reason: e.to_string() })?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true);
        endpoints.push(match timeout {
            Some(t) => endpoint.timeout(t),
            None => endpoint,
        });
    }
    match endpoints.len() {
        1 => Ok(endpoints.remove(0).connect_lazy()),
        _ => Ok(tonic::transport::Channel::balance_list(endpoints.into_iter())),
    }
}

/// `msg` with the workload's token as `authorization: Bearer <token>`.
pub fn authorized<T>(msg: T, token: &TokenSource) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Ok(Ok(v)) = token.read().map(|t| format!("Bearer {t}").parse()) {
        req.metadata_mut().insert(weft_api::AUTHORIZATION, v);
    }
    req
}

pub type Answer<T> = Option<Arc<T>>;

/// An answer's state generation (see the API's Generations).
pub trait Generation {
    fn generation(&self) -> u64;
}

impl Generation for weft_api::v1::EndpointSet {
    fn generation(&self) -> u64 {
        self.generation
    }
}

impl Generation for weft_api::v1::RouteSet {
    fn generation(&self) -> u64 {
        self.generation
    }
}

impl Generation for weft_api::v1::InboundPolicy {
    fn generation(&self) -> u64 {
        self.generation
    }
}

type Opened<T> = Pin<Box<dyn Future<Output = Result<tonic::Streaming<T>, tonic::Status>> + Send>>;
/// Opens one watch stream: the gRPC call with its request for a key.
type Open<K, T> = Arc<dyn Fn(&K, &TokenSource) -> Opened<T> + Send + Sync>;

/// Watches of one kind by key (an authority, a port), each started on first use. The
/// stream's messages `M` are kept as `T`, made from each message once when it arrives
/// (routes name their rules then, not per request).
///
/// Keys are what clients choose (any authority), so with [`Limits`] a watch not used for
/// a while is closed, and their number is capped (the least recently used go first): an
/// app sending to 100,000 names does not make the proxy, or the control plane, hold
/// 100,000 watches. A key used again starts a new watch.
pub struct Watched<K, M, T = M> {
    /// `discovery`, `policy` or `routes`: the start of its log lines and its metric label.
    kind: &'static str,
    token: TokenSource,
    metrics: Arc<Metrics>,
    open: Open<K, M>,
    watches: Arc<Mutex<HashMap<K, Entry<T>>>>,
    limits: Option<Limits>,
}

struct Entry<T> {
    rx: watch::Receiver<Answer<T>>,
    used: std::time::Instant,
    task: tokio::task::AbortHandle,
}

impl<K, M, T> Watched<K, M, T>
where
    K: Eq + Hash + Clone + std::fmt::Display + Send + Sync + 'static,
    M: Generation + Send + 'static,
    T: From<M> + Send + Sync + 'static,
{
    /// `open(key, token)` makes the gRPC call for a key (see [`authorized`]).
    pub fn new<F>(kind: &'static str, cfg: &ControlConfig, metrics: Arc<Metrics>, open: F) -> Self
    where
        F: Fn(&K, &TokenSource) -> Opened<M> + Send + Sync + 'static,
    {
        Watched {
            kind,
            token: cfg.token.clone(),
            metrics,
            open: Arc::new(open),
            watches: Arc::default(),
            limits: None,
        }
    }

    /// Closes watches unused for `limits.idle` and keeps at most `limits.max`.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = Some(limits);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sweep(Arc::downgrade(&self.watches), limits, self.kind, self.metrics.clone()));
        }
        self
    }

    /// The current answer for `key`, waiting up to [`FIRST_ANSWER`] for the first one.
    pub async fn get(&self, key: &K) -> Answer<T> {
        self.get_when(key, FIRST_ANSWER, |_| true).await
    }

    /// Like [`Self::get`], waiting up to `wait` for an answer that satisfies `ready`; after
    /// that, whatever the current answer is.
    pub async fn get_when(&self, key: &K, wait: Duration, ready: impl Fn(&T) -> bool) -> Answer<T> {
        let mut rx = self.receiver(key);
        // The common case, once per request: the answer is there; no timer needed.
        if let Some(answer) = rx.borrow().clone().filter(|a| ready(a)) {
            return Some(answer);
        }
        let found = match tokio::time::timeout(wait, rx.wait_for(|a| a.as_deref().is_some_and(&ready))).await
        {
            Ok(Ok(answer)) => Some(answer.clone()),
            _ => None,
        };
        found.unwrap_or_else(|| rx.borrow().clone())
    }

    /// Returns once `key` has its first answer (waiting as long as it takes).
    pub async fn first(&self, key: &K) {
        let mut rx = self.receiver(key);
        let _ = rx.wait_for(Option::is_some).await;
    }

    fn receiver(&self, key: &K) -> watch::Receiver<Answer<T>> {
        let mut watches = self.watches.lock().unwrap_or_else(PoisonError::into_inner);
        let now = std::time::Instant::now();
        if let Some(entry) = watches.get_mut(key) {
            entry.used = now;
            return entry.rx.clone();
        }
        let mut evicted = 0;
        if let Some(limits) = self.limits {
            while watches.len() >= limits.max.max(1) {
                let Some(oldest) = watches.iter().min_by_key(|(_, e)| e.used).map(|(k, _)| k.clone()) else {
                    break;
                };
                if let Some(e) = watches.remove(&oldest) {
                    e.task.abort();
                    evicted += 1;
                }
            }
        }
        let (open, token, key2) = (self.open.clone(), self.token.clone(), key.clone());
        let learnt = Learnt { kind: self.kind, metrics: self.metrics.clone() };
        let (rx, task) = spawn(format!("{} of {key}", self.kind), learnt, move || open(&key2, &token));
        watches.insert(key.clone(), Entry { rx: rx.clone(), used: now, task });
        self.metrics.control_watches(self.kind, watches.len(), evicted);
        rx
    }
}

/// Closes the watches unused for `limits.idle`, every half of it, until the set is gone.
async fn sweep<K, T>(
    watches: std::sync::Weak<Mutex<HashMap<K, Entry<T>>>>,
    limits: Limits,
    kind: &'static str,
    metrics: Arc<Metrics>,
) where
    K: Eq + Hash,
{
    let every = (limits.idle / 2).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        let Some(watches) = watches.upgrade() else { return };
        let mut w = watches.lock().unwrap_or_else(PoisonError::into_inner);
        let before = w.len();
        w.retain(|_, e| {
            let keep = e.used.elapsed() < limits.idle;
            if !keep {
                e.task.abort();
            }
            keep
        });
        // A burst of authorities leaves a table sized for it: give that back too.
        if w.capacity() > 4 * w.len().max(64) {
            w.shrink_to_fit();
        }
        metrics.control_watches(kind, w.len(), before - w.len());
    }
}

/// Where a watch records the generation of each answer it gets.
struct Learnt {
    kind: &'static str,
    metrics: Arc<Metrics>,
}

fn spawn<M, T, F>(
    what: String,
    learnt: Learnt,
    open: F,
) -> (watch::Receiver<Answer<T>>, tokio::task::AbortHandle)
where
    M: Generation + Send + 'static,
    T: From<M> + Send + Sync + 'static,
    F: Fn() -> Opened<M> + Send + 'static,
{
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(200);
        loop {
            match open().await {
                Ok(mut stream) => {
                    while let Ok(Some(msg)) = stream.message().await {
                        backoff = Duration::from_millis(200);
                        learnt.metrics.control_generation(learnt.kind, msg.generation());
                        tx.send_replace(Some(Arc::new(T::from(msg))));
                    }
                    tracing::info!("{what}: watch ended; keeping the last answer and reconnecting");
                }
                Err(status) => {
                    tracing::info!("{what}: watch failed ({}): {}", status.code(), status.message())
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    });
    (rx, task.abort_handle())
}
