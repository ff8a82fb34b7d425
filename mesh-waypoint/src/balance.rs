//! How the waypoint picks an endpoint of a backend: among the Service port's endpoints that its
//! policy admits (a `DestinationRule` subset's labels), by the policy's load balancer: round robin
//! (per backend), random, least request (two drawn at random, the one with fewer requests in
//! flight, as Envoy does) or a consistent hash (rendezvous hashing over the endpoints, so a key
//! keeps its endpoint while that endpoint stays, and only the keys of an endpoint that goes move).

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
};

use http::HeaderMap;
use mesh_cluster::{
    k8s::{HashKey, LoadBalancer},
    Endpoint, EndpointPolicy, Service,
};

/// What a consistent hash can key on.
pub(crate) struct Keys<'a> {
    pub(crate) client: IpAddr,
    pub(crate) headers: &'a HeaderMap,
}

/// The load balancers' state: round-robin cursors and requests in flight per endpoint.
#[derive(Default)]
pub(crate) struct Balancer {
    cursors: Mutex<HashMap<String, usize>>,
    in_flight: Mutex<HashMap<SocketAddr, usize>>,
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
    /// An endpoint of `service`'s `port` that `policy` admits (IPv4 first), and its request
    /// counted in flight until the guard drops.
    pub(crate) fn pick(
        self: &Arc<Self>,
        service: &Service,
        port: u16,
        policy: &EndpointPolicy,
        keys: &Keys<'_>,
    ) -> Option<(Endpoint, SocketAddr, InFlight)> {
        let endpoints = service
            .ports
            .iter()
            .find(|p| p.port == port && p.protocol == mesh_cluster::Protocol::Tcp)?
            .endpoints
            .iter()
            .filter(|e| policy.admits(e));
        let (v4, v6): (Vec<&Endpoint>, Vec<&Endpoint>) = endpoints.partition(|e| e.addr.is_ipv4());
        let candidates = if v4.is_empty() { v6 } else { v4 };
        if candidates.is_empty() {
            return None;
        }
        let chosen = match &policy.load_balancer {
            LoadBalancer::RoundRobin => {
                let key = format!(
                    "{}:{port}/{}",
                    service,
                    policy.subset.as_deref().unwrap_or_default()
                );
                let mut cursors = self.cursors.lock().unwrap_or_else(PoisonError::into_inner);
                let cursor = cursors.entry(key).or_default();
                let turn = *cursor % candidates.len();
                *cursor = cursor.wrapping_add(1);
                candidates[turn]
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

/// The bytes a consistent hash keys on; `None` when the request has no such key.
fn hash_key(key: &HashKey, keys: &Keys<'_>) -> Option<Vec<u8>> {
    match key {
        HashKey::SourceIp => Some(keys.client.to_string().into_bytes()),
        HashKey::Header(name) => keys.headers.get(name).map(|v| v.as_bytes().to_vec()),
        HashKey::Cookie(name) => keys
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                (k == name).then(|| v.as_bytes().to_vec())
            }),
    }
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
