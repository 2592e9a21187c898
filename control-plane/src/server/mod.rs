//! `weft control`: the control-plane server. gRPC (Identity, Discovery, Policy) on one
//! port; `/live`, `/ready` and `/metrics` on an admin port.
//!
//! State flows one way: `source` (the mesh file, parsed and validated by `mesh` and
//! `routes`) → a `watch::channel<Arc<Mesh>>` → `identity` (tokens → `ca`) and `watch`
//! (Discovery and Policy streams).

pub mod ca;
pub mod fuzzing;
pub mod identity;
pub mod kubernetes;
pub mod listen;
pub mod mesh;
pub mod precedence;
pub mod routes;
pub mod source;
pub mod watch;
pub mod webhook;

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

/// Where the mesh's world comes from.
pub enum From {
    /// A mesh file, re-read when it changes.
    File(PathBuf),
    /// The Kubernetes API (see [`kubernetes`]).
    Kubernetes(Box<KubernetesOptions>),
}

pub struct KubernetesOptions {
    pub trust_domain: String,
    /// The control plane's own namespace: where the CA's Secret is.
    pub namespace: String,
    pub ca_secret: String,
    pub trust_bundle_config_map: Option<String>,
    /// The audience the proxies' ServiceAccount tokens must be issued for.
    pub token_audience: String,
    /// The sidecar injector's admission webhook, when it is served.
    pub webhook: Option<WebhookOptions>,
}

pub struct WebhookOptions {
    pub addr: SocketAddr,
    /// DNS names of the webhook's Service (its certificate's SANs).
    pub names: Vec<String>,
    /// The MutatingWebhookConfiguration whose `caBundle` is kept current.
    pub config: String,
    pub inject: crate::inject::Config,
}

pub struct Options {
    pub from: From,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    /// More roots to trust besides the signing one (root rotation).
    pub extra_roots: Option<PathBuf>,
    pub cert_ttl: Duration,
    /// Connections the gRPC listener holds at once at most (`--max-connections`).
    pub max_connections: usize,
    /// How long a new gRPC connection has to send HTTP/2's preface (`--handshake-timeout`).
    pub handshake_timeout: Duration,
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let grpc = tokio::net::TcpListener::bind(opts.grpc_addr)
        .await
        .with_context(|| format!("cannot listen on --grpc-addr {}", opts.grpc_addr))?;
    let admin = tokio::net::TcpListener::bind(opts.admin_addr)
        .await
        .with_context(|| format!("cannot listen on --admin-addr {}", opts.admin_addr))?;
    // The addresses bound (they differ from the options for port 0), for whoever started us.
    let (grpc_addr, admin_addr) = (grpc.local_addr()?, admin.local_addr()?);
    tracing::info!(grpc = %grpc_addr, admin = %admin_addr, "listening");
    let mut registry = Registry::with_prefix("weft_control");
    let refused = listen::Refused::register(&mut registry);
    let ready = Arc::new(AtomicBool::new(false));
    let loaded = match &opts.from {
        From::File(path) => load_file(path, &opts, &mut registry)?,
        From::Kubernetes(k) => {
            let stats = Arc::new(kubernetes::Stats::default());
            stats.register(&mut registry);
            let webhook_expiry: Gauge = Gauge::default();
            if k.webhook.is_some() {
                registry.register(
                    "webhook_certificate_expiry_timestamp_seconds",
                    "When the injector webhook's serving certificate expires (Unix time); renewed at 70 % of its life",
                    webhook_expiry.clone(),
                );
            }
            let (tx, state) = tokio::sync::watch::channel(Arc::new(mesh::Mesh::default()));
            // Live (and not ready) while the initial lists load.
            let admin_state = AdminState { ready: ready.clone(), state, stats: Some(stats.clone()) };
            tokio::spawn(serve_admin(admin, admin_state, registry, refused.clone()));
            let (loaded, client) = load_kubernetes(k, &opts, stats.clone()).await?;
            if let Some(w) = &k.webhook {
                start_webhook(w, client, loaded.ca.clone(), &stats, refused.clone(), webhook_expiry).await?;
            }
            // The admin port follows the state the watches publish.
            let mut published = loaded.state.clone();
            tokio::spawn(async move {
                loop {
                    let _ = tx.send(published.borrow_and_update().clone());
                    if published.changed().await.is_err() {
                        return;
                    }
                }
            });
            serve(grpc, loaded, ready, &opts, refused).await?;
            return Ok(());
        }
    };
    tokio::spawn(serve_admin(
        admin,
        AdminState { ready: ready.clone(), state: loaded.state.clone(), stats: None },
        registry,
        refused.clone(),
    ));
    serve(grpc, loaded, ready, &opts, refused).await
}

/// What the gRPC services are made from.
struct Loaded {
    state: State,
    ca: ca::Shared,
    auth: Arc<dyn Authenticator>,
}

fn load_file(path: &std::path::Path, opts: &Options, registry: &mut Registry) -> anyhow::Result<Loaded> {
    let (source, state) = FileSource::load(path.to_path_buf())?;
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
    let file_valid: Gauge = Gauge::default();
    registry.register(
        "mesh_file_valid",
        "1 when the mesh file on disk is the state being served",
        FileValid { valid, gauge: file_valid },
    );
    tokio::spawn(source.run());
    Ok(Loaded { auth: Arc::new(MeshTokens(state.clone())), state, ca: ca::fixed(ca) })
}

async fn load_kubernetes(
    k: &KubernetesOptions,
    opts: &Options,
    stats: Arc<kubernetes::Stats>,
) -> anyhow::Result<(Loaded, kube::Client)> {
    if opts.ca_cert.is_some() || opts.ca_key.is_some() {
        anyhow::bail!(
            "--ca-cert/--ca-key are for the mesh file; with Kubernetes the root comes from --ca-secret"
        );
    }
    let client = kubernetes::client().await?;
    kubernetes::tokens::check_permission(&client).await?;
    let from = kubernetes::ca::Source {
        namespace: k.namespace.clone(),
        secret: k.ca_secret.clone(),
        bundle_config_map: k.trust_bundle_config_map.clone(),
    };
    let ca = kubernetes::ca::shared(&client, &k.trust_domain, from).await?;
    let kopts =
        kubernetes::Options { trust_domain: k.trust_domain.clone(), settle: Duration::from_millis(20) };
    let state = kubernetes::start(client.clone(), kopts, stats).await?;
    let auth = kubernetes::tokens::TokenReviews::new(
        client.clone(),
        k.token_audience.clone(),
        k.trust_domain.clone(),
    );
    Ok((Loaded { state, ca, auth: Arc::new(auth) }, client))
}

/// The injector's webhook: its listener, the namespaces it reads opt-ins from, and the
/// webhook configuration's `caBundle` set to the CA's roots.
async fn start_webhook(
    w: &WebhookOptions,
    client: kube::Client,
    ca: ca::Shared,
    stats: &Arc<kubernetes::Stats>,
    refused: listen::Refused,
    expiry: Gauge,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(w.addr)
        .await
        .with_context(|| format!("cannot listen on --webhook-addr {}", w.addr))?;
    tracing::info!(webhook = %listener.local_addr()?, "listening");
    let namespaces = kubernetes::namespaces(&client, stats);
    let _ = namespaces.wait_until_ready().await;
    let hook = webhook::Webhook {
        inject: w.inject.clone(),
        namespace_opted_in: Box::new(move |ns| kubernetes::opted_in(&namespaces, ns)),
    };
    kubernetes::webhook_config::keep_ca_bundle(client.clone(), w.config.clone(), ca.clone()).await;
    webhook::start(listener, ca, w.names.clone(), Arc::new(hook), refused, expiry)
}

async fn serve(
    grpc: tokio::net::TcpListener,
    loaded: Loaded,
    ready: Arc<AtomicBool>,
    opts: &Options,
    refused: listen::Refused,
) -> anyhow::Result<()> {
    let Loaded { state, ca, auth } = loaded;
    let grpc_addr = grpc.local_addr()?;
    let identity = IdentityService { ca, tokens: auth.clone(), ttl: opts.cert_ttl };
    let incoming =
        listen::grpc(grpc, listen::Cap::new("grpc", opts.max_connections, refused), opts.handshake_timeout);
    let server = tonic::transport::Server::builder()
        // A proxy's watches are idle between changes: pings find the peers that went away
        // without closing (a node lost), so their connections do not hold a share forever.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(IdentityServer::new(identity))
        .add_service(DiscoveryServer::new(DiscoveryService { state: state.clone(), auth: auth.clone() }))
        .add_service(PolicyServer::new(PolicyService { state, auth }))
        .serve_with_incoming_shutdown(incoming, shutdown());
    ready.store(true, Ordering::Release);
    let source = match &opts.from {
        From::File(p) => p.display().to_string(),
        From::Kubernetes(_) => "kubernetes".to_string(),
    };
    tracing::info!(grpc = %grpc_addr, source, "weft control ready");
    server.await?;
    tracing::info!("weft control stopped");
    Ok(())
}

/// `mesh_file_valid`, read from the source's flag at each scrape.
#[derive(Debug)]
struct FileValid {
    valid: Arc<AtomicBool>,
    gauge: Gauge,
}

impl prometheus_client::encoding::EncodeMetric for FileValid {
    fn encode(&self, encoder: prometheus_client::encoding::MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        self.gauge.set(i64::from(self.valid.load(Ordering::Relaxed)));
        self.gauge.encode(encoder)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Gauge
    }
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

/// Connections the admin port holds at once at most.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// What the admin port reports.
#[derive(Clone)]
struct AdminState {
    ready: Arc<AtomicBool>,
    state: State,
    /// The Kubernetes watches' figures, refreshed at each scrape.
    stats: Option<Arc<kubernetes::Stats>>,
}

async fn serve_admin(
    listener: tokio::net::TcpListener,
    admin: AdminState,
    mut registry: Registry,
    refused: listen::Refused,
) {
    let watches: Gauge = Gauge::default();
    registry.register(
        "watches",
        "Watch streams open to proxies (discovery, policy, routes)",
        watches.clone(),
    );
    let generation: Gauge = Gauge::default();
    registry.register(
        "mesh_generation",
        "The generation of the state being served; answers to proxies carry the one they were made from",
        generation.clone(),
    );
    let registry = Arc::new(registry);
    let mut acceptor = weft_api::accept::Acceptor::new("admin");
    // Probes and scrapes only: a few at once, each with 10 s to send its request.
    let cap = listen::Cap::new("admin", ADMIN_MAX_CONNECTIONS, refused);
    loop {
        let (stream, _) = acceptor.accept(&listener).await;
        let Some(permit) = cap.admit() else { continue };
        let AdminState { ready, state, stats } = admin.clone();
        let (registry, generation, watches) = (registry.clone(), generation.clone(), watches.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let (status, body) = match req.uri().path() {
                    "/live" => (StatusCode::OK, "live\n".to_string()),
                    "/ready" if ready.load(Ordering::Acquire) => (StatusCode::OK, "ready\n".to_string()),
                    "/ready" => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_string()),
                    "/metrics" => {
                        generation.set(i64::try_from(state.borrow().generation).unwrap_or(i64::MAX));
                        watches.set(watch::OPEN.load(Ordering::Relaxed));
                        if let Some(stats) = &stats {
                            stats.refresh();
                        }
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
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            drop(permit);
        });
    }
}
