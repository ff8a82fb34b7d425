//! What a tunnel to the waypoint carries: HTTP (served and routed) or anything else (passed
//! through as TCP to an endpoint). A port that says (`appProtocol`, its name) is taken at its
//! word; otherwise the first bytes are sniffed: an HTTP/1.1 request line or the HTTP/2 preface is
//! HTTP, anything else, or nothing within [`SNIFF_TIMEOUT`] (a protocol whose server speaks
//! first), is TCP.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};

/// How long the waypoint waits for a client's first bytes before it takes the tunnel for TCP.
pub(crate) const SNIFF_TIMEOUT: Duration = Duration::from_secs(1);

/// What sniffing found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sniffed {
    Http,
    Tcp,
}

/// The starts of HTTP: an HTTP/1.1 method and a space, or the HTTP/2 preface.
const HTTP_STARTS: [&[u8]; 10] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
    b"PRI * HTTP/2.0",
];

/// What `bytes` (a tunnel's first) are, or `None` while they could still become HTTP.
pub(crate) fn classify(bytes: &[u8]) -> Option<Sniffed> {
    if bytes.is_empty() {
        return None;
    }
    let mut could_be = false;
    for start in HTTP_STARTS {
        let n = bytes.len().min(start.len());
        if bytes[..n] == start[..n] {
            if bytes.len() >= start.len() {
                return Some(Sniffed::Http);
            }
            could_be = true;
        }
    }
    (!could_be).then_some(Sniffed::Tcp)
}

/// Reads `io`'s first bytes until they tell; returns what they are and the bytes read.
pub(crate) async fn sniff<IO: AsyncRead + Unpin>(io: &mut IO) -> io::Result<(Sniffed, Vec<u8>)> {
    let mut buf = Vec::with_capacity(64);
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    loop {
        if let Some(found) = classify(&buf) {
            return Ok((found, buf));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            // The client waits for the server, or closed: not HTTP.
            Err(_) | Ok(Ok(0)) => return Ok((Sniffed::Tcp, buf)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// A stream whose first bytes were already read: they are read again first.
pub(crate) struct Prefixed<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO> Prefixed<IO> {
    pub(crate) fn new(prefix: Vec<u8>, io: IO) -> Self {
        Self {
            prefix: Bytes::from(prefix),
            io,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt as _;

    use super::{classify, sniff, Prefixed, Sniffed};

    #[test]
    fn http_request_lines_and_the_h2_preface_are_http() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Sniffed::Http));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM"), Some(Sniffed::Http));
        assert_eq!(classify(b"OPTIONS "), Some(Sniffed::Http));
        assert_eq!(classify(b"PO"), None, "could still be POST");
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GETX"), Some(Sniffed::Tcp));
        assert_eq!(
            classify(b"\x16\x03\x01\x02"),
            Some(Sniffed::Tcp),
            "a TLS ClientHello"
        );
        assert_eq!(
            classify(b"get / HTTP/1.1"),
            Some(Sniffed::Tcp),
            "methods are case-sensitive"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sniffing_reads_until_it_knows_and_gives_the_bytes_back() {
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            client.write_all(b"PO").await.unwrap();
            client.write_all(b"ST /x HTTP/1.1\r\n").await.unwrap();
        });
        let (found, bytes) = sniff(&mut server).await.unwrap();
        assert_eq!(found, Sniffed::Http);
        let mut again = Prefixed::new(bytes, server);
        let mut line = vec![0; 18];
        again.read_exact(&mut line).await.unwrap();
        assert_eq!(line, b"POST /x HTTP/1.1\r\n");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_tcp_after_the_timeout() {
        let (_client, mut server) = tokio::io::duplex(64);
        let (found, bytes) = sniff(&mut server).await.unwrap();
        assert_eq!((found, bytes.len()), (Sniffed::Tcp, 0));
    }
}
