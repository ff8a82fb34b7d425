//! Copying both directions between a TCP leg and an HBONE tunnel without copying the bytes in
//! user space: what is read from the socket is handed to HTTP/2 as it is (a `Bytes` of the read
//! buffer), and what the tunnel received is written to the socket from HTTP/2's own buffers,
//! several DATA frames per `writev`. Half-close passes through both ways.
//!
//! [`super::relay`]'s copy is the same idea for two TCP sockets. An idle tunnelled connection
//! holds no buffer: a read buffer is allocated for each read (sized by the last one) and lives
//! on only as the `Bytes` h2 has yet to write, and the queue of frames to write is freed once
//! it is empty.

use std::{
    collections::VecDeque,
    future::Future,
    io::{self, IoSlice},
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use mesh_hbone::H2Stream;
use tokio::{io::AsyncWrite, net::TcpStream};

use super::buffers::BUDGET;

/// The smallest read buffer a direction allocates (small messages: within jemalloc's thread
/// cache), and the largest (a bulk transfer: few system calls per megabyte, as the relay's).
const MIN_READ: usize = 16 * 1024;
const MAX_READ: usize = 256 * 1024;
/// Most DATA frames written in one `writev`.
const MAX_GATHER: usize = 64;

/// From the socket into the tunnel.
#[derive(Debug)]
enum Up {
    /// Reading the socket failed before the copy started (while the tunnel opened): the copy
    /// ends with this error.
    Failed(Option<io::Error>),
    /// Waiting for the socket.
    Reading,
    /// Handing `Bytes` read from the socket to HTTP/2 as its windows allow.
    Sending(Bytes),
    /// EOF read: half-closing the tunnel.
    ShuttingDown,
    Done,
}

/// From the tunnel to the socket.
#[derive(Debug)]
enum Down {
    /// Taking DATA frames from the tunnel and writing them; `frames` holds those not yet
    /// written (their capacity is given back to the peer as they are), `eof` says the peer has
    /// half-closed once they are out.
    Copying {
        frames: VecDeque<Bytes>,
        eof: bool,
    },
    Done,
}

/// Copies `tcp ↔ tunnel` until both directions have ended; resolves to the bytes moved
/// `(tcp → tunnel, tunnel → tcp)`. The first error ends both.
#[derive(Debug)]
pub struct TunnelCopy {
    tcp: TcpStream,
    tunnel: H2Stream,
    up: Up,
    down: Down,
    totals: [u64; 2],
    /// Size of the next read buffer, from the last read: one is allocated per read and none is
    /// kept while the socket has nothing.
    next_read: usize,
}

impl TunnelCopy {
    pub fn new(tcp: TcpStream, tunnel: H2Stream) -> Self {
        Self::after_early(tcp, tunnel, ClientFirst::default())
    }

    /// The copy of a tunnel that already carried the socket's first bytes (see
    /// [`ClientFirst`]): they count as moved, and a read error met then ends the copy.
    pub fn after_early(tcp: TcpStream, tunnel: H2Stream, early: ClientFirst) -> Self {
        let up = match early.error {
            Some(e) => Up::Failed(Some(e)),
            None => Up::Reading,
        };
        Self {
            tcp,
            tunnel,
            up,
            down: Down::Copying {
                frames: VecDeque::new(),
                eof: false,
            },
            totals: [early.sent, 0],
            next_read: MIN_READ,
        }
    }

    /// Bytes moved so far, `[tcp → tunnel, tunnel → tcp]`.
    pub fn totals(&self) -> [u64; 2] {
        self.totals
    }

    /// Advances socket → tunnel as far as it can go without blocking.
    fn poll_up(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut budget = BUDGET;
        loop {
            match &mut self.up {
                Up::Done => return Poll::Ready(Ok(())),
                Up::Failed(error) => {
                    let e = error.take().unwrap_or_else(|| io::ErrorKind::Other.into());
                    self.up = Up::Done;
                    return Poll::Ready(Err(e));
                }
                Up::Reading => {
                    if budget == 0 {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    budget -= 1;
                    ready!(self.tcp.poll_read_ready(cx))?;
                    let size = self.next_read;
                    let mut buf = BytesMut::with_capacity(size);
                    match self.tcp.try_read_buf(&mut (&mut buf).limit(size)) {
                        Ok(0) => self.up = Up::ShuttingDown,
                        Ok(n) => {
                            // A read that filled the buffer asks for a larger one next time,
                            // a short one for a smaller one.
                            let next = if n == size {
                                size * 2
                            } else {
                                (n * 2).next_power_of_two()
                            };
                            self.next_read = next.clamp(MIN_READ, MAX_READ);
                            self.up = Up::Sending(buf.freeze());
                        }
                        // Nothing after all: wait for readiness again.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                Up::Sending(data) => {
                    let before = data.len();
                    let sent = self.tunnel.poll_send(cx, data);
                    self.totals[0] += (before - data.len()) as u64;
                    ready!(sent)?;
                    self.up = Up::Reading;
                }
                Up::ShuttingDown => {
                    ready!(Pin::new(&mut self.tunnel).poll_shutdown(cx))?;
                    self.up = Up::Done;
                }
            }
        }
    }

    /// Advances tunnel → socket as far as it can go without blocking.
    fn poll_down(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut budget = BUDGET;
        loop {
            let Down::Copying { frames, eof } = &mut self.down else {
                return Poll::Ready(Ok(()));
            };
            // Gather what the tunnel has, up to one write's worth.
            let mut queued: usize = frames.iter().map(Bytes::len).sum();
            while !*eof && frames.len() < MAX_GATHER && queued < MAX_READ {
                match self.tunnel.poll_recv(cx) {
                    Poll::Ready(Ok(Some(data))) => {
                        queued += data.len();
                        frames.push_back(data);
                    }
                    Poll::Ready(Ok(None)) => *eof = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            if frames.is_empty() {
                if !*eof {
                    return Poll::Pending;
                }
                match ready!(Pin::new(&mut self.tcp).poll_shutdown(cx)) {
                    // The peer may be gone already; its own direction reports it.
                    Err(e) if e.kind() != io::ErrorKind::NotConnected => {
                        return Poll::Ready(Err(e))
                    }
                    _ => self.down = Down::Done,
                }
                continue;
            }
            if budget == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            budget -= 1;
            let n = {
                let mut slices = [IoSlice::new(&[]); MAX_GATHER];
                let count = frames.len().min(MAX_GATHER);
                for (slice, frame) in slices.iter_mut().zip(frames.iter()) {
                    *slice = IoSlice::new(frame);
                }
                ready!(Pin::new(&mut self.tcp).poll_write_vectored(cx, &slices[..count]))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.totals[1] += n as u64;
            self.tunnel.release(n);
            let mut left = n;
            while left > 0 {
                let Some(front) = frames.front_mut() else {
                    break;
                };
                if front.len() <= left {
                    left -= front.len();
                    frames.pop_front();
                } else {
                    front.advance(left);
                    left = 0;
                }
            }
            if frames.is_empty() {
                // All written: an idle tunnel keeps no queue (128 bytes or more).
                *frames = VecDeque::new();
            }
        }
    }
}

/// What the client sent while its tunnel opened ([`mesh_hbone::EarlyData`]): read from its
/// socket into `Bytes` handed to HTTP/2 as they are, as the copy does afterwards.
#[derive(Debug, Default)]
pub struct ClientFirst {
    /// Bytes that went ahead (as the pool counted them).
    pub sent: u64,
    /// The read error that ended the early reads, for the copy to report.
    pub error: Option<io::Error>,
}

impl ClientFirst {
    /// The early-data source reading `tcp`.
    pub fn reader<'a>(&'a mut self, tcp: &'a TcpStream) -> ClientFirstReader<'a> {
        ClientFirstReader { tcp, first: self }
    }
}

/// [`ClientFirst`] while it reads.
pub struct ClientFirstReader<'a> {
    tcp: &'a TcpStream,
    first: &'a mut ClientFirst,
}

impl mesh_hbone::EarlyData for ClientFirstReader<'_> {
    fn poll_early(&mut self, cx: &mut Context<'_>, limit: usize) -> Poll<Option<Bytes>> {
        loop {
            if let Err(e) = ready!(self.tcp.poll_read_ready(cx)) {
                self.first.error = Some(e);
                return Poll::Ready(None);
            }
            let mut buf = BytesMut::with_capacity(limit);
            match self.tcp.try_read_buf(&mut (&mut buf).limit(limit)) {
                // End of file: the copy reads it again.
                Ok(0) => return Poll::Ready(None),
                Ok(_) => return Poll::Ready(Some(buf.freeze())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    self.first.error = Some(e);
                    return Poll::Ready(None);
                }
            }
        }
    }
}

impl Future for TunnelCopy {
    type Output = io::Result<(u64, u64)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let up = this.poll_up(cx)?;
        let down = this.poll_down(cx)?;
        if up.is_ready() && down.is_ready() {
            Poll::Ready(Ok((this.totals[0], this.totals[1])))
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{io, net::SocketAddr};

    use mesh_hbone::{
        serve_connection, Connect, H2Stream, InboundRequest, OutboundRequest, Pool, PoolConfig,
        Responder, ServerConfig,
    };
    use tokio::{
        net::{TcpListener, TcpStream},
        sync::mpsc,
    };

    use super::super::copy_tests::{half_close_exchange, pair};
    use super::TunnelCopy;

    /// Plain TCP to the test's HBONE server (no TLS: the copy does not care).
    struct Plain;

    impl Connect for Plain {
        type Io = TcpStream;
        type Key = SocketAddr;

        async fn connect(&self, key: &SocketAddr) -> io::Result<TcpStream> {
            TcpStream::connect(key).await
        }
    }

    /// A real HTTP/2 tunnel over loopback: (client end, server end).
    async fn tunnel() -> (H2Stream, H2Stream, Pool<Plain>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let handler = move |_: InboundRequest, responder: Responder| {
                let tx = tx.clone();
                async move {
                    tx.send(responder.accept().unwrap()).unwrap();
                }
            };
            let _ = serve_connection(tcp, &ServerConfig::default(), handler).await;
        });
        let pool = Pool::new(Plain, PoolConfig::default());
        let request = OutboundRequest::new("10.0.0.1:80".parse().unwrap());
        let client = pool.open(&addr, request).await.unwrap();
        let server = rx.recv().await.unwrap();
        (client, server, pool)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_directions_byte_exact_with_half_close() {
        let (app, leg) = pair().await;
        let (client_end, mut far_end, _pool) = tunnel().await;
        let copy = tokio::spawn(TunnelCopy::new(leg, client_end));
        let (request, response) = (5 * 1024 * 1024 + 17, 2 * 1024 * 1024 + 3);
        half_close_exchange(app, &mut far_end, request, response).await;
        let (sent, received) = copy.await.unwrap().unwrap();
        assert_eq!((sent, received), (request as u64, response as u64));
    }

    #[tokio::test]
    async fn a_socket_reset_ends_the_copy_with_an_error() {
        let (app, leg) = pair().await;
        let (client_end, _far_end, _pool) = tunnel().await;
        let copy = tokio::spawn(TunnelCopy::new(leg, client_end));
        // Linger 0: closing sends RST instead of FIN.
        app.set_zero_linger().unwrap();
        drop(app);
        let result = copy.await.unwrap();
        assert!(result.is_err(), "expected an error, got {result:?}");
    }
}

#[cfg(test)]
mod size {
    #[test]
    fn a_tunnels_copy_state_fits_jemallocs_256_byte_class() {
        // Sockets' kernel buffers aside, this (boxed) is what the copy of an idle tunnel keeps.
        let size = size_of::<super::TunnelCopy>();
        assert!(size <= 256, "TunnelCopy is {size} bytes");
    }
}
