//! What the proxy and the control plane share: the weft.v1 gRPC API (generated from
//! proto/weft/v1/weft.proto), and the small vocabularies both parse — SPIFFE IDs, the
//! duration grammar, OTLP collector addresses and the `WEFT_*` names `weft up` sets —
//! and the accept loop's back-off every listener of both uses.

#[allow(clippy::all, rust_2018_idioms)]
pub mod v1 {
    tonic::include_proto!("weft.v1");
}

pub mod accept;
pub mod duration;
pub mod env;
pub mod otlp;
pub mod pattern;
pub mod spiffe;

/// Metadata key carrying the workload's token: `authorization: Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";
