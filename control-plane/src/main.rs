//! weft: Weft's control plane and command-line tool.
//!
//! `weft control` runs the control plane; `weft up` runs a whole mesh on this machine
//! from a mesh file.
#![forbid(unsafe_code)]

use weft_control::cli::{example_app, stat, up};

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};

/// jemalloc, whose background thread returns memory freed after a burst (glibc's malloc
/// keeps it; bench/README.md has both measured).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "weft", version, about = "Weft service mesh")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the control plane: CA, discovery and policy for the proxies, from a mesh file
    /// or from the Kubernetes API.
    Control(Box<ControlArgs>),
    /// Run a whole mesh on this machine: the control plane, a sidecar per workload and the
    /// workloads' commands, from a mesh file (default: the built-in demo, examples/demo.yaml).
    Up {
        /// The mesh file; without one, the demo mesh of examples/demo.yaml.
        file: Option<PathBuf>,
        /// Where the addresses of every part are written while the mesh runs.
        #[arg(long, default_value = ".weft/up.json")]
        state_file: PathBuf,
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
        /// Have every sidecar write an access log line per request.
        #[arg(long)]
        access_log: bool,
    },
    /// Per-workload success rate, requests per second, latency and connections of the
    /// local mesh that `weft up` runs, from its sidecars' metrics.
    Stat {
        /// The state file of the running mesh.
        #[arg(long, default_value = ".weft/up.json")]
        state_file: PathBuf,
        /// Seconds each measurement spans.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Refresh the table until Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
    /// Print the manifests in FILE (or stdin, `-`) with every pod meshed: the sidecar
    /// the admission webhook would add (Pods, Deployments, StatefulSets, DaemonSets,
    /// ReplicaSets, Jobs, CronJobs, Lists; several YAML documents).
    Inject {
        #[arg(default_value = "-")]
        file: String,
        #[command(flatten)]
        inject: InjectArgs,
    },
    /// Print the Kubernetes install (k8s/ and the CA Secret with a new root, or the one
    /// given): `weft install | kubectl apply -f -`.
    Install {
        /// The root certificate to install (PEM); default: a new one.
        #[arg(long, requires = "root_key")]
        root_cert: Option<PathBuf>,
        #[arg(long, requires = "root_cert")]
        root_key: Option<PathBuf>,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// A generated root's lifetime in days.
        #[arg(long, default_value_t = 3650)]
        root_days: i64,
    },
    /// Print what `weft install` made, for `weft uninstall | kubectl delete -f -`.
    Uninstall,
    /// Check the mesh in the cluster KUBECONFIG names: CRDs, the control plane, the trust
    /// root's expiry, the webhook, every meshed pod's proxy. Exits 1 when a check fails.
    Check {
        /// Check a cluster before the install instead (version, permissions).
        #[arg(long)]
        pre: bool,
        /// Weft's namespace.
        #[arg(long, default_value = "weft")]
        namespace: String,
    },
    /// The demo's apps (run by `weft up examples/demo.yaml`).
    ExampleApp {
        #[command(subcommand)]
        app: ExampleApp,
    },
}

#[derive(clap::Args)]
struct ControlArgs {
    /// Where the mesh's world comes from: `file` (--mesh) or `kubernetes` (the API the
    /// pod's service account or KUBECONFIG reaches).
    #[arg(long, value_enum, default_value = "file")]
    source: SourceKind,
    /// The mesh file (YAML), re-read when it changes; with --source file.
    #[arg(long, required_if_eq("source", "file"))]
    mesh: Option<PathBuf>,
    /// Kubernetes: the trust domain of workload identities.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Kubernetes: the control plane's namespace, where --ca-secret lives.
    #[arg(long, env = "POD_NAMESPACE", default_value = "weft")]
    namespace: String,
    /// Kubernetes: the Secret with the root certificate and key (tls.crt, tls.key) and
    /// optionally the trust bundle (ca.crt).
    #[arg(long, default_value = "weft-identity")]
    ca_secret: String,
    /// Kubernetes: a ConfigMap whose ca-bundle.crt is the trust bundle (instead of the
    /// Secret's ca.crt).
    #[arg(long)]
    trust_bundle_configmap: Option<String>,
    /// Kubernetes: the audience the proxies' ServiceAccount tokens are issued for.
    #[arg(long, default_value = "weft")]
    token_audience: String,
    /// Kubernetes: serve the sidecar injector's admission webhook (HTTPS) here.
    #[arg(long)]
    webhook_addr: Option<std::net::SocketAddr>,
    /// The webhook Service's DNS names: its certificate is issued for them.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "weft-control.weft.svc,weft-control.weft.svc.cluster.local"
    )]
    webhook_names: Vec<String>,
    /// The MutatingWebhookConfiguration whose caBundle the control plane keeps current.
    #[arg(long, default_value = "weft-injector")]
    webhook_config: String,
    #[command(flatten)]
    inject: InjectArgs,
    #[arg(long, default_value = "127.0.0.1:8090")]
    grpc_addr: std::net::SocketAddr,
    #[arg(long, default_value = "127.0.0.1:9990")]
    admin_addr: std::net::SocketAddr,
    /// CA certificate (PEM). Without --ca-cert/--ca-key a throwaway root is generated.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    #[arg(long)]
    ca_key: Option<PathBuf>,
    /// Further roots to trust during a root rotation (PEM bundle).
    #[arg(long)]
    extra_roots: Option<PathBuf>,
    /// Lifetime of workload certificates, in seconds.
    #[arg(long, default_value_t = 86400)]
    cert_ttl_secs: u64,
    /// gRPC connections held at once at most; beyond, a connection is closed as it arrives
    /// (weft_control_connections_refused_total). Default: the open-file limit less 256.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Time a new gRPC connection has to send HTTP/2's preface before it is closed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    handshake_timeout: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, weft_api::duration::InvalidDuration> {
    weft_api::duration::parse(s)
}

/// What the injector puts in pods (shared by `weft inject` and the webhook).
#[derive(clap::Args, Clone)]
struct InjectArgs {
    /// The weft-proxy image (its `init` runs as the init container).
    #[arg(long)]
    proxy_image: Option<String>,
    /// `weft control`'s gRPC address as pods reach it.
    #[arg(long, default_value = "weft-control.weft.svc.cluster.local:8090")]
    control_addr: String,
    /// The trust domain of workload identities (`weft control` uses its own --trust-domain).
    #[arg(long = "inject-trust-domain", id = "inject_trust_domain", default_value = "cluster.local")]
    trust_domain: String,
    /// The audience of the projected ServiceAccount token (`weft control`: --token-audience).
    #[arg(long = "inject-token-audience", id = "inject_token_audience", default_value = "weft")]
    token_audience: String,
    /// The control plane's namespace: its pods are never injected (`weft control`: --namespace).
    #[arg(long = "control-namespace", id = "control_namespace", default_value = "weft")]
    control_namespace: String,
}

impl InjectArgs {
    fn config(self) -> weft_control::inject::Config {
        let base = weft_control::inject::Config::default();
        weft_control::inject::Config {
            proxy_image: self.proxy_image.unwrap_or(base.proxy_image),
            control_addr: self.control_addr,
            trust_domain: self.trust_domain,
            token_audience: self.token_audience,
            control_namespace: self.control_namespace,
            version: base.version,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SourceKind {
    File,
    Kubernetes,
}

#[derive(Subcommand)]
enum ExampleApp {
    /// Answer every request with `<workload>: <message>`.
    Backend {
        #[arg(long, default_value = "hello")]
        message: String,
        /// Answer this percentage of requests with 503, at random.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100))]
        fail_percent: u32,
        /// Wait this long before each answer (a slow service).
        #[arg(long, default_value = "0ms", value_parser = parse_duration)]
        delay: Duration,
    },
    /// Call every --call URL per request and answer with what they said.
    Frontend {
        #[arg(long = "call")]
        calls: Vec<String>,
    },
    /// Send steady GET requests to --target and print what came back.
    Load {
        #[arg(long)]
        target: String,
        #[arg(long, default_value_t = 10)]
        rate: u32,
        /// Seconds between reports.
        #[arg(long, default_value_t = 5)]
        every: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Control(args) => {
            let ControlArgs {
                source,
                mesh,
                trust_domain,
                namespace,
                ca_secret,
                trust_bundle_configmap,
                token_audience,
                webhook_addr,
                webhook_names,
                webhook_config,
                inject,
                grpc_addr,
                admin_addr,
                ca_cert,
                ca_key,
                extra_roots,
                cert_ttl_secs,
                max_connections,
                handshake_timeout,
            } = *args;
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env(weft_api::env::LOG)
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr)
                .init();
            let from = match (source, mesh) {
                (SourceKind::File, Some(mesh)) => weft_control::server::From::File(mesh),
                (SourceKind::File, None) => anyhow::bail!("--source file needs --mesh FILE"),
                (SourceKind::Kubernetes, _) => {
                    let webhook = webhook_addr.map(|addr| weft_control::server::WebhookOptions {
                        addr,
                        names: webhook_names,
                        config: webhook_config,
                        // The webhook injects what this control plane serves.
                        inject: weft_control::inject::Config {
                            trust_domain: trust_domain.clone(),
                            token_audience: token_audience.clone(),
                            control_namespace: namespace.clone(),
                            ..inject.config()
                        },
                    });
                    weft_control::server::From::Kubernetes(Box::new(
                        weft_control::server::KubernetesOptions {
                            trust_domain,
                            namespace,
                            ca_secret,
                            trust_bundle_config_map: trust_bundle_configmap,
                            token_audience,
                            webhook,
                        },
                    ))
                }
            };
            let opts = weft_control::server::Options {
                from,
                grpc_addr,
                admin_addr,
                ca_cert,
                ca_key,
                extra_roots,
                cert_ttl: Duration::from_secs(cert_ttl_secs),
                max_connections: max_connections
                    .unwrap_or_else(weft_control::server::listen::default_max_connections),
                handshake_timeout,
            };
            weft_control::server::run(opts).await
        }
        Cmd::Up { file, state_file, seconds, access_log } => {
            up::run(up::Options { file, state_file, duration: seconds.map(Duration::from_secs), access_log })
                .await
        }
        Cmd::Install { root_cert, root_key, trust_domain, root_days } => {
            let root = weft_control::cli::install::Root {
                cert: root_cert,
                key: root_key,
                trust_domain,
                days: root_days,
            };
            print!("{}", weft_control::cli::install::install(&root)?);
            Ok(())
        }
        Cmd::Check { pre, namespace } => {
            if weft_control::cli::check::run(pre, &namespace).await? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Cmd::Uninstall => {
            print!("{}", weft_control::cli::install::uninstall());
            Ok(())
        }
        Cmd::Inject { file, inject } => weft_control::cli::inject::run(&file, &inject.config()),
        Cmd::Stat { state_file, interval, watch } => {
            if !(0.1..=3600.0).contains(&interval) {
                anyhow::bail!("--interval must be between 0.1 and 3600 seconds");
            }
            stat::run(&state_file, Duration::from_secs_f64(interval), watch).await
        }
        Cmd::ExampleApp { app } => {
            let app = match app {
                ExampleApp::Backend { message, fail_percent, delay } => {
                    example_app::App::Backend { message, fail_percent, delay }
                }
                ExampleApp::Frontend { calls } => example_app::App::Frontend { calls },
                ExampleApp::Load { target, rate, every } => {
                    example_app::App::Load { target, rate, every: Duration::from_secs(every.max(1)) }
                }
            };
            example_app::run(app).await
        }
    }
}
