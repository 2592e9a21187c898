//! Wiring: binds the listeners, starts the proxy's shards and the admin server, and
//! drains on SIGTERM, SIGINT or `POST /shutdown`.
//!
//! The proxy runs as `WEFT_WORKER_THREADS` shards, each a thread with a single-threaded
//! tokio runtime and its own `SO_REUSEPORT` listeners and upstream pools, as nginx runs
//! workers. The kernel spreads connections across shards; a connection, its requests
//! and its upstream connections stay on one thread, with no cross-thread wake-ups or
//! work stealing on the request path (measured in bench/: about a fifth more requests
//! per CPU than a shared multi-threaded runtime).

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
    let shards = cfg.worker_threads.max(1);
    let inbound_ls = bind_shards(cfg.inbound_addr, shards, config::INBOUND_ADDR)?;
    let outbound_ls = bind_shards(cfg.outbound_addr, shards, config::OUTBOUND_ADDR)?;
    let admin_l = bind_shards(cfg.admin_addr, 1, config::ADMIN_ADDR)?.remove(0);
    let own_addrs = Arc::new(vec![inbound_ls[0].local_addr()?, outbound_ls[0].local_addr()?, cfg.admin_addr]);
    // Fail at startup, not on the first request, if resolv.conf is unusable.
    Resolver::from_system()?;

    let (signal, watch) = drain::channel();
    for (i, (inbound_l, outbound_l)) in inbound_ls.into_iter().zip(outbound_ls).enumerate() {
        let shard = Shard { cfg: cfg.clone(), metrics: metrics.clone(), own_addrs: own_addrs.clone() };
        let watch = watch.clone();
        std::thread::Builder::new()
            .name(format!("weft-shard-{i}"))
            .spawn(move || shard.run(inbound_l, outbound_l, watch))
            .context("cannot start a proxy thread")?;
    }
    drop(watch);

    let ready = Arc::new(AtomicBool::new(false));
    let (shutdown_tx, mut shutdown_rx) = tokio::sync::mpsc::channel(1);
    let admin =
        Arc::new(Admin { metrics: metrics.clone(), ready: ready.clone(), log, shutdown: shutdown_tx });
    spawn_admin(admin_l, admin)?;
    ready.store(true, Ordering::Release);
    tracing::info!(
        inbound = %cfg.inbound_addr, outbound = %cfg.outbound_addr, admin = %cfg.admin_addr, shards,
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
    // Returning ends the process, and with it the shard threads.
    Ok(())
}

/// One proxy thread: inbound and outbound listeners with their own pools.
struct Shard {
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    own_addrs: Arc<Vec<SocketAddr>>,
}

impl Shard {
    fn run(self, inbound_l: std::net::TcpListener, outbound_l: std::net::TcpListener, watch: drain::Watch) {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => return tracing::error!("cannot start a proxy runtime: {e}"),
        };
        rt.block_on(async move {
            let (inbound_l, outbound_l) =
                match (TcpListener::from_std(inbound_l), TcpListener::from_std(outbound_l)) {
                    (Ok(i), Ok(o)) => (i, o),
                    (Err(e), _) | (_, Err(e)) => return tracing::error!("cannot use a listener: {e}"),
                };
            let (inbound_p, outbound_p) =
                match (self.proxy(Direction::Inbound), self.proxy(Direction::Outbound)) {
                    (Ok(i), Ok(o)) => (i, o),
                    (Err(e), _) | (_, Err(e)) => return tracing::error!("cannot start the proxy: {e:#}"),
                };
            tokio::join!(
                inbound::run(inbound_l, inbound_p, self.cfg.clone(), watch.clone()),
                outbound::run(outbound_l, outbound_p, self.cfg.clone(), watch),
            );
            // Listeners are closed; keep driving in-flight connections until the
            // process exits at the end of the drain.
            std::future::pending::<()>().await
        })
    }

    fn proxy(&self, dir: Direction) -> anyhow::Result<Arc<HttpProxy>> {
        let cfg = &self.cfg;
        Ok(Arc::new(HttpProxy {
            dir,
            client: Client::new(&cfg.http, cfg.connect_timeout),
            resolver: Resolver::from_system()?,
            metrics: self.metrics.clone(),
            max_header_bytes: cfg.http.max_header_bytes,
            tcp_idle_timeout: cfg.tcp_idle_timeout,
            connect_timeout: cfg.connect_timeout,
            mesh_networks: cfg.mesh_networks.clone(),
            own_addrs: self.own_addrs.to_vec(),
            access_log: cfg.log.access_log,
        }))
    }
}

/// `n` listeners on one address with `SO_REUSEPORT`, so each shard accepts on its own.
fn bind_shards(addr: SocketAddr, n: usize, name: &str) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    for _ in 0..n {
        // An ephemeral port (`:0`) is chosen by the first bind and shared by the rest.
        let addr = out.first().map(|l| l.local_addr()).transpose()?.unwrap_or(addr);
        let sock = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
        sock.set_reuse_address(true)?;
        sock.set_reuse_port(true)?;
        sock.set_nonblocking(true)?;
        sock.bind(&addr.into()).with_context(|| format!("cannot listen on {name}={addr}"))?;
        sock.listen(1024).with_context(|| format!("cannot listen on {name}={addr}"))?;
        out.push(sock.into());
    }
    Ok(out)
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
