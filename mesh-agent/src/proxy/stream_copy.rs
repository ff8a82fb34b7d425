//! Copying both directions between any two byte streams (a TCP leg and an HBONE tunnel), with
//! half-close passed through and buffers borrowed from the relay's pool only while bytes are in
//! flight: an idle tunnelled connection holds no copy buffer.
//!
//! [`super::relay`]'s copy is the same idea specialised to two TCP sockets (readiness first,
//! then `try_read`); this one works through `AsyncRead`/`AsyncWrite`: each poll borrows a buffer
//! for one `poll_read`, gives it back at once when nothing is ready, and keeps it only until
//! what was read has been written.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::buffers::{give_back, take_buffer, BUDGET};

/// One direction of the copy.
#[derive(Debug)]
enum Dir {
    Reading,
    Writing {
        buf: Box<[u8]>,
        pos: usize,
        end: usize,
    },
    /// What was written is flushed before the next read.
    Flushing,
    /// EOF read: shutting down the other side's write half.
    ShuttingDown,
    Done,
}

/// Copies `a ↔ b` until both directions have ended; resolves to the bytes moved `(a → b,
/// b → a)`. The first error ends both.
#[derive(Debug)]
pub struct StreamCopy<A, B> {
    a: A,
    b: B,
    dirs: [Dir; 2],
    totals: [u64; 2],
}

impl<A, B> StreamCopy<A, B> {
    pub fn new(a: A, b: B) -> Self {
        Self {
            a,
            b,
            dirs: [Dir::Reading, Dir::Reading],
            totals: [0; 2],
        }
    }

    /// Bytes moved so far, `[a → b, b → a]`.
    pub fn totals(&self) -> [u64; 2] {
        self.totals
    }
}

/// Advances one direction as far as it can go without blocking.
fn poll_dir<R, W>(
    from: &mut R,
    to: &mut W,
    dir: &mut Dir,
    total: &mut u64,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut budget = BUDGET;
    loop {
        match dir {
            Dir::Done => return Poll::Ready(Ok(())),
            Dir::Reading => {
                if budget == 0 {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                budget -= 1;
                let mut buf = take_buffer();
                let mut read_buf = ReadBuf::new(&mut buf);
                match Pin::new(&mut *from).poll_read(cx, &mut read_buf) {
                    Poll::Pending => {
                        give_back(buf);
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => {
                        give_back(buf);
                        return Poll::Ready(Err(e));
                    }
                    Poll::Ready(Ok(())) => {
                        let end = read_buf.filled().len();
                        if end == 0 {
                            give_back(buf);
                            *dir = Dir::ShuttingDown;
                        } else {
                            *dir = Dir::Writing { buf, pos: 0, end };
                        }
                    }
                }
            }
            Dir::Writing { buf, pos, end } => {
                while *pos < *end {
                    let n = ready!(Pin::new(&mut *to).poll_write(cx, &buf[*pos..*end]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    *pos += n;
                    *total += n as u64;
                }
                if let Dir::Writing { buf, .. } = std::mem::replace(dir, Dir::Flushing) {
                    give_back(buf);
                }
            }
            Dir::Flushing => {
                ready!(Pin::new(&mut *to).poll_flush(cx))?;
                *dir = Dir::Reading;
            }
            Dir::ShuttingDown => {
                match ready!(Pin::new(&mut *to).poll_shutdown(cx)) {
                    // The peer may be gone already; its own direction reports it.
                    Err(e) if e.kind() != io::ErrorKind::NotConnected => {
                        return Poll::Ready(Err(e))
                    }
                    _ => *dir = Dir::Done,
                }
            }
        }
    }
}

impl<A, B> Future for StreamCopy<A, B>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    type Output = io::Result<(u64, u64)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let [d0, d1] = &mut this.dirs;
        let [t0, t1] = &mut this.totals;
        let a = poll_dir(&mut this.a, &mut this.b, d0, t0, cx)?;
        let b = poll_dir(&mut this.b, &mut this.a, d1, t1, cx)?;
        if a.is_ready() && b.is_ready() {
            Poll::Ready(Ok((this.totals[0], this.totals[1])))
        } else {
            Poll::Pending
        }
    }
}

impl<A, B> Drop for StreamCopy<A, B> {
    fn drop(&mut self) {
        for dir in &mut self.dirs {
            if let Dir::Writing { buf, .. } = std::mem::replace(dir, Dir::Done) {
                give_back(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, AsyncReadExt as _, AsyncWriteExt as _};

    use super::StreamCopy;

    #[tokio::test]
    async fn both_directions_byte_exact_with_half_close() {
        let (mut client, a) = duplex(64 * 1024);
        let (b, mut server) = duplex(64 * 1024);
        let copy = tokio::spawn(StreamCopy::new(a, b));
        let request: Vec<u8> = (0..2_000_003u32).map(|i| (i % 253) as u8).collect();
        let response: Vec<u8> = (0..700_001u32).map(|i| (i % 241) as u8).collect();
        let req = request.clone();
        let client_task = tokio::spawn(async move {
            client.write_all(&req).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == request, "request corrupted ({} bytes)", got.len());
        server.write_all(&response).await.unwrap();
        server.shutdown().await.unwrap();
        let back = client_task.await.unwrap();
        assert!(
            back == response,
            "response corrupted ({} bytes)",
            back.len()
        );
        let (sent, received) = copy.await.unwrap().unwrap();
        assert_eq!(
            (sent, received),
            (request.len() as u64, response.len() as u64)
        );
    }
}
