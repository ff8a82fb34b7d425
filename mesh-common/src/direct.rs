//! Same-node connections the kernel connects straight from one pod to the other
//! ("kernel-direct"), for client pods that opted in ([`crate::PodInfo::KERNEL_DIRECT`]): the
//! agent, after authorizing a first connection through itself, writes a [`DirectRoute`] for the
//! client pod and destination; the connect hook then sends the pod's next connections to that
//! destination to one of the route's endpoints itself, and the agent learns of each from
//! [`DirectEvent`]s (metrics, access log, policy re-checks).

use crate::addr::{NsSockKey, SockAddr, SockKey};

/// Most endpoints one [`DirectRoute`] holds; a Service with more goes through the agent.
pub const MAX_DIRECT_TARGETS: usize = 8;
/// Most routes on one node (client pods × destinations).
pub const MAX_DIRECT_ROUTES: u32 = 65_536;
/// Bytes of the ring the kernel reports kernel-direct connections on.
pub const DIRECT_EVENTS_BYTES: u32 = 1 << 20;
/// Unread bytes of the ring at which the connect hook stops sending connections kernel-direct
/// (they go through the agent, which sees them itself) until the agent has read it: a pod that
/// opens connections faster than the agent reads their reports cannot fill the ring with them,
/// so every kernel-direct connection's opening is reported, and the other half stays for the
/// closes of those already open.
pub const DIRECT_RING_GATE: u64 = DIRECT_EVENTS_BYTES as u64 / 2;

/// A client pod (its network namespace's cookie) and a destination it dials (a Service VIP and
/// port, or a pod's address and port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DirectRouteKey {
    pub netns: u64,
    pub dst: SockAddr,
}

/// Where the connect hook may send a client pod's connections to a destination without the
/// agent: every endpoint the agent would pick for it, each on this node and allowed by the
/// destination's policy for this client. Valid only while `generation` is the agent's current
/// one ([`crate::names::DIRECT_GENERATION`]); the agent moves to a new generation whenever the
/// cluster view changes, so a route never outlives the view it was decided in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectRoute {
    pub generation: u64,
    /// How many of `targets` are set (1..=[`MAX_DIRECT_TARGETS`]).
    pub count: u32,
    pub reserved: u32,
    pub targets: [SockAddr; MAX_DIRECT_TARGETS],
}

/// A client socket the connect hook sent straight to an endpoint, by its socket cookie: what it
/// asked for (shown back by `getpeername`) and the generation of the route that sent it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectSock {
    pub generation: u64,
    pub orig_dst: SockAddr,
    /// The client pod's network namespace cookie.
    pub netns: u64,
}

/// A kernel-direct connection, by its client socket's [`SockKey`] (the pod's address and port,
/// the endpoint's): written by `sockops` when the client sends its SYN, removed when the socket
/// closes. The destination pod's `sk_lookup` lets exactly these 4-tuples reach the application;
/// every other connection still goes to the agent. A restarted agent re-checks those it finds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectConn {
    pub cookie: u64,
    pub netns: u64,
    pub generation: u64,
    /// `bpf_ktime_get_ns` when the SYN went out (`CLOCK_MONOTONIC`).
    pub started_ns: u64,
    pub orig_dst: SockAddr,
    /// Bytes `sk_msg` moved straight into the other socket, `[client to server, server to
    /// client]` (both pods in the short-cut), which TCP's counts do not see.
    pub redirected: [u64; 2],
}

/// The other socket of a kernel-direct connection whose two sockets are in the short-cut, by
/// each socket's `NsSockKey` ([`crate::names::DIRECT_PEERS`]): `sk_msg` sends to `peer`, and
/// counts in `conn`'s entry of [`crate::names::DIRECT_CONNS`], slot `direction`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectPeer {
    pub peer: NsSockKey,
    /// The client socket's key (the connection's key in `DIRECT_CONNS`).
    pub conn: SockKey,
    /// 0: this socket is the client's (bytes go to the server), 1: the server's.
    pub direction: u32,
    pub reserved: u32,
}

/// What the kernel reports about a kernel-direct connection ([`crate::names::DIRECT_EVENTS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectEvent {
    /// [`DirectEvent::OPENED`] or [`DirectEvent::CLOSED`].
    pub kind: u32,
    /// For [`DirectEvent::CLOSED`]: the TCP state the socket closed from (`TCP_SYN_SENT`: it
    /// never connected; `TCP_FIN_WAIT2`, `TCP_TIME_WAIT`, `TCP_CLOSING`, `TCP_LAST_ACK`: both
    /// ends' FINs went through, and each counts as a byte in the counts below).
    pub old_state: u32,
    pub conn: SockKey,
    pub info: DirectConn,
    /// For [`DirectEvent::CLOSED`]: sequence space the client sent that the server acknowledged
    /// (`tcp_sock.bytes_acked`: the SYN and a FIN count one each).
    pub bytes_acked: u64,
    /// For [`DirectEvent::CLOSED`]: sequence space the client received after the server's SYN
    /// (`tcp_sock.bytes_received`: a FIN counts one).
    pub bytes_received: u64,
    /// `bpf_ktime_get_ns` of the event.
    pub time_ns: u64,
}

impl DirectEvent {
    /// The client's connection is established (`ACTIVE_ESTABLISHED`).
    pub const OPENED: u32 = 1;
    /// The client's socket closed (`TCP_CLOSE`), established or not.
    pub const CLOSED: u32 = 2;

    const TCP_SYN_SENT: u32 = 2;
    const TCP_FIN_WAIT2: u32 = 5;
    const TCP_TIME_WAIT: u32 = 6;
    const TCP_LAST_ACK: u32 = 9;
    const TCP_CLOSING: u32 = 11;

    /// Whether a closed connection had ever connected.
    #[must_use]
    pub const fn was_established(&self) -> bool {
        self.old_state != Self::TCP_SYN_SENT
    }

    /// The application bytes of a closed connection, `[client to server, server to client]`:
    /// what `sk_msg` moved past TCP, and TCP's counts of sequence space less what is not data: the SYN the server
    /// acknowledged, and both FINs of a connection closed in order (a connection reset after
    /// its own FIN may count one byte too many).
    #[must_use]
    pub const fn app_bytes(&self) -> [u64; 2] {
        let fins = matches!(
            self.old_state,
            Self::TCP_FIN_WAIT2 | Self::TCP_TIME_WAIT | Self::TCP_LAST_ACK | Self::TCP_CLOSING
        );
        let (syn, fin) = (self.was_established() as u64, fins as u64);
        [
            self.bytes_acked.saturating_sub(syn + fin) + self.info.redirected[0],
            self.bytes_received.saturating_sub(fin) + self.info.redirected[1],
        ]
    }
}

/// Kernel-direct counters, one per CPU ([`crate::names::DIRECT_COUNTERS`]). Only whole `u64`
/// fields: no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectCounters {
    /// Connections the connect hook sent kernel-direct.
    pub connects: u64,
    /// Events the ring had no room for (the agent then misses a connection's record).
    pub events_lost: u64,
    /// Connections a current route would have sent kernel-direct that went through the agent
    /// instead, because half the ring was unread ([`DIRECT_RING_GATE`]).
    pub ring_busy: u64,
}

impl DirectCounters {
    /// Adds another CPU's counts to this one.
    #[must_use]
    pub const fn sum(self, other: Self) -> Self {
        Self {
            connects: self.connects.wrapping_add(other.connects),
            events_lost: self.events_lost.wrapping_add(other.events_lost),
            ring_busy: self.ring_busy.wrapping_add(other.ring_busy),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DirectEvent;

    fn closed(old_state: u32, acked: u64, received: u64) -> DirectEvent {
        DirectEvent {
            kind: DirectEvent::CLOSED,
            old_state,
            bytes_acked: acked,
            bytes_received: received,
            ..DirectEvent::default()
        }
    }

    #[test]
    fn app_bytes_leave_out_the_syn_and_the_fins() {
        // Half-closed by the client, then the server's FIN (what the testbed measured).
        assert_eq!(closed(5, 10_002, 10_001).app_bytes(), [10_000, 10_000]);
        // Closed by the server first.
        assert_eq!(closed(9, 7, 4).app_bytes(), [5, 3]);
        // Reset while established: no FIN either way.
        assert_eq!(closed(1, 6, 5).app_bytes(), [5, 5]);
        // Never connected.
        assert_eq!(closed(2, 0, 0).app_bytes(), [0, 0]);
        // Both sockets in the short-cut: what went past TCP is added.
        let mut shortcut = closed(5, 102, 51);
        shortcut.info.redirected = [900, 950];
        assert_eq!(shortcut.app_bytes(), [1_000, 1_000]);
        assert!(!closed(2, 0, 0).was_established());
    }
}
