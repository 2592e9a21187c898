//! HTTP/1 server connections: the time a client has to send a request head is not the
//! time an idle keep-alive connection may stay open. hyper has one timer for both, so the
//! head's is enforced here: a connection idle between requests may stay
//! `WEFT_KEEPALIVE_IDLE_TIMEOUT` (above common client pools' idle times, so the client
//! closes first and never sends into a connection we are closing), while a head that has
//! begun (or a new connection's first) must arrive within `WEFT_HEADER_READ_TIMEOUT`.

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, ReadBuf};

/// What a connection is doing, as its reads and requests show it.
#[derive(Debug)]
pub struct Activity {
    /// Requests whose response has not ended.
    busy: AtomicUsize,
    /// Since when a request head is awaited with bytes on their way (or the connection
    /// is new); `None` while idle between requests or busy.
    head_since: Mutex<Option<Instant>>,
}

impl Default for Activity {
    fn default() -> Self {
        // A new connection owes its first head at once.
        Activity { busy: AtomicUsize::new(0), head_since: Mutex::new(Some(Instant::now())) }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Activity {
    fn read(&self) {
        if self.busy.load(Ordering::Acquire) == 0 {
            lock(&self.head_since).get_or_insert_with(Instant::now);
        }
    }

    /// A request head arrived.
    pub fn request_started(&self) {
        self.busy.fetch_add(1, Ordering::AcqRel);
        *lock(&self.head_since) = None;
    }

    /// Its response ended (or was dropped).
    pub fn request_done(&self) {
        self.busy.fetch_sub(1, Ordering::AcqRel);
    }

    /// Resolves when a head that has begun has not arrived within `timeout`.
    pub async fn head_timed_out(&self, timeout: Duration) {
        let tick = (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            tokio::time::sleep(tick).await;
            if lock(&self.head_since).is_some_and(|since| since.elapsed() >= timeout) {
                return;
            }
        }
    }
}

/// Marks `Activity` as bytes arrive.
pub struct ReadWatch<I> {
    io: I,
    activity: Arc<Activity>,
}

impl<I> ReadWatch<I> {
    pub fn new(io: I, activity: Arc<Activity>) -> Self {
        ReadWatch { io, activity }
    }
}

impl<I: Unpin> ReadWatch<I> {
    fn io(self: Pin<&mut Self>) -> Pin<&mut I> {
        Pin::new(&mut self.get_mut().io)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for ReadWatch<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.read();
        }
        res
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for ReadWatch<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.io().poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.io().poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Ends a request's share of the connection's activity when its response ends.
pub struct Done(pub Arc<Activity>);

impl crate::body::OnEnd for Done {
    fn ended(self, _: crate::body::End<'_>) {
        self.0.request_done();
    }
}
