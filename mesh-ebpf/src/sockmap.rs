//! `sockops`: at connection establishment, hand a captured connection's original destination
//! to the agent (keyed by the client's address) and insert pod-local legs into the SOCKHASH.
//! `sk_msg`: send each message of a SOCKHASH socket straight into its peer's receive queue, and
//! count what was redirected and what took the TCP path (`MESH_FASTPATH`).
//!
//! Sockets enter the SOCKHASH at the `*_ESTABLISHED` callbacks, before the application can send,
//! so no byte ever takes the TCP path after one has taken the short-cut (which would reorder).

use aya_ebpf::{
    bindings::{
        bpf_sock_ops, sk_action, BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
    },
    helpers::generated::bpf_get_socket_cookie,
    macros::{sk_msg, sock_ops},
    programs::{SkMsgContext, SockOpsContext},
    EbpfContext as _,
};
use core::{
    ffi::c_long,
    intrinsics::{atomic_xadd, AtomicOrdering},
};

use mesh_common::SockKey;

use crate::{
    addr,
    maps::{sockmap_enabled, MESH_CONN_DST, MESH_FASTPATH, MESH_ORIG_DST, MESH_SOCKS},
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
    // SK_PASS: redirected if the redirect above succeeded, the normal path otherwise.
    sk_action::SK_PASS
}

fn ops_key(ops: &bpf_sock_ops) -> Option<SockKey> {
    let local_ip6 = [
        ops.local_ip6[0],
        ops.local_ip6[1],
        ops.local_ip6[2],
        ops.local_ip6[3],
    ];
    let remote_ip6 = [
        ops.remote_ip6[0],
        ops.remote_ip6[1],
        ops.remote_ip6[2],
        ops.remote_ip6[3],
    ];
    let local = addr::from_parts(
        ops.family,
        ops.local_ip4,
        local_ip6,
        addr::port_host(ops.local_port),
    )?;
    let remote = addr::from_parts(
        ops.family,
        ops.remote_ip4,
        remote_ip6,
        addr::port_be_high(ops.remote_port),
    )?;
    Some(SockKey { local, remote })
}

fn try_sockops(ctx: &SockOpsContext) -> Result<(), i32> {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return Ok(());
    }
    // SAFETY: the kernel passes a valid `bpf_sock_ops` for the duration of the call.
    let ops = unsafe { &mut *ctx.ops };
    let Some(key) = ops_key(ops) else {
        return Ok(());
    };
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // SAFETY: helper available to sockops programs.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: plain data copied out at once.
        if let Some(dst) = unsafe { MESH_ORIG_DST.get(cookie) }.copied() {
            MESH_CONN_DST.insert(key.local, dst, u64::from(BPF_ANY))?;
            let _ = MESH_ORIG_DST.remove(cookie);
        }
    }
    // Pod-local legs connect a pod's address to itself: app to the agent's outbound listener,
    // and the agent to the app. Both sockets live in the same namespace.
    if key.local.ip == key.remote.ip && key.local.family == key.remote.family && sockmap_enabled() {
        let mut key = key;
        MESH_SOCKS.update(&mut key, ops, u64::from(BPF_ANY))?;
    }
    Ok(())
}

fn try_sk_msg(ctx: &SkMsgContext) {
    // SAFETY: the kernel passes a valid `sk_msg_md` for the duration of the call.
    let size = unsafe { (*ctx.msg).size };
    let redirected = redirect(ctx);
    count(redirected, size);
}

/// Asks for the message to be moved into the peer socket's receive queue; whether the helper
/// accepted (`SK_PASS`: the peer is in `MESH_SOCKS`). `false` leaves it to the TCP path.
fn redirect(ctx: &SkMsgContext) -> bool {
    // SAFETY: the kernel passes a valid `sk_msg_md` for the duration of the call.
    let md = unsafe { &*ctx.msg };
    let local_ip6 = [
        md.local_ip6[0],
        md.local_ip6[1],
        md.local_ip6[2],
        md.local_ip6[3],
    ];
    let remote_ip6 = [
        md.remote_ip6[0],
        md.remote_ip6[1],
        md.remote_ip6[2],
        md.remote_ip6[3],
    ];
    let (Some(local), Some(remote)) = (
        addr::from_parts(
            md.family,
            md.local_ip4,
            local_ip6,
            addr::port_host(md.local_port),
        ),
        addr::from_parts(
            md.family,
            md.remote_ip4,
            remote_ip6,
            addr::port_be_high(md.remote_port),
        ),
    ) else {
        return false;
    };
    // The peer socket's own view of the connection.
    let mut peer = SockKey {
        local: remote,
        remote: local,
    };
    MESH_SOCKS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS))
        == c_long::from(sk_action::SK_PASS)
}

/// Adds one message of `size` bytes to this CPU's fast-path counters.
///
/// Atomic adds although the value is per CPU: `sk_msg` runs in the sending task's context with
/// only migration disabled, so on a preemptible kernel another sender on the same CPU can run
/// the program between a plain load and store, and one of the two updates would be lost.
fn count(redirected: bool, size: u32) {
    let Some(counters) = MESH_FASTPATH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: `counters` points at this CPU's value of a live map entry, 8-byte aligned (map
    // values are), valid for the program's run; the kernel side only ever adds to it atomically.
    // The results are unused, so LLVM emits plain atomic adds (no fetch: any BPF CPU version).
    unsafe {
        let (msgs, bytes) = if redirected {
            (
                &raw mut (*counters).redirected_msgs,
                &raw mut (*counters).redirected_bytes,
            )
        } else {
            (
                &raw mut (*counters).passed_msgs,
                &raw mut (*counters).passed_bytes,
            )
        };
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(msgs, 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(bytes, u64::from(size));
    }
}
