//! Copying between a downstream and an upstream connection, both directions at once, with
//! half-close passed through (EOF on one side shuts down the other's write side, and the other
//! direction keeps flowing), and one log line per connection when it ends.
//!
//! The copy is a small hand-written future ([`Copy`]) rather than two `async` pumps joined: an
//! open connection costs its two sockets, this future (about two hundred bytes) and its task,
//! and an idle one holds no copy buffer. Each direction waits for its socket to become readable,
//! then borrows a buffer from a shared pool for one read and the writes that follow, and gives
//! it back; memory grows with the connections that are moving bytes, not with those that are
//! open. A busy direction keeps reading and writing without going back to the scheduler, up to
//! a budget, so a bulk transfer costs few wake-ups per megabyte.
//!
//! A same-node connection between two pods in the short-cut is paired in the kernel
//! ([`Relay::paired`]): the applications' messages then go straight to each other while neither
//! leg holds a byte of theirs, and the copy moves only what the kernel still sends it, reading
//! by peeking and consuming what it has written on, so that a byte it holds stays on its
//! socket's queue, where the kernel's check sees it.

use std::{
    future::Future,
    io,
    os::fd::AsRawFd as _,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::Instant,
};

use mesh_hbone::H2Stream;
use nix::sys::socket::{recv, MsgFlags};
use tokio::{
    io::{AsyncWrite as _, Interest},
    net::TcpStream,
};

use super::{
    buffers::{give_back, take_buffer, BUDGET},
    idle::{IdleSweep, IdleWatch},
    tracker::Tracked,
    tunnel_copy::{ClientFirst, TunnelCopy},
    PeerGuard,
};
use crate::{
    datapath::Paired,
    telemetry::{ConnInfo, Counters, Telemetry},
};

/// One direction of the copy.
#[derive(Debug)]
enum Dir {
    /// Waiting for the source to become readable; no buffer held.
    Reading,
    /// Writing `buf[pos..end]` to the destination (a pooled buffer: 256 KiB, so `u32` offsets,
    /// which keep the copy within its size budget).
    Writing { buf: Box<[u8]>, pos: u32, end: u32 },
    /// EOF seen and passed on.
    Done,
}

/// Copies both directions between `down` and `up` until both have ended; resolves to the bytes
/// moved `(down → up, up → down)`. The first error ends both.
#[derive(Debug)]
pub struct Copy {
    down: TcpStream,
    up: TcpStream,
    /// `[down → up, up → down]`.
    dirs: [Dir; 2],
    totals: [u64; 2],
    /// A same-node connection whose applications talk straight to each other while neither
    /// leg holds a byte of theirs, which the kernel judges from the sockets' queues: the copy
    /// then reads by peeking, and consumes only what it has written on.
    direct: Option<Box<Paired>>,
}

impl Copy {
    fn new(down: TcpStream, up: TcpStream) -> Self {
        Self {
            down,
            up,
            dirs: [Dir::Reading, Dir::Reading],
            totals: [0; 2],
            direct: None,
        }
    }

    /// Advances direction `i` as far as it can go without blocking.
    fn poll_dir(&mut self, i: usize, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (from, to) = if i == 0 {
            (&self.down, &mut self.up)
        } else {
            (&self.up, &mut self.down)
        };
        let dir = &mut self.dirs[i];
        let peek = self.direct.is_some();
        let mut budget = BUDGET;
        loop {
            match dir {
                Dir::Done => return Poll::Ready(Ok(())),
                Dir::Reading => {
                    if budget == 0 {
                        // Let other connections run; come back at once.
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    budget -= 1;
                    ready!(from.poll_read_ready(cx))?;
                    let mut buf = take_buffer();
                    let read = if peek {
                        from.try_io(Interest::READABLE, || {
                            let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
                            Ok(recv(from.as_raw_fd(), &mut buf, flags)?)
                        })
                    } else {
                        from.try_read(&mut buf)
                    };
                    match read {
                        Ok(0) => {
                            give_back(buf);
                            *dir = Dir::Done;
                            match Pin::new(&mut *to).poll_shutdown(cx) {
                                // The peer may be gone already; its own direction reports it.
                                Poll::Ready(Err(e)) if e.kind() != io::ErrorKind::NotConnected => {
                                    return Poll::Ready(Err(e))
                                }
                                _ => return Poll::Ready(Ok(())),
                            }
                        }
                        Ok(end) => {
                            let end = u32::try_from(end).expect("a pooled buffer is under 4 GiB");
                            *dir = Dir::Writing { buf, pos: 0, end };
                        }
                        // Readiness was spurious (it is cleared now); wait again.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => give_back(buf),
                        Err(e) => {
                            give_back(buf);
                            return Poll::Ready(Err(e));
                        }
                    }
                }
                Dir::Writing { buf, pos, end } => {
                    while *pos < *end {
                        ready!(to.poll_write_ready(cx))?;
                        let (at, upto) = (*pos as usize, *end as usize);
                        match to.try_write(&buf[at..upto]) {
                            Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                            Ok(n) => {
                                if peek {
                                    consume(from, &mut buf[at..at + n])?;
                                }
                                // At most `end - pos`, itself a `u32`.
                                *pos += u32::try_from(n).expect("within the buffer");
                                self.totals[i] += n as u64;
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            Err(e) => return Poll::Ready(Err(e)),
                        }
                    }
                    if let Dir::Writing { buf, .. } = std::mem::replace(dir, Dir::Reading) {
                        give_back(buf);
                    }
                }
            }
        }
    }
}

/// Takes `written.len()` bytes, already peeked and written on, off `from`'s queue (into
/// `written`, which holds the same bytes). `MSG_TRUNC`: bytes on the TCP receive queue are
/// discarded without a copy; those on the short-cut queue are copied (`sk_msg_recvmsg` ignores
/// the flag), which is harmless.
fn consume(from: &TcpStream, written: &mut [u8]) -> io::Result<()> {
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC;
    let n = recv(from.as_raw_fd(), written, flags)?;
    if n == written.len() {
        Ok(())
    } else {
        // Nothing else reads this socket, so what was peeked is still queued.
        Err(io::Error::other(format!(
            "{n} of {} peeked bytes left to consume",
            written.len()
        )))
    }
}

impl Future for Copy {
    type Output = io::Result<(u64, u64)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let a = this.poll_dir(0, cx)?;
        let b = this.poll_dir(1, cx)?;
        if a.is_ready() && b.is_ready() {
            Poll::Ready(Ok((this.totals[0], this.totals[1])))
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Copy {
    fn drop(&mut self) {
        for dir in &mut self.dirs {
            if let Dir::Writing { buf, .. } = std::mem::replace(dir, Dir::Done) {
                give_back(buf);
            }
        }
    }
}

/// Relays until both directions have ended (or a policy change revokes the connection), then
/// records the connection. A plain future (not an `async fn`) so that the connection's task
/// holds the copy state and the record's fields once.
pub fn relay(down: TcpStream, up: TcpStream, conn: Conn) -> Relay {
    Relay::new(Copy::new(down, up), conn)
}

/// Relays a captured connection through an HBONE tunnel, like [`relay`]; a tunnel that moves
/// no byte either way for `idle` is closed.
/// `early`: what went ahead on the tunnel while it opened.
pub fn relay_tunnel(
    down: TcpStream,
    tunnel: H2Stream,
    early: ClientFirst,
    conn: Conn,
    idle: Option<&Arc<IdleSweep>>,
) -> Relay<TunnelOut> {
    let mut relay = Relay::new(
        TunnelOut(Box::new(TunnelCopy::after_early(down, tunnel, early))),
        conn,
    );
    relay.record.idle = idle.map(IdleSweep::watch);
    relay
}

/// Relays an HBONE stream accepted by this agent to the application, like [`relay`]; a tunnel
/// that moves no byte either way for `idle` is closed.
pub fn relay_inbound_tunnel(
    tunnel: H2Stream,
    app: TcpStream,
    conn: Conn,
    idle: Option<&Arc<IdleSweep>>,
) -> Relay<TunnelIn> {
    let mut relay = Relay::new(TunnelIn(Box::new(TunnelCopy::new(app, tunnel))), conn);
    relay.record.idle = idle.map(IdleSweep::watch);
    relay
}

/// What a relay copies with: the totals are `[to destination, to source]`.
pub trait Copier: Unpin {
    /// Bytes moved so far, `[to destination, to source]`.
    fn totals(&self) -> [u64; 2];
    /// Copies until both directions have ended, or the first error.
    fn poll_copy(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Ends what moved past the copy (a same-node pairing); its bytes are in the totals from
    /// then on.
    fn end_direct(&mut self) {}
    /// Reads again what moved past the copy if the clock (`now`, in ticks) moved.
    fn read_direct(&mut self, _now: u32) {}
}

/// Two TCP sockets, the source's first: a same-node connection, or one to a destination outside
/// the mesh. Inline in its relay, and so in the task of every captured connection (spawned
/// before it knows where the connection goes): that sets the task's size.
impl Copier for Copy {
    /// With what the kernel sent past the copy, as of its last reading.
    fn totals(&self) -> [u64; 2] {
        match &self.direct {
            Some(direct) => {
                let [to_dst, to_src] = direct.seen();
                [self.totals[0] + to_dst, self.totals[1] + to_src]
            }
            None => self.totals,
        }
    }

    fn poll_copy(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll(cx).map_ok(drop)
    }

    fn end_direct(&mut self) {
        if let Some(direct) = self.direct.as_mut() {
            direct.take();
        }
    }

    fn read_direct(&mut self, now: u32) {
        if let Some(direct) = self.direct.as_mut() {
            direct.read(now);
        }
    }
}

/// A captured connection's tunnel to another node: the client's socket, then the HBONE stream.
/// Boxed, so that the relay is small and runs in a task of its own (tokio's 256-byte cell
/// instead of a captured connection's 384; unit-tested): the captured connection's task ends
/// once it has opened the tunnel.
#[derive(Debug)]
pub struct TunnelOut(Box<TunnelCopy>);

impl Copier for TunnelOut {
    fn totals(&self) -> [u64; 2] {
        self.0.totals()
    }

    fn poll_copy(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll(cx).map_ok(drop)
    }
}

/// An HBONE stream accepted by this agent, toward the application. The destination knows a
/// tunnel's kind before it spawns its task, which holds this box (tokio's 256-byte cell, as for
/// [`TunnelOut`]).
#[derive(Debug)]
pub struct TunnelIn(Box<TunnelCopy>);

impl Copier for TunnelIn {
    fn totals(&self) -> [u64; 2] {
        // The copy's first stream is the application's: its totals run the other way.
        let [to_tunnel, to_app] = self.0.totals();
        [to_app, to_tunnel]
    }

    fn poll_copy(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll(cx).map_ok(drop)
    }
}

/// A connection about to be relayed: its description, where it is counted, and (at the
/// destination's agent) its authorization, which a policy change may revoke.
#[derive(Debug)]
pub struct Conn {
    pub info: ConnInfo,
    pub started: Instant,
    pub telemetry: Arc<Telemetry>,
    pub tracked: Option<Arc<Tracked>>,
}

/// See [`relay`].
///
/// Kept under 216 bytes, so that a connection's task (this, its span and tokio's task header)
/// fits tokio's 384-byte task cell (cells are 128-byte aligned; at 280 bytes it took 512):
/// what is only read at the end, or rarely, lives in the boxed [`Record`], itself kept within
/// jemalloc's 320-byte class (both unit-tested).
#[derive(Debug)]
pub struct Relay<C = Copy> {
    copy: C,
    record: Box<Record>,
    counters: Counters,
    /// Bytes already added to the counters, `[to destination, to source]`.
    counted: [u64; 2],
}

/// The boxed part of a [`Relay`].
#[derive(Debug)]
struct Record {
    conn: Conn,
    /// The application's view of its peer, removed when the connection ends.
    guard: Option<PeerGuard>,
    /// Tunnels: closed after moving nothing for a while. A paired same-node connection: its
    /// place on the clock that has it read the kernel's count (never expires).
    idle: Option<IdleWatch>,
}

impl<C: Copier> Relay<C> {
    fn new(copy: C, conn: Conn) -> Self {
        let counters = conn.telemetry.open(&conn.info);
        Self {
            copy,
            record: Box::new(Record {
                conn,
                guard: None,
                idle: None,
            }),
            counters,
            counted: [0; 2],
        }
    }

    /// Keeps `guard` until the connection ends.
    pub(super) fn holding(mut self, guard: PeerGuard) -> Self {
        self.record.guard = Some(guard);
        self
    }

    /// Ends a same-node pairing (its last counts join the totals) and counts: the final
    /// totals.
    fn finish(&mut self) -> [u64; 2] {
        self.copy.end_direct();
        self.count().0
    }

    /// Adds the bytes moved since the last call to the metrics; the totals, and whether any
    /// moved.
    fn count(&mut self) -> ([u64; 2], bool) {
        let totals = self.copy.totals();
        let counted = &mut self.counted;
        let delta = [totals[0] - counted[0], totals[1] - counted[1]];
        let moved = delta != [0, 0];
        if moved {
            self.counters.add_bytes(delta[0], delta[1]);
            *counted = totals;
        }
        (totals, moved)
    }
}

impl Relay<Copy> {
    /// The applications of this same-node connection talk straight to each other from now on,
    /// while neither leg holds a byte of theirs (`paired`, written to the kernel before the relay
    /// reads anything); the relay moves the rest by peeking, so that a byte it holds stays on
    /// its socket's queue until written on, where the kernel sees it.
    /// `tick`: the clock on which it looks at what the kernel sent straight across, so that a
    /// long connection's bytes show in the metrics while it runs.
    pub(super) fn paired(mut self, paired: Box<Paired>, tick: &Arc<IdleSweep>) -> Self {
        self.copy.direct = Some(paired);
        self.record.idle = Some(tick.watch());
        self
    }
}

impl<C: Copier> Future for Relay<C> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let tracked = this.record.conn.tracked.as_ref();
        if let Some(revoked) = tracked
            .filter(|t| t.poll_revoked(cx))
            .map(|t| t.revoked_by())
        {
            let totals = this.finish();
            let c = &this.record.conn;
            c.telemetry.close(
                &c.info,
                &this.counters,
                c.started,
                totals,
                &Ok(()),
                revoked.as_ref(),
            );
            // Dropping the relay closes both sides.
            return Poll::Ready(());
        }
        let result = this.copy.poll_copy(cx);
        if let Some(idle) = this.record.idle.as_ref() {
            this.copy.read_direct(idle.now());
        }
        let (_, moved) = this.count();
        let idle_for = match (&result, this.record.idle.as_mut()) {
            (Poll::Pending, Some(idle)) => idle.expired(moved, cx).then(|| idle.timeout()),
            _ => None,
        };
        let result = match idle_for {
            Some(timeout) => {
                this.record
                    .conn
                    .telemetry
                    .metrics
                    .agent
                    .tunnels_idle_closed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("idle for {timeout:?}: no byte moved either way"),
                ))
            }
            None => ready!(result),
        };
        let totals = this.finish();
        let c = &this.record.conn;
        c.telemetry
            .close(&c.info, &this.counters, c.started, totals, &result, None);
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpStream;

    use super::super::copy_tests::{half_close_exchange, pair};
    use super::Copy;

    /// client <-> down [Copy] up <-> server.
    async fn through_copy() -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<std::io::Result<(u64, u64)>>,
    ) {
        let (client, down) = pair().await;
        let (up, server) = pair().await;
        let copy = tokio::spawn(Copy::new(down, up));
        (client, server, copy)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_directions_are_byte_exact_and_half_close_passes_through() {
        let (client, mut server, copy) = through_copy().await;
        let (request, response) = (3 * 1024 * 1024 + 17, 1024 * 1024 + 3);
        half_close_exchange(client, &mut server, request, response).await;
        let (sent, received) = copy.await.unwrap().unwrap();
        assert_eq!((sent, received), (request as u64, response as u64));
    }

    #[tokio::test]
    async fn a_reset_ends_the_copy_with_an_error() {
        let (client, server, copy) = through_copy().await;
        // Linger 0: closing sends RST instead of FIN.
        server.set_zero_linger().unwrap();
        drop(server);
        let result = copy.await.unwrap();
        assert!(result.is_err(), "expected an error, got {result:?}");
        drop(client);
    }

    #[test]
    fn a_connections_task_fits_tokios_384_byte_cell() {
        // The relay plus its span (40 bytes) and the task's header, scheduler handle, id and
        // trailer (about 112 bytes) must stay within 384.
        let size = size_of::<super::Relay>();
        assert!(size <= 216, "Relay is {size} bytes");
        // Its boxed record (with a tunnel's idle watch) stays in jemalloc's 320-byte class.
        let size = size_of::<super::Record>();
        assert!(size <= 320, "Record is {size} bytes");
    }

    #[tokio::test]
    async fn the_per_connection_copy_state_is_small() {
        let (_client, _server, copy) = through_copy().await;
        // Size of the state an open connection keeps (excluding the sockets' kernel buffers).
        let size = size_of::<Copy>();
        assert!(size <= 256, "Copy is {size} bytes");
        copy.abort();
    }
}
