//! weft: Weft's control plane and command-line tool.
//!
//! Today it runs the local demo; the control-plane server (`weft control`) and the
//! local mesh (`weft up`) come with the control-plane work.
#![forbid(unsafe_code)]

use weft_control::demo;

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "weft", version, about = "Weft service mesh")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the control plane: CA, discovery and policy for the proxies, from a mesh file.
    Control {
        /// The mesh file (YAML), re-read when it changes.
        #[arg(long)]
        mesh: PathBuf,
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
    },
    /// Run two apps meshed by weft-proxy sidecars on this machine and show the traffic.
    Demo {
        /// Requests per second sent by the demo's load generator.
        #[arg(long, default_value_t = 50)]
        rate: u32,
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
        /// Where sidecar logs go.
        #[arg(long, default_value = ".weft/demo")]
        state_dir: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Control { mesh, grpc_addr, admin_addr, ca_cert, ca_key, extra_roots, cert_ttl_secs } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG").unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            let opts = weft_control::server::Options {
                mesh,
                grpc_addr,
                admin_addr,
                ca_cert,
                ca_key,
                extra_roots,
                cert_ttl: Duration::from_secs(cert_ttl_secs),
            };
            weft_control::server::run(opts).await
        }
        Cmd::Demo { rate, seconds, state_dir } => {
            if rate == 0 {
                anyhow::bail!("--rate must be at least 1 request per second");
            }
            demo::run(demo::Options { rate, duration: seconds.map(Duration::from_secs), state_dir }).await
        }
    }
}
