//! Kernel-direct same-node connections (`mesh_common::DirectRoute`): the connect hook sends a
//! client pod's connection straight to an endpoint the agent has authorized for it, `sockops`
//! records its 4-tuple when the SYN goes out (the destination's `sk_lookup` lets exactly that
//! 4-tuple reach the application) and reports it opened and closed to the agent.
//!
//! A route is used only while all of this holds: the client pod opted in
//! (`PodInfo::KERNEL_DIRECT`), the route's generation is the agent's current one (the agent
//! moves on whenever its cluster view changes), and the agent is serving the pod (its outbound
//! listener is open in the pod's namespace). Otherwise the connection is captured for the
//! agent as any other, and fails closed with it.

use aya_ebpf::{
    bindings::{
        bpf_sock, bpf_sock_ops, bpf_sock_tuple, BPF_ANY, BPF_F_CURRENT_NETNS, BPF_NOEXIST,
        BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::generated::{
        bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_sk_lookup_tcp, bpf_sk_release,
        bpf_sock_ops_cb_flags_set,
    },
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext as _,
};
use mesh_common::{
    DirectConn, DirectCounters, DirectEvent, DirectRouteKey, DirectSock, PodInfo, SockAddr,
    SockKey, AF_INET, DIRECT_EVENTS_BYTES, DIRECT_RING_GATE, MAX_DIRECT_TARGETS, OUTBOUND_PORT,
};

use crate::maps::{
    MESH_DIRECT_CONNS, MESH_DIRECT_COUNTERS, MESH_DIRECT_EVENTS, MESH_DIRECT_GENERATION,
    MESH_DIRECT_ROUTES, MESH_DIRECT_SOCKS, MESH_PODS,
};

/// Above this much unread in the ring, an event wakes the agent; below it the agent reads the
/// ring on its own clock, so a connection costs it no wake-up.
const WAKE_AT: u64 = DIRECT_EVENTS_BYTES as u64 / 4;

// A route's endpoint is picked with a mask the verifier can bound.
const _: () = assert!(MAX_DIRECT_TARGETS.is_power_of_two());

/// The endpoint for a connection of the pod in namespace `netns` to `dst`, if a current route
/// sends it kernel-direct; records the socket (`cookie`) as sent so.
pub fn route(
    ctx: &SockAddrContext,
    netns: u64,
    pod: &PodInfo,
    dst: SockAddr,
    cookie: u64,
) -> Option<SockAddr> {
    if pod.flags & PodInfo::KERNEL_DIRECT == 0 {
        return None;
    }
    let generation = *MESH_DIRECT_GENERATION.get(0)?;
    if generation == 0 {
        return None;
    }
    // SAFETY: the value stays valid for the program's run (a replaced element is freed only
    // after it); only the fields needed are copied out, not the whole route (stack space).
    let route = unsafe { MESH_DIRECT_ROUTES.get(DirectRouteKey { netns, dst }) }?;
    if route.generation != generation || route.count == 0 {
        return None;
    }
    #[allow(clippy::cast_possible_truncation)] // 8
    let count = route.count.min(MAX_DIRECT_TARGETS as u32);
    // SAFETY: helper without preconditions.
    let turn = unsafe { bpf_get_prandom_u32() } % count;
    // The verifier does not bound a remainder; a mask it does. Read through a volatile load so
    // that the compiler, which knows `turn < count <= 8`, keeps the mask.
    // SAFETY: reading a local of this frame.
    let turn =
        unsafe { core::ptr::read_volatile(&raw const turn) } as usize & (MAX_DIRECT_TARGETS - 1);
    let target = *route.targets.get(turn)?;
    if !agent_serving(ctx, dst.family) {
        return None;
    }
    if MESH_DIRECT_EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) >= DIRECT_RING_GATE {
        // The agent is behind on the reports: this connection goes through it instead.
        bump(|c| &mut c.ring_busy);
        return None;
    }
    let sock = DirectSock {
        generation,
        orig_dst: dst,
        netns,
    };
    MESH_DIRECT_SOCKS
        .insert(cookie, sock, u64::from(BPF_ANY))
        .ok()?;
    bump(|c| &mut c.connects);
    Some(target)
}

/// Whether the agent's outbound listener for `family` is open in the calling socket's
/// namespace: the agent serves the pod. Without it, routes are not used (the connection is
/// captured and refused, as every connection of a pod whose agent is down).
fn agent_serving(ctx: &SockAddrContext, family: u32) -> bool {
    let listener = SockAddr::outbound_listener(family);
    // SAFETY: an all-zero `bpf_sock_tuple` is a valid value (plain integers).
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if family == AF_INET {
        tuple.__bindgen_anon_1.ipv4.daddr = listener.ip[0];
        tuple.__bindgen_anon_1.ipv4.dport = OUTBOUND_PORT.to_be();
        12
    } else {
        tuple.__bindgen_anon_1.ipv6.daddr = listener.ip;
        tuple.__bindgen_anon_1.ipv6.dport = OUTBOUND_PORT.to_be();
        36
    };
    // SAFETY: helper available to cgroup/sock_addr programs; `tuple` lives on the stack for the
    // call and `size` is its member's size. A returned socket is released below.
    #[allow(clippy::cast_sign_loss)] // BPF_F_CURRENT_NETNS is -1 as the helper's u64
    let sk: *mut bpf_sock = unsafe {
        bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            &raw mut tuple,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` was returned by the lookup above and is released once.
    unsafe { bpf_sk_release(sk.cast()) };
    true
}

/// `BPF_SOCK_OPS_TCP_CONNECT_CB`: a kernel-direct socket is sending its SYN; its 4-tuple (now
/// known: the kernel chose the port) is recorded for the destination's `sk_lookup`, if its
/// address is its pod's own (a socket bound elsewhere goes to the destination's agent as any
/// other connection would).
pub fn connecting(ctx: &SockOpsContext, key: SockKey, netns: u64, cookie: u64) {
    // SAFETY: plain data copied out at once.
    let Some(sock) = (unsafe { MESH_DIRECT_SOCKS.get(cookie) }).copied() else {
        return;
    };
    // SAFETY: plain data copied out at once.
    let Some(pod) = (unsafe { MESH_PODS.get(netns) }).copied() else {
        return;
    };
    let own = if key.local.family == AF_INET {
        key.local.ip[0] == pod.ipv4
    } else {
        key.local.ip == pod.ipv6
    };
    if !own || sock.netns != netns {
        return;
    }
    let conn = DirectConn {
        cookie,
        netns,
        generation: sock.generation,
        // SAFETY: helper without preconditions.
        started_ns: unsafe { bpf_ktime_get_ns() },
        orig_dst: sock.orig_dst,
        redirected: [0, 0],
    };
    if MESH_DIRECT_CONNS
        .insert(key, conn, u64::from(BPF_NOEXIST))
        .is_err()
    {
        return;
    }
    // The state callback reports the close (or the failed connect) and removes the entry.
    // SAFETY: the context is a valid sockops context of a full socket; the flag only adds a
    // callback.
    let _ = unsafe {
        bpf_sock_ops_cb_flags_set(
            ctx.ops,
            ((*ctx.ops).bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG).cast_signed(),
        )
    };
}

/// `ACTIVE_ESTABLISHED` of a kernel-direct socket: reported opened.
pub fn established(key: SockKey) {
    let Some(info) = MESH_DIRECT_CONNS.get_ptr(key) else {
        return;
    };
    report(DirectEvent::OPENED, 0, key, info, [0, 0]);
}

/// `TCP_CLOSE` of a kernel-direct socket: reported closed with its byte counts, and forgotten.
pub fn closed(ops: &bpf_sock_ops, key: SockKey, cookie: u64, old_state: u32) {
    let _ = MESH_DIRECT_SOCKS.remove(cookie);
    let Some(info) = MESH_DIRECT_CONNS.get_ptr(key) else {
        return;
    };
    // SAFETY: a live map value for the program's run.
    if unsafe { (*info).cookie } != cookie {
        return;
    }
    report(
        DirectEvent::CLOSED,
        old_state,
        key,
        info,
        [ops.bytes_acked, ops.bytes_received],
    );
    let _ = MESH_DIRECT_CONNS.remove(key);
}

/// Whether a connection arriving with the client's `key` is a kernel-direct one (for
/// `sk_lookup`).
pub fn admitted(key: SockKey) -> bool {
    // SAFETY: only the presence is read.
    unsafe { MESH_DIRECT_CONNS.get(key) }.is_some()
}

/// The client pod's namespace cookie of the kernel-direct connection whose client socket has
/// `key`.
pub fn client_netns(key: SockKey) -> Option<u64> {
    // SAFETY: one field copied out at once.
    unsafe { MESH_DIRECT_CONNS.get(key) }.map(|c| c.netns)
}

/// Counts `size` bytes `sk_msg` moved past TCP in the connection whose client socket has `key`,
/// `direction` 0 (to the server) or 1 (to the client).
pub fn count_redirected(key: SockKey, direction: u32, size: u32) {
    let Some(conn) = MESH_DIRECT_CONNS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a live map value for the program's run; 8-byte aligned (map values are). The two
    // sockets' senders and the close's read race: an atomic add, never torn.
    unsafe {
        let slot = if direction == 0 {
            &raw mut (*conn).redirected[0]
        } else {
            &raw mut (*conn).redirected[1]
        };
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            slot,
            u64::from(size),
        );
    }
}

/// What a kernel-direct client socket asked for (its `getpeername`).
pub fn orig_dst(cookie: u64) -> Option<SockAddr> {
    // SAFETY: plain data copied out at once.
    unsafe { MESH_DIRECT_SOCKS.get(cookie) }.map(|s| s.orig_dst)
}

/// Writes an event straight into the ring (`sockops` has no stack to spare for a copy):
/// `bytes` are `[bytes_acked, bytes_received]`.
fn report(kind: u32, old_state: u32, conn: SockKey, info: *const DirectConn, bytes: [u64; 2]) {
    let flags = if MESH_DIRECT_EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) >= WAKE_AT {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    let Some(mut entry) = MESH_DIRECT_EVENTS.reserve::<DirectEvent>(0) else {
        bump(|c| &mut c.events_lost);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` is the reserved entry, valid for writes of a whole `DirectEvent` until it
    // is submitted below; `info` is a live map value for the program's run. Every field is
    // written.
    unsafe {
        (*event).kind = kind;
        (*event).old_state = old_state;
        (*event).conn = conn;
        core::ptr::copy_nonoverlapping(info, &raw mut (*event).info, 1);
        (*event).bytes_acked = bytes[0];
        (*event).bytes_received = bytes[1];
        (*event).time_ns = bpf_ktime_get_ns();
    }
    entry.submit(u64::from(flags));
}

/// Adds one to this CPU's counter that `field` picks.
fn bump(field: impl FnOnce(&mut DirectCounters) -> &mut u64) {
    if let Some(c) = MESH_DIRECT_COUNTERS.get_ptr_mut(0) {
        // SAFETY: this CPU's value, live and aligned for the program's run; programs do not
        // migrate while running, so nothing else holds it meanwhile.
        *field(unsafe { &mut *c }) += 1;
    }
}
