//! HTTP/2 PING keepalive, shared by the server and the client pool.

use std::time::Duration;

use h2::{Ping, PingPong};
use tokio::time::Instant;

use crate::error::HboneError;

/// When and how long to ping.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeepaliveConfig {
    /// Send the first PING at once and require its answer by this deadline (reported as a
    /// handshake timeout of the given length); `None` waits `interval` before the first PING.
    pub(crate) first_ping_deadline: Option<(Instant, Duration)>,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
}

/// Pings the peer forever; returns only when a PING goes unanswered in time.
///
/// A PING that fails because the connection itself ended never returns: the connection's own
/// future reports that.
pub(crate) async fn keepalive(ping: Option<PingPong>, config: KeepaliveConfig) -> HboneError {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    if let Some((deadline, handshake_timeout)) = config.first_ping_deadline {
        match tokio::time::timeout_at(deadline, ping.ping(Ping::opaque())).await {
            Err(_) => return HboneError::HandshakeTimeout(handshake_timeout),
            Ok(Err(_)) => return std::future::pending().await,
            Ok(Ok(_)) => tracing::trace!("first pong received"),
        }
    }
    loop {
        tokio::time::sleep(config.interval).await;
        match tokio::time::timeout(config.timeout, ping.ping(Ping::opaque())).await {
            Err(_) => return HboneError::KeepaliveTimeout(config.timeout),
            Ok(Err(_)) => return std::future::pending().await,
            Ok(Ok(_)) => tracing::trace!("pong received"),
        }
    }
}
