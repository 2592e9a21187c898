//! A real OTLP receiver (tests/py/otlp_receiver.py, on opentelemetry-proto's generated
//! TraceService) that records every span it is sent.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::{free_addr, py_script, python};

pub struct Collector {
    child: Child,
    /// OTLP/gRPC.
    pub grpc: SocketAddr,
    /// OTLP/HTTP (protobuf).
    pub http: SocketAddr,
    out: PathBuf,
}

impl Collector {
    pub fn start() -> Collector {
        Self::start_slow(Duration::ZERO)
    }

    /// A collector that takes `delay` to answer every export.
    pub fn start_slow(delay: Duration) -> Collector {
        use std::io::{BufRead, BufReader};
        let (grpc, http) = (free_addr(), free_addr());
        let out =
            std::env::temp_dir().join(format!("weft-otlp-{}-{}.jsonl", std::process::id(), grpc.port()));
        let _ = std::fs::remove_file(&out);
        let mut child = Command::new(python())
            .arg(py_script("otlp_receiver.py"))
            .args(["server", &grpc.port().to_string(), &http.port().to_string()])
            .arg(&out)
            .arg(delay.as_secs_f64().to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "the OTLP receiver did not start");
        Collector { child, grpc, http, out }
    }

    /// Every span received so far, as JSON objects (see otlp_receiver.py).
    pub fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits up to 10 s for at least `n` spans.
    pub fn wait_for(&self, n: usize) -> Vec<Value> {
        crate::within(Duration::from_secs(10), || Some(self.spans()).filter(|s| s.len() >= n))
            .unwrap_or_else(|| self.spans())
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.out);
    }
}
