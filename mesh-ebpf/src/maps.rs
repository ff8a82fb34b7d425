//! Every map of the kernel object. Names are shared with the agent through `mesh_common::names`;
//! maps the agent pins are pinned by name so a restarted agent adopts them.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, SockHash},
};
use mesh_common::{
    CgroupCounters, DirectConn, DirectCounters, DirectPair, DirectPeer, DirectRoute,
    DirectRouteKey, DirectSock, FastpathCounters, MeshConfig, NsSockKey, PodInfo, SockAddr,
    SockKey, DIRECT_EVENTS_BYTES, MAX_CGROUPS, MAX_CONNS, MAX_DIRECT_ROUTES, MAX_PODS,
};

#[map(name = "MESH_CGROUP_COUNTERS")]
pub static MESH_CGROUP_COUNTERS: PerCpuHashMap<u64, CgroupCounters> =
    PerCpuHashMap::pinned(MAX_CGROUPS, 0);

#[map(name = "MESH_PODS")]
pub static MESH_PODS: HashMap<u64, PodInfo> = HashMap::pinned(MAX_PODS, 0);

#[map(name = "MESH_ORIG_DST")]
pub static MESH_ORIG_DST: LruHashMap<u64, SockAddr> = LruHashMap::pinned(MAX_CONNS, 0);

#[map(name = "MESH_CONN_DST")]
pub static MESH_CONN_DST: LruHashMap<NsSockKey, SockAddr> = LruHashMap::pinned(MAX_CONNS, 0);

#[map(name = "MESH_PEER_ADDR")]
pub static MESH_PEER_ADDR: LruHashMap<SockKey, SockAddr> = LruHashMap::pinned(MAX_CONNS, 0);

#[map(name = "MESH_SOCKS")]
pub static MESH_SOCKS: SockHash<NsSockKey> = SockHash::pinned(MAX_CONNS, 0);

/// Kernel address (`struct tcp_sock *`) of each socket in `MESH_SOCKS`, same key. Written when
/// the socket enters the short-cut, removed when it closes; only ever read with
/// `bpf_probe_read_kernel`.
#[map(name = "MESH_SOCK_PTRS")]
pub static MESH_SOCK_PTRS: HashMap<NsSockKey, u64> = HashMap::pinned(MAX_CONNS, 0);

/// Same-node connections whose applications talk straight to each other, by each application
/// socket's key (see `DirectPair`). Written by the agent after authorizing the connection and
/// removed by it when the connection ends; `sockops` removes a stale entry under the key of a
/// socket that enters the short-cut (so a pair can never outlive its sockets into a new
/// connection of the same addresses).
#[map(name = "MESH_PAIRS")]
pub static MESH_PAIRS: HashMap<NsSockKey, DirectPair> = HashMap::pinned(MAX_CONNS, 0);

#[map(name = "MESH_LISTENERS")]
pub static MESH_LISTENERS: SockHash<SockAddr> = SockHash::pinned(MAX_PODS * 2, 0);

#[map(name = "MESH_CONFIG")]
pub static MESH_CONFIG: Array<MeshConfig> = Array::pinned(1, 0);

/// What `sk_msg` did, one entry (index 0), one copy per CPU.
#[map(name = "MESH_FASTPATH")]
pub static MESH_FASTPATH: PerCpuArray<FastpathCounters> = PerCpuArray::pinned(1, 0);

/// Kernel-direct routes (see `mesh_common::DirectRoute`); only the agent writes them.
#[map(name = "MESH_DIRECT_ROUTES")]
pub static MESH_DIRECT_ROUTES: HashMap<DirectRouteKey, DirectRoute> =
    HashMap::pinned(MAX_DIRECT_ROUTES, 0);

/// The agent's route generation at index 0 (0: none valid).
#[map(name = "MESH_DIRECT_GENERATION")]
pub static MESH_DIRECT_GENERATION: Array<u64> = Array::pinned(1, 0);

/// Client sockets the connect hook sent kernel-direct, by socket cookie.
#[map(name = "MESH_DIRECT_SOCKS")]
pub static MESH_DIRECT_SOCKS: LruHashMap<u64, DirectSock> = LruHashMap::pinned(MAX_CONNS, 0);

/// Kernel-direct connections by the client socket's addresses; the destination's `sk_lookup`
/// lets exactly these through to the application.
#[map(name = "MESH_DIRECT_CONNS")]
pub static MESH_DIRECT_CONNS: HashMap<SockKey, DirectConn> = HashMap::pinned(MAX_CONNS, 0);

/// What happens to kernel-direct connections, for the agent.
#[map(name = "MESH_DIRECT_EVENTS")]
pub static MESH_DIRECT_EVENTS: RingBuf = RingBuf::pinned(DIRECT_EVENTS_BYTES, 0);

/// The other socket of each kernel-direct connection's socket in the short-cut.
#[map(name = "MESH_DIRECT_PEERS")]
pub static MESH_DIRECT_PEERS: HashMap<NsSockKey, DirectPeer> = HashMap::pinned(MAX_CONNS, 0);

/// Kernel-direct counts, one entry (index 0), one copy per CPU.
#[map(name = "MESH_DIRECT_COUNTERS")]
pub static MESH_DIRECT_COUNTERS: PerCpuArray<DirectCounters> = PerCpuArray::pinned(1, 0);

/// The agent's settings, if the short-cut is available at all.
pub fn shortcut_config() -> Option<&'static MeshConfig> {
    MESH_CONFIG
        .get(0)
        .filter(|c| c.flags & MeshConfig::SOCKMAP != 0)
}
