//! weft-control: Weft's control plane (CA, discovery and policy from a mesh file) and the
//! pieces of the `weft` command line: the local mesh (`weft up`) and the demo's apps.
#![forbid(unsafe_code)]

pub mod ca;
pub mod example_app;
pub mod http_client;
pub mod identity;
pub mod mesh;
pub mod routes;
pub mod server;
pub mod source;
pub mod stat;
pub mod up;
pub mod watch;
