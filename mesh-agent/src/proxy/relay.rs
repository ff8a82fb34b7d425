//! Copying between a downstream and an upstream connection, both directions at once, with
//! half-close passed through (EOF on one side shuts down the other's write side, and the other
//! direction keeps flowing), and one log line per connection when it ends.
//!
//! An idle connection holds no copy buffer: each direction waits for its socket to become
//! readable, then borrows a buffer from a shared pool for one read and the writes that follow,
//! and gives it back. Memory therefore grows with the connections that are moving bytes, not
//! with the connections that are open.

use std::{io, net::SocketAddr, sync::Mutex, time::Instant};

use tokio::{
    io::AsyncWriteExt as _,
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
};
use tracing::{info, warn};

/// Size of one copy buffer. Large enough that a bulk transfer needs few system calls.
const BUF: usize = 64 * 1024;
/// Buffers kept for reuse; more are allocated (and freed) under a burst of busy connections.
const POOL_MAX: usize = 64;

static POOL: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

fn take_buffer() -> Box<[u8]> {
    POOL.lock()
        .ok()
        .and_then(|mut p| p.pop())
        .unwrap_or_else(|| vec![0; BUF].into_boxed_slice())
}

fn give_back(buf: Box<[u8]>) {
    if let Ok(mut p) = POOL.lock() {
        if p.len() < POOL_MAX {
            p.push(buf);
        }
    }
}

/// Copies `from` to `to` until EOF, then shuts down `to`'s write side. Returns the bytes moved.
async fn pump(from: OwnedReadHalf, mut to: OwnedWriteHalf) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        from.readable().await?;
        let mut buf = take_buffer();
        let read = from.try_read(&mut buf);
        let result = match read {
            Ok(0) => {
                give_back(buf);
                to.shutdown().await?;
                return Ok(total);
            }
            Ok(n) => to.write_all(&buf[..n]).await.map(|()| n),
            // Readiness was spurious; wait again.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        };
        give_back(buf);
        total += result? as u64;
    }
}

/// Both directions at once; the first error ends both.
async fn copy_both(down: TcpStream, up: TcpStream) -> io::Result<(u64, u64)> {
    let (down_read, down_write) = down.into_split();
    let (up_read, up_write) = up.into_split();
    tokio::try_join!(pump(down_read, up_write), pump(up_read, down_write))
}

/// Who is talking to whom, for the connection's log line.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub direction: &'static str,
    pub pod: String,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub upstream: SocketAddr,
    pub service: Option<String>,
}

/// Relays until both directions have ended, then logs the connection.
pub async fn relay(down: TcpStream, up: TcpStream, info: ConnInfo, started: Instant) {
    let result = copy_both(down, up).await;
    let duration_ms = started.elapsed().as_millis();
    let service = info.service.as_deref().unwrap_or("");
    match result {
        Ok((sent, received)) => info!(
            direction = info.direction,
            pod = %info.pod,
            src = %info.src,
            dst = %info.dst,
            upstream = %info.upstream,
            service,
            bytes_sent = sent,
            bytes_received = received,
            duration_ms,
            "connection closed"
        ),
        Err(e) => warn!(
            direction = info.direction,
            pod = %info.pod,
            src = %info.src,
            dst = %info.dst,
            upstream = %info.upstream,
            service,
            duration_ms,
            error = %e,
            "connection failed"
        ),
    }
}
