//! Where the control plane's world comes from, behind the [`Source`] trait. Today: a
//! mesh file, re-read when it changes. A change that does not parse or validate is
//! refused with the reason in the log and a metric, and the last good state keeps being
//! served. The Kubernetes source will implement the same trait and publish into the
//! same channel.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use tokio::sync::watch;

use crate::server::mesh::{self, Mesh};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the mesh file {0}: {1}")]
    Read(String, std::io::Error),
    #[error(transparent)]
    Invalid(#[from] mesh::Error),
}

/// The current state, as every service sees it.
pub type State = watch::Receiver<Arc<Mesh>>;

/// A source of the mesh's world. It publishes every state it accepts into the channel
/// the services read (made when the source is loaded) and never publishes a bad one.
pub trait Source: Send + 'static {
    /// Follows the source's input until the process stops.
    fn run(self: Box<Self>) -> futures_util::future::BoxFuture<'static, ()>;
    /// Whether the latest input was accepted; false while the last good state is served
    /// in place of a refused change (the `weft_control_mesh_file_valid` metric).
    fn valid(&self) -> Arc<AtomicBool>;
}

impl Source for FileSource {
    fn run(self: Box<Self>) -> futures_util::future::BoxFuture<'static, ()> {
        Box::pin(self.watch(Duration::from_millis(250)))
    }

    fn valid(&self) -> Arc<AtomicBool> {
        self.valid.clone()
    }
}

pub struct FileSource {
    path: PathBuf,
    tx: watch::Sender<Arc<Mesh>>,
    /// Whether the file on disk is the one being served (false after a refused change).
    pub valid: Arc<AtomicBool>,
}

impl FileSource {
    /// Loads the file; it must be valid to start.
    pub fn load(path: PathBuf) -> Result<(FileSource, State), Error> {
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Read(path.display().to_string(), e))?;
        let mut mesh = Mesh::parse(&path.display().to_string(), &text)?;
        mesh.generation = 1;
        let (tx, rx) = watch::channel(Arc::new(mesh));
        Ok((FileSource { path, tx, valid: Arc::new(AtomicBool::new(true)) }, rx))
    }

    /// Re-reads the file whenever its modification time or size changes.
    pub async fn watch(self, every: Duration) {
        let stamp = |p: &PathBuf| std::fs::metadata(p).ok().map(|m| (m.modified().ok(), m.len()));
        let mut last: Option<(Option<SystemTime>, u64)> = stamp(&self.path);
        loop {
            tokio::time::sleep(every).await;
            let now = stamp(&self.path);
            if now == last {
                continue;
            }
            last = now;
            self.reload();
        }
    }

    /// Applies the file if it is valid; keeps the last good state otherwise.
    pub fn reload(&self) {
        let name = self.path.display().to_string();
        let result = std::fs::read_to_string(&self.path)
            .map_err(|e| format!("cannot read {name}: {e}"))
            .and_then(|text| Mesh::parse(&name, &text).map_err(|e: mesh::Error| e.to_string()));
        match result {
            Ok(mut mesh) => {
                self.valid.store(true, Ordering::Relaxed);
                let changed = self.tx.send_if_modified(|cur| {
                    mesh.generation = cur.generation;
                    if **cur == mesh {
                        return false;
                    }
                    mesh.generation += 1;
                    *cur = Arc::new(mesh);
                    true
                });
                if changed {
                    tracing::info!(file = %name, generation = self.tx.borrow().generation, "mesh file applied");
                }
            }
            Err(e) => {
                self.valid.store(false, Ordering::Relaxed);
                tracing::error!("mesh file change refused, still serving the last good state: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "workloads:\n  - name: a\n    token: aaaaaaaaaaaaaaaaaaaa\n";

    #[test]
    fn a_bad_change_keeps_the_last_good_state() {
        let dir = std::env::temp_dir().join(format!("weft-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mesh.yaml");
        std::fs::write(&path, A).unwrap();
        let (src, rx) = FileSource::load(path.clone()).unwrap();
        std::fs::write(&path, "workloads: [oops").unwrap();
        src.reload();
        assert!(!src.valid.load(Ordering::Relaxed));
        assert_eq!(rx.borrow().workloads[0].name, "a");
        std::fs::write(&path, A.replace("name: a", "name: b")).unwrap();
        src.reload();
        assert!(src.valid.load(Ordering::Relaxed));
        assert_eq!(rx.borrow().workloads[0].name, "b");
        let _ = std::fs::remove_dir_all(dir);
    }
}
