//! Requests to endpoints: over HBONE to a meshed endpoint's agent (one CONNECT stream per
//! request on pooled, multiplexed HTTP/2 connections, mutual TLS as the waypoint, the endpoint's
//! identity required), in plain TCP to an endpoint outside the mesh; then HTTP/1.1 or HTTP/2 on
//! that stream, as the request came.

mod reuse;

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    Request, Response,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_cluster::{k8s::ConnectionPool, Endpoint};
use mesh_common::HBONE_PORT;
use mesh_hbone::{
    idle::{IdleSweep, IdleWatch},
    Connect, OutboundRequest, Pool, PoolConfig,
};
use mesh_identity::{CertManager, CryptoProvider, Identity};
use mesh_trace::{TraceContext, TRACEPARENT};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{client::TlsStream, TlsConnector};

use tracing::{debug, info};

use crate::{
    body::Body,
    breaker::{Breaker, H2Place},
};
use reuse::Reuse;

/// How often kept connections to endpoints are looked over, to let go of those unused for
/// [`reuse::KEPT_IDLE`].
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// How long the waypoint waits for its own certificate before a connection fails.
const CERT_WAIT: Duration = Duration::from_secs(10);

/// How long a TCP connect to an endpoint outside the mesh may take (Istio's default
/// `connectTimeout`, and the HBONE pool's): an endpoint that drops the handshake fails the
/// attempt instead of holding it for the kernel's two minutes of retries.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request did not get a response from the endpoint.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// Nothing was sent: the endpoint (or its agent) could not be reached, or refused the
    /// tunnel. Safe to try another endpoint.
    #[error("could not reach {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    /// A TCP tunnel's relay failed.
    #[error("relay with {addr} failed: {source}")]
    Relay { addr: SocketAddr, source: io::Error },
    /// A TCP tunnel reached its `maxConnectionDuration`.
    #[error("tunnel to {addr} ended at its maxConnectionDuration ({limit:?})")]
    Lasted { addr: SocketAddr, limit: Duration },
    /// Nothing was sent: every HTTP/2 connection to the endpoint was full, the destination's
    /// `maxConnections` were open and `http1MaxPendingRequests` requests waited already.
    #[error("{0}")]
    Overflow(crate::breaker::Overflow),
    /// The exchange failed after the request was (maybe) sent.
    #[error("request to {addr} failed: {source}")]
    Http {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

/// What pooled HBONE connections are keyed by: the endpoint's identity and its HBONE address.
pub(crate) type Key = (Identity, SocketAddr);

/// Opens HBONE connections as the waypoint.
pub(crate) struct Connector {
    certs: Arc<CertManager>,
    provider: CryptoProvider,
    own: Identity,
}

impl Connect for Connector {
    type Io = TlsStream<TcpStream>;
    type Key = Key;

    async fn connect(&self, (peer, addr): &Key) -> io::Result<Self::Io> {
        self.certs
            .wait_for(&self.own, CERT_WAIT)
            .await
            .map_err(io::Error::other)?;
        let config = mesh_identity::client_config(
            self.provider,
            self.certs.subscribe(),
            self.own.clone(),
            peer.clone(),
        )
        .map_err(io::Error::other)?;
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        // No SNI: the server is authenticated by its SPIFFE id.
        let name = ServerName::try_from("hbone.mesh.invalid").map_err(io::Error::other)?;
        TlsConnector::from(config).connect(name, tcp).await
    }
}

/// The waypoint's way to endpoints: HBONE tunnels from the pool, and the HTTP connections on
/// them kept for the next requests.
pub(crate) struct Upstream {
    pool: Pool<Connector>,
    reuse: Reuse,
    /// The idle clock of relayed connections (TCP passed through, upgraded ones).
    idle: Arc<IdleSweep>,
    /// The idle clocks of destinations with their own `tcp.idleTimeout`, by timeout.
    idle_clocks: std::sync::Mutex<std::collections::HashMap<Duration, Arc<IdleSweep>>>,
}

impl Upstream {
    pub(crate) fn new(certs: Arc<CertManager>, provider: CryptoProvider, own: Identity) -> Self {
        let connector = Connector {
            certs,
            provider,
            own,
        };
        Self {
            pool: Pool::new(connector, PoolConfig::default()),
            reuse: Reuse::default(),
            idle: crate::relay::sweep(),
            idle_clocks: std::sync::Mutex::default(),
        }
    }

    /// A byte stream to `endpoint` (address `addr`, of the Service `host`) for `client`: an
    /// HBONE tunnel to a meshed endpoint's agent (its CONNECT carrying `trace`, the span that
    /// opens it), plain TCP to any other; within the destination's `connectTimeout`.
    async fn connect(
        &self,
        endpoint: &Endpoint,
        (addr, host): (SocketAddr, &str),
        (client, trace): (SocketAddr, Option<TraceContext>),
        pool: Option<&ConnectionPool>,
    ) -> Result<UpStream, UpstreamError> {
        let connect_error = |reason: String| UpstreamError::Connect { addr, reason };
        let limit = pool
            .and_then(|p| p.connect_timeout)
            .unwrap_or(CONNECT_TIMEOUT);
        let late = || connect_error(format!("no answer within {limit:?} (connectTimeout)"));
        let Some(workload) = endpoint.workload.as_deref().filter(|w| w.is_meshed()) else {
            let tcp = tokio::time::timeout(limit, TcpStream::connect(addr))
                .await
                .map_err(|_| late())?
                .map_err(|e| connect_error(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            if let Some(keepalive) = pool.and_then(|p| p.tcp_keepalive.as_ref()) {
                keep_alive(&tcp, keepalive).map_err(|e| connect_error(e.to_string()))?;
            }
            return Ok(UpStream::Tcp(tcp));
        };
        let key = (
            workload.identity.clone(),
            SocketAddr::new(addr.ip(), HBONE_PORT),
        );
        let mut tunnel = OutboundRequest::new(addr)
            .with_forwarded_for(client)
            .with_forwarded_host(host.to_owned());
        if let Some(trace) = trace {
            tunnel = tunnel.with_header(TRACEPARENT, trace.header_value());
        }
        let stream = tokio::time::timeout(limit, self.pool.open(&key, tunnel))
            .await
            .map_err(|_| late())?
            .map_err(|e| connect_error(e.to_string()))?;
        debug!(%addr, peer = %workload.identity, "HBONE stream to the endpoint");
        Ok(UpStream::Hbone(stream))
    }

    /// Runs the timers, until the task is aborted: every [`SWEEP_INTERVAL`] it lets go of the
    /// kept connections unused for [`reuse::KEPT_IDLE`] (and those that closed), and it runs
    /// the relays' idle clock.
    pub(crate) fn sweep_on_a_timer(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let upstream = Arc::clone(self);
        let kept = async move {
            let mut every = tokio::time::interval(SWEEP_INTERVAL);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                upstream.reuse.sweep();
            }
        };
        let idle = Arc::clone(&self.idle).run();
        tokio::spawn(async move {
            tokio::join!(kept, idle);
        })
    }

    /// Lets go of the kept connections opened under `connectionPool` settings the view
    /// `state` no longer gives any destination ([`Reuse::retire`]).
    pub(crate) fn retire_changed_settings(&self, state: &mesh_cluster::ClusterState) {
        let retired = self.reuse.retire(&state.connection_pools());
        if retired > 0 {
            info!(
                retired,
                generation = state.generation(),
                "connections kept under changed connectionPool settings let go"
            );
        }
    }

    /// A place on the relays' idle clock, for a connection relayed from now on.
    pub(crate) fn idle_watch(&self) -> IdleWatch {
        self.idle.watch()
    }

    /// Sends `request` to `endpoint` (address `addr`, of the Service `host`) for `client`, on a
    /// kept connection when one is ready (a request it could not take goes on a new one), else
    /// on a new connection, kept afterwards as the destination's `pool` allows. An upgrade
    /// (WebSocket) always gets a connection of its own. `breaker`: the destination's counts,
    /// when its `pool` limits any (the HTTP/2 connections opened are among its
    /// `maxConnections`).
    pub(crate) async fn send(
        &self,
        endpoint: &Endpoint,
        (addr, host): (SocketAddr, &str),
        client: SocketAddr,
        mut request: Request<Body>,
        (pool, breaker): (Option<&Arc<ConnectionPool>>, Option<&Breaker>),
    ) -> Result<Response<Body>, UpstreamError> {
        let http = |source| UpstreamError::Http { addr, source };
        let identity = endpoint
            .workload
            .as_deref()
            .filter(|w| w.is_meshed())
            .map(|w| w.identity.clone());
        // Connections are kept by destination settings too: a destination's limits never apply
        // to another's connections.
        let key = (addr, identity, pool.cloned());
        let asked = request.version();
        let h2 = multiplexed(&request, pool.map(AsRef::as_ref));
        if h2 && asked != http::Version::HTTP_2 {
            upgrade_to_h2(&mut request);
        }
        let to = (endpoint, addr, host);
        if h2 {
            return self
                .send_h2(to, client, request, (key, asked, breaker))
                .await;
        }
        let upgrade = request.headers().contains_key(http::header::UPGRADE);
        if !upgrade {
            while let Some(mut kept) = self.reuse.h1(&key) {
                match kept.sender.try_send_request(request).await {
                    Ok(response) => {
                        self.reuse.keep_h1(key, kept);
                        return Ok(response.map(http_body_util::BodyExt::boxed));
                    }
                    Err(mut e) => match e.take_message() {
                        Some(unsent) => request = unsent,
                        None => return Err(http(e.into_error())),
                    },
                }
            }
        }
        let io = self.open(to, client, &request, key.2.as_deref()).await?;
        let (mut sender, connection) = http1::handshake(io).await.map_err(http)?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                debug!(error = %e, "HTTP/1.1 connection to the endpoint ended");
            }
        });
        let response = sender.send_request(request).await.map_err(http)?;
        if !upgrade {
            self.reuse.keep_h1(key, reuse::Kept::new(sender));
        }
        Ok(response.map(http_body_util::BodyExt::boxed))
    }

    /// [`Self::send`] over HTTP/2: on a kept connection with room, else on a new one. A new one
    /// is opened by one request at a time per endpoint, so that requests that come together
    /// share it (as Envoy's pool has pending requests wait for the connection it opens), up to
    /// the destination's `maxConcurrentStreams`, and, past it, within its `maxConnections`
    /// (else waiting for room, as one of its `http1MaxPendingRequests`).
    async fn send_h2(
        &self,
        (endpoint, addr, host): (&Endpoint, SocketAddr, &str),
        client: SocketAddr,
        mut request: Request<Body>,
        (key, asked, breaker): (reuse::EndpointKey, http::Version, Option<&Breaker>),
    ) -> Result<Response<Body>, UpstreamError> {
        let http = |source| UpstreamError::Http { addr, source };
        let mut opening = None;
        // The new connection's place among the destination's connections, once taken.
        let mut limited = None;
        loop {
            if let Some((mut sender, stream)) = self.reuse.h2(&key) {
                match sender.try_send_request(request).await {
                    Ok(response) => return Ok(counted(as_asked(response, asked), stream)),
                    Err(mut e) => match e.take_message() {
                        // It closed meanwhile.
                        Some(unsent) => request = unsent,
                        None => return Err(http(e.into_error())),
                    },
                }
            }
            if opening.is_some() {
                break;
            }
            // No room: a new connection, within the destination's `maxConnections`, or room
            // on a kept one, waited for.
            if let (None, Some(breaker), Some(pool)) = (&limited, breaker, key.2.as_deref()) {
                let room = || self.reuse.has_room(&key);
                match breaker
                    .h2_connection(pool, addr, room)
                    .await
                    .map_err(UpstreamError::Overflow)?
                {
                    H2Place::Room => continue,
                    H2Place::Open(Some(slot)) => {
                        limited = Some(reuse::Limited {
                            slot,
                            room: breaker.room_signal(),
                        });
                    }
                    H2Place::Open(None) => {}
                }
            }
            // Then again once this request's turn to open one comes: another may have (or
            // failed to, while this one waited: then this one fails as well).
            let waited_since = tokio::time::Instant::now();
            let turn = self.reuse.opening(&key).lock_owned().await;
            if let Some((at, reason)) = turn.as_ref().filter(|(at, _)| *at > waited_since) {
                let reason = format!("{reason} (the connection opened {:?} ago)", at.elapsed());
                return Err(UpstreamError::Connect { addr, reason });
            }
            opening = Some(turn);
        }
        let pool = key.2.clone();
        let io = match self
            .open((endpoint, addr, host), client, &request, pool.as_deref())
            .await
        {
            Ok(io) => io,
            Err(e) => {
                if let (Some(turn), UpstreamError::Connect { reason, .. }) = (opening.as_mut(), &e)
                {
                    **turn = Some((tokio::time::Instant::now(), reason.clone()));
                }
                return Err(e);
            }
        };
        let mut builder = http2::Builder::new(TokioExecutor::new());
        if let Some(ping) = pool.as_deref().and_then(|p| p.http2_keepalive.as_ref()) {
            builder
                .timer(TokioTimer::new())
                .keep_alive_interval(ping.interval)
                .keep_alive_timeout(ping.timeout)
                .keep_alive_while_idle(true);
        }
        let (mut sender, connection) = builder.handshake(io).await.map_err(http)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "HTTP/2 connection to the endpoint ended");
            }
        });
        let stream = self.reuse.keep_h2(key, sender.clone(), limited);
        drop(opening);
        let response = sender.send_request(request).await.map_err(http)?;
        Ok(counted(as_asked(response, asked), stream))
    }

    /// A new connection to the endpoint for `request`, whose tunnel is traced as the request.
    async fn open(
        &self,
        (endpoint, addr, host): (&Endpoint, SocketAddr, &str),
        client: SocketAddr,
        request: &Request<Body>,
        pool: Option<&ConnectionPool>,
    ) -> Result<TokioIo<UpStream>, UpstreamError> {
        let trace = TraceContext::from_headers(request.headers());
        let stream = self
            .connect(endpoint, (addr, host), (client, trace), pool)
            .await?;
        Ok(TokioIo::new(stream))
    }

    /// Relays `down`'s bytes to `endpoint` and back (a tunnel that is not HTTP) for `client`,
    /// telling `reached` whether the endpoint could be reached (for outlier detection),
    /// in the trace of the tunnel it came in (`trace`), within the destination's `pool`
    /// (its `connectTimeout`, `idleTimeout` and `maxConnectionDuration`); returns the bytes
    /// sent and received.
    pub(crate) async fn relay<D>(
        &self,
        endpoint: &Endpoint,
        to: (SocketAddr, &str),
        client: (SocketAddr, Option<TraceContext>),
        down: &mut D,
        (pool, reached): (Option<&ConnectionPool>, impl FnOnce(bool)),
    ) -> Result<(u64, u64), UpstreamError>
    where
        D: AsyncRead + AsyncWrite + Unpin,
    {
        let addr = to.0;
        let mut up = match self.connect(endpoint, to, client, pool).await {
            Ok(up) => {
                reached(true);
                up
            }
            Err(e) => {
                reached(false);
                return Err(e);
            }
        };
        let idle = match pool.and_then(|p| p.tcp_idle_timeout) {
            None => Some(self.idle.watch()),
            Some(Duration::ZERO) => None,
            Some(timeout) => Some(self.idle_for(timeout)),
        };
        let relayed = async {
            match idle {
                Some(idle) => crate::relay::relay(down, &mut up, idle).await,
                None => tokio::io::copy_bidirectional(down, &mut up).await,
            }
        };
        let relayed = match pool.and_then(|p| p.max_connection_duration) {
            Some(limit) => tokio::time::timeout(limit, relayed)
                .await
                .map_err(|_| UpstreamError::Lasted { addr, limit })?,
            None => relayed.await,
        };
        relayed.map_err(|source| UpstreamError::Relay { addr, source })
    }

    /// A place on the idle clock of `timeout` (a destination's `tcp.idleTimeout`), the clock
    /// started when it is the first for that time.
    fn idle_for(&self, timeout: Duration) -> IdleWatch {
        let mut clocks = self
            .idle_clocks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let clock = clocks.entry(timeout).or_insert_with(|| {
            let clock = IdleSweep::new(timeout);
            tokio::spawn(Arc::clone(&clock).run());
            clock
        });
        clock.watch()
    }
}

/// Whether `request` goes to its endpoint multiplexed on HTTP/2: an HTTP/2 request, or an
/// HTTP/1.1 one the destination's `h2UpgradePolicy: UPGRADE` upgrades (not a WebSocket).
pub(crate) fn multiplexed<B>(request: &Request<B>, pool: Option<&ConnectionPool>) -> bool {
    request.version() == http::Version::HTTP_2
        || (pool.is_some_and(|p| p.h2_upgrade)
            && !request.headers().contains_key(http::header::UPGRADE))
}

/// An HTTP/1.1 request as HTTP/2: its `Host` as `:authority`, scheme `http`. One without a
/// `Host` keeps its version and relative URI, which h2 sends as a forwarded HTTP/1.1 request
/// (scheme `http`, no `:authority`).
fn upgrade_to_h2(request: &mut Request<Body>) {
    let host = request
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok());
    if let Some(authority) = host.or_else(|| request.uri().authority().cloned()) {
        let mut parts = request.uri().clone().into_parts();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(authority);
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *request.uri_mut() = uri;
            request.headers_mut().remove(http::header::HOST);
            *request.version_mut() = http::Version::HTTP_2;
        }
    }
}

/// `response` with its body, holding `stream` (its place on an HTTP/2 connection with a cap)
/// until the body's end.
fn counted(response: Response<Incoming>, stream: Option<reuse::Stream>) -> Response<Body> {
    let response = response.map(http_body_util::BodyExt::boxed);
    match stream {
        Some(stream) => response.map(|body| crate::body::hold(body, stream)),
        None => response,
    }
}

/// `response` in the version its request was asked in (an upgraded request's answer goes back
/// as HTTP/1.1).
fn as_asked<B>(mut response: Response<B>, asked: http::Version) -> Response<B> {
    *response.version_mut() = asked;
    response
}

/// Turns on TCP keep-alive on `tcp` as `keepalive` says (the kernel's defaults for what it
/// leaves out).
fn keep_alive(tcp: &TcpStream, keepalive: &mesh_cluster::k8s::TcpKeepalive) -> io::Result<()> {
    let mut params = socket2::TcpKeepalive::new();
    if let Some(time) = keepalive.time {
        params = params.with_time(time);
    }
    if let Some(interval) = keepalive.interval {
        params = params.with_interval(interval);
    }
    if let Some(probes) = keepalive.probes {
        params = params.with_retries(probes);
    }
    socket2::SockRef::from(tcp).set_tcp_keepalive(&params)
}

/// A byte stream to an endpoint.
enum UpStream {
    Hbone(mesh_hbone::H2Stream),
    Tcp(TcpStream),
}

/// Calls `$method` on whichever stream it is.
macro_rules! delegate {
    ($self:ident, $method:ident ( $($arg:expr),* )) => {
        match $self.get_mut() {
            UpStream::Hbone(s) => Pin::new(s).$method($($arg),*),
            UpStream::Tcp(s) => Pin::new(s).$method($($arg),*),
        }
    };
}

impl AsyncRead for UpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, poll_read(cx, buf))
    }
}

impl AsyncWrite for UpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests;
