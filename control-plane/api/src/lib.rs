//! The weft-proxy ↔ weft control plane API, generated from proto/weft/v1/weft.proto and
//! shared by both sides.

#[allow(clippy::all, rust_2018_idioms)]
pub mod v1 {
    tonic::include_proto!("weft.v1");
}

/// Metadata key carrying the workload's token: `authorization: Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";
