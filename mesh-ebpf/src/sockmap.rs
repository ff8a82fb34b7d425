//! `sockops`: at connection establishment, hand a captured connection's original destination
//! to the agent (keyed by the application's socket, with its namespace) and insert the mesh's
//! own pod-local legs into the SOCKHASH. `sk_msg`: send each message of a SOCKHASH socket
//! straight into its peer's receive queue while the peer keeps up, through TCP otherwise; count
//! what it did (`MESH_FASTPATH`).
//!
//! **Which sockets enter** (`mesh_leg`): only the two legs the mesh owns, of a pod that opted in
//! ([`PodInfo::SHORTCUT`]): the application's captured connection (from the pod's own address)
//! to the agent's outbound listener on loopback, with the agent's accepted socket; and the
//! agent's connection to the application (both ends the pod's own address, registered
//! beforehand in `MESH_PEER_ADDR`) with the application's accepted socket. Keys carry the
//! network namespace's cookie, so a socket of one pod can never be found under another pod's
//! key. Applications' own connections (loopback, or to themselves) are never touched.
//!
//! Sockets enter the SOCKHASH at the `*_ESTABLISHED` callbacks, before the application can send,
//! so no byte can be queued on the TCP path before the short-cut takes over.

use aya_ebpf::{
    bindings::{
        bpf_sock_ops, sk_action, BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_skc_to_tcp_sock},
    macros::{sk_msg, sock_ops},
    programs::{SkMsgContext, SockOpsContext},
    EbpfContext as _,
};
use core::{
    ffi::c_long,
    intrinsics::{atomic_xadd, AtomicOrdering},
};

use mesh_common::{DirectPair, DirectPeer, NsSockKey, PodInfo, SockAddr, SockKey, AF_INET};

use crate::{
    addr,
    budget::{self, Verdict},
    direct,
    maps::{
        shortcut_config, MESH_CONN_DST, MESH_DIRECT_PEERS, MESH_FASTPATH, MESH_ORIG_DST,
        MESH_PAIRS, MESH_PEER_ADDR, MESH_PODS, MESH_SOCKS, MESH_SOCK_PTRS,
    },
};

/// Verdict of a `sockops` program (ignored by the kernel for these callbacks).
const SOCKOPS_OK: u32 = 1;

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    let _ = try_sockops(&ctx);
    SOCKOPS_OK
}

#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    try_sk_msg(&ctx);
    // SK_PASS: redirected if the redirect below succeeded, the normal TCP path otherwise.
    sk_action::SK_PASS
}

fn ops_key(ops: &bpf_sock_ops) -> Option<SockKey> {
    addr::conn_key(
        ops.family,
        &addr::End {
            ip4: ops.local_ip4,
            ip6: addr::ip6_field!(ops.local_ip6),
            port: addr::port_host(ops.local_port),
        },
        &addr::End {
            ip4: ops.remote_ip4,
            ip6: addr::ip6_field!(ops.remote_ip6),
            port: addr::port_be_high(ops.remote_port),
        },
    )
}

fn try_sockops(ctx: &SockOpsContext) -> Result<(), i32> {
    let op = ctx.op();
    // SAFETY: the kernel passes a valid `bpf_sock_ops` for the duration of the call.
    let ops = unsafe { &mut *ctx.ops };
    match op {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            established(ctx, ops, op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        }
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            if let Some(key) = ops_key(ops) {
                // SAFETY: helpers available to sockops programs; the context pointer is valid.
                let (netns, cookie) = unsafe {
                    (
                        bpf_get_netns_cookie(ctx.as_ptr()),
                        bpf_get_socket_cookie(ctx.as_ptr()),
                    )
                };
                direct::connecting(ctx, key, netns, cookie);
            }
            Ok(())
        }
        // args[0]: the old state, args[1]: the new one. Only sockets we inserted, captured or
        // sent kernel-direct asked for this callback.
        // SAFETY: `args` is the union's member for state callbacks.
        BPF_SOCK_OPS_STATE_CB if unsafe { ops.__bindgen_anon_1.args[1] } == BPF_TCP_CLOSE => {
            // SAFETY: helper available to sockops programs.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = MESH_ORIG_DST.remove(cookie);
            if let Some(key) = ops_key(ops) {
                // SAFETY: helper available to sockops programs; the context pointer is valid.
                let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
                let _ = MESH_SOCK_PTRS.remove(NsSockKey { netns, sock: key });
                let _ = MESH_DIRECT_PEERS.remove(NsSockKey { netns, sock: key });
                // SAFETY: as above, the state callback's member.
                let old_state = unsafe { ops.__bindgen_anon_1.args[0] };
                direct::closed(ops, key, cookie, old_state);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn established(ctx: &SockOpsContext, ops: &mut bpf_sock_ops, active: bool) -> Result<(), i32> {
    let Some(key) = ops_key(ops) else {
        return Ok(());
    };
    // SAFETY: helper available to sockops programs; the context pointer is valid.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let mut captured = false;
    if active {
        direct::established(key);
        // SAFETY: helper available to sockops programs.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: plain data copied out at once.
        if let Some(dst) = unsafe { MESH_ORIG_DST.get(cookie) }.copied() {
            let conn = NsSockKey { netns, sock: key };
            MESH_CONN_DST.insert(conn, dst, u64::from(BPF_ANY))?;
            captured = true;
            // The entry stays for the application's `getpeername` until the socket closes,
            // when the state callback asked for here removes it.
            // SAFETY: the context is a valid sockops context; the flag only adds a callback.
            let _ = unsafe {
                aya_ebpf::helpers::generated::bpf_sock_ops_cb_flags_set(
                    ctx.ops,
                    (ops.bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG).cast_signed(),
                )
            };
        }
    }
    if shortcut_config().is_none() {
        return Ok(());
    }
    if direct_join(ctx, ops, key, netns, active)? {
        return Ok(());
    }
    match mesh_leg(&key, active, captured) {
        Some(pod_end) if on_shortcut_pod(netns, pod_end) => {}
        _ => return Ok(()),
    }
    enter_shortcut(ctx, ops, NsSockKey { netns, sock: key })
}

/// A kernel-direct connection (`direct`) of two pods that both opted into the short-cut: its
/// two application sockets enter it, each the other's peer (`MESH_DIRECT_PEERS`). The client's
/// socket enters at its `ACTIVE_ESTABLISHED`; the server's at its `PASSIVE_ESTABLISHED` (before
/// the application can accept it), once the client's is in, and then pairs them. `Ok(false)`:
/// not such a socket.
fn direct_join(
    ctx: &SockOpsContext,
    ops: &mut bpf_sock_ops,
    key: SockKey,
    netns: u64,
    active: bool,
) -> Result<bool, i32> {
    let client_key = if active { key } else { key.reversed() };
    let Some(client_netns) = direct::client_netns(client_key) else {
        return Ok(false);
    };
    if !on_shortcut_pod(netns, key.local) {
        return Ok(true);
    }
    let own = NsSockKey { netns, sock: key };
    if active {
        enter_shortcut(ctx, ops, own)?;
        return Ok(true);
    }
    let client = NsSockKey {
        netns: client_netns,
        sock: client_key,
    };
    // SAFETY: only tested for presence.
    if unsafe { MESH_SOCK_PTRS.get(client) }.is_none() {
        return Ok(true);
    }
    enter_shortcut(ctx, ops, own)?;
    // One value, written twice (stack space is tight here).
    let mut entry = DirectPeer {
        peer: client,
        conn: client_key,
        direction: 1,
        reserved: 0,
    };
    MESH_DIRECT_PEERS.insert(own, entry, u64::from(BPF_ANY))?;
    entry.peer = own;
    entry.direction = 0;
    MESH_DIRECT_PEERS.insert(client, entry, u64::from(BPF_ANY))?;
    Ok(true)
}

/// Puts the socket `nskey` into the short-cut (`MESH_SOCKS`, its address in `MESH_SOCK_PTRS`)
/// and asks for its close.
fn enter_shortcut(
    ctx: &SockOpsContext,
    ops: &mut bpf_sock_ops,
    nskey: NsSockKey,
) -> Result<(), i32> {
    // SAFETY: reading the union's pointer member; the helper accepts a null or full socket.
    let sk = unsafe { ops.__bindgen_anon_2.sk };
    if sk.is_null() {
        return Ok(());
    }
    // SAFETY: `sk` is the full socket of this callback; the helper checks its type.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) };
    if tp.is_null() {
        return Ok(());
    }
    let mut nskey = nskey;
    // The address is only ever read back with `bpf_probe_read_kernel` (see `budget`).
    MESH_SOCK_PTRS.insert(nskey, tp as u64, u64::from(BPF_ANY))?;
    let cb_flags = ops.bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG;
    if let Err(e) = MESH_SOCKS.update(&mut nskey, &mut *ops, u64::from(BPF_ANY)) {
        let _ = MESH_SOCK_PTRS.remove(nskey);
        return Err(e);
    }
    // A pair left under these addresses by a connection that ended without its agent removing
    // it (the agent died) names sockets that are gone: never let it reach this new connection.
    let _ = MESH_PAIRS.remove(nskey);
    // Forget the address when the socket closes (the SOCKHASH forgets the socket itself).
    // SAFETY: the context is a valid sockops context; the flag only adds a callback.
    let _ = unsafe {
        aya_ebpf::helpers::generated::bpf_sock_ops_cb_flags_set(ctx.ops, cb_flags.cast_signed())
    };
    Ok(())
}

/// If `key` (this socket's view) is one of the two legs the mesh owns, the end that must be the
/// pod's own address. The outbound leg runs from the pod's address to the agent's listener on
/// loopback; both ends of the delivery leg are the pod's address, and the agent's registered
/// peer entry says which side is which.
fn mesh_leg(key: &SockKey, active: bool, captured: bool) -> Option<SockAddr> {
    let listener = SockAddr::outbound_listener(key.local.family);
    if active {
        // The application's captured connection to the agent's outbound listener.
        if captured && key.remote == listener {
            return Some(key.local);
        }
    } else if key.local == listener {
        // The agent's accepted socket of an outbound connection.
        return Some(key.remote);
    }
    if key.local.ip != key.remote.ip || key.local.family != key.remote.family {
        return None;
    }
    // The agent's connection to the application (registered in `MESH_PEER_ADDR` beforehand,
    // under the application's view), or the application's accepted socket of it.
    let view = if active { key.reversed() } else { *key };
    // SAFETY: plain data, only tested for presence.
    unsafe { MESH_PEER_ADDR.get(view) }.map(|_| key.local)
}

/// Whether the namespace `netns` is a registered pod that opted into the short-cut and `local`
/// is its own address.
fn on_shortcut_pod(netns: u64, local: SockAddr) -> bool {
    // SAFETY: plain data copied out at once.
    let Some(pod) = (unsafe { MESH_PODS.get(netns) }).copied() else {
        return false;
    };
    if pod.flags & PodInfo::SHORTCUT == 0 {
        return false;
    }
    if local.family == AF_INET {
        pod.ipv4 != 0 && local.ip[0] == pod.ipv4
    } else {
        !addr::is_unspecified6(pod.ipv6) && local.ip == pod.ipv6
    }
}

/// What `sk_msg` did with one message.
#[derive(Clone, Copy)]
enum Outcome {
    /// Straight to the other application's socket, past both legs (`DirectPair`).
    Direct,
    Redirected,
    /// The peer is not in the short-cut (or the redirect failed): the normal TCP path.
    Passed,
    /// The peer is, but the budget or the order of bytes asked for the TCP path.
    Held,
}

fn try_sk_msg(ctx: &SkMsgContext) {
    // SAFETY: the kernel passes a valid `sk_msg_md` for the duration of the call.
    let size = unsafe { (*ctx.msg).size };
    let outcome = send(ctx, size);
    count(outcome, size);
}

/// Redirects the message into the peer socket's receive queue if the peer is in the short-cut
/// and may take it now.
fn send(ctx: &SkMsgContext, size: u32) -> Outcome {
    let Some(key) = msg_key(ctx) else {
        return Outcome::Passed;
    };
    let mut peer = key.peer();
    // A leg's peer is in the same namespace; a kernel-direct socket's is the other pod's.
    // SAFETY: plain data copied out at once.
    let (peer_sk, kernel_direct) = match unsafe { MESH_SOCK_PTRS.get(peer) }.copied() {
        Some(sk) => (sk, None),
        // SAFETY: plain data copied out at once.
        None => match unsafe { MESH_DIRECT_PEERS.get(key) }.copied() {
            Some(other) => {
                peer = other.peer;
                // SAFETY: plain data copied out at once.
                let Some(sk) = (unsafe { MESH_SOCK_PTRS.get(peer) }).copied() else {
                    return Outcome::Passed;
                };
                (sk, Some(other))
            }
            None => return Outcome::Passed,
        },
    };
    let Some(config) = shortcut_config() else {
        return Outcome::Passed;
    };
    // SAFETY: the kernel passes a valid `sk_msg_md` for the duration of the call.
    let own = unsafe { (*ctx.msg).__bindgen_anon_3.sk };
    if kernel_direct.is_none() {
        if let Some(pair) = MESH_PAIRS.get_ptr_mut(key) {
            if send_direct(ctx, config, own, peer_sk, pair, size) {
                return Outcome::Direct;
            }
        }
    }
    match budget::verdict(config, own, peer_sk, size) {
        Verdict::Redirect => {}
        Verdict::Hold => return Outcome::Held,
        Verdict::NoPeer => return Outcome::Passed,
    }
    if MESH_SOCKS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS))
        != c_long::from(sk_action::SK_PASS)
    {
        return Outcome::Passed;
    }
    if let Some(other) = kernel_direct {
        direct::count_redirected(other.conn, other.direction, size);
    }
    Outcome::Redirected
}

/// Sends the message straight to the other application's socket if nothing of this direction
/// is queued on either leg (`budget::direct`), and counts it in the pair. `near_sk`: the agent's
/// socket on this leg.
fn send_direct(
    ctx: &SkMsgContext,
    config: &mesh_common::MeshConfig,
    own: *mut aya_ebpf::bindings::bpf_sock,
    near_sk: u64,
    pair: *mut DirectPair,
    size: u32,
) -> bool {
    // SAFETY: `pair` points at a live map value for the program's run; plain data.
    let far = unsafe { (*pair).far };
    let mut target = far.peer();
    // SAFETY: plain data copied out at once.
    let (Some(far_sk), Some(target_sk)) = (
        unsafe { MESH_SOCK_PTRS.get(far) }.copied(),
        // SAFETY: as above.
        unsafe { MESH_SOCK_PTRS.get(target) }.copied(),
    ) else {
        return false;
    };
    if !budget::direct(config, own, near_sk, far_sk, target_sk, size) {
        return false;
    }
    if MESH_SOCKS.redirect_msg(ctx, &mut target, u64::from(BPF_F_INGRESS))
        != c_long::from(sk_action::SK_PASS)
    {
        return false;
    }
    // SAFETY: as above; 8-byte aligned (map values are). Senders of one socket are serialized
    // by its lock, but the agent reads the value concurrently: an atomic add, never torn.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
            &raw mut (*pair).bytes,
            u64::from(size),
        );
    }
    true
}

/// This socket's key, with its namespace.
fn msg_key(ctx: &SkMsgContext) -> Option<NsSockKey> {
    // SAFETY: the kernel passes a valid `sk_msg_md` for the duration of the call.
    let md = unsafe { &*ctx.msg };
    let sock = addr::conn_key(
        md.family,
        &addr::End {
            ip4: md.local_ip4,
            ip6: addr::ip6_field!(md.local_ip6),
            port: addr::port_host(md.local_port),
        },
        &addr::End {
            ip4: md.remote_ip4,
            ip6: addr::ip6_field!(md.remote_ip6),
            port: addr::port_be_high(md.remote_port),
        },
    )?;
    // SAFETY: helper available to sk_msg programs; the context pointer is valid.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    Some(NsSockKey { netns, sock })
}

/// Adds one message of `size` bytes to this CPU's fast-path counters.
///
/// Atomic adds although the value is per CPU: `sk_msg` runs in the sending task's context with
/// only migration disabled, so on a preemptible kernel another sender on the same CPU can run
/// the program between a plain load and store, and one of the two updates would be lost.
fn count(outcome: Outcome, size: u32) {
    let Some(counters) = MESH_FASTPATH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: `counters` points at this CPU's value of a live map entry, 8-byte aligned (map
    // values are), valid for the program's run; the kernel side only ever adds to it atomically.
    // The results are unused, so LLVM emits plain atomic adds (no fetch: any BPF CPU version).
    unsafe {
        let (msgs, bytes) = match outcome {
            Outcome::Direct => (
                &raw mut (*counters).direct_msgs,
                &raw mut (*counters).direct_bytes,
            ),
            Outcome::Redirected => (
                &raw mut (*counters).redirected_msgs,
                &raw mut (*counters).redirected_bytes,
            ),
            Outcome::Passed => (
                &raw mut (*counters).passed_msgs,
                &raw mut (*counters).passed_bytes,
            ),
            Outcome::Held => (
                &raw mut (*counters).held_msgs,
                &raw mut (*counters).held_bytes,
            ),
        };
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(msgs, 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(bytes, u64::from(size));
    }
}
