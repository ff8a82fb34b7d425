//! HTTP connections to endpoints kept open for the next requests: idle HTTP/1.1 connections
//! (one request at a time each), and HTTP/2 connections that requests share: one per endpoint,
//! or, under a destination's `maxConcurrentStreams`, as many as keep each within that many
//! requests in flight (the least busy one with room takes a request; none has room: a new
//! connection, as Envoy's pool opens one). A kept connection unused for [`KEPT_IDLE`] (or its destination's
//! `connectionPool.http.idleTimeout`) is let go (its handle dropped, so hyper closes it once its
//! last response is read), as Envoy ends an idle upstream connection: an endpoint a client
//! stopped calling does not keep connections, tunnels and the far agent's legs open for ever.
//! Closed ones leave as they are found. A destination's `maxRequestsPerConnection` and
//! `maxConnectionDuration` end a connection's reuse too, and its `maxConnections` bounds the
//! idle ones kept and the HTTP/2 ones opened (`crate::breaker`: a kept HTTP/2 connection holds
//! one of them, and a request ending on one rings the destination's waiters).

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use hyper::client::conn::{http1, http2};
use mesh_cluster::k8s::ConnectionPool;
use mesh_identity::Identity;
use tokio::time::Instant;

use tokio::sync::Notify;

use crate::{body::Body, breaker::Slot};

/// What HTTP connections to an endpoint are kept by: its address and, in the mesh, the identity
/// its tunnel proved (a new pod at a gone pod's address never gets the gone pod's connections),
/// and the settings of the destination that opened them (`connectionPool`: connections are not
/// shared between destinations with different settings, as Envoy's pools are per cluster).
pub(super) type EndpointKey = (SocketAddr, Option<Identity>, Option<Arc<ConnectionPool>>);

/// Most idle HTTP/1.1 connections kept per endpoint.
const IDLE_PER_ENDPOINT: usize = 64;

/// Every this many kept HTTP/1.1 connections, the closed and expired ones of every endpoint are
/// dropped (and [`Reuse::sweep`] does it on a timer).
const SWEEP_EVERY: usize = 1024;

/// How long a kept connection may go unused: the HBONE pool's idle timeout, after which the
/// tunnel's HBONE connection, then without streams, closes too.
pub(crate) const KEPT_IDLE: Duration = Duration::from_secs(5 * 60);

/// A kept connection: when it was opened and last used, and the requests it carried.
pub(super) struct Kept<S> {
    born: Instant,
    used: Instant,
    uses: u32,
    pub(super) sender: S,
}

impl<S> Kept<S> {
    /// A connection just opened for a request.
    pub(super) fn new(sender: S) -> Self {
        let now = Instant::now();
        Self {
            born: now,
            used: now,
            uses: 1,
            sender,
        }
    }

    /// Whether it is open and may carry another request, now, under `pool`.
    fn usable(&self, now: Instant, pool: Option<&ConnectionPool>) -> bool
    where
        S: Handle,
    {
        !self.sender.is_closed() && self.fresh(now, pool)
    }

    /// Whether it may carry another request, now, under `pool`.
    fn fresh(&self, now: Instant, pool: Option<&ConnectionPool>) -> bool {
        let idle = pool.and_then(|p| p.idle_timeout).unwrap_or(KEPT_IDLE);
        now.duration_since(self.used) < idle
            && pool
                .and_then(|p| p.max_connection_duration)
                .is_none_or(|most| now.duration_since(self.born) < most)
            && pool
                .and_then(|p| p.max_requests_per_connection)
                .is_none_or(|most| self.uses < most)
    }
}

type H1 = Kept<http1::SendRequest<Body>>;
type H2 = Kept<Shared>;

/// A kept connection's handle, which knows whether the connection closed.
trait Handle {
    fn is_closed(&self) -> bool;
}

impl Handle for http1::SendRequest<Body> {
    fn is_closed(&self) -> bool {
        http1::SendRequest::is_closed(self)
    }
}

impl Handle for Shared {
    fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// A kept HTTP/2 connection: its handle, its requests in flight, and, when its destination
/// limits connections, the place it holds among them and what to ring when a request on it
/// ends.
pub(super) struct Shared {
    sender: http2::SendRequest<Body>,
    streams: Arc<AtomicUsize>,
    limited: Option<Limited>,
}

/// What a connection of a destination that limits connections holds.
pub(crate) struct Limited {
    /// Its place among the destination's `maxConnections`.
    pub(crate) slot: Slot,
    /// Rung when a request on it ends: requests waiting for a connection look again.
    pub(crate) room: Arc<Notify>,
}

/// What a request holds on its HTTP/2 connection until dropped (with its answer's end): its
/// count on the connection when its destination caps the requests per connection, and the
/// connection's place among the destination's connections when the request is the last the
/// connection carries.
#[derive(Default)]
pub(crate) struct Stream {
    streams: Option<Arc<AtomicUsize>>,
    room: Option<Arc<Notify>>,
    slot: Option<Slot>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Some(streams) = &self.streams {
            streams.fetch_sub(1, Ordering::AcqRel);
        }
        drop(self.slot.take());
        if let Some(room) = &self.room {
            room.notify_waiters();
        }
    }
}

impl Stream {
    /// Nothing held: no count, no place.
    fn is_empty(&self) -> bool {
        self.streams.is_none() && self.slot.is_none()
    }
}

/// The turn to open an HTTP/2 connection to an endpoint, and the last attempt's failure: when
/// the connection a request waited for could not be made, the requests that waited with it fail
/// at once too (as Envoy fails the requests pending on a connection that fails), rather than
/// each trying again in turn.
pub(super) type Turn = tokio::sync::Mutex<Option<(Instant, String)>>;

/// The most requests in flight per HTTP/2 connection under `pool` (`None`: no cap).
fn stream_cap(pool: Option<&ConnectionPool>) -> Option<usize> {
    pool.and_then(|p| p.max_concurrent_streams)
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
}

#[derive(Default)]
pub(super) struct Reuse {
    h1: Mutex<HashMap<EndpointKey, Vec<H1>>>,
    h2: Mutex<HashMap<EndpointKey, Vec<H2>>>,
    /// One request at a time opens an HTTP/2 connection to an endpoint ([`Reuse::opening`]).
    opening: Mutex<HashMap<EndpointKey, Arc<Turn>>>,
    /// HTTP/1.1 connections kept so far (the sweep's clock).
    keeps: AtomicUsize,
}

impl Reuse {
    /// An HTTP/1.1 connection to `key` ready for a request; those that closed or went unused
    /// too long are dropped.
    pub(super) fn h1(&self, key: &EndpointKey) -> Option<H1> {
        let now = Instant::now();
        let mut idle = self.h1.lock().unwrap_or_else(PoisonError::into_inner);
        let kept = idle.get_mut(key)?;
        kept.retain(|k| k.usable(now, key.2.as_deref()));
        let ready = kept.iter().rposition(|k| k.sender.is_ready())?;
        let mut chosen = kept.swap_remove(ready);
        chosen.uses += 1;
        Some(chosen)
    }

    /// Keeps an HTTP/1.1 connection for the next request (it is ready again once its response
    /// has been read), unless its destination's settings say it has done its share.
    pub(super) fn keep_h1(&self, key: EndpointKey, mut kept: H1) {
        let now = Instant::now();
        let pool = key.2.as_deref();
        kept.used = now;
        if !kept.fresh(now, pool) {
            return;
        }
        let most = pool
            .and_then(|p| p.max_connections)
            .map_or(IDLE_PER_ENDPOINT, |n| {
                usize::try_from(n)
                    .unwrap_or(usize::MAX)
                    .min(IDLE_PER_ENDPOINT)
            });
        let mut idle = self.h1.lock().unwrap_or_else(PoisonError::into_inner);
        // Now and then, connections that closed (an endpoint that went away, a server that ended
        // them) or expired leave, so gone endpoints do not keep entries.
        if self
            .keeps
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(SWEEP_EVERY)
        {
            drop_unusable(&mut idle, now);
        }
        let kept_there = idle.entry(key).or_default();
        if kept_there.len() < most {
            kept_there.push(kept);
        }
    }

    /// An HTTP/2 connection to `key` for a request: the least busy one that did not close, go
    /// unused too long or carry its share (`maxRequestsPerConnection`: then this request is its
    /// last), and has room under the destination's `maxConcurrentStreams`; the request counted
    /// on it when there is a cap.
    pub(super) fn h2(
        &self,
        key: &EndpointKey,
    ) -> Option<(http2::SendRequest<Body>, Option<Stream>)> {
        let now = Instant::now();
        let pool = key.2.as_deref();
        let cap = stream_cap(pool);
        let mut shared = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        let kept = shared.get_mut(key)?;
        kept.retain(|k| k.usable(now, pool));
        let busy = |k: &H2| k.sender.streams.load(Ordering::Acquire);
        let chosen = kept
            .iter()
            .enumerate()
            .filter(|(_, k)| cap.is_none_or(|cap| busy(k) < cap))
            .min_by_key(|(_, k)| busy(k))
            .map(|(i, _)| i)?;
        let k = &mut kept[chosen];
        k.used = now;
        k.uses += 1;
        let sender = k.sender.sender.clone();
        let mut stream = Stream {
            streams: cap.map(|_| {
                k.sender.streams.fetch_add(1, Ordering::AcqRel);
                Arc::clone(&k.sender.streams)
            }),
            room: k.sender.limited.as_ref().map(|l| Arc::clone(&l.room)),
            slot: None,
        };
        if !k.fresh(now, pool) {
            // Its last request: the connection's place goes with it.
            let last = kept.swap_remove(chosen);
            stream.slot = last.sender.limited.map(|l| l.slot);
        }
        Some((sender, (!stream.is_empty()).then_some(stream)))
    }

    /// Whether a kept HTTP/2 connection to `key` has room for one more request now.
    pub(super) fn has_room(&self, key: &EndpointKey) -> bool {
        let now = Instant::now();
        let pool = key.2.as_deref();
        let cap = stream_cap(pool);
        let shared = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        shared.get(key).is_some_and(|kept| {
            kept.iter().any(|k| {
                k.usable(now, pool)
                    && cap.is_none_or(|cap| k.sender.streams.load(Ordering::Acquire) < cap)
            })
        })
    }

    /// Keeps a new HTTP/2 connection (which carries its first request) for the next requests,
    /// with its place among the destination's connections (`limited`); that request counted
    /// on it when there is a cap (and holding the place when the connection is not kept).
    pub(super) fn keep_h2(
        &self,
        key: EndpointKey,
        sender: http2::SendRequest<Body>,
        limited: Option<Limited>,
    ) -> Option<Stream> {
        let now = Instant::now();
        let cap = stream_cap(key.2.as_deref());
        let streams = Arc::new(AtomicUsize::new(usize::from(cap.is_some())));
        let mut stream = Stream {
            streams: cap.map(|_| Arc::clone(&streams)),
            room: limited.as_ref().map(|l| Arc::clone(&l.room)),
            slot: None,
        };
        let kept = Kept::new(Shared {
            sender,
            streams,
            limited,
        });
        let mut shared = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        // A new connection is opened when the others closed, expired or were busy: the time
        // to drop the closed and expired ones.
        drop_unusable(&mut shared, now);
        if kept.fresh(now, key.2.as_deref()) {
            shared.entry(key).or_default().push(kept);
        } else {
            stream.slot = kept.sender.limited.map(|l| l.slot);
        }
        (!stream.is_empty()).then_some(stream)
    }

    /// The turn to open an HTTP/2 connection to `key`: requests that find no connection with
    /// room take it one at a time, and each looks again once it has it.
    pub(super) fn opening(&self, key: &EndpointKey) -> Arc<Turn> {
        let mut opening = self.opening.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(opening.entry(key.clone()).or_default())
    }

    /// Drops the closed and expired connections of every endpoint (on a timer, so that an
    /// endpoint no request asks for any more lets its connections go too).
    pub(super) fn sweep(&self) {
        let now = Instant::now();
        drop_unusable(
            &mut self.h1.lock().unwrap_or_else(PoisonError::into_inner),
            now,
        );
        drop_unusable(
            &mut self.h2.lock().unwrap_or_else(PoisonError::into_inner),
            now,
        );
        // Turns nobody waits for or holds.
        self.opening
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, turn| Arc::strong_count(turn) > 1);
    }

    /// Lets go of the connections kept under settings (`connectionPool`) that `current`, the
    /// newest view's, no longer has: a `DestinationRule` changed, so its destination's requests
    /// now look for connections under the new settings, and the old ones would sit unused (and
    /// hold their places among the old settings' `maxConnections`) until they idled out.
    /// Requests in flight on them finish first: hyper closes a connection once its last handle
    /// and stream are gone. Returns how many connections went.
    pub(super) fn retire(&self, current: &HashSet<&ConnectionPool>) -> usize {
        let h1 = retire(
            &mut self.h1.lock().unwrap_or_else(PoisonError::into_inner),
            current,
        );
        let h2 = retire(
            &mut self.h2.lock().unwrap_or_else(PoisonError::into_inner),
            current,
        );
        h1 + h2
    }

    /// How many connections are kept (HTTP/1.1, HTTP/2).
    #[cfg(test)]
    fn kept(&self) -> (usize, usize) {
        let h1 = self.h1.lock().unwrap_or_else(PoisonError::into_inner);
        let h2 = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        (
            h1.values().map(Vec::len).sum(),
            h2.values().map(Vec::len).sum(),
        )
    }
}

/// Drops the connections kept under settings not in `current`; returns how many.
fn retire<S>(
    kept: &mut HashMap<EndpointKey, Vec<Kept<S>>>,
    current: &HashSet<&ConnectionPool>,
) -> usize {
    let mut retired = 0;
    kept.retain(|key, conns| {
        let keep = key.2.as_deref().is_none_or(|p| current.contains(p));
        if !keep {
            retired += conns.len();
        }
        keep
    });
    retired
}

/// Drops the closed and expired connections of every endpoint.
fn drop_unusable<S: Handle>(kept: &mut HashMap<EndpointKey, Vec<Kept<S>>>, now: Instant) {
    kept.retain(|key, kept| {
        kept.retain(|k| k.usable(now, key.2.as_deref()));
        !kept.is_empty()
    });
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, sync::Arc, time::Duration};

    use http_body_util::BodyExt as _;
    use hyper::{client::conn::http1, Request, Response};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use mesh_cluster::k8s::ConnectionPool;

    use super::{Kept, Reuse, KEPT_IDLE};
    use crate::body::Body;

    /// An HTTP/1.1 connection to an in-memory server; the server's task ends when it closes.
    async fn connection() -> (http1::SendRequest<Body>, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let service = hyper::service::service_fn(|_: Request<hyper::body::Incoming>| async {
            Ok::<_, Infallible>(Response::new(String::from("ok")))
        });
        let finished = tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), service)
                .await;
        });
        let (sender, conn) = http1::handshake(TokioIo::new(client)).await.unwrap();
        tokio::spawn(conn);
        (sender, finished)
    }

    fn get() -> Request<Body> {
        Request::new(crate::body::full(bytes::Bytes::new()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_connection_is_reused_then_let_go_when_idle() {
        let reuse = Reuse::default();
        let key = ("10.0.0.1:80".parse().unwrap(), None, None);
        let (mut sender, served) = connection().await;
        let response = sender.send_request(get()).await.unwrap();
        response.into_body().collect().await.unwrap();
        reuse.keep_h1(key.clone(), Kept::new(sender));
        // Used again within the idle time: the same connection, kept again.
        tokio::time::sleep(KEPT_IDLE.saturating_sub(Duration::from_secs(1))).await;
        let mut again = reuse.h1(&key).expect("kept and fresh");
        let response = again.sender.send_request(get()).await.unwrap();
        response.into_body().collect().await.unwrap();
        reuse.keep_h1(key.clone(), again);
        assert_eq!(reuse.kept(), (1, 0));
        // Then unused past it: the timer's sweep lets it go, and the server sees it close.
        tokio::time::sleep(KEPT_IDLE).await;
        reuse.sweep();
        assert_eq!(reuse.kept(), (0, 0));
        tokio::time::timeout(Duration::from_secs(1), served)
            .await
            .expect("the connection closes once let go")
            .unwrap();
        assert!(reuse.h1(&key).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_connection_is_not_handed_out() {
        let reuse = Reuse::default();
        let key = ("10.0.0.2:80".parse().unwrap(), None, None);
        let (sender, _served) = connection().await;
        reuse.keep_h1(key.clone(), Kept::new(sender));
        tokio::time::sleep(KEPT_IDLE).await;
        assert!(reuse.h1(&key).is_none(), "expired, without a sweep");
    }

    /// A connection ready for its first request, as kept.
    async fn ready() -> Kept<http1::SendRequest<Body>> {
        let (mut sender, _served) = connection().await;
        sender.ready().await.unwrap();
        Kept::new(sender)
    }

    /// Sends a request on `kept` and reads its answer.
    async fn exchange(kept: &mut Kept<http1::SendRequest<Body>>) {
        let response = kept.sender.send_request(get()).await.unwrap();
        response.into_body().collect().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_destinations_connection_pool_ends_reuse() {
        let reuse = Reuse::default();
        let pool = |f: fn(&mut ConnectionPool)| {
            let mut pool = ConnectionPool::default();
            f(&mut pool);
            Some(Arc::new(pool))
        };
        let addr: std::net::SocketAddr = "10.0.0.3:80".parse().unwrap();

        // `maxRequestsPerConnection: 2`: the connection carries two requests, then goes.
        let key = (
            addr,
            None,
            pool(|p| p.max_requests_per_connection = Some(2)),
        );
        let mut kept = ready().await;
        exchange(&mut kept).await;
        reuse.keep_h1(key.clone(), kept);
        let mut second = reuse.h1(&key).expect("one request so far");
        exchange(&mut second).await;
        reuse.keep_h1(key.clone(), second);
        assert!(reuse.h1(&key).is_none(), "two requests carried");
        // Another destination's connections (no settings) are not this one's.
        let plain = (addr, None, None);
        reuse.keep_h1(plain.clone(), ready().await);
        assert!(reuse.h1(&key).is_none());
        assert!(reuse.h1(&plain).is_some());

        // `http.idleTimeout: 10s`: unused for 10 s, it goes (not after the default 5 min).
        let key = (
            addr,
            None,
            pool(|p| p.idle_timeout = Some(Duration::from_secs(10))),
        );
        reuse.keep_h1(key.clone(), ready().await);
        tokio::time::sleep(Duration::from_secs(9)).await;
        let kept = reuse.h1(&key).expect("used within its idle time");
        reuse.keep_h1(key.clone(), kept);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(reuse.h1(&key).is_none(), "idle for its idleTimeout");

        // `tcp.maxConnectionDuration: 30s`: used all the time, it still goes at 30 s of age.
        let key = (
            addr,
            None,
            pool(|p| p.max_connection_duration = Some(Duration::from_secs(30))),
        );
        reuse.keep_h1(key.clone(), ready().await);
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_secs(14)).await;
            let kept = reuse.h1(&key).expect("younger than 30 s");
            reuse.keep_h1(key.clone(), kept);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(reuse.h1(&key).is_none(), "30 s old");

        // `tcp.maxConnections: 2`: at most two idle connections kept for the endpoint.
        let key = (addr, None, pool(|p| p.max_connections = Some(2)));
        for _ in 0..3 {
            reuse.keep_h1(key.clone(), ready().await);
        }
        assert!(reuse.h1(&key).is_some() && reuse.h1(&key).is_some());
        assert!(reuse.h1(&key).is_none(), "the third was not kept");
    }

    /// An HTTP/2 connection to an in-memory server.
    async fn h2_connection() -> hyper::client::conn::http2::SendRequest<Body> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let service = hyper::service::service_fn(|_: Request<hyper::body::Incoming>| async {
            Ok::<_, Infallible>(Response::new(String::from("ok")))
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(server), service)
                .await;
        });
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender
    }

    #[tokio::test(start_paused = true)]
    async fn max_concurrent_streams_spreads_requests_over_more_http2_connections() {
        let reuse = Reuse::default();
        let addr: std::net::SocketAddr = "10.0.0.4:80".parse().unwrap();
        // No cap: one connection for every request, nothing counted.
        let plain = (addr, None, None);
        assert!(reuse
            .keep_h2(plain.clone(), h2_connection().await, None)
            .is_none());
        let shared: Vec<_> = (0..5).map(|_| reuse.h2(&plain).expect("shared")).collect();
        assert!(shared.iter().all(|(_, stream)| stream.is_none()));
        assert_eq!(reuse.kept(), (0, 1));

        // `maxConcurrentStreams: 2`: a connection takes two requests at a time.
        let pool = ConnectionPool {
            max_concurrent_streams: Some(2),
            ..ConnectionPool::default()
        };
        let key = (addr, None, Some(Arc::new(pool)));
        let first = reuse.keep_h2(key.clone(), h2_connection().await, None);
        assert!(first.is_some(), "its first request counted");
        let second = reuse.h2(&key).expect("room for a second");
        assert!(
            reuse.h2(&key).is_none(),
            "full: the next one opens a connection"
        );
        let third = reuse.keep_h2(key.clone(), h2_connection().await, None);
        assert_eq!(reuse.kept(), (0, 3));
        // The least busy connection takes the next request; one that finished frees its place.
        let fourth = reuse.h2(&key).expect("the second connection has room");
        assert!(reuse.h2(&key).is_none());
        assert!(!reuse.has_room(&key));
        drop(second);
        assert!(reuse.has_room(&key));
        let fifth = reuse.h2(&key).expect("a place given back");
        drop((first, third, fourth, fifth));
    }

    #[tokio::test(start_paused = true)]
    async fn connections_kept_under_settings_a_new_view_no_longer_gives_are_let_go() {
        let reuse = Reuse::default();
        let addr: std::net::SocketAddr = "10.0.0.5:80".parse().unwrap();
        let pool = |streams| ConnectionPool {
            max_concurrent_streams: Some(streams),
            ..ConnectionPool::default()
        };
        let (old, new) = (pool(1), pool(2));
        let old_key = (addr, None, Some(Arc::new(old.clone())));
        let new_key = (addr, None, Some(Arc::new(new.clone())));
        let plain = (addr, None, None);
        let (h1, served) = connection().await;
        reuse.keep_h1(old_key.clone(), Kept::new(h1));
        let in_flight = reuse.keep_h2(old_key.clone(), h2_connection().await, None);
        drop(reuse.keep_h2(new_key.clone(), h2_connection().await, None));
        drop(reuse.keep_h2(plain.clone(), h2_connection().await, None));
        assert_eq!(reuse.kept(), (1, 3));
        // The same settings in a new view (another allocation): nothing goes.
        let same = pool(1);
        assert_eq!(reuse.retire(&[&same, &new].into_iter().collect()), 0);
        // The old settings gone: their connections go, those of the new settings and of no
        // settings stay; a request in flight on a retired connection keeps its count.
        assert_eq!(reuse.retire(&[&new].into_iter().collect()), 2);
        assert_eq!(reuse.kept(), (0, 2));
        assert!(reuse.h1(&old_key).is_none() && reuse.h2(&old_key).is_none());
        assert!(reuse.h2(&new_key).is_some() && reuse.h2(&plain).is_some());
        assert!(in_flight.is_some());
        tokio::time::timeout(Duration::from_secs(1), served)
            .await
            .expect("the retired HTTP/1.1 connection closes")
            .unwrap();
    }
}
