//! HBONE: TCP tunnelled as HTTP/2 CONNECT streams between node agents, as Istio ambient's
//! ztunnel does it.
//!
//! In the mesh, the source node's agent opens (or reuses) a mutual-TLS 1.3 connection to port
//! 15008 of the destination pod and sends, per proxied TCP connection, one HTTP/2 `CONNECT`
//! request whose `:authority` is the original destination `ip:port`. A `200` answer turns the
//! stream into a byte pipe: DATA frames carry the bytes both ways, `END_STREAM` half-closes one
//! direction, `RST_STREAM` aborts. Many tunnels share one connection.
//!
//! This crate is the HTTP/2 part only and transport-agnostic: it runs over any
//! `AsyncRead + AsyncWrite + Unpin + Send + 'static` byte stream. TLS, identities and policy
//! are the caller's (the pool's [`Connect`] implementation does TCP + TLS; the server's
//! [`Handler`] decides and answers).
//!
//! * [`H2Stream`]: one tunnel as `AsyncRead + AsyncWrite`, flow-controlled both ways.
//! * [`serve_connection`]: the server side of one connection, each CONNECT in its own task.
//! * [`Pool`]: the client side, connections pooled per key.
//!
//! # Wire format (as ztunnel sends it)
//!
//! * Request: `:method CONNECT`, `:authority <ip>:<port>` (IPv6 in brackets), no `:scheme` or
//!   `:path`; `baggage` when given, `forwarded: for="<ip>:<port>"` (IPv6 bracketed, quoted)
//!   when given, any further headers such as `traceparent` as given.
//! * Response: `200` then raw bytes; `401` when policy denies (the handler's choice), `400` for
//!   a non-CONNECT request or an `:authority` that is not `ip:port` (answered by the server
//!   without the handler), `503` when the target cannot be reached (and whenever a handler drops
//!   its [`Responder`] unanswered). Non-200 answers reach the client as
//!   [`HboneError::Status`].
//!
//! # ztunnel behaviours matched
//!
//! * HTTP/2 settings: initial stream window 4 MiB, connection window 16 MiB, max frame size
//!   1 MiB; server `SETTINGS_MAX_CONCURRENT_STREAMS` 200, header list 64 KiB, send buffer
//!   400 KiB; client header list 16 KiB, send buffer 4 MiB, push disabled.
//! * Keepalive: a PING every 10 s, the connection dropped when one goes unanswered for 20 s,
//!   on both sides.
//! * Pool: connections without streams closed after 5 minutes, concurrent requests for a key
//!   share a connection being established instead of each opening one, failed and closed
//!   connections leave the pool.
//!
//! # Differences from ztunnel
//!
//! * **Streams per connection**: at most 128 (ztunnel: 100), further bounded by the server's
//!   `SETTINGS_MAX_CONCURRENT_STREAMS`. h2 keeps a connection's streams in a slab that grows by
//!   doubling, so 100 streams already pay for 128 slots (356 bytes each with h2 0.4); at 128
//!   none is unused and each connection's own memory is shared by more streams.
//! * **Connection establishment per key**: ztunnel establishes one connection per key at a
//!   time (a per-key lock) and stops reusing a connection that reached its stream limit. Here a
//!   connection being established takes waiting requests up to its stream limit, the next
//!   request starts the next connection in parallel (1,000 simultaneous requests with a limit
//!   of 128 open 8 connections at once), and a full connection is reused as soon as a stream
//!   on it ends.
//! * **Idle timeout** counts from the moment a connection's last stream ended (ztunnel: from
//!   the last time the connection was handed out or returned).
//! * **Retries**: ztunnel checks a pooled connection's readiness when handing it out. Here a
//!   request that failed before the server could act on it (the connection closed or sent
//!   GOAWAY first, or the stream was refused) is retried once on another connection, and the
//!   failed connection leaves the pool.
//! * **Server stream limit**: the pool reads the server's `SETTINGS_MAX_CONCURRENT_STREAMS`
//!   whenever it picks a connection. Requests that joined a connection while it was being
//!   established, before that setting arrived, may exceed it; h2 then holds them until a stream
//!   on that connection ends (the limit is never exceeded on the wire).
//! * **No response timeout**: [`Pool::open`] waits for the server's answer as long as the
//!   connection is alive (keepalive bounds a dead peer); callers wanting a bound wrap it in a
//!   timeout.
//! * **Handshake deadline**: the server sends its first PING right after the preface and
//!   requires the answer within the handshake timeout (default 10 s), so a peer that stops in
//!   the middle of the preface or its SETTINGS is cut off; ztunnel sends its first PING only
//!   after 10 s.
//! * **Flow control**: receive capacity is given back for the bytes the reader has consumed;
//!   ztunnel gives it back when a DATA frame is handed to its copy loop (which holds at most
//!   one frame).
//! * **Resets on read**: `RST_STREAM(NO_ERROR)` reads as end-of-file like ztunnel, but
//!   `CANCEL` (the peer dropped its stream) is an error here, where ztunnel reads it as
//!   end-of-file; so a tunnel cut short is never mistaken for a complete one.
//! * **Small-DATA-frame budget**: h2's default budget (half the connection window) is kept;
//!   ztunnel disables it.
//! * Not here: drain/graceful shutdown of a server connection, certificate revocation and
//!   baggage parsing (the caller's; `baggage` is passed through as a string), response baggage,
//!   metrics beyond the pool's counters.

#![forbid(unsafe_code)]

mod early;
mod error;
pub mod idle;
mod keepalive;
mod pool;
mod request;
mod server;
mod stream;

pub use early::{EarlyData, NoEarlyData, EARLY_LIMIT};
pub use error::HboneError;
pub use pool::{Connect, Pool, PoolConfig, DEFAULT_MAX_STREAMS};
pub use request::{InboundRequest, OutboundRequest, BAGGAGE, FORWARDED, TRACEPARENT};
pub use server::{serve_connection, Handler, Responder, ServerConfig};
pub use stream::H2Stream;
