//! Accepting connections on a listener, shared by every listener of both binaries: an
//! error (mostly running out of file descriptors) backs off, from 5 ms doubling to 1 s,
//! instead of spinning, and is logged at most once every 5 s with how many were not.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpStream};

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
const LOG_EVERY: Duration = Duration::from_secs(5);

pub struct Acceptor {
    /// The listener's name in the log (`admin`, `inbound`, ...).
    name: &'static str,
    backoff: Duration,
    logged: Option<Instant>,
    unlogged: u64,
}

impl Acceptor {
    pub fn new(name: &'static str) -> Acceptor {
        Acceptor { name, backoff: BACKOFF_MIN, logged: None, unlogged: 0 }
    }

    /// The next connection, however many accepts fail first.
    pub async fn accept(&mut self, listener: &TcpListener) -> (TcpStream, SocketAddr) {
        loop {
            match listener.accept().await {
                Ok(accepted) => {
                    self.backoff = BACKOFF_MIN;
                    return accepted;
                }
                Err(e) => {
                    if self.logged.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
                        let unlogged = std::mem::take(&mut self.unlogged);
                        tracing::warn!(
                            listener = self.name,
                            "accept failed, backing off {:?} ({unlogged} more failures since the last such line): {e}",
                            self.backoff
                        );
                        self.logged = Some(Instant::now());
                    } else {
                        self.unlogged += 1;
                    }
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// The process's soft limit on open files (1024 when it cannot be read): listeners size
/// their connection caps from it.
pub fn open_files_limit() -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1024)
}
