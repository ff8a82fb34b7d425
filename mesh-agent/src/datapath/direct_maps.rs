//! The kernel-direct maps as the agent sees them (`mesh_common::DirectRoute`): the routes it
//! writes, the generation that keeps them current, the connections the kernel sent
//! kernel-direct (for a restarted agent) and the ring of their events.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use mesh_common::{
    names, DirectConn, DirectCounters, DirectRoute, DirectRouteKey, SockAddr, SockKey,
    MAX_DIRECT_TARGETS,
};
use tracing::warn;

use super::{map_err, take_map, DatapathError};

/// Kernel-direct routes and what the kernel reports about the connections they carry.
pub struct DirectMaps {
    /// Whether pods are registered with `PodInfo::KERNEL_DIRECT` (`--kernel-direct`).
    enabled: bool,
    routes: Mutex<HashMap<MapData, DirectRouteKey, DirectRoute>>,
    generation_map: Mutex<Array<MapData, u64>>,
    /// The generation routes are written with now; never 0 once loaded.
    generation: AtomicU64,
    conns: Mutex<HashMap<MapData, SockKey, DirectConn>>,
    counters: PerCpuArray<MapData, DirectCounters>,
    /// Taken once by the task that reads it.
    events: Mutex<Option<RingBuf<MapData>>>,
}

impl std::fmt::Debug for DirectMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectMaps")
            .field("enabled", &self.enabled)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl DirectMaps {
    /// Takes the maps from the loaded object and moves to a new generation, so that no route an
    /// earlier agent wrote is used again.
    pub(super) fn load(ebpf: &mut aya::Ebpf, enabled: bool) -> Result<Self, DatapathError> {
        let maps = Self {
            enabled,
            routes: Mutex::new(take_map(ebpf, names::DIRECT_ROUTES)?),
            generation_map: Mutex::new(take_map(ebpf, names::DIRECT_GENERATION)?),
            generation: AtomicU64::new(0),
            conns: Mutex::new(take_map(ebpf, names::DIRECT_CONNS)?),
            counters: take_map(ebpf, names::DIRECT_COUNTERS)?,
            events: Mutex::new(Some(take_map(ebpf, names::DIRECT_EVENTS)?)),
        };
        let pinned = maps
            .generation_map
            .lock()
            .expect("generation lock")
            .get(&0, 0)
            .map_err(map_err(names::DIRECT_GENERATION))?;
        maps.generation.store(pinned, Ordering::Relaxed);
        maps.next_generation()?;
        maps.clear_routes();
        Ok(maps)
    }

    /// Whether this agent sends connections kernel-direct at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The generation to write routes with. Read it *before* deciding a route from the
    /// cluster view: a view that changes meanwhile moves the generation on after it, so the
    /// route is never current under a view it was not decided in.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Makes every route written so far stale (the cluster view changed). The kernel sees the
    /// new generation at once; later connections go through the agent until it writes routes
    /// again.
    pub fn next_generation(&self) -> Result<u64, DatapathError> {
        let mut map = self.generation_map.lock().expect("generation lock");
        let next = self
            .generation
            .load(Ordering::Acquire)
            .wrapping_add(1)
            .max(1);
        map.set(0, next, 0)
            .map_err(map_err(names::DIRECT_GENERATION))?;
        self.generation.store(next, Ordering::Release);
        Ok(next)
    }

    /// Lets the pod of namespace `netns` connect to `dst` kernel-direct, to one of `targets`
    /// (at most [`MAX_DIRECT_TARGETS`]), under `generation`.
    pub fn set_route(
        &self,
        netns: u64,
        dst: SocketAddr,
        targets: &[SocketAddr],
        generation: u64,
    ) -> Result<(), DatapathError> {
        let mut route = DirectRoute {
            generation,
            count: 0,
            reserved: 0,
            targets: [SockAddr::default(); MAX_DIRECT_TARGETS],
        };
        for (slot, target) in route.targets.iter_mut().zip(targets) {
            *slot = SockAddr::from(*target);
            route.count += 1;
        }
        let key = DirectRouteKey {
            netns,
            dst: SockAddr::from(dst),
        };
        self.routes
            .lock()
            .expect("routes lock")
            .insert(key, route, 0)
            .map_err(map_err(names::DIRECT_ROUTES))
    }

    /// Removes every route (they are stale: the generation moved on); how many there were.
    pub fn clear_routes(&self) -> usize {
        let mut routes = self.routes.lock().expect("routes lock");
        let keys: Vec<DirectRouteKey> = routes.keys().filter_map(Result::ok).collect();
        keys.iter().filter(|k| routes.remove(k).is_ok()).count()
    }

    /// The kernel-direct connections open now (by their client socket), e.g. an earlier
    /// agent's, for a restarted agent to check.
    pub fn open_conns(&self) -> Vec<(SockKey, DirectConn)> {
        let conns = self.conns.lock().expect("conns lock");
        conns
            .iter()
            .filter_map(|entry| match entry {
                Ok(entry) => Some(entry),
                Err(error) => {
                    warn!(%error, map = names::DIRECT_CONNS, "reading kernel-direct connections");
                    None
                }
            })
            .collect()
    }

    /// The ring of the kernel's events; `None` once taken.
    pub fn take_events(&self) -> Option<RingBuf<MapData>> {
        self.events.lock().expect("events lock").take()
    }

    /// What the kernel counted (summed over CPUs).
    pub fn counters(&self) -> Result<DirectCounters, DatapathError> {
        let per_cpu = self
            .counters
            .get(&0, 0)
            .map_err(map_err(names::DIRECT_COUNTERS))?;
        Ok(per_cpu
            .iter()
            .fold(DirectCounters::default(), |sum, c| sum.sum(*c)))
    }
}
