//! Copying between a downstream and an upstream connection, both directions at once, with
//! half-close passed through (EOF on one side shuts down the other's write side, and the other
//! direction keeps flowing), and one log line per connection when it ends.

use std::{net::SocketAddr, time::Instant};

use tokio::{io::copy_bidirectional_with_sizes, net::TcpStream};
use tracing::{info, warn};

/// Per-direction copy buffer. Large enough that a bulk transfer needs few system calls.
const BUF: usize = 64 * 1024;

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
pub async fn relay(mut down: TcpStream, mut up: TcpStream, info: ConnInfo, started: Instant) {
    let result = copy_bidirectional_with_sizes(&mut down, &mut up, BUF, BUF).await;
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
