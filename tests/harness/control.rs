//! A real `weft control` process with a mesh file in a temporary folder.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{bin, free_addr, http_get, Proxy};

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

impl Control {
    /// A weft-proxy for workload `name` of the mesh file (identity
    /// `spiffe://weft.local/ns/default/sa/<name>`, token `<name>-token-0123456789`), ready.
    pub fn sidecar(&self, name: &str, extra: &[(&str, &str)]) -> Proxy {
        let addr = self.grpc.to_string();
        let id = format!("spiffe://weft.local/ns/default/sa/{name}");
        let token = format!("{name}-token-0123456789");
        let mut env = vec![
            ("WEFT_CONTROL_ADDR", addr.as_str()),
            ("WEFT_IDENTITY", id.as_str()),
            ("WEFT_TOKEN", token.as_str()),
        ];
        env.extend_from_slice(extra);
        Proxy::start(&env)
    }

    /// Replaces the mesh file; the control plane applies it within its 250 ms poll.
    pub fn rewrite(&self, mesh_yaml: &str) {
        std::fs::write(&self.mesh, mesh_yaml).unwrap();
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
