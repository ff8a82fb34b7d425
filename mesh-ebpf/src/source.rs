//! The source address of a captured connection. Its destination becomes the agent's listener on
//! the pod's loopback address, where the kernel would pick a loopback source too; binding the
//! socket to the pod's own address first keeps what the application sees (`getsockname`) and
//! what the agent sees as it was. The port is left for `connect()` to choose
//! (`IP_BIND_ADDRESS_NO_PORT`, which `bpf_bind` always applies), per destination, reusing
//! `TIME_WAIT` ports of loopback destinations as the kernel allows.

use aya_ebpf::{bindings::sockaddr, helpers::generated::bpf_bind, programs::SockAddrContext};
use mesh_common::{AF_INET, AF_INET6};

use crate::addr;

/// `struct sockaddr_in`.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    /// Network byte order.
    port: u16,
    /// Network byte order.
    addr: u32,
    zero: [u8; 8],
}

/// `struct sockaddr_in6`.
#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port: u16,
    flowinfo: u32,
    addr: [u32; 4],
    scope_id: u32,
}

/// Binds an IPv4 socket that has no address yet to `ip4` (network order), port chosen at
/// `connect()`. A socket the application bound already keeps its address (the helper refuses).
#[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)] // small constants
pub fn bind4(ctx: &SockAddrContext, ip4: u32) {
    let mut sin = SockaddrIn {
        family: AF_INET as u16,
        port: 0,
        addr: ip4,
        zero: [0; 8],
    };
    // SAFETY: `sin` is a complete, initialised `sockaddr_in` on the stack for the call; the
    // helper only reads `size_of` bytes of it.
    let _ = unsafe {
        bpf_bind(
            ctx.sock_addr,
            (&raw mut sin).cast::<sockaddr>(),
            size_of::<SockaddrIn>() as i32,
        )
    };
}

/// Binds an IPv6 socket that has no address yet to `ip` (network-order words), or, for an IPv4
/// destination (`family` [`AF_INET`]), to `ip[0]` IPv4-mapped. See [`bind4`].
#[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)] // small constants
pub fn bind6(ctx: &SockAddrContext, family: u32, ip: [u32; 4]) {
    let addr = if family == AF_INET {
        [0, 0, addr::v4_mapped_marker(), ip[0]]
    } else {
        ip
    };
    let mut sin6 = SockaddrIn6 {
        family: AF_INET6 as u16,
        port: 0,
        flowinfo: 0,
        addr,
        scope_id: 0,
    };
    // SAFETY: as in `bind4`, for a complete `sockaddr_in6`.
    let _ = unsafe {
        bpf_bind(
            ctx.sock_addr,
            (&raw mut sin6).cast::<sockaddr>(),
            size_of::<SockaddrIn6>() as i32,
        )
    };
}
