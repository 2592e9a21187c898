//! HTTP, shared by both directions: the server facing clients (`server`), the request
//! wrapper that turns every outcome into an answer, a span, metrics and a log line
//! (`service`), the `Forwarder` that sends one attempt over the right hop (`forwarder`,
//! with its connection pools in `pool`), and the header rules between them.

pub mod deadline;
pub mod first_head;
pub mod forwarder;
pub mod frames;
pub mod headers;
pub mod keepalive;
pub mod observe;
pub mod pool;
pub mod resets;
pub mod server;
pub mod service;
pub mod upgrade;

pub use crate::body::{Body, BoxError};
