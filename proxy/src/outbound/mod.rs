//! Outbound: connections from this pod's app to anywhere. Read in order: `run` below
//! (the original destination, or per request in explicit proxy mode) → `conn` (detect;
//! mTLS to a destination discovery knows as meshed) → `service` (the request) → `plan`
//! (discovery, the service's routes, the backend split) → `attempts` (deadlines,
//! retries, the concurrency limit, an endpoint per attempt from `balance` with
//! `outlier` detection, then the shared `http::forwarder`).
//!
//! Where an outbound connection goes: a redirected one to its original destination. A
//! direct one is the app using us as an HTTP proxy (`http_proxy`, `curl -x`): each
//! request, or `CONNECT`, names its destination.

pub mod attempts;
pub mod balance;
mod conn;
pub mod discovery;
pub mod hop;
pub mod in_flight;
pub mod outlier;
pub mod plan;
pub mod retry;
mod rewrite;
pub mod routes;
mod service;

pub use service::Outbound;

use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::Instrument;

use crate::{config::Config, drain, transport};

pub async fn run(
    listener: TcpListener,
    limit: transport::Limit,
    outbound: Arc<Outbound>,
    cfg: Arc<Config>,
    drain: drain::Watch,
) {
    transport::accept_loop(limit, listener, drain, move |stream, client, drain| {
        // `None`: explicit proxy mode, each request names its destination.
        let dest = transport::orig_dst::original_dst(&stream);
        conn::serve(stream, client, dest, outbound.clone(), cfg.clone(), drain)
            .instrument(tracing::debug_span!("outbound", %client, ?dest))
    })
    .await
}
