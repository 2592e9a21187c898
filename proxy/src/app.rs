//! Wiring: binds the listeners, starts the proxy's shards and the admin server, and
//! drains on SIGTERM, SIGINT or `POST /shutdown`.
//!
//! The proxy runs as `WEFT_WORKER_THREADS` shards, each a thread with a single-threaded
//! tokio runtime and its own `SO_REUSEPORT` listeners and upstream pools, as nginx runs
//! workers. The kernel spreads connections across shards; a connection, its requests
//! and its upstream connections stay on one thread, with no cross-thread wake-ups or
//! work stealing on the request path (measured in bench/: about a fifth more requests
//! per CPU than a shared multi-threaded runtime).

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc};

use anyhow::Context;
use tokio::net::TcpListener;

use crate::{
    admin::{self, Admin},
    config::{self, Config},
    drain,
    http::{forwarder::Forwarder, pool::Pool, service::Common},
    inbound::{self, policy::Policies, Inbound},
    log::LogHandle,
    metrics::{Direction, Metrics},
    outbound::{
        self, attempts::Attempts, discovery::Discovery, in_flight::InFlight, plan::Planner, retry::Budgets,
        routes::RouteWatch, Outbound,
    },
    resolve::Resolver,
    transport::tcp::Timeouts,
};

pub async fn run(cfg: Config, log: LogHandle) -> anyhow::Result<()> {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "weft-proxy starting with {cfg:?}");
    let metrics = Metrics::new();
    let ready_state = Arc::new(crate::ready::Ready::default());
    // With a control plane, the proxy is ready once it holds a certificate (for mTLS) and
    // the policies of its app's ports.
    let identity = match &cfg.control {
        None => {
            tracing::info!("{} is unset: running standalone", config::CONTROL_ADDR);
            None
        }
        Some(control) => Some(crate::identity::spawn(control.clone(), metrics.clone(), ready_state.clone())?),
    };
    // One discovery cache for all shards: an answer learnt by one serves every shard,
    // also while the control plane is away.
    let control = cfg.control.as_ref();
    let discovery = control.map(|c| Discovery::new(c, metrics.clone())).transpose()?.map(Arc::new);
    let policies = control.map(|c| Policies::new(c, metrics.clone())).transpose()?.map(Arc::new);
    let routes = control.map(|c| RouteWatch::new(c, metrics.clone())).transpose()?.map(Arc::new);
    let budgets = Arc::new(Budgets::default());
    let (tracer, flush_spans) = match &cfg.tracing {
        None => (None, None),
        Some(t) => {
            let queue = crate::trace::Queue::new(t.max_queue, t.max_batch);
            let tracer = crate::trace::Tracer::new(t.sampler, queue.clone(), metrics.clone());
            let (flush, flushed) = tokio::sync::oneshot::channel();
            tokio::spawn(crate::trace::export::run(t.clone(), queue, flushed, metrics.clone()));
            tracing::info!(endpoint = %t.endpoint, protocol = ?t.protocol, "exporting spans over OTLP");
            (Some(tracer), Some(flush))
        }
    };
    let workload = crate::http::observe::workload_header(&cfg.workload);
    if workload.is_none() {
        tracing::warn!(workload = cfg.workload, "not a valid workload name; peers will not learn it");
    }
    let in_flight = Arc::new(InFlight::default());
    let hop = crate::outbound::hop::HopGuard::default();
    let limits = (
        Arc::new(tokio::sync::Semaphore::new(cfg.max_connections)),
        Arc::new(tokio::sync::Semaphore::new(cfg.max_connections)),
    );
    let cfg = Arc::new(cfg);
    let shards = cfg.worker_threads.max(1);
    let inbound_ls = bind_dual(cfg.inbound_addr, shards, config::INBOUND_ADDR)?;
    let outbound_ls = bind_dual(cfg.outbound_addr, shards, config::OUTBOUND_ADDR)?;
    let admin_l = bind_shards(cfg.admin_addr, 1, config::ADMIN_ADDR)?.remove(0);
    // The addresses bound, which differ from the settings for port 0: logged for whoever
    // started the proxy (tests bind port 0 and read them here, instead of racing for a
    // port picked in advance).
    let bound = |ls: &[Vec<std::net::TcpListener>]| ls[0][0].local_addr();
    let (inbound, outbound, admin) = (bound(&inbound_ls)?, bound(&outbound_ls)?, admin_l.local_addr()?);
    tracing::info!(%inbound, %outbound, %admin, shards, "listening");
    let mut own_addrs = vec![admin];
    for l in inbound_ls.iter().chain(&outbound_ls).filter_map(|ls| ls.first()) {
        own_addrs.push(l.local_addr()?);
    }
    let own_addrs = Arc::new(own_addrs);
    // Fail at startup, not on the first request, if resolv.conf is unusable.
    Resolver::from_system()?;

    let (signal, watch) = drain::channel();
    for (i, (inbound_l, outbound_l)) in
        per_shard(inbound_ls, shards).into_iter().zip(per_shard(outbound_ls, shards)).enumerate()
    {
        let shard = Shard {
            cfg: cfg.clone(),
            metrics: metrics.clone(),
            own_addrs: own_addrs.clone(),
            identity: identity.clone(),
            discovery: discovery.clone(),
            policies: policies.clone(),
            routes: routes.clone(),
            budgets: budgets.clone(),
            in_flight: in_flight.clone(),
            tracer: tracer.clone(),
            workload: workload.clone(),
            hop: hop.clone(),
            limits: limits.clone(),
        };
        let watch = watch.clone();
        std::thread::Builder::new()
            .name(format!("weft-shard-{i}"))
            .spawn(move || shard.run(inbound_l, outbound_l, watch))
            .context("cannot start a proxy thread")?;
    }
    drop(watch);

    let ready = ready_state;
    let (shutdown_tx, mut shutdown_rx) = tokio::sync::mpsc::channel(1);
    let admin = Arc::new(Admin {
        metrics: metrics.clone(),
        max_connections: cfg.admin_max_connections,
        header_read_timeout: cfg.http.header_read_timeout,
        ready: ready.clone(),
        log,
        shutdown: shutdown_tx,
    });
    spawn_admin(admin_l, admin)?;
    // Ready once the proxy holds its certificate and the policy of each of its app's ports
    // (WEFT_INBOUND_PORTS): before that it would refuse what it is about to accept.
    match (identity.clone(), policies.clone(), &cfg.control) {
        (Some(mut creds), Some(policies), Some(control)) => {
            let (ready, ports) = (ready.clone(), control.inbound_ports.clone());
            tokio::spawn(async move {
                if creds.wait_for(Option::is_some).await.is_err() {
                    return;
                }
                for port in ports {
                    ready.waiting(format!(
                        "waiting for the control plane's policy of port {port} (WEFT_INBOUND_PORTS)"
                    ));
                    policies.answered(port).await;
                }
                ready.set_ready();
            });
        }
        _ => ready.set_ready(),
    }

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let why = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = shutdown_rx.recv() => "POST /shutdown",
    };
    ready.not_ready("draining");
    tracing::info!("{why}: draining for up to {:?}", cfg.drain_grace);
    if signal.drain(cfg.drain_grace).await {
        tracing::info!("drained; exiting");
    } else {
        tracing::warn!("grace period of {:?} ended with work in flight; exiting", cfg.drain_grace);
    }
    if let Some(flush) = flush_spans {
        // Spans of the last requests: one more export, bounded like any other.
        let (done, wait) = tokio::sync::oneshot::channel();
        if flush.send(done).is_ok() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), wait).await;
        }
    }
    // Returning ends the process, and with it the shard threads.
    Ok(())
}

/// One proxy thread: inbound and outbound listeners with their own pools.
struct Shard {
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    own_addrs: Arc<Vec<SocketAddr>>,
    identity: Option<crate::identity::Current>,
    discovery: Option<Arc<Discovery>>,
    policies: Option<Arc<Policies>>,
    routes: Option<Arc<RouteWatch>>,
    budgets: Arc<Budgets>,
    in_flight: Arc<InFlight>,
    tracer: Option<Arc<crate::trace::Tracer>>,
    workload: Option<http::HeaderValue>,
    hop: crate::outbound::hop::HopGuard,
    /// Connections open at once, per direction, shared by the shards.
    limits: (Arc<tokio::sync::Semaphore>, Arc<tokio::sync::Semaphore>),
}

impl Shard {
    fn run(
        self,
        inbound_ls: Vec<std::net::TcpListener>,
        outbound_ls: Vec<std::net::TcpListener>,
        watch: drain::Watch,
    ) {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => return tracing::error!("cannot start a proxy runtime: {e}"),
        };
        rt.block_on(async move {
            let (inbound, outbound) = match (self.inbound(), self.outbound()) {
                (Ok(i), Ok(o)) => (i, o),
                (Err(e), _) | (_, Err(e)) => return tracing::error!("cannot start the proxy: {e:#}"),
            };
            let listeners = |ls: Vec<std::net::TcpListener>| {
                ls.into_iter().map(TcpListener::from_std).collect::<std::io::Result<Vec<_>>>()
            };
            let (inbound_ls, outbound_ls) = match (listeners(inbound_ls), listeners(outbound_ls)) {
                (Ok(i), Ok(o)) => (i, o),
                (Err(e), _) | (_, Err(e)) => return tracing::error!("cannot use a listener: {e}"),
            };
            let cfg = &self.cfg;
            let mut loops: Vec<Pin<Box<dyn Future<Output = ()>>>> = vec![];
            let limit = |name, open: &Arc<tokio::sync::Semaphore>| crate::transport::Limit {
                name,
                open: open.clone(),
                metrics: self.metrics.clone(),
            };
            for l in inbound_ls {
                let limit = limit("inbound", &self.limits.0);
                loops.push(Box::pin(inbound::run(l, limit, inbound.clone(), cfg.clone(), watch.clone())));
            }
            for l in outbound_ls {
                let limit = limit("outbound", &self.limits.1);
                loops.push(Box::pin(outbound::run(l, limit, outbound.clone(), cfg.clone(), watch.clone())));
            }
            drop(watch);
            futures_util::future::join_all(loops).await;
            // Listeners are closed; keep driving in-flight connections until the
            // process exits at the end of the drain.
            std::future::pending::<()>().await
        })
    }

    fn common(&self, dir: Direction) -> Common {
        Common {
            dir,
            metrics: self.metrics.clone(),
            tracer: self.tracer.clone(),
            access_log: self.cfg.log.access_log,
        }
    }

    fn pool(&self) -> Pool {
        Pool::new(&self.cfg.http, self.cfg.connect_timeout, self.metrics.clone())
    }

    fn timeouts(&self) -> Timeouts {
        Timeouts { connect: self.cfg.connect_timeout, idle: self.cfg.tcp_idle_timeout }
    }

    fn inbound(&self) -> anyhow::Result<Arc<Inbound>> {
        // The app is not a proxy: no HTTP/2 carriage towards it, and no mesh peer.
        let forwarder = Forwarder::new(self.pool(), vec![], None, None);
        Ok(Arc::new(Inbound {
            common: self.common(Direction::Inbound),
            forwarder,
            policies: self.policies.clone(),
            identity: self.identity.clone(),
            workload: self.workload.clone(),
            max_header_bytes: self.cfg.http.max_header_bytes,
            tcp: self.timeouts(),
            probes: self.cfg.inbound_probes.clone(),
        }))
    }

    fn outbound(&self) -> anyhow::Result<Arc<Outbound>> {
        let cfg = &self.cfg;
        let forwarder = Forwarder::new(
            self.pool(),
            cfg.mesh_networks.clone(),
            self.identity.clone(),
            self.workload.clone(),
        );
        Ok(Arc::new(Outbound {
            common: self.common(Direction::Outbound),
            hop: self.hop.clone(),
            planner: Planner {
                discovery: self.discovery.clone(),
                routes: self.routes.clone(),
                resolver: Resolver::from_system()?,
                own_addrs: self.own_addrs.clone(),
                queue_timeout: cfg.queue_timeout,
            },
            attempts: Attempts {
                forwarder,
                balancers: Default::default(),
                budgets: self.budgets.clone(),
                in_flight: self.in_flight.clone(),
                metrics: self.metrics.clone(),
                tracer: self.tracer.clone(),
                queue_timeout: cfg.queue_timeout,
            },
            max_header_bytes: cfg.http.max_header_bytes,
            tcp: self.timeouts(),
        }))
    }
}

/// Shard listeners for `addr` and, for the default IPv4 addresses, their IPv6 twin, so
/// IPv6 traffic redirected by ip6tables has somewhere to land: `0.0.0.0` → `[::]`,
/// `127.0.0.1` → `[::1]`. The twin is skipped when the host has no IPv6.
/// Returns one list of `n` listeners per address.
fn bind_dual(addr: SocketAddr, n: usize, name: &str) -> anyhow::Result<Vec<Vec<std::net::TcpListener>>> {
    let v4 = bind_shards(addr, n, name)?;
    let port = v4[0].local_addr()?.port();
    let twin = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => Some(std::net::Ipv6Addr::UNSPECIFIED),
        std::net::IpAddr::V4(ip) if ip.is_loopback() => Some(std::net::Ipv6Addr::LOCALHOST),
        _ => None,
    };
    let mut out = vec![v4];
    if let Some(ip) = twin {
        match bind_shards(SocketAddr::new(ip.into(), port), n, name) {
            Ok(v6) => out.push(v6),
            Err(e) => tracing::debug!("no IPv6 twin for {name}: {e:#}"),
        }
    }
    Ok(out)
}

/// Regroups listeners by shard: shard `i` gets the `i`th listener of every address.
fn per_shard(by_addr: Vec<Vec<std::net::TcpListener>>, n: usize) -> Vec<Vec<std::net::TcpListener>> {
    let mut shards: Vec<Vec<_>> = (0..n).map(|_| vec![]).collect();
    for ls in by_addr {
        for (i, l) in ls.into_iter().enumerate() {
            shards[i].push(l);
        }
    }
    shards
}

/// `n` listeners on one address with `SO_REUSEPORT`, one per shard, so the kernel
/// spreads connections evenly across shards. A probe bind without `SO_REUSEPORT` first
/// makes sure nobody else holds the port: otherwise another process of the same user
/// could silently share it.
fn bind_shards(addr: SocketAddr, n: usize, name: &str) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let socket = |reuse_port: bool| -> anyhow::Result<socket2::Socket> {
        let sock = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
        if addr.is_ipv6() {
            // The IPv4 address has its own listener; keep this one to IPv6.
            sock.set_only_v6(true)?;
        }
        sock.set_reuse_address(true)?;
        sock.set_reuse_port(reuse_port)?;
        sock.set_nonblocking(true)?;
        Ok(sock)
    };
    let probe = socket(false)?;
    probe.bind(&addr.into()).with_context(|| format!("cannot listen on {name}={addr}"))?;
    if addr.port() == 0 {
        // A port the kernel picks: `SO_REUSEPORT` sockets bound to it after the probe let
        // go could share it with another process that picked it meanwhile. So one socket
        // without it, which every shard accepts from.
        probe.listen(1024).with_context(|| format!("cannot listen on {name}={addr}"))?;
        let l: std::net::TcpListener = probe.into();
        return (0..n).map(|_| l.try_clone().with_context(|| format!("cannot share {name}"))).collect();
    }
    // An ephemeral port (`:0`) is chosen by the probe and used by every shard.
    let addr = probe.local_addr()?.as_socket().unwrap_or(addr);
    drop(probe);
    (0..n)
        .map(|_| {
            let sock = socket(true)?;
            sock.bind(&addr.into()).with_context(|| format!("cannot listen on {name}={addr}"))?;
            sock.listen(1024).with_context(|| format!("cannot listen on {name}={addr}"))?;
            Ok(sock.into())
        })
        .collect()
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
