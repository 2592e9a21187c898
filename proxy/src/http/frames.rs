//! Reads HTTP/2 frame headers as they pass on a server connection, to tell one
//! ENHANCE_YOUR_CALM from another: h2 says only that a client abused the connection, not
//! whether it flooded CONTINUATION frames or reset streams. Only the 9-byte headers are
//! looked at; payloads are skipped by their length.

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, ReadBuf};

const PREFACE_LEN: usize = 24;
const CONTINUATION: u8 = 0x9;

/// The most CONTINUATION frames seen in a row on the connection.
#[derive(Debug, Default)]
pub struct Continuations(AtomicU32);

impl Continuations {
    pub fn most_in_a_row(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

pin_project_lite::pin_project! {
    pub struct FrameWatch<I> {
        #[pin]
        io: I,
        // Preface bytes still to skip.
        preface: usize,
        head: [u8; 9],
        filled: usize,
        // Payload bytes of the current frame still to skip.
        skip: usize,
        run: u32,
        seen: Arc<Continuations>,
    }
}

impl<I> FrameWatch<I> {
    pub fn new(io: I, seen: Arc<Continuations>) -> Self {
        FrameWatch { io, preface: PREFACE_LEN, head: [0; 9], filled: 0, skip: 0, run: 0, seen }
    }
}

impl<I: AsyncRead> AsyncRead for FrameWatch<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = this.io.poll_read(cx, buf);
        let mut bytes = &buf.filled()[before..];
        while !bytes.is_empty() {
            if *this.preface > 0 {
                let n = (*this.preface).min(bytes.len());
                (*this.preface, bytes) = (*this.preface - n, &bytes[n..]);
            } else if *this.skip > 0 {
                let n = (*this.skip).min(bytes.len());
                (*this.skip, bytes) = (*this.skip - n, &bytes[n..]);
            } else {
                let n = (9 - *this.filled).min(bytes.len());
                this.head[*this.filled..*this.filled + n].copy_from_slice(&bytes[..n]);
                (*this.filled, bytes) = (*this.filled + n, &bytes[n..]);
                if *this.filled == 9 {
                    *this.filled = 0;
                    *this.skip = usize::from(this.head[0]) << 16
                        | usize::from(this.head[1]) << 8
                        | usize::from(this.head[2]);
                    *this.run = if this.head[3] == CONTINUATION { *this.run + 1 } else { 0 };
                    this.seen.0.fetch_max(*this.run, Ordering::Relaxed);
                }
            }
        }
        res
    }
}

crate::transport::io::write_through!(FrameWatch);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, 0, 0, 0, 0, 1]);
        f.extend(payload);
        f
    }

    #[tokio::test]
    async fn counts_continuations_in_a_row_across_reads() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let seen = Arc::new(Continuations::default());
        let mut watched = FrameWatch::new(b, seen.clone());
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(0x1, &[1, 2, 3]));
        for _ in 0..3 {
            bytes.extend(frame(CONTINUATION, b"abc"));
        }
        bytes.extend(frame(0x0, &[0; 100]));
        bytes.extend(frame(CONTINUATION, b""));
        // Written a few bytes at a time, so headers and payloads split across reads.
        for chunk in bytes.chunks(5) {
            a.write_all(chunk).await.unwrap();
        }
        drop(a);
        let mut sink = vec![];
        watched.read_to_end(&mut sink).await.unwrap();
        assert_eq!(seen.most_in_a_row(), 3);
    }
}
