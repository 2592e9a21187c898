//! Why the proxy, not the application, answered or closed a connection.
//!
//! Every proxy-made HTTP response carries `weft-error: <cause>`; the same word is the
//! `cause` label of the request and TCP error metrics and appears in the log line. This
//! is the one place that turns a cause into the status a client sees.

use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{self, Body};

pub const WEFT_ERROR: &str = "weft-error";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cause {
    /// The upstream refused the connection (nothing listens there).
    UpstreamRefused,
    /// The upstream did not accept the connection within the connect timeout.
    ConnectTimeout,
    /// The upstream connection failed after it was established.
    UpstreamReset,
    /// A name in the request could not be resolved.
    ResolveFailed,
    /// The request does not say where it should go.
    NoRoute,
    /// The request would come back to this proxy.
    LoopDetected,
    /// A malformed request, rejected before it was forwarded.
    BadRequest,
    /// The request head is larger than the configured limit.
    HeaderTooLarge,
    /// The request target is longer than the codec accepts.
    UriTooLong,
    /// An HTTP/2 client sent more CONTINUATION frames than a header block needs.
    ContinuationFlood,
    /// The client did not send a complete request head in time.
    HeaderTimeout,
    /// A connection that must be HTTP (explicit proxy mode) was something else.
    ProtocolUnknown,
    /// An HTTP/2 client cancelled most of its requests (rapid reset); closed.
    RapidReset,
    /// The proxy has no certificate yet, so it cannot speak mTLS.
    NoIdentity,
    /// A mesh TLS handshake failed (wrong CA, expired or wrong identity, not TLS 1.3).
    TlsHandshake,
    /// The port's policy does not admit this client (plaintext on a strict port, or an
    /// identity not on the allow list).
    Unauthorized,
    /// The service has no endpoints, and none appeared within the queue timeout.
    NoEndpoints,
    /// Discovery has not answered for the destination, so whether it is a mesh peer (and
    /// must get mTLS) is unknown: refused rather than sent in plaintext.
    NoDiscovery,
    /// The route's request timeout (or the last attempt's timeout) passed.
    Timeout,
    /// The route's fault injection answered instead of the service.
    FaultInjected,
    /// The inbound port's rate limit (or the client's share of it) is spent.
    RateLimited,
    /// The service already has its maximum of requests in flight from this proxy.
    ConcurrencyLimit,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::UpstreamRefused => "upstream-refused",
            Cause::ConnectTimeout => "connect-timeout",
            Cause::UpstreamReset => "upstream-reset",
            Cause::ResolveFailed => "resolve-failed",
            Cause::NoRoute => "no-route",
            Cause::LoopDetected => "loop-detected",
            Cause::BadRequest => "bad-request",
            Cause::HeaderTooLarge => "header-too-large",
            Cause::UriTooLong => "uri-too-long",
            Cause::ContinuationFlood => "continuation-flood",
            Cause::HeaderTimeout => "header-timeout",
            Cause::ProtocolUnknown => "protocol-unknown",
            Cause::RapidReset => "rapid-reset",
            Cause::NoIdentity => "no-identity",
            Cause::TlsHandshake => "tls-handshake",
            Cause::Unauthorized => "unauthorized",
            Cause::NoEndpoints => "no-endpoints",
            Cause::NoDiscovery => "no-discovery",
            Cause::Timeout => "timeout",
            Cause::FaultInjected => "fault-injected",
            Cause::RateLimited => "rate-limited",
            Cause::ConcurrencyLimit => "concurrency-limit",
        }
    }

    /// Whether the endpoint a request went to is to blame: a failure another endpoint
    /// (a retry) might not have, and that counts towards ejecting it. Only upstream
    /// faults do: not the proxy's own state (no certificate, no discovery answer), not
    /// the client (a malformed request or body), not the route's fault injection.
    pub fn blames_endpoint(self) -> bool {
        matches!(
            self,
            Cause::UpstreamRefused
                | Cause::ConnectTimeout
                | Cause::UpstreamReset
                | Cause::TlsHandshake
                | Cause::Timeout
        )
    }

    pub fn status(self) -> StatusCode {
        match self {
            Cause::UpstreamRefused | Cause::UpstreamReset | Cause::ResolveFailed => StatusCode::BAD_GATEWAY,
            Cause::LoopDetected => StatusCode::LOOP_DETECTED,
            Cause::ConnectTimeout => StatusCode::GATEWAY_TIMEOUT,
            Cause::NoIdentity | Cause::TlsHandshake => StatusCode::BAD_GATEWAY,
            Cause::NoRoute
            | Cause::BadRequest
            | Cause::ProtocolUnknown
            | Cause::RapidReset
            | Cause::ContinuationFlood => StatusCode::BAD_REQUEST,
            Cause::UriTooLong => StatusCode::URI_TOO_LONG,
            Cause::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Cause::Unauthorized => StatusCode::FORBIDDEN,
            Cause::NoEndpoints | Cause::NoDiscovery => StatusCode::SERVICE_UNAVAILABLE,
            Cause::Timeout => StatusCode::GATEWAY_TIMEOUT,
            // The status is the route's; this is only the default.
            Cause::FaultInjected => StatusCode::SERVICE_UNAVAILABLE,
            Cause::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Cause::ConcurrencyLimit => StatusCode::SERVICE_UNAVAILABLE,
            Cause::HeaderTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// Classifies an IO error from connecting to or talking with an upstream.
    pub fn from_io(e: &std::io::Error) -> Cause {
        match e.kind() {
            std::io::ErrorKind::ConnectionRefused => Cause::UpstreamRefused,
            std::io::ErrorKind::TimedOut => Cause::ConnectTimeout,
            _ => Cause::UpstreamReset,
        }
    }

    /// Finds the most specific cause in an error's source chain.
    pub fn classify(e: &(dyn std::error::Error + 'static)) -> Cause {
        let mut cur = Some(e);
        while let Some(err) = cur {
            if let Some(c) = err.downcast_ref::<CauseError>() {
                return c.cause;
            }
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                return Cause::from_io(io);
            }
            cur = err.source();
        }
        Cause::UpstreamReset
    }
}

/// An error that already knows its cause, with a message for the log and the client.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CauseError {
    pub cause: Cause,
    pub message: String,
    /// A status other than the cause's own (fault injection answers with the route's).
    pub status: Option<StatusCode>,
    /// The request, given back when it provably never reached the upstream (a refused
    /// connection, or one closed or GOAWAY'd before the request was written): another
    /// endpoint may take it, whatever its method.
    pub unsent: Option<Box<http::Request<crate::body::Body>>>,
}

impl CauseError {
    pub fn new(cause: Cause, message: impl Into<String>) -> Self {
        Self { cause, message: message.into(), status: None, unsent: None }
    }

    /// This error, with the request it never sent.
    pub fn unsent(mut self, req: http::Request<crate::body::Body>) -> Self {
        self.unsent = Some(Box::new(req));
        self
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }

    pub fn status_code(&self) -> StatusCode {
        self.status.unwrap_or(self.cause.status())
    }

    /// The response the client gets.
    pub fn respond(&self) -> Response<Body> {
        let mut rsp = respond(self.cause, &self.message);
        if let Some(s) = self.status {
            *rsp.status_mut() = s;
        }
        rsp
    }
}

/// The response the proxy sends when it cannot forward a request.
pub fn respond(cause: Cause, message: &str) -> Response<Body> {
    let mut rsp = Response::new(body::full(format!("weft-proxy: {}: {message}\n", cause.as_str())));
    *rsp.status_mut() = cause.status();
    let headers = rsp.headers_mut();
    headers.insert(WEFT_ERROR, HeaderValue::from_static(cause.as_str()));
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    rsp
}

/// The same answer written by hand on an HTTP/1 connection hyper has given up on (it
/// closes silently on a header-read timeout): the status line and `weft-error`, then close.
pub fn respond_raw_http1(cause: Cause) -> String {
    let status = cause.status();
    format!(
        "HTTP/1.1 {} {}\r\n{WEFT_ERROR}: {}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        cause.as_str()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_causes() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(Cause::classify(&refused), Cause::UpstreamRefused);
        let wrapped = std::io::Error::other(CauseError::new(Cause::ConnectTimeout, "slow"));
        assert_eq!(Cause::classify(wrapped.get_ref().unwrap()), Cause::ConnectTimeout);
    }

    #[test]
    fn response_carries_the_cause() {
        let rsp = respond(Cause::UpstreamRefused, "connection refused by 127.0.0.1:1");
        assert_eq!(rsp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(rsp.headers()[WEFT_ERROR], "upstream-refused");
        let raw = respond_raw_http1(Cause::HeaderTimeout);
        assert!(raw.starts_with("HTTP/1.1 408 Request Timeout\r\nweft-error: header-timeout\r\n"), "{raw}");
    }
}
