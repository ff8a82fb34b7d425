//! How the waypoint picks an endpoint of a backend: among the Service port's endpoints that its
//! policy admits (a `DestinationRule` subset's labels), by the policy's load balancer: round robin
//! (per backend), random, least request (two drawn at random, the one with fewer requests in
//! flight, as Envoy does) or a consistent hash (rendezvous hashing over the endpoints, so a key
//! keeps its endpoint while that endpoint stays, and only the keys of an endpoint that goes move).
//! A consistent hash keys on a header, a cookie, a query parameter or the source IP; a request
//! without its key goes to any endpoint, except that a cookie with a `ttl` is made up for it
//! ([`cookie_to_set`]: Envoy's sticky sessions).
//!
//! **Outlier detection** (the policy's `outlierDetection`, as Envoy's): every answer of an
//! endpoint, and every TCP tunnel's connection to it made or not, is recorded
//! ([`Balancer::record`]); `consecutive5xxErrors` 5xx answers in a row (a
//! failure to reach it counts as one), or `consecutiveGatewayErrors` 502/503/504 in a row, eject
//! it for `baseEjectionTime` times its ejections so far (at most 300 s), provided fewer than
//! `maxEjectionPercent` of the candidates are ejected already (the first ejection among few
//! endpoints always is, as in Envoy). An ejected endpoint is not picked until its time is up,
//! unless fewer than `minHealthPercent` of the candidates are left (panic: all are candidates
//! again). Its ejection count goes down by one for every `interval` it spends back in without
//! being ejected. Per waypoint replica, as Envoy's per proxy.

use std::{
    collections::{HashMap, HashSet},
    hash::{DefaultHasher, Hash, Hasher},
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use http::{HeaderMap, HeaderValue};
use mesh_cluster::{
    k8s::{HashCookie, HashKey, LoadBalancer, OutlierDetection},
    locality::keep_closest,
    ClusterState, Endpoint, EndpointPolicy, Service, Workload,
};

/// The longest ejection (Envoy's default `max_ejection_time`).
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// What an endpoint's answer (or its absence) was, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// An HTTP status.
    Status(u16),
    /// It could not be reached, or did not answer in time.
    Unreachable,
    /// A TCP tunnel's connection to it was made: a success, as Envoy's TCP proxy counts one.
    Connected,
}

/// An endpoint's record for outlier detection.
#[derive(Debug, Default)]
struct Health {
    /// 5xx answers in a row.
    errors_5xx: u32,
    /// 502/503/504 answers in a row.
    errors_gateway: u32,
    /// Failures to reach it in a row (counted apart with `splitExternalLocalOriginErrors`).
    local_failures: u32,
    /// Ejected until then.
    ejected_until: Option<Instant>,
    /// Its ejections so far (the next lasts this many base times, plus one).
    ejections: u32,
    /// Since when it counts as back in (for the count to go down).
    back_since: Option<Instant>,
}

impl Health {
    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| until > now)
    }

    /// Whether it says nothing a fresh record would not: no failures counted, not ejected and
    /// no ejection still counting against it. Back in after an ejection, the count decays
    /// only as it is settled, so such a record is kept until its endpoint goes.
    fn forgettable(&self, now: Instant) -> bool {
        self.errors_5xx == 0
            && self.errors_gateway == 0
            && self.local_failures == 0
            && self.ejections == 0
            && !self.ejected(now)
    }

    /// The ejection count, lowered for every `interval` spent back in.
    fn settle(&mut self, policy: &OutlierDetection, now: Instant) {
        if let Some(until) = self.ejected_until.filter(|until| *until <= now) {
            self.ejected_until = None;
            self.back_since = Some(until);
        }
        if let Some(since) = self.back_since {
            let interval = policy.interval.as_nanos().max(1);
            let spent = now.saturating_duration_since(since).as_nanos() / interval;
            let spent = u32::try_from(spent).unwrap_or(u32::MAX);
            if spent > 0 {
                self.ejections = self.ejections.saturating_sub(spent);
                self.back_since = Some(now);
            }
        }
    }
}

/// What a consistent hash can key on.
pub(crate) struct Keys<'a> {
    /// The client's address (its IP for `useSourceIp`; with its port, a made-up cookie's seed).
    pub(crate) client: SocketAddr,
    /// An HTTP request's headers and query; `None` for a TCP tunnel.
    pub(crate) request: Option<(&'a HeaderMap, Option<&'a str>)>,
    /// The waypoint's own pod, when known: where it runs, for a destination's
    /// `localityLbSetting` and a Service's `trafficDistribution`.
    pub(crate) near: Option<&'a Workload>,
    /// The address the client dialled, when the request is the client's own (not a mirror):
    /// a `ServiceEntry` of `resolution: NONE` sends it on there.
    pub(crate) dialled: Option<std::net::IpAddr>,
}

/// Round-robin cursors of one Service, by port and subset (looked up without an allocation
/// for a backend without a subset, the usual one).
type Cursors = HashMap<(u16, Option<String>), usize>;

/// The load balancers' state: round-robin cursors and requests in flight per endpoint.
///
/// What is kept of backends and endpoints that are gone is let go by [`Balancer::forget_gone`],
/// which the waypoint runs on a timer: Services and pods come and go for as long as it runs.
#[derive(Default)]
pub(crate) struct Balancer {
    /// By the Service's hostname.
    cursors: Mutex<HashMap<String, Cursors>>,
    in_flight: Mutex<HashMap<SocketAddr, usize>>,
    /// Outlier detection's records, by endpoint.
    health: Mutex<HashMap<SocketAddr, Health>>,
}

/// A request in flight to an endpoint (for least request), until dropped.
pub(crate) struct InFlight {
    balancer: Arc<Balancer>,
    addr: SocketAddr,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut counts = self
            .balancer
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.addr) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.addr);
            }
        }
    }
}

impl Balancer {
    /// [`Self::pick_among`] the port's endpoints alone.
    #[cfg(test)]
    pub(crate) fn pick(
        self: &Arc<Self>,
        service: &Service,
        port: u16,
        policy: &EndpointPolicy,
        keys: &Keys<'_>,
    ) -> Option<(Endpoint, SocketAddr, InFlight)> {
        self.pick_among(service, (port, &[]), policy, keys)
    }

    /// An endpoint of `service`'s `port` (or of `resolved`, the answers of the port's names: a
    /// `ServiceEntry` of resolution `DNS`, [`crate::dns`]) that `policy` admits (IPv4 first),
    /// and its request counted in flight until the guard drops.
    pub(crate) fn pick_among(
        self: &Arc<Self>,
        service: &Service,
        (port, resolved): (u16, &[Endpoint]),
        policy: &EndpointPolicy,
        keys: &Keys<'_>,
    ) -> Option<(Endpoint, SocketAddr, InFlight)> {
        let mut candidates = candidates(service, (port, resolved), policy);
        // `resolution: NONE`: on to the address dialled, when it is one of the entry's (a route
        // from elsewhere to the entry spreads over its addresses).
        if let Some(dialled) = keys.dialled.filter(|_| service.keeps_destination()) {
            if candidates.iter().any(|e| e.addr.ip() == dialled) {
                candidates.retain(|e| e.addr.ip() == dialled);
            }
        }
        if candidates.is_empty() {
            return None;
        }
        if let Some(outlier) = &policy.outlier_detection {
            self.leave_out_ejected(&mut candidates, outlier, Instant::now());
        }
        // After the ejections: with the closest endpoints ejected, the next closest take over
        // (Envoy's locality failover). A `DestinationRule`'s locality settings (with its
        // outlier detection) over the Service's `trafficDistribution`.
        match (policy.locality(), keys.near) {
            (Some(locality), Some(own)) => locality.keep_preferred(
                &mut candidates,
                own.site(),
                |e| e.workload.as_deref().map(Workload::site),
                fastrand::u32(..100),
            ),
            _ => keep_closest(
                &mut candidates,
                service.traffic_distribution,
                keys.near.map(Workload::place),
                |e| e.workload.as_deref().map(Workload::place),
            ),
        }
        let chosen = match &policy.load_balancer {
            LoadBalancer::RoundRobin => {
                let mut cursors = self.cursors.lock().unwrap_or_else(PoisonError::into_inner);
                let turn = next_turn(&mut cursors, service, (port, &policy.subset));
                candidates[turn % candidates.len()]
            }
            LoadBalancer::Random => candidates[fastrand::usize(..candidates.len())],
            LoadBalancer::LeastRequest => {
                let (a, b) = (
                    candidates[fastrand::usize(..candidates.len())],
                    candidates[fastrand::usize(..candidates.len())],
                );
                let counts = self
                    .in_flight
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let load = |e: &Endpoint| counts.get(&e.addr).copied().unwrap_or(0);
                if load(b) < load(a) {
                    b
                } else {
                    a
                }
            }
            LoadBalancer::ConsistentHash(key) => match hash_key(key, keys) {
                Some(key) => rendezvous(&candidates, &key),
                None => candidates[fastrand::usize(..candidates.len())],
            },
        };
        let addr = chosen.addr;
        *self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(addr)
            .or_default() += 1;
        let guard = InFlight {
            balancer: Arc::clone(self),
            addr,
        };
        Some((chosen.clone(), addr, guard))
    }

    /// `candidates` without the ejected endpoints, unless too few would be left.
    fn leave_out_ejected(
        &self,
        candidates: &mut Vec<&Endpoint>,
        outlier: &OutlierDetection,
        now: Instant,
    ) {
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        let mut ejected = |e: &&Endpoint| {
            health.get_mut(&e.addr).is_some_and(|h| {
                h.settle(outlier, now);
                h.ejected(now)
            })
        };
        let kept: Vec<&Endpoint> = candidates.iter().copied().filter(|e| !ejected(e)).collect();
        let healthy_percent = kept.len() * 100 / candidates.len();
        let panic = healthy_percent < outlier.min_health_percent as usize;
        if !kept.is_empty() && !panic {
            *candidates = kept;
        } else if kept.is_empty() && !panic && outlier.max_ejection_percent >= 100 {
            // Every endpoint ejected and none allowed back: as Envoy, no healthy endpoint.
            candidates.clear();
        }
    }

    /// Records `answer` from `addr`, an endpoint of `service`'s `port` that `policy` picked;
    /// ejects it when it has failed too often in a row (when the policy detects outliers).
    pub(crate) fn record(
        &self,
        (service, port, policy): (&Service, u16, &EndpointPolicy),
        addr: SocketAddr,
        answer: Answer,
        now: Instant,
    ) {
        let Some(outlier) = &policy.outlier_detection else {
            return;
        };
        let candidates = candidates(service, (port, &[]), policy);
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        // With `splitExternalLocalOriginErrors`, failures to reach the endpoint are counted on
        // their own (`consecutiveLocalOriginFailures`), apart from the answers' 5xx.
        let split = outlier.consecutive_local_origin.is_some();
        let local = matches!(answer, Answer::Unreachable | Answer::Connected);
        let (failed, gateway) = match answer {
            Answer::Status(code) => ((500..600).contains(&code), matches!(code, 502..=504)),
            Answer::Unreachable => (true, true),
            Answer::Connected => (false, false),
        };
        if !failed {
            // A success: its counts start over (nothing to keep for an endpoint never failing);
            // split, a connection made says nothing of the answers.
            if let Some(h) = health.get_mut(&addr) {
                h.local_failures = 0;
                if !(split && local) {
                    h.errors_5xx = 0;
                    h.errors_gateway = 0;
                }
            }
            return;
        }
        let already = candidates
            .iter()
            .filter(|e| health.get(&e.addr).is_some_and(|h| h.ejected(now)))
            .count();
        let h = health.entry(addr).or_default();
        h.settle(outlier, now);
        if h.ejected(now) {
            return;
        }
        let tripped = match outlier.consecutive_local_origin {
            Some(most) if local => {
                h.local_failures += 1;
                most > 0 && h.local_failures >= most
            }
            _ => {
                // An answer, however bad, shows the endpoint could be reached.
                h.local_failures = 0;
                h.errors_5xx += 1;
                if gateway {
                    h.errors_gateway += 1;
                } else {
                    h.errors_gateway = 0;
                }
                (outlier.consecutive_5xx > 0 && h.errors_5xx >= outlier.consecutive_5xx)
                    || (outlier.consecutive_gateway > 0
                        && h.errors_gateway >= outlier.consecutive_gateway)
            }
        };
        let room = already * 100 < outlier.max_ejection_percent as usize * candidates.len().max(1);
        if tripped && room {
            h.ejections += 1;
            let time = outlier
                .base_ejection_time
                .saturating_mul(h.ejections)
                .min(MAX_EJECTION);
            h.ejected_until = Some(now + time);
            h.back_since = None;
            h.errors_5xx = 0;
            h.errors_gateway = 0;
            h.local_failures = 0;
            tracing::debug!(endpoint = %addr, ejected_for = ?time, "outlier ejected");
        }
    }

    /// Lets go of the cursors of backends `state` no longer has and of the outlier records of
    /// endpoints no Service of it has, and of records with nothing left to remember.
    pub(crate) fn forget_gone(&self, state: &ClusterState, now: Instant) {
        self.cursors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|hostname, by_port| {
                let Some(service) = state.service_by_hostname(hostname) else {
                    return false;
                };
                by_port.retain(|(port, _), _| service.ports.iter().any(|p| p.port == *port));
                !by_port.is_empty()
            });
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        if health.is_empty() {
            return;
        }
        let live: HashSet<SocketAddr> = state
            .services()
            .iter()
            .flat_map(|s| &s.ports)
            .flat_map(|p| &p.endpoints)
            .map(|e| e.addr)
            .collect();
        health.retain(|addr, h| live.contains(addr) && !h.forgettable(now));
    }

    /// How many cursors and outlier records are kept.
    #[cfg(test)]
    fn kept(&self) -> (usize, usize) {
        let cursors = self.cursors.lock().unwrap_or_else(PoisonError::into_inner);
        let health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        (cursors.values().map(HashMap::len).sum(), health.len())
    }

    /// Requests in flight to `addr` now.
    #[cfg(test)]
    fn load(&self, addr: SocketAddr) -> usize {
        let counts = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        counts.get(&addr).copied().unwrap_or(0)
    }
}

/// The turn of the next request to `service`'s `port` and `subset` (round robin), counted.
fn next_turn(
    cursors: &mut HashMap<String, Cursors>,
    service: &Service,
    (port, subset): (u16, &Option<String>),
) -> usize {
    let by_port = match cursors.get_mut(service.hostname.as_str()) {
        Some(by_port) => by_port,
        None => cursors.entry(service.hostname.clone()).or_default(),
    };
    let cursor = match by_port.get_mut(&(port, subset.clone())) {
        Some(cursor) => cursor,
        None => by_port.entry((port, subset.clone())).or_default(),
    };
    let turn = *cursor;
    *cursor = cursor.wrapping_add(1);
    turn
}

/// The endpoints of `service`'s `port` that `policy` admits: its IPv4 ones, else its IPv6 ones.
fn candidates<'s>(
    service: &'s Service,
    (port, resolved): (u16, &'s [Endpoint]),
    policy: &EndpointPolicy,
) -> Vec<&'s Endpoint> {
    let Some(endpoints) = service
        .ports
        .iter()
        .find(|p| p.port == port && p.protocol == mesh_cluster::Protocol::Tcp)
        .map(|p| &p.endpoints)
    else {
        return Vec::new();
    };
    let admitted = endpoints
        .iter()
        .chain(resolved)
        .filter(|e| policy.admits(e));
    let (v4, v6): (Vec<&Endpoint>, Vec<&Endpoint>) = admitted.partition(|e| e.addr.is_ipv4());
    if v4.is_empty() {
        v6
    } else {
        v4
    }
}

/// The bytes a consistent hash keys on; `None` when the request has no such key.
fn hash_key(key: &HashKey, keys: &Keys<'_>) -> Option<Vec<u8>> {
    if let HashKey::SourceIp = key {
        return Some(keys.client.ip().to_string().into_bytes());
    }
    let (headers, query) = keys.request?;
    match key {
        HashKey::SourceIp => None,
        HashKey::Header(name) => headers.get(name).map(|v| v.as_bytes().to_vec()),
        HashKey::Cookie(cookie) => match cookie_value(headers, &cookie.name) {
            Some(value) => Some(value.as_bytes().to_vec()),
            None if cookie.ttl.is_some() => Some(made_up_cookie(keys.client).into_bytes()),
            None => None,
        },
        HashKey::QueryParameter(name) => query?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then(|| v.as_bytes().to_vec())
        }),
    }
}

/// The value of cookie `name` in the request's `Cookie` headers, without the quotes Envoy's
/// made-up cookies have.
fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| {
                v.strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v)
            })
        })
}

/// The value of a cookie made up for a client: the same for every request of one connection
/// (retries, streams of one HTTP/2 connection), as Envoy's.
fn made_up_cookie(client: SocketAddr) -> String {
    let mut hasher = DefaultHasher::new();
    client.hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// The `Set-Cookie` for an answer, when `policy` hashes on a cookie with a `ttl` and the request
/// did not carry it: the cookie [`Balancer::pick`] keyed on, so that the client's next requests
/// go to the same endpoint.
pub(crate) fn cookie_to_set(policy: &EndpointPolicy, keys: &Keys<'_>) -> Option<HeaderValue> {
    let LoadBalancer::ConsistentHash(HashKey::Cookie(cookie @ HashCookie { ttl: Some(_), .. })) =
        &policy.load_balancer
    else {
        return None;
    };
    let (headers, _) = keys.request?;
    if cookie_value(headers, &cookie.name).is_some() {
        return None;
    }
    // The name, path and attributes were checked to be tokens and visible ASCII when parsed.
    HeaderValue::from_str(&cookie.set_cookie(&made_up_cookie(keys.client))).ok()
}

/// The endpoint with the highest hash of (key, endpoint).
fn rendezvous<'a>(candidates: &[&'a Endpoint], key: &[u8]) -> &'a Endpoint {
    let score = |e: &Endpoint| {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        e.addr.hash(&mut hasher);
        hasher.finish()
    };
    candidates
        .iter()
        .copied()
        .max_by_key(|e| score(e))
        .unwrap_or(candidates[0])
}

#[cfg(test)]
mod tests;
