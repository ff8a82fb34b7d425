//! Bytes relayed both ways between two streams (a TCP tunnel passed through, an upgraded
//! connection), ended once neither side has sent a byte for [`IDLE_TIMEOUT`]: a connection a
//! client opened and forgot, or holds open on purpose, does not keep its tunnel, its stream
//! toward the endpoint and their buffers for ever. Envoy's TCP proxy ends such a connection
//! after an hour (`idle_timeout`), as this does. The clock is the agent's: one
//! [`IdleSweep`] for the process, a 16-byte [`IdleWatch`] per relay.

use std::{
    future::{poll_fn, Future as _},
    io,
    pin::Pin,
    sync::atomic::{AtomicBool, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use mesh_hbone::idle::{IdleSweep, IdleWatch};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How long a relayed connection may go without a byte either way.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// The waypoint's idle clock for relays ([`IdleSweep::run`] must be spawned).
pub(crate) fn sweep() -> std::sync::Arc<IdleSweep> {
    IdleSweep::new(IDLE_TIMEOUT)
}

/// Copies `a` to `b` and `b` to `a` until both are done (as
/// [`tokio::io::copy_bidirectional`]), or until `idle` says neither has carried a byte for its
/// timeout: then [`io::ErrorKind::TimedOut`]. The bytes `a` sent and `b` sent, when done.
pub(crate) async fn relay<A, B>(a: &mut A, b: &mut B, mut idle: IdleWatch) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let moved = AtomicBool::new(false);
    let mut a = Active {
        io: a,
        moved: &moved,
    };
    let mut b = Active {
        io: b,
        moved: &moved,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    poll_fn(|cx| {
        if let Poll::Ready(done) = copy.as_mut().poll(cx) {
            return Poll::Ready(done);
        }
        if idle.expired(moved.swap(false, Ordering::Relaxed), cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no byte either way for {:?}", idle.timeout()),
            )));
        }
        Poll::Pending
    })
    .await
}

/// A stream that notes that it carried bytes.
struct Active<'a, T: ?Sized> {
    io: &'a mut T,
    moved: &'a AtomicBool,
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Active<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut *this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.moved.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Active<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut *this.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.moved.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use mesh_hbone::idle::IdleSweep;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::relay;

    #[tokio::test(start_paused = true)]
    async fn a_relay_ends_after_the_idle_time_and_not_while_bytes_move() {
        let idle = Duration::from_secs(80);
        // Ticks of 10 s: a relay ends 80-90 s after its last byte.
        let sweep = IdleSweep::new(idle);
        tokio::spawn(std::sync::Arc::clone(&sweep).run());
        let (mut client, mut a) = tokio::io::duplex(1024);
        let (mut b, mut server) = tokio::io::duplex(1024);
        let started = tokio::time::Instant::now();
        let watch = sweep.watch();
        let relayed = tokio::spawn(async move { relay(&mut a, &mut b, watch).await });
        // A byte every 50 s for 200 s: never idle for 80 s.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(50)).await;
            client.write_all(b"x").await.unwrap();
            let mut byte = [0];
            server.read_exact(&mut byte).await.unwrap();
        }
        assert!(!relayed.is_finished(), "ended while bytes moved");
        let ended = relayed.await.unwrap();
        let took = started.elapsed();
        assert_eq!(
            ended.unwrap_err().kind(),
            std::io::ErrorKind::TimedOut,
            "ends idle"
        );
        assert!(
            took >= Duration::from_secs(280) && took <= Duration::from_secs(291),
            "ended after {took:?}: 80-90 s after the last byte at 200 s"
        );
    }

    #[tokio::test]
    async fn a_relay_that_both_sides_end_reports_the_bytes() {
        let sweep = super::sweep();
        let (mut client, mut a) = tokio::io::duplex(1024);
        let (mut b, mut server) = tokio::io::duplex(1024);
        let watch = sweep.watch();
        let relayed = tokio::spawn(async move { relay(&mut a, &mut b, watch).await });
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        server.write_all(b"hi").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(
            (got.as_slice(), back.as_slice()),
            (&b"hello"[..], &b"hi"[..])
        );
        assert_eq!(relayed.await.unwrap().unwrap(), (5, 2));
    }
}
