//! weft-control: Weft's control plane and the `weft` command line.
//!
//! `server/` is the control plane `weft control` runs: the CA and the Identity service,
//! the mesh file as its source, and the Discovery and Policy watches. `cli/` is the rest
//! of the `weft` binary: the local mesh (`weft up`), `weft stat` and the demo's apps. The
//! CLI reads the server's mesh model; the server knows nothing of the CLI. `inject/` is
//! the sidecar injection both use: the admission webhook and `weft inject`.
#![forbid(unsafe_code)]

pub mod cli;
pub mod inject;
pub mod server;
