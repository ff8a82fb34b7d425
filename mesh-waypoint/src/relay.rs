//! Bytes relayed both ways between two streams (a TCP tunnel passed through, an upgraded
//! connection), ended once neither side has sent a byte for a while: a connection a client
//! opened and forgot, or holds open on purpose, does not keep its tunnel, its stream toward the
//! endpoint and their buffers for ever. Envoy's TCP proxy ends such a connection after an hour
//! (`idle_timeout`), as this does.

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

/// How long a relayed connection may go without a byte either way.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// Copies `a` to `b` and `b` to `a` until both are done (as
/// [`tokio::io::copy_bidirectional`]), or until neither has carried a byte for `idle`: then
/// [`io::ErrorKind::TimedOut`]. The bytes `a` sent and `b` sent, when done.
pub(crate) async fn relay<A, B>(a: &mut A, b: &mut B, idle: Duration) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let start = Instant::now();
    // Milliseconds from `start` to the last byte either way.
    let last = AtomicU64::new(0);
    let mut a = Active {
        io: a,
        start,
        last: &last,
    };
    let mut b = Active {
        io: b,
        start,
        last: &last,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    loop {
        let quiet_until = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
        tokio::select! {
            done = &mut copy => return done,
            () = tokio::time::sleep_until(quiet_until) => {
                let seen = start + Duration::from_millis(last.load(Ordering::Relaxed));
                if seen + idle <= Instant::now() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no byte either way for {idle:?}"),
                    ));
                }
            }
        }
    }
}

/// A stream that notes when it last carried bytes.
struct Active<'a, T: ?Sized> {
    io: &'a mut T,
    start: Instant,
    last: &'a AtomicU64,
}

impl<T: ?Sized> Active<'_, T> {
    fn moved(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
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
            this.moved();
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
            this.moved();
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

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::relay;

    #[tokio::test(start_paused = true)]
    async fn a_relay_ends_after_the_idle_time_and_not_while_bytes_move() {
        let idle = Duration::from_secs(60);
        let (mut client, mut a) = tokio::io::duplex(1024);
        let (mut b, mut server) = tokio::io::duplex(1024);
        let started = tokio::time::Instant::now();
        let relayed = tokio::spawn(async move { relay(&mut a, &mut b, idle).await });
        // A byte every 50 s for 200 s: never idle for 60 s.
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
            took >= Duration::from_secs(260) && took < Duration::from_secs(262),
            "ended after {took:?}: 60 s after the last byte at 200 s"
        );
    }

    #[tokio::test]
    async fn a_relay_that_both_sides_end_reports_the_bytes() {
        let (mut client, mut a) = tokio::io::duplex(1024);
        let (mut b, mut server) = tokio::io::duplex(1024);
        let relayed = tokio::spawn(async move { relay(&mut a, &mut b, super::IDLE_TIMEOUT).await });
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
