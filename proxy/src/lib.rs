//! weft-proxy: Weft's per-pod sidecar.
//!
//! Read in this order: `app` (wiring) → `inbound/` or `outbound/` (each a pipeline read
//! top to bottom: accept → conn → service → …) → `http/` (the server, the request
//! wrapper and the forwarder both directions share) → `transport/` (detect, mTLS, TCP).
//! docs/ARCHITECTURE.md has the map.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod body;
pub mod config;
pub mod control;
pub mod drain;
pub mod errors;
pub mod fuzzing;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod log;
pub mod metrics;
pub mod outbound;
pub mod ready;
pub mod resolve;
pub mod trace;
pub mod transport;
