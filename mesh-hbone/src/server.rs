//! The HBONE server: HTTP/2 over one accepted (already TLS-terminated) connection, each CONNECT
//! stream handed to a handler in its own task.

use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::error::HboneError;
use crate::keepalive::{keepalive, KeepaliveConfig};
use crate::request::InboundRequest;
use crate::stream::H2Stream;

/// Server-side HTTP/2 settings. [`Default`] matches ztunnel's inbound (port 15008) listener.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// How long a new connection may take to send the HTTP/2 preface and answer the server's
    /// first PING (which proves its SETTINGS arrived). Default 10 s.
    pub handshake_timeout: Duration,
    /// `SETTINGS_INITIAL_WINDOW_SIZE`: per-stream receive window. Default 4 MiB.
    pub initial_stream_window: u32,
    /// Connection-level receive window. Default 16 MiB.
    pub initial_connection_window: u32,
    /// `SETTINGS_MAX_FRAME_SIZE`. Default 1 MiB.
    pub max_frame_size: u32,
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`. Default 200 (ztunnel's, from hyper).
    pub max_concurrent_streams: u32,
    /// `SETTINGS_MAX_HEADER_LIST_SIZE`. Default 64 KiB.
    pub max_header_list_size: u32,
    /// `SETTINGS_HEADER_TABLE_SIZE`: the HPACK dynamic table the peer may fill in this
    /// server's decoder. Default 0 (none). Each CONNECT carries values of its own (`forwarded`
    /// names the client's port), and a table entry keeps the whole read buffer it was decoded
    /// from alive; with a 4 KiB table, about 150 bytes per open tunnel stayed pinned that way
    /// (BENCHMARKS.md, "What an idle connection keeps"). A CONNECT's headers are a few dozen
    /// bytes once per tunnel: compressing them buys nothing.
    pub header_table_size: u32,
    /// Per-stream limit on data queued in h2 but not yet written to the transport. Default
    /// 400 KiB.
    pub max_send_buffer_size: usize,
    /// Interval between keepalive PINGs. Default 10 s.
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is closed. Default 20 s.
    pub keepalive_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            initial_stream_window: 4 * 1024 * 1024,
            initial_connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_concurrent_streams: 200,
            max_header_list_size: 64 * 1024,
            header_table_size: 0,
            max_send_buffer_size: 400 * 1024,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// Handles one well-formed CONNECT request. The future it returns is the stream's task, spawned
/// as it is: nothing of the request is held beside it (what the handler keeps of the request,
/// for as long as it keeps it, is all a tunnel costs besides its relay).
///
/// Implemented for every `Fn(InboundRequest, Responder) -> impl Future<Output = ()>` closure
/// that is `Send + Sync + 'static`.
pub trait Handler: Send + Sync + 'static {
    /// Decides on the request (policy, reaching the target) and answers it through `responder`.
    fn handle(
        &self,
        request: InboundRequest,
        responder: Responder,
    ) -> impl Future<Output = ()> + Send + 'static;
}

impl<F, Fut> Handler for F
where
    F: Fn(InboundRequest, Responder) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn handle(
        &self,
        request: InboundRequest,
        responder: Responder,
    ) -> impl Future<Output = ()> + Send + 'static {
        self(request, responder)
    }
}

/// The answer to one CONNECT request: [`accept`](Self::accept) (200 and the tunnel) or
/// [`reject`](Self::reject) (an error status).
///
/// **Dropping a `Responder` without answering sends `503 Service Unavailable`**, the status
/// ztunnel uses when the target cannot be reached, so a handler that fails or panics before
/// answering never leaves the client waiting.
pub struct Responder {
    inner: Option<(SendResponse<Bytes>, RecvStream)>,
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field(
                "stream_id",
                &self.inner.as_ref().map(|(s, _)| s.stream_id().as_u32()),
            )
            .finish()
    }
}

impl Responder {
    /// Sends `200 OK` and returns the tunnel.
    pub fn accept(mut self) -> Result<H2Stream, HboneError> {
        let Some((mut respond, recv)) = self.inner.take() else {
            return Err(HboneError::ConnectionClosed);
        };
        let send = respond
            .send_response(status_response(StatusCode::OK), false)
            .map_err(HboneError::Http2)?;
        Ok(H2Stream::new(send, recv, None))
    }

    /// Answers with `status` (for example 401 when policy denies, 503 when the target is
    /// unreachable) and ends the stream. `status` must be 4xx or 5xx; otherwise nothing is sent
    /// here and the dropped responder answers 503.
    pub fn reject(mut self, status: StatusCode) -> Result<(), HboneError> {
        if !(status.is_client_error() || status.is_server_error()) {
            return Err(HboneError::NotAnErrorStatus(status));
        }
        match self.inner.take() {
            Some((mut respond, _recv)) => respond
                .send_response(status_response(status), true)
                .map(drop)
                .map_err(HboneError::Http2),
            None => Err(HboneError::ConnectionClosed),
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some((mut respond, _recv)) = self.inner.take() {
            tracing::debug!(
                stream_id = respond.stream_id().as_u32(),
                "HBONE request dropped unanswered, sending 503"
            );
            if let Err(e) =
                respond.send_response(status_response(StatusCode::SERVICE_UNAVAILABLE), true)
            {
                tracing::debug!(error = %e, "sending 503 failed");
            }
        }
    }
}

fn status_response(status: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    response
}

/// Serves HBONE on one connection until the peer goes away or the connection fails.
///
/// `io` is the (TLS-terminated) byte stream. Every CONNECT stream whose `:authority` is an
/// `ip:port` goes to `handler` in its own task; other methods and malformed authorities get
/// `400 Bad Request` without reaching the handler. A peer that does not send the HTTP/2 preface
/// and answer the server's first PING within [`ServerConfig::handshake_timeout`] (garbage,
/// half-open connections) is dropped with [`HboneError::HandshakeTimeout`] or
/// [`HboneError::Handshake`]; one that later stops answering keepalive PINGs with
/// [`HboneError::KeepaliveTimeout`]. Returns `Ok(())` when the peer closed the connection
/// cleanly. Streams already handed to the handler may outlive the connection's end only to
/// observe its errors.
pub async fn serve_connection<IO, H>(
    io: IO,
    config: &ServerConfig,
    handler: H,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let deadline = Instant::now() + config.handshake_timeout;
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(config.initial_stream_window)
        .initial_connection_window_size(config.initial_connection_window)
        .max_frame_size(config.max_frame_size)
        .max_concurrent_streams(config.max_concurrent_streams)
        .max_header_list_size(config.max_header_list_size)
        .header_table_size(config.header_table_size)
        .max_send_buffer_size(config.max_send_buffer_size);
    let mut conn = match tokio::time::timeout_at(deadline, builder.handshake::<_, Bytes>(io)).await
    {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(HboneError::Handshake(e)),
        Err(_) => return Err(HboneError::HandshakeTimeout(config.handshake_timeout)),
    };

    let ping = conn.ping_pong();
    let mut pings = pin!(keepalive(
        ping,
        KeepaliveConfig {
            first_ping_deadline: Some((deadline, config.handshake_timeout)),
            interval: config.keepalive_interval,
            timeout: config.keepalive_timeout,
        },
    ));
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    if let Some(stream) = accept_stream(&handler, request, respond) {
                        tokio::spawn(stream);
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "HBONE connection failed");
                    return Err(HboneError::Http2(e));
                }
                None => {
                    tracing::debug!("HBONE connection closed by the peer");
                    return Ok(());
                }
            },
            err = &mut pings => {
                tracing::debug!(error = %err, "HBONE peer unresponsive, closing");
                conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                // Give the GOAWAY a moment to leave; the peer is not answering anyway.
                let closed = futures_util::future::poll_fn(|cx| conn.poll_closed(cx));
                let _ = tokio::time::timeout(Duration::from_secs(1), closed).await;
                return Err(err);
            }
        }
    }
}

/// Reads a request's HBONE fields and returns its handler's future; answers 400 (and returns
/// `None`) to anything but a CONNECT to `ip:port`.
fn accept_stream<H: Handler>(
    handler: &H,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) -> Option<impl Future<Output = ()> + Send + 'static + use<'_, H>> {
    let (parts, body) = request.into_parts();
    let stream_id = respond.stream_id().as_u32();
    let parsed = if parts.method == Method::CONNECT {
        InboundRequest::parse(&parts.uri, parts.headers)
    } else {
        None
    };
    let Some(inbound) = parsed else {
        tracing::debug!(
            stream_id,
            method = %parts.method,
            uri = %parts.uri,
            "not an HBONE CONNECT request, answering 400"
        );
        if let Err(e) = respond.send_response(status_response(StatusCode::BAD_REQUEST), true) {
            tracing::debug!(error = %e, "sending 400 failed");
        }
        return None;
    };
    tracing::debug!(
        stream_id,
        authority = %inbound.authority,
        forwarded_for = ?inbound.forwarded_for,
        "HBONE CONNECT"
    );
    let responder = Responder {
        inner: Some((respond, body)),
    };
    Some(handler.handle(inbound, responder))
}
