//! Outbound: connections from this pod's application to anywhere.
//!
//! A redirected connection goes to its original destination. A direct one is the app
//! using us as an HTTP proxy (`http_proxy`, `curl -x`): each request, or `CONNECT`,
//! names its destination.

use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::Instrument;

use crate::{
    config::Config,
    conn::{self, Dest},
    drain,
    http::proxy::HttpProxy,
    orig_dst,
};

pub async fn run(listener: TcpListener, proxy: Arc<HttpProxy>, cfg: Arc<Config>, drain: drain::Watch) {
    conn::accept_loop(listener, drain, move |stream, client, drain| {
        let dest = match orig_dst::original_dst(&stream) {
            Some(orig) => Dest::Fixed(orig),
            None => Dest::PerRequest,
        };
        conn::serve(stream, client, dest, proxy.clone(), cfg.clone(), drain)
            .instrument(tracing::debug_span!("outbound", %client, ?dest))
    })
    .await
}
