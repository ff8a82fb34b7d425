//! The crate's error type, shared by the server, the client pool and the stream setup.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

/// Everything that can go wrong while setting up or serving HBONE tunnels.
///
/// Errors on an established tunnel ([`crate::H2Stream`]) surface as [`std::io::Error`] from its
/// `AsyncRead`/`AsyncWrite` implementation instead.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    /// The caller's connector (TCP + TLS) failed.
    #[error("connecting to the HBONE peer failed: {0}")]
    Connect(#[source] io::Error),
    /// Connecting and the HTTP/2 handshake did not finish within the pool's connect timeout.
    #[error("connecting to the HBONE peer timed out after {0:?}")]
    ConnectTimeout(Duration),
    /// The HTTP/2 handshake failed (bad preface, broken SETTINGS, I/O error).
    #[error("HTTP/2 handshake failed: {0}")]
    Handshake(#[source] h2::Error),
    /// The peer did not complete the HTTP/2 handshake within the configured deadline.
    #[error("HTTP/2 handshake timed out after {0:?}")]
    HandshakeTimeout(Duration),
    /// An HTTP/2 protocol, stream or I/O error on an established connection.
    #[error("HTTP/2 error: {0}")]
    Http2(#[source] h2::Error),
    /// The peer stopped answering keepalive PINGs.
    #[error("HBONE peer did not answer a keepalive ping within {0:?}")]
    KeepaliveTimeout(Duration),
    /// The peer answered the CONNECT request with a status other than 200 (401: denied by
    /// policy, 400: bad request, 503: target unreachable, ...).
    #[error("HBONE peer answered {0}")]
    Status(StatusCode),
    /// Establishing the pooled connection this request was waiting for failed; the cause is
    /// shared by every request that waited for the same connection.
    #[error("establishing the pooled HBONE connection failed: {0}")]
    ConnectionFailed(#[source] Arc<HboneError>),
    /// The pooled connection closed before the request could be sent on it.
    #[error("the pooled HBONE connection closed before the request was sent")]
    ConnectionClosed,
    /// The CONNECT target could not be turned into an `:authority`.
    #[error("invalid CONNECT authority: {0}")]
    InvalidAuthority(#[from] http::uri::InvalidUri),
    /// A header value given for the CONNECT request is not a valid HTTP header value.
    #[error("invalid header value for {name}: {source}")]
    InvalidHeader {
        /// The header's name.
        name: &'static str,
        /// Why the value was refused.
        #[source]
        source: http::header::InvalidHeaderValue,
    },
    /// [`crate::Responder::reject`] was called with a status that is not an error status.
    #[error("cannot reject a CONNECT request with non-error status {0}")]
    NotAnErrorStatus(StatusCode),
}
