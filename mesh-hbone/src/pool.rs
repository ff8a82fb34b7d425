//! The HBONE client: HTTP/2 connections pooled per key, many CONNECT streams on each.
//!
//! Per key the pool keeps a list of connections, each either being established or ready, with
//! a count of the streams reserved on it (open streams plus requests on their way). A request
//! takes a slot on a ready connection below its limit, else on a connection still being
//! established below its limit (single flight: concurrent requests share one new connection
//! instead of opening their own), else it starts a new connection. The limit is
//! `max_streams_per_connection`, lowered to the server's `SETTINGS_MAX_CONCURRENT_STREAMS` once
//! known. Each connection has a driver task that establishes it, polls it, pings it, closes it
//! after `idle_timeout` without streams, and removes it from the pool when it ends.

use std::collections::HashMap;
use std::fmt;
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::io;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::{Connection, SendRequest};
use http::{Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Notify};

use crate::early::{Early, EarlyData, NoEarlyData};
use crate::error::HboneError;
use crate::keepalive::{keepalive, KeepaliveConfig};
use crate::request::OutboundRequest;
use crate::stream::H2Stream;

/// Opens the transport for a pooled connection: TCP to the peer's port 15008 and mutual TLS,
/// done by the caller. The pool runs HTTP/2 over whatever it returns.
pub trait Connect: Send + Sync + 'static {
    /// The connected (and TLS-wrapped) byte stream.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// What connections are pooled by: in the mesh, (source identity, destination identity,
    /// destination address:15008). Streams for equal keys share connections.
    type Key: Clone + Eq + Hash + Debug + Send + Sync + 'static;

    /// Connects to the peer `key` names.
    fn connect(&self, key: &Self::Key) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

/// Default streams per pooled connection: a power of two, the slot count of h2's stream slab.
pub const DEFAULT_MAX_STREAMS: u32 = 128;

/// Client-side settings. [`Default`] matches ztunnel's pool but for the stream limit.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Streams per connection before another connection is opened. Default 128 (ztunnel: 100):
    /// h2 keeps a connection's streams in a slab that grows by doubling, so 100 streams pay for
    /// 128 slots; at 128 every slot is used and the connection's own buffers are shared by 28 %
    /// more streams (BENCHMARKS.md, "Streams per pooled connection"). Values below 1 count as 1.
    pub max_streams_per_connection: usize,
    /// A connection without streams for this long is closed. Default 5 minutes.
    pub idle_timeout: Duration,
    /// Bound on the connector plus the HTTP/2 handshake. Default 10 s.
    pub connect_timeout: Duration,
    /// `SETTINGS_INITIAL_WINDOW_SIZE`: per-stream receive window. Default 4 MiB.
    pub initial_stream_window: u32,
    /// Connection-level receive window. Default 16 MiB.
    pub initial_connection_window: u32,
    /// `SETTINGS_MAX_FRAME_SIZE`. Default 1 MiB.
    pub max_frame_size: u32,
    /// Per-stream limit on data queued in h2 but not yet written to the transport. Default
    /// 4 MiB (the stream window, as ztunnel sets it).
    pub max_send_buffer_size: usize,
    /// Interval between keepalive PINGs. Default 10 s.
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is dropped. Default 20 s.
    pub keepalive_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_streams_per_connection: DEFAULT_MAX_STREAMS as usize,
            idle_timeout: Duration::from_secs(5 * 60),
            connect_timeout: Duration::from_secs(10),
            initial_stream_window: 4 * 1024 * 1024,
            initial_connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_send_buffer_size: 4 * 1024 * 1024,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// A pool of HBONE connections, keyed by [`Connect::Key`]. Cheap to clone (shared state).
///
/// Dropping the last clone stops offering the pooled connections; each closes once its open
/// streams end.
pub struct Pool<C: Connect> {
    inner: Arc<Inner<C>>,
}

impl<C: Connect> Clone for Pool<C> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C: Connect> Debug for Pool<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("connections", &self.connections())
            .field("streams_opened", &self.streams_opened())
            .finish_non_exhaustive()
    }
}

struct Inner<C: Connect> {
    connector: C,
    config: PoolConfig,
    conns: Mutex<HashMap<C::Key, Vec<Arc<Conn>>>>,
    next_id: AtomicU64,
    connections_opened: AtomicU64,
    streams_opened: AtomicU64,
    /// Dropped with the pool, which tells the connection drivers.
    shutdown: watch::Sender<()>,
}

impl<C: Connect> Inner<C> {
    fn lock(&self) -> MutexGuard<'_, HashMap<C::Key, Vec<Arc<Conn>>>> {
        // The map stays consistent across a panic: every update is a single push or removal.
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes `conn` out of the pool so no new stream picks it.
    fn remove(&self, key: &C::Key, conn: &Conn) {
        let mut map = self.lock();
        if let Some(list) = map.get_mut(key) {
            list.retain(|c| c.id != conn.id);
            if list.is_empty() {
                map.remove(key);
            }
        }
    }

    /// Removes `conn` if it has had no streams for `idle_timeout`, deciding under the lock that
    /// also guards new reservations.
    fn retire_if_idle(&self, key: &C::Key, conn: &Conn, idle_timeout: Duration) -> bool {
        let mut map = self.lock();
        if conn.active.load(Ordering::Acquire) > 0 || conn.idle_for() < idle_timeout {
            return false;
        }
        if let Some(list) = map.get_mut(key) {
            list.retain(|c| c.id != conn.id);
            if list.is_empty() {
                map.remove(key);
            }
        }
        conn.close();
        true
    }
}

/// Where a connection is in its life.
enum ConnState {
    Connecting,
    Ready(SendRequest<Bytes>),
    Failed(Arc<HboneError>),
    Closed,
}

/// One pooled connection, shared by the pool's map, its driver and its streams' slots.
struct Conn {
    id: u64,
    max_streams: usize,
    /// Streams open or being opened on this connection. Only incremented under the pool lock.
    active: AtomicUsize,
    /// Woken when `active` drops to zero.
    idle: Notify,
    born: Instant,
    /// When a stream last ended, in milliseconds since `born`.
    last_release_ms: AtomicU64,
    state: watch::Sender<ConnState>,
}

impl Conn {
    fn new(id: u64, max_streams: usize) -> Self {
        Self {
            id,
            max_streams,
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            born: Instant::now(),
            last_release_ms: AtomicU64::new(0),
            state: watch::Sender::new(ConnState::Connecting),
        }
    }

    fn is_ready(&self) -> bool {
        matches!(*self.state.borrow(), ConnState::Ready(_))
    }

    /// How many streams this connection may carry now.
    fn limit(&self) -> usize {
        match &*self.state.borrow() {
            ConnState::Connecting => self.max_streams,
            ConnState::Ready(sender) => self.max_streams.min(sender.current_max_send_streams()),
            ConnState::Failed(_) | ConnState::Closed => 0,
        }
    }

    /// Reserves a stream if the connection has room. Call under the pool lock.
    fn try_reserve(self: &Arc<Self>) -> Option<StreamSlot> {
        if self.active.load(Ordering::Acquire) >= self.limit() {
            return None;
        }
        Some(self.reserve())
    }

    fn reserve(self: &Arc<Self>) -> StreamSlot {
        self.active.fetch_add(1, Ordering::AcqRel);
        StreamSlot {
            conn: Arc::clone(self),
        }
    }

    fn release(&self) {
        let since_born = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_release_ms.store(since_born, Ordering::Release);
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_one();
        }
    }

    /// How long since the last stream ended (or since the connection started).
    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_release_ms.load(Ordering::Acquire));
        self.born.elapsed().saturating_sub(last)
    }

    /// No more streams on this connection: drops the pool's request handle, so h2 closes the
    /// connection (GOAWAY) once the open streams end.
    fn close(&self) {
        self.state.send_modify(|state| {
            *state = match state {
                ConnState::Connecting => ConnState::Failed(Arc::new(HboneError::ConnectionClosed)),
                ConnState::Failed(e) => ConnState::Failed(Arc::clone(e)),
                ConnState::Ready(_) | ConnState::Closed => ConnState::Closed,
            };
        });
    }
}

/// A stream's claim on its connection's capacity; released on drop.
pub(crate) struct StreamSlot {
    conn: Arc<Conn>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.conn.release();
    }
}

/// What one try at opening a stream came to.
enum Attempt {
    /// Failed before the server could have acted on the request: try another connection.
    Retry(HboneError),
    Fatal(HboneError),
}

impl<C: Connect> Pool<C> {
    /// A pool that connects through `connector`.
    pub fn new(connector: C, config: PoolConfig) -> Self {
        let mut config = config;
        config.max_streams_per_connection = config.max_streams_per_connection.max(1);
        Self {
            inner: Arc::new(Inner {
                connector,
                config,
                conns: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                connections_opened: AtomicU64::new(0),
                streams_opened: AtomicU64::new(0),
                shutdown: watch::Sender::new(()),
            }),
        }
    }

    /// The pool's settings.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.config
    }

    /// Opens a tunnel: sends `request` as an HTTP/2 CONNECT on a pooled connection for `key`
    /// (a new one if none has room) and returns the stream once the peer answers 200.
    ///
    /// Any other answer is [`HboneError::Status`]. A request that fails before the peer could
    /// have acted on it (the connection closed or went away first) is tried once more on
    /// another connection.
    pub async fn open(
        &self,
        key: &C::Key,
        request: OutboundRequest,
    ) -> Result<H2Stream, HboneError> {
        self.open_early(key, request, &mut NoEarlyData)
            .await
            .map(|(stream, _)| stream)
    }

    /// Like [`Self::open`], sending what `early` has while the answer is on its way (at most
    /// [`crate::EARLY_LIMIT`] bytes, again on a retry; see [`crate::EarlyData`]). Returns the
    /// stream and how many early bytes went ahead on it.
    pub async fn open_early<E: EarlyData + ?Sized>(
        &self,
        key: &C::Key,
        request: OutboundRequest,
        early: &mut E,
    ) -> Result<(H2Stream, usize), HboneError> {
        let mut early = Early::new(early);
        let mut retried = false;
        loop {
            let http_request = request.to_http()?;
            let slot = self.checkout(key);
            match self.send_on(key, slot, http_request, &mut early).await {
                Ok(stream) => return Ok((stream, early.len())),
                Err(Attempt::Retry(e)) if !retried => {
                    tracing::debug!(?key, error = %e, "HBONE request not sent, retrying");
                    retried = true;
                }
                Err(Attempt::Retry(e) | Attempt::Fatal(e)) => return Err(e),
            }
        }
    }

    /// Takes every connection whose key `close` picks out of the pool: no new stream uses it,
    /// and it closes (GOAWAY) once its open streams end. For keys that can never be used
    /// again, such as a source that is gone. Returns how many connections it took.
    pub fn close_where(&self, mut close: impl FnMut(&C::Key) -> bool) -> usize {
        let mut closed = Vec::new();
        self.inner.lock().retain(|key, list| {
            if close(key) {
                closed.append(list);
                false
            } else {
                true
            }
        });
        for conn in &closed {
            conn.close();
        }
        closed.len()
    }

    /// Live connections (established or being established) across all keys.
    pub fn connections(&self) -> usize {
        self.inner.lock().values().map(Vec::len).sum()
    }

    /// Live connections (established or being established) for `key`.
    pub fn connections_for(&self, key: &C::Key) -> usize {
        self.inner.lock().get(key).map_or(0, Vec::len)
    }

    /// Connections established since the pool was created.
    pub fn connections_opened(&self) -> u64 {
        self.inner.connections_opened.load(Ordering::Relaxed)
    }

    /// Streams opened (answered 200) since the pool was created.
    pub fn streams_opened(&self) -> u64 {
        self.inner.streams_opened.load(Ordering::Relaxed)
    }

    /// Streams currently open or being opened on pooled connections.
    pub fn active_streams(&self) -> usize {
        self.inner
            .lock()
            .values()
            .flatten()
            .map(|c| c.active.load(Ordering::Relaxed))
            .sum()
    }

    /// Reserves a stream on a connection for `key`, starting a new connection if none has room.
    fn checkout(&self, key: &C::Key) -> StreamSlot {
        let mut map = self.inner.lock();
        let list = map.entry(key.clone()).or_default();
        let found = list
            .iter()
            .filter(|c| c.is_ready())
            .find_map(Conn::try_reserve)
            .or_else(|| list.iter().find_map(Conn::try_reserve));
        if let Some(slot) = found {
            return slot;
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn::new(id, self.inner.config.max_streams_per_connection));
        let slot = conn.reserve();
        list.push(Arc::clone(&conn));
        drop(map);
        tracing::debug!(?key, conn = id, "opening a new HBONE connection");
        tokio::spawn(drive(Arc::downgrade(&self.inner), key.clone(), conn));
        slot
    }

    async fn send_on<E: EarlyData + ?Sized>(
        &self,
        key: &C::Key,
        slot: StreamSlot,
        request: Request<()>,
        early: &mut Early<'_, E>,
    ) -> Result<H2Stream, Attempt> {
        let conn = Arc::clone(&slot.conn);
        let mut state = conn.state.subscribe();
        let sender = {
            let current = state
                .wait_for(|s| !matches!(s, ConnState::Connecting))
                .await
                .map_err(|_| Attempt::Retry(HboneError::ConnectionClosed))?;
            let sender = match &*current {
                ConnState::Ready(sender) => Ok(sender.clone()),
                ConnState::Failed(e) => {
                    Err(Attempt::Fatal(HboneError::ConnectionFailed(Arc::clone(e))))
                }
                ConnState::Connecting | ConnState::Closed => {
                    Err(Attempt::Retry(HboneError::ConnectionClosed))
                }
            };
            drop(current);
            sender?
        };
        let retire = |e: h2::Error| {
            self.inner.remove(key, &conn);
            conn.close();
            Attempt::Retry(HboneError::Http2(e))
        };
        let mut sender = sender.ready().await.map_err(retire)?;
        let (response, mut send) = sender.send_request(request, false).map_err(retire)?;
        drop(sender);
        // Early bytes, within their limit, go right behind the request (h2 buffers them until
        // the windows allow); a failed send shows in the answer.
        let mut send_early = |data: Bytes| {
            if let Err(e) = send.send_data(data, false) {
                tracing::trace!(error = %e, "early data not sent");
            }
        };
        early.replay().for_each(&mut send_early);
        let mut response = pin!(response);
        let answer = std::future::poll_fn(|cx| {
            if let Poll::Ready(answer) = response.as_mut().poll(cx) {
                return Poll::Ready(answer);
            }
            early.poll_more(cx, &mut send_early);
            Poll::Pending
        })
        .await;
        let response = match answer {
            Ok(response) => response,
            Err(e) if e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM) => {
                return Err(retire(e));
            }
            Err(e) => return Err(Attempt::Fatal(HboneError::Http2(e))),
        };
        if response.status() != StatusCode::OK {
            return Err(Attempt::Fatal(HboneError::Status(response.status())));
        }
        self.inner.streams_opened.fetch_add(1, Ordering::Relaxed);
        Ok(H2Stream::new(
            send,
            response.into_body(),
            Some(Box::new(slot)),
        ))
    }
}

/// Connects and runs the HTTP/2 client handshake within the connect timeout.
async fn establish<C: Connect>(
    inner: &Inner<C>,
    key: &C::Key,
) -> Result<(SendRequest<Bytes>, Connection<C::Io, Bytes>), HboneError> {
    let config = &inner.config;
    let deadline = tokio::time::Instant::now() + config.connect_timeout;
    let timed_out = |_| HboneError::ConnectTimeout(config.connect_timeout);
    let io = tokio::time::timeout_at(deadline, inner.connector.connect(key))
        .await
        .map_err(timed_out)?
        .map_err(HboneError::Connect)?;
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(config.initial_stream_window)
        .initial_connection_window_size(config.initial_connection_window)
        .max_frame_size(config.max_frame_size)
        .initial_max_send_streams(config.max_streams_per_connection)
        .max_header_list_size(16 * 1024)
        .max_send_buffer_size(config.max_send_buffer_size)
        .enable_push(false);
    tokio::time::timeout_at(deadline, builder.handshake::<_, Bytes>(io))
        .await
        .map_err(timed_out)?
        .map_err(HboneError::Handshake)
}

/// Removes a connection from the pool when its driver ends, however it ends.
struct RetireOnDrop<C: Connect> {
    pool: Weak<Inner<C>>,
    key: C::Key,
    conn: Arc<Conn>,
}

impl<C: Connect> Drop for RetireOnDrop<C> {
    fn drop(&mut self) {
        if let Some(inner) = self.pool.upgrade() {
            inner.remove(&self.key, &self.conn);
        }
        self.conn.close();
    }
}

/// A connection's task: establishes it, then polls it until it ends, pinging it and closing it
/// when idle.
async fn drive<C: Connect>(pool: Weak<Inner<C>>, key: C::Key, conn: Arc<Conn>) {
    let _retire = RetireOnDrop {
        pool: pool.clone(),
        key: key.clone(),
        conn: Arc::clone(&conn),
    };
    let Some(inner) = pool.upgrade() else {
        return;
    };
    let config = inner.config.clone();
    let mut shutdown = inner.shutdown.subscribe();
    let (sender, mut connection) = match establish(&inner, &key).await {
        Ok(established) => established,
        Err(e) => {
            tracing::warn!(?key, conn = conn.id, error = %e, "HBONE connection failed");
            conn.state.send_replace(ConnState::Failed(Arc::new(e)));
            return;
        }
    };
    inner.connections_opened.fetch_add(1, Ordering::Relaxed);
    drop(inner);
    tracing::debug!(?key, conn = conn.id, "HBONE connection established");
    conn.state.send_replace(ConnState::Ready(sender));

    let mut pings = pin!(keepalive(
        connection.ping_pong(),
        KeepaliveConfig {
            first_ping_deadline: None,
            interval: config.keepalive_interval,
            timeout: config.keepalive_timeout,
        },
    ));
    let mut idle = pin!(wait_idle(&pool, &key, &conn, config.idle_timeout));
    let mut retired = false;
    loop {
        tokio::select! {
            biased;
            result = &mut connection => {
                match result {
                    Ok(()) => tracing::debug!(?key, conn = conn.id, "HBONE connection closed"),
                    Err(e) => {
                        tracing::debug!(?key, conn = conn.id, error = %e, "HBONE connection failed");
                    }
                }
                return;
            }
            err = &mut pings => {
                tracing::warn!(?key, conn = conn.id, error = %err, "dropping HBONE connection");
                return;
            }
            () = &mut idle, if !retired => {
                tracing::debug!(?key, conn = conn.id, "HBONE connection idle, closing");
                retired = true;
            }
            _ = shutdown.changed(), if !retired => {
                tracing::debug!(?key, conn = conn.id, "pool dropped, closing HBONE connection");
                conn.close();
                retired = true;
            }
        }
    }
}

/// Returns once `conn` has had no streams for `idle_timeout` and has been taken out of the pool.
async fn wait_idle<C: Connect>(
    pool: &Weak<Inner<C>>,
    key: &C::Key,
    conn: &Conn,
    idle_timeout: Duration,
) {
    loop {
        if conn.active.load(Ordering::Acquire) > 0 {
            conn.idle.notified().await;
            continue;
        }
        let idle_for = conn.idle_for();
        if idle_for < idle_timeout {
            tokio::time::sleep(idle_timeout.saturating_sub(idle_for)).await;
            continue;
        }
        match pool.upgrade() {
            Some(inner) if !inner.retire_if_idle(key, conn, idle_timeout) => {}
            _ => {
                conn.close();
                return;
            }
        }
    }
}
