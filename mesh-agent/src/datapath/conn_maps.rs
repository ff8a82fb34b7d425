//! The maps the proxies touch once per connection (original destinations, the applications'
//! view of their peer, the short-cut's sockets and same-node pairings) and the fast-path
//! counters, shared by every proxy task.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use aya::maps::{HashMap, IterableMap as _, MapData, MapError, PerCpuArray, SockHash};
use mesh_common::{names, DirectPair, FastpathCounters, NsSockKey, SockAddr, SockKey};
use tracing::warn;

use super::{map_err, DatapathError, BPF_NOEXIST};
use crate::stats::FastpathStats;

/// Maps used once per connection by the proxies, and the fast-path counters. Cheap to share.
pub struct ConnMaps {
    pub(super) conn_dst: Mutex<HashMap<MapData, NsSockKey, SockAddr>>,
    pub(super) peer_addr: Mutex<HashMap<MapData, SockKey, SockAddr>>,
    pub(super) socks: Mutex<SockHash<MapData, NsSockKey>>,
    pub(super) sock_ptrs: Mutex<HashMap<MapData, NsSockKey, u64>>,
    pub(super) pairs: Mutex<HashMap<MapData, NsSockKey, DirectPair>>,
    /// Whether `sockops` may insert sockets into the short-cut at all (`MESH_CONFIG`).
    pub(super) shortcut: bool,
    /// Read-only from here (the kernel writes it), so no lock.
    pub(super) fastpath: PerCpuArray<MapData, FastpathCounters>,
    /// Kernel-direct routes and connections.
    pub(super) direct: super::DirectMaps,
}

impl std::fmt::Debug for ConnMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnMaps").finish_non_exhaustive()
    }
}

impl ConnMaps {
    /// The original destination of a captured connection, by the application's socket (`app`:
    /// its namespace, its address, the outbound listener's); the entry is consumed.
    pub fn take_orig_dst(&self, app: NsSockKey) -> Option<SocketAddr> {
        let map = self.conn_dst.lock().expect("conn_dst lock");
        match crate::map_take::take::<_, SockAddr>(map.map(), &app) {
            Ok(found) => found?.to_std(),
            Err(error) => {
                warn!(%error, map = names::CONN_DST, "taking a connection's original destination");
                None
            }
        }
    }

    /// Makes the application's socket `app` (its view: local, remote) report `client` as its
    /// peer. Must be called before connecting, so the entry exists when the app accepts.
    ///
    /// Exclusive: `Ok(false)` if `app` has an entry already, which is another live connection's
    /// (the entry lives as long as its connection): the caller must not connect with that
    /// 4-tuple, and must not remove the entry.
    pub fn claim_peer(&self, app: SockKey, client: SocketAddr) -> Result<bool, DatapathError> {
        match self.peer_addr.lock().expect("peer_addr lock").insert(
            app,
            SockAddr::from(client),
            BPF_NOEXIST,
        ) {
            Ok(()) => Ok(true),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                Ok(false)
            }
            Err(e) => Err(map_err(names::PEER_ADDR)(e)),
        }
    }

    pub fn clear_peer(&self, app: &SockKey) {
        let _ = self.peer_addr.lock().expect("peer_addr lock").remove(app);
    }

    /// Kernel-direct routes and connections.
    pub fn direct(&self) -> &super::DirectMaps {
        &self.direct
    }

    /// Whether this agent's kernel programs put sockets into the `sk_msg` short-cut at all.
    pub fn shortcut_available(&self) -> bool {
        self.shortcut
    }

    /// Takes an application's socket (its key: namespace, local, remote) out of the `sk_msg`
    /// short-cut, so that its further sends take the TCP path.
    ///
    /// Safe only before anything was redirected *to* this socket: its queued ingress is dropped
    /// with it.
    pub fn leave_shortcut(&self, app: &NsSockKey) {
        let _ = self.socks.lock().expect("socks lock").remove(app);
        let _ = self.sock_ptrs.lock().expect("sock_ptrs lock").remove(app);
    }

    /// Lets the applications of a same-node connection talk straight to each other: `src` is the
    /// client's socket (its key: namespace, local, remote) on its leg to the agent, `dst` the
    /// server's socket on the agent's leg to it (see [`DirectPair`]). Call once the connection is
    /// authorized and both legs are connected, before relaying anything. The pair is removed
    /// when the returned guard is taken or dropped.
    ///
    /// `None` (and nothing written) if an entry could not be written: the connection is then
    /// relayed as before.
    pub fn pair_direct(self: &Arc<Self>, src: NsSockKey, dst: NsSockKey) -> Option<Box<Paired>> {
        let mut pairs = self.pairs.lock().expect("pairs lock");
        let entries = [(src, dst.peer()), (dst, src.peer())];
        for (i, (key, far)) in entries.iter().enumerate() {
            let value = DirectPair {
                far: *far,
                bytes: 0,
            };
            if let Err(error) = pairs.insert(key, value, 0) {
                warn!(%error, map = names::PAIRS, "pairing a same-node connection; relaying it");
                for (key, _) in &entries[..i] {
                    let _ = pairs.remove(key);
                }
                return None;
            }
        }
        Some(Box::new(Paired {
            maps: Arc::clone(self),
            keys: [src, dst],
            seen: [0; 2],
            read_at: 0,
            taken: false,
        }))
    }

    /// Removes every pairing; how many there were.
    pub(super) fn clear_pairs(&self) -> usize {
        let mut pairs = self.pairs.lock().expect("pairs lock");
        let keys: Vec<NsSockKey> = pairs.keys().filter_map(Result::ok).collect();
        keys.iter().filter(|k| pairs.remove(k).is_ok()).count()
    }

    /// The keys of the sockets in the short-cut now (for diagnostics and tests).
    pub fn shortcut_sockets(&self) -> Vec<NsSockKey> {
        let socks = self.socks.lock().expect("socks lock");
        socks.keys().filter_map(Result::ok).collect()
    }

    /// What `sk_msg` has done since the map was created (a restarted agent adopts the pinned
    /// map, so the totals carry over), summed over CPUs. One syscall; safe to call from any
    /// thread at any rate. The CPUs' values are copied one after the other while the kernel
    /// keeps counting, so a read during traffic is a consistent-enough snapshot, not an atomic
    /// one.
    pub fn fastpath(&self) -> Result<FastpathStats, DatapathError> {
        let per_cpu = self.fastpath.get(&0, 0).map_err(map_err(names::FASTPATH))?;
        Ok(FastpathStats::from_per_cpu(&per_cpu))
    }
}

/// A same-node connection whose applications talk straight to each other
/// ([`ConnMaps::pair_direct`]); removed from the kernel's map when taken or dropped.
pub struct Paired {
    maps: Arc<ConnMaps>,
    /// `[client's socket, server's socket]`.
    keys: [NsSockKey; 2],
    /// The bytes the kernel had sent straight across at the last reading, `[to the server, to
    /// the client]`.
    seen: [u64; 2],
    /// The caller's clock at that reading.
    read_at: u32,
    taken: bool,
}

impl std::fmt::Debug for Paired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Paired")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl Paired {
    /// The bytes the kernel has sent straight across, `[to the server, to the client]`, as of
    /// the last reading ([`Paired::read`], [`Paired::take`]).
    pub const fn seen(&self) -> [u64; 2] {
        self.seen
    }

    /// Reads the kernel's counts again if the caller's clock `now` moved since the last reading
    /// (two map lookups), so that a long connection's bytes show while it runs.
    pub fn read(&mut self, now: u32) {
        if now == self.read_at || self.taken {
            return;
        }
        self.read_at = now;
        let map = self.maps.pairs.lock().expect("pairs lock");
        for (key, seen) in self.keys.iter().zip(&mut self.seen) {
            if let Ok(pair) = map.get(key, 0) {
                *seen = (*seen).max(pair.bytes);
            }
        }
    }

    /// Ends the pairing: each application's later messages go through its leg to the agent.
    /// The final counts are then [`Paired::seen`].
    pub fn take(&mut self) {
        if self.taken {
            return;
        }
        self.taken = true;
        let mut map = self.maps.pairs.lock().expect("pairs lock");
        for (key, seen) in self.keys.iter().zip(&mut self.seen) {
            match crate::map_take::take::<_, DirectPair>(map.map(), key) {
                Ok(found) => *seen = (*seen).max(found.map_or(0, |p| p.bytes)),
                Err(error) => {
                    warn!(%error, map = names::PAIRS, "ending a same-node pairing");
                    let _ = map.remove(key);
                }
            }
        }
    }
}

impl Drop for Paired {
    fn drop(&mut self) {
        self.take();
    }
}
