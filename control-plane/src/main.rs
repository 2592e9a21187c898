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
        Cmd::Demo { rate, seconds, state_dir } => {
            if rate == 0 {
                anyhow::bail!("--rate must be at least 1 request per second");
            }
            demo::run(demo::Options { rate, duration: seconds.map(Duration::from_secs), state_dir }).await
        }
    }
}
