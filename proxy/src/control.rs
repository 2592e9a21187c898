//! What the proxy's control-plane clients share: the gRPC channel, the bearer token on
//! every request, and streaming watches that survive the control plane going away
//! (the last answer keeps serving while the watch reconnects with capped backoff).

use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;

use crate::config::{ControlConfig, TokenSource};

/// How long a first use waits for the control plane's first answer.
pub const FIRST_ANSWER: Duration = Duration::from_secs(1);
/// Reconnects are capped low: a restarted control plane must reach every proxy within a second.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A lazily connected channel to `weft control`.
pub fn channel(cfg: &ControlConfig) -> anyhow::Result<tonic::transport::Channel> {
    Ok(tonic::transport::Endpoint::from_shared(format!("http://{}", cfg.addr))?
        .connect_timeout(Duration::from_secs(3))
        .connect_lazy())
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

/// Watches by key (an authority, a port), each started on first use and kept.
pub struct Watches<K, T> {
    watches: Mutex<HashMap<K, watch::Receiver<Answer<T>>>>,
}

impl<K: Eq + Hash, T> Default for Watches<K, T> {
    fn default() -> Self {
        Self { watches: Mutex::default() }
    }
}

impl<K: Eq + Hash, T: Send + Sync + 'static> Watches<K, T> {
    /// The current answer for `key`, waiting up to [`FIRST_ANSWER`] for the first one.
    /// `open` opens the gRPC stream for `key`; it is called again after every failure.
    pub async fn get<F, Fut>(&self, key: K, what: String, open: F) -> Answer<T>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<tonic::Streaming<T>, tonic::Status>> + Send,
    {
        self.get_when(key, what, open, FIRST_ANSWER, |_| true).await
    }

    /// Like [`Self::get`], waiting up to `wait` for an answer that satisfies `ready`; after
    /// that, whatever the current answer is.
    pub async fn get_when<F, Fut>(
        &self,
        key: K,
        what: String,
        open: F,
        wait: Duration,
        ready: impl Fn(&T) -> bool,
    ) -> Answer<T>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<tonic::Streaming<T>, tonic::Status>> + Send,
    {
        let mut rx = {
            let mut watches = self.watches.lock().expect("watches lock");
            watches.entry(key).or_insert_with(|| spawn(what, open)).clone()
        };
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
}

fn spawn<T, F, Fut>(what: String, mut open: F) -> watch::Receiver<Answer<T>>
where
    T: Send + Sync + 'static,
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<tonic::Streaming<T>, tonic::Status>> + Send,
{
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(200);
        loop {
            match open().await {
                Ok(mut stream) => {
                    while let Ok(Some(msg)) = stream.message().await {
                        backoff = Duration::from_millis(200);
                        tx.send_replace(Some(Arc::new(msg)));
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
    rx
}
