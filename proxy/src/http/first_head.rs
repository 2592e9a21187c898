//! The first request head of an HTTP/1 connection, as the client sent it. hyper frames a
//! request that has both `Content-Length` and `Transfer-Encoding` by the latter and
//! drops `Content-Length` before the proxy sees the request (closing the connection after
//! the answer), so the conflict, the classic smuggling set-up, would go unseen. Reading
//! the first head's bytes as they pass lets the proxy refuse it with 400, as nginx does.
//! Later requests on the connection are framed by `Transfer-Encoding` and end the
//! connection (RFC 9112 §6.3): nothing can be smuggled behind them.

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, ReadBuf};

// 0: not seen yet (the default).
const FINE: u8 = 1;
const BOTH_LENGTHS: u8 = 2;

/// What the first head said, for the first request the service handles.
#[derive(Debug, Default)]
pub struct FirstHead(AtomicU8);

impl FirstHead {
    /// Whether the head (when it is the one being handled: asked once) had both
    /// `Content-Length` and `Transfer-Encoding`.
    pub fn take_both_lengths(&self) -> bool {
        self.0.swap(FINE, Ordering::Relaxed) == BOTH_LENGTHS
    }
}

/// Whether a complete request head has both framing headers; `None` while incomplete.
fn both_lengths(head: &[u8]) -> Option<bool> {
    let start = head.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&head[start..]) {
        Ok(httparse::Status::Complete(_)) => {
            let has = |name: &str| req.headers.iter().any(|h| h.name.eq_ignore_ascii_case(name));
            Some(has("content-length") && has("transfer-encoding"))
        }
        Ok(httparse::Status::Partial) => None,
        // The codec refuses it anyway.
        Err(_) => Some(false),
    }
}

pin_project_lite::pin_project! {
    pub struct FirstHeadWatch<I> {
        #[pin]
        io: I,
        head: Option<Vec<u8>>,
        limit: usize,
        seen: Arc<FirstHead>,
    }
}

impl<I> FirstHeadWatch<I> {
    /// Watches `io` until its first request head (at most `limit` bytes) has passed.
    pub fn new(io: I, limit: usize, seen: Arc<FirstHead>) -> Self {
        FirstHeadWatch { io, head: Some(Vec::new()), limit, seen }
    }
}

impl<I: AsyncRead> AsyncRead for FirstHeadWatch<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = this.io.poll_read(cx, buf);
        if let Some(head) = this.head.as_mut() {
            head.extend_from_slice(&buf.filled()[before..]);
            let verdict = both_lengths(head).or((head.len() > *this.limit).then_some(false));
            if let Some(both) = verdict {
                this.seen.0.store(if both { BOTH_LENGTHS } else { FINE }, Ordering::Relaxed);
                *this.head = None;
            }
        }
        res
    }
}

crate::transport::io::write_through!(FirstHeadWatch);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_framing_headers_are_seen_in_a_complete_head() {
        let both = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(both_lengths(both), Some(true));
        assert_eq!(both_lengths(&both[..30]), None);
        let crlf_first = b"\r\npost / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 1\r\n\r\nx";
        assert_eq!(both_lengths(crlf_first), Some(true));
        assert_eq!(both_lengths(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"), Some(false));
        assert_eq!(both_lengths(b"\x00garbage\r\n\r\n"), Some(false));
    }
}
