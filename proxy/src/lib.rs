//! weft-proxy: Weft's per-pod sidecar.
//!
//! Read in this order: `app` (wiring) → `inbound` / `outbound` (where a connection
//! goes) → `conn` (detect, then HTTP or TCP) → `http::server` → `http::proxy` →
//! `http::client`. docs/ARCHITECTURE.md has the map.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod balance;
pub mod config;
pub mod conn;
pub mod control;
pub mod detect;
pub mod discovery;
pub mod drain;
pub mod errors;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod io;
pub mod limits;
pub mod log;
pub mod metrics;
pub mod orig_dst;
pub mod outbound;
pub mod outlier;
pub mod policy;
pub mod resolve;
pub mod routes;
pub mod tcp;
pub mod tls;
pub mod trace;
