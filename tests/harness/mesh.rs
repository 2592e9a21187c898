//! Mesh files for tests, built instead of pasted: workloads get the harness's token
//! (`<name>-token-0123456789`, what `Control::sidecar` presents), services their
//! endpoints, and the rest (policies, routes) what the test says.
//!
//! ```
//! use weft_e2e::mesh::{MeshFile, Service};
//! let yaml = MeshFile::new()
//!     .workload("web")
//!     .workload("api")
//!     .service(Service::new("api", 80).meshed("127.0.0.1:4143", "api"))
//!     .policy("api", 8080, "mode: strict")
//!     .yaml();
//! assert!(yaml.contains("token: api-token-0123456789"));
//! ```

use std::fmt::{Display, Write};

/// A workload's token in test meshes.
pub fn token(workload: &str) -> String {
    format!("{workload}-token-0123456789")
}

#[derive(Clone, Debug, Default)]
pub struct MeshFile {
    workloads: Vec<String>,
    services: Vec<Service>,
    policies: Vec<String>,
    routes: Vec<String>,
}

impl MeshFile {
    pub fn new() -> Self {
        Self::default()
    }

    /// A workload with the harness's token and the default service account (its name).
    pub fn workload(mut self, name: &str) -> Self {
        self.workloads.push(format!("{{name: {name}, token: {}}}", token(name)));
        self
    }

    /// A workload that runs as service account `sa` (so its identity is `.../sa/<sa>`).
    pub fn workload_as(mut self, name: &str, sa: &str) -> Self {
        self.workloads.push(format!("{{name: {name}, serviceAccount: {sa}, token: {}}}", token(name)));
        self
    }

    pub fn service(mut self, s: Service) -> Self {
        self.services.push(s);
        self
    }

    /// An inbound policy for `workload`'s app `port`; `fields` are YAML fields of the
    /// policy, comma separated (`mode: strict`, `allow: [...]`, `rateLimit: {...}`).
    pub fn policy(mut self, workload: &str, port: u16, fields: &str) -> Self {
        self.policies.push(format!("{{workload: {workload}, port: {port}, {fields}}}"));
        self
    }

    /// A route of `service` with `rules`: a YAML flow list (`[{backends: [...]}]`), or
    /// block-style list items indented by six spaces.
    pub fn route(mut self, name: &str, service: &str, rules: &str) -> Self {
        let rules = match rules.trim_start().starts_with('[') {
            true => format!(" {}", rules.trim()),
            false => format!("\n{}", rules.trim_end()),
        };
        self.routes.push(format!("name: {name}\n    service: {service}\n    rules:{rules}"));
        self
    }

    pub fn yaml(&self) -> String {
        let mut y = String::new();
        let mut section = |name: &str, items: &[String]| {
            if !items.is_empty() {
                let _ = writeln!(y, "{name}:");
                for i in items {
                    let _ = writeln!(y, "  - {i}");
                }
            }
        };
        section("workloads", &self.workloads);
        section("services", &self.services.iter().map(Service::yaml).collect::<Vec<_>>());
        section("policies", &self.policies);
        section("routes", &self.routes);
        y
    }
}

#[derive(Clone, Debug)]
pub struct Service {
    name: String,
    port: u16,
    fields: Vec<String>,
    endpoints: Vec<String>,
}

impl Service {
    pub fn new(name: &str, port: u16) -> Self {
        Service { name: name.into(), port, fields: vec![], endpoints: vec![] }
    }

    /// An endpoint outside the mesh (plaintext, no identity).
    pub fn endpoint(mut self, addr: impl Display) -> Self {
        self.endpoints.push(format!("{{address: {addr}}}"));
        self
    }

    /// An endpoint outside the mesh with a balancing weight.
    pub fn weighted(mut self, addr: impl Display, weight: u32) -> Self {
        self.endpoints.push(format!("{{address: {addr}, weight: {weight}}}"));
        self
    }

    /// A meshed endpoint: `workload`'s sidecar inbound at `addr`.
    pub fn meshed(mut self, addr: impl Display, workload: &str) -> Self {
        self.endpoints.push(format!("{{address: {addr}, workload: {workload}}}"));
        self
    }

    /// Another field of the service (`balancer: round-robin`, `maxConcurrentRequests: 2`).
    pub fn with(mut self, field: &str) -> Self {
        self.fields.push(field.into());
        self
    }

    fn yaml(&self) -> String {
        let mut fields = vec![format!("name: {}", self.name), format!("port: {}", self.port)];
        fields.extend(self.fields.iter().cloned());
        fields.push(format!("endpoints: [{}]", self.endpoints.join(", ")));
        format!("{{{}}}", fields.join(", "))
    }
}
