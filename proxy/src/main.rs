#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use weft_proxy::config::{Config, InitConfig, ProcessEnv};

/// jemalloc, whose background thread returns memory freed after a burst (glibc's malloc
/// keeps it; bench/README.md has both measured).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Weft's sidecar proxy. Configured with WEFT_* environment variables (docs/config.md).
#[derive(Parser)]
#[command(name = "weft-proxy", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy (the default).
    Run,
    /// Install the iptables rules that redirect this network namespace's TCP through the
    /// proxy (what the Kubernetes init container runs).
    Init {
        /// Remove the rules instead.
        #[arg(long)]
        remove: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd.unwrap_or(Cmd::Run) {
        Cmd::Init { remove } => init(remove),
        Cmd::Run => run(),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-proxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init(remove: bool) -> anyhow::Result<()> {
    let cfg = InitConfig::from_env(&ProcessEnv)?;
    weft_proxy::init::run(&cfg, remove)?;
    Ok(())
}

fn run() -> anyhow::Result<()> {
    let cfg = Config::from_env(&ProcessEnv)?;
    let log = weft_proxy::log::init(&cfg.log)?;
    // This runtime only waits for signals; the proxy's work runs on its shard threads.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(weft_proxy::app::run(cfg, log))
}
