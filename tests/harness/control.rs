//! A real `weft control` process with a mesh file in a temporary folder.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command},
    time::Duration,
};

use crate::{bin, eventually, http_get, log_field, metric_value, Proxy};

pub struct Control {
    pub child: Child,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub mesh: PathBuf,
    pub log: PathBuf,
}

impl Control {
    /// Starts `weft control --mesh <file with mesh_yaml> <extra args>` on ports it picks
    /// (port 0) and waits for /ready.
    pub fn start(mesh_yaml: &str, extra: &[&str]) -> Control {
        Self::start_on("127.0.0.1:0".parse().unwrap(), mesh_yaml, extra)
    }

    /// Like `start`, on a chosen gRPC address (to restart a control plane in place).
    pub fn start_on(grpc: SocketAddr, mesh_yaml: &str, extra: &[&str]) -> Control {
        let dir = Self::dir();
        let mesh = dir.join("mesh.yaml");
        std::fs::write(&mesh, mesh_yaml).unwrap();
        let mut args = vec!["--mesh".to_string(), mesh.display().to_string()];
        args.extend(extra.iter().map(|a| a.to_string()));
        Self::spawn(&dir, grpc, &args, &[], mesh)
    }

    /// `weft control --source kubernetes` against `api` (a fake API server: see
    /// [`crate::kube`]), its CA root in the Secret `weft/weft-identity`, ready.
    pub fn kubernetes(api: &crate::kube::FakeApi, extra: &[&str]) -> Control {
        let dir = Self::dir();
        let mut args: Vec<String> =
            ["--source", "kubernetes", "--namespace", "weft"].iter().map(|a| a.to_string()).collect();
        args.extend(extra.iter().map(|a| a.to_string()));
        let kubeconfig = api.kubeconfig().display().to_string();
        Self::spawn(
            &dir,
            "127.0.0.1:0".parse().unwrap(),
            &args,
            &[("KUBECONFIG", &kubeconfig)],
            api.kubeconfig(),
        )
    }

    /// `weft control <args>` as `spawn` does it, without waiting: the child and its log.
    pub fn launch(args: &[String], env: &[(&str, &str)]) -> (Child, PathBuf) {
        let log = Self::dir().join("control.log");
        let child = Command::new(bin("weft"))
            .arg("control")
            .args(args)
            .env("WEFT_LOG", "info")
            .envs(env.iter().copied())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        (child, log)
    }

    fn dir() -> PathBuf {
        let n = DIRS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("weft-control-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn spawn(
        dir: &std::path::Path,
        grpc: SocketAddr,
        args: &[String],
        env: &[(&str, &str)],
        mesh: PathBuf,
    ) -> Control {
        let log = dir.join("control.log");
        let mut child = Command::new(bin("weft"))
            .arg("control")
            .args(args)
            .args(["--grpc-addr", &grpc.to_string(), "--admin-addr", "127.0.0.1:0"])
            .env("WEFT_LOG", "info")
            .envs(env.iter().copied())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let read = || std::fs::read_to_string(&log).unwrap_or_default();
        let line = eventually(Duration::from_secs(10), "weft control's listening line", || {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("weft control exited with {status}:\n{}", read());
            }
            read().lines().find(|l| l.contains("listening") && l.contains("admin=")).map(str::to_string)
        });
        let addr =
            |key: &str| log_field(&line, key).unwrap_or_else(|| panic!("no {key} address in {line:?}"));
        let (grpc, admin) = (addr("grpc"), addr("admin"));
        eventually(Duration::from_secs(10), "weft control /ready", || {
            (http_get(admin, "/ready").map(|(s, _)| s) == Some(200)).then_some(())
        });
        Control { child, grpc, admin, mesh, log }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The generation of the state the control plane serves.
    pub fn generation(&self) -> u64 {
        let text = http_get(self.admin, "/metrics").map(|(_, b)| b).unwrap_or_default();
        metric_value(&text, "weft_control_mesh_generation") as u64
    }

    /// Replaces the mesh file with a valid one and waits until the control plane serves
    /// it; returns its generation, which a proxy's answers carry once they reflect it
    /// (see [`Proxy::wait_generation`]).
    pub fn apply(&self, mesh_yaml: &str) -> u64 {
        let before = self.generation();
        self.rewrite(mesh_yaml);
        eventually(Duration::from_secs(5), "the control plane to apply the mesh file", || {
            Some(self.generation()).filter(|g| *g > before)
        })
    }
}

/// Numbers the control planes' folders of this test process.
static DIRS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

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

    /// The sidecar of workload `name` in front of its app at `app`, with its inbound on
    /// `inbound` (the address the mesh file names as the workload's endpoint), ready.
    pub fn app_sidecar(&self, name: &str, app: SocketAddr, inbound: SocketAddr) -> Proxy {
        let (app, inbound) = (app.to_string(), inbound.to_string());
        self.sidecar(name, &[("WEFT_APP_ADDR", &app), ("WEFT_INBOUND_ADDR", &inbound)])
    }

    /// Replaces the mesh file; the control plane applies it within its 250 ms poll (see
    /// [`Self::apply`] to wait for that), or refuses it.
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
