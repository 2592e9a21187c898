//! A real `weft control` process with a mesh file in a temporary folder.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{bin, free_addr, http_get};

pub struct Control {
    pub child: Child,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub mesh: PathBuf,
}

impl Control {
    /// Starts `weft control --mesh <file with mesh_yaml> <extra args>` and waits for /ready.
    pub fn start(mesh_yaml: &str, extra: &[&str]) -> Control {
        Self::start_on(free_addr(), mesh_yaml, extra)
    }

    /// Like `start`, on a chosen gRPC address (to restart a control plane in place).
    pub fn start_on(grpc: SocketAddr, mesh_yaml: &str, extra: &[&str]) -> Control {
        let dir = std::env::temp_dir().join(format!("weft-control-{}-{}", std::process::id(), grpc.port()));
        std::fs::create_dir_all(&dir).unwrap();
        let mesh = dir.join("mesh.yaml");
        std::fs::write(&mesh, mesh_yaml).unwrap();
        let admin = free_addr();
        let child = Command::new(bin("weft"))
            .args(["control", "--mesh"])
            .arg(&mesh)
            .args(["--grpc-addr", &grpc.to_string(), "--admin-addr", &admin.to_string()])
            .args(extra)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while http_get(admin, "/ready").map(|(s, _)| s) != Some(200) {
            assert!(Instant::now() < deadline, "weft control not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        Control { child, grpc, admin, mesh }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
