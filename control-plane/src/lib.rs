//! weft-control: Weft's control plane (the CA today; discovery and policy next) and
//! the pieces of the `weft` command line.
#![forbid(unsafe_code)]

pub mod ca;
pub mod demo;
pub mod identity;
pub mod mesh;
pub mod server;
pub mod source;
pub mod watch;
