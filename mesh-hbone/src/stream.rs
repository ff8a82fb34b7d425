//! [`H2Stream`]: one HBONE tunnel (an HTTP/2 CONNECT stream) as a bidirectional byte stream.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest amount of send capacity requested from h2 in one go; writes bigger than this are
/// accepted partially, as `AsyncWrite` allows.
const MAX_RESERVE: usize = 1 << 24;

/// One established HBONE tunnel: the DATA frames of an HTTP/2 CONNECT stream, as a byte stream.
///
/// * **Writes** wait for HTTP/2 send capacity (the peer's stream and connection windows, and
///   the connection's bounded send buffer) and accept only as many bytes as fit, so a peer that
///   stops reading stops the writer: nothing is buffered beyond the windows.
/// * **Reads** hand out the DATA frames' bytes and give flow-control capacity back to the peer
///   only for the bytes the reader has consumed, so a reader that stops reading stops the peer.
/// * **`shutdown`** sends `END_STREAM`: a half-close, the peer reads end-of-file and may keep
///   writing. A read returns end-of-file once the peer has half-closed.
/// * **Resets**: an `RST_STREAM` from the peer (other than `NO_ERROR`, which by RFC 9113 §8.1
///   means "stop sending, my side is complete" and reads as end-of-file) or the connection
///   failing turns into an [`io::Error`] (`ConnectionReset` for a reset, `ConnectionAborted`
///   for a GOAWAY, the transport's own error for I/O failures).
/// * **Dropping** the stream before both directions are finished resets it (`RST_STREAM`
///   `CANCEL`, or `NO_ERROR` from a server that had already half-closed), which the peer sees
///   as an error: use `shutdown` and read to end-of-file for a clean close.
///
/// `flush` is a no-op: h2 writes buffered frames as soon as the connection task runs.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// The part of the last DATA frame that the reader has not consumed yet. Its bytes are still
    /// counted against the peer's window until consumed.
    pending: Bytes,
    read_eof: bool,
    write_closed: bool,
    /// Whatever must live exactly as long as the stream: for client streams, the pool's claim
    /// on its connection's capacity, released when the stream is dropped. (Opaque here, so the
    /// stream does not depend on the pool that opens it.)
    _slot: Option<Box<dyn Send + Sync>>,
}

impl fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H2Stream")
            .field("stream_id", &self.send.stream_id().as_u32())
            .field("buffered", &self.pending.len())
            .field("read_eof", &self.read_eof)
            .field("write_closed", &self.write_closed)
            .finish_non_exhaustive()
    }
}

impl H2Stream {
    pub(crate) fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        slot: Option<Box<dyn Send + Sync>>,
    ) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            read_eof: false,
            write_closed: false,
            _slot: slot,
        }
    }

    /// The HTTP/2 stream id (odd: opened by the client).
    pub fn stream_id(&self) -> u32 {
        self.send.stream_id().as_u32()
    }

    /// Copies buffered bytes into `buf` and gives the flow-control capacity they held back to
    /// the peer.
    fn consume_pending(&mut self, buf: &mut ReadBuf<'_>) {
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        take_front(&mut self.pending, n);
        self.release(n);
    }

    /// The next bytes the peer sent, as h2 received them (no copy): `None` once the peer has
    /// half-closed. They keep counting against the peer's windows until [`Self::release`] gives
    /// their capacity back, which a relay does once it has written them on: a reader that
    /// stops writing stops the peer. (For callers that copy into a buffer, [`AsyncRead`] does
    /// both at once.)
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        loop {
            if !self.pending.is_empty() {
                return Poll::Ready(Ok(Some(std::mem::take(&mut self.pending))));
            }
            if self.read_eof {
                return Poll::Ready(Ok(None));
            }
            match ready!(self.poll_frame(cx)) {
                Ok(Some(data)) => self.pending = data,
                Ok(None) => self.read_eof = true,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Gives the flow-control capacity of `n` received bytes back to the peer.
    pub fn release(&mut self, n: usize) {
        // Only fails when the stream is already closed, where capacity no longer matters.
        if let Err(e) = self.recv.flow_control().release_capacity(n) {
            tracing::trace!(error = %e, "releasing receive capacity failed");
        }
    }

    /// Sends `data` without copying it, as far as the peer's windows and the connection's
    /// send buffer allow: `data` keeps what could not be sent yet, and the call is ready once it
    /// is empty. Flow control as for [`AsyncWrite::poll_write`].
    pub fn poll_send(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        if self.write_closed {
            return Poll::Ready(Err(write_after_shutdown()));
        }
        while !data.is_empty() {
            let capacity = ready!(self.poll_capacity(cx, data.len()))?;
            let chunk = data.split_to(capacity.min(data.len()));
            self.send.send_data(chunk, false).map_err(h2_to_io)?;
        }
        Poll::Ready(Ok(()))
    }

    /// The next DATA frame's bytes, `None` at the end of the stream (a reset with `NO_ERROR`
    /// included).
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        Poll::Ready(match ready!(self.recv.poll_data(cx)) {
            Some(Ok(data)) => Ok(Some(data)),
            None => Ok(None),
            Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) && e.is_reset() => {
                // The peer finished and no longer wants our data (RFC 9113 §8.1). h2 reports
                // it in place of the end of stream it may already have received.
                Ok(None)
            }
            Some(Err(e)) => Err(h2_to_io(e)),
        })
    }

    /// Waits until some send capacity is assigned for a write of `want` bytes; returns it.
    fn poll_capacity(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        loop {
            let capacity = self.send.capacity();
            if capacity > 0 {
                return Poll::Ready(Ok(capacity));
            }
            // Ask for (at most) what this write needs; h2 assigns it as the peer's windows and the
            // connection's send buffer allow, and wakes us when some is assigned.
            self.send.reserve_capacity(want.min(MAX_RESERVE));
            match self.send.poll_capacity(cx) {
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_to_io(e))),
                Poll::Ready(None) => {
                    // The send side is closed: the stream was reset or the connection is gone.
                    return match self.poll_send_error(cx) {
                        Poll::Ready(e) => Poll::Ready(Err(e)),
                        Poll::Pending => Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "HBONE stream closed",
                        ))),
                    };
                }
                Poll::Pending => {
                    // A reset does not assign capacity: watch for it too.
                    return match self.poll_send_error(cx) {
                        Poll::Ready(e) => Poll::Ready(Err(e)),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }

    /// Waits for the reason the peer (or the connection) stopped the send side.
    fn poll_send_error(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(Reason::NO_ERROR)) => Poll::Ready(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "HBONE peer closed the stream (RST_STREAM NO_ERROR)",
            )),
            Poll::Ready(Ok(reason)) => Poll::Ready(reset_error(reason)),
            Poll::Ready(Err(e)) => Poll::Ready(h2_to_io(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Drops the first `n` bytes of `pending`. Once all are gone it lets go of the frame's buffer:
/// an emptied slice would still hold the connection's whole read buffer (8 KiB or more, shared
/// by the frames read with it) for as long as the stream lives, about 1.1 kB per idle tunnel
/// (BENCHMARKS.md, "What an idle connection keeps").
fn take_front(pending: &mut Bytes, n: usize) {
    if n == pending.len() {
        *pending = Bytes::new();
    } else {
        pending.advance(n);
    }
}

fn write_after_shutdown() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "write after shutdown of an HBONE stream",
    )
}

fn reset_error(reason: Reason) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("HBONE stream reset: {reason}"),
    )
}

/// Maps an h2 error on a stream to the closest I/O error.
pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    if e.is_reset() {
        return io::Error::new(io::ErrorKind::ConnectionReset, e);
    }
    if e.is_go_away() {
        return io::Error::new(io::ErrorKind::ConnectionAborted, e);
    }
    io::Error::other(e)
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.pending.is_empty() {
                this.consume_pending(buf);
                return Poll::Ready(Ok(()));
            }
            if this.read_eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.poll_frame(cx)) {
                Ok(Some(data)) => this.pending = data,
                Ok(None) => this.read_eof = true,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Err(write_after_shutdown()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let capacity = ready!(this.poll_capacity(cx, buf.len()))?;
        let n = capacity.min(buf.len());
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Ok(()));
        }
        match this.send.send_data(Bytes::new(), true) {
            Ok(()) => {
                this.write_closed = true;
                Poll::Ready(Ok(()))
            }
            Err(e) => match this.poll_send_error(cx) {
                Poll::Ready(err) => Poll::Ready(Err(err)),
                Poll::Pending => Poll::Ready(Err(h2_to_io(e))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::take_front;

    #[test]
    fn a_consumed_frame_lets_go_of_its_buffer() {
        // The connection's read buffer, and a DATA frame's bytes sliced out of it.
        let buffer = Bytes::from(vec![7u8; 8192]);
        let mut pending = buffer.slice(100..200);
        take_front(&mut pending, 60);
        assert_eq!(pending.len(), 40);
        assert!(
            !buffer.is_unique(),
            "a partly read frame still needs its buffer"
        );
        take_front(&mut pending, 40);
        assert!(pending.is_empty());
        assert!(
            buffer.is_unique(),
            "the stream still holds the read buffer after consuming everything"
        );
    }
}
