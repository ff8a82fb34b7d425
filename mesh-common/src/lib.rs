//! Types shared by the kernel programs (`mesh-ebpf`) and the node agent (`mesh-agent`).
//!
//! Every type that crosses the kernel/user boundary is `#[repr(C)]`, built from fixed-width
//! integers only (no `bool`, no enums with niches) and laid out without implicit padding, so the
//! two sides agree byte for byte. The `user` feature adds the `aya::Pod` implementations.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

/// Names of the maps and programs in the kernel object, used by the agent to find them and as
/// the file names under the agent's bpffs pin directory.
pub mod names {
    /// Per-cgroup socket counters, keyed by cgroup id (`u64`), value [`super::CgroupCounters`].
    pub const CGROUP_COUNTERS: &str = "MESH_CGROUP_COUNTERS";
    /// Meshed pods by network-namespace cookie (`u64`), value [`super::PodInfo`].
    pub const PODS: &str = "MESH_PODS";
    /// Original destination of a captured `connect()`, by socket cookie (`u64`).
    pub const ORIG_DST: &str = "MESH_ORIG_DST";
    /// Original destination of a captured connection by the application's socket
    /// ([`super::NsSockKey`]: its namespace, its address, the outbound listener), for the agent.
    pub const CONN_DST: &str = "MESH_CONN_DST";
    /// Address the application must see as its peer, by its socket ([`super::SockKey`]).
    pub const PEER_ADDR: &str = "MESH_PEER_ADDR";
    /// SOCKHASH of the short-cut legs' sockets, by [`super::NsSockKey`]: `sk_msg` redirects
    /// within it.
    pub const SOCKS: &str = "MESH_SOCKS";
    /// The kernel address of each socket in [`SOCKS`] (same key, value `u64`), so a sender's
    /// `sk_msg` can see how much its peer has not read yet.
    pub const SOCK_PTRS: &str = "MESH_SOCK_PTRS";
    /// SOCKHASH of the agent's inbound listeners, by pod address ([`super::SockAddr`], port 0).
    pub const LISTENERS: &str = "MESH_LISTENERS";
    /// One [`super::MeshConfig`] at index 0.
    pub const CONFIG: &str = "MESH_CONFIG";
    /// Per-CPU array of one [`super::FastpathCounters`] at index 0: what `sk_msg` did.
    pub const FASTPATH: &str = "MESH_FASTPATH";
    /// Same-node connections spliced application to application, by each application
    /// socket's [`super::NsSockKey`]: a [`super::DirectPair`] (the agent's socket toward the
    /// other application, and the bytes sent straight to it). Written by the agent only.
    pub const PAIRS: &str = "MESH_PAIRS";
    /// Kernel-direct routes: [`super::DirectRouteKey`] to [`super::DirectRoute`]. Written by the
    /// agent only.
    pub const DIRECT_ROUTES: &str = "MESH_DIRECT_ROUTES";
    /// One `u64` at index 0: the agent's current route generation (0: no route is valid).
    pub const DIRECT_GENERATION: &str = "MESH_DIRECT_GENERATION";
    /// Client sockets sent kernel-direct, by socket cookie (`u64`): [`super::DirectSock`].
    pub const DIRECT_SOCKS: &str = "MESH_DIRECT_SOCKS";
    /// Kernel-direct connections by the client socket's [`super::SockKey`]:
    /// [`super::DirectConn`].
    pub const DIRECT_CONNS: &str = "MESH_DIRECT_CONNS";
    /// Ring of [`super::DirectEvent`]s.
    pub const DIRECT_EVENTS: &str = "MESH_DIRECT_EVENTS";
    /// Per-CPU array of one [`super::DirectCounters`] at index 0.
    pub const DIRECT_COUNTERS: &str = "MESH_DIRECT_COUNTERS";
    /// The other socket of a kernel-direct connection in the short-cut, by each socket's
    /// [`super::NsSockKey`]: [`super::DirectPeer`]. Written by `sockops` only.
    pub const DIRECT_PEERS: &str = "MESH_DIRECT_PEERS";

    pub const PROG_CONNECT4: &str = "mesh_connect4";
    pub const PROG_CONNECT6: &str = "mesh_connect6";
    pub const PROG_GETPEERNAME4: &str = "mesh_getpeername4";
    pub const PROG_GETPEERNAME6: &str = "mesh_getpeername6";
    pub const PROG_BIND4: &str = "mesh_bind4";
    pub const PROG_BIND6: &str = "mesh_bind6";
    pub const PROG_SOCKOPS: &str = "mesh_sockops";
    pub const PROG_SK_MSG: &str = "mesh_sk_msg";
    pub const PROG_SK_LOOKUP: &str = "mesh_sk_lookup";
}

/// Maximum number of cgroups (pods) the counter map tracks on one node.
pub const MAX_CGROUPS: u32 = 16_384;
/// Maximum number of meshed pods on one node.
pub const MAX_PODS: u32 = 4_096;
/// Maximum number of connections being set up or relayed at once on one node.
pub const MAX_CONNS: u32 = 262_144;
/// Largest short-cut budget: how many bytes a sender may leave unread in its peer's short-cut
/// queue before it takes the TCP path (and TCP's flow control) instead.
pub const MAX_SHORTCUT_BUDGET: u32 = 4 << 20;

pub use addr::{
    NsSockKey, SockAddr, SockKey, AF_INET, AF_INET6, HBONE_PORT, INBOUND_PORT, OUTBOUND_IPV4,
    OUTBOUND_IPV6, OUTBOUND_PORT, RESERVED_PORTS,
};

/// A meshed pod's addresses: its connect hook binds captured sockets to them (so the
/// application's address stays the pod's), and its short-cut legs must be on them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// IPv4 address, network byte order; 0 if the pod has none.
    pub ipv4: u32,
    /// IPv6 address, network byte order words; all zero if the pod has none.
    pub ipv6: [u32; 4],
    /// [`PodInfo::SHORTCUT`], [`PodInfo::KERNEL_DIRECT`]; other bits zero.
    pub flags: u32,
    pub reserved: [u32; 2],
}

impl PodInfo {
    /// The pod opted into the `sk_msg` short-cut: its mesh legs enter `MESH_SOCKS`.
    pub const SHORTCUT: u32 = 1;
    /// The pod's connections may go kernel-direct ([`DirectRoute`]) to pods of this node.
    pub const KERNEL_DIRECT: u32 = 2;
}

/// Settings the agent gives the kernel programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshConfig {
    /// [`MeshConfig::SOCKMAP`] and future flags.
    pub flags: u32,
    /// Bytes a sender may leave unread in its peer's short-cut queue (at most
    /// [`MAX_SHORTCUT_BUDGET`]); beyond it, its messages take the TCP path.
    pub budget: u32,
    pub offsets: KernelOffsets,
}

impl MeshConfig {
    /// The short-cut is available: the pods that opted in ([`PodInfo::SHORTCUT`]) have their
    /// mesh legs inserted into the SOCKHASH, and `sk_msg` short-cuts them.
    pub const SOCKMAP: u32 = 1;
}

/// Byte offsets of the kernel structure fields the `sk_msg` program reads to hold a sender to
/// its budget and keep its bytes in order. Read from the running kernel's BTF by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `struct tcp_sock`, `write_seq` (`u32`): the end of what the socket was given to send.
    pub tcp_write_seq: u32,
    /// `struct tcp_sock`, `snd_una` (`u32`): the first byte not yet acknowledged.
    pub tcp_snd_una: u32,
    /// `struct sock`, `sk_user_data` (pointer): the socket's psock, tagged in its low bits.
    pub sk_user_data: u32,
    /// `struct sock`, `sk_receive_queue.qlen` (`u32`): buffers on the TCP receive queue.
    pub sk_receive_qlen: u32,
    /// `struct sk_psock`, `msg_tot_len` (`u32`): bytes queued on the short-cut ingress.
    pub psock_msg_tot_len: u32,
    /// `struct sock`, `__sk_common.skc_state` (`u8`): the TCP state (`TCP_ESTABLISHED`, ...).
    pub sk_state: u32,
}

/// A same-node connection whose two applications' sockets talk straight to each other, one
/// entry per application socket (by its [`NsSockKey`]), written by the agent once it has
/// authorized and connected the connection.
///
/// The connection keeps its two legs (application ↔ agent ↔ application), and the agent keeps
/// both of its sockets: it still sees each end's FIN and reset, relays whatever the kernel sends
/// it (bytes sent before the pair existed, or while a direct message would overtake earlier
/// ones), and closes both legs when the connection ends or a policy revokes it. `sk_msg` sends
/// an application's message into the other application's socket (`far.peer()`) only while
/// nothing of that direction is queued anywhere on the two legs, so no byte overtakes another.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectPair {
    /// The agent's socket on the other leg (its connection to the other application): the
    /// message goes to its peer, the other application's socket.
    pub far: NsSockKey,
    /// Bytes `sk_msg` sent straight to the other application; the agent adds them to the
    /// connection's counts when it ends.
    pub bytes: u64,
}

/// Socket-layer counters for one cgroup (one pod), summed by user space across CPUs.
///
/// Only whole `u64` fields: the layout is 8-byte aligned with no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupCounters {
    /// `connect()` calls on IPv4 TCP sockets seen by the `cgroup/connect4` hook.
    pub connect4: u64,
    /// `connect()` calls on IPv6 TCP sockets seen by the `cgroup/connect6` hook.
    pub connect6: u64,
}

impl CgroupCounters {
    /// Adds another CPU's (or another snapshot's) counts to this one.
    #[must_use]
    pub const fn sum(self, other: Self) -> Self {
        Self {
            connect4: self.connect4.wrapping_add(other.connect4),
            connect6: self.connect6.wrapping_add(other.connect6),
        }
    }
}

/// What the `sk_msg` program did with the messages of the SOCKHASH's sockets, node-wide, one
/// copy per CPU (user space sums them).
///
/// A message is what one run of `sk_msg` sees: a large `sendmsg()` is cut into several (one
/// message's scatterlist is bounded), so message counts depend on the senders' calls and the
/// kernel's chunking; byte counts do not. Only whole `u64` fields: no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastpathCounters {
    /// Messages moved straight into the peer socket's receive queue.
    pub redirected_msgs: u64,
    /// Their bytes.
    pub redirected_bytes: u64,
    /// Messages that took the normal TCP path: the peer socket was not in the SOCKHASH (a leg
    /// that left the short-cut) or the redirect failed.
    pub passed_msgs: u64,
    /// Their bytes.
    pub passed_bytes: u64,
    /// Messages of short-cut legs sent through TCP instead: the peer had a budget's worth
    /// unread, or earlier TCP-path bytes of the leg were still unread (order is kept).
    pub held_msgs: u64,
    /// Their bytes.
    pub held_bytes: u64,
    /// Messages of a same-node connection's application sent straight to the other
    /// application's socket ([`DirectPair`]), past both legs and the agent.
    pub direct_msgs: u64,
    /// Their bytes.
    pub direct_bytes: u64,
}

impl FastpathCounters {
    /// Adds another CPU's (or another snapshot's) counts to this one.
    #[must_use]
    pub const fn sum(self, other: Self) -> Self {
        Self {
            redirected_msgs: self.redirected_msgs.wrapping_add(other.redirected_msgs),
            redirected_bytes: self.redirected_bytes.wrapping_add(other.redirected_bytes),
            passed_msgs: self.passed_msgs.wrapping_add(other.passed_msgs),
            passed_bytes: self.passed_bytes.wrapping_add(other.passed_bytes),
            held_msgs: self.held_msgs.wrapping_add(other.held_msgs),
            held_bytes: self.held_bytes.wrapping_add(other.held_bytes),
            direct_msgs: self.direct_msgs.wrapping_add(other.direct_msgs),
            direct_bytes: self.direct_bytes.wrapping_add(other.direct_bytes),
        }
    }
}

mod addr;
mod direct;
pub use direct::{
    DirectConn, DirectCounters, DirectEvent, DirectPeer, DirectRoute, DirectRouteKey, DirectSock,
    DIRECT_EVENTS_BYTES, DIRECT_RING_GATE, MAX_DIRECT_ROUTES, MAX_DIRECT_TARGETS,
};

#[cfg(feature = "user")]
mod user;
#[cfg(feature = "user")]
pub use user::outbound_listener;

#[cfg(test)]
mod tests {
    use super::{CgroupCounters, FastpathCounters};

    #[test]
    fn shared_types_have_no_padding() {
        // Size equals the sum of the fields: no implicit padding anywhere.
        assert_eq!(size_of::<CgroupCounters>(), 16);
        assert_eq!(align_of::<CgroupCounters>(), 8);
        assert_eq!(size_of::<FastpathCounters>(), 64);
        assert_eq!(align_of::<FastpathCounters>(), 8);
        assert_eq!(size_of::<super::SockAddr>(), 24);
        assert_eq!(size_of::<super::SockKey>(), 48);
        assert_eq!(size_of::<super::NsSockKey>(), 56);
        assert_eq!(align_of::<super::NsSockKey>(), 8);
        assert_eq!(size_of::<super::PodInfo>(), 32);
        assert_eq!(size_of::<super::KernelOffsets>(), 24);
        assert_eq!(size_of::<super::MeshConfig>(), 32);
        assert_eq!(size_of::<super::DirectPair>(), 64);
        assert_eq!(size_of::<super::DirectRouteKey>(), 32);
        assert_eq!(
            size_of::<super::DirectRoute>(),
            16 + 24 * super::MAX_DIRECT_TARGETS
        );
        assert_eq!(size_of::<super::DirectSock>(), 40);
        assert_eq!(size_of::<super::DirectConn>(), 72);
        assert_eq!(size_of::<super::DirectEvent>(), 8 + 48 + 72 + 24);
        assert_eq!(size_of::<super::DirectPeer>(), 56 + 48 + 8);
        assert_eq!(align_of::<super::DirectEvent>(), 8);
        assert_eq!(size_of::<super::DirectCounters>(), 24);
    }

    #[test]
    fn sum_adds_each_field() {
        let a = CgroupCounters {
            connect4: 2,
            connect6: 1,
        };
        let b = CgroupCounters {
            connect4: 3,
            connect6: 0,
        };
        assert_eq!(
            a.sum(b),
            CgroupCounters {
                connect4: 5,
                connect6: 1
            }
        );
    }

    #[test]
    fn fastpath_sum_adds_each_field_and_wraps() {
        let a = FastpathCounters {
            redirected_msgs: 1,
            redirected_bytes: 100,
            passed_msgs: 2,
            passed_bytes: u64::MAX,
            held_msgs: 5,
            held_bytes: 7,
            direct_msgs: 9,
            direct_bytes: 90,
        };
        let b = FastpathCounters {
            redirected_msgs: 3,
            redirected_bytes: 50,
            passed_msgs: 0,
            passed_bytes: 2,
            held_msgs: 1,
            held_bytes: 1,
            direct_msgs: 1,
            direct_bytes: 10,
        };
        assert_eq!(
            a.sum(b),
            FastpathCounters {
                redirected_msgs: 4,
                redirected_bytes: 150,
                passed_msgs: 2,
                passed_bytes: 1,
                held_msgs: 6,
                held_bytes: 8,
                direct_msgs: 10,
                direct_bytes: 100,
            }
        );
    }
}
