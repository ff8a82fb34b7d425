//! Whether a short-cut sender may redirect its next message now, read from the kernel's own
//! socket state.
//!
//! `sk_msg` cannot make a sender wait: a redirected message is queued on the peer's psock
//! ingress and charged to the node's TCP memory, whatever the peer has read. Only the TCP path
//! holds a sender back (its send buffer, the peer's window). So a message is redirected only
//! while the peer has less than the budget unread on its short-cut queue; otherwise it takes the
//! TCP path, where TCP's flow control makes the sender block (or `EAGAIN`).
//!
//! **Order.** The peer reads its short-cut queue before its TCP receive queue
//! (`tcp_bpf_recvmsg`), so bytes redirected *after* bytes sent through TCP would overtake them.
//! A sender therefore returns to the short-cut only once its own TCP path is empty: every byte
//! it gave TCP is acknowledged (`write_seq == snd_una`; the sender's socket is locked while its
//! `sk_msg` runs, so nothing is added meanwhile, and an acknowledged byte is on the peer's
//! receive queue or read) and the peer's TCP receive queue is empty (read). Going the other way,
//! from the short-cut to TCP, is always in order.
//!
//! The fields are read with `bpf_probe_read_kernel` at offsets the agent took from the running
//! kernel's BTF (`MeshConfig::offsets`): the sender's own `tcp_sock` (from `sk_msg_md->sk`), and
//! the peer's socket at the address `sockops` recorded in `MESH_SOCK_PTRS` when it entered the
//! short-cut. `sk_msg` cannot look the peer up with a reference (`bpf_sk_release` is not
//! available to it). TCP sockets are freed through `SLAB_TYPESAFE_BY_RCU` and the address is
//! forgotten when the socket closes, so a stale read sees some TCP socket's fields, never
//! unmapped memory: at worst one decision is wrong, and the redirect itself still goes through
//! `MESH_SOCKS` by key.

use aya_ebpf::{
    bindings::bpf_sock, helpers::bpf_probe_read_kernel, helpers::generated::bpf_skc_to_tcp_sock,
};
use mesh_common::{KernelOffsets, MeshConfig};

/// What to do with a short-cut leg's next message.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Redirect,
    /// Send it through TCP: the peer has its budget's worth unread, earlier TCP-path bytes are
    /// not read yet, or the state could not be read.
    Hold,
    /// The peer has no psock (it left the short-cut): the TCP path, as for any socket.
    NoPeer,
}

/// The tag bits of `sk_user_data` (`SK_USER_DATA_NOCOPY | _BPF | _PSOCK`).
const USER_DATA_TAGS: u64 = 7;
/// `SK_USER_DATA_PSOCK`: `sk_user_data` points at the socket's psock.
const USER_DATA_PSOCK: u64 = 4;

/// May the sender `own` redirect a message of `size` bytes to the peer socket at `peer_sk`?
pub fn verdict(config: &MeshConfig, own: *mut bpf_sock, peer_sk: u64, size: u32) -> Verdict {
    check(config, own, peer_sk, size).unwrap_or(Verdict::Hold)
}

/// The sender's `tcp_sock`, from the socket of this `sk_msg` run.
fn own_tcp(own: *mut bpf_sock) -> Option<*const u8> {
    if own.is_null() {
        return None;
    }
    // SAFETY: `own` is the socket of this `sk_msg` run; the helper checks its type.
    let tp = unsafe { bpf_skc_to_tcp_sock(own.cast()) }.cast::<u8>();
    (!tp.is_null()).then_some(tp.cast_const())
}

fn check(config: &MeshConfig, own: *mut bpf_sock, peer_sk: u64, size: u32) -> Option<Verdict> {
    let off = &config.offsets;
    let acked = all_acked(off, own_tcp(own)?)?;
    let peer = peer_sk as *const u8;
    let psock = psock(off, peer)?;
    if psock.is_null() {
        return Some(Verdict::NoPeer);
    }
    if !acked || tcp_unread(off, peer)? {
        return Some(Verdict::Hold);
    }
    let queued: u32 = read(psock, off.psock_msg_tot_len)?;
    if u64::from(queued) + u64::from(size) > u64::from(config.budget) {
        return Some(Verdict::Hold);
    }
    Some(Verdict::Redirect)
}

/// Whether the socket `sk` has every byte it gave TCP acknowledged (`write_seq == snd_una`).
fn all_acked(off: &KernelOffsets, sk: *const u8) -> Option<bool> {
    let write_seq: u32 = read(sk, off.tcp_write_seq)?;
    let snd_una: u32 = read(sk, off.tcp_snd_una)?;
    Some(write_seq == snd_una)
}

/// Whether the socket `sk` has buffers on its TCP receive queue.
fn tcp_unread(off: &KernelOffsets, sk: *const u8) -> Option<bool> {
    let queued: u32 = read(sk, off.sk_receive_qlen)?;
    Some(queued != 0)
}

/// The socket `sk`'s psock; null if it has none (it is not in the short-cut).
fn psock(off: &KernelOffsets, sk: *const u8) -> Option<*const u8> {
    let user_data: u64 = read(sk, off.sk_user_data)?;
    if user_data & USER_DATA_PSOCK == 0 {
        return Some(core::ptr::null());
    }
    Some((user_data & !USER_DATA_TAGS) as *const u8)
}

/// `TCP_ESTABLISHED` and `TCP_CLOSE_WAIT`: the states in which a socket still sends (the
/// latter after its peer's FIN).
const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE_WAIT: u8 = 8;

/// May the application socket `own` send a message of `size` bytes straight to the other
/// application's socket `target`, past both legs (`DirectPair`)? `near` is the agent's socket
/// on `own`'s leg, `far` the agent's socket on `target`'s.
///
/// Only while nothing of this direction is on its way anywhere else, so that no byte overtakes
/// an earlier one (`target` reads its short-cut queue first):
/// - `own` has every byte it gave TCP acknowledged (so on `near`'s queue or read), and is still
///   open (established, or after the other side's FIN);
/// - `near` has nothing unread on either queue: the agent relays what it reads by peeking,
///   writing on and only then consuming, so a byte is either still queued here or already sent
///   on through `far`;
/// - `far` is still open (the agent has not closed it: a connection the agent ended, or whose
///   agent is gone, never goes direct) and has every byte the agent wrote through TCP
///   acknowledged (on `target`'s queue or read);
/// - `target` has read its TCP queue, and has less than twice the budget unread on its
///   short-cut queue: a direct message stands for both legs, each of which may hold a budget's
///   worth, so the bound on what a sender leaves unread stays the same.
pub fn direct(
    config: &MeshConfig,
    own: *mut bpf_sock,
    near: u64,
    far: u64,
    target: u64,
    size: u32,
) -> bool {
    check_direct(
        config,
        own,
        near as *const u8,
        far as *const u8,
        target as *const u8,
        size,
    )
    .unwrap_or(false)
}

fn check_direct(
    config: &MeshConfig,
    own: *mut bpf_sock,
    near: *const u8,
    far: *const u8,
    target: *const u8,
    size: u32,
) -> Option<bool> {
    let off = &config.offsets;
    let tp = own_tcp(own)?;
    let sends = |sk: *const u8| -> Option<bool> {
        let state: u8 = read(sk, off.sk_state)?;
        Some(state == TCP_ESTABLISHED || state == TCP_CLOSE_WAIT)
    };
    // Bytes on the short-cut queue, `None` without a psock.
    let shortcut_unread = |sk: *const u8| -> Option<u32> {
        let psock = psock(off, sk)?;
        if psock.is_null() {
            return None;
        }
        read(psock, off.psock_msg_tot_len)
    };
    let ok = sends(tp)?
        && all_acked(off, tp)?
        && !tcp_unread(off, near)?
        && shortcut_unread(near)? == 0
        && sends(far)?
        && all_acked(off, far)?
        && !tcp_unread(off, target)?
        && u64::from(shortcut_unread(target)?) + u64::from(size) <= 2 * u64::from(config.budget);
    Some(ok)
}

/// The `T` at `base + offset` in kernel memory, or `None` if it cannot be read.
fn read<T>(base: *const u8, offset: u32) -> Option<T> {
    // SAFETY: `bpf_probe_read_kernel` copies from any kernel address and returns an error
    // instead of faulting; the value is plain data.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()) }.ok()
}
