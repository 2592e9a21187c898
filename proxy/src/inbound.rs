//! Inbound: connections from other pods to this pod's application.
//!
//! A redirected connection goes to the app on 127.0.0.1 at the port the client dialled;
//! a direct one (explicit mode) goes to `WEFT_APP_ADDR`.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use tokio::net::TcpListener;
use tracing::Instrument;

use crate::{
    config::Config,
    conn::{self, Dest},
    drain,
    errors::Cause,
    http::proxy::HttpProxy,
    orig_dst,
};

pub async fn run(listener: TcpListener, proxy: Arc<HttpProxy>, cfg: Arc<Config>, drain: drain::Watch) {
    let app_addr = cfg.app_addr;
    conn::accept_loop(listener, drain, move |stream, client, drain| {
        let (proxy, cfg) = (proxy.clone(), cfg.clone());
        async move {
            let target = match orig_dst::original_dst(&stream) {
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
                        tracing::info!(
                            %client, cause = Cause::NoRoute.as_str(),
                            "closing inbound connection: it was not redirected and WEFT_APP_ADDR is unset"
                        );
                        proxy.metrics.tcp_error(proxy.dir, Cause::NoRoute);
                        return;
                    }
                },
            };
            conn::serve(stream, client, Dest::Fixed(target), proxy, cfg, drain)
                .instrument(tracing::debug_span!("inbound", %client, %target))
                .await
        }
    })
    .await
}
