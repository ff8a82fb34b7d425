//! Large reads under TLS: rustls asks its transport for at most 4 KiB per read (its deframer
//! grows its buffer 4 KiB at a time), so a bulk transfer through an HBONE connection would cost
//! a `recvfrom` per 4 KiB on the receiving agent, four or five per 16 KiB TLS record.
//! [`ReadAhead`] reads whatever the socket holds, up to one copy buffer, and hands it out in the
//! sizes asked for.
//!
//! The buffer is borrowed from the relay's pool ([`super::buffers`]) only while it holds bytes
//! not yet handed out, so an idle HBONE connection holds none, and a read of a small message
//! gives it back at once.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::buffers::{give_back, take_buffer};

/// A transport whose reads go through a borrowed buffer; writes pass straight through.
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    /// Bytes read ahead: `buf[pos..end]` not handed out yet. `None` when there are none.
    ahead: Option<Ahead>,
}

#[derive(Debug)]
struct Ahead {
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        Self { inner, ahead: None }
    }

    /// Hands out what was read ahead; gives the buffer back once it is all out.
    fn hand_out(&mut self, out: &mut ReadBuf<'_>) {
        if let Some(ahead) = &mut self.ahead {
            let n = (ahead.end - ahead.pos).min(out.remaining());
            out.put_slice(&ahead.buf[ahead.pos..ahead.pos + n]);
            ahead.pos += n;
            if ahead.pos == ahead.end {
                if let Some(done) = self.ahead.take() {
                    give_back(done.buf);
                }
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.ahead.is_some() {
            this.hand_out(out);
            return Poll::Ready(Ok(()));
        }
        let mut buf = take_buffer();
        if out.remaining() >= buf.len() {
            // A read as large as ours gains nothing from going through it.
            give_back(buf);
            return Pin::new(&mut this.inner).poll_read(cx, out);
        }
        let mut into = ReadBuf::new(&mut buf);
        match Pin::new(&mut this.inner).poll_read(cx, &mut into) {
            Poll::Ready(Ok(())) => {
                let end = into.filled().len();
                if end == 0 {
                    // End of file (nothing was put into `out`, which says so).
                    give_back(buf);
                } else {
                    this.ahead = Some(Ahead { buf, pos: 0, end });
                    this.hand_out(out);
                }
                Poll::Ready(Ok(()))
            }
            other => {
                give_back(buf);
                other
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S> Drop for ReadAhead<S> {
    fn drop(&mut self) {
        if let Some(ahead) = self.ahead.take() {
            give_back(ahead.buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        pin::Pin,
        task::{Context, Poll},
    };

    use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, ReadBuf};

    use super::ReadAhead;

    /// A reader that counts the reads it is asked for.
    struct Counted<R> {
        inner: R,
        reads: usize,
    }

    impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let before = buf.filled().len();
            let r = Pin::new(&mut self.inner).poll_read(cx, buf);
            if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
                self.reads += 1;
            }
            r
        }
    }

    #[tokio::test]
    async fn small_reads_are_served_from_one_large_read_byte_exact() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..200_003u32).map(|i| (i % 251) as u8).collect();
        tx.write_all(&data).await.unwrap();
        drop(tx);
        let mut ahead = ReadAhead::new(Counted {
            inner: rx,
            reads: 0,
        });
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = ahead.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(got == data, "bytes changed ({} read)", got.len());
        assert_eq!(
            ahead.inner.reads, 1,
            "200 kB in 4 KiB reads should cost one read of the transport"
        );
        assert!(ahead.ahead.is_none(), "the buffer is given back once empty");
    }
}
