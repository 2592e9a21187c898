//! Inbound: connections from other pods (or, explicitly, from anyone) to this pod's
//! application. Read in order: `run` below (where a connection goes) → `conn` (detect:
//! HTTP, a peer proxy's mTLS, or opaque TCP) → `mesh` (mTLS termination and the
//! client's identity) → `service` (the port's policy and rate limit, then the request
//! to the app through the shared `http::forwarder`). `policy` and `rate_limit` hold
//! the control plane's answers.
//!
//! Where an inbound connection goes: a redirected one to the app on 127.0.0.1 at the
//! port the client dialled; a direct one (explicit mode) to `WEFT_APP_ADDR`.

mod conn;
mod mesh;
pub mod policy;
pub mod rate_limit;
mod service;

pub use service::Inbound;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use tokio::net::TcpListener;
use tracing::Instrument;

use crate::{config::Config, drain, errors::Cause, metrics::Direction, transport};

pub async fn run(
    listener: TcpListener,
    limit: transport::Limit,
    inbound: Arc<Inbound>,
    cfg: Arc<Config>,
    drain: drain::Watch,
) {
    let app_addr = cfg.app_addr;
    transport::accept_loop(limit, listener, drain, move |stream, client, drain| {
        let (inbound, cfg) = (inbound.clone(), cfg.clone());
        async move {
            let target = match transport::orig_dst::original_dst(&stream) {
                Some(orig) => {
                    let lo = if orig.is_ipv4() {
                        IpAddr::V4(Ipv4Addr::LOCALHOST)
                    } else {
                        IpAddr::V6(Ipv6Addr::LOCALHOST)
                    };
                    SocketAddr::new(lo, orig.port())
                }
                None => match app_addr {
                    Some(app) => app,
                    None => {
                        let why = format_args!("{client}: not redirected, and WEFT_APP_ADDR is unset");
                        return inbound.common.metrics.closed(Direction::Inbound, Cause::NoRoute, why);
                    }
                },
            };
            conn::serve(stream, client, target, inbound, cfg, drain)
                .instrument(tracing::debug_span!("inbound", %client, %target))
                .await
        }
    })
    .await
}
