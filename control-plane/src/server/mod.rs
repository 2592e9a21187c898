//! `weft control`: the control-plane server. gRPC (Identity, Discovery, Policy) on one
//! port; `/live`, `/ready` and `/metrics` on an admin port.
//!
//! State flows one way: `source` (the mesh file, parsed and validated by `mesh` and
//! `routes`) → a `watch::channel<Arc<Mesh>>` → `identity` (tokens → `ca`) and `watch`
//! (Discovery and Policy streams).

pub mod ca;
pub mod fuzzing;
pub mod identity;
pub mod mesh;
pub mod routes;
pub mod source;
pub mod watch;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::{metrics::gauge::Gauge, registry::Registry};
use weft_api::v1::{
    discovery_server::DiscoveryServer, identity_server::IdentityServer, policy_server::PolicyServer,
};

use self::{
    ca::Ca,
    identity::{Authenticator, IdentityService, MeshTokens},
    source::{FileSource, Source, State},
    watch::{DiscoveryService, PolicyService},
};

pub struct Options {
    pub mesh: PathBuf,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    /// More roots to trust besides the signing one (root rotation).
    pub extra_roots: Option<PathBuf>,
    pub cert_ttl: Duration,
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let (source, state) = FileSource::load(opts.mesh.clone())?;
    let source: Box<dyn Source> = Box::new(source);
    let trust_domain = state.borrow().trust_domain.clone();
    let ca = match (&opts.ca_cert, &opts.ca_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
            };
            let extra = opts.extra_roots.as_ref().map(read).transpose()?.unwrap_or_default();
            Ca::from_pem(&trust_domain, &read(cert)?, &read(key)?, &extra)?
        }
        (None, None) => {
            tracing::warn!(
                "NO CA GIVEN: generated a throwaway root for {trust_domain}. Certificates will not survive a \
                 restart of the control plane. Pass --ca-cert and --ca-key for anything but local use."
            );
            Ca::generate(&trust_domain)?
        }
        _ => anyhow::bail!("give both --ca-cert and --ca-key, or neither to generate a local root"),
    };
    let valid = source.valid();
    tokio::spawn(source.run());

    let grpc = tokio::net::TcpListener::bind(opts.grpc_addr)
        .await
        .with_context(|| format!("cannot listen on --grpc-addr {}", opts.grpc_addr))?;
    let admin = tokio::net::TcpListener::bind(opts.admin_addr)
        .await
        .with_context(|| format!("cannot listen on --admin-addr {}", opts.admin_addr))?;
    // The addresses bound (they differ from the options for port 0), for whoever started us.
    let (grpc_addr, admin_addr) = (grpc.local_addr()?, admin.local_addr()?);
    tracing::info!(grpc = %grpc_addr, admin = %admin_addr, "listening");
    let ready = Arc::new(AtomicBool::new(false));
    tokio::spawn(serve_admin(admin, AdminState { ready: ready.clone(), valid, state: state.clone() }));

    let auth: Arc<dyn Authenticator> = Arc::new(MeshTokens(state.clone()));
    let identity = IdentityService { ca: Arc::new(ca), tokens: auth.clone(), ttl: opts.cert_ttl };
    let server = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_service(DiscoveryServer::new(DiscoveryService { state: state.clone(), auth: auth.clone() }))
        .add_service(PolicyServer::new(PolicyService { state, auth }))
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(grpc), shutdown());
    ready.store(true, Ordering::Release);
    tracing::info!(grpc = %grpc_addr, admin = %admin_addr, mesh = %opts.mesh.display(), "weft control ready");
    server.await?;
    tracing::info!("weft control stopped");
    Ok(())
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// What the admin port reports.
#[derive(Clone)]
struct AdminState {
    ready: Arc<AtomicBool>,
    /// Whether the source's latest input was accepted.
    valid: Arc<AtomicBool>,
    state: State,
}

async fn serve_admin(listener: tokio::net::TcpListener, admin: AdminState) {
    let mut registry = Registry::with_prefix("weft_control");
    let file_valid: Gauge = Gauge::default();
    registry.register(
        "mesh_file_valid",
        "1 when the mesh file on disk is the state being served",
        file_valid.clone(),
    );
    let generation: Gauge = Gauge::default();
    registry.register(
        "mesh_generation",
        "The generation of the state being served; answers to proxies carry the one they were made from",
        generation.clone(),
    );
    let registry = Arc::new(registry);
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let AdminState { ready, valid, state } = admin.clone();
        let (registry, file_valid, generation) = (registry.clone(), file_valid.clone(), generation.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let (status, body) = match req.uri().path() {
                    "/live" => (StatusCode::OK, "live\n".to_string()),
                    "/ready" if ready.load(Ordering::Acquire) => (StatusCode::OK, "ready\n".to_string()),
                    "/ready" => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_string()),
                    "/metrics" => {
                        file_valid.set(i64::from(valid.load(Ordering::Relaxed)));
                        generation.set(i64::try_from(state.borrow().generation).unwrap_or(i64::MAX));
                        let mut text = String::new();
                        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
                        (StatusCode::OK, text)
                    }
                    _ => (StatusCode::NOT_FOUND, "not found; try /live, /ready, /metrics\n".to_string()),
                };
                let mut rsp = Response::new(Full::new(Bytes::from(body)));
                *rsp.status_mut() = status;
                async move { Ok::<_, std::convert::Infallible>(rsp) }
            });
            let _ =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
