//! Wiring: binds the listeners, starts inbound, outbound and admin, and drains on
//! SIGTERM, SIGINT or `POST /shutdown`.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use anyhow::Context;
use tokio::net::TcpListener;

use crate::{
    admin::{self, Admin},
    config::{self, Config},
    drain,
    http::{client::Client, proxy::HttpProxy},
    inbound,
    log::LogHandle,
    metrics::{Direction, Metrics},
    outbound,
    resolve::Resolver,
};

pub async fn run(cfg: Config, log: LogHandle) -> anyhow::Result<()> {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "weft-proxy starting with {cfg:?}");
    if cfg.control_addr.is_none() {
        tracing::info!("{} is unset: running standalone", config::CONTROL_ADDR);
    }
    let cfg = Arc::new(cfg);
    let metrics = Metrics::new();
    let inbound_l = bind(cfg.inbound_addr, config::INBOUND_ADDR).await?;
    let outbound_l = bind(cfg.outbound_addr, config::OUTBOUND_ADDR).await?;
    let admin_l = bind_std(cfg.admin_addr, config::ADMIN_ADDR)?;
    let own_addrs = vec![inbound_l.local_addr()?, outbound_l.local_addr()?, cfg.admin_addr];
    let resolver = Resolver::from_system()?;
    let proxy = |dir| {
        Arc::new(HttpProxy {
            dir,
            client: Client::new(&cfg.http, cfg.connect_timeout),
            resolver: resolver.clone(),
            metrics: metrics.clone(),
            max_header_bytes: cfg.http.max_header_bytes,
            tcp_idle_timeout: cfg.tcp_idle_timeout,
            connect_timeout: cfg.connect_timeout,
            mesh_networks: cfg.mesh_networks.clone(),
            own_addrs: own_addrs.clone(),
            access_log: cfg.log.access_log,
        })
    };

    let (signal, watch) = drain::channel();
    tokio::spawn(inbound::run(inbound_l, proxy(Direction::Inbound), cfg.clone(), watch.clone()));
    tokio::spawn(outbound::run(outbound_l, proxy(Direction::Outbound), cfg.clone(), watch));

    let ready = Arc::new(AtomicBool::new(false));
    let (shutdown_tx, mut shutdown_rx) = tokio::sync::mpsc::channel(1);
    let admin =
        Arc::new(Admin { metrics: metrics.clone(), ready: ready.clone(), log, shutdown: shutdown_tx });
    spawn_admin(admin_l, admin)?;
    ready.store(true, Ordering::Release);
    tracing::info!(
        inbound = %cfg.inbound_addr, outbound = %cfg.outbound_addr, admin = %cfg.admin_addr,
        "weft-proxy ready"
    );

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let why = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = shutdown_rx.recv() => "POST /shutdown",
    };
    ready.store(false, Ordering::Release);
    tracing::info!("{why}: draining for up to {:?}", cfg.drain_grace);
    if signal.drain(cfg.drain_grace).await {
        tracing::info!("drained; exiting");
    } else {
        tracing::warn!("grace period of {:?} ended with work in flight; exiting", cfg.drain_grace);
    }
    Ok(())
}

async fn bind(addr: SocketAddr, name: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {name}={addr}"))
}

fn bind_std(addr: SocketAddr, name: &str) -> anyhow::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {name}={addr}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// The admin server gets its own single-threaded runtime on its own thread.
fn spawn_admin(listener: std::net::TcpListener, admin: Arc<Admin>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("weft-admin".into()).spawn(move || {
        rt.block_on(async move {
            match TcpListener::from_std(listener) {
                Ok(l) => admin::serve(l, admin).await,
                Err(e) => tracing::error!("admin listener failed: {e}"),
            }
        })
    })?;
    Ok(())
}
