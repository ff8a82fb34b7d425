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
use mesh_common::MeshConfig;

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

fn check(config: &MeshConfig, own: *mut bpf_sock, peer_sk: u64, size: u32) -> Option<Verdict> {
    let off = &config.offsets;
    if own.is_null() {
        return None;
    }
    // SAFETY: `own` is the socket of this `sk_msg` run; the helper checks its type.
    let tp = unsafe { bpf_skc_to_tcp_sock(own.cast()) }.cast::<u8>();
    if tp.is_null() {
        return None;
    }
    let write_seq: u32 = read(tp, off.tcp_write_seq)?;
    let snd_una: u32 = read(tp, off.tcp_snd_una)?;
    let peer = peer_sk as *const u8;
    let user_data: u64 = read(peer, off.sk_user_data)?;
    if user_data & USER_DATA_PSOCK == 0 {
        return Some(Verdict::NoPeer);
    }
    if write_seq != snd_una {
        return Some(Verdict::Hold);
    }
    let queued_tcp: u32 = read(peer, off.sk_receive_qlen)?;
    if queued_tcp != 0 {
        return Some(Verdict::Hold);
    }
    let psock = (user_data & !USER_DATA_TAGS) as *const u8;
    let queued: u32 = read(psock, off.psock_msg_tot_len)?;
    if u64::from(queued) + u64::from(size) > u64::from(config.budget) {
        return Some(Verdict::Hold);
    }
    Some(Verdict::Redirect)
}

/// The `T` at `base + offset` in kernel memory, or `None` if it cannot be read.
fn read<T>(base: *const u8, offset: u32) -> Option<T> {
    // SAFETY: `bpf_probe_read_kernel` copies from any kernel address and returns an error
    // instead of faulting; the value is plain data.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()) }.ok()
}
