//! The body type on both sides of the proxy, and the one wrapper that lets a body tell
//! someone when it ends (the HTTP/1 pool takes its connection back; a gRPC server span
//! records the status of the trailers).

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body type on both sides of the proxy: streamed from hyper or made by the proxy.
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

pub fn empty() -> Body {
    Empty::new().map_err(|n| match n {}).boxed()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|n| match n {}).boxed()
}

/// A copy of a request that has no body to send (its body is already at its end), to
/// send it again; `None` when it has one, which is sent once only.
pub fn bodyless_copy(req: &http::Request<Body>) -> Option<http::Request<Body>> {
    if !http_body::Body::is_end_stream(req.body()) {
        return None;
    }
    let mut copy = http::Request::new(empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// Any hyper body as a [`Body`].
pub fn boxed<B>(b: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed()
}

/// How a watched body ended.
pub enum End<'a> {
    /// Read to the end; the trailers, if it had any.
    Complete(Option<&'a HeaderMap>),
    /// It failed, or was dropped before its end (the client went away).
    Failed(Option<&'a dyn std::fmt::Display>),
}

/// What to do when a body ends; called exactly once.
pub trait OnEnd: Send + 'static {
    fn ended(self, end: End<'_>);
}

pin_project_lite::pin_project! {
    /// `inner`, calling `on_end` once when it ends or is dropped early.
    pub struct Watched<B, F: OnEnd> {
        #[pin]
        inner: B,
        on_end: Option<F>,
    }

    impl<B, F: OnEnd> PinnedDrop for Watched<B, F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(f) = this.project().on_end.take() {
                f.ended(End::Failed(None));
            }
        }
    }
}

impl<B, F: OnEnd> Watched<B, F> {
    pub fn new(inner: B, on_end: F) -> Self {
        Watched { inner, on_end: Some(on_end) }
    }
}

impl<B, F> http_body::Body for Watched<B, F>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
    F: OnEnd,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        let end = match &polled {
            // Trailers end a body; the server need not poll again to learn it.
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => Some(End::Complete(frame.trailers_ref())),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => Some(End::Complete(None)),
            Poll::Ready(None) => Some(End::Complete(None)),
            Poll::Ready(Some(Err(e))) => Some(End::Failed(Some(e))),
            _ => None,
        };
        if let Some(end) = end {
            if let Some(f) = this.on_end.take() {
                f.ended(end);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<String>>>);

    impl OnEnd for Log {
        fn ended(self, end: End<'_>) {
            let what = match end {
                End::Complete(Some(t)) => format!("trailers {}", t.len()),
                End::Complete(None) => "complete".into(),
                End::Failed(_) => "failed".into(),
            };
            self.0.lock().unwrap().push(what);
        }
    }

    #[tokio::test]
    async fn tells_once_when_read_to_the_end() {
        let log = Log::default();
        let body = Watched::new(Full::new(Bytes::from("abc")), log.clone());
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(got, "abc");
        assert_eq!(*log.0.lock().unwrap(), ["complete"]);
    }

    #[tokio::test]
    async fn tells_of_trailers_and_of_early_drops() {
        let log = Log::default();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames = futures_util::stream::iter([
            Ok::<_, std::io::Error>(Frame::data(Bytes::from("x"))),
            Ok(Frame::trailers(trailers)),
        ]);
        let body = Watched::new(http_body_util::StreamBody::new(frames), log.clone());
        body.collect().await.unwrap();
        drop(Watched::new(Full::new(Bytes::from("never read")), log.clone()));
        assert_eq!(*log.0.lock().unwrap(), ["trailers 1", "failed"]);
    }
}
