//! Circuit breakers: the limits of a `DestinationRule`'s `connectionPool` on the requests,
//! connections and retries to one destination (a Service port, or a subset of it), counted as
//! Envoy counts them per cluster, per waypoint replica.
//!
//! - `http.http2MaxRequests`: requests in flight to the destination, whatever their protocol;
//!   one more is refused at once.
//! - `tcp.maxConnections`: connections in use. An HTTP/1.1 connection carries one request at a
//!   time, so a request holds one until its response is read; a TCP tunnel holds one while it
//!   lasts. A request that finds them all in use waits, as one of at most
//!   `http.http1MaxPendingRequests`, until one is free; beyond that it is refused. A tunnel is
//!   refused at once. An endpoint none of whose connections is in use may always have one (so a
//!   limit below the number of endpoints does not leave endpoints out), as Envoy's pools always
//!   may open their first. HTTP/2 requests share a connection per endpoint (limited by
//!   `http2MaxRequests`); a connection counts while it is kept. Under `maxConcurrentStreams`,
//!   a request that finds every connection to its endpoint full opens another only within
//!   `maxConnections`; beyond them it waits, as one of at most `http1MaxPendingRequests`, for
//!   room on one (a request that ends) or a connection that closes, as requests pend in
//!   Envoy's HTTP/2 pool; beyond that it is refused.
//! - `http.maxRetries`: retries in flight to the destination; a request that would be retried
//!   beyond them gets the answer it had.
//!
//! A refusal is Envoy's: 503 with `x-envoy-overloaded: true`, flag `UO`. The counts are kept
//! by destination and its `connectionPool` settings (not by policy object): a new cluster view
//! with the same settings keeps them; changed settings start afresh, as Envoy's new cluster
//! does, while what the old ones counted (kept HTTP/2 connections among them) ends on its own.
//! Kept across a change, an old connection's place would hold the new limits until it idled
//! out (minutes), with requests waiting for room on connections of the new settings that
//! their limit would not let open.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex, PoisonError,
    },
};

use mesh_cluster::{k8s::ConnectionPool, Service};
use tokio::sync::Notify;

/// A destination: the Service (namespace/name), its port and the subset, with its settings.
type Destination = (String, u16, Option<String>, ConnectionPool);

/// What is in use at one destination.
#[derive(Default)]
struct Counts {
    /// Requests in flight.
    requests: AtomicU32,
    /// Retries in flight.
    retries: AtomicU32,
    connections: Mutex<Connections>,
    /// Woken when a connection is free again, or an HTTP/2 connection has room again.
    freed: Arc<Notify>,
}

#[derive(Default)]
struct Connections {
    /// In use, in all.
    busy: u32,
    /// In use, by endpoint.
    by_endpoint: HashMap<SocketAddr, u32>,
    /// Requests waiting for one.
    pending: u32,
}

/// Why a request or a tunnel was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Overflow {
    /// `http.http2MaxRequests` requests were in flight.
    #[error("{0} requests in flight to the destination (http.http2MaxRequests)")]
    Requests(u32),
    /// `http.maxRetries` retries were in flight.
    #[error("{0} retries in flight to the destination (http.maxRetries)")]
    Retries(u32),
    /// `tcp.maxConnections` connections were in use, and `http.http1MaxPendingRequests`
    /// requests waited for one (none for a tunnel).
    #[error("{0} connections in use at the destination (tcp.maxConnections), and {1} requests waiting (http.http1MaxPendingRequests)")]
    Connections(u32, u32),
}

/// The waypoint's circuit breakers, by destination.
#[derive(Default)]
pub(crate) struct Breakers {
    by_destination: Mutex<HashMap<Destination, Arc<Counts>>>,
}

/// A request in flight (or a retry), counted until dropped.
pub(crate) struct Slot {
    counts: Arc<Counts>,
    which: Which,
}

enum Which {
    Request,
    Retry,
    Connection(SocketAddr),
}

impl Drop for Slot {
    fn drop(&mut self) {
        match self.which {
            Which::Request => {
                self.counts.requests.fetch_sub(1, Ordering::AcqRel);
            }
            Which::Retry => {
                self.counts.retries.fetch_sub(1, Ordering::AcqRel);
            }
            Which::Connection(addr) => {
                let mut connections = lock(&self.counts.connections);
                connections.busy = connections.busy.saturating_sub(1);
                if let Some(n) = connections.by_endpoint.get_mut(&addr) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        connections.by_endpoint.remove(&addr);
                    }
                }
                drop(connections);
                self.counts.freed.notify_waiters();
            }
        }
    }
}

/// A request waiting for a connection, counted until dropped (also when its request is given
/// up, as by a timeout).
struct Pending<'a>(&'a Counts);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut connections = lock(&self.0.connections);
        connections.pending = connections.pending.saturating_sub(1);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Takes one of `limit` (none: no limit) from `count`.
fn take(count: &AtomicU32, limit: Option<u32>) -> bool {
    let Some(limit) = limit else {
        count.fetch_add(1, Ordering::AcqRel);
        return true;
    };
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < limit).then(|| n + 1)
        })
        .is_ok()
}

impl Breakers {
    /// The counts of a destination (a Service, its port and the subset), for a request or
    /// tunnel whose `pool` limits any (`None` otherwise: nothing to count, nothing looked up).
    pub(crate) fn at(
        &self,
        (service, port, subset): (&Service, u16, Option<&str>),
        pool: &ConnectionPool,
    ) -> Option<Breaker> {
        if !pool.limits() {
            return None;
        }
        let key = (
            service.to_string(),
            port,
            subset.map(str::to_owned),
            pool.clone(),
        );
        let counts = Arc::clone(lock(&self.by_destination).entry(key).or_default());
        Some(Breaker(counts))
    }
}

impl Breakers {
    /// Lets go of the counts of destinations nothing is counted against now (no request,
    /// retry or connection holds them): all zero, as a fresh one. Destinations come and go for
    /// as long as the waypoint runs.
    pub(crate) fn forget_idle(&self) {
        lock(&self.by_destination).retain(|_, counts| Arc::strong_count(counts) > 1);
    }

    /// How many destinations have counts kept.
    #[cfg(test)]
    fn kept(&self) -> usize {
        lock(&self.by_destination).len()
    }
}

impl Breakers {
    /// A place for one more retry to the destination: `Ok(None)` when `pool` sets no
    /// `maxRetries` (nothing counted: the rule's retries hold), `Err` when `maxRetries` are in
    /// flight.
    pub(crate) fn retry(
        &self,
        destination: (&Service, u16, Option<&str>),
        pool: &ConnectionPool,
    ) -> Result<Option<Slot>, Overflow> {
        let Some(limit) = pool.max_retries else {
            return Ok(None);
        };
        let Some(Breaker(counts)) = self.at(destination, pool) else {
            return Ok(None);
        };
        if !take(&counts.retries, Some(limit)) {
            return Err(Overflow::Retries(limit));
        }
        Ok(Some(Slot {
            counts,
            which: Which::Retry,
        }))
    }
}

/// One destination's counts, looked up once for all a request takes of them.
pub(crate) struct Breaker(Arc<Counts>);

/// Where an HTTP/2 request that found no room on its endpoint's connections goes.
pub(crate) enum H2Place {
    /// On a new connection, counted by the slot while the connection is kept (`None`: the
    /// destination does not limit connections).
    Open(Option<Slot>),
    /// On a connection that has room now: look again.
    Room,
}

impl Breaker {
    /// A request to the destination, unless `http2MaxRequests` are in flight.
    pub(crate) fn request(&self, pool: &ConnectionPool) -> Result<Slot, Overflow> {
        if !take(&self.0.requests, pool.http2_max_requests) {
            return Err(Overflow::Requests(pool.http2_max_requests.unwrap_or(0)));
        }
        Ok(Slot {
            counts: Arc::clone(&self.0),
            which: Which::Request,
        })
    }

    /// A connection to `endpoint` at the destination, once one is free (waiting as one of
    /// `http1MaxPendingRequests` when `wait`, else refused at once); `None` when `pool` sets no
    /// `maxConnections`.
    pub(crate) async fn connection(
        &self,
        pool: &ConnectionPool,
        endpoint: SocketAddr,
        wait: bool,
    ) -> Result<Option<Slot>, Overflow> {
        let Some(max) = pool.max_connections else {
            return Ok(None);
        };
        let max_pending = if wait {
            pool.http1_max_pending_requests.unwrap_or(u32::MAX)
        } else {
            0
        };
        match self
            .take_connection((max, max_pending), endpoint, || false)
            .await
        {
            Ok(slot) => Ok(Some(slot)),
            // Never without room to wait for.
            Err(overflow) => Err(overflow.unwrap_or(Overflow::Connections(max, max_pending))),
        }
    }

    /// A new HTTP/2 connection to `endpoint`, for a request that found no room on the kept
    /// ones: within `maxConnections` at once; beyond them, waiting as one of
    /// `http1MaxPendingRequests` until one is free or `room` says a kept one has room.
    pub(crate) async fn h2_connection(
        &self,
        pool: &ConnectionPool,
        endpoint: SocketAddr,
        room: impl Fn() -> bool,
    ) -> Result<H2Place, Overflow> {
        let Some(max) = pool.max_connections else {
            return Ok(H2Place::Open(None));
        };
        let max_pending = pool.http1_max_pending_requests.unwrap_or(u32::MAX);
        match self
            .take_connection((max, max_pending), endpoint, room)
            .await
        {
            Ok(slot) => Ok(H2Place::Open(Some(slot))),
            Err(Some(overflow)) => Err(overflow),
            Err(None) => Ok(H2Place::Room),
        }
    }

    /// What wakes the requests waiting for a connection: rung when a request on an HTTP/2
    /// connection of the destination ends (its connection has room again).
    pub(crate) fn room_signal(&self) -> Arc<Notify> {
        Arc::clone(&self.0.freed)
    }

    /// One of `max` connections to `endpoint` (an endpoint with none in use may always have
    /// one), waiting as one of `max_pending` until one is free; `Err(None)` as soon as `room`
    /// holds (checked before each try), `Err(Some)` past `max_pending`.
    async fn take_connection(
        &self,
        (max, max_pending): (u32, u32),
        endpoint: SocketAddr,
        room: impl Fn() -> bool,
    ) -> Result<Slot, Option<Overflow>> {
        let counts = &self.0;
        let mut pending = None;
        loop {
            let freed = counts.freed.notified();
            tokio::pin!(freed);
            // Registered before looking, so a connection freed (or room made) in between wakes
            // this request.
            freed.as_mut().enable();
            if room() {
                return Err(None);
            }
            {
                let mut connections = lock(&counts.connections);
                let at_endpoint = connections.by_endpoint.get(&endpoint).copied();
                if connections.busy < max || at_endpoint.is_none() {
                    connections.busy += 1;
                    *connections.by_endpoint.entry(endpoint).or_default() += 1;
                    drop(connections);
                    drop(pending);
                    return Ok(Slot {
                        counts: Arc::clone(counts),
                        which: Which::Connection(endpoint),
                    });
                }
                if pending.is_none() {
                    if connections.pending >= max_pending {
                        return Err(Some(Overflow::Connections(max, max_pending)));
                    }
                    connections.pending += 1;
                    pending = Some(Pending(counts));
                }
            }
            freed.await;
        }
    }
}

#[cfg(test)]
mod tests;
