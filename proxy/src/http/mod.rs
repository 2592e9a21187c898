//! HTTP proxying: the server side facing clients, the forwarding service, outbound
//! routing and retries, the pooled client facing upstreams, and the header rules
//! between them.

pub mod client;
pub mod deadline;
pub mod headers;
pub mod observe;
pub mod proxy;
pub mod retry;
pub mod route;
pub mod server;
pub mod upgrade;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body type on both sides of the proxy: streamed from hyper or made by the proxy.
pub type Body = http_body_util::combinators::BoxBody<bytes::Bytes, BoxError>;
